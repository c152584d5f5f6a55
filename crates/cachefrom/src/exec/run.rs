//! [`build_with_cache`]: probe the engine, plan, check the caches, walk the plan's steps, write
//! the caches, publish the report.

use super::build::credit_writes;
use super::context::Context;
use super::evidence::{explain_stages, gather_evidence, joined, record_of, write_stage_records, MissEvidence};
use super::guard::{perform_writes, recover, RunOutcome};
use super::mounts::{restore_mounts, save_mounts, EarlyPack, MountRun, RestoreCommands};
use super::repair::{
    all_hit_source, build_with_fallbacks, complete_cache_of_all_hit_build, is_disk_full, restore_cache,
    reuse_unchanged, unchanged_record, write_from_complete,
};
use super::resolve::{check_caches, Resolution};
use crate::backend::Backend;
use crate::ci::step_summary_path;
use crate::docker::last_lines;
use crate::docker::signal_name;
use crate::engine::{BackendFallback, Engine};
use crate::error::BuildFailed;
use crate::error::Error;
use crate::output::Output;
use crate::plan::DockerArgs;
use crate::plan::{CacheWrite, Plan, PlanOptions, Step};
use crate::report::{RunReport, StageReport};
use crate::writes::{self};
use anyhow::{bail, Context as _, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

/// Options of [`build_with_cache`] beyond the plan's.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// What the plan is computed from.
    pub plan: PlanOptions,
    /// What to do when the engine cannot serve the backend.
    pub fallback: BackendFallback,
    /// The buildx builder to ask about (`--builder` among docker's options), if any.
    pub builder_name: Option<String>,
    /// Write the report as JSON here.
    pub report_file: Option<std::path::PathBuf>,
}

impl BuildOptions {
    /// Build options with the defaults: refuse a backend the engine cannot serve, no report file.
    pub fn new(plan: PlanOptions) -> BuildOptions {
        // A refused option is reported when the plan is made; here only the builder is read.
        let builder_name = DockerArgs::read(&plan.docker_args).ok().and_then(|docker| docker.builder);
        BuildOptions { plan, fallback: BackendFallback::Refuse, builder_name, report_file: None }
    }
}

/// The whole sequence for a Dockerfile and a target: probe the engine, plan, [`pull_cached`],
/// build (one build of the target, or stage by stage for inline), write the caches, push the
/// final tags, and report (a table through the context's output, `report_file` JSON, the GitHub
/// step summary).
///
/// A failed build still has the caches of the stages it finished written; the error says what
/// failed ([`Error`]) and carries the report ([`Error::report`]).
pub fn build_with_cache(ctx: &Context, options: &BuildOptions) -> std::result::Result<RunReport, Error> {
    let started = Instant::now();
    // Check the Dockerfile and the target before asking Docker anything.
    Plan::new(&options.plan).map_err(Error::Usage)?;
    let moved = on_builders_context(ctx, options).map_err(Error::Engine)?;
    let (ctx, options) = match &moved {
        Some((ctx, options)) => (ctx, options),
        None => (ctx, options),
    };
    let plan = Plan::new(&options.plan).map_err(Error::Usage)?;
    let (plan, backend_fallback, resolution, engine) = fit_and_check(ctx, options, plan).map_err(Error::Engine)?;
    execute_checked(ctx, &plan, backend_fallback, resolution, options.report_file.as_deref(), started, Some(engine))
        .map_err(|error| Error::of_run(error, &ctx.docker.cancel))
}

/// `-- --builder NAME` naming the docker driver of another docker context: buildx builds there
/// only from that context ("use `docker --context=NAME buildx`"), so the run moves to it
/// (`DOCKER_CONTEXT`) and leaves `--builder` out; every docker call, the probe included, then
/// asks the engine that builds. `None` when nothing moves.
pub(crate) fn on_builders_context(ctx: &Context, options: &BuildOptions) -> Result<Option<(Context, BuildOptions)>> {
    let Some(name) = &options.builder_name else { return Ok(None) };
    let args = vec!["buildx".to_string(), "inspect".to_string(), name.clone()];
    let inspect = ctx.docker.run("asking buildx about the builder", &args, ctx.docker.timeouts.probe)?;
    if !inspect.success {
        bail!("buildx does not know the builder `{name}`: {}", last_lines(&inspect.stderr, 2));
    }
    let field = |key: &str| {
        inspect.stdout.lines().find_map(|line| line.trim().strip_prefix(key).map(|value| value.trim().to_string()))
    };
    let (Some(driver), Some(endpoint)) = (field("Driver:"), field("Endpoint:")) else { return Ok(None) };
    if driver != "docker" || endpoint.contains("://") || endpoint == "default" {
        return Ok(None);
    }
    let mut moved_ctx = ctx.clone();
    moved_ctx.docker.env.retain(|(key, _)| key != "DOCKER_CONTEXT");
    moved_ctx.docker.env.push(("DOCKER_CONTEXT".to_string(), endpoint.clone()));
    let mut moved = options.clone();
    moved.plan.docker_args = DockerArgs::read(&options.plan.docker_args)?.without_builder();
    moved.builder_name = None;
    moved.plan.notes.push(format!(
        "builder {name} is the docker engine of context {endpoint}: the build runs there (DOCKER_CONTEXT={endpoint})"
    ));
    Ok(Some((moved_ctx, moved)))
}

/// Probes the engine and checks which caches exist at the same time (both ask over the network);
/// the checks run again only when the engine changes the plan's backend or builder.
pub(crate) fn fit_and_check(
    ctx: &Context,
    options: &BuildOptions,
    plan: Plan,
) -> Result<(Plan, Option<String>, Result<Resolution>, String)> {
    let (engine, resolution) = std::thread::scope(|scope| {
        let probe = scope.spawn(|| Engine::probe(&ctx.docker, options.builder_name.as_deref()));
        let resolution = check_caches(ctx, &plan);
        let engine = probe.join().unwrap_or_else(|_| Err(anyhow::anyhow!("probing the engine panicked")));
        (engine, resolution)
    });
    let (backend, builder) = (plan.backend.clone(), plan.builder);
    let engine = engine?;
    let (plan, fallback) = fit_plan(options, &engine, Some(plan))?;
    let resolution =
        if plan.backend == backend && plan.builder == builder { resolution } else { check_caches(ctx, &plan) };
    Ok((plan, fallback, resolution, engine.describe()))
}

pub(crate) fn fit_plan(
    options: &BuildOptions,
    engine: &Engine,
    planned: Option<Plan>,
) -> Result<(Plan, Option<String>)> {
    let (backend, fallback_reason) = engine.check_backend(&options.plan.backend, options.fallback)?;
    let builder = engine.builder();
    let keeps_no_image = engine.driver.as_deref().is_some_and(|driver| driver != "docker");
    // The Dockerfile was read for this machine's platform; a remote engine may have another.
    let build_platform = match (&options.plan.build_platform, &engine.platform) {
        (None, Some(engine_platform)) => crate::dockerfile::Platform::parse(engine_platform)
            .ok()
            .filter(|platform| *platform != crate::dockerfile::Platform::host())
            .map(|platform| platform.to_string()),
        _ => None,
    };
    match planned {
        Some(plan)
            if plan.backend == backend
                && plan.builder == builder
                && plan.builder_keeps_no_image == keeps_no_image
                && build_platform.is_none() =>
        {
            Ok((plan, fallback_reason))
        }
        _ => {
            let mut plan_options = options.plan.clone();
            plan_options.backend = backend;
            plan_options.builder = builder;
            plan_options.builder_keeps_no_image = keeps_no_image;
            if build_platform.is_some() {
                plan_options.build_platform = build_platform;
            }
            Ok((Plan::new(&plan_options)?, fallback_reason))
        }
    }
}

/// Runs an already computed plan. See [`build_with_cache`].
pub fn execute_plan(
    ctx: &Context,
    plan: &Plan,
    backend_fallback: Option<String>,
    report_file: Option<&Path>,
    started: Instant,
) -> Result<RunReport> {
    let resolution = check_caches(ctx, plan);
    execute_checked(ctx, plan, backend_fallback, resolution, report_file, started, None)
}

/// Runs a plan whose caches were checked already ([`pull_cached`]'s answer).
pub(crate) fn execute_checked(
    ctx: &Context,
    plan: &Plan,
    backend_fallback: Option<String>,
    resolution: Result<Resolution>,
    report_file: Option<&Path>,
    started: Instant,
    engine: Option<String>,
) -> Result<RunReport> {
    for note in &plan.notes {
        ctx.say(&format!("cachefrom: {note}"));
    }
    if let Some(why) = &backend_fallback {
        ctx.warn(why);
    }
    // Its warnings go into the report, printed once at the end.
    let mut resolution = resolution?;
    for stage in &plan.stages {
        let choice = &resolution.stages[&stage.name];
        match &choice.chosen {
            Some(chosen) => ctx.say(&format!("cachefrom: {} reads {} ({})", stage.name, chosen.location, chosen.level)),
            None if !plan.backend.can_check_existence() => {
                ctx.say(&format!("cachefrom: {} reads every candidate; BuildKit takes what exists", stage.name))
            }
            None => ctx.say(&format!("cachefrom: {} has no cache yet", stage.name)),
        }
    }

    let mut stage_reports: BTreeMap<String, StageReport> = BTreeMap::new();
    let mut unchanged = None;
    // The record written on the exported cache, once the target's build has succeeded.
    let mut annotations: BTreeMap<String, String> = BTreeMap::new();
    // Each stage's inputs and the records on the caches read, gathered while the build runs (the
    // build overwrites the caches it read): what a miss is explained with, and the records this
    // run writes.
    let mut gathering: Option<std::thread::JoinHandle<Result<MissEvidence>>> = None;
    let mut evidence: Option<MissEvidence> = None;

    // One interpreter of the plan's steps; a failed build stops the walk after recovering what it
    // finished (the plan's recovery).
    let mut build_error: Option<anyhow::Error> = None;
    let mut write_error: Option<String> = None;
    let mut written = WriteLog::default();
    // Stages whose build failed to export.
    let mut not_exported: BTreeSet<String> = BTreeSet::new();
    let mut mount_run = MountRun::default();
    let mut early_pack: Option<EarlyPack> = None;
    // After an all-hit local or tarball build: (stage built, the cache it read).
    let mut complete: Option<(String, crate::backend::CacheLocation)> = None;
    for step in &plan.steps {
        // After a failure only the cache mounts are saved (what the steps that ran left in them).
        if (build_error.is_some() || write_error.is_some()) && !matches!(step, Step::SaveMounts { .. }) {
            continue;
        }
        match step {
            Step::MountBaseLayers { images, platform } => {
                if let Some(warning) = mount_base_layers(ctx, plan, images, platform) {
                    resolution.warnings.push(warning);
                }
            }
            Step::RestoreMounts { argv, pull, again } => {
                // Its warnings go into the report, printed once at the end.
                let commands = RestoreCommands { argv, pull: pull.as_deref(), again: again.as_deref() };
                let warnings = restore_mounts(ctx, plan, commands, &mut mount_run);
                resolution.warnings.extend(warnings);
            }
            Step::SaveMounts { argv } => {
                // Saving is not cancelled: it is what a cancel waits for, as the recovery.
                let uncancelled = ctx.uncancelled();
                let succeeded = build_error.is_none() && write_error.is_none();
                let packed = early_pack.take().and_then(EarlyPack::take);
                let warnings = save_mounts(&uncancelled, plan, argv, &mut mount_run, &stage_reports, succeeded, packed);
                resolution.warnings.extend(warnings);
            }
            Step::ReuseUnchanged { record_on, image_tags, writes } => {
                let Some(record) = unchanged_record(plan, &resolution) else { continue };
                match reuse_unchanged(ctx, plan, &resolution, record, image_tags, writes) {
                    Ok(reports) => {
                        unchanged = Some(record_on.clone());
                        stage_reports = reports.into_iter().map(|report| (report.name.clone(), report)).collect();
                        break;
                    }
                    Err(error) => ctx.warn(&format!("reusing the unchanged build failed, building: {error:#}")),
                }
            }
            Step::Build { .. } if ctx.docker.cancel.requested().is_some() => {
                build_error = Some(anyhow::anyhow!("cancelled before the next build started"));
            }
            Step::Build { stage, fallbacks, .. } => {
                if gathering.is_none() && evidence.is_none() && plan.backend.keeps_records() {
                    let (ctx, plan, resolution) = (ctx.clone(), plan.clone(), resolution.clone());
                    gathering = Some(std::thread::spawn(move || gather_evidence(&ctx, &plan, &resolution)));
                }
                // The save build starts as soon as the mounts' steps have finished (uncancelled,
                // as the save step itself).
                if early_pack.is_none() {
                    let save = plan.steps.iter().find_map(|step| match step {
                        Step::SaveMounts { argv } => Some(argv),
                        _ => None,
                    });
                    let uncancelled = ctx.uncancelled();
                    early_pack = save.and_then(|argv| EarlyPack::new(&uncancelled, plan, argv));
                }
                let observe = |event: &crate::report::ProgressEvent| {
                    if let Some(early) = &early_pack {
                        early.observe(event);
                    }
                };
                let observer: &(dyn Fn(&crate::report::ProgressEvent) + Sync) = &observe;
                let outcome = build_with_fallbacks(ctx, plan, stage, fallbacks, &mut resolution, Some(observer))?;
                if outcome.export_failed {
                    not_exported.insert(stage.clone());
                }
                for report in outcome.reports {
                    stage_reports.insert(report.name.clone(), report);
                }
                if let Some(error) = outcome.error {
                    build_error = Some(error);
                    // Writing what finished is not cancelled: it is what a cancel waits for.
                    let uncancelled = ctx.uncancelled();
                    if let Err(error) = recover(&uncancelled, plan, &resolution, &outcome.finished, &mut stage_reports)
                    {
                        write_error = Some(format!("{error:#}"));
                    }
                    continue;
                }
                annotations = record_of(plan, stage, &resolution, &stage_reports)
                    .map(|record| record.to_annotations())
                    .unwrap_or_default();
                joined(ctx, &mut gathering, &mut evidence);
                if let Some(gathered) = evidence.as_ref().filter(|_| !outcome.export_failed) {
                    write_stage_records(plan, stage, &gathered.now, &mut annotations);
                }
            }
            // The export failed (its warning is in the report): copying it would copy an older cache.
            Step::Write { stage, .. } | Step::WriteBack { stage, .. } | Step::RefreshStageTags { stage, .. }
                if not_exported.contains(stage) => {}
            Step::WriteBack { stage, to } => {
                if let Some(digest) = complete_cache_of_all_hit_build(plan, stage, &resolution, &stage_reports) {
                    if let Err(error) = restore_cache(ctx, plan, &digest, to, &annotations) {
                        resolution.warnings.push(format!("{error:#}"));
                    }
                } else if matches!(plan.backend, Backend::Local { .. } | Backend::Tarball { .. }) {
                    complete = all_hit_source(plan, stage, &resolution, &stage_reports)
                        .map(|(_, source)| (stage.clone(), source.location));
                }
            }
            // The cache directory is full: the other file writes would fail the same way.
            Step::Write { write: CacheWrite::CopyDir { .. } | CacheWrite::Pack { .. }, .. }
            | Step::RefreshStageTags { .. }
                if written.disk_full.is_some() =>
            {
                written.skipped_full += 1;
            }
            Step::Write { stage, write } => {
                let planned = write;
                let write = match &complete {
                    Some((built, source)) if built == stage => write_from_complete(plan, planned, source),
                    _ => Some(planned.clone()),
                };
                match write {
                    Some(write) => {
                        let writes = std::slice::from_ref(&write);
                        write_error = written.perform(ctx, plan, stage, writes, &annotations, &mut stage_reports);
                    }
                    // The cache read is there already, whole.
                    None => credit_writes(plan, stage_reports.values_mut(), &planned.destinations()),
                }
            }
            Step::RefreshStageTags { stage, writes } => {
                let writes = existing_destinations(writes, &resolution);
                write_error = written.perform(ctx, plan, stage, &writes, &annotations, &mut stage_reports);
            }
            Step::PushImage { image } => {
                let args = vec!["push".to_string(), "--quiet".to_string(), image.clone()];
                if let Err(error) =
                    ctx.docker.run_checked(&format!("pushing the image {image}"), &args, ctx.docker.timeouts.transfer)
                {
                    build_error = Some(error);
                }
            }
        }
    }
    for (stage, warning) in written.warnings {
        if let Some(report) = stage_reports.get_mut(&stage) {
            report.warnings.push(format!("cache write failed: {warning}"));
        }
    }
    // Why each stage that missed did.
    joined(ctx, &mut gathering, &mut evidence);
    let missed: BTreeSet<String> = stage_reports
        .values()
        .filter(|report| report.steps_total > 0 && report.steps_cached < report.steps_total)
        .map(|report| report.name.clone())
        .collect();
    let empty = MissEvidence { now: BTreeMap::new(), records: BTreeMap::new() };
    for (stage, mut miss) in explain_stages(plan, &resolution, evidence.as_ref().unwrap_or(&empty), &missed) {
        // Why the checks could not be made is the run's one warning; each stage points to it.
        if miss.kind == crate::explain::MissKind::Unchecked {
            miss.line = "could not check whether a cache exists (see the warning)".to_string();
        }
        if let Some(report) = stage_reports.get_mut(&stage) {
            report.miss_reason = Some(crate::secrets::scrub(&miss.line).into_owned());
            report.miss = Some(miss);
        }
    }
    let mut run_warnings = resolution.warnings.clone();
    if let Some(first) = written.disk_full {
        // One warning for the cause, not one per tag; nothing partial was left (see `writes`).
        run_warnings.push(format!(
            "the cache directory is full: {first}; {} more cache writes skipped, nothing partial left behind; the build itself went on (free space, or point the backend's dir= elsewhere)",
            written.skipped_full
        ));
    }
    let push_error = write_error;

    let cancelled = ctx.docker.cancel.requested().map(signal_name);
    if let Some(by) = &cancelled {
        build_error = build_error.map(|error| {
            error.context(format!("cancelled by {by}; the caches of the stages it finished were written"))
        });
    }
    let message = match (&build_error, &push_error) {
        (Some(build), Some(push)) => {
            Some(format!("{build:#}\nand writing the caches of the stages built before it failed too: {push}"))
        }
        (Some(build), None) => Some(format!("{build:#}")),
        (None, Some(push)) => Some(push.clone()),
        (None, None) => None,
    };
    if message.is_some() && build_error.is_none() {
        run_warnings.push("the build succeeded but writing its cache failed".to_string());
    }
    let mounts = mount_run.finish(plan, &stage_reports);
    let report = RunOutcome {
        reports: stage_reports,
        started,
        error: message.clone(),
        warnings: run_warnings,
        backend_fallback,
        unchanged: unchanged.map(|record_on| {
            format!("the inputs are those recorded on {record_on}: nothing to build, its cache and image reused")
        }),
        engine,
        require_all_built: false,
        mounts,
    }
    .report(ctx, plan, &resolution);
    remove_scratch(plan);
    publish_report(ctx, &report, report_file)?;
    match message {
        None => Ok(report),
        Some(message) => {
            Err(anyhow::Error::new(BuildFailed { report, message, cache_write_only: build_error.is_none() }))
        }
    }
}

/// [`Step::MountBaseLayers`]: each base image's blobs mounted into the run's repository where
/// it lacks them; a warning when that could not be done (the export then uploads them).
fn mount_base_layers(ctx: &Context, plan: &Plan, images: &[String], platform: &str) -> Option<String> {
    let mut mounted = 0;
    let mut problems = Vec::new();
    for image in images {
        let Some((repository, reference)) = crate::inputs::image_reference(image) else { continue };
        let result = ctx.registry.image_blobs(&repository, &reference, platform).and_then(|blobs| {
            blobs.iter().try_fold(0, |count, blob| {
                Ok(count + usize::from(ctx.registry.mount_blob(&plan.repository, blob, &repository)?))
            })
        });
        match result {
            Ok(count) => mounted += count,
            Err(error) => problems.push(format!("{image}: {error:#}")),
        }
    }
    if mounted > 0 {
        ctx.say(&format!("cachefrom: mounted {mounted} base image blobs into {} (no bytes moved)", plan.repository));
    }
    (!problems.is_empty()).then(|| {
        format!(
            "the base images' layers were not mounted into {} (the export uploads them): {}",
            plan.repository,
            problems.join("; ")
        )
    })
}

/// The cache writes of a run so far: their warnings by stage, and the first write that found the
/// disk full (the file writes after it are skipped and counted).
#[derive(Default)]
struct WriteLog {
    warnings: Vec<(String, String)>,
    disk_full: Option<String>,
    skipped_full: usize,
}

impl WriteLog {
    /// Carries out `writes` for `stage`, crediting the reports; the error that stops the run, if any.
    fn perform(
        &mut self,
        ctx: &Context,
        plan: &Plan,
        stage: &str,
        writes: &[CacheWrite],
        annotations: &BTreeMap<String, String>,
        reports: &mut BTreeMap<String, StageReport>,
    ) -> Option<String> {
        if writes.is_empty() {
            return None;
        }
        match perform_writes(ctx, plan, writes, annotations) {
            Ok(outcome) => {
                credit_writes(plan, reports.values_mut(), &outcome.pushed);
                for warning in outcome.warnings {
                    if is_disk_full(&warning) {
                        self.disk_full.get_or_insert(warning);
                    } else {
                        self.warnings.push((stage.to_string(), warning));
                    }
                }
                None
            }
            Err(error) => Some(format!("{error:#}")),
        }
    }
}

/// `writes` kept to the destinations the checks found (see [`Step::RefreshStageTags`]).
fn existing_destinations(writes: &[CacheWrite], resolution: &Resolution) -> Vec<CacheWrite> {
    let found: BTreeSet<String> = resolution
        .stages
        .values()
        .flat_map(|choice| choice.checked.iter())
        .filter(|(_, answer)| *answer == crate::registry::Existence::Exists)
        .map(|(candidate, _)| candidate.location.to_string())
        .collect();
    writes
        .iter()
        .filter_map(|write| match write {
            CacheWrite::CopyTag { from, to } => {
                let to: Vec<String> = to.iter().filter(|tag| found.contains(*tag)).cloned().collect();
                (!to.is_empty()).then(|| CacheWrite::CopyTag { from: from.clone(), to })
            }
            other => other.destinations().iter().all(|to| found.contains(to)).then(|| other.clone()),
        })
        .collect()
}

/// Removes what the run put in its scratch directory (unpacked caches, exports, buildx's metadata
/// file), and the directory itself when that leaves it empty: a full disk gets its space back.
pub(crate) fn remove_scratch(plan: &Plan) {
    let _ = writes::remove_dir(&plan.work_dir.join("from"));
    let _ = writes::remove_dir(&plan.work_dir.join("to"));
    let _ = std::fs::remove_file(plan.metadata_file());
    let _ = std::fs::remove_dir(&plan.work_dir);
}

/// Prints the report's table on stderr, writes its JSON to `report_file`, and appends its markdown
/// to GitHub's step summary when there is one.
pub fn publish_report(ctx: &Context, report: &RunReport, report_file: Option<&Path>) -> Result<()> {
    ctx.out().line("");
    for line in report.table().lines() {
        ctx.out().line(line);
    }
    if let Some(file) = report_file {
        if let Some(parent) = file.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(file, crate::secrets::scrub(&report.to_json()).as_bytes())
            .with_context(|| format!("writing the report to {}", file.display()))?;
    }
    if let Some(summary) = step_summary_path(&ctx.env) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&summary)
            .with_context(|| format!("opening the step summary {}", summary.display()))?;
        file.write_all(crate::secrets::scrub(&report.markdown()).as_bytes())
            .with_context(|| format!("writing the step summary {}", summary.display()))?;
    }
    // GitHub Actions: the counts and the report's path as the step's outputs.
    if let Some(outputs) = ctx.env.get("GITHUB_OUTPUT").filter(|path| !path.is_empty()) {
        let (cached, total) = report.totals();
        let mut lines = format!("cached={cached}\ntotal={total}\nsuccess={}\n", report.success);
        if let Some(file) = report_file.and_then(|file| file.to_str()).filter(|file| !file.contains('\n')) {
            lines.push_str(&format!("report={file}\n"));
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(outputs)
            .and_then(|mut file| file.write_all(lines.as_bytes()))
            .with_context(|| format!("writing the step's outputs to {outputs}"))?;
    }
    Ok(())
}
