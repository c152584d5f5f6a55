//! Runs of one image at once on one host (two CI jobs on one machine, a retried job) leave one
//! complete, readable cache: each run has its own scratch space, and a cache is put in place in
//! one step, so the last complete writer wins and no tag or folder is ever missing.

use std::process::{Command, Output};

use cachefrom_tests::*;

fn build(dir: &std::path::Path, image: &str, report: &std::path::Path, backend: &str) -> Command {
    let mut command = Command::new(cachefrom_binary());
    command
        .args(["build", "--quiet", "--image", image, "--branch", "main", "--default-branch", "main"])
        .args(["--backend", backend, "--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--report"])
        .arg(report)
        .arg(dir)
        .args(["--", "--network=none"]);
    command
}

fn together(commands: Vec<Command>) -> Vec<Output> {
    let children: Vec<_> = commands
        .into_iter()
        .map(|mut command| {
            command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    children.into_iter().map(|child| child.wait_with_output().unwrap()).collect()
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn concurrent_runs_leave_one_complete_cache() {
    let _serial = serial();
    need_stack("concurrent_runs_leave_one_complete_cache");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let shared = tempfile::tempdir().unwrap();
    for backend in [format!("local,dir={}", shared.path().display()), "registry".to_string()] {
        let image = unique_repository("concurrent");
        // Cold, as CI jobs start: the runs race from the first step.
        fresh_runner().unwrap();
        let reports: Vec<_> = (0..3).map(|i| project.path().join(format!("report-{i}.json"))).collect();
        let outputs = together(reports.iter().map(|report| build(project.path(), &image, report, &backend)).collect());
        for output in &outputs {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{backend}: {stderr}");
            assert!(!stderr.contains("warning"), "{backend}: a run lost its cache write: {stderr}");
        }
        // The cache they leave is whole: a fresh runner hits every step.
        fresh_runner().unwrap();
        let last = build(project.path(), &image, &reports[0], &backend).output().unwrap();
        assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&reports[0]).unwrap()).unwrap();
        for stage in report["stages"].as_array().unwrap() {
            assert_eq!(stage["steps_cached"], stage["steps_total"], "{backend}: {report:#}");
        }
        let leftovers: Vec<_> = walk(shared.path()).into_iter().filter(|path| path.contains(".partial")).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        found.push(entry.path().display().to_string());
        if entry.path().is_dir() {
            found.extend(walk(&entry.path()));
        }
    }
    found
}
