//! A shared remote engine, as teams use one when they outgrow a runner: a second Docker engine
//! on this machine (its own socket and data root) reached through `DOCKER_HOST`, a docker
//! context, and `-- --builder NAME`. The report names the engine that built; a cache it writes
//! is read by the local engine, and the other way round.

use std::path::Path;

use cachefrom_tests::*;

fn build(dir: &Path, image: &str, env: &[(&str, &str)], docker: &[&str]) -> serde_json::Value {
    let report = dir.join("report.json");
    let mut command = std::process::Command::new(cachefrom_binary());
    command
        .args(["build", "--quiet", "--image", image, "--branch", "main", "--default-branch", "main"])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--report"])
        .arg(&report)
        .arg(dir)
        .args(["--", "--network=none"])
        .args(docker)
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_CONTEXT");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

/// A source edit: the dependency stage comes from the cache, the rest builds.
fn deps_from_cache(report: &serde_json::Value, what: &str) {
    let counts = stage_counts(report);
    assert_eq!(counts[0], ("deps".to_string(), 2, 2), "{what}: {report:#}");
    assert!(counts[1].1 < counts[1].2, "{what}: the builder stage saw the edit: {report:#}");
}

fn engine_of(report: &serde_json::Value) -> String {
    report["engine"].as_str().unwrap_or_default().to_string()
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_remote_engine_builds_and_shares_its_caches_with_the_local_one() {
    let _serial = serial();
    need_stack("a_remote_engine_builds_and_shares_its_caches_with_the_local_one");
    let remote = SecondEngine::start().unwrap();
    let remote_root = remote.root.display().to_string();
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path();
    let image = unique_repository("remote");
    let host = remote.host();
    let edit = |text: &str| std::fs::write(dir.join("src/main.txt"), text).unwrap();

    // The remote engine (DOCKER_HOST) writes the cache; the report names it, not the local one.
    remote.fresh().unwrap();
    let seeded = build(dir, &image, &[("DOCKER_HOST", &host)], &[]);
    assert!(engine_of(&seeded).contains(&format!("root {remote_root},")), "{seeded:#}");

    // The local engine, fresh, reads what the remote one wrote.
    edit("fn main2\n");
    fresh_runner().unwrap();
    let local = build(dir, &image, &[], &[]);
    assert!(!engine_of(&local).contains(&remote_root), "{local:#}");
    deps_from_cache(&local, "local engine reading the remote engine's cache");

    // The other way round, through a docker context: the remote engine reads the local cache.
    edit("fn main3\n");
    remote.fresh().unwrap();
    let by_context = build(dir, &image, &[("DOCKER_CONTEXT", &remote.context)], &[]);
    assert!(engine_of(&by_context).contains(&remote_root), "{by_context:#}");
    deps_from_cache(&by_context, "remote engine (docker context) reading the local engine's cache");

    // `-- --builder NAME`, NAME the docker driver of the remote context.
    edit("fn main4\n");
    remote.fresh().unwrap();
    let by_builder = build(dir, &image, &[], &["--builder", &remote.context]);
    assert!(engine_of(&by_builder).contains(&remote_root), "{by_builder:#}");
    deps_from_cache(&by_builder, "remote engine (--builder) reading the cache");
}
