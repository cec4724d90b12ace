//! Fitting a GPT to a larger disk: the backup header and entries move to the new end,
//! the usable area and the last partition grow to it, every CRC is recomputed, and
//! the protective MBR covers the new size.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grown {
    /// The partition's number (1-based entry index).
    pub partition: u32,
    /// Its first byte.
    pub start: u64,
    pub old_bytes: u64,
    pub new_bytes: u64,
    /// What became of the filesystem inside: grown by its tool, or why not.
    pub filesystem: Option<String>,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("GPT: {why}"))
}

/// Header CRC: over `size` bytes with the CRC field zeroed.
fn header_crc(h: &[u8], size: usize) -> u32 {
    let mut copy = h[..size].to_vec();
    put32(&mut copy, 16, 0);
    crc32fast::hash(&copy)
}

/// Grow the GPT on `f` to `disk_bytes`; `None` when the disk has no valid GPT.
pub fn grow(f: &File, disk_bytes: u64) -> io::Result<Option<Grown>> {
    let mut sector = 0;
    let mut h = Vec::new();
    for s in [512u64, 4096] {
        let mut b = vec![0u8; s as usize];
        if f.read_exact_at(&mut b, s).is_ok() && &b[..8] == b"EFI PART" {
            sector = s;
            h = b;
            break;
        }
    }
    if sector == 0 {
        return Ok(None);
    }
    let size = le32(&h, 12) as usize;
    if !(92..=sector as usize).contains(&size) || header_crc(&h, size) != le32(&h, 16) {
        return Err(bad("the primary header's CRC does not match"));
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80) as u64;
    let esize = le32(&h, 84) as u64;
    if !(128..=4096).contains(&esize) || count > 1024 {
        return Err(bad("unsupported entry size or count"));
    }
    let mut entries = vec![0u8; (count * esize) as usize];
    f.read_exact_at(&mut entries, entries_lba * sector)?;
    if crc32fast::hash(&entries) != le32(&h, 88) {
        return Err(bad("the partition entries' CRC does not match"));
    }
    let entry_sectors = (count * esize).div_ceil(sector);
    let last_lba = disk_bytes / sector - 1;
    let backup_entries = last_lba - entry_sectors;
    let last_usable = backup_entries - 1;
    if last_usable <= le64(&h, 48) {
        return Ok(None);
    }
    // The partition that ends last grows to the end, on a 1 MiB boundary.
    let align = (1 << 20) / sector;
    let mut last: Option<(usize, u64, u64)> = None;
    for i in 0..count as usize {
        let e = &entries[i * esize as usize..(i + 1) * esize as usize];
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, end) = (le64(e, 32), le64(e, 40));
        if last.is_none_or(|l| end > l.2) {
            last = Some((i, first, end));
        }
    }
    let mut grown = None;
    if let Some((i, first, end)) = last {
        let new_end = (last_usable + 1) / align * align - 1;
        if new_end > end {
            put64(&mut entries[i * esize as usize..], 40, new_end);
            grown = Some(Grown {
                partition: i as u32 + 1,
                start: first * sector,
                old_bytes: (end - first + 1) * sector,
                new_bytes: (new_end - first + 1) * sector,
                filesystem: None,
            });
        }
    }
    let entries_crc = crc32fast::hash(&entries);
    // Primary header.
    put64(&mut h, 32, last_lba);
    put64(&mut h, 48, last_usable);
    put32(&mut h, 88, entries_crc);
    let crc = header_crc(&h, size);
    put32(&mut h, 16, crc);
    // Backup header: the same, seen from the end.
    let mut b = h.clone();
    put64(&mut b, 24, last_lba);
    put64(&mut b, 32, 1);
    put64(&mut b, 72, backup_entries);
    let crc = header_crc(&b, size);
    put32(&mut b, 16, crc);
    f.write_all_at(&entries, backup_entries * sector)?;
    f.write_all_at(&b, last_lba * sector)?;
    f.write_all_at(&entries, entries_lba * sector)?;
    f.write_all_at(&h, sector)?;
    // Protective MBR: one 0xEE partition over the whole disk (capped at 2^32-1).
    let mut mbr = vec![0u8; 512];
    f.read_exact_at(&mut mbr, 0)?;
    for i in 0..4 {
        let e = 446 + 16 * i;
        if mbr[e + 4] == 0xEE {
            let n = (disk_bytes / 512 - 1).min(u64::from(u32::MAX)) as u32;
            put32(&mut mbr, e + 12, n);
            f.write_all_at(&mbr, 0)?;
            break;
        }
    }
    Ok(grown)
}
