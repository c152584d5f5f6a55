//! Executing a plan: [`pull_cached`], [`build_stage`], [`push_cached`], the [`PushGuard`] that
//! writes caches trap-style, and [`build_with_cache`], which composes them.
//!
//! One room a job, each named after the part of the surface it serves: [`context`] (what every
//! call needs), [`resolve`] ([`pull_cached`]), [`build`] ([`build_stage`]), [`guard`]
//! ([`push_cached`], [`PushGuard`], recovery), [`run`] ([`build_with_cache`]), [`repair`] (each
//! remedy on its own), [`evidence`] (why a stage missed, and [`explain`]) and [`mounts`] (cache
//! mounts restored before the build and saved after it).

mod build;
mod context;
mod evidence;
mod guard;
mod mounts;
mod repair;
mod resolve;
mod run;

pub use crate::error::BuildFailed;
pub use crate::output::OutputStyle;
pub use build::{build_stage, BuildOutcome, StageFailed};
pub use context::Context;
pub use evidence::{explain, Explanation};
pub use guard::{push_cached, PushGuard, PushOutcome};
pub use mounts::CacheMounts;
pub use resolve::{pull_cached, Choice, Resolution};
pub use run::{build_with_cache, execute_plan, BuildOptions};
