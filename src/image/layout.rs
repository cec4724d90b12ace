//! What is on a disk: its partition table (MBR, with logical partitions, or GPT), the
//! filesystem of each partition, and which byte ranges hold data worth keeping.
//!
//! ext4 and NTFS are read from their own allocation bitmaps (an ext4 that was not
//! cleanly unmounted with its journal's copies of them too); anything else (and any
//! filesystem whose metadata looks wrong) counts as used whole, so an image is never
//! missing data because a bitmap was misread.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::fsmeta::{Ext4, Ntfs, data_attributes, le16, le32, le64, read_at, set_bits};

/// Sectors as partition tables count them. 4Kn disks are found by their GPT header.
const SECTOR: u64 = 512;
/// The granularity of the used map: the usual filesystem block.
pub const BLOCK: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    None,
    Mbr,
    Gpt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    Ext4,
    Ntfs,
    /// Read through partclone's used-block map when partclone is installed, else whole.
    Fat,
    Exfat,
    Xfs,
    Btrfs,
    /// Anything else: kept whole.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// 1-based, as the OS numbers it (logical MBR partitions from 5).
    pub number: u32,
    pub start: u64,
    pub bytes: u64,
    /// MBR type byte as `0x83`, or the GPT type GUID.
    pub kind: String,
    pub fs: Fs,
    /// Bytes the filesystem says are in use (the whole partition for `other`).
    pub used_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub disk_bytes: u64,
    pub table: TableKind,
    /// The sector size the table uses.
    pub sector: u64,
    pub partitions: Vec<Partition>,
    /// Byte ranges to capture, sorted, disjoint, block aligned (clipped to the disk).
    #[serde(skip)]
    pub used: Vec<(u64, u64)>,
}

/// GUIDs are stored with their first three fields little-endian.
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(b, 0),
        le16(b, 4),
        le16(b, 6),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Read the layout of the disk (or disk image file) `f` of `disk_bytes`.
pub fn read(f: &File, disk_bytes: u64) -> io::Result<Layout> {
    let mut layout = Layout {
        disk_bytes,
        table: TableKind::None,
        sector: SECTOR,
        partitions: Vec::new(),
        used: Vec::new(),
    };
    let mut parts: Vec<RawPart> = Vec::new();
    if disk_bytes >= 2 * SECTOR {
        if let Some((sector, gpt)) = read_gpt(f, disk_bytes)? {
            layout.table = TableKind::Gpt;
            layout.sector = sector;
            parts = gpt;
        } else if let Some(mbr) = read_mbr(f, disk_bytes)? {
            layout.table = TableKind::Mbr;
            parts = mbr;
        }
    }
    let mut used: Vec<(u64, u64)> = Vec::new();
    if layout.table == TableKind::None {
        // A bare filesystem, or unknown content.
        let (fs, runs) = fs_used(f, 0, disk_bytes)?;
        layout.partitions.push(Partition {
            number: 0,
            start: 0,
            bytes: disk_bytes,
            kind: "none".into(),
            fs,
            used_bytes: runs.iter().map(|r| r.1).sum(),
        });
        used.extend(runs);
    } else {
        let first = parts.iter().map(|p| p.1).min().unwrap_or(disk_bytes);
        // The table itself and whatever boot loader sits before the first partition.
        used.push((0, first.min(disk_bytes)));
        // The GPT backup, and the tail of the disk.
        let tail = (1 << 20).min(disk_bytes);
        used.push((disk_bytes - tail, tail));
        for (number, start, bytes, kind) in parts {
            let bytes = bytes.min(disk_bytes.saturating_sub(start));
            let (fs, runs) = fs_used(f, start, bytes)?;
            layout.partitions.push(Partition {
                number,
                start,
                bytes,
                kind,
                fs,
                used_bytes: runs.iter().map(|r| r.1).sum(),
            });
            used.extend(runs);
        }
    }
    layout.used = normalize(used, disk_bytes);
    Ok(layout)
}

/// Sorted, merged, widened to whole blocks, clipped to the disk.
pub fn normalize(mut runs: Vec<(u64, u64)>, disk_bytes: u64) -> Vec<(u64, u64)> {
    for r in runs.iter_mut() {
        let start = r.0 / BLOCK * BLOCK;
        let end = (r.0 + r.1)
            .div_ceil(BLOCK)
            .saturating_mul(BLOCK)
            .min(disk_bytes);
        *r = (start, end.saturating_sub(start));
    }
    runs.retain(|r| r.1 > 0);
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, l) in runs {
        match out.last_mut() {
            Some(last) if s <= last.0 + last.1 => {
                let end = (last.0 + last.1).max(s + l);
                last.1 = end - last.0;
            }
            _ => out.push((s, l)),
        }
    }
    out
}

/// A partition as a table lists it: number, start and length in bytes, type.
type RawPart = (u32, u64, u64, String);

fn read_gpt(f: &File, disk_bytes: u64) -> io::Result<Option<(u64, Vec<RawPart>)>> {
    for sector in [512u64, 4096] {
        if disk_bytes < sector * 3 {
            continue;
        }
        let h = read_at(f, sector, 92)?;
        if &h[0..8] != b"EFI PART" {
            continue;
        }
        let entries_lba = le64(&h, 72);
        let count = le32(&h, 80).min(1024);
        let size = le32(&h, 84);
        if !(128..=4096).contains(&size) {
            continue;
        }
        let at = entries_lba.saturating_mul(sector);
        if at.saturating_add(count * size) > disk_bytes {
            continue;
        }
        let table = read_at(f, at, (count * size) as usize)?;
        let mut parts = Vec::new();
        for i in 0..count {
            let e = &table[(i * size) as usize..((i + 1) * size) as usize];
            if e[..16].iter().all(|&b| b == 0) {
                continue;
            }
            let (first, last) = (le64(e, 32), le64(e, 40));
            if last < first {
                continue;
            }
            parts.push((
                i as u32 + 1,
                first * sector,
                (last - first + 1) * sector,
                guid(&e[..16]),
            ));
        }
        return Ok(Some((sector, parts)));
    }
    Ok(None)
}

fn read_mbr(f: &File, disk_bytes: u64) -> io::Result<Option<Vec<RawPart>>> {
    let mbr = read_at(f, 0, 512)?;
    // A bare NTFS or exFAT boot sector ends in 55 AA too; its OEM name tells it apart.
    if mbr[510] != 0x55 || mbr[511] != 0xAA || matches!(&mbr[3..11], b"NTFS    " | b"EXFAT   ") {
        return Ok(None);
    }
    let entry = |b: &[u8], i: usize| {
        let e = &b[446 + 16 * i..446 + 16 * (i + 1)];
        (e[4], le32(e, 8) * SECTOR, le32(e, 12) * SECTOR)
    };
    // A boot sector of a bare FAT/NTFS filesystem also ends in 55 AA: its "entries"
    // are then code and point outside the disk.
    let mut parts = Vec::new();
    for i in 0..4 {
        let (kind, start, bytes) = entry(&mbr, i);
        if kind == 0 || bytes == 0 {
            continue;
        }
        if start + bytes > disk_bytes || start == 0 {
            return Ok(None);
        }
        if matches!(kind, 0x05 | 0x0F | 0x85) {
            // Logical partitions: a chain of EBRs, each holding one partition and a
            // link to the next (relative to the extended partition's start).
            let mut next = start;
            let mut number = 5;
            for _ in 0..128 {
                let ebr = read_at(f, next, 512)?;
                if ebr[510] != 0x55 || ebr[511] != 0xAA {
                    break;
                }
                let (k, rel, len) = entry(&ebr, 0);
                if k != 0 && len > 0 && next + rel + len <= disk_bytes {
                    parts.push((number, next + rel, len, format!("0x{k:02x}")));
                    number += 1;
                }
                let (k2, link, _) = entry(&ebr, 1);
                if k2 == 0 || link == 0 {
                    break;
                }
                next = start + link;
            }
            // The EBRs themselves are in the extended partition's gaps.
            parts.push((0, start, SECTOR, format!("0x{kind:02x}")));
            continue;
        }
        parts.push((i as u32 + 1, start, bytes, format!("0x{kind:02x}")));
    }
    // No entry at all: boot code without a table, or a filesystem's boot sector.
    Ok((!parts.is_empty()).then_some(parts))
}

/// The filesystem in `[start, start+bytes)` and its used byte ranges (absolute).
fn fs_used(f: &File, start: u64, bytes: u64) -> io::Result<(Fs, Vec<(u64, u64)>)> {
    let whole = vec![(start, bytes)];
    if bytes < 4096 {
        return Ok((Fs::Other, whole));
    }
    let head = read_at(f, start, 4096)?;
    if le16(&head, 1024 + 56) == 0xEF53 {
        return Ok(match ext4_used(f, start, bytes, &head[1024..2048])? {
            Some(runs) => (Fs::Ext4, runs),
            None => (Fs::Ext4, whole),
        });
    }
    if &head[3..11] == b"NTFS    " {
        return Ok(match ntfs_used(f, start, bytes, &head)? {
            Some(runs) => (Fs::Ntfs, runs),
            None => (Fs::Ntfs, whole),
        });
    }
    let boot = head[510] == 0x55 && head[511] == 0xAA;
    let fs = if &head[3..11] == b"EXFAT   " {
        Fs::Exfat
    } else if boot
        && (&head[0x52..0x57] == b"FAT32" || matches!(&head[0x36..0x3B], b"FAT12" | b"FAT16"))
    {
        Fs::Fat
    } else if &head[..4] == b"XFSB" {
        Fs::Xfs
    } else if bytes > 0x10048 && read_at(f, start + 0x10040, 8)? == b"_BHRfS_M" {
        Fs::Btrfs
    } else {
        return Ok((Fs::Other, whole));
    };
    Ok(match partclone_used(f, start, bytes, fs) {
        Some(runs) => (fs, runs),
        None => (fs, whole),
    })
}

/// The used byte ranges (absolute) partclone maps for the `fs` filesystem in
/// `[start, start+bytes)`: `partclone.FS -D` writes a ddrescue domain file of the used
/// blocks without reading them. Through a read-only loop device over the partition, so
/// a disk image file and a block device go the same way. `None` when partclone, the
/// loop device (root) or the map is not to be had: the partition is then kept whole.
fn partclone_used(f: &File, start: u64, bytes: u64, fs: Fs) -> Option<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    use std::process::Command;
    let tool = match fs {
        Fs::Fat => "partclone.fat",
        Fs::Exfat => "partclone.exfat",
        Fs::Xfs => "partclone.xfs",
        Fs::Btrfs => "partclone.btrfs",
        _ => return None,
    };
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.exists())?;
    // The disk as this process opened it (a file or a block device), named for losetup.
    let source = format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
    let lo =
        super::loopdev::PartitionLoop::attach(std::path::Path::new(&source), start, bytes, true)
            .ok()?;
    let map = std::env::temp_dir().join(format!("fleetwave-{}-{start}.domain", std::process::id()));
    // Created here, exclusively: partclone then writes into our file, never through a
    // link someone left at that name.
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&map)
        .is_err()
    {
        return None;
    }
    let ran = Command::new(&found)
        .args(["-D", "-L", "/dev/null", "-s", &lo.dev, "-O"])
        .arg(&map)
        .output();
    drop(lo);
    let text = std::fs::read_to_string(&map).ok();
    let _ = std::fs::remove_file(&map);
    if !ran.ok()?.status.success() {
        return None;
    }
    let runs = parse_domain(&text?, bytes)?;
    Some(runs.into_iter().map(|(o, l)| (start + o, l)).collect())
}

/// The `+` (used) ranges of a ddrescue domain file, relative to the partition; `None`
/// if a line does not parse or a range leaves the partition.
fn parse_domain(text: &str, bytes: u64) -> Option<Vec<(u64, u64)>> {
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    let mut runs = Vec::new();
    // The first line that is not a comment is the current position and status.
    let lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .skip(1);
    for line in lines {
        let mut w = line.split_whitespace();
        let (pos, size, status) = (hex(w.next()?)?, hex(w.next()?)?, w.next()?);
        if pos.checked_add(size)? > bytes {
            return None;
        }
        if status == "+" && size > 0 {
            runs.push((pos, size));
        }
    }
    Some(runs)
}

/// Blocks marked in ext2/3/4 block bitmaps, plus every group's metadata. `None` when
/// the numbers do not add up, or the filesystem needs recovery and its journal cannot
/// be read.
fn ext4_used(f: &File, start: u64, bytes: u64, sb: &[u8]) -> io::Result<Option<Vec<(u64, u64)>>> {
    let Some(fs) = Ext4::read(f, start, bytes, sb)? else {
        return Ok(None);
    };
    let (bs, blocks) = (fs.bs, fs.blocks);
    // Not cleanly unmounted: a bitmap counts with every journaled copy of it.
    let journaled = if fs.recovering {
        let bitmaps: std::collections::HashSet<u64> =
            (0..fs.groups).map(|g| fs.group(g).block_bitmap).collect();
        match super::jbd2::journaled(f, start, &fs, sb, &|b| bitmaps.contains(&b)) {
            Some(j) => j,
            None => return Ok(None),
        }
    } else {
        Default::default()
    };
    let mut runs = Vec::new();
    let mut bitmap = vec![0u8; bs as usize];
    // Metadata, wherever flex_bg put it (its inode table spans s_inodes_per_group
    // inodes of s_inode_size bytes).
    let itable_blocks = (fs.inodes_per_group * fs.inode_size).div_ceil(bs);
    for g in 0..fs.groups {
        let gr = fs.group(g);
        for (b, n) in [
            (gr.block_bitmap, 1),
            (gr.inode_bitmap, 1),
            (gr.inode_table, itable_blocks),
        ] {
            if b < blocks {
                runs.push((start + b * bs, n.min(blocks - b) * bs));
            }
        }
        if fs.has_backup(g) {
            runs.push((
                start + gr.start * bs,
                (1 + fs.gdt_blocks + fs.reserved_gdt).min(gr.blocks) * bs,
            ));
        }
        if gr.block_bitmap >= blocks {
            return Ok(None);
        }
        let copies = journaled.get(&gr.block_bitmap).map_or(&[][..], |c| &c[..]);
        // BLOCK_UNINIT: nothing but the metadata above, unless the journal says more.
        let on_disk = gr.flags & 0x2 == 0;
        if on_disk {
            f.read_exact_at(&mut bitmap, start + gr.block_bitmap * bs)?;
        } else {
            bitmap.fill(0);
        }
        for copy in copies {
            bitmap.iter_mut().zip(copy).for_each(|(b, c)| *b |= c);
        }
        set_bits(&bitmap, gr.blocks, |first, n| {
            runs.push((start + (gr.start + first) * bs, n * bs));
        });
    }
    // Boot block and superblock of block 0 (1 KiB block filesystems start at block 1).
    runs.push((start, 2048.max(bs).min(bytes)));
    Ok(Some(runs))
}

/// Clusters marked in NTFS's `$Bitmap` (MFT record 6), plus the space after the
/// volume (the backup boot sector). `None` when any structure does not check out.
fn ntfs_used(f: &File, start: u64, bytes: u64, boot: &[u8]) -> io::Result<Option<Vec<(u64, u64)>>> {
    let Some(fs) = Ntfs::read(boot, bytes) else {
        return Ok(None);
    };
    let (cluster, volume) = (fs.cluster, fs.volume);
    let mft = fs
        .mft_lcn
        .saturating_mul(cluster)
        .saturating_add(6 * fs.record);
    if mft.saturating_add(fs.record) > volume {
        return Ok(None);
    }
    let mut rec = read_at(f, start + mft, fs.record as usize)?;
    if !fs.fixup(&mut rec) {
        return Ok(None);
    }
    // The unnamed $DATA attribute (the first one with a size).
    let Some((data_runs, size)) = data_attributes(&rec)
        .unwrap_or_default()
        .into_iter()
        .find(|(_, size)| *size > 0)
    else {
        return Ok(None);
    };
    let clusters = volume / cluster;
    if size < clusters.div_ceil(8) {
        return Ok(None);
    }
    let mut bitmap = Vec::with_capacity(size as usize);
    for (lcn, n) in data_runs {
        let Some(lcn) = lcn else {
            // Sparse run: zeros.
            bitmap.resize(bitmap.len() + (n * cluster) as usize, 0);
            continue;
        };
        if lcn.saturating_add(n).saturating_mul(cluster) > volume {
            return Ok(None);
        }
        bitmap.extend(read_at(f, start + lcn * cluster, (n * cluster) as usize)?);
    }
    if (bitmap.len() as u64) < clusters.div_ceil(8) {
        return Ok(None);
    }
    let mut out = Vec::new();
    set_bits(&bitmap, clusters, |first, n| {
        out.push((start + first * cluster, n * cluster));
    });
    out.push((start, cluster.min(bytes)));
    if bytes > volume {
        out.push((start + volume, bytes - volume));
    } else {
        // The backup boot sector is the volume's last sector.
        out.push((start + volume - fs.bps, fs.bps));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::super::fsmeta::decode_runs;
    use super::*;

    #[test]
    fn partclone_domain_files_are_read_strictly() {
        let good = "# Domain logfile\n# current_pos  current_status\n0x04000000     ?\n#      pos        size  status\n0x00000000  0x00100600  +\n0x00100600  0x00001000  ?\n0x00101600  0x00002000  +\n";
        assert_eq!(
            parse_domain(good, 0x0400_0000),
            Some(vec![(0, 0x0010_0600), (0x0010_1600, 0x2000)])
        );
        // A range past the partition, or a line that is not one: the map is not used.
        assert_eq!(parse_domain(good, 0x0010_0000), None);
        assert_eq!(parse_domain("0x0 ?\n0x0 zz +\n", 1 << 20), None);
        assert_eq!(
            parse_domain("0x0 ?\n0xffffffffffffffff 0x10 +\n", 1 << 20),
            None
        );
    }

    /// Disks are input too: garbage behind every magic number must not panic.
    #[test]
    fn garbage_disks_never_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d");
        let mut next = crate::testdata::xorshift(0x9E37_79B9_7F4A_7C15);
        for round in 0..200u64 {
            let mut disk: Vec<u8> = (0..(256 << 10)).map(|_| next() as u8).collect();
            match round % 4 {
                0 => disk[510..512].copy_from_slice(&[0x55, 0xAA]),
                1 => disk[512..520].copy_from_slice(b"EFI PART"),
                2 => disk[1024 + 56..1024 + 58].copy_from_slice(&[0x53, 0xEF]),
                _ => disk[3..11].copy_from_slice(b"NTFS    "),
            }
            if round % 8 >= 4 {
                // Plausible small numbers where the parsers read sizes.
                for at in [
                    0x0B,
                    0x0D,
                    0x28,
                    0x30,
                    0x40,
                    1024 + 24,
                    1024 + 32,
                    512 + 80,
                    512 + 84,
                ] {
                    disk[at] = (round % 7) as u8;
                    disk[at + 1] = 0;
                }
            }
            std::fs::write(&path, &disk).expect("write");
            let f = File::open(&path).expect("open");
            let _ = read(&f, disk.len() as u64);
        }
    }

    #[test]
    fn runs_are_merged_and_block_aligned() {
        let r = normalize(vec![(5000, 10), (0, 100), (8192, 4096), (20000, 1)], 30000);
        assert_eq!(r, vec![(0, 12288), (16384, 4096)]);
    }

    #[test]
    fn bit_runs_stop_at_the_count() {
        let mut runs = Vec::new();
        set_bits(&[0b1110_0001, 0xff, 0], 12, |a, n| runs.push((a, n)));
        assert_eq!(runs, vec![(0, 1), (5, 7)]);
    }

    #[test]
    fn ntfs_run_lists_decode_with_signed_offsets() {
        // 0x21: 1-byte length, 2-byte offset; then a negative offset.
        let runs = decode_runs(&[0x21, 0x10, 0x00, 0x10, 0x11, 0x04, 0xF0, 0x00]);
        assert_eq!(runs, vec![(Some(0x1000), 0x10), (Some(0x1000 - 0x10), 4)]);
    }
}
