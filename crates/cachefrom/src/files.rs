//! Reading files that come from outside (cache directories, `.dockerignore`, the Dockerfile, a
//! branches list) with a bound: opened as regular files only, never following a link at the last
//! step, never blocking on a FIFO or a device, and read up to a cap, past which the answer is an
//! error that says so rather than gigabytes of memory.

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{bail, Context as _, Result};

/// The most a record file (a stage's inputs, a cache's index) is read for.
pub const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;
/// The most a Dockerfile or a `.dockerignore` is read for.
pub const MAX_TEXT_BYTES: u64 = 16 * 1024 * 1024;
/// The most a list given by the user (branches) is read for.
pub const MAX_LIST_BYTES: u64 = 16 * 1024 * 1024;

/// The bytes of `path`, a regular file of at most `max` bytes: a FIFO, a device, a directory or a
/// link at the last step is refused, and so is a larger file, before anything is read.
pub fn read_bytes(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let metadata = file.metadata().with_context(|| format!("reading {}", path.display()))?;
    if !metadata.is_file() {
        bail!("{} is not a regular file; not read", path.display());
    }
    if metadata.len() > max {
        bail!("{} has {} bytes, more than the {} read here; not read", path.display(), metadata.len(), max);
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    // The file may grow while it is read: the cap holds all the same.
    file.take(max + 1).read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{} grew past the {} bytes read here while it was read; not read", path.display(), max);
    }
    Ok(bytes)
}

/// [`read_bytes`] as UTF-8 text.
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_bytes(path, max)?).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// `bytes` random bytes from the kernel, as hex (a salt, a token); the time and the process id
/// where the kernel does not answer.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    let read =
        std::fs::File::open("/dev/urandom").and_then(|mut file| std::io::Read::read_exact(&mut file, &mut buffer));
    if read.is_err() {
        let seed = format!(
            "{:?}{}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default(),
            std::process::id()
        );
        let digest = <sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes());
        buffer = digest.iter().copied().cycle().take(bytes).collect();
    }
    buffer.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The first 12 hex digits of the SHA-256 of `bytes`: a short name that tells contents apart.
pub fn short_digest(bytes: &[u8]) -> String {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(bytes);
    digest.iter().take(6).map(|byte| format!("{byte:02x}")).collect()
}

/// `O_NOFOLLOW | O_NONBLOCK`: a link at the last step fails to open, a FIFO opens without
/// waiting for a writer (and is then refused as not a regular file).
fn libc_flags() -> i32 {
    libc::O_NONBLOCK | libc::O_NOFOLLOW
}

/// `PATH.partial.`: the start of where a cache is written before it is renamed into place; the
/// writer adds its process id ([`partial_path_of`]), so that concurrent writers never share one.
pub fn partial_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial.");
    std::path::PathBuf::from(partial)
}

/// `PATH.partial.PID`: this process's scratch name for `path`.
pub fn partial_path_of(path: &std::path::Path) -> std::path::PathBuf {
    let mut partial = partial_path(path).into_os_string();
    partial.push(std::process::id().to_string());
    std::path::PathBuf::from(partial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_links_and_large_files_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let started = std::time::Instant::now();
        let error = read_bytes(&fifo, 1024).unwrap_err().to_string();
        assert!(error.contains("not a regular file"), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "a FIFO must not block");

        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_bytes(&link, 1024).is_err(), "a link is not followed");
        assert!(read_bytes(Path::new("/dev/zero"), 1024).unwrap_err().to_string().contains("not a regular file"));

        let sparse = dir.path().join("sparse");
        let file = std::fs::File::create(&sparse).unwrap();
        file.set_len(2 << 30).unwrap();
        let started = std::time::Instant::now();
        let error = read_bytes(&sparse, MAX_RECORD_BYTES).unwrap_err().to_string();
        assert!(error.contains("more than"), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "a large file is refused before it is read");

        std::fs::write(dir.path().join("ok"), "text").unwrap();
        assert_eq!(read_text(&dir.path().join("ok"), 4).unwrap(), "text");
        assert!(read_text(&dir.path().join("ok"), 3).is_err());
    }
}
