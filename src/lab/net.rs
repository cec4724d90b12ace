//! The lab's network: namespace `NAME-lan` holds bridge br0 and a tap per VM;
//! namespace `NAME-srv` holds the server's end of a veth into br0, named as the
//! fleet's site says (e.g. ens34). No default route anywhere, so nothing the lab
//! sends leaves the machine.

use std::path::Path;
use std::process::Command;

use super::{LabError, LabState, Result, run};

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// Create the namespaces, the bridge, the server's interface and the taps.
pub fn create(s: &LabState) -> Result<()> {
    let (srv, lan) = (s.srv_ns.as_str(), s.lan_ns.as_str());
    for ns in [lan, srv] {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    // No STP, no forwarding delay, no snooping: multicast reaches every port at once.
    ip(&[
        "-n",
        lan,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
        "mcast_snooping",
        "0",
    ])?;
    ip(&["-n", lan, "link", "set", "br0", "up"])?;
    ip(&[
        "-n",
        lan,
        "link",
        "add",
        "srv0",
        "type",
        "veth",
        "peer",
        "name",
        &s.interface,
        "netns",
        srv,
    ])?;
    ip(&["-n", lan, "link", "set", "srv0", "master", "br0", "up"])?;
    let addr = format!("{}/{}", s.server, s.prefix_len);
    // `brd +`: without a broadcast address, replies to 255.255.255.255 go nowhere.
    ip(&[
        "-n",
        srv,
        "addr",
        "add",
        &addr,
        "brd",
        "+",
        "dev",
        &s.interface,
    ])?;
    ip(&["-n", srv, "link", "set", &s.interface, "up"])?;
    // Multicast sessions send on the site's interface (there is no default route).
    ip(&[
        "-n",
        srv,
        "route",
        "add",
        "224.0.0.0/4",
        "dev",
        &s.interface,
    ])?;
    for h in &s.hosts {
        ip(&["-n", lan, "tuntap", "add", "dev", &h.tap, "mode", "tap"])?;
        ip(&["-n", lan, "link", "set", &h.tap, "master", "br0", "up"])?;
    }
    Ok(())
}

pub fn exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Kill every process in the namespaces, then delete them (their links go with them).
pub fn remove(namespaces: &[String]) {
    for ns in namespaces {
        if !exists(ns) {
            continue;
        }
        for _ in 0..20 {
            let pids = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            // `lab` itself is in the server's namespace (it reads the status from there).
            let me = std::process::id() as i32;
            let pids: Vec<i32> = pids
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|p| *p != me)
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a pid read from the namespace's process list.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
}

/// Move the calling thread into namespace `ns` (its sockets are then the lab's).
pub fn enter(ns: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(ns);
    let f = std::fs::File::open(&path).map_err(super::io_at(&path))?;
    // SAFETY: setns(2) with a namespace file descriptor we hold open.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(LabError::Failed(format!(
            "cannot enter network namespace {ns}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
