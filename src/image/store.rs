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
//! Chunks and manifests are re-hashed on every read; a mismatch is an error, never
//! data.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use crate::spec::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub versions: Vec<VersionRecord>,
}

pub struct Store {
    root: PathBuf,
}

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
        })
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
        self.chunk_path(d).is_file()
    }

    /// Write `bytes` at `dest` atomically: temp file, fsync, rename, fsync directory.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()));
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
    pub fn put_chunk(&self, data_hash: &Digest, compressed: &[u8]) -> Result<u64> {
        let dest = self.chunk_path(data_hash);
        if !dest.is_file() {
            self.write_atomic(&dest, compressed)?;
        }
        Ok(compressed.len() as u64)
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
        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))
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
        if let Some(missing) = m.chunks.iter().find(|c| !self.has_chunk(&c.hash)) {
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
                },
            )?;
        }
        Ok((digest, stored))
    }
}

/// Compress with a context kept per thread and level: a fresh context per chunk costs
/// megabytes mapped and unmapped each time.
pub fn compress(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    thread_local! {
        static CCTX: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    CCTX.with(|cell| {
        let mut ctxs = cell.borrow_mut();
        if !ctxs.iter().any(|(l, _)| *l == level) {
            ctxs.push((level, zstd::bulk::Compressor::new(level)?));
        }
        match ctxs.iter_mut().find(|(l, _)| *l == level) {
            Some((_, c)) => c.compress(data),
            None => zstd::bulk::compress(data, level),
        }
    })
}

/// Compress a chunk, spending `level`'s effort only where it can pay: a chunk whose
/// first 64 KiB do not shrink at level 1 (random, already compressed or encrypted
/// data) is stored at level 1, which costs little and stores it nearly raw.
pub fn compress_chunk(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    const PROBE: usize = 64 * 1024;
    if level > 1 && data.len() > PROBE {
        let probe = compress(&data[..PROBE], 1)?;
        if probe.len() * 100 >= PROBE * 98 {
            return compress(data, 1);
        }
    }
    compress(data, level)
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
