//! Test support: drive the real QEMU peers from Rust tests.
//!
//! Everything here panics with a clear message instead of returning errors:
//! it runs inside tests, where a panic *is* the failure report. A peer that is
//! not installed is a failure too, never a silent skip; the message says how
//! to install it (`./scripts/test` installs everything).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long to wait for a peer to come up or answer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds `program` on `PATH`, or fails the test naming the Debian package
/// that provides it.
pub fn require_tool(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{program}` is not installed, and this test needs it: install the Debian \
                 package `{package}` (./scripts/test does that for you)"
            )
        })
}

/// Runs `program` with `args`; fails the test with its output unless it
/// exits successfully. Returns its standard output.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"));
    assert!(
        output.status.success(),
        "`{program} {}` failed with {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Creates a qcow2 image of `size` bytes with `qemu-img create`; `options`
/// go to `-o` (e.g. `cluster_size=512`) unless empty.
pub fn qemu_img_create_qcow2(image: &str, size: u64, options: &str) {
    require_tool("qemu-img", "qemu-utils");
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([image, size.as_str()]);
    run("qemu-img", &args);
}

/// Creates a qcow2 overlay `image` of `size` (e.g. `16M`) whose header
/// names `backing` in format `backing_format`, without opening the backing
/// file (`qemu-img create -u`): it may be a name only the daemon can reach.
pub fn qemu_img_create_overlay(image: &str, backing: &str, backing_format: &str, size: &str) {
    require_tool("qemu-img", "qemu-utils");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            backing_format,
            image,
            size,
        ],
    );
}

/// Writes to `image` (opened as `format`) with one `qemu-io` run: each
/// `(offset, len, Some(pattern))` writes that byte, `(offset, len, None)`
/// writes zeroes (`write -z`).
pub fn qemu_io_writes(image: &str, format: &str, writes: &[(u64, u64, Option<u8>)]) {
    require_tool("qemu-io", "qemu-utils");
    let mut args = vec!["-f".to_string(), format.to_string()];
    for (offset, len, pattern) in writes {
        let cmd = match pattern {
            Some(p) => format!("write -P {p} {offset} {len}"),
            None => format!("write -z {offset} {len}"),
        };
        args.extend(["-c".to_string(), cmd]);
    }
    args.push(image.to_string());
    run(
        "qemu-io",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// An error a QMP server answered with: `{"error": {"class", "desc"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The error class, e.g. `GenericError`.
    pub class: String,
    /// The human-readable description.
    pub desc: String,
}

/// A minimal synchronous QMP client, enough to set up and inspect a peer.
/// Events that arrive while waiting for a reply are kept in
/// [`events`](Self::events).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received so far, in order.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let (mut qmp, greeting) = Qmp::connect_raw(path);
        assert!(
            greeting.get("QMP").is_some(),
            "expected a QMP greeting, got {greeting}"
        );
        qmp.execute_ok("qmp_capabilities", json!({}));
        qmp
    }

    /// Connects to the QMP socket at `path` and reads the greeting, without
    /// negotiating: the session is left in capabilities negotiation mode.
    /// Returns the greeting too.
    pub fn connect_raw(path: &Path) -> (Qmp, Value) {
        Qmp::try_connect_raw(path)
            .unwrap_or_else(|e| panic!("cannot connect to QMP at {}: {e}", path.display()))
    }

    /// [`connect_raw`](Self::connect_raw), with an error where the
    /// connection fails or ends before the greeting.
    fn try_connect_raw(path: &Path) -> std::io::Result<(Qmp, Value)> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(PEER_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let mut line = String::new();
        if qmp.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let greeting = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("QMP sent bad JSON ({e}): {line}"));
        Ok((qmp, greeting))
    }

    /// Sends `text` as it is (no newline added).
    pub fn send_raw(&mut self, text: &str) {
        self.writer
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("cannot send over QMP: {e}"));
    }

    /// The next message that is not an event (events are kept in
    /// [`events`](Self::events)): a whole reply, `return` or `error`.
    pub fn read_reply(&mut self) -> Value {
        loop {
            let message = self.read_message();
            if message.get("event").is_some() {
                self.events.push(message);
            } else {
                return message;
            }
        }
    }

    /// Sends `request` (any JSON) and returns the whole reply.
    pub fn request(&mut self, request: &Value) -> Value {
        self.send_raw(&format!("{request}\n"));
        self.read_reply()
    }

    /// Waits until `count` events have been received (or fails the test
    /// after [`PEER_TIMEOUT`]); returns them all and forgets them.
    pub fn take_events(&mut self, count: usize) -> Vec<Value> {
        while self.events.len() < count {
            let message = self.read_message();
            assert!(
                message.get("event").is_some(),
                "expected an event, got {message}"
            );
            self.events.push(message);
        }
        std::mem::take(&mut self.events)
    }

    /// The next event, kept ones first (see [`events`](Self::events)),
    /// waiting up to `timeout` for one to arrive (the test fails after
    /// that, or on a message that is not an event).
    pub fn next_event(&mut self, timeout: Duration) -> Value {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        let socket = self.reader.get_ref();
        socket
            .set_read_timeout(Some(timeout))
            .unwrap_or_else(|e| panic!("cannot set a QMP read timeout: {e}"));
        let message = self.read_message();
        self.reader
            .get_ref()
            .set_read_timeout(Some(PEER_TIMEOUT))
            .unwrap_or_else(|e| panic!("cannot set a QMP read timeout: {e}"));
        assert!(
            message.get("event").is_some(),
            "expected an event, got {message}"
        );
        message
    }

    /// Sends a command and waits for its reply.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let request = json!({ "execute": command, "arguments": arguments });
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .unwrap_or_else(|e| panic!("cannot send {command} over QMP: {e}"));
        loop {
            let message = self.read_message();
            if message.get("event").is_some() {
                self.events.push(message);
            } else if message.get("QMP").is_some() && command == "qmp_capabilities" {
                // qemu-storage-daemon's monitor can greet a connection twice
                // when the readiness probe's connection closed just before
                // it (seen in CI); the second greeting says nothing new.
                continue;
            } else if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            } else if let Some(err) = message.get("error") {
                let field = |name: &str| err[name].as_str().unwrap_or_default().to_owned();
                return Err(QmpError {
                    class: field("class"),
                    desc: field("desc"),
                });
            } else {
                panic!("unexpected QMP message in reply to {command}: {message}");
            }
        }
    }

    /// Like [`execute`](Self::execute), failing the test on an error reply.
    pub fn execute_ok(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments.clone())
            .unwrap_or_else(|e| panic!("QMP {command} {arguments} failed: {e:?}"))
    }

    /// The next message, event or not.
    pub fn read_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("cannot read from QMP: {e}"));
        assert!(n > 0, "the QMP server closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent bad JSON ({e}): {line}"))
    }
}

/// A running storage daemon — `qemu-storage-daemon`, or `bitmirror serve`
/// standing in for it — with a QMP monitor on a Unix socket. Killed when
/// dropped.
pub struct StorageDaemon {
    child: Child,
    qmp_path: PathBuf,
}

impl StorageDaemon {
    /// Starts `qemu-storage-daemon` with `args` plus a QMP monitor whose
    /// socket is `qmp.sock` in `dir`, and waits until the monitor accepts
    /// connections.
    pub fn start(dir: &Path, args: &[String]) -> StorageDaemon {
        let program = require_tool("qemu-storage-daemon", "qemu-utils");
        StorageDaemon::start_program(&program, &[], dir, args)
    }

    /// Like [`start`](Self::start), running `program` with `prefix` before
    /// the daemon's options (e.g. bitmirror with `["serve"]`).
    pub fn start_program(
        program: &Path,
        prefix: &[&str],
        dir: &Path,
        args: &[String],
    ) -> StorageDaemon {
        let qmp_path = dir.join("qmp.sock");
        let chardev = format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            qmp_path.display()
        );
        let child = Command::new(program)
            .args(prefix)
            .args(args)
            .args(["--chardev", &chardev, "--monitor", "chardev=qmp0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut daemon = StorageDaemon { child, qmp_path };
        daemon.wait_for_socket();
        daemon
    }

    /// A new QMP connection to the daemon, past capabilities negotiation.
    pub fn qmp(&self) -> Qmp {
        // A monitor that serves one client at a time (QEMU's) may still be
        // busy with the probe of `wait_for_socket`, or a connection just
        // closed, and turn this one away: tried again for a while.
        let deadline = Instant::now() + PEER_TIMEOUT;
        loop {
            match Qmp::try_connect_raw(&self.qmp_path) {
                Ok((mut qmp, greeting)) => {
                    assert!(
                        greeting.get("QMP").is_some(),
                        "expected a QMP greeting, got {greeting}"
                    );
                    qmp.execute_ok("qmp_capabilities", json!({}));
                    return qmp;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to QMP at {}: {e}", self.qmp_path.display()),
            }
        }
    }

    /// Where the QMP socket is.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp_path
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the daemon to exit (after `quit` or a signal), at most
    /// [`PEER_TIMEOUT`]; its exit code (`None` if killed by a signal).
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PEER_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) => {}
                Err(e) => panic!("cannot wait for the daemon: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {PEER_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + PEER_TIMEOUT;
        while UnixStream::connect(&self.qmp_path).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("qemu-storage-daemon exited early with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not open its QMP socket within {PEER_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Test certificates in QEMU's `tls-creds-x509` layout, made with
/// `openssl`: CAs, and for each endpoint a directory holding `ca-cert.pem`
/// and `ROLE-cert.pem`/`ROLE-key.pem` signed by one of them.
pub mod pki {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::require_tool;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new(require_tool("openssl", "openssl"))
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Makes a CA called `name` in `dir` (`NAME-ca-cert.pem`,
    /// `NAME-ca-key.pem`).
    pub fn ca(dir: &Path, name: &str) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} test CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{name}-ca-key.pem"),
                "-out",
                &format!("{name}-ca-cert.pem"),
            ],
        );
    }

    /// Makes `dir/out/`, a credentials directory for `role` (`server`:
    /// valid for `localhost` and `127.0.0.1`; `client`: common name
    /// `client`) signed by CA `ca`; returns its path.
    pub fn creds(dir: &Path, ca: &str, role: &str, out: &str) -> PathBuf {
        creds_for(dir, ca, role, out, &format!("/CN={role}"))
    }

    /// [`creds`] with the certificate's subject given (`openssl`'s
    /// `/C=…/O=…/CN=…` form).
    pub fn creds_for(dir: &Path, ca: &str, role: &str, out: &str, subject: &str) -> PathBuf {
        std::fs::create_dir_all(dir.join(out)).expect("a directory");
        let ext = dir.join(format!("{out}-{role}.ext"));
        let usage = if role == "server" {
            "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
        } else {
            "extendedKeyUsage=clientAuth\n"
        };
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n{usage}"
            ),
        )
        .expect("an extension file");
        let key = format!("{out}/{role}-key.pem");
        let csr = format!("{out}/{role}.csr");
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out",
                &csr,
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-days",
                "2",
                "-CA",
                &format!("{ca}-ca-cert.pem"),
                "-CAkey",
                &format!("{ca}-ca-key.pem"),
                "-CAcreateserial",
                "-extfile",
                ext.to_str().unwrap_or_default(),
                "-out",
                &format!("{out}/{role}-cert.pem"),
            ],
        );
        std::fs::copy(
            dir.join(format!("{ca}-ca-cert.pem")),
            dir.join(out).join("ca-cert.pem"),
        )
        .expect("the CA certificate");
        dir.join(out)
    }
}

/// The one-node Ceph cluster the RBD tests run against (the project's
/// `scripts/ceph-cluster`): found through `BITMIRROR_TEST_CEPH_CONF`
/// (`scripts/test` starts the cluster and sets it), or started here on
/// first use and left running for the next test.
pub mod ceph {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::{require_tool, run};

    /// Where the tests' cluster lives when they start it themselves.
    pub fn cluster_dir() -> PathBuf {
        std::env::temp_dir().join("bitmirror-test-ceph")
    }

    /// The test cluster's `ceph.conf`, starting the cluster when needed
    /// (once per test process).
    pub fn conf() -> String {
        static CONF: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        CONF.get_or_init(find_or_start).clone()
    }

    fn find_or_start() -> String {
        if let Some(conf) = std::env::var_os("BITMIRROR_TEST_CEPH_CONF") {
            return conf.to_string_lossy().into_owned();
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster");
        let dir = cluster_dir();
        std::fs::create_dir_all(&dir).expect("a directory for the test cluster");
        // One starter at a time: tests run as parallel processes. (`-o`:
        // the daemons must not inherit the lock.)
        let out = Command::new(require_tool("flock", "util-linux"))
            .arg("-o")
            .arg(dir.join(".lock"))
            .arg(&script)
            .arg("start")
            .arg(&dir)
            .output()
            .expect("scripts/ceph-cluster runs");
        assert!(
            out.status.success(),
            "cannot start the test Ceph cluster with {} start {}: {}",
            script.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The pool the tests use.
    pub const POOL: &str = "rbd";

    /// A fresh image name: `PREFIX-PID-MICROS-N`, unique across test
    /// processes and runs against a cluster left running.
    pub fn image_name(prefix: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() % 1_000_000_000);
        format!(
            "{prefix}-{}-{micros}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs `rbd` against the test cluster; returns its standard output.
    pub fn rbd(args: &[&str]) -> String {
        require_tool("rbd", "ceph-common");
        let conf = conf();
        let mut all = vec!["-c", conf.as_str()];
        all.extend_from_slice(args);
        run("rbd", &all)
    }

    /// The images in the test pool.
    pub fn images() -> Vec<String> {
        rbd(&["ls", POOL]).lines().map(str::to_owned).collect()
    }

    /// `rbd export` of image `name` into the file `to`.
    pub fn export(name: &str, to: &std::path::Path) {
        let spec = format!("{POOL}/{name}");
        rbd(&["export", "--no-progress", &spec, &to.to_string_lossy()]);
    }

    /// `rbd import` of the file `from` as image `name`.
    pub fn import(from: &std::path::Path, name: &str) {
        let spec = format!("{POOL}/{name}");
        rbd(&["import", "--no-progress", &from.to_string_lossy(), &spec]);
    }

    /// Removes image `name` (and its bitmap sidecar, if any), quietly and
    /// without starting the cluster: for clean-up code, which must not
    /// panic.
    pub fn remove(name: &str) {
        let conf = std::env::var("BITMIRROR_TEST_CEPH_CONF").unwrap_or_else(|_| {
            cluster_dir()
                .join("ceph.conf")
                .to_string_lossy()
                .into_owned()
        });
        for image in [name.to_owned(), format!("{name}.bitmaps")] {
            let spec = format!("{POOL}/{image}");
            for args in [
                &["snap", "purge", "--no-progress"][..],
                &["rm", "--no-progress"],
            ] {
                let _ = Command::new("rbd")
                    .args(["-c", &conf])
                    .args(args)
                    .arg(&spec)
                    .output();
            }
        }
    }

    /// A `driver=rbd` node's options for image `name`, as JSON text
    /// members (`"driver": "rbd", …` without braces).
    pub fn node_json(name: &str) -> String {
        format!(
            r#""driver": "rbd", "pool": "{POOL}", "image": "{name}", "conf": "{}""#,
            conf()
        )
    }
}

/// Waits (up to 30 s) until the block device holding `path`'s directory has
/// sent no discard for 300 ms and has nothing in flight. A file system
/// mounted with `discard` trims a deleted file's blocks in the background;
/// a benchmark that deletes gigabytes and then measures would time those
/// discards too. Returns at once where the device's counters cannot be
/// read.
pub fn settle_discards(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let dev = meta.dev();
    // Linux's encoding of a device number (glibc's `major`/`minor`).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stat = format!("/sys/dev/block/{major}:{minor}/stat");
    // Discard sectors (field 14) and requests in flight (field 9).
    let read = || -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(&stat).ok()?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        Some((*f.get(13)?, *f.get(8)?))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = read();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = read();
        if now.is_none() {
            return;
        }
        if now != last || now.is_some_and(|(_, inflight)| inflight > 0) {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_millis(300) {
            return;
        }
        last = now;
    }
}
