//! Helpers shared by the qcow2 tests.

use std::sync::Arc;

use block::{BlockdevOptions, Graph, Node};
use serde_json::{Value, json};

/// Opens `image` read-only as qcow2 node `name` over a `file` node; `extra`
/// adds or replaces top-level options (`backing`, `file`, …).
pub async fn open_qcow2(
    g: &Graph,
    name: &str,
    image: &str,
    extra: Value,
) -> block::Result<Arc<Node>> {
    let mut v = json!({"driver": "qcow2", "node-name": name, "read-only": true,
                       "file": {"driver": "file", "filename": image}});
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
        v.extend(extra);
    }
    g.add(&BlockdevOptions::from_json(&v).unwrap()).await
}
