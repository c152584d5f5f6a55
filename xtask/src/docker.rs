//! `cargo xtask docker`: builds example-project through the cachefrom library. Flags parsed,
//! the library called, nothing else: this is the example other repositories copy.

use std::path::PathBuf;

use anyhow::Result;
use cachefrom::ci::Environment;
use cachefrom::engine::BackendFallback;
use cachefrom::exec::{build_with_cache, BuildOptions, Context};
use cachefrom::plan::Plan;
use cachefrom::settings::Settings;

#[derive(clap::Args, Debug)]
pub struct DockerArgs {
    /// Where images and caches live.
    #[arg(long, default_value = "127.0.0.1:5000/example-app")]
    image: String,
    /// inline, registry, local, tarball, s3 or gha, with options (local,dir=/cache).
    #[arg(long, default_value_t)]
    backend: cachefrom::Backend,
    /// The stage to build [default: the last].
    #[arg(long)]
    target: Option<String>,
    /// The branch [default: CI variables, then git].
    #[arg(long)]
    branch: Option<String>,
    /// The default branch.
    #[arg(long)]
    default_branch: Option<String>,
    /// A tag for the final image (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Push the tags after a successful build.
    #[arg(long)]
    push: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the plan and stop.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Use inline when the engine cannot serve the backend.
    #[arg(long)]
    fallback_to_inline: bool,
}

/// example-project's settings: the stack's base images, host networking, the host's CA bundle.
pub fn example_settings(args: &DockerArgs) -> Settings {
    Settings {
        target: args.target.clone(),
        branch: args.branch.clone(),
        default_branch: args.default_branch.clone(),
        tags: args.tags.clone(),
        build_args: cachefrom_stack::example_build_args(),
        docker_args: cachefrom_stack::example_docker_args(),
        ..Settings::new(&args.image, cachefrom_stack::example_project()).backend(args.backend.clone()).push(args.push)
    }
}

pub fn run(args: &DockerArgs) -> Result<()> {
    let plan_options = example_settings(args).plan_options(&Environment::from_process())?;
    if args.dry_run {
        let plan = Plan::new(&plan_options)?;
        if args.json {
            println!("{}", plan.to_json())
        } else {
            print!("{plan}")
        }
        return Ok(());
    }
    let mut options = BuildOptions::new(plan_options);
    options.report_file = args.report.clone();
    options.fallback = if args.fallback_to_inline { BackendFallback::ToInline } else { BackendFallback::Refuse };
    build_with_cache(&Context::from_environment(), &options)?;
    Ok(())
}
