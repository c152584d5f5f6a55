//! Cache mounts kept across runners: every `RUN --mount=type=cache` of the stages built is
//! restored before the build and saved after it (trap-style: after a failed or cancelled build
//! too), through the same chain of levels as the layer caches.
//!
//! BuildKit keeps a cache mount in its own state, keyed on the mount's `id` (its target when it
//! has none) and, when the mount sets `uid`, `gid` or `mode`, on the directory those make; no
//! exporter carries it. So cachefrom reaches it the way a Dockerfile does: a small build whose
//! `RUN` mounts the same cache, with the same options, and unpacks a saved archive into it
//! (restore), or packs it into a tar the build outputs (save). The tar keeps owners, modes and
//! modification times (cargo's fingerprints are mtimes) and is sorted by name; cachefrom
//! compresses it with gzip ([`compress_file`]: fixed chunks compressed in parallel, one gzip
//! member each, without a timestamp), so the same contents give the same bytes: its sha256 names
//! it, and contents already stored are not uploaded again. The restore build unpacks it with the
//! image's `tar`.
//!
//! Where it is stored: in the registry, an OCI artifact beside the layer caches, under the tag
//! [`mount_tag`] gives (one-to-one with every other tag, so `prune` handles them); in the local
//! and tarball directories, a file `<tag>.tar.gz` beside the caches, and its record beside it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The artifact type of a saved cache mount.
pub const ARTIFACT_TYPE: &str = "application/vnd.dev.cachefrom.cache-mount.v1";
/// The media type of its one layer.
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The default cap on one mount's contents (before compression).
pub const DEFAULT_MAX_SIZE: u64 = 4 << 30;
/// The manifest annotations of a saved mount.
pub const ANNOTATION_ID: &str = "dev.cachefrom.mount.id";
/// The step's seconds on the last run that started with an empty mount.
pub const ANNOTATION_COLD_SECONDS: &str = "dev.cachefrom.mount.cold-seconds";
/// The contents' size before compression, in bytes.
pub const ANNOTATION_BYTES: &str = "dev.cachefrom.mount.bytes";

/// One `--mount=type=cache` of a `RUN`, as BuildKit keys and creates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMount {
    /// What BuildKit keys it on: `id`, else the target as written, cleaned.
    pub id: String,
    /// Where the `RUN` mounts it.
    pub target: String,
    /// `shared` (the default), `private` or `locked`.
    pub sharing: String,
    /// `uid`, `gid` and `mode` as written (they shape the directory BuildKit keys it on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// See `uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
    /// See `uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The `--mount` value as written.
    pub written: String,
    /// Why it cannot be kept (a variable in its options, `from=`, `source=`), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_kept: Option<String>,
}

impl CacheMount {
    /// The cache mount a `--mount` value describes, if it is one (`type=cache`).
    pub fn parse(value: &str) -> Option<CacheMount> {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        for field in value.split(',').map(str::trim).filter(|field| !field.is_empty()) {
            let (key, value) = field.split_once('=').unwrap_or((field, "true"));
            fields.insert(key.trim().to_ascii_lowercase(), value.trim().trim_matches('"').to_string());
        }
        if fields.get("type").map(String::as_str) != Some("cache") {
            return None;
        }
        let target =
            ["target", "dst", "destination"].iter().find_map(|key| fields.get(*key)).cloned().unwrap_or_default();
        let id = fields.get("id").cloned().filter(|id| !id.is_empty()).unwrap_or_else(|| clean_path(&target));
        // What reaches the generated Dockerfile of the restore and save builds is plain.
        let plain = |text: &str| text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'));
        let options_plain =
            ["id", "sharing", "uid", "gid", "mode"].iter().all(|key| fields.get(*key).is_none_or(|v| plain(v)));
        let not_kept = if value.contains('$') {
            Some("its options use a variable".to_string())
        } else if !options_plain || !plain(&id) {
            Some("its options hold characters other than letters, digits, `_`, `.`, `/` and `-`".to_string())
        } else if fields.contains_key("from") {
            Some("it starts from another stage or image (from=)".to_string())
        } else if fields.contains_key("source") || fields.contains_key("src") {
            Some("it mounts a part of the cache (source=)".to_string())
        } else if target.is_empty() {
            Some("it has no target".to_string())
        } else if fields.keys().any(|key| !KNOWN_FIELDS.contains(&key.as_str())) {
            Some("it has an option cachefrom does not know".to_string())
        } else {
            None
        };
        let number = |key: &str| fields.get(key).cloned();
        Some(CacheMount {
            id,
            target,
            sharing: fields.get("sharing").cloned().unwrap_or_else(|| "shared".to_string()),
            uid: number("uid"),
            gid: number("gid"),
            mode: number("mode"),
            written: value.to_string(),
            not_kept,
        })
    }

    /// What names this mount's contents across runs: its id and the options that shape the
    /// directory it is keyed on, and the platform the build is for.
    pub fn identity(&self, platform: Option<&str>) -> String {
        format!(
            "id={}\nuid={}\ngid={}\nmode={}\nplatform={}",
            self.id,
            self.uid.as_deref().unwrap_or(""),
            self.gid.as_deref().unwrap_or(""),
            self.mode.as_deref().unwrap_or(""),
            platform.unwrap_or("")
        )
    }

    /// The `--mount` value that mounts the same cache at `at`.
    pub fn mount_at(&self, at: &str) -> String {
        let mut value = format!("type=cache,id={},target={at},sharing={}", self.id, self.sharing);
        for (key, field) in [("uid", &self.uid), ("gid", &self.gid), ("mode", &self.mode)] {
            if let Some(field) = field {
                value.push_str(&format!(",{key}={field}"));
            }
        }
        value
    }
}

const KNOWN_FIELDS: [&str; 12] =
    ["type", "id", "target", "dst", "destination", "sharing", "uid", "gid", "mode", "readonly", "ro", "required"];

/// `path.Clean` of Go, as BuildKit cleans a target into an id.
fn clean_path(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|last| *last != "..") => {
                parts.pop();
            }
            ".." if rooted => {}
            part => parts.push(part),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// The tag of a saved mount: `cachemount-<hint>--<hash of its identity>`, then `.<key part>` as
/// a layer cache's tag has it. No layer cache tag starts with `cachemount-` (theirs start with
/// `cache-` and a stage part that never holds `--` unhashed), and the hash covers the identity.
pub fn mount_tag(identity: &str, id: &str, key: Option<&crate::refs::TagKey>) -> String {
    let cache = crate::refs::cache_tag(&format!("{MOUNT_STAGE_MARK}{}", short_hash(identity)), key);
    let hint: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let hint: String = hint.chars().take(HINT_ROOM).collect::<String>().trim_end_matches('-').to_string();
    let hint = if hint.is_empty() { "_".to_string() } else { hint };
    // `cache-m<hash>[.<key>]` → `cachemount-<hint>--<hash>[.<key>]`
    let rest = cache.strip_prefix(&format!("cache-{MOUNT_STAGE_MARK}")).unwrap_or(&cache);
    let (hash, key) = match rest.split_once('.') {
        Some((hash, key)) => (hash, Some(key)),
        None => (rest, None),
    };
    match key {
        Some(key) => format!("cachemount-{hint}--{hash}.{key}"),
        None => format!("cachemount-{hint}--{hash}"),
    }
}

const MOUNT_STAGE_MARK: &str = "m";
/// The longest hint: `cachemount-<hint>--<20 hex>` is as long as the longest `cache-<stage>`, so
/// the key part has the same room.
const HINT_ROOM: usize = 40 + "cache-".len() - "cachemount-".len() - 2 - 20;

fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(format!("cache-mount:{text}").as_bytes());
    digest.iter().take(10).map(|byte| format!("{byte:02x}")).collect()
}

/// The parts of a tag [`mount_tag`] writes, read back: the mount part and the key part.
pub fn read_mount_tag(tag: &str) -> Option<(&str, Option<&str>)> {
    let body = tag.strip_prefix("cachemount-")?;
    let (mount, key) = match body.split_once('.') {
        Some((mount, key)) => (mount, Some(key)),
        None => (body, None),
    };
    let (hint, hash) = mount.rsplit_once("--")?;
    let hint_ok = hint == "_"
        || (!hint.is_empty()
            && hint.len() <= HINT_ROOM
            && hint.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !hint.starts_with('-')
            && !hint.ends_with('-')
            && !hint.contains("--"));
    let hash_ok = hash.len() == 20 && hash.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
    // The key part reads back as a layer cache's does.
    let key_ok = key.is_none_or(|key| crate::refs::read_cache_tag(&format!("cache-x.{key}")).is_some());
    (hint_ok && hash_ok && key_ok && crate::refs::is_valid_tag(tag)).then_some((mount, key))
}

/// The bytes of the tar each gzip member holds: large enough that the members cost nothing in
/// size, small enough to keep every core busy on a mount of tens of megabytes.
const CHUNK: usize = 4 << 20;

/// The gzip level: with zlib-rs, smaller than `gzip -1` and about 1.5 times as fast on one core
/// (example-project's `target/`: 15.2 MB where `gzip -1` made 16.0 MB).
const LEVEL: u32 = 3;

/// Compresses the tar at `from` into `to` as gzip: fixed chunks of it compressed at once on all
/// cores ([`LEVEL`]), one member each, in order, with no name and no timestamp (the same tar
/// gives the same bytes, whatever the number of cores). `gzip -d` and `tar -xz` read the members
/// as one stream. Written through a partial file renamed into place.
pub fn compress_file(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::{Read as _, Write as _};
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 8);
    let partial = crate::files::partial_path_of(to);
    let result = (|| -> anyhow::Result<()> {
        let mut input = std::fs::File::open(from)?;
        let mut output = std::io::BufWriter::new(std::fs::File::create(&partial)?);
        let mut first = true;
        loop {
            // Up to one chunk a core read, then compressed at once, then written in order.
            let mut chunks = Vec::with_capacity(threads);
            for _ in 0..threads {
                let mut chunk = Vec::with_capacity(CHUNK);
                (&mut input).take(CHUNK as u64).read_to_end(&mut chunk)?;
                // An empty file still gets one (empty) member: gzip reads no stream at all as an error.
                if chunk.is_empty() && !(chunks.is_empty() && first) {
                    break;
                }
                chunks.push(chunk);
            }
            first = false;
            if chunks.is_empty() {
                break;
            }
            let last = chunks.len() < threads || chunks.last().is_some_and(|chunk| chunk.len() < CHUNK);
            let members: Vec<std::io::Result<Vec<u8>>> = std::thread::scope(|scope| {
                let jobs: Vec<_> = chunks
                    .iter()
                    .map(|chunk| {
                        scope.spawn(move || {
                            let mut encoder = flate2::GzBuilder::new()
                                .mtime(0)
                                .write(Vec::with_capacity(chunk.len() / 2), flate2::Compression::new(LEVEL));
                            encoder.write_all(chunk)?;
                            encoder.finish()
                        })
                    })
                    .collect();
                jobs.into_iter()
                    .map(|job| job.join().unwrap_or_else(|_| Err(std::io::Error::other("compressing panicked"))))
                    .collect()
            });
            for member in members {
                output.write_all(&member?)?;
            }
            if last {
                break;
            }
        }
        output.flush()?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&partial, to).with_context(|| format!("renaming into {}", to.display())),
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            Err(error.context(format!("compressing {}", from.display())))
        }
    }
}

/// Checks that a fetched archive starts as gzip does, before a restore build unpacks it (a file
/// that is not one then costs its own mount only, not every mount of the restore build). Only
/// its first bytes are read: unpacking it here too would take the cores the image pull beside
/// the restore needs; a gzip archive cut short fails the restore build, with one warning.
pub fn check_archive(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut magic = [0u8; 3];
    let read = std::fs::File::open(path)?.read(&mut magic)?;
    anyhow::ensure!(read == 3 && magic == [0x1f, 0x8b, 8], "it is not a gzip archive");
    Ok(())
}

/// The sha256 of a file, as `sha256:<hex>`, read in blocks.
pub fn file_digest(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("sha256:{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refs::TagKey;
    use proptest::prelude::*;

    #[test]
    fn a_cache_mount_is_keyed_as_buildkit_keys_it() {
        let mount = CacheMount::parse("type=cache,target=/usr/local/cargo/registry/").unwrap();
        assert_eq!(mount.id, "/usr/local/cargo/registry");
        assert_eq!(mount.sharing, "shared");
        let mount = CacheMount::parse("type=cache,id=cargo,target=/x,sharing=locked,uid=1000,mode=0700").unwrap();
        assert_eq!((mount.id.as_str(), mount.sharing.as_str()), ("cargo", "locked"));
        assert_eq!(mount.mount_at("/m"), "type=cache,id=cargo,target=/m,sharing=locked,uid=1000,mode=0700");
        assert!(CacheMount::parse("type=bind,target=/x").is_none());
        assert!(CacheMount::parse("target=/x").is_none(), "bind is the default type");
        assert!(CacheMount::parse("type=cache,target=/x,from=builder").unwrap().not_kept.is_some());
        assert!(CacheMount::parse("type=cache,target=$HOME/.cache").unwrap().not_kept.is_some());
        assert_eq!(clean_path("a/../b/./c/"), "b/c");
        assert_eq!(clean_path("/../x"), "/x");
    }

    #[test]
    fn a_mounts_tag_reads_back_and_is_no_layer_caches() {
        let tag = mount_tag("id=/root/.cache", "/root/.cache", Some(&TagKey::Branch("main".into())));
        assert!(tag.starts_with("cachemount-root-cache--"), "{tag}");
        assert!(tag.ends_with(".main"), "{tag}");
        assert!(read_mount_tag(&tag).is_some());
        assert!(crate::refs::read_cache_tag(&tag).is_none());
    }

    proptest! {
        #[test]
        fn any_mount_value_is_kept_plain_or_not_at_all(value in any::<String>(), id in any::<String>()) {
            let written = format!("type=cache,target=/x,id={id},{value}");
            if let Some(mount) = CacheMount::parse(&written) {
                if mount.not_kept.is_none() {
                    let line = mount.mount_at("/cachefrom/m0");
                    prop_assert!(
                        line.chars().all(|c| c.is_ascii_alphanumeric() || "_./-=,".contains(c)),
                        "{}", line
                    );
                }
            }
        }

        #[test]
        fn every_mount_tag_is_valid_reads_back_and_differs_by_identity(
            id in any::<String>(),
            other in any::<String>(),
            branch in "[a-zA-Z0-9/._-]{1,90}",
        ) {
            let key = TagKey::Branch(branch);
            let tag = mount_tag(&format!("id={id}"), &id, Some(&key));
            prop_assert!(crate::refs::is_valid_tag(&tag), "{}", tag);
            prop_assert!(read_mount_tag(&tag).is_some(), "{}", tag);
            prop_assert!(crate::refs::read_cache_tag(&tag).is_none(), "{}", tag);
            if id != other {
                prop_assert_ne!(tag, mount_tag(&format!("id={other}"), &other, Some(&key)));
            }
        }
    }

    /// A tar-like file of `n` bytes: text that compresses, and stretches that do not.
    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| if i % 3000 < 2000 { b"target/release/deps "[i % 20] } else { (i * 7919 % 251) as u8 }).collect()
    }

    #[test]
    fn a_tar_is_compressed_in_members_that_gzip_reads_as_one_and_the_same_tar_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 17] {
            let (tar, packed, again) = (dir.path().join("m.tar"), dir.path().join("a.gz"), dir.path().join("b.gz"));
            std::fs::write(&tar, sample(size)).unwrap();
            compress_file(&tar, &packed).unwrap();
            compress_file(&tar, &again).unwrap();
            let bytes = std::fs::read(&packed).unwrap();
            assert_eq!(bytes, std::fs::read(&again).unwrap(), "the same tar, the same bytes ({size})");
            // What the restore build's `tar -xz` runs: the system's gzip, every member as one stream.
            let unpacked = std::process::Command::new("gzip").args(["-dc"]).arg(&packed).output().unwrap();
            assert!(unpacked.status.success(), "{}", String::from_utf8_lossy(&unpacked.stderr));
            assert_eq!(unpacked.stdout, sample(size), "round trip ({size})");
            if size > CHUNK {
                assert!(bytes.len() < size / 2, "compressed: {} of {size}", bytes.len());
            }
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "no partial file left");
        }
    }

    #[test]
    fn a_tar_that_cannot_be_read_is_an_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = compress_file(&dir.path().join("missing.tar"), &dir.path().join("m.tar.gz")).unwrap_err();
        assert!(format!("{error:#}").contains("compressing"), "{error:#}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_fetched_archive_is_checked_to_be_gzip_before_a_restore_unpacks_it() {
        let dir = tempfile::tempdir().unwrap();
        let (tar, packed) = (dir.path().join("m.tar"), dir.path().join("m.tar.gz"));
        std::fs::write(&tar, sample(CHUNK + 5)).unwrap();
        compress_file(&tar, &packed).unwrap();
        check_archive(&packed).unwrap();
        for bytes in [&b"not an archive"[..], &[0x1f, 0x8b], &[]] {
            std::fs::write(&packed, bytes).unwrap();
            let error = check_archive(&packed).unwrap_err();
            assert!(format!("{error:#}").contains("not a gzip archive"), "{error:#}");
        }
    }

    proptest! {
        /// Whatever bytes a registry or a cache directory hands back: an answer, never a panic.
        #[test]
        fn any_bytes_are_checked_without_a_panic(
            head in prop::sample::select(vec![vec![], vec![0x1fu8, 0x8b, 8, 0]]),
            tail in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("in");
            std::fs::write(&file, [head, tail].concat()).unwrap();
            let _ = check_archive(&file);
        }
    }
}
