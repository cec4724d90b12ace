//! Growing the filesystem of a partition that was just grown, with the filesystem's
//! own tool (resize2fs, ntfsresize) through a loop device over the partition's bytes:
//! the same path for a disk image file and for a block device.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::layout::Fs;
use super::loopdev::PartitionLoop;

fn run(cmd: &mut Command, input: Option<&str>) -> Result<(), String> {
    let name = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name}: {e}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{name}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed: {}", last_line(&out)))
    }
}

/// The line of a tool's output most likely to say why it failed.
fn last_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let msg = String::from_utf8_lossy(&out.stdout);
    err.trim()
        .lines()
        .chain(msg.trim().lines())
        .last()
        .unwrap_or("")
        .to_string()
}

/// Grow the `fs` filesystem in `[start, start+bytes)` of `target` to fill it. Says
/// what was done, or why nothing was.
pub fn grow(target: &Path, start: u64, bytes: u64, fs: Fs) -> Result<String, String> {
    let tool = match fs {
        Fs::Ext4 => "resize2fs",
        Fs::Ntfs => "ntfsresize",
        _ => return Err("no tool to grow this filesystem".into()),
    };
    let lo = PartitionLoop::attach(target, start, bytes, false)?;
    let dev = lo.dev.as_str();
    let result = match fs {
        Fs::Ext4 => {
            // resize2fs wants a freshly checked filesystem; -p: repair nothing silently.
            // Its output is captured: stdout may be a `--json` report.
            let check = Command::new("e2fsck")
                .args(["-f", "-p", dev])
                .stdin(Stdio::null())
                .output();
            match check {
                Ok(o) if o.status.code().is_some_and(|c| c <= 1) => {
                    run(Command::new("resize2fs").arg(dev), None)
                }
                Ok(o) => Err(format!(
                    "e2fsck found problems ({}): {}; not resized",
                    o.status,
                    last_line(&o)
                )),
                Err(e) => Err(format!("e2fsck: {e}")),
            }
        }
        _ => run(
            Command::new("ntfsresize").args(["-f", "-P", dev]),
            Some("y\n"),
        ),
    };
    drop(lo);
    result.map(|()| format!("{tool} grew the filesystem to the partition's {bytes} bytes"))
}
