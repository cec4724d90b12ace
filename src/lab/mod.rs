//! `fleetwave lab`: the fleet's lab site booted in QEMU VMs on one machine, through
//! the real GitOps path (docs/lab.md).
//!
//! - [`run`]: the command: checks the machine, commits the fleet into a local git
//!   repository, builds the reference disk and the network, starts the supervisor,
//!   follows the run through the status API and the serial consoles, verifies every
//!   disk and prints the summary.
//! - [`supervise`]: the process that stays with a lab: it runs `serve --source` on the
//!   lab's repository (restarting it if it dies, as systemd would), `netboot ra`, and
//!   powers a host's VM on when the controller has armed a task for it (what
//!   Wake-on-LAN or a person does in a real room).
//! - [`net`]: the per-lab namespaces, bridge and taps.
//! - [`disk`]: the reference disk the project builds.
//!
//! A lab is recorded in `/run/fleetwave-lab/NAME.json` ([`LabState`]), which `lab down`
//! and `lab power` read.

pub mod disk;
pub mod net;
pub mod run;
pub mod supervise;

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "the lab needs {0}\n(Debian: apt-get install --no-install-recommends qemu-system-x86 \
         qemu-utils ipxe-qemu ipxe busybox-static kmod git gdisk e2fsprogs ntfs-3g extlinux \
         syslinux-common; see docs/lab.md)"
    )]
    Missing(String),
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, LabError>;

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Run a command to success, or say which failed and what it printed.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        LabError::Failed(format!(
            "cannot run {:?}: {e}",
            cmd.get_program().to_string_lossy()
        ))
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(LabError::Failed(format!(
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )))
}

/// Where running labs are recorded.
pub const RUN_DIR: &str = "/run/fleetwave-lab";

/// One lab: what `lab down`, `lab power` and the supervisor need to find its parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    /// Holds the repository, the disks, the consoles, the logs and serve's state.
    pub dir: PathBuf,
    /// The server's namespace and the LAN's (the bridge and the VMs' taps).
    pub srv_ns: String,
    pub lan_ns: String,
    /// The site's interface, named so in the server's namespace: the fleet is
    /// committed unchanged.
    pub interface: String,
    pub server: Ipv4Addr,
    pub prefix_len: u8,
    /// The fleetwave binary the lab runs (serve, ra, the supervisor).
    pub exe: PathBuf,
    pub files_dir: PathBuf,
    pub ipxe_dir: PathBuf,
    /// VMs running at once, at most (TCG: one core each).
    pub vms: usize,
    /// How often serve reads the lab's repository, in seconds.
    pub interval_secs: u64,
    pub hosts: Vec<LabHost>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    pub name: String,
    pub mac: String,
    pub tap: String,
    /// A raw disk image file.
    pub disk: PathBuf,
    /// The serial console, appended to across boots.
    pub console: PathBuf,
    /// The machine an image is captured from (its disk starts as the reference).
    pub reference: bool,
}

impl LabState {
    pub fn path(name: &str) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{name}.json"))
    }

    pub fn save(&self) -> Result<()> {
        std::fs::create_dir_all(RUN_DIR).map_err(io_at(Path::new(RUN_DIR)))?;
        let path = Self::path(&self.name);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LabError::Failed(format!("lab state: {e}")))?;
        std::fs::write(&path, text).map_err(io_at(&path))
    }

    /// The lab named `name`, or the only one recorded.
    pub fn load(name: Option<&str>) -> Result<LabState> {
        let path = match name {
            Some(n) => Self::path(n),
            None => {
                let names = Self::list();
                match names.as_slice() {
                    [one] => Self::path(one),
                    [] => {
                        return Err(LabError::Failed(format!(
                            "no lab is running (nothing in {RUN_DIR}); start one with \
                             `fleetwave lab --keep`"
                        )));
                    }
                    many => {
                        return Err(LabError::Failed(format!(
                            "several labs are running ({}): name one with --name",
                            many.join(", ")
                        )));
                    }
                }
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            LabError::Failed(format!(
                "{}: {e} (is the lab running? `ls {RUN_DIR}` lists the running ones)",
                path.display()
            ))
        })?;
        serde_json::from_str(&text)
            .map_err(|e| LabError::Failed(format!("{}: not a lab's state: {e}", path.display())))
    }

    /// The names of the labs recorded.
    pub fn list() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(RUN_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_suffix(".json"))
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server)
    }

    /// The bare repository serve follows, and the work tree that pushes to it.
    pub fn repo(&self) -> PathBuf {
        self.dir.join("fleet.git")
    }

    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    /// A host's power switch: present, its VM is kept off.
    pub fn off_file(&self, host: &str) -> PathBuf {
        self.dir.join("off").join(host)
    }

    /// Present while the host's VM runs: its QEMU's pid.
    pub fn pid_file(&self, host: &str) -> PathBuf {
        self.dir.join("vm").join(format!("{host}.pid"))
    }
}

/// Remove a lab: every process in its namespaces, the namespaces, its record, and
/// its directory unless `keep_files`.
pub fn down(state: &LabState, keep_files: bool) -> Result<()> {
    net::remove(&[state.lan_ns.clone(), state.srv_ns.clone()]);
    let record = LabState::path(&state.name);
    if record.exists() {
        std::fs::remove_file(&record).map_err(io_at(&record))?;
    }
    if !keep_files && state.dir.exists() {
        std::fs::remove_dir_all(&state.dir).map_err(io_at(&state.dir))?;
    }
    Ok(())
}

/// Write `bytes` as `file` into `host`'s data partition (the built reference disk's
/// layout); the host must be off, as a disk is not changed under a running machine.
pub fn put(state: &LabState, host: &str, file: &str, bytes: &[u8]) -> Result<()> {
    let h = state
        .hosts
        .iter()
        .find(|h| h.name == host)
        .ok_or_else(|| LabError::Failed(format!("no host {host} in lab {}", state.name)))?;
    if state.pid_file(host).exists() {
        return Err(LabError::Failed(format!(
            "{host}'s VM is running: wait until it powers off (or `fleetwave lab power \
             {host} off`), then put the file"
        )));
    }
    disk::put_data(&h.disk, file, bytes, &state.dir)
}

/// Pull a host's plug (`on == false`: its VM is killed and stays off) or put it back
/// (the supervisor powers it on when the controller wants it).
pub fn power(state: &LabState, host: &str, on: bool) -> Result<()> {
    if !state.hosts.iter().any(|h| h.name == host) {
        return Err(LabError::Failed(format!(
            "no host {host} in lab {}; its hosts: {}",
            state.name,
            state
                .hosts
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let off = state.off_file(host);
    if on {
        if off.exists() {
            std::fs::remove_file(&off).map_err(io_at(&off))?;
        }
        return Ok(());
    }
    if let Some(dir) = off.parent() {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    }
    std::fs::write(&off, "").map_err(io_at(&off))?;
    // The supervisor kills the VM within a moment; wait for it, so the caller knows
    // the machine is off.
    let pid = state.pid_file(host);
    for _ in 0..100 {
        if !pid.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(LabError::Failed(format!(
        "{host}'s VM is still running after 10 s: is the lab's supervisor running? \
         (see {})",
        state.dir.join("supervisor.log").display()
    )))
}
