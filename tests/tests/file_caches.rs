//! Faults of the local and tarball backends' shared directory, on the real engine: a cache whose
//! files were cut short (a runner killed mid-copy, a CI file cache restored in part), and a cache
//! directory on a full disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use cachefrom_tests::*;

/// The synthetic Dockerfile, its dependency step saying when it runs.
const DOCKERFILE: &str = "\
ARG BASE
FROM ${BASE} AS deps
COPY deps.txt /deps.txt
RUN cat /deps.txt > /deps && echo deps-step-ran
FROM deps AS app
COPY src /src
RUN cat /src/main.txt > /app
";

fn build(dir: &Path, image: &str, backend: &str) -> (std::process::Output, serde_json::Value) {
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let output = cachefrom_build(dir, image, &report, &["--backend", backend]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{stderr}");
    (output, serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_local_cache_cut_short_is_built_without_and_replaced_and_the_counts_are_true() {
    let _serial = serial();
    need_stack("a_local_cache_cut_short_is_built_without_and_replaced_and_the_counts_are_true");
    let project = synthetic_project(DOCKERFILE).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let backend = format!("local,dir={}", cache.path().display());
    let image = unique_repository("cut-short");
    fresh_runner().unwrap();
    build(project.path(), &image, &backend);

    // Every file of the cache above 1 kB cut to half its length.
    let mut cut = 0;
    for file in files_under(cache.path()).into_iter().filter(|path| path.is_file()) {
        let length = std::fs::metadata(&file).unwrap().len();
        if length > 1024 {
            std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(length / 2).unwrap();
            cut += 1;
        }
    }
    assert!(cut > 0, "the cache has files to cut");

    fresh_runner().unwrap();
    let (output, report) = build(project.path(), &image, &backend);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The step ran (its output shows), and the report says so.
    assert!(stderr.lines().any(|line| line.ends_with(" deps-step-ran")), "{stderr}");
    assert_eq!(stage_counts(&report), [("deps".to_string(), 0, 2), ("app".to_string(), 0, 2)], "{report:#}");
    let warnings: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|stage| stage["warnings"].as_array().unwrap().iter().filter_map(|w| w.as_str()))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning for the unreadable cache: {warnings:#?}");
    assert!(warnings[0].contains("importing cache"), "{warnings:#?}");
    assert!(!stderr.contains("again"), "an unreadable source is not a failed export: nothing to retry\n{stderr}");

    // The run wrote a good cache over the broken one.
    fresh_runner().unwrap();
    let (_, next) = build(project.path(), &image, &backend);
    assert_eq!(stage_counts(&next), [("deps".to_string(), 2, 2), ("app".to_string(), 2, 2)], "{next:#}");
}

/// A tmpfs of `size`, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a small tmpfs needs root (CI runs as root)");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_full_cache_disk_is_one_warning_and_leaves_nothing_partial() {
    let _serial = serial();
    need_stack("a_full_cache_disk_is_one_warning_and_leaves_nothing_partial");
    let project = synthetic_project(DOCKERFILE).unwrap();
    for kind in ["local", "tarball"] {
        // Big enough for a few files, far too small for the base image's layers.
        let disk = SmallDisk::mount("256k");
        let backend = format!("{kind},dir={}", disk.0.path().display());
        let image = unique_repository(&format!("full-{kind}"));
        fresh_runner().unwrap();
        let (output, report) = build(project.path(), &image, &backend);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(report["success"], true, "{kind}: the build goes on: {report:#}");
        let all: Vec<String> = report["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .chain(report["stages"].as_array().unwrap().iter().flat_map(|s| s["warnings"].as_array().unwrap().iter()))
            .map(|w| w.as_str().unwrap().to_string())
            .collect();
        assert_eq!(all.len(), 1, "{kind}: one warning for the cause: {all:#?}\n{stderr}");
        assert!(all[0].contains("cache directory is full"), "{kind}: {all:#?}");
        let partial: Vec<PathBuf> =
            files_under(disk.0.path()).into_iter().filter(|path| path.to_string_lossy().contains(".partial")).collect();
        assert!(partial.is_empty(), "{kind}: nothing partial left: {partial:#?}");
    }
}
