//! Arbitrary bytes as everything a client sends to a QMP monitor: the
//! monitor must answer or hang up, never panic. The dispatcher feeds
//! arguments to the parsers the daemon uses (`blockdev-add` options, QEMU's
//! key=value syntax), so those are fuzzed with the framing.

#![no_main]

use std::sync::{Arc, OnceLock};

use block::BlockdevOptions;
use libfuzzer_sys::fuzz_target;
use qmp::{BoxFuture, Dispatcher, Events, Monitor, MonitorConfig, QmpError};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Parsers;

impl Dispatcher for Parsers {
    fn dispatch(&self, command: String, args: Map<String, Value>) -> BoxFuture<'static, Result<Value, QmpError>> {
        Box::pin(async move {
            let args = Value::Object(args);
            match command.as_str() {
                "blockdev-add" => {
                    BlockdevOptions::from_json(&args).map_err(|e| QmpError::generic(e.to_string()))?;
                }
                "keyval" => {
                    let text = args["text"].as_str().unwrap_or_default();
                    let v = qapi::keyval::parse(text, Some("driver"))?;
                    let _ = BlockdevOptions::from_keyval_json(&v);
                }
                _ => return Err(qmp::command_not_found(&command)),
            }
            Ok(json!({}))
        })
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    monitor: Arc<Monitor>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let events = Events::new();
        let monitor = Arc::new(Monitor::new(
            MonitorConfig {
                version: json!({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""}),
                oob: true,
            },
            Arc::new(Parsers),
            events,
        ));
        World { rt, monitor }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    // Whole inputs as key=value text, too.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = qapi::keyval::parse(text, Some("driver"));
    }
    w.rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (reader, writer) = tokio::io::split(server);
        let stop = tokio::sync::watch::channel(false).1;
        let monitor = w.monitor.clone();
        let session = tokio::spawn(async move { monitor.serve(reader, writer, stop).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
        drop(wr);
        let _ = session.await;
        let _ = drain.await;
    });
});
