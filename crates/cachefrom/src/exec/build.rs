//! [`build_stage`]: one BuildKit invocation, its progress streamed and kept, one report for each
//! stage it covered, true to BuildKit's per-step record.

use super::context::Context;
use super::resolve::Resolution;
use crate::backend::{Backend, CacheLocation};
use crate::docker::last_lines;
use crate::output::Output;
use crate::output::OutputStyle;
use crate::plan::{Builder, CacheErrors, CacheRef, Execution, Plan, StagePlan};
use crate::progress::Renderer;
use crate::render::render_command;
use crate::report::{ClassicLog, ProgressEvent, ProgressLog, StageReport, StageStatus};
use crate::writes::{self, remove_dir};
use anyhow::{bail, Context as _, Result};
use std::collections::BTreeSet;
use std::time::Instant;

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
    /// True when trying the export again could help: not for a cause that stays (an s3 bucket
    /// that does not exist, refused credentials).
    pub export_retryable: bool,
}

impl BuildOutcome {
    /// This outcome of a build tried again after `earlier`: a step that ran in the earlier try
    /// ran (the later try finds it in the local build cache), so the counts stay true.
    pub(crate) fn after(mut self, earlier: BuildOutcome) -> BuildOutcome {
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
    build_unit_observed(ctx, plan, stage_name, resolution, None)
}

/// What sees each of BuildKit's progress events as the build streams them.
pub(crate) type Observer<'a> = Option<&'a (dyn Fn(&ProgressEvent) + Sync)>;

/// [`build_unit`], each progress event shown to `observer` too.
pub(crate) fn build_unit_observed(
    ctx: &Context,
    plan: &Plan,
    stage_name: &str,
    resolution: &Resolution,
    observer: Observer,
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
    // The planned command, with the `--cache-from` of the sources chosen and nothing else changed.
    let planned = plan.build_argv(&stage.name).map(<[String]>::to_vec).unwrap_or_else(|| plan.planned_argv(stage));
    let chosen: BTreeSet<String> = sources
        .iter()
        .map(|(_, source)| plan.backend.cache_from_arg(&source.location, &plan.unpacked_dir(&source.location)))
        .collect();
    let args = crate::plan::narrowed(&planned, &|value| chosen.contains(value));
    let covered = plan.covered_by(stage);
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
    let mut record = ProgressLog::default(); // BuildKit's per-step record, as it streams
    let mut classic_record = ClassicLog::default();
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
            if let Some(observe) = observer {
                observe(&event);
            }
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

    let mut all_steps = if plan.builder == Builder::Classic { classic_record.steps() } else { record.steps() };
    // A Dockerfile of one stage: BuildKit names no stage in its steps.
    if let [only] = covered.as_slice() {
        for step in all_steps.iter_mut().filter(|step| step.stage.is_empty()) {
            step.stage = plan.progress_name(only);
        }
    }
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
        // The math of the hits: what their steps took when they ran, against what importing
        // them cost (the manifests' import counts with the stage built).
        let hits: Vec<&crate::report::StepReport> = steps.iter().filter(|step| step.cached).collect();
        let manifests = if covered_stage.name == stage.name { record.manifest_import_seconds() } else { 0.0 };
        let import_seconds = (!hits.is_empty() || manifests > 0.0)
            .then(|| hits.iter().filter_map(|step| step.seconds).sum::<f64>() + manifests);
        let import_bytes = hits.iter().map(|step| step.bytes).sum();
        let saved_seconds =
            resolution.source_record.as_ref().and_then(|source| source.step_seconds.get(&covered_stage.name)).and_then(
                |recorded| {
                    let found: Vec<f64> =
                        hits.iter().filter_map(|step| recorded.get(step.instruction()).copied()).collect();
                    (!found.is_empty()).then(|| found.iter().sum())
                },
            );
        reports.push(StageReport {
            platforms: crate::report::PlatformSteps::of(&steps),
            saved_seconds,
            import_seconds,
            import_bytes,
            cache_source: if steps_cached > 0 { own_source.as_ref().map(|s| s.location.to_string()) } else { None },
            cache_level: if steps_cached > 0 { own_source.as_ref().map(|s| s.level) } else { None },
            cache_from: sources.iter().map(|(_, source)| source.location.to_string()).collect(),
            steps_cached,
            steps_total: steps.len(),
            seconds: stage_seconds,
            steps,
            ..StageReport::new(&covered_stage.name, status)
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
            export_retryable: false,
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
    let problems: Vec<String> =
        import_errors.iter().chain(export_errors.iter()).chain(text_errors.iter()).cloned().collect();
    for problem in one_line_per_cause(&plan.backend, problems) {
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
    let export_retryable = !export_errors
        .iter()
        .chain(&text_errors)
        .any(|problem| S3_CAUSES.iter().any(|(marker, _)| problem.contains(marker)));
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
    Ok(BuildOutcome { reports, finished, error: None, export_failed, export_retryable })
}

/// Hard-links the blobs of the local caches a build reads into the directory it exports to. A
/// build whose steps were all hits exports a cache that refers to layers it never fetched; with
/// the blobs already there, the exported cache is whole.
pub(crate) fn seed_export_dir(
    plan: &Plan,
    stage: &StagePlan,
    sources: &[(String, CacheRef)],
    timeout: std::time::Duration,
) -> Result<()> {
    let staging = plan.staging_dir(&stage.name);
    for (_, source) in sources {
        let dir = match (&plan.backend, &source.location) {
            (Backend::Local { .. }, CacheLocation::Directory(dir)) => dir.clone(),
            (Backend::Tarball { .. }, _) => plan.unpacked_dir(&source.location),
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
pub(crate) fn credit_writes<'a>(
    plan: &Plan,
    reports: impl IntoIterator<Item = &'a mut StageReport>,
    written: &[String],
) {
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

/// Causes of an s3 cache failure that every import and export of the run share, and the one
/// line that says each: what is wrong and what to do.
const S3_CAUSES: [(&str, &str); 8] = [
    ("NoSuchBucket", "the s3 bucket {bucket} does not exist at {endpoint}: create it, or fix bucket= in --backend"),
    ("InvalidAccessKeyId", S3_REFUSED),
    ("SignatureDoesNotMatch", S3_REFUSED),
    ("AccessDenied", S3_REFUSED),
    // A HEAD answered 403 carries no error code.
    ("StatusCode: 403", S3_REFUSED),
    ("failed to refresh cached credentials", S3_NO_CREDENTIALS),
    ("no EC2 IMDS role found", S3_NO_CREDENTIALS),
    ("NoCredentialProviders", S3_NO_CREDENTIALS),
];
const S3_REFUSED: &str = "the s3 server at {endpoint} refused the credentials for bucket {bucket} (HTTP 403): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and what they may do";
const S3_NO_CREDENTIALS: &str = "no s3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY";

/// `problems` (BuildKit's cache errors of one build) with every s3 error of one cause said once,
/// in one line that names the cause and what to do (a missing bucket fails every import and
/// the export alike); the other problems as they are.
pub(crate) fn one_line_per_cause(backend: &Backend, problems: Vec<String>) -> Vec<String> {
    let Backend::S3 { options, .. } = backend else { return problems };
    let bucket = options.get("bucket").map(String::as_str).unwrap_or("?");
    let endpoint = options.get("endpoint_url").map(String::as_str).unwrap_or("the default endpoint");
    let mut lines: Vec<String> = Vec::new();
    for problem in problems {
        match S3_CAUSES.iter().find(|(marker, _)| problem.contains(marker)) {
            Some((_, line)) => {
                let line = format!(
                    "{}; built without the cache",
                    line.replace("{bucket}", bucket).replace("{endpoint}", endpoint)
                );
                if !lines.contains(&line) {
                    lines.push(line);
                }
            }
            None => lines.push(problem),
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn an_s3_warning_from_any_bucket_and_endpoint_starts_no_workflow_command(
            bucket in "[^,=]{1,40}",
            endpoint in "[^,=]{1,40}",
            problem in any::<String>(),
        ) {
            let text = format!("s3,bucket={bucket},region=r,endpoint_url={endpoint}");
            let Ok(backend) = Backend::parse(&text, None) else { return Ok(()) };
            let problems = vec![format!("{problem} api error NoSuchBucket"), problem.clone(), "StatusCode: 403".to_string()];
            for line in one_line_per_cause(&backend, problems) {
                // What the run shows: every line through the output's guard.
                let shown = crate::output::safe_line(&format!("cachefrom: warning: stage s: {line}"));
                for part in shown.split(['\n', '\r']) {
                    prop_assert!(!part.trim_start().starts_with("::"), "{:?}", part);
                }
            }
        }
    }

    #[test]
    fn a_missing_bucket_is_one_line_whatever_the_number_of_imports() {
        let backend =
            Backend::parse("s3,bucket=nope,region=us-east-1,endpoint_url=http://127.0.0.1:5003", None).unwrap();
        let missing = "importing cache manifest from s3:123: operation error S3: GetObject, https response error StatusCode: 404, api error NoSuchBucket: The specified bucket does not exist";
        let problems = vec![
            missing.to_string(),
            missing.replace("123", "456"),
            "exporting cache to Amazon S3: error writing layer blob: api error NoSuchBucket".to_string(),
            "something else".to_string(),
        ];
        let lines = one_line_per_cause(&backend, problems);
        assert_eq!(
            lines,
            [
                "the s3 bucket nope does not exist at http://127.0.0.1:5003: create it, or fix bucket= in --backend; built without the cache",
                "something else"
            ]
        );
        // Refused keys: every import's code and the export's bare 403, one line.
        let keys = vec![
            "api error InvalidAccessKeyId: The AWS Access Key Id you provided does not exist".to_string(),
            "exporting cache to Amazon S3: failed to check file presence in cache: operation error S3: HeadObject, https response error StatusCode: 403, RequestID: , HostID: , api error Forbidden: Forbidden".to_string(),
        ];
        let lines = one_line_per_cause(&backend, keys);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("refused the credentials") && lines[0].contains("AWS_SECRET_ACCESS_KEY"),
            "{lines:?}"
        );
        let registry = Backend::parse("registry", None).unwrap();
        assert_eq!(one_line_per_cause(&registry, vec![missing.to_string()]), [missing]);
    }
}
