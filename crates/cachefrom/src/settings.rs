//! Settings as a user writes them (strings, flags): what the `cachefrom` CLI and an xtask both
//! turn into [`PlanOptions`], so the same inputs give the same plan whichever front end reads them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::backend::Backend;
use crate::ci::Environment;
use crate::git::{GitFacts, GitOverrides};
use crate::plan::{Access, CacheErrors, Level, PlanOptions};
use crate::refs::Repository;

/// Everything a front end reads from its user. [`Settings::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `REGISTRY/NAME` where images and caches live.
    pub image: String,
    /// The build context.
    pub context: PathBuf,
    /// The Dockerfile (default `CONTEXT/Dockerfile`).
    pub file: Option<PathBuf>,
    /// The stage to build (default: the last).
    pub target: Option<String>,
    /// `TYPE[,KEY=VALUE...]` (default `registry`).
    pub backend: String,
    /// The shared directory for `local` and `tarball`.
    pub cache_dir: Option<PathBuf>,
    /// The branch (default: CI variables, then git).
    pub branch: Option<String>,
    /// The default branch (default: CI variables, origin/HEAD, main, master).
    pub default_branch: Option<String>,
    /// The commit (default: git's HEAD).
    pub commit: Option<String>,
    /// The chain, comma-separated (default `branch,merge-base,default-branch,parent,unprefixed`).
    pub chain: String,
    /// Write no cache.
    pub read_only: bool,
    /// Write caches even for a pull request from a fork (read-only by default).
    pub allow_fork_writes: bool,
    /// Tags of the final image.
    pub tags: Vec<String>,
    /// Push the tags after a successful build.
    pub push: bool,
    /// Cache failures are fatal.
    pub strict_cache: bool,
    /// `--build-arg NAME=VALUE` pairs.
    pub build_args: Vec<(String, String)>,
    /// Options for `docker build`, untouched.
    pub docker_args: Vec<String>,
    /// Scratch directory (tarball).
    pub work_dir: Option<PathBuf>,
    /// The platform to build for (`--platform`); default: the engine's.
    pub platform: Option<String>,
}

/// The default `--chain`.
pub const DEFAULT_CHAIN: &str = "branch,merge-base,default-branch,parent,unprefixed";
/// The default `--backend`.
pub const DEFAULT_BACKEND: &str = "registry";

impl Settings {
    /// Settings for `image` and `context` with every default.
    pub fn new(image: impl Into<String>, context: impl Into<PathBuf>) -> Settings {
        Settings {
            image: image.into(),
            context: context.into(),
            file: None,
            target: None,
            backend: DEFAULT_BACKEND.to_string(),
            cache_dir: None,
            branch: None,
            default_branch: None,
            commit: None,
            chain: DEFAULT_CHAIN.to_string(),
            read_only: false,
            allow_fork_writes: false,
            tags: Vec::new(),
            push: false,
            strict_cache: false,
            build_args: Vec::new(),
            docker_args: Vec::new(),
            work_dir: None,
            platform: None,
        }
    }

    /// Checks the settings, reads git (and the CI's variables in `env`) and returns the plan's options.
    pub fn plan_options(&self, env: &Environment) -> Result<PlanOptions> {
        let repository = Repository::parse(&self.image)?;
        let backend = Backend::parse(&self.backend, self.cache_dir.as_deref())?;
        let chain = Level::parse_chain(&self.chain)?;
        if !self.context.is_dir() {
            bail!("the build context {} is not a directory", self.context.display());
        }
        let overrides = GitOverrides {
            branch: self.branch.clone(),
            default_branch: self.default_branch.clone(),
            commit: self.commit.clone(),
        };
        let git = GitFacts::discover(&self.context, &overrides, env)?;
        let mut options = PlanOptions::new(&self.context, repository, git);
        options.dockerfile = self.file.clone();
        options.target = self.target.clone();
        options.backend = backend;
        options.chain = chain;
        options.access = if self.read_only { Access::ReadOnly } else { Access::ReadWrite };
        if !self.read_only {
            if let Some(why) = crate::ci::fork_pull_request(env) {
                if self.allow_fork_writes {
                    options.notes.push(format!("writes caches although {why}: --allow-fork-writes"));
                } else {
                    options.access = Access::ReadOnly;
                    options.notes.push(format!(
                        "read-only: {why}, and a fork's branch names could overwrite this repository's caches; --allow-fork-writes writes anyway"
                    ));
                }
            }
        }
        options.cache_errors = if self.strict_cache { CacheErrors::Fail } else { CacheErrors::Warn };
        for tag in &self.tags {
            crate::refs::check_no_credentials(tag, "a --tag image")?;
        }
        options.tags = self.tags.clone();
        options.push_tags = self.push;
        options.build_args = self.build_args.iter().cloned().collect::<BTreeMap<_, _>>();
        options.docker_args = self.docker_args.clone();
        if let Some(platform) = &self.platform {
            for one in platform.split(',') {
                crate::dockerfile::Platform::parse(one)?;
            }
            if self.docker_args.iter().any(|arg| arg == "--platform" || arg.starts_with("--platform=")) {
                bail!("--platform is given twice, to cachefrom and after `--`; give it once");
            }
            options.platform = Some(platform.clone());
        }
        if let Some(work_dir) = &self.work_dir {
            options.work_dir = work_dir.clone();
        }
        Ok(options)
    }
}
