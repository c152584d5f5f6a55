//! The legacy mode: the classic builder (`DOCKER_BUILDKIT=0`) reads cache only from local images,
//! so cachefrom pulls the chosen images, in chain order, before building.

use std::time::Instant;

use cachefrom::ci::Environment;
use cachefrom::exec::execute_plan;
use cachefrom::plan::{Builder, Plan};
use cachefrom::settings::Settings;
use cachefrom_tests::*;

const DOCKERFILE: &str = "\
ARG BASE
FROM ${BASE} AS prepare
RUN echo one > /one
FROM prepare AS final
RUN echo two > /two
";

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn the_classic_builder_pulls_the_chosen_caches_and_hits_them() {
    let _serial = serial();
    need_stack("the_classic_builder_pulls_the_chosen_caches_and_hits_them");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE).unwrap();
    git(dir.path(), &["init", "-q", "-b", "main"]).unwrap();
    git(dir.path(), &["add", "."]).unwrap();
    git(dir.path(), &["commit", "-q", "-m", "one"]).unwrap();
    let image = unique_repository("classic");
    let mut settings = Settings::new(&image, dir.path());
    settings.backend = cachefrom::Backend::Inline;
    settings.branch = Some("feature/classic".to_string());
    settings.default_branch = Some("main".to_string());
    settings.build_args = vec![("BASE".to_string(), RUNTIME_BASE_IMAGE.to_string())];
    let mut options = settings.plan_options(&Environment::default()).unwrap();
    options.builder = Builder::Classic;
    let ctx = plain_context();

    let seed = execute_plan(&ctx, &Plan::new(&options).unwrap(), None, None, Instant::now()).unwrap();
    assert!(seed.stages.iter().all(|stage| !stage.pushed.is_empty()), "{seed:#?}");

    fresh_runner().unwrap();
    let again = execute_plan(&ctx, &Plan::new(&options).unwrap(), None, None, Instant::now()).unwrap();
    for stage in &again.stages {
        assert_eq!((stage.steps_cached, stage.steps_total), (1, 1), "{stage:#?}");
        assert!(stage.cache_source.as_deref().unwrap().contains(&format!("cache-{}.feature-classic--", stage.name)));
    }
}
