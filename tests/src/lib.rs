//! Facts about the local stack (`cargo xtask stack up`) and example-project, shared by the
//! end-to-end tests and the xtask, plus the small helpers the tests use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

pub use cachefrom_stack::*;

/// The manifest digest of `repository:reference` in the registry at `address`, if it has it.
pub fn registry_digest(address: &str, repository: &str, reference: &str) -> Option<String> {
    let response = http_agent(Duration::from_secs(5))
        .head(&format!("http://{address}/v2/{repository}/manifests/{reference}"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json")
        .call()
        .ok()?;
    if response.status().as_u16() != 200 {
        return None;
    }
    response.headers().get("docker-content-digest")?.to_str().ok().map(str::to_string)
}

/// The manifest of `repository:reference` in the registry at `address`, as JSON.
pub fn registry_manifest(address: &str, repository: &str, reference: &str) -> Result<serde_json::Value> {
    let mut response = http_agent(Duration::from_secs(5))
        .get(&format!("http://{address}/v2/{repository}/manifests/{reference}"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json")
        .call()
        .with_context(|| format!("reading the manifest of {repository}:{reference}"))?;
    Ok(serde_json::from_str(&response.body_mut().read_to_string()?)?)
}

/// The layers of the stack's base images (every platform of an index). The registry keeps one
/// copy of a blob for every repository, so deleting one of these would break every later build.
pub fn base_image_layers() -> std::collections::BTreeSet<String> {
    let mut layers = std::collections::BTreeSet::new();
    for image in [RUNTIME_BASE_IMAGE, RUST_BASE_IMAGE] {
        let Some((repository, tag)) = image.strip_prefix(&format!("{REGISTRY}/")).and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        let Ok(manifest) = registry_manifest(REGISTRY, repository, tag) else { continue };
        let mut manifests = vec![manifest.clone()];
        for child in manifest["manifests"].as_array().into_iter().flatten() {
            if let Some(digest) = child["digest"].as_str() {
                manifests.extend(registry_manifest(REGISTRY, repository, digest).ok());
            }
        }
        for manifest in manifests {
            for layer in manifest["layers"].as_array().into_iter().flatten() {
                layers.extend(layer["digest"].as_str().map(str::to_string));
            }
        }
    }
    layers
}

/// The digest of a layer of `manifest` that a test may delete from the registry's storage to
/// stand for a lost blob: the last one that is neither a base image's nor the empty layer
/// (both are shared by every repository). Panics when there is none.
pub fn deletable_layer(manifest: &serde_json::Value) -> String {
    const EMPTY_LAYER: &str = "sha256:4f4fb700ef54461cfa02571ae0db9a0dc1e0cdb5577484a6d75e68dc38e8acc1";
    let base = base_image_layers();
    assert!(!base.is_empty(), "the base images' layers could not be read");
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|layer| layer["digest"].as_str())
        .rfind(|digest| *digest != EMPTY_LAYER && !base.contains(*digest))
        .unwrap_or_else(|| panic!("no layer of its own in {manifest:#}"))
        .to_string()
}

/// Fails with a clear message when the stack is not up. Outside CI a caller may skip instead;
/// in CI (`CI=true`) a missing stack is always a failure.
pub fn require_stack() -> Result<()> {
    if !registry_answers(REGISTRY) {
        bail!("the local registry does not answer at {REGISTRY}: run `cargo xtask stack up` first");
    }
    let docker = duct::cmd!("docker", "version", "--format", "{{.Server.Version}}")
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .context("running docker")?;
    if !docker.status.success() {
        bail!(
            "the Docker daemon does not answer: run `cargo xtask stack up` first ({})",
            String::from_utf8_lossy(&docker.stderr).trim()
        );
    }
    Ok(())
}

/// True when running in CI (`CI` set to anything but `false` or empty).
pub fn in_ci() -> bool {
    std::env::var("CI").map(|value| !value.is_empty() && value != "false").unwrap_or(false)
}

/// A library context printing plain progress, as in CI logs.
pub fn plain_context() -> cachefrom::exec::Context {
    let mut ctx = cachefrom::exec::Context::from_environment();
    ctx.style = cachefrom::exec::OutputStyle::Plain;
    ctx
}

/// Serialises the end-to-end tests: they share one daemon, and a fresh runner removes its images.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails the test with one clear line when the stack is not up. A test that calls it is marked
/// `#[cfg_attr(not(stack_up), ignore = …)]` (see `tests/build.rs`): where the stack is down
/// outside CI it is reported as ignored, never as passed; where it runs, a missing stack fails.
pub fn need_stack(test: &str) {
    if let Err(error) = require_stack() {
        panic!("{test}: {error:#}");
    }
}

/// `deps` finishes in a second; `slow` runs for two minutes, saying when it has started (what
/// a cancel interrupts).
pub const SLOW_DOCKERFILE: &str = "\
ARG BASE
FROM ${BASE} AS deps
COPY deps.txt /deps.txt
RUN cat /deps.txt > /deps
FROM deps AS slow
RUN echo slow-step-started && sleep 120 && echo never
";

/// A throwaway registry on another loopback port, stopped (by its PID) when dropped.
pub struct TempRegistry {
    /// `127.0.0.1:PORT`.
    pub address: String,
    child: std::process::Child,
    _storage: tempfile::TempDir,
}

impl TempRegistry {
    /// Starts Debian's `docker-registry` on `127.0.0.1:port`.
    pub fn start(port: u16) -> Result<TempRegistry> {
        TempRegistry::start_with_auth(port, None)
    }

    /// Starts a registry that wants a login: `htpasswd` is the file's content (bcrypt entries).
    pub fn start_with_auth(port: u16, htpasswd: Option<&str>) -> Result<TempRegistry> {
        let auth = |dir: &Path| -> Result<String> {
            let Some(htpasswd) = htpasswd else { return Ok(String::new()) };
            let file = dir.join("htpasswd");
            std::fs::write(&file, htpasswd)?;
            Ok(format!("auth:\n  htpasswd:\n    realm: cachefrom-tests\n    path: {}\n", file.display()))
        };
        TempRegistry::start_with_auth_config(port, auth)
    }

    /// Starts a registry whose `auth:` section `auth` writes (given the registry's own directory,
    /// for files it needs).
    pub fn start_with_auth_config(port: u16, auth: impl FnOnce(&Path) -> Result<String>) -> Result<TempRegistry> {
        use std::os::unix::process::CommandExt;
        let address = format!("127.0.0.1:{port}");
        if registry_listens(&address) {
            bail!("something already answers at {address}");
        }
        let storage = tempfile::tempdir()?;
        let config = storage.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {address}\n",
            storage.path().join("data").display()
        );
        text.push_str(&auth(storage.path())?);
        std::fs::write(&config, text)?;
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting docker-registry")?;
        let registry = TempRegistry { address, child, _storage: storage };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !registry_listens(&registry.address) {
            if std::time::Instant::now() > deadline {
                bail!("the temporary registry did not answer at {}", registry.address);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(registry)
    }

    /// Stops it now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TempRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

#[doc = include_str!("../../docs/xtask.md")]
pub mod xtask_guide {}

/// The `run: |` script of the step with `id: <id>` in `action.yml`, unindented.
pub fn action_script(id: &str) -> String {
    let action = std::fs::read_to_string(repository_root().join("action.yml")).expect("action.yml");
    let lines: Vec<&str> = action.lines().collect();
    let at = lines.iter().position(|line| line.trim() == format!("id: {id}")).expect("the step exists");
    let run = at + lines[at..].iter().position(|line| line.trim() == "run: |").expect("the step runs a script");
    let indent_of = |line: &str| line.len() - line.trim_start().len();
    let body: Vec<&str> = lines[run + 1..]
        .iter()
        .take_while(|line| line.trim().is_empty() || indent_of(line) > indent_of(lines[run]))
        .copied()
        .collect();
    let body_indent = body.iter().filter(|line| !line.trim().is_empty()).map(|line| indent_of(line)).min().unwrap_or(0);
    body.iter().map(|line| line.get(body_indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// `action.yml`'s inputs with their defaults, as the `INPUT_*` variables its build step reads.
pub fn action_defaults() -> Vec<(String, String)> {
    let action = std::fs::read_to_string(repository_root().join("action.yml")).expect("action.yml");
    let mut defaults = Vec::new();
    let mut current: Option<String> = None;
    let mut in_inputs = false;
    for line in action.lines() {
        if !line.starts_with(' ') {
            in_inputs = line == "inputs:";
            continue;
        }
        if !in_inputs {
            continue;
        }
        if let Some(name) =
            line.strip_prefix("  ").and_then(|rest| rest.strip_suffix(':')).filter(|n| !n.starts_with(' '))
        {
            current = Some(name.to_string());
        } else if let (Some(name), Some(value)) = (&current, line.trim().strip_prefix("default: ")) {
            let value = value.trim_matches('"').to_string();
            defaults.push((format!("INPUT_{}", name.to_uppercase().replace('-', "_")), value));
        }
    }
    defaults
}

/// Runs `script` as the GitHub runner runs a composite action's bash step (`bash --noprofile
/// --norc -eo pipefail`), in `workdir`, with this workspace's `cachefrom` first on `PATH`, the
/// runner's `GITHUB_*` variables (a push to main; outputs and summary files in `github`), and `env`.
pub fn run_action_step(script: &str, github: &Path, workdir: &Path, env: &[(String, String)]) -> std::process::Output {
    let binary_dir = cachefrom_binary().parent().expect("a directory").to_path_buf();
    let path = format!("{}:{}", binary_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut command = std::process::Command::new("bash");
    command
        .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script])
        .current_dir(workdir)
        .env("PATH", path)
        .env("CI", "true")
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_EVENT_NAME", "push")
        .env("GITHUB_REF", "refs/heads/main")
        .env("GITHUB_REF_NAME", "main")
        .env("GITHUB_OUTPUT", github.join("output"))
        .env("GITHUB_STEP_SUMMARY", github.join("summary.md"))
        .env("GITHUB_ACTION_PATH", repository_root())
        .env("ACTION_PATH", repository_root())
        .env("CACHEFROM_DEFAULT_BRANCH", "main");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("bash runs")
}

/// A second Docker engine on this machine, as a team's shared remote engine: its own socket,
/// data root and exec root (under the stack's state directory), reachable as `host()` and as the
/// docker context `context`. Stopped by its PID, its mounts and context removed, when dropped.
pub struct SecondEngine {
    /// The docker context that names it.
    pub context: String,
    /// Its data root (`docker info`'s DockerRootDir).
    pub root: PathBuf,
    dir: PathBuf,
    child: std::process::Child,
}

impl SecondEngine {
    /// Starts `dockerd` with the stack's settings (containerd image store, no bridge, the local
    /// registry insecure) and waits until it answers.
    pub fn start() -> Result<SecondEngine> {
        use std::os::unix::process::CommandExt;
        let dir = PathBuf::from(format!("/var/lib/cachefrom-stack/e{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let root = dir.join("data");
        let host = format!("unix://{}", dir.join("docker.sock").display());
        let config = dockerd_config(&root, &dir.join("exec"), &dir.join("dockerd.pid"), &host);
        std::fs::write(dir.join("daemon.json"), serde_json::to_string_pretty(&config)?)?;
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let child = std::process::Command::new("dockerd")
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting a second dockerd")?;
        let context = format!("cachefrom-e2e-{}", std::process::id());
        let engine = SecondEngine { context: context.clone(), root, dir, child };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while duct::cmd!("docker", "version")
            .env("DOCKER_HOST", engine.host())
            .stdout_null()
            .stderr_null()
            .unchecked()
            .run()?
            .status
            .code()
            != Some(0)
        {
            if std::time::Instant::now() > deadline {
                bail!(
                    "the second dockerd did not answer within 60 s; see {}",
                    engine.dir.join("dockerd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        duct::cmd!("docker", "context", "create", &context, "--docker", format!("host={}", engine.host()))
            .stdout_null()
            .run()?;
        Ok(engine)
    }

    /// Its `DOCKER_HOST`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    /// Removes its images and build cache: a fresh remote engine.
    pub fn fresh(&self) -> Result<()> {
        for args in [["image", "prune", "-af"], ["buildx", "prune", "-af"]] {
            duct::cmd("docker", args).env("DOCKER_HOST", self.host()).stdout_null().stderr_null().run()?;
        }
        Ok(())
    }
}

impl Drop for SecondEngine {
    fn drop(&mut self) {
        let _ = duct::cmd!("docker", "context", "rm", "-f", &self.context).stdout_null().stderr_null().run();
        // SAFETY: kill(2) on the dockerd this value started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each stage of a `--report` JSON as (name, steps cached, steps in all).
pub fn stage_counts(report: &serde_json::Value) -> Vec<(String, u64, u64)> {
    report["stages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|stage| {
            (
                stage["name"].as_str().unwrap_or_default().to_string(),
                stage["steps_cached"].as_u64().unwrap_or_default(),
                stage["steps_total"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// What [`FakeRegistry`] answers to one request.
#[derive(Debug, Clone, Default)]
pub struct FakeAnswer {
    /// HTTP status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Send the answer one byte a second.
    pub drip: bool,
}

impl FakeAnswer {
    /// `status` with no body.
    pub fn status(status: u16) -> FakeAnswer {
        FakeAnswer { status, ..FakeAnswer::default() }
    }

    /// 200 with a JSON body.
    pub fn json(body: &serde_json::Value) -> FakeAnswer {
        FakeAnswer {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            drip: false,
        }
    }

    /// The answer with one more header.
    pub fn header(mut self, name: &str, value: &str) -> FakeAnswer {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// A registry that misbehaves on demand, on a loopback port: each request (`METHOD PATH`) is
/// answered by the test's function and recorded. Only for faults a real registry cannot be made
/// to show (5xx on one tag, pages without end, one byte a second); it stops when dropped.
pub struct FakeRegistry {
    /// `127.0.0.1:PORT`.
    pub address: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeRegistry {
    /// Starts it; `answer` gets `METHOD PATH?QUERY`.
    pub fn start(answer: impl Fn(&str) -> FakeAnswer + Send + Sync + 'static) -> FakeRegistry {
        use std::io::{BufRead as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        listener.set_nonblocking(true).expect("non-blocking");
        let address = listener.local_addr().expect("an address").to_string();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answer = std::sync::Arc::new(answer);
        let (seen, stopped) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bounded: at most 10,000 connections or until dropped.
            for _ in 0..10_000 {
                let stream = loop {
                    if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                };
                let (seen, answer, stopped) = (seen.clone(), answer.clone(), stopped.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut reader = std::io::BufReader::new(stream.try_clone().expect("a stream"));
                    let mut writer = stream;
                    // Keep-alive: several requests a connection.
                    for _ in 0..1000 {
                        let mut request_line = String::new();
                        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0usize;
                        loop {
                            let mut header = String::new();
                            if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':') {
                                if name.trim().eq_ignore_ascii_case("content-length") {
                                    length = value.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0u8; length.min(16 << 20)];
                        let _ = std::io::Read::read_exact(&mut reader, &mut body);
                        let mut parts = request_line.split_whitespace();
                        let request = format!("{} {}", parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                        seen.lock().unwrap().push(request.clone());
                        let reply = answer(&request);
                        let head_only = request.starts_with("HEAD ");
                        let mut bytes =
                            format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\n", reply.status, reply.body.len());
                        for (name, value) in &reply.headers {
                            bytes.push_str(&format!("{name}: {value}\r\n"));
                        }
                        bytes.push_str("\r\n");
                        let mut bytes = bytes.into_bytes();
                        if !head_only {
                            bytes.extend_from_slice(&reply.body);
                        }
                        if reply.drip {
                            for byte in bytes.iter().take(60) {
                                if stopped.load(std::sync::atomic::Ordering::Relaxed)
                                    || writer.write_all(&[*byte]).is_err()
                                {
                                    return;
                                }
                                std::thread::sleep(Duration::from_secs(1));
                            }
                            return;
                        }
                        if writer.write_all(&bytes).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeRegistry { address, requests, stop }
    }

    /// The requests so far, `METHOD PATH?QUERY` each.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A running build's standard error, line by line: what it printed until the slow step of
/// [`SLOW_DOCKERFILE`] started, and the rest as it comes.
pub struct StartedBuild {
    /// The lines seen so far.
    pub seen: Vec<String>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl StartedBuild {
    /// Reads `child`'s stderr (piped) until the slow step prints that it started (within 120 s).
    pub fn wait_for_slow_step(child: &mut std::process::Child) -> StartedBuild {
        use std::io::BufRead;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let started = std::time::Instant::now();
        loop {
            let line = lines.recv_timeout(Duration::from_secs(120)).expect("the slow step starts");
            seen.push(line.clone());
            if line.contains("slow-step-started") && !line.contains("RUN") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "{}", seen.join("\n"));
        }
        StartedBuild { seen, lines }
    }

    /// Every line, once the build has exited.
    pub fn all_lines(mut self) -> Vec<String> {
        self.seen.extend(self.lines.try_iter());
        self.seen
    }
}

/// Runs `cachefrom ARGS` (with `CI=true`) whose `--report` is `report`: its output and the report
/// (`null` when none was written).
pub fn cachefrom_reporting(args: &[String], report: &Path) -> (std::process::Output, serde_json::Value) {
    let _ = std::fs::remove_file(report);
    let output = std::process::Command::new(cachefrom_binary()).args(args).env("CI", "true").output().unwrap();
    let report = std::fs::read_to_string(report)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(serde_json::Value::Null);
    (output, report)
}
