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
//! use cachefrom::ci::Environment;
//! use cachefrom::exec::{build_with_cache, BuildOptions, Context};
//! use cachefrom::settings::Settings;
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut settings = Settings::new("registry.example.com/team/app", "."); // REPOSITORY, context
//! settings.backend = "registry".to_string(); // or inline, local,dir=…, tarball,dir=…, s3,…, gha
//! settings.tags = vec!["registry.example.com/team/app:v1".to_string()];
//! settings.push = true; // push the tags after a successful build
//! settings.docker_args = vec!["--network=host".to_string()]; // passed to docker untouched
//!
//! let options = BuildOptions::new(settings.plan_options(&Environment::from_process())?);
//! let report = build_with_cache(&Context::from_environment(), &options)?;
//! for stage in &report.stages {
//!     println!("{}: {}/{} steps cached", stage.name, stage.steps_cached, stage.steps_total);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # The three functions, for custom release tooling
//!
//! [`exec::pull_cached`] finds the cache each stage reads; [`exec::build_stage`] builds one stage;
//! [`exec::push_cached`] writes a stage's cache. A [`exec::PushGuard`] calls `push_cached` for
//! every stage marked built when it goes out of scope (an early `?`, a panic), like
//! `trap push_cached EXIT`; [`exec::PushGuard::finish`] does it explicitly and returns the result.
//!
//! ```no_run
//! use cachefrom::ci::Environment;
//! use cachefrom::exec::{build_stage, pull_cached, push_cached, Context, PushGuard};
//! use cachefrom::plan::Plan;
//! use cachefrom::settings::Settings;
//!
//! # fn main() -> anyhow::Result<()> {
//! let ctx = Context::from_environment();
//! let plan = Plan::new(&Settings::new("127.0.0.1:5000/app", ".").plan_options(&Environment::from_process())?)?;
//! print!("{plan}"); // the shell script this amounts to
//!
//! let resolution = pull_cached(&ctx, &plan)?;
//! let mut guard = PushGuard::new(&ctx, &plan);
//! for stage in &plan.stages {
//!     build_stage(&ctx, &plan, &stage.name, &resolution)?; // on `?`, the guard pushes what built
//!     guard.stage_built(&stage.name);
//! }
//! for (stage, outcome) in guard.finish()? {
//!     println!("{stage}: wrote {:?}", outcome.pushed);
//! }
//! # let _ = push_cached;
//! # Ok(())
//! # }
//! ```
//!
//! The library prints nothing itself: what a run shows goes through [`output::Output`] in the
//! [`exec::Context`] ([`output::StandardStreams`] by default; [`output::Silent`], or your own).
//!
//! The data flows one way: options → [`plan`] → [`exec`] → [`report`]. The modules below `exec`
//! are pure except [`docker`] and [`registry`], the only ones that touch the outside world.

#![deny(missing_docs)]

// The handful a caller needs, at the root.
pub use backend::Backend;
pub use ci::Environment;
pub use docker::Cancel;
pub use exec::{
    build_stage, build_with_cache, pull_cached, push_cached, BuildFailed, BuildOptions, Context, PushGuard,
};
pub use output::{Output, Recorded, Silent, StandardStreams};
pub use plan::{Access, Level, Plan, PlanOptions};
pub use report::RunReport;
pub use settings::Settings;

pub mod backend;
pub mod ci;
pub mod docker;
pub mod dockerfile;
pub mod engine;
pub mod exec;
pub mod git;
pub mod inputs;
pub mod output;
pub mod plan;
mod progress;
pub mod prune;
pub mod refs;
pub mod registry;
pub mod report;
pub mod script;
pub mod secrets;
pub mod settings;
pub mod shell;
pub mod writes;
