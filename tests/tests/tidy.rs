//! Repository hygiene, as ordinary tests: formatting, and the README's commands exist.

use std::process::Command;

use cachefrom_tests::repository_root;

#[test]
fn the_code_is_formatted() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    for dir in [repository_root(), repository_root().join("example-project")] {
        let output = Command::new(&cargo).args(["fmt", "--all", "--", "--check"]).current_dir(&dir).output().unwrap();
        assert!(
            output.status.success(),
            "`cargo fmt` would change files in {}: run `cargo fmt --all` there\n{}",
            dir.display(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

#[test]
fn the_readme_names_the_two_commands_first() {
    let readme = std::fs::read_to_string(repository_root().join("README.md")).unwrap();
    let demo = readme.find("cargo xtask demo").expect("the main job's command");
    let test = readme.find("cargo xtask test").expect("the test command");
    let layout = readme.find("## Layout").expect("a layout section");
    assert!(demo < test && test < layout);
    let ci = std::fs::read_to_string(repository_root().join(".ci/run")).unwrap();
    assert!(ci.contains("cargo xtask test"), ".ci/run runs the README's test command");
}
