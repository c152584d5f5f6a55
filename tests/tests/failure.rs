//! End-to-end: the caches of the stages that built are written even when a later stage fails, the
//! caller returns early with `?`, or code panics; and a registry that goes away mid-run leaves a
//! build that finishes without cache and a report that says why.

use std::path::Path;
use std::process::Command;

use anyhow::anyhow;
use cachefrom::ci::Environment;
use cachefrom::exec::{build_stage, build_with_cache, pull_cached, BuildOptions, Context, PushGuard};
use cachefrom::plan::{Plan, PlanOptions};
use cachefrom_tests::*;

fn plan_options(dir: &Path, image: &str, backend: &str) -> PlanOptions {
    let mut settings = example_settings(image, dir);
    settings.backend = backend.parse().unwrap();
    settings.plan_options(&Environment::default()).unwrap()
}

fn path_of(image: &str) -> &str {
    image.strip_prefix(&format!("{REGISTRY}/")).unwrap()
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_failed_final_stage_still_pushes_the_stages_before_it() {
    let _serial = serial();
    need_stack("a_failed_final_stage_still_pushes_the_stages_before_it");
    let repo = example_repository_copy().unwrap();
    let image = unique_repository("failing");
    let report_file = repo.path().join("report.json");
    let mut base_args: Vec<String> = vec![
        "build".into(),
        "--image".into(),
        image.clone(),
        "--backend".into(),
        "inline".into(),
        "--branch".into(),
        "main".into(),
        "--default-branch".into(),
        "main".into(),
        "--report".into(),
        report_file.display().to_string(),
    ];
    for (name, value) in example_build_args() {
        base_args.extend(["--build-arg".into(), format!("{name}={value}")]);
    }
    let run = |extra: &[&str]| {
        let mut args = base_args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(repo.path().display().to_string());
        args.push("--".into());
        args.extend(example_docker_args());
        Command::new(cachefrom_binary()).args(&args).env("CI", "true").output().unwrap()
    };

    // The runtime stage's smoke test fails with a bad argument.
    let failed = run(&["--build-arg", "SMOKE_TEST_ARGS=--no-such-flag"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cachefrom: error: building stage runtime failed"), "{stderr}");
    assert!(stderr.contains("did not complete successfully"), "{stderr}");
    let tags = registry_tags(REGISTRY, path_of(&image)).unwrap();
    assert!(tags.contains(&"cache-deps.main".to_string()), "{tags:?}");
    assert!(tags.contains(&"cache-builder.main".to_string()), "{tags:?}");
    assert!(!tags.iter().any(|tag| tag.starts_with("cache-runtime")), "{tags:?}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    assert_eq!(report["success"], false);
    assert_eq!(report["stages"][2]["status"], "failed");
    assert!(report["stages"][0]["pushed"][0].as_str().unwrap().ends_with(":cache-deps.main"));

    // The next run, on a fresh runner, reads what the failed run pushed.
    fresh_runner().unwrap();
    let next = run(&[]);
    assert!(next.status.success(), "{}", String::from_utf8_lossy(&next.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    for (index, steps) in [(0, 5), (1, 2)] {
        assert_eq!(report["stages"][index]["steps_cached"], steps, "{report:#}");
        assert_eq!(report["stages"][index]["steps_total"], steps, "{report:#}");
    }
}

/// What a caller's release tooling might do: build `deps`, then give up with `?`.
fn release_tooling_that_gives_up(ctx: &Context, plan: &Plan) -> anyhow::Result<()> {
    let resolution = pull_cached(ctx, plan)?;
    let mut guard = PushGuard::new(ctx, plan, &resolution);
    guard.build(plan.stage("deps").expect("the plan has deps"))?;
    Err(anyhow!("release tooling gave up after deps"))?;
    guard.finish()?;
    Ok(())
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn an_early_return_and_a_panic_still_push() {
    let _serial = serial();
    need_stack("an_early_return_and_a_panic_still_push");
    let repo = example_repository_copy().unwrap();
    let ctx = plain_context();

    let image = unique_repository("early-return");
    let mut options = plan_options(repo.path(), &image, "inline");
    options.target = Some("deps".to_string());
    let plan = Plan::new(&options).unwrap();
    let error = release_tooling_that_gives_up(&ctx, &plan).unwrap_err();
    assert_eq!(error.to_string(), "release tooling gave up after deps");
    let tags = registry_tags(REGISTRY, path_of(&image)).unwrap();
    assert!(tags.contains(&"cache-deps.main".to_string()), "after `?`: {tags:?}");

    let image = unique_repository("panic");
    let mut options = plan_options(repo.path(), &image, "inline");
    options.target = Some("deps".to_string());
    let plan = Plan::new(&options).unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let resolution = pull_cached(&ctx, &plan).unwrap();
        let mut guard = PushGuard::new(&ctx, &plan, &resolution);
        // The caller's own build of the stage, marked by hand.
        let deps = plan.stage("deps").unwrap();
        build_stage(&ctx, &plan, deps, &resolution).unwrap();
        guard.stage_built(deps);
        panic!("the caller's code panicked");
    }));
    assert!(outcome.is_err());
    let tags = registry_tags(REGISTRY, path_of(&image)).unwrap();
    assert!(tags.contains(&"cache-deps.main".to_string()), "after a panic: {tags:?}");
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_registry_that_goes_away_mid_run_leaves_a_build_without_cache() {
    let _serial = serial();
    need_stack("a_registry_that_goes_away_mid_run_leaves_a_build_without_cache");
    let repo = example_repository_copy().unwrap();
    let mut cache_registry = TempRegistry::start(5001).unwrap();
    let image = format!("{}/gone/app", cache_registry.address);
    let ctx = plain_context();

    // Seed, then stop the registry between the existence check and the builds.
    let seed = build_with_cache(&ctx, &BuildOptions::new(plan_options(repo.path(), &image, "registry"))).unwrap();
    assert!(seed.success);
    fresh_runner().unwrap();
    let plan = Plan::new(&plan_options(repo.path(), &image, "registry")).unwrap();
    let resolution = pull_cached(&ctx, &plan).unwrap();
    assert!(resolution.stages.values().all(|choice| choice.chosen.is_some()), "{resolution:#?}");
    cache_registry.stop();
    let mut reports = Vec::new();
    for stage in &plan.stages {
        reports.push(build_stage(&ctx, &plan, stage, &resolution).unwrap());
    }
    let deps = &reports[0];
    assert_eq!(deps.steps_cached, 0, "{deps:#?}");
    assert!(deps.cache_source.is_none());
    assert!(deps.pushed.is_empty(), "{deps:#?}");
    assert!(!deps.warnings.is_empty(), "the report must say why: {deps:#?}");

    // The next run cannot even check: it says so in one line and builds without cache.
    fresh_runner().unwrap();
    let report = build_with_cache(&ctx, &BuildOptions::new(plan_options(repo.path(), &image, "registry"))).unwrap();
    assert!(report.success);
    assert_eq!(report.warnings.len(), 1, "{:#?}", report.warnings);
    assert!(report.warnings[0].contains("cannot check caches in 127.0.0.1:5001/gone/app"), "{}", report.warnings[0]);
    assert!(report.warnings[0].contains("did not answer"), "{}", report.warnings[0]);
}

/// One build of the target (registry backend): when its last stage fails, the stages it finished
/// are exported from BuildKit's local cache and written; the next run, on a fresh runner, reads
/// them whole.
#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_failed_one_build_writes_the_stages_it_finished() {
    let _serial = serial();
    need_stack("a_failed_one_build_writes_the_stages_it_finished");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let image = unique_repository("one-build-failing");
    let report_file = project.path().join("report.json");
    let run = |extra: &[&str]| cachefrom_build(project.path(), &image, &report_file, extra);
    let failed = run(&["--build-arg", "FAIL=1"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cachefrom: writing the cache of builder, which the build finished"), "{stderr}");
    let tags = registry_tags(REGISTRY, path_of(&image)).unwrap();
    for tag in ["cache-builder.main", "cache-deps.main", "cache-builder", "cache-deps"] {
        assert!(tags.contains(&tag.to_string()), "{tag}: {tags:?}\n{stderr}");
    }
    assert!(!tags.iter().any(|tag| tag.starts_with("cache-runtime")), "{tags:?}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    assert_eq!(report["stages"][0]["status"], "built", "{report:#}");
    assert_eq!(report["stages"][1]["status"], "built", "{report:#}");
    assert_eq!(report["stages"][2]["status"], "failed", "{report:#}");

    fresh_runner().unwrap();
    let next = run(&[]);
    assert!(next.status.success(), "{}", String::from_utf8_lossy(&next.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    for index in [0, 1] {
        let stage = &report["stages"][index];
        assert_eq!(stage["steps_cached"], stage["steps_total"], "{report:#}");
        assert_ne!(stage["steps_total"], 0, "{report:#}");
    }
    // The success overwrote the stage tags the failure wrote: they hold the new, whole cache.
    let runtime = registry_digest(REGISTRY, path_of(&image), "cache-runtime.main").unwrap();
    assert_eq!(registry_digest(REGISTRY, path_of(&image), "cache-builder.main").unwrap(), runtime);
}
