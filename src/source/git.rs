//! One commit of a git repository as a [`Tree`], so a fleet can be read as it was at
//! any revision without checking it out.

use std::path::{Path, PathBuf};

use git2::{ObjectType, Repository, TreeWalkMode, TreeWalkResult};

use super::{Tree, normalize_path};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open git repository {path}")]
    Open { path: String, source: git2::Error },
    #[error("cannot resolve revision `{rev}` in {path}")]
    Rev {
        rev: String,
        path: String,
        source: git2::Error,
    },
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
        let repo = Repository::discover(repo_path).map_err(|source| GitError::Open {
            path: repo_path.display().to_string(),
            source,
        })?;
        let (files, commit) = {
            let object = repo.revparse_single(rev).map_err(|source| GitError::Rev {
                rev: rev.into(),
                path: repo_path.display().to_string(),
                source,
            })?;
            let commit = object.peel_to_commit().map_err(|source| GitError::Rev {
                rev: rev.into(),
                path: repo_path.display().to_string(),
                source,
            })?;
            let tree = commit.tree().map_err(|source| GitError::Rev {
                rev: rev.into(),
                path: repo_path.display().to_string(),
                source,
            })?;
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
