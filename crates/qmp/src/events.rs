//! Events: QMP messages the daemon sends without being asked.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::json;

/// How many events a slow monitor may fall behind before it loses some.
const BACKLOG: usize = 4096;

/// The daemon's event stream: every event goes to every monitor that has
/// finished capability negotiation, in the order emitted.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<str>>,
}

impl Default for Events {
    fn default() -> Events {
        Events::new()
    }
}

impl Events {
    /// A stream with no listener yet.
    pub fn new() -> Events {
        Events {
            tx: broadcast::channel(BACKLOG).0,
        }
    }

    /// Sends event `name` with `data` (QEMU leaves `data` out for events
    /// that have none), stamped with the wall-clock time.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut event = json!({
            "event": name,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if let Some(data) = data {
            event["data"] = data;
        }
        tracing::debug!(event = name, "event");
        // No receiver is fine: nobody is listening yet.
        let _ = self.tx.send(json::to_string(&event).into());
    }

    /// A receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}
