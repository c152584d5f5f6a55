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

/// Options after `--` that make a build's result depend on more than the inputs hashed here.
const UNHASHED_OPTIONS: [&str; 5] = ["--no-cache", "--no-cache-filter", "--pull", "--build-context", "--check"];

/// What the hash is computed from, besides the build context's files.
pub struct Inputs<'a> {
    /// The build context.
    pub context: &'a Path,
    /// The Dockerfile.
    pub dockerfile: &'a Path,
    /// The stage built.
    pub target: &'a str,
    /// `--build-arg` values, sorted by name.
    pub build_args: Vec<(&'a str, &'a str)>,
    /// The options passed to docker untouched.
    pub docker_args: &'a [String],
    /// Each image the Dockerfile reads with its manifest digest, sorted.
    pub image_digests: Vec<(String, String)>,
}

/// The hash of `inputs` (`sha256:` and 64 hex digits), or why there is none.
pub fn fingerprint(inputs: &Inputs) -> Result<String> {
    for arg in inputs.docker_args {
        let flag = arg.split('=').next().unwrap_or(arg);
        if UNHASHED_OPTIONS.contains(&flag) {
            bail!("`{flag}` makes the build depend on more than its inputs");
        }
    }
    let mut hash = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        hash.update(name.as_bytes());
        hash.update((value.len() as u64).to_le_bytes());
        hash.update(value);
    };
    field("version", b"cachefrom-inputs-1");
    let dockerfile = std::fs::read(inputs.dockerfile)
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
    // Where the build runs: another engine or architecture builds other layers.
    for name in ["DOCKER_HOST", "DOCKER_CONTEXT", "BUILDX_BUILDER"] {
        field(name, std::env::var(name).unwrap_or_default().as_bytes());
    }
    field("arch", std::env::consts::ARCH.as_bytes());
    let ignore = IgnoreRules::for_build(inputs.context, inputs.dockerfile)?;
    hash_tree(inputs.context, inputs.context, &ignore, &mut field)?;
    Ok(format!("sha256:{:x}", hash.finalize()))
}

fn hash_tree(root: &Path, dir: &Path, ignore: &IgnoreRules, field: &mut impl FnMut(&str, &[u8])) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
        let metadata = std::fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        field("path", relative_text.as_bytes());
        field("mode", &metadata.permissions().mode().to_le_bytes());
        field("owner", &[metadata.uid().to_le_bytes(), metadata.gid().to_le_bytes()].concat());
        if metadata.is_symlink() {
            let target = std::fs::read_link(&path)?;
            field("link", target.as_os_str().as_encoded_bytes());
        } else if metadata.is_dir() {
            field("dir", b"");
            hash_tree(root, &path, ignore, field)?;
        } else if metadata.is_file() {
            let mut file = std::fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
            let mut content = Sha256::new();
            std::io::copy(&mut file, &mut content).with_context(|| format!("reading {}", path.display()))?;
            field("file", &content.finalize());
        } else {
            bail!("the build context holds {}, which is neither a file, a directory nor a link", path.display());
        }
    }
    Ok(())
}

/// The most `**` one `.dockerignore` pattern may hold.
const MAX_DOUBLE_STARS: usize = 3;

/// The patterns of a `.dockerignore`, read as Docker reads them (moby's patternmatcher): the last
/// pattern that matches a path or one of its parent directories decides, `!` lets a path back in.
#[derive(Debug, Default)]
pub struct IgnoreRules {
    patterns: Vec<(bool, Vec<String>)>,
}

impl IgnoreRules {
    /// The rules for a build: `DOCKERFILE.dockerignore` beside the Dockerfile when it exists,
    /// else `CONTEXT/.dockerignore`, else none.
    pub fn for_build(context: &Path, dockerfile: &Path) -> Result<IgnoreRules> {
        let mut specific = dockerfile.as_os_str().to_owned();
        specific.push(".dockerignore");
        for file in [std::path::PathBuf::from(specific), context.join(".dockerignore")] {
            if let Ok(text) = std::fs::read_to_string(&file) {
                return IgnoreRules::parse(&text).with_context(|| format!("reading {}", file.display()));
            }
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
            if pattern.contains(['[', ']', '\\']) {
                bail!("the pattern `{pattern}` uses a character class or an escape");
            }
            let segments: Vec<String> = pattern
                .split('/')
                .filter(|segment| !segment.is_empty() && *segment != ".")
                .map(str::to_string)
                .collect();
            if segments.iter().any(|segment| segment == "..") {
                bail!("the pattern `{pattern}` climbs out of the context");
            }
            // Each `**` tries every depth: a few keep matching linear enough.
            if segments.iter().filter(|segment| *segment == "**").count() > MAX_DOUBLE_STARS {
                bail!("the pattern `{pattern}` has more than {MAX_DOUBLE_STARS} `**`");
            }
            if !segments.is_empty() {
                patterns.push((exception, segments));
            }
        }
        Ok(IgnoreRules { patterns })
    }

    /// True when `path` (relative, `/`-separated) is left out of the build context.
    pub fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();
        let mut excluded = false;
        for (exception, pattern) in &self.patterns {
            let matched = (1..=parts.len()).any(|len| matches_segments(pattern, &parts[..len]));
            if matched {
                excluded = !exception;
            }
        }
        excluded
    }
}

/// Path segments against pattern segments: `**` is any number of segments, `*` and `?` stay
/// within one segment.
pub(crate) fn matches_segments(pattern: &[String], parts: &[&str]) -> bool {
    match pattern.split_first() {
        None => parts.is_empty(),
        Some((first, rest)) if first == "**" => (0..=parts.len()).any(|skip| matches_segments(rest, &parts[skip..])),
        Some((first, rest)) => match parts.split_first() {
            Some((part, others)) => matches_glob(first, part) && matches_segments(rest, others),
            None => false,
        },
    }
}

/// One segment against a pattern of literals, `*` (any characters) and `?` (one character):
/// the greedy match that goes back only to the last `*`, so any input is answered in time
/// proportional to the product of the lengths.
fn matches_glob(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut p, mut t) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            last_star = Some((p, t));
            p += 1;
        } else if let Some((star, matched)) = last_star {
            p = star + 1;
            t = matched + 1;
            last_star = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
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
        fingerprint(&Inputs {
            context: dir,
            dockerfile: &dir.join("Dockerfile"),
            target: "0",
            build_args: vec![("A", "1")],
            docker_args: args,
            image_digests: vec![("alpine".into(), "sha256:1".into())],
        })
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheRecord {
    /// [`fingerprint`] of the build that wrote the cache.
    pub inputs: String,
    /// The digest of the image that build pushed (its `--tag`s), if it pushed one.
    pub image: Option<String>,
    /// Steps of each stage, as BuildKit reported them.
    pub steps: std::collections::BTreeMap<String, usize>,
}

const INPUTS_KEY: &str = "dev.cachefrom.inputs";
const IMAGE_KEY: &str = "dev.cachefrom.image";
const STEPS_KEY: &str = "dev.cachefrom.steps";

impl CacheRecord {
    /// The record as manifest annotations.
    pub fn to_annotations(&self) -> std::collections::BTreeMap<String, String> {
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(INPUTS_KEY.to_string(), self.inputs.clone());
        if let Some(image) = &self.image {
            annotations.insert(IMAGE_KEY.to_string(), image.clone());
        }
        annotations.insert(STEPS_KEY.to_string(), serde_json::to_string(&self.steps).unwrap_or_default());
        annotations
    }

    /// The record in a manifest's annotations, if it carries one (checked: a registry's answer is
    /// not trusted to be well formed).
    pub fn from_annotations(annotations: &std::collections::BTreeMap<String, String>) -> Option<CacheRecord> {
        let inputs = annotations.get(INPUTS_KEY).filter(|text| is_digest(text))?.clone();
        let image = annotations.get(IMAGE_KEY).filter(|text| is_digest(text)).cloned();
        let steps = annotations.get(STEPS_KEY).and_then(|text| serde_json::from_str(text).ok()).unwrap_or_default();
        Some(CacheRecord { inputs, image, steps })
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
        fn any_dockerignore_and_path_are_answered(text in any::<String>(), path in any::<String>()) {
            if let Ok(rules) = IgnoreRules::parse(&text) {
                let _ = rules.excludes(&path);
            }
        }

        #[test]
        fn globs_agree_with_a_plain_reading(pattern in "[ab*?]{0,12}", text in "[ab]{0,12}") {
            // The reference: `*` any run, `?` one character, by exhaustive recursion.
            fn reference(p: &[char], t: &[char]) -> bool {
                match p.split_first() {
                    None => t.is_empty(),
                    Some(('*', rest)) => (0..=t.len()).any(|skip| reference(rest, &t[skip..])),
                    Some(('?', rest)) => !t.is_empty() && reference(rest, &t[1..]),
                    Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
                }
            }
            let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
            prop_assert_eq!(matches_glob(&pattern, &text), reference(&p, &t));
        }
    }

    #[test]
    fn records_round_trip_and_refuse_what_is_not_a_digest() {
        let record = CacheRecord {
            inputs: format!("sha256:{}", "a".repeat(64)),
            image: Some(format!("sha256:{}", "b".repeat(64))),
            steps: [("deps".to_string(), 3)].into(),
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
