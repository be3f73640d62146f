//! The same QMP sessions against `qemu-storage-daemon` and `bitmirror
//! serve`, live, in one test: every reply and event must match, apart from
//! version strings, timestamps, generated node names, and host sizes of
//! image files (see [`normalize`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use testkit::{Qmp, StorageDaemon, require_tool, run};

/// One daemon of a pair, in its own directory.
struct Side {
    name: &'static str,
    daemon: StorageDaemon,
    qmp: Qmp,
    dir: tempfile::TempDir,
    /// What `$IMG` stands for on this side (names in shared storage, such
    /// as RBD images, must differ between the two).
    img: String,
}

impl Side {
    /// `value` with this side's `$DIR` and `$IMG` put back, normalized.
    fn normalize(&self, value: Value) -> Value {
        let text = value.to_string().replace(&self.img, "$IMG");
        let value = serde_json::from_str(&text).unwrap_or(value);
        normalize(value, &self.dir.path().display().to_string())
    }

    /// `text` with `$DIR` and `$IMG` filled in for this side.
    fn fill(&self, text: &str) -> String {
        text.replace("$DIR", &self.dir.path().display().to_string())
            .replace("$IMG", &self.img)
    }
}

/// `qemu-storage-daemon` and `bitmirror serve`, set up alike.
struct Pair {
    qemu: Side,
    ours: Side,
}

fn bitmirror() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bitmirror"))
}

impl Pair {
    /// Prepares a directory for each side with `setup` and starts each
    /// daemon with the options `args` gives for that directory.
    fn start(setup: impl Fn(&Path), args: impl Fn(&Path) -> Vec<String>) -> Pair {
        let qemu_program = require_tool("qemu-storage-daemon", "qemu-utils");
        let side = |name: &'static str, program: &Path, prefix: &[&str]| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            setup(dir.path());
            let daemon =
                StorageDaemon::start_program(program, prefix, dir.path(), &args(dir.path()));
            let qmp = daemon.qmp();
            let micros = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() % 1_000_000_000);
            let img = format!("sbs{}x{micros}x{}", std::process::id(), &name[..1]);
            Side {
                name,
                daemon,
                qmp,
                dir,
                img,
            }
        };
        Pair {
            qemu: side("qemu-storage-daemon", &qemu_program, &[]),
            ours: side("bitmirror", &bitmirror(), &["serve"]),
        }
    }

    /// Sends `request` (with `$DIR` standing for each side's directory) to
    /// both and asserts the replies match; returns ours, normalized.
    fn both(&mut self, request: Value) -> Value {
        let text = request.to_string();
        self.both_raw(&format!("{text}\n"))
    }

    /// Like [`both`](Self::both) for raw text.
    fn both_raw(&mut self, text: &str) -> Value {
        let mut replies = Vec::new();
        for side in [&mut self.qemu, &mut self.ours] {
            side.qmp.send_raw(&side.fill(text));
            let reply = side.qmp.read_reply();
            replies.push(side.normalize(reply));
        }
        if let Some(diff) = difference(&replies[1], &replies[0], "") {
            panic!("bitmirror and qemu-storage-daemon differ on {text}: {diff}");
        }
        replies.pop().unwrap_or_default()
    }

    /// Asserts both sides have received the same `count` events since the
    /// last call.
    fn same_events(&mut self, count: usize) -> Vec<Value> {
        let mut all = Vec::new();
        for side in [&mut self.qemu, &mut self.ours] {
            let events: Vec<Value> = side
                .qmp
                .take_events(count)
                .into_iter()
                .map(|e| side.normalize(e))
                .collect();
            assert_eq!(events.len(), count, "{}: {events:?}", side.name);
            all.push(events);
        }
        assert_eq!(all[1], all[0], "events differ (bitmirror left)");
        all.pop().unwrap_or_default()
    }
}

/// Where `ours` and `theirs` first differ, and how.
fn difference(ours: &Value, theirs: &Value, path: &str) -> Option<String> {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get(k) {
                    None => return Some(format!("{path}.{k} missing in ours (theirs: {v})")),
                    Some(w) => {
                        if let Some(d) = difference(w, v, &format!("{path}.{k}")) {
                            return Some(d);
                        }
                    }
                }
            }
            a.keys()
                .find(|k| !b.contains_key(*k))
                .map(|k| format!("{path}.{k} only in ours ({})", a[k.as_str()]))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| difference(x, y, &format!("{path}[{i}]"))),
        _ if ours == theirs => None,
        _ => Some(format!("{path}: ours {ours}, theirs {theirs}")),
    }
}

/// What may differ between the two daemons: timestamps (dropped), the
/// version's micro number and package, generated node names (`#block123`
/// becomes `#block`), each side's directory (`$DIR`), and host sizes of
/// image files (`actual-size`, and `virtual-size` of `file` nodes: we store
/// persistent bitmaps as soon as they are added, QEMU at close). Lists of
/// nodes are sorted, since implicit nodes are numbered differently.
fn normalize(value: Value, dir: &str) -> Value {
    match value {
        Value::String(s) => {
            let s = s.replace(dir, "$DIR");
            Value::String(match s.find("#block") {
                Some(i) => {
                    let digits = s[i + 6..].chars().take_while(char::is_ascii_digit).count();
                    format!("{}#block{}", &s[..i], &s[i + 6 + digits..])
                }
                None => s,
            })
        }
        Value::Array(items) => {
            let mut items: Vec<Value> = items.into_iter().map(|v| normalize(v, dir)).collect();
            if items.iter().all(|v| v.get("node-name").is_some()) {
                items.sort_by_key(|v| v.to_string());
            }
            Value::Array(items)
        }
        Value::Object(map) => {
            let is_file = map.get("format") == Some(&json!("file"));
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                match k.as_str() {
                    "timestamp" | "actual-size" | "package" | "micro" => {}
                    "virtual-size" if is_file => {}
                    _ => {
                        out.insert(k, normalize(v, dir));
                    }
                }
            }
            Value::Object(out)
        }
        other => other,
    }
}

fn qcow2(dir: &Path, name: &str, size: u64, backing: Option<&str>) {
    let path = dir.join(name);
    let options = backing.map_or(String::new(), |b| {
        format!("backing_file={b},backing_fmt=qcow2")
    });
    testkit::qemu_img_create_qcow2(path.to_str().expect("a UTF-8 path"), size, &options);
}

#[test]
fn protocol_and_argument_errors_match() {
    let second = |dir: &Path| {
        vec![
            "--chardev".into(),
            format!(
                "socket,id=m1,path={},server=on,wait=off",
                dir.join("qmp2.sock").display()
            ),
            "--monitor".into(),
            "m1".into(),
        ]
    };
    let mut p = Pair::start(|_| {}, second);
    // A session on the second monitor, still negotiating.
    let (mut q, qemu_greeting) = Qmp::connect_raw(&p.qemu.dir.path().join("qmp2.sock"));
    let (mut o, our_greeting) = Qmp::connect_raw(&p.ours.dir.path().join("qmp2.sock"));
    let (qg, og) = (normalize(qemu_greeting, ""), normalize(our_greeting, ""));
    assert_eq!(difference(&og, &qg, ""), None, "greetings");
    for request in [
        json!({"execute": "query-version"}),
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["nosuch"]}}),
        json!({"execute": "qmp_capabilities", "arguments": {"bogus": 1}}),
        json!({"execute": "qmp_capabilities", "id": "neg"}),
        json!({"execute": "qmp_capabilities"}),
    ] {
        let (a, b) = (q.request(&request), o.request(&request));
        if let Some(d) = difference(&normalize(b, ""), &normalize(a, ""), "") {
            panic!("negotiation differs on {request}: {d}");
        }
    }
    drop((q, o));

    // The negotiated sessions: malformed requests and argument errors.
    for raw in [
        "[1, 2]\n",
        "\"str\"\n",
        "{\"foo\": 1}\n",
        "{\"execute\": 1}\n",
        "{\"execute\": \"query-version\", \"arguments\": []}\n",
        "{\"execute\": \"query-version\", \"id\": {\"a\": [1]}, \"bogus\": 2}\n",
        "{\"execute\": \"query-version\", \"exec-oob\": \"quit\"}\n",
        "{\"exec-oob\": \"query-version\"}\n",
        "{\"execute\":\n \"query-version\",\n \"id\": 7}{\"execute\": \"nosuch\", \"id\": \"x\"}",
    ] {
        p.both_raw(raw);
    }
    p.both_raw("{\"execute\": \"nosuch\", \"id\": \"x\"}\n");
    for request in [
        json!({"execute": "query-version", "id": 1.5}),
        json!({"execute": "qmp_capabilities"}),
        json!({"execute": "query-version", "arguments": {"x": 1}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": 5, "name": "b"}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "n", "name": "b", "extra": 1}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "n", "name": "b", "granularity": "x"}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "n", "name": "b", "granularity": -1}}),
        json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "n", "name": "b", "persistent": "yes"}}),
        json!({"execute": "blockdev-del", "arguments": {"node-name": "nosuch"}}),
        json!({"execute": "query-named-block-nodes", "arguments": {"flat": 1}}),
        json!({"execute": "block-export-del", "arguments": {"id": "nosuch"}}),
        json!({"execute": "nbd-server-stop"}),
        json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "n"}}),
        json!({"execute": "block-export-add", "arguments": {"type": "fuse2", "id": "e", "node-name": "n"}}),
        json!({"execute": "object-del", "arguments": {"id": "nosuch"}}),
        json!({"execute": "query-block"}),
    ] {
        p.both(request);
    }
}

#[test]
fn nodes_and_bitmaps_match() {
    let mut p = Pair::start(
        |dir| {
            qcow2(dir, "base.qcow2", 64 << 20, None);
            qcow2(dir, "top.qcow2", 64 << 20, Some("base.qcow2"));
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "raw",
                    dir.join("d.raw").to_str().unwrap_or_default(),
                    "4M",
                ],
            );
        },
        |dir| {
            vec![
                "--blockdev".into(),
                format!(
                    "driver=file,node-name=f0,filename={}",
                    dir.join("top.qcow2").display()
                ),
                "--blockdev".into(),
                "qcow2,node-name=q0,file=f0".into(),
                "--blockdev".into(),
                "null-co,node-name=n0,size=1048576".into(),
            ]
        },
    );
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    for request in [
        ex("query-named-block-nodes", json!({})),
        ex("query-named-block-nodes", json!({"flat": true})),
        ex(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r0",
            "file": {"driver": "file", "filename": "$DIR/d.raw"}}),
        ),
        ex(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r0",
            "file": {"driver": "file", "filename": "$DIR/d.raw"}}),
        ),
        ex(
            "blockdev-add",
            json!({"driver": "nosuch", "node-name": "x"}),
        ),
        ex(
            "blockdev-add",
            json!({"driver": "file", "node-name": "x", "filename": "$DIR/missing"}),
        ),
        ex(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "1bad"}),
        ),
        ex("blockdev-add", json!({"driver": "null-co"})),
        ex(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "ro", "read-only": true,
            "detect-zeroes": "on", "cache": {"no-flush": true}}),
        ),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "q0", "name": "b0"}),
        ),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "q0", "name": "b0"}),
        ),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "b1", "granularity": 512, "disabled": true}),
        ),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "b2", "granularity": 1000}),
        ),
        ex("block-dirty-bitmap-add", json!({"node": "n0", "name": ""})),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "nosuch", "name": "b"}),
        ),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "p", "persistent": true}),
        ),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "r0", "name": "b3", "granularity": 65536}),
        ),
        ex("query-named-block-nodes", json!({})),
        ex(
            "block-dirty-bitmap-disable",
            json!({"node": "q0", "name": "b0"}),
        ),
        ex(
            "block-dirty-bitmap-enable",
            json!({"node": "n0", "name": "b1"}),
        ),
        ex(
            "block-dirty-bitmap-enable",
            json!({"node": "n0", "name": "nosuch"}),
        ),
        ex(
            "block-dirty-bitmap-clear",
            json!({"node": "q0", "name": "b0"}),
        ),
        ex(
            "block-dirty-bitmap-merge",
            json!({"node": "q0", "target": "b0", "bitmaps": ["nosuch"]}),
        ),
        ex(
            "block-dirty-bitmap-merge",
            json!({"node": "q0", "target": "b0",
            "bitmaps": [{"node": "n0", "name": "b1"}]}),
        ),
        ex(
            "block-dirty-bitmap-merge",
            json!({"node": "q0", "target": "b0",
            "bitmaps": [{"node": "r0", "name": "b3"}]}),
        ),
        ex(
            "block-dirty-bitmap-merge",
            json!({"node": "q0", "target": "b0", "bitmaps": [1]}),
        ),
        ex(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "q0", "name": "b0"}),
        ),
        ex(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "q0", "name": "nosuch"}),
        ),
        ex(
            "block-dirty-bitmap-remove",
            json!({"node": "q0", "name": "b0"}),
        ),
        ex(
            "block-dirty-bitmap-remove",
            json!({"node": "q0", "name": "b0"}),
        ),
        ex("query-named-block-nodes", json!({"flat": true})),
        ex("blockdev-del", json!({"node-name": "f0"})),
        ex("blockdev-del", json!({"node-name": "q0"})),
        ex("blockdev-del", json!({"node-name": "f0"})),
        ex("query-named-block-nodes", json!({})),
    ] {
        p.both(request);
    }
}

#[test]
fn nbd_server_and_exports_match() {
    let mut p = Pair::start(
        |dir| qcow2(dir, "a.qcow2", 16 << 20, None),
        |dir| {
            vec![
                "--blockdev".into(),
                format!(
                    "driver=qcow2,node-name=q0,file.driver=file,file.filename={}",
                    dir.join("a.qcow2").display()
                ),
            ]
        },
    );
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    for request in [
        ex("query-block-exports", json!({})),
        ex(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "path": "$DIR/nbd.sock"}}),
        ),
        ex(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "$DIR/nbd.sock"}}}),
        ),
        ex(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "$DIR/nbd.sock"}}}),
        ),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "q0", "name": "b0", "disabled": true}),
        ),
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "q0", "name": "live"}),
        ),
        ex(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "q0",
            "writable": true, "bitmaps": ["b0"]}),
        ),
        ex(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "q0"}),
        ),
        ex(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "q0", "name": "q0"}),
        ),
        ex(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "q0", "name": "x",
            "bitmaps": ["live"]}),
        ),
        ex(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "q0", "name": "y",
            "bitmaps": ["nosuch"]}),
        ),
        ex(
            "block-export-add",
            json!({"type": "nbd", "id": "e4", "node-name": "nosuch"}),
        ),
        ex("query-block-exports", json!({})),
        ex(
            "block-dirty-bitmap-remove",
            json!({"node": "q0", "name": "b0"}),
        ),
        ex("blockdev-del", json!({"node-name": "q0"})),
        ex("block-export-del", json!({"id": "e0", "mode": "bogus"})),
    ] {
        p.both(request);
    }
    p.both(ex("block-export-del", json!({"id": "e0"})));
    p.same_events(1);
    p.both(ex("query-block-exports", json!({})));
    p.both(ex(
        "block-export-add",
        json!({"type": "nbd", "id": "e5", "node-name": "q0", "name": "z"}),
    ));
    p.both(ex(
        "block-export-add",
        json!({"type": "nbd", "id": "e6", "node-name": "q0", "name": "w"}),
    ));
    p.both(ex("nbd-server-stop", json!({})));
    p.same_events(2);
    p.both(ex("query-block-exports", json!({})));
    p.both(ex(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}),
    ));
    p.both(ex("nbd-server-stop", json!({})));
}

#[test]
fn objects_match() {
    let mut p = Pair::start(
        |_| {},
        |_| vec!["--object".into(), "iothread,id=io0".into()],
    );
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    for request in [
        ex("object-add", json!({"qom-type": "iothread", "id": "io0"})),
        ex(
            "object-add",
            json!({"qom-type": "iothread", "id": "io1", "poll-max-ns": 0}),
        ),
        ex(
            "object-add",
            json!({"qom-type": "iothread", "id": "io2", "bogus": 0}),
        ),
        ex("object-add", json!({"qom-type": "nosuch", "id": "x"})),
        ex("object-add", json!({"id": "x"})),
        ex("object-add", json!({"qom-type": "iothread"})),
        ex("object-add", json!({"qom-type": "iothread", "id": ""})),
        ex("object-add", json!({"qom-type": "iothread", "id": "1x"})),
        ex(
            "object-add",
            json!({"qom-type": "iothread", "id": "io3", "poll-max-ns": "x"}),
        ),
        ex("object-del", json!({"id": "io1"})),
        ex("object-del", json!({"id": "io1"})),
        ex(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg0",
            "limits": {"bps-total": 1048576}}),
        ),
        ex(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg1",
            "limits": {"bps-total": "x"}}),
        ),
        ex(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg1",
            "limits": {"bps-total": 1048576, "bps-read": 1}}),
        ),
        ex(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg1",
            "limits": {"iops-write": 10, "iops-write-max": 5}}),
        ),
        ex(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg1",
            "limits": {"bogus": 1}}),
        ),
        ex(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg1", "x-bps-total": 4096}),
        ),
        ex(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n0"}),
        ),
        ex(
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t0",
            "throttle-group": "tg0", "file": "n0"}),
        ),
        ex(
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t1",
            "throttle-group": "nosuch", "file": "n0"}),
        ),
        ex(
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t1", "file": "n0"}),
        ),
        ex("query-named-block-nodes", json!({})),
        ex("object-del", json!({"id": "tg0"})),
        ex("blockdev-del", json!({"node-name": "t0"})),
        ex("object-del", json!({"id": "tg0"})),
        ex("object-del", json!({"id": "tg1"})),
    ] {
        p.both(request);
    }
}

#[test]
fn quit_matches() {
    let mut p = Pair::start(
        |_| {},
        |_| vec!["--blockdev".into(), "null-co,node-name=n".into()],
    );
    p.both(json!({"execute": "quit", "id": 1}));
    // qemu-storage-daemon sends no SHUTDOWN event: the monitor just closes.
    for side in [&mut p.qemu, &mut p.ours] {
        assert!(
            side.qmp.events.is_empty(),
            "{}: {:?}",
            side.name,
            side.qmp.events
        );
    }
    assert_eq!(p.qemu.daemon.wait_exit(), Some(0));
    assert_eq!(p.ours.daemon.wait_exit(), Some(0));
}

/// Runs `program` with `args`; (exit code, stderr with the program's name
/// cut off).
fn run_cli(program: &Path, prefix: &[&str], args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(program)
        .args(prefix)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let message = stderr
        .split_once(": ")
        .map(|(_, m)| m.to_owned())
        .unwrap_or(stderr);
    (out.status.code(), message)
}

#[test]
fn command_line_errors_match() {
    let qemu = require_tool("qemu-storage-daemon", "qemu-utils");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let img = dir.path().join("x.qcow2");
    qcow2(dir.path(), "x.qcow2", 1 << 20, None);
    let valid = format!("driver=file,node-name=f,filename={}", img.display());
    let cases: Vec<Vec<String>> = vec![
        vec!["--blockdev".into(), "driver=nosuch,node-name=x".into()],
        vec!["--blockdev".into(), "node-name=x".into()],
        vec![
            "--blockdev".into(),
            "driver=file,node-name=x,filename=/nonexistent/x".into(),
        ],
        vec!["--blockdev".into(), "null-co,node-name=a,,b".into()],
        vec!["--blockdev".into(), "null-co,node-name=n,size=x".into()],
        vec![
            "--blockdev".into(),
            "null-co,node-name=n,read-only=maybe".into(),
        ],
        vec!["--blockdev".into()],
        vec!["--frobnicate".into()],
        vec!["stray".into()],
        vec![
            "--nbd-server".into(),
            "addr.type=inet,addr.host=127.0.0.1".into(),
        ],
        vec![
            "--export".into(),
            "type=nbd,id=e0,node-name=missing,name=x".into(),
        ],
        vec!["--monitor".into(), "chardev=nosuch".into()],
        vec!["--object".into(), "iothread".into()],
        vec!["--blockdev".into(), valid.clone(), "--frobnicate".into()],
    ];
    for case in cases {
        let args: Vec<&str> = case.iter().map(String::as_str).collect();
        let theirs = run_cli(&qemu, &[], &args);
        let ours = run_cli(&bitmirror(), &["serve"], &args);
        assert_eq!(
            ours, theirs,
            "bitmirror (left) and qemu-storage-daemon differ on {args:?}"
        );
    }
}

#[test]
fn blockdev_create_and_jobs_match() {
    let mut p = Pair::start(|_| {}, |_| vec![]);
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    p.both(ex("query-jobs", json!({})));
    p.both(ex(
        "blockdev-create",
        json!({"job-id": "j0",
        "options": {"driver": "file", "filename": "$DIR/new.qcow2", "size": 0}}),
    ));
    p.same_events(5);
    p.both(ex("query-jobs", json!({})));
    p.both(ex("query-block-jobs", json!({})));
    p.both(ex(
        "blockdev-create",
        json!({"job-id": "j0",
        "options": {"driver": "file", "filename": "$DIR/x.img", "size": 1}}),
    ));
    p.both(ex("job-cancel", json!({"id": "j0"})));
    p.both(ex("job-dismiss", json!({"id": "j0"})));
    p.same_events(1);
    p.both(ex("job-dismiss", json!({"id": "j0"})));
    p.both(ex(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f1", "filename": "$DIR/new.qcow2"}),
    ));
    p.both(ex(
        "blockdev-create",
        json!({"job-id": "j1",
        "options": {"driver": "qcow2", "file": "f1", "size": 67108864}}),
    ));
    p.same_events(5);
    p.both(ex("query-jobs", json!({})));
    p.both(ex("job-dismiss", json!({"id": "j1"})));
    p.same_events(1);
    p.both(ex(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q1", "file": "f1"}),
    ));
    p.both(ex("query-named-block-nodes", json!({"flat": true})));
    for (id, options) in [
        (
            "j2",
            json!({"driver": "file", "filename": "/nonexistent/x.img", "size": 1048576}),
        ),
        (
            "j3",
            json!({"driver": "qcow2", "file": "nosuch", "size": 67108864}),
        ),
        (
            "j4",
            json!({"driver": "file", "filename": "$DIR/n.img", "size": -1}),
        ),
    ] {
        p.both(ex(
            "blockdev-create",
            json!({"job-id": id, "options": options}),
        ));
        p.same_events(4);
        p.both(ex("query-jobs", json!({})));
        p.both(ex("job-dismiss", json!({"id": id})));
        p.same_events(1);
    }
    for request in [
        ex(
            "blockdev-create",
            json!({"job-id": "", "options": {"driver": "file", "filename": "$DIR/y", "size": 0}}),
        ),
        ex(
            "blockdev-create",
            json!({"job-id": "9x", "options": {"driver": "file", "filename": "$DIR/y", "size": 0}}),
        ),
        ex(
            "blockdev-create",
            json!({"options": {"driver": "file", "filename": "$DIR/y", "size": 0}}),
        ),
        ex(
            "blockdev-create",
            json!({"job-id": "j5", "options": {"driver": "nosuch"}}),
        ),
        ex(
            "blockdev-create",
            json!({"job-id": "j5", "options": {"driver": "null-co"}}),
        ),
        ex(
            "blockdev-create",
            json!({"job-id": "j5", "options": {"driver": "file", "filename": "$DIR/y"}}),
        ),
        ex("job-cancel", json!({"id": "nosuch"})),
        ex("job-pause", json!({"id": "nosuch"})),
        ex("block-job-cancel", json!({"device": "nosuch"})),
        ex(
            "block-job-set-speed",
            json!({"device": "nosuch", "speed": 1}),
        ),
        ex("block-job-dismiss", json!({"id": "nosuch"})),
    ] {
        p.both(request);
    }
}

/// Waits on each side until an event `name` (a `JOB_STATUS_CHANGE` to
/// status `name`, if it is a status) arrives; compares every event
/// received up to it.
fn same_events_until(p: &mut Pair, name: &str) -> Vec<Value> {
    events_until(p, name, false)
}

/// [`same_events_until`] without the `paused`/`running` pairs QEMU sends
/// for every running job whenever a command drains the graph (a
/// transaction, `blockdev-del`, a new job): an artefact of its coroutine
/// model that we do not copy, except for the one a backup shows at start.
fn same_events_until_without_drains(p: &mut Pair, name: &str) -> Vec<Value> {
    events_until(p, name, true)
}

fn strip_drains(events: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for e in events {
        let is = |e: &Value, s: &str| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == s;
        if is(&e, "running")
            && out
                .last()
                .is_some_and(|l| is(l, "paused") && l["data"]["id"] == e["data"]["id"])
        {
            out.pop();
            continue;
        }
        out.push(e);
    }
    out
}

fn events_until(p: &mut Pair, name: &str, without_drains: bool) -> Vec<Value> {
    let is_it = |e: &Value| e["event"] == name || e["data"]["status"] == name;
    let mut all = Vec::new();
    for side in [&mut p.qemu, &mut p.ours] {
        let dir = side.dir.path().display().to_string();
        while !side.qmp.events.iter().any(is_it) {
            let m = side.qmp.read_message();
            assert!(m.get("event").is_some(), "{}: unexpected {m}", side.name);
            side.qmp.events.push(m);
        }
        let events: Vec<Value> = std::mem::take(&mut side.qmp.events)
            .into_iter()
            .map(|e| normalize(e, &dir))
            .collect();
        all.push(if without_drains {
            strip_drains(events)
        } else {
            events
        });
    }
    if let Some(d) = difference(
        &Value::Array(all[1].clone()),
        &Value::Array(all[0].clone()),
        "",
    ) {
        panic!(
            "events up to {name} differ: {d}\nours: {:?}\ntheirs: {:?}",
            all[1], all[0]
        );
    }
    all.pop().unwrap_or_default()
}

/// A pair of daemons with the same `null-co` nodes (name, size) that read
/// zeroes.
fn null_co_pair(nodes: &[(&str, u64)]) -> Pair {
    let args: Vec<String> = nodes
        .iter()
        .flat_map(|(name, size)| {
            [
                "--blockdev".to_string(),
                format!("null-co,node-name={name},size={size},read-zeroes=on"),
            ]
        })
        .collect();
    Pair::start(|_| {}, |_| args.clone())
}

#[test]
fn mirror_jobs_match() {
    let mut p = null_co_pair(&[("s", 4194304), ("t", 4194304), ("small", 1048576)]);
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    let mirror = |extra: Value| {
        let mut a = json!({"job-id": "m0", "device": "s", "target": "t", "sync": "full"});
        if let (Some(a), Some(e)) = (a.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        ex("blockdev-mirror", a)
    };
    // A target of another size: the job starts, then fails.
    p.both(mirror(json!({"target": "small"})));
    same_events_until(&mut p, "null");
    for request in [
        mirror(json!({"device": "nosuch"})),
        mirror(json!({"target": "nosuch"})),
        mirror(json!({"sync": "bogus"})),
        mirror(json!({"granularity": 1000})),
        mirror(json!({"granularity": 256})),
        mirror(json!({"job-id": "9x"})),
        mirror(json!({"bogus": 1})),
        ex("block-job-complete", json!({"device": "m0"})),
    ] {
        p.both(request);
    }
    p.both(mirror(json!({})));
    same_events_until(&mut p, "BLOCK_JOB_READY");
    p.both(ex("query-block-jobs", json!({})));
    p.both(ex("query-jobs", json!({})));
    p.both(mirror(json!({})));
    p.both(ex(
        "block-job-set-speed",
        json!({"device": "m0", "speed": 1048576}),
    ));
    p.both(ex("query-block-jobs", json!({})));
    for change in [
        json!({"id": "nosuch", "type": "mirror", "copy-mode": "write-blocking"}),
        json!({"id": "m0", "type": "mirror", "copy-mode": "background"}),
        json!({"id": "m0", "type": "mirror", "copy-mode": "write-blocking"}),
        json!({"id": "m0", "type": "mirror", "copy-mode": "write-blocking"}),
        json!({"id": "m0", "type": "backup"}),
    ] {
        p.both(ex("block-job-change", change));
    }
    p.both(ex("block-job-finalize", json!({"id": "m0"})));
    p.both(ex("block-job-complete", json!({"device": "m0"})));
    same_events_until(&mut p, "null");
    p.both(ex("query-block-jobs", json!({})));
    // Manual finalization: pending until job-finalize, then dismissed by hand.
    p.both(mirror(
        json!({"job-id": "m1", "auto-finalize": false, "auto-dismiss": false}),
    ));
    same_events_until(&mut p, "BLOCK_JOB_READY");
    p.both(ex("block-job-complete", json!({"device": "m1"})));
    same_events_until(&mut p, "BLOCK_JOB_PENDING");
    p.both(ex("query-jobs", json!({})));
    p.both(ex("job-dismiss", json!({"id": "m1"})));
    p.both(ex("job-finalize", json!({"id": "m1"})));
    same_events_until(&mut p, "concluded");
    p.both(ex("query-block-jobs", json!({})));
    p.both(ex("job-dismiss", json!({"id": "m1"})));
    same_events_until(&mut p, "null");
    // A ready mirror cancelled without force finishes in place; it cannot
    // be completed any more.
    p.both(mirror(json!({"job-id": "m2", "auto-finalize": false})));
    same_events_until(&mut p, "BLOCK_JOB_READY");
    p.both(ex("block-job-cancel", json!({"device": "m2"})));
    same_events_until(&mut p, "BLOCK_JOB_PENDING");
    p.both(ex("block-job-complete", json!({"device": "m2"})));
    p.both(ex("job-cancel", json!({"id": "m2"})));
    same_events_until(&mut p, "null");
}

#[test]
fn drive_mirror_matches() {
    let mut p = Pair::start(
        |_| {},
        |_| {
            vec![
                "--blockdev".into(),
                "null-co,node-name=s,size=4194304,read-zeroes=on".into(),
            ]
        },
    );
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    p.both(ex(
        "drive-mirror",
        json!({"device": "s", "target": "$DIR/x.raw", "format": "raw",
        "mode": "existing", "sync": "full"}),
    ));
    p.both(ex(
        "drive-mirror",
        json!({"device": "s", "target": "$DIR/x.raw", "sync": "full",
        "mode": "bogus"}),
    ));
    p.both(ex(
        "drive-mirror",
        json!({"job-id": "d", "device": "s", "target": "$DIR/t.raw",
        "format": "raw", "node-name": "tgt", "sync": "full"}),
    ));
    same_events_until(&mut p, "BLOCK_JOB_READY");
    p.both(ex("query-block-jobs", json!({})));
    p.both(ex("block-job-cancel", json!({"device": "d"})));
    same_events_until(&mut p, "null");
}

#[test]
fn backup_jobs_match() {
    let mut p = null_co_pair(&[
        ("s", 4194304),
        ("t", 4194304),
        ("t2", 4194304),
        ("small", 1048576),
    ]);
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    let backup = |extra: Value| {
        let mut a = json!({"job-id": "b0", "device": "s", "target": "t", "sync": "full"});
        if let (Some(a), Some(e)) = (a.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        ex("blockdev-backup", a)
    };
    p.both(ex(
        "block-dirty-bitmap-add",
        json!({"node": "s", "name": "bm", "granularity": 65536}),
    ));
    // Every check, each where QEMU makes it (the first error wins).
    for request in [
        backup(json!({"device": "nope"})),
        backup(json!({"target": "nope"})),
        backup(json!({"device": "nope", "target": "nope"})),
        backup(json!({"sync": "bitmap"})),
        backup(json!({"sync": "incremental"})),
        backup(json!({"sync": "bitmap", "bitmap-mode": "always"})),
        backup(json!({"bitmap": "bm"})),
        backup(json!({"sync": "top", "bitmap": "bm"})),
        backup(json!({"sync": "none", "bitmap": "bm", "bitmap-mode": "on-success"})),
        backup(json!({"bitmap": "bm", "bitmap-mode": "never"})),
        backup(json!({"sync": "top", "bitmap": "bm", "bitmap-mode": "never"})),
        backup(json!({"bitmap-mode": "on-success"})),
        backup(json!({"bitmap": "zz", "bitmap-mode": "on-success"})),
        backup(json!({"sync": "incremental", "bitmap": "zz", "bitmap-mode": "always"})),
        backup(json!({"sync": "incremental", "bitmap": "bm", "bitmap-mode": "never"})),
        backup(json!({"target": "s"})),
        backup(json!({"compress": true})),
        backup(json!({"target": "small"})),
        backup(json!({"target": "small", "job-id": "9x"})),
        backup(json!({"job-id": "1abc"})),
        backup(json!({"x-perf": {"max-workers": 0}})),
        backup(json!({"x-perf": {"max-chunk": -1}})),
        backup(json!({"x-perf": {"max-chunk": 4096}})),
        backup(json!({"x-perf": {"min-cluster-size": 196608}})),
        backup(json!({"sync": "bogus"})),
        ex(
            "blockdev-backup",
            json!({"job-id": "b0", "device": "s", "target": "t"}),
        ),
        ex(
            "blockdev-backup",
            json!({"device": "s", "target": "t", "sync": "full"}),
        ),
        backup(json!({"bogus": 1})),
    ] {
        p.both(request);
    }
    // A negative speed fails once the job exists: created, then null.
    p.both(backup(json!({"speed": -1})));
    same_events_until(&mut p, "null");
    // A full backup, start to end.
    p.both(backup(json!({})));
    same_events_until(&mut p, "null");
    // A slow one: progress, the busy target, cancel.
    p.both(backup(json!({"speed": 1})));
    std::thread::sleep(std::time::Duration::from_millis(300));
    p.both(ex("query-jobs", json!({})));
    p.both(ex("query-block-jobs", json!({})));
    p.both(backup(json!({"job-id": "b1", "device": "t2"})));
    p.both(backup(
        json!({"job-id": "b1", "device": "t", "target": "t2"}),
    ));
    p.both(backup(
        json!({"job-id": "b1", "sync": "bitmap", "bitmap": "bm",
                         "bitmap-mode": "on-success"}),
    ));
    p.both(ex(
        "block-dirty-bitmap-clear",
        json!({"node": "s", "name": "bm"}),
    ));
    p.both(ex("job-finalize", json!({"id": "b0"})));
    p.both(ex("job-complete", json!({"id": "b0"})));
    p.both(ex("block-job-cancel", json!({"device": "nope"})));
    p.both(ex("job-cancel", json!({"id": "b0"})));
    same_events_until_without_drains(&mut p, "null");
    // While a bitmap backup runs: the bitmap busy, its nameless successor
    // listed first (the filter node QEMU adds is not compared).
    p.both(backup(
        json!({"sync": "bitmap", "bitmap": "bm", "bitmap-mode": "on-success",
                         "speed": 1}),
    ));
    let mut seen = Vec::new();
    for side in [&mut p.qemu, &mut p.ours] {
        let nodes = side.qmp.execute_ok("query-named-block-nodes", json!({}));
        let s = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["node-name"] == "s")
            .map(|n| n["dirty-bitmaps"].clone());
        seen.push(s);
    }
    assert_eq!(seen[1], seen[0], "bitmaps during a backup (bitmirror left)");
    p.both(ex("job-cancel", json!({"id": "b0"})));
    same_events_until_without_drains(&mut p, "null");
    // Manual finalization: pending, then finalize and dismiss.
    p.both(backup(
        json!({"sync": "bitmap", "bitmap": "bm", "bitmap-mode": "on-success",
               "auto-finalize": false, "auto-dismiss": false}),
    ));
    same_events_until(&mut p, "BLOCK_JOB_PENDING");
    p.both(ex("query-jobs", json!({})));
    p.both(ex("job-dismiss", json!({"id": "b0"})));
    p.both(ex("job-finalize", json!({"id": "b0"})));
    same_events_until(&mut p, "concluded");
    p.both(ex("query-block-jobs", json!({})));
    p.both(ex("job-dismiss", json!({"id": "b0"})));
    same_events_until(&mut p, "null");
    // Cancel while pending.
    p.both(backup(json!({"auto-finalize": false})));
    same_events_until(&mut p, "BLOCK_JOB_PENDING");
    p.both(ex("job-cancel", json!({"id": "b0"})));
    same_events_until(&mut p, "null");
    // The bitmap is free again.
    p.both(ex(
        "block-dirty-bitmap-clear",
        json!({"node": "s", "name": "bm"}),
    ));
    p.both(ex(
        "block-dirty-bitmap-remove",
        json!({"node": "s", "name": "bm"}),
    ));
}

#[test]
fn transactions_match() {
    let mut p = null_co_pair(&[
        ("s", 4194304),
        ("t", 4194304),
        ("t2", 4194304),
        ("small", 1048576),
    ]);
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    let tx = |actions: Value| ex("transaction", json!({ "actions": actions }));
    let add =
        |name: &str| json!({"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": name}});
    let backup = |id: &str, target: &str, extra: Value| {
        let mut d = json!({"job-id": id, "device": "s", "target": target, "sync": "full"});
        if let (Some(d), Some(e)) = (d.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        json!({"type": "blockdev-backup", "data": d})
    };
    for request in [
        tx(json!([])),
        ex(
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": "grouped"}}),
        ),
        tx(json!([{"type": "foo", "data": {}}])),
        tx(json!([{"type": "abort"}])),
        tx(
            json!([{"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": "b", "bogus": 1}}]),
        ),
        tx(json!([{"type": "block-dirty-bitmap-add", "data": {"node": "s"}}])),
        ex("transaction", json!({"actions": 1})),
        ex(
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": "foo"}}),
        ),
        ex(
            "transaction",
            json!({"actions": [], "properties": {"foo": 1}}),
        ),
        tx(json!([{"type": "abort", "data": {}}])),
        // Undone: the bitmap added first does not stay.
        tx(json!([add("b1"), {"type": "abort", "data": {}}])),
        tx(json!([add("b1"), backup("j1", "small", json!({}))])),
        ex(
            "block-dirty-bitmap-remove",
            json!({"node": "s", "name": "b1"}),
        ),
        ex(
            "transaction",
            json!({"actions": [add("b1")], "properties": {"completion-mode": "grouped"}}),
        ),
        // Clear and merge are undone too.
        ex(
            "block-dirty-bitmap-add",
            json!({"node": "s", "name": "keep"}),
        ),
        tx(json!([
            {"type": "block-dirty-bitmap-disable", "data": {"node": "s", "name": "keep"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "s", "name": "keep"}},
            {"type": "abort", "data": {}}
        ])),
        ex("query-named-block-nodes", json!({})),
    ] {
        p.both(request);
    }
    // A created job is undone without a cancel event.
    p.both(tx(json!([
        backup("j1", "t", json!({})),
        add("b1"),
        add("b1")
    ])));
    same_events_until(&mut p, "null");
    p.both(ex(
        "block-dirty-bitmap-remove",
        json!({"node": "s", "name": "b1"}),
    ));
    // The founding workflow's first step: a bitmap and a full backup.
    p.both(tx(json!([add("b1"), backup("j1", "t", json!({}))])));
    same_events_until(&mut p, "null");
    // Two jobs start in QEMU's order.
    p.both(tx(json!([
        backup("g1", "t", json!({"speed": 1})),
        backup("g2", "t2", json!({"speed": 1}))
    ])));
    for side in [&mut p.qemu, &mut p.ours] {
        let events = side.qmp.take_events(8);
        let seen: Vec<String> = events
            .iter()
            .map(|e| format!("{} {}", e["data"]["status"], e["data"]["id"]).replace('"', ""))
            .collect();
        assert_eq!(
            seen,
            [
                "created g1",
                "created g2",
                "running g2",
                "paused g2",
                "running g1",
                "paused g1",
                "running g2",
                "running g1"
            ],
            "{}",
            side.name
        );
    }
    // QEMU's jobs copy their first chunk before the transaction returns
    // (their coroutines run at once); ours start on the runtime a moment
    // later. The cancel's event reports the progress: wait for it first.
    let theirs = wait_for_progress(&mut p.qemu, "g1", 1);
    wait_for_progress(&mut p.ours, "g1", theirs);
    p.both(ex("job-cancel", json!({"id": "g1"})));
    same_events_until_without_drains(&mut p, "null");
    p.both(ex("job-cancel", json!({"id": "g2"})));
    same_events_until_without_drains(&mut p, "null");
}

/// Waits (up to 10 s) until job `id` on `side` has made `at_least` bytes
/// of progress; returns its progress then.
fn wait_for_progress(side: &mut Side, id: &str, at_least: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let jobs = side.qmp.execute_ok("query-jobs", json!({}));
        let progress = jobs.as_array().and_then(|jobs| {
            jobs.iter()
                .find(|j| j["id"] == id)
                .and_then(|j| j["current-progress"].as_u64())
        });
        if let Some(p) = progress.filter(|&p| p >= at_least) {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: job {id} did not reach {at_least} bytes of progress in 10 s ({progress:?})",
            side.name
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Reads events on each side until every job in `ids` has reached `null`,
/// then compares each job's own sequence (without QEMU's drain pairs):
/// two jobs' events may interleave differently.
fn same_job_events_until_null(p: &mut Pair, ids: &[&str]) {
    let mut per_side = Vec::new();
    for side in [&mut p.qemu, &mut p.ours] {
        let dir = side.dir.path().display().to_string();
        let gone = |events: &[Value], id: &str| {
            events
                .iter()
                .any(|e| e["data"]["id"] == id && e["data"]["status"] == "null")
        };
        while !ids.iter().all(|id| gone(&side.qmp.events, id)) {
            let m = side.qmp.read_message();
            assert!(m.get("event").is_some(), "{}: unexpected {m}", side.name);
            side.qmp.events.push(m);
        }
        let events: Vec<Value> = std::mem::take(&mut side.qmp.events)
            .into_iter()
            .map(|e| normalize(e, &dir))
            .collect();
        let per_job: Vec<Vec<Value>> = ids
            .iter()
            .map(|id| {
                strip_drains(
                    events
                        .iter()
                        .filter(|e| e["data"]["id"] == *id || e["data"]["device"] == *id)
                        .cloned()
                        .collect(),
                )
            })
            .collect();
        per_side.push(per_job);
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            per_side[1][i], per_side[0][i],
            "events of job {id} differ (bitmirror left)"
        );
    }
}

#[test]
fn grouped_transactions_match() {
    let mut p = null_co_pair(&[("s", 4194304), ("t", 4194304), ("t2", 4194304)]);
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    let grouped = |actions: Value| {
        ex(
            "transaction",
            json!({"actions": actions, "properties": {"completion-mode": "grouped"}}),
        )
    };
    let backup = |id: &str, target: &str, extra: Value| {
        let mut d = json!({"job-id": id, "device": "s", "target": target, "sync": "full"});
        if let (Some(d), Some(e)) = (d.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        json!({"type": "blockdev-backup", "data": d})
    };
    p.both(ex(
        "block-dirty-bitmap-add",
        json!({"node": "s", "name": "bm"}),
    ));
    // The fast one waits for the slow one.
    p.both(grouped(json!([
        backup("g1", "t", json!({})),
        backup("g2", "t2", json!({"speed": 1}))
    ])));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let jobs = p.both(ex("query-jobs", json!({})));
    assert_eq!(jobs["return"][1]["status"], "waiting", "{jobs}");
    p.both(ex(
        "block-job-set-speed",
        json!({"device": "g2", "speed": 0}),
    ));
    same_job_events_until_null(&mut p, &["g1", "g2"]);
    // Cancelling the slow one cancels the one that is done; the bitmap
    // stays at its old point in time.
    p.both(grouped(json!([
        backup(
            "g1",
            "t",
            json!({"bitmap": "bm", "bitmap-mode": "on-success"})
        ),
        backup("g2", "t2", json!({"speed": 1}))
    ])));
    std::thread::sleep(std::time::Duration::from_millis(300));
    p.both(ex("job-cancel", json!({"id": "g2"})));
    same_job_events_until_null(&mut p, &["g1", "g2"]);
    p.both(ex("query-named-block-nodes", json!({})));
    // Manual finalization: one job-finalize finalizes both.
    p.both(grouped(json!([
        backup("g1", "t", json!({"auto-finalize": false})),
        backup("g2", "t2", json!({"auto-finalize": false}))
    ])));
    for side in [&mut p.qemu, &mut p.ours] {
        let pending = |events: &[Value]| {
            events
                .iter()
                .filter(|e| e["event"] == "BLOCK_JOB_PENDING")
                .count()
        };
        while pending(&side.qmp.events) < 2 {
            let m = side.qmp.read_message();
            side.qmp.events.push(m);
        }
    }
    p.both(ex("job-finalize", json!({"id": "g2"})));
    same_job_events_until_null(&mut p, &["g1", "g2"]);
}

/// Cancelling a paused job, and one resumed a moment before: the job runs
/// again on its way out (`paused`, `running`, `aborting`, …), as QEMU's.
#[test]
fn cancel_while_paused_matches() {
    let mut p = null_co_pair(&[("s", 67108864), ("t", 67108864)]);
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    for (id, resume_first) in [("m0", false), ("m1", true)] {
        p.both(ex(
            "blockdev-mirror",
            json!({"job-id": id, "device": "s", "target": "t", "sync": "full", "speed": 1,
                   "buf-size": 1048576}),
        ));
        p.both(ex("block-job-pause", json!({"device": id})));
        same_events_until(&mut p, "paused");
        if resume_first {
            p.both(ex("block-job-resume", json!({"device": id})));
        }
        p.both(ex("block-job-cancel", json!({"device": id, "force": true})));
        same_events_until(&mut p, "null");
        p.both(ex("query-block-jobs", json!({})));
    }
}

/// RBD nodes, `blockdev-create` for RBD and their errors, against
/// qemu-storage-daemon with QEMU's rbd module (Debian's `qemu-block-extra`),
/// on the tests' Ceph cluster.
#[cfg(feature = "rbd")]
#[test]
fn rbd_nodes_creation_and_errors_match() {
    require_rbd_module();
    let conf = testkit::ceph::conf();
    let mut p = Pair::start(|_| {}, |_| vec![]);
    // Both sides' images go when the test ends, passed or failed.
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for image in &self.0 {
                testkit::ceph::remove(image);
            }
        }
    }
    let _cleanup = Cleanup(
        [&p.qemu.img, &p.ours.img]
            .iter()
            .flat_map(|i| [i.to_string(), format!("{i}-2"), format!("{i}-3")])
            .collect(),
    );
    let ex = |cmd: &str, args: Value| json!({"execute": cmd, "arguments": args});
    let at = |image: &str| json!({"pool": testkit::ceph::POOL, "image": image, "conf": conf});
    let create =
        |id: &str, options: Value| ex("blockdev-create", json!({"job-id": id, "options": options}));
    p.both(create(
        "c0",
        json!({"driver": "rbd", "location": at("$IMG"), "size": 8 << 20}),
    ));
    p.same_events(5);
    p.both(ex("query-jobs", json!({})));
    p.both(ex("job-dismiss", json!({"id": "c0"})));
    p.same_events(1);
    // The image exists now; an object size QEMU refuses.
    for (id, options) in [
        (
            "c1",
            json!({"driver": "rbd", "location": at("$IMG"), "size": 1 << 20}),
        ),
        (
            "c2",
            json!({"driver": "rbd", "location": at("$IMG-2"), "size": 1 << 20,
                   "cluster-size": 3000}),
        ),
        (
            "c3",
            json!({"driver": "rbd", "location": at("$IMG-3"), "size": 1 << 20,
                   "cluster-size": 2048}),
        ),
    ] {
        p.both(create(id, options));
        p.same_events(4);
        p.both(ex("query-jobs", json!({})));
        p.both(ex("job-dismiss", json!({"id": id})));
        p.same_events(1);
    }
    // Nodes that do not open, with QEMU's words.
    let mut snapshot_rw = at("$IMG");
    snapshot_rw["snapshot"] = json!("nosuch");
    for options in [
        at("no-such-image"),
        json!({"pool": "no-such-pool", "image": "$IMG", "conf": conf}),
        json!({"pool": testkit::ceph::POOL, "image": "$IMG", "conf": "/nonexistent.conf"}),
        json!({"pool": testkit::ceph::POOL}),
        snapshot_rw,
    ] {
        let mut o = options;
        o["driver"] = json!("rbd");
        o["node-name"] = json!("r0");
        p.both(ex("blockdev-add", o));
    }
    // A node that opens, as the node list shows it.
    let mut o = at("$IMG");
    o["driver"] = json!("rbd");
    o["node-name"] = json!("r0");
    p.both(ex("blockdev-add", o));
    p.both(ex("query-named-block-nodes", json!({"flat": true})));
    p.both(ex("blockdev-del", json!({"node-name": "r0"})));
    // Snapshots: refused for writing, opened for reading.
    for side in [&p.qemu, &p.ours] {
        testkit::ceph::rbd(&["snap", "create", &format!("rbd/{}@s", side.img)]);
    }
    let mut o = at("$IMG");
    o["driver"] = json!("rbd");
    o["node-name"] = json!("s0");
    o["snapshot"] = json!("s");
    p.both(ex("blockdev-add", o.clone()));
    o["read-only"] = json!(true);
    p.both(ex("blockdev-add", o));
    p.both(ex("query-named-block-nodes", json!({"flat": true})));
    p.both(ex("blockdev-del", json!({"node-name": "s0"})));
}

/// Fails with the package to install when QEMU has no rbd module.
#[cfg(feature = "rbd")]
fn require_rbd_module() {
    let formats = run("qemu-img", &["--help"]);
    assert!(
        formats.contains(" rbd "),
        "QEMU here has no rbd block driver: install Debian's qemu-block-extra of the same \
         version as qemu-utils (./scripts/test does that for you)"
    );
}
