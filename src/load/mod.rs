//! `plenum load`: load generator (stub; see issue 4).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {}

pub fn run(_args: LoadArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("plenum load is not built yet")
}
