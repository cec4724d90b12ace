//! The ext3/4 journal (jbd2) of a filesystem that was not cleanly unmounted: still
//! mounted, or stopped by a power cut. Its block bitmaps on disk may lag behind the
//! journal, which the next mount replays. Capture then takes the union of each bitmap
//! and every journaled copy of it, so what the replay will call used is kept, and the
//! rest of the free space (deleted files) is still left out.

use std::collections::HashMap;
use std::fs::File;

use super::fsmeta::{Ext4, MAX_DEPTH, extent_node, le32, read_at};

const MAGIC: u64 = 0xC03B_3998;
const DESCRIPTOR: u64 = 1;
const COMMIT: u64 = 2;
const REVOKE: u64 = 5;
const FEATURE_64BIT: u64 = 0x2;
const FEATURE_CSUM_V2: u64 = 0x8;
const FEATURE_CSUM_V3: u64 = 0x10;
const FEATURE_FAST_COMMIT: u64 = 0x20;
const TAG_ESCAPE: u64 = 0x1;
const TAG_SAME_UUID: u64 = 0x2;
const TAG_LAST: u64 = 0x8;

fn be32(b: &[u8], at: usize) -> u64 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as u64
}

/// The copies that committed transactions (those a replay would apply) hold of the
/// filesystem blocks `want` picks: each block's copies, oldest first. `None` when the journal cannot be read with confidence (an
/// external journal, fast commits, a structure that does not check out): the
/// filesystem is then captured whole.
pub fn journaled(
    f: &File,
    start: u64,
    fs: &Ext4,
    sb: &[u8],
    want: &dyn Fn(u64) -> bool,
) -> Option<HashMap<u64, Vec<Vec<u8>>>> {
    let bs = fs.bs;
    let inum = le32(sb, 0xE0);
    // The journal inode lives in group 0 (inode numbers start at 1).
    if inum == 0 || inum > fs.inodes_per_group {
        return None;
    }
    let table = fs.group(0).inode_table;
    let inode = read_at(f, start + table * bs + (inum - 1) * fs.inode_size, 128).ok()?;
    let mut map = Vec::new();
    extent_node(f, start, fs, &inode[0x28..0x28 + 60], MAX_DEPTH, &mut map);
    if map.is_empty() {
        return None;
    }
    // Journal block -> filesystem block.
    let phys = |j: u64| {
        map.iter()
            .find(|&&(l, _, n)| j >= l && j < l + n)
            .map(|&(l, p, _)| p + (j - l))
    };
    let read = |j: u64| read_at(f, start + phys(j)? * bs, bs as usize).ok();
    let jsb = read(0)?;
    if be32(&jsb, 0) != MAGIC || !matches!(be32(&jsb, 4), 3 | 4) || be32(&jsb, 12) != bs {
        return None;
    }
    let (maxlen, first, mut seq, start_block) = (
        be32(&jsb, 16),
        be32(&jsb, 20),
        be32(&jsb, 24),
        be32(&jsb, 28),
    );
    let incompat = if be32(&jsb, 4) == 4 {
        be32(&jsb, 40)
    } else {
        0
    };
    let blocks: u64 = map.iter().map(|&(_, _, n)| n).sum();
    if incompat & FEATURE_FAST_COMMIT != 0 || first == 0 || first >= maxlen || maxlen > blocks {
        return None;
    }
    let mut out: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    if start_block == 0 {
        // Empty: nothing to replay.
        return Some(out);
    }
    let csum = incompat & (FEATURE_CSUM_V2 | FEATURE_CSUM_V3) != 0;
    let tag_bytes = if incompat & FEATURE_CSUM_V3 != 0 {
        16
    } else {
        let sz = 12
            + if incompat & FEATURE_CSUM_V2 != 0 {
                2
            } else {
                0
            };
        if incompat & FEATURE_64BIT != 0 {
            sz
        } else {
            sz - 4
        }
    };
    let wrap = |j: u64| if j >= maxlen { first + (j - maxlen) } else { j };
    let mut j = start_block;
    let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
    // Every block of the journal at most once.
    for _ in 0..maxlen {
        let Some(block) = read(j) else { break };
        if be32(&block, 0) != MAGIC || be32(&block, 8) != seq {
            break;
        }
        match be32(&block, 4) {
            DESCRIPTOR => {
                let end = bs as usize - if csum { 4 } else { 0 };
                let mut at = 12;
                while at + tag_bytes <= end {
                    let target = be32(&block, at)
                        | if incompat & FEATURE_64BIT != 0 {
                            be32(&block, at + 8) << 32
                        } else {
                            0
                        };
                    let flags = if tag_bytes == 16 {
                        be32(&block, at + 4)
                    } else {
                        u16::from_be_bytes([block[at + 6], block[at + 7]]) as u64
                    };
                    j = wrap(j + 1);
                    if want(target) {
                        let mut copy = read(j)?;
                        if flags & TAG_ESCAPE != 0 {
                            copy[..4].copy_from_slice(&(MAGIC as u32).to_be_bytes());
                        }
                        pending.push((target, copy));
                    }
                    at += tag_bytes + if flags & TAG_SAME_UUID == 0 { 16 } else { 0 };
                    if flags & TAG_LAST != 0 {
                        break;
                    }
                }
            }
            COMMIT => {
                for (target, copy) in pending.drain(..) {
                    out.entry(target).or_default().push(copy);
                }
                seq += 1;
            }
            // Revocations only stop older copies from being replayed; keeping those
            // copies in the union keeps more, never less.
            REVOKE => {}
            _ => break,
        }
        j = wrap(j + 1);
    }
    Some(out)
}
