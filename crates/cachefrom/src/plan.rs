//! The plan: which stages get built in what order, which cache sources each reads, in what
//! priority, and what gets written where. Plain data, computed without running Docker;
//! `Display` renders it as the shell script a person would have written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize, Serializer};

use crate::backend::{Backend, CacheLocation};
use crate::dockerfile::{read_dockerfile, Dockerfile};
use crate::git::GitFacts;
use crate::refs::{cache_tag, Repository};

/// One level of the cache-source chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// The branch being built: `cache-<stage>-<branch>`.
    Branch,
    /// The commit being built: `cache-<stage>-<sha>` (a re-run of the same commit).
    Commit,
    /// The merge-base of the branch with the default branch: `cache-<stage>-<sha>`.
    MergeBase,
    /// The default branch: `cache-<stage>-<default branch>`.
    DefaultBranch,
    /// HEAD^1: `cache-<stage>-<sha>`.
    Parent,
    /// No branch or commit: `cache-<stage>`.
    Unprefixed,
}

impl Level {
    /// The chain used unless the caller gives another: most specific first.
    pub const DEFAULT_CHAIN: [Level; 5] =
        [Level::Branch, Level::MergeBase, Level::DefaultBranch, Level::Parent, Level::Unprefixed];

    /// The level's name as written in `--chain` and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Level::Branch => "branch",
            Level::Commit => "commit",
            Level::MergeBase => "merge-base",
            Level::DefaultBranch => "default-branch",
            Level::Parent => "parent",
            Level::Unprefixed => "unprefixed",
        }
    }

    /// Parses a comma-separated chain such as `branch,default-branch,unprefixed`.
    pub fn parse_chain(text: &str) -> Result<Vec<Level>> {
        let all =
            [Level::Branch, Level::Commit, Level::MergeBase, Level::DefaultBranch, Level::Parent, Level::Unprefixed];
        let mut chain = Vec::new();
        for word in text.split(',').map(str::trim).filter(|word| !word.is_empty()) {
            let Some(level) = all.iter().find(|level| level.name() == word) else {
                let names: Vec<&str> = all.iter().map(|level| level.name()).collect();
                bail!("unknown cache level `{word}` in --chain; the levels are: {}", names.join(", "));
            };
            if chain.contains(level) {
                bail!("cache level `{word}` appears twice in --chain");
            }
            chain.push(*level);
        }
        if chain.is_empty() {
            bail!("--chain is empty; give at least one level, e.g. --chain branch,default-branch");
        }
        Ok(chain)
    }

    /// The tag key of this level for `git`, or `None` when the level does not apply, with why.
    fn key(self, git: &GitFacts) -> std::result::Result<Option<String>, String> {
        let known =
            |value: &Option<String>, what: &str| value.clone().map(Some).ok_or_else(|| format!("{what} unknown"));
        match self {
            Level::Branch => known(&git.branch, "branch"),
            Level::Commit => known(&git.commit, "commit"),
            Level::MergeBase if git.on_default_branch() => Err("on the default branch".to_string()),
            Level::MergeBase => known(&git.merge_base, "merge-base"),
            Level::DefaultBranch => Ok(Some(git.default_branch.clone())),
            Level::Parent => known(&git.parent, "parent commit"),
            Level::Unprefixed => Ok(None),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the run may write caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Read caches and write the tags this branch may write.
    ReadWrite,
    /// Read caches, write nothing (e.g. pull requests from forks).
    ReadOnly,
}

/// Which docker front end builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Builder {
    /// `docker buildx build` (BuildKit): cache sources are read straight from where they live.
    Buildx,
    /// The classic `docker build` (`DOCKER_BUILDKIT=0`): cache images are pulled first, in chain order.
    Classic,
}

/// What a cache failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheErrors {
    /// The build goes on without that cache, and says so.
    Warn,
    /// Any cache failure fails the run.
    Fail,
}

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
}

impl PlanOptions {
    /// Options with the defaults: the last stage, the inline backend, the default chain, read-write.
    pub fn new(context: impl Into<PathBuf>, repository: Repository, git: GitFacts) -> PlanOptions {
        let work_dir = std::env::temp_dir().join("cachefrom").join(repository.path.replace('/', "-"));
        PlanOptions {
            context: context.into(),
            dockerfile: None,
            target: None,
            repository,
            backend: Backend::Inline,
            git,
            chain: Level::DEFAULT_CHAIN.to_vec(),
            access: Access::ReadWrite,
            builder: Builder::Buildx,
            cache_errors: CacheErrors::Warn,
            tags: Vec::new(),
            push_tags: false,
            build_args: BTreeMap::new(),
            docker_args: Vec::new(),
            work_dir,
        }
    }
}

/// One place a stage's cache may be read from or written to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CacheRef {
    /// The level of the chain.
    pub level: Level,
    /// The tag (also the file or directory name for local and tarball).
    pub tag: String,
    /// Where it lives for the chosen backend.
    pub location: CacheLocation,
}

/// One `docker build --target` of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    /// The stage's name (or index, for an unnamed final stage).
    pub name: String,
    /// Its index in the Dockerfile.
    pub index: usize,
    /// The `--target` value; `None` for an unnamed final stage, built without `--target`.
    pub target: Option<String>,
    /// The built stages it reads from, directly or not: their caches are cache sources too.
    pub depends_on: Vec<String>,
    /// Cache candidates for this stage, most specific first.
    pub cache_from: Vec<CacheRef>,
    /// Where this stage's cache is written.
    pub cache_to: Vec<CacheRef>,
    /// Image tags given to the build (cache tags for inline, `--tag` values for the target).
    pub image_tags: Vec<String>,
    /// True for the stage the user asked for.
    pub is_target: bool,
}

/// A stage that is built, but not on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldedStage {
    /// The stage's key (its index).
    pub name: String,
    /// Why it is not built on its own.
    pub why: String,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The build context.
    pub context: PathBuf,
    /// The Dockerfile.
    pub dockerfile: PathBuf,
    /// The target stage's name.
    pub target: String,
    /// Where images and caches live.
    pub repository: Repository,
    /// How the cache travels.
    pub backend: Backend,
    /// The docker front end.
    pub builder: Builder,
    /// Whether caches are written.
    pub access: Access,
    /// What a cache failure does.
    pub cache_errors: CacheErrors,
    /// Branch, commits, default branch.
    pub git: GitFacts,
    /// The chain as used: levels that do not apply are left out (see `notes`).
    pub chain: Vec<Level>,
    /// The levels this run writes.
    pub write_levels: Vec<Level>,
    /// The builds, in order; the target is last.
    pub stages: Vec<StagePlan>,
    /// Needed stages that are built only inside the stages that use them.
    pub folded_stages: Vec<FoldedStage>,
    /// Tags of the final image.
    pub tags: Vec<String>,
    /// Whether the final image's tags are pushed.
    pub push_tags: bool,
    /// `--build-arg` values (secret-looking values are hidden in JSON).
    #[serde(serialize_with = "serialize_build_args")]
    pub build_args: BTreeMap<String, String>,
    /// Arguments passed to docker untouched (secret-looking values are hidden in JSON).
    #[serde(serialize_with = "serialize_docker_args")]
    pub docker_args: Vec<String>,
    /// A scratch directory (tarball backend).
    pub work_dir: PathBuf,
    /// Why parts of the chain or of the Dockerfile are not used.
    pub notes: Vec<String>,
}

/// Options cachefrom sets itself; passing them after `--` would conflict.
const OWN_DOCKER_OPTIONS: [(&str, &str); 9] = [
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

impl Plan {
    /// Reads the Dockerfile and computes the plan.
    pub fn new(options: &PlanOptions) -> Result<Plan> {
        let dockerfile_path = options.dockerfile.clone().unwrap_or_else(|| options.context.join("Dockerfile"));
        let mut build_args = docker_build_args(&options.docker_args);
        build_args.extend(options.build_args.clone());
        let dockerfile = read_dockerfile(&dockerfile_path, &build_args)?;
        Plan::from_dockerfile(options, &dockerfile_path, &dockerfile)
    }

    /// Computes the plan from a parsed Dockerfile.
    pub fn from_dockerfile(options: &PlanOptions, dockerfile_path: &Path, dockerfile: &Dockerfile) -> Result<Plan> {
        check_docker_args(&options.docker_args)?;
        if options.builder == Builder::Classic && options.backend != Backend::Inline {
            bail!(
                "the {} backend needs BuildKit (docker buildx); the classic builder can use only --backend inline",
                options.backend.name()
            );
        }
        let order = dockerfile.build_order(options.target.as_deref())?;
        let target = order.last().expect("a build order ends with its target");
        let mut notes = options.git.notes.clone();

        let mut chain = Vec::new();
        let mut seen_keys = BTreeSet::new();
        for level in &options.chain {
            match level.key(&options.git) {
                Ok(key) => {
                    if seen_keys.insert(key.clone()) {
                        chain.push(*level);
                    }
                }
                Err(why) => notes.push(format!("cache level {level} is not used: {why}")),
            }
        }
        let write_levels = write_levels(options);
        if options.access == Access::ReadOnly {
            notes.push("read-only: no cache is written".to_string());
        } else if !options.git.on_default_branch() && options.git.branch.is_some() {
            notes.push(format!(
                "writes this branch's tags only: the default branch `{}` writes its own",
                options.git.default_branch
            ));
        }

        // Unnamed stages other than the target cannot be built with --target: they are built
        // inside the stages that use them, and cached only where the backend exports every layer.
        let mut folded_stages = Vec::new();
        let built: Vec<_> = order
            .iter()
            .filter(|stage| {
                let folded = stage.name.is_none() && stage.index != target.index;
                if folded {
                    folded_stages.push(FoldedStage {
                        name: stage.key(),
                        why: format!(
                            "stage {} has no name, so it cannot be built alone (--target); it is built inside the stages that use it{}. Name it (`FROM … AS name`) to give it a cache of its own",
                            stage.index,
                            if options.backend == Backend::Inline { ", and inline cache does not keep its layers" } else { "" }
                        ),
                    });
                }
                !folded
            })
            .collect();
        let built_keys: BTreeSet<String> = built.iter().map(|stage| stage.key()).collect();

        let refs = |stage_key: &str, levels: &[Level]| -> Vec<CacheRef> {
            levels
                .iter()
                .filter_map(|level| {
                    let key = level.key(&options.git).ok()?;
                    let tag = cache_tag(stage_key, key.as_deref());
                    let location = options.backend.location(&options.repository, &tag);
                    Some(CacheRef { level: *level, tag, location })
                })
                .collect()
        };

        let stages = built
            .iter()
            .map(|stage| {
                let key = stage.key();
                let is_target = stage.index == target.index;
                let cache_to = refs(&key, &write_levels);
                let mut image_tags = Vec::new();
                if options.backend.tags_stage_images() {
                    image_tags.extend(cache_to.iter().filter_map(|write| match &write.location {
                        CacheLocation::Image(image) => Some(image.clone()),
                        _ => None,
                    }));
                }
                if is_target {
                    image_tags.extend(options.tags.iter().cloned());
                }
                StagePlan {
                    name: key.clone(),
                    index: stage.index,
                    target: stage.name.clone(),
                    depends_on: dockerfile
                        .transitive_dependencies(stage)
                        .into_iter()
                        .filter(|dependency| built_keys.contains(dependency))
                        .collect(),
                    cache_from: refs(&key, &chain),
                    cache_to,
                    image_tags,
                    is_target,
                }
            })
            .collect();

        Ok(Plan {
            context: options.context.clone(),
            dockerfile: dockerfile_path.to_path_buf(),
            target: target.key(),
            repository: options.repository.clone(),
            backend: options.backend.clone(),
            builder: options.builder,
            access: options.access,
            cache_errors: options.cache_errors,
            git: options.git.clone(),
            chain,
            write_levels,
            stages,
            folded_stages,
            tags: options.tags.clone(),
            push_tags: options.push_tags,
            build_args: options.build_args.clone(),
            docker_args: options.docker_args.clone(),
            work_dir: options.work_dir.clone(),
            notes,
        })
    }

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StagePlan> {
        self.stages.iter().find(|stage| stage.name == name)
    }

    /// Where the tarball backend unpacks `stage`'s cache before its build.
    pub fn unpacked_dir(&self, stage: &str) -> PathBuf {
        self.work_dir.join("from").join(stage)
    }

    /// Where the local and tarball backends have BuildKit export `stage`'s cache, to copy or pack it afterwards.
    pub fn staging_dir(&self, stage: &str) -> PathBuf {
        self.work_dir.join("to").join(stage)
    }

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
            args.extend(["--build-arg".into(), format!("{name}={value}")]);
        }
        if self.builder == Builder::Buildx {
            if !self.docker_args.iter().any(|arg| arg.starts_with("--provenance")) {
                args.push("--provenance=false".into());
            }
            if self.backend == Backend::Inline {
                args.extend(["--cache-to".into(), "type=inline".into()]);
            }
        }
        for (source_stage, source) in sources {
            let unpacked = self.unpacked_dir(source_stage);
            args.extend(["--cache-from".into(), self.backend.cache_from_arg(&source.location, &unpacked)]);
        }
        let ignore_error = self.cache_errors == CacheErrors::Warn;
        let staging = self.staging_dir(&stage.name);
        let mut cache_to: Vec<String> = stage
            .cache_to
            .iter()
            .filter_map(|write| self.backend.cache_to_arg(&write.location, &staging, ignore_error))
            .collect();
        cache_to.dedup();
        for value in cache_to {
            args.extend(["--cache-to".into(), value]);
        }
        for tag in &stage.image_tags {
            args.extend(["-t".into(), tag.clone()]);
        }
        // A stage that only feeds later ones needs no image: with its cache exported by BuildKit,
        // `cacheonly` skips downloading its layers when every step is a hit.
        let user_output = self
            .docker_args
            .iter()
            .any(|arg| arg == "-o" || arg.starts_with("--output") || arg == "--load" || arg.starts_with("--load="));
        if self.builder == Builder::Buildx && !stage.is_target && self.backend.needs_cache_export() && !user_output {
            args.extend(["--output".into(), "type=cacheonly".into()]);
        }
        args.extend(self.docker_args.iter().cloned());
        args.push(self.context.display().to_string());
        args
    }

    /// The cache sources of `stage` when nothing has been checked: its own candidates, then those
    /// of the stages it reads from, level by level.
    pub fn all_candidate_sources(&self, stage: &StagePlan) -> Vec<(String, CacheRef)> {
        let mut sources = Vec::new();
        for level in &self.chain {
            for name in std::iter::once(&stage.name).chain(stage.depends_on.iter()) {
                let Some(owner) = self.stage(name) else { continue };
                if let Some(candidate) = owner.cache_from.iter().find(|candidate| candidate.level == *level) {
                    sources.push((name.clone(), candidate.clone()));
                }
            }
        }
        sources
    }

    /// The plan as pretty JSON, with secret-looking values hidden.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a plan is plain data")
    }
}

fn write_levels(options: &PlanOptions) -> Vec<Level> {
    if options.access == Access::ReadOnly {
        return Vec::new();
    }
    let mut levels = Vec::new();
    if options.git.branch.is_some() {
        levels.push(Level::Branch);
    }
    if options.git.commit.is_some() {
        levels.push(Level::Commit);
    }
    if options.git.branch.is_none() || options.git.on_default_branch() {
        levels.push(Level::Unprefixed);
    }
    levels
}

fn check_docker_args(docker_args: &[String]) -> Result<()> {
    for arg in docker_args {
        let flag = arg.split('=').next().unwrap_or(arg);
        if let Some((_, instead)) = OWN_DOCKER_OPTIONS.iter().find(|(own, _)| *own == flag) {
            bail!("`{flag}` after `--` conflicts with what cachefrom sets itself; use cachefrom's {instead} instead");
        }
    }
    Ok(())
}

/// The `--build-arg K=V` pairs among docker's arguments (they change what `FROM` expands to).
fn docker_build_args(docker_args: &[String]) -> BTreeMap<String, String> {
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

/// True for build-arg and variable names that usually hold secrets.
pub fn looks_secret(name: &str) -> bool {
    let upper = name.to_uppercase();
    ["TOKEN", "PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "API_KEY", "APIKEY", "PRIVATE_KEY", "AUTH"]
        .iter()
        .any(|word| upper.contains(word))
}

const HIDDEN: &str = "***";

/// `docker_args` with the values of secret-looking `--build-arg`s replaced by `***`.
pub fn redact_docker_args(docker_args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(docker_args.len());
    let mut next_is_build_arg = false;
    for arg in docker_args {
        let (prefix, pair) = if next_is_build_arg {
            ("", Some(arg.as_str()))
        } else {
            match arg.strip_prefix("--build-arg=") {
                Some(pair) => ("--build-arg=", Some(pair)),
                None => ("", None),
            }
        };
        next_is_build_arg = arg == "--build-arg";
        match pair.and_then(|pair| pair.split_once('=')) {
            Some((name, _)) if looks_secret(name) => out.push(format!("{prefix}{name}={HIDDEN}")),
            _ => out.push(arg.clone()),
        }
    }
    out
}

fn redact_build_args(build_args: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    build_args
        .iter()
        .map(|(name, value)| (name.clone(), if looks_secret(name) { HIDDEN.to_string() } else { value.clone() }))
        .collect()
}

fn serialize_build_args<S: Serializer>(
    build_args: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    redact_build_args(build_args).serialize(serializer)
}

fn serialize_docker_args<S: Serializer>(docker_args: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    redact_docker_args(docker_args).serialize(serializer)
}

/// Quotes `word` for a POSIX shell when it needs it.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A docker command line, secrets hidden, as one shell line.
pub fn render_command(args: &[String]) -> String {
    let redacted = redact_docker_args(args);
    std::iter::once("docker".to_string())
        .chain(redacted.iter().map(|arg| shell_quote(arg)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_variable(stage: &str) -> String {
    let cleaned: String = stage.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("built_{cleaned}")
}

impl fmt::Display for Plan {
    /// The plan as the shell script a person would write for it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        let git = &self.git;
        writeln!(out, "#!/bin/sh")?;
        writeln!(
            out,
            "# cachefrom plan: {} (target {}), {} backend, {} builder",
            self.dockerfile.display(),
            self.target,
            self.backend.name(),
            self.builder_name()
        )?;
        let branch = match (&git.branch, &git.branch_source) {
            (Some(branch), Some(source)) => format!("{branch} (from {source})"),
            (Some(branch), None) => branch.clone(),
            (None, _) => "unknown".to_string(),
        };
        writeln!(out, "# branch {branch}; default branch {}", git.default_branch)?;
        writeln!(
            out,
            "# commit {}; parent {}; merge-base {}",
            git.commit.as_deref().unwrap_or("unknown"),
            git.parent.as_deref().unwrap_or("unknown"),
            git.merge_base.as_deref().unwrap_or("none")
        )?;
        let chain: Vec<&str> = self.chain.iter().map(|level| level.name()).collect();
        writeln!(out, "# cache sources, most specific first: {}", chain.join(" > "))?;
        let writes: Vec<&str> = self.write_levels.iter().map(|level| level.name()).collect();
        writeln!(out, "# writes: {}", if writes.is_empty() { "nothing".to_string() } else { writes.join(", ") })?;
        for note in &self.notes {
            writeln!(out, "# note: {note}")?;
        }
        for folded in &self.folded_stages {
            writeln!(out, "# note: {}", folded.why)?;
        }
        writeln!(out, "set -eu")?;

        let stage_names: Vec<&str> = self.stages.iter().map(|stage| stage.name.as_str()).collect();
        writeln!(out, "\n# Stages, in build order: {}", stage_names.join(" -> "))?;
        for stage in &self.stages {
            writeln!(out, "# {} cache candidates:", stage.name)?;
            for candidate in &stage.cache_from {
                writeln!(out, "#   {:<15} {}", candidate.level.name(), candidate.location)?;
            }
        }
        if self.builder == Builder::Buildx && self.backend.can_check_existence() {
            writeln!(out, "# cachefrom checks which candidates exist (no layer download) and passes only those,")?;
            writeln!(out, "# from one level of the chain for every stage where it can.")?;
        }

        let unpack_needed = matches!(self.backend, Backend::Tarball { .. });
        if self.builder == Builder::Classic || unpack_needed {
            writeln!(out, "\n# Fetch the first cache that exists, level by level.")?;
            for stage in &self.stages {
                let fetches: Vec<String> =
                    stage.cache_from.iter().map(|candidate| self.fetch_command(&stage.name, candidate)).collect();
                if !fetches.is_empty() {
                    writeln!(out, "{} || true", fetches.join(" ||\n  "))?;
                }
            }
        }

        writeln!(out, "\n# Write each built stage's cache, even when a later stage fails.")?;
        writeln!(out, "push_cached() {{")?;
        let mut any_push = false;
        for stage in &self.stages {
            let pushes = self.push_commands(stage);
            if pushes.is_empty() {
                continue;
            }
            any_push = true;
            writeln!(out, "  if [ -n \"${{{}:-}}\" ]; then", shell_variable(&stage.name))?;
            for push in pushes {
                writeln!(out, "    {push} || echo \"cachefrom: cache write failed\" >&2")?;
            }
            writeln!(out, "  fi")?;
        }
        if !any_push {
            let why = if self.write_levels.is_empty() {
                "nothing to write"
            } else {
                "BuildKit writes the cache during each build (--cache-to)"
            };
            writeln!(out, "  : # {why}")?;
        }
        writeln!(out, "}}")?;
        writeln!(out, "trap push_cached EXIT")?;

        for (position, stage) in self.stages.iter().enumerate() {
            writeln!(out, "\n# Stage {} ({}/{})", stage.name, position + 1, self.stages.len())?;
            let command = self.build_command(stage, &self.all_candidate_sources(stage), "plain");
            writeln!(out, "{}", render_command_multiline(&command))?;
            writeln!(out, "{}=1", shell_variable(&stage.name))?;
        }
        if self.push_tags && !self.tags.is_empty() {
            writeln!(out, "\n# Push the final image.")?;
            for tag in &self.tags {
                writeln!(out, "docker push {}", shell_quote(tag))?;
            }
        }
        f.write_str(&out)
    }
}

impl Plan {
    fn builder_name(&self) -> &'static str {
        match self.builder {
            Builder::Buildx => "buildx",
            Builder::Classic => "classic",
        }
    }

    /// The shell command that fetches one cache candidate (classic builder and tarball).
    fn fetch_command(&self, stage: &str, candidate: &CacheRef) -> String {
        match &candidate.location {
            CacheLocation::TarFile(file) => {
                let unpacked = self.unpacked_dir(stage);
                format!(
                    "{{ test -f {file} && mkdir -p {dir} && tar -xf {file} -C {dir}; }}",
                    file = shell_quote(&file.display().to_string()),
                    dir = shell_quote(&unpacked.display().to_string())
                )
            }
            location => format!("docker pull {}", shell_quote(&location.to_string())),
        }
    }

    /// The shell commands that write `stage`'s cache after its build.
    pub fn push_commands(&self, stage: &StagePlan) -> Vec<String> {
        stage
            .cache_to
            .iter()
            .filter_map(|write| match (&self.backend, &write.location) {
                (Backend::Inline, CacheLocation::Image(image)) => Some(format!("docker push {}", shell_quote(image))),
                (Backend::Local { .. }, CacheLocation::Directory(dir)) => {
                    let dir = shell_quote(&dir.display().to_string());
                    Some(format!(
                        "rm -rf {dir}.partial && mkdir -p {dir}.partial && cp -a {}/. {dir}.partial && rm -rf {dir} && mv {dir}.partial {dir}",
                        shell_quote(&self.staging_dir(&stage.name).display().to_string())
                    ))
                }
                (Backend::Tarball { .. }, CacheLocation::TarFile(file)) => {
                    let file = shell_quote(&file.display().to_string());
                    Some(format!(
                        "mkdir -p \"$(dirname {file})\" && tar -cf {file}.partial -C {} . && mv {file}.partial {file}",
                        shell_quote(&self.staging_dir(&stage.name).display().to_string())
                    ))
                }
                _ => None,
            })
            .collect()
    }
}

fn render_command_multiline(args: &[String]) -> String {
    let redacted = redact_docker_args(args);
    let mut lines = vec![format!(
        "docker {}",
        redacted.iter().take_while(|arg| !arg.starts_with('-')).cloned().collect::<Vec<_>>().join(" ")
    )];
    let mut rest = redacted.iter().skip_while(|arg| !arg.starts_with('-')).peekable();
    while let Some(arg) = rest.next() {
        let takes_value = matches!(
            arg.as_str(),
            "--target"
                | "-f"
                | "--build-arg"
                | "--cache-from"
                | "--cache-to"
                | "-t"
                | "--secret"
                | "--network"
                | "--platform"
                | "--output"
        );
        match rest.peek() {
            Some(value) if takes_value => {
                lines.push(format!("{} {}", shell_quote(arg), shell_quote(value)));
                rest.next();
            }
            _ => lines.push(shell_quote(arg)),
        }
    }
    lines.join(" \\\n  ")
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
