//! Each repair named on its own: a broken cache source dropped, a lost race built again, a full
//! disk told once, an unchanged build reused, an all-hit cache written back, stale stage tags refreshed.

use super::build::{build_unit, credit_writes, BuildOutcome};
use super::context::Context;
use super::guard::perform_writes;
use super::resolve::Resolution;
use crate::backend::Backend;
use crate::backend::CacheLocation;
use crate::inputs::CacheRecord;
use crate::plan::{CacheRef, CacheWrite, Fallback, Plan};
use crate::registry::Existence;
use crate::report::{StageReport, StageStatus};
use crate::retry::Backoff;
use anyhow::{bail, Context as _, Result};
use std::collections::{BTreeMap, BTreeSet};

/// True for a write that failed because its disk is full.
pub(crate) fn is_disk_full(error: &str) -> bool {
    // GNU tar says "Wrote only N of M bytes" on a short write, which is what a full disk gives it.
    ["No space left on device", "os error 28", "Disk quota exceeded", "Wrote only"]
        .iter()
        .any(|sign| error.contains(sign))
}

/// The digest of cache content BuildKit could not fetch, from a build's error: a cache whose
/// manifest names a blob the registry no longer has.
pub(crate) fn missing_content(error: &str) -> Option<String> {
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
pub(crate) fn without_broken(
    ctx: &Context,
    plan: &Plan,
    resolution: &Resolution,
    digest: &str,
) -> Option<(Resolution, String)> {
    let chosen: BTreeSet<String> = resolution
        .stages
        .values()
        .filter_map(|choice| choice.chosen.as_ref().map(|chosen| chosen.location.to_string()))
        .collect();
    if chosen.is_empty() {
        return None;
    }
    let holds = |location: &str| -> bool {
        let Ok(tag) = plan.repository.tag_of(location) else { return false };
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
pub(crate) fn is_image_store_race(error: &str) -> bool {
    error.contains("moby-dangling@") && error.contains("already exists")
}

/// Further tries of a cache export that failed while the build succeeded (or of a build that
/// lost a race with an identical one): after 0.5 s, then 1 s.
pub(crate) const EXPORT_BACKOFF: Backoff =
    Backoff { retries: 2, first: std::time::Duration::from_millis(500), factor: 2 };

/// The record on the cache this run exports to, when it says the run has nothing to build: the
/// same inputs, and an output the record can stand for (the cache alone, or images pushed to the
/// cache's repository, whose digest it names).
pub(crate) fn unchanged_record<'a>(plan: &Plan, resolution: &'a Resolution) -> Option<&'a CacheRecord> {
    let record = resolution.record.as_ref()?;
    if resolution.inputs.as_deref() != Some(record.inputs.as_str()) || plan.wants_local_image() {
        return None;
    }
    let tags_in_repository = plan.tags.iter().all(|tag| plan.repository.tag_of(tag).is_ok());
    match (plan.tags.is_empty(), plan.push_tags) {
        (true, _) => Some(record),
        (false, true) if tags_in_repository && record.image.is_some() => Some(record),
        _ => None,
    }
}

/// Nothing to build ([`crate::plan::Step::ReuseUnchanged`]): gives the recorded image
/// `image_tags`, carries out `writes`, and reports each stage as the record has it.
pub(crate) fn reuse_unchanged(
    ctx: &Context,
    plan: &Plan,
    resolution: &Resolution,
    record: &CacheRecord,
    image_tags: &[String],
    writes: &[CacheWrite],
) -> Result<Vec<StageReport>> {
    let target = plan.target_stage();
    let primary = plan.primary_write(target).context("the run writes a cache")?;
    if let (Some(image), false) = (&record.image, image_tags.is_empty()) {
        let tags = image_tags.iter().map(|tag| plan.repository.tag_of(tag)).collect::<Result<Vec<_>>>()?;
        ctx.registry
            .copy_tag(&plan.repository, image, &tags)
            .with_context(|| format!("tagging the image {image} built from the same inputs"))?;
    }
    let written = perform_writes(ctx, plan, writes, &BTreeMap::new())?;
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
                cache_source: source.as_ref().map(|s| s.location.to_string()),
                cache_level: source.as_ref().map(|s| s.level),
                cache_from: vec![primary.location.to_string()],
                steps_cached: steps,
                steps_total: steps,
                warnings: written.warnings.clone(),
                ..StageReport::new(&stage.name, StageStatus::Unchanged)
            }
        })
        .collect();
    credit_writes(plan, reports.iter_mut(), &written.pushed);
    Ok(reports)
}

/// One [`crate::plan::Step::Build`] of `stage`, with the step's declared fallbacks and nothing
/// else: without a broken source, again after a lost image-store race, again when the registry
/// refused the export for a moment. `resolution` loses the broken source for the rest of the run.
pub(crate) fn build_with_fallbacks(
    ctx: &Context,
    plan: &Plan,
    stage: &str,
    fallbacks: &[Fallback],
    resolution: &mut Resolution,
    observer: super::build::Observer,
) -> Result<BuildOutcome> {
    let mut outcome = super::build::build_unit_observed(ctx, plan, stage, resolution, observer)?;
    if fallbacks.contains(&Fallback::WithoutBrokenSource) {
        // The build fails where the image needs the content; only the export fails, as a
        // warning, where nothing but the cache needs it.
        let failure_text = match (&outcome.error, outcome.export_failed) {
            (Some(error), _) => format!("{error:#}"),
            (None, true) => outcome.reports.iter().flat_map(|report| report.warnings.iter()).cloned().collect(),
            (None, false) => String::new(),
        };
        if let Some(digest) = missing_content(&failure_text) {
            if let Some((fixed, warning)) = without_broken(ctx, plan, resolution, &digest) {
                ctx.warn(&warning);
                *resolution = fixed;
                resolution.warnings.push(warning);
                outcome = build_unit(ctx, plan, stage, resolution)?.after(outcome);
            }
        }
    }
    for fallback in fallbacks {
        let (tries, worth): (u32, &dyn Fn(&BuildOutcome) -> bool) = match fallback {
            Fallback::WithoutBrokenSource => continue,
            Fallback::AgainAfterImageStoreRace { tries } => (*tries, &|outcome: &BuildOutcome| {
                outcome.error.as_ref().is_some_and(|error| is_image_store_race(&format!("{error:#}")))
            }),
            Fallback::ExportAgain { tries } => (*tries, &|outcome: &BuildOutcome| {
                outcome.error.is_none() && outcome.export_failed && outcome.export_retryable
            }),
        };
        let backoff = Backoff { retries: tries.saturating_sub(1), ..EXPORT_BACKOFF };
        let worth_it = |value: &Result<BuildOutcome>| value.as_ref().is_ok_and(worth);
        outcome = crate::retry::while_worth(Ok(outcome), backoff, worth_it, |previous, n| {
            match fallback {
                Fallback::ExportAgain { .. } => {
                    ctx.say(&format!("cachefrom: exporting the cache of {stage} again (try {})", n + 1))
                }
                _ => ctx
                    .say(&format!("cachefrom: building {stage} again: another build of the same image finished first")),
            }
            Ok(build_unit(ctx, plan, stage, resolution)?.after(previous?))
        })?;
    }
    Ok(outcome)
}

/// After a build of `stage` whose every step was a hit from one cache: that cache (and the stage
/// it belongs to). BuildKit's export of such a build can lack results it never had to load (seen
/// here: the layer of a `COPY` whose later steps hit too, so that the next run missed the whole
/// stage); the cache it read holds every result of the same steps, so it is what the export's
/// places get ([`crate::plan::Step::WriteBack`]).
pub(crate) fn all_hit_source(
    plan: &Plan,
    stage: &str,
    resolution: &Resolution,
    reports: &BTreeMap<String, StageReport>,
) -> Option<(String, CacheRef)> {
    let stage = plan.stage(stage)?;
    let sources = resolution.sources(plan, stage);
    // One cache, though several stages may read it (local and tarball name it once a stage).
    let (source_stage, only) = sources.first()?;
    if sources.iter().any(|(_, other)| other.location != only.location) {
        return None;
    }
    let covered = plan.covered_by(stage);
    let all_hit = covered
        .iter()
        .all(|covered| reports.get(&covered.name).is_some_and(|report| report.steps_cached == report.steps_total))
        && covered.iter().any(|covered| reports.get(&covered.name).is_some_and(|report| report.steps_total > 0));
    all_hit.then(|| (source_stage.clone(), only.clone()))
}

/// [`all_hit_source`] in the registry: the manifest digest of the cache read.
pub(crate) fn complete_cache_of_all_hit_build(
    plan: &Plan,
    stage: &str,
    resolution: &Resolution,
    reports: &BTreeMap<String, StageReport>,
) -> Option<String> {
    if !matches!(plan.backend, Backend::Registry { .. }) {
        return None;
    }
    let (_, only) = all_hit_source(plan, stage, resolution, reports)?;
    resolution.digests.get(&only.location.to_string()).cloned()
}

/// A write of the local and tarball backends after a build that read every step from `source`:
/// the cache read, not the export, goes to the write's place; `None` when
/// that place is the cache read (it holds every result already).
pub(crate) fn write_from_complete(plan: &Plan, write: &CacheWrite, source: &CacheLocation) -> Option<CacheWrite> {
    match (source, write) {
        (CacheLocation::Directory(read), CacheWrite::CopyDir { to, .. }) if read == to => None,
        (CacheLocation::Directory(read), CacheWrite::CopyDir { to, .. }) => {
            Some(CacheWrite::CopyDir { from: read.clone(), to: to.clone() })
        }
        (CacheLocation::TarFile(read), CacheWrite::Pack { to, .. }) if read == to => None,
        (CacheLocation::TarFile(_), CacheWrite::Pack { to, .. }) => {
            Some(CacheWrite::Pack { from: plan.unpacked_dir(source), to: to.clone() })
        }
        _ => Some(write.clone()),
    }
}

/// Puts the cache manifest `digest` (in the plan's repository) at `to`, with `annotations`.
pub(crate) fn restore_cache(
    ctx: &Context,
    plan: &Plan,
    digest: &str,
    to: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<()> {
    let tag = plan.repository.tag_of(to)?;
    let manifest = ctx.registry.manifest(&plan.repository, digest)?;
    let manifest = if annotations.is_empty() { manifest } else { manifest.with_annotations(annotations)? };
    ctx.registry
        .put_manifest(&plan.repository, &manifest, &[tag])
        .with_context(|| format!("writing the cache that was read ({digest}) to {to}"))
}
