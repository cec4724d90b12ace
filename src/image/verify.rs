//! Verify: a disk read back and compared with a version, chunk by chunk.

use std::io;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use super::deploy::{each_chunk, nonzero_windows};
use super::manifest::Manifest;
use super::store::Repo;
use super::*;
use crate::spec::Digest;

/// Read every chunk of `m` back from `file` and compare hashes; zero extents must be
/// zeros. Err unless all match.
pub(super) fn check(
    disk: &disk::Disk,
    m: &Manifest,
    digest: &Digest,
    path: &Path,
    threads: usize,
    meter: Option<&Meter>,
) -> Result<()> {
    let report = compare(disk, m, threads, meter).map_err(io_err(path))?;
    match report.first_bad {
        None => Ok(()),
        Some(first_offset) => Err(ImageError::Verify {
            path: path.to_owned(),
            digest: *digest,
            bad: report.bad,
            total: m.chunks.len() + m.zero_extents.len(),
            first_offset,
        }),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub digest: Digest,
    /// Chunks (and zero extents) that differ from the version.
    pub bad: usize,
    pub checked: usize,
    /// Disk offset of the first difference.
    pub first_bad: Option<u64>,
}

fn compare(
    disk: &disk::Disk,
    m: &Manifest,
    threads: usize,
    meter: Option<&Meter>,
) -> io::Result<VerifyReport> {
    let places = placements(m);
    let bad: Mutex<Vec<u64>> = Mutex::default();
    let failed: Mutex<Option<io::Error>> = Mutex::default();
    each_chunk(m.chunks.len(), threads, |i| {
        Meter::add(meter, u64::from(m.chunks[i].len));
        match disk.hash_pieces(&places[i]) {
            Ok(h) if h == m.chunks[i].hash => true,
            Ok(_) => {
                bad.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(places[i].first().map_or(0, |p| p.0));
                true
            }
            Err(e) => {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                false
            }
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    for &(off, len) in &m.zero_extents {
        // The first non-zero window of an extent is the one reported.
        nonzero_windows(disk, off, len, |at, _| {
            bad.push(at);
            Ok(false)
        })?;
    }
    bad.sort_unstable();
    Ok(VerifyReport {
        digest: Digest([0; 32]),
        bad: bad.len(),
        checked: m.chunks.len() + m.zero_extents.len(),
        first_bad: bad.first().copied(),
    })
}

/// Whether the disk at `path` still holds version `digest` (drift check).
pub fn verify(
    repo: &dyn Repo,
    digest: &Digest,
    path: &Path,
    threads: usize,
) -> Result<VerifyReport> {
    verify_manifest(&repo.manifest(digest)?, digest, path, threads)
}

/// [`verify`] against a manifest the caller already has.
pub fn verify_manifest(
    m: &Manifest,
    digest: &Digest,
    path: &Path,
    threads: usize,
) -> Result<VerifyReport> {
    let disk = disk::Disk::open(path, false).map_err(io_err(path))?;
    // Reading past its end would fail as "failed to fill whole buffer".
    if disk.size() < m.disk_bytes {
        return Err(ImageError::SmallerThanImage {
            path: path.to_owned(),
            digest: *digest,
            have: disk.size(),
            need: m.disk_bytes,
        });
    }
    let mut r = compare(&disk, m, threads, None).map_err(io_err(path))?;
    r.digest = *digest;
    Ok(r)
}
