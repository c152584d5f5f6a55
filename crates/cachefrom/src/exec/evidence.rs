//! The evidence for why a stage missed: each stage's inputs now against the record on the
//! cache it read, gathered while the build runs; and [`explain`], which answers without building.

use super::context::Context;
use super::resolve::{check_caches, walk_context, Resolution, Unread};
use crate::backend::{Backend, CacheLocation};
use crate::explain::{Miss, StageInputs};
use crate::inputs::CacheRecord;
use crate::plan::{Plan, StagePlan};
use crate::registry::Existence;
use crate::report::StageReport;
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each stage's inputs now and the records on the caches the stages read (by location), read
/// before the build overwrites them.
pub(crate) struct MissEvidence {
    pub(crate) now: BTreeMap<String, StageInputs>,
    pub(crate) records: BTreeMap<String, Option<BTreeMap<String, StageInputs>>>,
}

pub(crate) fn gather_evidence(ctx: &Context, plan: &Plan, resolution: &Resolution) -> Result<MissEvidence> {
    let walked;
    let walk = match resolution.context.as_deref() {
        Some(walk) => walk,
        None => {
            walked = walk_context(plan);
            &walked
        }
    };
    let walk = walk.as_ref().map_err(Unread::error)?;
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
                &plan.unpacked_dir(&chosen.location).join(crate::explain::FILE),
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
pub(crate) fn joined(
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
pub(crate) fn write_stage_records(
    plan: &Plan,
    stage: &str,
    now: &BTreeMap<String, StageInputs>,
    annotations: &mut BTreeMap<String, String>,
) {
    let Some(built) = plan.stage(stage) else { return };
    let covered: BTreeSet<String> = plan.covered_by(built).into_iter().map(|s| s.name.clone()).collect();
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
pub(crate) fn miss_of(
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
pub(crate) fn explain_stages(
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
    /// What would become of the cache mounts its steps use: restored from where, or why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<String>,
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
    let mounts = super::mounts::explain_mounts(ctx, plan);
    Ok(plan
        .stages
        .iter()
        .map(|stage| Explanation {
            stage: stage.name.clone(),
            reads: resolution.stages.get(&stage.name).and_then(|c| c.chosen.as_ref()).map(|c| c.location.to_string()),
            would_hit: !missed.contains_key(&stage.name),
            miss: missed.remove(&stage.name),
            mounts: mounts.get(&stage.name).cloned().unwrap_or_default(),
        })
        .collect())
}

/// The record of a successful build of `stage`, when it is the target and the inputs are known.
pub(crate) fn record_of(
    plan: &Plan,
    stage: &str,
    resolution: &Resolution,
    reports: &BTreeMap<String, StageReport>,
) -> Option<CacheRecord> {
    let target = plan.stage(stage).filter(|stage| stage.is_target)?;
    let inputs = resolution.inputs.clone()?;
    let image = if plan.pushes_in_build(target) { pushed_digest(&plan.metadata_file()) } else { None };
    let steps = reports.values().map(|report| (report.name.clone(), report.steps_total)).collect();
    Some(CacheRecord { inputs, image, steps, step_seconds: step_seconds(resolution, reports) })
}

/// What each step took when it last ran: this run's seconds for the steps that ran, the record
/// read for the hits (a hit's own seconds are its import).
pub(crate) fn step_seconds(
    resolution: &Resolution,
    reports: &BTreeMap<String, StageReport>,
) -> BTreeMap<String, BTreeMap<String, f64>> {
    let recorded = resolution.source_record.as_ref().map(|record| &record.step_seconds);
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for report in reports.values() {
        for step in &report.steps {
            let seconds = if step.cached {
                recorded.and_then(|r| r.get(&report.name)).and_then(|steps| steps.get(step.instruction())).copied()
            } else {
                step.seconds
            };
            if let Some(seconds) = seconds {
                out.entry(report.name.clone()).or_default().insert(step.instruction().to_string(), seconds);
            }
        }
    }
    out
}

/// `containerimage.digest` from buildx's `--metadata-file`.
pub(crate) fn pushed_digest(file: &Path) -> Option<String> {
    let value: serde_json::Value =
        serde_json::from_str(&crate::files::read_text(file, crate::files::MAX_RECORD_BYTES).ok()?).ok()?;
    value.get("containerimage.digest")?.as_str().filter(|digest| crate::inputs::is_digest(digest)).map(str::to_string)
}
