//! End-to-end: the library prints nothing itself; a run's progress, notes and report go to the
//! output the caller put in its context.

use std::sync::Arc;

use cachefrom::ci::Environment;
use cachefrom::exec::{build_with_cache, BuildOptions, Context, OutputStyle};
use cachefrom::output::Recorded;
use cachefrom::settings::Settings;
use cachefrom_tests::*;

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_run_writes_through_the_callers_output() {
    let _serial = serial();
    need_stack("a_run_writes_through_the_callers_output");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let mut settings = Settings::new(unique_repository("output"), project.path());
    settings.branch = Some("main".into());
    settings.default_branch = Some("main".into());
    settings.build_args = vec![("BASE".into(), RUNTIME_BASE_IMAGE.into())];
    settings.docker_args = vec!["--network=none".into()];
    let options = BuildOptions::new(settings.plan_options(&Environment::default()).unwrap());
    let recorded = Arc::new(Recorded::default());
    let mut ctx = Context::from_environment();
    ctx.style = OutputStyle::Plain;
    ctx.output = recorded.clone();
    let report = build_with_cache(&ctx, &options).unwrap();
    let lines = recorded.lines();
    assert!(lines.iter().any(|line| line == "==> runtime with deps, builder"), "{lines:#?}");
    assert!(lines.iter().any(|line| line.starts_with("#") && line.contains("[builder 2/2]")), "{lines:#?}");
    let (cached, total) = report.totals();
    let summary = format!("{cached} steps cached of {total}");
    assert!(lines.iter().any(|line| line.starts_with(&summary)), "{lines:#?}");
}
