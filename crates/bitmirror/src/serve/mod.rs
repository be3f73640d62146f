//! `bitmirror serve`: a drop-in for qemu-storage-daemon.
//!
//! The command line is parsed whole first ([`cli`]); then the options are
//! carried out in order (nodes opened, monitors and the NBD server started,
//! exports added), and the daemon serves QMP monitors and NBD clients until
//! `quit`, SIGTERM, SIGINT or SIGHUP. On the way out jobs are cancelled,
//! exports removed and images closed cleanly (persistent bitmaps stored);
//! like qemu-storage-daemon, no `SHUTDOWN` event is sent.

mod args;
mod backup;
mod chardev;
pub mod cli;
mod commands;
mod create;
mod daemon;
mod daemonize;
mod info;
mod mirror;
mod pull;
mod transaction;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

pub use daemon::Daemon;
pub(crate) use mirror::nbd_filename;

/// Runs `bitmirror serve` with `args` (what follows `serve`); `program`
/// prefixes error messages.
pub fn main(program: &str, args: &[String]) -> ExitCode {
    let options = match cli::parse(args) {
        Ok(cli::Parsed::Run(options)) => options,
        Ok(cli::Parsed::Help) => {
            print!("{}", help(program));
            return ExitCode::SUCCESS;
        }
        Ok(cli::Parsed::Version) => {
            println!(
                "{program} {} (compatible with qemu-storage-daemon {})",
                env!("CARGO_PKG_VERSION"),
                daemon::QEMU_VERSION_STRING
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(1);
        }
    };
    let notify = daemonize::notify_fd();
    if options.daemonize && notify.is_none() {
        return daemonize::spawn();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bitmirror")
        .build()
        .context("cannot start the async runtime")
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        let daemon = Arc::new(Daemon::new());
        match daemon.start(&options).await {
            Ok(()) => {
                if let Some(fd) = notify {
                    daemonize::started(fd);
                }
            }
            Err(e) => {
                eprintln!("{program}: {e}");
                daemon.close().await;
                return ExitCode::from(1);
            }
        }
        let reason = daemon.wait_for_shutdown().await;
        tracing::info!("shutting down: {reason}");
        daemon.close().await;
        ExitCode::SUCCESS
    });
    // Monitors on stdin may still be blocked reading it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

/// The help text: qemu-storage-daemon's options.
fn help(program: &str) -> String {
    format!(
        "\
Usage: {program} [options]
A drop-in for qemu-storage-daemon: serves block nodes over NBD and QMP.

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         accepted for compatibility; use RUST_LOG=debug
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,detect-zeroes=on|off|unmap][,driver specific parameters...]
                         configure a block backend (drivers: file, raw,
                         qcow2, nbd, null-co)

  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on|off][,wait=on|off]
  --chardev stdio,id=<id>
                         configure a character device for a monitor

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmaps.0=<name>][,description=<text>]
           [,allocation-depth=on|off]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,max-connections=<n>][,handshake-max-seconds=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,max-connections=<n>][,handshake-max-seconds=<n>]
                         start an NBD server for exporting block nodes

  --object iothread,id=<id>[,<property>=<value>]...
  --object throttle-group,id=<id>[,limits.<limit>=<value>]...
                         create a new object of type <type>

  --pidfile <path>       write process ID to a file after startup

Options are carried out in the order given; JSON may replace key=value for
--blockdev, --export, --monitor, --nbd-server and --object. QMP commands
are listed in docs/qmp.md.
"
    )
}
