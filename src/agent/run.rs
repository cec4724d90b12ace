//! The agent's task loop: what the netboot environment runs, and what the tests and
//! the benchmark's simulated agents run too. It fetches the task its token
//! authorizes, reports the inventory, picks the disk by the host's selector, carries
//! the task out and reports how it ended; the server never hears success for work
//! that did not happen.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};

use crate::image::remote::Remote;
use crate::image::store::Repo;
use crate::protocol::{After, Assignment, Task, TaskResult};
use crate::spec::Mac;
use crate::tls::Pin;

/// Where the agent finds its server and its machine.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The server's base URL, e.g. `http://172.28.0.1` or `https://172.28.0.1:443`.
    pub server: String,
    /// The SHA-256 of the server's certificate (`fleetwave.pin=`): over https the
    /// agent trusts that certificate only.
    pub pin: Option<Pin>,
    pub token: String,
    pub mac: Mac,
    /// `/` on a real machine; tests point it at a directory that looks like one.
    pub root: PathBuf,
    /// Overrides the disk selector (tests and simulated agents image a file).
    pub disk: Option<PathBuf>,
}

impl Boot {
    /// From a kernel command line's `fleetwave.server=`, `fleetwave.token=`,
    /// `fleetwave.mac=` and (over https) `fleetwave.pin=`.
    pub fn from_cmdline(text: &str, source: &Path) -> Result<Boot> {
        let args: HashMap<&str, &str> = text
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("fleetwave."))
            .filter_map(|w| w.split_once('='))
            .collect();
        let need = |k: &str| {
            args.get(k).copied().with_context(|| {
                format!(
                    "fleetwave.{k}= is missing from {}; boot through fleetwave's iPXE script",
                    source.display()
                )
            })
        };
        let pin = args
            .get("pin")
            .map(|p| p.parse::<Pin>())
            .transpose()
            .map_err(|e| anyhow!("fleetwave.pin= in {}: {e}", source.display()))?;
        Ok(Boot {
            server: need("server")?.to_string(),
            pin,
            token: need("token")?.to_string(),
            mac: need("mac")?
                .parse()
                .map_err(|e| anyhow!("fleetwave.mac: {e}"))?,
            root: PathBuf::from("/"),
            disk: None,
        })
    }
}

/// What became of the task.
#[derive(Debug)]
pub struct Outcome {
    pub assignment: Assignment,
    /// The exit code a command would give (0 done, 1 drifted or failed, 2 error).
    pub code: u8,
    pub after: After,
}

/// Fetch the task, carry it out, report it. `Err` when the task could not even be
/// fetched; every other failure is reported to the server before it is returned.
pub fn run(boot: &Boot, out: &mut dyn Write) -> Result<Outcome> {
    let remote = Remote::new(&boot.server, &boot.token, boot.mac, boot.pin);
    let assignment = remote.task().map_err(|e| {
        let why = e.to_string();
        // A failed TLS check reached the server and says what to check itself.
        if why.contains("TLS with ") {
            return anyhow!("cannot fetch the task from {}: {why}", boot.server);
        }
        anyhow!(
            "cannot fetch the task from {}: {why}; check that the server is reachable from \
             this machine and that the token is current (reboot for a new one)",
            boot.server
        )
    })?;
    writeln!(out, "task: {}", assignment.task.summary())?;
    let report = |ok: bool, message: String| {
        let r = remote.post_json(
            "result",
            &TaskResult {
                ok,
                digest: None,
                message,
                // In the netboot environment a failure carries the tail of /init's log.
                log_tail: if ok { None } else { crate::netboot::log_tail() },
            },
        );
        if let Err(e) = r {
            eprintln!("fleetwave: could not report the result to the server: {e}");
        }
    };
    let result = carry_out(boot, &remote, &assignment, out);
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            // Only failures the task's own reporting did not cover get here; a
            // second report of the same task is refused (its token is spent).
            report(false, format!("{e:#}"));
            return Err(e);
        }
    };
    Ok(Outcome {
        after: assignment.after,
        assignment,
        code,
    })
}

fn carry_out(
    boot: &Boot,
    remote: &Remote,
    assignment: &Assignment,
    out: &mut dyn Write,
) -> Result<u8> {
    use crate::cli::image as work;
    remote
        .post_json("register", &super::collect(&boot.root))
        .context("cannot report the inventory")?;
    let selector = assignment.disk.to_selector().map_err(|e| anyhow!(e))?;
    let choose = |need_bytes: u64| -> Result<PathBuf> {
        if let Some(d) = &boot.disk {
            return Ok(d.clone());
        }
        let disks = super::disks(&boot.root);
        super::select(&disks, &selector, need_bytes)
            .map(|d| d.path.clone())
            .map_err(|e| anyhow!("{e}"))
    };
    let w = work::Where {
        store: Path::new("/images"),
        server: Some((&boot.server, &boot.token, boot.mac)),
        pin: boot.pin,
    };
    match &assignment.task {
        Task::Register | Task::Inventory { .. } => {
            remote.post_json(
                "result",
                &TaskResult {
                    ok: true,
                    digest: None,
                    message: "inventory reported".into(),
                    log_tail: None,
                },
            )?;
            Ok(crate::cli::exit::OK)
        }
        Task::Capture { image, generation } => {
            let disk = choose(0)?;
            let level = crate::image::store::CHUNK_LEVEL;
            work::capture(&w, &disk, image, *generation, level, false, out)
        }
        Task::Deploy {
            version, multicast, ..
        } => {
            let m = remote.manifest(version)?;
            let disk = choose(m.disk_bytes)?;
            let via = work::Transport {
                multicast: multicast.as_ref().map(|_| None),
                interface: None,
            };
            work::deploy_version(&w, version, &m, &disk, &via, false, out)
        }
        Task::Verify { version, .. } => {
            let m = remote.manifest(version)?;
            let disk = choose(m.disk_bytes)?;
            work::verify_version(&w, version, &m, &disk, false, out)
        }
        Task::Wipe { mode, .. } => {
            let disk = choose(0)?;
            let name = crate::protocol::wipe_mode_name(*mode);
            let code = crate::cli::agent::wipe(&disk, name, true, false, out)?;
            remote.post_json(
                "result",
                &TaskResult {
                    ok: true,
                    digest: None,
                    message: format!("wiped ({name})"),
                    log_tail: None,
                },
            )?;
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "initrd=initrd.img console=ttyS0,115200 fleetwave.server=https://10.0.0.1:443 \
                        fleetwave.mac=52:54:00:28:00:11 fleetwave.task=deploy fleetwave.token=t0k";

    #[test]
    fn the_command_line_gives_the_server_token_mac_and_pin() {
        let hex = "ab".repeat(32);
        let b = Boot::from_cmdline(
            &format!("{LINE} fleetwave.pin=sha256:{hex}"),
            Path::new("/proc/cmdline"),
        )
        .expect("boot");
        assert_eq!(b.server, "https://10.0.0.1:443");
        assert_eq!(b.token, "t0k");
        assert_eq!(b.mac.to_string(), "52:54:00:28:00:11");
        assert_eq!(b.pin.map(|p| p.to_string()), Some(format!("sha256:{hex}")));
        // Plain HTTP: no pin.
        let b = Boot::from_cmdline(LINE, Path::new("/proc/cmdline")).expect("boot");
        assert_eq!(b.pin, None);
    }

    #[test]
    fn a_malformed_pin_on_the_command_line_is_an_error_naming_it() {
        let e = Boot::from_cmdline(
            &format!("{LINE} fleetwave.pin=md5:abc"),
            Path::new("/proc/cmdline"),
        )
        .expect_err("bad pin");
        let e = format!("{e:#}");
        assert!(
            e.contains("fleetwave.pin=") && e.contains("/proc/cmdline"),
            "{e}"
        );
    }
}
