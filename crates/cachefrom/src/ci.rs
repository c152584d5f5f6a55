//! Which CI system runs us, and what its environment says: branch, default branch, step summary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A snapshot of environment variables. Tests build one by hand; programs use [`Environment::from_process`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    variables: BTreeMap<String, String>,
}

impl Environment {
    /// The current process's environment.
    pub fn from_process() -> Environment {
        // Not `std::env::vars()`, which panics on a value that is not UTF-8: such a value is kept
        // with its bad bytes replaced, so that checking it gives an error instead.
        let variables = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.to_string_lossy().into_owned())))
            .collect();
        Environment { variables }
    }

    /// An environment holding exactly `pairs`.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Environment {
        Environment { variables: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    /// The value of `name`, if set and not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.variables.get(name).map(String::as_str).filter(|value| !value.trim().is_empty())
    }
}

/// The CI systems cachefrom knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CiSystem {
    /// GitHub Actions (`GITHUB_ACTIONS=true`).
    GithubActions,
    /// GitLab CI (`GITLAB_CI=true`).
    Gitlab,
    /// CircleCI (`CIRCLECI=true`).
    Circleci,
    /// Buildkite (`BUILDKITE=true`).
    Buildkite,
    /// Jenkins (`JENKINS_URL` set).
    Jenkins,
    /// Azure Pipelines (`TF_BUILD=True`).
    AzurePipelines,
    /// Bamboo (`bamboo_buildKey` set).
    Bamboo,
    /// Some other CI (`CI` set).
    Other,
}

impl CiSystem {
    /// The CI system the environment belongs to, or `None` outside CI.
    pub fn detect(env: &Environment) -> Option<CiSystem> {
        let checks = [
            ("GITHUB_ACTIONS", CiSystem::GithubActions),
            ("GITLAB_CI", CiSystem::Gitlab),
            ("CIRCLECI", CiSystem::Circleci),
            ("BUILDKITE", CiSystem::Buildkite),
            ("JENKINS_URL", CiSystem::Jenkins),
            ("TF_BUILD", CiSystem::AzurePipelines),
            ("bamboo_buildKey", CiSystem::Bamboo),
            ("CI", CiSystem::Other),
        ];
        checks.iter().find(|(name, _)| env.get(name).is_some()).map(|(_, system)| *system)
    }
}

/// The branch being built, from the CI's variables: for a pull or merge request, its source branch.
///
/// Returns the value and the variable it came from, as given: [`crate::git::check_branch`]
/// normalises and checks it. Checked in this order:
/// `GITHUB_HEAD_REF`, `GITHUB_REF_NAME`, `CI_MERGE_REQUEST_SOURCE_BRANCH_NAME`, `CI_COMMIT_REF_NAME`,
/// `CIRCLE_BRANCH`, `BUILDKITE_BRANCH`, `CHANGE_BRANCH`, `BRANCH_NAME`, `SYSTEM_PULLREQUEST_SOURCEBRANCH`,
/// `BUILD_SOURCEBRANCHNAME`, `bamboo_planRepository_branchName`.
pub fn branch_from_ci(env: &Environment) -> Option<(String, &'static str)> {
    const VARIABLES: [&str; 11] = [
        "GITHUB_HEAD_REF",
        "GITHUB_REF_NAME",
        "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME",
        "CI_COMMIT_REF_NAME",
        "CIRCLE_BRANCH",
        "BUILDKITE_BRANCH",
        "CHANGE_BRANCH",
        "BRANCH_NAME",
        "SYSTEM_PULLREQUEST_SOURCEBRANCH",
        "BUILD_SOURCEBRANCHNAME",
        "bamboo_planRepository_branchName",
    ];
    VARIABLES.iter().find_map(|name| Some((env.get(name)?.to_string(), *name)))
}

/// The default branch, where the CI says it: GitLab's `CI_DEFAULT_BRANCH`, Buildkite's
/// `BUILDKITE_PIPELINE_DEFAULT_BRANCH`.
pub fn default_branch_from_ci(env: &Environment) -> Option<(String, &'static str)> {
    ["CI_DEFAULT_BRANCH", "BUILDKITE_PIPELINE_DEFAULT_BRANCH"]
        .iter()
        .find_map(|name| Some((env.get(name)?.to_string(), *name)))
}

/// Why the CI says this run builds a pull or merge request from a fork (whose branch names the
/// fork's author chooses), or `None`.
///
/// GitHub Actions: a `pull_request`/`pull_request_target` event whose payload
/// (`GITHUB_EVENT_PATH`) has `pull_request.head.repo.fork` true or a head repository other than
/// the base one. GitLab: `CI_MERGE_REQUEST_SOURCE_PROJECT_ID` ≠ `CI_PROJECT_ID`. CircleCI:
/// `CIRCLE_PR_REPONAME` (set only for forks). Buildkite: `BUILDKITE_PULL_REQUEST_REPO` ≠
/// `BUILDKITE_REPO`. Azure Pipelines: `SYSTEM_PULLREQUEST_ISFORK=True`. Jenkins: `CHANGE_FORK`.
/// Travis CI: `TRAVIS_PULL_REQUEST_SLUG` ≠ `TRAVIS_REPO_SLUG`.
pub fn fork_pull_request(env: &Environment) -> Option<String> {
    if matches!(env.get("GITHUB_EVENT_NAME"), Some("pull_request" | "pull_request_target")) {
        return match env.get("GITHUB_EVENT_PATH").map(github_event_is_fork) {
            Some(Ok(true)) => Some(format!(
                "GitHub Actions builds a {} from a fork (GITHUB_EVENT_PATH: pull_request.head.repo is a fork)",
                env.get("GITHUB_EVENT_NAME").unwrap_or_default()
            )),
            Some(Ok(false)) => None,
            // A pull request whose origin cannot be read is treated as a fork: writing is the risk.
            Some(Err(why)) => Some(format!("GitHub Actions builds a pull request whose origin cannot be read ({why})")),
            None => Some("GitHub Actions builds a pull request and GITHUB_EVENT_PATH is not set".to_string()),
        };
    }
    let differ = |a: &str, b: &str| match (env.get(a), env.get(b)) {
        (Some(x), Some(y)) => normalise_repo(x) != normalise_repo(y),
        _ => false,
    };
    if differ("CI_MERGE_REQUEST_SOURCE_PROJECT_ID", "CI_PROJECT_ID") {
        return Some(
            "GitLab builds a merge request from another project (CI_MERGE_REQUEST_SOURCE_PROJECT_ID ≠ CI_PROJECT_ID)"
                .to_string(),
        );
    }
    if env.get("CIRCLE_PR_REPONAME").is_some() {
        return Some("CircleCI builds a pull request from a fork (CIRCLE_PR_REPONAME is set)".to_string());
    }
    if differ("BUILDKITE_PULL_REQUEST_REPO", "BUILDKITE_REPO") {
        return Some(
            "Buildkite builds a pull request from another repository (BUILDKITE_PULL_REQUEST_REPO)".to_string(),
        );
    }
    if env.get("SYSTEM_PULLREQUEST_ISFORK").is_some_and(|value| value.eq_ignore_ascii_case("true")) {
        return Some("Azure Pipelines builds a pull request from a fork (SYSTEM_PULLREQUEST_ISFORK)".to_string());
    }
    if env.get("CHANGE_FORK").is_some() {
        return Some("Jenkins builds a change from a fork (CHANGE_FORK is set)".to_string());
    }
    if differ("TRAVIS_PULL_REQUEST_SLUG", "TRAVIS_REPO_SLUG") {
        return Some("Travis CI builds a pull request from another repository (TRAVIS_PULL_REQUEST_SLUG)".to_string());
    }
    None
}

/// `git@host:o/r.git`, `https://host/o/r` and `o/r` alike, for comparing repositories.
fn normalise_repo(text: &str) -> String {
    let text = text.trim().trim_end_matches('/').trim_end_matches(".git").to_ascii_lowercase();
    let text = text.rsplit_once("://").map(|(_, rest)| rest.to_string()).unwrap_or(text);
    let text = text.replacen(':', "/", 1);
    let parts: Vec<&str> = text.rsplit('/').take(2).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// Reads a GitHub event payload: true when the pull request's head repository is a fork (or
/// another repository than the base).
fn github_event_is_fork(path: &str) -> std::result::Result<bool, String> {
    let file = std::fs::File::open(path).map_err(|error| format!("cannot read {path}: {error}"))?;
    // Event payloads are small; a huge one is not read whole.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, 16 * 1024 * 1024), &mut text)
        .map_err(|error| format!("cannot read {path}: {error}"))?;
    let event: serde_json::Value = serde_json::from_str(&text).map_err(|_| format!("{path} is not JSON"))?;
    let pull_request = event.get("pull_request").ok_or_else(|| format!("{path} has no pull_request"))?;
    let head = &pull_request["head"]["repo"];
    if head["fork"].as_bool() == Some(true) {
        return Ok(true);
    }
    match (head["full_name"].as_str(), pull_request["base"]["repo"]["full_name"].as_str()) {
        (Some(head), Some(base)) => Ok(!head.eq_ignore_ascii_case(base)),
        // A deleted fork has `head.repo: null`.
        _ => Ok(head.is_null()),
    }
}

/// The file GitHub Actions renders as the job summary (`GITHUB_STEP_SUMMARY`).
pub fn step_summary_path(env: &Environment) -> Option<std::path::PathBuf> {
    env.get("GITHUB_STEP_SUMMARY").map(std::path::PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ci_names_its_branch() {
        let cases = [
            (vec![("GITHUB_ACTIONS", "true"), ("GITHUB_REF_NAME", "main")], "main", CiSystem::GithubActions),
            (
                vec![("GITHUB_ACTIONS", "true"), ("GITHUB_REF_NAME", "42/merge"), ("GITHUB_HEAD_REF", "feature/x")],
                "feature/x",
                CiSystem::GithubActions,
            ),
            (vec![("GITLAB_CI", "true"), ("CI_COMMIT_REF_NAME", "dev")], "dev", CiSystem::Gitlab),
            (
                vec![("GITLAB_CI", "true"), ("CI_COMMIT_REF_NAME", "x"), ("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME", "mr")],
                "mr",
                CiSystem::Gitlab,
            ),
            (vec![("CIRCLECI", "true"), ("CIRCLE_BRANCH", "circle")], "circle", CiSystem::Circleci),
            (vec![("BUILDKITE", "true"), ("BUILDKITE_BRANCH", "bk")], "bk", CiSystem::Buildkite),
            (vec![("JENKINS_URL", "http://j"), ("BRANCH_NAME", "jb")], "jb", CiSystem::Jenkins),
            (vec![("TF_BUILD", "True"), ("BUILD_SOURCEBRANCHNAME", "az")], "az", CiSystem::AzurePipelines),
            (vec![("bamboo_buildKey", "K"), ("bamboo_planRepository_branchName", "bam")], "bam", CiSystem::Bamboo),
        ];
        for (pairs, branch, system) in cases {
            let env = Environment::from_pairs(pairs.clone());
            assert_eq!(branch_from_ci(&env).map(|(b, _)| b), Some(branch.to_string()), "{pairs:?}");
            assert_eq!(CiSystem::detect(&env), Some(system), "{pairs:?}");
        }
    }

    fn github_event(dir: &std::path::Path, fork: bool, head: &str) -> String {
        let path = dir.join("event.json");
        let event = serde_json::json!({
            "action": "opened",
            "number": 7,
            "pull_request": {
                "head": {"ref": "feature", "repo": {"fork": fork, "full_name": head}},
                "base": {"ref": "main", "repo": {"fork": false, "full_name": "team/app"}}
            }
        });
        std::fs::write(&path, event.to_string()).unwrap();
        path.display().to_string()
    }

    #[test]
    fn forks_are_recognised_wherever_the_ci_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let fork = github_event(dir.path(), true, "someone/app");
        let github = |event: &str, path: &str| {
            Environment::from_pairs([
                ("GITHUB_ACTIONS", "true"),
                ("GITHUB_EVENT_NAME", event),
                ("GITHUB_EVENT_PATH", path),
            ])
        };
        assert!(fork_pull_request(&github("pull_request", &fork)).unwrap().contains("fork"));
        assert!(fork_pull_request(&github("pull_request_target", &fork)).is_some());
        assert_eq!(fork_pull_request(&github("push", &fork)), None);
        let same = github_event(dir.path(), false, "team/app");
        assert_eq!(fork_pull_request(&github("pull_request", &same)), None, "a branch of the same repository writes");
        assert!(fork_pull_request(&github("pull_request", "/nonexistent/event.json")).is_some());
        let forks = [
            vec![("CI_MERGE_REQUEST_SOURCE_PROJECT_ID", "12"), ("CI_PROJECT_ID", "34")],
            vec![("CIRCLE_PR_REPONAME", "app")],
            vec![
                ("BUILDKITE_PULL_REQUEST_REPO", "git://github.com/someone/app.git"),
                ("BUILDKITE_REPO", "git@github.com:team/app.git"),
            ],
            vec![("SYSTEM_PULLREQUEST_ISFORK", "True")],
            vec![("CHANGE_FORK", "someone")],
            vec![("TRAVIS_PULL_REQUEST_SLUG", "someone/app"), ("TRAVIS_REPO_SLUG", "team/app")],
        ];
        for pairs in forks {
            assert!(fork_pull_request(&Environment::from_pairs(pairs.clone())).is_some(), "{pairs:?}");
        }
        let same = [
            vec![("CI_MERGE_REQUEST_SOURCE_PROJECT_ID", "34"), ("CI_PROJECT_ID", "34")],
            vec![
                ("BUILDKITE_PULL_REQUEST_REPO", "https://github.com/team/app.git"),
                ("BUILDKITE_REPO", "git@github.com:team/app.git"),
            ],
            vec![("SYSTEM_PULLREQUEST_ISFORK", "False")],
        ];
        for pairs in same {
            assert_eq!(fork_pull_request(&Environment::from_pairs(pairs.clone())), None, "{pairs:?}");
        }
    }

    #[test]
    fn empty_variables_do_not_count() {
        let env = Environment::from_pairs([("GITHUB_HEAD_REF", ""), ("GITHUB_REF_NAME", "main")]);
        assert_eq!(branch_from_ci(&env).unwrap().0, "main");
        assert_eq!(CiSystem::detect(&Environment::default()), None);
    }
}
