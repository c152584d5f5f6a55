use super::*;
use crate::dockerfile::parse_dockerfile_text;

const SHA_HEAD: &str = "4444444444444444444444444444444444444444";
const SHA_PARENT: &str = "3333333333333333333333333333333333333333";
const SHA_BASE: &str = "2222222222222222222222222222222222222222";

const RUST_SERVICE: &str = "\
ARG RUST_IMAGE=rust:1.85
FROM ${RUST_IMAGE} AS deps
RUN cargo fetch
FROM deps AS builder
RUN cargo build
FROM debian:bookworm AS docs
RUN make docs
FROM debian:bookworm-slim AS runtime
COPY --from=builder /app /app
";

fn feature_branch() -> GitFacts {
    GitFacts {
        branch: Some("feature/login".into()),
        branch_source: Some("git".into()),
        commit: Some(SHA_HEAD.into()),
        parent: Some(SHA_PARENT.into()),
        default_branch: "main".into(),
        merge_base: Some(SHA_BASE.into()),
        notes: vec![],
    }
}

fn main_branch() -> GitFacts {
    GitFacts { branch: Some("main".into()), merge_base: None, ..feature_branch() }
}

fn options(git: GitFacts) -> PlanOptions {
    let mut options = PlanOptions::new("app", Repository::parse("127.0.0.1:5000/app").unwrap(), git);
    options.work_dir = "/work".into();
    options
}

fn plan(text: &str, options: &PlanOptions) -> Plan {
    let dockerfile = parse_dockerfile_text(text, &options.build_args).unwrap();
    Plan::from_dockerfile(options, Path::new("app/Dockerfile"), &dockerfile).unwrap()
}

fn tags(refs: &[CacheRef]) -> Vec<String> {
    refs.iter().map(|r| format!("{}={}", r.level, r.tag)).collect()
}

#[test]
fn builds_needed_stages_in_order_and_leaves_out_the_rest() {
    let plan = plan(RUST_SERVICE, &options(feature_branch()));
    let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["deps", "builder", "runtime"]);
    assert_eq!(plan.target, "runtime");
    let runtime = plan.stage("runtime").unwrap();
    assert_eq!(runtime.depends_on, ["builder"]);
    let ancestors: Vec<&str> = plan.ancestors(runtime).iter().map(|stage| stage.name.as_str()).collect();
    assert_eq!(ancestors, ["deps", "builder"]);
    assert!(plan.stage("runtime").unwrap().is_target);
}

#[test]
fn the_chain_of_a_feature_branch() {
    let plan = plan(RUST_SERVICE, &options(feature_branch()));
    let feature = crate::refs::sanitize_tag("feature/login");
    assert_eq!(
        tags(&plan.stage("deps").unwrap().cache_from),
        [
            format!("branch=cache-deps.{feature}"),
            format!("merge-base=cache-deps.{SHA_BASE}"),
            "default-branch=cache-deps.main".to_string(),
            format!("parent=cache-deps.{SHA_PARENT}"),
            "unprefixed=cache-deps".to_string(),
        ]
    );
    // A branch writes its own tags only: never main's, never the unprefixed one.
    assert_eq!(
        tags(&plan.stage("deps").unwrap().cache_to),
        [format!("branch=cache-deps.{feature}"), format!("commit=cache-deps.{SHA_HEAD}")]
    );
    assert!(plan.notes.iter().any(|n| n.contains("the default branch `main` writes its own")), "{:?}", plan.notes);
}

#[test]
fn the_default_branch_writes_its_tags_and_the_unprefixed_one() {
    let plan = plan(RUST_SERVICE, &options(main_branch()));
    assert_eq!(plan.chain, [Level::Branch, Level::Parent, Level::Unprefixed]);
    assert_eq!(
        tags(&plan.stage("deps").unwrap().cache_to),
        [
            "branch=cache-deps.main".to_string(),
            format!("commit=cache-deps.{SHA_HEAD}"),
            "unprefixed=cache-deps".to_string()
        ]
    );
    assert!(
        plan.notes.iter().any(|n| n == "cache level merge-base is not used: on the default branch"),
        "{:?}",
        plan.notes
    );
}

#[test]
fn a_missing_merge_base_is_dropped_with_a_note() {
    let git = GitFacts { merge_base: None, notes: vec!["no merge-base: shallow".into()], ..feature_branch() };
    let plan = plan(RUST_SERVICE, &options(git));
    assert_eq!(plan.chain, [Level::Branch, Level::DefaultBranch, Level::Parent, Level::Unprefixed]);
    assert!(plan.notes.contains(&"cache level merge-base is not used: merge-base unknown".to_string()));
    assert!(plan.notes.contains(&"no merge-base: shallow".to_string()));
    assert!(plan.to_string().contains("# note: cache level merge-base is not used: merge-base unknown"));
}

#[test]
fn the_chain_order_is_configurable() {
    let mut options = options(feature_branch());
    options.chain = Level::parse_chain("default-branch,branch").unwrap();
    let plan = plan(RUST_SERVICE, &options);
    let feature = crate::refs::sanitize_tag("feature/login");
    assert_eq!(
        tags(&plan.stage("deps").unwrap().cache_from),
        ["default-branch=cache-deps.main".to_string(), format!("branch=cache-deps.{feature}")]
    );
    assert!(plan.to_string().contains("# cache sources, most specific first: default-branch > branch"));
    assert!(Level::parse_chain("branch,nope").unwrap_err().to_string().contains("unknown cache level `nope`"));
    assert!(Level::parse_chain("branch,branch").is_err());
}

#[test]
fn sources_include_the_caches_of_the_stages_read_from() {
    let mut options = options(main_branch());
    options.backend = Backend::parse("registry", None).unwrap();
    let plan = plan(RUST_SERVICE, &options);
    let runtime = plan.stage("runtime").unwrap();
    let sources: Vec<String> =
        plan.all_candidate_sources(runtime).iter().map(|(s, r)| format!("{s}:{}", r.tag)).collect();
    assert_eq!(
        sources[..3],
        ["runtime:cache-runtime.main".to_string(), "deps:cache-deps.main".into(), "builder:cache-builder.main".into()]
    );
}

#[test]
fn the_script_for_the_registry_backend() {
    let mut options = options(main_branch());
    options.backend = Backend::parse("registry", None).unwrap();
    options.chain = vec![Level::Branch, Level::Unprefixed];
    options.docker_args = vec!["--network=host".into()];
    let plan = plan("FROM alpine AS deps\nFROM deps AS app\n", &options);
    assert_eq!(plan.execution, Execution::OneBuild);
    let script = plan.to_string();
    let expected = format!(
        r#"#!/usr/bin/env bash
set -euo pipefail
# cachefrom plan: app/Dockerfile (target app), registry backend, buildx builder, one build
# branch main (from git); default branch main
# commit {SHA_HEAD}; parent {SHA_PARENT}; merge-base none
# cache sources, most specific first: branch > unprefixed
# writes: branch, commit, unprefixed
# asks first, changing nothing: docker info, docker buildx inspect (when a builder is named or selected) (what the engine can build)

# Stages, in build order: deps -> app
# deps cache candidates:
#   branch          127.0.0.1:5000/app:cache-deps.main
#   unprefixed      127.0.0.1:5000/app:cache-deps
# app cache candidates:
#   branch          127.0.0.1:5000/app:cache-app.main
#   unprefixed      127.0.0.1:5000/app:cache-app
# cachefrom checks which candidates exist (no layer download) and passes only those,
# from one level of the chain for every stage where it can, each cache once.

log="$(mktemp)"
# stage_finished STAGE: the build's record shows every step of STAGE done or cached.
stage_finished() {{
  awk -v stage="$1" '
    {awk}' "$log"
}}
# When the build fails, write the cache of each stage it finished: exported from
# BuildKit's local cache (nothing is rebuilt), then written like the target's.
# A stage whose reader finished has finished too (later stages come first).
recover_caches() {{
  covered=' '
  finished=' '
  if [[ "$covered" != *" "deps" "* ]] && {{ [[ "$finished" == *" "deps" "* ]] || stage_finished deps; }}; then
    docker buildx build \
      --progress=plain \
      --target deps \
      -f app/Dockerfile \
      --provenance=false \
      --cache-from type=registry,ref=127.0.0.1:5000/app:cache-deps.main \
      --cache-from type=registry,ref=127.0.0.1:5000/app:cache-deps \
      --cache-to type=registry,ref=127.0.0.1:5000/app:cache-deps.main,mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true \
      --output type=cacheonly \
      --network=host \
      app
    cachefrom copy-tag 127.0.0.1:5000/app:cache-deps.main 127.0.0.1:5000/app:cache-deps.{SHA_HEAD} 127.0.0.1:5000/app:cache-deps
    covered+=deps' '
  fi
}}
trap 'status=$?; if [ "$status" -ne 0 ]; then recover_caches || true; fi; rm -f "$log"' EXIT

# When the hash of the inputs equals the record on 127.0.0.1:5000/app:cache-app.main (cachefrom
# compares them), nothing below runs; instead the recorded image and cache are reused:
#   cachefrom copy-tag 127.0.0.1:5000/app:cache-app.main 127.0.0.1:5000/app:cache-app.{SHA_HEAD} 127.0.0.1:5000/app:cache-app

# One build of app and every stage it needs; BuildKit runs independent stages at once.
# if a cache source's content is missing: the same build without that --cache-from, once
# if another build of the same image won the image store: the same build again (3 builds at most)
# if the registry refused the export for a moment: the same build again, only the export runs (3 builds at most)
docker buildx build \
  --progress=plain \
  --target app \
  -f app/Dockerfile \
  --provenance=false \
  --cache-from type=registry,ref=127.0.0.1:5000/app:cache-app.main \
  --cache-from type=registry,ref=127.0.0.1:5000/app:cache-deps.main \
  --cache-from type=registry,ref=127.0.0.1:5000/app:cache-app \
  --cache-from type=registry,ref=127.0.0.1:5000/app:cache-deps \
  --cache-to type=registry,ref=127.0.0.1:5000/app:cache-app.main,mode=max,image-manifest=true,oci-mediatypes=true,ignore-error=true \
  --network=host \
  app 2>&1 | tee "$log"
# When every step hit the one cache it read, that cache (with this run's record) is
# what 127.0.0.1:5000/app:cache-app.main gets: cachefrom copy-tag "$cache_read" 127.0.0.1:5000/app:cache-app.main
cachefrom copy-tag 127.0.0.1:5000/app:cache-app.main 127.0.0.1:5000/app:cache-app.{SHA_HEAD} 127.0.0.1:5000/app:cache-app
# The other stages read their layers from this cache. Their own tags, which only a failed
# run writes, get this cache too where cachefrom found them (so they are not read as older):
#   cachefrom copy-tag 127.0.0.1:5000/app:cache-app.main 127.0.0.1:5000/app:cache-deps.main 127.0.0.1:5000/app:cache-deps.{SHA_HEAD} 127.0.0.1:5000/app:cache-deps
"#,
        awk = crate::script::STAGE_FINISHED_AWK_FOR_TESTS
    );
    assert_eq!(script, expected);
    // One export, by BuildKit; every other tag is a copy of it.
    assert_eq!(script.matches("--cache-to").count(), 2, "one for the build, one for the recovery of deps");
}

#[test]
fn the_inline_backend_builds_stage_by_stage_and_pushes_each_right_after() {
    let mut options = options(main_branch());
    options.backend = Backend::Inline;
    options.chain = vec![Level::Branch];
    options.tags = vec!["127.0.0.1:5000/app:v1".into()];
    options.push_tags = true;
    let plan = plan("FROM alpine AS deps\nFROM deps AS app\n", &options);
    assert_eq!(plan.execution, Execution::StageByStage);
    assert!(plan.recovery.is_empty());
    let script = plan.to_string();
    assert!(script.contains("  app\ndocker push 127.0.0.1:5000/app:cache-deps.main\n"), "{script}");
    assert!(script.contains("  --cache-to type=inline \\\n"), "{script}");
    assert!(script.contains("  -t 127.0.0.1:5000/app:cache-app.main \\\n"), "{script}");
    assert!(script.contains("  -t 127.0.0.1:5000/app:v1 \\\n  --push \\\n"), "{script}");
    // The target's build pushes its tags (cache tags included) itself.
    assert!(!script.contains("docker push 127.0.0.1:5000/app:cache-app.main"), "{script}");
    assert!(!script.contains("trap"), "{script}");
}

#[test]
fn the_tarball_backend_unpacks_before_and_packs_after() {
    let mut options = options(main_branch());
    options.chain = vec![Level::Branch];
    options.backend = Backend::parse("tarball,dir=/shared", None).unwrap();
    let planned = plan("FROM alpine AS deps\n", &options);
    let file = std::path::PathBuf::from("/shared/127.0.0.1-5000-app/cache-deps.main.tar");
    let unpacked = planned.unpacked_dir(&CacheLocation::TarFile(file));
    let unpacked = unpacked.display().to_string();
    assert!(unpacked.starts_with("/work/from/") && unpacked.ends_with("-cache-deps.main.tar"), "{unpacked}");
    let script = planned.to_string();
    assert!(script.contains(&format!("{{ test -f /shared/127.0.0.1-5000-app/cache-deps.main.tar && mkdir -p {unpacked} && tar -xf /shared/127.0.0.1-5000-app/cache-deps.main.tar -C {unpacked}; }} || true")), "{script}");
    assert!(
        script.contains("tar -cf /shared/127.0.0.1-5000-app/cache-deps.main.tar.partial.$$ -C /work/to/deps . && mv /shared/127.0.0.1-5000-app/cache-deps.main.tar.partial.$$ /shared"),
        "{script}"
    );
    assert!(script.contains(&format!("--cache-from type=local,src={unpacked}")), "{script}");
    assert!(script.contains("--cache-to type=local,dest=/work/to/deps,mode=max,ignore-error=true"), "{script}");
}

#[test]
fn stages_that_read_one_tarball_read_it_from_one_directory() {
    let mut options = options(main_branch());
    options.backend = Backend::parse("tarball,dir=/shared", None).unwrap();
    let planned = plan("FROM alpine AS deps\nFROM deps AS build\nFROM build AS app\n", &options);
    // One build of the target: every stage's candidates are the target's files.
    let build = planned.build_argv("app").expect("the target's build");
    let sources: Vec<&String> =
        build.windows(2).filter(|pair| pair[0] == "--cache-from").map(|pair| &pair[1]).collect();
    let distinct: std::collections::BTreeSet<&&String> = sources.iter().collect();
    assert_eq!(sources.len(), distinct.len(), "each file once: {sources:?}");
    let a = planned.unpacked_dir(&CacheLocation::TarFile("/shared/r/cache-app.main.tar".into()));
    let b = planned.unpacked_dir(&CacheLocation::TarFile("/shared/r/cache-app.main.tar".into()));
    let c = planned.unpacked_dir(&CacheLocation::TarFile("/shared/s/cache-app.main.tar".into()));
    assert_eq!(a, b);
    assert_ne!(a, c, "two files of one name are two directories");
}

#[test]
fn the_classic_builder_pulls_in_chain_order() {
    let mut options = options(feature_branch());
    options.builder = Builder::Classic;
    options.backend = Backend::Inline;
    options.chain = vec![Level::Branch, Level::DefaultBranch];
    let script = plan("FROM alpine AS deps\n", &options).to_string();
    let feature = crate::refs::sanitize_tag("feature/login");
    assert!(script.contains(&format!(
        "docker pull 127.0.0.1:5000/app:cache-deps.{feature} ||\n  docker pull 127.0.0.1:5000/app:cache-deps.main || true"
    )), "{script}");
    assert!(script.contains("docker build \\\n  --target deps"), "{script}");
    // The classic builder takes cache from pulled images and needs no inline metadata.
    assert!(!script.contains("BUILDKIT_INLINE_CACHE"), "{script}");
    assert!(!script.contains("--cache-to"), "{script}");
    options.backend = Backend::parse("registry", None).unwrap();
    let dockerfile = parse_dockerfile_text("FROM alpine AS deps\n", &BTreeMap::new()).unwrap();
    let error = Plan::from_dockerfile(&options, Path::new("Dockerfile"), &dockerfile).unwrap_err();
    assert!(error.to_string().contains("needs BuildKit"), "{error}");
}

#[test]
fn read_only_writes_nothing() {
    let mut options = options(main_branch());
    options.access = Access::ReadOnly;
    let plan = plan(RUST_SERVICE, &options);
    assert!(plan.stages.iter().all(|s| s.cache_to.is_empty()));
    assert!(plan.to_string().contains("# writes: nothing"));
}

#[test]
fn an_unnamed_intermediate_stage_is_folded_with_a_note() {
    let plan = plan("FROM alpine\nRUN make\nFROM alpine AS final\nCOPY --from=0 /x /x\n", &options(main_branch()));
    assert_eq!(plan.stages.len(), 1);
    assert_eq!(plan.folded_stages[0].name, "0");
    assert!(plan.to_string().contains("# note: stage 0 has no name, so it cannot be built alone"));
}

#[test]
fn an_unnamed_target_is_built_without_target() {
    let plan = plan("FROM alpine AS deps\nFROM deps\n", &options(main_branch()));
    assert_eq!(plan.stages[1].name, "1");
    assert_eq!(plan.stages[1].target, None);
    assert!(!plan.build_command(&plan.stages[1], &[], "plain").contains(&"--target".to_string()));
}

#[test]
fn from_with_an_arg_and_a_build_arg() {
    let mut options = options(main_branch());
    options.docker_args = vec!["--build-arg".into(), "RUST_IMAGE=local/rust".into()];
    let plan = Plan::from_dockerfile(
        &options,
        Path::new("Dockerfile"),
        &parse_dockerfile_text(RUST_SERVICE, &DockerArgs::read(&options.docker_args).unwrap().build_args).unwrap(),
    )
    .unwrap();
    assert_eq!(plan.stages.len(), 3);
    let dockerfile =
        parse_dockerfile_text(RUST_SERVICE, &DockerArgs::read(&options.docker_args).unwrap().build_args).unwrap();
    assert_eq!(dockerfile.stages[0].base, "local/rust");
}

#[test]
fn secrets_never_appear_in_the_script_or_the_json() {
    let mut options = options(main_branch());
    options.docker_args = vec![
        "--build-arg".into(),
        "NPM_TOKEN=s3cr3t-value".into(),
        "--build-arg=DB_PASSWORD=hunter2-value".into(),
        "--secret".into(),
        "id=cacert,src=/etc/ssl/certs/ca-certificates.crt".into(),
        "--build-arg".into(),
        "VERSION=1.2".into(),
    ];
    options.build_args = BTreeMap::from([("API_KEY".to_string(), "key-value-123".to_string())]);
    let plan = plan("FROM alpine AS a\n", &options);
    for text in [plan.to_string(), plan.to_json()] {
        for secret in ["s3cr3t-value", "hunter2-value", "key-value-123"] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        assert!(text.contains("NPM_TOKEN=***"), "{text}");
        assert!(text.contains("VERSION=1.2"), "{text}");
        assert!(text.contains("id=cacert,src=/etc/ssl/certs/ca-certificates.crt"), "{text}");
    }
    // The command that runs keeps the real values.
    let command = plan.build_command(&plan.stages[0], &[], "rawjson");
    assert!(command.contains(&"NPM_TOKEN=s3cr3t-value".to_string()));
}

#[test]
fn options_cachefrom_sets_are_refused_after_the_double_dash() {
    let mut options = options(main_branch());
    for flag in ["--target=x", "-t", "--cache-from", "--progress=plain", "-f"] {
        options.docker_args = vec![flag.to_string(), "v".into()];
        let dockerfile = parse_dockerfile_text("FROM alpine AS a\n", &BTreeMap::new()).unwrap();
        let error = Plan::from_dockerfile(&options, Path::new("Dockerfile"), &dockerfile).unwrap_err().to_string();
        assert!(error.contains("conflicts with what cachefrom sets itself"), "{flag}: {error}");
    }
}

#[test]
fn the_plan_round_trips_through_json_and_is_deterministic() {
    let mut options = options(feature_branch());
    options.backend = Backend::parse("local,dir=/cache", None).unwrap();
    let first = plan(RUST_SERVICE, &options);
    let second = plan(RUST_SERVICE, &options);
    assert_eq!(first.to_string(), second.to_string());
    assert_eq!(first.to_json(), second.to_json());
    let back: Plan = serde_json::from_str(&first.to_json()).unwrap();
    assert_eq!(back, first);
}

#[test]
fn a_detached_head_with_a_ci_branch_variable() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| crate::git::tests::git(dir.path(), args);
    run(&["init", "-q", "-b", "main"]);
    std::fs::write(dir.path().join("Dockerfile"), "FROM alpine AS app\n").unwrap();
    run(&["add", "."]);
    run(&["commit", "-q", "-m", "one"]);
    run(&["checkout", "-q", "--detach"]);
    let env = crate::ci::Environment::from_pairs([("GITLAB_CI", "true"), ("CI_COMMIT_REF_NAME", "topic")]);
    let git = GitFacts::discover(dir.path(), &Default::default(), &env).unwrap();
    let options = PlanOptions::new(dir.path(), Repository::parse("127.0.0.1:5000/app").unwrap(), git);
    let plan = Plan::new(&options).unwrap();
    assert_eq!(plan.stages[0].cache_from[0].tag, "cache-app.topic");
    assert!(plan.to_string().contains("# branch topic (from CI_COMMIT_REF_NAME); default branch main"));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn dockerfile(stages: usize) -> String {
        let mut text = String::from("ARG BASE=debian\n");
        for i in 0..stages {
            let from = if i == 0 { "${BASE}".to_string() } else { format!("s{}", i - 1) };
            text.push_str(&format!("FROM {from} AS s{i}\nRUN echo {i}\n"));
        }
        text
    }

    /// Arbitrary text, with a workflow command on a line of its own in it half the time.
    fn hostile() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            (any::<String>(), any::<String>()).prop_map(|(a, b)| format!("{a}\n  ::add-mask::{b}\r::x::"))
        ]
    }

    proptest! {
        #[test]
        fn no_value_in_any_input_starts_a_workflow_command_in_the_script_or_the_json(
            branch in hostile(),
            default_branch in hostile(),
            arg in hostile(),
            tag in hostile(),
            docker_arg in hostile(),
            work_dir in hostile(),
            cache_dir in hostile(),
            backend in prop::sample::select(vec!["registry", "local", "tarball", "inline"]),
        ) {
            let git = GitFacts { branch: Some(branch), default_branch, ..feature_branch() };
            let mut options = options(git);
            options.backend = match backend {
                "local" | "tarball" => Backend::parse(backend, Some(Path::new(&cache_dir))).unwrap(),
                other => Backend::parse(other, None).unwrap(),
            };
            options.build_args.insert("BASE".into(), arg.clone());
            options.build_args.insert("OTHER".into(), arg);
            options.tags = vec![format!("127.0.0.1:5000/app:{tag}")];
            options.push_tags = true;
            options.docker_args = vec!["--label".into(), docker_arg.clone(), docker_arg];
            options.work_dir = work_dir.into();
            let text = "ARG BASE=debian\nFROM ${BASE} AS deps\nRUN make\nFROM deps AS app\nARG OTHER\nRUN make\n";
            let Ok(dockerfile) = parse_dockerfile_text(text, &options.build_args) else { return Ok(()) };
            let Ok(plan) = Plan::from_dockerfile(&options, Path::new("app/Dockerfile"), &dockerfile) else { return Ok(()) };
            for output in [plan.to_string(), plan.to_json()] {
                for line in output.split(['\n', '\r']) {
                    prop_assert!(!line.trim_start().starts_with("::"), "{:?}", line);
                }
            }
        }

        #[test]
        fn the_same_inputs_give_the_same_plan_byte_for_byte(
            branch in any::<String>(),
            stages in 1usize..8,
            backend in prop::sample::select(vec!["inline", "registry", "local,dir=/c", "tarball,dir=/t", "s3,bucket=b,region=r", "gha"]),
        ) {
            let git = GitFacts { branch: Some(branch.clone()), ..feature_branch() };
            let mut options = options(git);
            options.backend = Backend::parse(backend, None).unwrap();
            let text = dockerfile(stages);
            let first = plan(&text, &options);
            let second = plan(&text, &options);
            prop_assert_eq!(first.to_string(), second.to_string());
            prop_assert_eq!(first.to_json(), second.to_json());
            prop_assert_eq!(first.stages.len(), stages);
            for stage in &first.stages {
                for cache in stage.cache_from.iter().chain(&stage.cache_to) {
                    prop_assert!(crate::refs::is_valid_tag(&cache.tag), "{}", cache.tag);
                }
            }
        }
    }
}

#[test]
fn a_plan_grows_linearly_with_the_stages() {
    let chain = |n: usize| {
        let text: String = std::iter::once("FROM alpine AS s0\n".to_string())
            .chain((1..n).map(|i| format!("FROM s{} AS s{i}\nRUN echo {i}\n", i - 1)))
            .collect();
        let mut options = options(feature_branch());
        options.backend = Backend::parse("registry", None).unwrap();
        let plan = plan(&text, &options);
        (plan.to_string().len(), plan.to_json().len())
    };
    let (script_200, json_200) = chain(200);
    let (script_2000, json_2000) = chain(2000);
    // Linear: ten times the stages, about ten times the text (quadratic would be a hundred).
    assert!(script_2000 < 15 * script_200, "script: {script_200} bytes for 200 stages, {script_2000} for 2000");
    assert!(json_2000 < 15 * json_200, "JSON: {json_200} bytes for 200 stages, {json_2000} for 2000");
    assert!(script_2000 < 8 * 1024 * 1024, "{script_2000}");
}

const CARGO_MOUNTS: &str = "\
FROM debian:bookworm AS tools
FROM rust:1.85 AS builder
RUN --mount=type=cache,target=/usr/local/cargo/registry/ --mount=type=cache,id=target,target=/app/target,sharing=locked cargo build
RUN --mount=type=cache,target=/usr/local/cargo/registry cargo test
RUN --mount=type=cache,target=/x,from=tools true
FROM debian:bookworm-slim AS runtime
COPY --from=builder /app /app
";

#[test]
fn every_cache_mount_of_the_stages_built_is_restored_before_the_build_and_saved_after_it() {
    let plan = plan(CARGO_MOUNTS, &options(feature_branch()));
    let ids: Vec<&str> = plan.mounts.iter().map(|mount| mount.mount.id.as_str()).collect();
    assert_eq!(ids, ["/usr/local/cargo/registry", "target"], "one mount an identity");
    assert_eq!(plan.mounts[0].steps.len(), 2, "two RUNs share the registry mount");
    assert_eq!(plan.mount_image.as_deref(), Some("rust:1.85"));
    assert!(
        plan.notes
            .iter()
            .any(|note| note.contains("\"/x\" of stage builder is not kept: it starts from another stage")),
        "{:?}",
        plan.notes
    );
    let target = &plan.mounts[1];
    assert_eq!(
        tags(&target.cache_from).iter().map(|t| t.split_once('=').unwrap().0).collect::<Vec<_>>(),
        ["branch", "merge-base", "default-branch", "parent", "unprefixed"]
    );
    assert!(target.cache_from[0].tag.starts_with("cachemount-target--"));
    assert!(
        target.cache_from[0].tag.ends_with(".feature-login--") || target.cache_from[0].tag.contains(".feature-login--")
    );
    let kinds: Vec<&str> = plan
        .steps
        .iter()
        .map(|step| match step {
            Step::RestoreMounts { .. } => "restore",
            Step::Build { .. } => "build",
            Step::SaveMounts { .. } => "save",
            Step::WriteBack { .. } => "write-back",
            Step::Write { .. } => "write",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds[..3], ["other", "restore", "build"], "{kinds:?}");
    assert!(kinds.contains(&"save"));
    // The restore runs in the target's base (pulled by the build anyway) while the mounts'
    // image is pulled beside it; again in the mounts' own image when that fails.
    let restore = plan.restore_dockerfile();
    assert!(restore.starts_with("FROM debian:bookworm-slim\nUSER 0:0\n"), "{restore}");
    assert!(plan.restore_again_dockerfile().starts_with("FROM rust:1.85\nUSER 0:0\n"));
    let Some(Step::RestoreMounts { pull, again, .. }) =
        plan.steps.iter().find(|step| matches!(step, Step::RestoreMounts { .. }))
    else {
        panic!("no restore step")
    };
    assert_eq!(pull.as_deref(), Some(&["pull".to_string(), "--quiet".into(), "rust:1.85".into()][..]));
    assert!(again.as_ref().is_some_and(|argv| argv.iter().any(|arg| arg.ends_with("restore-again.Dockerfile"))));
    assert!(restore.contains("--mount=type=cache,id=target,target=/cachefrom/m1,sharing=locked"), "{restore}");
    let save = plan.save_dockerfile();
    assert!(save.contains("> /cachefrom/out/m0.tar && echo"), "{save}");
    assert!(!save.contains("gzip"), "cachefrom compresses, not the build: {save}");
    assert!(save.contains(&format!("-gt {}", crate::mounts::DEFAULT_MAX_SIZE / 1024)), "{save}");

    // The script saves them in its EXIT trap, and is valid bash.
    let script = plan.to_string();
    assert!(script.contains("save_mounts() {"), "{script}");
    assert!(script.contains("save_mounts || true;"), "{script}");
    let syntax = std::process::Command::new("bash").args(["-n", "-c", &script]).status().unwrap();
    assert!(syntax.success(), "{script}");
    assert!(script.contains("docker pull --quiet rust:1.85 & pulling=$!"), "{script}");
    assert!(script.contains("restore-again.Dockerfile"), "{script}");
}

#[test]
fn the_mounts_image_is_pulled_beside_the_restore_only_where_the_build_finds_it_and_it_is_another() {
    // A builder that keeps no image in the engine (docker-container, remote) would not see the pull.
    let mut remote = options(feature_branch());
    remote.builder_keeps_no_image = true;
    let plan_remote = plan(CARGO_MOUNTS, &remote);
    assert_eq!(plan_remote.restore_image.as_deref(), Some("debian:bookworm-slim"));
    assert!(plan_remote
        .steps
        .iter()
        .any(|step| matches!(step, Step::RestoreMounts { pull: None, again: Some(_), .. })));
    // One stage: the restore runs in its image, nothing beside it.
    let one = plan("FROM rust:1.85\nRUN --mount=type=cache,target=/t cargo build\n", &options(feature_branch()));
    assert_eq!(one.restore_image, None);
    assert!(one.restore_dockerfile().starts_with("FROM rust:1.85\n"));
    assert!(one.steps.iter().any(|step| matches!(step, Step::RestoreMounts { pull: None, again: None, .. })));
    // A target from scratch: its base is no image to run in.
    let scratch = plan(
        "FROM rust:1.85 AS b\nRUN --mount=type=cache,target=/t cargo build\nFROM scratch\nCOPY --from=b /x /x\n",
        &options(feature_branch()),
    );
    assert_eq!(scratch.restore_image, None);
}

#[test]
fn cache_mounts_are_read_only_where_caches_are_and_can_be_turned_off() {
    let mut read_only = options(feature_branch());
    read_only.access = Access::ReadOnly;
    let plan_ro = plan(CARGO_MOUNTS, &read_only);
    assert!(plan_ro.steps.iter().any(|step| matches!(step, Step::RestoreMounts { .. })));
    assert!(!plan_ro.steps.iter().any(|step| matches!(step, Step::SaveMounts { .. })), "a fork writes no mount");

    let mut off = options(feature_branch());
    off.cache_mounts = false;
    let plan_off = plan(CARGO_MOUNTS, &off);
    assert!(plan_off.mounts.is_empty());
    assert!(plan_off.notes.iter().any(|note| note.contains("turned off (--cache-mounts off)")));

    let mut inline = options(feature_branch());
    inline.backend = Backend::Inline;
    assert!(plan(CARGO_MOUNTS, &inline)
        .notes
        .iter()
        .any(|note| note.contains("the inline backend does not keep them")));

    let mut local = options(feature_branch());
    local.backend = Backend::parse("local,dir=/cache", None).unwrap();
    let plan_local = plan(CARGO_MOUNTS, &local);
    let file = plan_local.mounts[0].cache_to[0].location.to_string();
    assert!(file.starts_with("/cache/") && file.ends_with(".tar.gz"), "{file}");

    // A platform is part of what names a mount's contents.
    let mut arm = options(feature_branch());
    arm.platform = Some("linux/arm64".into());
    let plan_arm = plan(CARGO_MOUNTS, &arm);
    let plan_amd = plan(CARGO_MOUNTS, &options(feature_branch()));
    assert_ne!(plan_arm.mounts[0].cache_to[0].tag, plan_amd.mounts[0].cache_to[0].tag);
}

#[test]
fn base_images_in_the_same_registry_have_their_layers_mounted_before_the_build() {
    let text = "FROM 127.0.0.1:5000/base/runtime:bookworm AS deps\nFROM docker.io/library/alpine AS app\nCOPY --from=deps /x /x\n";
    let planned = plan(text, &options(main_branch()));
    let mounts: Vec<&Step> = planned.steps.iter().filter(|step| matches!(step, Step::MountBaseLayers { .. })).collect();
    let [Step::MountBaseLayers { images, platform }] = mounts.as_slice() else { panic!("{:?}", planned.steps) };
    assert_eq!(images, &["127.0.0.1:5000/base/runtime:bookworm".to_string()]);
    assert_eq!(platform, &crate::dockerfile::Platform::host().to_string());
    let first_build = planned.steps.iter().position(|step| matches!(step, Step::Build { .. })).unwrap();
    let mount = planned.steps.iter().position(|step| matches!(step, Step::MountBaseLayers { .. })).unwrap();
    assert!(mount < first_build);
    assert!(planned.to_string().contains("?mount=DIGEST&from=BASE"));

    let mut read_only = options(main_branch());
    read_only.access = Access::ReadOnly;
    assert!(!plan(text, &read_only).steps.iter().any(|step| matches!(step, Step::MountBaseLayers { .. })));
}

#[test]
fn each_named_platform_has_caches_of_its_own() {
    let mut arm = options(main_branch());
    arm.platform = Some("linux/arm64".into());
    let planned = plan(RUST_SERVICE, &arm);
    let deps = planned.stage("deps").unwrap();
    assert_eq!(deps.cache_to[0].tag, "cache-deps--linux-arm64.main");
    assert_eq!(deps.cache_to[0].platform.as_deref(), Some("linux/arm64"));
    assert!(planned.notes.iter().any(|note| note.contains("caches are kept per platform")));
    let default = plan(RUST_SERVICE, &options(main_branch()));
    assert_eq!(default.stage("deps").unwrap().cache_to[0].tag, "cache-deps.main", "no platform named: as before");

    // One build for two platforms: each level has each platform's cache; the export goes to the
    // first, and a copy to every other tag, the other platform's included.
    let mut both = options(main_branch());
    both.platform = Some("linux/amd64,linux/arm64".into());
    let planned = plan(RUST_SERVICE, &both);
    let runtime = planned.stage("runtime").unwrap();
    let main_tags: Vec<&str> =
        runtime.cache_from.iter().filter(|r| r.level == Level::Branch).map(|r| r.tag.as_str()).collect();
    assert_eq!(main_tags, ["cache-runtime--linux-amd64.main", "cache-runtime--linux-arm64.main"]);
    let copies: Vec<String> = planned
        .steps
        .iter()
        .filter_map(|step| match step {
            Step::Write { write: CacheWrite::CopyTag { to, .. }, .. } => Some(to.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(copies.iter().any(|tag| tag.ends_with(":cache-runtime--linux-arm64.main")), "{copies:?}");
}

#[test]
fn the_mount_builds_run_one_shell_line_that_sh_reads() {
    let planned = plan(CARGO_MOUNTS, &options(feature_branch()));
    for dockerfile in [planned.restore_dockerfile(), planned.save_dockerfile()] {
        let run = dockerfile.lines().skip_while(|line| !line.starts_with("RUN ")).nth(1).unwrap().trim().to_string();
        assert!(run.contains("& p1=$!") && run.contains("wait $p0 && wait $p1"), "{dockerfile}");
        let syntax = std::process::Command::new("sh").args(["-n", "-c", &run]).status().unwrap();
        assert!(syntax.success(), "{run}");
    }
}

#[test]
fn a_platform_that_builds_other_stages_is_named_in_a_note() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM alpine AS base-amd64\nFROM alpine AS base-arm64\nARG TARGETARCH\nFROM base-$TARGETARCH AS final\n",
    )
    .unwrap();
    let mut both = PlanOptions::new(dir.path(), Repository::parse("127.0.0.1:5000/app").unwrap(), main_branch());
    both.platform = Some("linux/amd64,linux/arm64".into());
    let planned = Plan::new(&both).unwrap();
    assert!(
        planned.notes.iter().any(|note| note.starts_with(
            "linux/arm64 builds other stages than linux/amd64 (base-arm64 -> final against base-amd64 -> final)"
        )),
        "{:?}",
        planned.notes
    );
    both.platform = Some("linux/amd64".into());
    assert!(!Plan::new(&both).unwrap().notes.iter().any(|note| note.contains("builds other stages")));
}
