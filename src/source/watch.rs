//! Where the server's fleet comes from, and bringing it up to date: a git branch
//! (fetched into a bare cache repository with git2) or a directory (for development).

use std::path::{Path, PathBuf};

use git2::{FetchOptions, Repository};

/// The fleet's origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A git repository: a URL (`file://`, `https://`, `ssh://`) or a local path; the
    /// branch to follow and the fleet file inside it.
    Git {
        url: String,
        branch: String,
        path: PathBuf,
    },
    /// A fleet file, or a directory holding `fleet.yaml`, read as it is on disk.
    Dir(PathBuf),
}

impl Origin {
    pub fn describe(&self) -> String {
        match self {
            Origin::Git { url, branch, path } => {
                format!("{url} branch {branch}, {}", path.display())
            }
            Origin::Dir(p) => p.display().to_string(),
        }
    }
}

/// Fetch `branch` of `url` into the bare repository `cache` (made if missing) and
/// return the commit it points at. Errors say what to check.
pub fn fetch(url: &str, branch: &str, cache: &Path) -> Result<String, String> {
    let repo = match Repository::open_bare(cache) {
        Ok(r) => r,
        Err(_) => Repository::init_bare(cache).map_err(|e| {
            format!(
                "cannot create the source cache {}: {}",
                cache.display(),
                e.message()
            )
        })?,
    };
    let mut remote = repo
        .remote_anonymous(url)
        .map_err(|e| format!("source {url}: {}", e.message()))?;
    let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
    let mut opts = FetchOptions::new();
    opts.download_tags(git2::AutotagOption::None);
    remote
        .fetch(&[refspec.as_str()], Some(&mut opts), None)
        .map_err(|e| {
            format!(
                "cannot fetch branch {branch} of {url}: {}; check the URL, the branch and \
                 the server's access to it",
                e.message()
            )
        })?;
    let id = repo
        .refname_to_id(&format!("refs/remotes/origin/{branch}"))
        .map_err(|_| format!("{url} has no branch {branch}"))?;
    Ok(id.to_string())
}
