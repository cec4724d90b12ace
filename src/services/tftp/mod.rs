//! A read-only TFTP server for boot loaders: RFC 1350 with the options blksize,
//! tsize, timeout (RFC 2347/2348/2349) and windowsize (RFC 7440), retransmission on
//! timeout, block numbers that roll over past 65535, and many transfers at once.
//!
//! Everything served comes from one root directory: `..`, absolute paths and symlinks
//! that lead out are refused with an error packet, as are write requests.

pub mod packet;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use packet::{ErrorCode, Reply, Request};

/// The largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: usize = 65464;

#[derive(Debug, Clone)]
pub struct Config {
    /// Directory served read-only; nothing outside it is reachable.
    pub root: PathBuf,
    /// Transfers at once; requests beyond it get "server busy".
    pub max_transfers: usize,
    /// Transfers at once from one client address, so one machine (or one flood of
    /// requests) cannot take every slot.
    pub max_per_client: usize,
    /// Sends of one window before a silent client is given up.
    pub retries: u32,
    /// Retransmission timeout when the client asks for none.
    pub timeout: Duration,
    /// The largest window a client may ask for (RFC 7440 lets the server lower it).
    pub max_window: u16,
    /// The most bytes in flight in one window. A window larger than the client's socket
    /// buffer (208 KiB by default on Linux, counting kernel overhead per datagram) loses
    /// its tail every time, and an RFC 7440
    /// receiver then waits for its timeout: such windows are lowered in the OACK.
    pub max_window_bytes: usize,
    /// Files made on request (Secure Boot's GRUB configurations), asked before the root.
    pub generated: Option<Generator>,
}

/// What a requested name (without a leading `/`) is made of, if it is not a file of
/// the root.
#[derive(Clone)]
pub struct Generator(pub Arc<GenerateFn>);

pub type GenerateFn = dyn Fn(&str) -> Option<Generated> + Send + Sync;

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Generator")
    }
}

pub enum Generated {
    Bytes(Vec<u8>),
    /// A file outside the root, chosen by the server (never by the client's path).
    File(PathBuf),
}

impl Config {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Config {
            root: root.into(),
            max_transfers: 512,
            max_per_client: 16,
            retries: 5,
            timeout: Duration::from_secs(1),
            max_window: 64,
            max_window_bytes: 64 * 1024,
            generated: None,
        }
    }
}

/// Counters, for logs, the health endpoint and tests.
#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    pub transfers_done: AtomicU64,
    pub transfers_failed: AtomicU64,
    pub refused: AtomicU64,
    /// Packets dropped as malformed.
    pub malformed: AtomicU64,
    pub retransmits: AtomicU64,
    /// Bytes of files sent in transfers that completed.
    pub bytes_sent: AtomicU64,
}

/// Serve on `socket` until `shutdown` is cancelled. The caller owns the socket, so tests
/// bind port 0 and the service binds port 69 on the site's address.
pub async fn run(
    socket: UdpSocket,
    config: Config,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let root = config.root.canonicalize().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("TFTP root {}: {e}", config.root.display()),
        )
    })?;
    let local_ip = socket.local_addr()?.ip();
    let config = Arc::new(Config { root, ..config });
    let slots = Arc::new(Semaphore::new(config.max_transfers));
    let clients = super::PerClient::new(config.max_per_client);
    let transfers = tokio_util::task::TaskTracker::new();
    let mut buf = vec![0u8; 2048];
    info!(addr = %socket.local_addr()?, root = %config.root.display(), "tftp: serving");
    loop {
        let (len, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // ICMP errors from earlier sends surface here on Linux; not fatal.
                Err(e) => { debug!(error = %e, "tftp: receive error"); continue; }
            },
        };
        let request = match packet::parse_request(&buf[..len]) {
            Ok(r) => r,
            Err((why, op)) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, %why, "tftp: malformed request dropped");
                if op != 0 {
                    let _ = socket
                        .send_to(&packet::error(ErrorCode::IllegalOperation, why.0), peer)
                        .await;
                }
                continue;
            }
        };
        if request.write {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            info!(%peer, file = %request.filename, "tftp: write refused");
            let msg = "write requests are refused: this server is read-only";
            let _ = socket
                .send_to(&packet::error(ErrorCode::AccessViolation, msg), peer)
                .await;
            continue;
        }
        let Some(slot) = clients.take(peer.ip()) else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "tftp: too many transfers from this client");
            let msg = "too many transfers from your address at once, try again";
            let _ = socket
                .send_to(&packet::error(ErrorCode::NotDefined, msg), peer)
                .await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let _ = socket
                .send_to(
                    &packet::error(ErrorCode::NotDefined, "server busy, try again"),
                    peer,
                )
                .await;
            continue;
        };
        let (config, stats, shutdown) = (config.clone(), stats.clone(), shutdown.clone());
        transfers.spawn(async move {
            let _held = (permit, slot);
            let file = request.filename.clone();
            match transfer(request, peer, local_ip, &config, &stats, &shutdown).await {
                Ok(bytes) => {
                    stats.transfers_done.fetch_add(1, Ordering::Relaxed);
                    stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
                    info!(%peer, %file, bytes, "tftp: sent");
                }
                Err(e) => {
                    stats.transfers_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(%peer, %file, error = %e, "tftp: transfer failed");
                }
            }
        });
    }
    // No transfer outlives the server.
    transfers.close();
    transfers.wait().await;
    Ok(())
}

/// Why a transfer ended early.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("client sent error {0}: {1}")]
    Client(u16, String),
    #[error("no answer after {0} tries")]
    TimedOut(u32),
    #[error("stopped by shutdown")]
    Shutdown,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Options accepted for one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Negotiated {
    blksize: usize,
    timeout: Duration,
    window: u16,
}

fn negotiate(request: &Request, size: u64, config: &Config) -> (Negotiated, Vec<(String, String)>) {
    let mut n = Negotiated {
        blksize: 512,
        timeout: config.timeout,
        window: 1,
    };
    let mut accepted = Vec::new();
    let mut window_asked = false;
    for (name, value) in &request.options {
        match name.as_str() {
            "blksize" => {
                if let Ok(v) = value.parse::<usize>()
                    && v >= 8
                {
                    n.blksize = v.min(MAX_BLKSIZE);
                    accepted.push((name.clone(), n.blksize.to_string()));
                }
            }
            "tsize" => accepted.push((name.clone(), size.to_string())),
            "timeout" => {
                if let Ok(v) = value.parse::<u64>()
                    && (1..=255).contains(&v)
                {
                    n.timeout = Duration::from_secs(v);
                    accepted.push((name.clone(), v.to_string()));
                }
            }
            "windowsize" => {
                if let Ok(v) = value.parse::<u16>()
                    && v >= 1
                {
                    n.window = v.min(config.max_window);
                    window_asked = true;
                }
            }
            // Unknown options are left out of the OACK, as RFC 2347 says.
            _ => {}
        }
    }
    if window_asked {
        // Decided last: it depends on the block size, whatever the options' order.
        let fits = (config.max_window_bytes / n.blksize).clamp(1, usize::from(u16::MAX)) as u16;
        n.window = n.window.min(fits);
        accepted.push(("windowsize".to_string(), n.window.to_string()));
    }
    (n, accepted)
}

/// netascii: LF becomes CR LF and a bare CR becomes CR NUL (RFC 764).
fn to_netascii(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16);
    for &b in bytes {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

/// What is sent: the file itself, or its netascii form held in memory.
enum Source {
    File(std::fs::File),
    Memory(Vec<u8>),
}

impl Source {
    fn read_block(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::File(f) => {
                let mut filled = 0;
                while filled < buf.len() {
                    match f.read_at(&mut buf[filled..], offset + filled as u64)? {
                        0 => break,
                        n => filled += n,
                    }
                }
                Ok(filled)
            }
            Source::Memory(m) => {
                let start = (offset as usize).min(m.len());
                let n = buf.len().min(m.len() - start);
                buf[..n].copy_from_slice(&m[start..start + n]);
                Ok(n)
            }
        }
    }
}

/// netascii is for small text files; larger ones are refused rather than held in memory.
const MAX_NETASCII: u64 = 64 << 20;

async fn transfer(
    request: Request,
    peer: SocketAddr,
    local_ip: IpAddr,
    config: &Config,
    stats: &Stats,
    shutdown: &CancellationToken,
) -> Result<u64, TransferError> {
    // A fresh port per transfer (the server's transfer ID), from the address the client used.
    let bind_ip = if local_ip.is_unspecified() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        local_ip
    };
    let socket = UdpSocket::bind((bind_ip, 0)).await?;
    socket.connect(peer).await?;
    let refuse = |code: ErrorCode, msg: &str| {
        let pkt = packet::error(code, msg);
        let socket = &socket;
        let msg = msg.to_string();
        async move {
            let _ = socket.send(&pkt).await;
            TransferError::Refused(msg)
        }
    };
    if request.mode != "octet" && request.mode != "netascii" {
        return Err(refuse(
            ErrorCode::IllegalOperation,
            "only octet and netascii modes are served",
        )
        .await);
    }
    // GRUB asks for `/grub/grub.cfg`; other clients for `name`.
    let generated = config
        .generated
        .as_ref()
        .and_then(|g| (g.0)(request.filename.trim_start_matches('/')));
    let (source, size) = match generated {
        Some(Generated::Bytes(b)) => {
            let b = if request.mode == "netascii" {
                to_netascii(&b)
            } else {
                b
            };
            let len = b.len() as u64;
            (Source::Memory(b), len)
        }
        other => {
            let path = match other {
                Some(Generated::File(p)) => Ok(p),
                _ => super::confine(&config.root, &request.filename),
            };
            let path = match path {
                Ok(p) => p,
                Err(why) => {
                    let code = if why == "file not found" {
                        ErrorCode::FileNotFound
                    } else {
                        ErrorCode::AccessViolation
                    };
                    return Err(refuse(code, why).await);
                }
            };
            let file = std::fs::File::open(&path)?;
            if request.mode == "netascii" {
                if file.metadata()?.len() > MAX_NETASCII {
                    return Err(refuse(
                        ErrorCode::AccessViolation,
                        "file too large for netascii; use octet mode",
                    )
                    .await);
                }
                let text = std::fs::read(&path)?;
                let converted = to_netascii(&text);
                let len = converted.len() as u64;
                (Source::Memory(converted), len)
            } else {
                let len = file.metadata()?.len();
                (Source::File(file), len)
            }
        }
    };
    let (n, accepted) = negotiate(&request, size, config);
    // Blocks 1..=last; the last is shorter than blksize (empty when size divides evenly).
    let last = size / n.blksize as u64 + 1;
    let mut ack_buf = vec![0u8; 1024];

    if !accepted.is_empty() {
        let oack = packet::oack(&accepted);
        match exchange(
            &socket,
            &oack,
            &mut ack_buf,
            n.timeout,
            config.retries,
            stats,
            shutdown,
        )
        .await?
        {
            0 => {}
            other => {
                debug!(%peer, block = other, "tftp: unexpected ACK to OACK");
            }
        }
    }

    let mut next: u64 = 1; // first block not yet acknowledged
    let mut tries = 0;
    // The block whose loss was last answered at once; later duplicates of its ACK wait.
    let mut resent_after: Option<u64> = None;
    // Always whole windows: an RFC 7440 receiver acknowledges only when a window is
    // complete, so a smaller one would leave it waiting for its timeout.
    let window = u64::from(n.window);
    // The highest block sent so far: an ACK up to it is progress, even from an
    // earlier, larger window.
    let mut sent_max: u64 = 0;
    let mut block = vec![0u8; n.blksize];
    let mut out = Vec::with_capacity(n.blksize + 4);
    while next <= last {
        let end = (next + window - 1).min(last);
        sent_max = sent_max.max(end);
        for abs in next..=end {
            let len = source.read_block((abs - 1) * n.blksize as u64, &mut block)?;
            packet::data(abs as u16, &block[..len], &mut out);
            socket.send(&out).await?;
        }
        // Wait for an ACK inside the window; late duplicates are ignored (no resend on
        // a duplicate ACK: that is the Sorcerer's Apprentice bug).
        let acked = loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = socket.send(&packet::error(ErrorCode::NotDefined, "server shutting down")).await;
                    return Err(TransferError::Shutdown);
                }
                r = tokio::time::timeout(n.timeout, socket.recv(&mut ack_buf)) => r,
            };
            let len = match r {
                Err(_) => break None, // timeout
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(len)) => len,
            };
            match packet::parse_reply(&ack_buf[..len]) {
                // Progress: an ACK inside the window.
                Ok(Reply::Ack(b)) => {
                    if let Some(abs) = absolute(b, next, sent_max) {
                        break Some(abs);
                    }
                    // An ACK of the block before the window: the client lost the
                    // window's first block (RFC 7440). Answer the first such ACK at
                    // once; its duplicates would otherwise each trigger a whole window
                    // (the Sorcerer's Apprentice bug), so they wait for the timeout.
                    if absolute(b, next - 1, next - 1).is_some() && resent_after != Some(next - 1) {
                        resent_after = Some(next - 1);
                        break None;
                    }
                }
                Ok(Reply::Error(code, msg)) => return Err(TransferError::Client(code, msg)),
                Err(why) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, %why, "tftp: malformed reply dropped");
                }
            }
        };
        match acked {
            Some(abs) => {
                next = abs + 1;
                tries = 0;
            }
            None if resent_after == Some(next - 1) && tries == 0 => {
                // The immediate resend after a loss: not a timeout.
                tries = 1;
                stats.retransmits.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                tries += 1;
                stats.retransmits.fetch_add(1, Ordering::Relaxed);
                if tries >= config.retries {
                    // Tell the client, or it waits for blocks that will not come.
                    let msg = "transfer timed out: no acknowledgement";
                    let _ = socket
                        .send(&packet::error(ErrorCode::NotDefined, msg))
                        .await;
                    return Err(TransferError::TimedOut(tries));
                }
            }
        }
    }
    Ok(size)
}

/// The absolute block number in `[low, high]` whose low 16 bits are `b`.
fn absolute(b: u16, low: u64, high: u64) -> Option<u64> {
    let base = low & !0xffff;
    [base, base + 0x1_0000]
        .into_iter()
        .map(|hi| hi | u64::from(b))
        .find(|abs| (low..=high).contains(abs))
}

/// Send `pkt` and wait for an ACK, retrying on timeout. Returns the acknowledged block.
async fn exchange(
    socket: &UdpSocket,
    pkt: &[u8],
    buf: &mut [u8],
    timeout: Duration,
    retries: u32,
    stats: &Stats,
    shutdown: &CancellationToken,
) -> Result<u16, TransferError> {
    for attempt in 0..retries {
        if attempt > 0 {
            stats.retransmits.fetch_add(1, Ordering::Relaxed);
        }
        socket.send(pkt).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return Err(TransferError::Shutdown),
                r = tokio::time::timeout_at(deadline, socket.recv(buf)) => r,
            };
            let len = match r {
                Err(_) => break,
                Ok(r) => r?,
            };
            match packet::parse_reply(&buf[..len]) {
                Ok(Reply::Ack(b)) => return Ok(b),
                Ok(Reply::Error(code, msg)) => return Err(TransferError::Client(code, msg)),
                Err(_) => stats.malformed.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
    Err(TransferError::TimedOut(retries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_numbers_roll_over() {
        assert_eq!(absolute(0, 65535, 65540), Some(65536));
        assert_eq!(absolute(65535, 65535, 65540), Some(65535));
        assert_eq!(absolute(3, 65535, 65540), Some(65539));
        assert_eq!(absolute(9, 65535, 65540), None);
        assert_eq!(absolute(5, 0, 4), None);
        assert_eq!(absolute(4, 0, 4), Some(4));
    }

    #[test]
    fn paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("a.bin"), b"x").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/b.bin"), b"y").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("evil")).unwrap();
        std::os::unix::fs::symlink("a.bin", root.join("good")).unwrap();
        assert!(super::super::confine(&root, "a.bin").is_ok());
        assert!(super::super::confine(&root, "./sub/b.bin").is_ok());
        assert!(super::super::confine(&root, "good").is_ok());
        assert_eq!(
            super::super::confine(&root, "../etc/passwd"),
            Err("paths leading out of the served root are refused")
        );
        assert_eq!(
            super::super::confine(&root, "sub/../../x"),
            Err("paths leading out of the served root are refused")
        );
        assert_eq!(
            super::super::confine(&root, "/etc/passwd"),
            Err("absolute paths are refused")
        );
        assert_eq!(
            super::super::confine(&root, "evil"),
            Err("paths leading out of the served root are refused")
        );
        assert_eq!(super::super::confine(&root, "sub"), Err("file not found"));
        assert_eq!(super::super::confine(&root, "nope"), Err("file not found"));
    }

    #[test]
    fn netascii_conversion() {
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c");
    }
}
