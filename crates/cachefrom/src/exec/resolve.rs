//! [`pull_cached`]: which cache each stage reads, from what exists (manifest `HEAD`s, files),
//! the base images' digests, and the build context read once for the inputs' hash.

use super::context::Context;
use crate::backend::{Backend, CacheLocation};
use crate::docker::run_program;
use crate::engine::{BackendFallback, Engine};
use crate::inputs::{CacheRecord, ContextWalk};
use crate::plan::{Builder, CacheErrors, CacheRef, Execution, Level, Plan, StagePlan};
use crate::registry::Existence;
use crate::writes::empty_dir;
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

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
    /// The record on the cache the target reads, if it carries one: what the steps it holds
    /// took when they ran.
    pub(crate) source_record: Option<CacheRecord>,
    /// The digest of each image the Dockerfile reads, where the registry said.
    pub(crate) image_digests: BTreeMap<String, String>,
    /// The build context, read once for the inputs' hash and the stages' records (or why not).
    pub(crate) context: Option<std::sync::Arc<std::result::Result<ContextWalk, Unread>>>,
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
            .flat_map(|name| {
                let Some(choice) = self.stages.get(name) else { return Vec::new() };
                let Some(chosen) = choice.chosen.clone() else { return Vec::new() };
                // A build for several platforms reads each platform's cache at the level chosen.
                let siblings = choice.checked.iter().filter(|(candidate, answer)| {
                    *answer == Existence::Exists
                        && candidate.level == chosen.level
                        && candidate.platform.is_some()
                        && candidate.platform != chosen.platform
                });
                std::iter::once(chosen.clone())
                    .chain(siblings.map(|(candidate, _)| candidate.clone()))
                    .map(|source| (name.clone(), source))
                    .collect()
            })
            .filter(|(_, source)| match self.digests.get(&source.location.to_string()) {
                Some(digest) => seen_digests.insert(digest.clone()),
                None => true,
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
    let builder_name = plan.docker.builder.clone();
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
            source_record: None,
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
    let (checked, (image_digests, all_known), context) =
        std::thread::scope(|scope| {
            let looked_up = scope.spawn(|| {
                if plan.backend.keeps_records() {
                    image_digests(ctx, plan)
                } else {
                    (BTreeMap::new(), false)
                }
            });
            let walked = scope.spawn(|| plan.backend.keeps_records().then(|| std::sync::Arc::new(walk_context(plan))));
            let checked = ctx.registry.check_all_with_digests(&image_checks);
            let context = walked.join().unwrap_or_else(|_| {
                Some(std::sync::Arc::new(Err(Unread { why: "reading it panicked".to_string(), refused: false })))
            });
            (checked, looked_up.join().unwrap_or_default(), context)
        });
    if let Some(Err(unread)) = context.as_deref() {
        warnings.push(format!(
            "the build context is not hashed ({}): the build runs as usual, without the check for an unchanged build or the record of why a stage missed",
            unread.why
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
        Execution::OneBuild => Some(plan.target_stage().name.as_str()),
        Execution::StageByStage => None,
    };
    let level = choose_sources(&plan.chain, &mut stages, covering);
    let record = if inputs.is_some() { read_record(ctx, plan, &stages) } else { None };
    let source_record = read_source_record(ctx, plan, &stages, record.as_ref());

    // A file read by several stages is unpacked once.
    let mut unpacked: BTreeMap<std::path::PathBuf, bool> = BTreeMap::new();
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
                let done = match unpacked.get(file) {
                    Some(done) => *done,
                    None => match unpack(plan, &chosen.location, file, ctx.docker.timeouts.transfer) {
                        Ok(()) => *unpacked.entry(file.clone()).or_insert(true),
                        Err(error) => {
                            fail_or_warn(plan, &mut warnings, format!("{error:#}"))?;
                            *unpacked.entry(file.clone()).or_insert(false)
                        }
                    },
                };
                if !done {
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
        source_record,
        image_digests,
        context,
    })
}

/// Why the build context was not read, kept with the run (it is read once): `refused` when a
/// `.dockerignore` pattern was one cachefrom will not read (`explain` answers that with exit 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unread {
    pub(crate) why: String,
    pub(crate) refused: bool,
}

impl Unread {
    /// The error it stands for, a refused pattern keeping its type.
    pub(crate) fn error(&self) -> anyhow::Error {
        match self.refused {
            true => anyhow::Error::new(crate::inputs::RefusedPattern(self.why.clone())),
            false => anyhow::anyhow!("the build context was not read: {}", self.why),
        }
    }
}

/// The build context as the plan's `.dockerignore` lets it through, read once; or why not.
pub(crate) fn walk_context(plan: &Plan) -> std::result::Result<ContextWalk, Unread> {
    let unread = |error: anyhow::Error| Unread {
        why: format!("{error:#}"),
        refused: error.chain().any(|cause| cause.downcast_ref::<crate::inputs::RefusedPattern>().is_some()),
    };
    let ignore = crate::inputs::IgnoreRules::for_build(&plan.context, &plan.dockerfile).map_err(unread)?;
    ContextWalk::read(&plan.context, &ignore).map_err(unread)
}

/// The hash of the run's inputs, for a one-build registry run that writes its cache: every
/// image the Dockerfile reads must answer with a digest, else there is none.
pub(crate) fn input_fingerprint(
    plan: &Plan,
    digests: &BTreeMap<String, String>,
    all_known: bool,
    walk: &ContextWalk,
) -> Option<String> {
    if plan.execution != Execution::OneBuild || !matches!(plan.backend, Backend::Registry { .. }) || !all_known {
        return None;
    }
    let target = plan.target_stage();
    plan.primary_write(target)?;
    let image_digests: Vec<(String, String)> = digests.clone().into_iter().collect();
    let inputs = crate::inputs::Inputs {
        dockerfile: &plan.dockerfile,
        target: &plan.target,
        build_args: plan.build_args.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect(),
        docker_args: &plan.docker_args,
        unhashed: plan.docker.unhashed.as_deref(),
        image_digests,
        platform: plan.platform.as_deref(),
    };
    crate::inputs::fingerprint(&inputs, walk).ok()
}

/// The digest of each image the Dockerfile reads, where the registry says; and whether it said
/// for every one.
pub(crate) fn image_digests(ctx: &Context, plan: &Plan) -> (BTreeMap<String, String>, bool) {
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

/// The record on the target's cache at the tag this run exports to, when that cache exists.
pub(crate) fn read_record(ctx: &Context, plan: &Plan, stages: &BTreeMap<String, Choice>) -> Option<CacheRecord> {
    let target = plan.target_stage();
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

/// The record on the registry cache the target reads (`primary`'s record when it is that one).
fn read_source_record(
    ctx: &Context,
    plan: &Plan,
    stages: &BTreeMap<String, Choice>,
    primary: Option<&CacheRecord>,
) -> Option<CacheRecord> {
    if !matches!(plan.backend, Backend::Registry { .. }) {
        return None;
    }
    let target = plan.target_stage();
    let chosen = stages.get(&target.name)?.chosen.as_ref()?;
    if plan.primary_write(target).is_some_and(|write| write.location == chosen.location) && primary.is_some() {
        return primary.cloned();
    }
    let manifest = ctx.registry.manifest(&plan.repository, &chosen.tag).ok()?;
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

pub(crate) fn exists_if(exists: bool) -> Existence {
    if exists {
        Existence::Exists
    } else {
        Existence::Missing
    }
}

pub(crate) fn fail_or_warn(plan: &Plan, warnings: &mut Vec<String>, line: String) -> Result<()> {
    if plan.cache_errors == CacheErrors::Fail {
        bail!("{line} (cache errors are fatal: --strict-cache)");
    }
    warnings.push(format!("{line}; going on without it"));
    Ok(())
}

pub(crate) fn unpack(plan: &Plan, location: &CacheLocation, file: &Path, timeout: std::time::Duration) -> Result<()> {
    let dir = plan.unpacked_dir(location);
    empty_dir(&dir)?;
    let args = vec!["-xf".to_string(), file.display().to_string(), "-C".to_string(), dir.display().to_string()];
    run_program("tar", &args, &format!("unpacking cache {}", file.display()), timeout)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanOptions;

    fn choice(found: &[(Level, bool)]) -> Choice {
        let checked = found
            .iter()
            .map(|(level, exists)| {
                let tag = format!("cache-x-{}", level.name());
                let candidate =
                    CacheRef { level: *level, tag: tag.clone(), location: CacheLocation::Image(tag), platform: None };
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
            source_record: None,
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
