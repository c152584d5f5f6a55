//! CI cancels a job with SIGINT or SIGTERM (GitHub: SIGINT, ~7.5 s later SIGTERM, then SIGKILL),
//! to the whole process group or to the step's process. cachefrom stops the running build,
//! writes the caches of the stages that finished and a report marked cancelled, and exits
//! 130/143 within 10 s, leaving no process behind.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cachefrom_tests::*;

/// Processes whose command line mentions `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

fn cancel_with(signal: i32, to_group: bool) {
    let project = synthetic_project(SLOW_DOCKERFILE).unwrap();
    let image = unique_repository("cancel");
    let report = project.path().join("report.json");
    let mut child = Command::new(cachefrom_binary())
        .args(["build", "--image", &image, "--branch", "main", "--default-branch", "main"])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--report"])
        .arg(&report)
        .arg(project.path())
        .args(["--", "--network=none"])
        .env("CI", "true")
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let started = StartedBuild::wait_for_slow_step(&mut child);
    let signalled = Instant::now();
    // SAFETY: kill(2) on the process (group) this test started.
    unsafe {
        libc::kill(if to_group { -pid } else { pid }, signal);
    }
    let status = child.wait().unwrap();
    let took = signalled.elapsed();
    let log = started.all_lines().join("\n");
    assert_eq!(status.code(), Some(128 + signal), "{log}");
    assert!(took < Duration::from_secs(10), "took {took:?} after the signal:\n{log}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let by = if signal == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
    assert_eq!(report["cancelled"], by, "{report:#}");
    assert_eq!(report["success"], false);
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let tags = registry_tags(REGISTRY, path).unwrap();
    assert!(tags.contains(&"cache-deps.main".to_string()), "the finished stage's cache was written: {tags:?}\n{log}");
    assert!(!tags.iter().any(|tag| tag.starts_with("cache-slow")), "{tags:?}");
    std::thread::sleep(Duration::from_millis(500));
    let left = processes_with(&image);
    assert!(left.is_empty(), "processes outlived cachefrom: {left:?}");
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn sigterm_to_the_process_group_writes_what_finished() {
    let _serial = serial();
    need_stack("sigterm_to_the_process_group_writes_what_finished");
    cancel_with(libc::SIGTERM, true);
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn sigint_to_cachefrom_alone_stops_its_build_and_writes_what_finished() {
    let _serial = serial();
    need_stack("sigint_to_cachefrom_alone_stops_its_build_and_writes_what_finished");
    cancel_with(libc::SIGINT, false);
}
