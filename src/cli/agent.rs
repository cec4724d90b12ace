//! `fleetwave agent inventory`, `disk`, `wipe` and `run`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::exit;
use crate::agent;
use crate::spec::DiskSelector;

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
/// `fleetwave.mac` and `fleetwave.token` from the kernel command line and runs the
/// agent's task loop ([`agent::run::run`]).
pub fn run(cmdline: &Path, out: &mut dyn Write) -> Result<u8> {
    let text = std::fs::read_to_string(cmdline)
        .with_context(|| format!("cannot read the kernel command line {}", cmdline.display()))?;
    let boot = agent::run::Boot::from_cmdline(&text, cmdline)?;
    Ok(agent::run::run(&boot, out)?.code)
}
