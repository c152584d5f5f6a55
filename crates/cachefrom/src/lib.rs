//! Docker layer caching for CI runners that start empty every time.
//!
//! cachefrom builds each stage of a multi-stage Dockerfile with `--target`, reading each stage's
//! cache from the most specific place that has one (this branch, its merge-base with the default
//! branch, the default branch, the previous commit, an unprefixed tag) and writing the caches back
//! even when a later stage fails. Everything is computed first as a [`plan::Plan`] (plain data,
//! printable as the shell script a person would write), then executed.
//!
//! # The one call
//!
//! ```no_run
//! use cachefrom::{build_with_cache, Backend, BuildOptions, Context, Environment, Settings};
//!
//! # fn main() -> anyhow::Result<()> {
//! let settings = Settings::new("registry.example.com/team/app", ".") // REPOSITORY, context
//!     .backend(Backend::default()) // registry; or "local,dir=/cache".parse()?, Backend::Inline, …
//!     .tag("registry.example.com/team/app:v1")
//!     .push(true) // push the tags after a successful build
//!     .docker_arg("--network=host"); // passed to docker untouched
//!
//! let options = BuildOptions::new(settings.plan_options(&Environment::from_process())?);
//! match build_with_cache(&Context::from_environment(), &options) {
//!     Ok(report) => {
//!         for stage in &report.stages {
//!             println!("{}: {}/{} steps cached", stage.name, stage.steps_cached, stage.steps_total);
//!         }
//!     }
//!     // Usage, Engine, Cache, BuildFailed or Cancelled; the CLI exits with error.exit_code().
//!     Err(error) => std::process::exit(i32::from(error.exit_code())),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # The three functions, for custom release tooling
//!
//! [`pull_cached`] checks the engine and finds the cache each stage reads; [`build_stage`] builds
//! one stage; [`push_cached`] writes a stage's cache. A [`PushGuard`] composes them: its
//! [`PushGuard::build`] builds a stage and marks it, and every stage marked has its cache written
//! when the guard goes out of scope (an early `?`, a panic), like `trap push_cached EXIT`;
//! [`PushGuard::finish`] does it explicitly and returns the same [`RunReport`] as
//! [`build_with_cache`]. Stages are the plan's own [`plan::StagePlan`]s, not names.
//!
//! ```no_run
//! use cachefrom::{pull_cached, Context, Environment, Plan, PushGuard, Settings, Silent};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut ctx = Context::from_environment();
//! ctx.output = std::sync::Arc::new(Silent); // or your own log: see `Output`
//! let plan = Plan::new(&Settings::new("127.0.0.1:5000/app", ".").plan_options(&Environment::from_process())?)?;
//! print!("{plan}"); // the shell script this amounts to
//!
//! let resolution = pull_cached(&ctx, &plan)?;
//! let mut guard = PushGuard::new(&ctx, &plan, &resolution);
//! for stage in plan.builds() {
//!     guard.build(stage)?; // on `?`, the guard writes the caches of what built
//! }
//! let report = guard.finish()?;
//! let (cached, total) = report.totals();
//! println!("{cached}/{total} steps cached");
//! # Ok(())
//! # }
//! ```
//!
//! `examples/release.rs` is a whole release tool written this way.
//!
//! The library prints nothing itself: what a run shows goes through the [`Output`] in the
//! [`Context`] ([`StandardStreams`] by default; [`Silent`], [`Recorded`], or your own).
//!
//! The data flows one way: options → [`plan`] → [`exec`] → [`report`]. Below `exec`, [`docker`]
//! runs every external program (docker, tar, cp, git), [`registry`] is the only one that speaks
//! HTTP, and [`writes`] and [`prune`] carry out writes through them; the rest only compute.

#![deny(missing_docs)]

// The handful a caller needs, at the root.
pub use backend::Backend;
pub use ci::Environment;
pub use docker::Cancel;
pub use error::Error;
pub use exec::{
    build_stage, build_with_cache, pull_cached, push_cached, BuildFailed, BuildOptions, Context, PushGuard,
};
pub use output::{Output, Recorded, Silent, StandardStreams};
pub use plan::{Access, Level, Plan, PlanOptions, StagePlan};
pub use report::{RunReport, StageReport, StageStatus};
pub use settings::Settings;

pub mod backend;
pub mod ci;
pub mod docker;
pub mod dockerfile;
pub mod engine;
pub mod error;
pub mod exec;
pub mod explain;
pub mod files;
pub mod git;
pub mod inputs;
pub mod mounts;
pub mod output;
pub mod plan;
mod progress;
pub mod prune;
pub mod refs;
pub mod registry;
pub mod render;
pub mod report;
pub mod retry;
mod script;
pub mod secrets;
pub mod settings;
mod shell;
pub mod writes;
