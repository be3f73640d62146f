//! `bitmirror`: the command-line entry point.
//!
//! `bitmirror serve [qemu-storage-daemon options]` runs the daemon; the
//! binary also behaves as `serve` when invoked under the name
//! `qemu-storage-daemon` (a symlink), so tools that run that program by
//! name get bitmirror.

mod backup_cli;
mod demo;
mod migrate_cli;
mod qmp_client;
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
    /// Back up a node of a running daemon (over QMP) into a chain of qcow2
    /// files: a full backup first, then only what changed since the last.
    Backup(backup_cli::BackupArgs),
    /// See the whole workflow run here, with nothing to set up: a full
    /// backup with a bitmap, incremental migrations A→B→A while a guest
    /// writes, an incremental backup, each checked byte for byte.
    Demo(demo::DemoArgs),
    /// Move a node of a running daemon to another daemon while it is in use
    /// (live storage migration): incrementally from a bitmap onto a shared
    /// base image, or in full; the bitmaps move along.
    Migrate(migrate_cli::MigrateArgs),
    /// Check that an image (e.g. a backup chain's top) equals a source,
    /// byte for byte: files (qcow2, raw) or NBD URIs.
    Verify(backup_cli::VerifyArgs),
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
        Some(Command::Backup(a)) => report(backup_cli::backup(&a).map(|()| true)),
        Some(Command::Verify(a)) => report(backup_cli::verify(&a)),
        Some(Command::Demo(a)) => report(demo::demo(&a)),
        Some(Command::Migrate(a)) => report(migrate_cli::migrate(&a).map(|()| true)),
        None => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            ExitCode::SUCCESS
        }
    }
}

/// Exit 0 for `Ok(true)`, 1 for `Ok(false)`, 2 with the error's chain on
/// stderr for `Err`.
fn report(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bitmirror: {e:#}");
            ExitCode::from(2)
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
