//! docs/ci/github-actions.yml's build step, the repository's own action (`action.yml`) with the
//! workflow's `with:` inputs, run as the GitHub runner runs it on the local stack: stage groups,
//! the step summary, the step's outputs, the pushed image.

use cachefrom_tests::*;

/// The `with:` inputs of the step called `name`, `${{ … }}` replaced by `expressions`.
fn with_inputs(yaml: &str, name: &str, expressions: &[(&str, &str)]) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines.iter().position(|line| line.trim() == format!("- name: {name}")).expect("the step exists");
    let with = lines[start..].iter().position(|line| line.trim() == "with:").expect("the step has inputs") + start;
    let indent = lines[with].len() - lines[with].trim_start().len();
    lines[with + 1..]
        .iter()
        .take_while(|line| line.len() - line.trim_start().len() > indent)
        .filter_map(|line| line.trim().split_once(": "))
        .map(|(key, value)| {
            let mut value = value.trim_matches('"').to_string();
            for (expression, replacement) in expressions {
                value = value.replace(expression, replacement);
            }
            assert!(!value.contains("${{"), "an expression the test does not know: {value}");
            (format!("INPUT_{}", key.to_uppercase().replace('-', "_")), value)
        })
        .collect()
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn the_github_actions_step_runs_with_github_variables() {
    let _serial = serial();
    need_stack("the_github_actions_step_runs_with_github_variables");
    let yaml = std::fs::read_to_string(repository_root().join("docs/ci/github-actions.yml")).unwrap();
    assert!(yaml.contains("uses: OWNER/cachefrom@"), "the workflow uses the action");

    let repo = example_repository_copy().unwrap();
    let sha = git(repo.path(), &["rev-parse", "HEAD"]).unwrap();
    let image = unique_repository("github");
    let github = tempfile::tempdir().unwrap();
    let docker_args = example_docker_args().join(" ");
    let mut inputs = action_defaults();
    inputs.extend(with_inputs(
        &yaml,
        "Build with cache",
        &[
            ("${{ env.CACHEFROM_IMAGE }}", &image),
            ("${{ github.sha }}", &sha),
            ("${{ env.DOCKER_BUILD_OPTIONS }}", &docker_args),
        ],
    ));
    let build_args: Vec<String> = example_build_args().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    inputs.push(("INPUT_BUILD_ARGS".to_string(), build_args.join("\n")));

    let output = run_action_step(&action_script("build"), github.path(), repo.path(), &inputs);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // One build of the target, with the stages it needs, in one group.
    assert!(stdout.contains("::group::runtime with deps, builder\n"), "{stdout}");
    assert_eq!(stdout.matches("::endgroup::").count(), 1, "{stdout}");
    // The build's own log cannot issue workflow commands: it stands between a stop and its resume.
    let stop = stdout.lines().find_map(|line| line.strip_prefix("::stop-commands::")).expect("commands stopped");
    assert!(stdout.lines().any(|line| line == format!("::{stop}::")), "{stdout}");
    let summary = std::fs::read_to_string(github.path().join("summary.md")).unwrap();
    assert!(summary.contains("| stage | cached steps | seconds | cache source | pushed |"), "{summary}");
    assert!(summary.contains("| deps |"), "{summary}");
    let outputs = std::fs::read_to_string(github.path().join("output")).unwrap();
    assert!(outputs.contains("report=cachefrom-report.json\n") && outputs.contains("total="), "{outputs}");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let tags = registry_tags(REGISTRY, path).unwrap();
    assert!(tags.contains(&sha), "the final image was pushed as {sha}: {tags:?}");
    // One build: the target's cache holds every stage, and only its tags are written.
    assert!(tags.contains(&"cache-runtime.main".to_string()), "{tags:?}");
    assert!(!tags.iter().any(|tag| tag.starts_with("cache-deps")), "{tags:?}");
    assert!(repo.path().join("cachefrom-report.json").is_file());
}
