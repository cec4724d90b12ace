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

/// Run the real binary; its exit code and everything it printed.
pub fn fleetwave(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetwave"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The lab's site, as every test fleet declares it.
pub const LAB_SITE: &str = "version: 1
sites:
  lab:
    interface: eth0
    server: 172.28.0.1
    subnet: 172.28.0.0/24
    dhcp: {mode: authoritative, pool: 172.28.0.100-172.28.0.199, router: 172.28.0.1, lease: 1h}
";
