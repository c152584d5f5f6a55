//! A cache whose manifest is there but one of whose blobs is gone (a registry's garbage
//! collection, a half-finished push) must not break the build: the stage is built again without
//! it, with one warning, and the good cache written back replaces it.

use cachefrom_tests::*;

const STORAGE: &str = "/var/lib/cachefrom-stack/registry/docker/registry/v2/blobs/sha256";

fn blob_answers(repository: &str, digest: &str) -> bool {
    let status = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I"])
        .arg(format!("http://{REGISTRY}/v2/{repository}/blobs/{digest}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&status.stdout) == "200"
}

#[test]
#[cfg_attr(not(stack_up), ignore = "needs the stack: cargo xtask stack up")]
fn a_cache_with_a_missing_blob_is_rebuilt_and_replaced() {
    let _serial = serial();
    need_stack("a_cache_with_a_missing_blob_is_rebuilt_and_replaced");
    let image = unique_repository("broken");
    // The last layer holds the repository's name: no other cache shares its blob (a base image's
    // layer, which every repository shares, is never the one deleted: deletable_layer).
    let dockerfile = format!("{SYNTHETIC_DOCKERFILE}RUN echo {image} > /marker\n");
    let project = synthetic_project(&dockerfile).unwrap();
    let report = project.path().join("report.json");
    let first = cachefrom_build(project.path(), &image, &report, &[]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));

    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let manifest = registry_manifest(REGISTRY, path, "cache-runtime.main").unwrap();
    let digest = deletable_layer(&manifest);
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::remove_file(format!("{STORAGE}/{}/{hex}/data", &hex[..2])).unwrap();
    assert!(!blob_answers(path, &digest));

    // The same inputs on a fresh runner: the record says "unchanged", but the cache cannot be
    // copied or read; cachefrom builds, drops the broken cache, and writes a good one.
    fresh_runner().unwrap();
    let second = cachefrom_build(project.path(), &image, &report, &[]);
    let text = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{text}");
    assert!(text.contains("is broken: BuildKit could not fetch"), "{text}");
    let manifest = registry_manifest(REGISTRY, path, "cache-runtime.main").unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        assert!(blob_answers(path, digest), "{digest} is still missing from the replaced cache");
    }

    // And it is a good cache: the next fresh runner hits every step.
    fresh_runner().unwrap();
    std::fs::write(project.path().join("Dockerfile"), format!("{dockerfile}# a comment, so that it builds\n")).unwrap();
    let third = cachefrom_build(project.path(), &image, &report, &[]);
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for stage in report["stages"].as_array().unwrap() {
        assert_eq!(stage["steps_cached"], stage["steps_total"], "{report:#}");
    }
}
