//! The process that stays with a lab (in its server's namespace): `serve --source`
//! on the lab's repository, restarted if it dies; `netboot ra`; and a VM for each host
//! the controller has work for. Logs one line per thing it does to stdout, which
//! `lab` sends to `DIR/supervisor.log`.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{LabHost, LabState, Result, io_at};
use crate::protocol::FleetStatus;

/// A VM still running after this is stuck: it is killed (and powered on again if the
/// controller still wants it).
const VM_LIMIT: Duration = Duration::from_secs(20 * 60);

/// Host states in which the machine must be on: a task is armed or under way.
const WANTS_POWER: &[&str] = &["Armed", "Booting", "Imaging", "Verifying"];

fn say(text: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    println!("{now:.1} {text}");
}

fn append(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_at(path))
}

/// The server's status, if it answers; read with the lab's admin token (`dir/admin-token`).
pub fn status(url: &str, dir: &Path) -> Option<FleetStatus> {
    let token = std::fs::read_to_string(dir.join("admin-token")).ok()?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    let mut r = agent
        .get(format!("{url}/api/v1/status"))
        .header("Authorization", &format!("Bearer {}", token.trim()))
        .call()
        .ok()?;
    let body = r.body_mut().read_to_string().ok()?;
    serde_json::from_str(&body).ok()
}

fn start_serve(s: &LabState) -> Result<Child> {
    let log = s.dir.join("serve.log");
    let child = Command::new(&s.exe)
        .arg("serve")
        .arg("--source")
        .arg(format!("file://{}", s.repo().display()))
        .arg("--interval")
        .arg(format!("{}s", s.interval_secs))
        .arg("--state-dir")
        .arg(s.dir.join("state"))
        .arg("--image-store")
        .arg(s.dir.join("store"))
        .arg("--files-dir")
        .arg(&s.files_dir)
        .arg("--ipxe-dir")
        .arg(&s.ipxe_dir)
        .arg("--admin-token-file")
        .arg(s.dir.join("admin-token"))
        .env("FLEETWAVE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(append(&log)?)
        .spawn()
        .map_err(io_at(&s.exe))?;
    let pid = s.dir.join("serve.pid");
    std::fs::write(&pid, child.id().to_string()).map_err(io_at(&pid))?;
    Ok(child)
}

/// QEMU for `h`: SeaBIOS, the e1000's iPXE ROM first, the SATA disk; rebooting in the
/// same process (after a deploy the machine PXE-boots again and is sent to its disk).
fn start_vm(s: &LabState, h: &LabHost) -> Result<Child> {
    let sercon = s.dir.join("sercon.bin");
    if !sercon.exists() {
        // SeaBIOS and iPXE print on the serial port too.
        std::fs::write(&sercon, [0xf8, 0x03]).map_err(io_at(&sercon))?;
    }
    let child = Command::new("ip")
        .args(["netns", "exec", &s.lan_ns, "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-machine", "q35", "-m", "768", "-smp", "1"])
        .args(["-display", "none", "-nodefaults", "-monitor", "none"])
        .arg("-name")
        .arg(format!("{}-{}", s.name, h.name))
        .arg("-chardev")
        .arg(format!(
            "file,id=con,path={},append=on",
            h.console.display()
        ))
        .args(["-serial", "chardev:con"])
        .arg("-fw_cfg")
        .arg(format!("name=etc/sercon-port,file={}", sercon.display()))
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={},script=no,downscript=no",
            h.tap
        ))
        .arg("-device")
        .arg(format!("e1000,netdev=n0,mac={},bootindex=1", h.mac))
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw",
            h.disk.display()
        ))
        .args(["-device", "ide-hd,drive=d0,bus=ide.0"])
        .args(["-boot", "order=n,strict=on,reboot-timeout=5000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(append(&s.dir.join("qemu.log"))?)
        .spawn()
        .map_err(io_at(Path::new("qemu-system-x86_64")))?;
    let pid = s.pid_file(&h.name);
    if let Some(d) = pid.parent() {
        std::fs::create_dir_all(d).map_err(io_at(d))?;
    }
    std::fs::write(&pid, child.id().to_string()).map_err(io_at(&pid))?;
    Ok(child)
}

/// Run until `stop`: keep serve up, and power VMs on and off.
pub fn supervise(s: &LabState, stop: &AtomicBool) -> Result<()> {
    let mut serve: Option<Child> = None;
    let mut ra: Option<Child> = None;
    let mut vms: HashMap<String, (Child, Instant)> = HashMap::new();
    let url = s.url();
    let mut starts = 0u32;
    say(&format!("supervising lab {}", s.name));
    while !stop.load(Ordering::Relaxed) {
        let exited = match serve.as_mut() {
            None => true,
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => {
                    say(&format!("serve exited ({status}); starting it again"));
                    true
                }
                _ => false,
            },
        };
        if exited {
            if starts > 0 {
                // A crash loop must not spin.
                std::thread::sleep(Duration::from_secs(1));
            }
            starts += 1;
            let c = start_serve(s)?;
            say(&format!("serve started (pid {})", c.id()));
            serve = Some(c);
        }
        // serve answers router solicitations only where the site says `ipv6_ra`; the
        // lab's network is its own, so it always has them, whatever the fleet says.
        if ra.is_none() {
            let c = Command::new(&s.exe)
                .args(["netboot", "ra", "--interface", &s.interface])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(append(&s.dir.join("ra.log"))?)
                .spawn()
                .map_err(io_at(&s.exe))?;
            ra = Some(c);
        }
        // VMs that ended on their own (a machine that powered off).
        vms.retain(|name, (c, _)| match c.try_wait() {
            Ok(Some(status)) => {
                say(&format!("{name}: VM powered off ({status})"));
                let _ = std::fs::remove_file(s.pid_file(name));
                false
            }
            _ => true,
        });
        for h in &s.hosts {
            let pulled = s.off_file(&h.name).exists();
            if let Some((c, started)) = vms.get_mut(&h.name) {
                let stuck = started.elapsed() > VM_LIMIT;
                if pulled || stuck {
                    let _ = c.kill();
                    let _ = c.wait();
                    say(&format!(
                        "{}: VM killed ({})",
                        h.name,
                        if pulled {
                            "power pulled"
                        } else {
                            "running for 20 minutes"
                        }
                    ));
                    vms.remove(&h.name);
                    let _ = std::fs::remove_file(s.pid_file(&h.name));
                }
            }
        }
        if let Some(st) = status(&url, &s.dir) {
            for h in &s.hosts {
                if vms.len() >= s.vms {
                    break;
                }
                if vms.contains_key(&h.name) || s.off_file(&h.name).exists() {
                    continue;
                }
                let state = st
                    .hosts
                    .iter()
                    .find(|v| v.name == h.name)
                    .map(|v| v.state.as_str())
                    .unwrap_or("");
                if WANTS_POWER.contains(&state) {
                    let c = start_vm(s, h)?;
                    say(&format!(
                        "{}: VM powered on ({state}, pid {})",
                        h.name,
                        c.id()
                    ));
                    vms.insert(h.name.clone(), (c, Instant::now()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    say("stopping");
    for (name, (mut c, _)) in vms {
        let _ = c.kill();
        let _ = c.wait();
        let _ = std::fs::remove_file(s.pid_file(&name));
    }
    if let Some(mut c) = serve {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
    if let Some(mut c) = ra {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}
