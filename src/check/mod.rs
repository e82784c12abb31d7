//! `plenum check-host`: host limits check (stub; see issue 5).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {}

pub fn run(_args: CheckArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("plenum check-host is not built yet")
}
