//! `cargo xtask bench`: measured on this machine, in one run, against the recipes users run
//! today; written to BENCHMARKS.md.
//!
//! - Rebuild times of example-project on a fresh runner (no images, no build cache): the seed
//!   recipe (pull, `--cache-from` with inline cache, push; builder and final image, as in seed 004)
//!   against `cachefrom build` (registry backend), for no change, a source change, a new branch.
//! - Checking which cache refs exist: 4 candidates for each of 3 stages, against
//!   `docker buildx imagetools inspect` and `docker pull` of the same refs.
//! - Planning a 20-stage Dockerfile.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use cachefrom::ci::Environment;
use cachefrom::exec::{build_with_cache, BuildOptions, Context, OutputStyle};
use cachefrom::plan::{Plan, PlanOptions};
use cachefrom::refs::Repository;
use cachefrom::registry::{Existence, RegistryClient};
use cachefrom::settings::Settings;
use cachefrom_stack::{
    change_source, example_build_args, example_docker_args, example_repository_copy, fresh_runner, git,
    unique_repository,
};
use xshell::{cmd, Shell};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Only the quick benchmarks (planning, existence checks): no builds.
    #[arg(long)]
    quick: bool,
    /// Runs of each synthetic scenario; the fastest is kept.
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// Leave out the example-project rebuilds (minutes).
    #[arg(long)]
    skip_example: bool,
    /// Run one section only (`matrix`: the CI matrix of platforms; `docker-init`: example-project
    /// in docker init's style) and put it into BENCHMARKS.md in place of the one there (or at its end).
    #[arg(long, value_name = "SECTION", value_parser = ["matrix", "docker-init"])]
    only: Option<String>,
}

pub fn run(sh: &Shell, args: &BenchArgs) -> Result<()> {
    // What is measured is what users run: a release build, the library in-process included.
    if cfg!(debug_assertions) {
        eprintln!("bench: building and running the benchmarks for release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = std::process::Command::new(cargo)
            .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
            .args(std::env::args_os().skip(1))
            .current_dir(cachefrom_stack::repository_root())
            .status()
            .context("starting cargo")?;
        if !status.success() {
            bail!("the release benchmarks failed ({status})");
        }
        return Ok(());
    }
    crate::stack::Stack::new().up(sh)?;
    if let Some(only) = &args.only {
        let (heading, section) = match only.as_str() {
            "matrix" => ("## A CI matrix of platforms", crate::bench_synthetic::matrix(args.reps)?),
            _ => ("## example-project in docker init's style", docker_init(args.reps)?),
        };
        let path = cachefrom_stack::repository_root().join("BENCHMARKS.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let text = match text.find(heading) {
            Some(start) => {
                let rest = &text[start + heading.len()..];
                let end = rest.find("\n## ").map_or(text.len(), |at| start + heading.len() + at + 1);
                format!("{}{section}{}", &text[..start], &text[end..])
            }
            None => format!("{text}{section}"),
        };
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        print!("{section}");
        return Ok(());
    }
    let mut out = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask bench` on {} ({} cores). Every figure of one table comes from the same run.\n",
        hostname(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    out.push_str(&planning()?);
    out.push_str(&existence_checks(sh)?);
    if !args.quick {
        let (synthetic, bars) = crate::bench_synthetic::synthetic(args.reps)?;
        let matrix = crate::bench_synthetic::matrix(args.reps)?;
        let chart = cachefrom_stack::repository_root().join("docs/benchmarks.png");
        crate::chart::draw(&chart, "cachefrom against the best hand-written build, fresh runner", &bars)?;
        out.push_str(
            "![Each synthetic scenario's ratio, cachefrom over the hand-written build](docs/benchmarks.png)\n\n",
        );
        out.push_str(&synthetic);
        out.push_str(&matrix);
        if !args.skip_example {
            out.push_str(&rebuilds(sh)?);
            out.push_str(&docker_init(args.reps)?);
        }
    }
    let path = cachefrom_stack::repository_root().join("BENCHMARKS.md");
    std::fs::write(&path, &out).with_context(|| format!("writing {}", path.display()))?;
    print!("{out}");
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "this machine".into())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

fn planning() -> Result<String> {
    let dir = tempfile::tempdir()?;
    let mut dockerfile = String::from("ARG BASE=debian:bookworm\n");
    for i in 0..20 {
        let from = if i == 0 { "${BASE}".to_string() } else { format!("s{}", i - 1) };
        let _ = write!(dockerfile, "FROM {from} AS s{i}\nRUN echo {i} > /s{i}\n");
        if i >= 2 {
            let _ = writeln!(dockerfile, "COPY --from=s{} /s{} /copied{i}", i - 2, i - 2);
        }
    }
    std::fs::write(dir.path().join("Dockerfile"), &dockerfile)?;
    git(dir.path(), &["init", "-q", "-b", "main"])?;
    git(dir.path(), &["add", "."])?;
    git(dir.path(), &["commit", "-q", "-m", "one"])?;
    let env = Environment::default();
    let mut samples = Vec::new();
    let mut stages = 0;
    for _ in 0..50 {
        let started = Instant::now();
        let options = Settings::new("127.0.0.1:5000/bench", dir.path()).plan_options(&env)?;
        let plan = Plan::new(&options)?;
        let _script = plan.to_string();
        samples.push(started.elapsed());
        stages = plan.stages.len();
    }
    let mut out = String::from("## Planning\n\n");
    let _ = writeln!(
        out,
        "A 20-stage Dockerfile ({stages} stages built), from reading git and the file to the rendered script, median of 50: **{}** (goal: under 50 ms).\n",
        ms(median(samples))
    );
    Ok(out)
}

fn existence_checks(sh: &Shell) -> Result<String> {
    // Three stages, four candidates each; half of them exist.
    let repository_text = unique_repository("exists");
    let repository = Repository::parse(&repository_text)?;
    let base = cachefrom_stack::RUNTIME_BASE_IMAGE;
    cmd!(sh, "timeout 300 docker pull -q {base}").quiet().ignore_stdout().run()?;
    let mut refs = Vec::new();
    for stage in ["deps", "builder", "runtime"] {
        for (level, exists) in
            [("feature-x", false), ("0123456789abcdef0123456789abcdef01234567", true), ("main", true), ("", false)]
        {
            let tag = if level.is_empty() { format!("cache-{stage}") } else { format!("cache-{stage}.{level}") };
            if exists {
                let target = repository.with_tag(&tag);
                cmd!(sh, "timeout 120 docker tag {base} {target}").quiet().run()?;
                cmd!(sh, "timeout 300 docker push -q {target}").quiet().ignore_stdout().run()?;
            }
            refs.push((repository.clone(), tag, exists));
        }
    }
    let client = RegistryClient::default();
    let checks: Vec<(Repository, String)> = refs.iter().map(|(r, t, _)| (r.clone(), t.clone())).collect();
    let answers = client.check_all(&checks);
    for ((_, tag, exists), answer) in refs.iter().zip(&answers) {
        let expected = if *exists { Existence::Exists } else { Existence::Missing };
        if *answer != expected {
            bail!("existence check of {tag} answered {answer:?}, expected {expected:?}");
        }
    }
    let mut http = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let _ = client.check_all(&checks);
        http.push(started.elapsed());
    }
    let http = median(http);

    let started = Instant::now();
    for (repository, tag, _) in &refs {
        let reference = repository.with_tag(tag);
        let _ = cmd!(sh, "timeout 60 docker buildx imagetools inspect {reference}")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run();
    }
    let imagetools = started.elapsed();

    fresh_runner()?;
    let started = Instant::now();
    for (repository, tag, _) in &refs {
        let reference = repository.with_tag(tag);
        let _ = cmd!(sh, "timeout 300 docker pull -q {reference}").quiet().ignore_stdout().ignore_stderr().run();
    }
    let pull = started.elapsed();

    let mut out = String::from("## Which caches exist?\n\n");
    let _ = writeln!(out, "4 candidate refs for each of 3 stages (6 exist, 6 do not), local registry.\n");
    let _ = writeln!(out, "| method | time for all 12 | downloads layers | ratio |\n|---|---|---|---|");
    let _ = writeln!(out, "| cachefrom: manifest `HEAD`, in parallel (median of 20) | {} | no | 1x |", ms(http));
    let _ = writeln!(
        out,
        "| `docker buildx imagetools inspect`, one after another | {} | no | {:.0}x |",
        ms(imagetools),
        imagetools.as_secs_f64() / http.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| `docker pull`, one after another (the seed recipe's way) | {} | yes | {:.0}x |\n",
        ms(pull),
        pull.as_secs_f64() / http.as_secs_f64()
    );
    Ok(out)
}

/// The seed recipe (seeds 001 and 004): pull the branch's images, falling back to main's; build
/// the `builder` target and the final image with inline cache and `--cache-from`; push both.
fn seed_recipe(dir: &Path, image: &str, branch: &str) -> String {
    let mut options: Vec<String> = example_build_args().iter().map(|(k, v)| format!("--build-arg {k}={v}")).collect();
    options.extend(example_docker_args());
    let options = options.join(" ");
    let branch = cachefrom::refs::sanitize_tag(branch);
    format!(
        r#"set -e
cd '{dir}'
IMG='{image}'
docker pull -q "$IMG:{branch}-builder" || docker pull -q "$IMG:main-builder" || true
docker pull -q "$IMG:{branch}" || docker pull -q "$IMG:main" || true
docker build -q --build-arg BUILDKIT_INLINE_CACHE=1 {options} --cache-from "$IMG:{branch}-builder" --cache-from "$IMG:main-builder" --target builder -t "$IMG:{branch}-builder" .
docker build -q --build-arg BUILDKIT_INLINE_CACHE=1 {options} --cache-from "$IMG:{branch}-builder" --cache-from "$IMG:{branch}" --cache-from "$IMG:main" -t "$IMG:{branch}" .
docker push -q "$IMG:{branch}-builder"
docker push -q "$IMG:{branch}"
"#,
        dir = dir.display()
    )
}

fn time_recipe(sh: &Shell, script: &str) -> Result<Duration> {
    let started = Instant::now();
    cmd!(sh, "timeout 1800 bash -c {script}")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .context("the seed recipe failed")?;
    Ok(started.elapsed())
}

fn time_cachefrom(dir: &Path, image: &str, branch: &str) -> Result<Duration> {
    let mut settings = cachefrom_stack::example_settings(image, dir);
    settings.branch = Some(branch.to_string());
    time_settings(&settings)
}

/// The time of `build_with_cache` with `settings`, quietly.
fn time_settings(settings: &Settings) -> Result<Duration> {
    let options: PlanOptions = settings.plan_options(&Environment::default())?;
    let mut ctx = Context::from_environment();
    ctx.style = OutputStyle::Quiet;
    let started = Instant::now();
    build_with_cache(&ctx, &BuildOptions::new(options))?;
    Ok(started.elapsed())
}

fn rebuilds(sh: &Shell) -> Result<String> {
    let repo = example_repository_copy()?;
    let dir = repo.path();
    let recipe_image = unique_repository("recipe");
    let cachefrom_image = unique_repository("cachefrom");
    let mut rows: BTreeMap<usize, (String, Duration, Duration)> = BTreeMap::new();

    eprintln!("bench: cold builds");
    fresh_runner()?;
    let recipe_cold = time_recipe(sh, &seed_recipe(dir, &recipe_image, "main"))?;
    fresh_runner()?;
    let cachefrom_cold = time_cachefrom(dir, &cachefrom_image, "main")?;
    rows.insert(0, ("cold (nothing cached; the run that seeds the caches)".into(), recipe_cold, cachefrom_cold));

    let scenarios: [(&str, &str); 3] =
        [("no change", "main"), ("source change", "main"), ("new branch, source change", "feature/bench")];
    for (index, (what, branch)) in scenarios.iter().enumerate() {
        eprintln!("bench: {what}");
        if *what == "source change" {
            change_source(dir, "bench source change")?;
        }
        if branch != &"main" {
            git(dir, &["checkout", "-q", "-b", branch])?;
            change_source(dir, "bench branch change")?;
        }
        fresh_runner()?;
        let recipe = time_recipe(sh, &seed_recipe(dir, &recipe_image, branch))?;
        fresh_runner()?;
        let ours = time_cachefrom(dir, &cachefrom_image, branch)?;
        rows.insert(index + 1, (what.to_string(), recipe, ours));
    }

    let mut out = String::from("## Rebuilds of example-project on a fresh runner\n\n");
    out.push_str("Each rebuild starts with no local image and no build cache (`docker image prune -af`, `docker buildx prune -af`), the caches in the local registry. The seed recipe: pull the branch's `builder` and final images (falling back to main's), build both with inline cache and `--cache-from`, push both (seeds 001 and 004). cachefrom: `registry` backend, one build of the target with one BuildKit `mode=max` cache that holds every stage (deps, builder, runtime); its no-change run finds its inputs recorded on that cache and builds nothing.\n\n");
    out.push_str("| scenario | seed recipe | cachefrom | speed-up |\n|---|---|---|---|\n");
    for (what, recipe, ours) in rows.values() {
        let _ = writeln!(
            out,
            "| {what} | {:.1} s | {:.1} s | {:.1}x |",
            recipe.as_secs_f64(),
            ours.as_secs_f64(),
            recipe.as_secs_f64() / ours.as_secs_f64()
        );
    }
    out.push('\n');
    Ok(out)
}

/// The one-liner for `Dockerfile.docker-init`: the branch's registry cache in and out
/// (`mode=max`), the image pushed. Its cache mounts start empty on a fresh runner.
fn docker_init_one_liner(dir: &Path, image: &str) -> Result<Duration> {
    let mut command = std::process::Command::new("timeout");
    command.args(["1800", "docker", "buildx", "build", "--progress=plain", "--provenance=false", "-f"]);
    command.arg(dir.join("Dockerfile.docker-init"));
    for (name, value) in example_build_args() {
        command.args(["--build-arg", &format!("{name}={value}")]);
    }
    command.args(example_docker_args());
    command.args(["--cache-from", &format!("type=registry,ref={image}:cache-main")]);
    command.args([
        "--cache-to",
        &format!(
            "type=registry,ref={image}:cache-main,mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true"
        ),
    ]);
    command.args(["-t", &format!("{image}:main"), "--push"]).arg(dir);
    let started = Instant::now();
    let output = command.output().context("starting docker")?;
    if !output.status.success() {
        bail!(
            "the one-liner failed: {}",
            String::from_utf8_lossy(&output.stderr).lines().rev().take(6).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(started.elapsed())
}

fn docker_init_cachefrom(dir: &Path, image: &str) -> Result<Duration> {
    let mut settings = cachefrom_stack::example_settings(image, dir);
    settings.file = Some(dir.join("Dockerfile.docker-init"));
    settings.tags = vec![format!("{image}:main")];
    settings.push = true;
    time_settings(&settings)
}

/// example-project's `Dockerfile.docker-init` on fresh runners: cold, then a source edit; each
/// way's fastest of `reps` (each rep in a repository and image repositories of its own).
fn docker_init(reps: usize) -> Result<String> {
    let scenarios = ["cold (empty cache mounts, nothing cached)", "source change"];
    let mut rows: Vec<(&str, Option<Duration>, Option<Duration>)> =
        scenarios.iter().map(|what| (*what, None, None)).collect();
    let fastest = |kept: &mut Option<Duration>, new: Duration| {
        if kept.is_none_or(|kept| new < kept) {
            *kept = Some(new);
        }
    };
    for rep in 0..reps.max(1) {
        let repo = example_repository_copy()?;
        let dir = repo.path();
        let (one_image, our_image) = (unique_repository("init-one-liner"), unique_repository("init-cachefrom"));
        for (index, what) in scenarios.iter().enumerate() {
            if index == 1 {
                change_source(dir, "bench docker-init change")?;
            }
            eprintln!("bench: docker-init {what} ({}/{reps})", rep + 1);
            fresh_runner()?;
            fastest(&mut rows[index].1, docker_init_one_liner(dir, &one_image)?);
            fresh_runner()?;
            fastest(&mut rows[index].2, docker_init_cachefrom(dir, &our_image)?);
        }
    }
    let rows: Vec<(&str, Duration, Duration)> =
        rows.into_iter().map(|(what, one, ours)| (what, one.unwrap_or_default(), ours.unwrap_or_default())).collect();
    let mut out = String::from("## example-project in docker init's style (cache mounts) on a fresh runner\n\n");
    let _ = write!(out, "`Dockerfile.docker-init`: the sources bind-mounted, `target/` and cargo's registry and git directories in cache mounts, no layer with the compiled dependencies. The one-liner: `docker buildx build --cache-from type=registry,ref=R:cache-main --cache-to type=registry,ref=R:cache-main,mode=max,… -t R:main --push`; its cache mounts start empty on every fresh runner. cachefrom: `cachefrom build --tag R:main --push` (registry backend), which restores the cache mounts before the build and saves them after it. Fastest of {} each.\n\n", reps.max(1));
    out.push_str("| scenario | one-liner | cachefrom | ratio (cachefrom / one-liner) |\n|---|---|---|---|\n");
    for (what, one, ours) in rows {
        let _ = writeln!(
            out,
            "| {what} | {:.1} s | {:.1} s | **{:.2}** |",
            one.as_secs_f64(),
            ours.as_secs_f64(),
            ours.as_secs_f64() / one.as_secs_f64()
        );
    }
    out.push('\n');
    Ok(out)
}
