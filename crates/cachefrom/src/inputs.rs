//! What a build's result depends on, as one hash: the Dockerfile, the target, the build
//! arguments and docker options, every file of the build context that `.dockerignore` lets
//! through (path, kind, permissions, content), the digests of the images the Dockerfile reads,
//! and where the build runs. Two runs with the same hash give BuildKit the same cache keys, so a
//! rerun whose hash matches the record on the cache it would write has nothing to build.
//!
//! The hash is conservative: when something could change the result in a way it does not see (a
//! `.dockerignore` pattern it does not read exactly as Docker does, `--no-cache`, `--pull`, a
//! named build context, an image whose digest cannot be asked), there is no hash, and the build
//! runs as always. Reading more files than Docker sends only means fewer skipped builds.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use sha2::{Digest, Sha256};

/// What the hash is computed from, besides the build context's files.
pub struct Inputs<'a> {
    /// The Dockerfile.
    pub dockerfile: &'a Path,
    /// The stage built.
    pub target: &'a str,
    /// `--build-arg` values, sorted by name.
    pub build_args: Vec<(&'a str, &'a str)>,
    /// The options passed to docker untouched.
    pub docker_args: &'a [String],
    /// The option among them that makes the result depend on more than these inputs, if any.
    pub unhashed: Option<&'a str>,
    /// Each image the Dockerfile reads with its manifest digest, sorted.
    pub image_digests: Vec<(String, String)>,
    /// The platforms named for the build (`--platform`), if any.
    pub platform: Option<&'a str>,
}

/// The hash of `inputs` (`sha256:` and 64 hex digits) over the build context as `walk` read it,
/// or why there is none.
pub fn fingerprint(inputs: &Inputs, walk: &ContextWalk) -> Result<String> {
    if let Some(flag) = inputs.unhashed {
        bail!("`{flag}` makes the build depend on more than its inputs");
    }
    let mut hash = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        hash.update(name.as_bytes());
        hash.update((value.len() as u64).to_le_bytes());
        hash.update(value);
    };
    field("version", b"cachefrom-inputs-2");
    let dockerfile = crate::files::read_bytes(inputs.dockerfile, crate::files::MAX_TEXT_BYTES)
        .with_context(|| format!("reading the Dockerfile {}", inputs.dockerfile.display()))?;
    field("dockerfile", &dockerfile);
    field("target", inputs.target.as_bytes());
    for (name, value) in &inputs.build_args {
        field("build-arg", name.as_bytes());
        field("value", value.as_bytes());
    }
    for arg in inputs.docker_args {
        field("docker-arg", arg.as_bytes());
    }
    for (image, digest) in &inputs.image_digests {
        field("image", image.as_bytes());
        field("digest", digest.as_bytes());
    }
    // Only when named: a build that names none hashes as it always has.
    if let Some(platform) = inputs.platform {
        field("platform", platform.as_bytes());
    }
    // Where the build runs: another engine or architecture builds other layers.
    for name in ["DOCKER_HOST", "DOCKER_CONTEXT", "BUILDX_BUILDER"] {
        field(name, std::env::var(name).unwrap_or_default().as_bytes());
    }
    field("arch", std::env::consts::ARCH.as_bytes());
    for entry in &walk.entries {
        field("path", entry.path.as_bytes());
        field("mode", &entry.mode.to_le_bytes());
        field("owner", &[entry.uid.to_le_bytes(), entry.gid.to_le_bytes()].concat());
        match &entry.kind {
            EntryKind::Link(target) => field("link", target),
            EntryKind::Dir => field("dir", b""),
            EntryKind::File(content) => field("file", content),
        }
    }
    Ok(format!("sha256:{:x}", hash.finalize()))
}

/// Entries of the build context read at the most.
pub const MAX_CONTEXT_ENTRIES: usize = 200_000;
/// Bytes of file content hashed at the most: a larger context is not hashed (hashing it would
/// take longer than the build's cache checks), and the build runs as usual.
pub const MAX_CONTEXT_BYTES: u64 = 512 * 1024 * 1024;
/// The longest the walk and the hashing may take together.
pub const MAX_CONTEXT_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// What one entry of the build context is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A symbolic link, and its target (never followed).
    Link(Vec<u8>),
    /// A regular file, and the SHA-256 of its content.
    File([u8; 32]),
}

/// One entry of the build context that `.dockerignore` lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextEntry {
    /// Relative, `/`-separated.
    pub path: String,
    /// Permission bits and file type, as `stat` gives them.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// What it is.
    pub kind: EntryKind,
}

/// The build context as Docker would send it, read once: every entry `.dockerignore` lets
/// through, depth first, each directory's entries by name, each file hashed once. Both the
/// inputs' hash ([`fingerprint`]) and the stages' records (`explain`) read this one walk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextWalk {
    /// The entries, in walk order.
    pub entries: Vec<ContextEntry>,
}

impl ContextWalk {
    /// Walks `context` under `ignore`, within [`MAX_CONTEXT_ENTRIES`], [`MAX_CONTEXT_BYTES`] and
    /// [`MAX_CONTEXT_TIME`]; past any of them, or on a name that is not UTF-8 or an entry that is
    /// neither a file, a directory nor a link, an error that says why (the caller builds without
    /// a hash).
    pub fn read(context: &Path, ignore: &IgnoreRules) -> Result<ContextWalk> {
        let started = std::time::Instant::now();
        let mut listed: Vec<(ContextEntry, Option<(std::path::PathBuf, u64)>)> = Vec::new();
        let mut bytes = 0u64;
        list_tree(context, context, ignore, &mut listed, &mut bytes, started)?;
        let mut entries = Vec::with_capacity(listed.len());
        for (mut entry, file) in listed {
            if let Some((path, _)) = file {
                entry.kind = EntryKind::File(hash_file(&path, started)?);
            }
            entries.push(entry);
        }
        Ok(ContextWalk { entries })
    }

    /// Every file and link with a hash of its mode and content (a link: its target), sorted by
    /// path: what the stages' records compare.
    pub fn file_hashes(&self) -> Vec<(String, String)> {
        let mut files: Vec<(String, String)> = self
            .entries
            .iter()
            .filter_map(|entry| {
                let mut hash = Sha256::new();
                hash.update(entry.mode.to_le_bytes());
                match &entry.kind {
                    EntryKind::Dir => return None,
                    EntryKind::Link(target) => hash.update(target),
                    EntryKind::File(content) => hash.update(content),
                }
                Some((entry.path.clone(), format!("sha256:{:x}", hash.finalize())))
            })
            .collect();
        files.sort();
        files
    }
}

fn over_time(started: std::time::Instant) -> Result<()> {
    if started.elapsed() > MAX_CONTEXT_TIME {
        bail!("reading the build context took more than {} s", MAX_CONTEXT_TIME.as_secs());
    }
    Ok(())
}

fn list_tree(
    root: &Path,
    dir: &Path,
    ignore: &IgnoreRules,
    out: &mut Vec<(ContextEntry, Option<(std::path::PathBuf, u64)>)>,
    bytes: &mut u64,
    started: std::time::Instant,
) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    over_time(started)?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let relative = path.strip_prefix(root).expect("below the root");
        let Some(relative_text) = relative.to_str() else {
            bail!("the build context has a file name that is not UTF-8: {}", relative.display());
        };
        if ignore.excludes(relative_text) {
            continue;
        }
        if out.len() >= MAX_CONTEXT_ENTRIES {
            bail!("the build context has more than {MAX_CONTEXT_ENTRIES} entries");
        }
        let metadata = std::fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut entry = ContextEntry {
            path: relative_text.to_string(),
            mode: metadata.permissions().mode(),
            uid: metadata.uid(),
            gid: metadata.gid(),
            kind: EntryKind::Dir,
        };
        if metadata.is_symlink() {
            entry.kind = EntryKind::Link(std::fs::read_link(&path)?.into_os_string().into_encoded_bytes());
            out.push((entry, None));
        } else if metadata.is_dir() {
            out.push((entry, None));
            list_tree(root, &path, ignore, out, bytes, started)?;
        } else if metadata.is_file() {
            *bytes = bytes.saturating_add(metadata.len());
            if *bytes > MAX_CONTEXT_BYTES {
                bail!("the build context holds more than {} MB of files", MAX_CONTEXT_BYTES / (1024 * 1024));
            }
            entry.kind = EntryKind::File([0; 32]);
            out.push((entry, Some((path, metadata.len()))));
        } else {
            bail!("the build context holds {}, which is neither a file, a directory nor a link", path.display());
        }
    }
    Ok(())
}

/// SHA-256 of a regular file's content, opened without following a link or waiting on a FIFO.
fn hash_file(path: &Path, started: std::time::Instant) -> Result<[u8; 32]> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("reading {}", path.display()))?;
    if !file.metadata()?.is_file() {
        bail!("{} is no longer a regular file", path.display());
    }
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 1024 * 1024];
    loop {
        let read = file.read(&mut buffer).with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        hash.update(&buffer[..read]);
        over_time(started)?;
    }
    Ok(hash.finalize().into())
}

/// The most `**` one pattern (`.dockerignore`, a `COPY` source) may hold.
const MAX_DOUBLE_STARS: usize = 3;
/// The most patterns a `.dockerignore` may hold for cachefrom to read it (Docker reads more; the
/// build then runs without the inputs' hash).
const MAX_IGNORE_PATTERNS: usize = 2_000;

/// A pattern cachefrom will not read (a character class, an escape, too many `**`, a climb out
/// of the context): `explain` refuses it (exit 2), a build runs without the inputs' hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPattern(pub String);

impl std::fmt::Display for RefusedPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedPattern {}

/// A path pattern as moby's patternmatcher compiles it (`*` and `?` within one segment, `**` any
/// number of segments), as a regular expression that also matches every path below a match:
/// the `regex` crate answers in time linear in the path, whatever the pattern.
pub(crate) fn pattern_regex(pattern: &str) -> std::result::Result<Option<String>, RefusedPattern> {
    let shown = crate::git::escaped(pattern);
    if pattern.contains(['[', ']', '\\']) {
        return Err(RefusedPattern(format!("the pattern {shown} uses a character class or an escape")));
    }
    let segments: Vec<&str> = pattern.split('/').filter(|segment| !segment.is_empty() && *segment != ".").collect();
    if segments.contains(&"..") {
        return Err(RefusedPattern(format!("the pattern {shown} climbs out of the context")));
    }
    if segments.is_empty() {
        return Ok(None);
    }
    let cleaned = segments.join("/");
    if cleaned.matches("**").count() > MAX_DOUBLE_STARS {
        return Err(RefusedPattern(format!("the pattern {shown} has more than {MAX_DOUBLE_STARS} `**`")));
    }
    let mut regex = String::from("(?s)^");
    let chars: Vec<char> = cleaned.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                regex.push_str(if i == chars.len() { ".*" } else { "(?:.*/)?" });
                continue;
            }
            '*' => regex.push_str("[^/]*"),
            '?' => regex.push_str("[^/]"),
            c => regex.push_str(&regex::escape(&c.to_string())),
        }
        i += 1;
    }
    regex.push_str("(?:/.*)?$");
    Ok(Some(regex))
}

/// Patterns compiled together, matched in one pass over a path.
#[derive(Debug, Clone)]
pub(crate) struct PatternSet {
    set: regex::RegexSet,
    /// Per pattern: true for a `!` exception.
    exceptions: Vec<bool>,
    /// A pattern that matches everything (`.`, `/`).
    everything: Option<usize>,
}

impl PatternSet {
    fn new(patterns: &[(bool, String)]) -> std::result::Result<PatternSet, RefusedPattern> {
        let mut sources = Vec::new();
        let mut exceptions = Vec::new();
        let mut everything = None;
        for (exception, pattern) in patterns {
            match pattern_regex(pattern)? {
                Some(source) => sources.push(source),
                None => {
                    everything = Some(exceptions.len());
                    sources.push("(?s).*".to_string());
                }
            }
            exceptions.push(*exception);
        }
        let set = regex::RegexSetBuilder::new(&sources)
            .size_limit(32 * 1024 * 1024)
            .dfa_size_limit(32 * 1024 * 1024)
            .build()
            .map_err(|_| RefusedPattern(format!("the {} patterns are more than cachefrom compiles", sources.len())))?;
        Ok(PatternSet { set, exceptions, everything })
    }

    /// The patterns `sources` (a `COPY`'s sources), any of which selects a path.
    pub(crate) fn sources(sources: &[String]) -> std::result::Result<PatternSet, RefusedPattern> {
        let patterns: Vec<(bool, String)> = sources.iter().map(|source| (false, source.clone())).collect();
        PatternSet::new(&patterns)
    }

    /// True when any pattern matches `path` or a directory above it.
    pub(crate) fn any_matches(&self, path: &str) -> bool {
        self.everything.is_some() || self.set.is_match(path)
    }

    /// The last pattern that matches `path` or a directory above it: whether it is an exception.
    fn last_match(&self, path: &str) -> Option<bool> {
        self.set.matches(path).iter().next_back().map(|index| self.exceptions[index])
    }
}

/// The patterns of a `.dockerignore`, read as Docker reads them (moby's patternmatcher): the last
/// pattern that matches a path or one of its parent directories decides, `!` lets a path back in.
/// Compiled once into one set, so a path is answered in one pass, in time linear in its length.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    set: Option<PatternSet>,
}

impl IgnoreRules {
    /// The rules for a build: `DOCKERFILE.dockerignore` beside the Dockerfile when it exists,
    /// else `CONTEXT/.dockerignore`, else none.
    pub fn for_build(context: &Path, dockerfile: &Path) -> Result<IgnoreRules> {
        let mut specific = dockerfile.as_os_str().to_owned();
        specific.push(".dockerignore");
        for file in [std::path::PathBuf::from(specific), context.join(".dockerignore")] {
            match std::fs::symlink_metadata(&file) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                _ => {}
            }
            let text = crate::files::read_text(&file, crate::files::MAX_TEXT_BYTES)?;
            return IgnoreRules::parse(&text).with_context(|| format!("reading {}", file.display()));
        }
        Ok(IgnoreRules::default())
    }

    /// Parses a `.dockerignore`. Character classes and escapes are refused: they are read
    /// exactly only by Go's `filepath.Match`.
    pub fn parse(text: &str) -> Result<IgnoreRules> {
        let mut patterns = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            if pattern.split('/').all(|segment| segment.is_empty() || segment == ".") {
                // `.` or `/`: moby cleans it to `.`, which matches no path.
                pattern_regex(pattern)?;
                continue;
            }
            patterns.push((exception, pattern.to_string()));
            if patterns.len() > MAX_IGNORE_PATTERNS {
                return Err(
                    RefusedPattern(format!("the .dockerignore has more than {MAX_IGNORE_PATTERNS} patterns")).into()
                );
            }
        }
        if patterns.is_empty() {
            return Ok(IgnoreRules::default());
        }
        Ok(IgnoreRules { set: Some(PatternSet::new(&patterns)?) })
    }

    /// True when `path` (relative, `/`-separated) is left out of the build context.
    pub fn excludes(&self, path: &str) -> bool {
        let path = path.trim_matches('/');
        match &self.set {
            Some(set) if !path.is_empty() => set.last_match(path) == Some(false),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_patterns_as_docker_reads_them() {
        let rules =
            IgnoreRules::parse("# comment\n.git\ntarget/\n*.log\n**/node_modules\n!keep.log\ndocs/*.md\n").unwrap();
        assert!(rules.excludes(".git"));
        assert!(rules.excludes(".git/index"), "a directory's contents go with it");
        assert!(rules.excludes("target/debug/app"));
        assert!(rules.excludes("build.log"));
        assert!(!rules.excludes("src/build.log"), "`*` stays within one segment");
        assert!(!rules.excludes("keep.log"), "`!` lets it back in");
        assert!(rules.excludes("a/b/node_modules/x"));
        assert!(rules.excludes("docs/a.md"));
        assert!(!rules.excludes("docs/sub/a.md"));
        assert!(!rules.excludes("src/main.rs"));
        assert!(IgnoreRules::parse("[ab]\n").is_err());
        assert!(IgnoreRules::parse("a\\*\n").is_err());
    }

    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM alpine\nCOPY . .\n").unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("src/main.rs"), "fn main() {}\n").unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "*.log\n").unwrap();
        dir
    }

    fn hash_of(dir: &Path, args: &[String]) -> Result<String> {
        let walk = ContextWalk::read(dir, &IgnoreRules::for_build(dir, &dir.join("Dockerfile"))?)?;
        fingerprint(
            &Inputs {
                dockerfile: &dir.join("Dockerfile"),
                target: "0",
                build_args: vec![("A", "1")],
                docker_args: args,
                unhashed: crate::plan::DockerArgs::read(args)?.unhashed.as_deref(),
                image_digests: vec![("alpine".into(), "sha256:1".into())],
                platform: None,
            },
            &walk,
        )
    }

    /// Runs `f` and says how long it took.
    fn timed<T>(f: impl FnOnce() -> T) -> (T, std::time::Duration) {
        let started = std::time::Instant::now();
        let value = f();
        (value, started.elapsed())
    }

    #[test]
    fn deep_trees_and_many_patterns_are_answered_in_time() {
        // A directory 2,000 deep under `**/node_modules`, and 20 lines of `**/**/**/zz`.
        let mut deep = String::new();
        for _ in 0..2000 {
            deep.push_str("d/");
        }
        deep.push_str("node_modules/x");
        let rules = IgnoreRules::parse("**/node_modules\n").unwrap();
        let (excluded, took) = timed(|| {
            let parts: Vec<&str> = deep.split('/').collect();
            // As the walk asks: every directory on the way down.
            (1..=parts.len()).map(|n| rules.excludes(&parts[..n].join("/"))).next_back().unwrap()
        });
        assert!(excluded);
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        let rules = IgnoreRules::parse(&"**/**/**/zz\n".repeat(20)).unwrap();
        let path = "a/".repeat(100) + "b";
        let (excluded, took) = timed(|| rules.excludes(&path));
        assert!(!excluded);
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        // 2,000 patterns (the most read) over 100,000 paths.
        let text: String = (0..2000).map(|i| format!("dir{i}/file{i}.txt\n")).collect();
        let rules = IgnoreRules::parse(&text).unwrap();
        let (count, took) =
            timed(|| (0..100_000).filter(|i| rules.excludes(&format!("dir{}/file{}.txt", i % 3000, i % 3000))).count());
        assert!(count > 0);
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
        // More than that is one clear line, and so is a fourth `**`.
        let text: String = (0..10_000).map(|i| format!("p{i}\n")).collect();
        let error = IgnoreRules::parse(&text).unwrap_err();
        assert!(error.downcast_ref::<RefusedPattern>().is_some(), "{error:#}");
        let error = IgnoreRules::parse("a/**/b/**/c/**/d/**\n").unwrap_err();
        assert!(error.downcast_ref::<RefusedPattern>().is_some(), "{error:#}");
    }

    #[test]
    fn a_large_context_is_not_hashed_and_no_file_is_read_twice() {
        let dir = context();
        let file = std::fs::File::create(dir.path().join("huge.bin")).unwrap();
        file.set_len(64 << 30).unwrap();
        let (result, took) = timed(|| ContextWalk::read(dir.path(), &IgnoreRules::default()));
        let error = result.unwrap_err().to_string();
        assert!(error.contains("more than 512 MB"), "{error}");
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn the_hash_follows_what_docker_sends_and_nothing_else() {
        let dir = context();
        let first = hash_of(dir.path(), &[]).unwrap();
        assert_eq!(first, hash_of(dir.path(), &[]).unwrap(), "the same inputs, the same hash");
        std::fs::write(dir.path().join("build.log"), "ignored").unwrap();
        assert_eq!(first, hash_of(dir.path(), &[]).unwrap(), "an ignored file changes nothing");
        std::fs::write(dir.path().join("src/main.rs"), "fn main() { }\n").unwrap();
        let edited = hash_of(dir.path(), &[]).unwrap();
        assert_ne!(first, edited, "a source edit changes it");
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        assert_ne!(edited, hash_of(dir.path(), &[]).unwrap(), "so does an empty directory");
        assert_ne!(edited, hash_of(dir.path(), &["--network=host".into()]).unwrap());
        assert!(hash_of(dir.path(), &["--no-cache".into()]).is_err());
        assert!(hash_of(dir.path(), &["--pull=true".into()]).is_err());
    }
}

/// What cachefrom writes on a cache it exported, as annotations of the cache's manifest: the hash
/// of the inputs it was built from, the digest of the image that build pushed, and each stage's
/// step count. A later run with the same inputs has nothing to build.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CacheRecord {
    /// [`fingerprint`] of the build that wrote the cache.
    pub inputs: String,
    /// The digest of the image that build pushed (its `--tag`s), if it pushed one.
    pub image: Option<String>,
    /// Steps of each stage, as BuildKit reported them.
    pub steps: std::collections::BTreeMap<String, usize>,
    /// The seconds each step took when it last ran (not a hit), by stage and instruction: what a
    /// later hit of the same step saves.
    pub step_seconds: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
}

const INPUTS_KEY: &str = "dev.cachefrom.inputs";
const IMAGE_KEY: &str = "dev.cachefrom.image";
const STEPS_KEY: &str = "dev.cachefrom.steps";
const STEP_SECONDS_KEY: &str = "dev.cachefrom.step-seconds";
/// The longest step-seconds record read back.
const MAX_STEP_SECONDS_BYTES: usize = 256 * 1024;

impl CacheRecord {
    /// The record as manifest annotations.
    pub fn to_annotations(&self) -> std::collections::BTreeMap<String, String> {
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(INPUTS_KEY.to_string(), self.inputs.clone());
        if let Some(image) = &self.image {
            annotations.insert(IMAGE_KEY.to_string(), image.clone());
        }
        annotations.insert(STEPS_KEY.to_string(), serde_json::to_string(&self.steps).unwrap_or_default());
        if !self.step_seconds.is_empty() {
            let text = serde_json::to_string(&self.step_seconds).unwrap_or_default();
            if text.len() <= MAX_STEP_SECONDS_BYTES {
                annotations.insert(STEP_SECONDS_KEY.to_string(), text);
            }
        }
        annotations
    }

    /// The record in a manifest's annotations, if it carries one (checked: a registry's answer is
    /// not trusted to be well formed).
    pub fn from_annotations(annotations: &std::collections::BTreeMap<String, String>) -> Option<CacheRecord> {
        let inputs = annotations.get(INPUTS_KEY).filter(|text| is_digest(text))?.clone();
        let image = annotations.get(IMAGE_KEY).filter(|text| is_digest(text)).cloned();
        let steps = annotations.get(STEPS_KEY).and_then(|text| serde_json::from_str(text).ok()).unwrap_or_default();
        let step_seconds: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>> = annotations
            .get(STEP_SECONDS_KEY)
            .filter(|text| text.len() <= MAX_STEP_SECONDS_BYTES)
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default();
        // Only plain, finite, non-negative seconds are believed.
        let step_seconds = step_seconds
            .into_iter()
            .map(|(stage, steps)| {
                (stage, steps.into_iter().filter(|(_, seconds)| seconds.is_finite() && *seconds >= 0.0).collect())
            })
            .collect();
        Some(CacheRecord { inputs, image, steps, step_seconds })
    }
}

/// `sha256:` and 64 lowercase hex digits.
pub fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// An image reference from a Dockerfile (`NAME`, `NAME:TAG`, `NAME@DIGEST`) as its repository and
/// the tag or digest to ask for; `None` for `scratch` and for what is not a reference.
pub fn image_reference(text: &str) -> Option<(crate::refs::Repository, String)> {
    if text == "scratch" {
        return None;
    }
    let (name, reference) = match text.split_once('@') {
        Some((name, digest)) => {
            (name.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(name, |(n, _)| n), digest.to_string())
        }
        None => match text.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
            Some((name, tag)) => (name, tag.to_string()),
            None => (text, "latest".to_string()),
        },
    };
    Some((crate::refs::Repository::parse(name).ok()?, reference))
}

#[cfg(test)]
mod record_tests {
    use super::*;

    /// Runs `f` and says how long it took.
    fn timed<T>(f: impl FnOnce() -> T) -> (T, std::time::Duration) {
        let started = std::time::Instant::now();
        let value = f();
        (value, started.elapsed())
    }
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_annotations_read_as_a_record_only_when_well_formed(inputs in any::<String>(), image in any::<String>(), steps in any::<String>()) {
            let annotations = [(INPUTS_KEY.to_string(), inputs.clone()), (IMAGE_KEY.to_string(), image.clone()), (STEPS_KEY.to_string(), steps)].into();
            match CacheRecord::from_annotations(&annotations) {
                Some(record) => {
                    prop_assert!(is_digest(&record.inputs));
                    prop_assert!(record.image.as_deref().is_none_or(is_digest));
                }
                None => prop_assert!(!is_digest(&inputs)),
            }
        }

        #[test]
        fn any_dockerignore_is_read_or_refused_with_a_reason_and_paths_are_answered_in_time(text in any::<String>(), path in any::<String>()) {
            let (parsed, took) = timed(|| IgnoreRules::parse(&text));
            prop_assert!(took < std::time::Duration::from_secs(2));
            match parsed {
                Ok(rules) => {
                    let (_, took) = timed(|| rules.excludes(&path));
                    prop_assert!(took < std::time::Duration::from_secs(1));
                }
                Err(error) => {
                    let shown = format!("{:#}", error);
                    prop_assert!(!shown.is_empty());
                }
            }
        }

        #[test]
        fn ignore_rules_agree_with_moby_read_plainly(
            patterns in prop::collection::vec((any::<bool>(), "(\\*\\*|[ab*?]{1,3})(/(\\*\\*|[ab*?]{1,3})){0,3}"), 1..4),
            path in "[ab]{1,2}(/[ab]{1,2}){0,4}",
        ) {
            prop_assume!(patterns.iter().all(|(_, p)| p.matches("**").count() <= MAX_DOUBLE_STARS));
            let text: String = patterns.iter().map(|(exception, p)| format!("{}{p}\n", if *exception { "!" } else { "" })).collect();
            let rules = IgnoreRules::parse(&text).unwrap();
            let mut expected = false;
            for (exception, pattern) in &patterns {
                if moby_matches_or_parent(pattern, &path) {
                    expected = !exception;
                }
            }
            prop_assert_eq!(rules.excludes(&path), expected, "{:?} on {}", text, path);
        }
    }

    /// moby's patternmatcher read plainly, by exhaustive recursion over characters: `**` (with the
    /// `/` after it) before more pattern is any prefix ending in `/` (or none), at the end anything, `*` a run
    /// without `/`, `?` one character but `/`; a pattern matches a path or one of its parents.
    fn moby_matches_or_parent(pattern: &str, path: &str) -> bool {
        fn reference(p: &[char], t: &[char]) -> bool {
            match p {
                [] => t.is_empty(),
                ['*', '*'] | ['*', '*', '/'] => true,
                // `**` before more of the pattern (its `/` eaten): nothing, or any run ending in `/`.
                ['*', '*', '/', rest @ ..] | ['*', '*', rest @ ..] => {
                    reference(rest, t) || (0..t.len()).any(|i| t[i] == '/' && reference(rest, &t[i + 1..]))
                }
                ['*', rest @ ..] => {
                    (0..=t.len()).take_while(|i| *i == 0 || t[i - 1] != '/').any(|i| reference(rest, &t[i..]))
                }
                ['?', rest @ ..] => t.first().is_some_and(|c| *c != '/') && reference(rest, &t[1..]),
                [c, rest @ ..] => t.first() == Some(c) && reference(rest, &t[1..]),
            }
        }
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = path.chars().collect();
        reference(&p, &t) || (0..t.len()).any(|i| t[i] == '/' && reference(&p, &t[..i]))
    }

    #[test]
    fn records_round_trip_and_refuse_what_is_not_a_digest() {
        let record = CacheRecord {
            inputs: format!("sha256:{}", "a".repeat(64)),
            image: Some(format!("sha256:{}", "b".repeat(64))),
            steps: [("deps".to_string(), 3)].into(),
            step_seconds: [("deps".to_string(), [("RUN make".to_string(), 12.5)].into())].into(),
        };
        assert_eq!(CacheRecord::from_annotations(&record.to_annotations()), Some(record.clone()));
        let mut hostile = record.to_annotations();
        hostile.insert(INPUTS_KEY.into(), "sha256:zz\n".into());
        assert_eq!(CacheRecord::from_annotations(&hostile), None);
    }

    #[test]
    fn image_references() {
        let (repository, reference) = image_reference("127.0.0.1:5000/base/runtime:bookworm").unwrap();
        assert_eq!(
            (repository.registry.as_str(), repository.path.as_str(), reference.as_str()),
            ("127.0.0.1:5000", "base/runtime", "bookworm")
        );
        assert_eq!(image_reference("alpine").unwrap().1, "latest");
        assert_eq!(image_reference("127.0.0.1:5000/a").unwrap().1, "latest");
        let digest = format!("sha256:{}", "c".repeat(64));
        assert_eq!(image_reference(&format!("debian:12@{digest}")).unwrap().1, digest);
        assert!(image_reference("scratch").is_none());
        assert!(image_reference("Not Valid").is_none());
    }
}
