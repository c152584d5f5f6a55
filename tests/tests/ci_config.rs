//! docs/ci/github-actions.yml's build step, run as GitHub Actions would run it (bash -e, its
//! environment variables) on the local stack: stage groups, the step summary, the pushed image.

use std::process::Command;

use cachefrom_tests::*;

/// The `run: |` block of the step called `name`, unindented.
fn run_block(yaml: &str, name: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines.iter().position(|line| line.trim() == format!("- name: {name}")).expect("the step exists");
    let run = lines[start..].iter().position(|line| line.trim() == "run: |").expect("the step has a run block") + start;
    let indent = lines[run].len() - lines[run].trim_start().len();
    let body: Vec<&str> = lines[run + 1..]
        .iter()
        .take_while(|line| line.trim().is_empty() || line.len() - line.trim_start().len() > indent)
        .copied()
        .collect();
    let body_indent =
        body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    body.iter().map(|line| line.get(body_indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

#[test]
fn the_github_actions_step_runs_with_github_variables() {
    let _serial = serial();
    if !stack_ready("the_github_actions_step_runs_with_github_variables") {
        return;
    }
    let yaml = std::fs::read_to_string(repository_root().join("docs/ci/github-actions.yml")).unwrap();
    let script = run_block(&yaml, "Build with cache");
    assert!(script.starts_with("cachefrom build"), "{script}");

    let repo = example_repository_copy().unwrap();
    let sha = git(repo.path(), &["rev-parse", "HEAD"]).unwrap();
    let image = unique_repository("github");
    let summary = repo.path().join("step-summary.md");
    let mut options: Vec<String> =
        example_build_args().into_iter().map(|(k, v)| format!("--build-arg {k}={v}")).collect();
    options.extend(example_docker_args());
    let bin_dir = cachefrom_binary().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());

    let output = Command::new("bash")
        .args(["-e", "-c", &script])
        .current_dir(repo.path())
        .env("PATH", path)
        .env("CI", "true")
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_REF_NAME", "main")
        .env("GITHUB_SHA", &sha)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("CACHEFROM_IMAGE", &image)
        .env("CACHEFROM_DEFAULT_BRANCH", "main")
        .env("CACHEFROM_READ_ONLY", "false")
        .env("DOCKER_BUILD_OPTIONS", options.join(" "))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // One build of the target, with the stages it needs, in one group.
    assert!(stdout.contains("::group::runtime with deps, builder\n"), "{stdout}");
    assert_eq!(stdout.matches("::endgroup::").count(), 1, "{stdout}");
    let summary = std::fs::read_to_string(&summary).unwrap();
    assert!(summary.contains("| stage | cached steps | seconds | cache source | pushed |"), "{summary}");
    assert!(summary.contains("| deps |"), "{summary}");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let tags = registry_tags(REGISTRY, path).unwrap();
    assert!(tags.contains(&sha), "the final image was pushed as {sha}: {tags:?}");
    // One build: the target's cache holds every stage, and only its tags are written.
    assert!(tags.contains(&"cache-runtime.main".to_string()), "{tags:?}");
    assert!(!tags.iter().any(|tag| tag.starts_with("cache-deps")), "{tags:?}");
    assert!(repo.path().join("cachefrom-report.json").is_file());
}
