//! The plan is the whole program: a run makes no docker call and no registry write that the
//! plan it prints does not name. Each run goes through a recording `docker` (every call's
//! arguments, then the real docker) against the stack's registry, whose access log holds every
//! write (cachefrom's own and BuildKit's); each call and each manifest write is then looked up in
//! `cachefrom plan --json` for the same options: unchanged, all hit, source change, broken cache,
//! failed stage, cancelled.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cachefrom::plan::narrowed;
use cachefrom_tests::*;

const REGISTRY_LOG: &str = "/var/lib/cachefrom-stack/registry.log";
const STORAGE: &str = "/var/lib/cachefrom-stack/registry/docker/registry/v2/blobs/sha256";

/// A `docker` that writes each call's arguments (a count, then each, NUL-separated) to a file of
/// its own in `calls` (calls run at once), then runs the real one.
fn recording_docker(dir: &Path) -> (PathBuf, PathBuf) {
    let real = duct::cmd!("sh", "-c", "command -v docker").read().unwrap();
    let calls = dir.join("docker-calls");
    let wrapper = dir.join("docker");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nf=$(mktemp '{}/call.XXXXXXXX')\n{{ printf '%s\\0' \"$#\"; for a in \"$@\"; do printf '%s\\0' \"$a\"; done; }} > \"$f\"\nexec '{real}' \"$@\"\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    (wrapper, calls)
}

fn recorded_calls(calls: &Path) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(calls).unwrap().flatten() {
        let bytes = std::fs::read(entry.path()).unwrap();
        let mut fields = bytes.split(|b| *b == 0).map(|field| String::from_utf8_lossy(field).into_owned());
        let count: usize = fields.next().unwrap().parse().unwrap();
        out.push(fields.take(count).collect());
    }
    out
}

/// One project, one repository, the same options for `plan` and `build`.
struct Scenario {
    project: tempfile::TempDir,
    image: String,
    scratch: tempfile::TempDir,
}

impl Scenario {
    fn new(dockerfile: &str, name: &str) -> Scenario {
        Scenario {
            project: synthetic_project(dockerfile).unwrap(),
            image: unique_repository(name),
            scratch: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> &str {
        self.image.strip_prefix(&format!("{REGISTRY}/")).unwrap()
    }

    fn args(&self, command: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [command, "--image", &self.image, "--branch", "main", "--default-branch", "main"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--build-arg".to_string(), format!("BASE={RUNTIME_BASE_IMAGE}")]);
        // The default scratch directory names the process; one given is the same for both.
        args.extend(["--work-dir".to_string(), self.scratch.path().join("work").display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.project.path().display().to_string());
        args.extend(["--".to_string(), "--network=none".to_string()]);
        args
    }

    fn plan(&self, extra: &[&str]) -> (serde_json::Value, String) {
        let with_json: Vec<&str> = extra.iter().copied().chain(["--json"]).collect();
        let json = Command::new(cachefrom_binary()).args(self.args("plan", &with_json)).output().unwrap();
        assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
        let script = Command::new(cachefrom_binary()).args(self.args("plan", extra)).output().unwrap();
        assert!(script.status.success(), "{}", String::from_utf8_lossy(&script.stderr));
        (serde_json::from_slice(&json.stdout).unwrap(), String::from_utf8_lossy(&script.stdout).into_owned())
    }

    fn command(&self, extra: &[&str]) -> (Command, PathBuf, usize) {
        let (docker, calls) = recording_docker(self.scratch.path());
        let _ = std::fs::remove_dir_all(&calls);
        std::fs::create_dir_all(&calls).unwrap();
        let log_lines = std::fs::read_to_string(REGISTRY_LOG).unwrap_or_default().lines().count();
        let mut command = Command::new(cachefrom_binary());
        command.args(self.args("build", extra)).env("CACHEFROM_DOCKER", &docker).env("CI", "true");
        (command, calls, log_lines)
    }

    /// Builds through the recording docker; checks every call and write against the plan.
    fn build_checked(&self, extra: &[&str]) -> Output {
        let (mut command, calls, log_lines) = self.command(extra);
        let output = command.output().unwrap();
        self.check(extra, &calls, log_lines, &output);
        output
    }

    fn check(&self, extra: &[&str], calls: &Path, log_lines: usize, output: &Output) {
        let (plan, script) = self.plan(extra);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let named = Named::of(&plan, !output.status.success());
        let calls = recorded_calls(calls);
        assert!(!calls.is_empty(), "docker was not called through the recorder:\n{stderr}");
        for call in &calls {
            if let Err(why) = named.docker_call(call, &script) {
                panic!("{why}\ncall: docker {call:?}\nplan:\n{script}\nrun:\n{stderr}");
            }
        }
        for write in registry_writes(self.path(), log_lines) {
            if let Err(why) = named.registry_write(&self.image, &write, &calls) {
                panic!("{why}\nwrite: {write:?}\nplan:\n{script}\nrun:\n{stderr}");
            }
        }
    }
}

/// What a plan names: the build argument vectors, the tags those builds write (BuildKit's cache
/// exports and pushes), the tags cachefrom's own steps write, and the images pushed. The
/// recovery's only when the run failed.
struct Named {
    builds: Vec<Vec<String>>,
    by_builds: BTreeSet<String>,
    by_cachefrom: BTreeSet<String>,
    pushes: BTreeSet<String>,
    /// `docker pull`s the plan names (the cache mounts' image, beside the restore).
    pulls: Vec<Vec<String>>,
    /// The plan saves cache mounts or mounts base layers: cachefrom writes blobs.
    cachefrom_blobs: bool,
}

impl Named {
    fn of(plan: &serde_json::Value, failed: bool) -> Named {
        let strings = |value: &serde_json::Value| -> Vec<String> {
            value
                .as_array()
                .map(|list| list.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        let mut named = Named {
            builds: Vec::new(),
            by_builds: BTreeSet::new(),
            by_cachefrom: BTreeSet::new(),
            pushes: BTreeSet::new(),
            pulls: Vec::new(),
            cachefrom_blobs: false,
        };
        let mut writes: Vec<&serde_json::Value> = Vec::new();
        for step in plan["steps"].as_array().unwrap() {
            match step["step"].as_str().unwrap() {
                "build" => named.builds.push(strings(&step["argv"])),
                "write" => writes.push(&step["write"]),
                "write-back" => {
                    named.by_cachefrom.insert(step["to"].as_str().unwrap().to_string());
                }
                "refresh-stage-tags" => writes.extend(step["writes"].as_array().unwrap()),
                "reuse-unchanged" => {
                    named.by_cachefrom.extend(strings(&step["image_tags"]));
                    writes.extend(step["writes"].as_array().unwrap());
                }
                "push-image" => {
                    named.pushes.insert(step["image"].as_str().unwrap().to_string());
                }
                "restore-mounts" => {
                    named.builds.push(strings(&step["argv"]));
                    if !step["again"].is_null() {
                        named.builds.push(strings(&step["again"]));
                    }
                    if !step["pull"].is_null() {
                        named.pulls.push(strings(&step["pull"]));
                    }
                }
                "mount-base-layers" => named.cachefrom_blobs = true,
                "save-mounts" => {
                    named.builds.push(strings(&step["argv"]));
                    named.cachefrom_blobs = true;
                    for mount in plan["mounts"].as_array().unwrap() {
                        for to in mount["cache_to"].as_array().unwrap() {
                            named.by_cachefrom.insert(to["location"]["at"].as_str().unwrap_or_default().to_string());
                        }
                    }
                }
                other => panic!("a step this test does not know: {other}"),
            }
        }
        for recovery in plan["recovery"].as_array().unwrap().iter().filter(|_| failed) {
            named.builds.push(strings(&recovery["argv"]));
            writes.extend(recovery["writes"].as_array().unwrap());
        }
        for write in writes {
            match write["write"].as_str().unwrap() {
                "copy-tag" => named.by_cachefrom.extend(strings(&write["to"])),
                "push-image" => {
                    named.pushes.insert(write["image"].as_str().unwrap().to_string());
                }
                other => panic!("a registry backend write this test does not expect: {other}"),
            }
        }
        // What the builds write themselves: their cache exports and pushed tags.
        for build in &named.builds {
            for pair in build.windows(2) {
                if pair[0] == "--cache-to" {
                    if let Some(reference) = pair[1].split(',').find_map(|part| part.strip_prefix("ref=")) {
                        named.by_builds.insert(reference.to_string());
                    }
                }
                if pair[0] == "-t" && build.contains(&"--push".to_string()) {
                    named.by_builds.insert(pair[1].clone());
                }
            }
        }
        named
    }

    /// A build is a planned one with only `--cache-from` left out; a push is a planned push; the
    /// engine queries are the ones the script's header names.
    fn docker_call(&self, call: &[String], script: &str) -> Result<(), String> {
        let words: Vec<&str> = call.iter().map(String::as_str).collect();
        match words.as_slice() {
            ["info", ..] if script.contains("docker info") => Ok(()),
            ["buildx", "inspect", ..] if script.contains("docker buildx inspect") => Ok(()),
            ["buildx", "build", ..] | ["build", ..] => {
                let sources: BTreeSet<&str> =
                    call.windows(2).filter(|pair| pair[0] == "--cache-from").map(|pair| pair[1].as_str()).collect();
                let planned = self.builds.iter().any(|argv| narrowed(argv, &|value| sources.contains(value)) == call);
                if planned {
                    Ok(())
                } else {
                    Err("a build that is not a planned build narrowed to its cache sources".to_string())
                }
            }
            ["push", .., image] if self.pushes.contains(*image) => Ok(()),
            ["pull", ..] if self.pulls.iter().any(|pull| pull == call) => Ok(()),
            _ => Err("a docker call the plan does not name".to_string()),
        }
    }

    /// A manifest written under a tag is a destination the plan names, for the writer that wrote
    /// it (cachefrom's own steps, or BuildKit's builds); under a digest, a part of a planned push
    /// (BuildKit writes an image's manifests by digest before its tag). Blobs go with the
    /// manifest that names them; cachefrom writes them only where a step says so (mounting base
    /// layers, saving cache mounts). No manifest is deleted.
    fn registry_write(&self, image: &str, write: &Write, calls: &[Vec<String>]) -> Result<(), String> {
        let Write { method, what, reference, by_cachefrom } = write;
        let destinations = if *by_cachefrom { &self.by_cachefrom } else { &self.by_builds };
        match (method.as_str(), what.as_str()) {
            (_, "blobs") if !by_cachefrom || self.cachefrom_blobs => Ok(()),
            ("DELETE", _) => Err("a run deleted something".to_string()),
            ("PUT", "manifests") if reference.starts_with("sha256:") && !by_cachefrom => {
                let pushed = calls.iter().any(|call| call.contains(&"--push".to_string()));
                if pushed {
                    Ok(())
                } else {
                    Err("a manifest written by digest without a planned push".to_string())
                }
            }
            ("PUT", "manifests") => {
                let destination = format!("{image}:{reference}");
                if destinations.contains(&destination) {
                    Ok(())
                } else {
                    let writer = if *by_cachefrom { "cachefrom's steps" } else { "the builds" };
                    Err(format!("{destination} is not a destination of {writer} in the plan"))
                }
            }
            _ => Err("a registry write of an unknown kind".to_string()),
        }
    }
}

/// One write in the registry's access log.
#[derive(Debug)]
struct Write {
    method: String,
    /// `manifests` or `blobs`.
    what: String,
    reference: String,
    /// Written by cachefrom itself (its user agent), not by BuildKit.
    by_cachefrom: bool,
}

/// The writes to `repository` in the registry's access log after its first `skip` lines.
fn registry_writes(repository: &str, skip: usize) -> Vec<Write> {
    let log = std::fs::read_to_string(REGISTRY_LOG).unwrap();
    let prefix = format!("/v2/{repository}/");
    log.lines()
        .skip(skip)
        .filter_map(|line| {
            let request = line.split('"').nth(1)?;
            let agent = line.split('"').nth(5).unwrap_or_default();
            let mut words = request.split(' ');
            let (method, path) = (words.next()?, words.next()?);
            let rest = path.strip_prefix(&prefix)?;
            if !matches!(method, "PUT" | "POST" | "PATCH" | "DELETE") {
                return None;
            }
            let (what, reference) = rest.split_once('/')?;
            Some(Write {
                method: method.to_string(),
                what: what.to_string(),
                reference: reference.split('?').next()?.to_string(),
                by_cachefrom: agent.starts_with("ureq/"),
            })
        })
        .collect()
}

fn succeeded(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    stderr
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn every_docker_call_and_registry_write_of_a_run_is_named_by_its_plan() {
    let _serial = serial();
    need_stack("every_docker_call_and_registry_write_of_a_run_is_named_by_its_plan");
    assert!(Path::new(REGISTRY_LOG).exists(), "the stack's registry keeps its access log at {REGISTRY_LOG}");
    let scenario =
        Scenario::new(&format!("{SYNTHETIC_DOCKERFILE}RUN echo marker-{} > /marker\n", std::process::id()), "program");
    let tag = format!("{}:v1", scenario.image);
    let push = ["--tag", tag.as_str(), "--push"];

    // Seed, on a fresh runner.
    fresh_runner().unwrap();
    succeeded(&scenario.build_checked(&push));

    // Unchanged: nothing is built; the recorded image and cache are reused.
    fresh_runner().unwrap();
    let stderr = succeeded(&scenario.build_checked(&push));
    assert!(stderr.contains("nothing to build"), "{stderr}");

    // All hit: a local image is wanted, so it builds, every step a hit; the cache read is written back.
    fresh_runner().unwrap();
    succeeded(&scenario.build_checked(&["--tag", tag.as_str()]));

    // Source change.
    std::fs::write(scenario.project.path().join("src/main.txt"), "fn main() { changed }\n").unwrap();
    fresh_runner().unwrap();
    succeeded(&scenario.build_checked(&push));

    // Broken cache: a blob the target's cache names is gone (the same inputs: the unchanged build
    // cannot be reused); built again without it.
    let manifest = registry_manifest(REGISTRY, scenario.path(), "cache-runtime.main").unwrap();
    let digest = deletable_layer(&manifest);
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::remove_file(format!("{STORAGE}/{}/{hex}/data", &hex[..2])).unwrap();
    fresh_runner().unwrap();
    let stderr = succeeded(&scenario.build_checked(&[]));
    assert!(stderr.contains("is broken"), "the broken cache was met: {stderr}");

    // A failed stage: the stages it finished are recovered.
    fresh_runner().unwrap();
    let failed = scenario.build_checked(&["--build-arg", "FAIL=1"]);
    assert_eq!(failed.status.code(), Some(1), "{}", String::from_utf8_lossy(&failed.stderr));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("writing the cache of"), "recovered");

    // The next successful run refreshes the stage tags the failed run wrote.
    std::fs::write(scenario.project.path().join("src/main.txt"), "fn main() { fixed }\n").unwrap();
    let before = registry_digest(REGISTRY, scenario.path(), "cache-deps.main").expect("the failed run wrote it");
    fresh_runner().unwrap();
    succeeded(&scenario.build_checked(&push));
    let after = registry_digest(REGISTRY, scenario.path(), "cache-deps.main").unwrap();
    assert_ne!(before, after, "cache-deps.main now holds the target's cache");
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_cancelled_run_writes_only_what_its_plan_names() {
    use std::os::unix::process::CommandExt;
    let _serial = serial();
    need_stack("a_cancelled_run_writes_only_what_its_plan_names");
    let scenario = Scenario::new(SLOW_DOCKERFILE, "program-cancel");
    fresh_runner().unwrap();
    let (mut command, calls, log_lines) = scenario.command(&[]);
    let mut child = command.process_group(0).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let started = StartedBuild::wait_for_slow_step(&mut child);
    // SIGINT, as CI sends it first.
    // SAFETY: kill(2) on the process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let seen = started.all_lines();
    assert_eq!(status.code(), Some(130), "{}", seen.join("\n"));
    let output = Output { status, stdout: Vec::new(), stderr: seen.join("\n").into_bytes() };
    scenario.check(&[], &calls, log_lines, &output);
    assert!(
        registry_digest(REGISTRY, scenario.path(), "cache-deps.main").is_some(),
        "the finished stage's cache was written: {}",
        seen.join("\n")
    );
}
