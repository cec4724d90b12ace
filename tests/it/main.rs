//! One integration-test binary; each module is one part of the data flow.

mod agent;
mod api;
mod cli_exit;
mod dhcp;
mod fixtures;
mod git_review;
mod http;
mod image;
mod netlab;
mod plan_props;
mod schema;
mod snapshots;
mod tftp;

use std::path::{Path, PathBuf};

/// A path inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The client, or a skip (a failure under CI=true, where it must be installed).
pub fn tool(name: &str, path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{name} ({path}) is missing; .ci/run installs it");
    }
    eprintln!("skipping: {name} is not installed ({path}); apt-get install {name}");
    false
}
