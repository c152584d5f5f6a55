//! The plan: which stages get built in what order, which cache sources each reads, in what
//! priority, and what gets written where. Plain data, computed without running Docker;
//! `Display` renders it as the shell script a person would have written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize, Serializer};

use crate::backend::{Backend, CacheLocation};
use crate::dockerfile::{read_dockerfile_with, Dockerfile};
use crate::git::GitFacts;
use crate::refs::{cache_tag, Repository, TagKey};
use crate::render::{redact_docker_args, shell_quote};
use crate::secrets::{self, HIDDEN};

/// One level of the cache-source chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// The branch being built: `cache-<stage>.<branch>`.
    Branch,
    /// The commit being built: `cache-<stage>.<sha>` (a re-run of the same commit).
    Commit,
    /// The merge-base of the branch with the default branch: `cache-<stage>.<sha>`.
    MergeBase,
    /// The default branch: `cache-<stage>.<default branch>`.
    DefaultBranch,
    /// HEAD^1: `cache-<stage>.<sha>`.
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
    fn key(self, git: &GitFacts) -> std::result::Result<Option<TagKey>, String> {
        let known = |value: &Option<String>, what: &str, key: fn(String) -> TagKey| {
            value.clone().map(|value| Some(key(value))).ok_or_else(|| format!("{what} unknown"))
        };
        match self {
            Level::Branch => known(&git.branch, "branch", TagKey::Branch),
            Level::Commit => known(&git.commit, "commit", TagKey::Commit),
            Level::MergeBase if git.on_default_branch() => Err("on the default branch".to_string()),
            Level::MergeBase => known(&git.merge_base, "merge-base", TagKey::Commit),
            Level::DefaultBranch => Ok(Some(TagKey::Branch(git.default_branch.clone()))),
            Level::Parent => known(&git.parent, "parent commit", TagKey::Commit),
            Level::Unprefixed => Ok(None),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Level {
    type Err = anyhow::Error;

    /// One level by its name (`branch`, `merge-base`, …); a chain is [`Level::parse_chain`].
    fn from_str(text: &str) -> Result<Level> {
        match Level::parse_chain(text)?.as_slice() {
            [level] => Ok(*level),
            _ => bail!("`{text}` is a chain, not one cache level"),
        }
    }
}

/// A chain as `--chain` writes it: `branch,merge-base,default-branch`.
pub fn chain_text(chain: &[Level]) -> String {
    chain.iter().map(|level| level.name()).collect::<Vec<_>>().join(",")
}

/// Whether the run may write caches; written `read-write` or `read-only`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Read caches and write the tags this branch may write.
    #[default]
    ReadWrite,
    /// Read caches, write nothing (e.g. pull requests from forks).
    ReadOnly,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::ReadWrite => "read-write",
            Access::ReadOnly => "read-only",
        })
    }
}

impl std::str::FromStr for Access {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Access> {
        match text.trim() {
            "read-write" => Ok(Access::ReadWrite),
            "read-only" => Ok(Access::ReadOnly),
            other => bail!("unknown access `{}`; write read-write or read-only", crate::secrets::name_part(other)),
        }
    }
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

/// How the stages are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Execution {
    /// One `docker buildx build` of the target: BuildKit runs independent stages at once, imports
    /// the caches once and exports one cache (`mode=max`, every stage's layers); the other tags
    /// are written by copying that cache. When the build fails, each stage it finished is
    /// exported from BuildKit's local cache (nothing is rebuilt).
    OneBuild,
    /// One build per stage, in order, each writing its cache right after it: the inline backend
    /// (a cache travels only inside the image it belongs to) and the classic builder.
    StageByStage,
}

/// One write of a cache after the build that exported it. The same value is rendered in the
/// script and carried out by the executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "write", rename_all = "kebab-case")]
pub enum CacheWrite {
    /// Gives the cache manifest at `from` the further tags `to` in the same repository: the
    /// manifest is read once and written under each tag byte for byte; no layer moves.
    CopyTag {
        /// `REPOSITORY:TAG` BuildKit exported to.
        from: String,
        /// The further tags (`REPOSITORY:TAG`).
        to: Vec<String>,
    },
    /// `docker push` of a stage image carrying inline cache (`push-image` in the JSON plan).
    #[serde(rename = "push-image")]
    PushCacheImage {
        /// `REPOSITORY:TAG`.
        image: String,
    },
    /// Copies an exported local cache (hard links where it can) to `to`, through `TO.partial`.
    CopyDir {
        /// Where BuildKit exported the cache.
        from: PathBuf,
        /// The cache directory of one tag.
        to: PathBuf,
    },
    /// Packs an exported local cache into the tar file `to`, through `TO.partial`.
    Pack {
        /// Where BuildKit exported the cache.
        from: PathBuf,
        /// The tar file of one tag.
        to: PathBuf,
    },
}

impl CacheWrite {
    /// Where this write puts the cache, one entry a tag.
    pub fn destinations(&self) -> Vec<String> {
        match self {
            CacheWrite::CopyTag { to, .. } => to.clone(),
            CacheWrite::PushCacheImage { image } => vec![image.clone()],
            CacheWrite::CopyDir { to, .. } | CacheWrite::Pack { to, .. } => vec![to.display().to_string()],
        }
    }

    /// The shell command a person would write for it.
    pub fn shell(&self) -> String {
        match self {
            CacheWrite::CopyTag { from, to } => {
                let mut line = format!("cachefrom copy-tag {}", shell_quote(from));
                for tag in to {
                    line.push(' ');
                    line.push_str(&shell_quote(tag));
                }
                line
            }
            CacheWrite::PushCacheImage { image } => format!("docker push {}", shell_quote(image)),
            // `.partial.$$`: the shell's own scratch name, as the executor uses its process id.
            CacheWrite::CopyDir { from, to } => {
                let (from, partial, dir) =
                    (quote_path(from), format!("{}$$", quote_path(&partial_path(to))), quote_path(to));
                format!(
                    "rm -rf {partial} && mkdir -p {partial} && {{ cp -al {from}/. {partial} 2>/dev/null || {{ rm -rf {partial} && mkdir -p {partial} && cp -a {from}/. {partial}; }}; }} && rm -rf {dir} && mv {partial} {dir}"
                )
            }
            CacheWrite::Pack { from, to } => {
                let partial = format!("{}$$", quote_path(&partial_path(to)));
                let file = quote_path(to);
                let parent = quote_path(to.parent().unwrap_or(Path::new(".")));
                format!("mkdir -p {parent} && tar -cf {partial} -C {} . && mv {partial} {file}", quote_path(from))
            }
        }
    }
}

/// `PATH.partial.`: the start of where a cache is written before it is renamed into place; the
/// writer adds its process id ([`partial_path_of`]), so that concurrent writers never share one.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial.");
    PathBuf::from(partial)
}

/// `PATH.partial.PID`: this process's scratch name for `path`.
pub fn partial_path_of(path: &Path) -> PathBuf {
    let mut partial = partial_path(path).into_os_string();
    partial.push(std::process::id().to_string());
    PathBuf::from(partial)
}

fn quote_path(path: &Path) -> String {
    shell_quote(&path.display().to_string())
}

/// One step of the plan, in the order the executor carries them out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// `docker build` of `stage` (with every stage it needs).
    Build {
        /// The stage built (`--target`).
        stage: String,
    },
    /// Writes the cache the build of `stage` exported.
    Write {
        /// The stage whose build exported it.
        stage: String,
        /// The write.
        write: CacheWrite,
    },
    /// `docker push` of the final image (the classic builder; buildx pushes within the build).
    PushImage {
        /// `REPOSITORY:TAG`.
        image: String,
    },
}

/// What a failed one-build run does for `stage` when the build finished it: export its cache from
/// BuildKit's local cache (a `cacheonly` build of `--target stage`), then write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// The stage.
    pub stage: String,
    /// The stages whose caches this covers: the stage and those it reads from.
    pub covers: Vec<String>,
    /// The writes after the export.
    pub writes: Vec<CacheWrite>,
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
fn docker_platform(docker_args: &[String]) -> Option<String> {
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
    /// The built stages it reads from directly (through unnamed stages built inside it, if
    /// any). [`Plan::ancestors`] gives every stage it reads from, directly or not.
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
    /// `--platform` given to cachefrom (passed to docker); `None` when not given, or given after `--`.
    pub platform: Option<String>,
    /// A scratch directory (tarball backend).
    pub work_dir: PathBuf,
    /// Why parts of the chain or of the Dockerfile are not used.
    pub notes: Vec<String>,
    /// The images outside the Dockerfile that the build reads (`FROM`, `COPY --from`, mounts).
    pub external_images: Vec<String>,
    /// How the stages are built.
    pub execution: Execution,
    /// What runs, in order.
    pub steps: Vec<Step>,
    /// One-build runs: what a failed build does, stage by stage, in this order.
    pub recovery: Vec<Recovery>,
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
        let dockerfile = read_dockerfile_with(&dockerfile_path, &options.parse_options()?)?;
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
        notes.extend(options.notes.iter().cloned());

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

        // One note for every secret-looking build argument (their names only).
        let mut hidden: Vec<String> = Vec::new();
        for (name, value) in &options.build_args {
            if secrets::is_secret(name, value) {
                secrets::mask(value);
                hidden.push(secrets::name_part(name));
            }
        }
        let mut hidden_after_dashes: Vec<String> = Vec::new();
        for (name, value) in docker_build_args(&options.docker_args) {
            if secrets::is_secret(&name, &value) {
                secrets::mask(&value);
                hidden_after_dashes.push(secrets::name_part(&name));
            }
        }
        if !hidden.is_empty() {
            notes.push(format!(
                "build arguments that look secret, their values not shown: {}; docker reads them from the environment (set them to run this script). A build argument stays in the image's history: pass secrets with --secret id=…,env=NAME after `--`, read with RUN --mount=type=secret",
                hidden.join(", ")
            ));
        }
        if !hidden_after_dashes.is_empty() {
            notes.push(format!(
                "build arguments after `--` that look secret, their values not shown: {}. A build argument stays in the image's history: pass secrets with --secret",
                hidden_after_dashes.join(", ")
            ));
        }
        if let Some(names) = options.backend.credential_names() {
            notes.push(format!(
                "the {} backend's credentials are not shown: docker gets them in {names}",
                options.backend.name()
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
        let by_key: BTreeMap<String, &crate::dockerfile::Stage> =
            dockerfile.stages.iter().map(|stage| (stage.key(), stage)).collect();

        let refs = |stage_key: &str, levels: &[Level]| -> Vec<CacheRef> {
            levels
                .iter()
                .filter_map(|level| {
                    let key = level.key(&options.git).ok()?;
                    let tag = cache_tag(stage_key, key.as_ref());
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
                    depends_on: nearest_built(dockerfile, &by_key, stage, &built_keys),
                    cache_from: refs(&key, &chain),
                    cache_to,
                    image_tags,
                    is_target,
                }
            })
            .collect();

        let execution = if options.builder == Builder::Buildx && options.backend != Backend::Inline {
            Execution::OneBuild
        } else {
            Execution::StageByStage
        };
        let mut plan = Plan {
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
            platform: options.platform.clone(),
            work_dir: options.work_dir.clone(),
            notes,
            external_images: order
                .iter()
                .flat_map(|stage| stage.external_images.iter().cloned())
                .collect::<BTreeSet<String>>()
                .into_iter()
                .collect(),
            execution,
            steps: Vec::new(),
            recovery: Vec::new(),
        };
        plan.steps = plan.compute_steps();
        plan.recovery = plan.compute_recovery();
        Ok(plan)
    }

    /// The stages the plan builds with a `docker build` of their own, in order: the target alone
    /// for one build of the target (it builds and caches every stage it reads), every stage for
    /// stage-by-stage builds (inline, the classic builder).
    pub fn builds(&self) -> Vec<&StagePlan> {
        match self.execution {
            Execution::OneBuild => self.stages.iter().filter(|stage| stage.is_target).collect(),
            Execution::StageByStage => self.stages.iter().collect(),
        }
    }

    /// The stage built last, whose image is the result.
    pub fn target_stage(&self) -> &StagePlan {
        self.stages.iter().find(|stage| stage.is_target).unwrap_or_else(|| &self.stages[self.stages.len() - 1])
    }

    fn compute_steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        for stage in self.builds() {
            steps.push(Step::Build { stage: stage.name.clone() });
            for write in self.writes_after(stage) {
                steps.push(Step::Write { stage: stage.name.clone(), write });
            }
        }
        if self.push_tags && self.builder == Builder::Classic {
            steps.extend(self.tags.iter().map(|tag| Step::PushImage { image: tag.clone() }));
        }
        steps
    }

    fn compute_recovery(&self) -> Vec<Recovery> {
        if self.execution != Execution::OneBuild || self.write_levels.is_empty() {
            return Vec::new();
        }
        self.stages
            .iter()
            .rev()
            .filter(|stage| !stage.is_target)
            .map(|stage| Recovery {
                stage: stage.name.clone(),
                covers: vec![stage.name.clone()],
                writes: self.writes_after(stage),
            })
            .collect()
    }

    /// The stages one build of `stage` covers, in build order: with every stage it reads from in
    /// a one-build run, alone stage by stage.
    pub fn covered_by<'a>(&'a self, stage: &'a StagePlan) -> Vec<&'a StagePlan> {
        match self.execution {
            Execution::OneBuild => self.ancestors(stage).into_iter().chain(std::iter::once(stage)).collect(),
            Execution::StageByStage => vec![stage],
        }
    }

    /// Every built stage `stage` reads from, directly or not, in build order.
    pub fn ancestors(&self, stage: &StagePlan) -> Vec<&StagePlan> {
        let mut found = BTreeSet::new();
        let mut pending: Vec<&String> = stage.depends_on.iter().collect();
        while let Some(name) = pending.pop() {
            if found.insert(name.clone()) {
                if let Some(other) = self.stage(name) {
                    pending.extend(other.depends_on.iter());
                }
            }
        }
        self.stages.iter().filter(|other| found.contains(&other.name)).collect()
    }

    /// The stages whose caches a build of `stage` reads besides its own: every stage it reads
    /// from for the target of a one-build run (a stage that finished in a failed run has a cache
    /// of its own), the stages it reads directly otherwise (each was built and written before it,
    /// and its cache holds the layers of what it reads).
    pub fn source_stages<'a>(&'a self, stage: &'a StagePlan) -> Vec<&'a StagePlan> {
        if stage.is_target && self.execution == Execution::OneBuild {
            self.ancestors(stage)
        } else {
            stage.depends_on.iter().filter_map(|name| self.stage(name)).collect()
        }
    }

    /// Where the build of `stage` exports: the first tag `stage` writes. The other tags of the
    /// stage and of the stages it reads from get a copy (see [`Plan::writes_after`]).
    pub fn primary_write<'a>(&'a self, stage: &'a StagePlan) -> Option<&'a CacheRef> {
        stage.cache_to.first()
    }

    /// The writes that follow a successful build of `stage`: its own tags that the build did not
    /// export to itself (a one-build target's cache holds every stage's layers, so its tags serve
    /// every stage).
    pub fn writes_after(&self, stage: &StagePlan) -> Vec<CacheWrite> {
        let all: Vec<&CacheRef> = stage.cache_to.iter().collect();
        self.writes_to(stage, &all)
    }

    /// The writes that put the cache the build of `stage` exported at each of `locations`.
    pub fn writes_to(&self, stage: &StagePlan, all: &[&CacheRef]) -> Vec<CacheWrite> {
        let Some(primary) = self.primary_write(stage) else { return Vec::new() };
        match &self.backend {
            // The build pushes every tag it was given already.
            Backend::Inline if self.pushes_in_build(stage) => Vec::new(),
            Backend::Inline => stage
                .cache_to
                .iter()
                .filter_map(|write| match &write.location {
                    CacheLocation::Image(image) => Some(CacheWrite::PushCacheImage { image: image.clone() }),
                    _ => None,
                })
                .collect(),
            Backend::Registry { .. } => {
                let to: Vec<String> = all
                    .iter()
                    .filter(|write| write.location != primary.location)
                    .map(|write| write.location.to_string())
                    .collect();
                if to.is_empty() {
                    Vec::new()
                } else {
                    vec![CacheWrite::CopyTag { from: primary.location.to_string(), to }]
                }
            }
            Backend::Local { .. } | Backend::Tarball { .. } => all
                .iter()
                .filter_map(|write| {
                    let from = self.staging_dir(&stage.name);
                    match &write.location {
                        CacheLocation::Directory(dir) => Some(CacheWrite::CopyDir { from, to: dir.clone() }),
                        CacheLocation::TarFile(file) => Some(CacheWrite::Pack { from, to: file.clone() }),
                        _ => None,
                    }
                })
                .collect(),
            // BuildKit writes every name itself (see `build_command`).
            Backend::S3 { .. } | Backend::Gha { .. } => Vec::new(),
        }
    }

    /// True when the options after `--` choose the build's output themselves.
    fn user_output(&self) -> bool {
        self.docker_args.iter().any(|arg| {
            let flag = arg.split('=').next().unwrap_or(arg);
            matches!(flag, "-o" | "--output" | "--load" | "--iidfile" | "--metadata-file")
        })
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
            // A secret's value reaches docker in its environment (see `docker_env`), never argv.
            let arg = if self.secret_in_env(name, value) { name.clone() } else { format!("{name}={value}") };
            args.extend(["--build-arg".into(), arg]);
        }
        if let Some(platform) = &self.platform {
            args.extend(["--platform".into(), platform.clone()]);
        }
        if self.builder == Builder::Buildx {
            if !self.docker_args.iter().any(|arg| arg.starts_with("--provenance")) {
                args.push("--provenance=false".into());
            }
            if self.backend == Backend::Inline {
                args.extend(["--cache-to".into(), "type=inline".into()]);
            }
        }
        let mut seen = BTreeSet::new();
        for (source_stage, source) in sources {
            let unpacked = self.unpacked_dir(source_stage);
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
        if self.builder == Builder::Buildx && self.backend.needs_cache_export() && !user_output && !stage.is_target {
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

    /// The plan as pretty JSON, with secret-looking values hidden.
    pub fn to_json(&self) -> String {
        secrets::scrub(&serde_json::to_string_pretty(self).expect("a plan is plain data")).into_owned()
    }

    /// True when build argument `name` is secret and goes to docker in its environment
    /// (`--build-arg NAME`): every secret one except names docker itself reads (`DOCKER_*`,
    /// `BUILDX_*`, `BUILDKIT_*`, proxies, `PATH`, `HOME`), which stay on the command line.
    fn secret_in_env(&self, name: &str, value: &str) -> bool {
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
}

/// The built stages `stage` reads from: its direct dependencies, looking through folded ones.
fn nearest_built(
    dockerfile: &Dockerfile,
    by_key: &BTreeMap<String, &crate::dockerfile::Stage>,
    stage: &crate::dockerfile::Stage,
    built: &BTreeSet<String>,
) -> Vec<String> {
    let mut found = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut pending: Vec<&String> = stage.depends_on.iter().collect();
    while let Some(key) = pending.pop() {
        if !seen.insert(key.clone()) {
            continue;
        }
        if built.contains(key) {
            found.insert(by_key[key].index);
        } else if let Some(folded) = by_key.get(key) {
            pending.extend(folded.depends_on.iter());
        }
    }
    found.into_iter().map(|index| dockerfile.stages[index].key()).collect()
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

fn redact_build_args(build_args: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    build_args
        .iter()
        .map(|(name, value)| {
            (name.clone(), if secrets::is_secret(name, value) { HIDDEN.to_string() } else { value.clone() })
        })
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

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
