//! Why a stage missed its cache. When cachefrom writes a cache it writes beside it a record of
//! each stage's inputs ([`StageInputs`]): per instruction its text as written, the hashes of the
//! build-argument values it declares (never the values; secret ones not at all), the files a
//! `COPY`/`ADD`/bind mount reads from the build context after `.dockerignore` (path → content
//! hash), the stages it reads, and the base image's digest. After a build, or instead of one
//! (`cachefrom explain`), the inputs now are compared with the record of the cache each stage
//! read, and the first instruction that differs is named with why ([`Miss`]).
//!
//! Where the record lives: the annotation `dev.cachefrom.stages` of the cache manifest
//! (registry), the file `cachefrom-inputs.json` in the cache directory (local, tarball).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::inputs::ContextWalk;
use crate::plan::Plan;

/// The manifest annotation holding the records (registry).
pub const ANNOTATION: &str = "dev.cachefrom.stages";
/// The file holding the records in a cache directory (local, tarball).
pub const FILE: &str = "cachefrom-inputs.json";
/// Changed paths named in one line; the structured [`Miss::files`] has them all (up to the cap).
const NAMED_IN_LINE: usize = 5;
/// Files recorded one by one per instruction; beyond, only their combined hash.
const MAX_FILES_EACH: usize = 2_000;

/// One stage's inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageInputs {
    /// The base: an image reference, or `stage NAME`.
    pub base: String,
    /// The base image's manifest digest, where the registry said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<String>,
    /// A hash of the options given to docker and the platform (network mode, …).
    pub options: String,
    /// The instructions after `FROM`, in order.
    pub steps: Vec<StepInputs>,
    /// The salt of this record's argument hashes, new for every record: a short value cannot be
    /// found by hashing guesses once for every record.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub salt: String,
}

/// One instruction's inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInputs {
    /// The instruction as written (continuation lines joined, white space collapsed).
    pub instruction: String,
    /// `ARG` names declared here → hash of the value used (`secret` for secret ones: not recorded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    /// The build context's files read (COPY, ADD, RUN --mount=type=bind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Files>,
    /// The stages read (`COPY --from`, `--mount=…,from=`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    /// The values of the (not secret) `ARG`s declared here, kept in memory only: to hash them
    /// with another record's salt when comparing.
    #[serde(skip)]
    pub(crate) values: BTreeMap<String, String>,
}

/// The recorded form of an argument's value: salted SHA-256 (`secret` for a secret one).
fn arg_hash(salt: &str, name: &str, value: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"cachefrom-arg\0");
    hash.update(salt.as_bytes());
    hash.update([0]);
    hash.update(name.as_bytes());
    hash.update([0]);
    hash.update(value.as_bytes());
    format!("sha256:{:x}", hash.finalize())
}

/// Files an instruction reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Files {
    /// The hash of every path and its content hash.
    pub hash: String,
    /// How many files.
    pub count: usize,
    /// Path → content hash, when there are at most 2,000.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub each: BTreeMap<String, String>,
}

/// Why a stage missed, as the report carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissKind {
    /// Files read from the build context changed (or a stage it copies from did).
    Files,
    /// The base image (or base stage) changed.
    Base,
    /// A build argument's value changed.
    Arg,
    /// The instruction's text changed, or the docker options.
    Instruction,
    /// No cache was there to read.
    NoCache,
    /// Whether a cache is there could not be asked (the registry down, refusing, or too slow):
    /// no answer, and never taken for "no cache".
    Unchecked,
    /// The cache carries no record, or the record matches and BuildKit missed anyway.
    Unknown,
}

/// The first instruction that missed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Miss {
    /// The instruction (as written now), when one is named.
    pub step: Option<String>,
    /// What changed.
    pub kind: MissKind,
    /// Paths changed, added or removed (kind `files`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// The argument whose value changed (kind `arg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg: Option<String>,
    /// The base digest the cache was written from (kind `base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_digest: Option<String>,
    /// The base digest now (kind `base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_digest: Option<String>,
    /// The reason in one line.
    pub line: String,
}

impl Miss {
    fn new(kind: MissKind, step: Option<&StepInputs>, line: String) -> Miss {
        Miss {
            step: step.map(|step| step.instruction.clone()),
            kind,
            files: Vec::new(),
            arg: None,
            old_digest: None,
            new_digest: None,
            line,
        }
    }

    /// No cache at any level: `tried` names each candidate looked at.
    pub fn no_cache(tried: &[String]) -> Miss {
        let line = if tried.is_empty() {
            "no cache: no level of the chain applies".to_string()
        } else {
            format!("no cache: none of {} exists", tried.join(", "))
        };
        Miss::new(MissKind::NoCache, None, line)
    }

    /// Whether a cache exists could not be checked: `why`.
    pub fn unchecked(why: &str) -> Miss {
        Miss::new(MissKind::Unchecked, None, format!("could not check ({why})"))
    }

    /// The inputs match the record, and BuildKit missed anyway.
    pub fn matched(location: &str) -> Miss {
        Miss::new(
            MissKind::Unknown,
            None,
            format!("the inputs match the record on {location}, yet BuildKit missed (the cache may lack the layers)"),
        )
    }

    /// The cache read carries no record of its inputs.
    pub fn no_record(location: &str) -> Miss {
        Miss::new(
            MissKind::Unknown,
            None,
            format!("{location} carries no record of its inputs (written by an older cachefrom or another tool)"),
        )
    }
}

/// Compares a stage's inputs now with the record of the cache it read; `None` when they match.
/// `changed_stage` says whether a stage this one reads missed too (then it is named as the cause).
/// The line is one line, whatever the instructions hold (heredocs, control characters).
pub fn compare(now: &StageInputs, then: &StageInputs, changed_stage: &dyn Fn(&str) -> bool) -> Option<Miss> {
    first_difference(now, then, changed_stage).map(|mut miss| {
        miss.line = one_line(&miss.line);
        miss
    })
}

/// `text` on one line: line breaks and other control characters as spaces, at most 400 characters.
fn one_line(text: &str) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match flat.char_indices().nth(400) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

fn first_difference(now: &StageInputs, then: &StageInputs, changed_stage: &dyn Fn(&str) -> bool) -> Option<Miss> {
    let first = now.steps.first();
    if now.base != then.base {
        return Some(Miss::new(
            MissKind::Base,
            first,
            format!("the base changed: `{}`, was `{}`", now.base, then.base),
        ));
    }
    if let Some(stage) = now.base.strip_prefix("stage ").filter(|stage| changed_stage(stage)) {
        return Some(Miss::new(MissKind::Base, first, format!("its base stage {stage} changed")));
    }
    if let (Some(new), Some(old)) = (&now.base_digest, &then.base_digest) {
        if new != old {
            let mut miss = Miss::new(
                MissKind::Base,
                first,
                format!("`FROM {}`: the base image is a different digest ({} → {})", now.base, short(old), short(new)),
            );
            miss.old_digest = Some(old.clone());
            miss.new_digest = Some(new.clone());
            return Some(miss);
        }
    }
    if now.options != then.options {
        return Some(Miss::new(
            MissKind::Instruction,
            first,
            "the options given to docker or the platform changed (network mode, --platform, …)".to_string(),
        ));
    }
    // Values of ARGs declared so far that differ: the next RUN misses (they are its environment).
    let mut changed_args: Vec<String> = Vec::new();
    for (index, step) in now.steps.iter().enumerate() {
        let Some(old) = then.steps.get(index) else {
            return Some(Miss::new(
                MissKind::Instruction,
                Some(step),
                format!("`{}` is new: the cache's stage ended before it", step.instruction),
            ));
        };
        if step.instruction != old.instruction {
            return Some(Miss::new(
                MissKind::Instruction,
                Some(step),
                format!("`{}` changed: was `{}`", step.instruction, old.instruction),
            ));
        }
        for (name, value) in &step.args {
            // The value now, hashed with the salt of the record it is compared with.
            let value = match step.values.get(name) {
                Some(raw) => arg_hash(&then.salt, name, raw),
                None => value.clone(),
            };
            if old.args.get(name) != Some(&value) {
                changed_args.push(name.clone());
            }
        }
        let uses_changed = changed_args.iter().find(|name| {
            is_run(&step.instruction)
                || step.instruction.contains(&format!("${name}"))
                || step.instruction.contains(&format!("${{{name}"))
        });
        if let Some(name) = uses_changed {
            let mut miss = Miss::new(
                MissKind::Arg,
                Some(step),
                format!(
                    "`{}` missed: `ARG {name}` has another value than when the cache was written",
                    step.instruction
                ),
            );
            miss.arg = Some(name.clone());
            return Some(miss);
        }
        if let Some(stage) = step.stages.iter().find(|stage| changed_stage(stage)) {
            return Some(Miss::new(
                MissKind::Files,
                Some(step),
                format!("`{}` missed: stage {stage}, which it reads, changed", step.instruction),
            ));
        }
        if let (Some(new), Some(old)) = (&step.files, &old.files) {
            if new.hash != old.hash {
                let changed = changed_paths(new, old);
                let mut miss = Miss::new(MissKind::Files, Some(step), String::new());
                miss.line = if changed.is_empty() {
                    format!("`{}` missed: {} files read, some changed", step.instruction, new.count)
                } else {
                    let named: Vec<&str> = changed.iter().take(NAMED_IN_LINE).map(String::as_str).collect();
                    let more = changed.len().saturating_sub(NAMED_IN_LINE);
                    format!(
                        "`{}` missed: {} file{} changed since the cache was written — {}{}",
                        step.instruction,
                        changed.len(),
                        if changed.len() == 1 { "" } else { "s" },
                        named.join(", "),
                        if more > 0 { format!(" and {more} more") } else { String::new() }
                    )
                };
                miss.files = changed;
                return Some(miss);
            }
        }
    }
    None
}

fn is_run(instruction: &str) -> bool {
    instruction.split_whitespace().next().is_some_and(|word| word.eq_ignore_ascii_case("RUN"))
}

fn short(digest: &str) -> String {
    digest.strip_prefix("sha256:").unwrap_or(digest).chars().take(12).collect()
}

fn changed_paths(new: &Files, old: &Files) -> Vec<String> {
    let paths: BTreeSet<&String> = new.each.keys().chain(old.each.keys()).collect();
    paths.into_iter().filter(|path| new.each.get(*path) != old.each.get(*path)).cloned().collect()
}

/// Every stage's inputs now, by stage key. `image_digests` maps an image reference (as the
/// Dockerfile names it once expanded) to its digest, where known.
/// `walk` is the build context as read once for the run.
pub fn current_inputs(
    plan: &Plan,
    image_digests: &BTreeMap<String, String>,
    walk: &ContextWalk,
) -> Result<BTreeMap<String, StageInputs>> {
    let text = crate::files::read_bytes(&plan.dockerfile, crate::files::MAX_TEXT_BYTES)
        .with_context(|| format!("reading the Dockerfile {}", plan.dockerfile.display()))?;
    let text = String::from_utf8_lossy(&text).trim_start_matches('\u{feff}').to_string();
    let parse_options = crate::dockerfile::ParseOptions {
        build_args: plan.build_args.clone(),
        target_platform: plan
            .platform
            .as_deref()
            .and_then(|list| crate::dockerfile::Platform::parse(list.split(',').next()?.trim()).ok()),
        ..Default::default()
    };
    let parsed = crate::dockerfile::parse_dockerfile_with(&text, &parse_options)?;
    let context_files = walk.file_hashes();
    let salt = crate::files::random_hex(16);
    let options = {
        let mut hash = Sha256::new();
        for arg in &plan.docker_args {
            hash.update(crate::secrets::scrub(arg).as_bytes());
            hash.update([0]);
        }
        hash.update(plan.platform.clone().unwrap_or_default().as_bytes());
        format!("sha256:{:x}", hash.finalize())
    };
    let mut inputs = BTreeMap::new();
    for stage in &parsed.stages {
        let instructions = &stage.instructions;
        let base = match parsed
            .stages
            .iter()
            .find(|other| other.index < stage.index && other.name.as_deref() == Some(stage.base.as_str()))
        {
            Some(other) => format!("stage {}", other.key()),
            None => stage.base.clone(),
        };
        let mut args: BTreeMap<String, String> = plan.build_args.clone();
        let steps = instructions
            .iter()
            .map(|instruction| step_inputs(instruction, &mut args, plan, &context_files, &salt))
            .collect::<Result<Vec<_>>>()?;
        inputs.insert(
            stage.key(),
            StageInputs {
                base_digest: image_digests.get(&stage.base).cloned(),
                base,
                options: options.clone(),
                steps,
                salt: salt.clone(),
            },
        );
    }
    Ok(inputs)
}

fn step_inputs(
    instruction: &str,
    args: &mut BTreeMap<String, String>,
    plan: &Plan,
    context_files: &[(String, String)],
    salt: &str,
) -> Result<StepInputs> {
    let mut words = instruction.split_whitespace();
    let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
    let rest: Vec<&str> = words.collect();
    let mut step = StepInputs {
        instruction: instruction.to_string(),
        args: BTreeMap::new(),
        files: None,
        stages: Vec::new(),
        values: BTreeMap::new(),
    };
    match keyword.as_str() {
        "ARG" => {
            for word in &rest {
                let (name, default) = match word.split_once('=') {
                    Some((name, default)) => (name.to_string(), Some(default.trim_matches('"').to_string())),
                    None => (word.to_string(), None),
                };
                let value = plan.build_args.get(&name).cloned().or(default).unwrap_or_default();
                args.insert(name.clone(), value.clone());
                let recorded = if crate::secrets::is_secret(&name, &value) {
                    "secret".to_string()
                } else {
                    step.values.insert(name.clone(), value.clone());
                    arg_hash(salt, &name, &value)
                };
                step.args.insert(name, recorded);
            }
        }
        "COPY" | "ADD" => {
            let mut sources: Vec<String> = Vec::new();
            let mut from = None;
            let plain: Vec<&str> = rest
                .iter()
                .copied()
                .filter(|word| {
                    if let Some(value) = word.strip_prefix("--from=") {
                        from = Some(value.to_lowercase());
                    }
                    !word.starts_with("--")
                })
                .collect();
            if let Some(from) = from {
                step.stages.push(from);
            } else if plain.first().is_some_and(|first| first.starts_with('[')) {
                if let Ok(list) = serde_json::from_str::<Vec<String>>(&plain.join(" ")) {
                    sources.extend(list.iter().take(list.len().saturating_sub(1)).cloned());
                }
            } else if !instruction.contains("<<") {
                sources.extend(plain.iter().take(plain.len().saturating_sub(1)).map(|s| s.to_string()));
            }
            let sources: Vec<String> = sources
                .into_iter()
                .filter(|source| !source.contains("://") && !source.starts_with("git@"))
                .map(|source| crate::shell::expand(&source, args, '\\').unwrap_or(source))
                .collect();
            if !sources.is_empty() {
                step.files = Some(files_read(&sources, context_files)?);
            }
        }
        "RUN" => {
            let mut sources = Vec::new();
            for word in rest.iter().filter_map(|word| word.strip_prefix("--mount=")) {
                let fields: BTreeMap<String, String> = word
                    .split(',')
                    .filter_map(|field| {
                        field.split_once('=').map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                    })
                    .collect();
                let kind = fields.get("type").map(String::as_str).unwrap_or("bind");
                if kind != "bind" {
                    continue; // secret, ssh, cache and tmpfs mounts: never read
                }
                match fields.get("from") {
                    Some(from) => step.stages.push(from.to_lowercase()),
                    None => {
                        sources.push(fields.get("source").or(fields.get("src")).cloned().unwrap_or_else(|| ".".into()))
                    }
                }
            }
            if !sources.is_empty() {
                step.files = Some(files_read(&sources, context_files)?);
            }
        }
        _ => {}
    }
    Ok(step)
}

/// The context's files under `sources` (paths or globs, relative to the context, each naming
/// the path itself or a directory above it), compiled once and matched in linear time. A
/// source cachefrom will not read (more than three `**`, a character class) is refused.
fn files_read(sources: &[String], context_files: &[(String, String)]) -> Result<Files> {
    let patterns = crate::inputs::PatternSet::sources(sources)?;
    let mut hash = Sha256::new();
    let mut each = BTreeMap::new();
    let mut count = 0;
    for (path, content) in context_files {
        if patterns.any_matches(path) {
            count += 1;
            hash.update(path.as_bytes());
            hash.update([0]);
            hash.update(content.as_bytes());
            if each.len() < MAX_FILES_EACH {
                each.insert(path.clone(), content.clone());
            }
        }
    }
    if count > MAX_FILES_EACH {
        each.clear();
    }
    Ok(Files { hash: format!("sha256:{:x}", hash.finalize()), count, each })
}

/// The records as written beside a cache.
pub fn to_json(records: &BTreeMap<String, StageInputs>) -> String {
    serde_json::to_string(records).unwrap_or_default()
}

/// Records read back from a cache (a registry's answer or a file: checked, never trusted).
pub fn from_json(text: &str) -> Option<BTreeMap<String, StageInputs>> {
    if text.len() > 16 * 1024 * 1024 {
        return None;
    }
    serde_json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(instruction: &str) -> StepInputs {
        StepInputs {
            instruction: instruction.to_string(),
            args: BTreeMap::new(),
            files: None,
            stages: Vec::new(),
            values: BTreeMap::new(),
        }
    }

    fn stage(steps: Vec<StepInputs>) -> StageInputs {
        StageInputs {
            base: "debian:12".into(),
            base_digest: Some("sha256:aaaa".into()),
            options: "o".into(),
            steps,
            salt: String::new(),
        }
    }

    fn none(_: &str) -> bool {
        false
    }

    #[test]
    fn logical_lines_of_each_stage() {
        let text = "# escape=\\\nARG BASE\nFROM ${BASE} AS deps\n# a comment\nCOPY  deps.txt \\\n   /deps.txt\nRUN <<EOF\necho hi\nEOF\nFROM deps\nRUN   make\n";
        let parsed =
            crate::dockerfile::parse_dockerfile_text(text, &[("BASE".to_string(), "debian".to_string())].into())
                .unwrap();
        let instructions: Vec<Vec<String>> = parsed.stages.iter().map(|stage| stage.instructions.clone()).collect();
        assert_eq!(
            instructions,
            [
                vec!["COPY deps.txt /deps.txt".to_string(), "RUN <<EOF\necho hi\nEOF".to_string()],
                vec!["RUN make".to_string()]
            ]
        );
    }

    #[test]
    fn files_changed_are_named() {
        let context = vec![
            ("src/a.rs".to_string(), "1".to_string()),
            ("src/b.rs".to_string(), "2".to_string()),
            ("x".into(), "3".into()),
        ];
        let mut then = step("COPY src ./src");
        then.files = Some(files_read(&["src".into()], &context).unwrap());
        let mut changed = context.clone();
        changed[1].1 = "22".into();
        let mut now = step("COPY src ./src");
        now.files = Some(files_read(&["src".into()], &changed).unwrap());
        assert_eq!(now.files.as_ref().unwrap().count, 2);
        let miss = compare(&stage(vec![now]), &stage(vec![then]), &none).unwrap();
        assert_eq!(miss.kind, MissKind::Files);
        assert_eq!(miss.files, ["src/b.rs"]);
        assert_eq!(miss.line, "`COPY src ./src` missed: 1 file changed since the cache was written — src/b.rs");
    }

    #[test]
    fn base_args_instructions_and_matches() {
        let same = stage(vec![step("RUN make")]);
        assert_eq!(compare(&same, &same, &none), None);

        let mut other_base = same.clone();
        other_base.base_digest = Some("sha256:bbbb".into());
        let miss = compare(&other_base, &same, &none).unwrap();
        assert_eq!(
            (miss.kind, miss.old_digest.as_deref(), miss.new_digest.as_deref()),
            (MissKind::Base, Some("sha256:aaaa"), Some("sha256:bbbb"))
        );

        let mut arg_then = step("ARG PROFILE=release");
        arg_then.args.insert("PROFILE".into(), "sha256:1".into());
        let mut arg_now = arg_then.clone();
        arg_now.args.insert("PROFILE".into(), "sha256:2".into());
        let miss = compare(
            &stage(vec![arg_now, step("COPY . ."), step("RUN cargo build")]),
            &stage(vec![arg_then, step("COPY . ."), step("RUN cargo build")]),
            &none,
        )
        .unwrap();
        assert_eq!(
            (miss.kind, miss.arg.as_deref(), miss.step.as_deref()),
            (MissKind::Arg, Some("PROFILE"), Some("RUN cargo build"))
        );

        let miss = compare(&stage(vec![step("RUN make all")]), &same, &none).unwrap();
        assert_eq!(miss.kind, MissKind::Instruction);
        assert_eq!(miss.line, "`RUN make all` changed: was `RUN make`");

        let mut copy_from = step("COPY --from=builder /app /app");
        copy_from.stages.push("builder".into());
        let reads = stage(vec![copy_from]);
        let miss = compare(&reads, &reads, &|stage| stage == "builder").unwrap();
        assert_eq!(miss.kind, MissKind::Files);
    }

    #[test]
    fn records_never_carry_a_secret_value() {
        let mut args = BTreeMap::new();
        let plan_args: BTreeMap<String, String> =
            [("NPM_TOKEN".to_string(), "npm_abcdefghijklmnopqrstuvwxyz0123456789".to_string())].into();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nARG NPM_TOKEN\n").unwrap();
        let repository = crate::refs::Repository::parse("127.0.0.1:5000/app").unwrap();
        let git =
            crate::git::GitFacts { branch: Some("main".into()), default_branch: "main".into(), ..Default::default() };
        let mut options = crate::plan::PlanOptions::new(dir.path(), repository, git);
        options.build_args = plan_args.clone();
        let plan = Plan::new(&options).unwrap();
        let recorded = step_inputs("ARG NPM_TOKEN", &mut args, &plan, &[], "salt").unwrap();
        assert_eq!(recorded.args["NPM_TOKEN"], "secret");
        let json = to_json(&current_inputs(&plan, &BTreeMap::new(), &ContextWalk::default()).unwrap());
        assert!(!json.contains("npm_abcdef"), "{json}");
    }

    proptest::proptest! {
        #[test]
        fn any_dockerfile_text_splits_into_instructions(text in proptest::prelude::any::<String>()) {
            let parsed = crate::dockerfile::parse_dockerfile_text(&format!("FROM scratch\n{text}"), &Default::default());
            for stage in parsed.map(|parsed| parsed.stages).unwrap_or_default() {
                for instruction in stage.instructions {
                    proptest::prop_assert!(!instruction.trim().is_empty());
                    proptest::prop_assert!(!instruction.split_whitespace().next().unwrap_or_default().eq_ignore_ascii_case("FROM"));
                }
            }
        }

        #[test]
        fn a_miss_is_one_line_whatever_the_instructions(
            old in proptest::prelude::any::<String>(),
            new in proptest::prelude::any::<String>(),
            base in proptest::prelude::any::<String>(),
        ) {
            let then = stage(vec![step(&old)]);
            let mut now = stage(vec![step(&new)]);
            now.base = base;
            if let Some(miss) = compare(&now, &then, &none) {
                proptest::prop_assert!(!miss.line.contains('\n') && !miss.line.contains('\r'), "{}", miss.line);
                proptest::prop_assert!(miss.line.chars().count() <= 401);
            }
        }
    }

    #[test]
    fn any_text_reads_back_or_is_refused() {
        for text in ["", "{}", "[]", "{\"a\":{\"base\":1}}", "\u{0}"] {
            let _ = from_json(text);
        }
        let records: BTreeMap<String, StageInputs> = [("deps".to_string(), stage(vec![step("RUN make")]))].into();
        assert_eq!(from_json(&to_json(&records)), Some(records));
    }
}
