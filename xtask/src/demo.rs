//! `cargo xtask demo`, the main job: bring the stack up, build example-project cold and push its
//! caches, become a fresh runner (no images, no build cache), change a source file, rebuild
//! through the cache, and print the report with the speed-up. The working tree is left as it was.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use cachefrom::ci::Environment;
use cachefrom::exec::{build_with_cache, BuildOptions, Context};
use cachefrom::report::RunReport;
use xshell::Shell;

use crate::stack::Stack;

/// Restores a file's content when dropped, whatever happens in between.
pub struct RestoreFile {
    path: std::path::PathBuf,
    original: Vec<u8>,
}

impl RestoreFile {
    pub fn new(path: std::path::PathBuf) -> Result<RestoreFile> {
        let original = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(RestoreFile { path, original })
    }
}

impl Drop for RestoreFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(&self.path, &self.original) {
            eprintln!("demo: could not restore {}: {error}", self.path.display());
        }
    }
}

fn build(image: &str) -> Result<RunReport> {
    let settings = cachefrom_stack::example_settings(image, &cachefrom_stack::example_project());
    let options = BuildOptions::new(settings.plan_options(&Environment::from_process())?);
    Ok(build_with_cache(&Context::from_environment(), &options)?)
}

pub fn run(sh: &Shell) -> Result<()> {
    Stack::new().up(sh)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let image = format!("{}/demo-{stamp}/example-app", cachefrom_stack::REGISTRY);

    eprintln!("\n== 1. cold build: no cache anywhere ({image})");
    cachefrom_stack::fresh_runner()?;
    let cold = build(&image)?;

    eprintln!("\n== 2. a fresh runner: local images and build cache removed");
    cachefrom_stack::fresh_runner()?;

    let main_rs = cachefrom_stack::example_project().join("src/lib.rs");
    let _restore = RestoreFile::new(main_rs.clone())?;
    eprintln!("== 3. a source change: {}", main_rs.display());
    let mut source = std::fs::read_to_string(&main_rs)?;
    source
        .push_str(&format!("\n/// Changed by `cargo xtask demo` at {stamp}.\npub const DEMO_STAMP: u64 = {stamp};\n"));
    std::fs::write(&main_rs, source)?;

    eprintln!("\n== 4. the rebuild, through the cache");
    let warm = build(&image)?;
    drop(_restore);

    let (cached, total) = warm.totals();
    println!(
        "\ncold build: {:.1}s; rebuild on a fresh runner after a source change: {:.1}s ({:.1}x faster)",
        cold.seconds,
        warm.seconds,
        cold.seconds / warm.seconds.max(0.001)
    );
    println!("rebuild: {cached} of {total} steps cached");
    for stage in &warm.stages {
        let source = match (&stage.cache_source, &stage.miss_reason, stage.cache_from.first()) {
            (Some(source), _, _) => format!("from {source}"),
            (None, Some(why), _) => format!("rebuilt: {why}"),
            (None, None, Some(offered)) => format!("rebuilt: its inputs changed since {offered}"),
            (None, None, None) => "no cache yet".to_string(),
        };
        println!(
            "  {:<8} {}/{} cached  {:>5.1}s  {source}",
            stage.name, stage.steps_cached, stage.steps_total, stage.seconds
        );
    }
    Ok(())
}
