//! The `cachefrom` command as users meet it: help, exit codes, one clear line for each mistake,
//! and the same plan as `cargo xtask docker` for the same inputs.

use std::process::{Command, Output};

use cachefrom_tests::*;

fn cachefrom(args: &[&str]) -> Output {
    Command::new(cachefrom_binary()).args(args).env_remove("CACHEFROM_IMAGE").output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_explains_every_option() {
    let help = cachefrom(&["build", "--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for option in [
        "--image",
        "--file",
        "--target",
        "--backend",
        "--branch",
        "--default-branch",
        "--tag",
        "--report",
        "--dry-run",
        "--chain",
        "--read-only",
        "--push",
        "--strict-cache",
        "--fallback-to-inline",
        "--cache-dir",
        "CACHEFROM_IMAGE",
        "DOCKER BUILD OPTIONS",
    ] {
        assert!(text.contains(option), "build --help lacks {option}:\n{text}");
    }
    let top = cachefrom(&["--help"]);
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(text.contains("Exit codes: 0 success, 1 the build failed, 2 usage error"), "{text}");
}

#[test]
fn usage_errors_exit_2_with_one_clear_line() {
    let project = example_project();
    let project = project.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["build", "--no-such-option"], "unexpected argument '--no-such-option'"),
        (
            vec!["build", "--image", "127.0.0.1:5000/a", "--dry-run", "-f", "/nonexistent/Dockerfile", project],
            "cannot read the Dockerfile /nonexistent/Dockerfile",
        ),
        (
            vec!["build", "--image", "127.0.0.1:5000/a", "--dry-run", "--target", "nope", project],
            "target stage `nope` not found; the stages are: deps, builder, runtime",
        ),
        (vec!["plan", "--image", "127.0.0.1:5000/a:latest", project], "has a tag"),
        (vec!["plan", "--image", "127.0.0.1:5000/a", "--backend", "zip", project], "unknown backend `zip`"),
        (
            vec!["plan", "--image", "127.0.0.1:5000/a", project, "--", "--target", "x"],
            "`--target` after `--` conflicts",
        ),
        (vec!["stages", "-f", "/nonexistent/Dockerfile"], "cannot read the Dockerfile"),
    ];
    for (args, expected) in cases {
        let output = cachefrom(&args);
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(expected), "{args:?}: expected {expected:?} in:\n{text}");
        let error_lines = text.lines().filter(|line| line.contains("error")).count();
        assert_eq!(error_lines, 1, "{args:?}: one line, not:\n{text}");
    }
}

#[test]
fn environment_errors_exit_3_and_say_what_to_do() {
    let project = example_project();
    let project = project.to_str().unwrap();
    let no_docker = Command::new(cachefrom_binary())
        .args(["build", "--image", "127.0.0.1:5000/a", project])
        .env("CACHEFROM_DOCKER", "/nonexistent/docker")
        .output()
        .unwrap();
    assert_eq!(no_docker.status.code(), Some(3), "{}", stderr(&no_docker));
    assert!(
        stderr(&no_docker).contains("`/nonexistent/docker` was not found; install the Docker CLI"),
        "{}",
        stderr(&no_docker)
    );

    let no_daemon = Command::new(cachefrom_binary())
        .args(["build", "--image", "127.0.0.1:5000/a", project])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    assert_eq!(no_daemon.status.code(), Some(3), "{}", stderr(&no_daemon));
    let text = stderr(&no_daemon);
    assert!(text.contains("the Docker daemon does not answer at unix:///nonexistent/docker.sock"), "{text}");
    assert!(text.contains("point DOCKER_HOST at one that runs"), "{text}");
    assert!(!text.contains("xtask"), "the library speaks of its own commands only: {text}");
}

#[test]
fn stages_json_has_the_documented_shape() {
    let output = cachefrom(&["stages", "--json", example_project().to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["build_order"], serde_json::json!(["deps", "builder", "runtime"]));
    assert_eq!(
        json["stages"][1],
        serde_json::json!({"index": 1, "name": "builder", "base": "deps", "depends_on": ["deps"], "external_images": []})
    );
    assert_eq!(json["stages"][0]["base"], "docker.io/library/rust:1.85-slim-bookworm");
    let with_args = cachefrom(&[
        "stages",
        "--json",
        "--target",
        "builder",
        "--build-arg",
        &format!("RUST_IMAGE={RUST_BASE_IMAGE}"),
        example_project().to_str().unwrap(),
    ]);
    let json: serde_json::Value = serde_json::from_slice(&with_args.stdout).unwrap();
    assert_eq!(json["build_order"], serde_json::json!(["deps", "builder"]));
    assert_eq!(json["stages"][0]["base"], RUST_BASE_IMAGE);
}

#[test]
fn xtask_docker_and_cachefrom_build_plan_the_same() {
    let project = example_project();
    let mut args: Vec<String> =
        ["plan", "--json", "--image", "127.0.0.1:5000/example-app", "--branch", "main", "--default-branch", "main"]
            .map(String::from)
            .to_vec();
    for (name, value) in example_build_args() {
        args.extend(["--build-arg".to_string(), format!("{name}={value}")]);
    }
    args.push(project.display().to_string());
    args.push("--".to_string());
    args.extend(example_docker_args());
    let cli = Command::new(cachefrom_binary()).args(&args).env_remove("CI").output().unwrap();
    assert!(cli.status.success(), "{}", stderr(&cli));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let xtask = Command::new(cargo)
        .args(["xtask", "docker", "--dry-run", "--json", "--branch", "main", "--default-branch", "main"])
        .current_dir(repository_root())
        .env_remove("CI")
        .output()
        .unwrap();
    assert!(xtask.status.success(), "{}", stderr(&xtask));
    let mut cli: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    let mut xtask: serde_json::Value = serde_json::from_slice(&xtask.stdout).unwrap();
    // Each process has a scratch directory of its own.
    for plan in [&mut cli, &mut xtask] {
        let work_dir = plan.as_object_mut().unwrap().remove("work_dir").unwrap();
        assert!(work_dir.as_str().unwrap().contains("/cachefrom/example-app-"), "{work_dir}");
    }
    assert_eq!(cli, xtask);
    assert_eq!(cli["stages"].as_array().unwrap().len(), 3);
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let output = cachefrom(&["--version"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let head = git(&repository_root(), &["rev-parse", "--short=12", "HEAD"]).unwrap().trim().to_string();
    assert!(version.starts_with("cachefrom "), "{version}");
    assert!(version.contains(&format!(" (commit {head}")), "{version}");
}
