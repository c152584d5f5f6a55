//! Carrying out a [`CacheWrite`]: the same value the script renders with [`CacheWrite::shell`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::docker::{run_program, Docker};
use crate::plan::{partial_path_of, CacheWrite};
use crate::refs::Repository;
use crate::registry::RegistryClient;

/// Carries out `write`. `repository` is where `CopyTag` copies within; non-empty `annotations`
/// are set on the copied manifest, the source tag included (the record of the build).
pub fn perform(
    write: &CacheWrite,
    docker: &Docker,
    registry: &RegistryClient,
    repository: &Repository,
    annotations: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<()> {
    match write {
        CacheWrite::CopyTag { from, to } => {
            let from_tag = repository.tag_of(from)?;
            let mut to_tags = to.iter().map(|image| repository.tag_of(image)).collect::<Result<Vec<_>>>()?;
            let copied = if annotations.is_empty() {
                registry.copy_tag(repository, &from_tag, &to_tags)
            } else {
                to_tags.push(from_tag.clone());
                registry
                    .manifest(repository, &from_tag)
                    .and_then(|manifest| manifest.with_annotations(annotations))
                    .and_then(|manifest| registry.put_manifest(repository, &manifest, &to_tags))
            };
            copied.with_context(|| format!("copying the cache {from} to {} more tag(s)", to.len()))
        }
        CacheWrite::PushCacheImage { image } => {
            let args = vec!["push".to_string(), "--quiet".to_string(), image.clone()];
            docker.run_checked(&format!("pushing cache image {image}"), &args, timeout).map(|_| ())
        }
        CacheWrite::CopyDir { from, to } => copy_dir(from, to, timeout),
        CacheWrite::Pack { from, to } => pack(from, to, timeout),
    }
}

/// Checks that BuildKit exported a cache into `dir`.
fn exported(dir: &Path) -> Result<()> {
    if !dir.join("index.json").is_file() {
        bail!("no cache was exported at {}", dir.display());
    }
    Ok(())
}

/// Packs the exported cache in `from` into `file`, through a `.partial` file renamed at the end,
/// so a reader never sees half a tar; nothing partial stays behind when it fails.
fn pack(from: &Path, file: &Path, timeout: Duration) -> Result<()> {
    exported(from)?;
    let parent = file.parent().context("a tar file has a directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let partial = partial_path_of(file);
    let args = vec![
        "-cf".to_string(),
        partial.display().to_string(),
        "-C".to_string(),
        from.display().to_string(),
        ".".to_string(),
    ];
    let packed =
        run_program("tar", &args, &format!("packing the cache into {}", file.display()), timeout).and_then(|_| {
            std::fs::rename(&partial, file)
                .with_context(|| format!("moving {} to {}", partial.display(), file.display()))
        });
    if packed.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    packed
}

/// Copies the exported cache in `from` to `dir`, through `DIR.partial.PID` put in place at the
/// end: swapped with the old cache in one step where there is one (a reader sees the old cache
/// or the new, never none), renamed otherwise. Nothing partial stays behind when it fails.
fn copy_dir(from: &Path, dir: &Path, timeout: Duration) -> Result<()> {
    exported(from)?;
    let partial = partial_path_of(dir);
    let copied = copy_into(from, &partial, timeout).and_then(|()| {
        if dir.exists() && exchange(&partial, dir).is_ok() {
            // `partial` now holds the old cache.
            return remove_dir(&partial);
        }
        remove_dir(dir)?;
        std::fs::rename(&partial, dir).with_context(|| format!("moving {} to {}", partial.display(), dir.display()))
    });
    if copied.is_err() {
        let _ = remove_dir(&partial);
    }
    copied
}

/// Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |path: &Path| std::ffi::CString::new(path.as_os_str().as_bytes()).context("a path with a NUL byte");
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths, relative to the current directory.
    let result =
        unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if result != 0 {
        bail!("swapping in the new cache: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn copy_into(from: &Path, partial: &Path, timeout: Duration) -> Result<()> {
    empty_dir(partial)?;
    link_or_copy(&from.join("."), partial, timeout)
}

/// `cp -al FROM DIR`, else `cp -a FROM DIR`: blobs are content-addressed and never change, so hard
/// links (on the same file system) cost nothing; a copy where links cannot be made.
pub(crate) fn link_or_copy(from: &Path, dir: &Path, timeout: Duration) -> Result<()> {
    let purpose = format!("copying {} into {}", from.display(), dir.display());
    let args = |flags: &str| vec![flags.to_string(), from.display().to_string(), dir.display().to_string()];
    if run_program("cp", &args("-alf"), &purpose, timeout).is_ok() {
        return Ok(());
    }
    run_program("cp", &args("-af"), &purpose, timeout).map(|_| ())
}

/// Removes `dir` and what it holds, if it exists.
/// Copies the file `from` to `to` through `TO.partial.PID`, so that `to` is whole or not there.
pub(crate) fn copy_file_atomically(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let partial = crate::plan::partial_path_of(to);
    let copied = std::fs::copy(from, &partial).and_then(|_| std::fs::rename(&partial, to));
    if copied.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    copied.with_context(|| format!("writing {}", to.display()))
}

pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Makes `dir` an empty directory.
pub(crate) fn empty_dir(dir: &Path) -> Result<()> {
    remove_dir(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_taken_only_from_the_repository() {
        let repository = Repository::parse("127.0.0.1:5000/team/app").unwrap();
        assert_eq!(repository.tag_of("127.0.0.1:5000/team/app:cache-deps.main").unwrap(), "cache-deps.main");
        assert!(repository.tag_of("127.0.0.1:5000/team/other:cache").is_err());
        assert!(repository.tag_of("127.0.0.1:5000/team/app:").is_err());
    }

    #[test]
    fn a_failed_copy_leaves_nothing_partial() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("export");
        std::fs::create_dir_all(&from).unwrap();
        // No index.json: not an exported cache.
        let to = dir.path().join("cache");
        assert!(copy_dir(&from, &to, Duration::from_secs(10)).is_err());
        assert!(!partial_path_of(&to).exists() && !to.exists());
        std::fs::write(from.join("index.json"), "{}").unwrap();
        std::fs::create_dir_all(from.join("blobs/sha256")).unwrap();
        std::fs::write(from.join("blobs/sha256/abc"), "layer").unwrap();
        copy_dir(&from, &to, Duration::from_secs(10)).unwrap();
        assert_eq!(std::fs::read_to_string(to.join("blobs/sha256/abc")).unwrap(), "layer");
        assert!(!partial_path_of(&to).exists());
        // A second write swaps the new cache in and leaves nothing behind.
        std::fs::write(from.join("blobs/sha256/abc"), "layer2").unwrap();
        std::fs::remove_file(from.join("blobs/sha256/abc")).unwrap();
        std::fs::write(from.join("blobs/sha256/def"), "layer2").unwrap();
        copy_dir(&from, &to, Duration::from_secs(10)).unwrap();
        assert!(to.join("blobs/sha256/def").is_file() && !to.join("blobs/sha256/abc").exists());
        assert!(!partial_path_of(&to).exists());
        let file = dir.path().join("tars/cache.tar");
        pack(&from, &file, Duration::from_secs(10)).unwrap();
        assert!(file.is_file() && !partial_path_of(&file).exists());
    }
}
