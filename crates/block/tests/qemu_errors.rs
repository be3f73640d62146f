//! The same bad requests to `qemu-storage-daemon` and to our block layer
//! must fail with the same words. The commands go to QEMU over QMP; ours run
//! the corresponding block-layer calls (the QMP layer, when it lands, only
//! forwards these texts).

use block::{BlockdevOptions, Edge, Graph, User};
use serde_json::{Value, json};
use testkit::{StorageDaemon, run};

/// Runs a QMP-shaped command on our graph; the error text if it fails.
async fn ours(g: &Graph, cmd: &str, args: &Value) -> Result<(), String> {
    let s = |k: &str| args[k].as_str().unwrap_or_default().to_owned();
    let node = || g.get(&s("node")).map_err(|e| e.to_string());
    let r = match cmd {
        "blockdev-add" => match BlockdevOptions::from_json(args) {
            Ok(o) => g.add(&o).await.map(drop),
            Err(e) => Err(e),
        },
        "blockdev-del" => g.remove(&s("node-name")).await,
        "block-dirty-bitmap-add" => node()?.bitmaps().add(
            &s("name"),
            args["granularity"].as_u64(),
            args["persistent"].as_bool().unwrap_or(false),
            args["disabled"].as_bool().unwrap_or(false),
        ),
        "block-dirty-bitmap-remove" => node()?.bitmaps().remove(&s("name")),
        "block-dirty-bitmap-clear" => node()?.bitmaps().clear(&s("name")).map(drop),
        "block-dirty-bitmap-enable" => node()?.bitmaps().enable(&s("name")),
        "block-dirty-bitmap-merge" => {
            let target = node()?;
            let mut sources = Vec::new();
            for b in args["bitmaps"].as_array().into_iter().flatten() {
                let (n, name) = match b {
                    Value::String(name) => (target.clone(), name.clone()),
                    other => (
                        g.get(other["node"].as_str().unwrap_or_default())
                            .map_err(|e| e.to_string())?,
                        other["name"].as_str().unwrap_or_default().to_owned(),
                    ),
                };
                sources.push(n.bitmaps().snapshot(&name).map_err(|e| e.to_string())?);
            }
            target.bitmaps().merge(&s("target"), &sources)
        }
        other => panic!("no mapping for {other}"),
    };
    r.map_err(|e| e.to_string())
}

#[tokio::test]
async fn error_texts_match_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    let img = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "raw", img, "1M"]);
    let nbd = dir.path().join("nbd.sock");
    let setup = [
        json!({"driver": "null-co", "node-name": "n0", "size": 1048576}),
        json!({"driver": "null-co", "node-name": "big", "size": 2097152}),
        json!({"driver": "file", "node-name": "f0", "filename": img}),
        json!({"driver": "raw", "node-name": "disk0", "file": "f0"}),
    ];
    let mut args: Vec<String> = Vec::new();
    for v in &setup {
        args.extend(["--blockdev".into(), v.to_string()]);
    }
    args.extend([
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", nbd.display()),
        "--export".into(),
        "type=nbd,id=exp0,node-name=disk0,writable=on".into(),
    ]);
    let qsd = StorageDaemon::start(dir.path(), &args);
    let mut qmp = qsd.qmp();

    let g = Graph::new();
    let mut keep = Vec::new();
    for v in &setup {
        keep.push(
            g.add(&BlockdevOptions::from_json(v).unwrap())
                .await
                .unwrap(),
        );
    }
    let _export = Edge::new(&keep[3], User::Export("exp0".into()));

    let long = "x".repeat(1024);
    let cases: Vec<(&str, Value)> = vec![
        ("block-dirty-bitmap-add", json!({"node": "n0", "name": "b"})),
        (
            "block-dirty-bitmap-add",
            json!({"node": "big", "name": "b"}),
        ),
        ("block-dirty-bitmap-add", json!({"node": "n0", "name": ""})),
        ("block-dirty-bitmap-add", json!({"node": "n0", "name": "b"})),
        (
            "block-dirty-bitmap-add",
            json!({"node": "nope", "name": "a"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "a", "granularity": 100}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "a", "granularity": 1536}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "p", "persistent": true}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": long}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "n0", "name": "zz"}),
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "n0", "name": "zz"}),
        ),
        (
            "block-dirty-bitmap-enable",
            json!({"node": "n0", "name": "zz"}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": "b", "bitmaps": ["zz"]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": "b", "bitmaps": [{"node": "big", "name": "b"}]}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n0"}),
        ),
        ("blockdev-add", json!({"driver": "null-co"})),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "1bad"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "a#b"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "abcdefghijabcdefghijabcdefghij12"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "nosuch", "node-name": "z"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "z", "discard": "bogus"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "z", "read-only": "yes"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "z", "bogus": 1}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "z", "detect-zeroes": "unmap"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "z", "file": "nope"}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "z", "file": "f0", "size": 1000}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "z", "file": "f0", "offset": 1048000, "size": 4096}),
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "z", "filename": "/nonexistent/x"}),
        ),
        ("blockdev-del", json!({"node-name": "nope"})),
        ("blockdev-del", json!({"node-name": "f0"})),
        ("blockdev-del", json!({"node-name": "disk0"})),
    ];
    let mut compared = 0;
    for (cmd, args) in cases {
        let theirs = qmp.execute(cmd, args.clone()).map(drop).map_err(|e| e.desc);
        let mine = ours(&g, cmd, &args).await;
        assert_eq!(mine, theirs, "{cmd} {args}");
        compared += usize::from(theirs.is_err());
    }
    assert!(compared >= 25, "only {compared} errors compared");
}
