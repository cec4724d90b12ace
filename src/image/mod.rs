//! Disk images: capture a disk into the content-addressed store, deploy a version back
//! onto a disk, verify a disk against a version.
//!
//! A disk becomes a *data stream*: the bytes of its used blocks (filesystem bitmaps,
//! see [`layout`]) that are not all zeros, in disk order. The stream is cut into
//! content-defined chunks (FastCDC) and at files' boundaries (see `chunker`), so a
//! recapture stores only what changed. The manifest maps the stream back onto the disk.

mod capture;
mod chunker;
mod deploy;
pub(crate) mod disk;
mod extents;
mod fsmeta;
pub mod gpt;
pub mod growfs;
mod jbd2;
pub mod layout;
pub mod loopdev;
pub mod manifest;
mod pack;
pub mod remote;
pub mod store;
mod verify;

pub use capture::{CaptureOptions, CaptureReport, capture};
pub use deploy::{DeployReport, Target, deploy, deploy_metered, placements};
pub use verify::{VerifyReport, verify, verify_manifest};

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spec::Digest;
pub use store::Repo;
use store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "target {path} holds {have} bytes but the image needs {need}: choose a larger disk \
         (a smaller one cannot hold it)"
    )]
    TooSmall { path: PathBuf, have: u64, need: u64 },
    #[error(
        "{path} holds {have} bytes, fewer than the {need} of image {digest}: it cannot hold \
         this image (check the disk's path; a file target may have been cut short)"
    )]
    SmallerThanImage {
        path: PathBuf,
        digest: Digest,
        have: u64,
        need: u64,
    },
    #[error(
        "no disk {path}: `fleetwave agent disk` lists this machine's disks (a file target is \
         created, but never under /dev)"
    )]
    NoDevice { path: PathBuf },
    #[error(
        "verification failed on {path}: {bad} of {total} chunks differ from image {digest} \
         (first at disk offset {first_offset}); the disk does NOT hold this image"
    )]
    Verify {
        path: PathBuf,
        digest: Digest,
        bad: usize,
        total: usize,
        first_offset: u64,
    },
}

type Result<T> = std::result::Result<T, ImageError>;

fn io_err(path: &Path) -> impl Fn(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Start writing `f`'s dirty pages to the disk without waiting: a later fsync then
/// mostly waits for writes already under way.
fn start_writeback(f: &File) {
    // SAFETY: a valid descriptor owned by `f`; the call takes no pointers.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// The size of a disk or disk image file.
pub fn disk_size(mut f: &File) -> io::Result<u64> {
    let meta = f.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // A block device reports its size by seeking to its end.
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Progress of a capture or deploy, read by whoever reports it (a progress bar, the
/// server's progress endpoint).
#[derive(Debug, Default)]
pub struct Meter {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Meter {
    fn add(m: Option<&Meter>, n: u64) {
        if let Some(m) = m {
            m.done.fetch_add(n, Ordering::Relaxed);
        }
    }
}
