//! The agent on real block devices: loop devices over sparse files (root only).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Loop, fleetwave, mkfs_ext4, tool};

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
    mkfs_ext4(&src, &fs, 48 << 20, &[]);
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
    let (code, out) = fleetwave(&[
        "agent",
        "deploy",
        "t",
        &target.dev,
        "--store",
        store,
        "--json",
    ]);
    assert_eq!(code, 0, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    // Written and read back with direct I/O: the read-back read the device.
    assert_eq!(r["deploy"]["read_back"], "device", "{out}");
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
    // Verify reads the disk, not the kernel's cache of it: with the device's page cache
    // full, bytes changed beneath it (in the loop device's backing file) are found.
    // (The cache lives while someone holds the device open.)
    let _held = std::fs::File::open(&target.dev).expect("open the device");
    let cat = Command::new("dd")
        .args([
            &format!("if={}", target.dev),
            "of=/dev/null",
            "bs=1M",
            "status=none",
        ])
        .status();
    assert!(cat.is_ok_and(|s| s.success()));
    let backing = dir.path().join("disk");
    let bytes = std::fs::read(&backing).expect("read backing file");
    let at = bytes
        .windows(20)
        .position(|w| w == b"hello from the image")
        .expect("the file's text on the disk");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .expect("open backing file");
    std::os::unix::fs::FileExt::write_all_at(&f, b"HELLO", at as u64).expect("write");
    let (code, out) = fleetwave(&["agent", "verify", "t", &target.dev, "--store", store]);
    assert_eq!(code, 1, "{out}");
}

/// A 32 MiB GPT disk file with an ext4 partition.
fn gpt_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("w.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(32 << 20))
        .expect("disk");
    let ok = Command::new("sgdisk")
        .args(["-o", "-n1:2048:0", "-t1:8300"])
        .arg(&disk)
        .output()
        .expect("sgdisk");
    assert!(ok.status.success());
    let part = dir.join("p.img");
    std::fs::File::create(&part)
        .and_then(|f| f.set_len(20 << 20))
        .expect("part");
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&part)
            .status()
            .is_ok_and(|s| s.success())
    );
    let ok = Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=512", "seek=2048", "conv=notrunc", "status=none"])
        .status();
    assert!(ok.is_ok_and(|s| s.success()));
    disk
}

#[test]
fn wipes_leave_no_table_no_signature_and_say_what_they_did() {
    if !tool("gdisk", "/usr/sbin/sgdisk") || !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = gpt_disk(dir.path());
    let d = disk.to_str().expect("utf-8");
    // Without --yes nothing happens.
    let (code, out) = fleetwave(&["agent", "wipe", d, "--mode", "fast"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--yes"), "{out}");
    let signatures = || {
        let o = Command::new("wipefs").arg(&disk).output().expect("wipefs");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert!(signatures().contains("gpt"), "{}", signatures());

    let (code, out) = fleetwave(&["agent", "wipe", d, "--mode", "fast", "--yes", "--json"]);
    assert_eq!(code, 0, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(r["passes"][0]["kind"], "zeros");
    // Both ends of the disk and of the partition: 0-2 MiB and about the last MiB.
    let n = r["verified_bytes"].as_u64().expect("n");
    assert!((3 << 20..4 << 20).contains(&n), "{n}");
    assert!(
        signatures().trim().is_empty(),
        "signatures left: {}",
        signatures()
    );
    // The ext4 superblock at the partition's start is gone too.
    let f = std::fs::read(&disk).expect("read");
    assert!(f[(2048 * 512)..(2048 * 512 + 4096)].iter().all(|&b| b == 0));

    let disk = gpt_disk(dir.path());
    let (code, out) = fleetwave(&["agent", "wipe", d, "--mode", "full", "--yes", "--json"]);
    assert_eq!(code, 0, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(r["passes"][0]["kind"], "random");
    assert_eq!(r["passes"][1]["kind"], "zeros");
    assert_eq!(r["verified_bytes"], 32 << 20);
    assert!(std::fs::read(&disk).expect("read").iter().all(|&b| b == 0));

    let disk = gpt_disk(dir.path());
    let (code, out) = fleetwave(&["agent", "wipe", d, "--mode", "normal", "--yes"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("all zeros"), "{out}");
    assert!(std::fs::read(&disk).expect("read").iter().all(|&b| b == 0));
}
