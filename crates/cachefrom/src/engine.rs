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
    /// The daemon's version.
    pub server_version: String,
    /// buildx's version, if the plugin is installed and works.
    pub buildx_version: Option<String>,
    /// True when the daemon stores images in containerd (`containerd-snapshotter`).
    pub containerd_store: bool,
    /// The selected builder's driver (`docker`, `docker-container`, `remote`, …).
    pub driver: Option<String>,
}

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
    /// Asks the engine, in parallel: `docker version`, `docker buildx version`, `docker info`,
    /// `docker buildx inspect [BUILDER]`.
    pub fn probe(docker: &Docker, builder_name: Option<&str>) -> Result<Engine> {
        let timeout = docker.timeouts.probe;
        let args = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<String>>();
        let version_args = args(&["version", "--format", "{{.Server.Version}}"]);
        let buildx_args = args(&["buildx", "version"]);
        let info_args = args(&["info", "--format", "{{json .DriverStatus}}"]);
        let mut inspect_args = args(&["buildx", "inspect"]);
        inspect_args.extend(builder_name.map(str::to_string));
        let (version, buildx, info, inspect) = std::thread::scope(|scope| {
            let version =
                scope.spawn(|| docker.run("asking the Docker daemon for its version", &version_args, timeout));
            let buildx = scope.spawn(|| docker.run("checking for docker buildx", &buildx_args, timeout));
            let info = scope.spawn(|| docker.run("asking the Docker daemon for its image store", &info_args, timeout));
            let inspect = scope.spawn(|| docker.run("asking buildx for its builder", &inspect_args, timeout));
            (version.join(), buildx.join(), info.join(), inspect.join())
        });
        let joined = |result: std::thread::Result<Result<crate::docker::Output>>| {
            result.unwrap_or_else(|_| Err(anyhow::anyhow!("a probe thread panicked")))
        };
        let version = joined(version)?;
        if !version.success || version.stdout.trim().is_empty() {
            let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string());
            bail!(
                "the Docker daemon does not answer at {host}: start it (in this repository: cargo xtask stack up), or set DOCKER_HOST; docker said: {}",
                last_lines(&version.stderr, 3)
            );
        }
        let buildx = joined(buildx)?;
        let buildx_version =
            buildx.success.then(|| buildx.stdout.split_whitespace().nth(1).unwrap_or("unknown").to_string());
        let info = joined(info)?;
        let containerd_store = info.stdout.contains("io.containerd.snapshotter");
        let inspect = joined(inspect)?;
        let driver = inspect
            .success
            .then(|| {
                inspect
                    .stdout
                    .lines()
                    .find_map(|line| line.trim().strip_prefix("Driver:").map(|driver| driver.trim().to_string()))
            })
            .flatten();
        Ok(Engine { server_version: version.stdout.trim().to_string(), buildx_version, containerd_store, driver })
    }

    /// The docker front end to use.
    pub fn builder(&self) -> Builder {
        if self.buildx_version.is_some() {
            Builder::Buildx
        } else {
            Builder::Classic
        }
    }

    /// Checks `backend` against the engine. Returns the backend to use and, when it differs,
    /// the reason (for the report). Fails when the backend cannot be served and `fallback` refuses.
    pub fn check_backend(&self, backend: &Backend, fallback: BackendFallback) -> Result<(Backend, Option<String>)> {
        let problem = if self.buildx_version.is_none() && *backend != Backend::Inline {
            Some(format!(
                "the {} backend needs docker buildx, which is not installed (install the docker-buildx package), or use --backend inline",
                backend.name()
            ))
        } else if backend.needs_cache_export() && self.driver.as_deref() == Some("docker") && !self.containerd_store {
            Some(format!(
                "the {} backend needs cache export, which the docker driver offers only with the containerd image store (\"Cache export is not supported for the docker driver\"): turn it on with \"features\": {{\"containerd-snapshotter\": true}} in daemon.json, or pick a docker-container builder (-- --builder NAME), or use --backend inline",
                backend.name()
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
            server_version: "26.1.5".into(),
            buildx_version: buildx.then(|| "v0.13.1".into()),
            containerd_store,
            driver: Some(driver.into()),
        }
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
