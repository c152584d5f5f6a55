//! The report's cached counts come from BuildKit's own per-step record (rawjson), which marks hits
//! that plain progress does not print as `CACHED` (a hit whose layers are downloaded from a
//! remote cache shows only download lines and `DONE`).

use cachefrom::ci::Environment;
use cachefrom::exec::{build_with_cache, pull_cached, BuildOptions};
use cachefrom::plan::Plan;
use cachefrom_tests::*;

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn cached_counts_match_buildkits_record_not_the_cached_lines() {
    let _serial = serial();
    need_stack("cached_counts_match_buildkits_record_not_the_cached_lines");
    let repo = example_repository_copy().unwrap();
    let settings = example_settings(&unique_repository("counts"), repo.path());
    let options = settings.plan_options(&Environment::default()).unwrap();
    let ctx = plain_context();
    build_with_cache(&ctx, &BuildOptions::new(options.clone())).unwrap();

    fresh_runner().unwrap();
    let report = build_with_cache(&ctx, &BuildOptions::new(options.clone())).unwrap();
    let (cached, total) = report.totals();
    assert_eq!(cached, total, "{report:#?}");

    // The same builds, same sources, with plain progress: count the CACHED lines.
    fresh_runner().unwrap();
    let plan = Plan::new(&options).unwrap();
    let resolution = pull_cached(&ctx, &plan).unwrap();
    let mut plain_cached = 0;
    for stage in &plan.stages {
        let args = plan.build_command(stage, &resolution.sources(&plan, stage), "plain");
        let output = duct::cmd("docker", &args).stderr_to_stdout().stdout_capture().unchecked().run().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{text}");
        let own = stage.target.clone().unwrap();
        // `#N [stage i/n] …` then `#N CACHED`: count the stage's own steps printed as CACHED.
        let mut names = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some((number, rest)) = line.split_once(' ') {
                if rest.starts_with(&format!("[{own} ")) && !rest.contains("] FROM ") {
                    names.insert(number.to_string(), rest.to_string());
                } else if rest == "CACHED" && names.contains_key(number) {
                    plain_cached += 1;
                }
            }
        }
    }
    eprintln!("BuildKit's record: {cached} of {total} steps cached; plain output printed CACHED for {plain_cached}");
    assert!(plain_cached <= cached);
}
