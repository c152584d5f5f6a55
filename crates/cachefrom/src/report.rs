//! What a run did: BuildKit's own per-step cache record, and the report as a table, JSON and
//! markdown.
//!
//! Steps are read from `--progress=rawjson`: a stream of JSON objects, each vertex update with
//! `digest`, `name`, `started`, `completed`, and `"cached": true` on a hit. A hit whose layers
//! are downloaded from a remote cache says `cached` only on its first update and never prints
//! `CACHED` in plain output, so a step counts as cached if any update for its digest says so.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::plan::Level;

/// One build step as BuildKit reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// BuildKit's name for it, e.g. `[deps 3/6] COPY Cargo.toml Cargo.lock ./`.
    pub name: String,
    /// The stage it belongs to (the word after `[`).
    pub stage: String,
    /// True when BuildKit took it from the cache.
    pub cached: bool,
    /// Seconds from start to completion, when both were reported.
    pub seconds: Option<f64>,
    /// BuildKit's error for it, if it failed.
    pub error: Option<String>,
    /// Bytes BuildKit fetched for it (layers it downloaded: a hit's import).
    #[serde(default)]
    pub bytes: u64,
    /// The platform it was built for, in a build for several platforms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

impl StepReport {
    /// The instruction without BuildKit's `[stage i/N] ` prefix: what names the step across runs.
    pub fn instruction(&self) -> &str {
        match self.name.split_once("] ") {
            Some((prefix, rest)) if prefix.starts_with('[') => rest,
            _ => &self.name,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Vertex {
    name: String,
    cached: bool,
    /// True once the vertex printed a line: it ran, whatever it was first reported as.
    logged: bool,
    started: Option<String>,
    completed: Option<String>,
    error: Option<String>,
    order: usize,
    /// The largest total BuildKit reported for each layer it fetched (`sha256:…` statuses).
    fetched: BTreeMap<String, u64>,
}

/// Collects BuildKit's `rawjson` progress, line by line, and hands back what is not JSON.
#[derive(Debug, Default)]
pub struct ProgressLog {
    pending: String,
    depth: i64,
    in_string: bool,
    escaped: bool,
    vertices: BTreeMap<String, Vertex>,
    /// Log lines of each vertex, as printed by the step (decoded).
    logs: Vec<(String, String)>,
    /// The unfinished last line of each vertex's log.
    partial: BTreeMap<String, String>,
}

/// The longest unfinished log line kept waiting for its end.
const MAX_PARTIAL_LINE: usize = 64 * 1024;

/// An event worth showing the user, decoded from the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressEvent {
    /// A vertex finished: its name, whether it was cached, seconds, error.
    Finished {
        /// BuildKit's name of the vertex.
        name: String,
        /// Cache hit.
        cached: bool,
        /// Duration, when known.
        seconds: Option<f64>,
        /// Error, if it failed.
        error: Option<String>,
    },
    /// A vertex started.
    Started {
        /// BuildKit's name of the vertex.
        name: String,
    },
    /// A line the step printed.
    Log {
        /// BuildKit's name of the vertex.
        vertex: String,
        /// The line.
        line: String,
    },
    /// A line that is not part of the JSON stream (docker's own errors and warnings).
    Text(String),
}

impl ProgressLog {
    /// Feeds one line of docker's output; returns what happened, in order.
    pub fn feed_line(&mut self, line: &str) -> Vec<ProgressEvent> {
        if self.depth == 0 && !line.trim_start().starts_with('{') {
            if line.trim().is_empty() {
                return Vec::new();
            }
            return vec![ProgressEvent::Text(line.to_string())];
        }
        for c in line.chars() {
            if self.in_string {
                match (self.escaped, c) {
                    (true, _) => self.escaped = false,
                    (false, '\\') => self.escaped = true,
                    (false, '"') => self.in_string = false,
                    _ => {}
                }
            } else {
                match c {
                    '"' => self.in_string = true,
                    '{' => self.depth += 1,
                    '}' => self.depth -= 1,
                    _ => {}
                }
            }
        }
        self.pending.push_str(line);
        self.pending.push('\n');
        if self.depth > 0 {
            return Vec::new();
        }
        self.depth = 0;
        let text = std::mem::take(&mut self.pending);
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(value) => self.absorb(&value),
            Err(_) => vec![ProgressEvent::Text(text.trim_end().to_string())],
        }
    }

    fn absorb(&mut self, value: &serde_json::Value) -> Vec<ProgressEvent> {
        let mut events = Vec::new();
        for update in value.get("vertexes").and_then(|v| v.as_array()).into_iter().flatten() {
            let Some(digest) = update.get("digest").and_then(|d| d.as_str()) else { continue };
            let order = self.vertices.len();
            let vertex =
                self.vertices.entry(digest.to_string()).or_insert_with(|| Vertex { order, ..Vertex::default() });
            let was_started = vertex.started.is_some();
            let was_completed = vertex.completed.is_some();
            if let Some(name) = update.get("name").and_then(|n| n.as_str()) {
                vertex.name = name.to_string();
            }
            if update.get("cached").and_then(|c| c.as_bool()) == Some(true) {
                vertex.cached = true;
            }
            if let Some(started) = update.get("started").and_then(|s| s.as_str()) {
                vertex.started.get_or_insert_with(|| started.to_string());
            }
            if let Some(completed) = update.get("completed").and_then(|s| s.as_str()) {
                vertex.completed = Some(completed.to_string());
            }
            if let Some(error) = update.get("error").and_then(|e| e.as_str()) {
                vertex.error = Some(error.to_string());
            }
            if !was_started && vertex.started.is_some() && vertex.completed.is_none() {
                events.push(ProgressEvent::Started { name: vertex.name.clone() });
            }
            if !was_completed && (vertex.completed.is_some() || vertex.error.is_some()) {
                events.push(ProgressEvent::Finished {
                    name: vertex.name.clone(),
                    cached: vertex.cached,
                    seconds: seconds_between(vertex.started.as_deref(), vertex.completed.as_deref()),
                    error: vertex.error.clone(),
                });
            }
        }
        for status in value.get("statuses").and_then(|v| v.as_array()).into_iter().flatten() {
            let (Some(digest), Some(id)) =
                (status.get("vertex").and_then(|v| v.as_str()), status.get("id").and_then(|v| v.as_str()))
            else {
                continue;
            };
            let total = status.get("total").and_then(|t| t.as_u64()).unwrap_or(0);
            if let (Some(vertex), true) = (self.vertices.get_mut(digest), id.starts_with("sha256:")) {
                let entry = vertex.fetched.entry(id.to_string()).or_insert(0);
                *entry = (*entry).max(total);
            }
        }
        for log in value.get("logs").and_then(|v| v.as_array()).into_iter().flatten() {
            let digest = log.get("vertex").and_then(|v| v.as_str()).unwrap_or_default();
            let name = match self.vertices.get_mut(digest) {
                Some(vertex) => {
                    vertex.logged = true;
                    vertex.name.clone()
                }
                None => String::new(),
            };
            let data = log.get("data").and_then(|d| d.as_str()).unwrap_or_default();
            let bytes = base64_decode(data);
            // A chunk can end mid-line (a program writes a line in pieces): the rest waits for
            // its end, or for the step's.
            let pending = self.partial.entry(digest.to_string()).or_default();
            pending.push_str(&String::from_utf8_lossy(&bytes));
            let mut lines = Vec::new();
            while let Some(at) = pending.find('\n') {
                lines.push(pending[..at].trim_end_matches('\r').to_string());
                pending.drain(..=at);
            }
            if pending.len() > MAX_PARTIAL_LINE {
                lines.push(std::mem::take(pending));
            }
            for line in lines {
                self.logs.push((name.clone(), line.clone()));
                events.push(ProgressEvent::Log { vertex: name.clone(), line });
            }
        }
        // A finished step's unfinished line is a line.
        let finished: Vec<String> = self
            .partial
            .iter()
            .filter(|(digest, pending)| {
                !pending.is_empty()
                    && self.vertices.get(*digest).is_some_and(|v| v.completed.is_some() || v.error.is_some())
            })
            .map(|(digest, _)| digest.clone())
            .collect();
        for digest in finished {
            let line = self.partial.remove(&digest).unwrap_or_default();
            let name = self.vertices.get(&digest).map(|vertex| vertex.name.clone()).unwrap_or_default();
            self.logs.push((name.clone(), line.clone()));
            events.push(ProgressEvent::Log { vertex: name, line });
        }
        events
    }

    /// The build steps of the Dockerfile (not `[internal]`, exporting or `FROM` resolution), in
    /// the order BuildKit first reported them.
    pub fn steps(&self) -> Vec<StepReport> {
        let mut vertices: Vec<&Vertex> = self.vertices.values().collect();
        vertices.sort_by_key(|vertex| vertex.order);
        vertices
            .into_iter()
            .filter_map(|vertex| {
                let (platform, stage, instruction) = parse_step(&vertex.name)?;
                if instruction.starts_with("FROM ") {
                    return None;
                }
                Some(StepReport {
                    name: vertex.name.clone(),
                    stage,
                    // A step whose output shows ran.
                    cached: vertex.cached && !vertex.logged,
                    seconds: seconds_between(vertex.started.as_deref(), vertex.completed.as_deref()),
                    error: vertex.error.clone(),
                    bytes: vertex.fetched.values().sum(),
                    platform,
                })
            })
            .collect()
    }

    /// Seconds BuildKit spent importing cache manifests (`importing cache manifest from …`).
    pub fn manifest_import_seconds(&self) -> f64 {
        self.vertices
            .values()
            .filter(|vertex| vertex.name.starts_with("importing cache manifest"))
            .filter_map(|vertex| seconds_between(vertex.started.as_deref(), vertex.completed.as_deref()))
            .sum()
    }

    /// Errors BuildKit reported on vertices that are not steps (e.g. a failed cache export).
    pub fn other_errors(&self) -> Vec<(String, String)> {
        self.vertices
            .values()
            .filter(|vertex| parse_step_name(&vertex.name).is_none())
            .filter_map(|vertex| Some((vertex.name.clone(), vertex.error.clone()?)))
            .collect()
    }

    /// True when the record shows every step of the stage BuildKit calls `name` done or cached
    /// (`[name i/N]` for each i up to N) and none of its steps failed or was cancelled. A stage
    /// with no step of its own in the record does not count as finished.
    pub fn stage_finished(&self, name: &str) -> bool {
        // Each platform's steps on their own (a build for several platforms runs each stage once a platform).
        let mut per_platform: BTreeMap<Option<String>, (u32, std::collections::BTreeSet<u32>)> = BTreeMap::new();
        for vertex in self.vertices.values() {
            let Some((platform, position, of)) = step_place(&vertex.name, name) else { continue };
            if vertex.error.is_some() {
                return false;
            }
            let entry = per_platform.entry(platform).or_default();
            entry.0 = of;
            if vertex.completed.is_some() {
                entry.1.insert(position);
            }
        }
        !per_platform.is_empty()
            && per_platform
                .values()
                .all(|(total, done)| *total > 0 && (1..=*total).all(|position| done.contains(&position)))
    }

    /// True when a step of the stage BuildKit calls `name` failed (not merely cancelled).
    pub fn stage_failed(&self, name: &str) -> bool {
        self.vertices.values().any(|vertex| {
            step_position(&vertex.name, name).is_some()
                && vertex.error.as_deref().is_some_and(|error| !error.contains("context canceled"))
        })
    }

    /// Seconds from the first start to the last completion of the stage's steps.
    pub fn stage_seconds(&self, name: &str) -> Option<f64> {
        let mut first: Option<f64> = None;
        let mut last: Option<f64> = None;
        for vertex in self.vertices.values().filter(|vertex| step_position(&vertex.name, name).is_some()) {
            if let Some(started) = vertex.started.as_deref().and_then(parse_rfc3339_seconds) {
                first = Some(first.map_or(started, |first: f64| first.min(started)));
            }
            if let Some(completed) = vertex.completed.as_deref().and_then(parse_rfc3339_seconds) {
                last = Some(last.map_or(completed, |last: f64| last.max(completed)));
            }
        }
        Some((last? - first?).max(0.0))
    }

    /// True when BuildKit reported at least one vertex.
    pub fn saw_anything(&self) -> bool {
        !self.vertices.is_empty()
    }
}

/// The classic builder's log (`DOCKER_BUILDKIT=0`): `Step 3/5 : RUN …` starts a step,
/// `---> Using cache` marks it cached, and each `FROM … [AS name]` starts a stage.
#[derive(Debug, Default)]
pub struct ClassicLog {
    stage: Option<String>,
    stages_seen: usize,
    steps: Vec<StepReport>,
}

impl ClassicLog {
    /// Feeds one line of `docker build` output.
    pub fn feed_line(&mut self, line: &str) {
        let trimmed = line.trim();
        if trimmed == "---> Using cache" {
            if let Some(step) = self.steps.last_mut() {
                step.cached = true;
            }
            return;
        }
        let Some(rest) = trimmed.strip_prefix("Step ") else { return };
        let Some((_, instruction)) = rest.split_once(" : ") else { return };
        let mut words = instruction.split_whitespace();
        if words.next().is_some_and(|keyword| keyword.eq_ignore_ascii_case("FROM")) {
            let words: Vec<&str> = words.collect();
            let name = match words.as_slice() {
                [.., as_word, name] if as_word.eq_ignore_ascii_case("AS") => name.to_lowercase(),
                _ => format!("stage-{}", self.stages_seen),
            };
            self.stages_seen += 1;
            self.stage = Some(name);
            return;
        }
        if let Some(stage) = &self.stage {
            self.steps.push(StepReport {
                name: format!("[{stage}] {instruction}"),
                stage: stage.clone(),
                cached: false,
                seconds: None,
                error: None,
                bytes: 0,
                platform: None,
            });
        }
    }

    /// The steps seen, in order (not `FROM`, not global `ARG`s).
    pub fn steps(&self) -> Vec<StepReport> {
        self.steps.clone()
    }
}

/// `[deps 3/6] COPY a b` with `stage` `deps` → `(3, 6)`.
fn step_position(vertex_name: &str, stage: &str) -> Option<(u32, u32)> {
    step_place(vertex_name, stage).map(|(_, done, total)| (done, total))
}

/// `[linux/arm64 deps 2/3] …` for `deps` → `(Some("linux/arm64"), 2, 3)`; the platform is there
/// in a build for several platforms.
fn step_place(vertex_name: &str, stage: &str) -> Option<(Option<String>, u32, u32)> {
    let rest = vertex_name.strip_prefix('[')?;
    let (platform, rest) = match rest.split_once(' ') {
        Some((first, after)) if first.contains('/') && after.starts_with(stage) => (Some(first.to_string()), after),
        _ => (None, rest),
    };
    let rest = rest.strip_prefix(stage)?.strip_prefix(' ')?;
    let (position, _) = rest.split_once(']')?;
    let (done, total) = position.split_once('/')?;
    Some((platform, done.parse().ok()?, total.parse().ok()?))
}

/// `[deps 3/6] COPY a b` → `("deps", "COPY a b")`; `[linux/arm64 deps 3/6] …` too.
fn parse_step_name(name: &str) -> Option<(String, String)> {
    parse_step(name).map(|(_, stage, instruction)| (stage, instruction))
}

/// The platform a step is built for: BuildKit writes a step that runs on the build platform for
/// another as `linux/amd64->arm64`.
fn target_platform(platform: &str) -> String {
    match platform.split_once("->") {
        Some((build, target)) if !target.contains('/') => {
            format!("{}/{target}", build.split('/').next().unwrap_or("linux"))
        }
        Some((_, target)) => target.to_string(),
        None => platform.to_string(),
    }
}

/// `[linux/arm64 deps 3/6] COPY a b` → `(Some("linux/arm64"), "deps", "COPY a b")`.
pub(crate) fn parse_step(name: &str) -> Option<(Option<String>, String, String)> {
    let rest = name.strip_prefix('[')?;
    let (inside, instruction) = rest.split_once("] ")?;
    // A Dockerfile of one stage: `[2/3] COPY …`, no stage named.
    let (before, position) = inside.rsplit_once(' ').unwrap_or(("", inside));
    let (platform, stage) = match before.rsplit_once(' ') {
        Some((platform, stage)) if platform.contains('/') && !platform.contains(' ') => {
            (Some(platform.to_string()), stage)
        }
        _ if before.contains('/') => (Some(before.to_string()), ""),
        _ => (None, before),
    };
    let (done, total) = position.split_once('/')?;
    if stage == "internal" || stage.contains(' ') || done.parse::<u32>().is_err() || total.parse::<u32>().is_err() {
        return None;
    }
    Some((platform.map(|platform| target_platform(&platform)), stage.to_string(), instruction.to_string()))
}

fn seconds_between(started: Option<&str>, completed: Option<&str>) -> Option<f64> {
    Some(parse_rfc3339_seconds(completed?)? - parse_rfc3339_seconds(started?)?)
}

/// Seconds since the epoch of an RFC 3339 UTC time such as `2026-11-22T22:37:22.362111793Z`.
fn parse_rfc3339_seconds(text: &str) -> Option<f64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date_parts = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date_parts.next()??, date_parts.next()??, date_parts.next()??);
    let mut time_parts = time.split(':');
    let hour: i64 = time_parts.next()?.parse().ok()?;
    let minute: i64 = time_parts.next()?.parse().ok()?;
    let second: f64 = time_parts.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60) as f64 + second)
}

fn base64_decode(data: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(data).unwrap_or_default()
}

/// What became of one stage; in JSON `built`, `failed`, `not built` or `unchanged`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageStatus {
    /// Every step finished.
    #[serde(rename = "built")]
    Built,
    /// A step of the stage failed (or the stage was the target of a failed build).
    #[serde(rename = "failed")]
    Failed,
    /// The build stopped before the stage finished.
    #[serde(rename = "not built")]
    NotBuilt,
    /// Nothing was built: the inputs were those recorded on the cache (see [`RunReport::unchanged`]).
    #[serde(rename = "unchanged")]
    Unchanged,
}

impl std::fmt::Display for StageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StageStatus::Built => "built",
            StageStatus::Failed => "failed",
            StageStatus::NotBuilt => "not built",
            StageStatus::Unchanged => "unchanged",
        })
    }
}

/// What happened to one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// The stage's name.
    pub name: String,
    /// The cache source the stage's own steps were read from, or `None`.
    pub cache_source: Option<String>,
    /// The level of the chain that source belongs to.
    pub cache_level: Option<Level>,
    /// Every source passed to `--cache-from`, in priority order.
    pub cache_from: Vec<String>,
    /// Steps of this stage BuildKit took from the cache.
    pub steps_cached: usize,
    /// Steps of this stage (not counting `FROM`).
    pub steps_total: usize,
    /// Wall-clock seconds of the stage's build.
    pub seconds: f64,
    /// Where the stage's cache was written.
    pub pushed: Vec<String>,
    /// What became of the stage.
    pub status: StageStatus,
    /// Each step as BuildKit reported it.
    pub steps: Vec<StepReport>,
    /// Cache problems that did not stop the build, one line each.
    pub warnings: Vec<String>,
    /// Why the stage missed its cache, in one line (when it missed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miss_reason: Option<String>,
    /// Why the stage missed, structured: `step`, `kind` (files, base, arg, instruction,
    /// no-cache, unknown) and the details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miss: Option<crate::explain::Miss>,
    /// What the hits saved: the seconds their steps took when they last ran (the cache's record),
    /// when the cache read has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_seconds: Option<f64>,
    /// What importing the hits cost: the seconds of the steps BuildKit took from the cache
    /// (fetching their layers), and the bytes it fetched for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_seconds: Option<f64>,
    /// See `import_seconds`.
    #[serde(default)]
    pub import_bytes: u64,
    /// In a build for several platforms: the steps of each platform.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformSteps>,
}

/// What happened in one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Each stage, in build order.
    pub stages: Vec<StageReport>,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// The backend used.
    pub backend: String,
    /// Set when the backend asked for could not be served and `inline` was used instead.
    pub backend_fallback: Option<String>,
    /// The level of the chain the stages were served from, when they all came from one.
    pub level: Option<Level>,
    /// Seconds spent checking which caches exist.
    pub check_seconds: f64,
    /// True when every stage built.
    pub success: bool,
    /// The build's error, when it failed.
    pub error: Option<String>,
    /// Run-wide warnings (registry unreachable, …).
    pub warnings: Vec<String>,
    /// Set when nothing was built: the inputs were those recorded on the cache this run writes,
    /// so the cache and the image it pushed were reused (says which cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged: Option<String>,
    /// The engine that built, in one line (its version, root directory, driver, BuildKit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Set when the run was cancelled (a signal, or [`crate::docker::Cancel::request`]): by what.
    /// The stages it finished had their caches written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<String>,
    /// Each cache mount kept across runners: what restoring and saving it cost, what it saved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountReport>,
    /// In all: what the hits saved (seconds their steps took when they ran), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_seconds: Option<f64>,
    /// In all: what importing the hits cost, in seconds and bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_seconds: Option<f64>,
    /// See `import_seconds`.
    #[serde(default)]
    pub import_bytes: u64,
}

/// A stage's steps for one platform, in a build for several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlatformSteps {
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Steps taken from the cache.
    pub steps_cached: usize,
    /// Steps in all.
    pub steps_total: usize,
}

impl PlatformSteps {
    /// The steps of `steps` for each platform they name, in platform order.
    pub fn of(steps: &[StepReport]) -> Vec<PlatformSteps> {
        let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for step in steps {
            if let Some(platform) = &step.platform {
                let entry = counts.entry(platform.clone()).or_default();
                entry.0 += usize::from(step.cached);
                entry.1 += 1;
            }
        }
        counts
            .into_iter()
            .map(|(platform, (steps_cached, steps_total))| PlatformSteps { platform, steps_cached, steps_total })
            .collect()
    }
}

/// One cache mount of a run ([`crate::mounts`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MountReport {
    /// The id BuildKit keys it on.
    pub id: String,
    /// Where the `RUN` mounts it.
    pub target: String,
    /// Where its contents were restored from, if anywhere.
    pub restored_from: Option<String>,
    /// The level that was, if any.
    pub restored_level: Option<Level>,
    /// Bytes fetched to restore it (compressed), and the seconds fetching and unpacking took.
    pub restore_bytes: u64,
    /// See `restore_bytes`.
    pub restore_seconds: f64,
    /// Its size after the build, before compression, when it was packed.
    pub size_bytes: Option<u64>,
    /// Bytes uploaded to save it (0 when its contents were stored already), and the seconds
    /// packing and writing took.
    pub save_bytes: u64,
    /// See `save_bytes`.
    pub save_seconds: f64,
    /// Where it was written.
    pub saved_to: Vec<String>,
    /// Seconds of the steps that use it, this run (steps that ran, not layer hits).
    pub step_seconds: Option<f64>,
    /// Seconds of those steps on the last run that started with this mount empty.
    pub cold_step_seconds: Option<f64>,
    /// What the restored contents saved: `cold_step_seconds - step_seconds`.
    pub saved_seconds: Option<f64>,
    /// Why it was not restored or saved, when it was not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl MountReport {
    /// One line for the table: `mount /root/.cache: restored from cachemount-….main (12.3 MB,
    /// 1.2s), saved 0 B (stored already, 0.8s); step 3.1s, 40.2s empty: 37.1s saved`.
    pub fn line(&self) -> String {
        let restored = match &self.restored_from {
            Some(from) => format!(
                "restored from {} ({}, {:.1}s)",
                short_location(from),
                human_bytes(self.restore_bytes),
                self.restore_seconds
            ),
            None => "not restored (empty)".to_string(),
        };
        let saved = match (self.saved_to.is_empty(), self.save_bytes) {
            (true, _) => "not saved".to_string(),
            (false, 0) => format!("saved, nothing uploaded (stored already, {:.1}s)", self.save_seconds),
            (false, bytes) => format!("saved {} ({:.1}s)", human_bytes(bytes), self.save_seconds),
        };
        let timing = match (self.step_seconds, self.cold_step_seconds, self.saved_seconds) {
            (Some(now), Some(cold), Some(saved)) => {
                format!("; its steps {now:.1}s, {cold:.1}s from empty: {saved:.1}s saved")
            }
            (Some(now), _, _) => format!("; its steps {now:.1}s"),
            _ => String::new(),
        };
        format!("mount {}: {restored}, {saved}{timing}", self.target)
    }
}

/// `3/4`, or `3/4 (linux/amd64 2/2, linux/arm64 1/2)` in a build for several platforms.
fn cached_cell(stage: &StageReport) -> String {
    let all = format!("{}/{}", stage.steps_cached, stage.steps_total);
    if stage.platforms.is_empty() {
        return all;
    }
    let each: Vec<String> = stage
        .platforms
        .iter()
        .map(|platform| format!("{} {}/{}", platform.platform, platform.steps_cached, platform.steps_total))
        .collect();
    format!("{all} ({})", each.join(", "))
}

/// `0.4s, 20.1 MB`: what importing hits cost; `-` when nothing was imported.
fn import_cell(seconds: Option<f64>, bytes: u64) -> String {
    match seconds {
        Some(seconds) => format!("{seconds:.1}s, {}", human_bytes(bytes)),
        None => "-".to_string(),
    }
}

impl RunReport {
    /// `the hits saved 41.0s of building; importing them cost 1.2s and 20.1 MB`, when known.
    pub fn math_line(&self) -> Option<String> {
        let import = self.import_seconds?;
        Some(match self.saved_seconds {
            Some(saved) => format!(
                "the hits saved {saved:.1}s of building; importing them cost {import:.1}s and {}",
                human_bytes(self.import_bytes)
            ),
            None => format!(
                "importing the hits cost {import:.1}s and {} (what they saved is known once a cache carries the steps' times)",
                human_bytes(self.import_bytes)
            ),
        })
    }

    /// Fills the run's totals of the hits' math from its stages.
    pub fn total_math(&mut self) {
        let sum = |values: Vec<f64>| (!values.is_empty()).then(|| values.iter().sum::<f64>());
        self.saved_seconds = sum(self.stages.iter().filter_map(|stage| stage.saved_seconds).collect());
        self.import_seconds = sum(self.stages.iter().filter_map(|stage| stage.import_seconds).collect());
        self.import_bytes = self.stages.iter().map(|stage| stage.import_bytes).sum();
    }
}

/// `12.3 MB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MB", bytes as f64 / 1_048_576.0),
    }
}

/// The tag of an image reference, or the file name of a path: what tells locations apart in a table.
fn short_location(location: &str) -> String {
    let last = location.rsplit('/').next().unwrap_or(location);
    match last.rsplit_once(':') {
        Some((_, tag)) if !location.starts_with('/') => tag.to_string(),
        _ => last.to_string(),
    }
}

/// The cache source as a table shows it: hits with no remote source came from the local build cache.
fn source_cell(stage: &StageReport, show: impl Fn(&str) -> String) -> String {
    match (&stage.cache_source, stage.steps_cached) {
        (Some(source), _) => show(source),
        (None, 0) => "none".to_string(),
        (None, _) => "local build cache".to_string(),
    }
}

impl StageReport {
    /// The report of stage `name` with `status` and nothing else yet: no steps, no cache.
    pub fn new(name: &str, status: StageStatus) -> StageReport {
        StageReport {
            name: name.to_string(),
            cache_source: None,
            cache_level: None,
            cache_from: Vec::new(),
            steps_cached: 0,
            steps_total: 0,
            seconds: 0.0,
            pushed: Vec::new(),
            status,
            steps: Vec::new(),
            warnings: Vec::new(),
            miss_reason: None,
            miss: None,
            saved_seconds: None,
            import_seconds: None,
            import_bytes: 0,
            platforms: Vec::new(),
        }
    }
}

impl RunReport {
    /// The run's warnings, then each stage's, each cause once (a warning several stages share
    /// is shown once).
    pub fn distinct_warnings(&self) -> Vec<&String> {
        let mut seen = BTreeSet::new();
        self.warnings
            .iter()
            .chain(self.stages.iter().flat_map(|stage| stage.warnings.iter()))
            .filter(|warning| seen.insert(warning.as_str()))
            .collect()
    }

    /// All cached steps over all steps, across stages.
    pub fn totals(&self) -> (usize, usize) {
        self.stages.iter().fold((0, 0), |(c, t), s| (c + s.steps_cached, t + s.steps_total))
    }

    /// The report as an aligned text table.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "stage".to_string(),
            "cached".into(),
            "seconds".into(),
            "source".into(),
            "pushed".into(),
            "hits saved".into(),
            "import".into(),
        ]];
        for stage in &self.stages {
            rows.push([
                stage.name.clone(),
                cached_cell(stage),
                format!("{:.1}", stage.seconds),
                source_cell(stage, short_location),
                if stage.pushed.is_empty() {
                    "-".into()
                } else {
                    stage.pushed.iter().map(|p| short_location(p)).collect::<Vec<_>>().join(" ")
                },
                stage.saved_seconds.map_or("-".to_string(), |saved| format!("{saved:.1}s")),
                import_cell(stage.import_seconds, stage.import_bytes),
            ]);
        }
        let widths: Vec<usize> =
            (0..7).map(|i| rows.iter().map(|row| row[i].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for row in &rows {
            let line: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        let (cached, total) = self.totals();
        let _ = writeln!(
            out,
            "{} steps cached of {}, {:.1}s in all ({} backend{}){}",
            cached,
            total,
            self.seconds,
            self.backend,
            self.backend_fallback.as_ref().map(|why| format!(", {why}")).unwrap_or_default(),
            if self.success { String::new() } else { ": FAILED".to_string() }
        );
        if let Some(unchanged) = &self.unchanged {
            let _ = writeln!(out, "cachefrom: {unchanged}");
        }
        if let Some(line) = self.math_line() {
            let _ = writeln!(out, "cachefrom: {line}");
        }
        for mount in &self.mounts {
            let _ = writeln!(out, "cachefrom: {}", mount.line());
        }
        for stage in &self.stages {
            if let Some(reason) = &stage.miss_reason {
                let _ = writeln!(out, "cachefrom: {}: {reason}", stage.name);
            }
        }
        for warning in self.distinct_warnings() {
            let _ = writeln!(out, "cachefrom: warning: {warning}");
        }
        out
    }

    /// The report as a markdown table (for `$GITHUB_STEP_SUMMARY`).
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "### cachefrom\n\n| stage | cached steps | seconds | cache source | pushed | hits saved | import |\n|---|---|---|---|---|---|---|\n",
        );
        for stage in &self.stages {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {} | {} | {} | {} |",
                stage.name,
                cached_cell(stage),
                stage.seconds,
                source_cell(stage, |s| format!("`{s}`")),
                stage.pushed.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join("<br>"),
                stage.saved_seconds.map_or("-".to_string(), |saved| format!("{saved:.1}s")),
                import_cell(stage.import_seconds, stage.import_bytes)
            );
        }
        let (cached, total) = self.totals();
        let _ = writeln!(out, "\n{cached} of {total} steps cached, {:.1}s, {} backend.", self.seconds, self.backend);
        if let Some(line) = self.math_line() {
            let _ = writeln!(out, "\n{line}");
        }
        for mount in &self.mounts {
            let _ = writeln!(out, "\n- {}", mount.line().replace('|', "\\|"));
        }
        for stage in &self.stages {
            if let Some(reason) = &stage.miss_reason {
                let _ = writeln!(out, "\n- **{}**: {}", stage.name, reason.replace('|', "\\|"));
            }
        }
        for warning in self.distinct_warnings() {
            let _ = writeln!(out, "\n> warning: {warning}");
        }
        out
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report is plain data")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rawjson as BuildKit 0.13 prints it: pretty-printed objects; the downloaded hit
    /// (`RUN cargo build`) says `cached` only on its first update.
    const STREAM: &str = r#"{
  "vertexes": [
    {
      "digest": "sha256:from",
      "name": "[deps 1/3] FROM 127.0.0.1:5000/base/rust:trixie@sha256:1",
      "started": "2026-11-22T22:37:22.000000000Z"
    }
  ]
}
WARNING: a line docker printed that is not JSON
{
  "vertexes": [
    {
      "digest": "sha256:copy",
      "name": "[deps 2/3] COPY Cargo.toml ./ {\"braces\": \"in a name\"}",
      "started": "2026-11-22T22:37:22.000000000Z",
      "completed": "2026-11-22T22:37:22.500000000Z",
      "cached": true
    },
    {
      "digest": "sha256:build",
      "name": "[deps 3/3] RUN cargo build",
      "cached": true
    }
  ]
}
{
  "vertexes": [
    {
      "digest": "sha256:build",
      "name": "[deps 3/3] RUN cargo build",
      "started": "2026-11-22T22:37:23.000000000Z",
      "completed": "2026-11-22T22:37:25.250000000Z"
    },
    {
      "digest": "sha256:internal",
      "name": "[internal] load build context",
      "started": "2026-11-22T22:37:22.000000000Z",
      "completed": "2026-11-22T22:37:22.100000000Z"
    },
    {
      "digest": "sha256:app",
      "name": "[app 1/1] RUN make",
      "started": "2026-11-22T22:37:26.000000000Z"
    }
  ]
}
{
  "logs": [
    {
      "vertex": "sha256:app",
      "stream": 1,
      "data": "Y29tcGlsaW5nCmRvbmUK"
    }
  ]
}
{
  "vertexes": [
    {
      "digest": "sha256:app",
      "name": "[app 1/1] RUN make",
      "started": "2026-11-22T22:37:26.000000000Z",
      "completed": "2026-11-22T22:37:27.000000000Z",
      "error": "process \"/bin/sh -c make\" did not complete successfully: exit code: 2"
    }
  ]
}
"#;

    fn record() -> (ProgressLog, Vec<ProgressEvent>) {
        let mut record = ProgressLog::default();
        let events = STREAM.lines().flat_map(|line| record.feed_line(line)).collect();
        (record, events)
    }

    #[test]
    fn a_hit_marked_only_on_its_first_update_counts_as_cached() {
        let (record, _) = record();
        let steps = record.steps();
        let summary: Vec<(&str, bool)> = steps.iter().map(|s| (s.name.as_str(), s.cached)).collect();
        assert_eq!(
            summary,
            [
                ("[deps 2/3] COPY Cargo.toml ./ {\"braces\": \"in a name\"}", true),
                ("[deps 3/3] RUN cargo build", true),
                ("[app 1/1] RUN make", false)
            ]
        );
        assert_eq!(steps[1].seconds, Some(2.25));
        assert!(steps[2].error.as_deref().unwrap().contains("exit code: 2"));
    }

    #[test]
    fn a_step_reported_cached_that_then_prints_ran() {
        // A cache whose blobs cannot be loaded: BuildKit reports the hit, then runs the step.
        let stream = r#"{"vertexes":[{"digest":"sha256:a","name":"[deps 2/2] RUN make","started":"2026-11-22T22:37:22Z","completed":"2026-11-22T22:37:22Z","cached":true}]}
{"vertexes":[{"digest":"sha256:a","name":"[deps 2/2] RUN make","started":"2026-11-22T22:37:23Z"}]}
{"logs":[{"vertex":"sha256:a","stream":1,"data":"Y29tcGlsaW5nCg=="}]}
{"vertexes":[{"digest":"sha256:a","name":"[deps 2/2] RUN make","started":"2026-11-22T22:37:23Z","completed":"2026-11-22T22:37:24Z"}]}"#;
        let mut record = ProgressLog::default();
        stream.lines().for_each(|line| drop(record.feed_line(line)));
        let steps = record.steps();
        assert_eq!(steps.len(), 1);
        assert!(!steps[0].cached, "its output shows, so it ran: {steps:?}");
    }

    #[test]
    fn text_lines_logs_and_completions_come_out_as_events() {
        let (_, events) = record();
        assert!(events.contains(&ProgressEvent::Text("WARNING: a line docker printed that is not JSON".into())));
        assert!(events.contains(&ProgressEvent::Log { vertex: "[app 1/1] RUN make".into(), line: "compiling".into() }));
        assert!(events.iter().any(
            |e| matches!(e, ProgressEvent::Finished { name, cached: true, .. } if name == "[deps 3/3] RUN cargo build")
        ));
    }

    #[test]
    fn the_classic_builders_record() {
        let output = "\
Step 1/5 : ARG BASE=debian
Step 2/5 : FROM ${BASE} AS Prepare
 ---> c9e0329c8264
Step 3/5 : RUN echo one > /one
 ---> Using cache
 ---> 89b3c0ab5ff6
Step 4/5 : FROM prepare
 ---> 89b3c0ab5ff6
Step 5/5 : RUN echo two > /two
 ---> Running in 65d4fc29aba6
 ---> 40394cef2f56
";
        let mut record = ClassicLog::default();
        output.lines().for_each(|line| record.feed_line(line));
        let steps: Vec<(String, String, bool)> =
            record.steps().into_iter().map(|step| (step.stage, step.name, step.cached)).collect();
        assert_eq!(
            steps,
            [
                ("prepare".to_string(), "[prepare] RUN echo one > /one".to_string(), true),
                ("stage-1".to_string(), "[stage-1] RUN echo two > /two".to_string(), false),
            ]
        );
    }

    #[test]
    fn timestamps_parse() {
        let a = parse_rfc3339_seconds("2026-11-22T22:37:22.5Z").unwrap();
        let b = parse_rfc3339_seconds("2026-11-23T00:00:00Z").unwrap();
        assert!((b - a - 4957.5).abs() < 1e-6);
        assert_eq!(parse_rfc3339_seconds("1970-01-01T00:00:01Z"), Some(1.0));
    }

    #[test]
    fn the_report_renders_as_table_markdown_and_json() {
        let mut report = RunReport {
            cancelled: None,
            engine: None,
            stages: vec![StageReport {
                name: "deps".into(),
                cache_source: Some("127.0.0.1:5000/app:cache-deps-main".into()),
                cache_level: Some(Level::Branch),
                cache_from: vec!["127.0.0.1:5000/app:cache-deps-main".into()],
                steps_cached: 5,
                steps_total: 5,
                seconds: 1.25,
                pushed: vec!["127.0.0.1:5000/app:cache-deps-main".into()],
                status: StageStatus::Built,
                steps: vec![],
                warnings: vec![],
                miss_reason: None,
                miss: None,
                saved_seconds: Some(12.0),
                import_seconds: Some(0.5),
                import_bytes: 20_000_000,
                platforms: vec![],
            }],
            seconds: 2.0,
            backend: "registry".into(),
            backend_fallback: None,
            level: Some(Level::Branch),
            check_seconds: 0.01,
            success: true,
            error: None,
            warnings: vec!["registry slow".into()],
            unchanged: None,
            mounts: Vec::new(),
            saved_seconds: None,
            import_seconds: None,
            import_bytes: 0,
        };
        report.total_math();
        let table = report.table();
        assert!(table.starts_with("stage  cached  seconds  source"), "{table}");
        assert!(
            table.contains("deps   5/5     1.2      cache-deps-main  cache-deps-main  12.0s       0.5s, 19.1 MB"),
            "{table}"
        );
        assert!(
            table.contains("5 steps cached of 5, 2.0s in all (registry backend)\ncachefrom: the hits saved 12.0s of building; importing them cost 0.5s and 19.1 MB\ncachefrom: warning: registry slow"),
            "{table}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!((json["saved_seconds"].as_f64(), json["import_seconds"].as_f64()), (Some(12.0), Some(0.5)));
        assert_eq!(json["stages"][0]["saved_seconds"].as_f64(), Some(12.0));
        assert!(report.markdown().contains("| deps | 5/5 | 1.2 | `127.0.0.1:5000/app:cache-deps-main` |"));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        for field in ["name", "cache_source", "steps_cached", "steps_total", "seconds", "pushed"] {
            assert!(json["stages"][0].get(field).is_some(), "{field}");
        }
        assert_eq!(json["seconds"], 2.0);
    }

    #[test]
    fn a_build_for_several_platforms_counts_each_platforms_steps() {
        assert_eq!(
            parse_step("[linux/arm64 deps 2/3] RUN make"),
            Some((Some("linux/arm64".to_string()), "deps".to_string(), "RUN make".to_string()))
        );
        assert_eq!(parse_step("[deps 2/3] RUN make"), Some((None, "deps".to_string(), "RUN make".to_string())));
        assert_eq!(parse_step("[internal] load .dockerignore"), None);
        assert_eq!(parse_step("[linux/amd64->arm64 deps 3/3] RUN x").unwrap().0.as_deref(), Some("linux/arm64"));
        assert_eq!(
            parse_step("[2/3] COPY src /src"),
            Some((None, String::new(), "COPY src /src".to_string())),
            "one stage"
        );
        assert_eq!(
            parse_step("[linux/arm64 2/3] COPY src /src"),
            Some((Some("linux/arm64".to_string()), String::new(), "COPY src /src".to_string()))
        );
        let vertex = |digest: &str, name: &str, cached: bool, done: bool| {
            format!(
                r#"{{"vertexes":[{{"digest":"{digest}","name":"{name}","cached":{cached},"started":"2026-12-01T00:00:00Z"{}}}]}}"#,
                if done { r#","completed":"2026-12-01T00:00:01Z""# } else { "" }
            )
        };
        let mut log = ProgressLog::default();
        for line in [
            vertex("a", "[linux/amd64 deps 1/2] COPY x /x", true, true),
            vertex("b", "[linux/amd64 deps 2/2] RUN make", true, true),
            vertex("c", "[linux/arm64 deps 1/2] COPY x /x", false, true),
            vertex("d", "[linux/arm64 deps 2/2] RUN make", false, false),
        ] {
            log.feed_line(&line);
        }
        let steps = log.steps();
        assert_eq!(steps.len(), 4);
        assert!(steps.iter().all(|step| step.stage == "deps"));
        let counts = PlatformSteps::of(&steps);
        assert_eq!(counts[0], PlatformSteps { platform: "linux/amd64".into(), steps_cached: 2, steps_total: 2 });
        assert_eq!(counts[1], PlatformSteps { platform: "linux/arm64".into(), steps_cached: 0, steps_total: 2 });
        assert!(!log.stage_finished("deps"), "arm64's last step has not finished");
        log.feed_line(&vertex("d", "[linux/arm64 deps 2/2] RUN make", false, true));
        assert!(log.stage_finished("deps"));
    }

    #[test]
    fn bytes_fetched_for_a_hit_are_counted_once_a_layer() {
        let mut log = ProgressLog::default();
        log.feed_line(r#"{"vertexes":[{"digest":"a","name":"[deps 1/1] RUN make","cached":true,"started":"2026-12-01T00:00:00Z","completed":"2026-12-01T00:00:02Z"}]}"#);
        for current in [10, 500, 1000] {
            log.feed_line(&format!(r#"{{"statuses":[{{"id":"sha256:1","vertex":"a","total":1000,"current":{current}}},{{"id":"extracting sha256:1","vertex":"a","total":1000}}]}}"#));
        }
        log.feed_line(r#"{"statuses":[{"id":"sha256:2","vertex":"a","total":24}]}"#);
        assert_eq!(log.steps()[0].bytes, 1024);
    }

    #[test]
    fn a_line_written_in_pieces_is_one_line() {
        let chunk = |text: &str, done: bool| {
            let data = base64_encode_for_tests(text.as_bytes());
            format!(
                r#"{{"vertexes":[{{"digest":"a","name":"[build 3/3] RUN cargo build","started":"2026-12-01T00:00:00Z"{}}}],"logs":[{{"vertex":"a","data":"{data}"}}]}}"#,
                if done { r#","completed":"2026-12-01T00:00:01Z""# } else { "" }
            )
        };
        let mut log = ProgressLog::default();
        let mut lines = Vec::new();
        for (text, done) in [("   Compiling", false), (" example-app v0.1.0\n    Finished", false), (" release", true)]
        {
            for event in log.feed_line(&chunk(text, done)) {
                if let ProgressEvent::Log { line, .. } = event {
                    lines.push(line);
                }
            }
        }
        assert_eq!(lines, ["   Compiling example-app v0.1.0", "    Finished release"]);
    }

    fn base64_encode_for_tests(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
