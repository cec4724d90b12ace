//! The content-addressed image store (default `/images`):
//!
//! ```text
//! packs/NAME.pack            chunks, zstd-compressed, many to a file (see `pack`)
//! packs/NAME.idx             which chunks a pack holds, by the BLAKE3 of their data
//! manifests/ab12...ef.json   one image version, named by the BLAKE3 of these bytes
//! images/NAME.json           an image's versions, oldest first
//! tmp/                       writes in progress
//! chunks/ab/ab12...ef.zst    a chunk a file, in stores made before packs (still read)
//! ```
//!
//! Manifests and records go to `tmp/`, are fsynced, renamed into place and their
//! directory fsynced: a crash leaves either the old state or the new one, never half
//! a file. Chunks are made durable in batches, a sync of the pack and then of its
//! index per flush. Chunks and manifests are re-hashed on every read; a mismatch is
//! an error, never data.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use super::pack;
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
    packs: Box<Mutex<Packs>>,
    /// Held through a flush, so that a commit's flush also waits for one under way.
    flushing: Mutex<()>,
    /// Whether the store has a `chunks/` directory: a chunk a file, as stores made
    /// before packs hold them.
    loose: bool,
}

/// Where each chunk is, and the pack being written.
#[derive(Default)]
struct Packs {
    index: HashMap<Digest, Loc>,
    /// Each index file read: its id and where to read from next.
    seen: HashMap<String, (Option<[u8; 8]>, u64)>,
    writer: Option<pack::Writer>,
    /// Chunks added and not yet durable: they count as present (a capture need not
    /// send them again) and become readable at the next flush, which every commit
    /// does first.
    pending: HashSet<Digest>,
    pending_bytes: u64,
}

#[derive(Debug, Clone)]
struct Loc {
    pack: Arc<str>,
    e: pack::Entry,
}

/// Where a chunk was found, and its bytes.
enum Found {
    /// One zstd frame of exactly this chunk.
    Frame(Vec<u8>, PathBuf),
    /// The chunk's data, out of a shared frame in this pack.
    Data(Vec<u8>, PathBuf),
}

/// Pending bytes that trigger a flush: a sync per chunk cost a 2 GiB capture a quarter
/// of its time; one per this much costs little.
const FLUSH_BYTES: u64 = 128 << 20;

/// A manifest that decompresses past this is refused as damaged: a 2 TiB disk of
/// 512 KiB chunks lists about 4 million chunks, some 400 MB.
const MAX_MANIFEST: u64 = 1 << 30;

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
        for d in ["packs", "manifests", "images", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|source| StoreError::Io { path: p, source })?;
        }
        let store = Store {
            root: root.to_owned(),
            packs: Box::default(),
            flushing: Mutex::default(),
            loose: root.join("chunks").is_dir(),
        };
        store.refresh()?;
        Ok(store)
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
        // A real store: open() only puts back a `tmp/` or `packs/` someone removed.
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

    /// The names in `dir` that end in `suffix`, without it.
    fn stems(&self, dir: &Path, suffix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in self.io(dir, fs::read_dir(dir))? {
            let e = self.io(dir, e)?;
            if let Some(stem) = e.file_name().to_string_lossy().strip_suffix(suffix) {
                out.push(stem.to_string());
            }
        }
        Ok(out)
    }

    fn packs_dir(&self) -> PathBuf {
        self.root.join("packs")
    }

    /// Where a chunk of a store made before packs lies.
    fn chunk_path(&self, d: &Digest) -> PathBuf {
        let h = hex(d);
        self.root
            .join("chunks")
            .join(&h[..2])
            .join(format!("{h}.zst"))
    }

    /// The file that holds a chunk, and the byte range of its frame there (for tests
    /// and tools that damage or inspect one on purpose).
    pub fn chunk_location(&self, d: &Digest) -> Option<(PathBuf, u64, u64)> {
        if let Some(loc) = self.packs().index.get(d) {
            let path = pack::pack_path(&self.packs_dir(), &loc.pack);
            return Some((path, loc.e.offset, u64::from(loc.e.len)));
        }
        let p = self.chunk_path(d);
        let len = fs::metadata(&p).ok()?.len();
        Some((p, 0, len))
    }

    /// A manifest's file: zstd-compressed (a manifest lists each chunk's digest and
    /// size, and compressed it takes 40 % of the space), or plain JSON as stores made
    /// before wrote them.
    fn manifest_path(&self, d: &Digest, compressed: bool) -> PathBuf {
        let ext = if compressed { "json.zst" } else { "json" };
        self.root
            .join("manifests")
            .join(format!("{}.{ext}", hex(d)))
    }

    fn image_path(&self, name: &str) -> PathBuf {
        self.root.join("images").join(format!("{name}.json"))
    }

    pub fn has_chunk(&self, d: &Digest) -> bool {
        {
            let p = self.packs();
            if p.pending.contains(d) || p.index.contains_key(d) {
                return true;
            }
        }
        self.loose && self.chunk_path(d).is_file()
    }

    /// Every chunk readable from the store's packs, by digest (not those of older
    /// stores' `chunks/`, nor pending ones).
    pub fn packed_chunks(&self) -> BTreeSet<Digest> {
        self.packs().index.keys().copied().collect()
    }

    /// How many chunks this handle holds in packs, pending ones included.
    pub fn chunk_count(&self) -> usize {
        let p = self.packs();
        p.index.len()
            + p.pending
                .iter()
                .filter(|d| !p.index.contains_key(d))
                .count()
    }

    fn packs(&self) -> std::sync::MutexGuard<'_, Packs> {
        self.packs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the index lines other writers (other processes, other handles) added
    /// since the last look; all of them again if a pack was removed or its index
    /// rewritten. Nothing changes unless every file could be read.
    fn refresh(&self) -> Result<()> {
        let dir = self.packs_dir();
        let names = self.stems(&dir, ".idx")?;
        let mut p = self.packs();
        let present: HashSet<&str> = names.iter().map(String::as_str).collect();
        let vanished = p.seen.keys().any(|n| !present.contains(n.as_str()));
        for rebuild in [vanished, true] {
            let mut batch = Vec::with_capacity(names.len());
            let mut rewritten = false;
            for name in &names {
                let seen = p.seen.get(name).filter(|_| !rebuild);
                let path = pack::idx_path(&dir, name);
                let idx = match pack::read_idx(&path, seen.map_or(0, |s| s.1)) {
                    Ok(x) => x,
                    // Removed by a gc since the listing.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return self.io(&path, Err(e)),
                };
                if seen.is_some_and(|s| s.0.is_some() && s.0 != idx.id) {
                    rewritten = true;
                    break;
                }
                batch.push((name, idx));
            }
            if rewritten && !rebuild {
                continue;
            }
            if rebuild {
                p.index.clear();
                p.seen.clear();
            }
            for (name, idx) in batch {
                let pack: Arc<str> = Arc::from(name.as_str());
                for e in idx.entries {
                    p.index.entry(e.digest).or_insert_with(|| Loc {
                        pack: pack.clone(),
                        e,
                    });
                }
                p.seen.insert(name.clone(), (idx.id, idx.at));
            }
            break;
        }
        Ok(())
    }

    /// Add a chunk: `data`, and `compressed`, its zstd frame; `d` must be the BLAKE3
    /// of `data`. Returns the compressed size. It is readable after the next
    /// [`Store::flush`].
    pub fn put_chunk(&self, d: &Digest, data: &[u8], compressed: &[u8]) -> Result<u64> {
        let len = compressed.len() as u64;
        if self.has_chunk(d) {
            return Ok(len);
        }
        let dir = self.packs_dir();
        let full = {
            let mut p = self.packs();
            if p.index.contains_key(d) || !p.pending.insert(*d) {
                // Another thread added it meanwhile.
                return Ok(len);
            }
            if p.writer.is_none() {
                match pack::Writer::create(&dir) {
                    Ok(w) => p.writer = Some(w),
                    Err(e) => {
                        p.pending.remove(d);
                        return self.io(&dir, Err(e));
                    }
                }
            }
            let put = match p.writer.as_mut() {
                Some(w) => w.put(d, data, compressed).map(|()| w.size),
                None => Ok(0),
            };
            match put {
                Ok(size) => {
                    p.pending_bytes += len;
                    p.pending_bytes >= FLUSH_BYTES || size >= pack::PACK_MAX
                }
                Err(e) => {
                    // A pack that failed a write cannot be trusted: the next chunk
                    // starts a new one.
                    Self::drop_writer(&mut p);
                    return self.io(&dir, Err(e));
                }
            }
        };
        if full {
            self.flush()?;
        }
        Ok(len)
    }

    /// Forget the writer and what it had not made durable.
    fn drop_writer(p: &mut Packs) {
        if let Some(w) = p.writer.take() {
            for e in &w.pending {
                p.pending.remove(&e.digest);
            }
            for d in w.unsealed() {
                p.pending.remove(d);
            }
        }
        p.pending_bytes = 0;
    }

    /// Make every pending chunk durable, then readable. When that fails the pending
    /// chunks are dropped (a commit naming them then fails as incomplete, and the
    /// capture sends them again) and the error returned.
    pub fn flush(&self) -> Result<()> {
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.packs_dir();
        let (pack_file, idx_file, entries, name, fresh, _retired) = {
            let mut p = self.packs();
            let Some(w) = p.writer.as_mut() else {
                return Ok(());
            };
            if let Err(e) = w.seal() {
                Self::drop_writer(&mut p);
                return self.io(&dir, Err(e));
            }
            let entries = std::mem::take(&mut w.pending);
            let files = w.pack.try_clone().and_then(|f| Ok((f, w.idx.try_clone()?)));
            let (name, fresh) = (w.name.clone(), !w.dir_synced);
            // Full: the next chunk starts a new pack; this one is kept open (and
            // locked) until its last lines are written.
            let retired = if w.size >= pack::PACK_MAX {
                p.writer.take()
            } else {
                None
            };
            p.pending_bytes = 0;
            match files {
                Ok((pf, xf)) => (pf, xf, entries, name, fresh, retired),
                Err(e) => {
                    for e in &entries {
                        p.pending.remove(&e.digest);
                    }
                    Self::drop_writer(&mut p);
                    return self.io(&dir, Err(e));
                }
            }
        };
        // The frames first, then the lines that name them.
        let r = (|| {
            if entries.is_empty() && !fresh {
                return Ok(());
            }
            pack_file.sync_data()?;
            (&idx_file).write_all(&pack::lines(&entries))?;
            idx_file.sync_data()?;
            if fresh {
                File::open(&dir)?.sync_all()?;
            }
            Ok(())
        })();
        let mut p = self.packs();
        for e in &entries {
            p.pending.remove(&e.digest);
        }
        let ours = p.writer.as_ref().is_some_and(|w| w.name == name);
        if let Err(e) = r {
            if ours {
                Self::drop_writer(&mut p);
            }
            return self.io(&dir, Err(e));
        }
        let pack: Arc<str> = Arc::from(name.as_str());
        for e in entries {
            p.index.insert(
                e.digest,
                Loc {
                    pack: pack.clone(),
                    e,
                },
            );
        }
        if ours && let Some(w) = p.writer.as_mut() {
            w.dir_synced = true;
        }
        Ok(())
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

    /// Find a chunk, looking again at the packs once if it is not where the index
    /// said (another process wrote or collected it).
    fn find(&self, d: &Digest) -> Result<Found> {
        for again in [false, true] {
            if again {
                self.refresh()?;
            }
            let loc = self.packs().index.get(d).cloned();
            if let Some(loc) = loc {
                match self.read_loc(&loc) {
                    Ok(f) => return Ok(f),
                    Err(StoreError::Io { source, .. })
                        if !again && source.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            if self.loose {
                let p = self.chunk_path(d);
                match fs::read(&p) {
                    Ok(b) => return Ok(Found::Frame(b, p)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(StoreError::Io { path: p, source }),
                }
            }
        }
        Err(StoreError::MissingChunk(*d))
    }

    fn read_loc(&self, loc: &Loc) -> Result<Found> {
        let path = pack::pack_path(&self.packs_dir(), &loc.pack);
        let e = loc.e;
        if !e.shared {
            let mut buf = vec![0u8; e.len as usize];
            let r = File::open(&path).and_then(|f| f.read_exact_at(&mut buf, e.offset));
            return self.io(&path, r).map(|()| Found::Frame(buf, path));
        }
        let corrupt = || StoreError::CorruptChunk {
            digest: e.digest,
            actual: Digest([0; 32]),
            path: path.clone(),
        };
        let frame = shared_frame(&path, &loc.pack, e.offset, e.len).map_err(|err| {
            if err.kind() == io::ErrorKind::InvalidData {
                corrupt()
            } else {
                StoreError::Io {
                    path: path.clone(),
                    source: err,
                }
            }
        })?;
        let (start, end) = (e.sub as usize, e.sub as usize + e.dlen as usize);
        frame
            .get(start..end)
            .map(|b| Found::Data(b.to_vec(), path.clone()))
            .ok_or_else(corrupt)
    }

    /// A chunk as one zstd frame, as the API and multicast send it (not checked: see
    /// [`Store::chunk`]).
    pub fn chunk_raw(&self, d: &Digest) -> Result<Vec<u8>> {
        match self.find(d)? {
            Found::Frame(b, _) => Ok(b),
            Found::Data(data, path) => {
                compress(&data, 1).map_err(|source| StoreError::Io { path, source })
            }
        }
    }

    /// A chunk's data, decompressed and checked against its name.
    pub fn chunk(&self, d: &Digest, len: usize) -> Result<Vec<u8>> {
        let (data, path) = match self.find(d)? {
            Found::Frame(raw, path) => match decompress(&raw, len) {
                Ok(data) => (data, path),
                Err(_) => {
                    return Err(StoreError::CorruptChunk {
                        digest: *d,
                        actual: Digest([0; 32]),
                        path,
                    });
                }
            },
            Found::Data(data, path) => (data, path),
        };
        let actual = Digest(*blake3::hash(&data).as_bytes());
        if actual != *d || data.len() != len {
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
        let dest = self.manifest_path(&d, true);
        if !dest.is_file() && !self.manifest_path(&d, false).is_file() {
            let z = self.io(&dest, compress(&bytes, 9))?;
            self.write_atomic(&dest, &z)?;
        }
        Ok(d)
    }

    /// A manifest, checked against its digest.
    pub fn manifest(&self, d: &Digest) -> Result<Manifest> {
        let (mut p, mut compressed) = (self.manifest_path(d, true), true);
        let stored = match fs::read(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                (p, compressed) = (self.manifest_path(d, false), false);
                fs::read(&p)
            }
            r => r,
        };
        let stored = match stored {
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
        let bytes = if compressed {
            let mut out = Vec::new();
            zstd::stream::read::Decoder::new(&stored[..])
                .and_then(|z| z.take(MAX_MANIFEST).read_to_end(&mut out))
                .map_err(|e| corrupt(format!("not a zstd file: {e}")))?;
            out
        } else {
            stored
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
        let mut out = BTreeMap::new();
        for name in self.stems(&self.root.join("images"), ".json")? {
            if let Some(r) = self.image(&name)? {
                out.insert(name, r);
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
        let _gc_alone = self.lock(true)?;
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
                .strip_suffix(".json.zst")
                .or_else(|| name.strip_suffix(".json"))
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
        let (packed, packed_bytes) = self.gc_packs(&live)?;
        let (mut chunks, mut bytes) = (packed, packed_bytes);
        let cdir = self.root.join("chunks");
        if !self.loose {
            return Ok((removed_manifests, chunks, bytes));
        }
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

    /// Free the frames of packs that no `live` chunk uses: a pack left with none is
    /// removed, others have the dead frames' blocks punched out and their index
    /// rewritten. Packs being written (by this handle or another) are left alone.
    /// Returns the chunks and bytes freed.
    /// The store-wide lock: shared by commits, exclusive to gc, so that a gc never
    /// frees what a commit has just checked is there (across processes too).
    fn lock(&self, exclusive: bool) -> Result<File> {
        let path = self.root.join("lock");
        let f = self.io(
            &path,
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path),
        )?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        self.io(&path, pack::flock(&f, op))?;
        Ok(f)
    }

    fn gc_packs(&self, live: &BTreeSet<Digest>) -> Result<(usize, u64)> {
        self.flush()?;
        self.refresh()?;
        let dir = self.packs_dir();
        let own = self.packs().writer.as_ref().map(|w| w.name.clone());
        for n in self.stems(&dir, ".idx")? {
            let idx = pack::idx_path(&dir, &n);
            if !pack::pack_path(&dir, &n).exists() {
                // Left by a gc that stopped between removing a pack and its index.
                self.io(&idx, fs::remove_file(&idx).or_else(ignore_missing))?;
            }
        }
        let names = self.stems(&dir, ".pack")?;
        let (mut chunks, mut bytes) = (0, 0);
        for name in names {
            if own.as_deref() == Some(name.as_str()) {
                continue;
            }
            let path = pack::pack_path(&dir, &name);
            let f = match File::options().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return self.io(&path, Err(e)),
            };
            // Its writer still has it open.
            if !self.io(&path, pack::try_lock(&f))? {
                continue;
            }
            let size = self.io(&path, f.metadata())?.len();
            let idx = pack::idx_path(&dir, &name);
            let (entries, damaged) = match pack::read_idx(&idx, 0) {
                Ok(x) => (x.entries, x.damaged),
                // A pack without an index: its writer stopped before its first flush.
                Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), false),
                Err(e) => return self.io(&idx, Err(e)),
            };
            // Every copy of a live chunk stays: another process's index may name
            // either.
            let (keep, dead): (Vec<pack::Entry>, Vec<pack::Entry>) =
                entries.into_iter().partition(|e| live.contains(&e.digest));
            let end = keep.iter().map(pack::Entry::end).max().unwrap_or(0);
            // A line in the middle fails its check: the frame it named cannot be
            // told from a dead one, so a pack that still serves a version is left
            // as it is (`image verify` names what the damage cost).
            if !keep.is_empty() && ((dead.is_empty() && end >= size) || damaged) {
                continue;
            }
            chunks += dead.len();
            let live_frames: BTreeSet<(u64, u32)> =
                keep.iter().map(|e| (e.offset, e.len)).collect();
            let r = (|| -> io::Result<u64> {
                if keep.is_empty() {
                    fs::remove_file(&idx).or_else(ignore_missing)?;
                    fs::remove_file(&path)?;
                    File::open(&dir)?.sync_all()?;
                    return Ok(size);
                }
                // The index first: a line never names punched bytes.
                pack::rewrite_idx(&idx, &self.tmp_path(), &keep)?;
                File::open(&dir)?.sync_all()?;
                let mut freed = 0;
                let mut at = 0;
                for &(offset, len) in &live_frames {
                    if offset > at && pack::punch_hole(&f, at, offset - at)? {
                        freed += offset - at;
                    }
                    at = at.max(offset.saturating_add(u64::from(len)));
                }
                if size > at {
                    f.set_len(at)?;
                    freed += size - at;
                }
                Ok(freed)
            })();
            bytes += self.io(&path, r)?;
            let mut p = self.packs();
            for e in &dead {
                if p.index.get(&e.digest).is_some_and(|l| *l.pack == *name) {
                    p.index.remove(&e.digest);
                }
            }
            // The rewritten index has a new id: the next refresh reads all again.
        }
        Ok((chunks, bytes))
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

    /// Stored (compressed) size of a set of chunks; a frame shared with other chunks
    /// counts once, in full.
    pub fn stored_size<'a>(&self, chunks: impl IntoIterator<Item = &'a Digest>) -> u64 {
        let mut seen = BTreeSet::new();
        let mut frames = BTreeSet::new();
        let mut total = 0;
        let p = self.packs();
        for d in chunks {
            if !seen.insert(*d) {
                continue;
            }
            total += match p.index.get(d) {
                Some(l) if frames.insert((l.pack.clone(), l.e.offset)) => u64::from(l.e.len),
                Some(_) => 0,
                None if self.loose => fs::metadata(self.chunk_path(d))
                    .map(|m| m.len())
                    .unwrap_or(0),
                None => 0,
            };
        }
        total
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
    /// Store a chunk: its data and its zstd frame. Returns the compressed size.
    fn put_chunk(&self, d: &Digest, data: &[u8], compressed: &[u8]) -> Result<u64>;
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
    fn put_chunk(&self, d: &Digest, data: &[u8], compressed: &[u8]) -> Result<u64> {
        Store::put_chunk(self, d, data, compressed)
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
        let _no_gc = self.lock(false)?;
        // What another process's gc removed since this handle looked is gone.
        self.refresh()?;
        let present = |d: &Digest| {
            self.packs().index.contains_key(d) || (self.loose && self.chunk_path(d).is_file())
        };
        if let Some(missing) = m.chunks.iter().find(|c| !present(&c.hash)) {
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

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// The data of a shared frame. The last one read on this thread is kept: a deploy
/// reads a frame's chunks one after another.
fn shared_frame(path: &Path, pack: &Arc<str>, offset: u64, len: u32) -> io::Result<Arc<Vec<u8>>> {
    type Last = Option<(Arc<str>, u64, Arc<Vec<u8>>)>;
    thread_local! {
        static LAST: std::cell::RefCell<Last> = const { std::cell::RefCell::new(None) };
    }
    let hit = LAST.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(p, o, _)| p == pack && *o == offset)
            .map(|(_, _, data)| data.clone())
    });
    if let Some(data) = hit {
        return Ok(data);
    }
    let mut raw = vec![0u8; len as usize];
    File::open(path)?.read_exact_at(&mut raw, offset)?;
    let data = zstd::bulk::decompress(&raw, pack::GROUP_MAX + pack::SMALL)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let data = Arc::new(data);
    LAST.with(|c| *c.borrow_mut() = Some((pack.clone(), offset, data.clone())));
    Ok(data)
}

/// Compress the data of many small chunks as one frame. No level-1 probe: the frame
/// mixes files, and one that starts with random bytes says nothing of the rest (zstd
/// stores what does not compress as it is, block by block).
pub fn compress_group(data: &[u8]) -> io::Result<Vec<u8>> {
    with_compressor(Params::Lazy2, |c| c.compress(data))
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
    use std::os::unix::fs::MetadataExt;

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

    /// A chunk of `len` bytes, different for each seed: its digest, data and frame.
    fn chunk_of(seed: u32, len: usize) -> (Digest, Vec<u8>, Vec<u8>) {
        let mut next = crate::testdata::xorshift(u64::from(seed) + 1);
        // Half random, half zeros: it compresses, but not to nothing.
        let data: Vec<u8> = (0..len)
            .map(|i| if i % 64 < 32 { next() as u8 } else { 0 })
            .collect();
        let d = Digest(*blake3::hash(&data).as_bytes());
        let z = compress(&data, 1).expect("compress");
        (d, data, z)
    }

    fn chunk(seed: u8) -> (Digest, Vec<u8>, Vec<u8>) {
        chunk_of(u32::from(seed), 4096)
    }

    fn files_in(dir: &Path) -> usize {
        fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
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
        let (d, data, z) = chunk(1);
        store.put_chunk(&d, &data, &z).expect("put");
        // Present for the next capture's question, but not yet readable.
        assert!(store.has_chunk(&d));
        assert!(!Store::open(dir.path()).expect("open").has_chunk(&d));
        let m = one_chunk_manifest(d, 4096);
        store.commit(&m, Some(("t", 1))).expect("commit");
        let other = Store::open(dir.path()).expect("open");
        assert_eq!(other.chunk(&d, 4096).expect("read"), data);
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn small_chunks_share_frames_large_ones_do_not_and_all_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let small: Vec<_> = (0..300).map(|i| chunk_of(i, 4096)).collect();
        let large: Vec<_> = (1000..1003).map(|i| chunk_of(i, 64 * 1024)).collect();
        let mut alone = 0;
        for (d, data, z) in small.iter().chain(&large) {
            alone += store.put_chunk(d, data, z).expect("put");
        }
        store.flush().expect("flush");
        // One pack and its index, not a file a chunk.
        assert_eq!(files_in(&dir.path().join("packs")), 2);
        let other = Store::open(dir.path()).expect("open");
        for (d, data, _) in small.iter().chain(&large) {
            assert_eq!(&other.chunk(d, data.len()).expect("read"), data);
            // What the API sends is one frame of the chunk alone.
            let raw = other.chunk_raw(d).expect("raw");
            assert_eq!(&decompress(&raw, data.len()).expect("frame"), data);
        }
        let ds: Vec<Digest> = small.iter().chain(&large).map(|c| c.0).collect();
        let stored = other.stored_size(&ds);
        assert!(
            stored < alone,
            "{stored} bytes stored against {alone} alone"
        );
        // The wrong length is refused, not padded or cut.
        assert!(other.chunk(&small[0].0, 4095).is_err());
    }

    #[test]
    fn gc_frees_the_frames_no_image_uses_and_keeps_the_rest_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let large: Vec<_> = (0..64).map(|i| chunk_of(i, 256 * 1024)).collect();
        let small: Vec<_> = (100..400).map(|i| chunk_of(i, 4096)).collect();
        for (d, data, z) in large.iter().chain(&small) {
            store.put_chunk(d, data, z).expect("put");
        }
        // Image "a" keeps the even large chunks and the first 50 small ones.
        let keep: Vec<&(Digest, Vec<u8>, Vec<u8>)> = large
            .iter()
            .step_by(2)
            .chain(small.iter().take(50))
            .collect();
        let mut m = one_chunk_manifest(keep[0].0, keep[0].1.len() as u32);
        m.chunks = keep
            .iter()
            .map(|c| ChunkRef {
                hash: c.0,
                len: c.1.len() as u32,
            })
            .collect();
        m.data_bytes = m.chunks.iter().map(|c| u64::from(c.len)).sum();
        m.disk_bytes = m.data_bytes;
        m.extents = vec![(0, m.data_bytes)];
        store.commit(&m, Some(("a", 1))).expect("commit");
        let pack = fs::read_dir(dir.path().join("packs"))
            .expect("packs")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "pack"))
            .expect("a pack");
        let blocks = |p: &Path| fs::metadata(p).expect("stat").blocks() * 512;
        let before = blocks(&pack);
        // The pack is still this handle's to write: gc leaves it alone, and so does
        // another handle's (another process's), which finds it locked.
        assert_eq!(store.gc().expect("gc").1, 0);
        let other = Store::open(dir.path()).expect("open");
        assert_eq!(other.gc().expect("gc").1, 0);
        assert_eq!(blocks(&pack), before);
        drop(other);
        drop(store);

        let store = Store::open(dir.path()).expect("open");
        let (_, chunks, freed) = store.gc().expect("gc");
        assert_eq!(chunks, 32 + 250, "the odd large chunks and 250 small ones");
        let after = blocks(&pack);
        assert!(
            before - after >= freed / 2 && freed > 0,
            "{before} bytes on disk before, {after} after; {freed} said freed"
        );
        let other = Store::open(dir.path()).expect("open");
        for c in &keep {
            assert_eq!(other.chunk(&c.0, c.1.len()).expect("kept"), c.1);
        }
        for c in large.iter().skip(1).step_by(2) {
            assert!(!other.has_chunk(&c.0), "a freed chunk is gone");
        }
        // Nothing left to free; removing the image frees the pack itself.
        assert_eq!(other.gc().expect("gc").1, 0);
        other.remove("a", None).expect("rm");
        other.gc().expect("gc");
        assert_eq!(files_in(&dir.path().join("packs")), 0);
    }

    #[test]
    fn manifests_are_written_compressed_and_plain_ones_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (d, data, z) = chunk(5);
        store.put_chunk(&d, &data, &z).expect("put");
        let m = one_chunk_manifest(d, 4096);
        let (digest, _) = store.commit(&m, Some(("t", 1))).expect("commit");
        let zst = store.manifest_path(&digest, true);
        assert!(zst.is_file());
        assert_eq!(store.manifest(&digest).expect("read"), m);
        // As an older fleetwave wrote it.
        fs::remove_file(&zst).expect("rm");
        fs::write(store.manifest_path(&digest, false), m.to_bytes()).expect("write");
        assert_eq!(store.manifest(&digest).expect("read plain"), m);
        // A damaged compressed one is named as such.
        fs::remove_file(store.manifest_path(&digest, false)).expect("rm");
        fs::write(&zst, b"not zstd").expect("write");
        let err = store.manifest(&digest).expect_err("damaged").to_string();
        assert!(
            err.contains("is corrupt") && err.contains("json.zst"),
            "{err}"
        );
        // gc cannot tell what that version uses, so it frees nothing.
        assert!(store.gc().is_err());
        assert!(store.has_chunk(&d));
    }

    #[test]
    fn a_store_made_before_packs_is_read_and_collected_and_grows_in_packs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (old, old_data, old_z) = chunk(6);
        let (dead, _, dead_z) = chunk(7);
        let m = one_chunk_manifest(old, 4096);
        // As an older fleetwave left it: a chunk a file, a plain JSON manifest.
        for (d, z) in [(old, &old_z), (dead, &dead_z)] {
            let h = hex(&d);
            let shard = dir.path().join("chunks").join(&h[..2]);
            fs::create_dir_all(&shard).expect("mkdir");
            fs::write(shard.join(format!("{h}.zst")), z).expect("write");
        }
        let digest = Manifest::digest_of(&m.to_bytes());
        fs::create_dir_all(dir.path().join("manifests")).expect("mkdir");
        fs::write(
            dir.path()
                .join("manifests")
                .join(format!("{}.json", hex(&digest))),
            m.to_bytes(),
        )
        .expect("write");
        let store = Store::open(dir.path()).expect("open");
        store
            .add_version(
                "old",
                VersionRecord {
                    digest,
                    generation: 1,
                    captured_at: 0,
                    disk_bytes: 4096,
                    stored_bytes: 0,
                    made_by: None,
                },
            )
            .expect("record");
        assert!(store.has_chunk(&old) && store.has_chunk(&dead));
        assert_eq!(store.chunk(&old, 4096).expect("read"), old_data);
        assert_eq!(store.stored_size([&old]), old_z.len() as u64);
        // A new version that shares the old chunk stores only its new one, in a pack.
        let (new, new_data, new_z) = chunk(8);
        store.put_chunk(&old, &old_data, &old_z).expect("put");
        store.put_chunk(&new, &new_data, &new_z).expect("put");
        store.flush().expect("flush");
        assert_eq!(store.packed_chunks().into_iter().collect::<Vec<_>>(), [new]);
        // gc removes the loose chunk no version uses, and keeps the used one (and the
        // new one: its pack is still this handle's to write).
        let (_, chunks, bytes) = store.gc().expect("gc");
        assert_eq!((chunks, bytes), (1, dead_z.len() as u64));
        assert!(!store.has_chunk(&dead));
        assert_eq!(store.chunk(&old, 4096).expect("read"), old_data);
    }

    #[test]
    fn an_empty_or_damaged_index_neither_stops_the_store_nor_lets_gc_guess() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = dir.path().join("packs");
        let chunks: Vec<_> = (0..3).map(|i| chunk_of(50 + i, 64 * 1024)).collect();
        {
            let store = Store::open(dir.path()).expect("open");
            for (d, data, z) in &chunks {
                store.put_chunk(d, data, z).expect("put");
            }
        }
        // A power cut right after a writer made its files: nothing of the index's
        // header reached the disk.
        fs::write(packs.join("0000000000000001.pack"), b"").expect("pack");
        fs::write(packs.join("0000000000000001.idx"), b"").expect("idx");
        let store = Store::open(dir.path()).expect("opens");
        assert!(chunks.iter().all(|c| store.has_chunk(&c.0)));
        // Damage the middle line of the real index.
        let idx = fs::read_dir(&packs)
            .expect("packs")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|x| x == "idx")
                    && fs::metadata(p).is_ok_and(|m| m.len() > 0)
            })
            .expect("an index");
        let mut bytes = fs::read(&idx).expect("read");
        bytes[16 + pack::ENTRY + 3] ^= 0xff;
        fs::write(&idx, &bytes).expect("write");
        let store = Store::open(dir.path()).expect("opens");
        assert!(!store.has_chunk(&chunks[1].0));
        assert_eq!(
            store.chunk(&chunks[2].0, 64 * 1024).expect("read"),
            chunks[2].1
        );
        // A version uses the last chunk: gc frees nothing in that pack, as it cannot
        // tell what the damaged line named; the empty pack goes.
        let m = one_chunk_manifest(chunks[2].0, 64 * 1024);
        store.commit(&m, Some(("a", 1))).expect("commit");
        let (_, freed, _) = store.gc().expect("gc");
        assert_eq!(freed, 0);
        assert_eq!(fs::read(&idx).expect("read"), bytes);
        assert!(!packs.join("0000000000000001.idx").exists());
        // Once no version uses it, the pack goes too.
        store.remove("a", None).expect("rm");
        store.gc().expect("gc");
        assert!(!idx.exists());
    }

    #[test]
    fn gc_keeps_every_copy_of_a_live_chunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (d, data, z) = chunk_of(60, 64 * 1024);
        // Two processes that each stored it.
        for _ in 0..2 {
            let store = Store::open(dir.path()).expect("open");
            store.packs().index.clear();
            store.put_chunk(&d, &data, &z).expect("put");
        }
        let store = Store::open(dir.path()).expect("open");
        let m = one_chunk_manifest(d, 64 * 1024);
        store.commit(&m, Some(("a", 1))).expect("commit");
        let (_, freed, _) = store.gc().expect("gc");
        assert_eq!(freed, 0);
        for idx in fs::read_dir(dir.path().join("packs"))
            .expect("packs")
            .flatten()
        {
            let p = idx.path();
            if p.extension().is_some_and(|x| x == "idx") {
                let entries = pack::read_idx(&p, 0).expect("idx").entries;
                assert_eq!(entries.len(), 1, "{}", p.display());
            }
        }
    }

    #[test]
    fn a_torn_index_line_and_a_pack_left_by_a_crash_are_survived() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (d, data, z) = chunk(3);
        let (e, edata, ez) = chunk(4);
        {
            let store = Store::open(dir.path()).expect("open");
            store.put_chunk(&d, &data, &z).expect("put");
            store.flush().expect("flush");
            store.put_chunk(&e, &edata, &ez).expect("put");
            // A crash now: the second chunk's frame is written, its line is not.
            std::mem::forget(store);
        }
        let idx = fs::read_dir(dir.path().join("packs"))
            .expect("packs")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "idx"))
            .expect("an index");
        // Half a line, as a crash in its write leaves it.
        let mut f = File::options().append(true).open(&idx).expect("idx");
        f.write_all(&[0xab; pack::ENTRY / 2]).expect("tear");
        drop(f);
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.chunk(&d, 4096).expect("read"), data);
        assert!(!store.has_chunk(&e), "a chunk never listed is not present");
        // It is added again, to a new pack, and reads back.
        store.put_chunk(&e, &edata, &ez).expect("put");
        store.flush().expect("flush");
        assert_eq!(store.chunk(&e, 4096).expect("read"), edata);
    }

    #[test]
    fn chunks_of_an_abandoned_capture_are_kept_and_stale_temp_files_collected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (d, data, z) = chunk(2);
        {
            let store = Store::open(dir.path()).expect("open");
            store.put_chunk(&d, &data, &z).expect("put");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store.chunk(&d, 4096).expect("read"),
            data,
            "dropping the store flushes"
        );
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
