//! `parvis`: the command-line front end (the Hyper-V PowerShell module's equivalent).
//!
//! `parvis disk info|create|convert SRC DST|resize|check|compare` work on local image files
//! and need no agent. Everything else talks to an agent over the `parvis.v1` API: the one
//! `--host` names (saved by `parvis host add`), or `$PARVIS_ADDR` + `$PARVIS_TOKEN`
//! (+ `$PARVIS_FINGERPRINT` for TLS), or `$PARVIS_HOST`, or the first saved host.

use std::future::Future;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod console;
mod disk;
mod hosts;
mod remote;
mod remote_disk;
mod switch;
mod vm;

#[derive(Debug, Parser)]
#[command(name = "parvis", version, about = "Parvis command-line interface")]
struct Cli {
    /// The agent to talk to, by the name `parvis host add` saved (default: $PARVIS_HOST,
    /// else the first saved host). $PARVIS_ADDR + $PARVIS_TOKEN [+ $PARVIS_FINGERPRINT]
    /// name an agent without a hosts file.
    #[arg(long, global = true, value_name = "NAME")]
    host: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Agents this CLI knows: add, list, remove, info.
    #[command(subcommand)]
    Host(hosts::HostCommand),
    /// Virtual machines on the agent's host.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Disk images: local files (info, create, convert SRC DST, resize, check, compare) and
    /// the host's disk library (list, get, delete, tasks, upload, convert DISK --format F).
    #[command(subcommand)]
    Disk(remote_disk::DiskCli),
    /// Virtual switches on the agent's host: list, create, delete.
    #[command(subcommand)]
    Switch(switch::SwitchCommand),
}

/// Run async work (every remote command) on a small runtime, with Ctrl-C routing.
pub fn block_on<F: Future<Output = Result<i32>>>(f: F) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let r = rt.block_on(async {
        remote::install_ctrl_c();
        f.await
    });
    // Don't wait for threads blocked on the terminal or the network.
    rt.shutdown_background();
    r
}

fn main() {
    let cli = Cli::parse();
    let host = cli.host.as_deref();
    let result = match cli.command {
        Command::Disk(c) => remote_disk::run(c, host),
        Command::Host(c) => block_on(hosts::run(c, host)),
        Command::Vm(c) => block_on(vm::run(c, host)),
        Command::Switch(c) => block_on(switch::run(c, host)),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let msg = format!("{e:#}").replace(['\r', '\n'], " ");
            eprintln!("parvis: error: {msg}");
            std::process::exit(1);
        }
    }
}
