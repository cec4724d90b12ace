//! The on-disk structures of ext2/3/4 and NTFS that capture reads: superblock and
//! group descriptors, extent trees, the NTFS boot sector, MFT records and run lists.
//! [`super::layout`] reads the allocation bitmaps through them, [`super::extents`] the
//! files, [`super::jbd2`] the journal.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub(super) fn le16(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}
pub(super) fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as u64
}
pub(super) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(super) fn read_at(f: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// An ext2/3/4 superblock's geometry, and its group descriptors.
pub(super) struct Ext4 {
    /// Block size in bytes.
    pub bs: u64,
    pub blocks: u64,
    first_data: u64,
    per_group: u64,
    pub groups: u64,
    desc_size: u64,
    pub gdt_blocks: u64,
    pub reserved_gdt: u64,
    sparse_super: bool,
    is64: bool,
    pub inodes_per_group: u64,
    pub inode_size: u64,
    /// needs_recovery: the journal holds changes the bitmaps may not show yet.
    pub recovering: bool,
    gdt: Vec<u8>,
}

/// One group descriptor's fields this reader uses (block numbers).
pub(super) struct Group {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub flags: u64,
    /// First block of the group, and how many blocks it has.
    pub start: u64,
    pub blocks: u64,
}

impl Ext4 {
    /// `None` when its numbers do not add up.
    pub fn read(f: &File, start: u64, bytes: u64, sb: &[u8]) -> io::Result<Option<Ext4>> {
        let log = le32(sb, 24);
        if log > 6 {
            return Ok(None);
        }
        let bs = 1024u64 << log;
        let incompat = le32(sb, 96);
        let is64 = incompat & 0x80 != 0;
        // meta_bg scatters the group descriptors, which this reader does not follow.
        if incompat & 0x10 != 0 {
            return Ok(None);
        }
        let blocks = le32(sb, 4) | if is64 { le32(sb, 336) << 32 } else { 0 };
        let first_data = le32(sb, 20);
        let per_group = le32(sb, 32);
        let desc_size = if is64 { le16(sb, 254).max(32) } else { 32 };
        if per_group == 0
            || blocks == 0
            || first_data >= blocks
            || blocks.saturating_mul(bs) > bytes
            || per_group > bs * 8
        {
            return Ok(None);
        }
        let groups = (blocks - first_data).div_ceil(per_group);
        let gdt_blocks = (groups * desc_size).div_ceil(bs);
        let gdt = read_at(f, start + (first_data + 1) * bs, (gdt_blocks * bs) as usize)?;
        Ok(Some(Ext4 {
            bs,
            blocks,
            first_data,
            per_group,
            groups,
            desc_size,
            gdt_blocks,
            reserved_gdt: le16(sb, 206),
            sparse_super: le32(sb, 100) & 0x1 != 0,
            is64,
            inodes_per_group: le32(sb, 40),
            inode_size: if le32(sb, 76) >= 1 { le16(sb, 88) } else { 128 },
            recovering: incompat & 0x4 != 0,
            gdt,
        }))
    }

    pub fn group(&self, g: u64) -> Group {
        let d = &self.gdt[(g * self.desc_size) as usize..((g + 1) * self.desc_size) as usize];
        let hi = |at: usize| {
            if self.is64 && self.desc_size >= 64 {
                le32(d, at) << 32
            } else {
                0
            }
        };
        let start = self.first_data + g * self.per_group;
        Group {
            block_bitmap: le32(d, 0) | hi(0x20),
            inode_bitmap: le32(d, 4) | hi(0x24),
            inode_table: le32(d, 8) | hi(0x28),
            flags: le16(d, 18),
            start,
            blocks: self.per_group.min(self.blocks - start),
        }
    }

    /// Whether group `g` holds a superblock backup and group descriptor copy.
    pub fn has_backup(&self, g: u64) -> bool {
        if !self.sparse_super || g <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = p;
            while x < g {
                x *= p;
            }
            x == g
        })
    }
}

/// Depth limit of an extent tree (ext4 allows 5).
pub(super) const MAX_DEPTH: u64 = 5;

/// An extent tree node (the inode's `i_block`, or a tree block): leaves are pushed
/// as (first logical block, first block, blocks), index entries followed down at most
/// `depth` levels.
pub(super) fn extent_node(
    f: &File,
    start: u64,
    fs: &Ext4,
    node: &[u8],
    depth: u64,
    out: &mut Vec<(u64, u64, u64)>,
) {
    if node.len() < 12 || le16(node, 0) != 0xF30A {
        return;
    }
    let entries = le16(node, 2) as usize;
    let node_depth = le16(node, 6);
    if node_depth > depth || 12 + 12 * entries > node.len() {
        return;
    }
    for e in node[12..12 + 12 * entries].chunks_exact(12) {
        if node_depth == 0 {
            // ee_len above 32768 marks an unwritten (preallocated) extent.
            let len = match le16(e, 4) {
                n if n > 32768 => n - 32768,
                n => n,
            };
            let block = (le16(e, 6) << 32) | le32(e, 8);
            if len > 0 && block.saturating_add(len) <= fs.blocks {
                out.push((le32(e, 0), block, len));
            }
        } else {
            let leaf = (le16(e, 8) << 32) | le32(e, 4);
            if leaf >= fs.blocks {
                continue;
            }
            if let Ok(child) = read_at(f, start + leaf * fs.bs, fs.bs as usize) {
                extent_node(f, start, fs, &child, node_depth - 1, out);
            }
        }
    }
}

/// An NTFS boot sector's geometry.
pub(super) struct Ntfs {
    /// Bytes per sector (the fix-up stride).
    pub bps: u64,
    pub cluster: u64,
    /// The volume's size in bytes.
    pub volume: u64,
    pub mft_lcn: u64,
    /// Bytes per MFT record.
    pub record: u64,
}

impl Ntfs {
    pub fn read(boot: &[u8], bytes: u64) -> Option<Ntfs> {
        let bps = le16(boot, 0x0B);
        let spc_raw = boot[0x0D] as u64;
        let spc = match spc_raw {
            0x81..=0xFF if 256 - spc_raw <= 16 => 1 << (256 - spc_raw),
            0x81..=0xFF => return None,
            n => n,
        };
        if !(256..=4096).contains(&bps) || spc == 0 {
            return None;
        }
        let cluster = bps * spc;
        let volume = le64(boot, 0x28).saturating_mul(bps);
        let cpr = boot[0x40] as i8;
        let record = match cpr {
            -16..=-1 => 1u64 << (-(cpr as i32)),
            c if c < 0 => return None,
            c => c as u64 * cluster,
        };
        if volume > bytes || !(512..=65536).contains(&record) {
            return None;
        }
        Some(Ntfs {
            bps,
            cluster,
            volume,
            mft_lcn: le64(boot, 0x30),
            record,
        })
    }

    /// Undo a record's update sequence fix-ups (the last two bytes of each sector
    /// hold a check value); `false` when the record is torn or not a record.
    pub fn fixup(&self, rec: &mut [u8]) -> bool {
        if rec.len() < 8 || &rec[0..4] != b"FILE" {
            return false;
        }
        let usa_off = le16(rec, 4) as usize;
        let usa_count = le16(rec, 6) as usize;
        if usa_off + 2 * usa_count > rec.len() {
            return false;
        }
        for i in 1..usa_count {
            let end = i * self.bps as usize;
            if end > rec.len() || rec[end - 2..end] != rec[usa_off..usa_off + 2] {
                return false;
            }
            let fix = [rec[usa_off + 2 * i], rec[usa_off + 2 * i + 1]];
            rec[end - 2..end].copy_from_slice(&fix);
        }
        true
    }
}

/// A fixed-up MFT record's non-resident `$DATA` attributes: their run lists and
/// (for the first of a stream) the stream's size. `None` when an attribute header
/// leaves the record.
pub(super) fn data_attributes(rec: &[u8]) -> Option<Vec<(Runs, u64)>> {
    let mut out = Vec::new();
    let mut at = le16(rec, 0x14) as usize;
    loop {
        if at + 16 > rec.len() {
            return None;
        }
        let kind = le32(rec, at);
        if kind == 0xFFFF_FFFF {
            return Some(out);
        }
        let len = le32(rec, at + 4) as usize;
        if len == 0 || at + len > rec.len() {
            return None;
        }
        if kind == 0x80 && rec[at + 8] == 1 {
            // A non-resident attribute header is 0x40 bytes.
            if len < 0x40 {
                return None;
            }
            let runs_at = at + le16(rec, at + 0x20) as usize;
            let named = rec[at + 9] != 0;
            out.push((
                decode_runs(&rec[runs_at.min(at + len)..at + len]),
                if named { 0 } else { le64(rec, at + 0x30) },
            ));
        }
        at += len;
    }
}

/// Each run of set bits among the first `count` bits (least significant first, as
/// ext4 and NTFS store them): `run(first, length)`.
pub(super) fn set_bits(bitmap: &[u8], count: u64, mut run: impl FnMut(u64, u64)) {
    let bit = |i: u64| bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0;
    let count = count.min(bitmap.len() as u64 * 8);
    let mut i = 0u64;
    while i < count {
        if i.is_multiple_of(8) && bitmap[(i / 8) as usize] == 0 {
            i += 8;
            continue;
        }
        if bit(i) {
            let first = i;
            while i < count && bit(i) {
                i += 1;
            }
            run(first, i - first);
        } else {
            i += 1;
        }
    }
}

/// An NTFS run list: (LCN or None for sparse, length in clusters).
pub(super) type Runs = Vec<(Option<u64>, u64)>;

pub(super) fn decode_runs(b: &[u8]) -> Runs {
    let mut out = Vec::new();
    let mut i = 0;
    let mut lcn: i64 = 0;
    while i < b.len() && b[i] != 0 {
        let h = b[i];
        let (ln, on) = ((h & 0x0F) as usize, (h >> 4) as usize);
        if ln == 0 || ln > 8 || on > 8 || i + 1 + ln + on > b.len() {
            break;
        }
        let mut len = 0u64;
        for k in 0..ln {
            len |= (b[i + 1 + k] as u64) << (8 * k);
        }
        if on == 0 {
            out.push((None, len));
        } else {
            let mut off: i64 = 0;
            for k in 0..on {
                off |= (b[i + 1 + ln + k] as i64) << (8 * k);
            }
            // Sign-extend.
            let shift = 64 - 8 * on as u32;
            off = (off << shift) >> shift;
            lcn += off;
            if lcn < 0 {
                break;
            }
            out.push((Some(lcn as u64), len));
        }
        i += 1 + ln + on;
    }
    out
}
