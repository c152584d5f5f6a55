//! `cachefrom prune` on the real stack: caches for three branches and several commits, one branch
//! deleted from the origin; the dry run names exactly the tags that go, `--apply` removes them
//! (the registry's tag list confirms), and the default branch still builds from its cache.

use std::path::Path;
use std::process::Command;

use cachefrom_tests::*;

/// git with a fixed identity and the given commit date (seconds since the epoch).
fn git_at(dir: &Path, date: u64, args: &[&str]) -> String {
    git_dated(dir, Some(date), args).unwrap()
}

/// Commits a change to the source (so the cache differs) at `date`; its id.
fn commit(dir: &Path, date: u64, text: &str) -> String {
    std::fs::write(dir.join("src/main.txt"), text).unwrap();
    git_at(dir, date, &["commit", "-q", "-am", text]);
    git_at(dir, date, &["rev-parse", "HEAD"])
}

fn build_on(dir: &Path, image: &str, report: &Path, branch: &str) {
    let output = Command::new(cachefrom_binary())
        .args(["build", "--quiet", "--image", image, "--branch", branch, "--default-branch", "main"])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--report"])
        .arg(report)
        .arg(dir)
        .args(["--", "--network=none"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{branch}: {}", String::from_utf8_lossy(&output.stderr));
}

fn prune(dir: &Path, image: &str, apply: bool) -> (String, String) {
    let mut command = Command::new(cachefrom_binary());
    command.args(["prune", "--image", image, "--default-branch", "main", "--keep-commits", "2"]);
    if apply {
        command.arg("--apply");
    }
    let output = command.arg(dir).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned());
    assert!(output.status.success(), "{stdout}{stderr}");
    (stdout, stderr)
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn prune_removes_exactly_the_tags_nobody_reads() {
    let _serial = serial();
    need_stack("prune_removes_exactly_the_tags_nobody_reads");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path();
    let origin = tempfile::tempdir().unwrap();
    git_at(origin.path(), 1, &["init", "-q", "--bare", "-b", "main"]);
    git_at(dir, 1, &["remote", "add", "origin", &origin.path().display().to_string()]);
    let image = unique_repository("prune");
    let report = dir.join("report.json");
    let base = 1_700_000_000;

    let c0 = commit(dir, base + 10, "c0");
    build_on(dir, &image, &report, "main");
    git_at(dir, base, &["checkout", "-q", "-b", "feature-b"]);
    let fb = commit(dir, base + 20, "fb");
    build_on(dir, &image, &report, "feature-b");
    git_at(dir, base, &["checkout", "-q", "main"]);
    let c1 = commit(dir, base + 30, "c1");
    build_on(dir, &image, &report, "main");
    let c2 = commit(dir, base + 40, "c2");
    build_on(dir, &image, &report, "main");
    git_at(dir, base, &["checkout", "-q", "-b", "feature-a"]);
    let fa = commit(dir, base + 50, "fa");
    build_on(dir, &image, &report, "feature-a");
    git_at(dir, base, &["push", "-q", "origin", "main", "feature-a", "feature-b"]);
    git_at(dir, base, &["push", "-q", "origin", "--delete", "feature-b"]);

    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let before = registry_tags(REGISTRY, path).unwrap();
    let going: Vec<String> = [
        "cache-runtime.feature-b".to_string(),
        format!("cache-runtime.{fb}"),
        format!("cache-runtime.{c0}"),
        format!("cache-runtime.{c1}"),
    ]
    .into_iter()
    .collect();
    for tag in &going {
        assert!(before.contains(tag), "{tag} was written: {before:?}");
    }

    // The dry run names exactly those, and removes nothing.
    let (stdout, stderr) = prune(dir, &image, false);
    let mut named: Vec<String> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("remove  "))
        .map(|rest| rest.split_whitespace().next().unwrap().rsplit(':').next().unwrap().to_string())
        .collect();
    named.sort();
    let mut expected = going.clone();
    expected.sort();
    assert_eq!(named, expected, "{stdout}");
    assert!(stderr.contains("4 tag(s) would be removed"), "{stderr}");
    assert_eq!(registry_tags(REGISTRY, path).unwrap(), before, "a dry run removed something");

    // --apply removes them, and only them.
    prune(dir, &image, true);
    let after = registry_tags(REGISTRY, path).unwrap();
    let kept: Vec<String> = before.iter().filter(|tag| !going.contains(tag)).cloned().collect();
    assert_eq!(after, kept);
    for tag in [
        "cache-runtime.main".to_string(),
        "cache-runtime".to_string(),
        "cache-runtime.feature-a".to_string(),
        format!("cache-runtime.{c2}"),
        format!("cache-runtime.{fa}"),
    ] {
        assert!(after.contains(&tag), "{tag} must stay: {after:?}");
    }

    // The default branch still builds from its cache.
    git_at(dir, base, &["checkout", "-q", "main"]);
    fresh_runner().unwrap();
    std::fs::write(dir.join("Dockerfile"), format!("{SYNTHETIC_DOCKERFILE}# builds\n")).unwrap();
    build_on(dir, &image, &report, "main");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for stage in report["stages"].as_array().unwrap() {
        assert_eq!(stage["steps_cached"], stage["steps_total"], "{report:#}");
    }
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn prune_cleans_a_local_cache_directory_too() {
    let _serial = serial();
    need_stack("prune_cleans_a_local_cache_directory_too");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path();
    let cache = tempfile::tempdir().unwrap();
    let image = unique_repository("prune-local");
    let report = dir.join("report.json");
    let build = |branch: &str| {
        let output = Command::new(cachefrom_binary())
            .args(["build", "--quiet", "--image", &image, "--branch", branch, "--default-branch", "main"])
            .args(["--backend", &format!("local,dir={}", cache.path().display())])
            .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--report"])
            .arg(&report)
            .arg(dir)
            .args(["--", "--network=none"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{branch}: {}", String::from_utf8_lossy(&output.stderr));
    };
    build("main");
    build("gone-branch");
    let branches = dir.join("branches.txt");
    std::fs::write(&branches, "main\n").unwrap();
    let prune = |apply: bool| {
        let mut command = Command::new(cachefrom_binary());
        command.args(["prune", "--image", &image, "--default-branch", "main", "--branches"]).arg(&branches);
        command.arg("--cache-dir").arg(cache.path());
        if apply {
            command.arg("--apply");
        }
        let output = command.arg(dir).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let folder = cache.path().join(image.replace(['/', ':'], "-"));
    let dry = prune(false);
    assert!(dry.contains("cache-runtime.gone-branch"), "{dry}");
    assert!(folder.join("cache-runtime.gone-branch").is_dir(), "a dry run removes nothing");
    prune(true);
    assert!(!folder.join("cache-runtime.gone-branch").exists());
    assert!(folder.join("cache-runtime.main").is_dir() && folder.join("cache-runtime").is_dir());

    // main still reads its cache.
    fresh_runner().unwrap();
    build("main");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for stage in report["stages"].as_array().unwrap() {
        assert_eq!(stage["steps_cached"], stage["steps_total"], "{report:#}");
    }
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_gone_branch_tag_that_shares_its_manifest_goes_alone() {
    let _serial = serial();
    need_stack("a_gone_branch_tag_that_shares_its_manifest_goes_alone");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path();
    let image = unique_repository("prune-shared");
    let report = dir.join("report.json");
    build_on(dir, &image, &report, "main");
    // A tag copy, as a branch's tag and its commit's tag are: one manifest, two tags.
    let copied = Command::new(cachefrom_binary())
        .args(["copy-tag", &format!("{image}:cache-runtime.main"), &format!("{image}:cache-runtime.gone")])
        .output()
        .unwrap();
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let kept_digest = registry_digest(REGISTRY, path, "cache-runtime.main").unwrap();
    assert_eq!(registry_digest(REGISTRY, path, "cache-runtime.gone").as_deref(), Some(kept_digest.as_str()));

    let branches = dir.join("branches.txt");
    std::fs::write(&branches, "main\n").unwrap();
    let output = Command::new(cachefrom_binary())
        .args(["prune", "--image", &image, "--default-branch", "main", "--apply", "--branches"])
        .arg(&branches)
        .arg(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("the tag alone"), "{stdout}");
    let after = registry_tags(REGISTRY, path).unwrap();
    assert!(!after.contains(&"cache-runtime.gone".to_string()), "{after:?}");
    assert!(after.contains(&"cache-runtime.main".to_string()), "{after:?}");
    assert_eq!(
        registry_digest(REGISTRY, path, "cache-runtime.main"),
        Some(kept_digest.clone()),
        "main's cache changed"
    );
    registry_manifest(REGISTRY, path, &kept_digest).expect("main's manifest is still there");
}
