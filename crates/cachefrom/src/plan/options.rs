//! What a plan is computed from ([`PlanOptions`]), and the one reading of the options given to
//! docker untouched (after `--`): refused ones, the builder named, the platforms.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::backend::Backend;
use crate::git::GitFacts;
use crate::refs::Repository;

use super::vocabulary::{Access, Builder, CacheErrors, Level};

/// Everything a plan is computed from.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// The build context directory.
    pub context: PathBuf,
    /// The Dockerfile; `None`: `CONTEXT/Dockerfile`.
    pub dockerfile: Option<PathBuf>,
    /// The stage to build; `None`: the last one.
    pub target: Option<String>,
    /// Where the images and caches live.
    pub repository: Repository,
    /// How the cache travels.
    pub backend: Backend,
    /// Branch, commits, default branch.
    pub git: GitFacts,
    /// The cache-source chain, most specific first.
    pub chain: Vec<Level>,
    /// Whether caches are written.
    pub access: Access,
    /// The docker front end.
    pub builder: Builder,
    /// True when the builder keeps no image unless told where to put one (every buildx driver
    /// but `docker`: `remote`, `docker-container`): a target with no tag is then built with
    /// `--output type=cacheonly`, which is what it gets anyway, said outright.
    pub builder_keeps_no_image: bool,
    /// What a cache failure does.
    pub cache_errors: CacheErrors,
    /// Tags for the final image (`--tag`), pushed after a successful build when `push_tags` is set.
    pub tags: Vec<String>,
    /// Push the `--tag` images after the build.
    pub push_tags: bool,
    /// `--build-arg` values cachefrom itself was given (they also go to docker).
    pub build_args: BTreeMap<String, String>,
    /// Everything after `--`: passed to `docker build` untouched.
    pub docker_args: Vec<String>,
    /// A scratch directory for the tarball backend.
    pub work_dir: PathBuf,
    /// The platform to build for (`--platform`, also read from after `--`); `None`: the engine's.
    pub platform: Option<String>,
    /// The engine's own platform; `None`: this machine's (the executor sets it from the engine).
    pub build_platform: Option<String>,
    /// Notes for the plan from whoever made the options (why a run is read-only, …).
    pub notes: Vec<String>,
}

impl PlanOptions {
    /// Options with the defaults: the last stage, the registry backend, the default chain, read-write.
    pub fn new(context: impl Into<PathBuf>, repository: Repository, git: GitFacts) -> PlanOptions {
        // One scratch directory a process: two runs of one image on one host never share it.
        let work_dir = std::env::temp_dir().join("cachefrom").join(format!(
            "{}-{}",
            repository.path.replace('/', "-"),
            std::process::id()
        ));
        PlanOptions {
            context: context.into(),
            dockerfile: None,
            target: None,
            repository,
            backend: Backend::default(),
            git,
            chain: Level::DEFAULT_CHAIN.to_vec(),
            access: Access::ReadWrite,
            builder: Builder::Buildx,
            builder_keeps_no_image: false,
            cache_errors: CacheErrors::Warn,
            tags: Vec::new(),
            push_tags: false,
            build_args: BTreeMap::new(),
            docker_args: Vec::new(),
            work_dir,
            platform: None,
            build_platform: None,
            notes: Vec::new(),
        }
    }

    /// The platforms and build arguments the Dockerfile is read with, as BuildKit will see them.
    pub fn parse_options(&self) -> Result<crate::dockerfile::ParseOptions> {
        use crate::dockerfile::Platform;
        let mut build_args = docker_build_args(&self.docker_args);
        build_args.extend(self.build_args.clone());
        let platform = self.platform.clone().or_else(|| docker_platform(&self.docker_args));
        // Several platforms: the stages are read for the first (BuildKit builds each alike).
        let first = |list: &str| list.split(',').next().unwrap_or_default().trim().to_string();
        Ok(crate::dockerfile::ParseOptions {
            build_args,
            target_platform: platform.map(|list| Platform::parse(&first(&list))).transpose()?,
            build_platform: self.build_platform.as_deref().map(Platform::parse).transpose()?,
            target: self.target.clone(),
        })
    }
}

/// The `--platform` value among docker's arguments.
pub(crate) fn docker_platform(docker_args: &[String]) -> Option<String> {
    let mut args = docker_args.iter();
    let mut found = None;
    while let Some(arg) = args.next() {
        if arg == "--platform" {
            found = args.next().cloned();
        } else if let Some(value) = arg.strip_prefix("--platform=") {
            found = Some(value.to_string());
        }
    }
    found
}

/// Options cachefrom sets itself; passing them after `--` would conflict.
pub(crate) const OWN_DOCKER_OPTIONS: [(&str, &str); 9] = [
    ("--target", "--target STAGE"),
    ("-f", "-f/--file PATH"),
    ("--file", "-f/--file PATH"),
    ("--cache-from", "--backend and --chain"),
    ("--cache-to", "--backend"),
    ("--progress", "nothing: cachefrom reads BuildKit's progress itself"),
    ("-t", "--tag IMAGE"),
    ("--tag", "--tag IMAGE"),
    ("--push", "--push (it pushes the --tag images)"),
];

pub(crate) fn check_docker_args(docker_args: &[String]) -> Result<()> {
    for arg in docker_args {
        let flag = arg.split('=').next().unwrap_or(arg);
        if let Some((_, instead)) = OWN_DOCKER_OPTIONS.iter().find(|(own, _)| *own == flag) {
            bail!("`{flag}` after `--` conflicts with what cachefrom sets itself; use cachefrom's {instead} instead");
        }
    }
    Ok(())
}

/// The `--build-arg K=V` pairs among docker's arguments (they change what `FROM` expands to).
pub(crate) fn docker_build_args(docker_args: &[String]) -> BTreeMap<String, String> {
    let mut build_args = BTreeMap::new();
    let mut args = docker_args.iter();
    while let Some(arg) = args.next() {
        let value = if arg == "--build-arg" {
            args.next().cloned()
        } else {
            arg.strip_prefix("--build-arg=").map(str::to_string)
        };
        if let Some(value) = value {
            if let Some((name, value)) = value.split_once('=') {
                build_args.insert(name.to_string(), value.to_string());
            }
        }
    }
    build_args
}

/// The buildx builder named among docker's options (`--builder NAME`, `--builder=NAME`).
pub(crate) fn builder_from_docker_args(args: &[String]) -> Option<String> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--builder" {
            return iter.next().cloned();
        }
        if let Some(name) = arg.strip_prefix("--builder=") {
            return Some(name.to_string());
        }
    }
    None
}
