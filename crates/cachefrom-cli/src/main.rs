//! `cachefrom`: Docker layer caching for CI runners that start empty. See `cachefrom --help`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use cachefrom::ci::Environment;
use cachefrom::dockerfile::read_dockerfile_with;
use cachefrom::engine::BackendFallback;
use cachefrom::exec::{build_with_cache, BuildOptions, Context, OutputStyle};
use cachefrom::output::safe_line;
use cachefrom::plan::{Plan, PlanOptions};
use cachefrom::settings::Settings;
use cachefrom::{Access, Backend, Level};
use clap::{Args, Parser, Subcommand};

// The exit codes, one place for all: `cachefrom::Error::exit_code`.
use cachefrom::error::{EXIT_ENVIRONMENT, EXIT_USAGE};

#[derive(Parser, Debug)]
#[command(
    name = "cachefrom",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CACHEFROM_BUILD_COMMIT"), ")"),
    about = "Docker layer caching for CI runners that start empty",
    long_about = "Docker layer caching for CI runners that start empty.\n\n\
cachefrom builds every stage of a multi-stage Dockerfile with its own cache, read from the most specific \
place that has one (this branch, its merge-base with the default branch, the default branch, the previous \
commit, an unprefixed tag), and writes the caches back even when a later stage fails.\n\n\
Every option can also be set with an environment variable CACHEFROM_<OPTION> (shown in each option's help).",
    after_help = "Examples:\n  \
cachefrom build --image registry.example.com/team/app .\n  \
cachefrom build --image 127.0.0.1:5000/app --backend inline --tag 127.0.0.1:5000/app:v1 --push example-project -- --network=host\n  \
cachefrom plan --image registry.example.com/team/app .        # the shell script it would run\n  \
cachefrom explain --image registry.example.com/team/app .     # would each stage hit its cache? if not, why\n  \
cachefrom stages -f Dockerfile --json\n\n\
Exit codes: 0 success, 1 the build failed, 2 usage error (bad option, missing Dockerfile, unknown target),\n\
3 the environment is not ready (docker missing, daemon not answering; with --strict-cache, a cache that cannot be read or written),\n\
130/143 cancelled by SIGINT/SIGTERM (the caches of the stages that finished are written first; a second signal exits at once)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build with caches: check which caches exist, build each stage, write the caches back.
    Build(BuildArgs),
    /// Print the plan as the shell script it amounts to (a dry run; nothing runs).
    Plan(PlanArgs),
    /// Say, without building, whether each stage would hit its cache and if not why: the first
    /// instruction whose inputs (files, build arguments, base image, text) differ from the record
    /// written beside the cache it would read. Takes the same options as `build`.
    Explain(PlanArgs),
    /// List the Dockerfile's stages and the build order for a target.
    Stages(StagesArgs),
    /// Give a cache (or any manifest) in a registry further tags in the same repository: the
    /// manifest is read once and written under each tag byte for byte; no layer moves. The
    /// printed plan uses it to write a cache's further tags.
    CopyTag(CopyTagArgs),
    /// Remove the cache tags nobody reads any more: those of branches that no longer exist, and
    /// commit tags beyond the newest few of each stage. Never the default branch's tags, never
    /// the unprefixed ones. A dry run unless --apply.
    Prune(PruneArgs),
}

#[derive(Args, Debug)]
struct PruneArgs {
    /// The repository the caches are in: REGISTRY/NAME, without a tag.
    #[arg(long, env = "CACHEFROM_IMAGE", value_name = "REPOSITORY")]
    image: String,
    /// The branches that exist, one a line [default: `git ls-remote --heads origin` in CONTEXT].
    #[arg(long, value_name = "FILE")]
    branches: Option<PathBuf>,
    /// The default branch, whose tags always stay [default: CI_DEFAULT_BRANCH, origin/HEAD, main or master].
    #[arg(long, env = "CACHEFROM_DEFAULT_BRANCH", value_name = "BRANCH")]
    default_branch: Option<String>,
    /// Commit tags kept for each stage, the newest first (by the commit's date in git).
    #[arg(long, default_value_t = 5, value_name = "N")]
    keep_commits: usize,
    /// Also remove commit tags whose commit is older than this: 30d, 12h, 2w.
    #[arg(long, value_name = "DURATION")]
    older_than: Option<String>,
    /// Prune the shared directory of the local or tarball backend instead of the registry: a
    /// folder or .tar file a tag, and half-written copies left by runs that stopped.
    #[arg(long, env = "CACHEFROM_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Delete what the dry run lists.
    #[arg(long)]
    apply: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// A clone of the repository (for its branches and commit dates).
    #[arg(default_value = ".", value_name = "CONTEXT")]
    context: PathBuf,
}

#[derive(Args, Debug)]
struct CopyTagArgs {
    /// The manifest to copy: REGISTRY/NAME:TAG.
    #[arg(value_name = "SOURCE")]
    source: String,
    /// The further tags: REGISTRY/NAME:TAG, in the source's repository.
    #[arg(value_name = "TARGET", required = true)]
    targets: Vec<String>,
}

#[derive(Args, Debug)]
struct DockerfileArgs {
    /// The Dockerfile [default: CONTEXT/Dockerfile].
    #[arg(short = 'f', long = "file", env = "CACHEFROM_FILE", value_name = "PATH")]
    file: Option<PathBuf>,
    /// The stage to build [default: the last stage].
    #[arg(long, env = "CACHEFROM_TARGET", value_name = "STAGE")]
    target: Option<String>,
    /// A build argument, passed to docker and used to expand ARGs in FROM lines. Repeatable.
    /// `--build-arg NAME` alone takes the value from the environment variable NAME, as docker
    /// does (keeps a secret off the command line). (Checked by cachefrom, not by the parser, so
    /// that an error never repeats a value.)
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    build_args: Vec<String>,
    /// The platform to build for (passed to docker): sets TARGETPLATFORM, TARGETOS, TARGETARCH
    /// and TARGETVARIANT as BuildKit does [default: the engine's platform; `stages` and `plan`
    /// assume this machine's].
    #[arg(long, env = "CACHEFROM_PLATFORM", value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
}

#[derive(Args, Debug)]
struct StagesArgs {
    #[command(flatten)]
    dockerfile: DockerfileArgs,
    /// Print JSON: {"stages":[{"index","name","base","depends_on"}],"build_order":[...]}.
    #[arg(long)]
    json: bool,
    /// The build context, used to find the Dockerfile when -f is not given.
    #[arg(default_value = ".", value_name = "CONTEXT")]
    context: PathBuf,
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// Where the images and caches live: REGISTRY/NAME, without a tag.
    #[arg(long, env = "CACHEFROM_IMAGE", value_name = "REPOSITORY")]
    image: String,
    #[command(flatten)]
    dockerfile: DockerfileArgs,
    /// How the cache travels: inline, registry, local, tarball, s3 or gha, with BuildKit-style
    /// options: local,dir=/cache  s3,bucket=B,region=R  registry,compression=zstd.
    #[arg(long, env = "CACHEFROM_BACKEND", default_value = cachefrom::settings::DEFAULT_BACKEND, value_name = "TYPE[,KEY=VALUE...]")]
    backend: String,
    /// The shared directory of the local and tarball backends (instead of dir= in --backend).
    #[arg(long, env = "CACHEFROM_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The branch being built [default: from the CI's variables, else git].
    #[arg(long, env = "CACHEFROM_BRANCH")]
    branch: Option<String>,
    /// The default branch [default: CI_DEFAULT_BRANCH, origin/HEAD, main or master].
    #[arg(long, env = "CACHEFROM_DEFAULT_BRANCH", value_name = "BRANCH")]
    default_branch: Option<String>,
    /// The commit being built [default: git's HEAD].
    #[arg(long, env = "CACHEFROM_COMMIT", value_name = "SHA")]
    commit: Option<String>,
    /// The cache sources to try, most specific first: branch, merge-base, default-branch, parent,
    /// unprefixed, commit.
    #[arg(long, env = "CACHEFROM_CHAIN", default_value = cachefrom::settings::DEFAULT_CHAIN)]
    chain: String,
    /// Read caches but write none. A pull request from a fork is read-only without it (the CI's
    /// variables say so), so that a fork's branch names cannot overwrite this repository's caches.
    #[arg(long, env = "CACHEFROM_READ_ONLY")]
    read_only: bool,
    /// Write caches even when the CI builds a pull request from a fork.
    #[arg(long, env = "CACHEFROM_ALLOW_FORK_WRITES")]
    allow_fork_writes: bool,
    /// A tag for the final image. Repeatable; with --push, pushed after a successful build.
    #[arg(short = 't', long = "tag", env = "CACHEFROM_TAG", value_delimiter = ',', value_name = "IMAGE")]
    tags: Vec<String>,
    /// Push the --tag images after a successful build.
    #[arg(long, env = "CACHEFROM_PUSH")]
    push: bool,
    /// Make cache failures fatal (registry down, a failed cache export or push); by default the
    /// build goes on without that cache and says so.
    #[arg(long, env = "CACHEFROM_STRICT_CACHE")]
    strict_cache: bool,
    /// A scratch directory (tarball backend, cache mounts) [default: TMPDIR/cachefrom/NAME].
    #[arg(long, env = "CACHEFROM_WORK_DIR", value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the contents of `RUN --mount=type=cache` across runners, stored beside the caches
    /// (registry, local and tarball backends): `on` or `off`.
    #[arg(long, env = "CACHEFROM_CACHE_MOUNTS", value_name = "on|off", default_value = "on")]
    cache_mounts: String,
    /// The most one cache mount may hold to be saved (before compression), e.g. 512M, 4G; a
    /// bigger one is not saved, with one line.
    #[arg(long, env = "CACHEFROM_CACHE_MOUNT_MAX_SIZE", value_name = "SIZE", default_value = "4G")]
    cache_mount_max_size: String,
    /// Print the plan as JSON (with `plan`, or `build --dry-run`).
    #[arg(long)]
    json: bool,
    /// The build context.
    #[arg(default_value = ".", value_name = "CONTEXT")]
    context: PathBuf,
    /// Options passed to `docker build` untouched (after --), e.g. -- --network=host --secret id=x,src=f
    #[arg(last = true, value_name = "DOCKER BUILD OPTIONS")]
    docker_args: Vec<String>,
}

#[derive(Args, Debug)]
struct BuildArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Write the run's report as JSON to FILE.
    #[arg(long, env = "CACHEFROM_REPORT", value_name = "FILE")]
    report: Option<PathBuf>,
    /// Print the plan and stop (same as `cachefrom plan`).
    #[arg(long, env = "CACHEFROM_DRY_RUN")]
    dry_run: bool,
    /// When the engine cannot serve the backend (no buildx, or the docker driver without the
    /// containerd image store), use inline instead of stopping; the report says so.
    #[arg(long, env = "CACHEFROM_FALLBACK_TO_INLINE")]
    fallback_to_inline: bool,
    /// Show only warnings, errors and the report.
    #[arg(short, long, env = "CACHEFROM_QUIET")]
    quiet: bool,
}

/// `NAME=VALUE` pairs. An error never repeats the text: it may hold a secret (`TOKEN:value`).
fn parse_build_args(texts: &[String]) -> Result<Vec<(String, String)>> {
    texts
        .iter()
        .map(|text| match text.split_once('=') {
            Some(("", _)) => {
                anyhow::bail!("a --build-arg has nothing before `=`; write NAME=VALUE")
            }
            Some((name, value)) => Ok((name.to_string(), value.to_string())),
            // As docker reads it: `--build-arg NAME` takes NAME's value from the environment, so
            // a secret never stands on a command line.
            None if is_variable_name(text) => match std::env::var(text) {
                Ok(value) => Ok((text.clone(), value)),
                Err(_) => anyhow::bail!(
                    "--build-arg {text}: {text} is not set in the environment; set it, or write NAME=VALUE"
                ),
            },
            None => anyhow::bail!(
                "the --build-arg starting `{}` has no `=`; write NAME=VALUE (the value is not shown)",
                cachefrom::secrets::name_part(text)
            ),
        })
        .collect()
}

fn is_variable_name(text: &str) -> bool {
    text.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

fn usage(error: anyhow::Error) -> Failure {
    Failure { code: EXIT_USAGE, error }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Stages(args) => stages(&args).map_err(usage),
        Command::Plan(args) => plan_options(&args).and_then(|options| print_plan(&options, args.json)).map_err(usage),
        Command::Build(args) => build(&args),
        Command::Explain(args) => explain(&args),
        Command::CopyTag(args) => copy_tag(&args),
        Command::Prune(args) => prune(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("cachefrom: error: {}", safe_line(&format!("{error:#}")));
            ExitCode::from(code)
        }
    }
}

fn explain(args: &PlanArgs) -> std::result::Result<(), Failure> {
    let options = plan_options(args).map_err(usage)?;
    let plan = Plan::new(&options).map_err(usage)?;
    let ctx = Context::from_environment();
    // A pattern cachefrom will not read (a `.dockerignore` line, a COPY source) is the user's to
    // change: exit 2, as for any other refused input.
    let explanations = cachefrom::exec::explain(&ctx, &plan).map_err(|error| {
        let refused = error.chain().any(|cause| cause.downcast_ref::<cachefrom::inputs::RefusedPattern>().is_some());
        Failure { code: if refused { EXIT_USAGE } else { EXIT_ENVIRONMENT }, error }
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "stages": explanations })).unwrap_or_default()
        );
    }
    for stage in explanations.iter().filter(|_| !args.json) {
        let line = match (&stage.miss, &stage.reads) {
            (None, Some(reads)) => format!("would hit: every input matches the record on {reads}"),
            (None, None) => "would hit".to_string(),
            (Some(miss), _) => format!("would miss: {}", miss.line),
        };
        println!("{}", safe_line(&format!("{}: {line}", stage.stage)));
        for mount in &stage.mounts {
            println!("{}", safe_line(&format!("{}: {mount}", stage.stage)));
        }
    }
    let unchecked = explanations
        .iter()
        .filter(|stage| stage.miss.as_ref().is_some_and(|miss| miss.kind == cachefrom::explain::MissKind::Unchecked))
        .count();
    if unchecked > 0 {
        return Err(Failure {
            code: EXIT_ENVIRONMENT,
            error: anyhow::anyhow!("could not check the caches of {unchecked} stage(s): no answer is given for them"),
        });
    }
    Ok(())
}

fn stages(args: &StagesArgs) -> Result<()> {
    let path = args.dockerfile.file.clone().unwrap_or_else(|| args.context.join("Dockerfile"));
    let build_args: BTreeMap<String, String> = parse_build_args(&args.dockerfile.build_args)?.into_iter().collect();
    let options = cachefrom::dockerfile::ParseOptions {
        build_args,
        target_platform: args
            .dockerfile
            .platform
            .as_deref()
            .map(|list| cachefrom::dockerfile::Platform::parse(list.split(',').next().unwrap_or_default()))
            .transpose()?,
        build_platform: None,
        target: args.dockerfile.target.clone(),
    };
    let dockerfile = read_dockerfile_with(&path, &options)?;
    let order = dockerfile.build_order(args.dockerfile.target.as_deref())?;
    let order: Vec<String> = order.iter().map(|stage| stage.key()).collect();
    if args.json {
        let json = serde_json::json!({ "stages": dockerfile.stages, "build_order": order });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for stage in &dockerfile.stages {
            let needed = if order.contains(&stage.key()) { "" } else { "  (not needed for the target)" };
            let depends = if stage.depends_on.is_empty() {
                String::new()
            } else {
                format!("  <- {}", stage.depends_on.join(", "))
            };
            println!(
                "{}",
                safe_line(&format!(
                    "{:>3}  {:<20} FROM {}{depends}{needed}",
                    stage.index,
                    stage.name.as_deref().unwrap_or("-"),
                    stage.base
                ))
            );
        }
        println!("{}", safe_line(&format!("build order: {}", order.join(" -> "))));
    }
    Ok(())
}

fn prune(args: &PruneArgs) -> std::result::Result<(), Failure> {
    use cachefrom::prune::{commit_times, parse_duration, remote_branches, PruneOptions};
    let repository = cachefrom::refs::Repository::parse(&args.image).map_err(usage)?;
    let older_than = args.older_than.as_deref().map(parse_duration).transpose().map_err(usage)?;
    let branches = match &args.branches {
        Some(file) => cachefrom::files::read_text(file, cachefrom::files::MAX_LIST_BYTES)
            .map_err(|error| usage(error.context("cannot read the branches file")))?
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(|line| cachefrom::git::check_branch(line, "the branches file"))
            .collect::<Result<_>>()
            .map_err(usage)?,
        None => remote_branches(&args.context, std::time::Duration::from_secs(60)).map_err(usage)?,
    };
    let env = Environment::from_process();
    let overrides = cachefrom::git::GitOverrides { default_branch: args.default_branch.clone(), ..Default::default() };
    let git = cachefrom::git::GitFacts::discover(&args.context, &overrides, &env).map_err(usage)?;
    if !branches.contains(&git.default_branch) {
        return Err(usage(anyhow::anyhow!(
            "the default branch {} is not among the {} branches that exist; pass --default-branch with one of them (a branch name, not origin/NAME)",
            cachefrom::secrets::quoted(&git.default_branch),
            branches.len()
        )));
    }
    let ctx = Context::from_environment();
    let tags = match &args.cache_dir {
        Some(dir) => cachefrom::prune::dir_tags(dir, &repository),
        None => ctx.registry.list_tags(&repository).map_err(|error| Failure { code: EXIT_ENVIRONMENT, error })?,
    };
    let commits = tags.iter().filter_map(|tag| match cachefrom::prune::CacheTag::parse(tag) {
        Some(cachefrom::prune::CacheTag::Commit { commit, .. }) => Some(commit),
        _ => None,
    });
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let options = PruneOptions {
        branches,
        default_branch: git.default_branch.clone(),
        keep_commits: args.keep_commits,
        older_than,
        commit_times: commit_times(&args.context, commits),
        now,
    };
    let environment = |error| Failure { code: EXIT_ENVIRONMENT, error };
    if let Some(dir) = &args.cache_dir {
        let plan = cachefrom::prune::plan_dir(dir, &repository, &options).map_err(environment)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan).expect("plain data"));
        } else {
            for line in plan.lines() {
                println!("{}", safe_line(&line));
            }
        }
        let bytes: u64 = plan.remove.iter().map(|(_, _, size)| size).sum();
        if args.apply {
            let freed = plan.apply().map_err(environment)?;
            eprintln!(
                "{}",
                safe_line(&format!(
                    "cachefrom: removed {} entries ({:.1} MB) from {}",
                    plan.remove.len(),
                    freed as f64 / 1e6,
                    plan.dir.display()
                ))
            );
        } else {
            eprintln!(
                "{}",
                safe_line(&format!(
                    "cachefrom: {} entries ({:.1} MB) would be removed from {} (default branch `{}` kept); pass --apply to remove them",
                    plan.remove.len(),
                    bytes as f64 / 1e6,
                    plan.dir.display(),
                    git.default_branch
                ))
            );
        }
        return Ok(());
    }
    let plan = cachefrom::prune::plan(&ctx.registry, &repository, &tags, &options);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan).expect("plain data"));
    } else {
        for line in plan.lines() {
            println!("{}", safe_line(&line));
        }
    }
    if !plan.unchecked.is_empty() {
        eprintln!(
            "cachefrom: warning: {} tag(s) kept because a check could not be made (the first: {}); run again when the registry answers",
            plan.unchecked.len(),
            safe_line(&plan.unchecked[0].1)
        );
    }
    if args.apply {
        let removed = plan.apply(&ctx.registry, &repository).map_err(environment)?;
        eprintln!("cachefrom: removed {removed} tag(s) from {repository}");
        if !plan.unchecked.is_empty() {
            return Err(environment(anyhow::anyhow!(
                "{} tag(s) were not removed: a check could not be made",
                plan.unchecked.len()
            )));
        }
    } else {
        eprintln!(
            "cachefrom: {} tag(s) would be removed from {repository} (default branch `{}` kept); pass --apply to remove them",
            plan.going(),
            git.default_branch
        );
    }
    Ok(())
}

fn copy_tag(args: &CopyTagArgs) -> std::result::Result<(), Failure> {
    let (repository, tag) = split_image(&args.source).map_err(usage)?;
    if !cachefrom::refs::is_valid_tag(&tag) && !is_digest_reference(&tag) {
        return Err(usage(anyhow::anyhow!(
            "the source's tag {} is not a tag (letters, digits, `_`, `.`, `-`; at most 128, not starting with `.` or `-`)",
            cachefrom::secrets::quoted(&tag)
        )));
    }
    // Every target is a tag of the source's repository, by the tag grammar: nothing else is sent.
    for target in &args.targets {
        let target_tag =
            target.strip_prefix(&format!("{}:", repository.written)).filter(|tag| cachefrom::refs::is_valid_tag(tag));
        if target_tag.is_none() {
            return Err(usage(anyhow::anyhow!(
                "the target {} is not {}:TAG with a valid tag (letters, digits, `_`, `.`, `-`; at most 128, not starting with `.` or `-`): copy-tag writes tags in the source's repository only",
                cachefrom::secrets::quoted(target),
                repository.written
            )));
        }
    }
    let write = cachefrom::plan::CacheWrite::CopyTag { from: args.source.clone(), to: args.targets.clone() };
    let ctx = Context::from_environment();
    let no_annotations = BTreeMap::new();
    cachefrom::writes::perform(
        &write,
        &ctx.docker,
        &ctx.registry,
        &repository,
        &no_annotations,
        ctx.docker.timeouts.transfer,
    )
    .map_err(|error| Failure { code: EXIT_ENVIRONMENT, error })
}

fn is_digest_reference(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `REGISTRY/NAME:TAG` → its repository and tag.
fn split_image(image: &str) -> Result<(cachefrom::refs::Repository, String)> {
    let slash = image.rfind('/').map(|i| i + 1).unwrap_or(0);
    let Some(colon) = image[slash..].rfind(':').map(|i| i + slash) else {
        anyhow::bail!("`{image}` has no tag: give REGISTRY/NAME:TAG");
    };
    Ok((cachefrom::refs::Repository::parse(&image[..colon])?, image[colon + 1..].to_string()))
}

fn plan_options(args: &PlanArgs) -> Result<PlanOptions> {
    // Parsed here, not by clap: clap's errors quote the value, and a backend option may be a secret.
    let settings = Settings {
        image: args.image.clone(),
        context: args.context.clone(),
        file: args.dockerfile.file.clone(),
        target: args.dockerfile.target.clone(),
        backend: Backend::parse(&args.backend, args.cache_dir.as_deref())?,
        branch: args.branch.clone(),
        default_branch: args.default_branch.clone(),
        commit: args.commit.clone(),
        chain: Level::parse_chain(&args.chain)?,
        access: if args.read_only { Access::ReadOnly } else { Access::ReadWrite },
        allow_fork_writes: args.allow_fork_writes,
        tags: args.tags.clone(),
        push: args.push,
        strict_cache: args.strict_cache,
        build_args: parse_build_args(&args.dockerfile.build_args)?,
        docker_args: args.docker_args.clone(),
        work_dir: args.work_dir.clone(),
        platform: args.dockerfile.platform.clone(),
        cache_mounts: cachefrom::settings::parse_switch(&args.cache_mounts, "--cache-mounts")?,
        cache_mount_max_size: cachefrom::settings::parse_size(&args.cache_mount_max_size)?,
    };
    settings.plan_options(&Environment::from_process())
}

fn print_plan(options: &PlanOptions, json: bool) -> Result<()> {
    let plan = Plan::new(options)?;
    if json {
        println!("{}", plan.to_json());
    } else {
        print!("{plan}");
    }
    Ok(())
}

/// SIGINT and SIGTERM (how CI cancels a job) stop the running build, have the caches of what it
/// finished written and the report marked cancelled; a second signal exits at once.
fn stop_on_signals(ctx: &Context) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let again = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        let code = 128 + signal;
        signal_hook::flag::register_conditional_shutdown(signal, code, std::sync::Arc::clone(&again))?;
        signal_hook::flag::register(signal, std::sync::Arc::clone(&again))?;
        signal_hook::flag::register_usize(signal, ctx.docker.cancel.flag(), signal as usize)?;
    }
    Ok(())
}

fn build(args: &BuildArgs) -> std::result::Result<(), Failure> {
    let options = plan_options(&args.plan).map_err(usage)?;
    if args.dry_run {
        return print_plan(&options, args.plan.json).map_err(usage);
    }
    let mut ctx = Context::from_environment();
    stop_on_signals(&ctx).map_err(|error| Failure { code: EXIT_ENVIRONMENT, error })?;
    if args.quiet {
        ctx.style = OutputStyle::Quiet;
    }
    let mut build_options = BuildOptions::new(options);
    build_options.fallback = if args.fallback_to_inline { BackendFallback::ToInline } else { BackendFallback::Refuse };
    build_options.report_file = args.report.clone();
    match build_with_cache(&ctx, &build_options) {
        Ok(_) => Ok(()),
        Err(error) => Err(Failure { code: error.exit_code(), error: error.into() }),
    }
}
