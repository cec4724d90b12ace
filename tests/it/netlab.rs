//! A test LAN of network namespaces: namespace `lan` holds bridge br0; every host has
//! an `eth0` whose peer is a port of br0. No default route anywhere, so nothing a test
//! sends can leave. Names carry a per-test prefix; everything (processes included) is
//! removed on drop, also when the test fails.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// A bridge and no hosts yet; `None` (skip) when namespaces cannot be made here,
    /// which under CI=true is a failure instead.
    pub fn new() -> Option<Lab> {
        let prefix = format!(
            "fw{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
        };
        if let Err(e) = lab.add_namespace("lan") {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("cannot create a network namespace under CI: {e}");
            }
            crate::skipped(format!("network namespaces need root ({e})"));
            return None;
        }
        let lan = lab.ns("lan");
        let ok = sh(&[
            "ip",
            "-n",
            &lan,
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
        ])
        .and_then(|_| sh(&["ip", "-n", &lan, "link", "set", "br0", "up"]));
        if let Err(e) = ok {
            panic!("bridge: {e}");
        }
        Some(lab)
    }

    fn add_namespace(&mut self, name: &str) -> Result<(), String> {
        let ns = self.ns(name);
        sh(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])
    }

    /// The namespace's full name.
    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A host on the bridge with `eth0`, its MAC if given, and addresses (`A/len`).
    pub fn host(&mut self, name: &str, mac: Option<&str>, addrs: &[&str]) {
        let run = |r: Result<(), String>| r.unwrap_or_else(|e| panic!("host {name}: {e}"));
        run(self.add_namespace(name));
        let (ns, lan) = (self.ns(name), self.ns("lan"));
        let port = format!("{name}p");
        run(sh(&[
            "ip", "-n", &lan, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]));
        run(sh(&[
            "ip", "-n", &lan, "link", "set", &port, "master", "br0", "up",
        ]));
        if let Some(mac) = mac {
            run(sh(&[
                "ip", "-n", &ns, "link", "set", "eth0", "address", mac,
            ]));
        }
        for a in addrs {
            run(sh(&[
                "ip", "-n", &ns, "addr", "add", a, "brd", "+", "dev", "eth0",
            ]));
        }
        run(sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]));
    }

    /// `ip` inside a host's namespace, e.g. `["route", "add", ...]`.
    pub fn ip(&self, host: &str, args: &[&str]) {
        let ns = self.ns(host);
        let mut all = vec!["ip", "-n", &ns];
        all.extend_from_slice(args);
        sh(&all).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A command to run inside a host's namespace.
    pub fn cmd(&self, host: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host), program]);
        c
    }

    /// `fleetwave serve` on `host`, once it listens.
    pub fn serve(&self, host: &str, args: &[&str]) -> Serve {
        let mut cmd = self.cmd(host, env!("CARGO_BIN_EXE_fleetwave"));
        cmd.arg("serve")
            .args(args)
            .env("FLEETWAVE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("fleetwave serve starts");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut serve = Serve {
            child: Some(child),
            log,
        };
        serve.wait_for("HTTP listening", Duration::from_secs(20));
        serve
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A running `fleetwave serve`; killed on drop if still running.
pub struct Serve {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Serve {
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait for `text` in the log; panic with the log after `limit`.
    pub fn wait_for(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(text) {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                std::thread::sleep(Duration::from_millis(50));
                panic!("fleetwave serve exited ({status}); log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "fleetwave serve never logged {text:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&mut self, sig: &str) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let _ = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status();
        let status = child.wait().expect("wait");
        self.child = None;
        status
    }

    /// SIGTERM, and the exit status.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let status = self.signal("-TERM");
        // The reader thread may still hold the last lines for a moment.
        std::thread::sleep(Duration::from_millis(50));
        (status, self.log())
    }

    /// SIGKILL: a crash.
    pub fn crash(mut self) {
        self.signal("-KILL");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The lab's fleet: site `lab` on eth0, 172.28.0.0/24, pool .100-.199.
pub fn lab_fleet() -> String {
    format!(
        "{}{}",
        crate::LAB_SITE,
        r#"    unknown_hosts: register
images:
  win10:
    os: windows
    capture: {from: ref-win10, generation: 1}
hosts:
  ref-win10: {mac: "52:54:00:28:00:10", site: lab}
  pc01: {mac: "52:54:00:28:00:11", site: lab, ip: 172.28.0.11, image: win10, wave: pilot}
  pc02: {mac: "52:54:00:28:00:12", site: lab, image: win10, wave: pilot}
waves:
  pilot: {transport: unicast}
"#
    )
}

/// A directory with `fleet.yaml`, `state/`, `files/`, and iPXE binaries in `ipxe/`.
pub fn workdir(fleet: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    std::fs::write(p.join("fleet.yaml"), fleet).expect("write fleet");
    for d in ["state", "files", "ipxe"] {
        std::fs::create_dir_all(p.join(d)).expect("mkdir");
    }
    for f in ["undionly.kpxe", "snponly.efi"] {
        std::fs::write(p.join("ipxe").join(f), format!("{f} stand-in bytes")).expect("write");
    }
    dir
}

/// The arguments that point `serve` at a [`workdir`].
pub fn serve_args(dir: &Path) -> Vec<String> {
    let p = |s: &str| dir.join(s).display().to_string();
    // Every operator endpoint needs a token: the tests' own.
    crate::controller::admin_token_file(dir);
    vec![
        "--admin-token-file".into(),
        p("admin.token"),
        "--fleet".into(),
        p("fleet.yaml"),
        "--state-dir".into(),
        p("state"),
        "--ipxe-dir".into(),
        p("ipxe"),
        "--files-dir".into(),
        p("files"),
        "--http-port".into(),
        "8080".into(),
        "--image-store".into(),
        p("store"),
    ]
}
