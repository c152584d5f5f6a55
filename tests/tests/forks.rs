//! A pull request from a fork reads the caches and writes none (its branch names are chosen by
//! the fork's author), unless `--allow-fork-writes`; a pull request from a branch of the same
//! repository writes its branch's tags. GitHub's event payload is written as GitHub writes it.

use std::path::Path;
use std::process::{Command, Output};

use cachefrom_tests::*;

/// A `pull_request` event payload, trimmed to the fields GitHub always sends with it.
fn event(dir: &Path, head_repo: &str, fork: bool) -> std::path::PathBuf {
    let path = dir.join(format!("event-{fork}.json"));
    let event = serde_json::json!({
        "action": "synchronize",
        "number": 42,
        "pull_request": {
            "number": 42,
            "head": {
                "label": format!("{}:feature", head_repo.split('/').next().unwrap()),
                "ref": "feature",
                "sha": "0123456789abcdef0123456789abcdef01234567",
                "repo": {"full_name": head_repo, "fork": fork, "private": false}
            },
            "base": {
                "label": "team:main",
                "ref": "main",
                "repo": {"full_name": "team/app", "fork": false, "private": false}
            }
        },
        "repository": {"full_name": "team/app", "fork": false}
    });
    std::fs::write(&path, serde_json::to_string_pretty(&event).unwrap()).unwrap();
    path
}

fn build_pull_request(project: &Path, image: &str, event: &Path, extra: &[&str]) -> Output {
    Command::new(cachefrom_binary())
        .args(["build", "--image", image, "--default-branch", "main"])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}")])
        .args(extra)
        .arg(project)
        .args(["--", "--network=none"])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_EVENT_NAME", "pull_request")
        .env("GITHUB_EVENT_PATH", event)
        .env("GITHUB_HEAD_REF", "feature")
        .env("GITHUB_REF_NAME", "42/merge")
        .env_remove("GITHUB_STEP_SUMMARY")
        .output()
        .expect("the cachefrom binary runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_fork_reads_and_writes_nothing_unless_allowed() {
    let _serial = serial();
    need_stack("a_fork_reads_and_writes_nothing_unless_allowed");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let image = unique_repository("forks");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap().to_string();
    let scratch = tempfile::tempdir().unwrap();

    let fork = event(scratch.path(), "someone/app", true);
    let output = build_pull_request(project.path(), &image, &fork, &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("read-only: GitHub Actions builds a pull_request from a fork"), "{}", text(&output));
    assert_eq!(registry_tags(REGISTRY, &path).unwrap(), Vec::<String>::new(), "a fork wrote a tag");

    let output = build_pull_request(project.path(), &image, &fork, &["--allow-fork-writes"]);
    assert!(output.status.success(), "{}", text(&output));
    let tags = registry_tags(REGISTRY, &path).unwrap();
    assert!(tags.contains(&"cache-runtime.feature".to_string()), "{tags:?}");

    // The same repository's branch: writes without being asked.
    let image = unique_repository("same-repo");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap().to_string();
    let same = event(scratch.path(), "team/app", false);
    let output = build_pull_request(project.path(), &image, &same, &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains("read-only"), "{}", text(&output));
    let tags = registry_tags(REGISTRY, &path).unwrap();
    assert!(tags.contains(&"cache-runtime.feature".to_string()), "{tags:?}");
}
