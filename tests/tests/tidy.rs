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

#[test]
fn the_xtask_guide_stays_short() {
    let guide = std::fs::read_to_string(repository_root().join("docs/xtask.md")).unwrap();
    assert!(guide.lines().count() < 30, "docs/xtask.md has {} lines; keep it under 30", guide.lines().count());
}

#[test]
fn the_library_prints_only_through_its_output() {
    // Only `StandardStreams`, the sink a caller picks, writes to the process's streams.
    // Every source file of the library, in its folders too.
    let mut files = Vec::new();
    let mut pending = vec![repository_root().join("crates/cachefrom/src")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry.path().is_dir() {
                pending.push(entry.path());
            } else {
                files.push(entry);
            }
        }
    }
    assert!(files.iter().any(|entry| entry.path().ends_with("exec/run.rs")), "the walk reaches the folders");
    for entry in files {
        let name = entry.file_name().to_string_lossy().to_string();
        // Code only: the docs show callers printing.
        let text: String = std::fs::read_to_string(entry.path())
            .unwrap()
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let prints = ["print!(", "println!(", "io::stdout()", "stderr().write", "dbg!("];
        if name != "output.rs" {
            for call in prints {
                assert!(
                    !text.contains(call),
                    "{name} writes to stdout/stderr directly ({call}); go through Context::out()"
                );
            }
        }
    }
}
