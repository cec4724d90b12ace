//! Pack files: the store's chunks, many to a file. A file per chunk cost a disk of
//! small files half again its size on disk (each chunk rounded up to a 4 KiB block)
//! and a create, sync and rename per chunk.
//!
//! `packs/NAME.pack` holds zstd frames back to back; `packs/NAME.idx` lists the chunks
//! in them. Chunks of at most [`SMALL`] bytes are compressed together, up to
//! [`GROUP_MAX`] bytes a frame: one 4 KiB inode table or MFT block, or one small
//! file, compressed alone loses what its neighbours share, and pays a frame header.
//!
//! A pack is written by one writer, which holds an exclusive `flock` on it until it
//! closes it; nothing else writes to it but `gc`, which takes the same lock. Frames
//! are made durable before the index lines that name them, so a line always names
//! bytes on disk; a line that did not reach the disk whole fails its check and is
//! ignored.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spec::Digest;

/// A pack is closed, and a new one started, past this size.
pub const PACK_MAX: u64 = 64 << 20;
/// Chunks of at most this many bytes share frames.
pub const SMALL: usize = 16 * 1024;
/// A shared frame is closed at this many bytes of data. Measured on 2,000 files of
/// about 16 KB (`SMALL=1 bench/recapture.sh 0`), ext4 and NTFS: 128 KiB frames stored
/// 37.51 and 37.77 MiB, 512 KiB 37.46 and 37.70, 1 MiB 37.45 and 37.68 (for twice
/// the data unpacked to read one chunk); sharing chunks of up to 64 KiB stored more.
pub const GROUP_MAX: usize = 512 * 1024;

const IDX_MAGIC: &[u8; 8] = b"fwidx01\n";
/// The magic, then a random id that changes whenever gc rewrites the file: a reader
/// that finds another id reads every index again.
const HEADER: usize = 16;
pub const ENTRY: usize = 64;
/// No frame is larger (a 16 MiB chunk at worst, or a shared frame): a line that says
/// so was not written by us.
const MAX_FRAME: u32 = 32 << 20;

/// Where one chunk is: a frame of the pack, and the chunk's bytes in the frame's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub digest: Digest,
    pub offset: u64,
    pub len: u32,
    /// In a shared frame, where the chunk's data starts in the frame's.
    pub sub: u32,
    /// The chunk's data length.
    pub dlen: u32,
    /// The frame holds several chunks (else exactly this one).
    pub shared: bool,
}

impl Entry {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }

    fn encode(&self) -> [u8; ENTRY] {
        let mut b = [0u8; ENTRY];
        b[..32].copy_from_slice(&self.digest.0);
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..44].copy_from_slice(&self.len.to_le_bytes());
        b[44..48].copy_from_slice(&self.sub.to_le_bytes());
        b[48..52].copy_from_slice(&self.dlen.to_le_bytes());
        b[52..56].copy_from_slice(&u32::from(self.shared).to_le_bytes());
        let check = blake3::hash(&b[..56]);
        b[56..].copy_from_slice(&check.as_bytes()[..8]);
        b
    }

    fn decode(b: &[u8]) -> Option<Entry> {
        let b: &[u8; ENTRY] = b.try_into().ok()?;
        if blake3::hash(&b[..56]).as_bytes()[..8] != b[56..] {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[..32]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&b[32..40]);
        let flags = u32_at(52);
        if flags > 1 || u32_at(40) > MAX_FRAME || u64::from_le_bytes(offset) > 1 << 48 {
            return None;
        }
        Some(Entry {
            digest: Digest(digest),
            offset: u64::from_le_bytes(offset),
            len: u32_at(40),
            sub: u32_at(44),
            dlen: u32_at(48),
            shared: flags == 1,
        })
    }
}

/// What an index file holds from some byte on.
pub struct Idx {
    /// Every line that passes its check.
    pub entries: Vec<Entry>,
    /// Where to read from next time: the end, or the first line that failed its check
    /// (one being written now is whole next time).
    pub at: u64,
    /// The file's id (see [`HEADER`]); `None` while its header is not yet written.
    pub id: Option<[u8; 8]>,
    /// A line failed its check and a good one follows: the file is damaged, not torn
    /// at its end, so gc must leave the pack alone.
    pub damaged: bool,
}

/// Read an index file from byte `from` (0: the whole file). A file shorter than its
/// header (a writer that just made it, or one a crash cut short) holds no entries.
pub fn read_idx(path: &Path, from: u64) -> io::Result<Idx> {
    let mut f = File::open(path)?;
    let mut head = Vec::with_capacity(HEADER);
    (&mut f).take(HEADER as u64).read_to_end(&mut head)?;
    if !IDX_MAGIC.starts_with(&head[..head.len().min(IDX_MAGIC.len())]) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a fleetwave pack index",
        ));
    }
    if head.len() < HEADER {
        return Ok(Idx {
            entries: Vec::new(),
            at: 0,
            id: None,
            damaged: false,
        });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&head[IDX_MAGIC.len()..]);
    // Only what was added since `from`: a commit looks at every index.
    let start = from.clamp(HEADER as u64, f.metadata()?.len());
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    let mut out = Idx {
        entries: Vec::new(),
        at: 0,
        id: Some(id),
        damaged: false,
    };
    let mut bad = None;
    let mut pos = 0;
    while let Some(line) = bytes.get(pos..pos + ENTRY) {
        match Entry::decode(line) {
            Some(e) => {
                out.damaged |= bad.is_some();
                out.entries.push(e);
            }
            None => {
                bad.get_or_insert(pos);
            }
        }
        pos += ENTRY;
    }
    // A partial last line: not yet whole (or torn by a crash).
    out.at = start + bad.unwrap_or(pos) as u64;
    Ok(out)
}

/// An index file's header, with a new id.
fn header() -> Vec<u8> {
    let mut h = IDX_MAGIC.to_vec();
    h.extend_from_slice(&new_id());
    h
}

fn new_id() -> [u8; 8] {
    let seed = format!(
        "{}-{}-{:?}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
    );
    let mut id = [0u8; 8];
    id.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..8]);
    id
}

/// Replace an index with `entries`, under a new id (tmp file, sync, rename; the caller
/// syncs the directory).
pub fn rewrite_idx(path: &Path, tmp: &Path, entries: &[Entry]) -> io::Result<()> {
    let mut buf = header();
    buf.extend_from_slice(&lines(entries));
    let r = (|| {
        let mut f = File::create(tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    r
}

pub fn pack_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pack"))
}

pub fn idx_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.idx"))
}

/// `r`, a libc call's result: true when it succeeded, false when it failed with
/// `soft` (an answer, not an error), else the error.
fn done_unless(r: libc::c_int, soft: i32) -> io::Result<bool> {
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(soft) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// `flock(2)` with `op`; false if `LOCK_NB` was asked and someone holds the lock.
pub fn flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: a valid descriptor owned by `f`; the call takes no pointers.
    done_unless(unsafe { libc::flock(f.as_raw_fd(), op) }, libc::EWOULDBLOCK)
}

/// Take `f`'s exclusive lock without waiting; false if someone holds it.
pub fn try_lock(f: &File) -> io::Result<bool> {
    flock(f, libc::LOCK_EX | libc::LOCK_NB)
}

/// Free the blocks under `len` bytes at `offset`, keeping the file's size and every
/// other byte where it is. False where the filesystem cannot (the bytes then stay).
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<bool> {
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(false);
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: a valid descriptor owned by `f`; the call takes no pointers.
    done_unless(
        unsafe { libc::fallocate(f.as_raw_fd(), mode, off, n) },
        libc::EOPNOTSUPP,
    )
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The pack being written: frames appended, index lines pending until a flush.
pub struct Writer {
    pub name: String,
    pub pack: File,
    pub idx: File,
    /// Bytes in the pack.
    pub size: u64,
    /// Data of small chunks waiting for their shared frame, and where each starts.
    group: Vec<u8>,
    members: Vec<(Digest, u32, u32)>,
    /// Frames written and not yet listed in the index.
    pub pending: Vec<Entry>,
    /// Whether the directory entries of both files are durable.
    pub dir_synced: bool,
    unstarted: u64,
}

impl Writer {
    /// A new, locked pack and its index in `dir`.
    pub fn create(dir: &Path) -> io::Result<Writer> {
        let name = format!("{:016x}", u64::from_le_bytes(new_id()));
        let (pack_at, idx_at) = (pack_path(dir, &name), idx_path(dir, &name));
        let made = (|| {
            // The pack first, locked, so that gc never finds an index without its
            // pack while the writer lives.
            let pack = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&pack_at)?;
            if !try_lock(&pack)? {
                return Err(io::Error::other("a new pack is locked by someone else"));
            }
            let mut idx = File::options()
                .read(true)
                .append(true)
                .create_new(true)
                .open(&idx_at)?;
            idx.write_all(&header())?;
            Ok((pack, idx))
        })();
        let (pack, idx) = match made {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&idx_at);
                let _ = std::fs::remove_file(&pack_at);
                return Err(e);
            }
        };
        Ok(Writer {
            name,
            pack,
            idx,
            size: 0,
            group: Vec::new(),
            members: Vec::new(),
            pending: Vec::new(),
            dir_synced: false,
            unstarted: 0,
        })
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<(u64, u32)> {
        let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
        let offset = self.size;
        self.pack.write_all_at(bytes, offset)?;
        self.size += u64::from(len);
        self.unstarted += u64::from(len);
        if self.unstarted >= 8 << 20 {
            // Start writing now, so that the flush mostly waits for writes under way.
            super::start_writeback(&self.pack);
            self.unstarted = 0;
        }
        Ok((offset, len))
    }

    /// Add a chunk: a small one to the shared frame, a larger one as its own frame
    /// (`compressed`).
    pub fn put(&mut self, d: &Digest, data: &[u8], compressed: &[u8]) -> io::Result<()> {
        if data.len() <= SMALL {
            let sub = self.group.len() as u32;
            self.group.extend_from_slice(data);
            self.members.push((*d, sub, data.len() as u32));
            if self.group.len() >= GROUP_MAX {
                self.seal()?;
            }
            return Ok(());
        }
        let (offset, len) = self.append(compressed)?;
        self.pending.push(Entry {
            digest: *d,
            offset,
            len,
            sub: 0,
            dlen: data.len() as u32,
            shared: false,
        });
        Ok(())
    }

    /// Compress and write the shared frame under way.
    pub fn seal(&mut self) -> io::Result<()> {
        if self.members.is_empty() {
            return Ok(());
        }
        let frame = super::store::compress_group(&self.group)?;
        let (offset, len) = self.append(&frame)?;
        let shared = self.members.len() > 1;
        for (digest, sub, dlen) in self.members.drain(..) {
            self.pending.push(Entry {
                digest,
                offset,
                len,
                sub,
                dlen,
                shared,
            });
        }
        self.group.clear();
        Ok(())
    }

    /// Digests added and not yet in a written frame.
    pub fn unsealed(&self) -> impl Iterator<Item = &Digest> {
        self.members.iter().map(|(d, _, _)| d)
    }
}

/// The index lines of `entries`.
pub fn lines(entries: &[Entry]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.encode()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_line_round_trips_and_a_torn_one_is_refused() {
        let e = Entry {
            digest: Digest([7; 32]),
            offset: 1 << 33,
            len: 4000,
            sub: 12,
            dlen: 4096,
            shared: true,
        };
        let line = e.encode();
        assert_eq!(Entry::decode(&line), Some(e));
        let mut torn = line;
        torn[40] ^= 1;
        assert_eq!(Entry::decode(&torn), None);
        assert_eq!(Entry::decode(&[0u8; ENTRY]), None);
    }
}
