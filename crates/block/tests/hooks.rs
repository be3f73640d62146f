//! Write hooks: what copy-before-write and an active mirror rely on.

use std::sync::{Arc, Mutex};

use block::{
    BlockdevOptions, BoxFuture, Error, Graph, IoBuf, Node, WriteHook, WriteKind, WriteRequest,
    ZeroFlags,
};
use serde_json::json;

/// Records what it sees; in `before` the old data must still be there and
/// the bitmap already marked, in `after` the new data must be there.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<String>>,
    fail_before: bool,
}

impl WriteHook for Recorder {
    fn before<'a>(
        &'a self,
        node: &'a Node,
        req: WriteRequest<'a>,
    ) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            let old = node.read_in_hook(req.offset, req.len as usize).await?;
            let marked = node.bitmaps().info()[0].count > 0;
            let kind = match req.kind {
                WriteKind::Data(buf) => format!("data{}", buf.len()),
                WriteKind::Zeroes(_) => "zeroes".into(),
                WriteKind::Discard => "discard".into(),
            };
            self.seen.lock().unwrap().push(format!(
                "before {kind} {}+{} old={} marked={marked}",
                req.offset,
                req.len,
                old.as_slice()[0]
            ));
            if self.fail_before {
                return Err(Error::NotSupported("refused by the hook"));
            }
            Ok(())
        })
    }

    fn after<'a>(
        &'a self,
        node: &'a Node,
        req: WriteRequest<'a>,
    ) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            let new = node.read_in_hook(req.offset, req.len as usize).await?;
            self.seen.lock().unwrap().push(format!(
                "after {}+{} new={}",
                req.offset,
                req.len,
                new.as_slice()[0]
            ));
            Ok(())
        })
    }
}

async fn file_node(dir: &tempfile::TempDir) -> Arc<Node> {
    let path = dir.path().join("d.img");
    std::fs::write(&path, vec![9u8; 1 << 20]).unwrap();
    let g = Graph::new();
    let v = json!({"driver": "file", "node-name": "f", "filename": path.to_str().unwrap(),
                   "discard": "unmap"});
    g.add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn hooks_run_around_every_write_type_request() {
    let dir = tempfile::tempdir().unwrap();
    let node = file_node(&dir).await;
    node.bitmaps().add("b", None, false, false).unwrap();
    let recorder = Arc::new(Recorder::default());
    let hook: Arc<dyn WriteHook> = recorder.clone();
    node.add_write_hook(hook.clone());

    let (r, _) = node.write(4096, IoBuf::from_vec(vec![1; 512]), false).await;
    r.unwrap();
    node.write_zeroes(8192, 512, ZeroFlags::default())
        .await
        .unwrap();
    node.discard(65536, 65536).await.unwrap();
    node.remove_write_hook(&hook);
    let (r, _) = node.write(0, IoBuf::from_vec(vec![2; 512]), false).await;
    r.unwrap();

    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "before data512 4096+512 old=9 marked=true",
            "after 4096+512 new=1",
            "before zeroes 8192+512 old=9 marked=true",
            "after 8192+512 new=0",
            "before discard 65536+65536 old=9 marked=true",
            "after 65536+65536 new=0",
        ]
    );
}

#[tokio::test]
async fn a_failing_hook_fails_the_request_before_it_is_issued() {
    let dir = tempfile::tempdir().unwrap();
    let node = file_node(&dir).await;
    node.bitmaps().add("b", None, false, false).unwrap();
    node.add_write_hook(Arc::new(Recorder {
        fail_before: true,
        ..Recorder::default()
    }));
    let (r, buf) = node.write(0, IoBuf::from_vec(vec![1; 512]), false).await;
    assert_eq!(
        r.unwrap_err().to_string(),
        "Operation not supported: refused by the hook"
    );
    assert_eq!(buf.len(), 512);
    assert_eq!(node.read(0, 512).await.unwrap().as_slice(), &[9u8; 512][..]);
    // The bitmap was marked before the hook ran: a superset is allowed.
    assert_eq!(node.bitmaps().info()[0].count, 65536);
}

/// A hook that holds its request until released, to see who waits for whom.
struct Gate {
    open: tokio::sync::Semaphore,
    /// Told when a request reaches the gate (it is in flight by then).
    reached: tokio::sync::Notify,
}

impl WriteHook for Gate {
    fn before<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async move {
            self.reached.notify_one();
            let permit = self.open.acquire().await;
            drop(permit);
            Ok(())
        })
    }

    fn after<'a>(&'a self, _: &'a Node, _: WriteRequest<'a>) -> BoxFuture<'a, block::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn jobs_can_wait_for_overlapping_requests_and_drain() {
    let dir = tempfile::tempdir().unwrap();
    let node = file_node(&dir).await;
    let gate = Arc::new(Gate {
        open: tokio::sync::Semaphore::new(0),
        reached: tokio::sync::Notify::new(),
    });
    node.add_write_hook(gate.clone());
    let writer = {
        let node = node.clone();
        tokio::spawn(async move {
            node.write(4096, IoBuf::from_vec(vec![3; 4096]), false)
                .await
                .0
        })
    };
    // The write is in flight, held at the gate.
    gate.reached.notified().await;
    // Not overlapping: returns at once.
    tokio::time::timeout(
        std::time::Duration::from_secs(1),
        node.wait_for_overlapping(0, 4096),
    )
    .await
    .unwrap();
    // Overlapping: waits for the gated write.
    let waiting = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        node.wait_for_overlapping(6000, 10),
    )
    .await;
    assert!(waiting.is_err(), "returned while the write was in flight");
    gate.open.add_permits(1);
    tokio::time::timeout(std::time::Duration::from_secs(5), node.drain())
        .await
        .unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(node.read(4096, 1).await.unwrap().as_slice(), [3]);
}

/// A hook that reads the range being written, on an `O_DIRECT` node where an
/// unaligned write holds its aligned cover exclusively: it must not wait for
/// its own write.
#[tokio::test]
async fn a_hook_can_read_inside_a_read_modify_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct.img");
    std::fs::write(&path, vec![9u8; 1 << 20]).unwrap();
    let g = Graph::new();
    let v = json!({"driver": "file", "node-name": "d", "filename": path.to_str().unwrap(),
                   "cache": {"direct": true}});
    let node = g
        .add(&BlockdevOptions::from_json(&v).unwrap())
        .await
        .unwrap();
    node.bitmaps().add("b", None, false, false).unwrap();
    let recorder = Arc::new(Recorder::default());
    node.add_write_hook(recorder.clone());
    let write = node.write(1000, IoBuf::from_vec(vec![4; 100]), false);
    let (r, _) = tokio::time::timeout(std::time::Duration::from_secs(5), write)
        .await
        .expect("the hook's read waited for its own write");
    r.unwrap();
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "before data100 1000+100 old=9 marked=true",
            "after 1000+100 new=4"
        ]
    );
}
