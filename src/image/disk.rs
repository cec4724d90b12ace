//! A deploy target's (or checked disk's) two descriptors: one through the page cache,
//! one with `O_DIRECT`. The aligned middle of each piece of chunk data goes straight to
//! the device: no copy into the page cache (a third of a multicast receiver's CPU),
//! no gigabytes of dirty pages for the final fsync, and a read-back that reads the
//! disk rather than the kernel's cache of what was just written.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::spec::Digest;

pub struct Disk {
    file: File,
    /// `None` where the filesystem refuses `O_DIRECT` at open.
    direct: Option<File>,
    /// The filesystem took `O_DIRECT` at open but refused it for I/O (EINVAL): from
    /// then on everything goes through `file`.
    refused: AtomicBool,
    /// Offsets, lengths and buffers of direct I/O are multiples of this: 4096 (the
    /// largest logical block size of disks in use, 4Kn) or the page size if larger, so
    /// that no page holds both a block written directly and one written through it.
    align: u64,
    /// The disk's size: direct reads stop at its last whole block.
    size: u64,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// `len` bytes at disk offset `off`, split where direct I/O can take over: the lengths
/// of a head up to the first `a`-aligned offset and of an aligned middle; the rest is
/// the tail. Chunks are cut by content, so most start and end inside a block.
fn split(off: u64, len: u64, a: u64) -> (u64, u64) {
    let head = ((a - off % a) % a).min(len);
    (head, (len - head) / a * a)
}

/// `len` bytes of `v` starting on an `align` boundary, `v` grown as needed.
fn aligned_in(v: &mut Vec<u8>, len: usize, align: usize) -> &mut [u8] {
    if v.len() < len + align {
        v.resize(len + align, 0);
    }
    let start = (align - v.as_ptr() as usize % align) % align;
    &mut v[start..start + len]
}

/// Run `f` on this thread's buffer of `len` bytes, starting on an `align` boundary.
fn with_aligned<T>(len: usize, align: u64, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| f(aligned_in(&mut cell.borrow_mut(), len, align as usize)))
}

fn is_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

impl Disk {
    /// Open `path` (for writing when `write`), and a second time with `O_DIRECT` where
    /// the filesystem allows it.
    pub fn open(path: &Path, write: bool) -> io::Result<Disk> {
        let file = OpenOptions::new().read(true).write(write).open(path)?;
        let size = super::disk_size(&file)?;
        let direct = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        // SAFETY: sysconf takes and returns plain integers.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Ok(Disk {
            file,
            direct,
            refused: AtomicBool::new(false),
            align: u64::try_from(page).unwrap_or(0).max(4096),
            size,
        })
    }

    /// The descriptor through the page cache: zero extents, syncs, tables.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size a file target to `bytes`; direct reads then reach its new end.
    pub fn set_len(&mut self, bytes: u64) -> io::Result<()> {
        self.file.set_len(bytes)?;
        self.size = bytes;
        Ok(())
    }

    fn direct(&self) -> Option<&File> {
        self.direct
            .as_ref()
            .filter(|_| !self.refused.load(Ordering::Relaxed))
    }

    /// Write `data` at `pieces`; returns the bytes that went through the page cache.
    pub fn write_pieces(&self, pieces: &[(u64, u64)], data: &[u8]) -> io::Result<u64> {
        let total: u64 = pieces.iter().map(|p| p.1).sum();
        if (data.len() as u64) < total {
            return Err(invalid("chunk shorter than its places"));
        }
        let (mut at, mut cached) = (0usize, 0u64);
        for &(off, len) in pieces {
            off.checked_add(len)
                .ok_or_else(|| invalid("chunk placed past the end of any disk"))?;
            let part = &data[at..at + len as usize];
            at += len as usize;
            let (head, middle) = match self.direct() {
                Some(_) => split(off, len, self.align),
                None => (len, 0),
            };
            let (h, m) = (head as usize, (head + middle) as usize);
            self.file.write_all_at(&part[..h], off)?;
            if middle > 0 && !self.write_direct(&part[h..m], off + head)? {
                self.file.write_all_at(&part[h..m], off + head)?;
                cached += middle;
            }
            self.file.write_all_at(&part[m..], off + m as u64)?;
            cached += len - middle;
        }
        Ok(cached)
    }

    /// Write aligned `data` at aligned `off` with `O_DIRECT`; false when the filesystem
    /// refused it (then the caller writes through the page cache, as from now on all).
    fn write_direct(&self, data: &[u8], off: u64) -> io::Result<bool> {
        let Some(d) = self.direct() else {
            return Ok(false);
        };
        with_aligned(data.len(), self.align, |buf| {
            buf.copy_from_slice(data);
            match d.write_all_at(buf, off) {
                Ok(()) => Ok(true),
                Err(e) if is_refusal(&e) => {
                    self.refused.store(true, Ordering::Relaxed);
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
    }

    /// Read the bytes at `pieces` and hash them: one chunk as the disk holds it.
    pub fn hash_pieces(&self, pieces: &[(u64, u64)]) -> io::Result<Digest> {
        let mut hasher = blake3::Hasher::new();
        for &(off, len) in pieces {
            with_aligned(len as usize + 2 * self.align as usize, self.align, |buf| {
                hasher.update(self.read_into(buf, off, len)?);
                Ok::<_, io::Error>(())
            })?;
        }
        Ok(Digest(*hasher.finalize().as_bytes()))
    }

    /// Read `off..off + len` in windows of up to `window` bytes, calling `f(offset,
    /// bytes)` on each until it returns false.
    pub fn read_windows(
        &self,
        off: u64,
        len: u64,
        window: usize,
        mut f: impl FnMut(u64, &[u8]) -> io::Result<bool>,
    ) -> io::Result<()> {
        let window = window.max(1).min(len as usize);
        let mut raw = Vec::new();
        let buf = aligned_in(
            &mut raw,
            window + 2 * self.align as usize,
            self.align as usize,
        );
        let mut done = 0;
        while done < len {
            let n = (len - done).min(window as u64);
            if !f(off + done, self.read_into(buf, off + done, n)?)? {
                break;
            }
            done += n;
        }
        Ok(())
    }

    /// Where reads come from, for reports: `device` (direct I/O), or `page cache` where
    /// the filesystem refuses direct I/O.
    pub fn read_back(&self) -> &'static str {
        if self.direct().is_some() {
            "device"
        } else {
            "page cache"
        }
    }

    /// Read `len` bytes at `off` into the aligned `buf` (at least `len + 2 * align`
    /// long). With `O_DIRECT` the range is read with the blocks around it, so none of
    /// it comes from the page cache, except past the last whole block of a disk whose
    /// size is not a multiple of it.
    fn read_into<'a>(&self, buf: &'a mut [u8], off: u64, len: u64) -> io::Result<&'a [u8]> {
        let end = off
            .checked_add(len)
            .ok_or_else(|| invalid("read past the end of any disk"))?;
        let a = self.align;
        let lo = off / a * a;
        let direct_end = end.div_ceil(a).saturating_mul(a).min(self.size / a * a);
        if let Some(d) = self.direct()
            && direct_end > lo
        {
            match d.read_exact_at(&mut buf[..(direct_end - lo) as usize], lo) {
                Ok(()) => {
                    if direct_end < end {
                        let from = direct_end.max(off);
                        self.file.read_exact_at(
                            &mut buf[(from - lo) as usize..(end - lo) as usize],
                            from,
                        )?;
                    }
                    let skip = (off - lo) as usize;
                    return Ok(&buf[skip..skip + len as usize]);
                }
                Err(e) if is_refusal(&e) => self.refused.store(true, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        let part = &mut buf[..len as usize];
        self.file.read_exact_at(part, off)?;
        Ok(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::noise;

    #[test]
    fn split_leaves_only_the_unaligned_edges() {
        // (head, middle); the tail is what is left: 0, 1908, 0, 4095, 0.
        assert_eq!(split(0, 8192, 4096), (0, 8192));
        assert_eq!(split(100, 10_000, 4096), (3996, 4096));
        assert_eq!(split(100, 50, 4096), (50, 0));
        assert_eq!(split(4096, 4095, 4096), (0, 0));
        assert_eq!(split(4095, 4097, 4096), (1, 4096));
    }

    /// Two chunks whose pieces start and end inside blocks, and share one block, land
    /// byte-exact, with and without O_DIRECT, and hash back to what was written.
    #[test]
    fn unaligned_pieces_round_trip_with_and_without_direct_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        for direct in [true, false] {
            // Empty, then sized through the disk, as a deploy sizes a new file target.
            File::create(&path).expect("disk");
            let mut disk = Disk::open(&path, true).expect("open");
            disk.set_len(1 << 20).expect("size");
            assert_eq!(disk.size(), 1 << 20);
            if !direct {
                disk.direct = None;
            } else if disk.direct.is_none() {
                eprintln!("the temporary directory's filesystem refuses O_DIRECT: page cache only");
            }
            let a: Vec<(u64, u64)> = vec![(100, 20_000), (65_536, 8192)];
            let b: Vec<(u64, u64)> = vec![(20_100, 5000), (131_072 + 7, 3)];
            let (da, db) = (noise(28_192), noise(5003));
            let cached_a = disk.write_pieces(&a, &da).expect("write a");
            disk.write_pieces(&b, &db).expect("write b");
            if disk.direct.is_some() && disk.align == 4096 {
                // 100..4096 and 16384..20100 through the cache; the rest direct.
                assert_eq!(cached_a, 3996 + 3716);
            } else {
                assert_eq!(cached_a, 28_192);
            }
            disk.file().sync_all().expect("sync");
            let on_disk = std::fs::read(&path).expect("read");
            assert_eq!(&on_disk[100..20_100], &da[..20_000]);
            assert_eq!(&on_disk[65_536..73_728], &da[20_000..]);
            assert_eq!(&on_disk[20_100..25_100], &db[..5000]);
            assert_eq!(&on_disk[131_079..131_082], &db[5000..]);
            assert_eq!(
                disk.hash_pieces(&a).expect("hash a").0,
                *blake3::hash(&da).as_bytes()
            );
            assert_eq!(
                disk.hash_pieces(&b).expect("hash b").0,
                *blake3::hash(&db).as_bytes()
            );
        }
    }

    /// A disk whose size is not a multiple of the block: a chunk that ends in its last,
    /// partial block is written and read back whole, and the read-back still counts as
    /// the device's.
    #[test]
    fn a_piece_in_the_partial_last_block_of_an_odd_sized_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let size = (1u64 << 20) + 512;
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("disk");
        let disk = Disk::open(&path, true).expect("open");
        let piece = [(size - 9000, 9000)];
        let data = noise(9000);
        disk.write_pieces(&piece, &data).expect("write");
        disk.file().sync_all().expect("sync");
        assert_eq!(
            disk.hash_pieces(&piece).expect("hash").0,
            *blake3::hash(&data).as_bytes()
        );
        let mut seen = Vec::new();
        disk.read_windows(size - 9000, 9000, 4000, |_, b| {
            seen.extend_from_slice(b);
            Ok(true)
        })
        .expect("windows");
        assert_eq!(seen, data);
        if disk.direct.is_some() {
            assert_eq!(disk.read_back(), "device");
        }
    }

    #[test]
    fn a_chunk_shorter_than_its_places_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        File::create(&path)
            .and_then(|f| f.set_len(1 << 16))
            .expect("disk");
        let disk = Disk::open(&path, true).expect("open");
        let e = disk
            .write_pieces(&[(0, 8192)], &[1; 100])
            .expect_err("short");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
