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
    /// Keep the contents of `RUN --mount=type=cache` across runners (registry, local, tarball).
    pub cache_mounts: bool,
    /// The most a cache mount may hold (bytes, before compression) to be saved.
    pub cache_mount_max_size: u64,
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
            cache_mounts: true,
            cache_mount_max_size: crate::mounts::DEFAULT_MAX_SIZE,
            work_dir,
            platform: None,
            build_platform: None,
            notes: Vec::new(),
        }
    }

    /// The platforms and build arguments the Dockerfile is read with, as BuildKit will see them.
    pub fn parse_options(&self) -> Result<crate::dockerfile::ParseOptions> {
        use crate::dockerfile::Platform;
        let docker = DockerArgs::read(&self.docker_args)?;
        let mut build_args = docker.build_args;
        build_args.extend(self.build_args.clone());
        let platform = self.platform.clone().or(docker.platform);
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

/// Options of `docker buildx build` that take a value as the next word when written without `=`
/// (the others are switches).
const TAKES_VALUE: [&str; 23] = [
    "--add-host",
    "--allow",
    "--annotation",
    "--attest",
    "--build-arg",
    "--build-context",
    "--builder",
    "--cgroup-parent",
    "--iidfile",
    "--label",
    "--metadata-file",
    "--network",
    "--no-cache-filter",
    "-o",
    "--output",
    "--platform",
    "--provenance",
    "--sbom",
    "--secret",
    "--shm-size",
    "--ssh",
    "--ulimit",
    "--call",
];

/// Options after `--` that make a build's result depend on more than the inputs cachefrom hashes.
const UNHASHED_OPTIONS: [&str; 5] = ["--no-cache", "--no-cache-filter", "--pull", "--build-context", "--check"];

/// The options given to docker untouched (after `--`), read once: what cachefrom needs of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerArgs {
    /// The words as given.
    pub words: Vec<String>,
    /// `--builder NAME`: the buildx builder.
    pub builder: Option<String>,
    /// `--platform LIST`.
    pub platform: Option<String>,
    /// `--build-arg NAME=VALUE` pairs (they change what `FROM` expands to).
    pub build_args: BTreeMap<String, String>,
    /// True when an option chooses the build's output (`-o`, `--output`, `--load`, `--iidfile`,
    /// `--metadata-file`).
    pub output: bool,
    /// True when `--provenance` is given.
    pub provenance: bool,
    /// The first option that makes the result depend on more than the hashed inputs
    /// (`--no-cache`, `--pull`, a named build context, …).
    pub unhashed: Option<String>,
}

impl DockerArgs {
    /// Reads `words`; an option cachefrom sets itself (`--target`, `--cache-from`, `-t`, …) is
    /// refused with what to use instead.
    pub fn read(words: &[String]) -> Result<DockerArgs> {
        let mut read = DockerArgs { words: words.to_vec(), ..DockerArgs::default() };
        for (flag, value) in options_of(words) {
            if let Some((_, instead)) = OWN_DOCKER_OPTIONS.iter().find(|(own, _)| *own == flag) {
                bail!(
                    "`{flag}` after `--` conflicts with what cachefrom sets itself; use cachefrom's {instead} instead"
                );
            }
            match (flag, value) {
                ("--builder", Some(name)) => read.builder = Some(name.to_string()),
                ("--platform", Some(list)) => read.platform = Some(list.to_string()),
                ("--build-arg", Some(pair)) => {
                    if let Some((name, value)) = pair.split_once('=') {
                        read.build_args.insert(name.to_string(), value.to_string());
                    }
                }
                ("-o" | "--output" | "--load" | "--iidfile" | "--metadata-file", _) => read.output = true,
                ("--provenance", _) => read.provenance = true,
                _ => {}
            }
            if read.unhashed.is_none() && UNHASHED_OPTIONS.contains(&flag) {
                read.unhashed = Some(flag.to_string());
            }
        }
        Ok(read)
    }

    /// The words without `--builder NAME` (the run moved to the builder's own context).
    pub fn without_builder(&self) -> Vec<String> {
        let mut kept = Vec::new();
        let mut words = self.words.iter();
        while let Some(word) = words.next() {
            if word == "--builder" {
                words.next();
            } else if !word.starts_with("--builder=") {
                kept.push(word.clone());
            }
        }
        kept
    }
}

/// Each option among `words` with its value: `--flag=value`, `--flag value` for an option that
/// takes one ([`TAKES_VALUE`]), `--switch` alone.
fn options_of(words: &[String]) -> Vec<(&str, Option<&str>)> {
    let mut options = Vec::new();
    let mut iter = words.iter();
    while let Some(word) = iter.next() {
        if !word.starts_with('-') {
            continue;
        }
        match word.split_once('=') {
            Some((flag, value)) if flag.starts_with('-') => options.push((flag, Some(value))),
            _ if TAKES_VALUE.contains(&word.as_str()) => options.push((word.as_str(), iter.next().map(String::as_str))),
            _ => options.push((word.as_str(), None)),
        }
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn docker_arguments_are_read_once_in_both_forms() {
        let read = DockerArgs::read(&words(
            "--network=host --builder ci --platform linux/arm64 --build-arg A=1 --build-arg=B=2 --load --provenance=true --pull",
        ))
        .unwrap();
        assert_eq!(read.builder.as_deref(), Some("ci"));
        assert_eq!(read.platform.as_deref(), Some("linux/arm64"));
        assert_eq!(read.build_args, [("A".to_string(), "1".to_string()), ("B".to_string(), "2".to_string())].into());
        assert!(read.output && read.provenance);
        assert_eq!(read.unhashed.as_deref(), Some("--pull"));
        assert_eq!(
            read.without_builder(),
            words(
                "--network=host --platform linux/arm64 --build-arg A=1 --build-arg=B=2 --load --provenance=true --pull"
            )
        );
        // A value that looks like an option is a value: `--label --no-cache` labels, it does not skip the cache.
        let labelled = DockerArgs::read(&words("--label --no-cache")).unwrap();
        assert_eq!(labelled.unhashed, None);
        let error = DockerArgs::read(&words("--cache-to type=inline")).unwrap_err().to_string();
        assert!(error.contains("use cachefrom's --backend"), "{error}");
        assert!(DockerArgs::read(&words("-t x")).is_err());
    }
}
