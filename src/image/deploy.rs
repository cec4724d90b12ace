//! Deploy: a version's chunks written in parallel onto a disk, zero runs filled,
//! the partition table fixed for a larger disk, then everything read back.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::manifest::Manifest;
use super::store::Repo;
use super::verify::check;
use super::*;
use crate::spec::Digest;

/// Where each chunk's bytes go: (disk offset, length) pieces.
pub fn placements(m: &Manifest) -> Vec<Vec<(u64, u64)>> {
    let mut out = Vec::with_capacity(m.chunks.len());
    let mut ext = m.extents.iter().copied();
    let mut cur = ext.next();
    for c in &m.chunks {
        let mut need = u64::from(c.len);
        let mut pieces = Vec::new();
        while need > 0 {
            let Some((off, len)) = cur else { break };
            let take = need.min(len);
            pieces.push((off, take));
            need -= take;
            cur = if take == len {
                ext.next()
            } else {
                // Saturating: only checked manifests are deployed, but this must not
                // overflow on any input.
                Some((off.saturating_add(take), len - take))
            };
        }
        out.push(pieces);
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    /// The version the disk now holds, read back and checked chunk by chunk.
    pub verified: Digest,
    pub disk_bytes: u64,
    pub target_bytes: u64,
    pub chunks: usize,
    /// Chunks written now; the rest were already on the disk (a resumed deploy).
    pub chunks_written: usize,
    pub bytes_written: u64,
    /// Set when the partition table was fixed for a larger disk.
    pub grown: Option<gpt::Grown>,
    /// Where the read-back read from: `device` (direct I/O), or `page cache` where
    /// the target's filesystem refuses direct I/O.
    pub read_back: &'static str,
    pub seconds: f64,
}

/// A deploy's progress, kept beside a file target so an interrupted deploy resumes.
fn journal_path(target: &Path) -> PathBuf {
    let mut p = target.as_os_str().to_owned();
    p.push(".fleetwave-deploy");
    PathBuf::from(p)
}

/// Write version `digest` from `store` onto `target`, fix the partition table for a
/// larger disk, then read everything back and check it. Only a disk that passed the
/// read-back is reported; anything else is an error.
pub fn deploy(
    repo: &dyn Repo,
    digest: &Digest,
    target: &Path,
    threads: usize,
) -> Result<DeployReport> {
    let m = repo.manifest(digest)?;
    deploy_metered(repo, digest, &m, target, threads, None)
}

/// [`deploy`] of the manifest `m` of version `digest` (as `repo.manifest` returned
/// it), counting bytes written and then read back in `meter`.
pub fn deploy_metered(
    repo: &dyn Repo,
    digest: &Digest,
    m: &Manifest,
    target: &Path,
    threads: usize,
    meter: Option<&Meter>,
) -> Result<DeployReport> {
    let t = Target::open(digest, m, target)?;
    let have = t.present(m, threads);
    t.finish(repo, digest, m, &have, threads, meter)
}

/// A deploy's target, opened and checked against the manifest: the unicast deploy
/// writes all of it, a multicast receiver first writes what the session brings.
pub struct Target {
    /// The target; its size is at least the image's.
    disk: disk::Disk,
    pub path: PathBuf,
    is_file: bool,
    /// An earlier deploy of this version was interrupted: chunks may be there already.
    resume: bool,
    started: Instant,
    /// Bytes written since writeback was last started.
    unflushed: AtomicU64,
}

/// Dirty data a target may gather before its writeback is started. Without it the
/// kernel holds gigabytes until the final fsync, which then pays for all of it at once.
const WRITEBACK_EVERY: u64 = 32 << 20;

impl Target {
    /// Open `target` for version `digest`: a file of size 0 is sized to the image, a
    /// smaller disk is refused, and a journal beside a file target records the
    /// version so an interrupted deploy resumes.
    pub fn open(digest: &Digest, m: &Manifest, target: &Path) -> Result<Target> {
        let started = Instant::now();
        let mut disk = match disk::Disk::open(target, true) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A missing file target is made here, empty, and sized below (sparse).
                // Under /dev a missing name is a missing disk: a file there would fill memory.
                if target.starts_with("/dev") {
                    return Err(ImageError::NoDevice {
                        path: target.to_owned(),
                    });
                }
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(target)
                    .map_err(io_err(target))?;
                disk::Disk::open(target, true).map_err(io_err(target))?
            }
            r => r.map_err(io_err(target))?,
        };
        let is_file = disk.file().metadata().is_ok_and(|x| x.is_file());
        if is_file && disk.size() == 0 {
            disk.set_len(m.disk_bytes).map_err(io_err(target))?;
        }
        let bytes = disk.size();
        if bytes < m.disk_bytes {
            return Err(ImageError::TooSmall {
                path: target.to_owned(),
                have: bytes,
                need: m.disk_bytes,
            });
        }
        let journal = journal_path(target);
        let resume = is_file
            && std::fs::read_to_string(&journal)
                .map(|s| s.trim() == digest.to_string())
                .unwrap_or(false);
        if is_file {
            std::fs::write(&journal, digest.to_string()).map_err(io_err(&journal))?;
        }
        Ok(Target {
            disk,
            path: target.to_owned(),
            is_file,
            resume,
            started,
            unflushed: AtomicU64::new(0),
        })
    }

    /// Which of `m`'s chunks the target holds already, checked by hash; all false
    /// unless an earlier deploy of this version was interrupted.
    pub fn present(&self, m: &Manifest, threads: usize) -> Vec<bool> {
        if !self.resume {
            return vec![false; m.chunks.len()];
        }
        let places = placements(m);
        let found: Vec<std::sync::atomic::AtomicBool> = (0..m.chunks.len())
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect();
        each_chunk(m.chunks.len(), threads, |i| {
            if self
                .disk
                .hash_pieces(&places[i])
                .is_ok_and(|h| h == m.chunks[i].hash)
            {
                found[i].store(true, Ordering::Relaxed);
            }
            true
        });
        found.into_iter().map(|b| b.into_inner()).collect()
    }

    /// Write a chunk's (checked) data at each of its places.
    pub fn place(&self, pieces: &[(u64, u64)], data: &[u8]) -> Result<()> {
        let cached = self
            .disk
            .write_pieces(pieces, data)
            .map_err(io_err(&self.path))?;
        let before = self.unflushed.fetch_add(cached, Ordering::Relaxed);
        if before + cached >= WRITEBACK_EVERY
            && self
                .unflushed
                .compare_exchange(before + cached, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // Start writing back what is dirty so far; fsync at the end still waits for all.
            start_writeback(self.disk.file());
        }
        Ok(())
    }

    /// Fetch from `repo` and write every chunk not marked in `have`, zero what the
    /// image holds as zeros, read everything back and check it, then fix the
    /// partition table for a larger disk. Only a disk that passed the read-back is
    /// reported; anything else is an error.
    pub fn finish(
        self,
        repo: &dyn Repo,
        digest: &Digest,
        m: &Manifest,
        have: &[bool],
        threads: usize,
        meter: Option<&Meter>,
    ) -> Result<DeployReport> {
        if let Some(mt) = meter {
            let already: u64 = m
                .chunks
                .iter()
                .zip(have)
                .filter(|(_, h)| **h)
                .map(|(c, _)| u64::from(c.len))
                .sum();
            mt.total.store(2 * m.data_bytes, Ordering::Relaxed);
            mt.done.store(already, Ordering::Relaxed);
        }
        let places = placements(m);
        let written = AtomicUsize::new(0);
        let bytes = AtomicU64::new(0);
        let error: Mutex<Option<ImageError>> = Mutex::default();
        each_chunk(m.chunks.len(), threads, |i| {
            if error.lock().map(|e| e.is_some()).unwrap_or(true) {
                return false;
            }
            if have.get(i).copied().unwrap_or(false) {
                return true;
            }
            let c = m.chunks[i];
            let r = repo
                .chunk(&c.hash, c.len as usize)
                .map_err(ImageError::from)
                .and_then(|data| self.place(&places[i], &data));
            match r {
                Ok(()) => {
                    written.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(u64::from(c.len), Ordering::Relaxed);
                    Meter::add(meter, u64::from(c.len));
                }
                Err(e) => {
                    error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                }
            }
            true
        });
        if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let Target {
            disk,
            path,
            is_file,
            started,
            ..
        } = self;
        let target_bytes = disk.size();
        let target = path.as_path();
        // Zeros the image holds: holes in a sparse file stay holes; anything else is zeroed.
        let file = disk.file();
        zero_fill(&disk, &m.zero_extents).map_err(io_err(target))?;
        file.sync_all().map_err(io_err(target))?;
        // The read-back covers what the image holds; growing then changes the partition
        // table on purpose, and checks its own CRCs.
        check(&disk, m, digest, target, threads, meter)?;
        let mut grown = None;
        if target_bytes > m.disk_bytes && m.partition_table.kind == layout::TableKind::Gpt {
            grown = gpt::grow(file, target_bytes).map_err(io_err(target))?;
            file.sync_all().map_err(io_err(target))?;
            if let Some(g) = grown.as_mut() {
                let fs = m
                    .partition_table
                    .partitions
                    .iter()
                    .find(|p| p.number == g.partition)
                    .map_or(layout::Fs::Other, |p| p.fs);
                g.filesystem = Some(
                    growfs::grow(target, g.start, g.new_bytes, fs)
                        .unwrap_or_else(|why| format!("not grown: {why}")),
                );
            }
        }
        if is_file {
            let _ = std::fs::remove_file(journal_path(target));
        }
        Ok(DeployReport {
            verified: *digest,
            disk_bytes: m.disk_bytes,
            target_bytes,
            chunks: m.chunks.len(),
            chunks_written: written.into_inner(),
            bytes_written: bytes.into_inner(),
            grown,
            read_back: disk.read_back(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// `work(i)` for every chunk index below `count`, on `threads` threads that each take
/// the next index; a thread stops early when `work` returns false.
pub(super) fn each_chunk(count: usize, threads: usize, work: impl Fn(usize) -> bool + Sync) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || !work(i) {
                        break;
                    }
                }
            });
        }
    });
}

fn zero_fill(disk: &disk::Disk, zeros: &[(u64, u64)]) -> io::Result<()> {
    let zero = vec![0u8; NONZERO_WINDOW];
    for &(off, len) in zeros {
        nonzero_windows(disk, off, len, |at, n| {
            disk.file().write_all_at(&zero[..n], at)?;
            Ok(true)
        })?;
    }
    Ok(())
}

const NONZERO_WINDOW: usize = 1 << 20;

/// Call `f(offset, length)` for each window (up to 1 MiB) of `off..off + len` that holds
/// a non-zero byte, skipping the holes of a sparse file; `f` returning false stops.
pub(super) fn nonzero_windows(
    disk: &disk::Disk,
    off: u64,
    len: u64,
    mut f: impl FnMut(u64, usize) -> io::Result<bool>,
) -> io::Result<()> {
    for (off, len) in allocated(disk.file(), off, len) {
        let mut go = true;
        disk.read_windows(off, len, NONZERO_WINDOW, |at, bytes| {
            if bytes.iter().any(|&b| b != 0) {
                go = f(at, bytes.len())?;
            }
            Ok(go)
        })?;
        if !go {
            break;
        }
    }
    Ok(())
}

/// The parts of `off..off + len` that may hold data: holes of a sparse file read as
/// zeros and need not be read. Where the file cannot tell (a block device), all of it.
fn allocated(file: &File, off: u64, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let end = off + len;
    let mut out = Vec::new();
    let mut at = off;
    while at < end {
        // SAFETY: lseek on a descriptor `file` owns; no pointers are passed.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let gone = io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            if !gone {
                // No hole support here: treat the rest as data.
                out.push((at, end - at));
            }
            break;
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data, hole - data));
        at = hole;
    }
    out
}
