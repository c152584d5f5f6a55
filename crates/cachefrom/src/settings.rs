//! Settings as a user gives them: what the `cachefrom` CLI, an xtask and a release tool all turn
//! into [`PlanOptions`], so the same inputs give the same plan whichever front end reads them.
//! One set of defaults ([`Settings::new`]); chainable setters for the common ones:
//!
//! ```
//! use cachefrom::{Access, Backend, Settings};
//! let settings = Settings::new("127.0.0.1:5000/app", ".")
//!     .backend("local,dir=/var/cache/docker".parse::<Backend>()?)
//!     .tag("127.0.0.1:5000/app:v1")
//!     .build_arg("PROFILE", "release")
//!     .access(Access::ReadOnly);
//! assert_eq!(settings.backend.to_string(), "local,dir=/var/cache/docker");
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::backend::Backend;
use crate::ci::Environment;
use crate::git::{GitFacts, GitOverrides};
use crate::plan::{Access, CacheErrors, Level, PlanOptions};
use crate::refs::Repository;

/// Everything a front end reads from its user. [`Settings::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `REGISTRY/NAME` where images and caches live.
    pub image: String,
    /// The build context.
    pub context: PathBuf,
    /// The Dockerfile (default `CONTEXT/Dockerfile`).
    pub file: Option<PathBuf>,
    /// The stage to build (default: the last).
    pub target: Option<String>,
    /// How the cache travels (default: [`Backend::default`], `registry`).
    pub backend: Backend,
    /// The branch (default: CI variables, then git).
    pub branch: Option<String>,
    /// The default branch (default: CI variables, origin/HEAD, main, master).
    pub default_branch: Option<String>,
    /// The commit (default: git's HEAD).
    pub commit: Option<String>,
    /// Where caches are read from, most specific first (default [`Level::DEFAULT_CHAIN`]).
    pub chain: Vec<Level>,
    /// Whether caches are written (default read-write; a fork's pull request is read-only).
    pub access: Access,
    /// Write caches even for a pull request from a fork (read-only by default).
    pub allow_fork_writes: bool,
    /// Tags of the final image.
    pub tags: Vec<String>,
    /// Push the tags after a successful build.
    pub push: bool,
    /// Cache failures are fatal.
    pub strict_cache: bool,
    /// `--build-arg NAME=VALUE` pairs.
    pub build_args: Vec<(String, String)>,
    /// Options for `docker build`, untouched.
    pub docker_args: Vec<String>,
    /// Scratch directory (tarball).
    pub work_dir: Option<PathBuf>,
    /// The platform to build for (`--platform`); default: the engine's.
    pub platform: Option<String>,
    /// Keep cache mounts across runners (`--cache-mounts on|off`).
    pub cache_mounts: bool,
    /// The most a cache mount may hold to be saved, in bytes.
    pub cache_mount_max_size: u64,
}

/// Reads `--cache-mount-max-size`: a number of bytes with an optional unit, `512M`, `4G`, `100k`.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => anyhow::bail!(
            "`{}` is not a size: write a number of bytes with K, M, G or T, e.g. 4G",
            crate::git::escaped(text)
        ),
    };
    let number: u64 = number.parse().map_err(|_| {
        anyhow::anyhow!(
            "`{}` is not a size: write a number of bytes with K, M, G or T, e.g. 4G",
            crate::git::escaped(text)
        )
    })?;
    number.checked_mul(1u64 << shift).filter(|size| *size > 0).ok_or_else(|| {
        anyhow::anyhow!(
            "`{}` is not a size cachefrom can use: give one above 0 and below 16 EiB",
            crate::git::escaped(text)
        )
    })
}

/// Reads `--cache-mounts`: `on` or `off` (also `true`/`false`, `1`/`0`).
pub fn parse_switch(text: &str, what: &str) -> Result<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => anyhow::bail!("{what} is `on` or `off`, not `{}`", crate::git::escaped(text)),
    }
}

/// The default `--chain` as text ([`Level::DEFAULT_CHAIN`]; a test holds them equal).
pub const DEFAULT_CHAIN: &str = "branch,merge-base,default-branch,parent,unprefixed";
/// The default `--backend` as text ([`Backend::default`]; a test holds them equal).
pub const DEFAULT_BACKEND: &str = "registry";

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $type:ty => $value:expr;)*) => {$(
        $(#[$doc])*
        #[must_use]
        pub fn $name(mut self, $name: $type) -> Settings {
            self.$name = $value;
            self
        }
    )*};
}

impl Settings {
    /// Settings for `image` and `context` with every default.
    pub fn new(image: impl Into<String>, context: impl Into<PathBuf>) -> Settings {
        Settings {
            image: image.into(),
            context: context.into(),
            file: None,
            target: None,
            backend: Backend::default(),
            branch: None,
            default_branch: None,
            commit: None,
            chain: Level::DEFAULT_CHAIN.to_vec(),
            access: Access::default(),
            allow_fork_writes: false,
            tags: Vec::new(),
            push: false,
            strict_cache: false,
            build_args: Vec::new(),
            docker_args: Vec::new(),
            work_dir: None,
            platform: None,
            cache_mounts: true,
            cache_mount_max_size: crate::mounts::DEFAULT_MAX_SIZE,
        }
    }

    setters! {
        /// Sets the backend.
        backend: Backend => backend;
        /// Sets the Dockerfile.
        file: impl Into<PathBuf> => Some(file.into());
        /// Sets the stage to build.
        target: impl Into<String> => Some(target.into());
        /// Sets the branch (instead of the CI's variables and git).
        branch: impl Into<String> => Some(branch.into());
        /// Sets the default branch.
        default_branch: impl Into<String> => Some(default_branch.into());
        /// Sets the commit.
        commit: impl Into<String> => Some(commit.into());
        /// Sets the chain.
        chain: impl Into<Vec<Level>> => chain.into();
        /// Sets whether caches are written.
        access: Access => access;
        /// Pushes the tags after a successful build.
        push: bool => push;
        /// Makes cache failures fatal.
        strict_cache: bool => strict_cache;
        /// Sets the platform to build for.
        platform: impl Into<String> => Some(platform.into());
        /// Sets the scratch directory.
        work_dir: impl Into<PathBuf> => Some(work_dir.into());
        /// Keeps cache mounts across runners, or not.
        cache_mounts: bool => cache_mounts;
        /// Sets the most a cache mount may hold to be saved.
        cache_mount_max_size: u64 => cache_mount_max_size;
    }

    /// Adds a tag of the final image.
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Settings {
        self.tags.push(tag.into());
        self
    }

    /// Adds a build argument.
    #[must_use]
    pub fn build_arg(mut self, name: impl Into<String>, value: impl Into<String>) -> Settings {
        self.build_args.push((name.into(), value.into()));
        self
    }

    /// Adds an option for `docker build`, passed untouched.
    #[must_use]
    pub fn docker_arg(mut self, arg: impl Into<String>) -> Settings {
        self.docker_args.push(arg.into());
        self
    }

    /// Checks the settings, reads git (and the CI's variables in `env`) and returns the plan's options.
    pub fn plan_options(&self, env: &Environment) -> Result<PlanOptions> {
        let repository = Repository::parse(&self.image)?;
        let backend = self.backend.clone();
        if self.chain.is_empty() {
            bail!("the chain is empty; give at least one level, e.g. --chain branch,default-branch");
        }
        let chain = self.chain.clone();
        // A path that is not UTF-8 could not be shown in the script as it runs: refused.
        let backend_dir = match &backend {
            crate::backend::Backend::Local { dir } | crate::backend::Backend::Tarball { dir } => Some(dir.as_path()),
            _ => None,
        };
        for (what, path) in [
            ("the build context", Some(self.context.as_path())),
            ("the Dockerfile (-f)", self.file.as_deref()),
            ("the work directory (--work-dir)", self.work_dir.as_deref()),
            ("the cache directory (--cache-dir, dir=)", backend_dir),
        ] {
            if let Some(path) = path.filter(|path| path.to_str().is_none()) {
                bail!(
                    "{what} {} is not a UTF-8 path; use one that is",
                    crate::secrets::quoted(&path.to_string_lossy())
                );
            }
        }
        if !self.context.is_dir() {
            bail!("the build context {} is not a directory", self.context.display());
        }
        let overrides = GitOverrides {
            branch: self.branch.clone(),
            default_branch: self.default_branch.clone(),
            commit: self.commit.clone(),
        };
        let git = GitFacts::discover(&self.context, &overrides, env)?;
        let mut options = PlanOptions::new(&self.context, repository, git);
        options.dockerfile = self.file.clone();
        options.target = self.target.clone();
        options.backend = backend;
        options.chain = chain;
        options.access = self.access;
        if self.access == Access::ReadWrite {
            if let Some(why) = crate::ci::fork_pull_request(env) {
                if self.allow_fork_writes {
                    options.notes.push(format!("writes caches although {why}: --allow-fork-writes"));
                } else {
                    options.access = Access::ReadOnly;
                    options.notes.push(format!(
                        "read-only: {why}, and a fork's branch names could overwrite this repository's caches; --allow-fork-writes writes anyway"
                    ));
                }
            }
        }
        options.cache_errors = if self.strict_cache { CacheErrors::Fail } else { CacheErrors::Warn };
        for tag in &self.tags {
            crate::refs::check_no_credentials(tag, "a --tag image")?;
        }
        options.tags = self.tags.clone();
        options.push_tags = self.push;
        options.build_args = self.build_args.iter().cloned().collect::<BTreeMap<_, _>>();
        options.docker_args = self.docker_args.clone();
        if let Some(platform) = &self.platform {
            for one in platform.split(',') {
                crate::dockerfile::Platform::parse(one)?;
            }
            if crate::plan::DockerArgs::read(&self.docker_args)?.platform.is_some() {
                bail!("--platform is given twice, to cachefrom and after `--`; give it once");
            }
            options.platform = Some(platform.clone());
        }
        options.cache_mounts = self.cache_mounts;
        options.cache_mount_max_size = self.cache_mount_max_size;
        if let Some(work_dir) = &self.work_dir {
            options.work_dir = work_dir.clone();
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_are_not_utf8_are_refused_with_one_line() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"cd\xff\n::add-mask::x"));
        std::fs::create_dir_all(&odd).unwrap();
        for settings in [
            Settings::new("127.0.0.1:5000/app", &odd),
            Settings { work_dir: Some(odd.clone()), ..Settings::new("127.0.0.1:5000/app", dir.path()) },
            Settings { file: Some(odd.join("Dockerfile")), ..Settings::new("127.0.0.1:5000/app", dir.path()) },
            Settings::new("127.0.0.1:5000/app", dir.path()).backend(Backend::Local { dir: odd.clone() }),
        ] {
            let error = settings.plan_options(&crate::ci::Environment::default()).unwrap_err().to_string();
            assert!(error.contains("is not a UTF-8 path"), "{error}");
            assert!(!error.contains('\n'), "{error}");
        }
    }

    #[test]
    fn the_text_defaults_are_the_typed_ones() {
        assert_eq!(DEFAULT_BACKEND.parse::<Backend>().unwrap(), Backend::default());
        assert_eq!(Level::parse_chain(DEFAULT_CHAIN).unwrap(), Level::DEFAULT_CHAIN.to_vec());
        assert_eq!(crate::plan::chain_text(&Level::DEFAULT_CHAIN), DEFAULT_CHAIN);
        let settings = Settings::new("127.0.0.1:5000/app", ".");
        assert_eq!(
            (settings.backend, settings.chain, settings.access),
            (Backend::default(), Level::DEFAULT_CHAIN.to_vec(), Access::ReadWrite)
        );
    }

    #[test]
    fn settings_give_the_plan_options_they_say() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::new("127.0.0.1:5000/app", dir.path())
            .backend(Backend::Inline)
            .branch("feature")
            .default_branch("main")
            .chain([Level::Branch, Level::DefaultBranch])
            .access(Access::ReadOnly)
            .tag("127.0.0.1:5000/app:v1")
            .push(true)
            .build_arg("PROFILE", "release");
        let options = settings.plan_options(&Environment::default()).unwrap();
        assert_eq!(options.backend, Backend::Inline);
        assert_eq!(options.chain, vec![Level::Branch, Level::DefaultBranch]);
        assert_eq!(options.access, Access::ReadOnly);
        assert_eq!(options.tags, vec!["127.0.0.1:5000/app:v1".to_string()]);
        assert!(options.push_tags);
        assert_eq!(options.build_args.get("PROFILE").map(String::as_str), Some("release"));
        assert_eq!(options.git.branch.as_deref(), Some("feature"));
        let empty = Settings::new("127.0.0.1:5000/app", dir.path()).chain(Vec::new());
        assert!(empty.plan_options(&Environment::default()).unwrap_err().to_string().contains("chain is empty"));
    }

    #[test]
    fn access_and_levels_read_and_write_text() {
        for access in [Access::ReadWrite, Access::ReadOnly] {
            assert_eq!(access.to_string().parse::<Access>().unwrap(), access);
        }
        assert!("rw".parse::<Access>().is_err());
        for level in
            [Level::Branch, Level::Commit, Level::MergeBase, Level::DefaultBranch, Level::Parent, Level::Unprefixed]
        {
            assert_eq!(level.to_string().parse::<Level>().unwrap(), level);
        }
        assert!("branch,parent".parse::<Level>().is_err());
    }
}
