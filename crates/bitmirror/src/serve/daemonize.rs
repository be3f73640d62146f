//! `--daemonize`, as QEMU does it: the command returns once the daemon has
//! started (exit 0) or failed to (its error on stderr, exit 1), and the
//! daemon lives on in a session of its own with its standard streams on
//! `/dev/null` and `/` as its directory.
//!
//! Done without `fork()` in a process that may have threads: the command
//! starts itself again as the daemon, with the write end of a pipe whose
//! number is in [`NOTIFY_ENV`]; the daemon writes one byte there when its
//! start-up succeeded.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};

/// The environment variable that tells a process it is the daemon, and on
/// which file descriptor it reports that it started.
pub const NOTIFY_ENV: &str = "BITMIRROR_DAEMONIZE_FD";

/// The parent's side: starts the daemon (this program again, with the same
/// arguments) and waits for it to report.
pub fn spawn() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        eprintln!("bitmirror: --daemonize: {what}: {e}");
        ExitCode::from(1)
    };
    let (read, write) = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
        Ok(p) => p,
        Err(e) => return fail("cannot make a pipe", &e),
    };
    // The daemon inherits the write end only.
    if let Err(e) = rustix::io::fcntl_setfd(&write, rustix::io::FdFlags::empty()) {
        return fail("cannot pass the pipe on", &e);
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail("cannot find this program", &e),
    };
    let mut child = match Command::new(exe)
        .arg0(
            std::env::args()
                .next()
                .unwrap_or_else(|| "bitmirror".into()),
        )
        .args(&args)
        .env(NOTIFY_ENV, write.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail("cannot start the daemon", &e),
    };
    drop(write);
    let mut byte = [0u8; 1];
    let mut read = std::fs::File::from(read);
    match read.read(&mut byte) {
        Ok(1) => ExitCode::SUCCESS,
        // The daemon failed (and said why on stderr, which it shares).
        _ => match child.wait() {
            Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8),
            Err(e) => fail("cannot wait for the daemon", &e),
        },
    }
}

/// The daemon's side: the pipe to report on, if this process is a daemon
/// started by [`spawn`].
pub fn notify_fd() -> Option<OwnedFd> {
    let fd: i32 = std::env::var(NOTIFY_ENV).ok()?.parse().ok()?;
    // SAFETY: `spawn` put the number of an open pipe end, which nothing
    // else in this process owns, in the environment of this process; it is
    // taken once (the variable is removed right after).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: called at start-up, before the async runtime or any other
    // thread exists, so nothing reads the environment concurrently.
    unsafe { std::env::remove_var(NOTIFY_ENV) };
    Some(owned)
}

/// The daemon has started: detach from the caller's streams and
/// directory, and let the parent exit.
pub fn started(notify: OwnedFd) {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = rustix::stdio::dup2_stdout(&null);
        let _ = rustix::stdio::dup2_stderr(&null);
    }
    let _ = std::env::set_current_dir("/");
    let _ = rustix::io::write(&notify, &[0]);
}
