//! `parvis`: the command-line front end (the Hyper-V PowerShell module's equivalent).
//! `parvis disk …` works on local image files and needs no agent.

use clap::{Parser, Subcommand};

mod disk;

#[derive(Debug, Parser)]
#[command(name = "parvis", version, about = "Parvis command-line interface")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with local disk images (raw, VHD, VHDX).
    #[command(subcommand)]
    Disk(disk::DiskCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Disk(c) => disk::run(c),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("parvis: error: {e:#}");
            std::process::exit(1);
        }
    }
}
