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

/// Offsets, lengths and buffers of direct I/O are multiples of this: the largest
/// logical block size of disks in use (4Kn), so it suits every disk.
const ALIGN: usize = 4096;

pub struct Disk {
    file: File,
    /// `None` where the filesystem refuses `O_DIRECT`: everything goes through `file`.
    direct: Option<File>,
    /// A read went through the page cache although `direct` is there.
    fell_back: AtomicBool,
}

/// `len` bytes at disk offset `off`, split where direct I/O can take over: a head up
/// to the first aligned offset, an aligned middle, and a tail after it. Chunks are
/// cut by content, so most start and end inside a block.
fn split(off: u64, len: u64) -> (u64, u64, u64) {
    let a = ALIGN as u64;
    let head = ((a - off % a) % a).min(len);
    let middle = (len - head) / a * a;
    (head, middle, len - head - middle)
}

/// Run `f` on this thread's buffer of `len` bytes, starting on an [`ALIGN`] boundary.
fn with_aligned<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with(|cell| {
        let mut v = cell.borrow_mut();
        if v.len() < len + ALIGN {
            v.resize(len + ALIGN, 0);
        }
        let start = v.as_ptr().align_offset(ALIGN);
        f(&mut v[start..start + len])
    })
}

impl Disk {
    /// Open `path` (for writing when `write`), and a second time with `O_DIRECT` where
    /// the filesystem allows it.
    pub fn open(path: &Path, write: bool) -> io::Result<Disk> {
        let file = OpenOptions::new().read(true).write(write).open(path)?;
        let direct = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(Disk {
            file,
            direct,
            fell_back: AtomicBool::new(false),
        })
    }

    /// The descriptor through the page cache: sizing, zero extents, syncs, tables.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Write `data` at `pieces`; returns the bytes that went through the page cache.
    pub fn write_pieces(&self, pieces: &[(u64, u64)], data: &[u8]) -> io::Result<u64> {
        let total: u64 = pieces.iter().map(|p| p.1).sum();
        if (data.len() as u64) < total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunk shorter than its places",
            ));
        }
        let (mut at, mut cached) = (0usize, 0u64);
        for &(off, len) in pieces {
            let part = &data[at..at + len as usize];
            at += len as usize;
            let (head, middle, _) = match self.direct {
                Some(_) => split(off, len),
                None => (len, 0, 0),
            };
            let (h, m) = (head as usize, (head + middle) as usize);
            self.file.write_all_at(&part[..h], off)?;
            if middle > 0 && !self.write_direct(&part[h..m], off + head) {
                self.file.write_all_at(&part[h..m], off + head)?;
                cached += middle;
            }
            self.file.write_all_at(&part[m..], off + m as u64)?;
            cached += len - middle;
        }
        Ok(cached)
    }

    /// Write aligned `data` at aligned `off` with `O_DIRECT`; false if that failed (a
    /// filesystem that took the flag at open but not for this write), nothing said.
    fn write_direct(&self, data: &[u8], off: u64) -> bool {
        self.direct.as_ref().is_some_and(|d| {
            with_aligned(data.len(), |buf| {
                buf.copy_from_slice(data);
                d.write_all_at(buf, off).is_ok()
            })
        })
    }

    /// Read the bytes at `pieces` and hash them: one chunk as the disk holds it.
    pub fn hash_pieces(&self, pieces: &[(u64, u64)]) -> io::Result<Digest> {
        let mut hasher = blake3::Hasher::new();
        for &(off, len) in pieces {
            with_aligned(len as usize + 2 * ALIGN, |buf| {
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
        let window = window.min(len as usize);
        let mut raw = vec![0u8; window + 3 * ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        let buf = &mut raw[start..start + window + 2 * ALIGN];
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

    /// Where the reads so far came from, for reports: `device` when every one came from
    /// the disk itself, else `page cache`.
    pub fn read_back(&self) -> &'static str {
        if self.direct.is_some() && !self.fell_back.load(Ordering::Relaxed) {
            "device"
        } else {
            "page cache"
        }
    }

    /// Read `len` bytes at `off` into the aligned `buf` (at least `len + 2 * ALIGN`
    /// long). With `O_DIRECT` the range is read with the blocks around it, so none of
    /// it comes from the page cache; without (or at the unaligned end of an odd-sized
    /// disk), through the page cache.
    fn read_into<'a>(&self, buf: &'a mut [u8], off: u64, len: u64) -> io::Result<&'a [u8]> {
        let a = ALIGN as u64;
        let (lo, hi) = (off / a * a, (off + len).div_ceil(a) * a);
        let skip = (off - lo) as usize;
        let direct = self
            .direct
            .as_ref()
            .is_some_and(|d| d.read_exact_at(&mut buf[..(hi - lo) as usize], lo).is_ok());
        if direct {
            return Ok(&buf[skip..skip + len as usize]);
        }
        if self.direct.is_some() {
            self.fell_back.store(true, Ordering::Relaxed);
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
        assert_eq!(split(0, 8192), (0, 8192, 0));
        assert_eq!(split(100, 10_000), (3996, 4096, 1908));
        assert_eq!(split(100, 50), (50, 0, 0));
        assert_eq!(split(4096, 4095), (0, 0, 4095));
        assert_eq!(split(4095, 4097), (1, 4096, 0));
    }

    /// Two chunks whose pieces start and end inside blocks, and share one block, land
    /// byte-exact, with and without O_DIRECT, and hash back to what was written.
    #[test]
    fn unaligned_pieces_round_trip_with_and_without_direct_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        for direct in [true, false] {
            File::create(&path)
                .and_then(|f| f.set_len(1 << 20))
                .expect("disk");
            let mut disk = Disk::open(&path, true).expect("open");
            if !direct {
                disk.direct = None;
            }
            let a: Vec<(u64, u64)> = vec![(100, 20_000), (65_536, 8192)];
            let b: Vec<(u64, u64)> = vec![(20_100, 5000), (131_072 + 7, 3)];
            let (da, db) = (noise(28_192), noise(5003));
            let cached_a = disk.write_pieces(&a, &da).expect("write a");
            disk.write_pieces(&b, &db).expect("write b");
            if disk.direct.is_some() {
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
