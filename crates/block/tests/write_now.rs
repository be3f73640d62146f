//! `Node::try_write_now`: a small buffered write done on the calling
//! thread lands with the tracking of every layer it passes (`raw` over
//! `file`), and is declined, with nothing written, wherever something on
//! the way needs a wait (a job's hook, a held gate, `detect-zeroes`,
//! `O_DIRECT`, a part page).

use std::sync::Arc;

use block::{BlockdevOptions, BoxFuture, Graph, Node, WriteHook, WriteRequest};
use serde_json::{Value, json};

const SIZE: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

/// A sparse `SIZE` file in `dir`.
fn sparse(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("disk");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(SIZE))
        .expect("a sparse file");
    path.display().to_string()
}

/// Node `disk`, `raw` with the extra options `raw`, over file node `proto`
/// of `path` with the extra options `file`.
async fn raw(g: &Graph, path: &str, file: Value, raw: Value) -> Arc<Node> {
    let mut f = json!({"driver": "file", "node-name": "proto", "filename": path});
    if let (Value::Object(f), Value::Object(extra)) = (&mut f, file) {
        f.extend(extra);
    }
    let mut v = json!({"driver": "raw", "node-name": "disk", "file": f});
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, raw) {
        v.extend(extra);
    }
    let options = BlockdevOptions::from_json(&v).expect("valid options");
    g.add(&options).await.expect("the node opens")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Bytes counted dirty by the first bitmap of `node`.
fn dirty(node: &Node) -> u64 {
    node.bitmaps().info()[0].count
}

/// Whether the file at `path` holds only zeroes.
fn untouched(path: &str) -> bool {
    std::fs::read(path)
        .expect("the file")
        .iter()
        .all(|&b| b == 0)
}

#[test]
fn a_write_now_lands_with_the_tracking_of_both_layers() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = sparse(&dir);
    runtime().block_on(async {
        let g = Graph::new();
        // A window of its file: the write is shifted with it.
        let disk = raw(
            &g,
            &path,
            json!({}),
            json!({"offset": MIB, "size": 2 * MIB}),
        )
        .await;
        let proto = g.get("proto").expect("the file node");
        disk.add_bitmap("b", Some(65536), false, false)
            .await
            .expect("a bitmap");
        proto
            .add_bitmap("f", Some(65536), false, false)
            .await
            .expect("a bitmap");
        let data: Vec<u8> = (0..8192).map(|i| (i % 251) as u8 + 1).collect();
        let result = disk.try_write_now(4096, &data).expect("written at once");
        result.expect("no error");
        let on_disk = std::fs::read(&path).expect("the file");
        let at = (MIB + 4096) as usize;
        assert!(on_disk[..at].iter().all(|&b| b == 0), "before the write");
        assert_eq!(&on_disk[at..at + data.len()], &data[..]);
        assert!(on_disk[at + data.len()..].iter().all(|&b| b == 0));
        assert_eq!(dirty(&disk), 65536, "the raw node's bitmap marks it");
        assert_eq!(dirty(&proto), 65536, "the file node's bitmap marks it");
        // Past the end of the window: the node's error, nothing written.
        let past = disk.try_write_now(2 * MIB - 4096, &[9u8; 8192]);
        assert!(matches!(past, Some(Err(block::Error::OutOfRange { .. }))));
        let after = std::fs::read(&path).expect("the file");
        assert!(after[(3 * MIB - 4096) as usize..].iter().all(|&b| b == 0));
    });
}

/// A hook that only lets writes by.
struct Passing;

impl WriteHook for Passing {
    fn before<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn after<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn a_write_now_is_declined_where_something_needs_a_wait() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = sparse(&dir);
    let page = [7u8; 4096];
    runtime().block_on(async {
        let g = Graph::new();
        let disk = raw(&g, &path, json!({}), json!({})).await;
        let proto = g.get("proto").expect("the file node");
        // A job's hook, on either layer.
        let hook: Arc<dyn WriteHook> = Arc::new(Passing);
        for node in [&disk, &proto] {
            node.add_write_hook(hook.clone());
            assert!(disk.try_write_now(0, &page).is_none(), "with a hook");
            node.remove_write_hook(&hook);
        }
        // Writes held at the gate (a transaction, a pivot).
        disk.hold_writes().await;
        assert!(disk.try_write_now(0, &page).is_none(), "at a closed gate");
        disk.release_writes(None);
        // Not whole pages of the page cache.
        assert!(disk.try_write_now(512, &page).is_none(), "a part page");
        assert!(untouched(&path), "a declined write wrote");
        // With nothing in the way, the same write goes.
        let result = disk.try_write_now(0, &page).expect("written at once");
        result.expect("no error");
        assert_eq!(std::fs::read(&path).expect("the file")[..4096], page);
    });
    let path = sparse(&dir);
    // Each case on a graph of its own.
    let case = |file: Value, raw_options: Value| {
        let path = path.clone();
        runtime().block_on(async move {
            let g = Graph::new();
            let disk = raw(&g, &path, file, raw_options).await;
            let result = disk.try_write_now(0, &page);
            g.close_all().await.expect("the nodes close");
            result
        })
    };
    // `detect-zeroes` looks at the data first.
    let r = case(json!({}), json!({"detect-zeroes": "on"}));
    assert!(r.is_none(), "with detect-zeroes");
    // An `O_DIRECT` file goes through its asynchronous engine.
    let r = case(json!({"cache": {"direct": true}}), json!({}));
    assert!(r.is_none(), "into O_DIRECT");
    assert!(untouched(&path), "a declined write wrote");
    // A read-only node refuses it as `write` does.
    let r = case(json!({}), json!({"read-only": true}));
    assert!(matches!(r, Some(Err(block::Error::ReadOnly(_)))), "{r:?}");
    assert!(untouched(&path));
}
