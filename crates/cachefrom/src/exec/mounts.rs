//! The cache mounts' two steps ([`crate::plan::Step::RestoreMounts`],
//! [`crate::plan::Step::SaveMounts`]): fetch each mount's saved contents from the most specific
//! level that has them and unpack them into BuildKit's mounts; after the build, pack the mounts
//! and write what changed at this run's levels. A mount that cannot be restored or saved is one
//! warning, and the build goes on as it would without it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use super::context::Context;
use crate::backend::CacheLocation;
use crate::docker::last_lines;
use crate::mounts::{file_digest, ANNOTATION_BYTES, ANNOTATION_COLD_SECONDS, ANNOTATION_ID, ARTIFACT_TYPE, LAYER_TYPE};
use crate::plan::{CacheRef, MountPlan, Plan};
use crate::registry::Existence;
use crate::report::{MountReport, StageReport};
use crate::writes;

/// What the restore step found for one mount.
#[derive(Debug, Clone, Default)]
pub(crate) struct Restored {
    /// The recorded seconds of the mount's steps from empty.
    cold_seconds: Option<f64>,
}

/// The mounts' reports as the run goes, by mount name.
#[derive(Debug, Clone, Default)]
pub(crate) struct MountRun {
    reports: BTreeMap<String, MountReport>,
    restored: BTreeMap<String, Restored>,
}

impl MountRun {
    /// The reports, in the plan's order, with what each mount's steps took in `stages`.
    pub(crate) fn finish(mut self, plan: &Plan, stages: &BTreeMap<String, StageReport>) -> Vec<MountReport> {
        plan.mounts
            .iter()
            .filter_map(|mount| {
                let mut report = self.reports.remove(&mount.name)?;
                if report.step_seconds.is_none() {
                    report.step_seconds = step_seconds(mount, stages);
                }
                if report.cold_step_seconds.is_none() {
                    report.cold_step_seconds =
                        self.restored.get(&mount.name).and_then(|restored| restored.cold_seconds);
                }
                if let (Some(now), Some(cold), Some(_)) =
                    (report.step_seconds, report.cold_step_seconds, &report.restored_from)
                {
                    report.saved_seconds = Some(cold - now);
                }
                Some(report)
            })
            .collect()
    }
}

/// The seconds of the steps that use `mount` and ran (not layer hits), from BuildKit's record.
fn step_seconds(mount: &MountPlan, stages: &BTreeMap<String, StageReport>) -> Option<f64> {
    let mut total = None;
    for stage in stages.values() {
        for step in &stage.steps {
            let uses =
                mount.steps.iter().any(|(name, written)| step.stage == *name && step.name.contains(written.as_str()));
            if uses && !step.cached {
                *total.get_or_insert(0.0) += step.seconds.unwrap_or(0.0);
            }
        }
    }
    total
}

fn new_report(mount: &MountPlan) -> MountReport {
    MountReport { id: mount.mount.id.clone(), target: mount.mount.target.clone(), ..Default::default() }
}

/// The restore step's commands ([`crate::plan::Step::RestoreMounts`]).
pub(crate) struct RestoreCommands<'a> {
    pub argv: &'a [String],
    pub pull: Option<&'a [String]>,
    pub again: Option<&'a [String]>,
}

/// Fetches each mount's saved contents (the first level of its chain that has them) into the
/// restore build's context, then runs the restore build when anything was fetched (again in the
/// mounts' own image when it fails in another); the mounts' image is pulled beside all of it
/// when the plan says so.
pub(crate) fn restore_mounts(ctx: &Context, plan: &Plan, commands: RestoreCommands, run: &mut MountRun) -> Vec<String> {
    // Which saved contents exist, every level of every mount at once.
    let existing = existing_or_why(ctx, plan);
    let any_saved = existing.0.values().any(|found| *found);
    let (mut warnings, pulled) = std::thread::scope(|scope| {
        let pulling = commands.pull.filter(|_| any_saved).map(|argv| {
            scope.spawn(move || ctx.docker.run("pulling the cache mounts' image", argv, ctx.docker.timeouts.transfer))
        });
        let warnings = fetch_and_restore(ctx, plan, existing, &commands, run);
        (warnings, pulling.map(|pulling| pulling.join()))
    });
    match pulled {
        Some(Ok(Ok(output))) if !output.success => {
            ctx.say(&format!(
                "cachefrom: pulling {} beside the restore failed (the build pulls it): {}",
                plan.mount_image.as_deref().unwrap_or_default(),
                last_lines(&output.stderr, 2)
            ));
        }
        Some(Ok(Err(error))) => warnings.push(format!("pulling the cache mounts' image: {error:#}")),
        _ => {}
    }
    warnings
}

fn fetch_and_restore(
    ctx: &Context,
    plan: &Plan,
    (found, unknown): (BTreeMap<String, bool>, Vec<String>),
    commands: &RestoreCommands,
    run: &mut MountRun,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let dir = plan.mounts_dir();
    let inbox = dir.join("in");
    if let Err(error) = writes::remove_dir(&dir).and_then(|()| Ok(std::fs::create_dir_all(&inbox)?)) {
        return vec![format!("the cache mounts were not restored: preparing {}: {error:#}", dir.display())];
    }
    if !unknown.is_empty() {
        warnings.push(format!(
            "could not check whether the cache mounts were saved ({}); those not found start empty",
            unknown.join("; ")
        ));
    }
    let mut fetched_any = false;
    let mut started: BTreeMap<String, Instant> = BTreeMap::new();
    for mount in &plan.mounts {
        let mut report = new_report(mount);
        let begun = Instant::now();
        let Some(from) =
            mount.cache_from.iter().find(|candidate| found.get(&candidate.location.to_string()) == Some(&true))
        else {
            run.reports.insert(mount.name.clone(), report);
            continue;
        };
        let file = inbox.join(format!("{}.tar.gz", mount.name));
        let fetched = fetch(ctx, plan, from, &file).and_then(|fetched| {
            let checked = crate::mounts::check_archive(&file);
            if checked.is_err() {
                let _ = std::fs::remove_file(&file);
            }
            checked.map(|()| fetched)
        });
        match fetched {
            Ok((bytes, record)) => {
                fetched_any = true;
                report.restored_from = Some(from.location.to_string());
                report.restored_level = Some(from.level);
                report.restore_bytes = bytes;
                let cold_seconds = record.get(ANNOTATION_COLD_SECONDS).and_then(|text| text.parse::<f64>().ok());
                run.restored.insert(mount.name.clone(), Restored { cold_seconds });
                started.insert(mount.name.clone(), begun);
            }
            Err(error) => {
                let line = format!(
                    "the cache mount {} was not restored from {}: {error:#}; it starts empty",
                    mount.mount.target, from.location
                );
                report.warnings.push(line.clone());
                warnings.push(line);
            }
        }
        report.restore_seconds = begun.elapsed().as_secs_f64();
        run.reports.insert(mount.name.clone(), report);
    }
    if !fetched_any {
        return warnings;
    }
    let unpack = Instant::now();
    let restore = |file: &str, dockerfile: String, argv: &[String]| {
        let result = std::fs::write(dir.join(file), dockerfile)
            .context("writing the restore build's Dockerfile")
            .and_then(|()| with_run_value(ctx).run("restoring the cache mounts", argv, ctx.docker.timeouts.transfer));
        match result {
            Ok(output) if output.success => None,
            Ok(output) => Some(last_lines(&output.stderr, 4)),
            Err(error) => Some(format!("{error:#}")),
        }
    };
    let mut failed = restore("restore.Dockerfile", plan.restore_dockerfile(), commands.argv);
    if let (Some(why), Some(again)) = (&failed, commands.again) {
        ctx.say(&format!(
            "cachefrom: the restore build failed in {}, again in {}: {why}",
            plan.restore_image.as_deref().unwrap_or_default(),
            plan.mount_image.as_deref().unwrap_or_default()
        ));
        failed = restore("restore-again.Dockerfile", plan.restore_again_dockerfile(), again);
    }
    let unpack_seconds = unpack.elapsed().as_secs_f64();
    for (name, _) in started {
        if let Some(report) = run.reports.get_mut(&name) {
            report.restore_seconds += unpack_seconds;
            if let Some(why) = &failed {
                report.restored_from = None;
                report.restored_level = None;
                report.warnings.push(format!("the restore build failed: {why}"));
                run.restored.remove(&name);
            }
        }
    }
    if let Some(why) = failed {
        warnings
            .push(format!("the cache mounts were not restored (the restore build failed; they start empty): {why}"));
    }
    let _ = writes::remove_dir(&inbox);
    warnings
}

/// For `explain`, by stage: what would become of each cache mount its steps use.
pub(crate) fn explain_mounts(ctx: &Context, plan: &Plan) -> BTreeMap<String, Vec<String>> {
    let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let stage_of = |shown: &str| {
        plan.stages
            .iter()
            .find(|stage| stage.name == shown || plan.progress_name(stage) == shown)
            .map(|stage| stage.name.clone())
            .unwrap_or_else(|| plan.target.clone())
    };
    for note in &plan.notes {
        if let Some(rest) = note.strip_prefix("the cache mount ") {
            let stage = rest.split(" of stage ").nth(1).and_then(|tail| tail.split(' ').next()).unwrap_or_default();
            lines
                .entry(stage_of(stage))
                .or_default()
                .push(format!("mount {}", rest.replacen(&format!(" of stage {stage}"), "", 1)));
        } else if note.starts_with("cache mounts are not kept") {
            lines.entry(plan.target.clone()).or_default().push(note.clone());
        }
    }
    if plan.mounts.is_empty() {
        return lines;
    }
    let (found, unknown) = existing_or_why(ctx, plan);
    for mount in &plan.mounts {
        let line = match mount.cache_from.iter().find(|from| found.get(&from.location.to_string()) == Some(&true)) {
            Some(from) => {
                format!("mount {} would be restored from {} ({})", mount.mount.target, from.location, from.level)
            }
            None if !unknown.is_empty() => {
                format!("mount {}: could not check whether it was saved ({})", mount.mount.target, unknown.join("; "))
            }
            None => format!(
                "mount {} would start empty: it was saved at no level of the chain ({})",
                mount.mount.target,
                mount.cache_from.iter().map(|from| from.tag.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        let stages: std::collections::BTreeSet<String> = mount.steps.iter().map(|(stage, _)| stage_of(stage)).collect();
        for stage in stages {
            lines.entry(stage).or_default().push(line.clone());
        }
    }
    lines
}

/// The docker client with a new value of [`crate::plan::RUN_ARG`] in its environment.
fn with_run_value(ctx: &Context) -> crate::docker::Docker {
    let mut docker = ctx.docker.clone();
    docker.env.push((crate::plan::RUN_ARG.to_string(), crate::files::random_hex(8)));
    docker
}

/// Which mount locations exist (registry tags checked at once, files looked at), and why the
/// checks that could not be made could not.
fn existing_or_why(ctx: &Context, plan: &Plan) -> (BTreeMap<String, bool>, Vec<String>) {
    let candidates: Vec<&CacheRef> = plan.mounts.iter().flat_map(|mount| mount.cache_from.iter()).collect();
    let mut found = BTreeMap::new();
    let mut refs = Vec::new();
    for candidate in &candidates {
        match &candidate.location {
            CacheLocation::Image(_) => refs.push((plan.repository.clone(), candidate.tag.clone())),
            CacheLocation::TarFile(file) => {
                found.insert(candidate.location.to_string(), file.is_file());
            }
            _ => {}
        }
    }
    let answers = ctx.registry.check_all(&refs);
    let mut unknown = Vec::new();
    for ((_, tag), answer) in refs.iter().zip(answers) {
        if let Existence::Unknown(why) = &answer {
            if !unknown.contains(why) {
                unknown.push(why.clone());
            }
        }
        found.insert(plan.repository.with_tag(tag), answer == Existence::Exists);
    }
    (found, unknown)
}

/// Fetches the saved contents at `from` into `to` (the registry's digest checked): the bytes
/// moved and the record.
fn fetch(ctx: &Context, plan: &Plan, from: &CacheRef, to: &Path) -> Result<(u64, BTreeMap<String, String>)> {
    let timeout = ctx.docker.timeouts.transfer;
    match &from.location {
        CacheLocation::Image(_) => {
            let manifest = ctx.registry.manifest(&plan.repository, &from.tag)?;
            let value: serde_json::Value =
                serde_json::from_slice(&manifest.body).context("its manifest is not JSON")?;
            let layer =
                value["layers"].as_array().and_then(|layers| layers.first()).context("its manifest has no layer")?;
            let (Some(digest), Some(size), Some(LAYER_TYPE)) =
                (layer["digest"].as_str(), layer["size"].as_u64(), layer["mediaType"].as_str())
            else {
                bail!("its manifest is not a saved cache mount");
            };
            if size > plan.cache_mount_max_size {
                bail!("it holds {size} bytes, over --cache-mount-max-size");
            }
            ctx.registry.fetch_blob_to_file(&plan.repository, digest, to, size, timeout)?;
            Ok((size, manifest.annotations()))
        }
        CacheLocation::TarFile(file) => {
            let size = std::fs::metadata(file)?.len();
            if size > plan.cache_mount_max_size {
                bail!("it holds {size} bytes, over --cache-mount-max-size");
            }
            let partial = crate::plan::partial_path_of(to);
            std::fs::copy(file, &partial).with_context(|| format!("copying {}", file.display()))?;
            std::fs::rename(&partial, to)?;
            let record = crate::files::read_bytes(&record_path(file), 64 * 1024)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<BTreeMap<String, String>>(&bytes).ok())
                .unwrap_or_default();
            Ok((size, record))
        }
        other => bail!("{other} is not a place a cache mount is kept"),
    }
}

/// The record beside a saved mount's file: `<file>.json`.
fn record_path(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push(".json");
    PathBuf::from(path)
}

/// What the save build left: the line that says why nothing was saved, if so, and its seconds.
pub(crate) struct Packed {
    failed: Option<String>,
    seconds: f64,
}

/// The save build ([`crate::plan::Step::SaveMounts`]'s `argv`): every mount packed into
/// `mounts/out/`.
pub(crate) fn pack_mounts(ctx: &Context, plan: &Plan, argv: &[String]) -> Packed {
    let dir = plan.mounts_dir();
    let (out, empty) = (dir.join("out"), dir.join("empty"));
    let packed = Instant::now();
    let prepared = writes::remove_dir(&out)
        .and_then(|()| Ok(std::fs::create_dir_all(&empty)?))
        .and_then(|()| Ok(std::fs::write(dir.join("save.Dockerfile"), plan.save_dockerfile())?));
    let result =
        prepared.and_then(|()| with_run_value(ctx).run("saving the cache mounts", argv, ctx.docker.timeouts.transfer));
    let failed = match result {
        Ok(output) if output.success => None,
        Ok(output) => {
            Some(format!("the cache mounts were not saved: the save build failed: {}", last_lines(&output.stderr, 4)))
        }
        Err(error) => Some(format!("the cache mounts were not saved: {error:#}")),
    };
    Packed { failed, seconds: packed.elapsed().as_secs_f64() }
}

/// Starts the save build once every `RUN` that uses a kept mount has finished in the build
/// being watched, while the rest of that build runs (its other steps, exports and pushes); what
/// [`save_mounts`] then takes instead of running it.
pub(crate) struct EarlyPack {
    waiting: std::sync::Mutex<Vec<(String, String)>>,
    started: std::sync::Mutex<Option<std::thread::JoinHandle<Packed>>>,
    ctx: Context,
    plan: Plan,
    argv: Vec<String>,
}

impl EarlyPack {
    /// For the one build of `plan` whose steps are every mount's (one platform only: a build for
    /// several runs each step once a platform); `None` otherwise.
    pub(crate) fn new(ctx: &Context, plan: &Plan, argv: &[String]) -> Option<EarlyPack> {
        if plan.execution != crate::plan::Execution::OneBuild
            || plan.platform.as_deref().is_some_and(|list| list.contains(','))
        {
            return None;
        }
        let waiting: Vec<(String, String)> = plan.mounts.iter().flat_map(|mount| mount.steps.iter().cloned()).collect();
        Some(EarlyPack {
            waiting: std::sync::Mutex::new(waiting),
            started: std::sync::Mutex::new(None),
            ctx: ctx.clone(),
            plan: plan.clone(),
            argv: argv.to_vec(),
        })
    }

    /// Sees one progress event of the build.
    pub(crate) fn observe(&self, event: &crate::report::ProgressEvent) {
        let crate::report::ProgressEvent::Finished { name, error: None, .. } = event else { return };
        let Some((_, stage, _)) = crate::report::parse_step(name) else { return };
        let Ok(mut waiting) = self.waiting.lock() else { return };
        let before = waiting.len();
        waiting.retain(|(step_stage, written)| !(*step_stage == stage && name.contains(written.as_str())));
        if waiting.is_empty() && before > 0 {
            let (ctx, plan, argv) = (self.ctx.clone(), self.plan.clone(), self.argv.clone());
            let handle = std::thread::spawn(move || pack_mounts(&ctx, &plan, &argv));
            if let Ok(mut started) = self.started.lock() {
                *started = Some(handle);
            }
        }
    }

    /// The save build's outcome, when it started (waiting for it to end).
    pub(crate) fn take(self) -> Option<Packed> {
        let handle = self.started.into_inner().ok()??;
        Some(handle.join().unwrap_or(Packed { failed: Some("the save build panicked".into()), seconds: 0.0 }))
    }
}

/// Writes each packed mount (`packed`, else the save build, `argv`, run now) whose contents
/// changed, or that this run's levels do not have yet. Runs after the build, whatever its outcome.
pub(crate) fn save_mounts(
    ctx: &Context,
    plan: &Plan,
    argv: &[String],
    run: &mut MountRun,
    stages: &BTreeMap<String, StageReport>,
    succeeded: bool,
    packed: Option<Packed>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let dir = plan.mounts_dir();
    let out = dir.join("out");
    let Packed { failed, seconds: pack_seconds } = packed.unwrap_or_else(|| pack_mounts(ctx, plan, argv));
    if let Some(line) = failed {
        for mount in &plan.mounts {
            run.reports.entry(mount.name.clone()).or_insert_with(|| new_report(mount)).warnings.push(line.clone());
        }
        return vec![line];
    }
    // Each packed tar compressed, one after the other, each on every core.
    let compressing = Instant::now();
    let compressed: BTreeMap<String, Result<()>> = plan
        .mounts
        .iter()
        .filter(|mount| out.join(format!("{}.tar", mount.name)).is_file())
        .map(|mount| {
            let (tar, file) = (out.join(format!("{}.tar", mount.name)), out.join(format!("{}.tar.gz", mount.name)));
            let result = crate::mounts::compress_file(&tar, &file);
            let _ = std::fs::remove_file(&tar);
            (mount.name.clone(), result)
        })
        .collect();
    let pack_seconds = pack_seconds + compressing.elapsed().as_secs_f64();
    for mount in &plan.mounts {
        let begun = Instant::now();
        let report = run.reports.entry(mount.name.clone()).or_insert_with(|| new_report(mount));
        report.save_seconds = pack_seconds;
        if let Some(Err(error)) = compressed.get(&mount.name) {
            let line = format!("the cache mount {} was not saved: {error:#}", mount.mount.target);
            report.warnings.push(line.clone());
            warnings.push(line);
            continue;
        }
        let too_big = out.join(format!("{}.too-big", mount.name));
        if let Ok(kb) = std::fs::read_to_string(&too_big) {
            let line = format!(
                "the cache mount {} holds {} MB, over --cache-mount-max-size ({} MB): not saved",
                mount.mount.target,
                kb.trim().parse::<u64>().unwrap_or(0) / 1024,
                plan.cache_mount_max_size >> 20
            );
            report.warnings.push(line.clone());
            warnings.push(line);
            continue;
        }
        let file = out.join(format!("{}.tar.gz", mount.name));
        if !file.is_file() {
            continue; // Empty: nothing to keep.
        }
        report.size_bytes = std::fs::read_to_string(out.join(format!("{}.size", mount.name)))
            .ok()
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024);
        let restored = run.restored.get(&mount.name).cloned().unwrap_or_default();
        // The steps' time from empty: this run's when it started empty and the build succeeded
        // (a failed step's time says nothing of a whole run), else the one recorded.
        let now = step_seconds(mount, stages);
        report.step_seconds = now;
        let cold = match (&report.restored_from, succeeded) {
            (Some(_), _) => restored.cold_seconds,
            (None, true) => now,
            (None, false) => None,
        };
        report.cold_step_seconds = cold;
        match write_mount(ctx, plan, mount, &file, report, cold) {
            Ok(()) => {}
            Err(error) => {
                let line = format!("the cache mount {} was not saved: {error:#}", mount.mount.target);
                report.warnings.push(line.clone());
                warnings.push(line);
            }
        }
        report.save_seconds += begun.elapsed().as_secs_f64();
    }
    let _ = writes::remove_dir(&dir);
    warnings
}

/// Writes one packed mount at the run's levels: the archive uploaded once (content-addressed),
/// the record and the tags written.
fn write_mount(
    ctx: &Context,
    plan: &Plan,
    mount: &MountPlan,
    file: &Path,
    report: &mut MountReport,
    cold: Option<f64>,
) -> Result<()> {
    // Contents stored already (the registry has the blob, the file has the digest) move no
    // bytes; every level this run writes still gets its tag or file.
    let digest = file_digest(file)?;
    let size = std::fs::metadata(file)?.len();
    let mut record = BTreeMap::new();
    record.insert(ANNOTATION_ID.to_string(), mount.mount.id.clone());
    if let Some(cold) = cold {
        record.insert(ANNOTATION_COLD_SECONDS.to_string(), format!("{cold:.3}"));
    }
    if let Some(bytes) = report.size_bytes {
        record.insert(ANNOTATION_BYTES.to_string(), bytes.to_string());
    }
    let timeout = ctx.docker.timeouts.transfer;
    let mut tags = Vec::new();
    for to in &mount.cache_to {
        match &to.location {
            CacheLocation::Image(_) => tags.push(to.tag.clone()),
            CacheLocation::TarFile(dest) => {
                let same = dest.is_file() && file_digest(dest).ok().as_deref() == Some(digest.as_str());
                if !same {
                    writes::copy_file_atomically(file, dest)?;
                    report.save_bytes += size;
                }
                let partial = crate::plan::partial_path_of(&record_path(dest));
                std::fs::write(&partial, serde_json::to_vec(&record)?)?;
                std::fs::rename(&partial, record_path(dest))?;
            }
            other => bail!("{other} is not a place a cache mount is kept"),
        }
        report.saved_to.push(to.location.to_string());
    }
    if !tags.is_empty() {
        if ctx.registry.upload_blob_file(&plan.repository, &digest, file, timeout)? {
            report.save_bytes += size;
        }
        let layer = serde_json::json!({ "mediaType": LAYER_TYPE, "digest": digest, "size": size });
        ctx.registry.put_artifact(&plan.repository, ARTIFACT_TYPE, &[layer], &record, &tags)?;
    }
    Ok(())
}

/// The cache mounts for library users who compose [`super::pull_cached`], [`super::build_stage`]
/// and [`super::push_cached`] themselves: [`CacheMounts::restore`] before the builds (the plan's
/// `restore-mounts` step), [`CacheMounts::save`] after them, whatever their outcome (its
/// `save-mounts` step). [`super::build_with_cache`] does both itself.
#[derive(Debug, Default)]
pub struct CacheMounts {
    run: MountRun,
    warnings: Vec<String>,
}

impl CacheMounts {
    /// Restores every mount the plan keeps from the most specific level that saved it (nothing
    /// when the plan keeps none). A mount that cannot be restored starts empty, with a warning.
    pub fn restore(ctx: &Context, plan: &Plan) -> CacheMounts {
        let mut mounts = CacheMounts::default();
        for step in &plan.steps {
            if let crate::plan::Step::RestoreMounts { argv, pull, again } = step {
                let commands = RestoreCommands { argv, pull: pull.as_deref(), again: again.as_deref() };
                mounts.warnings = restore_mounts(ctx, plan, commands, &mut mounts.run);
            }
        }
        mounts
    }

    /// The warnings of the restore, one line each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Saves the mounts at the plan's levels (nothing for a read-only plan), after the builds
    /// whose reports are `stages` (`succeeded`: all of them did). One report a mount, its warnings
    /// in it.
    pub fn save(mut self, ctx: &Context, plan: &Plan, stages: &[StageReport], succeeded: bool) -> Vec<MountReport> {
        let by_name: BTreeMap<String, StageReport> =
            stages.iter().map(|report| (report.name.clone(), report.clone())).collect();
        for step in &plan.steps {
            if let crate::plan::Step::SaveMounts { argv } = step {
                save_mounts(ctx, plan, argv, &mut self.run, &by_name, succeeded, None);
            }
        }
        self.run.finish(plan, &by_name)
    }
}
