//! The composite action in `action.yml`, its steps run the way the GitHub runner runs them:
//! inputs as `INPUT_*` variables, `GITHUB_*` variables, `$GITHUB_OUTPUT` and
//! `$GITHUB_STEP_SUMMARY` files, bash with `set -euo pipefail`; against the local stack.

use cachefrom_tests::*;

/// The action's defaults, then `inputs`.
fn inputs_with(inputs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut all = action_defaults();
    all.extend(inputs.iter().map(|(name, value)| (name.to_string(), value.to_string())));
    all
}

#[test]
fn no_expression_is_spliced_into_a_script() {
    let action = std::fs::read_to_string(repository_root().join("action.yml")).unwrap();
    for id in ["install", "build"] {
        let script = action_script(id);
        assert!(!script.is_empty());
        assert!(!script.contains("${{"), "step {id}: inputs reach scripts as variables only:\n{script}");
    }
    for input in ["image", "backend", "file", "target", "tags", "push", "build-args", "read-only", "report"] {
        assert!(action.contains(&format!("\n  {input}:\n")), "input {input}");
    }
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn the_action_builds_pushes_reports_and_the_next_run_hits() {
    let _serial = serial();
    need_stack("the_action_builds_pushes_reports_and_the_next_run_hits");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let github = tempfile::tempdir().unwrap();
    let image = unique_repository("action");
    let secret = "npm_Zq8v3K2pLm9XwR4tY6uB1nC5dE7fG0hJ2kLq";
    let tags = format!("{image}:v1, {image}:latest");
    let build_args = format!("BASE={RUNTIME_BASE_IMAGE}\nNPM_TOKEN={secret}\n");
    let report = github.path().join("report.json");
    let inputs = [
        ("INPUT_IMAGE", image.as_str()),
        ("INPUT_BACKEND", "registry"),
        ("INPUT_CONTEXT", "."),
        ("INPUT_FILE", ""),
        ("INPUT_TARGET", ""),
        ("INPUT_TAGS", tags.as_str()),
        ("INPUT_PUSH", "true"),
        ("INPUT_BUILD_ARGS", build_args.as_str()),
        ("INPUT_READ_ONLY", "false"),
        ("INPUT_REPORT", report.to_str().unwrap()),
        ("INPUT_DOCKER_ARGS", "--network=none"),
    ];

    // The CLI on PATH was built from this checkout: the install step keeps it.
    let install = run_action_step(&action_script("install"), github.path(), project.path(), &[]);
    let said = String::from_utf8_lossy(&install.stdout);
    assert!(
        install.status.success() && said.contains("already installed"),
        "{said}{}",
        String::from_utf8_lossy(&install.stderr)
    );

    fresh_runner().unwrap();
    let first = run_action_step(&action_script("build"), github.path(), project.path(), &inputs_with(&inputs));
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let pushed = registry_tags(REGISTRY, path).unwrap();
    for tag in ["v1", "latest", "cache-runtime.main"] {
        assert!(pushed.contains(&tag.to_string()), "{tag}: {pushed:?}");
    }
    let outputs = std::fs::read_to_string(github.path().join("output")).unwrap();
    assert!(outputs.contains(&format!("report={}\n", report.display())), "{outputs}");
    assert!(outputs.contains("total=6\n") && outputs.contains("cached="), "{outputs}");
    let summary = std::fs::read_to_string(github.path().join("summary.md")).unwrap();
    assert!(summary.contains("### cachefrom"), "{summary}");
    for (what, text) in [("stderr", stderr.to_string()), ("outputs", outputs), ("summary", summary)] {
        assert!(!text.contains(secret), "the secret build argument shows in {what}");
    }

    // The next run, on a fresh runner: every step from the cache, says the step's output.
    fresh_runner().unwrap();
    std::fs::remove_file(github.path().join("output")).unwrap();
    let second = run_action_step(&action_script("build"), github.path(), project.path(), &inputs_with(&inputs));
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let outputs = std::fs::read_to_string(github.path().join("output")).unwrap();
    assert!(outputs.contains("cached=6\ntotal=6\n"), "{outputs}");

    // A malformed build-args line stops with exit 2, without its value.
    let bad = [("INPUT_BUILD_ARGS", "TOKEN:npm_Zq8v3K2pLm9XwR4tY6uB1nC5dE7fG0hJ2kLq")];
    let refused = run_action_step(
        &action_script("build"),
        github.path(),
        project.path(),
        &inputs_with(&[&inputs[..], &bad[..]].concat()),
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(!said.contains("npm_Zq8"), "{said}");
}

#[test]
fn docker_args_on_several_lines_all_reach_docker() {
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let github = tempfile::tempdir().unwrap();
    let mut env = inputs_with(&[
        ("INPUT_IMAGE", "127.0.0.1:9/app"),
        ("INPUT_BUILD_ARGS", "BASE=debian"),
        ("INPUT_DOCKER_ARGS", "--network=none\n--label a=1 --label b=2\n\n"),
        ("INPUT_REPORT", "report.json"),
    ]);
    env.push(("CACHEFROM_DRY_RUN".to_string(), "true".to_string()));
    let planned = run_action_step(&action_script("build"), github.path(), project.path(), &env);
    let script = String::from_utf8_lossy(&planned.stdout);
    assert!(planned.status.success(), "{script}{}", String::from_utf8_lossy(&planned.stderr));
    let words: Vec<&str> = script.split_whitespace().filter(|word| *word != "\\").collect();
    let joined = words.join(" ");
    for option in ["--network=none", "--label a=1", "--label b=2"] {
        assert!(joined.contains(option), "{option} is missing from the plan:\n{script}");
    }
}
