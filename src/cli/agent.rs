//! `fleetwave agent inventory`, `disk`, `wipe` and `run`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow};

use super::exit;
use crate::agent;
use crate::spec::{Digest, DiskSelector, Mac};

/// Print what the machine has.
pub fn inventory(json: bool, out: &mut dyn Write) -> Result<u8> {
    let inv = agent::collect(Path::new("/"));
    if json {
        super::print_json(out, &inv)?;
        return Ok(exit::OK);
    }
    writeln!(
        out,
        "cpu: {} ({} threads)\nmemory: {:.1} GB",
        inv.cpu_model.as_deref().unwrap_or("?"),
        inv.cpu_threads,
        inv.memory_bytes as f64 / 1e9
    )?;
    let d = &inv.dmi;
    writeln!(
        out,
        "machine: {} {} serial {} uuid {}",
        d.vendor.as_deref().unwrap_or("?"),
        d.product.as_deref().unwrap_or("?"),
        d.serial.as_deref().unwrap_or("?"),
        d.uuid.as_deref().unwrap_or("?")
    )?;
    for disk in &inv.disks {
        writeln!(
            out,
            "disk {}: {:.1} GB, {}{}, model {}, serial {}",
            disk.path.display(),
            disk.size_bytes as f64 / 1e9,
            disk.transport,
            if disk.removable { ", removable" } else { "" },
            disk.model.as_deref().unwrap_or("?"),
            disk.serial.as_deref().unwrap_or("?")
        )?;
    }
    for nic in &inv.nics {
        writeln!(
            out,
            "nic {}: {} driver {}",
            nic.name,
            nic.mac,
            nic.driver.as_deref().unwrap_or("?")
        )?;
    }
    Ok(exit::OK)
}

/// Print the disk the selector picks (exit 0), or why none is picked (exit 1).
pub fn disk(sel: &DiskSelector, need: u64, out: &mut dyn Write) -> Result<u8> {
    let disks = agent::disks(Path::new("/"));
    match agent::select(&disks, sel, need) {
        Ok(d) => {
            writeln!(out, "{}", d.path.display())?;
            Ok(exit::OK)
        }
        Err(e) => {
            writeln!(out, "refused: {e}")?;
            Ok(exit::CHANGES)
        }
    }
}

/// `fleetwave agent wipe DISK --mode M --yes`.
pub fn wipe(disk: &Path, mode: &str, yes: bool, json: bool, out: &mut dyn Write) -> Result<u8> {
    let mode = match mode {
        "fast" => crate::spec::WipeMode::Fast,
        "normal" => crate::spec::WipeMode::Normal,
        "full" => crate::spec::WipeMode::Full,
        other => anyhow::bail!("--mode {other:?}: use fast, normal or full"),
    };
    if !yes {
        anyhow::bail!(
            "wiping {} destroys its data: add --yes to confirm",
            disk.display()
        );
    }
    let r = agent::wipe::wipe(disk, mode)?;
    if json {
        super::print_json(out, &r)?;
        return Ok(exit::OK);
    }
    for p in &r.passes {
        writeln!(
            out,
            "{}: wrote {} over {} range{} ({:.1} MB)",
            disk.display(),
            p.kind,
            p.ranges.len(),
            if p.ranges.len() == 1 { "" } else { "s" },
            p.bytes as f64 / 1e6
        )?;
    }
    writeln!(
        out,
        "read back {:.1} MB from the {}: all zeros ({:.1} s)",
        r.verified_bytes as f64 / 1e6,
        r.read_back,
        r.seconds
    )?;
    Ok(exit::OK)
}

/// `fleetwave agent run`: what the netboot environment starts. Reads `fleetwave.server`,
/// `fleetwave.mac` and `fleetwave.token` from the kernel command line, fetches the
/// task from the server, reports the inventory, picks the disk by the host's selector,
/// carries the task out and reports how it ended.
pub fn run(cmdline: &Path, out: &mut dyn Write) -> Result<u8> {
    use crate::image::remote::Remote;
    use crate::image::store::Repo;
    use crate::services::api::TaskResult;

    let text = std::fs::read_to_string(cmdline)
        .with_context(|| format!("cannot read the kernel command line {}", cmdline.display()))?;
    let args: HashMap<&str, &str> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("fleetwave."))
        .filter_map(|w| w.split_once('='))
        .collect();
    let need = |k: &str| {
        args.get(k).copied().with_context(|| {
            format!(
                "fleetwave.{k}= is missing from {}; boot through fleetwave's iPXE script",
                cmdline.display()
            )
        })
    };
    let server = need("server")?;
    let token = need("token")?;
    let mac: Mac = need("mac")?
        .parse()
        .map_err(|e| anyhow!("fleetwave.mac: {e}"))?;
    let remote = Remote::new(server, token, mac);
    let grant = remote.task()?;
    let task: HashMap<String, String> = grant
        .get("task")
        .and_then(|t| serde_json::from_value(t.clone()).ok())
        .unwrap_or_default();
    let get = |k: &str| task.get(k).map(String::as_str);
    remote.post_json("register", &agent::collect(Path::new("/")))?;
    let selector = DiskSelector {
        size: get("disk.size")
            .map(str::parse)
            .transpose()
            .map_err(|e| anyhow!("disk.size: {e}"))?,
        serial: get("disk.serial").map(str::to_string),
        model: get("disk.model").map(str::to_string),
        path: get("disk.path").map(str::to_string),
    };
    let report = |ok: bool, message: String| {
        let _ = remote.post_json(
            "result",
            &TaskResult {
                ok,
                digest: None,
                message,
            },
        );
    };
    let choose = |need_bytes: u64| -> Result<std::path::PathBuf> {
        let disks = agent::disks(Path::new("/"));
        match agent::select(&disks, &selector, need_bytes) {
            Ok(d) => Ok(d.path.clone()),
            Err(e) => {
                report(false, e.to_string());
                Err(anyhow!("{e}"))
            }
        }
    };
    let w = super::image::Where {
        store: Path::new("/images"),
        server: Some((server, token, mac)),
    };
    // The version a deploy or verify task names, its manifest, and the disk it goes to.
    let versioned =
        |task: &str| -> Result<(Digest, crate::image::manifest::Manifest, std::path::PathBuf)> {
            let version: Digest = get("version")
                .with_context(|| format!("the {task} task names no version"))?
                .parse()
                .map_err(|e| anyhow!("version: {e}"))?;
            let m = remote.manifest(&version)?;
            let disk = choose(m.disk_bytes)?;
            Ok((version, m, disk))
        };
    writeln!(out, "task: {}", get("task").unwrap_or("?"))?;
    match get("task").unwrap_or_default() {
        "register" | "inventory" => {
            report(true, "inventory reported".into());
            Ok(exit::OK)
        }
        "capture" => {
            let disk = choose(0)?;
            let image = get("image").context("the capture task names no image")?;
            let generation = get("generation").and_then(|g| g.parse().ok()).unwrap_or(1);
            let level = crate::image::store::CHUNK_LEVEL;
            super::image::capture(&w, &disk, image, generation, level, false, out)
        }
        "deploy" => {
            let (version, m, disk) = versioned("deploy")?;
            let via = super::image::Transport {
                multicast: get("via")
                    .is_some_and(|v| v.starts_with("multicast:"))
                    .then_some(None),
                interface: None,
            };
            super::image::deploy_version(&w, &version, &m, &disk, &via, false, out)
        }
        "verify" => {
            let (version, m, disk) = versioned("verify")?;
            super::image::verify_version(&w, &version, &m, &disk, false, out)
        }
        "wipe" => {
            let disk = choose(0)?;
            let mode = get("mode").unwrap_or("fast");
            match wipe(&disk, mode, true, false, out) {
                Ok(code) => {
                    report(true, format!("wiped ({mode})"));
                    Ok(code)
                }
                Err(e) => {
                    report(false, e.to_string());
                    Err(e)
                }
            }
        }
        other => {
            let why = format!("task {other:?} is not one this agent carries out");
            report(false, why.clone());
            Err(anyhow!(why))
        }
    }
}
