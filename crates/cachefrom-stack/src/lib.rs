//! The local stack (`cargo xtask stack up`) as the xtask and the end-to-end tests both know it:
//! where the registry listens, the base images it makes, example-project and how it is built,
//! a fresh runner, a small synthetic project, the workspace's `cachefrom` binary. Below both, so
//! that the xtask does not depend on the test crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

/// Where the local registry listens.
pub const REGISTRY: &str = "127.0.0.1:5000";

/// The Rust toolchain base image the stack builds (Debian trixie's rustc and cargo).
pub const RUST_BASE_IMAGE: &str = "127.0.0.1:5000/base/rust:trixie";

/// The runtime base image the stack builds (Debian bookworm minbase).
pub const RUNTIME_BASE_IMAGE: &str = "127.0.0.1:5000/base/runtime:bookworm";

/// A small arm64 image the stack makes without Docker Hub (Debian's static busybox for arm64), for
/// `RUN` steps under QEMU user emulation.
pub const ARM64_BASE_IMAGE: &str = "127.0.0.1:5000/base/busybox:arm64";

/// Where `stack up` says why arm64 emulation could not be set up, when it could not.
pub const EMULATION_UNAVAILABLE: &str = "/var/lib/cachefrom-stack/emulation-unavailable";

/// The host's CA bundle, passed to builds as the `cacert` secret (HTTPS goes through a proxy here).
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The repository root.
pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/cachefrom-stack sits in the repository")
        .to_path_buf()
}

/// example-project's directory.
pub fn example_project() -> PathBuf {
    repository_root().join("example-project")
}

/// The build args that point example-project at the stack's base images.
pub fn example_build_args() -> Vec<(String, String)> {
    vec![
        ("RUST_IMAGE".to_string(), RUST_BASE_IMAGE.to_string()),
        ("RUNTIME_IMAGE".to_string(), RUNTIME_BASE_IMAGE.to_string()),
    ]
}

/// The docker options example-project's builds use: always `--network=host` (the network mode is
/// part of BuildKit's cache key) and the host's CA bundle as a secret for cargo.
pub fn example_docker_args() -> Vec<String> {
    let mut args = vec!["--network=host".to_string()];
    if Path::new(HOST_CA_BUNDLE).is_file() {
        args.extend(["--secret".to_string(), format!("id=cacert,src={HOST_CA_BUNDLE}")]);
    }
    args
}

pub fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into()
}

/// The HTTP status of `GET /v2/` at `address`, or `None` when nothing answers.
fn v2_status(address: &str) -> Option<u16> {
    http_agent(Duration::from_secs(2)).get(&format!("http://{address}/v2/")).call().ok().map(|r| r.status().as_u16())
}

/// True when the registry answers at `address` (`GET /v2/` with 200).
pub fn registry_answers(address: &str) -> bool {
    v2_status(address) == Some(200)
}

/// True when a registry answers at `address` at all (200, or 401 asking for a login).
pub fn registry_listens(address: &str) -> bool {
    matches!(v2_status(address), Some(200 | 401))
}

/// The tags of `repository` in the registry at `address` (empty when it has none).
pub fn registry_tags(address: &str, repository: &str) -> Result<Vec<String>> {
    let mut response = http_agent(Duration::from_secs(5))
        .get(&format!("http://{address}/v2/{repository}/tags/list"))
        .call()
        .with_context(|| format!("asking the registry at {address} for the tags of {repository}"))?;
    if response.status().as_u16() == 404 {
        return Ok(Vec::new());
    }
    let text = response.body_mut().read_to_string()?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    let mut tags: Vec<String> = value["tags"]
        .as_array()
        .map(|tags| tags.iter().filter_map(|tag| tag.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    tags.sort();
    Ok(tags)
}

/// A three-stage Dockerfile on the stack's runtime base, in seconds and with no network: `deps`
/// (from `deps.txt`), `builder` (from `src/`), and `runtime`, whose last step fails when the
/// build argument `FAIL` is set.
pub const SYNTHETIC_DOCKERFILE: &str = "\
ARG BASE
FROM ${BASE} AS deps
COPY deps.txt /deps.txt
RUN cat /deps.txt > /deps
FROM deps AS builder
COPY src /src
RUN cat /src/main.txt > /app
FROM ${BASE} AS runtime
COPY --from=builder /app /app
ARG FAIL=
RUN test -z \"$FAIL\"
";

/// A Dockerfile whose compile step keeps its objects in a cache mount, on the stack's runtime
/// base: each `src/*.txt` not compiled yet (by content) costs `COMPILE_SECONDS` (a build argument), and
/// `/compiled` in the image lists what this build compiled. `FAIL` set fails a later step of
/// the same stage, after the compile.
pub const MOUNT_DOCKERFILE: &str = "\
ARG BASE
FROM ${BASE} AS build
ARG COMPILE_SECONDS=0.2
COPY src /src
RUN --mount=type=cache,id=objs,target=/objs \\
    : > /compiled; for f in /src/*.txt; do h=$(sha256sum \"$f\" | cut -c1-16); \\
    if [ ! -f /objs/$h ]; then sleep $COMPILE_SECONDS; cp \"$f\" /objs/$h; echo \"$f\" >> /compiled; fi; done; \\
    cat /src/*.txt > /app
ARG FAIL=
RUN test -z \"$FAIL\"
FROM ${BASE} AS runtime
COPY --from=build /app /app
COPY --from=build /compiled /compiled
";

/// A project for [`MOUNT_DOCKERFILE`]: `files` source files `src/fNN.txt`, in its own git repository.
pub fn mount_project(files: usize) -> Result<tempfile::TempDir> {
    let dir = synthetic_project(MOUNT_DOCKERFILE)?;
    std::fs::remove_file(dir.path().join("src/main.txt"))?;
    for n in 0..files {
        std::fs::write(dir.path().join(format!("src/f{n:02}.txt")), format!("source {n}\n"))?;
    }
    git(dir.path(), &["add", "-A"])?;
    git(dir.path(), &["commit", "-q", "-m", "sources"])?;
    Ok(dir)
}

/// `cachefrom build` of a synthetic project on `main` (`--network=none`, the runtime base), with
/// the report written to `report`.
pub fn cachefrom_build(dir: &Path, image: &str, report: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(cachefrom_binary())
        .args(["build", "--image", image, "--branch", "main", "--default-branch", "main"])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--report"])
        .arg(report)
        .args(extra)
        .arg(dir)
        .args(["--", "--network=none"])
        .output()
        .expect("the cachefrom binary runs")
}

/// A small project on the stack's runtime base (builds in seconds, no network): `Dockerfile`,
/// `deps.txt` and `src/main.txt`, in its own git repository with `c0` committed on `main`.
pub fn synthetic_project(dockerfile: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("Dockerfile"), dockerfile)?;
    std::fs::write(dir.path().join("deps.txt"), "serde 1\n")?;
    std::fs::create_dir_all(dir.path().join("src"))?;
    std::fs::write(dir.path().join("src/main.txt"), "fn main\n")?;
    git(dir.path(), &["init", "-q", "-b", "main"])?;
    git(dir.path(), &["add", "."])?;
    git(dir.path(), &["commit", "-q", "-m", "c0"])?;
    Ok(dir)
}

/// Settings for building example-project (or a copy of it in `dir`) on the stack, on `main`.
pub fn example_settings(image: &str, dir: &Path) -> cachefrom::settings::Settings {
    let mut settings = cachefrom::settings::Settings::new(image, dir);
    settings.branch = Some("main".to_string());
    settings.default_branch = Some("main".to_string());
    settings.build_args = example_build_args();
    settings.docker_args = example_docker_args();
    settings
}

/// Removes every local image and the build cache, as a fresh CI runner has none.
pub fn fresh_runner() -> Result<()> {
    for args in [["image", "prune", "-af"], ["buildx", "prune", "-af"]] {
        let output = duct::cmd("timeout", std::iter::once("300").chain(std::iter::once("docker")).chain(args))
            .stdout_capture()
            .stderr_capture()
            .unchecked()
            .run()?;
        if !output.status.success() {
            bail!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        }
    }
    Ok(())
}

/// A repository name no other run uses: `127.0.0.1:5000/e2e-<pid>-<n>/<name>`.
pub fn unique_repository(name: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{REGISTRY}/e2e-{stamp}-{}-{n}/{name}", std::process::id())
}

/// Runs git in `dir` with a fixed identity; returns its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    git_dated(dir, None, args)
}

/// [`git`] with the author and commit dates set to `date` (seconds since the epoch), when given.
pub fn git_dated(dir: &Path, date: Option<u64>, args: &[&str]) -> Result<String> {
    let mut command = duct::cmd("git", args)
        .dir(dir)
        .env("GIT_AUTHOR_NAME", "e2e")
        .env("GIT_AUTHOR_EMAIL", "e2e@example.invalid")
        .env("GIT_COMMITTER_NAME", "e2e")
        .env("GIT_COMMITTER_EMAIL", "e2e@example.invalid");
    if let Some(date) = date {
        command = command
            .env("GIT_AUTHOR_DATE", format!("@{date} +0000"))
            .env("GIT_COMMITTER_DATE", format!("@{date} +0000"));
    }
    let output = command.stdout_capture().stderr_capture().unchecked().run()?;
    if !output.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The `cachefrom` binary of this workspace, built once per test process.
pub fn cachefrom_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // The profile this code was built with: tests run the debug binary, the benchmarks
            // (built for release) the release one, as users run it.
            let release = !cfg!(debug_assertions);
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
            let mut command = std::process::Command::new(cargo);
            command.args(["build", "--quiet", "-p", "cachefrom-cli"]);
            if release {
                command.arg("--release");
            }
            let status = command.current_dir(repository_root()).status().expect("cargo runs");
            assert!(status.success(), "building the cachefrom binary failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repository_root().join("target"));
            target.join(if release { "release" } else { "debug" }).join("cachefrom")
        })
        .clone()
}

/// Unmounts (lazily) whatever a stopped dockerd left mounted under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut left: Vec<&str> =
        mounts.lines().filter_map(|line| line.split_whitespace().nth(1)).filter(|m| m.starts_with(&prefix)).collect();
    left.sort_by_key(|mount| std::cmp::Reverse(mount.len()));
    for mount in left {
        let _ = std::process::Command::new("umount").arg("-l").arg(mount).status();
    }
}

/// The `daemon.json` of an engine of the stack: the containerd image store (cache export with the
/// docker driver), no bridge network and no iptables (none on these machines), the local registry
/// without TLS, and its own data and exec roots, pid file and socket.
pub fn dockerd_config(data_root: &Path, exec_root: &Path, pidfile: &Path, host: &str) -> serde_json::Value {
    serde_json::json!({
        "data-root": data_root,
        "exec-root": exec_root,
        "pidfile": pidfile,
        "hosts": [host],
        "bridge": "none",
        "iptables": false,
        "ip6tables": false,
        "ip-forward": false,
        "ip-masq": false,
        "features": { "containerd-snapshotter": true },
        "insecure-registries": [REGISTRY],
    })
}

/// A copy of example-project in its own git repository, with `c0` committed on `main`.
pub fn example_repository_copy() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let source = example_project();
    for file in [
        "Cargo.toml",
        "Cargo.lock",
        "Dockerfile",
        "Dockerfile.docker-init",
        ".dockerignore",
        "src/main.rs",
        "src/lib.rs",
    ] {
        let target = dir.path().join(file);
        std::fs::create_dir_all(target.parent().expect("has a parent"))?;
        std::fs::copy(source.join(file), &target).with_context(|| format!("copying {file}"))?;
    }
    git(dir.path(), &["init", "-q", "-b", "main"])?;
    git(dir.path(), &["add", "."])?;
    git(dir.path(), &["commit", "-q", "-m", "c0"])?;
    Ok(dir)
}

/// Appends a line to a source file: a change that invalidates the builder stage, not the deps.
pub fn change_source(dir: &Path, marker: &str) -> Result<()> {
    let path = dir.join("src/lib.rs");
    let mut text = std::fs::read_to_string(&path)?;
    text.push_str(&format!(
        "\n/// {marker}\npub const CHANGE_{}: u32 = 1;\n",
        marker.replace(|c: char| !c.is_ascii_alphanumeric(), "_").to_uppercase()
    ));
    std::fs::write(path, text)?;
    Ok(())
}
