//! Disk images: capture a disk into the content-addressed store, deploy a version back
//! onto a disk, verify a disk against a version.
//!
//! A disk becomes a *data stream*: the bytes of its used blocks (filesystem bitmaps,
//! see [`layout`]) that are not all zeros, in disk order. The stream is cut into
//! content-defined chunks (FastCDC), so an edit moves few chunk boundaries and a
//! recapture stores only what changed. The manifest maps the stream back onto the disk.

pub(crate) mod disk;
pub mod gpt;
pub mod growfs;
pub mod layout;
pub mod loopdev;
pub mod manifest;
pub mod remote;
pub mod store;

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use serde::Serialize;

use crate::spec::Digest;
use layout::BLOCK;
use manifest::{ChunkRef, Chunker, Manifest, PartitionTable};
pub use store::Repo;
use store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "target {path} holds {have} bytes but the image needs {need}: choose a larger disk \
         (a smaller one cannot hold it)"
    )]
    TooSmall { path: PathBuf, have: u64, need: u64 },
    #[error(
        "{path} holds {have} bytes, fewer than the {need} of image {digest}: it cannot hold \
         this image (check the disk's path; a file target may have been cut short)"
    )]
    SmallerThanImage {
        path: PathBuf,
        digest: Digest,
        have: u64,
        need: u64,
    },
    #[error(
        "no disk {path}: `fleetwave agent disk` lists this machine's disks (a file target is \
         created, but never under /dev)"
    )]
    NoDevice { path: PathBuf },
    #[error(
        "verification failed on {path}: {bad} of {total} chunks differ from image {digest} \
         (first at disk offset {first_offset}); the disk does NOT hold this image"
    )]
    Verify {
        path: PathBuf,
        digest: Digest,
        bad: usize,
        total: usize,
        first_offset: u64,
    },
}

type Result<T> = std::result::Result<T, ImageError>;

fn io_err(path: &Path) -> impl Fn(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Start writing `f`'s dirty pages to the disk without waiting: a later fsync then
/// mostly waits for writes already under way.
fn start_writeback(f: &File) {
    // SAFETY: a valid descriptor owned by `f`; the call takes no pointers.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// The size of a disk or disk image file.
pub fn disk_size(mut f: &File) -> io::Result<u64> {
    let meta = f.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // A block device reports its size by seeking to its end.
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Progress of a capture or deploy, read by whoever reports it (a progress bar, the
/// server's progress endpoint).
#[derive(Debug, Default)]
pub struct Meter {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Meter {
    fn add(m: Option<&Meter>, n: u64) {
        if let Some(m) = m {
            m.done.fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// zstd level (1-19) for chunks that compress, or `store::CHUNK_LEVEL`
    /// (docs/benchmarks.md compares them).
    pub level: i32,
    pub threads: usize,
    pub meter: Option<Arc<Meter>>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            level: store::CHUNK_LEVEL,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            meter: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CaptureReport {
    pub digest: Digest,
    pub disk_bytes: u64,
    /// Bytes the filesystems use (what was read).
    pub used_bytes: u64,
    /// Non-zero bytes among them (the data stream).
    pub data_bytes: u64,
    pub chunks: usize,
    /// Chunks the store did not have, their data bytes, and their compressed bytes:
    /// what crossed to it.
    pub new_chunks: usize,
    pub new_data_bytes: u64,
    pub new_stored_bytes: u64,
    /// Compressed bytes of all the version's chunks.
    pub stored_bytes: u64,
    pub seconds: f64,
}

/// Where the data stream's bytes sit on the disk, filled in while the stream is read.
#[derive(Default)]
struct Extents {
    data: Vec<(u64, u64)>,
    zeros: Vec<(u64, u64)>,
}

fn push_run(v: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    match v.last_mut() {
        Some(last) if last.0 + last.1 == off => last.1 += len,
        _ => v.push((off, len)),
    }
}

/// Reads the non-zero used blocks of a disk, in order, as one stream.
struct UsedData {
    file: File,
    runs: Vec<(u64, u64)>,
    run: usize,
    pos: u64,
    buf: Vec<u8>,
    buf_start: usize,
    buf_end: usize,
    extents: Arc<Mutex<Extents>>,
    meter: Option<Arc<Meter>>,
}

const READ_SIZE: usize = 4 << 20;
/// Chunks a capture worker takes at once (one missing-chunk query for all).
const BATCH: usize = 16;
static ZERO: [u8; BLOCK as usize] = [0; BLOCK as usize];

impl UsedData {
    /// Fill `buf` with the next non-zero blocks.
    fn refill(&mut self) -> io::Result<()> {
        self.buf_start = 0;
        self.buf_end = 0;
        while self.buf_end == 0 {
            let Some(&(start, len)) = self.runs.get(self.run) else {
                return Ok(());
            };
            let end = start + len;
            if self.pos < start {
                self.pos = start;
            }
            if self.pos >= end {
                self.run += 1;
                continue;
            }
            let n = ((end - self.pos) as usize).min(READ_SIZE);
            let mut raw = vec![0u8; n];
            self.file.read_exact_at(&mut raw, self.pos)?;
            let mut ext = self.extents.lock().unwrap_or_else(|p| p.into_inner());
            for (i, block) in raw.chunks(BLOCK as usize).enumerate() {
                let off = self.pos + (i as u64) * BLOCK;
                if block == &ZERO[..block.len()] {
                    push_run(&mut ext.zeros, off, block.len() as u64);
                } else {
                    push_run(&mut ext.data, off, block.len() as u64);
                    self.buf[self.buf_end..self.buf_end + block.len()].copy_from_slice(block);
                    self.buf_end += block.len();
                }
            }
            self.pos += n as u64;
            Meter::add(self.meter.as_deref(), n as u64);
        }
        Ok(())
    }
}

impl Read for UsedData {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.buf_start == self.buf_end {
            self.refill()?;
            if self.buf_end == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf_end - self.buf_start);
        out[..n].copy_from_slice(&self.buf[self.buf_start..self.buf_start + n]);
        self.buf_start += n;
        Ok(n)
    }
}

/// Capture the disk (or image file) at `disk` into `store`; with `name`, record the
/// version under that image with `generation`.
pub fn capture(
    disk: &Path,
    repo: &dyn Repo,
    name: Option<(&str, u64)>,
    opts: CaptureOptions,
) -> Result<CaptureReport> {
    let started = Instant::now();
    if let Some((n, _)) = name
        && !store::valid_name(n)
    {
        return Err(StoreError::BadName(n.into()).into());
    }
    let file = File::open(disk).map_err(io_err(disk))?;
    let disk_bytes = disk_size(&file).map_err(io_err(disk))?;
    let layout = layout::read(&file, disk_bytes).map_err(io_err(disk))?;
    let raw_len = match layout.table {
        layout::TableKind::Gpt => layout.sector * 34,
        layout::TableKind::Mbr => 512,
        layout::TableKind::None => 0,
    }
    .min(disk_bytes);
    let mut raw = vec![0u8; raw_len as usize];
    file.read_exact_at(&mut raw, 0).map_err(io_err(disk))?;
    let used_bytes = layout.used.iter().map(|r| r.1).sum();

    let extents = Arc::new(Mutex::new(Extents::default()));
    let reader = UsedData {
        file: file.try_clone().map_err(io_err(disk))?,
        runs: layout.used.clone(),
        run: 0,
        pos: 0,
        buf: vec![0u8; READ_SIZE],
        buf_start: 0,
        buf_end: 0,
        extents: extents.clone(),
        meter: opts.meter.clone(),
    };
    if let Some(m) = &opts.meter {
        m.total.store(used_bytes, Ordering::Relaxed);
    }
    let chunker = Chunker::current();
    let cdc = fastcdc::v2020::StreamCDC::new(
        reader,
        chunker.min as usize,
        chunker.avg as usize,
        chunker.max as usize,
    );

    // Workers hash, ask the repository, compress and store; the chunker runs here.
    let threads = opts.threads.max(1);
    let (tx, rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(threads * 2);
    let rx = Mutex::new(rx);
    // Per chunk index: its hash, length, and whether this capture stored it.
    type Done = Option<(Digest, u32, bool)>;
    let results: Mutex<Vec<Done>> = Mutex::default();
    let first_error: Mutex<Option<StoreError>> = Mutex::default();
    let new_stored = AtomicU64::new(0);
    let claimed: Mutex<HashSet<Digest>> = Mutex::default();
    let level = opts.level;
    let mut count = 0;
    let mut read_error = None;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    // Up to BATCH chunks at once, so a remote repository is asked
                    // about them in one round trip.
                    let batch: Vec<(usize, Vec<u8>)> = {
                        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                        let Ok(first) = rx.recv() else { break };
                        std::iter::once(first)
                            .chain(std::iter::from_fn(|| rx.try_recv().ok()).take(BATCH - 1))
                            .collect()
                    };
                    let digests: Vec<Digest> = batch
                        .iter()
                        .map(|(_, data)| Digest(*blake3::hash(data).as_bytes()))
                        .collect();
                    let lacking = repo.lacks_many(&digests).unwrap_or_else(|e| {
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        vec![false; digests.len()]
                    });
                    for (((i, data), d), lacks) in batch.into_iter().zip(digests).zip(lacking) {
                        let fresh =
                            lacks && claimed.lock().unwrap_or_else(|p| p.into_inner()).insert(d);
                        if fresh {
                            let r = store::compress_chunk(&data, level)
                                .map_err(|source| StoreError::Io {
                                    path: PathBuf::from(d.to_string()),
                                    source,
                                })
                                .and_then(|c| repo.put_chunk(&d, &c));
                            match r {
                                Ok(n) => {
                                    new_stored.fetch_add(n, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    first_error
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .get_or_insert(e);
                                }
                            }
                        }
                        let mut res = results.lock().unwrap_or_else(|p| p.into_inner());
                        if res.len() <= i {
                            res.resize(i + 1, None);
                        }
                        res[i] = Some((d, data.len() as u32, fresh));
                    }
                }
            });
        }
        for chunk in cdc {
            match chunk {
                Ok(c) => {
                    if tx.send((count, c.data)).is_err() {
                        break;
                    }
                    count += 1;
                }
                Err(e) => {
                    read_error = Some(io::Error::other(e.to_string()));
                    break;
                }
            }
        }
        drop(tx);
    });
    if let Some(e) = read_error {
        return Err(ImageError::Io {
            path: disk.to_owned(),
            source: e,
        });
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.into());
    }
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut chunks = Vec::with_capacity(count);
    let mut new_chunks = 0;
    let mut new_data_bytes = 0;
    for r in results.into_iter().take(count) {
        let Some((hash, len, fresh)) = r else {
            return Err(ImageError::Io {
                path: disk.to_owned(),
                source: io::Error::other("a chunk was lost between threads"),
            });
        };
        new_chunks += usize::from(fresh);
        if fresh {
            new_data_bytes += u64::from(len);
        }
        chunks.push(ChunkRef { hash, len });
    }
    let ext = std::mem::take(&mut *extents.lock().unwrap_or_else(|p| p.into_inner()));
    let data_bytes = chunks.iter().map(|c| u64::from(c.len)).sum();
    let manifest = Manifest {
        format: 1,
        disk_bytes,
        chunker,
        partition_table: PartitionTable {
            kind: layout.table,
            sector: layout.sector,
            partitions: layout.partitions.clone(),
            raw: raw.iter().map(|b| format!("{b:02x}")).collect(),
        },
        extents: ext.data,
        zero_extents: ext.zeros,
        chunks,
        data_bytes,
    };
    let (digest, stored_bytes) = repo.commit(&manifest, name)?;
    Ok(CaptureReport {
        digest,
        disk_bytes,
        used_bytes,
        data_bytes,
        chunks: manifest.chunks.len(),
        new_chunks,
        new_data_bytes,
        new_stored_bytes: new_stored.into_inner(),
        stored_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

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
fn each_chunk(count: usize, threads: usize, work: impl Fn(usize) -> bool + Sync) {
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
fn nonzero_windows(
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

/// Read every chunk of `m` back from `file` and compare hashes; zero extents must be
/// zeros. Err unless all match.
fn check(
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
