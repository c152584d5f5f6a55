//! `crates/cachefrom/examples/release.rs`, the release tool of the library's docs, run for real:
//! two images from one Dockerfile through `pull_cached`, a `PushGuard`'s `build` and `finish`,
//! its output in its own log, its summary from the reports; then again on a fresh runner, where
//! every step comes from the caches it wrote.

#[path = "../../crates/cachefrom/examples/release.rs"]
mod release;

use cachefrom_tests::*;

const TWO_IMAGES: &str = "\
ARG BASE
FROM ${BASE} AS deps
COPY deps.txt /deps.txt
RUN cat /deps.txt > /deps
FROM deps AS server
COPY src /src
RUN cp /src/main.txt /server
FROM deps AS worker
COPY src /src
RUN cp /src/main.txt /worker
";

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn the_release_example_builds_two_images_and_the_next_run_reads_their_caches() {
    let _serial = serial();
    need_stack("the_release_example_builds_two_images_and_the_next_run_reads_their_caches");
    let project = synthetic_project(TWO_IMAGES).unwrap();
    let image = unique_repository("release");
    let log = project.path().join("release.log");
    let args: Vec<String> = [
        "--image",
        &image,
        "--version",
        "1.0.0",
        "--target",
        "server",
        "--target",
        "worker",
        "--branch",
        "main",
        "--log",
        log.to_str().unwrap(),
        "--build-arg",
        &format!("BASE={RUNTIME_BASE_IMAGE}"),
        project.path().to_str().unwrap(),
        "--",
        "--network=none",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();

    fresh_runner().unwrap();
    let first = release::run(&args).unwrap();
    assert_eq!(first.len(), 2, "{first:#?}");
    assert!(first[0].starts_with(&format!("server: {image}:server-1.0.0 pushed; 0/")), "{first:#?}");
    assert!(first[1].starts_with(&format!("worker: {image}:worker-1.0.0 pushed;")), "{first:#?}");
    let tags = registry_tags(REGISTRY, image.strip_prefix(&format!("{REGISTRY}/")).unwrap()).unwrap();
    for tag in ["server-1.0.0", "worker-1.0.0", "cache-server.main", "cache-worker.main"] {
        assert!(tags.contains(&tag.to_string()), "{tag} missing: {tags:?}");
    }
    // cachefrom's own lines went to the tool's log, not to the test's output.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("==> server with deps") && logged.contains("==> worker with deps"), "{logged}");

    fresh_runner().unwrap();
    let again = release::run(&args).unwrap();
    for line in &again {
        let counts = line.split("; ").nth(1).unwrap();
        let (cached, total) = counts.trim_end_matches(" steps from cache").split_once('/').unwrap();
        assert_eq!(cached, total, "every step from the caches the first run wrote: {again:#?}");
        assert_ne!(total, "0", "{again:#?}");
    }
}
