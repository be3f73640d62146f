//! `bitmirror`: the command-line entry point.
//!
//! Today it only describes itself; the daemon (`serve`) and the one-shot verbs
//! arrive with their issues.

use clap::Parser;

/// bitmirror tracks writes to virtual disks in dirty bitmaps, so that mirrors
/// (live storage migration) and backups copy only what changed.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
