//! Git facts the tag scheme needs: branch, HEAD, HEAD^1, and the merge-base with the default branch.
//!
//! Read with `git2`. Detached HEAD (as CI checks out) takes the branch from the CI's variables;
//! a shallow clone or a missing default branch drops what cannot be known, with a note saying why.

use std::path::Path;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::ci::{branch_from_ci, default_branch_from_ci, Environment};

/// What the plan needs to know about the commit being built.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitFacts {
    /// The branch being built, if known.
    pub branch: Option<String>,
    /// Where the branch name came from: `--branch`, a CI variable, or `git`.
    pub branch_source: Option<String>,
    /// HEAD's commit id (40 hex digits).
    pub commit: Option<String>,
    /// HEAD^1's commit id.
    pub parent: Option<String>,
    /// The default branch (`main`, `master`, …).
    pub default_branch: String,
    /// The merge-base of HEAD with the default branch, for a branch other than the default one.
    pub merge_base: Option<String>,
    /// Why a fact is missing, one line each.
    pub notes: Vec<String>,
}

/// What the caller already knows; anything `None` is looked up.
#[derive(Debug, Clone, Default)]
pub struct GitOverrides {
    /// The branch (e.g. from `--branch`).
    pub branch: Option<String>,
    /// The default branch (e.g. from `--default-branch`).
    pub default_branch: Option<String>,
    /// The commit (e.g. from `--commit`).
    pub commit: Option<String>,
}

impl GitFacts {
    /// True when the branch being built is the default branch.
    pub fn on_default_branch(&self) -> bool {
        self.branch.as_deref() == Some(self.default_branch.as_str())
    }

    /// Reads the facts for the repository that contains `dir`, with `overrides` and the CI's `env` first.
    ///
    /// Every branch name, whichever source gave it, is normalised and checked the same way
    /// ([`check_branch`]), and a given commit must be a commit id ([`check_commit`]); a value that
    /// cannot be used is an error that names its source.
    pub fn discover(dir: &Path, overrides: &GitOverrides, env: &Environment) -> Result<GitFacts> {
        let mut facts = GitFacts::default();
        let repository = match git2::Repository::discover(dir) {
            Ok(repository) => Some(repository),
            Err(error) => {
                facts.notes.push(format!(
                    "no git repository at {}: commit tags are not used ({})",
                    dir.display(),
                    error.message()
                ));
                None
            }
        };

        if let Some(branch) = &overrides.branch {
            facts.branch = Some(check_branch(branch, "--branch")?);
            facts.branch_source = Some("--branch".to_string());
        }
        if facts.branch.is_none() {
            if let Some((branch, variable)) = branch_from_ci(env) {
                facts.branch = Some(check_branch(&branch, variable)?);
                facts.branch_source = Some(variable.to_string());
            }
        }
        if facts.branch.is_none() {
            if let Some(branch) = repository.as_ref().and_then(current_branch) {
                facts.branch = Some(branch);
                facts.branch_source = Some("git".to_string());
            }
        }
        if facts.branch.is_none() {
            facts.notes.push(
                "no branch: HEAD is detached and no CI variable names the branch; pass --branch (branch tags are not used)"
                    .to_string(),
            );
        }

        facts.default_branch = match (&overrides.default_branch, default_branch_from_ci(env)) {
            (Some(branch), _) => check_branch(branch, "--default-branch")?,
            (None, Some((branch, variable))) => check_branch(&branch, variable)?,
            (None, None) => repository
                .as_ref()
                .and_then(default_branch_from_git)
                .map(|branch| check_branch(&branch, "git's origin/HEAD"))
                .transpose()?
                .unwrap_or_else(|| "main".to_string()),
        };

        let given = overrides.commit.as_deref().map(|commit| check_commit(commit, "--commit")).transpose()?;
        let Some(repository) = repository else {
            if given.as_ref().is_some_and(|commit| !crate::refs::is_commit_id(commit)) {
                bail!(
                    "--commit: an abbreviated commit id needs the git repository to expand it; give all 40 hex digits"
                );
            }
            facts.commit = given;
            return Ok(facts);
        };
        // The commit being built: the one given (its parent and merge-base are its own), else HEAD.
        let head = match &given {
            Some(commit) => match repository.revparse_single(commit).and_then(|object| object.peel_to_commit()) {
                Ok(found) => Some(found),
                Err(_) if crate::refs::is_commit_id(commit) => {
                    facts.notes.push(format!(
                        "the commit {commit} given with --commit is not in this clone: no parent or merge-base (fetch it, or fetch more history)"
                    ));
                    None
                }
                Err(error) => bail!("--commit {commit} names no commit in this clone: {}", error.message()),
            },
            None => repository.head().ok().and_then(|head| head.peel_to_commit().ok()),
        };
        facts.commit = head.as_ref().map(|commit| commit.id().to_string()).or(given.clone());
        if let Some(head) = &head {
            facts.parent = head.parent_ids().next().map(|id| id.to_string());
            if facts.parent.is_none() {
                let why = if repository.is_shallow() { "the clone is shallow" } else { "it is the first commit" };
                facts.notes.push(format!("no parent commit: {why}"));
            }
        } else if given.is_none() {
            facts.notes.push("HEAD names no commit yet: commit tags are not used".to_string());
        }

        if !facts.on_default_branch() {
            if let Some(head) = &head {
                match default_branch_commit(&repository, &facts.default_branch) {
                    None => facts.notes.push(format!(
                        "no merge-base: the default branch `{0}` is not in this clone (fetch it: git fetch origin {0})",
                        facts.default_branch
                    )),
                    Some(base) => match repository.merge_base(head.id(), base) {
                        Ok(merge_base) => facts.merge_base = Some(merge_base.to_string()),
                        Err(error) => facts.notes.push(format!(
                            "no merge-base with `{}`{}: {}",
                            facts.default_branch,
                            if repository.is_shallow() { " (the clone is shallow: fetch more history)" } else { "" },
                            error.message()
                        )),
                    },
                }
            }
        }
        Ok(facts)
    }
}

/// Checks a branch name from `source` (an option or a variable): `refs/heads/` is removed, and
/// what is left must be a branch name by git's rules (`git check-ref-format --branch`): not
/// empty, no spaces or control characters, none of `~^:?*[\`, no `..`, `@{`, `//`, no part
/// starting with `.` or ending with `.lock`, not starting with `-`. The error shows the value
/// escaped, never raw.
pub fn check_branch(value: &str, source: &str) -> Result<String> {
    let name = value.strip_prefix("refs/heads/").unwrap_or(value);
    if name.is_empty() {
        bail!("the branch from {source} is empty; pass --branch NAME");
    }
    let valid =
        !name.starts_with('-') && name != "HEAD" && git2::Reference::is_valid_name(&format!("refs/heads/{name}"));
    if !valid {
        bail!(
            "the branch from {source}, {}, is not a branch name git accepts (no spaces or control characters, none of ~^:?*[\\, no `..` or `@{{`, no part starting with `.`); pass --branch NAME",
            escaped(name)
        );
    }
    Ok(name.to_string())
}

/// Checks a commit id from `source`: 4 to 64 hex digits, returned in lowercase.
pub fn check_commit(value: &str, source: &str) -> Result<String> {
    let valid = (4..=64).contains(&value.len()) && value.chars().all(|c| c.is_ascii_hexdigit());
    if !valid {
        bail!("{source} must be a commit id (4 to 64 hex digits); got {}", escaped(value));
    }
    Ok(value.to_ascii_lowercase())
}

/// `value` quoted, with control characters and non-ASCII escaped, cut to 80 characters: safe in
/// an error line.
pub(crate) fn escaped(value: &str) -> String {
    crate::secrets::quoted(value)
}

fn current_branch(repository: &git2::Repository) -> Option<String> {
    if repository.head_detached().unwrap_or(true) {
        return None;
    }
    // `head()` fails on an unborn branch; read the symbolic reference instead.
    let head = repository.find_reference("HEAD").ok()?;
    let target = head.symbolic_target()?;
    target.strip_prefix("refs/heads/").map(str::to_string)
}

fn default_branch_from_git(repository: &git2::Repository) -> Option<String> {
    if let Ok(reference) = repository.find_reference("refs/remotes/origin/HEAD") {
        if let Some(target) = reference.symbolic_target() {
            if let Some(name) = target.strip_prefix("refs/remotes/origin/") {
                return Some(name.to_string());
            }
        }
    }
    ["main", "master"].iter().find_map(|name| default_branch_commit(repository, name).map(|_| name.to_string()))
}

fn default_branch_commit(repository: &git2::Repository, branch: &str) -> Option<git2::Oid> {
    [format!("refs/heads/{branch}"), format!("refs/remotes/origin/{branch}")]
        .iter()
        .find_map(|name| repository.find_reference(name).ok()?.peel_to_commit().ok().map(|commit| commit.id()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// Runs git in `dir` with a fixed identity; its stdout. Shared with the plan's tests.
    pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
        let output = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .output()
            .expect("git runs");
        assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }

    /// main: c1 - c2; feature (from c2): c3 - c4. Returns (dir, c2, c3, c4).
    fn repository_with_a_branch() -> (tempfile::TempDir, String, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        git(path, &["init", "-q", "-b", "main"]);
        for (i, file) in ["a", "b"].iter().enumerate() {
            std::fs::write(path.join(file), i.to_string()).unwrap();
            git(path, &["add", "."]);
            git(path, &["commit", "-q", "-m", file]);
        }
        let c2 = git(path, &["rev-parse", "HEAD"]);
        git(path, &["checkout", "-q", "-b", "feature/login"]);
        std::fs::write(path.join("c"), "c").unwrap();
        git(path, &["add", "."]);
        git(path, &["commit", "-q", "-m", "c"]);
        let c3 = git(path, &["rev-parse", "HEAD"]);
        std::fs::write(path.join("d"), "d").unwrap();
        git(path, &["add", "."]);
        git(path, &["commit", "-q", "-m", "d"]);
        let c4 = git(path, &["rev-parse", "HEAD"]);
        (dir, c2, c3, c4)
    }

    #[test]
    fn a_branch_has_commit_parent_and_merge_base() {
        let (dir, c2, c3, c4) = repository_with_a_branch();
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &Environment::default()).unwrap();
        assert_eq!(facts.branch.as_deref(), Some("feature/login"));
        assert_eq!(facts.branch_source.as_deref(), Some("git"));
        assert_eq!(facts.default_branch, "main");
        assert_eq!(facts.commit.as_deref(), Some(c4.as_str()));
        assert_eq!(facts.parent.as_deref(), Some(c3.as_str()));
        assert_eq!(facts.merge_base.as_deref(), Some(c2.as_str()));
        assert!(facts.notes.is_empty(), "{:?}", facts.notes);
    }

    #[test]
    fn the_default_branch_has_no_merge_base() {
        let (dir, c2, _, _) = repository_with_a_branch();
        git(dir.path(), &["checkout", "-q", "main"]);
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &Environment::default()).unwrap();
        assert!(facts.on_default_branch());
        assert_eq!(facts.commit.as_deref(), Some(c2.as_str()));
        assert_eq!(facts.merge_base, None);
    }

    #[test]
    fn a_detached_head_takes_the_branch_from_the_ci() {
        let (dir, c2, _, c4) = repository_with_a_branch();
        git(dir.path(), &["checkout", "-q", "--detach", "HEAD"]);
        let env = Environment::from_pairs([("GITHUB_ACTIONS", "true"), ("GITHUB_HEAD_REF", "feature/login")]);
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &env).unwrap();
        assert_eq!(facts.branch.as_deref(), Some("feature/login"));
        assert_eq!(facts.branch_source.as_deref(), Some("GITHUB_HEAD_REF"));
        assert_eq!(facts.commit.as_deref(), Some(c4.as_str()));
        assert_eq!(facts.merge_base.as_deref(), Some(c2.as_str()));

        let without_ci = GitFacts::discover(dir.path(), &GitOverrides::default(), &Environment::default()).unwrap();
        assert_eq!(without_ci.branch, None);
        assert!(without_ci.notes.iter().any(|note| note.contains("HEAD is detached")), "{:?}", without_ci.notes);
    }

    #[test]
    fn a_shallow_clone_drops_the_merge_base_with_a_note() {
        let (origin, _, _, c4) = repository_with_a_branch();
        git(origin.path(), &["checkout", "-q", "main"]);
        let clones = tempfile::tempdir().unwrap();
        let url = format!("file://{}", origin.path().display());
        git(clones.path(), &["clone", "-q", "--depth", "1", "--branch", "feature/login", &url, "shallow"]);
        let shallow = clones.path().join("shallow");
        let facts = GitFacts::discover(&shallow, &GitOverrides::default(), &Environment::default()).unwrap();
        assert_eq!(facts.commit.as_deref(), Some(c4.as_str()));
        assert_eq!(facts.merge_base, None);
        assert!(facts.notes.iter().any(|note| note.contains("no merge-base")), "{:?}", facts.notes);
    }

    #[test]
    fn overrides_win() {
        let (dir, _, _, _) = repository_with_a_branch();
        let overrides = GitOverrides {
            branch: Some("release".to_string()),
            default_branch: Some("trunk".to_string()),
            commit: Some("f".repeat(40)),
        };
        let facts = GitFacts::discover(dir.path(), &overrides, &Environment::default()).unwrap();
        assert_eq!(facts.branch.as_deref(), Some("release"));
        assert_eq!(facts.default_branch, "trunk");
        assert_eq!(facts.commit, Some("f".repeat(40)));
        assert_eq!(facts.parent, None);
        assert!(facts.notes.iter().any(|note| note.contains("is not in this clone: no parent")), "{:?}", facts.notes);
    }

    #[test]
    fn a_given_commit_has_its_own_parent_and_merge_base() {
        let (dir, c2, c3, _) = repository_with_a_branch();
        let upper = c3[..12].to_uppercase();
        let overrides = GitOverrides { commit: Some(upper), ..Default::default() };
        let facts = GitFacts::discover(dir.path(), &overrides, &Environment::default()).unwrap();
        assert_eq!(facts.commit.as_deref(), Some(c3.as_str()), "abbreviated, upper case: expanded");
        assert_eq!(facts.parent.as_deref(), Some(c2.as_str()));
        assert_eq!(facts.merge_base.as_deref(), Some(c2.as_str()));
    }

    #[test]
    fn unusable_branches_and_commits_are_errors_that_name_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let discover = |overrides: GitOverrides, env: Environment| {
            GitFacts::discover(dir.path(), &overrides, &env).map_err(|error| error.to_string())
        };
        let branch = |value: &str| GitOverrides { branch: Some(value.to_string()), ..Default::default() };
        for bad in ["", "main ", "x\ntouch pwned\n", "-x", "a..b", "a b", "x:y", "refs/heads/", "HEAD", "a//b", ".x"] {
            let error = discover(branch(bad), Environment::default()).unwrap_err();
            assert!(error.contains("--branch"), "{bad:?}: {error}");
            assert!(!error.contains('\n') && !error.contains("touch pwned\n"), "{error}");
        }
        let env = Environment::from_pairs([("CI_DEFAULT_BRANCH", "ma in")]);
        assert!(discover(GitOverrides::default(), env).unwrap_err().contains("CI_DEFAULT_BRANCH"));
        let env = Environment::from_pairs([("GITHUB_HEAD_REF", "x\u{7}")]);
        assert!(discover(GitOverrides::default(), env).unwrap_err().contains("GITHUB_HEAD_REF"));
        for bad in ["xyz", "12", "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0", "$(id)"] {
            let overrides = GitOverrides { commit: Some(bad.to_string()), ..Default::default() };
            assert!(discover(overrides, Environment::default()).unwrap_err().contains("--commit"), "{bad}");
        }
    }

    #[test]
    fn refs_heads_is_removed_from_every_source() {
        let dir = tempfile::tempdir().unwrap();
        let overrides = GitOverrides {
            branch: Some("refs/heads/topic".into()),
            default_branch: Some("refs/heads/trunk".into()),
            ..Default::default()
        };
        let facts = GitFacts::discover(dir.path(), &overrides, &Environment::default()).unwrap();
        assert_eq!((facts.branch.as_deref(), facts.default_branch.as_str()), (Some("topic"), "trunk"));
        let env = Environment::from_pairs([("BUILDKITE_BRANCH", "refs/heads/topic")]);
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &env).unwrap();
        assert_eq!(facts.branch.as_deref(), Some("topic"));
    }

    proptest::proptest! {
        #[test]
        fn every_source_checks_a_branch_alike(value in proptest::prelude::any::<String>()) {
            let by_option = check_branch(&value, "--branch").ok();
            let by_variable = check_branch(&value, "GITHUB_HEAD_REF").ok();
            proptest::prop_assert_eq!(&by_option, &by_variable);
            if let Some(name) = by_option {
                proptest::prop_assert!(!name.is_empty() && !name.chars().any(|c| c.is_control() || c == ' '));
                let reference = format!("refs/heads/{}", name);
                proptest::prop_assert!(git2::Reference::is_valid_name(&reference));
            }
        }
    }

    #[test]
    fn outside_a_repository_nothing_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &Environment::default()).unwrap();
        assert_eq!((facts.branch, facts.commit), (None, None));
        assert_eq!(facts.default_branch, "main");
    }
}
