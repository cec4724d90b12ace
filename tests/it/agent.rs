//! The agent on real block devices: loop devices over sparse files (root only).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tool;

/// A loop device over a sparse file; detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path, bytes: u64) -> Option<Loop> {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(bytes))
            .expect("backing file");
        let out = Command::new("losetup")
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
            eprintln!(
                "skipping: loop devices need root ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn fleetwave(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetwave"))
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

#[test]
fn two_candidate_disks_without_a_selector_are_refused_and_a_selector_picks_one() {
    if !tool("mount", "/usr/sbin/losetup") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(small) = Loop::attach(&dir.path().join("a"), 64 << 20) else {
        return;
    };
    let Some(large) = Loop::attach(&dir.path().join("b"), 128 << 20) else {
        return;
    };
    // No selector: both (and any other disk here) fit, so nothing is chosen.
    let (code, out) = fleetwave(&["agent", "disk", "--need", "1000000"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&small.dev) && out.contains(&large.dev),
        "{out}"
    );
    assert!(out.contains("no disk selector"), "{out}");
    // A path, or a size range, picks exactly one.
    let (code, out) = fleetwave(&["agent", "disk", "--path", &large.dev]);
    assert_eq!((code, out.trim()), (0, large.dev.as_str()));
    let (code, out) = fleetwave(&["agent", "disk", "--size", "100M-200M"]);
    assert_eq!((code, out.trim()), (0, large.dev.as_str()), "{out}");
    // A disk smaller than the image is never picked, even when named.
    let need = (100u64 << 20).to_string();
    let (code, out) = fleetwave(&["agent", "disk", "--path", &small.dev, "--need", &need]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("smaller than the image"), "{out}");
}

#[test]
fn deploy_onto_a_block_device_and_verify_it() {
    if !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") || !tool("mount", "/usr/sbin/losetup") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(
        src.join("hello.txt"),
        "hello from the image\n".repeat(10_000),
    )
    .expect("write");
    let fs: PathBuf = dir.path().join("fs.img");
    std::fs::File::create(&fs)
        .and_then(|f| f.set_len(48 << 20))
        .expect("fs file");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&fs)
        .status();
    assert!(ok.is_ok_and(|s| s.success()));
    let Some(target) = Loop::attach(&dir.path().join("disk"), 64 << 20) else {
        return;
    };
    let store = dir.path().join("store");
    let store = store.to_str().expect("utf-8");
    let (code, out) = fleetwave(&[
        "agent",
        "capture",
        fs.to_str().expect("utf-8"),
        "--image",
        "t",
        "--store",
        store,
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = fleetwave(&["agent", "deploy", "t", &target.dev, "--store", store]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deployed and verified"), "{out}");
    let (code, out) = fleetwave(&["agent", "verify", "t", &target.dev, "--store", store]);
    assert_eq!(code, 0, "{out}");
    let fsck = Command::new("e2fsck")
        .args(["-fn", &target.dev])
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}
