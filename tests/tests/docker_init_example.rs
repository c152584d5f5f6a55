//! End-to-end, the Rust path: example-project's `Dockerfile.docker-init` (docker init's style:
//! bind mounts for the sources, cache mounts for `target/` and cargo's registry) on fresh
//! runners. The seed compiles everything and saves the mounts; after a source edit, on a fresh
//! runner, cargo compiles the application alone (the dependencies come from the restored
//! `target/`, their mtimes kept), the image's smoke test runs, and the report says what the mount
//! saved.

use cachefrom_tests::*;

fn build(dir: &std::path::Path, image: &str) -> (std::process::Output, serde_json::Value) {
    let report = dir.join("report.json");
    let mut args: Vec<String> = ["build", "--image", image, "--branch", "main", "--default-branch", "main"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["-f".into(), dir.join("Dockerfile.docker-init").display().to_string()]);
    args.extend(["--tag".into(), format!("{image}:v1"), "--report".into(), report.display().to_string()]);
    for (name, value) in example_build_args() {
        args.extend(["--build-arg".into(), format!("{name}={value}")]);
    }
    args.push(dir.display().to_string());
    args.push("--".into());
    args.extend(example_docker_args());
    cachefrom_reporting(&args, &report)
}

fn mount<'a>(report: &'a serde_json::Value, target: &str) -> &'a serde_json::Value {
    report["mounts"]
        .as_array()
        .and_then(|mounts| mounts.iter().find(|mount| mount["target"] == target))
        .unwrap_or_else(|| panic!("no mount {target}: {report:#}"))
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_source_edit_compiles_the_application_alone_on_a_fresh_runner() {
    let _serial = serial();
    need_stack("a_source_edit_compiles_the_application_alone_on_a_fresh_runner");
    let repo = example_repository_copy().unwrap();
    let dir = repo.path();
    let image = unique_repository("docker-init");

    fresh_runner().unwrap();
    let (seed, seeded) = build(dir, &image);
    let stderr = String::from_utf8_lossy(&seed.stderr);
    assert!(seed.status.success(), "{stderr}");
    assert!(stderr.contains("Compiling serde "), "the seed compiles the dependencies:\n{stderr}");
    let target = mount(&seeded, "/app/target/");
    assert!(target["save_bytes"].as_u64().unwrap() > 0, "{seeded:#}");
    assert!(mount(&seeded, "/usr/local/cargo/registry/")["save_bytes"].as_u64().unwrap() > 0, "{seeded:#}");

    change_source(dir, "docker init edit").unwrap();
    fresh_runner().unwrap();
    let (edit, edited) = build(dir, &image);
    let stderr = String::from_utf8_lossy(&edit.stderr);
    assert!(edit.status.success(), "the image's smoke test runs:\n{stderr}");
    assert!(stderr.contains("Compiling example-app"), "{stderr}");
    assert!(!stderr.contains("Compiling serde "), "the dependencies were restored, not compiled:\n{stderr}");
    let target = mount(&edited, "/app/target/");
    assert!(target["restored_from"].as_str().unwrap().contains("cachemount-app-target--"), "{edited:#}");
    let saved = target["saved_seconds"].as_f64().expect("what the mount saved is reported");
    assert!(saved > 0.0, "{edited:#}");
    assert!(stderr.contains("mount /app/target/: restored from"), "{stderr}");
}
