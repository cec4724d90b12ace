//! The imaging agent's view of its machine: inventory from `/proc` and `/sys`, and
//! the choice of the disk to image, which must never be a guess.

pub mod run;
pub mod wipe;

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{DiskSelector, SizeRange};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Inventory {
    pub cpu_model: Option<String>,
    pub cpu_threads: usize,
    pub memory_bytes: u64,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub dmi: Dmi,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Kernel name, e.g. `sda`, `nvme0n1`.
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// `sata`, `nvme`, `usb`, `virtio`, `scsi`, `loop`, `mmc` or `other`.
    pub transport: String,
    pub removable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    pub driver: Option<String>,
    pub speed_mbps: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dmi {
    pub vendor: Option<String>,
    pub product: Option<String>,
    pub serial: Option<String>,
    pub uuid: Option<String>,
}

fn text(p: impl AsRef<Path>) -> Option<String> {
    let t = fs::read_to_string(p).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn number(p: impl AsRef<Path>) -> Option<u64> {
    text(p)?.parse().ok()
}

/// The network interface with this MAC, if any (virtual ones included).
pub fn nic_with_mac(mac: crate::spec::Mac) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        text(Path::new("/sys/class/net").join(n).join("address"))
            .and_then(|a| a.parse::<crate::spec::Mac>().ok())
            == Some(mac)
    })
}

/// Read the machine's inventory; `root` is `/` (tests may point elsewhere).
pub fn collect(root: &Path) -> Inventory {
    let cpuinfo = fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let cpu_threads = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory_bytes = fs::read_to_string(root.join("proc/meminfo"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    let dmi_dir = root.join("sys/class/dmi/id");
    Inventory {
        cpu_model,
        cpu_threads,
        memory_bytes,
        disks: disks(root),
        nics: nics(root),
        dmi: Dmi {
            vendor: text(dmi_dir.join("sys_vendor")),
            product: text(dmi_dir.join("product_name")),
            serial: text(dmi_dir.join("product_serial")),
            uuid: text(dmi_dir.join("product_uuid")),
        },
    }
}

/// Whole disks with a size: no partitions, RAM disks, zram or unattached loops.
pub fn disks(root: &Path) -> Vec<Disk> {
    let dir = root.join("sys/block");
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("ram") || name.starts_with("zram") || name.starts_with("dm-") {
            continue;
        }
        let sys = e.path();
        let size_bytes = number(sys.join("size")).unwrap_or(0) * 512;
        if size_bytes == 0 {
            continue;
        }
        let real = fs::canonicalize(&sys)
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        let transport = if name.starts_with("loop") {
            "loop"
        } else if real.contains("/usb") {
            "usb"
        } else if name.starts_with("nvme") {
            "nvme"
        } else if name.starts_with("mmcblk") {
            "mmc"
        } else if real.contains("/virtio") {
            "virtio"
        } else if real.contains("/ata") {
            "sata"
        } else if name.starts_with("sd") {
            "scsi"
        } else {
            "other"
        };
        let dev = sys.join("device");
        out.push(Disk {
            path: PathBuf::from("/dev").join(&name),
            size_bytes,
            model: text(dev.join("model")),
            serial: text(dev.join("serial")).or_else(|| text(dev.join("wwid"))),
            transport: transport.into(),
            removable: number(sys.join("removable")) == Some(1),
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn nics(root: &Path) -> Vec<Nic> {
    let dir = root.join("sys/class/net");
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let p = e.path();
        // Only NICs with hardware behind them.
        if name == "lo" || !p.join("device").exists() {
            continue;
        }
        out.push(Nic {
            mac: text(p.join("address")).unwrap_or_default(),
            driver: fs::read_link(p.join("device/driver"))
                .ok()
                .and_then(|l| l.file_name().map(|n| n.to_string_lossy().to_string())),
            // Negative (-1) when the link is down.
            speed_mbps: number(p.join("speed")),
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("no disk fits: {0}")]
    None(String),
    #[error(
        "{0} disks could be imaged and the host has no disk selector, so none is chosen: {1}; \
         add `disk: {{serial: ...}}` (or size, model, path) to the host in fleet.yaml"
    )]
    Ambiguous(usize, String),
    #[error("the host's disk selector matches {0} disks: {1}; make it match one (by serial, say)")]
    Several(usize, String),
}

fn describe(d: &Disk) -> String {
    format!(
        "{} ({:.1} GB, {}, model {}, serial {})",
        d.path.display(),
        d.size_bytes as f64 / 1e9,
        d.transport,
        d.model.as_deref().unwrap_or("?"),
        d.serial.as_deref().unwrap_or("?")
    )
}

fn in_range(r: &SizeRange, n: u64) -> bool {
    r.min <= n && n <= r.max
}

/// The one disk to image: never removable or USB, never smaller than `need_bytes`,
/// matching every field of the selector; refused when that leaves none, or more than
/// one and the selector is empty.
pub fn select<'a>(
    disks: &'a [Disk],
    sel: &DiskSelector,
    need_bytes: u64,
) -> Result<&'a Disk, SelectError> {
    let mut why = Vec::new();
    let mut fit = Vec::new();
    for d in disks {
        let reason = if d.removable {
            Some("removable".to_string())
        } else if d.transport == "usb" {
            Some("on USB".to_string())
        } else if d.size_bytes < need_bytes {
            Some(format!("smaller than the image's {need_bytes} bytes"))
        } else if sel.size.is_some_and(|r| !in_range(&r, d.size_bytes)) {
            Some("outside the selector's size".to_string())
        } else if sel
            .serial
            .as_ref()
            .is_some_and(|s| d.serial.as_deref() != Some(s))
        {
            Some("another serial".to_string())
        } else if sel.model.as_ref().is_some_and(|m| {
            !glob::Pattern::new(m)
                .map(|p| p.matches(d.model.as_deref().unwrap_or("")))
                .unwrap_or(false)
        }) {
            Some("another model".to_string())
        } else if sel.path.as_ref().is_some_and(|p| d.path != Path::new(p)) {
            Some("another path".to_string())
        } else {
            None
        };
        match reason {
            Some(r) => why.push(format!("{}: {r}", describe(d))),
            None => fit.push(d),
        }
    }
    match fit.len() {
        0 => Err(SelectError::None(if why.is_empty() {
            "the machine shows no disks".into()
        } else {
            why.join("; ")
        })),
        1 => Ok(fit[0]),
        n if sel.is_empty() => Err(SelectError::Ambiguous(
            n,
            fit.iter()
                .map(|d| describe(d))
                .collect::<Vec<_>>()
                .join("; "),
        )),
        n => Err(SelectError::Several(
            n,
            fit.iter()
                .map(|d| describe(d))
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, gb: u64, transport: &str, removable: bool, serial: &str) -> Disk {
        Disk {
            name: name.into(),
            path: PathBuf::from("/dev").join(name),
            size_bytes: gb * 1_000_000_000,
            model: Some("Samsung SSD 870".into()),
            serial: Some(serial.into()),
            transport: transport.into(),
            removable,
        }
    }

    #[test]
    fn removable_usb_and_small_disks_are_never_chosen() {
        let disks = [
            disk("sda", 500, "sata", false, "A1"),
            disk("sdb", 64, "usb", false, "U1"),
            disk("sdc", 32, "sata", true, "R1"),
            disk("sdd", 100, "sata", false, "S1"),
        ];
        let chosen = select(&disks, &DiskSelector::default(), 200_000_000_000).expect("one");
        assert_eq!(chosen.name, "sda");
    }

    #[test]
    fn two_candidates_and_no_selector_refuse_and_a_serial_decides() {
        let disks = [
            disk("nvme0n1", 500, "nvme", false, "N1"),
            disk("sda", 500, "sata", false, "A1"),
        ];
        let err = select(&disks, &DiskSelector::default(), 1).expect_err("ambiguous");
        let text = err.to_string();
        assert!(
            text.contains("/dev/nvme0n1") && text.contains("/dev/sda"),
            "{text}"
        );
        let by_serial = DiskSelector {
            serial: Some("A1".into()),
            ..DiskSelector::default()
        };
        assert_eq!(select(&disks, &by_serial, 1).expect("one").name, "sda");
    }
}
