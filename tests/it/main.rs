//! One integration-test binary; each module is one part of the data flow.

mod agent;
mod api;
mod cli_exit;
mod console;
mod controller;
mod dhcp;
mod fixtures;
mod git_review;
mod http;
mod image;
mod lab;
mod multicast;
mod netboot;
mod netlab;
mod package;
mod plan_props;
mod schema;
mod security;
mod service;
mod snapshots;
mod tftp;
mod tls;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    skipped(format!(
        "{name} is not installed ({path}); apt-get install {name}"
    ));
    false
}

/// What this run skipped: test and why.
static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Note that the calling test skipped all or part of its work (callers fail instead
/// under CI=true). Passing tests' output is hidden, so the list is printed again when
/// the test binary exits, after the results: a partial run does not pass for a full one.
pub fn skipped(why: String) {
    eprintln!("skipping: {why}");
    // libtest names each test's thread after the test.
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let mut list = SKIPPED.lock().unwrap_or_else(|p| p.into_inner());
    if list.is_empty() {
        // SAFETY: registers a plain function, once; it only locks and writes.
        unsafe { libc::atexit(print_skipped) };
    }
    list.push(format!("{test}: {why}"));
}

/// At exit: written to the descriptor itself, past libtest's output capture.
extern "C" fn print_skipped() {
    let list = SKIPPED.lock().unwrap_or_else(|p| p.into_inner());
    let mut text = format!(
        "\nNOT A FULL RUN: {} test{} skipped work (CI=true makes that a failure):\n",
        list.len(),
        if list.len() == 1 { "" } else { "s" }
    );
    for line in list.iter() {
        text.push_str(&format!("  skipped {line}\n"));
    }
    let _ = std::io::stderr().write_all(text.as_bytes());
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

/// The validated spec of a fleet text (the test's own, so it must be valid).
pub fn spec_of(text: &str) -> fleetwave::spec::FleetSpec {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fleet.yaml");
    std::fs::write(&path, text).expect("write");
    match fleetwave::cli::load(&fleetwave::source::DirTree, &path).expect("load") {
        Ok((spec, _)) => spec,
        Err(_) => panic!("the test fleet is invalid"),
    }
}

/// An ext4 filesystem image of `bytes` at `img`, filled from `src`, made by mkfs.ext4
/// with `args` (e.g. `-b 4096`).
pub fn mkfs_ext4(src: &Path, img: &Path, bytes: u64, args: &[&str]) {
    std::fs::File::create(img)
        .and_then(|f| f.set_len(bytes))
        .expect("image file");
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .args(args)
        .arg("-d")
        .arg(src)
        .arg(img)
        .status();
    assert!(ok.is_ok_and(|s| s.success()), "mkfs.ext4 failed");
}

/// Deterministic pseudo-random bytes, so a failure reproduces.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    fleetwave::lab::disk::noise(n, seed)
}

/// A loop device over a sparse file of `bytes`; detached on drop. `None` (a skip)
/// without root, which under CI=true is a failure instead.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn attach(file: &Path, bytes: u64) -> Option<Loop> {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(bytes))
            .expect("backing file");
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "losetup failed under CI: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            skipped(format!(
                "loop devices need root ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Some(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}
