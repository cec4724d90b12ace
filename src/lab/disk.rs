//! The lab's reference disk: a small system the project builds, bootable under
//! SeaBIOS, with both filesystems the capture reads by their own bitmaps.
//!
//! GPT: partition 1 ext4 (legacy-BIOS bootable) holding Debian's kernel, a small
//! initramfs and a busybox root; partition 2 NTFS with data files. Syslinux's
//! `gptmbr.bin` in the MBR, `extlinux` in partition 1. The initramfs loads the disk
//! and NIC drivers and ext4, mounts partition 1 read-only (so booting never changes a
//! disk that was verified) and switches to it; the root's `/sbin/init` asks DHCP for
//! its lease, prints the host name the server gave it (option 12) and
//! [`BOOT_MARKER`], and powers off.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{LabError, Result, io_at, run};

/// Printed by a machine booted from the reference disk, after its host name.
pub const BOOT_MARKER: &str = "booted from disk";

/// The whole disk; ext4 then NTFS to the end.
pub const DISK_BYTES: u64 = 64 << 20;
const EXT4_START: u64 = 1 << 20;
const EXT4_BYTES: u64 = 44 << 20;
const NTFS_START: u64 = EXT4_START + EXT4_BYTES;
/// Up to the backup GPT's 33 sectors, in whole sectors.
const NTFS_BYTES: u64 = DISK_BYTES - NTFS_START - 34 * 512;

/// Where Debian's syslinux-common and extlinux put what the disk needs.
pub const GPTMBR: &str = "/usr/lib/syslinux/mbr/gptmbr.bin";

/// The initramfs: drivers, then the root, read-only.
const INITRAMFS_INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do insmod "$m" 2>/dev/null; done
i=0; while [ ! -b /dev/sda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 -o ro /dev/sda1 /mnt; then
    echo "fleetwave-lab: cannot mount /dev/sda1 (the root); powering off"
    poweroff -f
fi
umount /proc /sys; mount --move /dev /mnt/dev
exec switch_root /mnt /sbin/init
"#;

/// The root's init: who am I (DHCP option 12), the marker, power off.
const ROOT_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t tmpfs tmpfs /tmp
ip link set lo up
NIC=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
MAC=$(cat /sys/class/net/$NIC/address 2>/dev/null)
ip link set "$NIC" up
udhcpc -i "$NIC" -f -q -n -t 8 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1
NAME=$(cat /tmp/hostname 2>/dev/null); IP=$(cat /tmp/ip 2>/dev/null)
echo "fleetwave-lab: ${NAME:-unnamed} booted from disk (mac $MAC, address ${IP:-none}, release $(cat /etc/lab-release))"
echo "fleetwave-lab: powering off"
sync; poweroff -f
"#;

const ROOT_UDHCPC: &str = r#"#!/bin/sh
case "$1" in
    bound|renew) echo "$ip" > /tmp/ip; [ -n "$hostname" ] && echo "$hostname" > /tmp/hostname ;;
esac
exit 0
"#;

/// Modules the disk's machines need: the lab's e1000 NIC and SATA disk, and ext4.
const MODULES: &[&str] = &["e1000", "ahci", "sd_mod", "ext4"];

/// Build the reference disk at `out` (a raw file of [`DISK_BYTES`]), with the kernel
/// from `cache`, working in `work`.
pub fn build(out: &Path, cache: &Path, work: &Path, log: &mut dyn Write) -> Result<()> {
    let system = crate::netboot::small_system(cache, MODULES, INITRAMFS_INIT, log)
        .map_err(|e| LabError::Failed(format!("the reference disk's kernel: {e}")))?;
    let root = work.join("refroot");
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(io_at(&root))?;
    }
    for d in [
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "mnt",
        "etc",
        "boot/extlinux",
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(io_at(&p))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| LabError::Missing("busybox (apt-get install busybox-static)".into()))?;
    copy(&busybox, &root.join("bin/busybox"))?;
    // The root is mounted read-only: its applets are linked here, not at boot.
    for applet in [
        "sh", "mount", "umount", "ip", "ls", "grep", "head", "cat", "udhcpc", "sync", "poweroff",
        "sleep",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .map_err(io_at(&root))?;
    }
    write_exec(&root.join("sbin/init"), ROOT_INIT)?;
    write_exec(&root.join("etc/udhcpc.script"), ROOT_UDHCPC)?;
    write(&root.join("etc/lab-release"), "1\n")?;
    copy(&system.vmlinuz, &root.join("boot/vmlinuz"))?;
    let initrd = root.join("boot/initrd.img");
    std::fs::write(&initrd, &system.initrd).map_err(io_at(&initrd))?;
    write(
        &root.join("boot/extlinux/extlinux.conf"),
        "SERIAL 0 115200\nDEFAULT lab\nTIMEOUT 0\nLABEL lab\n  LINUX /boot/vmlinuz\n  \
         INITRD /boot/initrd.img\n  APPEND console=ttyS0,115200 ro quiet panic=-1\n",
    )?;
    let _ = writeln!(
        log,
        "reference disk: kernel {}, initramfs {} bytes",
        system.kernel_version,
        system.initrd.len()
    );

    let tmp = out.with_extension("partial");
    let f = std::fs::File::create(&tmp).map_err(io_at(&tmp))?;
    f.set_len(DISK_BYTES).map_err(io_at(&tmp))?;
    drop(f);
    let sector = |b: u64| b / 512;
    run(Command::new("sgdisk")
        .arg(format!(
            "-n1:{}:{}",
            sector(EXT4_START),
            sector(EXT4_START + EXT4_BYTES) - 1
        ))
        .args(["-t1:8300", "-c1:lab-root", "-A1:set:2"])
        .arg(format!(
            "-n2:{}:{}",
            sector(NTFS_START),
            sector(NTFS_START + NTFS_BYTES) - 1
        ))
        .args(["-t2:0700", "-c2:lab-data"])
        .arg(&tmp))?;
    // The MBR's boot code (440 bytes), keeping the protective partition table.
    let mbr = std::fs::read(GPTMBR).map_err(io_at(Path::new(GPTMBR)))?;
    if mbr.len() < 440 {
        return Err(LabError::Failed(format!(
            "{GPTMBR} is {} bytes, not a boot sector: reinstall syslinux-common",
            mbr.len()
        )));
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        f.write_all_at(&mbr[..440], 0).map_err(io_at(&tmp))?;
    }

    // ext4 without 64bit and metadata_csum: extlinux 6.04 reads neither.
    let ext4 = Loop::attach(&tmp, EXT4_START, EXT4_BYTES)?;
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-O",
            "^64bit,^metadata_csum",
            "-L",
        ])
        .arg("lab-root")
        .arg("-d")
        .arg(&root)
        .arg(&ext4.dev))?;
    let mnt = work.join("refmnt");
    std::fs::create_dir_all(&mnt).map_err(io_at(&mnt))?;
    run(Command::new("mount").arg(&ext4.dev).arg(&mnt))?;
    let installed = run(Command::new("extlinux")
        .arg("--install")
        .arg(mnt.join("boot/extlinux")));
    let unmounted = run(Command::new("umount").arg(&mnt));
    installed?;
    unmounted?;
    drop(ext4);

    let ntfs = Loop::attach(&tmp, NTFS_START, NTFS_BYTES)?;
    run(Command::new("mkntfs")
        .args(["-q", "-F", "-Q", "-L", "lab-data", "-p"])
        .arg(sector(NTFS_START).to_string())
        .arg(&ntfs.dev))?;
    // Data in the NTFS partition, so its capture path moves real bytes.
    let data = work.join("data.bin");
    std::fs::write(&data, noise(3 << 20, 0x5eed)).map_err(io_at(&data))?;
    let text = work.join("readme.txt");
    std::fs::write(&text, "the lab's reference data partition\n".repeat(20_000))
        .map_err(io_at(&text))?;
    for (file, name) in [(&data, "data.bin"), (&text, "readme.txt")] {
        run(Command::new("ntfscp")
            .arg("-q")
            .arg(&ntfs.dev)
            .arg(file)
            .arg(name))?;
    }
    drop(ntfs);
    std::fs::rename(&tmp, out).map_err(io_at(out))?;
    Ok(())
}

/// Write `text` into the reference disk's NTFS partition as `name`: a change to the
/// reference, for a new capture generation.
pub fn put_data(disk: &Path, name: &str, bytes: &[u8], work: &Path) -> Result<()> {
    let file = work.join(format!("put-{name}"));
    std::fs::write(&file, bytes).map_err(io_at(&file))?;
    let ntfs = Loop::attach(disk, NTFS_START, NTFS_BYTES)?;
    run(Command::new("ntfscp")
        .arg("-q")
        .arg("-f")
        .arg(&ntfs.dev)
        .arg(&file)
        .arg(name))?;
    drop(ntfs);
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Repeatable noise (xorshift), so two builds of the disk hold the same data (and a
/// test's data reproduces).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map_err(io_at(from))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(io_at(path))
}

fn write_exec(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(io_at(path))
}

/// A loop device over a byte range of a file; detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path, offset: u64, bytes: u64) -> Result<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--offset"])
            .arg(offset.to_string())
            .arg("--sizelimit")
            .arg(bytes.to_string())
            .arg(file)
            .output()
            .map_err(io_at(Path::new("losetup")))?;
        if !out.status.success() {
            return Err(LabError::Failed(format!(
                "losetup {}: {} (the lab needs root and loop devices)",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}
