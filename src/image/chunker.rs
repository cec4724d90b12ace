//! The data stream and its chunker. The stream is a disk's used, non-zero blocks in
//! disk order. It is cut where the content says (FastCDC), and also where a file's
//! data starts and ends ([`super::extents`]): a file that changes or moves then costs
//! its own chunks and not its neighbours'. What lies outside files (inode tables,
//! bitmaps, directories, the MFT) changes a few blocks at a time, so it is cut one
//! block a chunk.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use fastcdc::v2020::{Normalization, cut, select_masks};
use serde::{Deserialize, Serialize};

use super::Meter;
use super::layout::BLOCK;

/// A chunker's minimum, average and maximum chunk sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// Chunk sizes inside files' data: large, because each chunk is compressed alone (at
/// 256 KiB the store grew 0.7 % on bench/image.sh's text and passed partclone+zstd's).
pub const DATA: Sizes = Sizes {
    min: 128 * 1024,
    avg: 512 * 1024,
    max: 2048 * 1024,
};
/// Chunk sizes outside files: one block each. An edit there changes a block here and
/// there (an inode or MFT record, a directory or index block, a bitmap), and a chunk of
/// one block moves just that block. Measured by bench/recapture.sh on 100 of 2,000
/// small files rewritten: CDC at 4/16/64 KiB moved 1.40-1.51 times their bytes on ext4
/// and 1.70-2.18 on NTFS, one block 1.26-1.42 on both.
pub const META: Sizes = Sizes {
    min: BLOCK as u32,
    avg: BLOCK as u32,
    max: BLOCK as u32,
};
/// A file boundary closer than this to the chunk's start cuts only if the file it
/// starts or ends is at least this long: only the smallest files share a chunk. Each
/// file alone also compresses better than a mix (a chunk that starts with random
/// bytes is stored at level 1, text after them included): at 64 KiB rewriting 100
/// files of 16 KB moved 3.5 to 4.9 times their bytes, and the store was larger.
const GROUP: u64 = 8 * 1024;

/// Where the data stream's bytes sit on the disk, filled in while the stream is read.
#[derive(Default)]
pub struct Extents {
    pub data: Vec<(u64, u64)>,
    pub zeros: Vec<(u64, u64)>,
}

fn push_run(v: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    match v.last_mut() {
        Some(last) if last.0 + last.1 == off => last.1 += len,
        _ => v.push((off, len)),
    }
}

/// A file boundary on the disk: what starts there (file data or not), and whether
/// it must cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    at: u64,
    data: bool,
    strong: bool,
}

/// The marks of sorted, disjoint file extents: a data mark at each start and a
/// metadata mark at each end not followed at once by another file.
fn marks(files: &[(u64, u64)]) -> Vec<Mark> {
    let mut out: Vec<Mark> = Vec::with_capacity(files.len() * 2);
    for &(start, len) in files {
        let strong = len >= GROUP;
        match out.last_mut() {
            // The previous file ends where this one starts.
            Some(m) if m.at == start => {
                *m = Mark {
                    at: start,
                    data: true,
                    strong: m.strong || strong,
                }
            }
            Some(m) if m.at > start => continue, // overlapping: a damaged filesystem
            _ => out.push(Mark {
                at: start,
                data: true,
                strong,
            }),
        }
        out.push(Mark {
            at: start + len,
            data: false,
            strong,
        });
    }
    out
}

const READ_SIZE: usize = 4 << 20;
static ZERO: [u8; BLOCK as usize] = [0; BLOCK as usize];

/// Reads the non-zero used blocks of a disk, in order, as one stream, and places the
/// file marks on it.
struct UsedData {
    file: File,
    runs: Vec<(u64, u64)>,
    run: usize,
    pos: u64,
    /// Marks by disk offset, and the next one to place.
    marks: Vec<Mark>,
    mark: usize,
    extents: Arc<Mutex<Extents>>,
    meter: Option<Arc<Meter>>,
    raw: Vec<u8>,
}

impl UsedData {
    /// Append the next non-zero blocks to `out` (nothing at the end), and the marks
    /// met on the way to `placed`, by stream offset (`base` is `out[0]`'s).
    fn fill(
        &mut self,
        out: &mut Vec<u8>,
        base: u64,
        placed: &mut VecDeque<Mark>,
    ) -> io::Result<()> {
        let raw = &mut self.raw;
        loop {
            let Some(&(start, len)) = self.runs.get(self.run) else {
                return Ok(());
            };
            let end = start + len;
            self.pos = self.pos.max(start);
            if self.pos >= end {
                self.run += 1;
                continue;
            }
            let n = ((end - self.pos) as usize).min(READ_SIZE);
            self.file.read_exact_at(&mut raw[..n], self.pos)?;
            let before = out.len();
            let mut ext = self.extents.lock().unwrap_or_else(|p| p.into_inner());
            for (i, block) in raw[..n].chunks(BLOCK as usize).enumerate() {
                let off = self.pos + (i as u64) * BLOCK;
                if block == &ZERO[..block.len()] {
                    push_run(&mut ext.zeros, off, block.len() as u64);
                    continue;
                }
                // Marks up to this block land on it: the stream has no bytes between.
                while let Some(&m) = self.marks.get(self.mark).filter(|m| m.at <= off) {
                    let at = base + out.len() as u64;
                    match placed.back_mut() {
                        Some(last) if last.at == at => {
                            last.data = m.data;
                            last.strong |= m.strong;
                        }
                        _ => placed.push_back(Mark { at, ..m }),
                    }
                    self.mark += 1;
                }
                push_run(&mut ext.data, off, block.len() as u64);
                out.extend_from_slice(block);
            }
            self.pos += n as u64;
            Meter::add(self.meter.as_deref(), n as u64);
            if out.len() > before {
                return Ok(());
            }
        }
    }
}

/// The chunks of a disk's data stream, in order.
pub struct Chunks {
    src: UsedData,
    /// Read ahead; `buf[head..]` is not yet chunked.
    buf: Vec<u8>,
    head: usize,
    /// The stream offset of `buf[head]`.
    start: u64,
    eof: bool,
    /// Marks ahead, by stream offset.
    placed: VecDeque<Mark>,
    /// Whether the stream at `start` is file data.
    data: bool,
    masks: [(u64, u64); 2],
}

impl Chunks {
    /// The stream of `runs` (sorted, disjoint, block aligned) of `file`, cut at the
    /// boundaries of `files` (sorted extents; none: content-defined cuts alone).
    pub fn new(
        file: File,
        runs: Vec<(u64, u64)>,
        files: &[(u64, u64)],
        extents: Arc<Mutex<Extents>>,
        meter: Option<Arc<Meter>>,
    ) -> Chunks {
        let marks = marks(files);
        Chunks {
            // Without file boundaries there is no telling data from metadata.
            data: marks.is_empty(),
            src: UsedData {
                file,
                runs,
                run: 0,
                pos: 0,
                marks,
                mark: 0,
                extents,
                meter,
                raw: vec![0u8; READ_SIZE],
            },
            buf: Vec::with_capacity(DATA.max as usize + READ_SIZE),
            head: 0,
            start: 0,
            eof: false,
            placed: VecDeque::new(),
            masks: [DATA, META].map(|s| select_masks(s.avg as usize, Normalization::Level1)),
        }
    }

    fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        while !self.eof && self.buf.len() - self.head < DATA.max as usize {
            // Moved down once per read, not once per chunk.
            self.buf.drain(..self.head);
            self.head = 0;
            let had = self.buf.len();
            self.src.fill(&mut self.buf, self.start, &mut self.placed)?;
            self.eof = self.buf.len() == had;
        }
        let ahead = &self.buf[self.head..];
        if ahead.is_empty() {
            return Ok(None);
        }
        while let Some(m) = self.placed.front().filter(|m| m.at <= self.start) {
            self.data = m.data;
            self.placed.pop_front();
        }
        let (sizes, (mask_s, mask_l)) = if self.data {
            (DATA, self.masks[0])
        } else {
            (META, self.masks[1])
        };
        let mut limit = ahead.len().min(sizes.max as usize);
        if let Some(m) = self.placed.iter().find(|m| {
            let d = m.at - self.start;
            d < limit as u64 && (m.strong || d >= GROUP)
        }) {
            limit = (m.at - self.start) as usize;
        }
        let (_, n) = cut(
            &ahead[..limit],
            sizes.min as usize,
            sizes.avg as usize,
            sizes.max as usize,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        let n = n.clamp(1, limit);
        let chunk = ahead[..n].to_vec();
        self.head += n;
        self.start += n as u64;
        Ok(Some(chunk))
    }
}

impl Iterator for Chunks {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<io::Result<Vec<u8>>> {
        self.next_chunk().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_files_share_one_data_mark_and_small_ones_are_weak() {
        let k = 1024;
        let m = marks(&[(0, 128 * k), (128 * k, 4 * k), (200 * k, 100 * k)]);
        let at: Vec<(u64, bool, bool)> = m.iter().map(|m| (m.at / k, m.data, m.strong)).collect();
        assert_eq!(
            at,
            [
                (0, true, true),
                (128, true, true),
                (132, false, false),
                (200, true, true),
                (300, false, true)
            ]
        );
    }
}
