//! An image version: everything needed to write a disk back, bit for bit, where it held
//! data. Its digest (BLAKE3 of its canonical JSON) is its name.

use serde::{Deserialize, Serialize};

use super::chunker::{DATA, META, Sizes};
use super::layout::{Partition, TableKind};
use crate::spec::Digest;

/// The chunker's parameters, recorded so a later capture can tell whether its chunk
/// boundaries can match this version's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunker {
    /// `fastcdc-v2020`, normalization level 1; `+file-extents` when it also cuts at
    /// files' boundaries.
    pub algorithm: String,
    /// The exact crate version (pinned in Cargo.toml): boundaries depend on it.
    pub implementation: String,
    /// Sizes inside files' data (everywhere, for versions without `metadata`).
    pub min: u32,
    pub avg: u32,
    pub max: u32,
    /// Sizes outside files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Sizes>,
}

impl Chunker {
    pub fn current() -> Chunker {
        Chunker {
            algorithm: "fastcdc-v2020+file-extents".into(),
            implementation: "fastcdc 5.0.0".into(),
            min: DATA.min,
            avg: DATA.avg,
            max: DATA.max,
            metadata: Some(META),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTable {
    pub kind: TableKind,
    pub sector: u64,
    pub partitions: Vec<Partition>,
    /// The first sectors as captured (MBR, GPT header and entries), hex.
    pub raw: String,
}

/// One chunk of the data stream: the used, non-zero bytes of the disk in disk order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: Digest,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub disk_bytes: u64,
    pub chunker: Chunker,
    pub partition_table: PartitionTable,
    /// Where the data stream lands on the disk: (offset, length), in order.
    pub extents: Vec<(u64, u64)>,
    /// Used ranges that were all zeros: not stored, written as zeros (or holes).
    pub zero_extents: Vec<(u64, u64)>,
    pub chunks: Vec<ChunkRef>,
    /// Sum of chunk lengths (= sum of extent lengths).
    pub data_bytes: u64,
}

impl Manifest {
    /// The canonical bytes: compact JSON of this struct, fields in declaration order.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn digest_of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Bytes the manifest says the disk uses (data and zeros).
    pub fn used_bytes(&self) -> u64 {
        // Saturating: a manifest that was never checked must not overflow.
        self.zero_extents
            .iter()
            .fold(self.data_bytes, |n, e| n.saturating_add(e.1))
    }

    /// Whether the manifest is consistent: every extent inside the disk, the data
    /// extents as long as the chunks, the sums as stated. A manifest comes from a
    /// capture's upload (or a file): checked before anything is computed from it.
    pub fn check(&self) -> Result<(), String> {
        let inside = |what: &str, list: &[(u64, u64)]| -> Result<u64, String> {
            let mut total = 0u64;
            for &(off, len) in list {
                off.checked_add(len)
                    .filter(|end| *end <= self.disk_bytes)
                    .ok_or_else(|| {
                        format!(
                            "{what} extent at {off} of {len} bytes ends past the disk ({} bytes)",
                            self.disk_bytes
                        )
                    })?;
                total = total
                    .checked_add(len)
                    .ok_or_else(|| format!("{what} extents overflow"))?;
            }
            Ok(total)
        };
        let data = inside("data", &self.extents)?;
        inside("zero", &self.zero_extents)?;
        let chunks = self
            .chunks
            .iter()
            .try_fold(0u64, |n, c| n.checked_add(u64::from(c.len)))
            .ok_or("chunk lengths overflow")?;
        if data != chunks || data != self.data_bytes {
            return Err(format!(
                "data extents hold {data} bytes, chunks {chunks}, data_bytes says {}",
                self.data_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real capture's manifest (an 8 MiB ext4 image), the fuzzer's seed.
    fn seed() -> Manifest {
        serde_json::from_str(include_str!("../../fuzz/seeds/manifest_read/ext4")).expect("seed")
    }

    #[test]
    fn a_captured_manifest_checks_and_inconsistent_ones_are_refused_without_overflow() {
        let m = seed();
        assert_eq!(m.check(), Ok(()));
        let mut big = m.clone();
        big.data_bytes = u64::MAX;
        big.zero_extents.push((0, 5));
        assert_eq!(big.used_bytes(), u64::MAX);
        assert!(big.check().is_err());
        let mut past = m.clone();
        past.extents = vec![(u64::MAX, 10)];
        assert!(past.check().unwrap_err().contains("past the disk"));
        assert_eq!(crate::image::placements(&past).len(), past.chunks.len());
        let mut short = m;
        short.data_bytes += 1;
        assert!(short.check().unwrap_err().contains("data_bytes"));
    }
}
