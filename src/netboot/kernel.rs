//! Debian's kernel for the netboot environment: the package `linux-image-amd64` points
//! at, downloaded with `apt-get download` and unpacked with `dpkg -x` into the cache
//! (never installed), and the modules a list needs with their dependencies.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{NetbootError, Result, io_at, run_out};

/// An unpacked kernel package in the cache.
pub struct Kernel {
    /// e.g. `linux-image-6.1.0-57-amd64`.
    pub package: String,
    /// e.g. `6.1.0-57-amd64`.
    pub version: String,
    root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.version))
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.version)
    }
}

/// The kernel package Debian's meta-package depends on, from `apt-cache depends`.
fn package_name() -> Result<String> {
    let text =
        run_out(Command::new("apt-cache").args(["depends", "linux-image-amd64"])).map_err(|e| {
            NetbootError::Invalid(format!(
                "{e}; netboot build takes Debian's kernel through apt: run it on Debian or \
                 Ubuntu with `apt-get update` done"
            ))
        })?;
    parse_depends(&text).ok_or_else(|| {
        NetbootError::Invalid(format!(
            "`apt-cache depends linux-image-amd64` names no linux-image package:\n{text}"
        ))
    })
}

fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.contains(' '))
        .map(str::to_string)
}

/// The kernel, downloaded and unpacked into `cache` unless already there.
pub fn fetch(cache: &Path, log: &mut dyn Write) -> Result<Kernel> {
    let package = package_name()?;
    let version = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let root = cache.join("kernel").join(&version);
    let k = Kernel {
        package: package.clone(),
        version: version.clone(),
        root: root.clone(),
    };
    if root.join(".complete").exists() {
        let _ = writeln!(log, "kernel {version}: cached in {}", root.display());
        return Ok(k);
    }
    let deb = download(cache, &package, log)?;
    let _ = writeln!(log, "unpacking {}", deb.display());
    let tmp = cache
        .join("kernel")
        .join(format!(".unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
    run_out(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp)).map_err(|e| {
        NetbootError::Invalid(format!(
            "{e}; if the download was damaged, delete {} and build again",
            deb.display()
        ))
    })?;
    // The package ships no modules.dep: it is made at install time.
    run_out(Command::new("depmod").arg("-b").arg(&tmp).arg(&version)).map_err(|e| {
        NetbootError::Invalid(format!("{e}; depmod comes with kmod: apt-get install kmod"))
    })?;
    std::fs::write(tmp.join(".complete"), b"").map_err(io_at(&tmp))?;
    if std::fs::rename(&tmp, &root).is_err() {
        // Another build unpacked the same kernel meanwhile: use that one.
        let _ = std::fs::remove_dir_all(&tmp);
        if !root.join(".complete").exists() {
            return Err(NetbootError::Invalid(format!(
                "{}: exists but is not a complete unpacked kernel: delete it and build again",
                root.display()
            )));
        }
    }
    Ok(k)
}

/// `package`'s .deb in the cache, downloaded with `apt-get download` unless it is there.
pub fn download(cache: &Path, package: &str, log: &mut dyn Write) -> Result<PathBuf> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(io_at(&debs))?;
    if let Some(d) = find_deb(&debs, package)? {
        return Ok(d);
    }
    let _ = writeln!(log, "downloading {package} (apt-get download)");
    // Into a directory of its own, then moved: a build interrupted mid-download
    // leaves no partial .deb that the next one would trust.
    let tmp = debs.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
    run_out(
        Command::new("apt-get")
            // As root into a directory apt's sandbox user cannot write: skip the sandbox.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(package)
            .current_dir(&tmp),
    )?;
    let got = find_deb(&tmp, package)?
        .ok_or_else(|| NetbootError::Invalid(format!("apt-get download {package} left no .deb")))?;
    let name = got.file_name().map(PathBuf::from).unwrap_or_default();
    let dest = debs.join(name);
    std::fs::rename(&got, &dest).map_err(io_at(&dest))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(dest)
}

/// Debian's signed boot loaders for Secure Boot: the shim (signed by Microsoft's
/// UEFI CA) and GRUB's network image (signed by Debian), from their packages.
#[derive(Debug, Clone)]
pub struct Loaders {
    pub shim: PathBuf,
    pub grub: PathBuf,
    /// The .deb files they came from (name and version).
    pub packages: Vec<String>,
}

pub fn loaders(cache: &Path, log: &mut dyn Write) -> Result<Loaders> {
    let mut unpacked = Vec::new();
    let mut packages = Vec::new();
    for package in ["shim-signed", "grub-efi-amd64-signed"] {
        let deb = download(cache, package, log)?;
        let name = deb
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".deb").to_string())
            .unwrap_or_else(|| package.to_string());
        let root = cache.join("loaders").join(&name);
        if !root.join(".complete").exists() {
            let tmp = cache
                .join("loaders")
                .join(format!(".unpack-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
            run_out(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
            std::fs::write(tmp.join(".complete"), b"").map_err(io_at(&tmp))?;
            let _ = std::fs::remove_dir_all(&root);
            std::fs::rename(&tmp, &root).map_err(io_at(&root))?;
        }
        unpacked.push(root);
        packages.push(name);
    }
    let shim = unpacked[0].join("usr/lib/shim/shimx64.efi.signed");
    let grub = unpacked[1].join("usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed");
    for f in [&shim, &grub] {
        if !f.exists() {
            return Err(NetbootError::Invalid(format!(
                "{} is not in its package: has Debian moved it? (docs/netboot.md, Secure Boot)",
                f.display()
            )));
        }
    }
    Ok(Loaders {
        shim,
        grub,
        packages,
    })
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_at(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    found.sort();
    Ok(found.pop())
}

/// The module files `names` need, dependencies first, relative to the kernel's
/// module directory; and the names built into the kernel.
pub struct Modules {
    pub files: Vec<String>,
    pub builtin: Vec<String>,
}

pub fn resolve(k: &Kernel, names: &[&str]) -> Result<Modules> {
    let (mut files, mut builtin) = (Vec::<String>::new(), Vec::new());
    let dir = k.modules_dir();
    for name in names {
        let text = run_out(Command::new("modprobe").arg("-d").arg(&k.root).args([
            "-S",
            &k.version,
            "--show-depends",
            name,
        ]))
        .map_err(|e| {
            NetbootError::Invalid(format!(
                "module {name} (netboot::MODULES) in kernel {}: {e} (modprobe comes with \
                 kmod; a module this kernel lacks must leave the list)",
                k.version
            ))
        })?;
        for line in text.lines() {
            let mut w = line.split_whitespace();
            match (w.next(), w.next()) {
                (Some("insmod"), Some(path)) => {
                    let rel = Path::new(path)
                        .strip_prefix(&dir)
                        .map_err(|_| {
                            NetbootError::Invalid(format!(
                                "modprobe named {path}, outside {}",
                                dir.display()
                            ))
                        })?
                        .to_string_lossy()
                        .into_owned();
                    if !files.contains(&rel) {
                        files.push(rel);
                    }
                }
                (Some("builtin"), Some(m)) if m == *name => builtin.push(m.to_string()),
                _ => {}
            }
        }
    }
    Ok(Modules { files, builtin })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meta_package_names_the_versioned_kernel() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }
}
