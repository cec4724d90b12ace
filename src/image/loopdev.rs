//! A loop device over part of a disk: how partclone reads one partition and how a
//! filesystem tool grows one, for a disk image file and a block device alike.

use std::path::Path;
use std::process::{Command, Stdio};

/// A loop device over one partition's bytes of a disk image file or block device,
/// detached when dropped. Needs root.
pub struct PartitionLoop {
    pub dev: String,
}

impl PartitionLoop {
    pub fn attach(
        disk: &Path,
        start: u64,
        bytes: u64,
        read_only: bool,
    ) -> Result<PartitionLoop, String> {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if read_only {
            cmd.arg("--read-only");
        }
        let out = cmd
            .arg("--offset")
            .arg(start.to_string())
            .arg("--sizelimit")
            .arg(bytes.to_string())
            .arg(disk)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "no loop device for the partition: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(PartitionLoop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for PartitionLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .args(["-d", &self.dev])
            .stdout(Stdio::null())
            .status();
    }
}
