//! How the cache travels: one enum, each variant mapped to BuildKit's `--cache-from` and
//! `--cache-to` values here ([`Backend::cache_from_arg`], [`Backend::cache_to_arg`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::refs::Repository;

/// A cache backend. Written on the command line as BuildKit writes cache options:
/// `TYPE[,KEY=VALUE...]`, e.g. `registry`, `local,dir=/cache`, `s3,bucket=b,region=eu-west-1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Backend {
    /// Per-stage images carrying inline cache metadata (`--cache-to type=inline`), pushed as tags.
    /// Works with any registry and with the classic builder.
    Inline,
    /// BuildKit's registry cache (`type=registry`, `mode=max`): every layer of every stage, stored
    /// as a cache manifest beside the image. `options` go to `--cache-to` as they are
    /// (default: `image-manifest=true,oci-mediatypes=true`, which ECR and others need).
    Registry {
        /// Extra `KEY=VALUE` options for `--cache-to` (secret ones hidden in JSON).
        #[serde(serialize_with = "serialize_options")]
        options: BTreeMap<String, String>,
    },
    /// BuildKit's local cache (`type=local`, `mode=max`) in a shared directory: one folder a tag.
    Local {
        /// The shared directory.
        dir: PathBuf,
    },
    /// One tar file a stage and level in a shared directory, for CI file caches: BuildKit's local
    /// cache (`mode=max`) packed with `tar`. BuildKit does not read cache from images loaded with
    /// `docker load` (moby#39003), so the tar carries the cache itself.
    Tarball {
        /// The shared directory holding the `.tar` files.
        dir: PathBuf,
    },
    /// BuildKit's S3 cache (`type=s3`); `options` (bucket, region, prefix, …) pass through.
    /// Credentials given as options (`access_key_id`, `secret_access_key`, `session_token`) reach
    /// buildx in `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, never on its
    /// command line.
    S3 {
        /// `KEY=VALUE` options for `type=s3` (secret ones hidden in JSON).
        #[serde(serialize_with = "serialize_options")]
        options: BTreeMap<String, String>,
        /// Credentials, passed in the environment; never serialized.
        #[serde(skip)]
        credentials: BTreeMap<String, String>,
    },
    /// BuildKit's GitHub Actions cache (`type=gha`); `options` (url, scope, …) pass through.
    /// A `token` option reaches buildx in `ACTIONS_RUNTIME_TOKEN`, never on its command line.
    Gha {
        /// `KEY=VALUE` options for `type=gha` (secret ones hidden in JSON).
        #[serde(serialize_with = "serialize_options")]
        options: BTreeMap<String, String>,
        /// Credentials, passed in the environment; never serialized.
        #[serde(skip)]
        credentials: BTreeMap<String, String>,
    },
}

/// Where one stage's cache lives at one level of the chain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "at", rename_all = "kebab-case")]
pub enum CacheLocation {
    /// An image reference `REPOSITORY:TAG` (inline and registry).
    Image(String),
    /// A directory (local).
    Directory(PathBuf),
    /// A tar file (tarball).
    TarFile(PathBuf),
    /// A name inside a remote store (`name=` for s3, `scope=` for gha).
    Named(String),
}

impl std::fmt::Display for CacheLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheLocation::Image(image) => f.write_str(image),
            CacheLocation::Directory(dir) | CacheLocation::TarFile(dir) => write!(f, "{}", dir.display()),
            CacheLocation::Named(name) => f.write_str(name),
        }
    }
}

/// Backend options that are credentials, and the variable buildx reads each from.
const CREDENTIALS: [(&str, &str, &str); 4] = [
    ("s3", "access_key_id", "AWS_ACCESS_KEY_ID"),
    ("s3", "secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ("s3", "session_token", "AWS_SESSION_TOKEN"),
    ("gha", "token", "ACTIONS_RUNTIME_TOKEN"),
];

fn serialize_options<S: serde::Serializer>(
    options: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let shown: BTreeMap<&String, &str> = options
        .iter()
        .map(|(key, value)| (key, if crate::secrets::is_secret(key, value) { crate::secrets::HIDDEN } else { value }))
        .collect();
    shown.serialize(serializer)
}

/// The names accepted by [`Backend::parse`].
pub const BACKEND_NAMES: &str = "inline, registry, local, tarball, s3, gha";

impl Backend {
    /// Parses `TYPE[,KEY=VALUE...]`. `local` and `tarball` need `dir=DIR`, or `default_dir`.
    pub fn parse(text: &str, default_dir: Option<&Path>) -> Result<Backend> {
        let mut parts = text.split(',');
        let kind = parts.next().unwrap_or_default().trim().to_lowercase();
        let mut options = BTreeMap::new();
        let mut credentials = BTreeMap::new();
        for (i, part) in parts.enumerate() {
            // Errors never quote a value: it may be a secret.
            let (key, value) = part.split_once('=').with_context(|| {
                format!(
                    "backend option {} (starting `{}`) is not KEY=VALUE; write --backend TYPE,KEY=VALUE,…",
                    i + 1,
                    crate::secrets::name_part(part)
                )
            })?;
            let (key, value) = (key.trim().to_string(), value.trim().to_string());
            if crate::secrets::is_secret(&key, &value) {
                crate::secrets::mask(&value);
            }
            if CREDENTIALS.iter().any(|(backend, name, _)| *backend == kind && *name == key) {
                credentials.insert(key, value);
            } else {
                options.insert(key, value);
            }
        }
        let mut take_dir = |kind: &str| -> Result<PathBuf> {
            let dir = options.remove("dir").map(PathBuf::from).or_else(|| default_dir.map(Path::to_path_buf));
            let dir = dir.with_context(|| {
                format!("the {kind} backend needs a directory: --backend {kind},dir=DIR or --cache-dir DIR")
            })?;
            if let Some(extra) = options.keys().next() {
                bail!("the {kind} backend takes only dir=DIR, not `{extra}`");
            }
            Ok(dir)
        };
        let backend = match kind.as_str() {
            "inline" => {
                if !options.is_empty() {
                    bail!("the inline backend takes no options");
                }
                Backend::Inline
            }
            "registry" => {
                if options.contains_key("ref") {
                    bail!("the registry backend takes no ref=: the cache tags come from --image and the tag scheme (pass --image REGISTRY/NAME for another repository)");
                }
                if options.get("mode").is_some_and(|mode| mode != "max") {
                    bail!("the registry backend always exports mode=max (every stage's layers); remove mode=");
                }
                Backend::Registry { options }
            }
            "local" => Backend::Local { dir: take_dir("local")? },
            "tarball" => Backend::Tarball { dir: take_dir("tarball")? },
            "s3" => {
                for needed in ["bucket", "region"] {
                    if !options.contains_key(needed) {
                        bail!("the s3 backend needs {needed}=…: --backend s3,bucket=NAME,region=REGION");
                    }
                }
                Backend::S3 { options, credentials }
            }
            "gha" => Backend::Gha { options, credentials },
            "" => bail!("no backend given; choose one of {BACKEND_NAMES}"),
            other => bail!("unknown backend `{}`; choose one of {BACKEND_NAMES}", crate::secrets::name_part(other)),
        };
        Ok(backend)
    }

    /// The variables that carry the backend's credentials to buildx, with their values.
    pub fn credentials_env(&self) -> Vec<(String, String)> {
        let (Backend::S3 { credentials, .. } | Backend::Gha { credentials, .. }) = self else { return Vec::new() };
        CREDENTIALS
            .iter()
            .filter(|(backend, _, _)| *backend == self.name())
            .filter_map(|(_, name, variable)| Some((variable.to_string(), credentials.get(*name)?.clone())))
            .collect()
    }

    /// The variables that carry credentials given in the backend's options, comma-separated, if any.
    pub fn credential_names(&self) -> Option<String> {
        let names: Vec<String> = self.credentials_env().into_iter().map(|(name, _)| name).collect();
        (!names.is_empty()).then(|| names.join(", "))
    }

    /// The backend's short name.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Inline => "inline",
            Backend::Registry { .. } => "registry",
            Backend::Local { .. } => "local",
            Backend::Tarball { .. } => "tarball",
            Backend::S3 { .. } => "s3",
            Backend::Gha { .. } => "gha",
        }
    }

    /// True when BuildKit must export the cache itself (`--cache-to type=registry|local|s3|gha`):
    /// the default `docker` driver can do that only with the containerd image store.
    pub fn needs_cache_export(&self) -> bool {
        !matches!(self, Backend::Inline)
    }

    /// True when each stage's image must be tagged and loaded locally (to push it or save it).
    pub fn tags_stage_images(&self) -> bool {
        matches!(self, Backend::Inline)
    }

    /// True when a record of the stages' inputs is written beside the cache ([`crate::explain`]).
    pub fn keeps_records(&self) -> bool {
        matches!(self, Backend::Registry { .. } | Backend::Local { .. } | Backend::Tarball { .. })
    }

    /// True when the existence of a location can be checked before the build.
    pub fn can_check_existence(&self) -> bool {
        !matches!(self, Backend::S3 { .. } | Backend::Gha { .. })
    }

    /// Where `tag`'s cache lives for this backend.
    pub fn location(&self, repository: &Repository, tag: &str) -> CacheLocation {
        match self {
            Backend::Inline | Backend::Registry { .. } => CacheLocation::Image(repository.with_tag(tag)),
            Backend::Local { dir } => CacheLocation::Directory(dir.join(repository_dir_name(repository)).join(tag)),
            Backend::Tarball { dir } => {
                CacheLocation::TarFile(dir.join(repository_dir_name(repository)).join(format!("{tag}.tar")))
            }
            Backend::S3 { .. } | Backend::Gha { .. } => {
                CacheLocation::Named(format!("{}-{tag}", repository_dir_name(repository)))
            }
        }
    }

    /// The `--cache-from` value reading `location` (made by [`Backend::location`]). For
    /// `tarball`, `unpacked` is where the tar file is unpacked before the build.
    pub fn cache_from_arg(&self, location: &CacheLocation, unpacked: &Path) -> String {
        match self {
            Backend::Inline => location.to_string(),
            Backend::Registry { .. } => format!("type=registry,ref={location}"),
            Backend::Local { .. } => format!("type=local,src={location}"),
            Backend::Tarball { .. } => format!("type=local,src={}", unpacked.display()),
            Backend::S3 { options, .. } => {
                format!("type=s3,{}name={location}", join_options(options, &["mode", "ignore-error"]))
            }
            Backend::Gha { options, .. } => {
                format!("type=gha,{}scope={location}", join_options(options, &["mode", "ignore-error"]))
            }
        }
    }

    /// The `--cache-to` value writing `location`, or `None` for inline (its image is pushed after
    /// the build). Local and tarball export to `staging`, copied or packed after the build.
    /// `ignore_error` keeps a failed export from failing a build that succeeded.
    pub fn cache_to_arg(&self, location: &CacheLocation, staging: &Path, ignore_error: bool) -> Option<String> {
        let ignore = if ignore_error { ",ignore-error=true" } else { "" };
        let arg = match self {
            Backend::Inline => return None,
            Backend::Registry { options } => {
                let mut options = options.clone();
                options.entry("image-manifest".to_string()).or_insert_with(|| "true".to_string());
                options.entry("oci-mediatypes".to_string()).or_insert_with(|| "true".to_string());
                format!(
                    "type=registry,ref={location},mode=max,{}",
                    join_options(&options, &["ref", "mode"]).trim_end_matches(',')
                ) + ignore
            }
            // BuildKit exports once, to a staging directory; the push step copies it to each
            // destination. Several local exports in one build race on the same layers
            // ("ref layer-sha256:… locked") and leave incomplete caches.
            Backend::Local { .. } | Backend::Tarball { .. } => {
                format!("type=local,dest={},mode=max{ignore}", staging.display())
            }
            Backend::S3 { options, .. } => {
                format!("type=s3,{}name={location},mode=max{ignore}", join_options(options, &["mode", "ignore-error"]))
            }
            Backend::Gha { options, .. } => {
                format!(
                    "type=gha,{}scope={location},mode=max{ignore}",
                    join_options(options, &["mode", "ignore-error"])
                )
            }
        };
        Some(arg)
    }
}

impl Default for Backend {
    /// `registry`: every layer of every stage, in the registry the images go to.
    fn default() -> Backend {
        Backend::Registry { options: BTreeMap::new() }
    }
}

impl std::str::FromStr for Backend {
    type Err = anyhow::Error;

    /// [`Backend::parse`] without a default directory: `local` and `tarball` need `dir=DIR`.
    fn from_str(text: &str) -> Result<Backend> {
        Backend::parse(text, None)
    }
}

impl std::fmt::Display for Backend {
    /// `TYPE[,KEY=VALUE...]` as [`Backend::parse`] reads it, secret option values shown as `***`
    /// and credentials left out (they travel in the environment).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())?;
        let shown = |key: &String, value: &String| {
            if crate::secrets::is_secret(key, value) {
                crate::secrets::HIDDEN.to_string()
            } else {
                value.clone()
            }
        };
        match self {
            Backend::Inline => Ok(()),
            Backend::Local { dir } | Backend::Tarball { dir } => write!(f, ",dir={}", dir.display()),
            Backend::Registry { options } | Backend::S3 { options, .. } | Backend::Gha { options, .. } => {
                options.iter().try_for_each(|(key, value)| write!(f, ",{key}={}", shown(key, value)))
            }
        }
    }
}

/// `KEY=VALUE,` for each option not in `skip`, sorted.
fn join_options(options: &BTreeMap<String, String>, skip: &[&str]) -> String {
    options
        .iter()
        .filter(|(key, _)| !skip.contains(&key.as_str()))
        .map(|(key, value)| format!("{key}={value},"))
        .collect()
}

/// A file-system-safe name for a repository: `127.0.0.1:5000/team/app` → `127.0.0.1-5000-team-app`.
pub(crate) fn repository_dir_name(repository: &Repository) -> String {
    format!("{}/{}", repository.registry, repository.path).replace(['/', ':'], "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> Repository {
        Repository::parse("127.0.0.1:5000/app").unwrap()
    }

    #[test]
    fn parse_every_backend() {
        assert_eq!(Backend::parse("inline", None).unwrap(), Backend::Inline);
        assert_eq!(Backend::parse("registry", None).unwrap(), Backend::Registry { options: BTreeMap::new() });
        assert_eq!(Backend::parse("local,dir=/c", None).unwrap(), Backend::Local { dir: "/c".into() });
        assert_eq!(Backend::parse("tarball", Some(Path::new("/t"))).unwrap(), Backend::Tarball { dir: "/t".into() });
        let s3 = Backend::parse("s3,bucket=b,region=r", None).unwrap();
        assert_eq!(s3.name(), "s3");
        assert_eq!(Backend::parse("gha,url=http://x", None).unwrap().name(), "gha");
    }

    #[test]
    fn parse_errors_say_what_to_do() {
        let error = |text: &str| Backend::parse(text, None).unwrap_err().to_string();
        assert_eq!(error("zip"), "unknown backend `zip`; choose one of inline, registry, local, tarball, s3, gha");
        assert!(error("local").contains("--backend local,dir=DIR"));
        assert!(error("s3,bucket=b").contains("needs region"));
        assert!(error("inline,mode=max").contains("no options"));
        // Not dropped without a word: the registry backend chooses its refs and mode itself.
        assert!(error("registry,ref=127.0.0.1:5000/other:cache").contains("takes no ref="));
        assert!(error("registry,mode=min").contains("always exports mode=max"));
        assert!(Backend::parse("registry,mode=max,compression=zstd", None).is_ok());
        assert!(error("registry,junk").contains("not KEY=VALUE"));
    }

    #[test]
    fn docker_arguments_of_each_backend() {
        let staging = Path::new("/work/stage");
        let registry = Backend::parse("registry", None).unwrap();
        let location = registry.location(&repo(), "cache-deps.main");
        assert_eq!(registry.cache_from_arg(&location, staging), "type=registry,ref=127.0.0.1:5000/app:cache-deps.main");
        assert_eq!(
            registry.cache_to_arg(&location, staging, true).unwrap(),
            "type=registry,ref=127.0.0.1:5000/app:cache-deps.main,mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"
        );

        let inline = Backend::Inline;
        let location = inline.location(&repo(), "cache-deps.main");
        assert_eq!(inline.cache_from_arg(&location, staging), "127.0.0.1:5000/app:cache-deps.main");
        assert_eq!(inline.cache_to_arg(&location, staging, true), None);

        let local = Backend::parse("local,dir=/c", None).unwrap();
        let location = local.location(&repo(), "cache-deps.main");
        assert_eq!(location, CacheLocation::Directory("/c/127.0.0.1-5000-app/cache-deps.main".into()));
        assert_eq!(local.cache_from_arg(&location, staging), "type=local,src=/c/127.0.0.1-5000-app/cache-deps.main");
        assert_eq!(local.cache_to_arg(&location, staging, false).unwrap(), "type=local,dest=/work/stage,mode=max");

        let tarball = Backend::parse("tarball,dir=/t", None).unwrap();
        let location = tarball.location(&repo(), "cache-deps.main");
        assert_eq!(location, CacheLocation::TarFile("/t/127.0.0.1-5000-app/cache-deps.main.tar".into()));
        assert_eq!(tarball.cache_from_arg(&location, staging), "type=local,src=/work/stage");
        assert_eq!(
            tarball.cache_to_arg(&location, staging, true).unwrap(),
            "type=local,dest=/work/stage,mode=max,ignore-error=true"
        );

        let s3 = Backend::parse("s3,bucket=b,region=r", None).unwrap();
        let location = s3.location(&repo(), "cache-deps.main");
        assert_eq!(
            s3.cache_from_arg(&location, staging),
            "type=s3,bucket=b,region=r,name=127.0.0.1-5000-app-cache-deps.main"
        );
        assert_eq!(
            s3.cache_to_arg(&location, staging, false).unwrap(),
            "type=s3,bucket=b,region=r,name=127.0.0.1-5000-app-cache-deps.main,mode=max"
        );
        let gha = Backend::parse("gha", None).unwrap();
        let location = gha.location(&repo(), "cache-deps.main");
        assert_eq!(gha.cache_from_arg(&location, staging), "type=gha,scope=127.0.0.1-5000-app-cache-deps.main");
    }

    #[test]
    fn backends_round_trip_through_json() {
        for text in
            ["inline", "registry,compression=zstd", "local,dir=/c", "tarball,dir=/t", "s3,bucket=b,region=r", "gha"]
        {
            let backend = Backend::parse(text, None).unwrap();
            let json = serde_json::to_string(&backend).unwrap();
            assert_eq!(serde_json::from_str::<Backend>(&json).unwrap(), backend, "{json}");
        }
        assert!(serde_json::from_str::<Backend>(r#"{"type":"local","dir":"/c","junk":1}"#).is_err());
    }

    #[test]
    fn backends_round_trip_through_text() {
        for text in [
            "inline",
            "registry",
            "registry,compression=zstd",
            "local,dir=/c",
            "tarball,dir=/t",
            "s3,bucket=b,region=r",
            "gha,url=http://x",
        ] {
            let backend: Backend = text.parse().unwrap();
            assert_eq!(backend.to_string(), text);
            assert_eq!(backend.to_string().parse::<Backend>().unwrap(), backend);
        }
        assert_eq!(Backend::default(), "registry".parse().unwrap());
        // Credentials are left out, secret values hidden.
        let s3: Backend = "s3,bucket=b,region=r,secret_access_key=wJalrXUtnFEMIK7MDENGbPxRfiCY".parse().unwrap();
        assert_eq!(s3.to_string(), "s3,bucket=b,region=r");
        assert!("local".parse::<Backend>().unwrap_err().to_string().contains("dir=DIR"));
    }

    proptest::proptest! {
        #[test]
        fn any_backend_text_is_refused_or_reads_back_the_same(text in proptest::prelude::any::<String>()) {
            if let Ok(backend) = text.parse::<Backend>() {
                let shown = backend.to_string();
                for (_, value) in backend.credentials_env() {
                    proptest::prop_assert!(value.is_empty() || !shown.contains(&value), "a credential shows: {shown}");
                }
                if !shown.contains(crate::secrets::HIDDEN) && backend.credentials_env().is_empty() {
                    proptest::prop_assert_eq!(shown.parse::<Backend>().ok(), Some(backend));
                }
            }
        }
    }

    #[test]
    fn every_backend_takes_every_location_without_panicking() {
        let locations = [
            CacheLocation::Image("127.0.0.1:5000/app:cache-deps".into()),
            CacheLocation::Directory("/c/deps".into()),
            CacheLocation::TarFile("/t/deps.tar".into()),
            CacheLocation::Named("app-cache-deps".into()),
        ];
        for text in ["inline", "registry", "local,dir=/c", "tarball,dir=/t", "s3,bucket=b,region=r", "gha"] {
            let backend: Backend = text.parse().unwrap();
            for location in &locations {
                let from = backend.cache_from_arg(location, Path::new("/u"));
                assert!(!from.is_empty());
                if let Some(to) = backend.cache_to_arg(location, Path::new("/s"), true) {
                    assert!(to.ends_with("ignore-error=true"), "{to}");
                }
            }
        }
    }
}
