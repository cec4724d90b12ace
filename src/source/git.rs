//! One commit of a git repository as a [`Tree`], so a fleet can be read as it was at
//! any revision without checking it out.

use std::path::{Path, PathBuf};

use git2::{ObjectType, Repository, TreeWalkMode, TreeWalkResult};

use super::{Tree, normalize_path};

/// libgit2's own words, without its error class and code.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open git repository {path}: {why}")]
    Open { path: String, why: String },
    #[error("no revision `{rev}` in {path}; {known}")]
    UnknownRev {
        rev: String,
        path: String,
        /// The branches there are, and what else may be named.
        known: String,
    },
    #[error("revision `{rev}` in {path}: {why}")]
    Rev {
        rev: String,
        path: String,
        why: String,
    },
}

/// The branches of `repo`, for a revision that names none of them.
fn known_revisions(repo: &Repository) -> String {
    let mut names: Vec<String> = repo
        .branches(None)
        .map(|branches| {
            branches
                .filter_map(|b| b.ok())
                .filter_map(|(b, _)| b.name().ok().flatten().map(str::to_owned))
                .filter(|n| !n.ends_with("/HEAD"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        return "it has no branches (no commit yet?)".into();
    }
    let more = names.len().saturating_sub(20);
    names.truncate(20);
    format!(
        "its branches: {}{}; name a branch, a tag or a commit",
        names.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// The files of one commit.
pub struct CommitTree {
    /// Every blob path in the commit with its object id, listed once so globs are cheap.
    files: Vec<(PathBuf, git2::Oid)>,
    repo: Repository,
    /// The commit id, for messages and reports.
    pub commit: String,
}

impl CommitTree {
    pub fn open(repo_path: &Path, rev: &str) -> Result<Self, GitError> {
        // From a subdirectory too, as `git` itself does.
        let path = || repo_path.display().to_string();
        let repo = Repository::discover(repo_path).map_err(|e| GitError::Open {
            path: path(),
            why: e.message().to_string(),
        })?;
        let (files, commit) = {
            let rev_error = |e: git2::Error| GitError::Rev {
                rev: rev.into(),
                path: path(),
                why: e.message().to_string(),
            };
            let object = repo.revparse_single(rev).map_err(|e| match e.code() {
                git2::ErrorCode::NotFound | git2::ErrorCode::InvalidSpec => GitError::UnknownRev {
                    rev: rev.into(),
                    path: path(),
                    known: known_revisions(&repo),
                },
                _ => rev_error(e),
            })?;
            let commit = object.peel_to_commit().map_err(rev_error)?;
            let tree = commit.tree().map_err(rev_error)?;
            let mut files = Vec::new();
            // A walk error can only come from a corrupt object; the files seen so far stay usable.
            let _ = tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
                if entry.kind() == Some(ObjectType::Blob)
                    && let Ok(name) = entry.name()
                {
                    files.push((Path::new(dir).join(name), entry.id()));
                }
                TreeWalkResult::Ok
            });
            files.sort();
            (files, commit.id().to_string())
        };
        Ok(CommitTree {
            files,
            repo,
            commit,
        })
    }
}

impl CommitTree {
    /// The repository the commit is in (to read its signature).
    pub fn repository(&self) -> &Repository {
        &self.repo
    }
}

impl Tree for CommitTree {
    fn read(&self, path: &Path) -> Result<String, String> {
        let key = normalize_path(path);
        let id = self
            .files
            .iter()
            .find(|(p, _)| *p == key)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                format!(
                    "{} does not exist in commit {}",
                    path.display(),
                    &self.commit[..12.min(self.commit.len())]
                )
            })?;
        let blob = self
            .repo
            .find_blob(id)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        String::from_utf8(blob.content().to_vec())
            .map_err(|_| format!("{} is not UTF-8 text", path.display()))
    }

    fn glob(&self, pattern: &str) -> Result<Vec<PathBuf>, String> {
        let normalized = normalize_path(Path::new(pattern));
        let pat = glob::Pattern::new(&normalized.to_string_lossy())
            .map_err(|e| format!("invalid glob pattern: {e}"))?;
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        Ok(self
            .files
            .iter()
            .filter(|(p, _)| pat.matches_path_with(p, options))
            .map(|(p, _)| p.clone())
            .collect())
    }
}
