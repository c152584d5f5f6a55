//! The plan as the shell script a person would write for it: `Display` of [`Plan`].
//!
//! The script is rendered from the same data the executor walks ([`Plan::steps`] and
//! [`Plan::recovery`]), so what it prints is what runs: each build's argument vector as planned
//! (the executor only leaves out the `--cache-from` of candidates that do not exist), each
//! write, and, as comments, what cachefrom decides at run time (an unchanged build reused, a
//! build's fallbacks, the write-back of an all-hit cache, stage tags refreshed). Every value that comes from outside
//! (branch names, paths, stage names, build arguments) is quoted where it is a word and
//! escaped where it is part of a comment, so the script runs nothing it was not meant to.

use std::fmt::{self, Write as _};

use crate::backend::{Backend, CacheLocation};
use crate::plan::{Builder, CacheRef, Execution, Plan, StagePlan, Step};
use crate::render::{render_command, render_command_multiline, shell_quote};

/// `text` made safe for the inside of a `#` comment: control characters (a newline would end
/// the comment) are written as escapes.
pub fn comment_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `argv` as the script runs it: BuildKit's progress as plain text (the executor reads rawjson).
fn shown(argv: &[String]) -> Vec<String> {
    argv.iter()
        .map(|arg| if arg == "--progress=rawjson" { "--progress=plain".to_string() } else { arg.clone() })
        .collect()
}

/// The awk program that answers "did the build finish every step of this stage?" from
/// `--progress=plain` output: the same rule the executor applies to BuildKit's rawjson record
/// (every step `[STAGE i/N]` done or cached, none failed or cancelled).
const STAGE_FINISHED_AWK: &str = r#"$1 ~ /^#[0-9]+$/ && $2 == "[" stage && $3 ~ /^[0-9]+\/[0-9]+\]$/ { split($3, p, /[\/\]]/); step[$1] = p[1]; total = p[2] }
    ($1 in step) && ($2 == "DONE" || $2 == "CACHED") { done[step[$1]] = 1 }
    ($1 in step) && ($2 == "ERROR:" || $2 == "CANCELED") { failed = 1 }
    END { if (!total || failed) exit 1; for (i = 1; i <= total; i++) if (!(i in done)) exit 1 }"#;

#[cfg(test)]
pub(crate) const STAGE_FINISHED_AWK_FOR_TESTS: &str = STAGE_FINISHED_AWK;

impl Plan {
    fn builder_name(&self) -> &'static str {
        match self.builder {
            Builder::Buildx => "buildx",
            Builder::Classic => "classic",
        }
    }

    /// BuildKit's name for `stage` in its progress (`[NAME i/N] …`).
    pub fn progress_name(&self, stage: &StagePlan) -> String {
        stage.target.clone().unwrap_or_else(|| format!("stage-{}", stage.index))
    }

    /// The shell command that fetches one cache candidate (classic builder and tarball).
    fn fetch_command(&self, candidate: &CacheRef) -> String {
        match &candidate.location {
            CacheLocation::TarFile(file) => {
                let unpacked = self.unpacked_dir(&candidate.location);
                format!(
                    "{{ test -f {file} && mkdir -p {dir} && tar -xf {file} -C {dir}; }}",
                    file = shell_quote(&file.display().to_string()),
                    dir = shell_quote(&unpacked.display().to_string())
                )
            }
            location => format!("docker pull {}", shell_quote(&location.to_string())),
        }
    }

    fn write_header(&self, out: &mut String) -> fmt::Result {
        let git = &self.git;
        writeln!(out, "#!/usr/bin/env bash")?;
        writeln!(out, "set -euo pipefail")?;
        let execution = match self.execution {
            Execution::OneBuild => "one build",
            Execution::StageByStage => "stage by stage",
        };
        writeln!(
            out,
            "# cachefrom plan: {} (target {}), {} backend, {} builder, {execution}",
            comment_text(&self.dockerfile.display().to_string()),
            comment_text(&self.target),
            self.backend.name(),
            self.builder_name()
        )?;
        let branch = match (&git.branch, &git.branch_source) {
            (Some(branch), Some(source)) => format!("{branch} (from {source})"),
            (Some(branch), None) => branch.clone(),
            (None, _) => "unknown".to_string(),
        };
        writeln!(out, "# branch {}; default branch {}", comment_text(&branch), comment_text(&git.default_branch))?;
        writeln!(
            out,
            "# commit {}; parent {}; merge-base {}",
            comment_text(git.commit.as_deref().unwrap_or("unknown")),
            comment_text(git.parent.as_deref().unwrap_or("unknown")),
            comment_text(git.merge_base.as_deref().unwrap_or("none"))
        )?;
        let chain: Vec<&str> = self.chain.iter().map(|level| level.name()).collect();
        writeln!(out, "# cache sources, most specific first: {}", chain.join(" > "))?;
        let writes: Vec<&str> = self.write_levels.iter().map(|level| level.name()).collect();
        writeln!(out, "# writes: {}", if writes.is_empty() { "nothing".to_string() } else { writes.join(", ") })?;
        let queries = match self.builder {
            Builder::Buildx => "docker info, docker buildx inspect (when a builder is named or selected)",
            Builder::Classic => "docker info",
        };
        writeln!(out, "# asks first, changing nothing: {queries} (what the engine can build)")?;
        for note in &self.notes {
            writeln!(out, "# note: {}", comment_text(note))?;
        }
        for folded in &self.folded_stages {
            writeln!(out, "# note: {}", comment_text(&folded.why))?;
        }

        let stage_names: Vec<String> = self.stages.iter().map(|stage| comment_text(&stage.name)).collect();
        writeln!(out, "\n# Stages, in build order: {}", stage_names.join(" -> "))?;
        for stage in &self.stages {
            writeln!(out, "# {} cache candidates:", comment_text(&stage.name))?;
            for candidate in &stage.cache_from {
                writeln!(out, "#   {:<15} {}", candidate.level.name(), comment_text(&candidate.location.to_string()))?;
            }
        }
        if self.builder == Builder::Buildx && self.backend.can_check_existence() {
            writeln!(out, "# cachefrom checks which candidates exist (no layer download) and passes only those,")?;
            writeln!(out, "# from one level of the chain for every stage where it can, each cache once.")?;
        }
        let unpack_needed = matches!(self.backend, Backend::Tarball { .. });
        if self.builder == Builder::Classic || unpack_needed {
            writeln!(out, "\n# Fetch the first cache that exists, level by level.")?;
            for stage in &self.stages {
                let fetches: Vec<String> =
                    stage.cache_from.iter().map(|candidate| self.fetch_command(candidate)).collect();
                if !fetches.is_empty() {
                    writeln!(out, "{} || true", fetches.join(" ||\n  "))?;
                }
            }
        }
        Ok(())
    }

    /// The `save_mounts` function the EXIT trap calls, when the plan saves cache mounts.
    fn write_save_mounts(&self, out: &mut String) -> fmt::Result {
        let Some(argv) = self.steps.iter().find_map(|step| match step {
            Step::SaveMounts { argv } => Some(argv),
            _ => None,
        }) else {
            return Ok(());
        };
        let dir = self.mounts_dir();
        writeln!(
            out,
            "\n# save_mounts: packs each cache mount (owners, modes, times kept; the same contents, the same"
        )?;
        writeln!(out, "# bytes) into a tar, then cachefrom gzips each one on every core, uploads each archive not")?;
        writeln!(out, "# stored yet and writes it at:")?;
        for mount in &self.mounts {
            let places: Vec<String> = mount.cache_to.iter().map(|to| comment_text(&to.location.to_string())).collect();
            writeln!(out, "#   {} ({}): {}", mount.name, comment_text(&mount.mount.target), places.join(", "))?;
        }
        writeln!(out, "save_mounts() {{")?;
        writeln!(
            out,
            "  mkdir -p {} && printf '%s' {} > {}",
            shell_quote(&dir.join("empty").display().to_string()),
            shell_quote(&self.save_dockerfile()),
            shell_quote(&dir.join("save.Dockerfile").display().to_string())
        )?;
        writeln!(out, "  {}", render_command_multiline(argv).replace('\n', "\n  "))?;
        writeln!(out, "}}")?;
        if self.recovery.is_empty() {
            writeln!(out, "trap 'save_mounts || true' EXIT")?;
        }
        Ok(())
    }

    fn write_recovery(&self, out: &mut String) -> fmt::Result {
        if self.recovery.is_empty() {
            return Ok(());
        }
        writeln!(out, "\nlog=\"$(mktemp)\"")?;
        writeln!(out, "# stage_finished STAGE: the build's record shows every step of STAGE done or cached.")?;
        writeln!(out, "stage_finished() {{")?;
        writeln!(out, "  awk -v stage=\"$1\" '\n    {STAGE_FINISHED_AWK}' \"$log\"")?;
        writeln!(out, "}}")?;
        writeln!(out, "# When the build fails, write the cache of each stage it finished: exported from")?;
        writeln!(out, "# BuildKit's local cache (nothing is rebuilt), then written like the target's.")?;
        writeln!(out, "# A stage whose reader finished has finished too (later stages come first).")?;
        writeln!(out, "recover_caches() {{")?;
        writeln!(out, "  covered=' '")?;
        writeln!(out, "  finished=' '")?;
        for recovery in &self.recovery {
            let Some(stage) = self.stage(&recovery.stage) else { continue };
            let name = shell_quote(&stage.name);
            writeln!(
                out,
                "  if [[ \"$covered\" != *\" \"{name}\" \"* ]] && {{ [[ \"$finished\" == *\" \"{name}\" \"* ]] || stage_finished {}; }}; then",
                shell_quote(&self.progress_name(stage))
            )?;
            if !stage.depends_on.is_empty() {
                let reads: String = stage.depends_on.iter().map(|name| format!("{}' '", shell_quote(name))).collect();
                writeln!(out, "    finished+={reads}")?;
            }
            writeln!(out, "    {}", render_command_multiline(&shown(&recovery.argv)).replace('\n', "\n    "))?;
            for write in &recovery.writes {
                writeln!(out, "    {}", write.shell())?;
            }
            let covers: Vec<String> = recovery.covers.iter().map(|name| shell_quote(name)).collect();
            writeln!(out, "    covered+={}", covers.iter().map(|c| format!("{c}' '")).collect::<String>())?;
            writeln!(out, "  fi")?;
        }
        writeln!(out, "}}")?;
        let save = if self.steps.iter().any(|step| matches!(step, Step::SaveMounts { .. })) {
            " save_mounts || true;"
        } else {
            ""
        };
        writeln!(
            out,
            "trap 'status=$?; if [ \"$status\" -ne 0 ]; then recover_caches || true; fi;{save} rm -f \"$log\"' EXIT"
        )?;
        Ok(())
    }
}

impl fmt::Display for Plan {
    /// The plan as the shell script a person would write for it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        self.write_header(&mut out)?;
        self.write_save_mounts(&mut out)?;
        self.write_recovery(&mut out)?;
        let mut built = 0;
        for step in &self.steps {
            match step {
                Step::ReuseUnchanged { record_on, image_tags, writes } => {
                    writeln!(
                        out,
                        "\n# When the hash of the inputs equals the record on {} (cachefrom",
                        comment_text(record_on)
                    )?;
                    writeln!(
                        out,
                        "# compares them), nothing below runs; instead the recorded image and cache are reused:"
                    )?;
                    if !image_tags.is_empty() {
                        let tags: Vec<String> = image_tags.iter().map(|tag| shell_quote(tag)).collect();
                        writeln!(out, "#   cachefrom copy-tag \"$recorded_image\" {}", comment_text(&tags.join(" ")))?;
                    }
                    for write in writes {
                        writeln!(out, "#   {}", comment_text(&write.shell()))?;
                    }
                }
                Step::Build { stage, argv, fallbacks } => {
                    let Some(stage) = self.stage(stage) else { continue };
                    built += 1;
                    match self.execution {
                        Execution::OneBuild => writeln!(
                            out,
                            "\n# One build of {} and every stage it needs; BuildKit runs independent stages at once.",
                            comment_text(&stage.name)
                        )?,
                        Execution::StageByStage => writeln!(
                            out,
                            "\n# Stage {} ({built}/{}); its cache is written right after it.",
                            comment_text(&stage.name),
                            self.stages.len()
                        )?,
                    }
                    for fallback in fallbacks {
                        writeln!(out, "# {}", fallback.describe())?;
                    }
                    let mut line = render_command_multiline(&shown(argv));
                    if !self.recovery.is_empty() {
                        line.push_str(" 2>&1 | tee \"$log\"");
                    }
                    writeln!(out, "{line}")?;
                }
                Step::WriteBack { .. } if !matches!(self.backend, Backend::Registry { .. }) => {
                    writeln!(
                        out,
                        "# When every step hit the one cache it read, the writes below copy that cache, not the"
                    )?;
                    writeln!(out, "# export (none to where it was read: it holds every result already).")?;
                }
                Step::WriteBack { to, .. } => {
                    writeln!(
                        out,
                        "# When every step hit the one cache it read, that cache (with this run's record) is"
                    )?;
                    writeln!(
                        out,
                        "# what {} gets: cachefrom copy-tag \"$cache_read\" {}",
                        comment_text(to),
                        comment_text(&shell_quote(to))
                    )?;
                }
                Step::Write { write, .. } => writeln!(out, "{}", write.shell())?,
                Step::RefreshStageTags { writes, .. } => {
                    writeln!(
                        out,
                        "# The other stages read their layers from this cache. Their own tags, which only a failed"
                    )?;
                    writeln!(
                        out,
                        "# run writes, get this cache too where cachefrom found them (so they are not read as older):"
                    )?;
                    for write in writes {
                        writeln!(out, "#   {}", comment_text(&write.shell()))?;
                    }
                }
                Step::PushImage { image } => writeln!(out, "docker push {}", shell_quote(image))?,
                Step::MountBaseLayers { images, platform } => {
                    writeln!(
                        out,
                        "\n# The layers of the base images in this registry are mounted into {} first (no bytes",
                        comment_text(&self.repository.to_string())
                    )?;
                    writeln!(
                        out,
                        "# move; the export then uploads none of them): for each blob of {} ({}),",
                        comment_text(&images.join(", ")),
                        comment_text(platform)
                    )?;
                    writeln!(
                        out,
                        "#   POST /v2/{}/blobs/uploads/?mount=DIGEST&from=BASE",
                        comment_text(&self.repository.path)
                    )?;
                }
                Step::RestoreMounts { argv, pull, again } => {
                    let dir = self.mounts_dir();
                    writeln!(
                        out,
                        "\n# Cache mounts, kept across runners. cachefrom fetches each one's saved contents from the"
                    )?;
                    writeln!(
                        out,
                        "# first of its places that exists into {}/NAME.tar.gz (digest checked):",
                        comment_text(&dir.join("in").display().to_string())
                    )?;
                    for mount in &self.mounts {
                        let places: Vec<String> =
                            mount.cache_from.iter().map(|from| comment_text(&from.location.to_string())).collect();
                        writeln!(
                            out,
                            "#   {} ({}): {}",
                            mount.name,
                            comment_text(&mount.mount.target),
                            places.join(", ")
                        )?;
                    }
                    if let Some(pull) = pull {
                        writeln!(out, "# When any was saved, the mounts' image is pulled meanwhile (the build finds it unpacked):")?;
                        writeln!(out, "{} & pulling=$!", render_command(pull))?;
                    }
                    writeln!(
                        out,
                        "# Then cachefrom unpacks them into BuildKit's cache mounts (a new {} makes the RUN run):",
                        crate::plan::RUN_ARG
                    )?;
                    writeln!(out, "export {}=\"$$-$RANDOM\"", crate::plan::RUN_ARG)?;
                    writeln!(
                        out,
                        "mkdir -p {} && printf '%s' {} > {}",
                        shell_quote(&dir.join("in").display().to_string()),
                        shell_quote(&self.restore_dockerfile()),
                        shell_quote(&dir.join("restore.Dockerfile").display().to_string())
                    )?;
                    match again {
                        Some(again) => {
                            writeln!(out, "{} || {{", render_command_multiline(argv))?;
                            writeln!(
                                out,
                                "  # failed in {} (no tar there?): again in the mounts' own image",
                                comment_text(self.restore_image.as_deref().unwrap_or_default())
                            )?;
                            writeln!(
                                out,
                                "  printf '%s' {} > {}",
                                shell_quote(&self.restore_again_dockerfile()),
                                shell_quote(&dir.join("restore-again.Dockerfile").display().to_string())
                            )?;
                            writeln!(out, "  {}\n}}", render_command_multiline(again))?;
                        }
                        None => writeln!(out, "{}", render_command_multiline(argv))?,
                    }
                    if pull.is_some() {
                        writeln!(out, "wait $pulling || true")?;
                    }
                }
                Step::SaveMounts { .. } => {
                    writeln!(
                        out,
                        "# The cache mounts are saved by the EXIT trap (save_mounts), after a failed build too."
                    )?;
                }
            }
        }
        f.write_str(&crate::secrets::scrub(&out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the script's `stage_finished` on `log` (bash and awk, as the script would).
    fn finished(log: &str, stage: &str) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("build.log");
        std::fs::write(&file, log).unwrap();
        let script = format!("log={}\nstage_finished() {{\n  awk -v stage=\"$1\" '\n    {STAGE_FINISHED_AWK}' \"$log\"\n}}\nstage_finished \"$1\"", shell_quote(&file.display().to_string()));
        std::process::Command::new("bash").args(["-c", &script, "bash", stage]).status().unwrap().success()
    }

    const FAILED_BUILD: &str = "\
#5 [deps 1/3] FROM 127.0.0.1:5000/base@sha256:abc
#5 DONE 0.1s
#6 [deps 2/3] WORKDIR /app
#6 CACHED
#7 [builder 1/2] COPY src ./src
#8 [deps 3/3] RUN make deps
#8 DONE 12.0s
#7 DONE 0.1s
#9 [builder 2/2] RUN make
#9 ERROR: process \"/bin/sh -c make\" did not complete successfully: exit code: 2
#10 [docs 1/1] RUN make docs
#10 CANCELED
";

    #[test]
    fn the_scripts_stage_finished_reads_plain_progress_as_the_executor_reads_rawjson() {
        assert!(finished(FAILED_BUILD, "deps"));
        assert!(!finished(FAILED_BUILD, "builder"), "a step failed");
        assert!(!finished(FAILED_BUILD, "docs"), "cancelled");
        assert!(!finished(FAILED_BUILD, "runtime"), "never started");
        assert!(!finished(FAILED_BUILD, "dep"), "names match whole");
    }

    #[test]
    fn comments_cannot_be_ended_by_a_value() {
        assert_eq!(comment_text("x\ntouch pwned\r\u{7}"), "x\\ntouch pwned\\r\\u{7}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::dockerfile::parse_dockerfile_text;
    use crate::git::GitFacts;
    use crate::plan::{CacheWrite, PlanOptions};
    use crate::refs::Repository;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;

    /// Stand-ins for `docker` and `cachefrom` that record each call: program, count, arguments,
    /// NUL-separated (no argument can hold a NUL).
    fn stubs(dir: &std::path::Path) -> std::path::PathBuf {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for program in ["docker", "cachefrom"] {
            let stub = bin.join(program);
            let record = dir.join("calls");
            std::fs::write(
                &stub,
                format!(
                    "#!/bin/sh\n{{ printf '%s\\0' {program} \"$#\"; for a in \"$@\"; do printf '%s\\0' \"$a\"; done; }} >> '{}'\n",
                    record.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }

    fn recorded(dir: &std::path::Path) -> Vec<Vec<String>> {
        let bytes = std::fs::read(dir.join("calls")).unwrap_or_default();
        let mut fields = bytes.split(|b| *b == 0).map(|field| String::from_utf8_lossy(field).into_owned());
        let mut calls = Vec::new();
        while let Some(program) = fields.next().filter(|program| !program.is_empty()) {
            let count: usize = fields.next().unwrap().parse().unwrap();
            let mut call = vec![program];
            call.extend(fields.by_ref().take(count));
            calls.push(call);
        }
        calls
    }

    /// What the plan says runs, call by call, when every build succeeds.
    fn planned(plan: &Plan) -> Vec<Vec<String>> {
        plan.steps
            .iter()
            .filter(|step| {
                !matches!(step, Step::ReuseUnchanged { .. } | Step::WriteBack { .. } | Step::RefreshStageTags { .. })
            })
            .map(|step| match step {
                Step::Build { argv, .. } => std::iter::once("docker".to_string()).chain(shown(argv)).collect(),
                Step::Write { write: CacheWrite::CopyTag { from, to }, .. } => {
                    ["cachefrom", "copy-tag", from].iter().map(|s| s.to_string()).chain(to.iter().cloned()).collect()
                }
                Step::Write { write: CacheWrite::PushCacheImage { image }, .. } | Step::PushImage { image } => {
                    vec!["docker".into(), "push".into(), image.clone()]
                }
                other => panic!("not a registry or inline write: {other:?}"),
            })
            .collect()
    }

    /// Arbitrary text, and text carrying the payloads that end a comment or a quote.
    fn text() -> impl Strategy<Value = String> {
        let any_text = any::<String>().prop_map(|s| s.replace('\0', ""));
        prop_oneof![
            any_text.clone(),
            any_text.clone().prop_map(|s| format!("{s}\ntouch pwned\n")),
            any_text.clone().prop_map(|s| format!("$(touch pwned){s}")),
            any_text.prop_map(|s| format!("{s}'; touch pwned; '`touch pwned`\r\u{2028}")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn the_script_runs_exactly_the_planned_commands_for_any_values(
            branch in text(),
            default_branch in text(),
            commit in text(),
            dockerfile in text(),
            context in text(),
            build_arg in text(),
            first in "[a-zA-Z][a-zA-Z0-9._-]{0,8}",
            second in "[a-zA-Z][a-zA-Z0-9._-]{0,8}",
            inline in any::<bool>(),
        ) {
            prop_assume!(first.to_lowercase() != second.to_lowercase());
            prop_assume!(!context.is_empty() && !context.starts_with('-'));
            let git = GitFacts {
                branch: Some(branch),
                default_branch,
                commit: Some(commit),
                ..Default::default()
            };
            let mut options = PlanOptions::new(&context, Repository::parse("127.0.0.1:5000/app").unwrap(), git);
            options.backend = if inline { Backend::Inline } else { Backend::parse("registry", None).unwrap() };
            options.build_args.insert("VERSION".into(), build_arg);
            options.tags = vec!["127.0.0.1:5000/app:v1".into()];
            options.push_tags = true;
            let text = format!("FROM alpine AS {first}\nFROM {} AS {second}\n", first.to_lowercase());
            let parsed = parse_dockerfile_text(&text, &Default::default()).unwrap();
            let plan = Plan::from_dockerfile(&options, std::path::Path::new(&dockerfile), &parsed).unwrap();
            let script = plan.to_string();

            let dir = tempfile::tempdir().unwrap();
            let bin = stubs(dir.path());
            let syntax = std::process::Command::new("bash").args(["-n", "-c", &script]).status().unwrap();
            prop_assert!(syntax.success(), "{}", script);
            let status = std::process::Command::new("bash")
                .args(["-c", &script])
                .current_dir(dir.path())
                .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
                .status()
                .unwrap();
            prop_assert!(status.success(), "{}", script);
            prop_assert_eq!(recorded(dir.path()), planned(&plan), "{}", script);
            let entries: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            prop_assert_eq!(entries.len(), 2, "the script made files: {:?}", entries);
        }
    }
}
