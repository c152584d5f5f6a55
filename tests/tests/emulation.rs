//! End-to-end: a `RUN` step on arm64 for real, under QEMU user emulation (Debian's
//! qemu-user-static, registered with binfmt_misc by `cargo xtask stack up`), from a small arm64
//! image the stack makes without Docker Hub. Its cache is arm64's own: a fresh runner's second
//! build for arm64 hits every step, and the image runs on arm64.

use std::process::Command;

use cachefrom_tests::*;

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_run_step_on_arm64_under_emulation_is_built_and_cached_for_arm64() {
    let _serial = serial();
    need_stack("a_run_step_on_arm64_under_emulation_is_built_and_cached_for_arm64");
    if let Ok(why) = std::fs::read_to_string(EMULATION_UNAVAILABLE) {
        panic!("arm64 emulation could not be set up on this machine: {why}");
    }
    let dockerfile = "ARG ARM\nFROM ${ARM} AS arm\nCOPY src /src\nRUN uname -m > /arch && cat /src/main.txt > /app\n";
    let project = synthetic_project(dockerfile).unwrap();
    let image = unique_repository("arm64");
    let tag = format!("{image}:v1");
    let build = || {
        let report = project.path().join("report.json");
        let output = Command::new(cachefrom_binary())
            .args(["build", "--image", &image, "--branch", "main", "--default-branch", "main"])
            .args(["--platform", "linux/arm64", "--build-arg", &format!("ARM={ARM64_BASE_IMAGE}")])
            .args(["--tag", &tag, "--push", "--report"])
            .arg(&report)
            .arg(project.path())
            .args(["--", "--network=none"])
            .env("CI", "true")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        report
    };

    fresh_runner().unwrap();
    let first = build();
    assert_eq!(stage_counts(&first), vec![("arm".to_string(), 0, 2)], "{first:#}");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    assert!(registry_digest(REGISTRY, path, "cache-arm--linux-arm64.main").is_some());

    // The image runs on arm64 (emulated) and says so.
    fresh_runner().unwrap();
    let arch = duct::cmd!(
        "timeout",
        "120",
        "docker",
        "run",
        "--rm",
        "--platform",
        "linux/arm64",
        "--network=none",
        &tag,
        "cat",
        "/arch"
    )
    .read()
    .unwrap();
    assert_eq!(arch.trim(), "aarch64");

    // A fresh runner, the context changed where the steps do not read: every step is a hit.
    std::fs::write(project.path().join("notes.txt"), "unrelated").unwrap();
    fresh_runner().unwrap();
    let second = build();
    assert_eq!(stage_counts(&second), vec![("arm".to_string(), 2, 2)], "{second:#}");
}
