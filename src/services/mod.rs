//! The network services a site runs: DHCP (addresses and PXE boot options), TFTP for
//! boot loaders, and HTTP for per-host iPXE scripts and boot files. Each takes its
//! socket from the caller and a shutdown token, so tests run them on port 0 or in a
//! namespace and `fleetwave serve` on the site's interface.

pub mod admin;
pub mod api;
pub mod dhcp;
pub mod http;
pub mod tftp;
pub mod tokens;
pub mod wol;

use std::path::{Component, Path, PathBuf};

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
