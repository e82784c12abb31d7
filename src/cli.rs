//! Command line: `plenum serve`, `plenum load`, `plenum check-host`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Plenum: Server-Sent Events for very many subscribers.
#[derive(Debug, Parser)]
#[command(name = "plenum", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the SSE server.
    Serve(Box<crate::config::ServeArgs>),
    /// Load generator and dead-peer tester for any SSE server.
    Load(crate::load::LoadArgs),
    /// Check this host's limits for N connections and print what to change.
    CheckHost(crate::check::CheckArgs),
}

/// Runs one subcommand to completion.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => crate::server::serve(*args),
        Command::Load(args) => crate::load::run(args),
        Command::CheckHost(args) => crate::check::run(args),
    }
}
