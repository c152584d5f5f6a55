//! What the Docker engine can do, probed once per run: buildx present? containerd image store?
//! which driver does the builder use? And whether the chosen backend fits it.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::docker::{last_lines, Docker};
use crate::plan::Builder;

/// The engine's capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Engine {
    /// The builder's own platform (the first of `docker buildx inspect`'s "Platforms:"), if known.
    pub platform: Option<String>,
    /// The daemon's version.
    pub server_version: String,
    /// The builder's BuildKit version, when docker buildx is installed and answers (`unknown`
    /// when it does not say).
    pub buildkit_version: Option<String>,
    /// True when the daemon stores images in containerd (`containerd-snapshotter`).
    pub containerd_store: bool,
    /// The selected builder's driver (`docker`, `docker-container`, `remote`, …).
    pub driver: Option<String>,
    /// The daemon's root directory (`docker info`'s DockerRootDir): which engine this is.
    #[serde(default)]
    pub root_dir: String,
    /// The builder's name and endpoint (`docker buildx inspect`'s Name and Endpoint): for any
    /// driver but `docker`, the daemon that builds (a remote `buildkitd`, a container).
    #[serde(default)]
    pub builder: Option<(String, String)>,
}

/// What the engine's BuildKit version is said to be when buildx was not asked: the daemon's own.
const DAEMONS_OWN: &str = "built into dockerd";

/// `docker info`'s answer in the probe's format (version, driver status, platform, root, tab
/// separated), asked of the daemon's API over its local socket (`GET /info`, a few
/// milliseconds where the docker CLI takes about 0.1 s to start). `None`, and the CLI asked,
/// unless docker is the plain `docker` talking to a local socket: no `CACHEFROM_DOCKER`, no
/// `DOCKER_HOST` but `unix://`, no context but `default`.
fn info_over_socket(docker: &Docker, timeout: std::time::Duration) -> Option<String> {
    use std::io::{Read, Write};
    if docker.program != std::path::Path::new("docker") {
        return None;
    }
    let env = |name: &str| env_of(docker, name);
    if docker_context(&env)? != "default" {
        return None;
    }
    let socket = match env("DOCKER_HOST") {
        None => "/var/run/docker.sock".to_string(),
        Some(host) => host.strip_prefix("unix://")?.to_string(),
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream.write_all(b"GET /info HTTP/1.0\r\nHost: docker\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    stream.take(4 << 20).read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8(answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    if head.lines().next()?.split(' ').nth(1) != Some("200") {
        return None;
    }
    info_line(body)
}

/// The probe's line from the daemon's `/info` JSON.
fn info_line(body: &str) -> Option<String> {
    let info: serde_json::Value = serde_json::from_str(body).ok()?;
    let text = |key: &str| info.get(key).and_then(|value| value.as_str()).map(str::to_string);
    let version = text("ServerVersion").filter(|version| !version.is_empty())?;
    let clean = |value: String| value.replace(['\t', '\n', '\r'], " ");
    Some(format!(
        "{}\t{}\t{}/{}\t{}",
        clean(version),
        info.get("DriverStatus").map(|status| status.to_string()).unwrap_or_else(|| "null".to_string()),
        clean(text("OSType").unwrap_or_default()),
        clean(text("Architecture").unwrap_or_default()),
        clean(text("DockerRootDir").unwrap_or_default())
    ))
}

/// An environment variable as a docker call sees it: the client's own settings first.
fn env_of(docker: &Docker, name: &str) -> Option<String> {
    docker
        .env
        .iter()
        .rev()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
        .or_else(|| std::env::var(name).ok())
        .filter(|value| !value.is_empty())
}

/// The docker context whose docker driver buildx builds with when nothing names or selects
/// another builder: none named (`--builder`, `BUILDX_BUILDER`), none selected (buildx's
/// `current` file, written by `docker buildx use` and `create --use`), and the buildx plugin
/// where docker looks for it. `None` when buildx must be asked.
fn default_builder(env: &dyn Fn(&str) -> Option<String>, builder_name: Option<&str>) -> Option<String> {
    if builder_name.is_some() || env("BUILDX_BUILDER").is_some() {
        return None;
    }
    let docker_config = docker_config_dir(env)?;
    let buildx_config =
        env("BUILDX_CONFIG").map(std::path::PathBuf::from).unwrap_or_else(|| docker_config.join("buildx"));
    // `current` naming no builder (`""`, as `docker buildx rm` of the one in use leaves it) or
    // `default` is the default builder still; any other name, or a file not read, is asked.
    let current = buildx_config.join("current");
    if std::fs::symlink_metadata(&current).is_ok() {
        let text = crate::files::read_text(&current, 64 * 1024).ok()?;
        let selected = serde_json::from_str::<serde_json::Value>(&text).ok()?;
        let name = selected.get("Name")?.as_str()?;
        if !name.is_empty() && name != "default" {
            return None;
        }
    }
    let plugin_dirs = [
        docker_config.join("cli-plugins"),
        "/usr/local/lib/docker/cli-plugins".into(),
        "/usr/local/libexec/docker/cli-plugins".into(),
        "/usr/lib/docker/cli-plugins".into(),
        "/usr/libexec/docker/cli-plugins".into(),
    ];
    let installed = plugin_dirs.iter().any(|dir| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join("docker-buildx"))
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    });
    if !installed {
        return None;
    }
    docker_context(env)
}

/// docker's configuration directory: `DOCKER_CONFIG`, else `~/.docker`.
fn docker_config_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<std::path::PathBuf> {
    env("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| env("HOME").map(|home| std::path::Path::new(&home).join(".docker")))
}

/// The docker context in use: `DOCKER_CONTEXT`, else the config's `currentContext`, else
/// `default`. `None` when the config is there but not read.
fn docker_context(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    if let Some(context) = env("DOCKER_CONTEXT") {
        return Some(context);
    }
    let Some(dir) = docker_config_dir(env) else { return Some("default".to_string()) };
    let chosen = match crate::files::read_text(&dir.join("config.json"), 1 << 20) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .ok()?
            .get("currentContext")
            .and_then(|context| context.as_str().map(str::to_string)),
        Err(_) => None,
    };
    Some(chosen.unwrap_or_else(|| "default".to_string()))
}

/// `docker info`'s `OS/ARCHITECTURE` (`linux/x86_64`, `linux/aarch64`) as an OCI platform.
fn oci_platform(daemon: &str) -> Option<String> {
    let (os, arch) = daemon.split_once('/')?;
    let arch = match arch {
        "x86_64" | "amd64" => "amd64",
        "aarch64" | "arm64" => "arm64",
        "armv7l" => "arm/v7",
        "armv6l" => "arm/v6",
        "ppc64le" | "s390x" | "riscv64" | "386" => arch,
        "i686" | "i386" => "386",
        _ => return None,
    };
    (!os.is_empty() && os.chars().all(|c| c.is_ascii_lowercase())).then(|| format!("{os}/{arch}"))
}

/// The oldest BuildKit whose `gha` cache speaks GitHub's current cache service (v2); the one
/// older releases speak has been retired.
const GHA_MIN_BUILDKIT: (u64, u64) = (0, 20);

/// Whether a backend the engine cannot serve may fall back to `inline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendFallback {
    /// Fall back to `inline`, and say so in the report.
    ToInline,
    /// Stop with an error that says why and what to do.
    Refuse,
}

impl Engine {
    /// Asks the engine, two questions in parallel (each docker call costs a CLI start):
    /// `docker info` (the daemon's version and image store) and `docker buildx inspect [BUILDER]`
    /// (buildx present, the builder's driver and BuildKit version).
    ///
    /// When no builder is named or selected, buildx builds with the docker driver of the current
    /// docker context; that is known from buildx's files and the plugin's place, and
    /// `docker buildx inspect` (a plugin start, about 0.15 s of every run) is not asked.
    pub fn probe(docker: &Docker, builder_name: Option<&str>) -> Result<Engine> {
        let timeout = docker.timeouts.probe;
        let args = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<String>>();
        let info_args = args(&[
            "info",
            "--format",
            "{{.ServerVersion}}\t{{json .DriverStatus}}\t{{.OSType}}/{{.Architecture}}\t{{.DockerRootDir}}",
        ]);
        let mut inspect_args = args(&["buildx", "inspect"]);
        inspect_args.extend(builder_name.map(str::to_string));
        let default_builder = default_builder(&|name| env_of(docker, name), builder_name);
        let (info, inspect) = std::thread::scope(|scope| {
            let info = scope.spawn(|| match info_over_socket(docker, timeout) {
                Some(line) => {
                    Ok(crate::docker::Output { stdout: line, stderr: String::new(), success: true, code: Some(0) })
                }
                None => docker.run("asking the Docker daemon for its version and image store", &info_args, timeout),
            });
            let inspect = default_builder
                .is_none()
                .then(|| scope.spawn(|| docker.run("asking buildx for its builder", &inspect_args, timeout)));
            (info.join(), inspect.map(|inspect| inspect.join()))
        });
        let joined = |result: std::thread::Result<Result<crate::docker::Output>>| {
            result.unwrap_or_else(|_| Err(anyhow::anyhow!("a probe thread panicked")))
        };
        let info = joined(info)?;
        let mut fields = info.stdout.trim().splitn(4, '\t');
        let (server_version, driver_status, daemon_platform, root_dir) = (
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
            fields.next().unwrap_or_default(),
        );
        if !info.success || server_version.is_empty() {
            let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string());
            bail!(
                "the Docker daemon does not answer at {host}: start it (dockerd, or your system's docker service), or point DOCKER_HOST at one that runs; docker said: {}",
                last_lines(&info.stderr, 3)
            );
        }
        let Some(inspect) = inspect else {
            let context = default_builder.unwrap_or_default();
            return Ok(Engine {
                platform: oci_platform(daemon_platform),
                server_version: server_version.to_string(),
                buildkit_version: Some(DAEMONS_OWN.to_string()),
                containerd_store: driver_status.contains("io.containerd.snapshotter"),
                builder: Some((context.clone(), context)),
                driver: Some("docker".to_string()),
                root_dir: root_dir.to_string(),
            });
        };
        let inspect = joined(inspect)?;
        let field = |name: &str| {
            inspect.stdout.lines().find_map(|line| line.trim().strip_prefix(name).map(|value| value.trim().to_string()))
        };
        let (buildkit_version, driver) = if inspect.success {
            (Some(field("BuildKit version:").unwrap_or_else(|| "unknown".to_string())), field("Driver:"))
        } else {
            (None, None)
        };
        let platform = field("Platforms:")
            .and_then(|list| list.split(',').next().map(|first| first.trim().trim_end_matches('*').to_string()))
            .filter(|first| !first.is_empty());
        Ok(Engine {
            platform,
            server_version: server_version.to_string(),
            buildkit_version,
            containerd_store: driver_status.contains("io.containerd.snapshotter"),
            builder: field("Name:").zip(field("Endpoint:")),
            driver,
            root_dir: root_dir.to_string(),
        })
    }

    /// One line naming the engine that builds: `dockerd 26.1.5 (root /var/lib/docker, docker
    /// driver, BuildKit v0.13.2)`, or for another driver the daemon it reaches: `BuildKit v0.26.3
    /// at unix:///run/buildkit.sock (remote driver, builder ci), client dockerd 26.1.5`.
    pub fn describe(&self) -> String {
        if let (Some(driver), Some((name, endpoint))) = (&self.driver, &self.builder) {
            if driver != "docker" {
                return format!(
                    "BuildKit {} at {endpoint} ({driver} driver, builder {name}), client dockerd {}",
                    self.buildkit_version.as_deref().unwrap_or("unknown"),
                    self.server_version
                );
            }
        }
        format!(
            "dockerd {} (root {}, {} driver, BuildKit {})",
            self.server_version,
            if self.root_dir.is_empty() { "unknown" } else { &self.root_dir },
            self.driver.as_deref().unwrap_or("no buildx"),
            self.buildkit_version.as_deref().unwrap_or("none")
        )
    }

    /// The BuildKit version as (major, minor), when the builder says one.
    fn buildkit_release(&self) -> Option<(u64, u64)> {
        let version = self.buildkit_version.as_deref()?.trim_start_matches('v');
        let mut parts = version.split(['.', '-', '+']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        // Distribution builds without a version say v0.0.0+unknown.
        ((major, minor) != (0, 0)).then_some((major, minor))
    }

    /// The docker front end to use.
    pub fn builder(&self) -> Builder {
        if self.buildkit_version.is_some() {
            Builder::Buildx
        } else {
            Builder::Classic
        }
    }

    /// Checks `backend` against the engine. Returns the backend to use and, when it differs,
    /// the reason (for the report). Fails when the backend cannot be served and `fallback` refuses.
    pub fn check_backend(&self, backend: &Backend, fallback: BackendFallback) -> Result<(Backend, Option<String>)> {
        let problem = if self.buildkit_version.is_none() && *backend != Backend::Inline {
            Some(format!(
                "the {} backend needs docker buildx, which is not installed (install the docker-buildx package), or use --backend inline",
                backend.name()
            ))
        } else if backend.needs_cache_export() && self.driver.as_deref() == Some("docker") && !self.containerd_store {
            Some(format!(
                "the {} backend needs cache export, which the docker driver offers only with the containerd image store (\"Cache export is not supported for the docker driver\"): turn it on with \"features\": {{\"containerd-snapshotter\": true}} in daemon.json, or pick a docker-container builder (-- --builder NAME), or use --backend inline",
                backend.name()
            ))
        } else if matches!(backend, Backend::S3 { .. }) && self.driver.as_deref() == Some("docker") {
            // Seen here: dockerd 26's BuildKit answers "unknown cache exporter: \"s3\"".
            Some(
                "the s3 backend needs a BuildKit builder with the s3 cache exporter, which the docker driver's built-in BuildKit lacks: create one (docker buildx create --driver docker-container, or --driver remote for a buildkitd you run) and pass -- --builder NAME, or use --backend registry"
                    .to_string(),
            )
        } else if matches!(backend, Backend::Gha { .. })
            && self.buildkit_release().is_some_and(|release| release < GHA_MIN_BUILDKIT)
        {
            Some(format!(
                "the gha backend needs BuildKit {}.{} or newer (GitHub has retired the cache service older releases speak); this builder's BuildKit is {}: use a newer builder (docker/setup-buildx-action), or --backend registry",
                GHA_MIN_BUILDKIT.0,
                GHA_MIN_BUILDKIT.1,
                self.buildkit_version.as_deref().unwrap_or("unknown")
            ))
        } else {
            None
        };
        match (problem, fallback) {
            (None, _) => Ok((backend.clone(), None)),
            (Some(problem), BackendFallback::ToInline) => {
                Ok((Backend::Inline, Some(format!("fell back to inline: {problem}"))))
            }
            (Some(problem), BackendFallback::Refuse) => bail!("{problem} (or pass --fallback-to-inline)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(buildx: bool, containerd_store: bool, driver: &str) -> Engine {
        Engine {
            platform: Some("linux/amd64".into()),
            server_version: "26.1.5".into(),
            buildkit_version: buildx.then(|| "v0.12.5".into()),
            containerd_store,
            driver: Some(driver.into()),
            root_dir: "/var/lib/docker".into(),
            builder: Some(("ci".into(), "unix:///run/buildkit/buildkitd.sock".into())),
        }
    }

    #[test]
    fn buildx_is_not_asked_only_when_nothing_names_or_selects_another_builder() {
        let home = tempfile::tempdir().unwrap();
        let config = home.path().join(".docker");
        let plugins = config.join("cli-plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let vars = |extra: &[(&str, &str)]| {
            let mut vars: Vec<(String, String)> = vec![("HOME".into(), home.path().display().to_string())];
            vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            move |name: &str| vars.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone())
        };
        // No plugin where docker looks (here, or in this machine's own places): asked.
        let on_machine = default_builder(&vars(&[]), None);
        let plugin = plugins.join("docker-buildx");
        std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
        assert_eq!(default_builder(&vars(&[]), None), on_machine, "not executable: not a plugin");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(default_builder(&vars(&[]), None).as_deref(), Some("default"));
        assert_eq!(default_builder(&vars(&[("DOCKER_CONTEXT", "remote")]), None).as_deref(), Some("remote"));
        std::fs::write(config.join("config.json"), r#"{"currentContext":"ci"}"#).unwrap();
        assert_eq!(default_builder(&vars(&[]), None).as_deref(), Some("ci"));
        // A builder named or selected: asked.
        assert_eq!(default_builder(&vars(&[]), Some("ci")), None);
        assert_eq!(default_builder(&vars(&[("BUILDX_BUILDER", "ci")]), None), None);
        std::fs::create_dir_all(config.join("buildx")).unwrap();
        std::fs::write(config.join("buildx/current"), r#"{"Key":"x","Name":"","Global":false}"#).unwrap();
        assert_eq!(default_builder(&vars(&[]), None).as_deref(), Some("ci"), "no builder selected");
        std::fs::write(config.join("buildx/current"), "not json").unwrap();
        assert_eq!(default_builder(&vars(&[]), None), None);
        std::fs::write(config.join("buildx/current"), r#"{"Key":"x","Name":"ci","Global":false}"#).unwrap();
        assert_eq!(default_builder(&vars(&[]), None), None);
        assert_eq!(default_builder(&vars(&[("BUILDX_CONFIG", "/nonexistent")]), None).as_deref(), Some("ci"));
        assert_eq!(default_builder(&|_| None, None), None, "no HOME, no DOCKER_CONFIG: asked");
    }

    #[test]
    fn the_daemons_info_reads_as_the_cli_prints_it() {
        let body = r#"{"ServerVersion":"26.1.5","DriverStatus":[["driver-type","io.containerd.snapshotter.v1"]],"OSType":"linux","Architecture":"x86_64","DockerRootDir":"/var/lib/docker"}"#;
        assert_eq!(
            info_line(body).unwrap(),
            "26.1.5\t[[\"driver-type\",\"io.containerd.snapshotter.v1\"]]\tlinux/x86_64\t/var/lib/docker"
        );
        assert_eq!(info_line(r#"{"ServerVersion":""}"#), None);
        assert_eq!(info_line("not json"), None);
        // A value cannot add a field.
        let odd = r#"{"ServerVersion":"1\tx","OSType":"linux","Architecture":"x86_64","DockerRootDir":"/a\nb"}"#;
        assert_eq!(info_line(odd).unwrap().split('\t').count(), 4);
    }

    #[test]
    fn the_daemons_platform_is_read_as_oci_names_it() {
        assert_eq!(oci_platform("linux/x86_64").as_deref(), Some("linux/amd64"));
        assert_eq!(oci_platform("linux/aarch64").as_deref(), Some("linux/arm64"));
        assert_eq!(oci_platform("linux/armv7l").as_deref(), Some("linux/arm/v7"));
        assert_eq!(oci_platform("linux/weird"), None);
        assert_eq!(oci_platform("Linux/x86_64"), None);
        assert_eq!(oci_platform(""), None);
    }

    #[test]
    fn the_engine_named_is_the_one_that_builds() {
        let local = engine(true, true, "docker");
        assert_eq!(local.describe(), "dockerd 26.1.5 (root /var/lib/docker, docker driver, BuildKit v0.12.5)");
        let remote = engine(true, false, "remote");
        assert_eq!(
            remote.describe(),
            "BuildKit v0.12.5 at unix:///run/buildkit/buildkitd.sock (remote driver, builder ci), client dockerd 26.1.5"
        );
    }

    #[test]
    fn backends_an_engine_cannot_serve_say_what_they_need_in_one_line() {
        let s3 = Backend::parse("s3,bucket=b,region=r", None).unwrap();
        let error = engine(true, true, "docker").check_backend(&s3, BackendFallback::Refuse).unwrap_err().to_string();
        assert!(error.contains("s3 cache exporter") && error.contains("--builder NAME"), "{error}");
        assert!(engine(true, true, "docker-container").check_backend(&s3, BackendFallback::Refuse).is_ok());
        let gha = Backend::parse("gha", None).unwrap();
        let error = engine(true, true, "docker-container")
            .check_backend(&gha, BackendFallback::Refuse)
            .unwrap_err()
            .to_string();
        assert!(error.contains("BuildKit 0.20 or newer") && error.contains("v0.12.5"), "{error}");
        let mut newer = engine(true, true, "docker-container");
        newer.buildkit_version = Some("v0.21.1".into());
        assert!(newer.check_backend(&gha, BackendFallback::Refuse).is_ok());
        newer.buildkit_version = Some("v0.0.0+unknown".into());
        assert!(newer.check_backend(&gha, BackendFallback::Refuse).is_ok(), "an unknown version is not refused");
        assert_eq!(
            newer.describe(),
            "BuildKit v0.0.0+unknown at unix:///run/buildkit/buildkitd.sock (docker-container driver, builder ci), client dockerd 26.1.5"
        );
    }

    #[test]
    fn the_classic_store_cannot_export_cache_with_the_docker_driver() {
        let registry = Backend::parse("registry", None).unwrap();
        let error =
            engine(true, false, "docker").check_backend(&registry, BackendFallback::Refuse).unwrap_err().to_string();
        assert!(error.contains("containerd-snapshotter"), "{error}");
        assert!(error.contains("--backend inline"), "{error}");
        let (backend, why) = engine(true, false, "docker").check_backend(&registry, BackendFallback::ToInline).unwrap();
        assert_eq!(backend, Backend::Inline);
        assert!(why.unwrap().starts_with("fell back to inline: the registry backend needs cache export"));
    }

    #[test]
    fn what_works_passes() {
        let registry = Backend::parse("registry", None).unwrap();
        assert_eq!(engine(true, true, "docker").check_backend(&registry, BackendFallback::Refuse).unwrap().1, None);
        assert_eq!(
            engine(true, false, "docker-container").check_backend(&registry, BackendFallback::Refuse).unwrap().1,
            None
        );
        assert_eq!(
            engine(false, false, "docker").check_backend(&Backend::Inline, BackendFallback::Refuse).unwrap().1,
            None
        );
        assert_eq!(engine(false, false, "docker").builder(), Builder::Classic);
    }

    #[test]
    fn no_buildx_means_inline_only() {
        let local = Backend::parse("local,dir=/c", None).unwrap();
        let error =
            engine(false, true, "docker").check_backend(&local, BackendFallback::Refuse).unwrap_err().to_string();
        assert!(error.contains("needs docker buildx"), "{error}");
    }
}
