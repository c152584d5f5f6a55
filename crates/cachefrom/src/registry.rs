//! Does a cache image exist? One HTTP `HEAD` on its manifest (no layer is downloaded), with the
//! user's docker credentials (`~/.docker/config.json`: `auths`, `credHelpers`, `credsStore`).
//!
//! Measured here: a manifest `HEAD` against the local registry takes a few milliseconds, where
//! `docker buildx imagetools inspect` takes 90–100 ms a ref; so checks use HTTP, all in parallel.
//!
//! Why not a registry crate: the maintained one, `oci-client`, is async (tokio and reqwest), and
//! this library is synchronous on purpose (it runs from build scripts, xtasks and CI steps, with a
//! timeout on every call); an async runtime would double the dependency tree for the four calls
//! used here (manifest `HEAD`, `GET`, `PUT`, `DELETE`, plus tag lists). `docker_credential`
//! reads the same three places of `config.json` as [`RegistryClient`] does, without the
//! timeouts and the secret masking this client needs. The token flow (`WWW-Authenticate: Bearer`,
//! the realm asked with the saved login) is tested against Debian's registry with token
//! authentication and an ES256 token issuer on loopback (`tests/tests/token_auth.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;

use crate::refs::Repository;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The answer for one reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existence {
    /// The registry has it.
    Exists,
    /// The registry answered that it does not.
    Missing,
    /// The registry could not be asked (down, refused, denied): the reason.
    Unknown(String),
}

/// Checks made at once: enough to hide a registry's latency, few enough for any Dockerfile.
const CHECK_THREADS: usize = 8;

/// The most a tag list is read for: pages, bytes in all, and time in all. A registry that pages
/// forever, or with pages of megabytes, is given up with one line.
const MAX_TAG_PAGES: usize = 100;
const MAX_TAG_BYTES: u64 = 16 * 1024 * 1024;
const MAX_TAG_LIST_TIME: Duration = Duration::from_secs(60);

/// Further tries of a manifest read or write that failed: after 0.2 s, then 0.6 s.
const WRITE_BACKOFF: crate::retry::Backoff =
    crate::retry::Backoff { retries: 2, first: Duration::from_millis(200), factor: 3 };

/// `attempt()`, tried again while it fails with an error `worth_retrying` ([`WRITE_BACKOFF`]).
fn retried<T>(worth_retrying: impl Fn(&anyhow::Error) -> bool, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let first = attempt();
    crate::retry::while_worth(
        first,
        WRITE_BACKOFF,
        |value| value.as_ref().is_err_and(&worth_retrying),
        |_, _| attempt(),
    )
}

/// Checks references against registries.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    timeout: Duration,
    docker_config: Option<PathBuf>,
}

impl Default for RegistryClient {
    fn default() -> Self {
        RegistryClient { timeout: Duration::from_secs(10), docker_config: docker_config_path() }
    }
}

/// A manifest as the registry holds it: its media type and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// `Content-Type` (e.g. `application/vnd.oci.image.manifest.v1+json`).
    pub content_type: String,
    /// The bytes, which the digest is taken of.
    pub body: Vec<u8>,
}

impl Manifest {
    /// The `annotations` of an OCI manifest (empty when it has none or is not JSON).
    pub fn annotations(&self) -> BTreeMap<String, String> {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|value| value.get("annotations").cloned())
            .and_then(|value| serde_json::from_value(value).ok())
            .unwrap_or_default()
    }

    /// The same manifest with `annotations` set (others kept); its digest changes, its layers do not.
    pub fn with_annotations(&self, annotations: &BTreeMap<String, String>) -> Result<Manifest> {
        let mut value: serde_json::Value = serde_json::from_slice(&self.body).context("a manifest is JSON")?;
        let object = value.as_object_mut().context("a manifest is a JSON object")?;
        let entry = object.entry("annotations").or_insert_with(|| serde_json::json!({}));
        let map = entry.as_object_mut().context("a manifest's annotations are an object")?;
        for (key, text) in annotations {
            map.insert(key.clone(), serde_json::Value::String(text.clone()));
        }
        Ok(Manifest { content_type: self.content_type.clone(), body: serde_json::to_vec(&value)? })
    }
}

/// What the requests of one call share.
struct Session {
    agent: ureq::Agent,
    /// Per repository and access: the `Authorization` header, or why there is none.
    authorizations: Mutex<BTreeMap<(Repository, Scope), std::result::Result<String, String>>>,
}

/// What a request needs of a repository: the scope of its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Pull,
    Push,
    Delete,
}

/// The empty JSON object `{}`: OCI's empty descriptor.
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// A cache manifest is small; anything larger is not one.
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

fn manifest_url(repository: &Repository, reference: &str) -> Result<String> {
    // Only a tag or a digest goes in the path: never `..`, `?` or `#` that would address another thing.
    if !crate::refs::is_valid_tag(reference) && !crate::inputs::is_digest(reference) {
        bail!("{} is not a tag or a digest; not sent to the registry", crate::secrets::quoted(reference));
    }
    Ok(format!("{}/v2/{}/manifests/{reference}", registry_base_url(repository), repository.path))
}

struct Credentials {
    username: String,
    secret: String,
}

/// One reference's answer: whether it exists, and its manifest digest when it does.
pub type Answer = (Existence, Option<String>);

impl RegistryClient {
    /// A client with a per-request `timeout` and the docker config at `docker_config`.
    pub fn new(timeout: Duration, docker_config: Option<PathBuf>) -> RegistryClient {
        RegistryClient { timeout, docker_config }
    }

    fn agent(&self) -> ureq::Agent {
        // A registry that takes the connection but never answers is given up after a few
        // seconds, not after the whole request's time.
        ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .timeout_connect(Some(self.timeout.min(Duration::from_secs(3))))
            .timeout_recv_response(Some(self.timeout.min(Duration::from_secs(5))))
            .http_status_as_error(false)
            .max_redirects(3)
            .build()
            .into()
    }

    /// Checks every `(repository, tag)` at once, one thread each; answers in the same order.
    /// The checks share one connection pool and ask for credentials and a token once a repository.
    pub fn check_all(&self, refs: &[(Repository, String)]) -> Vec<Existence> {
        self.check_all_with_digests(refs).into_iter().map(|(existence, _)| existence).collect()
    }

    /// Like [`RegistryClient::check_all`], with the manifest digest of each reference that exists
    /// (the registry's `Docker-Content-Digest`): references with the same digest hold the same cache.
    pub fn check_all_with_digests(&self, refs: &[(Repository, String)]) -> Vec<Answer> {
        let session = self.session();
        let session = &session;
        // A bounded pool: a Dockerfile of 2,000 stages asks 6,000 questions, never with 6,000
        // threads; every reference is asked or answered `Unknown` with the reason.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let answers: Vec<Mutex<Option<Answer>>> = refs.iter().map(|_| Mutex::new(None)).collect();
        let workers = CHECK_THREADS.min(refs.len());
        let silent: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let spawned = std::thread::Builder::new().spawn_scoped(scope, || loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((repository, tag)) = refs.get(index) else { break };
                    // A registry that did not answer one check is not asked again in this call.
                    let down = silent
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .get(&repository.registry)
                        .cloned();
                    let answer = match down {
                        Some(why) => (Existence::Unknown(why), None),
                        None => self.exists_in(session, repository, tag),
                    };
                    if let (Existence::Unknown(why), _) = &answer {
                        if why.contains("did not answer") {
                            silent
                                .lock()
                                .unwrap_or_else(|poisoned| poisoned.into_inner())
                                .entry(repository.registry.clone())
                                .or_insert_with(|| why.clone());
                        }
                    }
                    *answers[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(answer);
                });
                if spawned.is_err() {
                    break;
                }
            }
        });
        answers
            .into_iter()
            .map(|answer| {
                answer.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()).unwrap_or_else(|| {
                    (Existence::Unknown("not checked: no thread could be started for the check".to_string()), None)
                })
            })
            .collect()
    }

    /// Checks one `repository:tag`.
    pub fn exists(&self, repository: &Repository, tag: &str) -> Existence {
        self.exists_in(&self.session(), repository, tag).0
    }

    /// Gives the manifest of `repository:from` (a tag or a digest) the further tags `to`: one
    /// `GET` and a `PUT` a tag, byte for byte, so the digest stays the same and no layer moves.
    pub fn copy_tag(&self, repository: &Repository, from: &str, to: &[String]) -> Result<()> {
        if to.is_empty() {
            return Ok(());
        }
        let session = self.session();
        let manifest = self.manifest_in(&session, repository, from)?;
        self.put_manifest_in(&session, repository, &manifest, to)
    }

    /// The manifest of `repository:reference` (a tag or a digest).
    pub fn manifest(&self, repository: &Repository, reference: &str) -> Result<Manifest> {
        self.manifest_in(&self.session(), repository, reference)
    }

    /// Writes `manifest` under each of `tags`.
    pub fn put_manifest(&self, repository: &Repository, manifest: &Manifest, tags: &[String]) -> Result<()> {
        self.put_manifest_in(&self.session(), repository, manifest, tags)
    }

    fn manifest_in(&self, session: &Session, repository: &Repository, reference: &str) -> Result<Manifest> {
        // A registry answering 5xx for a moment (writers racing on one tag) is asked again.
        retried(
            |error| error.to_string().contains("answered HTTP 5"),
            || self.manifest_once(session, repository, reference),
        )
    }

    fn manifest_once(&self, session: &Session, repository: &Repository, reference: &str) -> Result<Manifest> {
        let url = manifest_url(repository, reference)?;
        let mut response = self.send(session, repository, Scope::Pull, |agent, authorization| {
            authorized(agent.get(&url).header("Accept", MANIFEST_TYPES), authorization).call()
        })?;
        let status = response.status().as_u16();
        let shown = format!("{}/{}@{reference}", repository.registry, repository.path);
        if status != 200 {
            bail!("reading the manifest of {shown}: registry {} answered HTTP {status}", repository.registry);
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_string();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_BYTES)
            .read_to_vec()
            .with_context(|| format!("reading the manifest of {shown}"))?;
        Ok(Manifest { content_type, body })
    }

    fn put_manifest_in(
        &self,
        session: &Session,
        repository: &Repository,
        manifest: &Manifest,
        tags: &[String],
    ) -> Result<()> {
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = tags
                .iter()
                .map(|tag| {
                    scope.spawn(move || {
                        // A write that fails for any reason but a refused login is tried again
                        // (a registry busy with racing exports answers 400 or 5xx for a moment).
                        let write = || -> Result<()> {
                            let url = manifest_url(repository, tag)?;
                            let response = self.send(session, repository, Scope::Push, |agent, authorization| {
                                authorized(agent.put(&url).header("Content-Type", manifest.content_type.as_str()), authorization).send(&manifest.body[..])
                            })?;
                            match response.status().as_u16() {
                                200..=299 => Ok(()),
                                401 | 403 => bail!(
                                    "registry {} refused to write {} (HTTP {}): run `docker login {}` with an account that can push",
                                    repository.registry,
                                    repository.with_tag(tag),
                                    response.status().as_u16(),
                                    repository.registry
                                ),
                                other => bail!(
                                    "writing {}: registry {} answered HTTP {other}",
                                    repository.with_tag(tag),
                                    repository.registry
                                ),
                            }
                        };
                        retried(|error| !error.to_string().contains("refused to write"), write)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap_or_else(|_| Err(anyhow!("the copy panicked"))))
                .collect()
        });
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// Every tag of `repository` (following the registry's pages), sorted; none for a
    /// repository the registry does not have. Read up to [`MAX_TAG_PAGES`] pages,
    /// [`MAX_TAG_BYTES`] and [`MAX_TAG_LIST_TIME`]; past any of them, an error that says which.
    pub fn list_tags(&self, repository: &Repository) -> Result<Vec<String>> {
        let session = self.session();
        let started = std::time::Instant::now();
        let mut tags = Vec::new();
        let mut bytes_left = MAX_TAG_BYTES;
        let mut url = format!("{}/v2/{}/tags/list?n=1000", registry_base_url(repository), repository.path);
        for page in 0.. {
            if page == MAX_TAG_PAGES {
                bail!("listing the tags of {repository}: registry {} sent more than {MAX_TAG_PAGES} pages; not read further", repository.registry);
            }
            if started.elapsed() > MAX_TAG_LIST_TIME {
                bail!(
                    "listing the tags of {repository}: registry {} took more than {} s; not read further",
                    repository.registry,
                    MAX_TAG_LIST_TIME.as_secs()
                );
            }
            let mut response = self.send(&session, repository, Scope::Pull, |agent, authorization| {
                authorized(agent.get(&url), authorization).call()
            })?;
            match response.status().as_u16() {
                200 => {}
                404 => return Ok(Vec::new()),
                other => {
                    bail!("listing the tags of {repository}: registry {} answered HTTP {other}", repository.registry)
                }
            }
            let next = response.headers().get("link").and_then(|value| value.to_str().ok()).and_then(|link| {
                link.split_once('<').and_then(|(_, rest)| rest.split_once('>')).map(|(path, _)| path.to_string())
            });
            let body = response.body_mut().with_config().limit(bytes_left).read_to_vec().map_err(|error| {
                anyhow!(
                    "listing the tags of {repository}: registry {} sent more than {} MB of tags, or broke off ({error}); not read further",
                    repository.registry,
                    MAX_TAG_BYTES / (1024 * 1024)
                )
            })?;
            bytes_left = bytes_left.saturating_sub(body.len() as u64);
            let value: serde_json::Value =
                serde_json::from_slice(&body).with_context(|| format!("listing the tags of {repository}: not JSON"))?;
            tags.extend(
                value["tags"].as_array().into_iter().flatten().filter_map(|tag| tag.as_str()).map(str::to_string),
            );
            match next {
                Some(path) if path.starts_with("/v2/") => url = format!("{}{path}", registry_base_url(repository)),
                _ => break,
            }
        }
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// Removes `tag` alone, leaving its manifest to the other tags that name it, on registries
    /// that delete only manifests (distribution): the tag is pointed at a small manifest of its
    /// own (an empty OCI artifact naming the tag), and that manifest is deleted by digest.
    pub fn delete_tag_alone(&self, repository: &Repository, tag: &str) -> Result<()> {
        let session = self.session();
        self.put_empty_blob(&session, repository, Scope::Delete)?;
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.dev.cachefrom.removed-tag",
            "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": 2 },
            "layers": [{ "mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": 2 }],
            "annotations": { "dev.cachefrom.removed-tag": tag, "dev.cachefrom.nonce": format!("{nonce}-{}", std::process::id()) },
        }))?;
        let digest = format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(&body));
        let manifest = Manifest { content_type: "application/vnd.oci.image.manifest.v1+json".to_string(), body };
        self.put_manifest_in(&session, repository, &manifest, &[tag.to_string()])?;
        self.delete_manifest(repository, &digest).with_context(|| {
            format!("removing {} (it now names an empty manifest, {digest})", repository.with_tag(tag))
        })
    }

    /// Makes sure the repository has the 2-byte `{}` blob an empty manifest names.
    fn put_empty_blob(&self, session: &Session, repository: &Repository, access: Scope) -> Result<()> {
        if self.blob_exists_in(session, repository, EMPTY_DIGEST, access)? {
            return Ok(());
        }
        self.upload_blob_in(session, repository, EMPTY_DIGEST, access, &|| Ok(Box::new(&b"{}"[..])))
    }

    fn blob_exists_in(&self, session: &Session, repository: &Repository, digest: &str, access: Scope) -> Result<bool> {
        let blob_url = blob_url(repository, digest)?;
        let head = self.send(session, repository, access, |agent, authorization| {
            authorized(agent.head(&blob_url), authorization).call()
        })?;
        match head.status().as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            other => bail!("asking registry {} for a blob: HTTP {other}", repository.registry),
        }
    }

    /// Uploads one blob in a single request (a `POST` to start, a `PUT` with the bytes `body`
    /// makes, again for each try).
    fn upload_blob_in(
        &self,
        session: &Session,
        repository: &Repository,
        digest: &str,
        access: Scope,
        body: &dyn Fn() -> std::io::Result<Box<dyn std::io::Read + Send + 'static>>,
    ) -> Result<()> {
        let base = registry_base_url(repository);
        let start_url = format!("{base}/v2/{}/blobs/uploads/", repository.path);
        let started = self.send(session, repository, access, |agent, authorization| {
            authorized(agent.post(&start_url), authorization).send_empty()
        })?;
        let location = started
            .headers()
            .get("location")
            .and_then(|value| value.to_str().ok())
            .filter(|_| started.status().as_u16() == 202)
            .with_context(|| {
                format!("registry {} did not start an upload (HTTP {})", repository.registry, started.status().as_u16())
            })?
            .to_string();
        let location = if location.starts_with('/') { format!("{base}{location}") } else { location };
        if !location.starts_with(&base) {
            bail!("registry {} sent the upload to another host; not followed", repository.registry);
        }
        let separator = if location.contains('?') { '&' } else { '?' };
        let put_url = format!("{location}{separator}digest={digest}");
        let done = self.send(session, repository, access, |agent, authorization| {
            let reader = body().map_err(ureq::Error::Io)?;
            authorized(agent.put(&put_url).header("Content-Type", "application/octet-stream"), authorization)
                .send(ureq::SendBody::from_owned_reader(reader))
        })?;
        if !done.status().is_success() {
            bail!("registry {} refused the blob {digest} (HTTP {})", repository.registry, done.status().as_u16());
        }
        Ok(())
    }

    /// Gives `repository` the blob `digest` that `from` (a repository of the same registry) has,
    /// without moving a byte (`POST …/blobs/uploads/?mount=DIGEST&from=FROM`), unless it has it
    /// already. True when it was mounted; false when it was there, or when the registry would not
    /// mount it (the upload it opened instead is cancelled).
    pub fn mount_blob(&self, repository: &Repository, digest: &str, from: &Repository) -> Result<bool> {
        let session = self.session();
        if self.blob_exists_in(&session, repository, digest, Scope::Push)? {
            return Ok(false);
        }
        let _ = blob_url(repository, digest)?;
        let base = registry_base_url(repository);
        let url = format!("{base}/v2/{}/blobs/uploads/?mount={digest}&from={}", repository.path, from.path);
        let answer = self.send(&session, repository, Scope::Push, |agent, authorization| {
            authorized(agent.post(&url), authorization).send_empty()
        })?;
        match answer.status().as_u16() {
            201 => Ok(true),
            202 => {
                // An upload was opened instead: cancel it, nothing is left behind.
                if let Some(location) = answer.headers().get("location").and_then(|value| value.to_str().ok()) {
                    let location =
                        if location.starts_with('/') { format!("{base}{location}") } else { location.to_string() };
                    if location.starts_with(&base) {
                        let _ = self.send(&session, repository, Scope::Push, |agent, authorization| {
                            authorized(agent.delete(&location), authorization).call()
                        });
                    }
                }
                Ok(false)
            }
            other => bail!("registry {} would not mount {digest} from {from} (HTTP {other})", repository.registry),
        }
    }

    /// The blobs an image is made of (config and layers), for `platform` when `reference` names an
    /// index of several platforms.
    pub fn image_blobs(&self, repository: &Repository, reference: &str, platform: &str) -> Result<Vec<String>> {
        let manifest = self.manifest(repository, reference)?;
        let mut value: serde_json::Value =
            serde_json::from_slice(&manifest.body).context("a manifest that is not JSON")?;
        if let Some(children) = value.get("manifests").and_then(|list| list.as_array()) {
            let (os, rest) = platform.split_once('/').unwrap_or(("linux", platform));
            let (arch, variant) = rest.split_once('/').map_or((rest, None), |(arch, variant)| (arch, Some(variant)));
            let child = children
                .iter()
                .find(|child| {
                    let p = &child["platform"];
                    p["os"] == os
                        && p["architecture"] == arch
                        && variant.is_none_or(|variant| p["variant"].as_str().is_none_or(|v| v == variant))
                })
                .and_then(|child| child["digest"].as_str())
                .with_context(|| format!("{repository}:{reference} has no image for {platform}"))?
                .to_string();
            let manifest = self.manifest(repository, &child)?;
            value = serde_json::from_slice(&manifest.body).context("a manifest that is not JSON")?;
        }
        let mut blobs: Vec<String> = value["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|layer| layer["digest"].as_str().map(str::to_string))
            .collect();
        blobs.extend(value["config"]["digest"].as_str().map(str::to_string));
        blobs.retain(|digest| crate::inputs::is_digest(digest));
        Ok(blobs)
    }

    /// True when `repository` has the blob `digest`.
    pub fn blob_exists(&self, repository: &Repository, digest: &str) -> Result<bool> {
        self.blob_exists_in(&self.session(), repository, digest, Scope::Pull)
    }

    /// Uploads the file `path` as the blob `digest` (its sha256), unless the repository has it;
    /// the whole transfer within `timeout`. True when it was uploaded.
    pub fn upload_blob_file(
        &self,
        repository: &Repository,
        digest: &str,
        path: &std::path::Path,
        timeout: Duration,
    ) -> Result<bool> {
        let session = self.transfer_session(timeout);
        if self.blob_exists_in(&session, repository, digest, Scope::Push)? {
            return Ok(false);
        }
        self.upload_blob_in(&session, repository, digest, Scope::Push, &|| {
            Ok(Box::new(std::fs::File::open(path)?) as Box<dyn std::io::Read + Send>)
        })
        .with_context(|| format!("uploading {} to {repository}", path.display()))?;
        Ok(true)
    }

    /// Writes an OCI artifact manifest naming the empty config and `layers`, with `annotations`,
    /// under each of `tags` (the empty config blob is uploaded first when missing).
    pub fn put_artifact(
        &self,
        repository: &Repository,
        artifact_type: &str,
        layers: &[serde_json::Value],
        annotations: &BTreeMap<String, String>,
        tags: &[String],
    ) -> Result<()> {
        let session = self.session();
        self.put_empty_blob(&session, repository, Scope::Push)?;
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": artifact_type,
            "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": 2 },
            "layers": layers,
            "annotations": annotations,
        }))?;
        let manifest = Manifest { content_type: "application/vnd.oci.image.manifest.v1+json".to_string(), body };
        self.put_manifest_in(&session, repository, &manifest, tags)
    }

    /// Downloads the blob `digest` into `path` (through `PATH.partial.PID`), checking its sha256
    /// and that it holds at most `max_bytes`; the whole transfer within `timeout`.
    pub fn fetch_blob_to_file(
        &self,
        repository: &Repository,
        digest: &str,
        path: &std::path::Path,
        max_bytes: u64,
        timeout: Duration,
    ) -> Result<()> {
        use sha2::Digest as _;
        use std::io::{Read, Write};
        let session = self.transfer_session(timeout);
        let url = blob_url(repository, digest)?;
        let mut response = self.send(&session, repository, Scope::Pull, |agent, authorization| {
            authorized(agent.get(&url), authorization).call()
        })?;
        if response.status().as_u16() != 200 {
            bail!("fetching {digest} from {repository}: registry answered HTTP {}", response.status().as_u16());
        }
        let partial = crate::plan::partial_path_of(path);
        let result = (|| -> Result<()> {
            let mut file = std::fs::File::create(&partial)?;
            let mut reader = response.body_mut().with_config().limit(max_bytes.saturating_add(1)).reader();
            let mut hasher = sha2::Sha256::new();
            let mut buffer = vec![0u8; 1 << 16];
            let mut total: u64 = 0;
            loop {
                let read = reader.read(&mut buffer)?;
                if read == 0 {
                    break;
                }
                total += read as u64;
                if total > max_bytes {
                    bail!("it holds more than {max_bytes} bytes");
                }
                hasher.update(&buffer[..read]);
                file.write_all(&buffer[..read])?;
            }
            let got = format!("sha256:{:x}", hasher.finalize());
            if got != digest {
                bail!("its content does not match its digest (got {got})");
            }
            file.sync_all()?;
            std::fs::rename(&partial, path)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result.with_context(|| format!("fetching {digest} from {repository}"))
    }

    /// A session for transfers: the same answers' deadlines, `timeout` for the whole request.
    fn transfer_session(&self, timeout: Duration) -> Session {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(self.timeout.min(Duration::from_secs(3))))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .max_redirects(3)
            .build()
            .into();
        Session { agent, authorizations: Mutex::new(BTreeMap::new()) }
    }

    /// The manifest digest of each of `tags`, or why it could not be read.
    pub fn digests(
        &self,
        repository: &Repository,
        tags: &[String],
    ) -> Vec<std::result::Result<Option<String>, String>> {
        let refs: Vec<(Repository, String)> = tags.iter().map(|tag| (repository.clone(), tag.clone())).collect();
        self.check_all_with_digests(&refs)
            .into_iter()
            .map(|answer| match answer {
                (Existence::Exists, Some(digest)) => Ok(Some(digest)),
                (Existence::Exists, None) => Err(format!("registry {} gave no manifest digest", repository.registry)),
                (Existence::Missing, _) => Ok(None),
                (Existence::Unknown(why), _) => Err(why),
            })
            .collect()
    }

    /// Deletes the manifest `digest` from `repository`, and with it every tag that names it.
    pub fn delete_manifest(&self, repository: &Repository, digest: &str) -> Result<()> {
        let url = manifest_url(repository, digest)?;
        let response = self.send(&self.session(), repository, Scope::Delete, |agent, authorization| {
            authorized(agent.delete(&url), authorization).call()
        })?;
        match response.status().as_u16() {
            200..=299 | 404 => Ok(()),
            405 => bail!(
                "registry {} does not allow deletes (HTTP 405): turn them on (distribution: storage.delete.enabled: true)",
                repository.registry
            ),
            401 | 403 => bail!(
                "registry {} refused to delete from {} (HTTP {}): run `docker login {}` with an account that can delete",
                repository.registry,
                repository,
                response.status().as_u16(),
                repository.registry
            ),
            other => bail!("deleting {digest} from {repository}: registry {} answered HTTP {other}", repository.registry),
        }
    }

    fn session(&self) -> Session {
        Session { agent: self.agent(), authorizations: Mutex::new(BTreeMap::new()) }
    }

    fn exists_in(&self, session: &Session, repository: &Repository, tag: &str) -> (Existence, Option<String>) {
        let url = match manifest_url(repository, tag) {
            Ok(url) => url,
            Err(error) => return (Existence::Unknown(format!("{error:#}")), None),
        };
        let answer = self.send(session, repository, Scope::Pull, |agent, authorization| {
            authorized(agent.head(&url).header("Accept", MANIFEST_TYPES), authorization).call()
        });
        let response = match answer {
            Ok(response) => response,
            Err(error) => return (Existence::Unknown(format!("{error:#}")), None),
        };
        let digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|value| value.to_str().ok())
            .filter(|digest| crate::inputs::is_digest(digest))
            .map(str::to_string);
        match interpret(response.status().as_u16(), repository) {
            Ok(true) => (Existence::Exists, digest),
            Ok(false) => (Existence::Missing, None),
            Err(error) => (Existence::Unknown(format!("{error:#}")), None),
        }
    }

    /// Sends a request made by `make`, logging in once a repository and access when the registry
    /// asks (HTTP 401) and sending it again with the answer.
    fn send(
        &self,
        session: &Session,
        repository: &Repository,
        access: Scope,
        make: impl Fn(&ureq::Agent, Option<&str>) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let call = |authorization: Option<&str>| {
            make(&session.agent, authorization)
                .map_err(|error| anyhow!("registry {} did not answer: {error}", repository.registry))
        };
        let response = call(None)?;
        if response.status().as_u16() != 401 {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        // Held while the first request of a repository logs in; the others then reuse its answer.
        let mut authorizations = session.authorizations.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let authorization = authorizations
            .entry((repository.clone(), access))
            .or_insert_with(|| {
                self.authorization(&session.agent, &challenge, repository, access).map_err(|e| format!("{e:#}"))
            })
            .clone();
        drop(authorizations);
        let authorization = authorization.map_err(|error| anyhow!(error))?;
        call(Some(&authorization))
    }

    /// The `Authorization` header answering `challenge`: a bearer token, or the saved login.
    fn authorization(
        &self,
        agent: &ureq::Agent,
        challenge: &str,
        repository: &Repository,
        access: Scope,
    ) -> Result<String> {
        let credentials = self.credentials(&repository.registry)?;
        if challenge.to_lowercase().starts_with("bearer") {
            let token = self.bearer_token(agent, challenge, repository, access, credentials.as_ref())?;
            return Ok(format!("Bearer {token}"));
        }
        let credentials = credentials.with_context(|| {
            format!("registry {} wants a login: run `docker login {}`", repository.registry, repository.registry)
        })?;
        Ok(basic(&credentials))
    }

    fn bearer_token(
        &self,
        agent: &ureq::Agent,
        challenge: &str,
        repository: &Repository,
        access: Scope,
        credentials: Option<&Credentials>,
    ) -> Result<String> {
        let fields = parse_challenge(challenge);
        let realm = fields.get("realm").context("the registry's auth challenge names no realm")?;
        let actions = match access {
            Scope::Pull => "pull",
            Scope::Push => "pull,push",
            Scope::Delete => "pull,push,delete",
        };
        let mut request = agent.get(realm.as_str()).query("scope", format!("repository:{}:{actions}", repository.path));
        if let Some(service) = fields.get("service") {
            request = request.query("service", service.as_str());
        }
        if let Some(credentials) = credentials {
            request = request.header("Authorization", basic(credentials));
        }
        let mut response = request
            .call()
            .map_err(|error| anyhow!("the token service of {} did not answer: {error}", repository.registry))?;
        if !response.status().is_success() {
            bail!(
                "registry {} refused a token (HTTP {}): check `docker login {}`",
                repository.registry,
                response.status().as_u16(),
                repository.registry
            );
        }
        let text = response.body_mut().read_to_string().context("reading the registry's token")?;
        let body: serde_json::Value = serde_json::from_str(&text).context("reading the registry's token")?;
        body.get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|token| token.as_str())
            .map(str::to_string)
            .context("the registry's token answer has no token")
    }

    fn credentials(&self, registry: &str) -> Result<Option<Credentials>> {
        let Some(path) = &self.docker_config else { return Ok(None) };
        let Ok(text) = std::fs::read_to_string(path) else { return Ok(None) };
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("cannot parse the docker config {}", path.display()))?;
        let keys = auth_keys(registry);
        let helper = keys
            .iter()
            .find_map(|key| config.pointer(&format!("/credHelpers/{}", key.replace('/', "~1")))?.as_str())
            .or_else(|| config.get("credsStore")?.as_str());
        if let Some(helper) = helper {
            if let Some(credentials) = credentials_from_helper(helper, &keys[0], self.timeout)? {
                return Ok(Some(credentials));
            }
        }
        for key in &keys {
            let auth =
                config.pointer(&format!("/auths/{}/auth", key.replace('/', "~1"))).and_then(|auth| auth.as_str());
            if let Some(auth) = auth {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .with_context(|| format!("the saved login for {registry} in {} is not valid", path.display()))?;
                if let Some((username, secret)) = decoded.split_once(':') {
                    crate::secrets::mask(secret);
                    return Ok(Some(Credentials { username: username.to_string(), secret: secret.to_string() }));
                }
            }
        }
        Ok(None)
    }
}

/// `request` with the `Authorization` header, when there is one.
fn authorized<B>(request: ureq::RequestBuilder<B>, authorization: Option<&str>) -> ureq::RequestBuilder<B> {
    match authorization {
        Some(authorization) => request.header("Authorization", authorization),
        None => request,
    }
}

fn interpret(status: u16, repository: &Repository) -> Result<bool> {
    match status {
        200..=299 => Ok(true),
        404 => Ok(false),
        401 | 403 => bail!(
            "registry {} denied access (HTTP {status}): run `docker login {}` with an account that can pull {}",
            repository.registry,
            repository.registry,
            repository.path
        ),
        other => bail!("registry {} answered HTTP {other}", repository.registry),
    }
}

fn basic(credentials: &Credentials) -> String {
    let pair = format!("{}:{}", credentials.username, credentials.secret);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
}

/// `Bearer realm="https://auth",service="reg",scope="x"` → its fields.
fn parse_challenge(challenge: &str) -> BTreeMap<String, String> {
    let rest = challenge.split_once(' ').map(|(_, rest)| rest).unwrap_or_default();
    let mut fields = BTreeMap::new();
    let mut remaining = rest.trim();
    while let Some((key, after)) = remaining.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_lowercase();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (&quoted[..end], quoted.get(end + 1..).unwrap_or_default())
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        fields.insert(key, value.to_string());
        remaining = next.trim_start_matches(',').trim();
    }
    fields
}

/// The keys a registry's login may be stored under in the docker config.
fn auth_keys(registry: &str) -> Vec<String> {
    if registry == "docker.io" {
        vec!["https://index.docker.io/v1/".to_string(), "docker.io".to_string(), "index.docker.io".to_string()]
    } else {
        vec![registry.to_string(), format!("https://{registry}"), format!("http://{registry}")]
    }
}

/// The URL of the blob `digest` in `repository`; only a sha256 digest reaches it.
fn blob_url(repository: &Repository, digest: &str) -> Result<String> {
    if !crate::inputs::is_digest(digest) {
        bail!("`{}` is not a sha256 digest", crate::git::escaped(digest));
    }
    Ok(format!("{}/v2/{}/blobs/{digest}", registry_base_url(repository), repository.path))
}

fn registry_base_url(repository: &Repository) -> String {
    let host = if repository.registry == "docker.io" { "registry-1.docker.io" } else { repository.registry.as_str() };
    let scheme = if repository.is_loopback_registry() { "http" } else { "https" };
    format!("{scheme}://{host}")
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker").join("config.json"))
}

fn credentials_from_helper(helper: &str, server: &str, timeout: Duration) -> Result<Option<Credentials>> {
    let program = format!("docker-credential-{helper}");
    let expression = duct::cmd!(&program, "get").stdin_bytes(server.as_bytes());
    let output = match crate::docker::run_with_timeout(expression, "asking a credential helper", &program, timeout) {
        Ok(output) => output,
        // Not installed: no credentials from it.
        Err(error) if error.downcast_ref::<std::io::Error>().is_some() => return Ok(None),
        Err(error) => return Err(error),
    };
    if !output.success {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(&output.stdout).context("reading the credential helper's answer")?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_string);
    Ok(field("Username").zip(field("Secret")).map(|(username, secret)| {
        crate::secrets::mask(&secret);
        Credentials { username, secret }
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn retries_stop_at_success_at_the_limit_and_at_an_error_not_worth_retrying() {
        let count = |fail_until: u32, worth: bool| {
            let mut calls = 0;
            let result = super::retried(
                |_| worth,
                || {
                    calls += 1;
                    if calls <= fail_until {
                        anyhow::bail!("HTTP 500")
                    }
                    Ok(())
                },
            );
            (calls, result.is_ok())
        };
        assert_eq!(count(1, true), (2, true));
        assert_eq!(count(9, true), (1 + super::WRITE_BACKOFF.retries, false));
        assert_eq!(count(9, false), (1, false));
    }

    use super::*;

    #[test]
    fn challenges_parse() {
        let fields = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#,
        );
        assert_eq!(fields["realm"], "https://auth.example/token");
        assert_eq!(fields["service"], "registry.example");
        assert_eq!(fields["scope"], "repository:a:pull");
    }

    #[test]
    fn urls_use_http_only_on_loopback() {
        assert_eq!(registry_base_url(&Repository::parse("127.0.0.1:5000/a").unwrap()), "http://127.0.0.1:5000");
        assert_eq!(registry_base_url(&Repository::parse("ghcr.io/o/a").unwrap()), "https://ghcr.io");
        assert_eq!(registry_base_url(&Repository::parse("a").unwrap()), "https://registry-1.docker.io");
    }

    #[test]
    fn a_registry_that_is_not_there_is_unknown_not_missing() {
        // Port 9 (discard) is closed on loopback here: the connection is refused at once.
        let client = RegistryClient::new(Duration::from_secs(2), None);
        let repository = Repository::parse("127.0.0.1:9/nothing").unwrap();
        match client.exists(&repository, "tag") {
            Existence::Unknown(why) => assert!(why.contains("registry 127.0.0.1:9 did not answer"), "{why}"),
            other => panic!("expected Unknown, got {other:?}"),
        }
    }

    #[test]
    fn saved_logins_are_read_from_the_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("user:pass");
        std::fs::write(&path, format!(r#"{{"auths":{{"reg.example":{{"auth":"{auth}"}}}}}}"#)).unwrap();
        let client = RegistryClient::new(Duration::from_secs(1), Some(path));
        let credentials = client.credentials("reg.example").unwrap().unwrap();
        assert_eq!((credentials.username.as_str(), credentials.secret.as_str()), ("user", "pass"));
        assert!(client.credentials("other.example").unwrap().is_none());
    }
}
