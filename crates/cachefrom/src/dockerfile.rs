//! Dockerfile → stages, the references between them, and the build order for a target.
//!
//! Parsing is done by the `parse-dockerfile` crate (heredocs, the escape directive, continuations,
//! comments); this module resolves what the parser leaves alone, by BuildKit's rules (moby/buildkit
//! `frontend/dockerfile/dockerfile2llb`): global `ARG`s and the automatic platform arguments
//! expanded in `FROM` (a port of BuildKit's shell lexer), stage names, references by name or index (forward ones
//! too), `ONBUILD` triggers, cycles, and which stages a target needs in which order.

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
    /// The instructions after `FROM`, each as written on its logical line ([`logical_text`]):
    /// what the stage's record of its inputs compares.
    #[serde(skip)]
    pub instructions: Vec<String>,
    /// The `RUN --mount=type=cache` mounts of the stage, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_mounts: Vec<crate::mounts::CacheMount>,
}

impl Stage {
    /// The stage's name, or its index as a string for an unnamed stage.
    pub fn key(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.index.to_string())
    }

    /// The name, or `stage-N` for an unnamed stage (BuildKit's name for it).
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| format!("stage-{}", self.index))
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

/// What a Dockerfile's stages depend on besides its text: the build arguments and the platforms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// `--build-arg` values: they set global `ARG`s and override the automatic platform ones.
    pub build_args: BTreeMap<String, String>,
    /// The platform built for (`--platform`); default: the build platform.
    pub target_platform: Option<Platform>,
    /// The platform of the engine that builds; default: this machine's ([`Platform::host`]).
    pub build_platform: Option<Platform>,
    /// The target stage (for `TARGETSTAGE`); default: the last stage.
    pub target: Option<String>,
}

impl ParseOptions {
    /// Options with `build_args` and the default platforms.
    pub fn with_build_args(build_args: &BTreeMap<String, String>) -> ParseOptions {
        ParseOptions { build_args: build_args.clone(), ..Default::default() }
    }
}

/// A platform, `OS/ARCH[/VARIANT]`, normalised as BuildKit's `platforms` package does
/// (`x86_64` → `amd64`, `aarch64` → `arm64`, `arm` → `arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// `linux`, `windows`, …
    pub os: String,
    /// `amd64`, `arm64`, `arm`, …
    pub arch: String,
    /// `v7`, `v8`, … or empty.
    pub variant: String,
}

impl Platform {
    /// Parses `OS/ARCH[/VARIANT]`, `ARCH` alone meaning Linux.
    pub fn parse(text: &str) -> Result<Platform> {
        let parts: Vec<&str> = text.trim().split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [arch] => ("linux", *arch, ""),
            [os, arch] => (*os, *arch, ""),
            [os, arch, variant] => (*os, *arch, *variant),
            _ => bail!("the platform {} is not OS/ARCH[/VARIANT] (e.g. linux/amd64)", crate::git::escaped(text)),
        };
        let lower = |s: &str| s.to_ascii_lowercase();
        let (os, arch, variant) = (lower(os), lower(arch), lower(variant));
        let valid = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if os.is_empty() || arch.is_empty() || !valid(&os) || !valid(&arch) || !valid(&variant) {
            bail!("the platform {} is not OS/ARCH[/VARIANT] (e.g. linux/amd64)", crate::git::escaped(text));
        }
        let os = if os == "macos" { "darwin".to_string() } else { os };
        let (arch, variant) = match (arch.as_str(), variant.as_str()) {
            ("i386", _) => ("386".to_string(), String::new()),
            ("x86_64" | "x86-64" | "amd64", "v1") => ("amd64".to_string(), String::new()),
            ("x86_64" | "x86-64", _) => ("amd64".to_string(), variant),
            ("aarch64" | "arm64", "8" | "v8") => ("arm64".to_string(), String::new()),
            ("aarch64", _) => ("arm64".to_string(), variant),
            ("armhf", _) => ("arm".to_string(), "v7".to_string()),
            ("armel", _) => ("arm".to_string(), "v6".to_string()),
            ("arm", "") => ("arm".to_string(), "v7".to_string()),
            ("arm", "5" | "6" | "7" | "8") => ("arm".to_string(), format!("v{variant}")),
            _ => (arch, variant),
        };
        Ok(Platform { os, arch, variant })
    }

    /// This machine's platform, as a local engine reports it.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Platform::parse(&format!("linux/{arch}")).expect("a known architecture")
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// The longest Dockerfile cachefrom reads.
pub const MAX_DOCKERFILE_BYTES: usize = 16 * 1024 * 1024;
/// The most stages cachefrom plans.
pub const MAX_STAGES: usize = 10_000;

/// Reads and parses the Dockerfile at `path`, expanding `FROM` with `build_args` over the global
/// `ARG`s and BuildKit's automatic platform arguments for this machine.
pub fn read_dockerfile(path: &Path, build_args: &BTreeMap<String, String>) -> Result<Dockerfile> {
    read_dockerfile_with(path, &ParseOptions::with_build_args(build_args))
}

/// [`read_dockerfile`] with the platforms and target given.
pub fn read_dockerfile_with(path: &Path, options: &ParseOptions) -> Result<Dockerfile> {
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("cannot read the Dockerfile {}: pass its path with -f/--file", path.display()))?;
    if metadata.len() > MAX_DOCKERFILE_BYTES as u64 {
        bail!(
            "the Dockerfile {} is {} MiB; cachefrom reads Dockerfiles up to {} MiB",
            path.display(),
            metadata.len() / (1024 * 1024),
            MAX_DOCKERFILE_BYTES / (1024 * 1024)
        );
    }
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the Dockerfile {}: pass its path with -f/--file", path.display()))?;
    // Docker reads bytes; a byte that is not UTF-8 is kept as U+FFFD (it can only be in a value).
    let text = String::from_utf8_lossy(&bytes);
    parse_dockerfile_with(&text, options).with_context(|| format!("in {}", path.display()))
}

/// Parses Dockerfile text. See [`read_dockerfile`].
pub fn parse_dockerfile_text(text: &str, build_args: &BTreeMap<String, String>) -> Result<Dockerfile> {
    parse_dockerfile_with(text, &ParseOptions::with_build_args(build_args))
}

/// BuildKit's rule for a stage name (after lowercasing): `^[a-z][a-z0-9-_.]*$`.
pub fn is_valid_stage_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

/// BuildKit's automatic arguments, with the build arguments that override them.
fn automatic_args(options: &ParseOptions, target: &str) -> BTreeMap<String, String> {
    let build = options.build_platform.clone().unwrap_or_else(Platform::host);
    let target_platform = options.target_platform.clone().unwrap_or_else(|| build.clone());
    let mut args: BTreeMap<String, String> = [
        ("BUILDPLATFORM", build.to_string()),
        ("BUILDOS", build.os.clone()),
        ("BUILDOSVERSION", String::new()),
        ("BUILDARCH", build.arch.clone()),
        ("BUILDVARIANT", build.variant.clone()),
        ("TARGETPLATFORM", target_platform.to_string()),
        ("TARGETOS", target_platform.os.clone()),
        ("TARGETOSVERSION", String::new()),
        ("TARGETARCH", target_platform.arch.clone()),
        ("TARGETVARIANT", target_platform.variant.clone()),
        ("TARGETSTAGE", target.to_string()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect();
    for (name, value) in args.iter_mut() {
        if let Some(given) = options.build_args.get(name) {
            *value = given.clone();
        }
    }
    args
}

/// Where `instruction`'s keyword starts in the text.
fn keyword_start(instruction: &Instruction<'_>) -> usize {
    let keyword = match instruction {
        Instruction::Add(i) => &i.add,
        Instruction::Arg(i) => &i.arg,
        Instruction::Cmd(i) => &i.cmd,
        Instruction::Copy(i) => &i.copy,
        Instruction::Entrypoint(i) => &i.entrypoint,
        Instruction::Env(i) => &i.env,
        Instruction::Expose(i) => &i.expose,
        Instruction::From(i) => &i.from,
        Instruction::Healthcheck(i) => &i.healthcheck,
        Instruction::Label(i) => &i.label,
        Instruction::Maintainer(i) => &i.maintainer,
        Instruction::Onbuild(i) => &i.onbuild,
        Instruction::Run(i) => &i.run,
        Instruction::Shell(i) => &i.shell,
        Instruction::Stopsignal(i) => &i.stopsignal,
        Instruction::User(i) => &i.user,
        Instruction::Volume(i) => &i.volume,
        Instruction::Workdir(i) => &i.workdir,
        _ => return 0,
    };
    keyword.span.start
}

/// One instruction's text (from its keyword to the next instruction) on its logical line:
/// continuation lines joined, comment and blank lines left out, white space collapsed; a
/// heredoc's body kept below it as written.
pub fn logical_text(text: &str, escape: char) -> String {
    let mut lines = text.lines();
    let mut logical = String::new();
    for line in lines.by_ref() {
        let trimmed = line.trim();
        // Comment and blank lines are left out, inside a continuation too.
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !logical.is_empty() {
            logical.push(' ');
        }
        match trimmed.strip_suffix(escape) {
            Some(continued) => logical.push_str(continued.trim_end()),
            None => {
                logical.push_str(trimmed);
                break;
            }
        }
    }
    let mut collapsed = logical.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(terminator) = heredoc_terminator(&collapsed) {
        for body in lines {
            collapsed.push('\n');
            collapsed.push_str(body);
            if body.trim() == terminator {
                break;
            }
        }
    }
    collapsed
}

fn heredoc_terminator(line: &str) -> Option<String> {
    let start = line.find("<<")?;
    let rest = line[start + 2..].trim_start_matches('-');
    let word: String = rest
        .trim_matches(|c| c == '"' || c == '\'')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!word.is_empty()).then_some(word)
}

/// Parses Dockerfile text with `options`, following BuildKit's Dockerfile frontend: global `ARG`s
/// and the automatic platform arguments expanded in `FROM` by its shell lexer; stage names
/// checked by its rule; `COPY --from` by name or index to any stage (a later one too), never
/// with a variable; `RUN --mount from=`; the `ONBUILD` triggers of a stage used as a base; a
/// circular dependency refused.
pub fn parse_dockerfile_with(text: &str, options: &ParseOptions) -> Result<Dockerfile> {
    if text.len() > MAX_DOCKERFILE_BYTES {
        bail!(
            "the Dockerfile is {} MiB; cachefrom reads Dockerfiles up to {} MiB",
            text.len() >> 20,
            MAX_DOCKERFILE_BYTES >> 20
        );
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let parsed =
        parse_dockerfile::parse(text).map_err(|error| anyhow::anyhow!("cannot parse the Dockerfile: {error}"))?;
    let escape = parsed.parser_directives.escape.as_ref().map(|directive| directive.value.value).unwrap_or('\\');
    let expand = |word: &str, variables: &BTreeMap<String, String>| crate::shell::expand(word, variables, escape);

    // Names first: `COPY --from` may name any stage, and TARGETSTAGE needs the target's.
    let mut names: Vec<Option<String>> = Vec::new();
    for (index, parsed_stage) in parsed.stages().enumerate() {
        if index >= MAX_STAGES {
            bail!("the Dockerfile has more than {MAX_STAGES} stages; cachefrom plans at most {MAX_STAGES}");
        }
        let name = match &parsed_stage.from.as_ {
            Some((_, name)) => {
                let lower = name.value.to_lowercase();
                if !is_valid_stage_name(&lower) {
                    bail!(
                        "stage {index}: invalid name for build stage: {}, name can't start with a number or contain symbols (BuildKit's rule: [a-z][a-z0-9-_.]*)",
                        crate::git::escaped(&name.value)
                    );
                }
                Some(lower)
            }
            None => None,
        };
        names.push(name);
    }
    let target_name = match &options.target {
        Some(target) => target.to_lowercase(),
        None => names.last().cloned().flatten().unwrap_or_else(|| "default".to_string()),
    };

    // In declaration order: a default may use an ARG declared before it, and the automatic ones.
    let mut variables = automatic_args(options, &target_name);
    let mut global_args: BTreeMap<String, Option<String>> = BTreeMap::new();
    for arg in parsed.global_args() {
        for (name, default) in split_arg_declaration(&arg.arguments.value) {
            let value = match (options.build_args.get(&name), &default) {
                (Some(given), _) => Some(given.clone()),
                (None, Some(default)) => Some(
                    expand(default, &variables).with_context(|| format!("in the default of the global ARG {name}"))?,
                ),
                (None, None) => None,
            };
            if let Some(value) = value {
                variables.insert(name.clone(), value);
            }
            global_args.insert(name, default.map(|default| unquoted(&default)));
        }
    }

    // A name used twice (BuildKit accepts it, with a lint warning) means its last stage for
    // `COPY --from`, mounts and `--target`, and the latest earlier one for a `FROM`.
    let mut index_by_name: BTreeMap<String, usize> = BTreeMap::new();
    for (index, name) in names.iter().enumerate() {
        if let Some(name) = name {
            index_by_name.insert(name.clone(), index);
        }
    }
    let mut earlier_by_name: BTreeMap<String, usize> = BTreeMap::new();

    // Where each instruction starts: an instruction's text runs to the next one's start.
    let mut starts: Vec<usize> = parsed.instructions.iter().map(keyword_start).collect();
    starts.sort_unstable();
    let text_of = |start: usize| {
        let end = starts.iter().copied().find(|next| *next > start).unwrap_or(text.len());
        logical_text(&text[start..end], escape)
    };
    let mut stages: Vec<Stage> = Vec::new();
    let mut dependency_indexes: Vec<BTreeSet<usize>> = Vec::new();
    let mut onbuild_references: Vec<Vec<Reference>> = Vec::new();
    let mut bases: Vec<Option<usize>> = Vec::new();
    for (index, parsed_stage) in parsed.stages().enumerate() {
        let raw_image = parsed_stage.from.image.value.to_string();
        let base = expand(&raw_image, &variables).with_context(|| format!("stage {index}: in `FROM {raw_image}`"))?;
        if base.trim().is_empty() {
            bail!("stage {index}: `FROM {raw_image}` names no image once the build args are expanded; set it with --build-arg");
        }
        let mut depends_on: BTreeSet<usize> = BTreeSet::new();
        let mut external_images: BTreeSet<String> = BTreeSet::new();

        // `FROM <stage>` matches only earlier stages, by their lowercase name, exactly.
        let from_stage = earlier_by_name.get(&base).copied();
        if let Some(name) = &names[index] {
            earlier_by_name.insert(name.clone(), index);
        }
        bases.push(from_stage);
        match from_stage {
            Some(earlier) => {
                depends_on.insert(earlier);
            }
            None => {
                external_images.insert(base.clone());
            }
        }
        let mut own_onbuild = Vec::new();
        let mut cache_mounts = Vec::new();
        for instruction in parsed_stage.instructions {
            if let Instruction::Run(run) = instruction {
                for flag in &run.options {
                    if let (true, Some(value)) = (flag.name.value.eq_ignore_ascii_case("mount"), &flag.value) {
                        cache_mounts.extend(crate::mounts::CacheMount::parse(&value.value));
                    }
                }
            }
            if let Instruction::Onbuild(onbuild) = instruction {
                own_onbuild.extend(stage_references(&onbuild.instruction)?);
                continue;
            }
            for reference in stage_references(instruction)? {
                resolve_into(&reference, index, &index_by_name, names.len(), &mut depends_on, &mut external_images)?;
            }
        }
        stages.push(Stage {
            index,
            name: names[index].clone(),
            base,
            depends_on: Vec::new(),
            external_images: external_images.into_iter().collect(),
            instructions: parsed_stage
                .instructions
                .iter()
                .map(|instruction| text_of(keyword_start(instruction)))
                .collect(),
            cache_mounts,
        });
        dependency_indexes.push(depends_on);
        onbuild_references.push(own_onbuild);
    }
    // The ONBUILD triggers of a stage run in the stages built FROM it (only there: they do not
    // carry over further), so what they read is those stages' dependency.
    for index in 0..stages.len() {
        let Some(base) = bases[index] else { continue };
        let mut external: BTreeSet<String> = stages[index].external_images.iter().cloned().collect();
        for reference in onbuild_references[base].clone() {
            resolve_into(
                &reference,
                index,
                &index_by_name,
                names.len(),
                &mut dependency_indexes[index],
                &mut external,
            )?;
        }
        stages[index].external_images = external.into_iter().collect();
    }
    check_no_cycle(&stages, &dependency_indexes)?;
    // A stage whose name a later stage took can no longer be named: it is known by its index.
    for stage in stages.iter_mut() {
        if stage.name.as_ref().is_some_and(|name| index_by_name.get(name) != Some(&stage.index)) {
            stage.name = None;
        }
    }
    let keys: Vec<String> = stages.iter().map(Stage::key).collect();
    for (stage, indexes) in stages.iter_mut().zip(dependency_indexes) {
        stage.depends_on = indexes.into_iter().map(|index| keys[index].clone()).collect();
    }
    Ok(Dockerfile { stages, global_args })
}

/// A reference found in an instruction: `COPY --from` (a name or an index) or `RUN --mount from=`
/// (a name only).
#[derive(Debug, Clone)]
enum Reference {
    CopyFrom(String),
    MountFrom(String),
}

/// Adds what `reference` (in stage `current`) names: a stage, or an external image.
fn resolve_into(
    reference: &Reference,
    current: usize,
    index_by_name: &BTreeMap<String, usize>,
    count: usize,
    depends_on: &mut BTreeSet<usize>,
    external_images: &mut BTreeSet<String>,
) -> Result<()> {
    let found = match reference {
        Reference::CopyFrom(value) => match value.parse::<usize>() {
            Ok(index) if index < count => Some(index),
            Ok(index) => bail!("stage {current}: COPY --from={index}: invalid stage index {index}"),
            Err(_) => index_by_name.get(&value.to_lowercase()).copied(),
        },
        Reference::MountFrom(value) => index_by_name.get(&value.to_lowercase()).copied(),
    };
    match found {
        Some(index) => {
            depends_on.insert(index);
        }
        None => {
            let (Reference::CopyFrom(value) | Reference::MountFrom(value)) = reference;
            external_images.insert(value.clone());
        }
    }
    Ok(())
}

/// Refuses a stage that reads itself, directly or through others, as BuildKit does.
fn check_no_cycle(stages: &[Stage], dependencies: &[BTreeSet<usize>]) -> Result<()> {
    // 0: not seen, 1: on the current path, 2: done. Iterative, so a long chain cannot overflow the stack.
    let mut state = vec![0u8; stages.len()];
    for root in 0..stages.len() {
        if state[root] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, Vec<usize>)> = vec![(root, dependencies[root].iter().copied().collect())];
        state[root] = 1;
        while let Some((node, pending)) = stack.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(next) if state[next] == 1 => {
                    bail!(
                        "circular dependency detected on stage: {} (it reads {}, which needs it)",
                        stages[node].display_name(),
                        stages[next].display_name()
                    )
                }
                Some(next) if state[next] == 0 => {
                    state[next] = 1;
                    stack.push((next, dependencies[next].iter().copied().collect()));
                }
                Some(_) => {}
                None => {
                    state[node] = 2;
                    stack.pop();
                }
            }
        }
    }
    Ok(())
}

/// `COPY --from=` and `RUN --mount=…,from=` values of one instruction. A `--from` with a
/// variable is refused, as BuildKit does.
fn stage_references(instruction: &Instruction<'_>) -> Result<Vec<Reference>> {
    let mut references = Vec::new();
    match instruction {
        Instruction::Copy(copy) => {
            for flag in &copy.options {
                if flag.name.value.eq_ignore_ascii_case("from") {
                    if let Some(value) = &flag.value {
                        let value = value.value.to_string();
                        let literal = crate::shell::expand(&value, &BTreeMap::new(), '\\').ok();
                        if literal.as_deref() != Some(value.as_str()) {
                            bail!(
                                "COPY --from={}: variable expansion is not supported for --from (BuildKit's rule); define a stage with FROM using a global ARG instead",
                                crate::git::escaped(&value)
                            );
                        }
                        references.push(Reference::CopyFrom(value));
                    }
                }
            }
        }
        Instruction::Run(run) => {
            for flag in &run.options {
                if flag.name.value.eq_ignore_ascii_case("mount") {
                    if let Some(value) = &flag.value {
                        if let Some(from) = mount_from(&value.value) {
                            references.push(Reference::MountFrom(from));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(references)
}

/// The `from=` field of a `--mount` value such as `type=cache,target=/x,from=builder`.
fn mount_from(mount: &str) -> Option<String> {
    mount.split(',').find_map(|field| {
        let (key, value) = field.split_once('=')?;
        key.trim().eq_ignore_ascii_case("from").then(|| value.trim().to_string())
    })
}

/// `ARG A=1 B` → `[("A", Some("1")), ("B", None)]`, the defaults raw (quotes kept, for the lexer).
fn split_arg_declaration(arguments: &str) -> Vec<(String, Option<String>)> {
    split_raw_words(arguments)
        .into_iter()
        .map(|word| match word.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (word, None),
        })
        .collect()
}

/// Splits on white space outside quotes, keeping quotes and escapes as written.
fn split_raw_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                current.push(c);
            }
            (_, '\\') => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            (Some(_), c) => current.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                current.push(c);
            }
            (None, c) if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            (None, c) => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// A default as written, its outer quotes removed (for display in `global_args`).
fn unquoted(text: &str) -> String {
    crate::shell::expand(&text.replace('$', "\\$"), &BTreeMap::new(), '\\').unwrap_or_else(|_| text.to_string())
}

/// Expands `$V`, `${V}` and every other form of BuildKit's shell lexer (see [`crate::shell`]);
/// an unset variable expands to the empty string. A word the lexer refuses is kept as written.
#[cfg(test)]
fn expand_variables(text: &str, variables: &BTreeMap<String, String>) -> String {
    crate::shell::expand(text, variables, '\\').unwrap_or_else(|_| text.to_string())
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

    /// The stages `target` needs, in a valid build order, target last: each stage after the
    /// stages it reads (a `COPY --from` may name a later stage), otherwise in file order.
    pub fn build_order(&self, target: Option<&str>) -> Result<Vec<&Stage>> {
        let target = self.target_stage(target)?;
        let mut needed = self.reachable(&target.depends_on);
        needed.insert(target.index);
        let index_by_key: BTreeMap<String, usize> =
            self.stages.iter().map(|stage| (stage.key(), stage.index)).collect();
        let deps = |index: usize| self.stages[index].depends_on.iter().map(|key| index_by_key[key]);
        // Kahn's algorithm, the lowest index first among the stages ready.
        let mut waiting: BTreeMap<usize, usize> = needed.iter().map(|&index| (index, deps(index).count())).collect();
        let mut readers: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &index in &needed {
            for dep in deps(index) {
                readers.entry(dep).or_default().push(index);
            }
        }
        let mut ready: BTreeSet<usize> = waiting.iter().filter(|(_, count)| **count == 0).map(|(i, _)| *i).collect();
        let mut order = Vec::with_capacity(needed.len());
        while let Some(index) = ready.pop_first() {
            order.push(&self.stages[index]);
            for reader in readers.get(&index).into_iter().flatten() {
                let count = waiting.get_mut(reader).expect("a needed stage");
                *count -= 1;
                if *count == 0 {
                    ready.insert(*reader);
                }
            }
        }
        if order.len() != needed.len() {
            bail!("circular dependency between the stages {}", target.display_name());
        }
        Ok(order)
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
    fn copy_from_may_name_a_later_stage_and_an_unknown_name_is_an_image() {
        let dockerfile =
            parse("FROM alpine AS a\nCOPY --from=later /x /x\nCOPY --from=nginx:1 /y /y\nFROM alpine AS later\n");
        assert_eq!(dockerfile.stages[0].depends_on, ["later"]);
        assert_eq!(dockerfile.stages[0].external_images, ["alpine", "nginx:1"]);
        assert_eq!(order(&dockerfile, Some("a")), ["later", "a"]);
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
    fn a_name_used_twice_means_the_last_stage_but_for_from_between_them() {
        let dockerfile = parse("FROM a AS x\nFROM x AS mid\nFROM b AS X\nFROM alpine AS end\nCOPY --from=x /y /y\n");
        assert_eq!(dockerfile.stages[0].name, None, "shadowed: known by its index");
        assert_eq!(dockerfile.stages[1].depends_on, ["0"], "FROM takes the earlier x");
        assert_eq!(dockerfile.stages[3].depends_on, ["x"], "COPY --from takes the last x");
        assert_eq!(dockerfile.stages[2].name.as_deref(), Some("x"));
        assert_eq!(order(&dockerfile, Some("x")), ["x"]);
    }

    #[test]
    fn transitive_dependencies_follow_the_chain() {
        let dockerfile = parse(THREE_STAGES_AND_AN_UNUSED_ONE);
        assert_eq!(dockerfile.transitive_dependencies(&dockerfile.stages[3]), ["deps", "builder"]);
    }
    fn parse_for(text: &str, platform: &str, target: Option<&str>) -> Dockerfile {
        let options = ParseOptions {
            target_platform: Some(Platform::parse(platform).unwrap()),
            build_platform: Some(Platform::parse("linux/amd64").unwrap()),
            target: target.map(str::to_string),
            ..Default::default()
        };
        parse_dockerfile_with(text, &options).unwrap()
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse_dockerfile_text(text, &BTreeMap::new()).unwrap_err())
    }

    #[test]
    fn platform_arguments_follow_buildkit() {
        let text = "FROM alpine AS base\nFROM base AS bin-linux\nFROM base AS bin-darwin\nFROM bin-$TARGETOS AS bin\nFROM img:${TARGETARCH}${TARGETVARIANT:+-$TARGETVARIANT}-$BUILDARCH AS tools\n";
        let linux = parse_for(text, "linux/arm/v7", None);
        assert_eq!(linux.stages[3].base, "bin-linux");
        assert_eq!(linux.stages[4].base, "img:arm-v7-amd64");
        assert_eq!(order(&linux, Some("bin")), ["base", "bin-linux", "bin"]);
        let darwin = parse_for(text, "darwin/arm64", Some("bin"));
        assert_eq!(order(&darwin, Some("bin")), ["base", "bin-darwin", "bin"]);
        // A build argument overrides an automatic one, as in BuildKit.
        let args = BTreeMap::from([("TARGETOS".to_string(), "darwin".to_string())]);
        assert_eq!(parse_dockerfile_text(text, &args).unwrap().stages[3].base, "bin-darwin");
        assert_eq!(Platform::parse("x86_64").unwrap().to_string(), "linux/amd64");
        assert_eq!(Platform::parse("linux/aarch64/v8").unwrap().to_string(), "linux/arm64");
        assert!(Platform::parse("linux/amd64/v2/x").is_err());
    }

    #[test]
    fn onbuild_triggers_read_stages_from_where_they_run() {
        let text = "FROM alpine AS start\nFROM alpine AS base\nONBUILD COPY --from=start /x /x\nFROM base AS app\nFROM app AS final\n";
        let dockerfile = parse(text);
        assert!(dockerfile.stages[1].depends_on.is_empty(), "the trigger does not run in its own stage");
        assert_eq!(dockerfile.stages[2].depends_on, ["start", "base"]);
        assert_eq!(dockerfile.stages[3].depends_on, ["app"], "triggers do not carry over further");
        assert_eq!(order(&dockerfile, None), ["start", "base", "app", "final"]);
    }

    #[test]
    fn stage_references_follow_buildkit() {
        // A later stage, by name or by index, comes first in the order.
        let dockerfile = parse("FROM alpine AS a\nCOPY --from=2 /x /x\nFROM a AS b\nFROM alpine AS c\n");
        assert_eq!(order(&dockerfile, Some("b")), ["c", "a", "b"]);
        assert!(error("FROM alpine AS a\nCOPY --from=a /x /x\n").contains("circular dependency detected on stage: a"));
        assert!(error("FROM alpine AS a\nCOPY --from=b /x /x\nFROM alpine AS b\nCOPY --from=a /y /y\n")
            .contains("circular dependency"));
        assert!(error("FROM alpine\nCOPY --from=5 /x /x\n").contains("invalid stage index 5"));
        assert!(error("ARG X=a\nFROM alpine AS a\nFROM alpine\nCOPY --from=$X /x /x\n")
            .contains("variable expansion is not supported for --from"));
        // Names: BuildKit's rule, and never a number.
        for bad in ["0", "1st", "foo/bar", "a:b", "a\u{7}"] {
            let text = format!("FROM alpine AS {bad}\n");
            assert!(error(&text).contains("invalid name for build stage"), "{bad:?}");
        }
        assert_eq!(parse("FROM alpine AS a.b_c-1\n").stages[0].name.as_deref(), Some("a.b_c-1"));
    }

    #[test]
    fn nested_and_pattern_expansions_in_from() {
        let text = "ARG D=debian\nARG V=12.5.1\nARG T=${U:-${D}}\nFROM ${T}:${V%%.*} AS a\nFROM ${T/deb/ub}:${V#*.} AS b\nARG Q='$D'\nFROM x AS c\n";
        let dockerfile = parse(text);
        assert_eq!(dockerfile.stages[0].base, "debian:12");
        assert_eq!(dockerfile.stages[1].base, "ubian:5.1");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Dockerfile");
        std::fs::write(&path, b"FROM alpine AS a\nRUN echo \xff\xfe\nFROM a AS b\n").unwrap();
        let dockerfile = read_dockerfile(&path, &BTreeMap::new()).unwrap();
        assert_eq!(order(&dockerfile, None), ["a", "b"]);
    }

    #[test]
    fn hostile_inputs_are_answered_or_refused_within_bounds() {
        let doubling = format!("ARG A=x\n{}FROM $A\n", "ARG A=${A}${A}\n".repeat(40));
        assert!(error(&doubling).contains("grows past 64 KiB"));
        let nested = format!("FROM {}x{}\n", "${U:-".repeat(200), "}".repeat(200));
        assert!(error(&nested).contains("nest more than"));
        let wide = format!(
            "FROM alpine AS s0\n{}",
            (1..2000).map(|i| format!("FROM alpine AS s{i}\nCOPY --from=s{} /x /x\n", i - 1)).collect::<String>()
        );
        let dockerfile = parse(&wide);
        assert_eq!(dockerfile.build_order(None).unwrap().len(), 2000);
    }

    const BUILDX: &str = include_str!("../../../tests/corpus/buildx.Dockerfile");
    const BUILDKIT: &str = include_str!("../../../tests/corpus/buildkit.Dockerfile");

    #[test]
    fn corpus_buildx() {
        let dockerfile = parse_for(BUILDX, "linux/amd64", None);
        assert_eq!(dockerfile.stages.len(), 33);
        assert_eq!(
            order(&dockerfile, None),
            [
                "xx",
                "golatest",
                "gobase",
                "buildx-version",
                "buildx-build",
                "binaries-unix",
                "binaries-linux",
                "binaries",
                "32"
            ]
        );
        let windows = parse_for(BUILDX, "windows/amd64", None);
        assert_eq!(
            order(&windows, None),
            ["xx", "golatest", "gobase", "buildx-version", "buildx-build", "binaries-windows", "binaries", "32"]
        );
    }

    #[test]
    fn corpus_buildkit() {
        let dockerfile = parse_for(BUILDKIT, "linux/amd64", Some("binaries"));
        assert_eq!(dockerfile.stages.len(), 49);
        let binaries_linux =
            dockerfile.stages.iter().find(|stage| stage.name.as_deref() == Some("binaries-linux")).unwrap();
        assert_eq!(
            binaries_linux.depends_on,
            ["runc", "buildctl", "buildkitd", "cni-plugins-export-squashed", "binfmt-filter"]
        );
        assert_eq!(
            order(&dockerfile, Some("binaries")),
            [
                "xx",
                "golatest",
                "gobuild-base",
                "runc",
                "buildkit-base",
                "buildkit-version",
                "buildctl",
                "buildkitd",
                "dnsname",
                "cni-plugins",
                "cni-plugins-export",
                "cni-plugins-export-squashed",
                "binfmt-filter",
                "binaries-linux",
                "binaries"
            ]
        );
        let darwin = parse_for(BUILDKIT, "darwin/arm64", Some("binaries"));
        assert_eq!(
            order(&darwin, Some("binaries")),
            [
                "xx",
                "golatest",
                "gobuild-base",
                "buildkit-base",
                "buildkit-version",
                "buildctl",
                "binaries-darwin",
                "binaries"
            ]
        );
    }

    /// Dockerfile-shaped text: instructions BuildKit knows, with arbitrary words in them.
    fn dockerfile_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let word = prop_oneof![
            "[a-z0-9]{1,6}",
            "\\$\\{?[A-Z]{1,3}(:-|%%|#|/)?[a-z$}]{0,4}",
            any::<String>().prop_map(|s| s.replace('\n', " "))
        ];
        let line = (0..7usize, word.clone(), word).prop_map(|(kind, a, b)| match kind {
            0 => format!("FROM {a} AS {b}"),
            1 => format!("FROM {a}"),
            2 => format!("ARG {a}={b}"),
            3 => format!("COPY --from={a} /x /y"),
            4 => format!("RUN --mount=type=bind,from={a} echo {b}"),
            5 => format!("ONBUILD COPY --from={a} /x /y"),
            _ => format!("RUN {a} {b}"),
        });
        proptest::collection::vec(line, 0..40).prop_map(|lines| lines.join("\n"))
    }

    proptest::proptest! {
        #[test]
        fn any_dockerfile_is_answered_without_a_panic(text in dockerfile_text()) {
            let started = std::time::Instant::now();
            if let Ok(dockerfile) = parse_dockerfile_text(&text, &BTreeMap::new()) {
                for stage in &dockerfile.stages {
                    let _ = dockerfile.build_order(stage.name.as_deref());
                }
            }
            proptest::prop_assert!(started.elapsed() < std::time::Duration::from_secs(2));
        }
    }
}
