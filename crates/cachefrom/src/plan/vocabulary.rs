//! The plan's words: the levels of the chain, read-only or not, the builder, how a run builds,
//! a cache reference, a cache write and the steps the executor carries out.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::backend::CacheLocation;
use crate::git::GitFacts;
use crate::refs::TagKey;
use crate::render::shell_quote;

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
    pub(crate) fn key(self, git: &GitFacts) -> std::result::Result<Option<TagKey>, String> {
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

pub use crate::files::{partial_path, partial_path_of};

pub(crate) fn quote_path(path: &Path) -> String {
    shell_quote(&path.display().to_string())
}

/// One step of the plan, in the order the executor carries them out. The executor does nothing
/// a step (or a step's declared [`Fallback`], or the plan's [`Recovery`]) does not name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// When the hash of this run's inputs equals the record on the cache at `record_on` (and the
    /// record names an image where tags are pushed): nothing is built. The recorded image gets
    /// `image_tags`, the cache is written by `writes`, and every later step is skipped.
    ReuseUnchanged {
        /// `REPOSITORY:TAG` of the cache whose record is compared (the target's first write).
        record_on: String,
        /// The image tags the recorded image gets (`REPOSITORY:TAG`), when tags are pushed.
        image_tags: Vec<String>,
        /// The cache's further tags, as a build's writes would put them.
        writes: Vec<CacheWrite>,
    },
    /// Restores the cache mounts ([`crate::plan::MountPlan`]): each one's contents fetched from
    /// the most specific level that has them, then one build (`argv`) that unpacks them into
    /// BuildKit's cache mounts. Nothing runs when no mount has saved contents.
    RestoreMounts {
        /// The restore build's `docker` arguments.
        argv: Vec<String>,
        /// `docker` arguments of a pull of the mounts' image, run from the start of the step
        /// beside the fetches and the restore build (which then runs in a smaller image, see
        /// [`crate::plan::Plan::restore_image`]); the step ends when it ends. A failed pull is
        /// one line: the build pulls the image itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pull: Option<Vec<String>>,
        /// The restore build again in the mounts' own image, when the first one, run in another,
        /// failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        again: Option<Vec<String>>,
    },
    /// Mounts the layers of the base images that live in the same registry into this run's
    /// repository (`POST …/blobs/uploads/?mount=DIGEST&from=BASE`, no bytes move), so that the
    /// cache export, which holds them, uploads none of them again.
    MountBaseLayers {
        /// The images (`REGISTRY/REPOSITORY:TAG` or `@DIGEST`) whose layers are mounted.
        images: Vec<String>,
        /// The platform whose image is meant where one names several (`os/arch[/variant]`).
        platform: String,
    },
    /// `docker build` of `stage` (with every stage it needs).
    Build {
        /// The stage built (`--target`).
        stage: String,
        /// The whole `docker` argument vector (without `docker`), every cache candidate passed as
        /// `--cache-from`. The executor leaves out the `--cache-from` of each candidate the checks
        /// did not choose (a cache that does not exist, or a second name of one already passed),
        /// and changes nothing else.
        argv: Vec<String>,
        /// What the executor may do when this build goes wrong in a known way.
        fallbacks: Vec<Fallback>,
    },
    /// Writes the cache the build of `stage` exported.
    Write {
        /// The stage whose build exported it.
        stage: String,
        /// The write.
        write: CacheWrite,
    },
    /// After a build of `stage` whose every step hit the one cache it read: that cache, not the
    /// export, is what the build's places get (BuildKit's export of such a build can lack results
    /// it never loaded). Registry: the cache's manifest, with this run's record, written at `to`;
    /// local and tarball: the writes that follow copy the cache read (none to where it was read).
    WriteBack {
        /// The stage built.
        stage: String,
        /// `REPOSITORY:TAG` the build exported to.
        to: String,
    },
    /// After the one build of the target: the tags of other stages at this run's levels that
    /// exist (a failed run wrote them) get the target's cache, so that they are not read as older
    /// caches beside it. Only the destinations the checks found are written.
    RefreshStageTags {
        /// The stage built.
        stage: String,
        /// Every such write; the executor keeps the destinations that exist.
        writes: Vec<CacheWrite>,
    },
    /// Saves the cache mounts, after the build whether it succeeded, failed or was cancelled:
    /// one build (`argv`) packs each mount into a file; each file whose contents are not stored
    /// yet is uploaded, and written at this run's levels. In a run of one build for one platform,
    /// the packing build starts as soon as every `RUN` that uses a kept mount has finished, while
    /// the build's other steps, exports and pushes go on.
    SaveMounts {
        /// The save build's `docker` arguments.
        argv: Vec<String>,
    },
    /// `docker push` of the final image (the classic builder; buildx pushes within the build).
    PushImage {
        /// `REPOSITORY:TAG`.
        image: String,
    },
}

/// What the executor does, and only then, when a build step goes wrong in a known way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fallback", rename_all = "kebab-case")]
pub enum Fallback {
    /// A cache source whose manifest is there but whose content is not (a registry's garbage
    /// collection, a half-finished push): the same build without that `--cache-from`, once.
    WithoutBrokenSource,
    /// Another build of the same image finished first and won the image store
    /// (`image "moby-dangling@…": already exists`): the same build again (a cache hit).
    AgainAfterImageStoreRace {
        /// At most this many builds in all.
        tries: u32,
    },
    /// The registry refused the cache export for a moment (writers racing on one tag answer
    /// 5xx): the same build again; only the export runs.
    ExportAgain {
        /// At most this many builds in all.
        tries: u32,
    },
}

impl Fallback {
    /// The comment the script carries for it.
    pub fn describe(&self) -> String {
        match self {
            Fallback::WithoutBrokenSource => {
                "if a cache source's content is missing: the same build without that --cache-from, once".to_string()
            }
            Fallback::AgainAfterImageStoreRace { tries } => format!(
                "if another build of the same image won the image store: the same build again ({tries} builds at most)"
            ),
            Fallback::ExportAgain { tries } => format!(
                "if the registry refused the export for a moment: the same build again, only the export runs ({tries} builds at most)"
            ),
        }
    }
}

/// Leaves out of `argv` each `--cache-from VALUE` whose value `keep` does not hold; nothing else
/// changes. What the executor does to a [`Step::Build`]'s argument vector.
pub fn narrowed(argv: &[String], keep: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        if arg == "--cache-from" {
            match args.next() {
                Some(value) if keep(value) => out.extend([arg.clone(), value.clone()]),
                Some(_) => {}
                None => out.push(arg.clone()),
            }
        } else {
            out.push(arg.clone());
        }
    }
    out
}

/// What a failed one-build run does for `stage` when the build finished it: export its cache from
/// BuildKit's local cache (a `cacheonly` build of `--target stage`), then write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// The stage.
    pub stage: String,
    /// The stages whose caches this covers: the stage and those it reads from.
    pub covers: Vec<String>,
    /// The build that exports the cache, as [`Step::Build::argv`] (narrowed the same way).
    pub argv: Vec<String>,
    /// The writes after the export.
    pub writes: Vec<CacheWrite>,
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
    /// The platform whose cache it is, when the run names platforms (`--platform`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}
