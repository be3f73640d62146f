//! `bitmirror`: the command-line entry point.
//!
//! `bitmirror serve [qemu-storage-daemon options]` runs the daemon; the
//! binary also behaves as `serve` when invoked under the name
//! `qemu-storage-daemon` (a symlink), so tools that run that program by
//! name get bitmirror.

mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// bitmirror tracks writes to virtual disks in dirty bitmaps, so that mirrors
/// (live storage migration) and backups copy only what changed.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: a drop-in for qemu-storage-daemon (same options, same
    /// QMP). `bitmirror serve --help` lists the options.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Serve {
        /// qemu-storage-daemon's options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_init();
    let argv: Vec<String> = std::env::args().collect();
    let invoked_as = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("bitmirror")
        .to_owned();
    if invoked_as == "qemu-storage-daemon" {
        return serve::main(&invoked_as, &argv[1..]);
    }
    match Cli::parse().command {
        Some(Command::Serve { args }) => serve::main("bitmirror serve", &args),
        None => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            ExitCode::SUCCESS
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (warnings and errors by default).
fn tracing_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
