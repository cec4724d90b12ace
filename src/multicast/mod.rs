//! Multicast deployment: one sender streams an image version's chunks to every
//! receiver of a session at once.
//!
//! - Rendezvous: the sender announces the session on the group; receivers join it by
//!   unicast; sending starts when `min_receivers` joined or `max_wait` passed.
//! - Data: each datagram names the version (digest prefix), its chunk, its part of the
//!   chunk, and a sequence number; the compressed chunks go out once, in order, paced
//!   to the rate the receivers keep up with (never above `max_rate`).
//! - Repair: receivers ask for the parts they missed (negative acknowledgements);
//!   repairs go out ahead of new data during the pass, then in rounds after it.
//!   Receivers that are done leave; a receiver that still lacks chunks when the
//!   session ends fetches them over HTTP. Nobody waits for the slowest.
//! - The rate backs off when most receivers report loss; a receiver whose loss does
//!   not go away at a lower rate is marked lossy and no longer slows the others.

pub mod receiver;
pub mod sender;
pub mod sessions;
pub mod wire;

use std::net::Ipv4Addr;
use std::path::Path;

pub use receiver::{ReceiveConfig, ReceiveReport, receive};
pub use sender::{SendConfig, SessionReport, send};

#[derive(Debug, thiserror::Error)]
pub enum McastError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "the session on {group} sends image version {announced}, but this deploy wants \
         {wanted}: refused (give each session its own multicast group or port)"
    )]
    WrongSession {
        group: String,
        announced: String,
        wanted: String,
    },
    #[error("the sender refused to let this receiver join: it sends another version")]
    Refused,
    #[error(transparent)]
    Store(#[from] crate::image::store::StoreError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> McastError {
    let what = what.into();
    move |source| McastError::Io { what, source }
}

/// A random 64-bit id (sessions, receivers): /dev/urandom, or the clock and pid.
fn random_id() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Set an integer socket option; false when the kernel refuses it.
fn set_int_option(fd: &impl std::os::fd::AsRawFd, level: i32, name: i32, value: i32) -> bool {
    let v = value as libc::c_int;
    // SAFETY: a valid descriptor, an int option value of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// The MTU of the interface that holds `addr`, from sysfs; 1500 when unknown.
pub fn mtu_of(addr: Ipv4Addr) -> usize {
    interface_of(addr)
        .and_then(|name| std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

/// The interface whose connected route holds `addr` (/proc/net/route; sysfs has no
/// IPv4 addresses).
fn interface_of(addr: Ipv4Addr) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    let a = u32::from(addr);
    // Addresses are printed as the native-endian value of network-order bytes.
    let field = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| u32::from_be_bytes(v.to_le_bytes()))
    };
    let mut best: Option<(u32, String)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dst), Some(mask)) = (
            f.get(1).and_then(|s| field(s)),
            f.get(7).and_then(|s| field(s)),
        ) else {
            continue;
        };
        if mask != 0 && a & mask == dst && best.as_ref().is_none_or(|b| mask > b.0) {
            best = Some((mask, f[0].to_string()));
        }
    }
    best.map(|b| b.1)
}

/// The index of network interface `name`.
pub fn if_index(name: &str) -> Option<u32> {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The first interface that is up and not loopback: where a receiver joins when
/// told nothing else.
pub fn default_interface() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        std::fs::read_to_string(format!("/sys/class/net/{n}/operstate"))
            .is_ok_and(|s| s.trim() == "up")
    })
}
