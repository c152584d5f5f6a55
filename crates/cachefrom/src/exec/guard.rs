//! [`push_cached`] and the [`PushGuard`] that writes caches trap-style: after a failed later
//! stage, an early return or a panic; and the recovery of what a failed one-build run finished.

use super::build::{build_unit, credit_writes};
use super::context::Context;
use super::resolve::Resolution;
use crate::docker::signal_name;
use crate::output::OutputStyle;
use crate::plan::{CacheErrors, CacheWrite, Plan, StagePlan};
use crate::report::{RunReport, StageReport, StageStatus};
use crate::writes::{self};
use anyhow::{Context as _, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// What [`push_cached`] wrote, and what it could not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushOutcome {
    /// Locations written.
    pub pushed: Vec<String>,
    /// One line for each write that failed.
    pub warnings: Vec<String>,
}

/// Writes the cache a build of `stage` exported where the plan says ([`Plan::writes_after`]):
/// further tags by copying the cache manifest (registry), a copy a tag (local), a tar file a tag
/// (tarball), `docker push` of each cache tag (inline). s3 and gha caches are written whole by
/// BuildKit during the build.
pub fn push_cached(ctx: &Context, plan: &Plan, stage: &StagePlan) -> Result<PushOutcome> {
    perform_writes(ctx, plan, &plan.writes_after(stage), &BTreeMap::new())
}

pub(crate) fn perform_writes(
    ctx: &Context,
    plan: &Plan,
    writes: &[CacheWrite],
    annotations: &BTreeMap<String, String>,
) -> Result<PushOutcome> {
    let mut outcome = PushOutcome::default();
    for write in writes {
        let timeout = ctx.docker.timeouts.transfer;
        match writes::perform(write, &ctx.docker, &ctx.registry, &plan.repository, annotations, timeout) {
            Ok(()) => outcome.pushed.extend(write.destinations()),
            Err(error) if plan.cache_errors == CacheErrors::Warn => outcome.warnings.push(format!("{error:#}")),
            Err(error) => {
                return Err(error.context("writing the cache failed (cache errors are fatal: --strict-cache)"))
            }
        }
    }
    Ok(outcome)
}

/// After a failed one-build run: exports the cache of `stage`, which the build finished, from
/// BuildKit's local cache (a `cacheonly` build of `--target stage`; nothing is rebuilt), then
/// writes it like [`push_cached`]. Returns the reports of the export and what was written.
pub(crate) fn recover_cached(
    ctx: &Context,
    plan: &Plan,
    stage_name: &str,
    resolution: &Resolution,
) -> Result<(Vec<StageReport>, PushOutcome)> {
    let quiet = Context { style: OutputStyle::Quiet, ..ctx.clone() };
    let outcome = build_unit(&quiet, plan, stage_name, resolution)?;
    if let Some(error) = outcome.error {
        return Err(error.context(format!("exporting the cache of stage {stage_name}, which the build finished")));
    }
    let mut reports = outcome.reports;
    if outcome.export_failed {
        return Ok((reports, PushOutcome::default()));
    }
    let stage = plan.stage(stage_name).with_context(|| format!("the plan has no stage `{stage_name}`"))?;
    let written = push_cached(ctx, plan, stage)?;
    credit_writes(plan, &mut reports, &written.pushed);
    Ok((reports, written))
}

/// Writes each built stage's cache when it goes out of scope, like `trap push_cached EXIT`: after
/// a later stage fails, an early `?` return, or a panic. [`PushGuard::build`] builds a stage and
/// marks it; [`PushGuard::finish`] writes the caches now and returns the run's [`RunReport`].
/// `Drop` is the fallback and reports failures through the context's output.
#[must_use = "a PushGuard pushes when dropped; call finish() to see the result"]
pub struct PushGuard<'a> {
    ctx: &'a Context,
    plan: &'a Plan,
    resolution: &'a Resolution,
    started: Instant,
    built: Vec<&'a StagePlan>,
    /// Stages a failed build finished: their caches are exported from BuildKit's cache, then written.
    recover: Vec<&'a StagePlan>,
    reports: BTreeMap<String, StageReport>,
    error: Option<String>,
    finished: bool,
}

impl<'a> PushGuard<'a> {
    /// A guard for `plan`, reading the caches [`pull_cached`] found; nothing is pushed until a
    /// stage is built.
    pub fn new(ctx: &'a Context, plan: &'a Plan, resolution: &'a Resolution) -> PushGuard<'a> {
        PushGuard {
            ctx,
            plan,
            resolution,
            started: Instant::now(),
            built: Vec::new(),
            recover: Vec::new(),
            reports: BTreeMap::new(),
            error: None,
            finished: false,
        }
    }

    /// Builds `stage` (as [`build_stage`] does) and marks it built: its cache will be written.
    /// Build the stages of [`Plan::builds`], in order. A failed build is returned as the error
    /// (carrying a [`StageFailed`]); the stages built before it, and those the failed build
    /// finished, still have their caches written, by [`PushGuard::finish`] or on drop.
    pub fn build(&mut self, stage: &'a StagePlan) -> Result<&StageReport> {
        let outcome = build_unit(self.ctx, self.plan, &stage.name, self.resolution)?;
        for report in outcome.reports {
            self.reports.insert(report.name.clone(), report);
        }
        if let Some(error) = outcome.error {
            self.error = Some(format!("{error:#}"));
            for finished in self.plan.stages.iter().filter(|other| outcome.finished.contains(&other.name)) {
                if finished.name != stage.name && !self.recover.iter().any(|known| known.name == finished.name) {
                    self.recover.push(finished);
                }
            }
            return Err(error);
        }
        self.stage_built(stage);
        self.reports.get(&stage.name).with_context(|| format!("the build of {} reported nothing for it", stage.name))
    }

    /// Marks `stage` built (by [`build_stage`] or by the caller's own build): its cache will be written.
    pub fn stage_built(&mut self, stage: &'a StagePlan) {
        if !self.built.iter().any(|built| built.name == stage.name) {
            self.built.push(stage);
        }
    }

    /// The stages marked built so far.
    pub fn built(&self) -> Vec<&'a StagePlan> {
        self.built.clone()
    }

    /// Writes the caches of the built stages now and returns the run's report: every stage of
    /// the plan (`not built` where nothing built it), where each cache went, the warnings.
    /// With cache errors fatal (`--strict-cache`), a failed write is the error.
    pub fn finish(mut self) -> Result<RunReport> {
        self.finished = true;
        let outcomes = self.push_all()?;
        let mut reports = std::mem::take(&mut self.reports);
        for (stage, outcome) in outcomes {
            credit_writes(self.plan, reports.values_mut(), &outcome.pushed);
            if let Some(report) = reports.get_mut(&stage) {
                report.warnings.extend(outcome.warnings.into_iter().map(|w| format!("cache write failed: {w}")));
            }
        }
        let outcome = RunOutcome {
            reports,
            started: self.started,
            error: self.error.clone(),
            warnings: self.resolution.warnings.clone(),
            backend_fallback: None,
            unchanged: None,
            engine: None,
            require_all_built: true,
            mounts: Vec::new(),
        };
        Ok(outcome.report(self.ctx, self.plan, self.resolution))
    }

    fn push_all(&self) -> Result<Vec<(String, PushOutcome)>> {
        let mut outcomes = Vec::new();
        for stage in &self.recover {
            let (_, outcome) = recover_cached(self.ctx, self.plan, &stage.name, self.resolution)
                .with_context(|| format!("writing the cache of stage {}", stage.name))?;
            outcomes.push((stage.name.clone(), outcome));
        }
        for stage in &self.built {
            let outcome = push_cached(self.ctx, self.plan, stage)
                .with_context(|| format!("writing the cache of stage {}", stage.name))?;
            outcomes.push((stage.name.clone(), outcome));
        }
        Ok(outcomes)
    }
}

impl Drop for PushGuard<'_> {
    fn drop(&mut self) {
        if self.finished || (self.built.is_empty() && self.recover.is_empty()) {
            return;
        }
        let why = if std::thread::panicking() { "after a panic" } else { "on the way out" };
        let names: Vec<&str> = self.recover.iter().chain(&self.built).map(|stage| stage.name.as_str()).collect();
        self.ctx.say(&format!("cachefrom: writing the caches of {} {why}", names.join(", ")));
        match self.push_all() {
            Ok(outcomes) => {
                for (stage, outcome) in outcomes {
                    for warning in outcome.warnings {
                        self.ctx.warn(&format!("stage {stage}: {warning}"));
                    }
                }
            }
            Err(error) => self.ctx.warn(&format!("{error:#}")),
        }
    }
}

/// The report of a run, in one place: every stage of the plan in plan order (`not built` where
/// nothing built it), with the checks' level, time and warnings.
pub(crate) struct RunOutcome {
    pub(crate) reports: BTreeMap<String, StageReport>,
    pub(crate) started: Instant,
    pub(crate) error: Option<String>,
    pub(crate) warnings: Vec<String>,
    pub(crate) backend_fallback: Option<String>,
    pub(crate) unchanged: Option<String>,
    pub(crate) engine: Option<String>,
    /// A run that did not build every stage failed (the guard's caller stopped early).
    pub(crate) require_all_built: bool,
    pub(crate) mounts: Vec<crate::report::MountReport>,
}

impl RunOutcome {
    pub(crate) fn report(mut self, ctx: &Context, plan: &Plan, resolution: &Resolution) -> RunReport {
        let stages: Vec<StageReport> = plan
            .stages
            .iter()
            .map(|stage| {
                self.reports.remove(&stage.name).unwrap_or_else(|| StageReport::new(&stage.name, StageStatus::NotBuilt))
            })
            .collect();
        let all_built = stages.iter().all(|stage| matches!(stage.status, StageStatus::Built | StageStatus::Unchanged));
        let mut report = RunReport {
            stages,
            seconds: self.started.elapsed().as_secs_f64(),
            backend: plan.backend.name().to_string(),
            backend_fallback: self.backend_fallback,
            level: resolution.level,
            check_seconds: resolution.seconds,
            success: (all_built || !self.require_all_built) && self.error.is_none(),
            error: self.error,
            warnings: self.warnings,
            unchanged: self.unchanged,
            cancelled: ctx.docker.cancel.requested().map(signal_name),
            engine: self.engine,
            mounts: self.mounts,
            saved_seconds: None,
            import_seconds: None,
            import_bytes: 0,
        };
        report.total_math();
        report
    }
}

/// After a failed one-build run: exports and writes the cache of every stage the build finished
/// (the plan's recovery order: later stages first, each covering the stages it reads from).
pub(crate) fn recover(
    ctx: &Context,
    plan: &Plan,
    resolution: &Resolution,
    finished: &BTreeSet<String>,
    reports: &mut BTreeMap<String, StageReport>,
) -> Result<()> {
    // A stage whose reader finished has finished too. (BuildKit names a step that two stages
    // share, such as the same FROM, after one of them only, so the record alone can miss one.)
    let mut finished = finished.clone();
    for stage in plan.stages.iter().rev() {
        if finished.contains(&stage.name) {
            finished.extend(stage.depends_on.iter().cloned());
        }
    }
    // The report says so too.
    for name in &finished {
        if let Some(report) = reports.get_mut(name).filter(|report| report.status == StageStatus::NotBuilt) {
            report.status = StageStatus::Built;
        }
    }
    let mut covered: BTreeSet<String> = BTreeSet::new();
    for recovery in &plan.recovery {
        if covered.contains(&recovery.stage) || !finished.contains(&recovery.stage) {
            continue;
        }
        ctx.say(&format!("cachefrom: writing the cache of {}, which the build finished", recovery.stage));
        let (exported, written) = recover_cached(ctx, plan, &recovery.stage, resolution)?;
        let locations: Vec<String> = exported.into_iter().flat_map(|export| export.pushed).collect();
        credit_writes(plan, reports.values_mut(), &locations);
        for warning in written.warnings {
            if let Some(report) = reports.get_mut(&recovery.stage) {
                report.warnings.push(format!("cache write failed: {warning}"));
            }
        }
        covered.extend(recovery.covers.iter().cloned());
    }
    Ok(())
}
