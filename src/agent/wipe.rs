//! Wiping a disk. The report lists exactly which byte ranges were overwritten, with
//! what, and which were read back and found as they should be; a range that does not
//! read back as zeros is an error, never a success.
//!
//! - fast: the partition tables and filesystem signatures at both ends of the disk and
//!   of every partition (the first and last MiB of each);
//! - normal: zeros over the whole disk;
//! - full: a pseudo-random pass (BLAKE3 keystream from a fresh seed), then zeros; the
//!   whole disk is read back after the zeros.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::image::disk::Disk;
use crate::image::{disk_size, layout};
use crate::spec::WipeMode;

#[derive(Debug, Clone, Serialize)]
pub struct Pass {
    /// `random` or `zeros`.
    pub kind: &'static str,
    pub ranges: Vec<(u64, u64)>,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WipeReport {
    pub mode: WipeMode,
    pub disk_bytes: u64,
    pub passes: Vec<Pass>,
    /// Bytes read back after the last pass and found to be zeros.
    pub verified_bytes: u64,
    /// `device` (direct I/O, past the page cache) or `page cache` (where the device or
    /// file does not allow direct I/O).
    pub read_back: &'static str,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(
        "{path}: byte {offset} still holds data after the wipe: the disk did not keep the writes"
    )]
    NotZero { path: String, offset: u64 },
}

const MIB: u64 = 1 << 20;
const BUF: usize = 4 << 20;

/// The ranges a fast wipe clears: both ends of the disk and of every partition.
fn fast_ranges(f: &File, disk_bytes: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut r = vec![(0, MIB), (disk_bytes.saturating_sub(MIB), MIB)];
    let l = layout::read(f, disk_bytes)?;
    for p in &l.partitions {
        r.push((p.start, MIB.min(p.bytes)));
        r.push(((p.start + p.bytes).saturating_sub(MIB), MIB.min(p.bytes)));
    }
    let r = r
        .into_iter()
        .map(|(s, n)| (s, n.min(disk_bytes.saturating_sub(s))))
        .collect();
    Ok(layout::normalize(r, disk_bytes))
}

/// Overwrite `ranges` with zeros, or with a keystream when `random`.
fn write_pass(f: &File, ranges: &[(u64, u64)], random: bool) -> io::Result<u64> {
    let mut buf = vec![0u8; BUF];
    let mut stream = if random {
        let mut seed = [0u8; 32];
        File::open("/dev/urandom")?.read_exact(&mut seed)?;
        Some(blake3::Hasher::new_keyed(&seed).finalize_xof())
    } else {
        None
    };
    let mut total = 0;
    for &(start, len) in ranges {
        let mut done = 0;
        while done < len {
            let n = ((len - done) as usize).min(BUF);
            if let Some(s) = stream.as_mut() {
                s.fill(&mut buf[..n]);
            }
            f.write_all_at(&buf[..n], start + done)?;
            done += n as u64;
        }
        total += len;
    }
    f.sync_all()?;
    Ok(total)
}

/// Read `ranges` back (from the device itself where it allows direct I/O); the offset
/// of the first non-zero byte, if any, and where the reads came from.
fn first_nonzero(path: &Path, ranges: &[(u64, u64)]) -> io::Result<(Option<u64>, &'static str)> {
    let disk = Disk::open(path, false)?;
    let mut found = None;
    for &(start, len) in ranges {
        disk.read_windows(start, len, BUF, |at, bytes| {
            found = bytes.iter().position(|&b| b != 0).map(|i| at + i as u64);
            Ok(found.is_none())
        })?;
        if found.is_some() {
            break;
        }
    }
    Ok((found, disk.read_back()))
}

/// Wipe the disk or image file at `path`.
pub fn wipe(path: &Path, mode: WipeMode) -> Result<WipeReport, WipeError> {
    let started = Instant::now();
    let p = path.display().to_string();
    let io = |source| WipeError::Io {
        path: p.clone(),
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let disk_bytes = disk_size(&f).map_err(io)?;
    let whole = vec![(0, disk_bytes)];
    let mut passes = Vec::new();
    let ranges = match mode {
        WipeMode::Fast => fast_ranges(&f, disk_bytes).map_err(io)?,
        WipeMode::Normal => whole,
        WipeMode::Full => {
            let bytes = write_pass(&f, &whole, true).map_err(io)?;
            passes.push(Pass {
                kind: "random",
                ranges: whole.clone(),
                bytes,
            });
            whole
        }
    };
    let bytes = write_pass(&f, &ranges, false).map_err(io)?;
    passes.push(Pass {
        kind: "zeros",
        ranges: ranges.clone(),
        bytes,
    });
    let (found, read_back) = first_nonzero(path, &ranges).map_err(io)?;
    if let Some(offset) = found {
        return Err(WipeError::NotZero { path: p, offset });
    }
    Ok(WipeReport {
        mode,
        disk_bytes,
        passes,
        verified_bytes: ranges.iter().map(|r| r.1).sum(),
        read_back,
        seconds: started.elapsed().as_secs_f64(),
    })
}
