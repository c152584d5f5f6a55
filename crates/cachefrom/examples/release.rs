//! A release tool built on cachefrom's three functions: several images from one Dockerfile (one
//! a target stage), each with per-stage caches and a trap-style cache push; cachefrom's own
//! output goes to the tool's log file, and the tool prints its own summary from the reports.
//!
//! ```text
//! cargo run -p cachefrom --example release -- --image 127.0.0.1:5000/app --version 1.2.3 \
//!     --target server --target worker --log release.log [--build-arg NAME=VALUE]... \
//!     [CONTEXT] [-- DOCKER BUILD OPTIONS]
//! ```
//!
//! Each image is pushed as `IMAGE:TARGET-VERSION`.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _, Result};
use cachefrom::{pull_cached, Context, Environment, Output, Plan, PushGuard, Settings};

/// cachefrom's lines, appended to a file.
#[derive(Debug)]
struct Log(Mutex<std::fs::File>);

impl Output for Log {
    fn line(&self, text: &str) {
        let mut file = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = writeln!(file, "{text}");
    }
}

/// What the command line asks for.
#[derive(Debug, Default)]
struct Release {
    image: String,
    version: String,
    targets: Vec<String>,
    log: PathBuf,
    context: Option<PathBuf>,
    branch: Option<String>,
    build_args: Vec<(String, String)>,
    docker_args: Vec<String>,
}

fn parse(args: &[String]) -> Result<Release> {
    let mut release = Release::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().cloned().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--image" => release.image = value()?,
            "--version" => release.version = value()?,
            "--target" => release.targets.push(value()?),
            "--log" => release.log = value()?.into(),
            "--branch" => release.branch = Some(value()?),
            "--build-arg" => {
                let pair = value()?;
                let (name, value) = pair.split_once('=').context("--build-arg takes NAME=VALUE")?;
                release.build_args.push((name.to_string(), value.to_string()));
            }
            "--" => release.docker_args.extend(args.by_ref().cloned()),
            other if other.starts_with('-') => bail!("unknown option {other}"),
            other => release.context = Some(other.into()),
        }
    }
    if release.image.is_empty() || release.version.is_empty() || release.targets.is_empty() {
        bail!(
            "usage: release --image REPOSITORY --version V --target STAGE... --log FILE [CONTEXT] [-- DOCKER OPTIONS]"
        );
    }
    Ok(release)
}

/// Builds and pushes every image; returns the summary, one line an image.
pub fn run(args: &[String]) -> Result<Vec<String>> {
    let release = parse(args)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&release.log)
        .with_context(|| format!("opening the log {}", release.log.display()))?;
    let mut ctx = Context::from_environment();
    ctx.output = Arc::new(Log(Mutex::new(log)));

    let mut summary = Vec::new();
    for target in &release.targets {
        let mut settings = Settings::new(&release.image, release.context.clone().unwrap_or_else(|| ".".into()))
            .target(target)
            .tag(format!("{}:{target}-{}", release.image, release.version))
            .push(true);
        settings.branch = release.branch.clone();
        settings.build_args = release.build_args.clone();
        settings.docker_args = release.docker_args.clone();
        let plan = Plan::new(&settings.plan_options(&Environment::from_process())?)?;

        let resolution = pull_cached(&ctx, &plan)?;
        let mut guard = PushGuard::new(&ctx, &plan, &resolution);
        for stage in plan.builds() {
            guard.build(stage).with_context(|| format!("releasing {target}"))?;
        }
        let report = guard.finish()?;

        let (cached, total) = report.totals();
        let written: usize = report.stages.iter().map(|stage| stage.pushed.len()).sum();
        summary.push(format!(
            "{target}: {}:{target}-{} pushed; {cached}/{total} steps from cache; {written} cache tags written",
            release.image, release.version
        ));
    }
    Ok(summary)
}

#[allow(dead_code)] // The tests include this file as a module and call `run`.
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(summary) => {
            for line in summary {
                println!("{line}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("release: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
