//! PyPI's `qemu.qmp` client (what QEMU's own Python tooling uses) drives
//! `bitmirror serve` end to end: jobs with events, nodes, bitmaps, errors
//! as `ExecuteError`, NBD exports, quit. The script is
//! `tests/qemu_qmp_client.py`; `scripts/install-test-deps` installs the
//! client in a venv.

use std::path::PathBuf;
use std::process::Command;

use testkit::StorageDaemon;

/// The venv's Python with `qemu.qmp`, or a failure saying how to get it.
fn python() -> PathBuf {
    let path = std::env::var_os("BITMIRROR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache.join("bitmirror/py/bin/python")
        });
    let ok = Command::new(&path)
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import qemu.qmp: run scripts/install-test-deps (or set BITMIRROR_PYTHON)",
        path.display()
    );
    path
}

#[test]
fn qemu_qmp_client_drives_the_daemon() {
    let python = python();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut daemon = StorageDaemon::start_program(
        &PathBuf::from(env!("CARGO_BIN_EXE_bitmirror")),
        &["serve"],
        dir.path(),
        &[],
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/qemu_qmp_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(daemon.qmp_path())
        .arg(dir.path())
        .output()
        .expect("the client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "qemu.qmp client failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(daemon.wait_exit(), Some(0), "quit ends the daemon");
    testkit::run(
        "qemu-img",
        &[
            "check",
            dir.path().join("disk.qcow2").to_str().unwrap_or_default(),
        ],
    );
}
