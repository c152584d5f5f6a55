//! End-to-end, on the real engine and registry, for each backend: a seeding build on the default
//! branch, then, each time as a fresh runner (no local images, no build cache):
//! no change, a source-only change, a new branch served from the default branch's cache, and a
//! branch served from its merge-base commit's cache. Cache hits are read from BuildKit's own
//! per-step record.

use std::path::Path;

use cachefrom::ci::Environment;
use cachefrom::exec::{build_with_cache, BuildOptions};
use cachefrom::plan::Level;
use cachefrom::report::RunReport;
use cachefrom_tests::*;

fn build(dir: &Path, image: &str, backend: &str, branch: &str) -> RunReport {
    let mut settings = example_settings(image, dir);
    settings.backend = backend.parse().unwrap();
    settings.branch = Some(branch.to_string());
    settings.work_dir = Some(dir.join(".cachefrom-work"));
    settings.tags = vec![format!("{image}:e2e")];
    let options = BuildOptions::new(settings.plan_options(&Environment::default()).expect("plan options"));
    match build_with_cache(&plain_context(), &options) {
        Ok(report) => report,
        Err(error) => panic!("build on {branch} with {backend} failed: {error:#}"),
    }
}

fn stage<'a>(report: &'a RunReport, name: &str) -> &'a cachefrom::report::StageReport {
    report.stages.iter().find(|stage| stage.name == name).unwrap_or_else(|| panic!("no stage {name} in {report:#?}"))
}

fn assert_all_cached(report: &RunReport, what: &str) {
    for stage in &report.stages {
        assert!(stage.steps_total > 0, "{what}: stage {} reported no steps", stage.name);
        assert_eq!(
            stage.steps_cached, stage.steps_total,
            "{what}: stage {} not fully cached: {:#?}",
            stage.name, stage.steps
        );
    }
}

/// The stack's engine log, where BuildKit logs what it does not show in a build's progress.
const ENGINE_LOG: &str = "/var/lib/cachefrom-stack/dockerd.log";

fn engine_log_len() -> u64 {
    std::fs::metadata(ENGINE_LOG).map(|meta| meta.len()).unwrap_or(0)
}

/// The steps whose cached result BuildKit began to load and then cancelled (`span="load cache:
/// [deps 6/6] …"` with `context canceled`), in the engine's log since `from`.
fn cancelled_loads(from: u64) -> Vec<String> {
    use std::io::{Read, Seek};
    let mut text = String::new();
    if let Ok(mut log) = std::fs::File::open(ENGINE_LOG) {
        let _ = log.seek(std::io::SeekFrom::Start(from));
        let _ = log.take(64 << 20).read_to_string(&mut text);
    }
    text.lines()
        .filter(|line| line.contains("context canceled"))
        .filter_map(|line| line.split("span=\"load cache: ").nth(1))
        .filter_map(|rest| rest.split(']').next().map(|step| format!("{step}]")))
        .collect()
}

/// Every dependency step hit the cache. One exception, BuildKit's own: it found a step's
/// result in the cache read, began to load it and cancelled the load (the engine's log says so,
/// `load cache: [deps N/6] … context canceled`), then ran the step. A local cache is read through
/// buildx's session, and that load was seen cancelled now and then (moby/buildkit#6572 tells of
/// its eager loading). A step that missed for any other reason, a cache without the step's layer
/// included (its load fails with "not found"), fails the test.
fn assert_deps_cached(report: &RunReport, what: &str, log_from: u64) {
    let deps = stage(report, "deps");
    assert_eq!(deps.steps_total, 5, "{what}: {:#?}", deps.steps);
    if deps.steps_cached == 5 {
        return;
    }
    let cancelled = cancelled_loads(log_from);
    let missed: Vec<&str> = deps.steps.iter().filter(|step| !step.cached).map(|step| step.name.as_str()).collect();
    for step in &missed {
        assert!(
            cancelled.iter().any(|load| step.starts_with(load.as_str())),
            "{what}: the dependency step {step} missed the cache, and BuildKit cancelled no load of it ({cancelled:?}): {:#?}",
            deps.steps
        );
    }
    eprintln!("{what}: BuildKit cancelled loading {missed:?} from the cache and ran them (its log: {cancelled:?})");
}

fn scenario(backend_name: &str, backend: &str) {
    let _serial = serial();
    need_stack(backend_name);
    let repo = example_repository_copy().unwrap();
    let dir = repo.path();
    let image = unique_repository(&format!("example-{backend_name}"));
    let c0 = git(dir, &["rev-parse", "HEAD"]).unwrap();
    // c1 on main: a change outside the build context's COPYs; c0 is never built.
    std::fs::write(dir.join("NOTES.md"), "notes\n").unwrap();
    git(dir, &["add", "."]).unwrap();
    git(dir, &["commit", "-q", "-m", "c1"]).unwrap();
    let c1 = git(dir, &["rev-parse", "HEAD"]).unwrap();

    // Seeding build on the default branch, on a fresh runner: a build cache that an earlier test
    // filled from another cache can hold results BuildKit never loaded, and it leaves those out
    // of the export (the next run then misses them); a CI runner starts empty.
    fresh_runner().unwrap();
    let seed = build(dir, &image, backend, "main");
    assert!(seed.success);
    for stage in &seed.stages {
        assert!(!stage.pushed.is_empty(), "{backend_name}: seeding wrote no cache for {}", stage.name);
    }

    // 1. No change, fresh runner: every step cached, from the branch's own cache.
    fresh_runner().unwrap();
    let same = build(dir, &image, backend, "main");
    assert_all_cached(&same, &format!("{backend_name}, no change"));
    assert_eq!(same.level, Some(Level::Branch), "{backend_name}: {same:#?}");
    // Inline builds stage by stage, each read from its own tag; the others build once, and every
    // stage reads its layers from the target's cache.
    let reader = if backend_name == "inline" { "deps" } else { "runtime" };
    assert!(stage(&same, "deps").cache_source.as_deref().unwrap().contains(&format!("cache-{reader}.main")));
    assert_image_runs(&format!("{image}:e2e"));

    // 2. Source-only change, fresh runner: the dependency steps still come from the cache.
    change_source(dir, "source only").unwrap();
    fresh_runner().unwrap();
    let log_from = engine_log_len();
    let source_change = build(dir, &image, backend, "main");
    assert_deps_cached(&source_change, &format!("{backend_name}, source change"), log_from);
    assert!(stage(&source_change, "builder").steps_cached < stage(&source_change, "builder").steps_total);
    git(dir, &["checkout", "-q", "--", "."]).unwrap();

    // 3. A new branch whose merge-base (c0) has no cache: served from the default branch.
    git(dir, &["checkout", "-q", "-b", "feature/from-c0", &c0]).unwrap();
    change_source(dir, "feature from c0").unwrap();
    git(dir, &["commit", "-q", "-am", "c2"]).unwrap();
    fresh_runner().unwrap();
    let log_from = engine_log_len();
    let new_branch = build(dir, &image, backend, "feature/from-c0");
    assert_eq!(new_branch.level, Some(Level::DefaultBranch), "{backend_name}: {new_branch:#?}");
    assert_deps_cached(&new_branch, &format!("{backend_name}, new branch"), log_from);
    assert!(stage(&new_branch, "deps").cache_source.as_deref().unwrap().contains(&format!("cache-{reader}.main")));

    // 4. A branch from c1, whose merge-base commit was built on main: served from that commit.
    git(dir, &["checkout", "-q", "-b", "feature/from-c1", &c1]).unwrap();
    change_source(dir, "feature from c1").unwrap();
    git(dir, &["commit", "-q", "-am", "c3"]).unwrap();
    fresh_runner().unwrap();
    let log_from = engine_log_len();
    let merge_base = build(dir, &image, backend, "feature/from-c1");
    assert_eq!(merge_base.level, Some(Level::MergeBase), "{backend_name}: {merge_base:#?}");
    assert_deps_cached(&merge_base, &format!("{backend_name}, merge-base"), log_from);
    assert!(stage(&merge_base, "deps").cache_source.as_deref().unwrap().contains(&format!("cache-{reader}.{c1}")));

    // A branch writes its own tags, never the default branch's.
    let deps_writes = &stage(&merge_base, "deps").pushed;
    assert!(deps_writes.iter().any(|w| w.contains(&format!("cache-{reader}.feature-from-c1--"))), "{deps_writes:?}");
    assert!(!deps_writes.iter().any(|w| w.contains("-main")), "{deps_writes:?}");
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn inline_backend() {
    scenario("inline", "inline");
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn registry_backend() {
    scenario("registry", "registry");
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn local_backend() {
    let cache = tempfile::tempdir().unwrap();
    scenario("local", &format!("local,dir={}", cache.path().display()));
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn tarball_backend() {
    let cache = tempfile::tempdir().unwrap();
    scenario("tarball", &format!("tarball,dir={}", cache.path().display()));
    let tars: Vec<_> = walk(cache.path()).into_iter().filter(|p| p.extension().is_some_and(|e| e == "tar")).collect();
    assert!(tars.len() >= 6, "expected a tar file per tag: {tars:?}");
}

/// The image built from the cache runs: `--version`, and `GET /health` on a loopback port.
fn assert_image_runs(image: &str) {
    let version =
        duct::cmd!("timeout", "60", "docker", "run", "--rm", "--network=none", image, "--version").read().unwrap();
    assert!(version.starts_with("example-app "), "{version}");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let id = duct::cmd!("timeout", "60", "docker", "run", "-d", "--rm", "--network=host", image, "--listen", &listen)
        .read()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let body = loop {
        let answer = ureq::get(&format!("http://{listen}/health"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok());
        if let Some(body) = answer {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "the container did not answer on {listen}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = duct::cmd!("timeout", "60", "docker", "stop", "-t", "2", id.trim()).stdout_null().stderr_null().run();
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok", "{body}");
    assert_eq!(health["service"], "example-app", "{body}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path))
        } else {
            found.push(path)
        }
    }
    found
}
