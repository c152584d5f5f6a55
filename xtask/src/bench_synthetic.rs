//! The synthetic benchmarks: cachefrom against the best hand-written build, one
//! `docker buildx build --cache-from … --cache-to type=registry,…,mode=max`, on a fresh runner,
//! in the same run, with the bytes each moved to and from the registry (its access log).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use cachefrom_stack::{fresh_runner, git, unique_repository, RUNTIME_BASE_IMAGE};

/// The registry's access log and storage, as `cargo xtask stack up` sets them.
const REGISTRY_LOG: &str = "/var/lib/cachefrom-stack/registry.log";
const REGISTRY_BLOBS: &str = "/var/lib/cachefrom-stack/registry/docker/registry/v2/blobs/sha256";

/// The application: a dependency stage (~12 s, ~20 MB), a build stage (~4 s), a slim final stage.
const APP: &str = r#"ARG BASE
FROM ${BASE} AS deps
WORKDIR /app
COPY deps.txt ./
RUN sleep 12 && head -c 20000000 /dev/urandom > /app/deps.bin
FROM deps AS builder
COPY src ./src
RUN sleep 4 && cat src/* > /app/app.bin
FROM ${BASE} AS runtime
COPY --from=builder /app/app.bin /usr/local/bin/app.bin
RUN ls -l /usr/local/bin/app.bin
"#;

fn wide() -> String {
    let mut text = String::from("ARG BASE\n");
    for name in ["a", "b", "c"] {
        let _ = write!(text, "FROM ${{BASE}} AS {name}\nRUN sleep 6 && echo {name} > /{name}\n");
    }
    text.push_str("FROM ${BASE} AS final\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /c /c\n");
    text
}

fn chain(stages: usize) -> String {
    let mut text = String::from("ARG BASE\nFROM ${BASE} AS s0\nRUN echo 0 > /s0\n");
    for i in 1..stages {
        let _ = write!(text, "FROM s{} AS s{i}\nRUN echo {i} > /s{i}\n", i - 1);
    }
    text
}

/// Bytes moved through the registry since a mark in its access log.
struct Traffic {
    offset: u64,
}

impl Traffic {
    fn mark() -> Traffic {
        Traffic { offset: std::fs::metadata(REGISTRY_LOG).map(|m| m.len()).unwrap_or(0) }
    }

    /// (uploaded, downloaded) bytes: completed blob uploads (their size in the registry's
    /// storage) and the bytes of every answer.
    fn since(&self) -> (u64, u64) {
        let text = std::fs::read(REGISTRY_LOG).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(self.offset as usize..).unwrap_or_default());
        let (mut up, mut down) = (0, 0);
        for line in text.lines() {
            let Some(request) = line.split('"').nth(1) else { continue };
            let after = line.split('"').nth(2).unwrap_or_default();
            let mut numbers = after.split_whitespace();
            let status: u16 = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let bytes: u64 = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            if request.starts_with("GET ") {
                down += bytes;
            }
            if request.starts_with("PUT ") && request.contains("/blobs/uploads/") && status == 201 {
                if let Some(hex) = request.split("digest=sha256%3A").nth(1).map(|rest| &rest[..64.min(rest.len())]) {
                    let data = Path::new(REGISTRY_BLOBS).join(&hex[..2]).join(hex).join("data");
                    up += std::fs::metadata(data).map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        (up, down)
    }
}

/// One measured run.
#[derive(Clone, Copy)]
struct Run {
    seconds: f64,
    up: u64,
    down: u64,
}

fn measure(run: impl FnOnce() -> Result<()>) -> Result<Run> {
    fresh_runner()?;
    let traffic = Traffic::mark();
    let started = Instant::now();
    run()?;
    let seconds = started.elapsed().as_secs_f64();
    // The registry writes its log line after answering.
    std::thread::sleep(Duration::from_millis(200));
    let (up, down) = traffic.since();
    Ok(Run { seconds, up, down })
}

fn best(runs: &[Run]) -> Run {
    *runs.iter().min_by(|a, b| a.seconds.total_cmp(&b.seconds)).expect("at least one run")
}

fn run_checked(command: &mut Command, what: &str) -> Result<()> {
    let output = command.output().with_context(|| format!("starting {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&output.stderr).lines().rev().take(8).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// The best hand-written build: one build, the branch's cache (and main's on another branch),
/// one `mode=max` export, the image tagged and pushed.
fn hand_written(dir: &Path, image: &str, branch: &str) -> Result<()> {
    let tag = cachefrom::refs::sanitize_tag(branch);
    let mut command = Command::new("timeout");
    command.args(["1800", "docker", "buildx", "build", "--progress=plain", "--provenance=false", "--network=none"]);
    command.arg(format!("--build-arg=BASE={RUNTIME_BASE_IMAGE}"));
    command.args(["--cache-from", &format!("type=registry,ref={image}:cache-{tag}")]);
    if tag != "main" {
        command.args(["--cache-from", &format!("type=registry,ref={image}:cache-main")]);
    }
    command.args([
        "--cache-to",
        &format!(
            "type=registry,ref={image}:cache-{tag},mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"
        ),
    ]);
    command.args(["-t", &format!("{image}:{tag}"), "--push"]).arg(dir);
    run_checked(&mut command, "the hand-written build")
}

/// `cachefrom build` (the CLI, as a CI step runs it), the same image tagged and pushed.
fn cachefrom(dir: &Path, image: &str, branch: &str) -> Result<()> {
    let tag = cachefrom::refs::sanitize_tag(branch);
    let mut command = Command::new(cachefrom_stack::cachefrom_binary());
    command.args(["build", "--quiet", "--image", image, "--branch", branch, "--default-branch", "main"]);
    command.args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--tag", &format!("{image}:{tag}"), "--push"]);
    command.arg(dir).args(["--", "--network=none"]);
    run_checked(&mut command, "cachefrom build")
}

type Tool = fn(&Path, &str, &str) -> Result<()>;
const TOOLS: [(&str, Tool); 2] = [("hand-written", hand_written), ("cachefrom", cachefrom)];

/// A row: the scenario and each tool's best run.
struct Row {
    scenario: String,
    runs: Vec<Run>,
}

/// Runs `scenarios` for each tool on its own copy of the project, `reps` times each.
fn scenarios(dockerfile: &str, list: &[&str], reps: usize) -> Result<Vec<Row>> {
    scenarios_of(&|| cachefrom_stack::synthetic_project(dockerfile), list, reps)
}

/// A compile step that keeps its objects in a cache mount: 24 source files, 1 s for each one not
/// compiled yet (by content), on the runtime base.
const MOUNTED: &str = r#"ARG BASE
FROM ${BASE} AS build
COPY src /src
RUN --mount=type=cache,id=objs,target=/objs \
    for f in /src/*.txt; do h=$(sha256sum "$f" | cut -c1-16); \
    if [ ! -f /objs/$h ]; then sleep 1; cp "$f" /objs/$h; fi; done; cat /src/*.txt > /app
FROM ${BASE} AS runtime
COPY --from=build /app /app
"#;

fn mounted_project() -> Result<tempfile::TempDir> {
    let dir = cachefrom_stack::synthetic_project(MOUNTED)?;
    for n in 1..24 {
        std::fs::write(dir.path().join(format!("src/f{n:02}.txt")), format!("source {n}\n"))?;
    }
    git(dir.path(), &["add", "-A"])?;
    git(dir.path(), &["commit", "-q", "-m", "sources"])?;
    Ok(dir)
}

/// [`scenarios`] on the projects `project` makes. The tools take turns within each rep (each on
/// its own copy of the project), so that a drift of the machine weighs on both alike.
fn scenarios_of(project: &dyn Fn() -> Result<tempfile::TempDir>, list: &[&str], reps: usize) -> Result<Vec<Row>> {
    let mut per_tool: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); list.len()]; TOOLS.len()];
    for rep in 0..reps {
        for ((tool_name, tool), per_scenario) in TOOLS.iter().zip(per_tool.iter_mut()) {
            let dir = project()?;
            let dir = dir.path();
            let image = unique_repository(&format!("bench-{tool_name}"));
            let mut branch = "main".to_string();
            for (index, scenario) in list.iter().enumerate() {
                eprintln!("bench: {tool_name} {scenario} ({}/{reps})", rep + 1);
                match *scenario {
                    "source change" => change(dir, "src/main.txt")?,
                    "dependency change" => change(dir, "deps.txt")?,
                    "new branch + source change" => {
                        branch = format!("feature/bench-{rep}");
                        git(dir, &["checkout", "-q", "-b", &branch])?;
                        change(dir, "src/main.txt")?;
                    }
                    _ => {}
                }
                per_scenario[index].push(measure(|| tool(dir, &image, &branch))?);
            }
        }
    }
    let rows = list
        .iter()
        .enumerate()
        .map(|(index, scenario)| Row {
            scenario: scenario.to_string(),
            runs: per_tool.iter().map(|per_scenario| best(&per_scenario[index])).collect(),
        })
        .collect();
    Ok(rows)
}

fn change(dir: &Path, file: &str) -> Result<()> {
    let path = dir.join(file);
    let mut text = std::fs::read_to_string(&path)?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let _ = writeln!(text, "change {stamp}");
    std::fs::write(&path, text)?;
    git(dir, &["commit", "-q", "-am", "change"])?;
    Ok(())
}

fn megabytes(bytes: u64) -> String {
    if bytes < 1_000_000 {
        format!("{:.0} KB", bytes as f64 / 1000.0)
    } else {
        format!("{:.1} MB", bytes as f64 / 1_000_000.0)
    }
}

/// The chart's bars of a table: `short: scenario` and cachefrom's ratio.
fn bars(short: &str, rows: &[Row]) -> Vec<crate::chart::Bar> {
    rows.iter()
        .map(|row| crate::chart::Bar {
            label: format!("{short}: {}", row.scenario),
            ratio: row.runs[1].seconds / row.runs[0].seconds,
        })
        .collect()
}

fn table(title: &str, rows: &[Row], out: &mut String) {
    let _ = writeln!(out, "### {title}\n");
    let _ = writeln!(
        out,
        "| scenario | hand-written | cachefrom | ratio (cachefrom / hand-written) | uploaded (hand / cachefrom) | downloaded (hand / cachefrom) |\n|---|---|---|---|---|---|"
    );
    for row in rows {
        let (hand, ours) = (row.runs[0], row.runs[1]);
        let _ = writeln!(
            out,
            "| {} | {:.2} s | {:.2} s | **{:.2}** | {} / {} | {} / {} |",
            row.scenario,
            hand.seconds,
            ours.seconds,
            ours.seconds / hand.seconds,
            megabytes(hand.up),
            megabytes(ours.up),
            megabytes(hand.down),
            megabytes(ours.down)
        );
    }
    out.push('\n');
}

/// The synthetic section of BENCHMARKS.md and its chart's bars; `reps` runs of each, the fastest kept.
pub fn synthetic(reps: usize) -> Result<(String, Vec<crate::chart::Bar>)> {
    // Built before anything is timed.
    let _ = cachefrom_stack::cachefrom_binary();
    let mut out = String::from("## Against the best hand-written build (synthetic, fresh runner)\n\n");
    out.push_str(&format!(
        "Every run starts as a fresh runner (no image, no build cache); fastest of {reps}. Hand-written: one \
`docker buildx build --cache-from type=registry,ref=R:cache-BRANCH [--cache-from …:cache-main] --cache-to \
type=registry,ref=R:cache-BRANCH,mode=max,image-manifest=true,oci-mediatypes=true -t R:BRANCH --push`. \
cachefrom: `cachefrom build --image R --tag R:BRANCH --push` (the CLI, registry backend), which also writes \
the commit and unprefixed tags and a cache tag for every stage. Bytes are from the registry's access log: \
uploaded = blob uploads completed, downloaded = bytes of every answer.\n\n"
    ));
    let app = scenarios(
        APP,
        &["cold", "no change", "source change", "dependency change", "new branch + source change"],
        reps,
    )?;
    table("Application: deps (~12 s, 20 MB), builder (~4 s), runtime", &app, &mut out);
    let mut chart = bars("app", &app);
    let wide_rows = scenarios(&wide(), &["cold", "no change"], reps)?;
    table("Three independent 6 s stages and a final one", &wide_rows, &mut out);
    chart.extend(bars("3 stages", &wide_rows));
    let chain_rows = scenarios(&chain(12), &["cold", "no change"], reps)?;
    table("A chain of 12 one-step stages", &chain_rows, &mut out);
    chart.extend(bars("chain of 12", &chain_rows));
    let mounted = scenarios_of(&mounted_project, &["cold", "no change", "source change"], reps)?;
    table(
        "A compile step with a cache mount (24 files, 1 s each not compiled yet): cachefrom keeps the mount",
        &mounted,
        &mut out,
    );
    chart.extend(bars("cache mount", &mounted));
    Ok((out, chart))
}

/// A cross-compiling Dockerfile (its work runs on `$BUILDPLATFORM`): deps (~4 s) and a build
/// (~2 s) for each target platform.
const CROSS: &str = r#"ARG BASE
FROM --platform=$BUILDPLATFORM ${BASE} AS deps
ARG TARGETARCH
COPY deps.txt /deps.txt
RUN sleep 4 && echo "deps for $TARGETARCH" > /deps && cat /deps.txt >> /deps
FROM --platform=$BUILDPLATFORM deps AS build
ARG TARGETARCH
COPY src /src
RUN sleep 2 && echo "$TARGETARCH: $(cat /src/main.txt)" > /app
FROM scratch AS final
COPY --from=build /app /app
"#;

const PLATFORMS: [&str; 2] = ["linux/amd64", "linux/arm64"];

/// One platform's job of a matrix, by each way of writing it.
fn matrix_job(way: &str, dir: &Path, image: &str, platform: &str) -> Result<()> {
    let arch = platform.rsplit('/').next().unwrap_or(platform);
    if way == "cachefrom" {
        let mut command = Command::new(cachefrom_stack::cachefrom_binary());
        command.args(["build", "--quiet", "--image", image, "--branch", "main", "--default-branch", "main"]);
        command.args(["--platform", platform, "--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}")]);
        command.args(["--tag", &format!("{image}:{arch}"), "--push"]).arg(dir).args(["--", "--network=none"]);
        return run_checked(&mut command, "cachefrom build");
    }
    let reference = if way == "one ref for all" { format!("{image}:cache") } else { format!("{image}:cache-{arch}") };
    let mut command = Command::new("timeout");
    command.args(["1800", "docker", "buildx", "build", "--progress=plain", "--provenance=false", "--network=none"]);
    command.args(["--platform", platform, "--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}")]);
    command.args(["--cache-from", &format!("type=registry,ref={reference}")]);
    command.args([
        "--cache-to",
        &format!("type=registry,ref={reference},mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"),
    ]);
    command.args(["-t", &format!("{image}:{arch}"), "--push"]).arg(dir);
    run_checked(&mut command, "the one-liner")
}

/// The CI matrix section: each way's second round (a source change, both platforms, each job on
/// a fresh runner), fastest of `reps`.
pub fn matrix(reps: usize) -> Result<String> {
    let ways = ["one ref for all", "a ref per platform", "cachefrom"];
    let mut best: Vec<Option<Run>> = vec![None; ways.len()];
    // The ways take turns within each rep, so that a drift of the machine (the registry's
    // growing storage, the engine's state) weighs on all of them alike.
    for rep in 0..reps {
        for (index, way) in ways.iter().enumerate() {
            let project = cachefrom_stack::synthetic_project(CROSS)?;
            let dir = project.path();
            let image = unique_repository("bench-matrix");
            for platform in PLATFORMS {
                eprintln!("bench: matrix {way} seed {platform} ({}/{reps})", rep + 1);
                fresh_runner()?;
                matrix_job(way, dir, &image, platform)?;
            }
            change(dir, "src/main.txt")?;
            let mut round = Run { seconds: 0.0, up: 0, down: 0 };
            for platform in PLATFORMS {
                eprintln!("bench: matrix {way} second round {platform} ({}/{reps})", rep + 1);
                let run = measure(|| matrix_job(way, dir, &image, platform))?;
                round =
                    Run { seconds: round.seconds + run.seconds, up: round.up + run.up, down: round.down + run.down };
            }
            if best[index].is_none_or(|kept| round.seconds < kept.seconds) {
                best[index] = Some(round);
            }
        }
    }
    let mut out = String::from("## A CI matrix of platforms (synthetic, fresh runners)\n\n");
    out.push_str("A cross-compiling Dockerfile (deps ~4 s, build ~2 s, run on the build platform), one job a platform (linux/amd64, then linux/arm64), each on a fresh runner, one image repository. After a seeding round, a source change; the table gives the second round (both jobs, summed), fastest of the runs. One ref for all: `--cache-from/--cache-to type=registry,ref=R:cache` in every job (what most workflows write; the last job's export replaces the other's). A ref per platform: `R:cache-amd64`, `R:cache-arm64` (the manual workaround). cachefrom: `cachefrom build --platform P` (its tags carry the platform).\n\n");
    out.push_str(
        "| way | second round | ratio (against one ref for all) | ratio (against a ref per platform) | uploaded | downloaded |\n|---|---|---|---|---|---|\n",
    );
    let shared = best[0].map(|run| run.seconds).unwrap_or(f64::NAN);
    let per_platform = best[1].map(|run| run.seconds).unwrap_or(f64::NAN);
    for (way, run) in ways.iter().zip(&best) {
        let run = run.expect("at least one rep");
        let _ = writeln!(
            out,
            "| {way} | {:.2} s | **{:.2}** | **{:.2}** | {} | {} |",
            run.seconds,
            run.seconds / shared,
            run.seconds / per_platform,
            megabytes(run.up),
            megabytes(run.down)
        );
    }
    out.push('\n');
    Ok(out)
}
