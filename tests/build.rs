//! Sets `cfg(buildkitd_given)` when `CACHEFROM_TEST_BUILDKITD` names a `buildkitd`, and
//! `cfg(stack_up)` when the end-to-end tests can run: in CI always (a missing stack there
//! is a failure, never a skip), elsewhere when the local stack is up. A test that needs the stack
//! is `#[cfg_attr(not(stack_up), ignore = …)]`: without it, the test harness reports it as
//! ignored, never as passed.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(stack_up)");
    println!("cargo::rustc-check-cfg=cfg(buildkitd_given)");
    // The tests against a real buildkitd run when CACHEFROM_TEST_BUILDKITD names its binary.
    println!("cargo::rerun-if-env-changed=CACHEFROM_TEST_BUILDKITD");
    if std::env::var_os("CACHEFROM_TEST_BUILDKITD").is_some_and(|path| !path.is_empty()) {
        println!("cargo::rustc-cfg=buildkitd_given");
    }
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=CACHEFROM_STACK_DIR");
    let dir = std::env::var_os("CACHEFROM_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/cachefrom-stack"));
    // Watched so that bringing the stack up or down runs this again.
    for pid in ["registry.pid", "dockerd.pid"] {
        println!("cargo::rerun-if-changed={}", dir.join(pid).display());
    }
    let in_ci = std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false");
    let alive = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_some_and(|pid| PathBuf::from(format!("/proc/{pid}")).exists())
    };
    let up = alive("registry.pid") && alive("dockerd.pid");
    if in_ci || up {
        println!("cargo::rustc-cfg=stack_up");
    }
}
