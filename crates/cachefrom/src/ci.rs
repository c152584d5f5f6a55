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

    #[test]
    fn empty_variables_do_not_count() {
        let env = Environment::from_pairs([("GITHUB_HEAD_REF", ""), ("GITHUB_REF_NAME", "main")]);
        assert_eq!(branch_from_ci(&env).unwrap().0, "main");
        assert_eq!(CiSystem::detect(&Environment::default()), None);
    }
}
