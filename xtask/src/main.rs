//! This repository's `cargo xtask`: `stack`, `docker`, `demo`, `test`, `bench`.

mod bench;
mod bench_synthetic;
mod chart;
mod demo;
mod docker;
mod stack;

use cachefrom_stack::repository_root;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xshell::Shell;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tasks of the cachefrom repository")]
struct Xtask {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The local Docker engine and registry: up, down, status.
    Stack {
        #[command(subcommand)]
        action: StackAction,
    },
    /// Build example-project through the cachefrom library (the example other repositories copy).
    Docker(docker::DockerArgs),
    /// The main job: stack up, cold build, fresh runner, source change, cached rebuild, report.
    Demo,
    /// Every test: stack up, then the workspace's tests and example-project's.
    Test,
    /// Benchmarks against the recipes users run today; writes BENCHMARKS.md.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum StackAction {
    /// Install what is missing and start the engine and registry (idempotent).
    Up {
        /// Also start an S3 server (moto, from PyPI) on 127.0.0.1 with a bucket and test
        /// credentials, for the s3 backend; `stack status` prints the backend and variables.
        #[arg(long)]
        s3: bool,
    },
    /// Stop what `up` started.
    Down,
    /// Say what runs and where.
    Status,
}

fn main() -> ExitCode {
    let xtask = Xtask::parse();
    let result = Shell::new().map_err(anyhow::Error::from).and_then(|sh| {
        sh.change_dir(repository_root());
        match xtask.command {
            Task::Stack { action: StackAction::Up { s3 } } => {
                let stack = stack::Stack::new();
                stack.up(&sh)?;
                if s3 {
                    stack.start_s3(&sh)?;
                }
                Ok(())
            }
            Task::Stack { action: StackAction::Down } => stack::Stack::new().down(),
            Task::Stack { action: StackAction::Status } => stack::Stack::new().status(&sh),
            Task::Docker(args) => docker::run(&args),
            Task::Demo => demo::run(&sh),
            Task::Test => run_tests(&sh),
            Task::Bench(args) => bench::run(&sh, &args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_tests(sh: &Shell) -> anyhow::Result<()> {
    use anyhow::Context;
    stack::Stack::new().up(sh)?;
    xshell::cmd!(sh, "cargo test --workspace --no-fail-fast").run().context("the workspace's tests failed")?;
    let manifest = repository_root().join("example-project/Cargo.toml");
    xshell::cmd!(sh, "cargo test --manifest-path {manifest}").run().context("example-project's tests failed")?;
    Ok(())
}
