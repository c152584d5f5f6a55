//! Known secrets fed through every input cachefrom takes (backend options, build arguments by
//! name and by value, docker options, `--image`, `--tag`, malformed values), then looked for in
//! every output: the script, the JSON plan, stdout and stderr, error lines, the report, the step
//! summary, and the command lines docker was started with.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use cachefrom_tests::*;

/// Each secret is unique to this file, so a hit can only be a leak.
const SECRETS: [&str; 12] = [
    "AKIAFAKEKEYFORTESTS12",
    "S3-secret-value-0a1b",
    "S3-session-token-2c3d",
    "GHA-token-value-4e5f",
    "DB-password-6a7b",
    "GHPAT-value-8c9d",
    "SSHKEY-value-0e1f",
    "sentrykey2a3b",
    "AWSKEYID-value-4c5d",
    "NPMTOKEN-value-6e7f",
    "APIPASSWORD-value-8a9b",
    "ghp_0123456789abcdefGHIJ",
];

fn secret_build_args() -> Vec<String> {
    vec![
        "--build-arg".into(),
        format!("DATABASE_URL=postgres://app:{}@db:5432/app", SECRETS[4]),
        "--build-arg".into(),
        format!("GH_PAT={}", SECRETS[5]),
        "--build-arg".into(),
        format!("SSH_KEY={}", SECRETS[6]),
        "--build-arg".into(),
        format!("SENTRY_DSN=https://{}@o1.ingest.sentry.io/1", SECRETS[7]),
        "--build-arg".into(),
        format!("AWS_ACCESS_KEY_ID={}", SECRETS[8]),
        "--build-arg".into(),
        format!("CLONE_URL={}", SECRETS[11]),
    ]
}

fn after_dashes() -> Vec<String> {
    vec![
        "--".into(),
        "--network=none".into(),
        "--build-arg".into(),
        format!("NPM_TOKEN={}", SECRETS[9]),
        format!("--build-arg=API_PASSWORD={}", SECRETS[10]),
    ]
}

fn run(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(cachefrom_binary());
    command.args(args).env_remove("CACHEFROM_IMAGE");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("the cachefrom binary runs")
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} shows the secret {secret}:\n{text}");
    }
}

fn both(output: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn secrets_never_reach_the_script_the_json_or_an_error_line() {
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path().to_str().unwrap().to_string();
    let backends = [
        format!(
            "s3,bucket=b,region=r,access_key_id={},secret_access_key={},session_token={}",
            SECRETS[0], SECRETS[1], SECRETS[2]
        ),
        format!("gha,url=http://127.0.0.1:9/,token={}", SECRETS[3]),
        "registry".to_string(),
    ];
    for backend in &backends {
        for command in [&["plan"][..], &["plan", "--json"], &["build", "--dry-run"], &["build", "--dry-run", "--json"]]
        {
            let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
            args.extend(["--image".into(), "127.0.0.1:5000/app".into(), "--backend".into(), backend.clone()]);
            args.extend(["--build-arg".into(), format!("BASE={RUNTIME_BASE_IMAGE}")]);
            args.extend(secret_build_args());
            args.push(dir.clone());
            args.extend(after_dashes());
            let output = run(&args, &[]);
            let text = both(&output);
            assert_eq!(output.status.code(), Some(0), "{args:?}: {text}");
            assert_no_secret(&format!("{command:?} with {}", backend.split(',').next().unwrap()), &text);
            // The plan says what it hid, and how to pass a secret instead.
            assert!(
                text.contains("GH_PAT")
                    && text.contains("look secret, their values not shown")
                    && text.contains("--secret"),
                "{text}"
            );
            if backend.starts_with("s3") {
                assert!(text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
            }
        }
    }

    // Refused values: one error line (exit 2), which does not repeat them.
    let refused: Vec<Vec<String>> = vec![
        vec!["--image".into(), format!("deploy:{}@127.0.0.1:5000/app", SECRETS[1])],
        vec!["--image".into(), format!("https://deploy:{}@127.0.0.1:5000/app", SECRETS[1])],
        vec![
            "--image".into(),
            "127.0.0.1:5000/app".into(),
            "--build-arg".into(),
            format!("GITHUB_TOKEN:{}", SECRETS[5]),
        ],
        vec![
            "--image".into(),
            "127.0.0.1:5000/app".into(),
            "--backend".into(),
            format!("s3,bucket=b,region=r,secret_access_key:{}", SECRETS[1]),
        ],
        vec![
            "--image".into(),
            "127.0.0.1:5000/app".into(),
            "--tag".into(),
            format!("deploy:{}@127.0.0.1:5000/app:v1", SECRETS[1]),
        ],
    ];
    for extra in refused {
        let mut args: Vec<String> = vec!["plan".into()];
        args.extend(extra.iter().cloned());
        args.push(dir.clone());
        let output = run(&args, &[]);
        let text = both(&output);
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {text}");
        assert_no_secret(&format!("the error for {:?}", extra[extra.len() - 1].split(':').next()), &text);
        assert!(!text.contains("digest"), "{text}");
        assert_eq!(text.lines().filter(|line| line.contains("error")).count(), 1, "{text}");
    }
}

/// `docker` that records each command line and its environment's secrets, then runs the real one.
fn recording_docker(dir: &Path) -> std::path::PathBuf {
    let wrapper = dir.join("docker");
    let calls = dir.join("calls");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf 'ARGV %s\\nENV GH_PAT=%s\\n' \"$*\" \"${{GH_PAT:-}}\" >> '{}'\nexec docker \"$@\"\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// A Dockerfile that needs the secret build arguments' real values (checked by their hashes), and
/// prints one.
const USES_SECRETS: &str = "\
ARG BASE
FROM ${BASE} AS deps
COPY deps.txt /deps.txt
RUN cat /deps.txt > /deps
FROM deps AS runtime
ARG GH_PAT
ARG DATABASE_URL
ARG FAIL=
RUN test \"$(printf %s \"$GH_PAT\" | sha256sum | cut -c1-16)\" = 5e479b367716f040 \\
 && test \"$(printf %s \"$DATABASE_URL\" | sha256sum | cut -c1-16)\" = fa3accfbe39eaa5a
RUN echo \"the token is $GH_PAT\" && test -z \"$FAIL\"
";

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_build_with_secrets_shows_none_and_gives_docker_the_values_in_its_environment() {
    let _serial = serial();
    need_stack("a_build_with_secrets_shows_none_and_gives_docker_the_values_in_its_environment");
    let project = synthetic_project(USES_SECRETS).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let docker = recording_docker(scratch.path());
    let summary = scratch.path().join("summary.md");
    let report = scratch.path().join("report.json");
    let image = unique_repository("secrets");
    for fail in ["", "1"] {
        let mut args: Vec<String> = ["build", "--image", &image, "--branch", "main", "--default-branch", "main"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend([
            "--build-arg".into(),
            format!("BASE={RUNTIME_BASE_IMAGE}"),
            "--build-arg".into(),
            format!("FAIL={fail}"),
        ]);
        args.extend(["--report".into(), report.display().to_string()]);
        args.extend(secret_build_args());
        args.push(project.path().display().to_string());
        args.extend(after_dashes());
        let env = [
            ("CACHEFROM_DOCKER", docker.to_str().unwrap()),
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
        ];
        let output = run(&args, &env);
        let text = both(&output);
        let expected = if fail.is_empty() { 0 } else { 1 };
        assert_eq!(output.status.code(), Some(expected), "FAIL={fail:?}: {text}");
        assert_no_secret("the build's output", &text);
        if fail.is_empty() {
            assert!(text.contains("the token is ***"), "docker's echo of a secret is masked:\n{text}");
        }
        assert_no_secret("the report", &std::fs::read_to_string(&report).unwrap());
        assert_no_secret("the step summary", &std::fs::read_to_string(&summary).unwrap());
    }
    // Docker's command lines (what `ps` shows) never held a secret from cachefrom's own
    // options; the secret reached docker in its environment. (The ones after `--` are the
    // caller's own command line, passed untouched.)
    let calls = std::fs::read_to_string(scratch.path().join("calls")).unwrap();
    let own: Vec<&str> =
        SECRETS.iter().copied().filter(|secret| *secret != SECRETS[9] && *secret != SECRETS[10]).collect();
    for line in calls.lines().filter(|line| line.starts_with("ARGV ")) {
        for secret in &own {
            assert!(!line.contains(secret), "docker's command line holds {secret}: {line}");
        }
    }
    assert!(calls.contains("ARGV buildx build") && calls.contains("--build-arg GH_PAT "), "{calls}");
    assert!(calls.contains(&format!("ENV GH_PAT={}", SECRETS[5])), "{calls}");
}
