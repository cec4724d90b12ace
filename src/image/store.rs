//! The content-addressed image store (default `/images`):
//!
//! ```text
//! chunks/ab/ab12...ef.zst    one chunk, zstd-compressed, named by the BLAKE3 of its data
//! manifests/ab12...ef.json   one image version, named by the BLAKE3 of these bytes
//! images/NAME.json           an image's versions, oldest first
//! tmp/                       writes in progress
//! ```
//!
//! Every write goes to `tmp/`, is fsynced, renamed into place and its directory
//! fsynced: a crash leaves either the old state or the new one, never half a file.
//! Chunks are made durable in batches (one `syncfs` for many files, before any of them
//! is renamed into place): a chunk file under its name has always reached the disk.
//! Chunks and manifests are re-hashed on every read; a mismatch is an error, never
//! data.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use crate::spec::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} holds no image store (no manifests/ or images/ there): check --store; \
         `fleetwave agent capture` creates one"
    )]
    NoStore { path: PathBuf },
    #[error("server {url}: {why}")]
    Server { url: String, why: String },
    #[error("chunk {0} is not in the store")]
    MissingChunk(Digest),
    #[error(
        "chunk {digest} is corrupt in the store ({path}): its content hashes to {actual}; \
         run `fleetwave image verify` and recapture the images that use it"
    )]
    CorruptChunk {
        digest: Digest,
        actual: Digest,
        path: PathBuf,
    },
    #[error("image version {0} is not in the store; `fleetwave image ls` lists what is")]
    MissingManifest(Digest),
    #[error("manifest {digest} is corrupt ({path}): {why}")]
    CorruptManifest {
        digest: Digest,
        path: PathBuf,
        why: String,
    },
    #[error("no image named {0:?} in the store; `fleetwave image ls` lists the images")]
    UnknownImage(String),
    #[error("image name {0:?}: use letters, digits, `-`, `_` and `.`, not starting with `.`")]
    BadName(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// An image version as the image's record lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub digest: Digest,
    /// The capture generation that produced it.
    pub generation: u64,
    /// Unix seconds.
    pub captured_at: u64,
    pub disk_bytes: u64,
    /// Compressed bytes of its chunks (shared chunks counted in full).
    pub stored_bytes: u64,
    /// Who made it: the capture task, its commit and signer, the source host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made_by: Option<MadeBy>,
}

/// Where a captured version came from, as the server that committed it knew.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadeBy {
    /// The capture task's id.
    pub task: u64,
    /// The host captured, and its MAC.
    pub host: Option<String>,
    pub mac: String,
    /// The commit that asked for the capture, and who signed it.
    pub commit: Option<String>,
    pub signer: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub versions: Vec<VersionRecord>,
}

pub struct Store {
    root: PathBuf,
    pending: Mutex<Pending>,
    /// Held through a flush, so that a commit's flush also waits for one under way.
    flushing: Mutex<()>,
}

/// Chunks written to `tmp/` and not yet durable: they count as present (a capture
/// need not send them again) and become visible under their names at the next flush,
/// which every commit does first.
#[derive(Default)]
struct Pending {
    /// Each file stays open until flushed: a write-back error is reported to the
    /// descriptors open when it happened, and only once.
    files: Vec<(File, PathBuf, Digest)>,
    names: HashSet<Digest>,
    bytes: u64,
    /// A flush renamed chunks into place and then failed to sync: until a sync
    /// succeeds they may not be on disk, so no commit may rely on them.
    unsynced: bool,
}

/// Pending bytes or files that trigger a flush: a fsync per chunk cost a 2 GiB capture
/// a quarter of its time; one `syncfs` per this much costs little. The file count bounds
/// the descriptors held open.
const FLUSH_BYTES: u64 = 128 << 20;
const FLUSH_FILES: usize = 256;

/// Files in `tmp/` older than this are left from a crash; `gc` removes them.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

/// Names temp files uniquely within this process, across every `Store` handle.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn hex(d: &Digest) -> String {
    d.to_string()
        .strip_prefix("blake3:")
        .unwrap_or_default()
        .to_string()
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Store {
    /// Open (creating the directories of) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        for d in ["chunks", "manifests", "images", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|source| StoreError::Io { path: p, source })?;
        }
        Ok(Store {
            root: root.to_owned(),
            pending: Mutex::default(),
            flushing: Mutex::default(),
        })
    }

    /// Open the store at `root` without creating anything: commands that read (or
    /// only remove) must not leave an empty store behind a mistyped path.
    pub fn open_existing(root: &Path) -> Result<Store> {
        if !["manifests", "images"]
            .iter()
            .all(|d| root.join(d).is_dir())
        {
            return Err(StoreError::NoStore {
                path: root.to_owned(),
            });
        }
        // A real store: open() only puts back a `tmp/` or `chunks/` someone removed.
        Store::open(root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io<T>(&self, path: &Path, r: io::Result<T>) -> Result<T> {
        r.map_err(|source| StoreError::Io {
            path: path.to_owned(),
            source,
        })
    }

    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        let h = hex(d);
        self.root
            .join("chunks")
            .join(&h[..2])
            .join(format!("{h}.zst"))
    }

    fn manifest_path(&self, d: &Digest) -> PathBuf {
        self.root.join("manifests").join(format!("{}.json", hex(d)))
    }

    fn image_path(&self, name: &str) -> PathBuf {
        self.root.join("images").join(format!("{name}.json"))
    }

    pub fn has_chunk(&self, d: &Digest) -> bool {
        if self.pending().names.contains(d) {
            return true;
        }
        self.chunk_path(d).is_file()
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tmp_path(&self) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// Write `bytes` at `dest` atomically: temp file, fsync, rename, fsync directory.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.tmp_path();
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            if let Some(dir) = dest.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::rename(&tmp, dest)?;
            if let Some(dir) = dest.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        self.io(dest, r)
    }

    /// Store one chunk's compressed bytes; `data_hash` must be the BLAKE3 of the data
    /// they decompress to (callers hash before compressing). Returns the stored size.
    /// It is visible under its name after the next [`Store::flush`].
    pub fn put_chunk(&self, data_hash: &Digest, compressed: &[u8]) -> Result<u64> {
        let len = compressed.len() as u64;
        if self.has_chunk(data_hash) {
            return Ok(len);
        }
        let tmp = self.tmp_path();
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(compressed)?;
            // Now, so that the flush mostly waits for writes under way.
            super::start_writeback(&f);
            Ok(f)
        });
        let file = match written {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return self.io(&tmp, Err(e));
            }
        };
        let full = {
            let mut p = self.pending();
            if p.names.insert(*data_hash) {
                p.files.push((file, tmp, *data_hash));
                p.bytes += len;
            } else {
                // Another thread wrote the same chunk meanwhile.
                let _ = fs::remove_file(&tmp);
            }
            p.bytes >= FLUSH_BYTES || p.files.len() >= FLUSH_FILES
        };
        if full {
            self.flush()?;
        }
        Ok(len)
    }

    /// Make every pending chunk durable, then visible under its name. A chunk that
    /// cannot be shown to be on disk is dropped (a commit naming it then fails as
    /// incomplete, and the capture sends it again) and the error returned.
    pub fn flush(&self) -> Result<()> {
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let (files, unsynced) = {
            let mut p = self.pending();
            p.bytes = 0;
            (std::mem::take(&mut p.files), p.unsynced)
        };
        if files.is_empty() && !unsynced {
            return Ok(());
        }
        let tmp_dir = self.root.join("tmp");
        let mut synced_names = false;
        let r = (|| {
            let dir = File::open(&tmp_dir)?;
            // One sync writes everything; each file's fdatasync then costs little and
            // reports that file's write-back error, which syncfs may already have
            // reported to someone else.
            syncfs(&dir)?;
            let mut made = HashSet::new();
            let mut failed = None;
            for (file, tmp, d) in &files {
                let placed = file.sync_data().and_then(|()| {
                    let dest = self.chunk_path(d);
                    if let Some(parent) = dest.parent()
                        && made.insert(parent.to_owned())
                    {
                        fs::create_dir_all(parent)?;
                    }
                    fs::rename(tmp, &dest)
                });
                if let Err(e) = placed {
                    failed.get_or_insert(e);
                }
            }
            // The renames, and any shard directory made above.
            syncfs(&dir)?;
            synced_names = true;
            failed.map_or(Ok(()), Err)
        })();
        let mut p = self.pending();
        for (_, tmp, d) in &files {
            p.names.remove(d);
            // Not renamed into place: a chunk that was is no longer at `tmp`.
            let _ = fs::remove_file(tmp);
        }
        p.unsynced = !synced_names;
        drop(p);
        self.io(&tmp_dir, r)
    }

    /// The compressed bytes of a chunk, as stored (not checked: see [`Store::chunk`]).
    pub fn chunk_raw(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.chunk_path(d);
        match fs::read(&p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::MissingChunk(*d)),
            Err(source) => Err(StoreError::Io { path: p, source }),
        }
    }

    /// A chunk's data, decompressed and checked against its name.
    pub fn chunk(&self, d: &Digest, len: usize) -> Result<Vec<u8>> {
        let raw = self.chunk_raw(d)?;
        let path = self.chunk_path(d);
        let data = decompress(&raw, len).map_err(|_| StoreError::CorruptChunk {
            digest: *d,
            actual: Digest([0; 32]),
            path: path.clone(),
        })?;
        let actual = Digest(*blake3::hash(&data).as_bytes());
        if actual != *d {
            return Err(StoreError::CorruptChunk {
                digest: *d,
                actual,
                path,
            });
        }
        Ok(data)
    }

    /// Store a manifest; returns its digest.
    pub fn put_manifest(&self, m: &Manifest) -> Result<Digest> {
        let bytes = m.to_bytes();
        let d = Manifest::digest_of(&bytes);
        let dest = self.manifest_path(&d);
        if !dest.is_file() {
            self.write_atomic(&dest, &bytes)?;
        }
        Ok(d)
    }

    /// A manifest, checked against its digest.
    pub fn manifest(&self, d: &Digest) -> Result<Manifest> {
        let p = self.manifest_path(d);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingManifest(*d));
            }
            Err(source) => return Err(StoreError::Io { path: p, source }),
        };
        let corrupt = |why: String| StoreError::CorruptManifest {
            digest: *d,
            path: p.clone(),
            why,
        };
        if Manifest::digest_of(&bytes) != *d {
            return Err(corrupt("its content does not hash to its name".into()));
        }
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        m.check().map_err(corrupt)?;
        Ok(m)
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>> {
        if !valid_name(name) {
            return Err(StoreError::BadName(name.into()));
        }
        let p = self.image_path(name);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::Io {
                    path: p,
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path: p, source }),
        }
    }

    /// Append a version to an image's record.
    pub fn add_version(&self, name: &str, v: VersionRecord) -> Result<()> {
        let mut rec = self.image(name)?.unwrap_or_default();
        rec.versions.retain(|x| x.digest != v.digest);
        rec.versions.push(v);
        let bytes = serde_json::to_vec_pretty(&rec).unwrap_or_default();
        self.write_atomic(&self.image_path(name), &bytes)
    }

    /// Every image and its record, by name.
    pub fn images(&self) -> Result<BTreeMap<String, ImageRecord>> {
        let dir = self.root.join("images");
        let mut out = BTreeMap::new();
        for e in self.io(&dir, fs::read_dir(&dir))? {
            let e = self.io(&dir, e)?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_suffix(".json")
                && let Some(r) = self.image(n)?
            {
                out.insert(n.to_string(), r);
            }
        }
        Ok(out)
    }

    /// Resolve `name`, `name@latest`, `name@blake3:...` or a bare digest.
    pub fn resolve(&self, spec: &str) -> Result<Digest> {
        if let Ok(d) = spec.parse::<Digest>() {
            return Ok(d);
        }
        let (name, which) = spec.split_once('@').unwrap_or((spec, "latest"));
        let rec = self
            .image(name)?
            .ok_or_else(|| StoreError::UnknownImage(name.into()))?;
        if which == "latest" {
            return rec
                .versions
                .last()
                .map(|v| v.digest)
                .ok_or_else(|| StoreError::UnknownImage(name.into()));
        }
        let want: Digest = which
            .parse()
            .map_err(|_| StoreError::UnknownImage(spec.into()))?;
        rec.versions
            .iter()
            .find(|v| v.digest == want)
            .map(|v| v.digest)
            .ok_or(StoreError::MissingManifest(want))
    }

    /// Remove a version from an image (the whole image when `digest` is `None`).
    /// Chunks stay until [`Store::gc`].
    pub fn remove(&self, name: &str, digest: Option<Digest>) -> Result<usize> {
        let mut rec = self
            .image(name)?
            .ok_or_else(|| StoreError::UnknownImage(name.into()))?;
        let before = rec.versions.len();
        match digest {
            Some(d) => rec.versions.retain(|v| v.digest != d),
            None => rec.versions.clear(),
        }
        let removed = before - rec.versions.len();
        let path = self.image_path(name);
        if rec.versions.is_empty() {
            self.io(&path, fs::remove_file(&path))?;
        } else {
            let bytes = serde_json::to_vec_pretty(&rec).unwrap_or_default();
            self.write_atomic(&path, &bytes)?;
        }
        Ok(removed)
    }

    /// Delete manifests no image lists and chunks no remaining manifest uses.
    /// Returns (manifests, chunks, bytes) removed.
    pub fn gc(&self) -> Result<(usize, usize, u64)> {
        // Pending chunks stay in tmp/ (a capture under way will commit them).
        self.remove_stale_tmp()?;
        let keep: BTreeSet<Digest> = self
            .images()?
            .values()
            .flat_map(|r| r.versions.iter().map(|v| v.digest))
            .collect();
        let mut live = BTreeSet::new();
        let mut removed_manifests = 0;
        let mdir = self.root.join("manifests");
        for e in self.io(&mdir, fs::read_dir(&mdir))? {
            let e = self.io(&mdir, e)?;
            let name = e.file_name().to_string_lossy().to_string();
            let Some(d) = name
                .strip_suffix(".json")
                .and_then(|h| format!("blake3:{h}").parse::<Digest>().ok())
            else {
                continue;
            };
            if keep.contains(&d) {
                let m = self.manifest(&d)?;
                live.extend(m.chunks.iter().map(|c| c.hash));
            } else {
                self.io(&e.path(), fs::remove_file(e.path()))?;
                removed_manifests += 1;
            }
        }
        let (mut chunks, mut bytes) = (0, 0);
        let cdir = self.root.join("chunks");
        for sub in self.io(&cdir, fs::read_dir(&cdir))? {
            let sub = self.io(&cdir, sub)?.path();
            for e in self.io(&sub, fs::read_dir(&sub))? {
                let e = self.io(&sub, e)?;
                let name = e.file_name().to_string_lossy().to_string();
                let Some(d) = name
                    .strip_suffix(".zst")
                    .and_then(|h| format!("blake3:{h}").parse::<Digest>().ok())
                else {
                    continue;
                };
                if !live.contains(&d) {
                    bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                    self.io(&e.path(), fs::remove_file(e.path()))?;
                    chunks += 1;
                }
            }
        }
        Ok((removed_manifests, chunks, bytes))
    }

    /// Remove files a crash left in `tmp/`: older than a day, and written by a process
    /// that is gone (a server keeps chunks pending while a capture is under way).
    fn remove_stale_tmp(&self) -> Result<()> {
        let dir = self.root.join("tmp");
        let now = SystemTime::now();
        for e in self.io(&dir, fs::read_dir(&dir))? {
            let e = self.io(&dir, e)?;
            let name = e.file_name();
            let writer_alive = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let old = !writer_alive
                && e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > STALE_TMP);
            if old {
                self.io(&e.path(), fs::remove_file(e.path()))?;
            }
        }
        Ok(())
    }

    /// Stored (compressed) size of a set of chunks.
    pub fn stored_size<'a>(&self, chunks: impl IntoIterator<Item = &'a Digest>) -> u64 {
        let mut seen = BTreeSet::new();
        chunks
            .into_iter()
            .filter(|d| seen.insert(**d))
            .map(|d| {
                fs::metadata(self.chunk_path(d))
                    .map(|m| m.len())
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// Where chunks and manifests live: this machine's store, or the server's over HTTP
/// (`remote::Remote`). Capture, deploy and verify work against either.
pub trait Repo: Sync {
    /// Whether the repository lacks this chunk (so a capture must send it).
    fn lacks(&self, d: &Digest) -> Result<bool>;
    /// [`Repo::lacks`] for many chunks at once (one round trip for a remote one).
    fn lacks_many(&self, ds: &[Digest]) -> Result<Vec<bool>> {
        ds.iter().map(|d| self.lacks(d)).collect()
    }
    /// Store a chunk's compressed bytes; returns the bytes stored.
    fn put_chunk(&self, d: &Digest, compressed: &[u8]) -> Result<u64>;
    /// A chunk's data, checked against its name.
    fn chunk(&self, d: &Digest, len: usize) -> Result<Vec<u8>>;
    fn manifest(&self, d: &Digest) -> Result<Manifest>;
    /// Store a manifest whose chunks are all present and, with `image`, record it as
    /// that image's newest version. Returns its digest and stored size.
    fn commit(&self, m: &Manifest, image: Option<(&str, u64)>) -> Result<(Digest, u64)>;
}

impl Repo for Store {
    fn lacks(&self, d: &Digest) -> Result<bool> {
        Ok(!self.has_chunk(d))
    }
    fn put_chunk(&self, d: &Digest, compressed: &[u8]) -> Result<u64> {
        Store::put_chunk(self, d, compressed)
    }
    fn chunk(&self, d: &Digest, len: usize) -> Result<Vec<u8>> {
        Store::chunk(self, d, len)
    }
    fn manifest(&self, d: &Digest) -> Result<Manifest> {
        Store::manifest(self, d)
    }
    fn commit(&self, m: &Manifest, image: Option<(&str, u64)>) -> Result<(Digest, u64)> {
        self.commit_made_by(m, image, None)
    }
}

impl Store {
    /// [`Repo::commit`], recording who made the version in the same write.
    pub fn commit_made_by(
        &self,
        m: &Manifest,
        image: Option<(&str, u64)>,
        made_by: Option<MadeBy>,
    ) -> Result<(Digest, u64)> {
        // After the flush every chunk the capture was told is present is on disk under
        // its name; one still pending (another capture's, newer) does not count.
        self.flush()?;
        if let Some(missing) = m
            .chunks
            .iter()
            .find(|c| !self.chunk_path(&c.hash).is_file())
        {
            return Err(StoreError::MissingChunk(missing.hash));
        }
        let digest = self.put_manifest(m)?;
        let stored = self.stored_size(m.chunks.iter().map(|c| &c.hash));
        if let Some((name, generation)) = image {
            self.add_version(
                name,
                VersionRecord {
                    digest,
                    generation,
                    captured_at: crate::state::now(),
                    disk_bytes: m.disk_bytes,
                    stored_bytes: stored,
                    made_by,
                },
            )?;
        }
        Ok((digest, stored))
    }
}

impl Drop for Store {
    /// Chunks written but not committed are kept: a capture run again need not send them.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: a valid descriptor owned by `f`; the call takes no pointers.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How a chunk is compressed: one of zstd's levels, or lazy2 over hash tables sized for
/// 512 KiB with one search step (docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Params {
    Level(i32),
    Lazy2,
}

/// The level that stands for fleetwave's own parameters (zstd reads 0 as "default").
pub const CHUNK_LEVEL: i32 = 0;

/// A compressor for `params`, kept per thread: a fresh context per chunk costs
/// megabytes mapped and unmapped each time.
fn with_compressor<T>(
    params: Params,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> io::Result<T>,
) -> io::Result<T> {
    thread_local! {
        static CCTX: std::cell::RefCell<Vec<(Params, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    CCTX.with(|cell| {
        let mut ctxs = cell.borrow_mut();
        let i = match ctxs.iter().position(|(p, _)| *p == params) {
            Some(i) => i,
            None => {
                ctxs.push((params, compressor(params)?));
                ctxs.len() - 1
            }
        };
        f(&mut ctxs[i].1)
    })
}

fn compressor(params: Params) -> io::Result<zstd::bulk::Compressor<'static>> {
    use zstd::zstd_safe::{CParameter as P, Strategy};
    if let Params::Level(level) = params {
        return zstd::bulk::Compressor::new(level);
    }
    let mut c = zstd::bulk::Compressor::new(6)?;
    for p in [
        P::Strategy(Strategy::ZSTD_lazy2),
        P::WindowLog(21),
        P::HashLog(18),
        P::ChainLog(18),
        P::SearchLog(1),
        P::MinMatch(5),
    ] {
        c.set_parameter(p)?;
    }
    Ok(c)
}

/// Compress at a zstd level, with this thread's context for it.
pub fn compress(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    with_compressor(Params::Level(level), |c| c.compress(data))
}

/// Compress a chunk, spending effort only where it can pay: a chunk whose first 64 KiB
/// do not shrink at level 1 (random, already compressed or encrypted data) is stored
/// at level 1, which costs little and stores it nearly raw.
///
/// At `CHUNK_LEVEL` the rest is compressed with lazy2, which finds the repeats of text
/// made of words (2.5 % smaller than level 3 there, what compressing a chunk alone
/// loses against one long stream). On text with few repeats lazy2 takes matches that
/// cost more than the letters they replace (1.2 % larger than level 3) and level 1 does
/// better; so where lazy2 does not beat the level-1 probe's ratio by 5 % (on word text
/// it beats it by 17-24 %), the chunk is compressed at level 1 too and the smaller kept.
pub fn compress_chunk(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    const PROBE: usize = 64 * 1024;
    let mut probe_len = None;
    if level != 1 && data.len() > PROBE {
        let probe = compress(&data[..PROBE], 1)?.len();
        if probe * 100 >= PROBE * 98 {
            return compress(data, 1);
        }
        probe_len = Some(probe);
    }
    if level != CHUNK_LEVEL {
        return compress(data, level);
    }
    let lazy2 = with_compressor(Params::Lazy2, |c| c.compress(data))?;
    // lazy2.len() / data.len() >= 0.95 * probe / PROBE, without division.
    let doubtful = probe_len.is_some_and(|p| {
        (lazy2.len() as u64) * (PROBE as u64) * 100 >= (p as u64) * (data.len() as u64) * 95
    });
    if doubtful {
        let fast = compress(data, 1)?;
        if fast.len() < lazy2.len() {
            return Ok(fast);
        }
    }
    Ok(lazy2)
}

/// Decompress a chunk of known length; more or fewer bytes is an error.
pub fn decompress(raw: &[u8], len: usize) -> io::Result<Vec<u8>> {
    // One decompression context per thread: creating one per chunk showed in profiles.
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let out = DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(raw, len),
            None => zstd::bulk::decompress(raw, len),
        }
    })?;
    if out.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "chunk length differs from the manifest",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layout::TableKind;
    use crate::image::manifest::{ChunkRef, Chunker, PartitionTable};

    fn one_chunk_manifest(d: Digest, len: u32) -> Manifest {
        Manifest {
            format: 1,
            disk_bytes: u64::from(len),
            chunker: Chunker::current(),
            partition_table: PartitionTable {
                kind: TableKind::None,
                sector: 512,
                partitions: Vec::new(),
                raw: String::new(),
            },
            extents: vec![(0, u64::from(len))],
            zero_extents: Vec::new(),
            chunks: vec![ChunkRef { hash: d, len }],
            data_bytes: u64::from(len),
        }
    }

    fn chunk(seed: u8) -> (Digest, Vec<u8>) {
        let data = vec![seed; 4096];
        let d = Digest(*blake3::hash(&data).as_bytes());
        (d, compress(&data, 1).expect("compress"))
    }

    /// 512 KiB of text: words drawn from a vocabulary, or letters drawn one by one.
    fn text(words: bool) -> Vec<u8> {
        let mut next = crate::testdata::xorshift(0x9e37_79b9_7f4a_7c15);
        let letter = |r: u64| b"abcdefghijklmnopqrstuvwxyz   "[(r % 29) as usize];
        let vocab: Vec<Vec<u8>> = (0..3000)
            .map(|_| (0..2 + next() % 8).map(|_| letter(next() % 26)).collect())
            .collect();
        let mut out = Vec::with_capacity(512 << 10);
        while out.len() < 512 << 10 {
            if words {
                out.extend_from_slice(&vocab[(next() % 3000) as usize]);
                out.push(b' ');
            } else {
                out.push(letter(next()));
            }
        }
        out.truncate(512 << 10);
        out
    }

    #[test]
    fn the_default_compresses_text_smaller_than_level_3_and_round_trips() {
        for words in [true, false] {
            let data = text(words);
            let ours = compress_chunk(&data, CHUNK_LEVEL).expect("compress");
            let three = compress(&data, 3).expect("compress");
            assert!(
                ours.len() < three.len(),
                "words={words}: {} bytes against level 3's {}",
                ours.len(),
                three.len()
            );
            assert_eq!(decompress(&ours, data.len()).expect("decompress"), data);
        }
    }

    #[test]
    fn a_written_chunk_counts_as_present_and_is_on_disk_after_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (d, z) = chunk(1);
        store.put_chunk(&d, &z).expect("put");
        // Present for the next capture's question, but not yet under its name.
        assert!(store.has_chunk(&d));
        assert!(!store.chunk_path(&d).is_file());
        let m = one_chunk_manifest(d, 4096);
        store.commit(&m, Some(("t", 1))).expect("commit");
        assert!(store.chunk_path(&d).is_file());
        assert_eq!(store.chunk(&d, 4096).expect("read"), vec![1; 4096]);
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
    }

    #[test]
    fn pending_chunks_are_flushed_in_batches_that_bound_the_open_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let chunks: Vec<(Digest, Vec<u8>)> = (0..=FLUSH_FILES as u32)
            .map(|i| {
                let data = i.to_le_bytes().repeat(1024);
                let d = Digest(*blake3::hash(&data).as_bytes());
                (d, compress(&data, 1).expect("compress"))
            })
            .collect();
        for (d, z) in &chunks {
            store.put_chunk(d, z).expect("put");
        }
        let visible = chunks
            .iter()
            .filter(|(d, _)| store.chunk_path(d).is_file())
            .count();
        assert_eq!(
            visible, FLUSH_FILES,
            "the first batch is on disk, the last chunk pending"
        );
        assert!(chunks.iter().all(|(d, _)| store.has_chunk(d)));
        store.flush().expect("flush");
        assert!(chunks.iter().all(|(d, _)| store.chunk_path(d).is_file()));
    }

    #[test]
    fn chunks_of_an_abandoned_capture_are_kept_and_stale_temp_files_collected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (d, z) = chunk(2);
        {
            let store = Store::open(dir.path()).expect("open");
            store.put_chunk(&d, &z).expect("put");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.chunk_path(&d).is_file(), "dropping the store flushes");
        // No process has this pid (above the kernel's maximum).
        let stale = dir.path().join("tmp").join("4194305-1");
        fs::write(&stale, b"left by a crash").expect("write");
        let old = SystemTime::now() - STALE_TMP - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&stale)
            .and_then(|f| f.set_modified(old))
            .expect("age");
        let fresh = dir.path().join("tmp").join("4194305-2");
        fs::write(&fresh, b"a write in progress").expect("write");
        // As old, but its writer (this process) still runs: a server's pending chunk.
        let pending = dir
            .path()
            .join("tmp")
            .join(format!("{}-3", std::process::id()));
        fs::write(&pending, b"pending").expect("write");
        File::options()
            .write(true)
            .open(&pending)
            .and_then(|f| f.set_modified(old))
            .expect("age");
        store.gc().expect("gc");
        assert!(!stale.exists());
        assert!(fresh.exists());
        assert!(pending.exists());
    }
}
