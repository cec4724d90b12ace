//! `fleetwave netboot build|check`, and `fleetwave agent fail` (what the netboot
//! environment's /init runs when something went wrong before or around the agent).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::exit;
use crate::netboot::{self, BuildOptions};

pub struct BuildArgs {
    pub out: PathBuf,
    pub cache: PathBuf,
    /// None: this very binary, when it is statically linked.
    pub agent: Option<PathBuf>,
    pub level: i32,
    pub json: bool,
}

pub fn build(a: &BuildArgs, out: &mut dyn Write) -> Result<u8> {
    let started = std::time::Instant::now();
    let agent = match &a.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find this program to use as the agent")?,
    };
    let opts = BuildOptions {
        out: a.out.clone(),
        cache: a.cache.clone(),
        agent,
        level: a.level,
    };
    let mut progress = std::io::stderr();
    let m = netboot::build(&opts, &mut progress)?;
    if a.json {
        super::print_json(out, &m)?;
        return Ok(exit::OK);
    }
    let size = |n: &str| m.files.get(n).map_or(0, |f| f.bytes);
    let initrd = size("initrd.img");
    writeln!(
        out,
        "netboot build in {}: kernel {} ({:.1} MB), initramfs {:.1} MB (target < {:.0} MB; \
         {:.1} MB unpacked), {} module files, agent {}, {:.1} s",
        a.out.display(),
        m.kernel_version,
        size("vmlinuz") as f64 / 1e6,
        initrd as f64 / 1e6,
        netboot::TARGET_BYTES as f64 / 1e6,
        m.initrd_uncompressed_bytes as f64 / 1e6,
        m.module_files.len(),
        m.agent_version,
        started.elapsed().as_secs_f64()
    )?;
    if !m.tools_missing.is_empty() {
        writeln!(
            out,
            "not found here, so not included: {} (docs/netboot.md says what needs them)",
            m.tools_missing.join(", ")
        )?;
    }
    if initrd > netboot::TARGET_BYTES {
        writeln!(
            out,
            "warning: the initramfs is over its {} byte target",
            netboot::TARGET_BYTES
        )?;
    }
    Ok(exit::OK)
}

/// Exit 0 when `dir` holds a complete build, 1 (with what to do) when not.
pub fn check(dir: &Path, out: &mut dyn Write) -> Result<u8> {
    match netboot::check_files_dir(dir) {
        Ok(m) => {
            writeln!(
                out,
                "{}: kernel {}, {}, {} module files",
                dir.display(),
                m.kernel_version,
                m.agent_version,
                m.module_files.len()
            )?;
            Ok(exit::OK)
        }
        Err(e) => {
            writeln!(out, "{e}")?;
            Ok(exit::CHANGES)
        }
    }
}

/// `fleetwave netboot ra`: answer router solicitations on `interface` with "nothing to
/// configure" until SIGINT/SIGTERM, so iPXE stops waiting for IPv6.
pub fn ra(interface: &str, out: &mut dyn Write) -> Result<u8> {
    let stop = super::stop_flag();
    writeln!(
        out,
        "{interface}: answering router solicitations (no router, no DHCPv6)"
    )?;
    out.flush()?;
    netboot::ra::serve(interface, stop)?;
    Ok(exit::OK)
}

/// `fleetwave agent fail`: report the task as failed, with `reason` and the tail of
/// `log`, using the token on the kernel command line. Exit 0 when the server took
/// it; 1 when it refused (a spent token: the agent reported the result itself) or
/// could not be reached.
pub fn agent_fail(
    cmdline: &Path,
    reason: &str,
    log: Option<&Path>,
    out: &mut dyn Write,
) -> Result<u8> {
    use crate::image::remote::Remote;
    use crate::protocol::TaskResult;

    let text = std::fs::read_to_string(cmdline)
        .with_context(|| format!("cannot read the kernel command line {}", cmdline.display()))?;
    let boot = crate::agent::run::Boot::from_cmdline(&text, cmdline)
        .context("the failure cannot be reported")?;
    let remote = Remote::new(&boot.server, &boot.token, boot.mac, boot.pin);
    let log_tail = log.map(|log| match netboot::tail(log, netboot::LOG_TAIL_BYTES) {
        Ok(t) => format!("--- last lines of {} ---\n{t}", log.display()),
        Err(e) => format!("(no log: {}: {e})", log.display()),
    });
    let result = TaskResult {
        ok: false,
        digest: None,
        message: format!("netboot: {reason}"),
        log_tail,
    };
    match remote.post_json("result", &result) {
        Ok(_) => {
            writeln!(out, "reported the failure to the server")?;
            Ok(exit::OK)
        }
        Err(e) => {
            let why = e.to_string();
            let note = if why.contains("401") {
                " (a spent token: the agent had reported this task's result already)"
            } else {
                ""
            };
            writeln!(
                out,
                "the server did not take the failure report: {why}{note}"
            )?;
            Ok(exit::CHANGES)
        }
    }
}

/// `fleetwave agent after`: what the task on the kernel command line says to do once
/// it has ended (`reboot` or `poweroff`), asked of the server with that line's token
/// and pin. /init asks before the agent runs (the result spends the token); through
/// the agent, not busybox wget, so an https server's pin is checked before the token
/// is sent. Exit 1, printing nothing on stdout, when the server cannot be asked.
pub fn agent_after(cmdline: &Path, out: &mut dyn Write) -> Result<u8> {
    use crate::image::remote::Remote;
    use crate::protocol::After;

    let text = std::fs::read_to_string(cmdline)
        .with_context(|| format!("cannot read the kernel command line {}", cmdline.display()))?;
    let boot = crate::agent::run::Boot::from_cmdline(&text, cmdline)?;
    let remote = Remote::new(&boot.server, &boot.token, boot.mac, boot.pin);
    match remote.task() {
        Ok(a) => {
            let after = match a.after {
                After::Reboot => "reboot",
                After::Poweroff => "poweroff",
            };
            writeln!(out, "{after}")?;
            Ok(exit::OK)
        }
        Err(e) => {
            eprintln!("fleetwave: cannot ask the server what to do after the task: {e}");
            Ok(exit::CHANGES)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::netboot::tail;

    #[test]
    fn the_tail_starts_at_a_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("log");
        std::fs::write(&p, "first line\nsecond\nthird\n").expect("write");
        assert_eq!(tail(&p, 1000).expect("tail"), "first line\nsecond\nthird\n");
        assert_eq!(tail(&p, 10).expect("tail"), "third\n");
    }
}
