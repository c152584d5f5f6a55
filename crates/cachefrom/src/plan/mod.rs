//! The plan: which stages get built in what order, which cache sources each reads, in what
//! priority, and what gets written where. Plain data, computed without running Docker;
//! `Display` renders it as the shell script a person would have written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize, Serializer};

use crate::backend::{Backend, CacheLocation};
use crate::dockerfile::{read_dockerfile_with, Dockerfile};
use crate::git::GitFacts;
use crate::refs::{cache_tag_for, Repository};
use crate::render::redact_docker_args;
use crate::secrets::{self, HIDDEN};

mod command;
mod mounts;
mod options;
mod steps;
pub use mounts::{MountPlan, RUN_ARG};
mod vocabulary;

pub use options::*;
pub use steps::BUILD_TRIES;
pub use vocabulary::*;

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
    /// See [`PlanOptions::builder_keeps_no_image`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub builder_keeps_no_image: bool,
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
    /// What cachefrom reads of `docker_args`, read once.
    #[serde(skip)]
    pub docker: DockerArgs,
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
    /// The cache mounts kept across runners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountPlan>,
    /// The image the cache mounts' restore and save builds run in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_image: Option<String>,
    /// The image the restore build runs in first when it is not `mount_image`: the target's own
    /// base (most often a small runtime image the build pulls anyway), while `mount_image` is
    /// pulled beside it; when that build fails (no `tar` there), it runs again in `mount_image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_image: Option<String>,
    /// The most a cache mount may hold to be saved (bytes, before compression).
    pub cache_mount_max_size: u64,
}

impl Plan {
    /// Reads the Dockerfile and computes the plan.
    pub fn new(options: &PlanOptions) -> Result<Plan> {
        let dockerfile_path = options.dockerfile.clone().unwrap_or_else(|| options.context.join("Dockerfile"));
        let parse = options.parse_options()?;
        let dockerfile = read_dockerfile_with(&dockerfile_path, &parse)?;
        let mut plan = Plan::from_dockerfile(options, &dockerfile_path, &dockerfile)?;
        // Several platforms: BuildKit reads the Dockerfile once a platform (`FROM base-$TARGETARCH`
        // can name other stages); the plan is the first one's, and says where another differs.
        let platforms: Vec<&str> =
            options.platform.as_deref().map(|list| list.split(',').map(str::trim).collect()).unwrap_or_default();
        if let [first, others @ ..] = platforms.as_slice() {
            let order = |dockerfile: &Dockerfile| -> Result<Vec<String>> {
                Ok(dockerfile.build_order(options.target.as_deref())?.iter().map(|stage| stage.key()).collect())
            };
            let planned = order(&dockerfile)?;
            for other in others {
                let parse = crate::dockerfile::ParseOptions {
                    target_platform: Some(crate::dockerfile::Platform::parse(other)?),
                    ..parse.clone()
                };
                let theirs = order(&read_dockerfile_with(&dockerfile_path, &parse)?)?;
                if theirs != planned {
                    plan.notes.push(format!(
                        "{other} builds other stages than {first} ({} against {}): the plan is {first}'s; BuildKit builds {other}'s own, whose stages have no caches of their own here",
                        theirs.join(" -> "),
                        planned.join(" -> ")
                    ));
                }
            }
        }
        Ok(plan)
    }

    /// Computes the plan from a parsed Dockerfile.
    pub fn from_dockerfile(options: &PlanOptions, dockerfile_path: &Path, dockerfile: &Dockerfile) -> Result<Plan> {
        let docker = DockerArgs::read(&options.docker_args)?;
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
        for (name, value) in docker.build_args.clone() {
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

        if let Some(list) = &options.platform {
            notes.push(format!(
                "caches are kept per platform ({list}): tags cache-<stage>--<os>-<arch>.<key>; caches written without a named platform are not read, as they may hold another platform's layers"
            ));
        }
        // A cache per platform when the run names platforms: level by level, each platform's.
        let platforms: Vec<Option<String>> = match &options.platform {
            Some(list) => list.split(',').map(|platform| Some(platform.trim().to_string())).collect(),
            None => vec![None],
        };
        let refs = |stage_key: &str, levels: &[Level]| -> Vec<CacheRef> {
            levels
                .iter()
                .filter_map(|level| Some((level, level.key(&options.git).ok()?)))
                .flat_map(|(level, key)| {
                    platforms.iter().map(move |platform| {
                        let tag = cache_tag_for(stage_key, platform.as_deref(), key.as_ref());
                        let location = options.backend.location(&options.repository, &tag);
                        CacheRef { level: *level, tag, location, platform: platform.clone() }
                    })
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

        let planned_mounts = mounts::mounts_of(options, dockerfile, &order, &chain, &write_levels);
        notes.extend(planned_mounts.notes);
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
            builder_keeps_no_image: options.builder_keeps_no_image,
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
            docker,
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
            mounts: planned_mounts.mounts,
            mount_image: planned_mounts.image,
            restore_image: planned_mounts.restore_image,
            cache_mount_max_size: options.cache_mount_max_size,
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

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StagePlan> {
        self.stages.iter().find(|stage| stage.name == name)
    }

    /// The plan as pretty JSON, with secret-looking values hidden.
    pub fn to_json(&self) -> String {
        secrets::scrub(&serde_json::to_string_pretty(self).expect("a plan is plain data")).into_owned()
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

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
