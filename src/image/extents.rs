//! Where files' data lie on a disk, read from the filesystem's own records (ext4
//! inodes and extent trees, NTFS's MFT). The chunker cuts where a file's data starts
//! and ends, so a file that changes or moves costs its own chunks and not its
//! neighbours'. Best effort: a structure that does not check out ends the walk with
//! what was found, and the chunker then falls back to content-defined cuts alone.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::fsmeta::{
    Ext4, MAX_DEPTH, Ntfs, data_attributes, extent_node, le16, le32, read_at, set_bits,
};
use super::layout::{Fs, Layout};

/// (absolute byte offset, bytes) of each file data extent, unsorted.
pub type Extents = Vec<(u64, u64)>;

/// Inode tables are read this many bytes at a time.
const TABLE_READ: u64 = 1 << 20;

/// Regular files' extents in the ext2/3/4 filesystem at `start` (superblock `sb`).
pub fn ext4(f: &File, start: u64, bytes: u64, sb: &[u8]) -> Extents {
    let mut out = Vec::new();
    let Ok(Some(fs)) = Ext4::read(f, start, bytes, sb) else {
        return out;
    };
    let (bs, isize) = (fs.bs, fs.inode_size);
    if isize < 128 || fs.inodes_per_group == 0 {
        return out;
    }
    let mut bitmap = vec![0u8; bs as usize];
    for g in 0..fs.groups {
        let gr = fs.group(g);
        // INODE_UNINIT: no inode of this group is in use.
        if gr.flags & 0x1 != 0 || gr.inode_bitmap >= fs.blocks || gr.inode_table >= fs.blocks {
            continue;
        }
        if f.read_exact_at(&mut bitmap, start + gr.inode_bitmap * bs)
            .is_err()
        {
            return out;
        }
        let mut used = Vec::new();
        set_bits(&bitmap, fs.inodes_per_group, |first, n| {
            used.extend(first..first + n)
        });
        let table = start + gr.inode_table * bs;
        let table_end = start + fs.blocks * bs;
        let mut cached: (u64, Vec<u8>) = (u64::MAX, Vec::new());
        for i in used {
            let at = table + i * isize;
            let window = at - (at - table) % TABLE_READ;
            if cached.0 != window {
                let len = TABLE_READ.min(table_end.saturating_sub(window));
                match read_at(f, window, len as usize) {
                    Ok(b) => cached = (window, b),
                    Err(_) => return out,
                }
            }
            let off = (at - window) as usize;
            let Some(inode) = cached.1.get(off..off + 128) else {
                return out;
            };
            ext4_inode(f, start, &fs, inode, &mut out);
        }
    }
    out
}

/// One inode's data extents, if it is a regular file.
fn ext4_inode(f: &File, start: u64, fs: &Ext4, inode: &[u8], out: &mut Extents) {
    let mode = le16(inode, 0);
    let flags = le32(inode, 0x20);
    // Regular files only; inline data has no blocks of its own.
    if mode & 0xF000 != 0x8000 || flags & 0x1000_0000 != 0 {
        return;
    }
    let i_block = &inode[0x28..0x28 + 60];
    if flags & 0x8_0000 != 0 {
        let mut leaves = Vec::new();
        extent_node(f, start, fs, i_block, MAX_DEPTH, &mut leaves);
        out.extend(
            leaves
                .into_iter()
                .map(|(_, b, n)| (start + b * fs.bs, n * fs.bs)),
        );
    } else {
        // Block-mapped (ext2/3): the twelve direct blocks, one extent per run.
        let size = le32(inode, 4) | (le32(inode, 0x6C) << 32);
        let mut run: Option<(u64, u64)> = None;
        for k in 0..12.min(size.div_ceil(fs.bs) as usize) {
            let b = le32(i_block, 4 * k);
            if b == 0 || b >= fs.blocks {
                break;
            }
            run = match run {
                Some((s, n)) if s + n == b => Some((s, n + 1)),
                Some((s, n)) => {
                    out.push((start + s * fs.bs, n * fs.bs));
                    Some((b, 1))
                }
                None => Some((b, 1)),
            };
        }
        if let Some((s, n)) = run {
            out.push((start + s * fs.bs, n * fs.bs));
        }
    }
}

/// MFT records read at once.
const MFT_READ: u64 = 1 << 20;
/// Records 0 to 15 are NTFS's own files ($MFT, $LogFile, $Bitmap, ...): metadata.
const FIRST_USER_RECORD: u64 = 16;

/// Files' non-resident data runs in the NTFS filesystem at `start` (boot sector
/// `boot`), system files excluded.
pub fn ntfs(f: &File, start: u64, bytes: u64, boot: &[u8]) -> Extents {
    let mut out = Vec::new();
    let Some(fs) = Ntfs::read(boot, bytes) else {
        return out;
    };
    let cluster = fs.cluster;
    // $MFT's own runs, from record 0.
    let Ok(mut rec) = read_at(
        f,
        start + fs.mft_lcn.saturating_mul(cluster),
        fs.record as usize,
    ) else {
        return out;
    };
    if !fs.fixup(&mut rec) {
        return out;
    }
    let Some(mft_runs) = data_attributes(&rec).and_then(|a| a.into_iter().next()) else {
        return out;
    };
    let mut index = 0u64;
    for (lcn, n) in mft_runs.0 {
        let Some(lcn) = lcn else {
            index += n * cluster / fs.record;
            continue;
        };
        if lcn.saturating_add(n).saturating_mul(cluster) > fs.volume {
            return out;
        }
        let (run_start, run_bytes) = (start + lcn * cluster, n * cluster);
        let mut done = 0;
        while done < run_bytes {
            let len = MFT_READ.min(run_bytes - done);
            let Ok(mut batch) = read_at(f, run_start + done, len as usize) else {
                return out;
            };
            for rec in batch.chunks_exact_mut(fs.record as usize) {
                let this = index;
                index += 1;
                // In use (flag 0x1), a base record or an extension: both hold runs.
                if this < FIRST_USER_RECORD || !fs.fixup(rec) || le16(rec, 0x16) & 0x1 == 0 {
                    continue;
                }
                for (runs, _) in data_attributes(rec).unwrap_or_default() {
                    for (lcn, n) in runs {
                        let Some(lcn) = lcn else { continue };
                        if n > 0 && lcn.saturating_add(n).saturating_mul(cluster) <= fs.volume {
                            out.push((start + lcn * cluster, n * cluster));
                        }
                    }
                }
            }
            done += len;
        }
    }
    out
}

/// The data extents of the files of every ext4 and NTFS partition `layout` found,
/// sorted.
pub fn files(f: &File, layout: &Layout) -> Extents {
    let mut out = Vec::new();
    for p in &layout.partitions {
        let Ok(head) = read_at(f, p.start, 4096.min(p.bytes) as usize) else {
            continue;
        };
        match p.fs {
            Fs::Ext4 if head.len() >= 2048 => {
                out.extend(ext4(f, p.start, p.bytes, &head[1024..2048]))
            }
            Fs::Ntfs => out.extend(ntfs(f, p.start, p.bytes, &head)),
            _ => {}
        }
    }
    out.sort_unstable();
    out
}
