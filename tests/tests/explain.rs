//! `cachefrom explain` and the report's `miss_reason`/`miss`, on the real engine and registry:
//! the records written beside the caches (never a build argument's value), and the first
//! instruction that missed named with why: files, a build argument, no cache at all. For the
//! registry, local and tarball backends.

use std::path::Path;
use std::process::Output;

use cachefrom_tests::*;

const DOCKERFILE: &str = "\
ARG BASE
FROM ${BASE} AS deps
COPY deps.txt /deps.txt
RUN cat /deps.txt > /deps
FROM deps AS app
ARG PROFILE=release
COPY src /src
RUN echo \"$PROFILE\" > /profile && cat /src/main.txt > /app
";

const PROFILE: &str = "PROFILE=distinctive-profile-4711";

fn cachefrom(command: &str, dir: &Path, image: &str, extra: &[&str]) -> Output {
    std::process::Command::new(cachefrom_binary())
        .args([command, "--image", image, "--branch", "main", "--default-branch", "main"])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}")])
        .args(extra)
        .arg(dir)
        .args(["--", "--network=none"])
        .output()
        .unwrap()
}

fn explain(dir: &Path, image: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json"];
    args.extend(extra);
    let output = cachefrom("explain", dir, image, &args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn build(dir: &Path, image: &str, extra: &[&str]) -> serde_json::Value {
    let report = dir.join("report.json");
    let mut args = vec!["--report", report.to_str().unwrap()];
    args.extend(extra);
    let output = cachefrom("build", dir, image, &args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

fn stage<'a>(json: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    json["stages"].as_array().unwrap().iter().find(|stage| stage["name"] == name || stage["stage"] == name).unwrap()
}

fn scenario(backend: &str) {
    let project = synthetic_project(DOCKERFILE).unwrap();
    let dir = project.path();
    let image = unique_repository(&format!("explain-{}", backend.split(',').next().unwrap()));
    let backend_args = ["--backend", backend];
    let with = |more: &[&'static str]| -> Vec<&str> {
        let mut all: Vec<&str> = backend_args.to_vec();
        all.extend(["--build-arg", PROFILE]);
        all.extend(more);
        all
    };

    // Nothing written yet: every stage would miss for want of a cache.
    let cold = explain(dir, &image, &with(&[]));
    assert_eq!(stage(&cold, "deps")["would_hit"], false, "{cold:#}");
    assert_eq!(stage(&cold, "deps")["miss"]["kind"], "no-cache", "{cold:#}");

    fresh_runner().unwrap();
    let seed = build(dir, &image, &with(&[]));
    assert_eq!(stage(&seed, "deps")["miss"]["kind"], "no-cache", "{seed:#}");

    // The records are there, without the argument's value.
    if backend == "registry" {
        let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
        let manifest = registry_manifest(REGISTRY, path, "cache-app.main").unwrap();
        let records = manifest["annotations"]["dev.cachefrom.stages"].as_str().unwrap();
        assert!(records.contains("COPY src /src"), "{records}");
        assert!(!records.contains("distinctive-profile"), "a build argument's value is never recorded: {records}");
    }
    let warm = explain(dir, &image, &with(&[]));
    for name in ["deps", "app"] {
        assert_eq!(stage(&warm, name)["would_hit"], true, "{warm:#}");
    }

    // Another value of the argument: the RUN after it.
    let other = explain(dir, &image, &[backend_args.as_slice(), &["--build-arg", "PROFILE=dev"]].concat());
    let app = &stage(&other, "app")["miss"];
    assert_eq!((app["kind"].as_str(), app["arg"].as_str()), (Some("arg"), Some("PROFILE")), "{other:#}");
    assert!(app["step"].as_str().unwrap().starts_with("RUN echo"), "{other:#}");
    assert_eq!(stage(&other, "deps")["would_hit"], true, "{other:#}");

    // A source edit: explain names the file; the build's report says the same.
    std::fs::write(dir.join("src/main.txt"), "fn main2\n").unwrap();
    let edited = explain(dir, &image, &with(&[]));
    let app = &stage(&edited, "app")["miss"];
    assert_eq!(app["kind"], "files", "{edited:#}");
    assert_eq!(app["files"], serde_json::json!(["src/main.txt"]), "{edited:#}");
    assert_eq!(app["step"], "COPY src /src", "{edited:#}");
    fresh_runner().unwrap();
    let built = build(dir, &image, &with(&[]));
    let app = stage(&built, "app");
    assert_eq!(app["miss"]["kind"], "files", "{built:#}");
    assert!(app["miss_reason"].as_str().unwrap().contains("src/main.txt"), "{built:#}");
    assert_eq!(stage(&built, "deps")["steps_cached"], 2, "{built:#}");
    assert!(stage(&built, "deps").get("miss").is_none(), "a stage that hit has no miss: {built:#}");
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn explain_and_the_report_say_why_a_stage_missed() {
    let _serial = serial();
    need_stack("explain_and_the_report_say_why_a_stage_missed");
    scenario("registry");
    let cache = tempfile::tempdir().unwrap();
    scenario(&format!("local,dir={}", cache.path().display()));
    let tarballs = tempfile::tempdir().unwrap();
    scenario(&format!("tarball,dir={}", tarballs.path().display()));
}
