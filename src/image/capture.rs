//! Capture: a disk's used, non-zero bytes cut into content-defined chunks, stored
//! once each, and the manifest that maps them back.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use serde::Serialize;

use super::chunker::{Chunks, Extents};
use super::manifest::{ChunkRef, Chunker, Manifest, PartitionTable};
use super::store::{self, Repo, StoreError};
use super::*;
use crate::spec::Digest;

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// zstd level (1-19) for chunks that compress, or `store::CHUNK_LEVEL`
    /// (docs/benchmarks.md compares them).
    pub level: i32,
    pub threads: usize,
    pub meter: Option<Arc<Meter>>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            level: store::CHUNK_LEVEL,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            meter: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CaptureReport {
    pub digest: Digest,
    pub disk_bytes: u64,
    /// Bytes the filesystems use (what was read).
    pub used_bytes: u64,
    /// Non-zero bytes among them (the data stream).
    pub data_bytes: u64,
    pub chunks: usize,
    /// Chunks the store did not have, their data bytes, and their compressed bytes:
    /// what crossed to it.
    pub new_chunks: usize,
    pub new_data_bytes: u64,
    pub new_stored_bytes: u64,
    /// Compressed bytes of all the version's chunks.
    pub stored_bytes: u64,
    pub seconds: f64,
}

/// Chunks a capture worker takes at once (one missing-chunk query for all).
const BATCH: usize = 16;

/// Capture the disk (or image file) at `disk` into `store`; with `name`, record the
/// version under that image with `generation`.
pub fn capture(
    disk: &Path,
    repo: &dyn Repo,
    name: Option<(&str, u64)>,
    opts: CaptureOptions,
) -> Result<CaptureReport> {
    let started = Instant::now();
    if let Some((n, _)) = name
        && !store::valid_name(n)
    {
        return Err(StoreError::BadName(n.into()).into());
    }
    let file = File::open(disk).map_err(io_err(disk))?;
    let disk_bytes = disk_size(&file).map_err(io_err(disk))?;
    let layout = layout::read(&file, disk_bytes).map_err(io_err(disk))?;
    let raw_len = match layout.table {
        layout::TableKind::Gpt => layout.sector * 34,
        layout::TableKind::Mbr => 512,
        layout::TableKind::None => 0,
    }
    .min(disk_bytes);
    let mut raw = vec![0u8; raw_len as usize];
    file.read_exact_at(&mut raw, 0).map_err(io_err(disk))?;
    let used_bytes = layout.used.iter().map(|r| r.1).sum();

    let extents = Arc::new(Mutex::new(Extents::default()));
    if let Some(m) = &opts.meter {
        m.total.store(used_bytes, Ordering::Relaxed);
    }
    let cdc = Chunks::new(
        file.try_clone().map_err(io_err(disk))?,
        layout.used.clone(),
        &extents::files(&file, &layout),
        extents.clone(),
        opts.meter.clone(),
    );

    // Workers hash, ask the repository, compress and store; the chunker runs here.
    let threads = opts.threads.max(1);
    let (tx, rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(threads * 2);
    let rx = Mutex::new(rx);
    // Per chunk index: its hash, length, and whether this capture stored it.
    type Done = Option<(Digest, u32, bool)>;
    let results: Mutex<Vec<Done>> = Mutex::default();
    let first_error: Mutex<Option<StoreError>> = Mutex::default();
    let new_stored = AtomicU64::new(0);
    let claimed: Mutex<HashSet<Digest>> = Mutex::default();
    let level = opts.level;
    let mut count = 0;
    let mut read_error = None;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    // Up to BATCH chunks at once, so a remote repository is asked
                    // about them in one round trip.
                    let batch: Vec<(usize, Vec<u8>)> = {
                        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                        let Ok(first) = rx.recv() else { break };
                        std::iter::once(first)
                            .chain(std::iter::from_fn(|| rx.try_recv().ok()).take(BATCH - 1))
                            .collect()
                    };
                    let digests: Vec<Digest> = batch
                        .iter()
                        .map(|(_, data)| Digest(*blake3::hash(data).as_bytes()))
                        .collect();
                    let lacking = repo.lacks_many(&digests).unwrap_or_else(|e| {
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        vec![false; digests.len()]
                    });
                    for (((i, data), d), lacks) in batch.into_iter().zip(digests).zip(lacking) {
                        let fresh =
                            lacks && claimed.lock().unwrap_or_else(|p| p.into_inner()).insert(d);
                        if fresh {
                            let r = store::compress_chunk(&data, level)
                                .map_err(|source| StoreError::Io {
                                    path: PathBuf::from(d.to_string()),
                                    source,
                                })
                                .and_then(|c| repo.put_chunk(&d, &data, &c));
                            match r {
                                Ok(n) => {
                                    new_stored.fetch_add(n, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    first_error
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .get_or_insert(e);
                                }
                            }
                        }
                        let mut res = results.lock().unwrap_or_else(|p| p.into_inner());
                        if res.len() <= i {
                            res.resize(i + 1, None);
                        }
                        res[i] = Some((d, data.len() as u32, fresh));
                    }
                }
            });
        }
        for chunk in cdc {
            match chunk {
                Ok(c) => {
                    if tx.send((count, c)).is_err() {
                        break;
                    }
                    count += 1;
                }
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
    });
    if let Some(e) = read_error {
        return Err(ImageError::Io {
            path: disk.to_owned(),
            source: e,
        });
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.into());
    }
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut chunks = Vec::with_capacity(count);
    let mut new_chunks = 0;
    let mut new_data_bytes = 0;
    for r in results.into_iter().take(count) {
        let Some((hash, len, fresh)) = r else {
            return Err(ImageError::Io {
                path: disk.to_owned(),
                source: io::Error::other("a chunk was lost between threads"),
            });
        };
        new_chunks += usize::from(fresh);
        if fresh {
            new_data_bytes += u64::from(len);
        }
        chunks.push(ChunkRef { hash, len });
    }
    let ext = std::mem::take(&mut *extents.lock().unwrap_or_else(|p| p.into_inner()));
    let data_bytes = chunks.iter().map(|c| u64::from(c.len)).sum();
    let manifest = Manifest {
        format: 1,
        disk_bytes,
        chunker: Chunker::current(),
        partition_table: PartitionTable {
            kind: layout.table,
            sector: layout.sector,
            partitions: layout.partitions.clone(),
            raw: raw.iter().map(|b| format!("{b:02x}")).collect(),
        },
        extents: ext.data,
        zero_extents: ext.zeros,
        chunks,
        data_bytes,
    };
    let (digest, stored_bytes) = repo.commit(&manifest, name)?;
    Ok(CaptureReport {
        digest,
        disk_bytes,
        used_bytes,
        data_bytes,
        chunks: manifest.chunks.len(),
        new_chunks,
        new_data_bytes,
        new_stored_bytes: new_stored.into_inner(),
        stored_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}
