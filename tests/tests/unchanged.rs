//! End-to-end: a rerun whose inputs are those recorded on the cache it would write builds
//! nothing; it tags the image that was built from them and copies the cache's tags. Any change
//! docker would send (a source edit) builds again; a change `.dockerignore` leaves out does not;
//! a run that wants a local image always builds.

use std::path::Path;
use std::process::Output;

use cachefrom_tests::*;

fn build(dir: &Path, image: &str, extra: &[&str]) -> (Output, serde_json::Value) {
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let output = cachefrom_build(dir, image, &report, extra);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (output, report)
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_rerun_with_the_same_inputs_builds_nothing_and_any_change_builds() {
    let _serial = serial();
    need_stack("a_rerun_with_the_same_inputs_builds_nothing_and_any_change_builds");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path();
    std::fs::write(dir.join(".dockerignore"), "*.log\n").unwrap();
    let image = unique_repository("unchanged");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap().to_string();
    let tag = format!("{image}:v1");
    let push = ["--tag", tag.as_str(), "--push"];

    // The first run builds on a fresh runner (as CI runners start), and records its inputs and
    // image on the cache it exports. (Seen here: a runner whose build cache still held results
    // pulled lazily from another registry, since stopped, exported a cache without their layers;
    // BuildKit skips what it cannot fetch.)
    fresh_runner().unwrap();
    let (_, first) = build(dir, &image, &push);
    assert!(first.get("unchanged").is_none(), "{first:#}");
    let manifest = registry_manifest(REGISTRY, &path, "cache-runtime.main").unwrap();
    let annotations = &manifest["annotations"];
    assert!(annotations["dev.cachefrom.inputs"].as_str().unwrap().starts_with("sha256:"), "{manifest:#}");
    let built = registry_digest(REGISTRY, &path, "v1").unwrap();
    assert_eq!(annotations["dev.cachefrom.image"], built.as_str());
    let seeded_config = manifest["config"]["digest"].clone();

    // A fresh runner, nothing changed: nothing is built, the same image keeps its tag, a new tag
    // points at it, and the cache's tags are written.
    fresh_runner().unwrap();
    let second_tag = format!("{image}:v2");
    let (output, second) = build(dir, &image, &["--tag", &tag, "--tag", &second_tag, "--push"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(second["unchanged"].as_str().unwrap().contains("cache-runtime.main"), "{second:#}");
    assert!(!stderr.contains("docker buildx build"), "nothing was built:\n{stderr}");
    for stage in second["stages"].as_array().unwrap() {
        assert_eq!(stage["status"], "unchanged", "{second:#}");
        assert_eq!(stage["steps_cached"], stage["steps_total"], "{second:#}");
    }
    assert_eq!(registry_digest(REGISTRY, &path, "v1").as_deref(), Some(built.as_str()));
    assert_eq!(registry_digest(REGISTRY, &path, "v2").as_deref(), Some(built.as_str()));
    let content = duct::cmd!("timeout", "120", "docker", "run", "--rm", "--network=none", &second_tag, "cat", "/app")
        .read()
        .unwrap();
    assert_eq!(content, "fn main");

    // A file .dockerignore leaves out changes nothing docker sends.
    std::fs::write(dir.join("build.log"), "noise\n").unwrap();
    fresh_runner().unwrap();
    let (_, ignored) = build(dir, &image, &push);
    assert!(ignored["unchanged"].is_string(), "{ignored:#}");

    // A run that wants a local image (tags, no push) builds.
    fresh_runner().unwrap();
    let (_, local) = build(dir, &image, &["--tag", &tag]);
    assert!(local.get("unchanged").is_none(), "{local:#}");
    // Every step hit: the cache keeps every result of the one it read (BuildKit's own export of
    // such a build can lack the results it never loaded).
    let after = registry_manifest(REGISTRY, &path, "cache-runtime.main").unwrap();
    assert_eq!(after["config"]["digest"], seeded_config, "{after:#}");

    // A source edit builds again: the dependency stage from the cache, the builder stage anew.
    std::fs::write(dir.join("src/main.txt"), "fn main2\n").unwrap();
    fresh_runner().unwrap();
    let (_, edited) = build(dir, &image, &push);
    assert!(edited.get("unchanged").is_none(), "{edited:#}");
    let builder = edited["stages"].as_array().unwrap().iter().find(|stage| stage["name"] == "builder").unwrap();
    assert!(builder["steps_cached"].as_u64() < builder["steps_total"].as_u64(), "{edited:#}");
    let deps = edited["stages"].as_array().unwrap().iter().find(|stage| stage["name"] == "deps").unwrap();
    assert_eq!(deps["steps_cached"], deps["steps_total"], "{edited:#}");
    assert_ne!(registry_digest(REGISTRY, &path, "v1").as_deref(), Some(built.as_str()));
}
