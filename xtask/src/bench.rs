//! `cargo xtask bench`: benchmarks, written to BENCHMARKS.md.

use anyhow::Result;
use xshell::Shell;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn run(_sh: &Shell, _args: &BenchArgs) -> Result<()> {
    anyhow::bail!("not written yet")
}
