//! The docker command of each build the plan makes, computed from the plan alone, and the
//! places on disk the run uses.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::backend::{Backend, CacheLocation};
use crate::secrets::{self};

use super::vocabulary::{Builder, CacheErrors, CacheRef};
use super::{Plan, StagePlan};

impl Plan {
    /// The full `docker` command line (without `docker`) that builds `stage`, reading `sources`:
    /// `(stage name, cache ref)` pairs in priority order.
    pub fn build_command(&self, stage: &StagePlan, sources: &[(String, CacheRef)], progress: &str) -> Vec<String> {
        let mut args: Vec<String> = match self.builder {
            Builder::Buildx => vec!["buildx".into(), "build".into(), format!("--progress={progress}")],
            Builder::Classic => vec!["build".into()],
        };
        if let Some(target) = &stage.target {
            args.extend(["--target".into(), target.clone()]);
        }
        args.extend(["-f".into(), self.dockerfile.display().to_string()]);
        for (name, value) in &self.build_args {
            // A secret's value reaches docker in its environment (see `docker_env`), never argv.
            let arg = if self.secret_in_env(name, value) { name.clone() } else { format!("{name}={value}") };
            args.extend(["--build-arg".into(), arg]);
        }
        if let Some(platform) = &self.platform {
            args.extend(["--platform".into(), platform.clone()]);
        }
        if self.builder == Builder::Buildx {
            if !self.docker.provenance {
                args.push("--provenance=false".into());
            }
            if self.backend == Backend::Inline {
                args.extend(["--cache-to".into(), "type=inline".into()]);
            }
        }
        let mut seen = BTreeSet::new();
        for (_, source) in sources {
            let unpacked = self.unpacked_dir(&source.location);
            let value = self.backend.cache_from_arg(&source.location, &unpacked);
            if seen.insert(value.clone()) {
                args.extend(["--cache-from".into(), value]);
            }
        }
        let ignore_error = self.cache_errors == CacheErrors::Warn;
        let staging = self.staging_dir(&stage.name);
        if let Some(primary) = self.primary_write(stage) {
            let exports: Vec<CacheLocation> = match &self.backend {
                // Every name in one export: BuildKit writes the blobs once.
                Backend::S3 { .. } => vec![CacheLocation::Named(self.written_by(stage).join(";"))],
                Backend::Gha { .. } => stage.cache_to.iter().map(|write| write.location.clone()).collect(),
                _ => vec![primary.location.clone()],
            };
            for location in exports {
                if let Some(value) = self.backend.cache_to_arg(&location, &staging, ignore_error) {
                    args.extend(["--cache-to".into(), value]);
                }
            }
        }
        for tag in &stage.image_tags {
            args.extend(["-t".into(), tag.clone()]);
        }
        // A stage that only feeds later ones needs no image: with its cache exported by BuildKit,
        // `cacheonly` skips downloading and unpacking its layers when every step is a hit. Never
        // the target: measured here, a cold build of the target with `cacheonly` exported a cache
        // in which the next run missed a step whose inputs had all hit.
        let user_output = self.user_output();
        let no_image_anyway = self.builder_keeps_no_image && stage.image_tags.is_empty();
        if self.builder == Builder::Buildx
            && !user_output
            && !self.pushes_in_build(stage)
            && ((self.backend.needs_cache_export() && !stage.is_target) || no_image_anyway)
        {
            args.extend(["--output".into(), "type=cacheonly".into()]);
        }
        if self.pushes_in_build(stage) {
            args.push("--push".into());
            if !user_output {
                // Where buildx says which image it pushed (recorded on the cache).
                args.extend(["--metadata-file".into(), self.metadata_file().display().to_string()]);
            }
        }
        args.extend(self.docker_args.iter().cloned());
        args.push(self.context.display().to_string());
        args
    }

    /// The cache sources of `stage` when nothing has been checked: its own candidates, then those
    /// of its source stages ([`Plan::source_stages`]), level by level.
    pub fn all_candidate_sources(&self, stage: &StagePlan) -> Vec<(String, CacheRef)> {
        let mut sources = Vec::new();
        let owners: Vec<&StagePlan> = std::iter::once(stage).chain(self.source_stages(stage)).collect();
        for level in &self.chain {
            for owner in &owners {
                let name = &owner.name;
                if let Some(candidate) = owner.cache_from.iter().find(|candidate| candidate.level == *level) {
                    sources.push((name.clone(), candidate.clone()));
                }
            }
        }
        sources
    }

    /// True when build argument `name` is secret and goes to docker in its environment
    /// (`--build-arg NAME`): every secret one except names docker itself reads (`DOCKER_*`,
    /// `BUILDX_*`, `BUILDKIT_*`, proxies, `PATH`, `HOME`), which stay on the command line.
    pub(crate) fn secret_in_env(&self, name: &str, value: &str) -> bool {
        let upper = name.to_uppercase();
        let docker_reads = ["DOCKER_", "BUILDX_", "BUILDKIT_"].iter().any(|prefix| upper.starts_with(prefix))
            || upper.ends_with("_PROXY")
            || ["PATH", "HOME", "TMPDIR", "USER", "SHELL"].contains(&upper.as_str());
        secrets::is_secret(name, value)
            && !docker_reads
            && !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// Environment variables for docker's build commands: the values of secret build arguments,
    /// and the backend's credentials (in the variables buildx reads them from).
    pub fn docker_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .build_args
            .iter()
            .filter(|(name, value)| self.secret_in_env(name, value))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        env.extend(self.backend.credentials_env());
        env
    }

    /// True when the options after `--` choose the build's output themselves.
    pub(crate) fn user_output(&self) -> bool {
        self.docker.output
    }

    /// True when the run leaves an image in the local engine (tags not pushed, or an output the
    /// user chose): such a run always builds.
    pub fn wants_local_image(&self) -> bool {
        self.user_output() || (!self.tags.is_empty() && !self.push_tags)
    }

    /// Where the target's build writes buildx's metadata (the pushed image's digest).
    pub fn metadata_file(&self) -> PathBuf {
        self.work_dir.join("build-metadata.json")
    }

    /// True when the build of `stage` pushes its tags itself (`docker buildx build --push`).
    pub fn pushes_in_build(&self, stage: &StagePlan) -> bool {
        self.builder == Builder::Buildx && stage.is_target && self.push_tags && !self.tags.is_empty()
    }

    /// Every cache location a successful build of `stage` writes, BuildKit's export included.
    pub fn written_by(&self, stage: &StagePlan) -> Vec<String> {
        match self.backend {
            Backend::Inline => stage.cache_to.iter().map(|write| write.location.to_string()).collect(),
            _ => stage.cache_to.iter().map(|w| w.location.to_string()).collect(),
        }
    }

    /// Where the tarball backend unpacks the cache at `location` before a build: one directory a
    /// file, so that stages reading the same file read one cache (BuildKit given the same records
    /// twice, from two directories, was seen missing steps of them).
    pub fn unpacked_dir(&self, location: &CacheLocation) -> PathBuf {
        let name = match location {
            CacheLocation::TarFile(file) => file.file_name().map(|name| name.to_string_lossy().into_owned()),
            _ => None,
        };
        let name = name.unwrap_or_else(|| location.to_string());
        let safe: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
        let digest = crate::files::short_digest(location.to_string().as_bytes());
        self.work_dir.join("from").join(format!("{digest}-{safe}"))
    }

    /// Where the local and tarball backends have BuildKit export `stage`'s cache, to copy or pack it afterwards.
    pub fn staging_dir(&self, stage: &str) -> PathBuf {
        self.work_dir.join("to").join(stage)
    }
}
