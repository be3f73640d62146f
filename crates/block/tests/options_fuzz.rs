//! `BlockdevOptions` parses what QMP clients send: arbitrary JSON must give
//! options or an error, never a panic; what parses must open or fail cleanly.

use block::{BlockdevOptions, Graph};
use proptest::prelude::*;
use serde_json::{Value, json};

/// JSON built from the keys the parser knows, with values of every type.
fn value() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "driver",
        "node-name",
        "read-only",
        "auto-read-only",
        "discard",
        "cache",
        "direct",
        "no-flush",
        "detect-zeroes",
        "filename",
        "aio",
        "file",
        "offset",
        "size",
        "read-zeroes",
        "pool",
        "image",
        "namespace",
        "conf",
        "snapshot",
        "user",
        "server",
        "host",
        "port",
        "auth-client-required",
        "bogus",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![
            "null-co",
            "raw",
            "file",
            "n0",
            "1bad",
            "unmap",
            "ignore",
            "on",
            "io_uring",
            "threads",
            "/nonexistent",
            "cephx",
            "rbd",
            "",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
            )),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_json_never_panics(
        v in value(),
        driver in prop::sample::select(vec!["null-co", "raw", "file", "qcow2", "rbd"]),
        keyval in any::<bool>(),
    ) {
        // Mostly objects with a driver, so that parsing gets deep.
        let v = match v {
            Value::Object(mut m) => {
                m.entry("driver").or_insert_with(|| Value::from(driver));
                Value::Object(m)
            }
            other => other,
        };
        let parsed = if keyval {
            BlockdevOptions::from_keyval_json(&v)
        } else {
            BlockdevOptions::from_json(&v)
        };
        if let Ok(options) = parsed {
            let g = Graph::new();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            // Opening may fail (missing files, names); it must not panic.
            let _ = rt.block_on(g.add(&options));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 5000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// QEMU's `rbd:` names come from image headers: anything parses to
    /// options that name a pool and an image, or to nothing, never a panic.
    #[test]
    fn rbd_filenames_never_panic(rest in "[a-z/@:=\\\\.é☃]{0,40}") {
        let name = format!("rbd:{rest}");
        if let Some(o) = block::options::rbd_filename(&name) {
            prop_assert!(!o.pool.is_empty() && !o.image.is_empty(), "{name}: {o:?}");
            prop_assert!(o.snapshot.as_deref() != Some(""), "{name}: {o:?}");
        }
    }
}

#[test]
fn a_valid_document_still_parses() {
    let v = json!({"driver": "null-co", "node-name": "n0", "size": 4096});
    BlockdevOptions::from_json(&v).unwrap();
}
