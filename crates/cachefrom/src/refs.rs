//! Image references and the tag scheme of cache images.
//!
//! Every cache tag has the form `cache-<stage>-<key>` (or `cache-<stage>` for the unprefixed level):
//!
//! | level            | tag                           |
//! |------------------|-------------------------------|
//! | branch           | `cache-<stage>-<branch>`      |
//! | commit, parent, merge-base | `cache-<stage>-<40-hex sha>` |
//! | default branch   | `cache-<stage>-<default branch>` |
//! | unprefixed       | `cache-<stage>`               |
//!
//! Branch and stage names are mapped onto Docker's tag grammar by [`sanitize_tag`].

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The longest tag Docker accepts.
pub const MAX_TAG_LEN: usize = 128;

/// Hex digits of the hash suffix added when a name had to be changed to fit the tag grammar.
const HASH_SUFFIX_LEN: usize = 10;

/// True when `tag` matches Docker's tag grammar `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    let Some(first) = chars.next() else { return false };
    tag.len() <= MAX_TAG_LEN
        && (first.is_ascii_alphanumeric() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Maps any string onto a valid, lowercase tag.
///
/// A string that already is a valid lowercase tag is kept as it is. Any other string is lowercased,
/// every character outside `[a-z0-9_.-]` becomes `-`, and a hash of the original is appended
/// (`feature/Login` → `feature-login-<10 hex>`), cut so the whole fits in 128 characters; so two
/// different strings never share a tag by accident.
pub fn sanitize_tag(text: &str) -> String {
    if is_valid_tag(text) && !text.chars().any(|c| c.is_ascii_uppercase()) {
        return text.to_string();
    }
    let mut mapped: String = text
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if mapped.starts_with(['.', '-']) {
        mapped.insert(0, '_');
    }
    let hash = short_hash(text);
    let room = MAX_TAG_LEN - HASH_SUFFIX_LEN - 1;
    mapped.truncate(room);
    if mapped.is_empty() {
        mapped.push('_');
    }
    format!("{mapped}-{hash}")
}

fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect::<String>()[..HASH_SUFFIX_LEN].to_string()
}

/// The cache tag of `stage` at a level whose key is `key` (`None`: the unprefixed tag).
pub fn cache_tag(stage: &str, key: Option<&str>) -> String {
    let raw = match key {
        Some(key) => format!("cache-{}-{}", sanitize_tag(stage), sanitize_tag(key)),
        None => format!("cache-{}", sanitize_tag(stage)),
    };
    if raw.len() <= MAX_TAG_LEN {
        raw
    } else {
        sanitize_tag_cut(&raw)
    }
}

/// A tag longer than 128 characters, cut with a hash of the whole so that distinct tags stay distinct.
fn sanitize_tag_cut(tag: &str) -> String {
    let hash = short_hash(tag);
    let mut cut = tag.to_string();
    cut.truncate(MAX_TAG_LEN - HASH_SUFFIX_LEN - 1);
    format!("{cut}-{hash}")
}

/// An image repository without a tag: `[REGISTRY[:PORT]/]NAME`, e.g. `127.0.0.1:5000/team/app`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Repository {
    /// The registry host (with port), e.g. `127.0.0.1:5000` or `docker.io`.
    pub registry: String,
    /// The path inside the registry, e.g. `team/app` (`library/app` on Docker Hub).
    pub path: String,
    /// What the user wrote, kept for display.
    pub written: String,
}

impl Repository {
    /// Parses `REGISTRY/NAME`; a tag or digest is an error, since cachefrom chooses the tags.
    pub fn parse(text: &str) -> Result<Repository> {
        let text = text.trim();
        if text.is_empty() {
            bail!("the image repository is empty; pass --image REGISTRY/NAME, e.g. --image 127.0.0.1:5000/myapp");
        }
        if text.contains('@') {
            bail!("the image repository `{text}` has a digest; pass the repository alone (REGISTRY/NAME)");
        }
        let last = text.rsplit('/').next().unwrap_or(text);
        if last.contains(':') {
            bail!(
                "the image repository `{text}` has a tag; pass the repository alone (REGISTRY/NAME): cachefrom chooses the cache tags, and --tag names the final image"
            );
        }
        let (registry, path) = match text.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ if text.contains('/') => ("docker.io".to_string(), text.to_string()),
            _ => ("docker.io".to_string(), format!("library/{text}")),
        };
        let path_ok = !path.is_empty()
            && path.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
            });
        if !path_ok {
            bail!("the image repository `{text}` is not valid: use lowercase letters, digits, `.`, `_`, `-` and `/`");
        }
        Ok(Repository { registry, path, written: text.to_string() })
    }

    /// `REPOSITORY:TAG`, written as the user wrote the repository.
    pub fn with_tag(&self, tag: &str) -> String {
        format!("{}:{tag}", self.written)
    }

    /// True for a registry on this machine, reached over plain HTTP as Docker does.
    pub fn is_loopback_registry(&self) -> bool {
        let host = self.registry.rsplit_once(':').map(|(host, _)| host).unwrap_or(&self.registry);
        host == "localhost" || host.starts_with("127.") || host == "[::1]"
    }
}

impl TryFrom<String> for Repository {
    type Error = anyhow::Error;
    fn try_from(text: String) -> Result<Self> {
        Repository::parse(&text)
    }
}

impl From<Repository> for String {
    fn from(repository: Repository) -> String {
        repository.written
    }
}

impl std::fmt::Display for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn clean_names_stay_as_they_are() {
        assert_eq!(sanitize_tag("main"), "main");
        assert_eq!(sanitize_tag("release-1.2_x"), "release-1.2_x");
    }

    #[test]
    fn slashes_and_case_map_to_dashes_with_a_hash() {
        let tag = sanitize_tag("feature/Login");
        assert!(tag.starts_with("feature-login-"), "{tag}");
        assert_eq!(tag.len(), "feature-login-".len() + HASH_SUFFIX_LEN);
        assert_ne!(sanitize_tag("feature/login"), sanitize_tag("feature-login"));
    }

    #[test]
    fn a_300_character_branch_with_slashes_and_unicode_fits() {
        let branch = format!("{}/ünïcode-{}", "team/feature/".repeat(20), "x".repeat(50));
        assert!(branch.chars().count() >= 300);
        let tag = cache_tag("builder", Some(&branch));
        assert!(is_valid_tag(&tag), "{tag}");
        assert_eq!(tag.len(), MAX_TAG_LEN);
        let other = cache_tag("builder", Some(&format!("{branch}2")));
        assert_ne!(tag, other);
    }

    #[test]
    fn the_tag_scheme() {
        assert_eq!(cache_tag("deps", Some("main")), "cache-deps-main");
        assert_eq!(cache_tag("deps", None), "cache-deps");
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(cache_tag("builder", Some(sha)), format!("cache-builder-{sha}"));
    }

    #[test]
    fn repositories_parse() {
        let local = Repository::parse("127.0.0.1:5000/team/app").unwrap();
        assert_eq!((local.registry.as_str(), local.path.as_str()), ("127.0.0.1:5000", "team/app"));
        assert!(local.is_loopback_registry());
        assert_eq!(local.with_tag("cache-deps"), "127.0.0.1:5000/team/app:cache-deps");
        let hub = Repository::parse("app").unwrap();
        assert_eq!((hub.registry.as_str(), hub.path.as_str()), ("docker.io", "library/app"));
        assert!(!hub.is_loopback_registry());
        let error = Repository::parse("127.0.0.1:5000/app:latest").unwrap_err().to_string();
        assert!(error.contains("has a tag"), "{error}");
        assert!(Repository::parse("Upper/Case").is_err());
        assert!(Repository::parse("").is_err());
    }

    proptest! {
        #[test]
        fn any_string_maps_to_a_valid_tag(text in any::<String>()) {
            prop_assert!(is_valid_tag(&sanitize_tag(&text)));
            prop_assert!(is_valid_tag(&cache_tag(&text, Some(&text))));
        }

        #[test]
        fn distinct_branches_give_distinct_tags(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b);
            prop_assert_ne!(cache_tag("builder", Some(&a)), cache_tag("builder", Some(&b)));
        }

        #[test]
        fn similar_branches_give_distinct_tags(base in "[a-z]{1,200}", suffix in "[/A-Z .]{1,3}") {
            let with_suffix = format!("{base}{suffix}");
            prop_assert_ne!(cache_tag("deps", Some(&base)), cache_tag("deps", Some(&with_suffix)));
        }
    }
}
