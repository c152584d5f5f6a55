//! A hostile outside world: registries that fail one check, page forever, drip one byte a
//! second or refuse; cache directories holding FIFOs and links to devices; values that would be
//! GitHub Actions workflow commands. A small loopback fake registry stands in where a real one
//! cannot be made to misbehave on demand; every answer is what a user sees (the exit code, the
//! lines, the requests the registry received).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cachefrom_tests::*;

const DIGEST_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn run(command: &mut Command) -> (Output, String, String, Duration) {
    let started = Instant::now();
    let output = command.env_remove("CACHEFROM_IMAGE").output().expect("cachefrom runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr, started.elapsed())
}

fn branches_file(dir: &Path, branches: &str) -> std::path::PathBuf {
    let file = dir.join("branches.txt");
    std::fs::write(&file, branches).unwrap();
    file
}

fn prune(registry: &FakeRegistry, dir: &Path, extra: &[&str]) -> (Output, String, String, Duration) {
    let branches = branches_file(dir, "main\n");
    run(Command::new(cachefrom_binary())
        .args(["prune", "--image", &format!("{}/app", registry.address), "--default-branch", "main", "--branches"])
        .arg(&branches)
        .args(extra)
        .arg(dir))
}

/// A registry whose tag list is `tags`, whose manifests all have `DIGEST_A`, except `failing`,
/// whose HEAD answers `status`.
fn tags_registry(tags: &'static [&'static str], failing: &'static str, status: u16) -> FakeRegistry {
    FakeRegistry::start(move |request| {
        if request.starts_with("GET /v2/app/tags/list") {
            return FakeAnswer::json(&serde_json::json!({ "name": "app", "tags": tags }));
        }
        if let Some(tag) = request.strip_prefix("HEAD /v2/app/manifests/") {
            if tag == failing {
                return FakeAnswer::status(status);
            }
            return FakeAnswer::status(200).header("Docker-Content-Digest", DIGEST_A);
        }
        FakeAnswer::status(500)
    })
}

#[test]
fn prune_keeps_a_tag_whose_kept_twin_cannot_be_checked() {
    for status in [503, 429, 500] {
        let registry = tags_registry(&["cache-deps.gone", "cache-deps.main"], "cache-deps.main", status);
        let dir = tempfile::tempdir().unwrap();
        let (output, stdout, stderr, _) = prune(&registry, dir.path(), &["--apply"]);
        assert_eq!(output.status.code(), Some(3), "HTTP {status}: {stdout}{stderr}");
        assert!(stdout.contains("keep    ") && stdout.contains("cache-deps.gone"), "{stdout}");
        assert!(!stdout.contains("remove  "), "{stdout}");
        assert!(stderr.contains("kept because a check could not be made"), "{stderr}");
        let deletes: Vec<String> =
            registry.requests().into_iter().filter(|request| request.starts_with("DELETE")).collect();
        assert!(deletes.is_empty(), "HTTP {status}: prune deleted {deletes:?}");
    }
}

#[test]
fn prune_lists_only_tags_its_scheme_writes_and_checks_the_default_branch() {
    let registry = tags_registry(&["cache-Deps.Main", "cache-deps.MAIN", "cache-deps.gone", "cache-deps.main"], "", 0);
    let dir = tempfile::tempdir().unwrap();
    let (output, stdout, stderr, _) = prune(&registry, dir.path(), &[]);
    assert!(output.status.success(), "{stderr}");
    // The tags listed for removal (the first word after `remove`), each one the scheme writes.
    let listed: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("remove  "))
        .filter_map(|rest| rest.split_whitespace().next()?.rsplit(':').next())
        .collect();
    assert_eq!(listed, ["cache-deps.gone"], "{stdout}");
    // `origin/main` is not one of the branches: refused, nothing listed for removal.
    let branches = branches_file(dir.path(), "main\n");
    let (output, stdout, stderr, _) = run(Command::new(cachefrom_binary())
        .args(["prune", "--image", &format!("{}/app", registry.address), "--default-branch", "origin/main"])
        .arg("--branches")
        .arg(&branches)
        .arg(dir.path()));
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("not among the 1 branches that exist"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn tag_lists_without_end_are_given_up_with_one_line() {
    // Pages that never end.
    let endless = FakeRegistry::start(|request| {
        if request.starts_with("GET /v2/app/tags/list") {
            let page: u64 = request.rsplit("last=p").next().and_then(|n| n.parse().ok()).unwrap_or(0);
            return FakeAnswer::json(&serde_json::json!({ "name": "app", "tags": [format!("cache-deps.b{page}")] }))
                .header("Link", &format!("</v2/app/tags/list?n=1000&last=p{}>; rel=\"next\"", page + 1));
        }
        FakeAnswer::status(404)
    });
    let dir = tempfile::tempdir().unwrap();
    let (output, stdout, stderr, took) = prune(&endless, dir.path(), &[]);
    assert_eq!(output.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stderr.contains("more than 100 pages"), "{stderr}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    let lists = endless.requests().iter().filter(|r| r.starts_with("GET /v2/app/tags/list")).count();
    assert_eq!(lists, 100, "the tags are listed once, 100 pages at the most");

    // Pages of 8 MB: given up at 16 MB, under a 512 MB memory limit.
    let huge = FakeRegistry::start(|request| {
        if request.starts_with("GET /v2/app/tags/list") {
            let tags: Vec<String> = (0..400_000).map(|i| format!("cache-deps.branch-{i:08}")).collect();
            return FakeAnswer::json(&serde_json::json!({ "name": "app", "tags": tags }))
                .header("Link", "</v2/app/tags/list?n=1000&last=x>; rel=\"next\"");
        }
        FakeAnswer::status(404)
    });
    let branches = branches_file(dir.path(), "main\n");
    let (output, stdout, stderr, took) = run(Command::new("prlimit")
        .arg("--data=536870912")
        .arg(cachefrom_binary())
        .args(["prune", "--image", &format!("{}/app", huge.address), "--default-branch", "main", "--branches"])
        .arg(&branches)
        .arg(dir.path()));
    assert_eq!(output.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stderr.contains("more than 16 MB of tags"), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// A project whose Dockerfile reads no image (so only the cache checks ask the registry).
fn scratch_project() -> tempfile::TempDir {
    synthetic_project("FROM scratch AS deps\nCOPY deps.txt /deps.txt\nFROM deps AS app\nCOPY src /src\n").unwrap()
}

fn explain(image: &str, dir: &Path, extra: &[&str]) -> (Output, String, String, Duration) {
    run(Command::new(cachefrom_binary())
        .args(["explain", "--image", image, "--branch", "main", "--default-branch", "main"])
        .args(extra)
        .arg(dir))
}

#[test]
fn explain_never_answers_what_it_could_not_ask() {
    let project = scratch_project();
    let cases: Vec<(&str, FakeRegistry)> = vec![
        ("HTTP 500", FakeRegistry::start(|_| FakeAnswer::status(500))),
        ("HTTP 401", FakeRegistry::start(|_| FakeAnswer::status(401))),
        ("HTTP 403", FakeRegistry::start(|_| FakeAnswer::status(403))),
        ("one byte a second", FakeRegistry::start(|_| FakeAnswer { drip: true, ..FakeAnswer::status(404) })),
    ];
    for (what, registry) in &cases {
        let (output, stdout, stderr, took) = explain(&format!("{}/app", registry.address), project.path(), &[]);
        assert_eq!(output.status.code(), Some(3), "{what}: {stdout}{stderr}");
        assert!(stdout.contains("could not check ("), "{what}: {stdout}");
        assert!(!stdout.contains("none of"), "{what}: said the cache is missing: {stdout}");
        assert!(took < Duration::from_secs(20), "{what}: {took:?}");
    }
    // Nothing listens.
    let (output, stdout, stderr, _) = explain("127.0.0.1:9/app", project.path(), &["--json"]);
    assert_eq!(output.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("\"kind\": \"unchecked\""), "{stdout}");
}

#[test]
fn explain_refuses_a_pattern_it_will_not_read_with_exit_2() {
    let project = synthetic_project("FROM scratch\nCOPY a/**/b/**/c/**/d/** /x\n").unwrap();
    let (output, stdout, stderr, _) =
        explain("127.0.0.1:9/app", project.path(), &["--backend", "local,dir=/nonexistent"]);
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("more than 3 `**`"), "{stderr}");
    // The same pattern in `.dockerignore`.
    let project = synthetic_project("FROM scratch\nCOPY . /x\n").unwrap();
    std::fs::write(project.path().join(".dockerignore"), "a/**/b/**/c/**/d/**\n").unwrap();
    let (output, stdout, stderr, _) =
        explain("127.0.0.1:9/app", project.path(), &["--backend", "local,dir=/nonexistent"]);
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("more than 3 `**`"), "{stderr}");
}

#[test]
fn a_record_file_that_is_a_fifo_or_a_device_is_not_read() {
    let project = scratch_project();
    let cache = tempfile::tempdir().unwrap();
    let image = "127.0.0.1:9/app";
    let folder = cache.path().join("127.0.0.1-9-app").join("cache-app.main");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("index.json"), "{}").unwrap();
    let record = folder.join("cachefrom-inputs.json");
    for make in ["fifo", "zero"] {
        let _ = std::fs::remove_file(&record);
        match make {
            "fifo" => assert!(Command::new("mkfifo").arg(&record).status().unwrap().success()),
            _ => std::os::unix::fs::symlink("/dev/zero", &record).unwrap(),
        }
        let backend = format!("local,dir={}", cache.path().display());
        let (output, stdout, stderr, took) = explain(image, project.path(), &["--backend", &backend]);
        assert!(took < Duration::from_secs(5), "{make}: {took:?}");
        assert!(output.status.success(), "{make}: {stdout}{stderr}");
        assert!(stdout.contains("carries no record"), "{make}: {stdout}");
    }
}

#[test]
fn copy_tag_sends_only_valid_tags_of_the_source_repository() {
    let registry = FakeRegistry::start(|_| FakeAnswer::status(500));
    let source = format!("{}/x/y:cache-deps.main", registry.address);
    for target in [
        "x/y:../../other/repo/manifests/evil".to_string(),
        "x/y:ok?x=1".to_string(),
        "x/y:ok#frag".to_string(),
        format!("x/y:{}", "a".repeat(300)),
        "x/y:-flag".to_string(),
        "other/repo:ok".to_string(),
        "x/y:ok\n::add-mask::x".to_string(),
    ] {
        let target = format!("{}/{target}", registry.address);
        let (output, stdout, stderr, _) = run(Command::new(cachefrom_binary()).args(["copy-tag", &source, &target]));
        assert_eq!(output.status.code(), Some(2), "{target:?}: {stdout}{stderr}");
        for line in stderr.lines() {
            assert!(!line.trim_start().starts_with("::"), "{line}");
        }
    }
    assert!(registry.requests().is_empty(), "sent: {:?}", registry.requests());
}

/// Lines of `text` that GitHub Actions would read as a workflow command.
fn commands(text: &str) -> Vec<String> {
    text.split(['\n', '\r']).filter(|line| line.trim_start().starts_with("::")).map(str::to_string).collect()
}

#[test]
fn no_value_starts_a_workflow_command_in_any_output() {
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path().to_str().unwrap().to_string();
    let evil = "x\n::add-mask::evil\r::stop-commands::t\n  ::set-output name=a::b";
    let image = "127.0.0.1:9/app".to_string();
    let build_arg = format!("BASE={evil}");
    let label = format!("x={evil}");
    let cases: Vec<Vec<String>> = vec![
        vec!["plan".into(), "--image".into(), image.clone(), "--build-arg".into(), build_arg.clone(), dir.clone()],
        vec![
            "plan".into(),
            "--image".into(),
            image.clone(),
            "--tag".into(),
            format!("127.0.0.1:9/a:{evil}"),
            dir.clone(),
        ],
        vec!["plan".into(), "--image".into(), image.clone(), "--work-dir".into(), evil.into(), dir.clone()],
        vec![
            "plan".into(),
            "--image".into(),
            image.clone(),
            "--backend".into(),
            "local".into(),
            "--cache-dir".into(),
            evil.into(),
            dir.clone(),
        ],
        vec!["plan".into(), "--image".into(), image.clone(), dir.clone(), "--".into(), "--label".into(), label.clone()],
        vec!["plan".into(), "--image".into(), image.clone(), "--target".into(), evil.into(), dir.clone()],
        vec!["plan".into(), "--image".into(), image.clone(), "-f".into(), evil.into(), dir.clone()],
        vec!["plan".into(), "--image".into(), image.clone(), evil.into()],
        vec!["plan".into(), "--image".into(), image.clone(), "--chain".into(), evil.into(), dir.clone()],
        vec!["plan".into(), "--image".into(), evil.into(), dir.clone()],
        vec!["prune".into(), "--image".into(), image.clone(), "--branches".into(), evil.into(), dir.clone()],
        vec!["copy-tag".into(), evil.into(), "127.0.0.1:9/a:b".into()],
    ];
    for args in cases {
        let (_, stdout, stderr, _) = run(Command::new(cachefrom_binary()).args(&args).env("BASE", evil));
        assert!(commands(&stdout).is_empty(), "{args:?}: stdout {:?}", commands(&stdout));
        assert!(commands(&stderr).is_empty(), "{args:?}: stderr {:?}", commands(&stderr));
    }
}
