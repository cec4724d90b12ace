//! An image version: everything needed to write a disk back, bit for bit, where it held
//! data. Its digest (BLAKE3 of its canonical JSON) is its name.

use serde::{Deserialize, Serialize};

use super::layout::{Partition, TableKind};
use crate::spec::Digest;

/// The chunker's parameters, recorded so a later capture can tell whether its chunk
/// boundaries can match this version's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunker {
    /// `fastcdc-v2020`, normalization level 1.
    pub algorithm: String,
    /// The exact crate version (pinned in Cargo.toml): boundaries depend on it.
    pub implementation: String,
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Chunker {
    pub fn current() -> Chunker {
        Chunker {
            algorithm: "fastcdc-v2020".into(),
            implementation: "fastcdc 5.0.0".into(),
            min: 128 * 1024,
            avg: 512 * 1024,
            max: 2048 * 1024,
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
        self.data_bytes + self.zero_extents.iter().map(|e| e.1).sum::<u64>()
    }
}
