//! One integration-test binary; each module is one part of the data flow.

mod cli_exit;
mod fixtures;
mod git_review;
mod plan_props;
mod schema;
mod snapshots;
mod tftp;

use std::path::{Path, PathBuf};

/// A path inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}
