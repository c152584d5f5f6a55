//! Git facts the tag scheme needs: branch, HEAD, HEAD^1, and the merge-base with the default branch.
//!
//! Read with `git2`. Detached HEAD (as CI checks out) takes the branch from the CI's variables;
//! a shallow clone or a missing default branch drops what cannot be known, with a note saying why.

use std::path::Path;

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
    pub fn discover(dir: &Path, overrides: &GitOverrides, env: &Environment) -> GitFacts {
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

        facts.branch = overrides.branch.clone();
        facts.branch_source = facts.branch.as_ref().map(|_| "--branch".to_string());
        if facts.branch.is_none() {
            if let Some((branch, variable)) = branch_from_ci(env) {
                facts.branch = Some(branch);
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

        facts.default_branch = overrides
            .default_branch
            .clone()
            .or_else(|| default_branch_from_ci(env))
            .or_else(|| repository.as_ref().and_then(default_branch_from_git))
            .unwrap_or_else(|| "main".to_string());

        let Some(repository) = repository else {
            facts.commit = overrides.commit.clone();
            return facts;
        };
        let head = repository.head().ok().and_then(|head| head.peel_to_commit().ok());
        facts.commit = overrides.commit.clone().or_else(|| head.as_ref().map(|commit| commit.id().to_string()));
        if let Some(head) = &head {
            facts.parent = head.parent_ids().next().map(|id| id.to_string());
            if facts.parent.is_none() {
                let why = if repository.is_shallow() { "the clone is shallow" } else { "HEAD is the first commit" };
                facts.notes.push(format!("no parent commit: {why}"));
            }
        } else {
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
        facts
    }
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
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &Environment::default());
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
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &Environment::default());
        assert!(facts.on_default_branch());
        assert_eq!(facts.commit.as_deref(), Some(c2.as_str()));
        assert_eq!(facts.merge_base, None);
    }

    #[test]
    fn a_detached_head_takes_the_branch_from_the_ci() {
        let (dir, c2, _, c4) = repository_with_a_branch();
        git(dir.path(), &["checkout", "-q", "--detach", "HEAD"]);
        let env = Environment::from_pairs([("GITHUB_ACTIONS", "true"), ("GITHUB_HEAD_REF", "feature/login")]);
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &env);
        assert_eq!(facts.branch.as_deref(), Some("feature/login"));
        assert_eq!(facts.branch_source.as_deref(), Some("GITHUB_HEAD_REF"));
        assert_eq!(facts.commit.as_deref(), Some(c4.as_str()));
        assert_eq!(facts.merge_base.as_deref(), Some(c2.as_str()));

        let without_ci = GitFacts::discover(dir.path(), &GitOverrides::default(), &Environment::default());
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
        let facts = GitFacts::discover(&shallow, &GitOverrides::default(), &Environment::default());
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
        let facts = GitFacts::discover(dir.path(), &overrides, &Environment::default());
        assert_eq!(facts.branch.as_deref(), Some("release"));
        assert_eq!(facts.default_branch, "trunk");
        assert_eq!(facts.commit, Some("f".repeat(40)));
        assert!(facts.notes.iter().any(|note| note.contains("`trunk` is not in this clone")), "{:?}", facts.notes);
    }

    #[test]
    fn outside_a_repository_nothing_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let facts = GitFacts::discover(dir.path(), &GitOverrides::default(), &Environment::default());
        assert_eq!((facts.branch, facts.commit), (None, None));
        assert_eq!(facts.default_branch, "main");
    }
}
