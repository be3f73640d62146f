//! Copy offload (`Node::copy_range_to`): a copy between buffered host
//! files inside the kernel lands the source's bytes at the target with the
//! target's write tracking, and is refused, with nothing written, wherever
//! a node on either side needs the data to pass through memory.

use std::sync::Arc;

use block::{BlockdevOptions, BoxFuture, Graph, IoBuf, Node, WriteHook, WriteRequest};
use serde_json::{Value, json};

const SIZE: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

/// A `SIZE` file at `path`, filled with `byte` (or sparse for 0).
fn file(path: &std::path::Path, byte: u8) -> String {
    if byte == 0 {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(SIZE))
            .expect("a sparse file");
    } else {
        std::fs::write(path, vec![byte; SIZE as usize]).expect("a full file");
    }
    path.display().to_string()
}

async fn add(g: &Graph, v: Value) -> Arc<Node> {
    let options = BlockdevOptions::from_json(&v).expect("valid options");
    g.add(&options).await.expect("the node opens")
}

/// A `raw` node `name` over a `file` node of `path`; `file` adds options
/// to the file node, `raw` to the raw node.
async fn raw(g: &Graph, name: &str, path: &str, file: Value, raw: Value) -> Arc<Node> {
    let mut f = json!({"driver": "file", "filename": path});
    if let (Value::Object(f), Value::Object(extra)) = (&mut f, file) {
        f.extend(extra);
    }
    let mut v = json!({"driver": "raw", "node-name": name, "file": f});
    if let (Value::Object(v), Value::Object(extra)) = (&mut v, raw) {
        v.extend(extra);
    }
    add(g, v).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn a_copy_between_buffered_files_lands_with_the_targets_tracking() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let src = file(&dir.path().join("src"), 0x5a);
    let dst = file(&dir.path().join("dst"), 0);
    runtime().block_on(async {
        let g = Graph::new();
        let source = raw(&g, "src", &src, json!({}), json!({})).await;
        // The target is a window of its file: the copy is shifted with it.
        let target = raw(
            &g,
            "dst",
            &dst,
            json!({}),
            json!({"offset": MIB, "size": 2 * MIB}),
        )
        .await;
        target
            .add_bitmap("b", Some(65536), false, false)
            .await
            .expect("a bitmap");
        assert!(
            source
                .copy_range_to(MIB, MIB, &target, false)
                .await
                .expect("no error")
        );
        let data = target.read(0, (2 * MIB) as usize).await.expect("a read");
        let (copied, rest) = data.as_slice().split_at(MIB as usize);
        assert!(copied.iter().all(|&b| b == 0), "before the copied range");
        assert!(rest.iter().all(|&b| b == 0x5a), "the copied range");
        let on_disk = std::fs::read(&dst).expect("the target file");
        assert!(on_disk[..(2 * MIB) as usize].iter().all(|&b| b == 0));
        assert!(
            on_disk[(2 * MIB) as usize..(3 * MIB) as usize]
                .iter()
                .all(|&b| b == 0x5a)
        );
        let dirty = target.bitmaps().info();
        assert_eq!(dirty.len(), 1);
        assert_eq!(dirty[0].count, MIB, "the bitmap marks the copy");
        // Past the end of either node: an error, nothing copied.
        assert!(
            source
                .copy_range_to(SIZE - 4096, 8192, &target, false)
                .await
                .is_err()
        );
        assert!(
            target
                .copy_range_to(MIB, 2 * MIB, &source, false)
                .await
                .is_err()
        );
    });
}

/// A hook that only counts what passes.
struct Counting;

impl WriteHook for Counting {
    fn before<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn after<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn a_copy_is_refused_where_the_data_must_pass_through_memory() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = |name: &str, byte| file(&dir.path().join(name), byte);
    let (src, dst) = (path("src", 0x33), path("dst", 0));
    runtime().block_on(async {
        let g = Graph::new();
        let source = raw(&g, "src", &src, json!({}), json!({})).await;
        let direct_source = raw(
            &g,
            "src-direct",
            &path("src-direct", 0x33),
            json!({"cache": {"direct": true}}),
            json!({}),
        )
        .await;
        let target = raw(&g, "dst", &dst, json!({}), json!({})).await;
        let direct = raw(
            &g,
            "dst-direct",
            &path("dst-direct", 0),
            json!({"cache": {"direct": true}}),
            json!({}),
        )
        .await;
        let detecting = raw(
            &g,
            "dst-zeroes",
            &path("dst-zeroes", 0),
            json!({}),
            json!({"detect-zeroes": "on"}),
        )
        .await;
        let read_only = raw(
            &g,
            "dst-ro",
            &path("dst-ro", 0),
            json!({}),
            json!({"read-only": true}),
        )
        .await;
        let null = add(
            &g,
            json!({"driver": "null-co", "node-name": "null", "size": SIZE}),
        )
        .await;

        let refused = |from: &Arc<Node>, to: &Arc<Node>| {
            let (from, to) = (from.clone(), to.clone());
            async move { from.copy_range_to(0, MIB, &to, false).await }
        };
        assert!(!refused(&direct_source, &target).await.expect("no error"));
        assert!(!refused(&source, &direct).await.expect("no error"));
        assert!(!refused(&source, &detecting).await.expect("no error"));
        assert!(!refused(&source, &null).await.expect("no error"));
        assert!(!refused(&null, &target).await.expect("no error"));
        assert!(refused(&source, &read_only).await.is_err());
        let hook: Arc<dyn WriteHook> = Arc::new(Counting);
        target.add_write_hook(hook.clone());
        assert!(!refused(&source, &target).await.expect("no error"));
        target.remove_write_hook(&hook);
        // Nothing was written by the refused copies.
        for node in [&target, &direct, &detecting, &read_only] {
            let data = node.read(0, MIB as usize).await.expect("a read");
            assert!(data.is_zero(), "{} stays zero", node.name());
        }
        // Unhooked, the same copy goes through.
        assert!(refused(&source, &target).await.expect("no error"));
        let data = target.read(0, MIB as usize).await.expect("a read");
        assert_eq!(
            data.as_slice(),
            IoBuf::copy_from(&[0x33; MIB as usize], 1).as_slice()
        );
    });
}
