//! The network services a site runs: DHCP (addresses and PXE boot options), TFTP for
//! boot loaders, and HTTP for per-host iPXE scripts and boot files. Each takes its
//! socket from the caller and a shutdown token, so tests run them on port 0 or in a
//! namespace and `fleetwave serve` on the site's interface.

pub mod admin;
pub mod api;
pub mod console;
pub mod dhcp;
pub mod http;
pub mod metrics;
pub mod tftp;
pub mod tokens;
pub mod wol;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A bound on what one client (one IP address) holds at once: connections for HTTP,
/// transfers for TFTP. One machine cannot take every slot from the others.
#[derive(Debug)]
pub struct PerClient {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot of a client, given back when dropped.
#[derive(Debug)]
pub struct ClientSlot {
    owner: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    pub fn new(max: usize) -> Arc<PerClient> {
        Arc::new(PerClient {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip`, or `None` when it already holds `max`.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// The file a request names, if it lies inside the root.
pub fn confine(root: &Path, name: &str) -> Result<PathBuf, &'static str> {
    let path = Path::new(name);
    if path.is_absolute() || name.contains('\\') {
        return Err("absolute paths are refused");
    }
    let mut clean = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            _ => return Err("paths leading out of the served root are refused"),
        }
    }
    // Symlinks may point anywhere: judge where the file really is.
    let real = root
        .join(&clean)
        .canonicalize()
        .map_err(|_| "file not found")?;
    if !real.starts_with(root) {
        return Err("paths leading out of the served root are refused");
    }
    if !real.is_file() {
        return Err("file not found");
    }
    Ok(real)
}
