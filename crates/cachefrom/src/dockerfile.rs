//! Dockerfile → stages, the references between them, and the build order for a target.
//!
//! Parsing is done by the `parse-dockerfile` crate (heredocs, the escape directive, continuations,
//! comments); this module resolves what the parser leaves alone: global `ARG` expansion in `FROM`,
//! stage names (case-insensitive), numeric references, and which stages a target needs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use parse_dockerfile::Instruction;
use serde::{Deserialize, Serialize};

/// One `FROM` section of a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Position in the file, from 0.
    pub index: usize,
    /// The name after `AS`, lowercased (stage names are case-insensitive), or `None`.
    pub name: Option<String>,
    /// The image or stage after `FROM`, with global `ARG`s expanded.
    pub base: String,
    /// Keys (see [`Stage::key`]) of the earlier stages this one reads from, sorted by index.
    pub depends_on: Vec<String>,
    /// Images outside the file that this stage reads from (`FROM`, `COPY --from`, `RUN --mount from=`).
    pub external_images: Vec<String>,
}

impl Stage {
    /// The stage's name, or its index as a string for an unnamed stage.
    pub fn key(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.index.to_string())
    }
}

/// A parsed Dockerfile: its stages and global build arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dockerfile {
    /// Every stage, in file order.
    pub stages: Vec<Stage>,
    /// `ARG`s declared before the first `FROM`, with their defaults.
    pub global_args: BTreeMap<String, Option<String>>,
}

/// Reads and parses the Dockerfile at `path`, expanding `FROM` with `build_args` over the global `ARG`s.
pub fn read_dockerfile(path: &Path, build_args: &BTreeMap<String, String>) -> Result<Dockerfile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the Dockerfile {}: pass its path with -f/--file", path.display()))?;
    parse_dockerfile_text(&text, build_args).with_context(|| format!("in {}", path.display()))
}

/// Parses Dockerfile text. See [`read_dockerfile`].
pub fn parse_dockerfile_text(text: &str, build_args: &BTreeMap<String, String>) -> Result<Dockerfile> {
    let parsed =
        parse_dockerfile::parse(text).map_err(|error| anyhow::anyhow!("cannot parse the Dockerfile: {error}"))?;

    // In declaration order: a default may use an ARG declared before it.
    let declared: Vec<(String, Option<String>)> =
        parsed.global_args().flat_map(|arg| split_arg_declaration(&arg.arguments.value)).collect();
    let global_args: BTreeMap<String, Option<String>> = declared.iter().cloned().collect();
    let mut variables: BTreeMap<String, String> = BTreeMap::new();
    for (name, default) in &declared {
        if let Some(value) = build_args.get(name) {
            variables.insert(name.clone(), value.clone());
        } else if let Some(default) = default {
            let expanded = expand_variables(default, &variables);
            variables.insert(name.clone(), expanded);
        }
    }

    let mut stages: Vec<Stage> = Vec::new();
    let mut dependency_indexes: Vec<BTreeSet<usize>> = Vec::new();
    let mut index_by_name: BTreeMap<String, usize> = BTreeMap::new();
    for (index, parsed_stage) in parsed.stages().enumerate() {
        let raw_image = parsed_stage.from.image.value.to_string();
        let base = expand_variables(&raw_image, &variables);
        if base.trim().is_empty() {
            bail!("stage {index}: `FROM {raw_image}` names no image once the build args are expanded; set it with --build-arg");
        }
        let name = parsed_stage.from.as_.as_ref().map(|(_, name)| name.value.to_lowercase());
        let mut depends_on: BTreeSet<usize> = BTreeSet::new();
        let mut external_images: BTreeSet<String> = BTreeSet::new();

        // `FROM <stage>` matches only earlier stages, by their lowercase name.
        match index_by_name.get(&base) {
            Some(&earlier) => {
                depends_on.insert(earlier);
            }
            None => {
                external_images.insert(base.clone());
            }
        }
        for instruction in parsed_stage.instructions {
            for reference in stage_references(instruction) {
                let reference = expand_variables(&reference, &variables);
                match resolve_reference(&reference, index, &index_by_name) {
                    Some(earlier) => {
                        depends_on.insert(earlier);
                    }
                    None => {
                        external_images.insert(reference);
                    }
                }
            }
        }
        if let Some(name) = &name {
            if index_by_name.insert(name.clone(), index).is_some() {
                bail!("stage {index}: the stage name `{name}` is used twice; stage names must be unique (case-insensitive)");
            }
        }
        stages.push(Stage {
            index,
            name,
            base,
            depends_on: Vec::new(),
            external_images: external_images.into_iter().collect(),
        });
        dependency_indexes.push(depends_on);
    }
    let keys: Vec<String> = stages.iter().map(Stage::key).collect();
    for (stage, indexes) in stages.iter_mut().zip(dependency_indexes) {
        stage.depends_on = indexes.into_iter().map(|index| keys[index].clone()).collect();
    }
    Ok(Dockerfile { stages, global_args })
}

/// `COPY --from=` and `RUN --mount=…,from=` values of one instruction.
fn stage_references(instruction: &Instruction<'_>) -> Vec<String> {
    let mut references = Vec::new();
    match instruction {
        Instruction::Copy(copy) => {
            for flag in &copy.options {
                if flag.name.value.eq_ignore_ascii_case("from") {
                    if let Some(value) = &flag.value {
                        references.push(value.value.to_string());
                    }
                }
            }
        }
        Instruction::Run(run) => {
            for flag in &run.options {
                if flag.name.value.eq_ignore_ascii_case("mount") {
                    if let Some(value) = &flag.value {
                        if let Some(from) = mount_from(&value.value) {
                            references.push(from);
                        }
                    }
                }
            }
        }
        _ => {}
    }
    references
}

/// The `from=` field of a `--mount` value such as `type=cache,target=/x,from=builder`.
fn mount_from(mount: &str) -> Option<String> {
    mount.split(',').find_map(|field| {
        let (key, value) = field.split_once('=')?;
        key.trim().eq_ignore_ascii_case("from").then(|| value.trim().to_string())
    })
}

/// An earlier stage named by `reference` (a name in any case, or an index), or `None` for an image.
fn resolve_reference(reference: &str, current: usize, index_by_name: &BTreeMap<String, usize>) -> Option<usize> {
    if let Ok(index) = reference.parse::<usize>() {
        return (index < current).then_some(index);
    }
    index_by_name.get(&reference.to_lowercase()).copied()
}

/// `ARG A=1 B` → `[("A", Some("1")), ("B", None)]`. Quotes around a default are removed.
fn split_arg_declaration(arguments: &str) -> Vec<(String, Option<String>)> {
    split_words(arguments)
        .into_iter()
        .map(|word| match word.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (word, None),
        })
        .collect()
}

/// Splits on unquoted white space and removes the quotes.
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), '\\') => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            (Some(_), c) => current.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            (None, c) => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

/// Expands `$V`, `${V}`, `${V:-w}`, `${V-w}`, `${V:+w}` and `${V+w}` as Dockerfile `FROM` lines do.
/// An unset variable expands to the empty string; `\$` is a literal dollar sign.
pub fn expand_variables(text: &str, variables: &BTreeMap<String, String>) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && chars.get(i + 1) == Some(&'$') {
            out.push('$');
            i += 2;
            continue;
        }
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        if chars.get(i + 1) == Some(&'{') {
            let Some(close) = chars[i + 2..].iter().position(|&c| c == '}') else {
                out.extend(&chars[i..]);
                break;
            };
            let inner: String = chars[i + 2..i + 2 + close].iter().collect();
            out.push_str(&expand_braced(&inner, variables));
            i += close + 3;
            continue;
        }
        let name: String = chars[i + 1..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == '_').collect();
        if name.is_empty() {
            out.push('$');
            i += 1;
        } else {
            out.push_str(variables.get(&name).map(String::as_str).unwrap_or(""));
            i += 1 + name.chars().count();
        }
    }
    out
}

fn expand_braced(inner: &str, variables: &BTreeMap<String, String>) -> String {
    let name_end = inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
    let (name, rest) = inner.split_at(name_end);
    let value = variables.get(name);
    let set_and_not_empty = value.is_some_and(|v| !v.is_empty());
    let word = |prefix: &str| expand_variables(&rest[prefix.len()..], variables);
    if rest.starts_with(":-") {
        if set_and_not_empty {
            value.cloned().unwrap_or_default()
        } else {
            word(":-")
        }
    } else if rest.starts_with(":+") {
        if set_and_not_empty {
            word(":+")
        } else {
            String::new()
        }
    } else if rest.starts_with('-') {
        match value {
            Some(v) => v.clone(),
            None => word("-"),
        }
    } else if rest.starts_with('+') {
        if value.is_some() {
            word("+")
        } else {
            String::new()
        }
    } else {
        value.cloned().unwrap_or_default()
    }
}

impl Dockerfile {
    /// The stage `target` names (case-insensitive), or the last stage when `target` is `None`.
    pub fn target_stage(&self, target: Option<&str>) -> Result<&Stage> {
        match target {
            None => self.stages.last().context("the Dockerfile has no FROM instruction, so no stage to build"),
            Some(target) => {
                let wanted = target.to_lowercase();
                self.stages.iter().find(|stage| stage.name.as_deref() == Some(wanted.as_str())).with_context(|| {
                    let names: Vec<String> = self.stages.iter().filter_map(|stage| stage.name.clone()).collect();
                    if names.is_empty() {
                        format!("target stage `{target}` not found: the Dockerfile has no named stages (add `AS name` to a FROM line)")
                    } else {
                        format!("target stage `{target}` not found; the stages are: {}", names.join(", "))
                    }
                })
            }
        }
    }

    /// The stages `target` needs, in a valid build order (file order among them), target last.
    pub fn build_order(&self, target: Option<&str>) -> Result<Vec<&Stage>> {
        let target = self.target_stage(target)?;
        let mut needed = self.reachable(&target.depends_on);
        needed.insert(target.index);
        // A stage only ever reads earlier stages, so file order is a topological order.
        Ok(needed.into_iter().map(|index| &self.stages[index]).collect())
    }

    /// Every stage key `stage` depends on, directly or not, sorted by index.
    pub fn transitive_dependencies(&self, stage: &Stage) -> Vec<String> {
        self.reachable(&stage.depends_on).into_iter().map(|index| self.stages[index].key()).collect()
    }

    /// The indexes of the stages named by `keys` and of everything they read from.
    fn reachable(&self, keys: &[String]) -> BTreeSet<usize> {
        let index_by_key: BTreeMap<String, usize> =
            self.stages.iter().map(|stage| (stage.key(), stage.index)).collect();
        let mut found = BTreeSet::new();
        let mut pending: Vec<&String> = keys.iter().collect();
        while let Some(key) = pending.pop() {
            let index = index_by_key[key];
            if found.insert(index) {
                pending.extend(self.stages[index].depends_on.iter());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Dockerfile {
        parse_dockerfile_text(text, &BTreeMap::new()).unwrap()
    }

    fn order(dockerfile: &Dockerfile, target: Option<&str>) -> Vec<String> {
        dockerfile.build_order(target).unwrap().iter().map(|stage| stage.key()).collect()
    }

    const THREE_STAGES_AND_AN_UNUSED_ONE: &str = "\
FROM rust:1.85 AS deps
RUN cargo fetch
FROM deps AS builder
RUN cargo build
FROM debian:bookworm AS docs
RUN echo docs
FROM debian:bookworm-slim AS runtime
COPY --from=builder /app/target/release/app /app
";

    #[test]
    fn three_stages_build_in_order_and_an_unneeded_stage_is_left_out() {
        let dockerfile = parse(THREE_STAGES_AND_AN_UNUSED_ONE);
        assert_eq!(dockerfile.stages.len(), 4);
        assert_eq!(order(&dockerfile, None), ["deps", "builder", "runtime"]);
        assert_eq!(order(&dockerfile, Some("builder")), ["deps", "builder"]);
        assert_eq!(order(&dockerfile, Some("docs")), ["docs"]);
        assert_eq!(dockerfile.stages[1].depends_on, ["deps"]);
        assert_eq!(dockerfile.stages[3].depends_on, ["builder"]);
        assert_eq!(dockerfile.stages[3].external_images, ["debian:bookworm-slim"]);
    }

    #[test]
    fn uppercase_names_match_in_any_case() {
        let dockerfile = parse("FROM alpine AS BUILDER\nRUN make\nFROM alpine\nCOPY --from=Builder /x /x\n");
        assert_eq!(dockerfile.stages[0].name.as_deref(), Some("builder"));
        assert_eq!(order(&dockerfile, None), ["builder", "1"]);
        assert_eq!(order(&dockerfile, Some("BUILDER")), ["builder"]);
    }

    #[test]
    fn numeric_from_refers_to_an_earlier_stage_by_index() {
        let dockerfile = parse("FROM alpine\nRUN make\nFROM alpine AS final\nCOPY --from=0 /x /x\n");
        assert_eq!(dockerfile.stages[1].depends_on, ["0"]);
        assert_eq!(order(&dockerfile, None), ["0", "final"]);
    }

    #[test]
    fn a_name_defined_only_later_or_not_at_all_is_an_external_image() {
        let dockerfile =
            parse("FROM alpine AS a\nCOPY --from=later /x /x\nCOPY --from=nginx:1 /y /y\nFROM alpine AS later\n");
        assert!(dockerfile.stages[0].depends_on.is_empty());
        assert_eq!(dockerfile.stages[0].external_images, ["alpine", "later", "nginx:1"]);
    }

    #[test]
    fn run_mount_from_is_a_dependency() {
        let dockerfile = parse(
            "FROM alpine AS tools\nFROM alpine AS app\nRUN --mount=type=bind,from=tools,source=/bin,target=/t ls /t\n",
        );
        assert_eq!(dockerfile.stages[1].depends_on, ["tools"]);
    }

    #[test]
    fn from_expands_global_args_and_build_args() {
        let text = "ARG BASE=debian\nARG TAG\nARG FULL=${BASE}:${TAG:-bookworm}\nFROM ${FULL} AS a\nFROM $BASE AS b\n";
        let dockerfile = parse(text);
        assert_eq!(dockerfile.stages[0].base, "debian:bookworm");
        assert_eq!(dockerfile.stages[1].base, "debian");
        let args = BTreeMap::from([("TAG".to_string(), "trixie".to_string())]);
        let dockerfile = parse_dockerfile_text(text, &args).unwrap();
        assert_eq!(dockerfile.stages[0].base, "debian:trixie");
    }

    #[test]
    fn every_expansion_form() {
        let vars = BTreeMap::from([("SET".to_string(), "v".to_string()), ("EMPTY".to_string(), String::new())]);
        let cases = [
            ("$SET", "v"),
            ("${SET}", "v"),
            ("${UNSET:-w}", "w"),
            ("${EMPTY:-w}", "w"),
            ("${EMPTY-w}", ""),
            ("${UNSET-w}", "w"),
            ("${SET:+w}", "w"),
            ("${EMPTY:+w}", ""),
            ("${EMPTY+w}", "w"),
            ("${UNSET+w}", ""),
            ("a\\$SET", "a$SET"),
            ("${UNSET}x", "x"),
        ];
        for (text, expected) in cases {
            assert_eq!(expand_variables(text, &vars), expected, "expanding {text}");
        }
    }

    #[test]
    fn heredocs_comments_continuations_and_directives_are_not_stages() {
        let text = "# syntax=docker/dockerfile:1\n# escape=\\\nFROM alpine AS a\n# FROM fake AS comment\nRUN <<EOF\nFROM inside AS heredoc\nEOF\nRUN echo \\\n  FROM continued\nFROM a AS b\n";
        let dockerfile = parse(text);
        let keys: Vec<String> = dockerfile.stages.iter().map(Stage::key).collect();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn an_unknown_target_lists_the_stages() {
        let dockerfile = parse(THREE_STAGES_AND_AN_UNUSED_ONE);
        let error = dockerfile.build_order(Some("nope")).unwrap_err().to_string();
        assert_eq!(error, "target stage `nope` not found; the stages are: deps, builder, docs, runtime");
    }

    #[test]
    fn an_empty_from_is_an_error() {
        let error = parse_dockerfile_text("ARG BASE\nFROM ${BASE}\n", &BTreeMap::new()).unwrap_err().to_string();
        assert!(error.contains("`FROM ${BASE}` names no image"), "{error}");
        assert!(parse_dockerfile_text("FROM\n", &BTreeMap::new()).is_err());
    }

    #[test]
    fn a_missing_file_says_which_and_what_to_do() {
        let error = read_dockerfile(Path::new("/nonexistent/Dockerfile"), &BTreeMap::new()).unwrap_err();
        assert!(error.to_string().contains("cannot read the Dockerfile /nonexistent/Dockerfile"), "{error}");
    }

    #[test]
    fn duplicate_stage_names_are_an_error() {
        let error = parse_dockerfile_text("FROM a AS x\nFROM b AS X\n", &BTreeMap::new()).unwrap_err();
        assert!(error.to_string().contains("used twice"), "{error}");
    }

    #[test]
    fn transitive_dependencies_follow_the_chain() {
        let dockerfile = parse(THREE_STAGES_AND_AN_UNUSED_ONE);
        assert_eq!(dockerfile.transitive_dependencies(&dockerfile.stages[3]), ["deps", "builder"]);
    }
}
