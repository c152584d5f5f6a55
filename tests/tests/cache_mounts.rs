//! End-to-end: the contents of `RUN --mount=type=cache` kept across fresh runners. A seed run
//! saves the mount beside the caches; on a fresh runner a one-file edit compiles that one file
//! and the image is right; unchanged contents are not uploaded again; a fork's pull request
//! restores and writes nothing; a failed later step still saves what the compile left; a saved
//! mount whose archive is gone is one warning and a normal build. Registry and local backends.

use std::path::Path;
use std::process::{Command, Output};

use cachefrom_tests::*;

const STORAGE: &str = "/var/lib/cachefrom-stack/registry/docker/registry/v2/blobs/sha256";

struct Run {
    output: Output,
    report: serde_json::Value,
}

impl Run {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    fn mount(&self) -> &serde_json::Value {
        &self.report["mounts"][0]
    }
}

fn build(dir: &Path, image: &str, extra: &[&str]) -> Run {
    let report = dir.join("report.json");
    let mut args: Vec<String> = ["build", "--image", image, "--branch", "main", "--default-branch", "main"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--build-arg".into(), format!("BASE={RUNTIME_BASE_IMAGE}"), "--report".into()]);
    args.push(report.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend([dir.display().to_string(), "--".into(), "--network=none".into()]);
    let (output, report) = cachefrom_reporting(&args, &report);
    Run { output, report }
}

/// What the image's compile step compiled, one file a line.
fn compiled(tag: &str) -> Vec<String> {
    let text = duct::cmd!("timeout", "120", "docker", "run", "--rm", "--network=none", tag, "cat", "/compiled")
        .read()
        .unwrap();
    text.lines().map(str::to_string).collect()
}

fn app(tag: &str) -> String {
    duct::cmd!("timeout", "120", "docker", "run", "--rm", "--network=none", tag, "cat", "/app").read().unwrap()
}

fn mount_tags(path: &str) -> Vec<String> {
    let url = format!("http://{REGISTRY}/v2/{path}/tags/list");
    let body = duct::cmd!("curl", "-sf", url).read().unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    value["tags"]
        .as_array()
        .map(|tags| {
            tags.iter()
                .filter_map(|tag| tag.as_str())
                .filter(|tag| tag.starts_with("cachemount-"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_cache_mount_is_kept_across_fresh_runners_with_the_registry() {
    let _serial = serial();
    need_stack("a_cache_mount_is_kept_across_fresh_runners_with_the_registry");
    let project = mount_project(6).unwrap();
    let dir = project.path();
    let image = unique_repository("mounts");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap().to_string();
    let tag = format!("{image}:v1");
    let local = ["--tag", tag.as_str()];

    // Seed, on a fresh runner: every file compiled, the mount saved at the run's levels.
    fresh_runner().unwrap();
    let seed = build(dir, &image, &local);
    assert!(seed.output.status.success(), "{}", seed.stderr());
    assert_eq!(compiled(&tag).len(), 6);
    let mount = seed.mount();
    assert_eq!(mount["id"], "objs", "{:#}", seed.report);
    assert!(mount["restored_from"].is_null(), "{:#}", seed.report);
    assert!(mount["save_bytes"].as_u64().unwrap() > 0, "{:#}", seed.report);
    let tags = mount_tags(&path);
    assert!(tags.iter().any(|tag| tag.starts_with("cachemount-objs--") && tag.ends_with(".main")), "{tags:?}");
    assert_eq!(tags.len(), 3, "branch, commit and unprefixed: {tags:?}");
    let manifest = registry_manifest(REGISTRY, &path, tags.iter().find(|tag| tag.ends_with(".main")).unwrap()).unwrap();
    assert_eq!(manifest["artifactType"], "application/vnd.dev.cachefrom.cache-mount.v1", "{manifest:#}");

    // A fresh runner and a one-file edit: that file alone compiles, and the image is right.
    std::fs::write(dir.join("src/f03.txt"), "source 3, edited\n").unwrap();
    fresh_runner().unwrap();
    let edit = build(dir, &image, &local);
    assert!(edit.output.status.success(), "{}", edit.stderr());
    assert_eq!(compiled(&tag), vec!["/src/f03.txt".to_string()], "{}", edit.stderr());
    assert!(app(&tag).contains("source 3, edited"));
    let mount = edit.mount();
    assert!(mount["restored_from"].as_str().unwrap().contains("cachemount-objs--"), "{:#}", edit.report);
    assert!(mount["restore_bytes"].as_u64().unwrap() > 0);
    assert!(mount["cold_step_seconds"].as_f64().is_some(), "{:#}", edit.report);
    assert!(edit.stderr().contains("mount /objs: restored from"), "{}", edit.stderr());

    // The same again on a fresh runner: the compile step is a layer hit, the mount unchanged:
    // nothing is uploaded.
    fresh_runner().unwrap();
    let again = build(dir, &image, &local);
    assert!(again.output.status.success(), "{}", again.stderr());
    assert_eq!(again.mount()["save_bytes"], 0, "{:#}", again.report);
    // Every step hit: what they saved (their recorded seconds) against what importing cost.
    let saved = again.report["saved_seconds"].as_f64().expect("the hits' recorded seconds");
    assert!(saved > 0.0, "{:#}", again.report);
    assert!(again.report["import_seconds"].as_f64().is_some(), "{:#}", again.report);
    assert!(again.stderr().contains("the hits saved"), "{}", again.stderr());

    // explain says where the mount would come from.
    let explained = Command::new(cachefrom_binary())
        .args(["explain", "--image", &image, "--branch", "main", "--default-branch", "main"])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}")])
        .arg(dir)
        .args(["--", "--network=none"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(text.contains("build: mount /objs would be restored from"), "{text}");

    // A fork's pull request (read-only): restores, compiles the edit, writes nothing.
    let before: Vec<Option<String>> = tags.iter().map(|tag| registry_digest(REGISTRY, &path, tag)).collect();
    std::fs::write(dir.join("src/f04.txt"), "source 4, from a fork\n").unwrap();
    fresh_runner().unwrap();
    let fork = build(dir, &image, &["--tag", tag.as_str(), "--read-only"]);
    assert!(fork.output.status.success(), "{}", fork.stderr());
    assert_eq!(compiled(&tag), vec!["/src/f04.txt".to_string()]);
    assert!(fork.mount()["saved_to"].as_array().unwrap().is_empty(), "{:#}", fork.report);
    let after: Vec<Option<String>> = tags.iter().map(|tag| registry_digest(REGISTRY, &path, tag)).collect();
    assert_eq!(before, after, "a read-only run wrote a mount");
    assert_eq!(mount_tags(&path).len(), 3);

    // A later step fails: what the compile left in the mount is saved all the same.
    std::fs::write(dir.join("src/f05.txt"), "source 5, edited before a failure\n").unwrap();
    fresh_runner().unwrap();
    let failed = build(dir, &image, &["--tag", tag.as_str(), "--build-arg", "FAIL=1"]);
    assert_eq!(failed.output.status.code(), Some(1), "{}", failed.stderr());
    assert!(failed.mount()["save_bytes"].as_u64().unwrap() > 0, "{:#}", failed.report);
    fresh_runner().unwrap();
    let fixed = build(dir, &image, &local);
    assert!(fixed.output.status.success(), "{}", fixed.stderr());
    // The failed run compiled f04 (the fork's, never saved) and f05, and saved both.
    assert_eq!(compiled(&tag), Vec::<String>::new(), "{}", fixed.stderr());

    // The saved archive is gone from the registry: one warning, a build from an empty mount.
    let manifest = registry_manifest(REGISTRY, &path, tags.iter().find(|tag| tag.ends_with(".main")).unwrap()).unwrap();
    let digest = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::remove_file(format!("{STORAGE}/{}/{hex}/data", &hex[..2])).unwrap();
    std::fs::write(dir.join("src/f00.txt"), "source 0, edited\n").unwrap();
    fresh_runner().unwrap();
    let broken = build(dir, &image, &local);
    assert!(broken.output.status.success(), "{}", broken.stderr());
    let warnings = broken.stderr().matches("was not restored").count();
    assert_eq!(warnings, 1, "one warning: {}", broken.stderr());
    assert_eq!(compiled(&tag).len(), 6, "an empty mount compiles everything");
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_cache_mount_is_kept_in_the_local_directory_and_can_be_turned_off() {
    let _serial = serial();
    need_stack("a_cache_mount_is_kept_in_the_local_directory_and_can_be_turned_off");
    let project = mount_project(4).unwrap();
    let dir = project.path();
    let cache = tempfile::tempdir().unwrap();
    let image = unique_repository("mounts-local");
    let tag = format!("{image}:v1");
    let backend = format!("local,dir={}", cache.path().display());
    let args = ["--tag", tag.as_str(), "--backend", backend.as_str()];

    fresh_runner().unwrap();
    let seed = build(dir, &image, &args);
    assert!(seed.output.status.success(), "{}", seed.stderr());
    let saved: Vec<String> =
        seed.mount()["saved_to"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    assert_eq!(saved.len(), 3, "{:#}", seed.report);
    for file in &saved {
        assert!(Path::new(file).is_file(), "{file}");
        assert!(file.ends_with(".tar.gz"), "{file}");
    }

    std::fs::write(dir.join("src/f01.txt"), "source 1, edited\n").unwrap();
    fresh_runner().unwrap();
    let edit = build(dir, &image, &args);
    assert!(edit.output.status.success(), "{}", edit.stderr());
    assert_eq!(compiled(&tag), vec!["/src/f01.txt".to_string()], "{}", edit.stderr());

    // The saved files are not archives any more (a disk that cut them, a hostile neighbour):
    // one warning, a build from an empty mount, and the files written again.
    for file in &saved {
        std::fs::write(file, b"not an archive").unwrap();
    }
    std::fs::write(dir.join("src/f03.txt"), "source 3, edited\n").unwrap();
    fresh_runner().unwrap();
    let corrupt = build(dir, &image, &args);
    assert!(corrupt.output.status.success(), "{}", corrupt.stderr());
    let stderr = corrupt.stderr();
    let warnings: Vec<&str> = stderr.lines().filter(|line| line.contains("was not restored")).collect();
    assert_eq!(warnings.len(), 1, "one warning: {stderr}");
    assert!(warnings[0].contains("it is not a gzip archive; it starts empty"), "{}", warnings[0]);
    assert_eq!(compiled(&tag).len(), 4, "an empty mount compiles everything");
    for file in &saved {
        assert_eq!(&std::fs::read(file).unwrap()[..2], &[0x1f, 0x8b], "{file} written again");
    }

    // Turned off: nothing restored, everything compiles, the plan says why.
    std::fs::write(dir.join("src/f02.txt"), "source 2, edited\n").unwrap();
    fresh_runner().unwrap();
    let mut off_args = args.to_vec();
    off_args.extend(["--cache-mounts", "off"]);
    let off = build(dir, &image, &off_args);
    assert!(off.output.status.success(), "{}", off.stderr());
    assert_eq!(compiled(&tag).len(), 4);
    assert!(off.stderr().contains("cache mounts are not kept across runners: turned off"), "{}", off.stderr());
}

/// Release tooling that composes the three functions itself, with the mounts around them.
fn composed(dir: &Path, image: &str, tag: &str) -> (cachefrom::report::RunReport, Vec<cachefrom::report::MountReport>) {
    use cachefrom::exec::{pull_cached, CacheMounts, PushGuard};
    let mut settings = cachefrom::settings::Settings::new(image, dir);
    settings.branch = Some("main".to_string());
    settings.default_branch = Some("main".to_string());
    settings.build_args = vec![("BASE".to_string(), RUNTIME_BASE_IMAGE.to_string())];
    settings.docker_args = vec!["--network=none".to_string()];
    settings.tags = vec![tag.to_string()];
    let options = settings.plan_options(&cachefrom::ci::Environment::default()).unwrap();
    let plan = cachefrom::plan::Plan::new(&options).unwrap();
    let ctx = plain_context();
    let resolution = pull_cached(&ctx, &plan).unwrap();
    let mounts = CacheMounts::restore(&ctx, &plan);
    assert!(mounts.warnings().is_empty(), "{:?}", mounts.warnings());
    let mut guard = PushGuard::new(&ctx, &plan, &resolution);
    for stage in &plan.stages {
        guard.build(stage).unwrap();
    }
    let report = guard.finish().unwrap();
    let saved = mounts.save(&ctx, &plan, &report.stages, report.success);
    (report, saved)
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn library_users_who_compose_the_three_functions_keep_the_mounts_too() {
    let _serial = serial();
    need_stack("library_users_who_compose_the_three_functions_keep_the_mounts_too");
    let project = mount_project(4).unwrap();
    let dir = project.path();
    let image = unique_repository("mounts-library");
    let tag = format!("{image}:v1");

    fresh_runner().unwrap();
    let (seed, saved) = composed(dir, &image, &tag);
    assert!(seed.success);
    assert_eq!(compiled(&tag).len(), 4);
    assert_eq!(saved.len(), 1, "{saved:#?}");
    assert!(saved[0].restored_from.is_none() && saved[0].save_bytes > 0, "{saved:#?}");

    std::fs::write(dir.join("src/f01.txt"), "source 1, edited\n").unwrap();
    fresh_runner().unwrap();
    let (edit, restored) = composed(dir, &image, &tag);
    assert!(edit.success);
    assert_eq!(compiled(&tag), vec!["/src/f01.txt".to_string()]);
    assert!(app(&tag).contains("source 1, edited"));
    assert!(
        restored[0].restored_from.as_deref().is_some_and(|from| from.contains("cachemount-objs--")),
        "{restored:#?}"
    );
}
