//! Executing a plan: [`pull_cached`], [`build_stage`], [`push_cached`], the [`PushGuard`] that
//! writes caches trap-style, and [`build_with_cache`], which composes them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write as _};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use crate::backend::{Backend, CacheLocation};
use crate::ci::{step_summary_path, CiSystem, Environment};
use crate::docker::{last_lines, run_program, Docker};
use crate::engine::{BackendFallback, Engine};
use crate::error::Error;
use crate::explain::{Miss, StageInputs};
use crate::inputs::{CacheRecord, ContextWalk};
use crate::output::{Output, StandardStreams};
use crate::plan::{
    render_command, Builder, CacheErrors, CacheRef, CacheWrite, Execution, Level, Plan, PlanOptions, StagePlan, Step,
};
use crate::progress::Renderer;
use crate::registry::{Existence, RegistryClient};
use crate::report::{ClassicRecord, ProgressEvent, ProgressRecord, RunReport, StageReport, StageStatus};
use crate::writes::{self, empty_dir, remove_dir};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStyle {
    /// A compact live line per stage (a terminal).
    Terminal,
    /// Plain lines, each stage in a `::group::` section, the report in `$GITHUB_STEP_SUMMARY`.
    GithubActions,
    /// Plain lines, like `docker build --progress=plain` (any other CI, or a pipe).
    Plain,
    /// Nothing but warnings and errors.
    Quiet,
}

impl OutputStyle {
    /// GitHub Actions when it runs us, a live line on a terminal, else plain.
    pub fn detect(env: &Environment) -> OutputStyle {
        if CiSystem::detect(env) == Some(CiSystem::GithubActions) {
            OutputStyle::GithubActions
        } else if std::io::stderr().is_terminal() && CiSystem::detect(env).is_none() {
            OutputStyle::Terminal
        } else {
            OutputStyle::Plain
        }
    }
}

/// What every call needs: how to run docker, how to ask the registry, where output goes.
#[derive(Debug, Clone)]
pub struct Context {
    /// The docker client.
    pub docker: Docker,
    /// The registry client for existence checks.
    pub registry: RegistryClient,
    /// How progress is shown.
    pub style: OutputStyle,
    /// Where everything shown goes (the library prints nothing itself).
    pub output: std::sync::Arc<dyn Output>,
    /// The environment (CI detection, step summary).
    pub env: Environment,
}

impl Context {
    /// A context from the process environment: `docker` on PATH, the user's docker logins.
    pub fn from_environment() -> Context {
        let env = Environment::from_process();
        Context {
            docker: Docker::default(),
            registry: RegistryClient::default(),
            style: OutputStyle::detect(&env),
            output: std::sync::Arc::new(StandardStreams),
            env,
        }
    }

    /// Where the library writes: the caller's [`Output`], with masked secrets hidden.
    pub fn out(&self) -> crate::output::Scrubbed<'_> {
        crate::output::Scrubbed(&*self.output)
    }

    fn say(&self, line: &str) {
        if self.style != OutputStyle::Quiet {
            self.out().line(line);
        }
    }

    fn warn(&self, line: &str) {
        self.out().line(&format!("cachefrom: warning: {line}"));
    }
}

/// One stage's cache source, chosen by [`pull_cached`].
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The chosen candidate, if any exists.
    pub chosen: Option<CacheRef>,
    /// Every candidate with what the check found.
    pub checked: Vec<(CacheRef, Existence)>,
}

/// Which cache each stage reads, after checking what exists.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    /// Per stage.
    pub stages: BTreeMap<String, Choice>,
    /// The level every stage was served from, when one level served them all.
    pub level: Option<Level>,
    /// Cache problems found while checking, one line each.
    pub warnings: Vec<String>,
    /// Seconds the checks took.
    pub seconds: f64,
    /// The manifest digest of each location found, where the registry said: locations with the
    /// same digest hold the same cache, and are passed to BuildKit once.
    pub digests: BTreeMap<String, String>,
    /// The hash of this run's inputs, where one can be had.
    pub(crate) inputs: Option<String>,
    /// The record on the cache this run would export to, if it carries one.
    pub(crate) record: Option<CacheRecord>,
    /// The digest of each image the Dockerfile reads, where the registry said.
    pub(crate) image_digests: BTreeMap<String, String>,
    /// The build context, read once for the inputs' hash and the stages' records (or why not).
    pub(crate) context: Option<std::sync::Arc<std::result::Result<ContextWalk, String>>>,
}

impl Resolution {
    /// The `--cache-from` sources of `stage`: its own chosen cache, then those of the stages it
    /// reads from. Where nothing could be checked (s3, gha), every candidate in chain order.
    pub fn sources(&self, plan: &Plan, stage: &StagePlan) -> Vec<(String, CacheRef)> {
        if !plan.backend.can_check_existence() {
            return plan.all_candidate_sources(stage);
        }
        let mut seen_digests = BTreeSet::new();
        std::iter::once(&stage.name)
            .chain(plan.source_stages(stage).into_iter().map(|source| &source.name))
            .filter_map(|name| {
                let chosen = self.stages.get(name)?.chosen.clone()?;
                match self.digests.get(&chosen.location.to_string()) {
                    Some(digest) if !seen_digests.insert(digest.clone()) => None,
                    _ => Some((name.clone(), chosen)),
                }
            })
            .collect()
    }
}

/// Finds the best cache source for each stage: checks which candidates exist (registry manifest
/// `HEAD`s in parallel, no layer download; files and directories for local and tarball), takes
/// every stage from the most specific level that serves them all, else each stage from its own
/// first hit. The classic builder then pulls the chosen images; tarball unpacks the chosen files.
///
/// First it checks that the engine can build the plan (docker answers; buildx and cache export
/// where the backend needs them), at the same time as the caches: an engine that cannot is an
/// error naming what to change. ([`build_with_cache`] can fall back to inline instead.)
pub fn pull_cached(ctx: &Context, plan: &Plan) -> Result<Resolution> {
    let builder_name = builder_from_docker_args(&plan.docker_args);
    let (engine, resolution) = std::thread::scope(|scope| {
        let probe = scope.spawn(|| Engine::probe(&ctx.docker, builder_name.as_deref()));
        let resolution = check_caches(ctx, plan);
        (probe.join().unwrap_or_else(|_| Err(anyhow::anyhow!("probing the engine panicked"))), resolution)
    });
    let engine = engine?;
    engine.check_backend(&plan.backend, BackendFallback::Refuse)?;
    if engine.builder() != plan.builder {
        bail!(
            "the plan is for {:?} but the engine builds with {:?}: plan with PlanOptions::builder = {:?}",
            plan.builder,
            engine.builder(),
            engine.builder()
        );
    }
    resolution
}

/// [`pull_cached`] without the engine check.
pub(crate) fn check_caches(ctx: &Context, plan: &Plan) -> Result<Resolution> {
    let started = Instant::now();
    let mut warnings = Vec::new();
    let mut stages: BTreeMap<String, Choice> =
        plan.stages.iter().map(|stage| (stage.name.clone(), Choice { chosen: None, checked: Vec::new() })).collect();
    if !plan.backend.can_check_existence() {
        return Ok(Resolution {
            stages,
            level: None,
            warnings,
            seconds: 0.0,
            digests: BTreeMap::new(),
            inputs: None,
            record: None,
            image_digests: BTreeMap::new(),
            context: None,
        });
    }

    let candidates: Vec<(String, CacheRef)> = plan
        .stages
        .iter()
        .flat_map(|stage| stage.cache_from.iter().map(move |candidate| (stage.name.clone(), candidate.clone())))
        .collect();
    let image_checks: Vec<(crate::refs::Repository, String)> = candidates
        .iter()
        .filter(|(_, candidate)| matches!(candidate.location, CacheLocation::Image(_)))
        .map(|(_, candidate)| (plan.repository.clone(), candidate.tag.clone()))
        .collect();
    let mut digests = BTreeMap::new();
    // The base images' digests (for the hash of the inputs and the stages' records), asked
    // once, beside the checks.
    // The build context, walked once (beside the checks) for the inputs' hash and the records.
    let (checked, (image_digests, all_known), context) = std::thread::scope(|scope| {
        let looked_up = scope.spawn(|| {
            if plan.backend.keeps_records() {
                image_digests(ctx, plan)
            } else {
                (BTreeMap::new(), false)
            }
        });
        let walked = scope.spawn(|| plan.backend.keeps_records().then(|| std::sync::Arc::new(walk_context(plan))));
        let checked = ctx.registry.check_all_with_digests(&image_checks);
        let context = walked.join().unwrap_or_else(|_| Some(std::sync::Arc::new(Err("reading it panicked".to_string()))));
        (checked, looked_up.join().unwrap_or_default(), context)
    });
    if let Some(Err(why)) = context.as_deref() {
        warnings.push(format!(
            "the build context is not hashed ({why}): the build runs as usual, without the check for an unchanged build or the record of why a stage missed"
        ));
    }
    let inputs = match context.as_deref() {
        Some(Ok(walk)) => input_fingerprint(plan, &image_digests, all_known, walk),
        _ => None,
    };
    let mut image_answers = checked.into_iter();
    let answers: Vec<Existence> = candidates
        .iter()
        .map(|(_, candidate)| match &candidate.location {
            CacheLocation::Image(image) => {
                let (answer, digest) = image_answers.next().expect("one answer a check");
                if let Some(digest) = digest {
                    digests.insert(image.clone(), digest);
                }
                answer
            }
            CacheLocation::Directory(dir) => exists_if(dir.join("index.json").is_file()),
            CacheLocation::TarFile(file) => exists_if(file.is_file()),
            CacheLocation::Named(_) => Existence::Unknown("cannot be checked".to_string()),
        })
        .collect();

    let mut unknown_reasons: Vec<String> = answers
        .iter()
        .filter_map(|answer| match answer {
            Existence::Unknown(why) => Some(why.clone()),
            _ => None,
        })
        .collect();
    unknown_reasons.sort();
    unknown_reasons.dedup();
    for why in unknown_reasons {
        let line = format!("cannot check caches in {}: {why}; building without them", plan.repository);
        if plan.cache_errors == CacheErrors::Fail {
            bail!("{line} (cache errors are fatal: --strict-cache)");
        }
        warnings.push(line);
    }

    for ((stage, candidate), answer) in candidates.into_iter().zip(answers) {
        stages.get_mut(&stage).expect("every stage has a choice").checked.push((candidate, answer));
    }
    let covering = match plan.execution {
        Execution::OneBuild => plan.stages.iter().find(|stage| stage.is_target).map(|stage| stage.name.as_str()),
        Execution::StageByStage => None,
    };
    let level = choose_sources(&plan.chain, &mut stages, covering);
    let record = if inputs.is_some() { read_record(ctx, plan, &stages) } else { None };

    for stage in &plan.stages {
        let Some(chosen) = stages[&stage.name].chosen.clone() else { continue };
        match (&plan.backend, &chosen.location) {
            (_, CacheLocation::Image(image)) if plan.builder == Builder::Classic => {
                let args = vec!["pull".to_string(), "--quiet".to_string(), image.clone()];
                let purpose = format!("pulling cache image {image}");
                if let Err(error) = ctx.docker.run_checked(&purpose, &args, ctx.docker.timeouts.transfer) {
                    fail_or_warn(plan, &mut warnings, format!("{error:#}"))?;
                    stages.get_mut(&stage.name).expect("stage").chosen = None;
                }
            }
            (Backend::Tarball { .. }, CacheLocation::TarFile(file)) => {
                if let Err(error) = unpack(plan, &stage.name, file, ctx.docker.timeouts.transfer) {
                    fail_or_warn(plan, &mut warnings, format!("{error:#}"))?;
                    stages.get_mut(&stage.name).expect("stage").chosen = None;
                }
            }
            _ => {}
        }
    }
    Ok(Resolution {
        stages,
        level,
        warnings,
        seconds: started.elapsed().as_secs_f64(),
        digests,
        inputs,
        record,
        image_digests,
        context,
    })
}

/// The hash of the run's inputs, for a one-build registry run that writes its cache: every
/// image the Dockerfile reads must answer with a digest, else there is none.
/// The build context as the plan's `.dockerignore` lets it through, read once; or why not.
pub(crate) fn walk_context(plan: &Plan) -> std::result::Result<ContextWalk, String> {
    let ignore = crate::inputs::IgnoreRules::for_build(&plan.context, &plan.dockerfile).map_err(|e| format!("{e:#}"))?;
    ContextWalk::read(&plan.context, &ignore).map_err(|error| format!("{error:#}"))
}

fn input_fingerprint(
    plan: &Plan,
    digests: &BTreeMap<String, String>,
    all_known: bool,
    walk: &ContextWalk,
) -> Option<String> {
    if plan.execution != Execution::OneBuild || !matches!(plan.backend, Backend::Registry { .. }) || !all_known {
        return None;
    }
    let target = plan.stages.iter().find(|stage| stage.is_target)?;
    plan.primary_write(target)?;
    let image_digests: Vec<(String, String)> = digests.clone().into_iter().collect();
    let inputs = crate::inputs::Inputs {
        dockerfile: &plan.dockerfile,
        target: &plan.target,
        build_args: plan.build_args.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect(),
        docker_args: &plan.docker_args,
        image_digests,
    };
    crate::inputs::fingerprint(&inputs, walk).ok()
}

/// The digest of each image the Dockerfile reads, where the registry says; and whether it said
/// for every one.
fn image_digests(ctx: &Context, plan: &Plan) -> (BTreeMap<String, String>, bool) {
    let mut digests = BTreeMap::new();
    let mut lookups = Vec::new();
    let mut all_known = true;
    for image in &plan.external_images {
        match crate::inputs::image_reference(image) {
            Some((_, reference)) if crate::inputs::is_digest(&reference) => {
                digests.insert(image.clone(), reference);
            }
            Some(lookup) => lookups.push((image.clone(), lookup)),
            None => all_known = false,
        }
    }
    let refs: Vec<_> = lookups.iter().map(|(_, lookup)| lookup.clone()).collect();
    for ((image, _), (answer, digest)) in lookups.iter().zip(ctx.registry.check_all_with_digests(&refs)) {
        match (answer, digest) {
            (Existence::Exists, Some(digest)) => {
                digests.insert(image.clone(), digest);
            }
            _ => all_known = false,
        }
    }
    (digests, all_known)
}

/// Each stage's inputs now and the records on the caches the stages read (by location), read
/// before the build overwrites them.
struct MissEvidence {
    now: BTreeMap<String, StageInputs>,
    records: BTreeMap<String, Option<BTreeMap<String, StageInputs>>>,
}

fn gather_evidence(ctx: &Context, plan: &Plan, resolution: &Resolution) -> Result<MissEvidence> {
    let walked;
    let walk = match resolution.context.as_deref() {
        Some(walk) => walk,
        None => {
            walked = walk_context(plan);
            &walked
        }
    };
    let walk = walk.as_ref().map_err(|why| {
        // A refused `.dockerignore` pattern keeps its type (the CLI answers it with exit 2).
        match crate::inputs::IgnoreRules::for_build(&plan.context, &plan.dockerfile) {
            Err(error) => error,
            Ok(_) => anyhow::anyhow!("the build context was not read: {why}"),
        }
    })?;
    let now = crate::explain::current_inputs(plan, &resolution.image_digests, walk)?;
    let mut records = BTreeMap::new();
    for stage in &plan.stages {
        let Some(chosen) = resolution.stages.get(&stage.name).and_then(|choice| choice.chosen.as_ref()) else {
            continue;
        };
        let key = chosen.location.to_string();
        if records.contains_key(&key) {
            continue;
        }
        let text = match (&plan.backend, &chosen.location) {
            (Backend::Registry { .. }, CacheLocation::Image(_)) => ctx
                .registry
                .manifest(&plan.repository, &chosen.tag)
                .ok()
                .and_then(|manifest| manifest.annotations().get(crate::explain::ANNOTATION).cloned()),
            (Backend::Local { .. }, CacheLocation::Directory(dir)) => {
                crate::files::read_text(&dir.join(crate::explain::FILE), crate::files::MAX_RECORD_BYTES).ok()
            }
            (Backend::Tarball { .. }, _) => crate::files::read_text(
                &plan.unpacked_dir(&stage.name).join(crate::explain::FILE),
                crate::files::MAX_RECORD_BYTES,
            )
            .ok(),
            _ => None,
        };
        records.insert(key, text.as_deref().and_then(crate::explain::from_json));
    }
    Ok(MissEvidence { now, records })
}

/// The evidence gathered in the background, once it is there.
fn joined(
    ctx: &Context,
    gathering: &mut Option<std::thread::JoinHandle<Result<MissEvidence>>>,
    evidence: &mut Option<MissEvidence>,
) {
    if let Some(handle) = gathering.take() {
        match handle.join() {
            Ok(Ok(gathered)) => *evidence = Some(gathered),
            Ok(Err(error)) => ctx.say(&format!("cachefrom: no record of the inputs: {error:#}")),
            Err(_) => ctx.warn("reading the inputs panicked"),
        }
    }
}

/// Writes the records of the stages a build of `stage` covered beside the cache it exported:
/// an annotation of the cache manifest (registry, set by the writes that follow), a file in the
/// exported directory (local, tarball: copied and packed with it).
fn write_stage_records(
    plan: &Plan,
    stage: &str,
    now: &BTreeMap<String, StageInputs>,
    annotations: &mut BTreeMap<String, String>,
) {
    let Some(built) = plan.stage(stage) else { return };
    let covered: BTreeSet<String> = match plan.execution {
        Execution::OneBuild => {
            plan.ancestors(built).into_iter().chain(std::iter::once(built)).map(|s| s.name.clone()).collect()
        }
        Execution::StageByStage => std::iter::once(built.name.clone()).collect(),
    };
    let records: BTreeMap<String, StageInputs> = now
        .iter()
        .filter(|(name, _)| covered.contains(*name))
        .map(|(name, inputs)| (name.clone(), inputs.clone()))
        .collect();
    let json = crate::explain::to_json(&records);
    match plan.backend {
        Backend::Registry { .. } => {
            annotations.insert(crate::explain::ANNOTATION.to_string(), json);
        }
        Backend::Local { .. } | Backend::Tarball { .. } => {
            let staging = plan.staging_dir(stage);
            if staging.join("index.json").is_file() {
                let _ = std::fs::write(staging.join(crate::explain::FILE), json);
            }
        }
        _ => {}
    }
}

/// Why `stage` misses, against the record on the cache it reads; `None` when its inputs match.
/// `changed` says whether another stage misses (a stage reading it misses too).
fn miss_of(
    plan: &Plan,
    stage: &StagePlan,
    resolution: &Resolution,
    evidence: &MissEvidence,
    changed: &dyn Fn(&str) -> bool,
) -> Option<Miss> {
    let choice = resolution.stages.get(&stage.name)?;
    let Some(chosen) = &choice.chosen else {
        // A level that could not be asked is no answer: never "none exists".
        let unknown = choice.checked.iter().find_map(|(_, answer)| match answer {
            Existence::Unknown(why) => Some(why.as_str()),
            _ => None,
        });
        if let Some(why) = unknown {
            return Some(Miss::unchecked(why));
        }
        let tried: Vec<String> = choice.checked.iter().map(|(candidate, _)| candidate.tag.clone()).collect();
        return plan.backend.can_check_existence().then(|| Miss::no_cache(&tried));
    };
    let location = chosen.location.to_string();
    let record = evidence.records.get(&location).and_then(Option::as_ref).and_then(|records| records.get(&stage.name));
    match (record, evidence.now.get(&stage.name)) {
        (Some(then), Some(now)) => crate::explain::compare(now, then, changed),
        _ => Some(Miss::no_record(&location)),
    }
}

/// Why each stage in `missed` did (BuildKit's record says it missed).
fn explain_stages(
    plan: &Plan,
    resolution: &Resolution,
    evidence: &MissEvidence,
    missed: &BTreeSet<String>,
) -> BTreeMap<String, Miss> {
    plan.stages
        .iter()
        .filter(|stage| missed.contains(&stage.name))
        .filter_map(|stage| {
            let miss = match miss_of(plan, stage, resolution, evidence, &|other| missed.contains(other)) {
                Some(miss) => miss,
                None => {
                    let chosen = resolution.stages.get(&stage.name)?.chosen.as_ref()?;
                    Miss::matched(&chosen.location.to_string())
                }
            };
            Some((stage.name.clone(), miss))
        })
        .collect()
}

/// What `cachefrom explain` says of one stage.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Explanation {
    /// The stage.
    pub stage: String,
    /// The cache it would read, if any.
    pub reads: Option<String>,
    /// True when every input matches the record of that cache.
    pub would_hit: bool,
    /// Why it would miss.
    pub miss: Option<Miss>,
}

/// Without building: for each stage of `plan`, the cache it would read and whether its inputs
/// match that cache's record, and if not why (the first instruction that differs).
pub fn explain(ctx: &Context, plan: &Plan) -> Result<Vec<Explanation>> {
    let resolution = check_caches(ctx, plan)?;
    let evidence = gather_evidence(ctx, plan, &resolution)?;
    let mut missed: BTreeMap<String, Miss> = BTreeMap::new();
    // In build order: a stage reading one that misses misses too.
    for stage in &plan.stages {
        if let Some(miss) = miss_of(plan, stage, &resolution, &evidence, &|other| missed.contains_key(other)) {
            missed.insert(stage.name.clone(), miss);
        }
    }
    Ok(plan
        .stages
        .iter()
        .map(|stage| Explanation {
            stage: stage.name.clone(),
            reads: resolution.stages.get(&stage.name).and_then(|c| c.chosen.as_ref()).map(|c| c.location.to_string()),
            would_hit: !missed.contains_key(&stage.name),
            miss: missed.remove(&stage.name),
        })
        .collect())
}

/// The record on the target's cache at the tag this run exports to, when that cache exists.
fn read_record(ctx: &Context, plan: &Plan, stages: &BTreeMap<String, Choice>) -> Option<CacheRecord> {
    let target = plan.stages.iter().find(|stage| stage.is_target)?;
    let primary = plan.primary_write(target)?;
    let found = stages
        .get(&target.name)?
        .checked
        .iter()
        .any(|(candidate, answer)| candidate.location == primary.location && *answer == Existence::Exists);
    if !found {
        return None;
    }
    let manifest = ctx.registry.manifest(&plan.repository, &primary.tag).ok()?;
    CacheRecord::from_annotations(&manifest.annotations())
}

/// Sets each stage's `chosen` cache from what was found.
///
/// With `covering` (the target of a one-build run, whose cache holds every stage's layers): the
/// most specific level where the target has a cache serves every stage; a stage that has a cache
/// of its own at that level or a more specific one (written after a failed run) reads that too.
/// Without: every stage from the most specific level that serves them all (as seed 004 takes
/// builder and runtime from one level), else each stage from its own first hit in chain order.
/// Returns the level that serves them all, if there is one.
pub(crate) fn choose_sources(
    chain: &[Level],
    stages: &mut BTreeMap<String, Choice>,
    covering: Option<&str>,
) -> Option<Level> {
    let exists_at = |choice: &Choice, level: Level| {
        choice
            .checked
            .iter()
            .find(|(candidate, answer)| candidate.level == level && *answer == Existence::Exists)
            .map(|(candidate, _)| candidate.clone())
    };
    if let Some(target) = covering.and_then(|name| stages.get(name)).cloned() {
        let level = chain.iter().copied().find(|level| exists_at(&target, *level).is_some());
        let shared = level.and_then(|level| exists_at(&target, level));
        let reach = level.and_then(|level| chain.iter().position(|l| *l == level)).unwrap_or(chain.len());
        for choice in stages.values_mut() {
            let own = chain.iter().take(reach + 1).find_map(|level| exists_at(choice, *level));
            choice.chosen = own.or_else(|| shared.clone());
        }
        return level;
    }
    let level = chain.iter().copied().find(|level| stages.values().all(|choice| exists_at(choice, *level).is_some()));
    for choice in stages.values_mut() {
        choice.chosen = match level {
            Some(level) => exists_at(choice, level),
            None => chain.iter().find_map(|level| exists_at(choice, *level)),
        };
    }
    level
}

fn exists_if(exists: bool) -> Existence {
    if exists {
        Existence::Exists
    } else {
        Existence::Missing
    }
}

fn fail_or_warn(plan: &Plan, warnings: &mut Vec<String>, line: String) -> Result<()> {
    if plan.cache_errors == CacheErrors::Fail {
        bail!("{line} (cache errors are fatal: --strict-cache)");
    }
    warnings.push(format!("{line}; going on without it"));
    Ok(())
}

fn unpack(plan: &Plan, stage: &str, file: &Path, timeout: std::time::Duration) -> Result<()> {
    let dir = plan.unpacked_dir(stage);
    empty_dir(&dir)?;
    let args = vec!["-xf".to_string(), file.display().to_string(), "-C".to_string(), dir.display().to_string()];
    run_program("tar", &args, &format!("unpacking cache {}", file.display()), timeout)?;
    Ok(())
}

/// A stage build that failed; carries the stage's report. Find it with
/// `error.downcast_ref::<StageFailed>()`.
#[derive(Debug)]
pub struct StageFailed {
    /// What BuildKit reported for the stage.
    pub report: StageReport,
    /// Why it failed.
    pub message: String,
}

impl std::fmt::Display for StageFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StageFailed {}

/// What one `docker build` did to each stage it covered.
#[derive(Debug)]
pub struct BuildOutcome {
    /// One report for each stage the build covered (the stage built and those it reads from), in
    /// plan order.
    pub reports: Vec<StageReport>,
    /// The stages whose every step the build finished (BuildKit's record).
    pub finished: BTreeSet<String>,
    /// Why the build failed, if it did (carries a [`StageFailed`]).
    pub error: Option<anyhow::Error>,
    /// True when BuildKit reported that exporting the cache failed: the writes that copy the
    /// export must not run (they would copy an older cache).
    pub export_failed: bool,
}

impl BuildOutcome {
    /// This outcome of a build tried again after `earlier`: a step that ran in the earlier try
    /// ran (the later try finds it in the local build cache), so the counts stay true.
    fn after(mut self, earlier: BuildOutcome) -> BuildOutcome {
        for report in &mut self.reports {
            let Some(before) = earlier.reports.iter().find(|before| before.name == report.name) else { continue };
            for step in &mut report.steps {
                if before.steps.iter().any(|ran| ran.name == step.name && !ran.cached) {
                    step.cached = false;
                }
            }
            report.steps_cached = report.steps.iter().filter(|step| step.cached).count();
            if report.steps_cached == 0 {
                report.cache_source = None;
                report.cache_level = None;
            }
        }
        self
    }
}

/// Builds `stage` with `--target` (and so every stage it reads from), its cache sources from
/// `resolution`, the backend's cache export, the user's options and the stage's tags. Progress
/// streams to the user as it comes and is kept for the report: one report for every stage the
/// build covered, each true to BuildKit's own per-step record.
pub(crate) fn build_unit(
    ctx: &Context,
    plan: &Plan,
    stage_name: &str,
    resolution: &Resolution,
) -> Result<BuildOutcome> {
    let stage = plan.stage(stage_name).with_context(|| format!("the plan has no stage `{stage_name}`"))?;
    if matches!(plan.backend, Backend::Tarball { .. } | Backend::Local { .. }) {
        remove_dir(&plan.staging_dir(&stage.name))?;
    }
    let sources = resolution.sources(plan, stage);
    if matches!(plan.backend, Backend::Tarball { .. } | Backend::Local { .. }) {
        seed_export_dir(plan, stage, &sources, ctx.docker.timeouts.transfer)?;
    }
    if plan.pushes_in_build(stage) {
        std::fs::create_dir_all(&plan.work_dir)
            .with_context(|| format!("creating the work directory {}", plan.work_dir.display()))?;
        let _ = std::fs::remove_file(plan.metadata_file());
    }
    let progress = if plan.builder == Builder::Buildx { "rawjson" } else { "plain" };
    let args = plan.build_command(stage, &sources, progress);
    let covered: Vec<&StagePlan> = match plan.execution {
        Execution::OneBuild => plan.ancestors(stage).into_iter().chain(std::iter::once(stage)).collect(),
        Execution::StageByStage => vec![stage],
    };
    let title = match plan.execution {
        Execution::OneBuild if covered.len() > 1 => format!(
            "{} with {}",
            stage.name,
            covered.iter().filter(|c| c.name != stage.name).map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
        _ => {
            let position = plan.stages.iter().position(|s| s.name == stage.name).unwrap_or(0) + 1;
            format!("stage {} ({position}/{})", stage.name, plan.stages.len())
        }
    };
    match ctx.style {
        OutputStyle::GithubActions => ctx.out().ci_line(&format!("::group::{title}")),
        OutputStyle::Plain => ctx.say(&format!("==> {title}")),
        _ => {}
    }
    if ctx.style != OutputStyle::Terminal {
        ctx.say(&format!("    {}", render_command(&args)));
    }
    // Folded (unnamed, intermediate) stages are counted with the stage built.
    let folded: Vec<String> = plan.folded_stages.iter().map(|folded| format!("stage-{}", folded.name)).collect();
    let shown: Vec<String> =
        covered.iter().map(|covered| plan.progress_name(covered)).chain(folded.iter().cloned()).collect();
    let started = Instant::now();
    let mut record = ProgressRecord::default();
    let mut classic_record = ClassicRecord::default();
    let out = ctx.out();
    let mut renderer = Renderer::new(ctx.style, &out, &stage.name, shown);
    let mut text_lines: Vec<String> = Vec::new();
    let mut env_docker = ctx.docker.clone();
    if plan.builder == Builder::Classic {
        env_docker.env.push(("DOCKER_BUILDKIT".into(), "0".into()));
    }
    env_docker.env.extend(plan.docker_env());
    // On GitHub Actions, nothing the build prints is read as a workflow command.
    let stop_commands = (ctx.style == OutputStyle::GithubActions).then(crate::output::stop_commands);
    if let Some((stop, _)) = &stop_commands {
        ctx.out().ci_line(stop);
    }
    let exit = env_docker.stream(&format!("building {title}"), &args, ctx.docker.timeouts.build, |line| {
        if plan.builder == Builder::Classic {
            classic_record.feed_line(line);
        }
        for event in record.feed_line(line) {
            if let ProgressEvent::Text(text) = &event {
                text_lines.push(text.clone());
            }
            renderer.show(&event, started.elapsed().as_secs_f64());
        }
    });
    renderer.finish(started.elapsed().as_secs_f64());
    if let Some((_, resume)) = &stop_commands {
        ctx.out().ci_line(resume);
    }
    if ctx.style == OutputStyle::GithubActions {
        ctx.out().ci_line("::endgroup::");
    }
    let seconds = started.elapsed().as_secs_f64();
    let succeeded = matches!(exit, Ok(Some(0)));

    let all_steps = if plan.builder == Builder::Classic { classic_record.steps() } else { record.steps() };
    let mut finished = BTreeSet::new();
    let mut reports = Vec::new();
    for covered_stage in &covered {
        let name = plan.progress_name(covered_stage);
        let mut own: Vec<String> = vec![name.clone()];
        if covered_stage.name == stage.name {
            own.extend(folded.iter().cloned());
        }
        let steps: Vec<_> = all_steps.iter().filter(|step| own.contains(&step.stage)).cloned().collect();
        let steps_cached = steps.iter().filter(|step| step.cached).count();
        let is_finished = succeeded || (plan.builder == Builder::Buildx && record.stage_finished(&name));
        if is_finished {
            finished.insert(covered_stage.name.clone());
        }
        let status = if is_finished {
            StageStatus::Built
        } else if record.stage_failed(&name) || covered_stage.name == stage.name {
            StageStatus::Failed
        } else {
            StageStatus::NotBuilt
        };
        let own_source = resolution
            .stages
            .get(&covered_stage.name)
            .and_then(|choice| choice.chosen.clone())
            .or_else(|| sources.iter().find(|(source, _)| *source == covered_stage.name).map(|(_, s)| s.clone()));
        let stage_seconds = match plan.execution {
            Execution::StageByStage => seconds,
            Execution::OneBuild => record.stage_seconds(&name).unwrap_or(0.0),
        };
        reports.push(StageReport {
            name: covered_stage.name.clone(),
            cache_source: if steps_cached > 0 { own_source.as_ref().map(|s| s.location.to_string()) } else { None },
            cache_level: if steps_cached > 0 { own_source.as_ref().map(|s| s.level) } else { None },
            cache_from: sources.iter().map(|(_, source)| source.location.to_string()).collect(),
            steps_cached,
            steps_total: steps.len(),
            seconds: stage_seconds,
            pushed: Vec::new(),
            status,
            steps,
            warnings: Vec::new(),
            miss_reason: None,
            miss: None,
        });
    }

    let failure = match exit {
        Ok(Some(0)) => None,
        Ok(code) => {
            let failed_step = all_steps
                .iter()
                .find(|step| step.error.as_deref().is_some_and(|e| !e.contains("context canceled")))
                .or_else(|| all_steps.iter().find(|step| step.error.is_some()))
                .map(|step| format!("{}: {}", step.name, step.error.clone().unwrap_or_default()));
            let detail = failed_step.unwrap_or_else(|| last_lines(&text_lines.join("\n"), 4));
            let failed_stage = reports
                .iter()
                .find(|report| report.status == StageStatus::Failed && report.name != stage.name)
                .map(|report| report.name.clone())
                .unwrap_or_else(|| stage.name.clone());
            Some(format!(
                "building stage {failed_stage} failed (docker exit code {}): {detail}",
                code.map(|c| c.to_string()).unwrap_or_else(|| "none: killed".to_string())
            ))
        }
        Err(error) => Some(format!("{error:#}")),
    };
    if let Some(message) = failure {
        let report = reports.iter().find(|report| report.name == stage.name).cloned().expect("the stage is covered");
        return Ok(BuildOutcome {
            reports,
            finished,
            error: Some(anyhow::Error::new(StageFailed { report, message })),
            export_failed: false,
        });
    }

    // A cache source BuildKit could not read (truncated or half-written files): the steps ran
    // without it; a warning, and nothing to do with this build's own export.
    let (import_errors, export_errors): (Vec<String>, Vec<String>) = record
        .other_errors()
        .into_iter()
        .filter(|(name, _)| name.contains("cache"))
        .map(|(name, error)| format!("{name}: {error}"))
        .partition(|problem| problem.starts_with("importing cache"));
    let text_errors: Vec<String> = text_lines
        .iter()
        .filter(|line| line.contains("ERROR") || line.to_lowercase().contains("error:"))
        .map(|line| line.trim().to_string())
        .collect();
    let own = reports.iter_mut().find(|report| report.name == stage.name).expect("the stage is covered");
    for problem in import_errors.iter().chain(export_errors.iter()).chain(text_errors.iter()) {
        own.warnings.push(format!("stage {}: {problem}", stage.name));
    }
    if plan.cache_errors == CacheErrors::Fail && !export_errors.is_empty() {
        bail!(
            "stage {}: cache export failed (cache errors are fatal: --strict-cache): {}",
            stage.name,
            export_errors.join("; ")
        );
    }
    let export_failed = !export_errors.is_empty() || !text_errors.is_empty();
    // What BuildKit itself wrote: the registry export, or every name for s3 and gha.
    if !export_failed {
        let exported: Vec<String> = match &plan.backend {
            Backend::Registry { .. } => plan.primary_write(stage).map(|w| w.location.to_string()).into_iter().collect(),
            Backend::S3 { .. } | Backend::Gha { .. } => plan.written_by(stage),
            Backend::Inline if plan.pushes_in_build(stage) => plan.written_by(stage),
            _ => Vec::new(),
        };
        credit_writes(plan, &mut reports, &exported);
    }
    Ok(BuildOutcome { reports, finished, error: None, export_failed })
}

/// Hard-links the blobs of the local caches a build reads into the directory it exports to. A
/// build whose steps were all hits exports a cache that refers to layers it never fetched; with
/// the blobs already there, the exported cache is whole.
fn seed_export_dir(
    plan: &Plan,
    stage: &StagePlan,
    sources: &[(String, CacheRef)],
    timeout: std::time::Duration,
) -> Result<()> {
    let staging = plan.staging_dir(&stage.name);
    for (source_stage, source) in sources {
        let dir = match (&plan.backend, &source.location) {
            (Backend::Local { .. }, CacheLocation::Directory(dir)) => dir.clone(),
            (Backend::Tarball { .. }, _) => plan.unpacked_dir(source_stage),
            _ => continue,
        };
        let blobs = dir.join("blobs");
        if !blobs.is_dir() {
            continue;
        }
        std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
        writes::link_or_copy(&blobs, &staging, timeout)?;
    }
    Ok(())
}

/// Adds each written location to the report of the stage that owns it.
/// The cache of a one-build target holds every stage's layers: its locations are every stage's.
fn credit_writes<'a>(plan: &Plan, reports: impl IntoIterator<Item = &'a mut StageReport>, written: &[String]) {
    let owner_of = |location: &String| {
        plan.stages.iter().find(|stage| stage.cache_to.iter().any(|write| write.location.to_string() == *location))
    };
    let holds = |location: &String, stage: &str| match owner_of(location) {
        Some(owner) if owner.is_target && plan.execution == Execution::OneBuild => true,
        Some(owner) => owner.name == stage,
        None => false,
    };
    for report in reports {
        for location in written.iter().filter(|location| holds(location, &report.name)) {
            if !report.pushed.contains(location) {
                report.pushed.push(location.clone());
            }
        }
    }
}

/// Builds one stage of `plan` with `--target` (and so every stage it reads from), its cache
/// sources from `resolution`, and returns its report, true to BuildKit's per-step record. A failed build is an
/// error carrying a [`StageFailed`]. [`PushGuard::build`] does the same and marks the stage built.
pub fn build_stage(ctx: &Context, plan: &Plan, stage: &StagePlan, resolution: &Resolution) -> Result<StageReport> {
    let outcome = build_unit(ctx, plan, &stage.name, resolution)?;
    if let Some(error) = outcome.error {
        return Err(error);
    }
    outcome
        .reports
        .into_iter()
        .find(|report| report.name == stage.name)
        .with_context(|| format!("the build of {} reported nothing for it", stage.name))
}

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

fn perform_writes(
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
        let stages: Vec<StageReport> = self
            .plan
            .stages
            .iter()
            .map(|stage| reports.remove(&stage.name).unwrap_or_else(|| not_built(&stage.name)))
            .collect();
        let all_built = stages.iter().all(|stage| stage.status == StageStatus::Built);
        Ok(RunReport {
            stages,
            seconds: self.started.elapsed().as_secs_f64(),
            backend: self.plan.backend.name().to_string(),
            backend_fallback: None,
            level: self.resolution.level,
            check_seconds: self.resolution.seconds,
            success: all_built && self.error.is_none(),
            error: self.error.clone(),
            warnings: self.resolution.warnings.clone(),
            unchanged: None,
            cancelled: self.ctx.docker.cancel.requested().map(signal_name),
            engine: None,
        })
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

/// The report of a stage nothing built.
fn not_built(name: &str) -> StageReport {
    StageReport {
        name: name.to_string(),
        cache_source: None,
        cache_level: None,
        cache_from: Vec::new(),
        steps_cached: 0,
        steps_total: 0,
        seconds: 0.0,
        pushed: Vec::new(),
        status: StageStatus::NotBuilt,
        steps: Vec::new(),
        warnings: Vec::new(),
        miss_reason: None,
        miss: None,
    }
}

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
        let builder_name = builder_from_docker_args(&plan.docker_args);
        BuildOptions { plan, fallback: BackendFallback::Refuse, builder_name, report_file: None }
    }
}

fn builder_from_docker_args(args: &[String]) -> Option<String> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--builder" {
            return iter.next().cloned();
        }
        if let Some(name) = arg.strip_prefix("--builder=") {
            return Some(name.to_string());
        }
    }
    None
}

/// A run whose build failed; carries the report. Find it with `error.downcast_ref::<BuildFailed>()`.
#[derive(Debug)]
pub struct BuildFailed {
    /// The run's report, with the failed stage.
    pub report: RunReport,
    /// The build's error, with push failures beside it.
    pub message: String,
    /// True when every stage built and only writing a cache failed (fatal with `--strict-cache`).
    pub cache_write_only: bool,
}

impl std::fmt::Display for BuildFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BuildFailed {}

fn fit_plan(options: &BuildOptions, engine: &Engine, planned: Option<Plan>) -> Result<(Plan, Option<String>)> {
    let (backend, fallback_reason) = engine.check_backend(&options.plan.backend, options.fallback)?;
    let builder = engine.builder();
    // The Dockerfile was read for this machine's platform; a remote engine may have another.
    let build_platform = match (&options.plan.build_platform, &engine.platform) {
        (None, Some(engine_platform)) => crate::dockerfile::Platform::parse(engine_platform)
            .ok()
            .filter(|platform| *platform != crate::dockerfile::Platform::host())
            .map(|platform| platform.to_string()),
        _ => None,
    };
    match planned {
        Some(plan) if plan.backend == backend && plan.builder == builder && build_platform.is_none() => {
            Ok((plan, fallback_reason))
        }
        _ => {
            let mut plan_options = options.plan.clone();
            plan_options.backend = backend;
            plan_options.builder = builder;
            if build_platform.is_some() {
                plan_options.build_platform = build_platform;
            }
            Ok((Plan::new(&plan_options)?, fallback_reason))
        }
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
fn on_builders_context(ctx: &Context, options: &BuildOptions) -> Result<Option<(Context, BuildOptions)>> {
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
    let mut kept = Vec::new();
    let mut args = options.plan.docker_args.iter();
    while let Some(arg) = args.next() {
        if arg == "--builder" {
            args.next();
        } else if !arg.starts_with("--builder=") {
            kept.push(arg.clone());
        }
    }
    moved.plan.docker_args = kept;
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
    if let Some(record) = unchanged_record(plan, &resolution) {
        match reuse_unchanged(ctx, plan, &resolution, record) {
            Ok(reports) => {
                unchanged = plan.stages.iter().find(|s| s.is_target).and_then(|target| plan.primary_write(target));
                stage_reports = reports.into_iter().map(|report| (report.name.clone(), report)).collect();
            }
            Err(error) => ctx.warn(&format!("reusing the unchanged build failed, building: {error:#}")),
        }
    }
    let steps: &[Step] = if unchanged.is_some() { &[] } else { &plan.steps };
    // The record written on the exported cache, once the target's build has succeeded.
    let mut annotations: BTreeMap<String, String> = BTreeMap::new();
    // Each stage's inputs and the records on the caches read, gathered while the build runs (the
    // build overwrites the caches it read): what a miss is explained with, and the records this
    // run writes.
    let mut gathering = (plan.backend.keeps_records() && !steps.is_empty()).then(|| {
        let (ctx, plan, resolution) = (ctx.clone(), plan.clone(), resolution.clone());
        std::thread::spawn(move || gather_evidence(&ctx, &plan, &resolution))
    });
    let mut evidence: Option<MissEvidence> = None;

    // Walk the plan's steps; a failed build stops the walk after recovering what it finished.
    let mut build_error: Option<anyhow::Error> = None;
    let mut write_warnings: Vec<(String, String)> = Vec::new();
    let mut write_error: Option<String> = None;
    let mut not_exported: BTreeSet<String> = BTreeSet::new();
    let mut refresh: Vec<CacheWrite> = Vec::new();
    // The first write that found the disk full, and how many writes were skipped after it.
    let mut disk_full: Option<String> = None;
    let mut skipped_full = 0;
    for step in steps {
        match step {
            Step::Build { .. } if ctx.docker.cancel.requested().is_some() => {
                build_error = Some(anyhow::anyhow!("cancelled before the next build started"));
                break;
            }
            Step::Build { stage } => {
                let mut outcome = build_unit(ctx, plan, stage, &resolution)?;
                // A cache whose manifest is there but whose content is not (a registry's garbage
                // collection, a half-finished push) must not fail every run: build again
                // without it; this run's export replaces it.
                // (The build fails where the image needs the content; only the export fails,
                // as a warning, where nothing but the cache needs it.)
                let failure_text = match (&outcome.error, outcome.export_failed) {
                    (Some(error), _) => format!("{error:#}"),
                    (None, true) => outcome.reports.iter().flat_map(|report| report.warnings.iter()).cloned().collect(),
                    (None, false) => String::new(),
                };
                if let Some(digest) = missing_content(&failure_text) {
                    if let Some((fixed, warning)) = without_broken(ctx, plan, &resolution, &digest) {
                        ctx.warn(&warning);
                        resolution = fixed;
                        resolution.warnings.push(warning);
                        outcome = build_unit(ctx, plan, stage, &resolution)?.after(outcome);
                    }
                }
                // An export the registry refused for a moment (writers racing on one tag answer
                // 5xx) is tried again: the build is in BuildKit's cache, so only the export runs.
                // Two identical builds at once on one engine race on the image store
                // (`image "moby-dangling@sha256:…": already exists`): the other one has finished
                // by then, and the same build again is a cache hit.
                let mut attempt = 0;
                while attempt < EXPORT_RETRIES
                    && outcome.error.as_ref().is_some_and(|error| is_image_store_race(&format!("{error:#}")))
                {
                    std::thread::sleep(std::time::Duration::from_millis(500 * 2u64.pow(attempt)));
                    attempt += 1;
                    ctx.say(&format!(
                        "cachefrom: building {stage} again: another build of the same image finished first"
                    ));
                    outcome = build_unit(ctx, plan, stage, &resolution)?.after(outcome);
                }
                let mut attempt = 0;
                while outcome.error.is_none() && outcome.export_failed && attempt < EXPORT_RETRIES {
                    std::thread::sleep(std::time::Duration::from_millis(500 * 2u64.pow(attempt)));
                    attempt += 1;
                    ctx.say(&format!("cachefrom: exporting the cache of {stage} again (try {})", attempt + 1));
                    outcome = build_unit(ctx, plan, stage, &resolution)?.after(outcome);
                }
                if outcome.export_failed {
                    not_exported.insert(stage.clone());
                }
                for report in outcome.reports {
                    stage_reports.insert(report.name.clone(), report);
                }
                if let Some(error) = outcome.error {
                    build_error = Some(error);
                    // Writing what finished is not cancelled: it is what a cancel waits for.
                    let uncancelled =
                        Context { docker: Docker { cancel: Default::default(), ..ctx.docker.clone() }, ..ctx.clone() };
                    if let Err(error) = recover(&uncancelled, plan, &resolution, &outcome.finished, &mut stage_reports)
                    {
                        write_error = Some(format!("{error:#}"));
                    }
                    break;
                }
                annotations = record_of(plan, stage, &resolution, &stage_reports)
                    .map(|record| record.to_annotations())
                    .unwrap_or_default();
                joined(ctx, &mut gathering, &mut evidence);
                if let Some(gathered) = evidence.as_ref().filter(|_| !outcome.export_failed) {
                    write_stage_records(plan, stage, &gathered.now, &mut annotations);
                }
                if !outcome.export_failed {
                    refresh = stale_stage_writes(plan, stage, &resolution);
                    if let Some((digest, primary)) =
                        complete_cache_of_all_hit_build(plan, stage, &resolution, &stage_reports)
                    {
                        if let Err(error) = restore_cache(ctx, plan, &digest, &primary, &annotations) {
                            resolution.warnings.push(format!("{error:#}"));
                        }
                    }
                }
            }
            // The export failed (its warning is in the report): copying it would copy an older cache.
            Step::Write { stage, .. } if not_exported.contains(stage) => {}
            // The cache directory is full: the other file writes would fail the same way.
            Step::Write { write: CacheWrite::CopyDir { .. } | CacheWrite::Pack { .. }, .. } if disk_full.is_some() => {
                skipped_full += 1;
            }
            Step::Write { stage, write } => {
                match perform_writes(ctx, plan, std::slice::from_ref(write), &annotations) {
                    Ok(outcome) => {
                        credit_writes(plan, stage_reports.values_mut(), &outcome.pushed);
                        for warning in outcome.warnings {
                            if is_disk_full(&warning) {
                                disk_full.get_or_insert(warning);
                            } else {
                                write_warnings.push((stage.clone(), warning));
                            }
                        }
                    }
                    Err(error) => {
                        write_error = Some(format!("{error:#}"));
                        break;
                    }
                }
            }
            Step::PushImage { image } => {
                let args = vec!["push".to_string(), "--quiet".to_string(), image.clone()];
                if let Err(error) =
                    ctx.docker.run_checked(&format!("pushing the image {image}"), &args, ctx.docker.timeouts.transfer)
                {
                    build_error = Some(error);
                    break;
                }
            }
        }
    }
    if build_error.is_none() && write_error.is_none() && disk_full.is_none() && !refresh.is_empty() {
        match perform_writes(ctx, plan, &refresh, &annotations) {
            Ok(outcome) => {
                credit_writes(plan, stage_reports.values_mut(), &outcome.pushed);
                write_warnings.extend(outcome.warnings.into_iter().map(|w| (plan.target.clone(), w)));
            }
            Err(error) => write_error = Some(format!("{error:#}")),
        }
    }
    for (stage, warning) in write_warnings {
        if let Some(report) = stage_reports.get_mut(&stage) {
            report.warnings.push(format!("cache write failed: {warning}"));
        }
    }
    let stage_reports: Vec<StageReport> = plan
        .stages
        .iter()
        .map(|stage| stage_reports.remove(&stage.name).unwrap_or_else(|| not_built(&stage.name)))
        .collect();
    // Why each stage that missed did.
    joined(ctx, &mut gathering, &mut evidence);
    let mut stage_reports = stage_reports;
    let missed: BTreeSet<String> = stage_reports
        .iter()
        .filter(|report| report.steps_total > 0 && report.steps_cached < report.steps_total)
        .map(|report| report.name.clone())
        .collect();
    let empty = MissEvidence { now: BTreeMap::new(), records: BTreeMap::new() };
    for (stage, miss) in explain_stages(plan, &resolution, evidence.as_ref().unwrap_or(&empty), &missed) {
        if let Some(report) = stage_reports.iter_mut().find(|report| report.name == stage) {
            report.miss_reason = Some(crate::secrets::scrub(&miss.line).into_owned());
            report.miss = Some(miss);
        }
    }
    let mut run_warnings = resolution.warnings.clone();
    if let Some(first) = disk_full {
        // One warning for the cause, not one per tag; nothing partial was left (see `writes`).
        run_warnings.push(format!(
            "the cache directory is full: {first}; {} more cache writes skipped, nothing partial left behind; the build itself went on (free space, or point the backend's dir= elsewhere)",
            skipped_full
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
    let report = RunReport {
        engine,
        cancelled,
        stages: stage_reports,
        seconds: started.elapsed().as_secs_f64(),
        backend: plan.backend.name().to_string(),
        backend_fallback,
        level: resolution.level,
        check_seconds: resolution.seconds,
        success: message.is_none(),
        error: message.clone(),
        warnings: run_warnings,
        unchanged: unchanged.map(|primary| {
            format!(
                "the inputs are those recorded on {}: nothing to build, its cache and image reused",
                primary.location
            )
        }),
    };
    remove_scratch(plan);
    publish_report(ctx, &report, report_file)?;
    match message {
        None => Ok(report),
        Some(message) => {
            Err(anyhow::Error::new(BuildFailed { report, message, cache_write_only: build_error.is_none() }))
        }
    }
}

/// True for a write that failed because its disk is full.
fn is_disk_full(error: &str) -> bool {
    // GNU tar says "Wrote only N of M bytes" on a short write, which is what a full disk gives it.
    ["No space left on device", "os error 28", "Disk quota exceeded", "Wrote only"]
        .iter()
        .any(|sign| error.contains(sign))
}

/// The digest of cache content BuildKit could not fetch, from a build's error: a cache whose
/// manifest names a blob the registry no longer has.
fn missing_content(error: &str) -> Option<String> {
    let broken = ["could not fetch content descriptor", "blob unknown", "content digest", "failed to fetch"]
        .iter()
        .any(|marker| error.contains(marker))
        && (error.contains("not found") || error.contains("unknown"));
    if !broken {
        return None;
    }
    let start = error.find("sha256:")?;
    let hex: String = error[start + 7..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (hex.len() == 64).then(|| format!("sha256:{hex}"))
}

/// `resolution` without the caches that hold `digest` (every chosen one when none can be
/// named), each stage falling back to the next cache of its chain that exists; and the warning
/// that says so. `None` when no stage had a cache to drop.
fn without_broken(ctx: &Context, plan: &Plan, resolution: &Resolution, digest: &str) -> Option<(Resolution, String)> {
    let chosen: BTreeSet<String> = resolution
        .stages
        .values()
        .filter_map(|choice| choice.chosen.as_ref().map(|chosen| chosen.location.to_string()))
        .collect();
    if chosen.is_empty() {
        return None;
    }
    let holds = |location: &str| -> bool {
        let Ok(tag) = writes::tag_of(&plan.repository, location) else { return false };
        ctx.registry
            .manifest(&plan.repository, &tag)
            .is_ok_and(|manifest| String::from_utf8_lossy(&manifest.body).contains(digest))
    };
    // Every cache that names the digest is broken, copies of the same manifest included.
    let existing: BTreeSet<String> = resolution
        .stages
        .values()
        .flat_map(|choice| choice.checked.iter())
        .filter(|(_, existence)| *existence == Existence::Exists)
        .map(|(candidate, _)| candidate.location.to_string())
        .collect();
    let named: BTreeSet<String> = existing.iter().filter(|location| holds(location)).cloned().collect();
    let broken = if named.is_empty() { chosen } else { named };
    let mut fixed = resolution.clone();
    for choice in fixed.stages.values_mut() {
        choice.chosen = choice
            .checked
            .iter()
            .find(|(candidate, existence)| {
                *existence == Existence::Exists && !broken.contains(&candidate.location.to_string())
            })
            .map(|(candidate, _)| candidate.clone());
    }
    let warning = format!(
        "the cache {} is broken: BuildKit could not fetch {digest} from it (removed from the registry?); built without it, and this run's cache replaces it",
        broken.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    Some((fixed, warning))
}

/// True for the error of a build that lost a race with an identical build on the same engine.
fn is_image_store_race(error: &str) -> bool {
    error.contains("moby-dangling@") && error.contains("already exists")
}

/// Further tries of a cache export that failed while the build succeeded.
const EXPORT_RETRIES: u32 = 2;

/// Removes what the run put in its scratch directory (unpacked caches, exports, buildx's metadata
/// file), and the directory itself when that leaves it empty: a full disk gets its space back.
fn remove_scratch(plan: &Plan) {
    let _ = writes::remove_dir(&plan.work_dir.join("from"));
    let _ = writes::remove_dir(&plan.work_dir.join("to"));
    let _ = std::fs::remove_file(plan.metadata_file());
    let _ = std::fs::remove_dir(&plan.work_dir);
}

/// `SIGINT` for 2, `SIGTERM` for 15, `signal N` otherwise.
pub(crate) fn signal_name(signal: usize) -> String {
    match signal {
        2 => "SIGINT".to_string(),
        15 => "SIGTERM".to_string(),
        1 => "a cancel request".to_string(),
        other => format!("signal {other}"),
    }
}

/// The record on the cache this run exports to, when it says the run has nothing to build: the
/// same inputs, and an output the record can stand for (the cache alone, or images pushed to the
/// cache's repository, whose digest it names).
fn unchanged_record<'a>(plan: &Plan, resolution: &'a Resolution) -> Option<&'a CacheRecord> {
    let record = resolution.record.as_ref()?;
    if resolution.inputs.as_deref() != Some(record.inputs.as_str()) || plan.wants_local_image() {
        return None;
    }
    let tags_in_repository = plan.tags.iter().all(|tag| writes::tag_of(&plan.repository, tag).is_ok());
    match (plan.tags.is_empty(), plan.push_tags) {
        (true, _) => Some(record),
        (false, true) if tags_in_repository && record.image.is_some() => Some(record),
        _ => None,
    }
}

/// Nothing to build: tags the recorded image and writes the recorded cache's further tags, and
/// reports each stage as the record has it.
fn reuse_unchanged(
    ctx: &Context,
    plan: &Plan,
    resolution: &Resolution,
    record: &CacheRecord,
) -> Result<Vec<StageReport>> {
    let target = plan.stages.iter().find(|stage| stage.is_target).context("the plan has a target")?;
    let primary = plan.primary_write(target).context("the run writes a cache")?;
    if let (Some(image), true) = (&record.image, plan.push_tags) {
        let tags = plan.tags.iter().map(|tag| writes::tag_of(&plan.repository, tag)).collect::<Result<Vec<_>>>()?;
        ctx.registry
            .copy_tag(&plan.repository, image, &tags)
            .with_context(|| format!("tagging the image {image} built from the same inputs"))?;
    }
    let written = perform_writes(ctx, plan, &plan.writes_after(target), &BTreeMap::new())?;
    // A copy the registry refuses (400: it no longer has a blob the cache names) means the cache
    // cannot be reused: build instead.
    if !written.warnings.is_empty() {
        bail!("copying its tags failed: {}", written.warnings.join("; "));
    }
    let mut reports: Vec<StageReport> = plan
        .stages
        .iter()
        .map(|stage| {
            let steps = record.steps.get(&stage.name).copied().unwrap_or(0);
            let source = resolution.stages.get(&stage.name).and_then(|choice| choice.chosen.clone());
            StageReport {
                name: stage.name.clone(),
                cache_source: source.as_ref().map(|s| s.location.to_string()),
                cache_level: source.as_ref().map(|s| s.level),
                cache_from: vec![primary.location.to_string()],
                steps_cached: steps,
                steps_total: steps,
                seconds: 0.0,
                pushed: Vec::new(),
                status: StageStatus::Unchanged,
                steps: Vec::new(),
                warnings: written.warnings.clone(),
                miss_reason: None,
                miss: None,
            }
        })
        .collect();
    credit_writes(plan, reports.iter_mut(), &written.pushed);
    Ok(reports)
}

/// After a successful one build of the target: the tags of other stages that a failed run wrote
/// at the levels this run writes (the checks found them), overwritten with the new cache so that
/// they are not read as older caches beside it.
fn stale_stage_writes(plan: &Plan, stage: &str, resolution: &Resolution) -> Vec<CacheWrite> {
    let Some(target) = plan.stage(stage).filter(|stage| stage.is_target && plan.execution == Execution::OneBuild)
    else {
        return Vec::new();
    };
    let stale: Vec<&CacheRef> = plan
        .stages
        .iter()
        .filter(|other| !other.is_target)
        .flat_map(|other| other.cache_to.iter())
        .filter(|write| {
            resolution
                .stages
                .values()
                .flat_map(|choice| choice.checked.iter())
                .any(|(candidate, answer)| candidate.location == write.location && *answer == Existence::Exists)
        })
        .collect();
    if stale.is_empty() {
        return Vec::new();
    }
    plan.writes_to(target, &stale)
}

/// After a registry build of `stage` whose every step was a hit from one cache: that cache's
/// manifest digest and the tag the build exported to. BuildKit's export of such a build can lack
/// results it never had to load (seen here: the layer of a `COPY` whose later steps hit too, so
/// that the next run missed the whole stage); the cache it read holds every result of the same
/// steps, so it is what the export's tag gets.
fn complete_cache_of_all_hit_build(
    plan: &Plan,
    stage: &str,
    resolution: &Resolution,
    reports: &BTreeMap<String, StageReport>,
) -> Option<(String, String)> {
    if !matches!(plan.backend, Backend::Registry { .. }) {
        return None;
    }
    let stage = plan.stage(stage)?;
    let primary = plan.primary_write(stage)?;
    let sources = resolution.sources(plan, stage);
    let [(_, only)] = sources.as_slice() else { return None };
    let digest = resolution.digests.get(&only.location.to_string())?;
    let covered: Vec<&StagePlan> = match plan.execution {
        Execution::OneBuild => plan.ancestors(stage).into_iter().chain(std::iter::once(stage)).collect(),
        Execution::StageByStage => vec![stage],
    };
    let all_hit = covered
        .iter()
        .all(|covered| reports.get(&covered.name).is_some_and(|report| report.steps_cached == report.steps_total))
        && covered.iter().any(|covered| reports.get(&covered.name).is_some_and(|report| report.steps_total > 0));
    all_hit.then(|| (digest.clone(), primary.location.to_string()))
}

/// Puts the cache manifest `digest` (in the plan's repository) at `to`, with `annotations`.
fn restore_cache(
    ctx: &Context,
    plan: &Plan,
    digest: &str,
    to: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<()> {
    let tag = writes::tag_of(&plan.repository, to)?;
    let manifest = ctx.registry.manifest(&plan.repository, digest)?;
    let manifest = if annotations.is_empty() { manifest } else { manifest.with_annotations(annotations)? };
    ctx.registry
        .put_manifest(&plan.repository, &manifest, &[tag])
        .with_context(|| format!("writing the cache that was read ({digest}) to {to}"))
}

/// The record of a successful build of `stage`, when it is the target and the inputs are known.
fn record_of(
    plan: &Plan,
    stage: &str,
    resolution: &Resolution,
    reports: &BTreeMap<String, StageReport>,
) -> Option<CacheRecord> {
    let target = plan.stage(stage).filter(|stage| stage.is_target)?;
    let inputs = resolution.inputs.clone()?;
    let image = if plan.pushes_in_build(target) { pushed_digest(&plan.metadata_file()) } else { None };
    let steps = reports.values().map(|report| (report.name.clone(), report.steps_total)).collect();
    Some(CacheRecord { inputs, image, steps })
}

/// `containerimage.digest` from buildx's `--metadata-file`.
fn pushed_digest(file: &Path) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(&crate::files::read_text(file, crate::files::MAX_RECORD_BYTES).ok()?).ok()?;
    value.get("containerimage.digest")?.as_str().filter(|digest| crate::inputs::is_digest(digest)).map(str::to_string)
}

/// After a failed one-build run: exports and writes the cache of every stage the build finished
/// (the plan's recovery order: later stages first, each covering the stages it reads from).
fn recover(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(found: &[(Level, bool)]) -> Choice {
        let checked = found
            .iter()
            .map(|(level, exists)| {
                let tag = format!("cache-x-{}", level.name());
                let candidate = CacheRef { level: *level, tag: tag.clone(), location: CacheLocation::Image(tag) };
                (candidate, if *exists { Existence::Exists } else { Existence::Missing })
            })
            .collect();
        Choice { chosen: None, checked }
    }

    const CHAIN: [Level; 3] = [Level::Branch, Level::DefaultBranch, Level::Unprefixed];

    #[test]
    fn every_stage_comes_from_the_most_specific_level_that_serves_them_all() {
        let mut stages = BTreeMap::from([
            // deps has a branch cache but builder does not: both take the default branch's.
            (
                "deps".to_string(),
                choice(&[(Level::Branch, true), (Level::DefaultBranch, true), (Level::Unprefixed, true)]),
            ),
            (
                "builder".to_string(),
                choice(&[(Level::Branch, false), (Level::DefaultBranch, true), (Level::Unprefixed, true)]),
            ),
        ]);
        assert_eq!(choose_sources(&CHAIN, &mut stages, None), Some(Level::DefaultBranch));
        for choice in stages.values() {
            assert_eq!(choice.chosen.as_ref().unwrap().level, Level::DefaultBranch);
        }
    }

    #[test]
    fn without_a_shared_level_each_stage_takes_its_first_hit() {
        let mut stages = BTreeMap::from([
            (
                "deps".to_string(),
                choice(&[(Level::Branch, true), (Level::DefaultBranch, false), (Level::Unprefixed, false)]),
            ),
            (
                "builder".to_string(),
                choice(&[(Level::Branch, false), (Level::DefaultBranch, false), (Level::Unprefixed, true)]),
            ),
            (
                "runtime".to_string(),
                choice(&[(Level::Branch, false), (Level::DefaultBranch, false), (Level::Unprefixed, false)]),
            ),
        ]);
        assert_eq!(choose_sources(&CHAIN, &mut stages, None), None);
        assert_eq!(stages["deps"].chosen.as_ref().unwrap().level, Level::Branch);
        assert_eq!(stages["builder"].chosen.as_ref().unwrap().level, Level::Unprefixed);
        assert_eq!(stages["runtime"].chosen, None);
    }

    #[test]
    fn sources_are_the_stage_then_what_it_reads_from() {
        let dockerfile =
            crate::dockerfile::parse_dockerfile_text("FROM a AS deps\nFROM deps AS app\n", &Default::default())
                .unwrap();
        let git =
            crate::git::GitFacts { branch: Some("main".into()), default_branch: "main".into(), ..Default::default() };
        let options = PlanOptions::new(".", crate::refs::Repository::parse("127.0.0.1:5000/a").unwrap(), git);
        let plan = Plan::from_dockerfile(&options, Path::new("Dockerfile"), &dockerfile).unwrap();
        let mut stages = BTreeMap::from([
            ("deps".to_string(), choice(&[(Level::Branch, true)])),
            ("app".to_string(), choice(&[(Level::Branch, true)])),
        ]);
        let level = choose_sources(&[Level::Branch], &mut stages, None);
        let resolution = Resolution {
            stages,
            level,
            warnings: vec![],
            seconds: 0.0,
            digests: BTreeMap::new(),
            inputs: None,
            record: None,
            image_digests: BTreeMap::new(),
            context: None,
        };
        let sources: Vec<String> =
            resolution.sources(&plan, plan.stage("app").unwrap()).into_iter().map(|(name, _)| name).collect();
        assert_eq!(sources, ["app", "deps"]);
    }

    /// A plan of three stages, all in a registry at `address`, registry backend, on main.
    fn three_stage_plan(address: &str) -> Plan {
        let text = "FROM scratch AS a\nFROM a AS b\nFROM b AS c\n";
        let dockerfile = crate::dockerfile::parse_dockerfile_text(text, &Default::default()).unwrap();
        let git = crate::git::GitFacts {
            branch: Some("feature".into()),
            default_branch: "main".into(),
            commit: Some("a".repeat(40)),
            ..Default::default()
        };
        let repository = crate::refs::Repository::parse(&format!("{address}/team/app")).unwrap();
        let mut options = PlanOptions::new(".", repository, git);
        options.backend = Backend::parse("registry", None).unwrap();
        Plan::from_dockerfile(&options, Path::new("Dockerfile"), &dockerfile).unwrap()
    }

    fn quick_context() -> Context {
        let mut ctx = Context::from_environment();
        ctx.output = std::sync::Arc::new(crate::output::Silent);
        ctx
    }

    #[test]
    fn a_registry_that_is_down_gives_one_warning_not_one_per_tag() {
        // Nothing listens on port 1.
        let plan = three_stage_plan("127.0.0.1:1");
        let resolution = check_caches(&quick_context(), &plan).unwrap();
        assert_eq!(resolution.warnings.len(), 1, "{:#?}", resolution.warnings);
        assert!(resolution.stages.values().all(|choice| choice.chosen.is_none()));
    }

    #[test]
    fn a_registry_that_never_answers_is_given_up_within_seconds() {
        // Accepts connections, never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let held = std::thread::spawn(move || {
            let mut kept = Vec::new();
            for stream in listener.incoming().take(64).flatten() {
                kept.push(stream);
            }
        });
        let plan = three_stage_plan(&address);
        let started = std::time::Instant::now();
        let resolution = check_caches(&quick_context(), &plan).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(8), "took {:?}", started.elapsed());
        assert_eq!(resolution.warnings.len(), 1, "{:#?}", resolution.warnings);
        drop(held);
    }
}
