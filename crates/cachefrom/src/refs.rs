//! Image references and the tag scheme of cache images.
//!
//! A cache tag names its owner: a stage, and the branch or commit whose cache it is.
//!
//! | level                      | tag                            |
//! |----------------------------|--------------------------------|
//! | branch, default branch     | `cache-<stage>.<branch>`       |
//! | commit, parent, merge-base | `cache-<stage>.<40-hex sha>`   |
//! | unprefixed                 | `cache-<stage>`                |
//!
//! A build for a named platform (`--platform linux/arm64`) has caches of its own:
//! `cache-<stage>--linux-arm64.<branch>`. The platform part (`os-arch[-variant]`) always holds a
//! `-`, so it never reads as a hash; stage and platform share the stage part's room.
//!
//! Ordinary names are kept as they are (`cache-deps.main`, `cache-build-env.feature-x`). Any
//! other name becomes `<readable hint>--<hash of the name>` (`feature/Login` →
//! `feature-login--<20 hex>`): a stage with a `.` or `--` or longer than 40 characters; a branch
//! with `/`, upper case or `--`, longer than 81 characters, or that looks like a commit id.
//!
//! The scheme is one-to-one. The stage part never holds a `.`, so a tag splits at its first `.`
//! into stage part and key part, and a tag without `.` is unprefixed. Within a part, a kept name
//! never holds `--` and a hashed one always does, with a hash of the kind (stage, branch, commit)
//! and the name; a key part is a commit id exactly when it is 40 or 64 hex digits, which no kept
//! branch is. So no owner can write another's tag (short of a collision of an 80-bit hash).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The longest tag Docker accepts.
pub const MAX_TAG_LEN: usize = 128;

/// Hex digits of the hash in a hashed name (80 bits: finding two names that share one is out of reach).
const HASH_LEN: usize = 20;
/// The longest stage part of a tag.
const STAGE_ROOM: usize = 40;
/// The longest key part: what the prefix, the stage part and the `.` leave of 128 characters.
const KEY_ROOM: usize = MAX_TAG_LEN - "cache-".len() - STAGE_ROOM - 1;

/// What a cache tag is keyed by besides its stage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TagKey {
    /// A branch name (the branch and default-branch levels).
    Branch(String),
    /// A commit id (the commit, parent and merge-base levels).
    Commit(String),
}

/// True when `tag` matches Docker's tag grammar `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    let Some(first) = chars.next() else { return false };
    tag.len() <= MAX_TAG_LEN
        && (first.is_ascii_alphanumeric() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// True for a full commit id: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits.
pub fn is_commit_id(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

/// A stage name kept as it is: lowercase letters, digits, `_` and `-`, starting with a letter
/// or digit, without `--`, at most `room` characters.
fn is_readable_stage(stage: &str, room: usize) -> bool {
    stage.len() <= room
        && stage.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && stage.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
        && !stage.contains("--")
}

/// A branch name kept as it is: a lowercase tag without `--` that does not look like a commit id.
fn is_readable_branch(branch: &str) -> bool {
    branch.len() <= KEY_ROOM
        && is_valid_tag(branch)
        && !branch.chars().any(|c| c.is_ascii_uppercase())
        && !branch.contains("--")
        && !is_commit_id(branch)
}

/// Maps a branch name (or any string) onto a valid, lowercase tag of at most 81 characters,
/// one-to-one: the key part of the branch's cache tags.
///
/// A readable name is kept as it is; any other becomes `<hint>--<hash>`
/// (`feature/Login` → `feature-login--<20 hex>`).
pub fn sanitize_tag(text: &str) -> String {
    if is_readable_branch(text) {
        return text.to_string();
    }
    hashed("branch", text, KEY_ROOM, true)
}

/// The cache tag of `stage` at a level keyed by `key` (`None`: the unprefixed tag).
pub fn cache_tag(stage: &str, key: Option<&TagKey>) -> String {
    cache_tag_for(stage, None, key)
}

/// The longest platform part of a tag: what leaves a hashed stage room for its hint.
const PLATFORM_ROOM: usize = 15;

/// The platform part of a tag: `linux/arm64/v8` → `linux-arm64-v8`; `None` for a platform not
/// written `os/arch[/variant]` in lowercase letters and digits, or longer than 15 characters.
pub fn platform_part(platform: &str) -> Option<String> {
    let pieces: Vec<&str> = platform.split('/').collect();
    let plain = pieces
        .iter()
        .all(|piece| !piece.is_empty() && piece.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    let part = pieces.join("-");
    (plain && is_platform_part(&part)).then_some(part)
}

/// `os-arch[-variant]`, each lowercase letters and digits: never 20 hex digits (it has a `-`),
/// so it never reads as a hashed name's hash.
fn is_platform_part(part: &str) -> bool {
    let pieces: Vec<&str> = part.split('-').collect();
    (2..=3).contains(&pieces.len())
        && part.len() <= PLATFORM_ROOM
        && pieces
            .iter()
            .all(|piece| !piece.is_empty() && piece.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
}

/// The cache tag of `stage` built for `platform` (`None`: no platform named) at a level keyed by
/// `key`: `cache-<stage>--<os>-<arch>[-<variant>].<key>`. The stage and the platform together
/// take the room of a stage part, so the key part is the same as without a platform.
pub fn cache_tag_for(stage: &str, platform: Option<&str>, key: Option<&TagKey>) -> String {
    let stage_part = |room: usize| {
        if is_readable_stage(stage, room) {
            stage.to_string()
        } else {
            hashed("stage", stage, room, false)
        }
    };
    let owner = match platform.map(|platform| (platform, platform_part(platform))) {
        None => stage_part(STAGE_ROOM),
        Some((_, Some(part))) => format!("{}--{part}", stage_part(STAGE_ROOM - 2 - part.len())),
        // A platform of another shape: stage and platform hashed together.
        Some((platform, None)) => hashed("stage-platform", &format!("{stage}\n{platform}"), STAGE_ROOM, false),
    };
    let stage_part = owner;
    let key_part = match key {
        None => return format!("cache-{stage_part}"),
        Some(TagKey::Branch(branch)) => sanitize_tag(branch),
        Some(TagKey::Commit(commit)) if is_commit_id(commit) => commit.clone(),
        Some(TagKey::Commit(commit)) => hashed("commit", commit, KEY_ROOM, true),
    };
    format!("cache-{stage_part}.{key_part}")
}

/// `<hint>--<hash of kind and name>`, at most `room` characters; dots in the hint only when `dots`.
fn hashed(kind: &str, name: &str, room: usize, dots: bool) -> String {
    let digest = Sha256::digest(format!("{kind}:{name}").as_bytes());
    let hash: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    let hint = hint(name, room - 2 - HASH_LEN, dots);
    let hint = if hint.is_empty() { "_" } else { hint.as_str() };
    format!("{hint}--{}", &hash[..HASH_LEN])
}

/// A readable stand-in for `text`, at most `room` characters: lowercase, anything outside
/// `[a-z0-9_.-]` (and `.` unless `dots`) as one `-`, starting with a letter, digit or `_`, no
/// `--`, ending with a letter, digit or `_`.
fn hint(text: &str, room: usize, dots: bool) -> String {
    let mut out = String::new();
    for c in text.chars().map(|c| c.to_ascii_lowercase()) {
        let c = if c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.') { c } else { '-' };
        if (c == '-' || c == '.') && (out.is_empty() || out.ends_with(['-', '.'])) {
            continue;
        }
        if out.len() == room {
            break;
        }
        out.push(c);
    }
    out.trim_end_matches(['-', '.']).to_string()
}

/// The parts of a tag this scheme writes, read back: the owner part (the stage, and its platform
/// when one is named) and the key part (`None` for an unprefixed tag); `None` for any tag the scheme never writes (`cache-Deps.Main`,
/// `cache-deps.MAIN`, `latest`). Every tag [`cache_tag`] returns reads back.
pub fn read_cache_tag(tag: &str) -> Option<(&str, Option<&str>)> {
    let body = tag.strip_prefix("cache-")?;
    if !is_valid_tag(tag) {
        return None;
    }
    let (stage, key) = match body.split_once('.') {
        Some((stage, key)) => (stage, Some(key)),
        None => (body, None),
    };
    let stage_ok = match stage.rsplit_once("--").filter(|(_, platform)| is_platform_part(platform)) {
        Some((stage, platform)) => {
            let room = STAGE_ROOM - 2 - platform.len();
            is_readable_stage(stage, room) || is_hashed(stage, room, false)
        }
        None => is_readable_stage(stage, STAGE_ROOM) || is_hashed(stage, STAGE_ROOM, false),
    };
    let key_ok = key.is_none_or(|key| is_commit_id(key) || is_readable_branch(key) || is_hashed(key, KEY_ROOM, true));
    (stage_ok && key_ok).then_some((stage, key))
}

/// True for a name [`hashed`] can return: a [`hint`] (or `_`), `--`, and the hash's hex digits.
fn is_hashed(part: &str, room: usize, dots: bool) -> bool {
    let Some((hint, hash)) = part.rsplit_once("--") else { return false };
    let hint_ok = hint == "_"
        || (!hint.is_empty()
            && hint.len() <= room - 2 - HASH_LEN
            && hint
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' || (dots && c == '.'))
            && !hint.starts_with(['-', '.'])
            && !hint.ends_with(['-', '.'])
            && !hint.contains("--")
            && !hint.contains("-.")
            && !hint.contains(".-")
            && !hint.contains(".."));
    hint_ok && hash.len() == HASH_LEN && hash.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

/// Refuses an image reference with a scheme (`https://…`) or user information (`user:pass@host/…`),
/// without repeating it: registries are logged in with `docker login`, and cachefrom reads those logins.
pub fn check_no_credentials(text: &str, what: &str) -> Result<()> {
    if text.contains("://") {
        bail!("{what} has a URL scheme (`…://`); write REGISTRY/NAME without one (the value is not shown)");
    }
    let first = text.split('/').next().unwrap_or(text);
    if text.contains('/') && first.contains('@') {
        bail!(
            "{what} carries credentials (user:password@) that are not shown here; remove them and log in with `docker login REGISTRY`: cachefrom reads docker's logins"
        );
    }
    Ok(())
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
        check_no_credentials(text, "the image repository")?;
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

    /// The tag of `image`, which must be `REPOSITORY:TAG` of this repository.
    pub fn tag_of(&self, image: &str) -> Result<String> {
        let prefix = format!("{}:", self.with_tag("").trim_end_matches(':'));
        match image.strip_prefix(&prefix) {
            Some(tag) if !tag.is_empty() => Ok(tag.to_string()),
            _ => bail!("{image} is not a tag of {self}"),
        }
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
    fn tags_the_scheme_never_writes_do_not_read_back() {
        for tag in [
            "cache-Deps.Main",
            "cache-deps.MAIN",
            "latest",
            "cache-",
            "cache-deps.",
            "cache-.main",
            "cache-a.b.c--",
            "cache-deps.x--ABCDEF0123456789abcd",
        ] {
            assert_eq!(read_cache_tag(tag), None, "{tag}");
        }
        assert_eq!(read_cache_tag("cache-deps.main"), Some(("deps", Some("main"))));
        assert_eq!(read_cache_tag("cache-deps"), Some(("deps", None)));
    }

    #[test]
    fn ordinary_names_stay_readable() {
        assert_eq!(cache_tag("deps", Some(&TagKey::Branch("main".to_string()))), "cache-deps.main");
        assert_eq!(
            cache_tag("build-env", Some(&TagKey::Branch("release-1.2_x".to_string()))),
            "cache-build-env.release-1.2_x"
        );
        assert_eq!(cache_tag("deps", None), "cache-deps");
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(cache_tag("builder", Some(&TagKey::Commit(sha.to_string()))), format!("cache-builder.{sha}"));
        assert_eq!(sanitize_tag("main"), "main");
    }

    #[test]
    fn other_names_get_a_readable_hint_and_a_hash() {
        let tag = cache_tag("deps", Some(&TagKey::Branch("feature/Login".to_string())));
        let sanitized = sanitize_tag("feature/Login");
        assert!(sanitized.starts_with("feature-login--"), "{sanitized}");
        assert_eq!(sanitized.len(), "feature-login--".len() + HASH_LEN);
        assert_eq!(tag, format!("cache-deps.{sanitized}"), "the same branch reads the same in every stage");
        let stage = cache_tag("a.b", None);
        assert!(stage.starts_with("cache-a-b--") && !stage.contains('.'), "{stage}");
    }

    #[test]
    fn the_collisions_of_the_old_scheme_are_gone() {
        let branch = |stage: &str, branch: &str| cache_tag(stage, Some(&TagKey::Branch(branch.to_string())));
        // A branch literally named like another's sanitised form.
        let slashed = branch("deps", "feature/x");
        let literal = slashed.strip_prefix("cache-deps.").unwrap();
        assert_ne!(branch("deps", literal), slashed);
        // Stage and branch meeting at a `-`.
        assert_ne!(branch("deps", "feature-x"), branch("deps-feature", "x"));
        assert_ne!(branch("deps", "main"), cache_tag("deps-main", None));
        // A branch named like a commit.
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_ne!(branch("deps", sha), cache_tag("deps", Some(&TagKey::Commit(sha.to_string()))));
    }

    #[test]
    fn a_300_character_branch_with_slashes_and_unicode_fits() {
        let branch = format!("{}/ünïcode-{}", "team/feature/".repeat(20), "x".repeat(50));
        assert!(branch.chars().count() >= 300);
        let tag = cache_tag("builder", Some(&TagKey::Branch(branch.clone())));
        assert!(is_valid_tag(&tag), "{tag}");
        assert!(tag.starts_with("cache-builder.team-feature-team"), "{tag}");
        let other = cache_tag("builder", Some(&TagKey::Branch(format!("{branch}2"))));
        assert_ne!(tag, other);
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
        for with_credentials in
            ["user:hunter2pw@127.0.0.1:5000/app", "https://user:hunter2pw@r.example/app", "tok@r.example/app"]
        {
            let error = Repository::parse(with_credentials).unwrap_err().to_string();
            assert!(!error.contains("hunter2pw") && !error.contains("digest"), "{error}");
        }
        assert!(Repository::parse("Upper/Case").is_err());
        assert!(Repository::parse("").is_err());
    }

    /// An owner of a cache tag: stage and key, and the platform when one is named.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owner {
        Unprefixed(String),
        Branch(String, String),
        Commit(String, String),
        OnPlatform(Box<Owner>, String),
    }

    impl Owner {
        fn tag(&self) -> String {
            self.tag_for(None)
        }

        fn tag_for(&self, platform: Option<&str>) -> String {
            match self {
                Owner::Unprefixed(stage) => cache_tag_for(stage, platform, None),
                Owner::Branch(stage, branch) => {
                    cache_tag_for(stage, platform, Some(&TagKey::Branch(branch.to_string())))
                }
                Owner::Commit(stage, commit) => {
                    cache_tag_for(stage, platform, Some(&TagKey::Commit(commit.to_string())))
                }
                Owner::OnPlatform(owner, platform) => owner.tag_for(Some(platform)),
            }
        }
    }

    /// Platforms as `--platform` takes them, and text of other shapes.
    fn platform() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("linux/amd64".to_string()),
            Just("linux-amd64".to_string()),
            Just("linux/arm64".to_string()),
            Just("linux/arm/v7".to_string()),
            "[a-z0-9]{1,8}/[a-z0-9]{1,8}(/[a-z0-9]{1,4})?",
            any::<String>(),
        ]
    }

    /// Names of every shape: arbitrary text, tag-like text, commit ids and hash-like suffixes.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z0-9][a-z0-9_.-]{0,12}",
            "[a-z0-9_./-]{0,12}(--[0-9a-f]{20})?",
            "[0-9a-f]{40}",
            "[0-9a-f]{64}",
            "[a-zA-Z0-9_.-]{100,140}",
        ]
    }

    fn owner() -> impl Strategy<Value = Owner> {
        let plain = prop_oneof![
            name().prop_map(Owner::Unprefixed),
            (name(), name()).prop_map(|(stage, branch)| Owner::Branch(stage, branch)),
            (name(), name()).prop_map(|(stage, commit)| Owner::Commit(stage, commit)),
        ];
        prop_oneof![
            plain.clone(),
            (plain, platform()).prop_map(|(owner, platform)| Owner::OnPlatform(Box::new(owner), platform)),
        ]
    }

    /// Owners made from the pieces of `tag`: whatever an attacker would try to reach it with.
    fn lookalikes(tag: &str) -> Vec<Owner> {
        let body = tag.strip_prefix("cache-").unwrap_or(tag);
        let mut owners = vec![Owner::Unprefixed(body.to_string())];
        for (i, _) in body.char_indices().skip(1) {
            let (stage, rest) = body.split_at(i);
            for key in [&rest[1..], rest] {
                owners.push(Owner::Branch(stage.to_string(), key.to_string()));
                owners.push(Owner::Commit(stage.to_string(), key.to_string()));
            }
        }
        // And with the platform read off the tag, as `os/arch[/variant]`.
        let mut with_platforms = Vec::new();
        for (i, _) in body.match_indices("--") {
            let rest = &body[i + 2..];
            let platform = rest.split('.').next().unwrap_or_default().replace('-', "/");
            for owner in &owners {
                with_platforms.push(Owner::OnPlatform(Box::new(owner.clone()), platform.clone()));
            }
            let stage = body[..i].to_string();
            let key = rest.split_once('.').map(|(_, key)| key.to_string());
            let plain = match key {
                Some(key) => Owner::Branch(stage, key),
                None => Owner::Unprefixed(stage),
            };
            with_platforms.push(Owner::OnPlatform(Box::new(plain), platform));
        }
        owners.extend(with_platforms);
        owners
    }

    proptest! {
        #[test]
        fn every_owner_gets_a_valid_tag(owner in owner()) {
            let tag = owner.tag();
            prop_assert!(is_valid_tag(&tag), "{:?} -> {}", owner, tag);
        }

        #[test]
        fn distinct_owners_never_share_a_tag(a in owner(), b in owner()) {
            prop_assume!(a != b);
            prop_assert_ne!(a.tag(), b.tag(), "{:?} and {:?}", a, b);
        }

        #[test]
        fn no_owner_made_from_another_owners_tag_reaches_it(a in owner()) {
            let tag = a.tag();
            for b in lookalikes(&tag) {
                if b != a {
                    prop_assert_ne!(b.tag(), tag.clone(), "{:?} reaches the tag of {:?}", b, a);
                }
            }
        }

        #[test]
        fn every_tag_the_scheme_writes_reads_back(owner in owner()) {
            let tag = owner.tag();
            let read = read_cache_tag(&tag);
            prop_assert!(read.is_some(), "{:?} -> {} does not read back", owner, tag);
            let unprefixed = match &owner {
                Owner::OnPlatform(inner, _) => matches!(**inner, Owner::Unprefixed(_)),
                other => matches!(other, Owner::Unprefixed(_)),
            };
            prop_assert_eq!(read.unwrap().1.is_none(), unprefixed);
        }

        #[test]
        fn a_tag_with_upper_case_never_reads_back(owner in owner(), at in any::<prop::sample::Index>()) {
            let tag = owner.tag();
            let letters: Vec<usize> = tag.char_indices().filter(|(i, c)| *i >= "cache-".len() && c.is_ascii_lowercase()).map(|(i, _)| i).collect();
            prop_assume!(!letters.is_empty());
            let i = letters[at.index(letters.len())];
            let mut changed = tag.clone();
            changed.replace_range(i..i + 1, &tag[i..i + 1].to_ascii_uppercase());
            prop_assert_eq!(read_cache_tag(&changed), None, "{} read back", changed);
        }

        #[test]
        fn sanitize_is_one_to_one(a in name(), b in name()) {
            prop_assume!(a != b);
            prop_assert!(is_valid_tag(&sanitize_tag(&a)));
            prop_assert_ne!(sanitize_tag(&a), sanitize_tag(&b));
        }
    }
}
