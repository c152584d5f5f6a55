//! `cachefrom prune`: the cache tags a repository no longer needs, chosen from the tag scheme
//! ([`crate::refs`]) and git, and removed through the registry's API.
//!
//! Only tags cachefrom writes are considered (`cache-<stage>`, `cache-<stage>.<key>`). Removed:
//! the tags of branches that no longer exist, commit tags beyond the newest `keep_commits` of
//! each stage, and commit tags older than `older_than`. Never the default branch's tags, never
//! the unprefixed ones. A registry deletes a manifest, with every tag that names it: a manifest
//! that a kept tag also names is left alone, and the plan says so.
//!
//! The shared directory of the local and tarball backends is pruned the same way
//! ([`plan_dir`]): a folder (local) or a `.tar` file (tarball) a tag; half-written copies left by
//! a run that stopped (`.partial.PID`, the PID gone) go too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::refs::{is_commit_id, sanitize_tag, Repository};
use crate::registry::RegistryClient;

/// What a cache tag is, read back from the tag scheme.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum CacheTag {
    /// `cache-<stage>`.
    Unprefixed {
        /// The stage part.
        stage: String,
    },
    /// `cache-<stage>.<branch>` (the branch as the scheme writes it).
    Branch {
        /// The stage part.
        stage: String,
        /// The key part.
        key: String,
    },
    /// `cache-<stage>.<commit id>`.
    Commit {
        /// The stage part.
        stage: String,
        /// The commit id.
        commit: String,
    },
}

impl CacheTag {
    /// Reads `tag`; `None` for a tag cachefrom does not write (only tags that read back through
    /// the tag scheme, [`crate::refs::read_cache_tag`] and [`crate::mounts::read_mount_tag`],
    /// are ever candidates).
    pub fn parse(tag: &str) -> Option<CacheTag> {
        // A saved cache mount's tag is kept or removed as a stage's is; its mount part stands
        // for the stage (and never equals one: see `crate::mounts::mount_tag`).
        let (stage, key) = crate::refs::read_cache_tag(tag).or_else(|| crate::mounts::read_mount_tag(tag))?;
        Some(match key {
            None => CacheTag::Unprefixed { stage: stage.to_string() },
            Some(key) if is_commit_id(key) => CacheTag::Commit { stage: stage.to_string(), commit: key.to_string() },
            Some(key) => CacheTag::Branch { stage: stage.to_string(), key: key.to_string() },
        })
    }
}

/// What to keep.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// The branches that exist (their names as git has them).
    pub branches: BTreeSet<String>,
    /// The default branch: its tags are always kept.
    pub default_branch: String,
    /// Commit tags kept per stage, newest first.
    pub keep_commits: usize,
    /// Commit tags older than this go, when given.
    pub older_than: Option<Duration>,
    /// When each known commit was made (seconds since the epoch); a commit not in the map is
    /// older than every known one.
    pub commit_times: BTreeMap<String, i64>,
    /// Now, in seconds since the epoch.
    pub now: i64,
}

/// One tag that goes, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removal {
    /// The tag.
    pub tag: String,
    /// Why it goes, in one line.
    pub why: String,
}

/// The tags of a repository that go, in tag order.
pub fn select(tags: &[String], options: &PruneOptions) -> Vec<Removal> {
    let mut keys: BTreeSet<String> = options.branches.iter().map(|branch| sanitize_tag(branch)).collect();
    keys.insert(sanitize_tag(&options.default_branch));
    let mut removals = Vec::new();
    let mut commits_by_stage: BTreeMap<String, Vec<(Option<i64>, String, String)>> = BTreeMap::new();
    for tag in tags {
        match CacheTag::parse(tag) {
            Some(CacheTag::Branch { key, .. }) if !keys.contains(&key) => {
                removals.push(Removal { tag: tag.clone(), why: format!("no branch `{key}` exists any more") })
            }
            Some(CacheTag::Commit { stage, commit }) => {
                let time = options.commit_times.get(&commit).copied();
                commits_by_stage.entry(stage).or_default().push((time, commit, tag.clone()));
            }
            _ => {}
        }
    }
    for (_, mut commits) in commits_by_stage {
        // Newest first; unknown commits last.
        commits.sort_by(|a, b| b.0.unwrap_or(i64::MIN).cmp(&a.0.unwrap_or(i64::MIN)).then(a.1.cmp(&b.1)));
        for (rank, (time, commit, tag)) in commits.into_iter().enumerate() {
            let too_old = match (options.older_than, time) {
                (Some(limit), Some(time)) => options.now - time > limit.as_secs() as i64,
                _ => false,
            };
            if rank >= options.keep_commits {
                let known = if time.is_some() { "" } else { ", and not in this clone" };
                removals.push(Removal {
                    tag,
                    why: format!(
                        "commit {} is beyond the newest {} of its stage{known}",
                        &commit[..12],
                        options.keep_commits
                    ),
                });
            } else if too_old {
                removals.push(Removal { tag, why: format!("commit {} is older than the limit", &commit[..12]) });
            }
        }
    }
    removals.sort_by(|a, b| a.tag.cmp(&b.tag));
    removals
}

/// The prune of one repository: what goes with its manifest, what goes alone, and what stays
/// because a check could not be made.
#[derive(Debug, Clone, Serialize)]
pub struct PrunePlan {
    /// The repository.
    pub repository: String,
    /// Tags that go with their manifest (its digest): no kept tag names it.
    pub remove: Vec<(Removal, String)>,
    /// Tags that go alone: their manifest stays, since the kept tags listed name it too.
    pub untag: Vec<(Removal, Vec<String>)>,
    /// Tags that would go but stay: prune could not prove that no kept tag names their manifest.
    pub unchecked: Vec<(Removal, String)>,
}

/// The prune of a local or tarball cache directory.
#[derive(Debug, Clone, Serialize)]
pub struct DirPrune {
    /// The repository's folder in the shared directory.
    pub dir: PathBuf,
    /// What goes: why, the path, its size in bytes.
    pub remove: Vec<(Removal, PathBuf, u64)>,
}

/// Works out the prune of `dir` (the backend's shared directory) for `repository`.
pub fn plan_dir(dir: &Path, repository: &Repository, options: &PruneOptions) -> Result<DirPrune> {
    let dir = dir.join(crate::backend::repository_dir_name(repository));
    let mut by_tag: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut remove = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(DirPrune { dir, remove }),
        Err(error) => return Err(error).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if let Some((_, pid)) = name.rsplit_once(".partial.") {
            let alive = pid.parse::<u32>().is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let why = "a half-written copy left by a run that stopped".to_string();
                remove.push((Removal { tag: name.clone(), why }, path.clone(), size_of(&path)));
            }
            continue;
        }
        let tag = if path.is_dir() { name.clone() } else { tag_of_file(&name).unwrap_or_default().to_string() };
        if !tag.is_empty() {
            by_tag.entry(tag).or_default().push(path);
        }
    }
    let tags: Vec<String> = by_tag.keys().cloned().collect();
    for removal in select(&tags, options) {
        for path in by_tag.get(&removal.tag).into_iter().flatten() {
            let size = size_of(path);
            remove.push((removal.clone(), path.clone(), size));
        }
    }
    remove.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(DirPrune { dir, remove })
}

/// The tag a cache file is named after: `TAG.tar` (a layer cache), `TAG.tar.gz` and
/// `TAG.tar.gz.json` (a saved cache mount and its record).
fn tag_of_file(name: &str) -> Option<&str> {
    [".tar.gz.json", ".tar.gz", ".tar"].iter().find_map(|suffix| name.strip_suffix(suffix))
}

/// The tags with a cache in `dir` (the backend's shared directory) for `repository`.
pub fn dir_tags(dir: &Path, repository: &Repository) -> Vec<String> {
    let root = dir.join(crate::backend::repository_dir_name(repository));
    let mut tags: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().to_string();
            tag_of_file(&name).map(str::to_string).unwrap_or(name)
        })
        .filter(|name| !name.contains(".partial."))
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

/// Bytes under `path` (symlinks not followed).
fn size_of(path: &Path) -> u64 {
    let Ok(metadata) = std::fs::symlink_metadata(path) else { return 0 };
    if !metadata.is_dir() {
        return metadata.len();
    }
    std::fs::read_dir(path).into_iter().flatten().flatten().map(|entry| size_of(&entry.path())).sum()
}

impl DirPrune {
    /// Removes what goes. Returns the bytes freed.
    pub fn apply(&self) -> Result<u64> {
        let mut freed = 0;
        for (_, path, size) in &self.remove {
            let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
            removed.with_context(|| format!("removing {}", path.display()))?;
            freed += size;
        }
        Ok(freed)
    }

    /// The plan as lines a person reads.
    pub fn lines(&self) -> Vec<String> {
        self.remove
            .iter()
            .map(|(removal, path, size)| {
                format!("remove  {}  ({}, {:.1} MB)", path.display(), removal.why, *size as f64 / 1e6)
            })
            .collect()
    }
}

/// Works out the prune of `tags` (the repository's tags, listed once) from their manifest
/// digests. A tag goes with its manifest only when every tag naming that manifest goes; alone
/// when a kept tag names it too; and not at all when a digest could not be read (its own, or any
/// kept tag's: that tag might name the same manifest).
pub fn plan(registry: &RegistryClient, repository: &Repository, tags: &[String], options: &PruneOptions) -> PrunePlan {
    let removals = select(tags, options);
    let mut plan =
        PrunePlan { repository: repository.to_string(), remove: Vec::new(), untag: Vec::new(), unchecked: Vec::new() };
    if removals.is_empty() {
        return plan;
    }
    let answers = registry.digests(repository, tags);
    let going: BTreeSet<String> = removals.iter().map(|removal| removal.tag.clone()).collect();
    let mut digest_of: BTreeMap<&str, &str> = BTreeMap::new();
    let mut unreadable: BTreeMap<&str, &str> = BTreeMap::new();
    for (tag, answer) in tags.iter().zip(&answers) {
        match answer {
            Ok(Some(digest)) => {
                digest_of.insert(tag, digest);
            }
            Ok(None) => {}
            Err(why) => {
                unreadable.insert(tag, why);
            }
        }
    }
    let kept_unreadable = unreadable.iter().find(|(tag, _)| !going.contains(**tag));
    for removal in removals {
        if let Some(why) = unreadable.get(removal.tag.as_str()) {
            let why = format!("its manifest digest could not be read: {why}");
            plan.unchecked.push((removal, why));
            continue;
        }
        if let Some((kept, why)) = kept_unreadable {
            let why = format!("could not check whether the kept tag {kept} names the same manifest: {why}");
            plan.unchecked.push((removal, why));
            continue;
        }
        // Gone since the list was read: nothing to remove.
        let Some(digest) = digest_of.get(removal.tag.as_str()).copied() else { continue };
        let kept: Vec<String> = digest_of
            .iter()
            .filter(|(tag, other)| **other == digest && !going.contains(**tag))
            .map(|(tag, _)| tag.to_string())
            .collect();
        if kept.is_empty() {
            plan.remove.push((removal, digest.to_string()));
        } else {
            plan.untag.push((removal, kept));
        }
    }
    plan
}

impl PrunePlan {
    /// Deletes each manifest that goes (once), then removes each tag that goes alone. Every
    /// removal is tried; the first error is returned after. Returns the tags removed.
    pub fn apply(&self, registry: &RegistryClient, repository: &Repository) -> Result<usize> {
        let mut removed = 0;
        let mut first_error = None;
        let digests: BTreeSet<&String> = self.remove.iter().map(|(_, digest)| digest).collect();
        for digest in digests {
            match registry.delete_manifest(repository, digest) {
                Ok(()) => removed += self.remove.iter().filter(|(_, d)| d == digest).count(),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        for (removal, _) in &self.untag {
            match registry.delete_tag_alone(repository, &removal.tag) {
                Ok(()) => removed += 1,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error.context(format!("removed {removed} tag(s) before this error"))),
            None => Ok(removed),
        }
    }

    /// Tags that go, with their manifest or alone.
    pub fn going(&self) -> usize {
        self.remove.len() + self.untag.len()
    }

    /// The plan as lines a person reads.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (removal, _) in &self.remove {
            lines.push(format!("remove  {}:{}  ({})", self.repository, removal.tag, removal.why));
        }
        for (removal, kept) in &self.untag {
            lines.push(format!(
                "remove  {}:{}  ({}; the tag alone: its manifest is also {}, which stays)",
                self.repository,
                removal.tag,
                removal.why,
                kept.join(", ")
            ));
        }
        for (removal, why) in &self.unchecked {
            lines.push(format!("keep    {}:{}  ({}, but {why})", self.repository, removal.tag, removal.why));
        }
        lines
    }
}

/// The branches of `origin`, from `git ls-remote --heads` in `dir`.
pub fn remote_branches(dir: &Path, timeout: Duration) -> Result<BTreeSet<String>> {
    let args: Vec<String> =
        ["-C", &dir.display().to_string(), "ls-remote", "--heads", "origin"].iter().map(|s| s.to_string()).collect();
    let output = crate::docker::run_program("git", &args, "listing the branches of origin", timeout).context(
        "cannot tell which branches exist: pass --branches FILE (one branch a line), or run in a clone with an origin",
    )?;
    Ok(output
        .stdout
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|reference| reference.strip_prefix("refs/heads/"))
        .map(str::to_string)
        .collect())
}

/// When each of `commits` was made, for those the repository at `dir` has.
pub fn commit_times(dir: &Path, commits: impl IntoIterator<Item = String>) -> BTreeMap<String, i64> {
    let Ok(repository) = git2::Repository::discover(dir) else { return BTreeMap::new() };
    commits
        .into_iter()
        .filter_map(|commit| {
            let oid = git2::Oid::from_str(&commit).ok()?;
            let time = repository.find_commit(oid).ok()?.time().seconds();
            Some((commit, time))
        })
        .collect()
}

/// `30d`, `12h`, `90m`, `2w`, `3600s`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .with_context(|| format!("`{}` is not a duration such as 30d, 12h or 90m", crate::secrets::name_part(text)))?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => bail!("`{}` is not a duration such as 30d, 12h or 90m", crate::secrets::name_part(text)),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refs::{cache_tag, TagKey};

    fn options(branches: &[&str]) -> PruneOptions {
        PruneOptions {
            branches: branches.iter().map(|b| b.to_string()).collect(),
            default_branch: "main".into(),
            keep_commits: 2,
            older_than: None,
            commit_times: BTreeMap::new(),
            now: 1_000_000,
        }
    }

    #[test]
    fn tags_read_back_as_the_scheme_writes_them() {
        let sha = "a".repeat(40);
        assert_eq!(
            CacheTag::parse(&cache_tag("deps", Some(&TagKey::Branch("feature/x".into())))),
            Some(CacheTag::Branch { stage: "deps".into(), key: sanitize_tag("feature/x") })
        );
        assert_eq!(
            CacheTag::parse(&cache_tag("deps", Some(&TagKey::Commit(sha.clone())))),
            Some(CacheTag::Commit { stage: "deps".into(), commit: sha })
        );
        assert_eq!(CacheTag::parse("cache-deps"), Some(CacheTag::Unprefixed { stage: "deps".into() }));
        assert_eq!(CacheTag::parse("latest"), None);
        assert_eq!(CacheTag::parse("v1.2"), None);
    }

    #[test]
    fn gone_branches_and_old_commits_go_the_default_branch_and_unprefixed_stay() {
        let tag = |stage: &str, key: TagKey| cache_tag(stage, Some(&key));
        let branch = |name: &str| TagKey::Branch(name.to_string());
        let commit = |c: char| TagKey::Commit(c.to_string().repeat(40));
        let tags = vec![
            tag("deps", branch("main")),
            tag("deps", branch("feature/kept")),
            tag("deps", branch("feature/gone")),
            cache_tag("deps", None),
            tag("deps", commit('1')),
            tag("deps", commit('2')),
            tag("deps", commit('3')),
            tag("app", commit('3')),
            "latest".to_string(),
        ];
        let mut options = options(&["feature/kept"]);
        options.commit_times =
            [('1', 100), ('2', 200), ('3', 300)].iter().map(|(c, t)| (c.to_string().repeat(40), *t)).collect();
        let removed: Vec<String> = select(&tags, &options).into_iter().map(|removal| removal.tag).collect();
        assert_eq!(removed, [tag("deps", commit('1')), tag("deps", branch("feature/gone"))]);

        options.older_than = Some(Duration::from_secs(999_750));
        let removed: Vec<String> = select(&tags, &options).into_iter().map(|removal| removal.tag).collect();
        assert_eq!(removed, [tag("deps", commit('1')), tag("deps", commit('2')), tag("deps", branch("feature/gone"))]);
    }

    #[test]
    fn a_platforms_tags_go_as_a_stages_do_and_keep_their_commits_apart() {
        use crate::refs::cache_tag_for;
        let on = |platform: &str, key: TagKey| cache_tag_for("deps", Some(platform), Some(&key));
        let branch = |name: &str| TagKey::Branch(name.to_string());
        let commit = |c: char| TagKey::Commit(c.to_string().repeat(40));
        let tags = vec![
            on("linux/arm64", branch("main")),
            on("linux/arm64", branch("feature/gone")),
            on("linux/amd64", commit('1')),
            on("linux/arm64", commit('2')),
        ];
        let mut options = options(&[]);
        options.keep_commits = 1;
        options.commit_times = [('1', 100), ('2', 200)].iter().map(|(c, t)| (c.to_string().repeat(40), *t)).collect();
        let removed: Vec<String> = select(&tags, &options).into_iter().map(|removal| removal.tag).collect();
        // Each platform keeps its newest commit: amd64's older one is not arm64's to push out.
        assert_eq!(removed, [on("linux/arm64", branch("feature/gone"))]);
    }

    #[test]
    fn a_saved_cache_mounts_tags_go_as_a_stages_do() {
        let mount = |key: TagKey| crate::mounts::mount_tag("id=objs", "objs", Some(&key));
        let branch = |name: &str| TagKey::Branch(name.to_string());
        let tags = vec![mount(branch("main")), mount(branch("feature/gone")), mount(branch("feature/kept"))];
        let removed: Vec<String> =
            select(&tags, &options(&["feature/kept"])).into_iter().map(|removal| removal.tag).collect();
        assert_eq!(removed, [mount(branch("feature/gone"))]);
    }

    #[test]
    fn a_cache_directory_is_pruned_like_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let repository = Repository::parse("127.0.0.1:5000/app").unwrap();
        let root = dir.path().join("127.0.0.1-5000-app");
        for tag in ["cache-deps.main", "cache-deps.gone", "cache-deps"] {
            std::fs::create_dir_all(root.join(tag).join("blobs")).unwrap();
            std::fs::write(root.join(tag).join("index.json"), "{}").unwrap();
        }
        std::fs::write(root.join("cache-app.gone.tar"), vec![0u8; 2048]).unwrap();
        std::fs::create_dir_all(root.join("cache-deps.main.partial.999999999")).unwrap();
        let mut options = options(&["main"]);
        options.keep_commits = 5;
        let plan = plan_dir(dir.path(), &repository, &options).unwrap();
        let going: Vec<String> =
            plan.remove.iter().map(|(_, path, _)| path.file_name().unwrap().to_string_lossy().to_string()).collect();
        assert_eq!(going, ["cache-app.gone.tar", "cache-deps.gone", "cache-deps.main.partial.999999999"]);
        assert_eq!(plan.remove[0].2, 2048);
        plan.apply().unwrap();
        let left: BTreeSet<String> =
            std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
        assert_eq!(left, ["cache-deps", "cache-deps.main"].map(String::from).into());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86_400));
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3y").is_err());
    }
}
