//! A server in the test process, serving nodes over a unix socket, for the
//! real peers (qemu-io, qemu-img, nbdinfo, nbdcopy) to talk to.

#![allow(dead_code)]

pub mod raw;

use std::path::PathBuf;
use std::sync::Arc;

use block::{BlockdevOptions, Graph, Node};
use nbd::{ExportOptions, ListenAddr, Server, ServerOptions};
use serde_json::Value;
use tempfile::TempDir;

/// A runtime, a graph, a server listening on `sock`, and a scratch directory.
pub struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub graph: Graph,
    pub server: Server,
    pub dir: TempDir,
    pub sock: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_options(ServerOptions::default())
    }

    pub fn with_options(options: ServerOptions) -> Fixture {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let server = Server::new(options);
        rt.block_on(server.listen(&ListenAddr::Unix(sock.clone())))
            .unwrap();
        Fixture {
            rt,
            graph: Graph::new(),
            server,
            dir,
            sock,
        }
    }

    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// Adds a node described by JSON options.
    pub fn add_node(&self, options: Value) -> Arc<Node> {
        let o = BlockdevOptions::from_json(&options).unwrap();
        self.rt.block_on(self.graph.add(&o)).unwrap()
    }

    /// Exports `node` under `name` (id = name).
    pub fn export(&self, node: &Arc<Node>, name: &str, writable: bool, bitmaps: &[&str]) {
        let options = ExportOptions {
            id: name.to_owned(),
            name: name.to_owned(),
            description: None,
            writable,
            bitmaps: bitmaps.iter().map(|s| s.to_string()).collect(),
            allocation_depth: true,
        };
        self.server.add_export(node, options).unwrap();
    }

    /// Starts listening on TCP too (127.0.0.1, a free port); returns the
    /// port.
    pub fn listen_tcp(&self) -> u16 {
        let bound = self
            .rt
            .block_on(self.server.listen(&ListenAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            }))
            .unwrap();
        let ListenAddr::Tcp { port, .. } = bound else {
            panic!("a TCP address")
        };
        assert_ne!(port, 0);
        port
    }

    /// A `driver=nbd` node `node` on export `export` of this server,
    /// over its unix socket.
    pub fn unix_client(&self, node: &str, export: &str) -> Arc<Node> {
        nbd::register(&self.graph);
        self.add_node(
            serde_json::json!({"driver": "nbd", "node-name": node, "export": export,
            "server": {"type": "unix", "path": self.sock.to_str().unwrap()}}),
        )
    }

    /// A `driver=nbd` node `node` on export `export` of this server, over
    /// TCP to `port` (see [`listen_tcp`](Self::listen_tcp)).
    pub fn tcp_client(&self, node: &str, export: &str, port: u16) -> Arc<Node> {
        nbd::register(&self.graph);
        self.add_node(
            serde_json::json!({"driver": "nbd", "node-name": node, "export": export,
            "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
        )
    }

    /// The NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// `--image-opts` for QEMU tools reaching export `name`.
    pub fn image_opts(&self, name: &str) -> String {
        format!(
            "driver=nbd,server.type=unix,server.path={},export={name}",
            self.sock.display()
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.stop();
        let _ = self.rt.block_on(self.graph.close_all());
    }
}

/// A peer server process (qemu-nbd, qemu-storage-daemon, nbdkit) on a unix
/// socket; killed when dropped.
pub struct Peer {
    child: std::process::Child,
    pub sock: PathBuf,
}

impl Peer {
    /// Starts `program args…` and waits until `sock` accepts connections.
    pub fn start(program: &str, package: &str, args: &[&str], sock: PathBuf) -> Peer {
        testkit::require_tool(program, package);
        let child = std::process::Command::new(program)
            .args(args)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let peer = Peer { child, sock };
        let deadline = std::time::Instant::now() + testkit::PEER_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&peer.sock).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{program} did not start listening on {}",
                peer.sock.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peer
    }

    /// The NBD URI of export `name` on this peer.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }
}

impl Peer {
    /// Sends `signal` (`STOP`, `CONT`, `KILL`, …) to the peer's process.
    pub fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} failed");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `program args…` and returns its standard output; fails the test,
/// with the output, if it fails.
pub fn tool(program: &str, package: &str, args: &[&str]) -> String {
    testkit::require_tool(program, package);
    testkit::run(program, args)
}

/// Writes the file back and drops its pages from the page cache.
pub fn evict(path: &str) {
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
}
