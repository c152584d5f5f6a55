//! End-to-end: one cache per platform. A CI matrix of single-platform jobs sharing one
//! repository (each on a fresh runner) no longer overwrites the other platform's cache: the second
//! round is fully cached on every platform. One build for two platforms reads both platforms'
//! caches, counts each platform's steps, and writes a cache a single-platform job then reads.
//! The Dockerfile cross-compiles (its work runs on `$BUILDPLATFORM`), so no emulation is needed.

use std::process::Output;

use cachefrom_tests::*;

const CROSS: &str = "\
ARG BASE
FROM --platform=$BUILDPLATFORM ${BASE} AS deps
ARG TARGETARCH
COPY deps.txt /deps.txt
RUN echo \"deps for $TARGETARCH\" > /deps && cat /deps.txt >> /deps
FROM --platform=$BUILDPLATFORM deps AS build
ARG TARGETARCH
COPY src /src
RUN echo \"$TARGETARCH: $(cat /src/main.txt)\" > /app
FROM scratch AS final
COPY --from=build /app /app
";

fn build(dir: &std::path::Path, image: &str, platform: &str, tag: &str) -> (Output, serde_json::Value) {
    let report = dir.join("report.json");
    let args: Vec<String> = [
        "build",
        "--image",
        image,
        "--branch",
        "main",
        "--default-branch",
        "main",
        "--platform",
        platform,
        "--build-arg",
        &format!("BASE={RUNTIME_BASE_IMAGE}"),
        "--tag",
        tag,
        "--push",
        "--report",
        &report.display().to_string(),
        &dir.display().to_string(),
        "--",
        "--network=none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cachefrom_reporting(&args, &report)
}

fn totals(report: &serde_json::Value) -> (u64, u64) {
    stage_counts(report).iter().fold((0, 0), |(c, t), (_, cached, total)| (c + cached, t + total))
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_matrix_of_platforms_keeps_a_cache_for_each_and_one_build_for_two_reads_both() {
    let _serial = serial();
    need_stack("a_matrix_of_platforms_keeps_a_cache_for_each_and_one_build_for_two_reads_both");
    let project = synthetic_project(CROSS).unwrap();
    let dir = project.path();
    let image = unique_repository("platforms");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap().to_string();

    // Round one: each platform seeds its own cache.
    for platform in ["linux/amd64", "linux/arm64"] {
        fresh_runner().unwrap();
        let (output, report) = build(dir, &image, platform, &format!("{image}:{}", platform.replace('/', "-")));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let (cached, total) = totals(&report);
        assert_eq!(cached, 0, "{report:#}");
        assert!(total >= 4, "{report:#}");
    }
    assert!(registry_digest(REGISTRY, &path, "cache-final--linux-amd64.main").is_some());
    assert!(registry_digest(REGISTRY, &path, "cache-final--linux-arm64.main").is_some());

    // Round two, fresh runners: every step of every platform is a hit.
    for platform in ["linux/amd64", "linux/arm64"] {
        std::fs::write(dir.join("unrelated.txt"), platform).unwrap();
        fresh_runner().unwrap();
        let (output, report) = build(dir, &image, platform, &format!("{image}:{}", platform.replace('/', "-")));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let (cached, total) = totals(&report);
        assert_eq!(cached, total, "{platform}: {report:#}");
        assert!(total >= 4, "{report:#}");
    }

    // One build for both platforms: it reads both caches and counts each platform's steps.
    std::fs::write(dir.join("unrelated.txt"), "both").unwrap();
    fresh_runner().unwrap();
    let (output, report) = build(dir, &image, "linux/amd64,linux/arm64", &format!("{image}:both"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let (cached, total) = totals(&report);
    assert!(total >= 8, "each platform's steps are counted: {report:#}");
    // Measured here: amd64's steps hit; arm64's (run on amd64 for arm64) do not, BuildKit keys
    // them otherwise in a build for several platforms than in one for arm64 alone. This build's
    // own cache then serves both (below).
    assert!(cached >= total / 2, "the build platform's cache was read: {report:#}");
    let platforms: Vec<&str> =
        report["stages"].as_array().unwrap().iter().find(|stage| stage["name"] == "build").unwrap()["platforms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["platform"].as_str().unwrap())
            .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"], "{report:#}");
    assert!(stderr.contains("linux/amd64 "), "the table shows each platform:\n{stderr}");

    // A source change built for both platforms at once; then a single-platform job reads the
    // cache that build wrote for its platform.
    std::fs::write(dir.join("src/main.txt"), "fn main() { both }\n").unwrap();
    fresh_runner().unwrap();
    let (output, _) = build(dir, &image, "linux/amd64,linux/arm64", &format!("{image}:both"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    fresh_runner().unwrap();
    let (output, report) = build(dir, &image, "linux/arm64", &format!("{image}:linux-arm64"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (cached, total) = totals(&report);
    assert_eq!(cached, total, "the single-platform job read the two-platform build's cache: {report:#}");
}
