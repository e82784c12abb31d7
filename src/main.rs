//! The `plenum` binary: a thin dispatcher over the library's subcommands.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = plenum::cli::Cli::parse();
    match plenum::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("plenum: {error:#}");
            ExitCode::FAILURE
        }
    }
}
