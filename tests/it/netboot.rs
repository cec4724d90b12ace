//! The netboot environment end to end, in QEMU under TCG: a VM PXE-boots from today's
//! `fleetwave serve` in a namespace LAN (firmware → the NIC's iPXE ROM → its script →
//! kernel and initrd from `fleetwave netboot build` → /init → `fleetwave agent run`),
//! deploys an image captured from a disk file, and reboots. Judged by the serial
//! console, what the server logged, and the VM's disk against the image.
//!
//! Needs root (namespaces, taps), QEMU, Debian's kernel package through apt, and a
//! statically linked agent (built here into /var/tmp/fleetwave-static-target, or
//! FLEETWAVE_NETBOOT_AGENT). Skipped by hand without them; a failure under CI=true.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleetwave::image::store::Store;

use crate::netlab::Lab;
use crate::tool;

/// Downloaded kernels and the last build, kept between runs (CI on one machine too).
pub(crate) const CACHE: &str = "/var/tmp/fleetwave-netboot-cache";
/// The static agent's own target directory: its flags differ from the tests' build.
const STATIC_TARGET: &str = "/var/tmp/fleetwave-static-target";
/// Held by a test while its VMs run. One TCG VM takes a whole core: these cases run
/// one after another, and the lab test (two VMs at once) runs alone.
pub(crate) static QEMU: Mutex<()> = Mutex::new(());

/// A VM that has not finished by then is stuck (a whole run takes about a minute).
const VM_LIMIT: Duration = Duration::from_secs(900);

pub(crate) fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

pub(crate) fn skip(why: &str) -> bool {
    if ci() {
        panic!("{why}; under CI=true this test must run (.ci/run installs what it needs)");
    }
    eprintln!("skipping: {why}");
    false
}

/// Everything the test needs on this machine.
pub(crate) fn ready() -> bool {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root {
        return skip("PXE in QEMU needs root (namespaces and taps)");
    }
    tool("qemu-system-x86", "/usr/bin/qemu-system-x86_64")
        && tool("qemu-utils", "/usr/bin/qemu-img")
        && tool("ipxe-qemu", "/usr/lib/ipxe/qemu/pxe-e1000.rom")
        && tool("ipxe", "/usr/lib/ipxe/undionly.kpxe")
        && tool("busybox-static", "/bin/busybox")
        && tool("kmod", "/usr/bin/kmod")
        && tool("gdisk", "/usr/sbin/sgdisk")
        && tool("e2fsprogs", "/usr/sbin/mkfs.ext4")
}

/// The agent, statically linked: FLEETWAVE_NETBOOT_AGENT, or a release build made here
/// (incremental after the first).
pub(crate) fn static_agent() -> PathBuf {
    if let Ok(p) = std::env::var("FLEETWAVE_NETBOOT_AGENT") {
        return PathBuf::from(p);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_static_agent).clone()
}

fn build_static_agent() -> PathBuf {
    let out = Command::new(env!("CARGO"))
        .args(["build", "--locked", "--release", "--bin", "fleetwave"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", STATIC_TARGET)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // --target keeps these flags off build scripts and proc macros.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "the static agent did not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Path::new(STATIC_TARGET).join("x86_64-unknown-linux-gnu/release/fleetwave")
}

/// The static agent, run by the test too (capture, serve, build, verify): the binary
/// under test is the one inside the initramfs, and it is this worktree's own (the
/// shared target directory's `fleetwave` may be another checkout's by now).
fn fleetwave(args: &[&str]) -> (i32, String) {
    let out = Command::new(static_agent())
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `fleetwave serve` in namespace `host`, logging to `log`, once it listens.
fn serve(lab: &Lab, host: &str, args: &[String], log: &Path) -> Vm {
    let file = std::fs::File::create(log).expect("serve log");
    let child = lab
        .cmd(host, static_agent().to_str().expect("utf-8"))
        .arg("serve")
        .args(args)
        .env("FLEETWAVE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("fleetwave serve starts");
    let mut vm = Vm(child);
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("HTTP listening") {
            return vm;
        }
        if let Some(status) = vm.0.try_wait().expect("wait") {
            panic!("fleetwave serve exited ({status}):\n{text}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "fleetwave serve never listened:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The netboot build, made once per test run and reused across runs while the agent
/// binary is the same.
pub(crate) fn netboot_build() -> PathBuf {
    static ONCE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut done = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = &*done {
        return p.clone();
    }
    let agent = static_agent();
    let out = Path::new(CACHE).join("test-build");
    let agent_sum = std::fs::read(&agent)
        .map(|b| blake3::hash(&b).to_hex().to_string())
        .expect("the static agent");
    let stamp = out.join("agent.blake3");
    let fresh = std::fs::read_to_string(&stamp).is_ok_and(|s| s == agent_sum)
        && fleetwave::netboot::check_files_dir(&out).is_ok();
    if !fresh {
        let started = Instant::now();
        let (code, text) = fleetwave(&[
            "netboot",
            "build",
            "--out",
            out.to_str().expect("utf-8"),
            "--cache",
            CACHE,
            "--agent",
            agent.to_str().expect("utf-8"),
        ]);
        assert_eq!(code, 0, "netboot build:\n{text}");
        eprintln!(
            "{text}netboot build: {:.1} s",
            started.elapsed().as_secs_f64()
        );
        std::fs::write(&stamp, agent_sum).expect("stamp");
    }
    *done = Some(out.clone());
    out
}

/// A disk image file: GPT, one ext4 partition with files in it.
fn reference_disk(dir: &Path, bytes: u64) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("etc")).expect("mkdir");
    std::fs::write(src.join("etc/hostname"), "golden\n").expect("write");
    std::fs::write(src.join("noise.bin"), crate::bytes(3 << 20, 7)).expect("write");
    std::fs::write(src.join("text.txt"), "the golden image\n".repeat(100_000)).expect("write");
    let disk = dir.join("reference.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(bytes))
        .expect("disk file");
    let run = |c: &mut Command| {
        let out = c.output().expect("runs");
        assert!(
            out.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("sgdisk")
        .args(["-n1:2048:0", "-t1:8300"])
        .arg(&disk));
    // The partition runs from 1 MiB to 34 sectors before the end (the backup GPT).
    let fs_kib = (bytes / 512 - 2048 - 34) / 2;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "offset=1048576", "-d"])
        .arg(&src)
        .arg(&disk)
        .arg(format!("{fs_kib}k")));
    disk
}

/// What `serve` needs to send `mac` to deploy the image in `store`, or to capture it
/// when the store does not exist yet: the fleet (the controller arms the task from it
/// and the versions in the store).
fn serve_setup(dir: &Path, mac: &str, store: &Path, image: &str, host_extra: &str) -> Vec<String> {
    let fleet = if store.exists() {
        format!(
            "{}images:\n  {image}: {{os: linux}}\nhosts:\n  vm1: {{mac: \"{mac}\", site: lab, image: {image}{host_extra}}}\n",
            crate::LAB_SITE
        )
    } else {
        // Nothing captured yet: the host is the image's reference machine.
        format!(
            "{}images:\n  {image}: {{os: linux, capture: {{from: vm1, generation: 1}}}}\nhosts:\n  vm1: {{mac: \"{mac}\", site: lab{host_extra}}}\n",
            crate::LAB_SITE
        )
    };
    std::fs::write(dir.join("fleet.yaml"), fleet).expect("fleet");
    let p = |s: &str| dir.join(s).display().to_string();
    vec![
        "--fleet".into(),
        p("fleet.yaml"),
        "--image-store".into(),
        store.display().to_string(),
        "--state-dir".into(),
        p("state"),
    ]
}

/// A fleet whose site registers machines it does not know, and not the VM.
fn register_setup(dir: &Path, store: &Path) -> Vec<String> {
    let fleet = format!(
        "{}    unknown_hosts: register\nhosts:\n  other: {{mac: \"52:54:00:28:00:99\", site: lab}}\n",
        crate::LAB_SITE
    );
    std::fs::write(dir.join("fleet.yaml"), fleet).expect("fleet");
    let p = |s: &str| dir.join(s).display().to_string();
    vec![
        "--fleet".into(),
        p("fleet.yaml"),
        "--image-store".into(),
        store.display().to_string(),
        "--state-dir".into(),
        p("state"),
    ]
}

/// A QEMU (or helper) process, killed when dropped (a failing test leaves no VM behind).
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// When each console marker first appeared, in seconds since power-on.
struct Timeline {
    marks: Vec<(&'static str, f64)>,
}

/// Run the VM to its end, noting when the markers appear on the console.
fn run_vm(mut vm: Vm, console: &Path, markers: &[&'static str]) -> Timeline {
    let started = Instant::now();
    let mut marks = Vec::new();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        for m in markers {
            if !marks.iter().any(|(k, _)| k == m) && text.contains(m) {
                marks.push((*m, started.elapsed().as_secs_f64()));
            }
        }
        if let Some(status) = vm.0.try_wait().expect("wait") {
            marks.push(("qemu exited", started.elapsed().as_secs_f64()));
            eprintln!("qemu: {status}");
            return Timeline { marks };
        }
        if started.elapsed() > VM_LIMIT {
            panic!(
                "the VM was still running after {VM_LIMIT:?}; console:\n{}",
                tail(&text, 6000)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

/// The machine a case boots.
#[derive(Clone, Copy)]
enum Firmware {
    Bios,
    /// OVMF, with a fresh copy of its variables.
    Uefi,
    /// OVMF's Secure Boot build with Microsoft's keys enrolled, enforcing; the site
    /// says `secure_boot: true`. `unsigned_kernel`: the kernel served has its
    /// signature taken off.
    SecureBoot {
        unsigned_kernel: bool,
    },
}

struct Case {
    /// Names the console log kept in the cache directory.
    name: &'static str,
    firmware: Firmware,
    /// QEMU's NIC device: its iPXE ROM is what PXE-boots.
    nic: &'static str,
    /// QEMU's disk device for drive d0.
    disk: &'static str,
    /// Extra fields of the host in fleet.yaml, e.g. a disk selector.
    host_extra: &'static str,
    /// Answer router solicitations (`fleetwave netboot ra`), so iPXE does not wait
    /// for IPv6.
    ra: bool,
    /// Serve with a self-signed certificate (`--tls-cert`): the agent is sent to
    /// HTTPS with the pin, while iPXE still fetches its script and files over HTTP.
    tls: bool,
    /// What the VM does with the image.
    role: Role,
}

enum Role {
    /// Deploy the reference disk's image to a blank disk: captured from a file made
    /// here, or an earlier run's store and the reference disk it holds.
    Deploy {
        captured: Option<(PathBuf, PathBuf)>,
    },
    /// Capture its disk, a copy of the reference disk, into an empty store.
    Capture,
    /// Not in the fleet: register its inventory.
    Register,
}

/// What a run left to judge.
struct Run {
    /// Holds the files below until the test ends.
    _dir: tempfile::TempDir,
    console: String,
    serve_log: String,
    reference: PathBuf,
    store: PathBuf,
    /// serve's state directory (its database records each task's result).
    state: PathBuf,
    vm_raw: PathBuf,
}

const MAC: &str = "52:54:00:28:00:31";

/// Capture the reference disk, start serve in a namespace LAN, boot the VM to its end.
/// `None` when the machine cannot run it (a skip).
fn pxe_run(case: &Case) -> Option<Run> {
    if !ready() || (case.tls && !tool("openssl", "/usr/bin/openssl")) {
        return None;
    }
    let _turn = QEMU.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::new()?;
    let files = netboot_build();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("state")).expect("mkdir");

    // The image: captured from a disk file into the store serve hands out.
    let disk_bytes: u64 = 48 << 20;
    let (reference, store) = match &case.role {
        Role::Deploy {
            captured: Some((store, reference)),
        } => (reference.clone(), store.clone()),
        Role::Deploy { captured: None } => {
            let reference = reference_disk(d, disk_bytes);
            let store = d.join("store");
            let (code, out) = fleetwave(&[
                "agent",
                "capture",
                reference.to_str().expect("utf-8"),
                "--image",
                "golden",
                "--store",
                store.to_str().expect("utf-8"),
            ]);
            assert_eq!(code, 0, "{out}");
            (reference, store)
        }
        Role::Capture | Role::Register => (reference_disk(d, disk_bytes), d.join("store")),
    };

    lab.host("srv", None, &["172.28.0.1/24"]);
    lab.ip("lan", &["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    lab.ip("lan", &["link", "set", "tap0", "master", "br0", "up"]);
    let mut args = match case.role {
        Role::Register => register_setup(d, &store),
        _ => serve_setup(d, MAC, &store, "golden", case.host_extra),
    };
    let files = match case.firmware {
        Firmware::SecureBoot { unsigned_kernel } => {
            let fleet = d.join("fleet.yaml");
            let text = std::fs::read_to_string(&fleet).expect("fleet");
            let text = text.replace(
                "    interface: eth0\n",
                "    interface: eth0\n    secure_boot: true\n",
            );
            std::fs::write(&fleet, text).expect("fleet");
            if unsigned_kernel {
                unsigned_copy(&files, &d.join("files"))
            } else {
                files
            }
        }
        _ => files,
    };
    let files_arg = files.display().to_string();
    args.extend(
        [
            "--ipxe-dir",
            "/usr/lib/ipxe",
            "--files-dir",
            &files_arg,
            "--http-port",
            "8080",
        ]
        .map(String::from),
    );
    if case.tls {
        // A self-signed certificate: the agent trusts it by the pin in its kernel
        // command line, so no name or CA is needed.
        let (cert, key) = (d.join("server.crt"), d.join("server.key"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "30"])
            .args(["-subj", "/CN=fleetwave-netboot-test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl runs");
        assert!(made.status.success(), "openssl req");
        args.extend(["--tls-cert".into(), cert.display().to_string()]);
        args.extend(["--tls-key".into(), key.display().to_string()]);
        args.extend(["--https-port".into(), "8443".into()]);
    }
    let serve_log = d.join("serve.log");
    let server = serve(&lab, "srv", &args, &serve_log);
    // Killed with the lab's namespaces at the end.
    let _ra = case.ra.then(|| {
        lab.cmd("srv", static_agent().to_str().expect("utf-8"))
            .args(["netboot", "ra", "--interface", "eth0"])
            .stdout(Stdio::null())
            .spawn()
            .map(Vm)
            .expect("fleetwave netboot ra starts")
    });

    let vm_disk = d.join("vm.qcow2");
    let mut img = Command::new("qemu-img");
    match case.role {
        Role::Capture => img
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&reference)
            .arg(&vm_disk),
        Role::Deploy { .. } | Role::Register => img
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&vm_disk)
            .arg(disk_bytes.to_string()),
    };
    let made = img.status();
    assert!(made.is_ok_and(|s| s.success()), "qemu-img");
    let console = d.join("console.log");
    let mut qemu = lab.cmd("lan", "qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-machine", "q35", "-m", "768", "-smp", "1"])
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-monitor",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()));
    match case.firmware {
        Firmware::Bios => {
            // SeaBIOS and iPXE write to the serial port too with this fw_cfg file.
            let sercon = d.join("sercon.bin");
            std::fs::write(&sercon, [0xf8, 0x03]).expect("sercon");
            qemu.arg("-fw_cfg")
                .arg(format!("name=etc/sercon-port,file={}", sercon.display()));
        }
        Firmware::Uefi | Firmware::SecureBoot { .. } => {
            let secure = matches!(case.firmware, Firmware::SecureBoot { .. });
            let (code, vars_from) = if secure {
                // Microsoft's keys enrolled, Secure Boot enforced.
                ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd")
            } else {
                ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")
            };
            let vars = d.join("vars.fd");
            std::fs::copy(Path::new("/usr/share/OVMF").join(vars_from), &vars).expect("OVMF vars");
            if secure {
                // SMM keeps the variables (and so the keys) out of the OS's reach.
                qemu.args([
                    "-machine",
                    "q35,smm=on",
                    "-global",
                    "driver=cfi.pflash01,property=secure,value=on",
                ]);
            }
            qemu.arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/{code}"
                ))
                .arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    vars.display()
                ));
        }
    }
    let vm = qemu
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .arg("-device")
        .arg(format!("{},netdev=n0,mac={MAC},bootindex=1", case.nic))
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=qcow2",
            vm_disk.display()
        ))
        .args(["-device", case.disk])
        .args(["-boot", "order=n,strict=on,reboot-timeout=0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu starts");
    let timeline = run_vm(
        Vm(vm),
        &console,
        &[
            "iPXE",
            // iPXE prints the address once DHCP (and its IPv6 wait) is over.
            "net0: 172.28.0.",
            "/files/initrd.img... ok",
            "Linux version",
            "fleetwave-init: started",
            "fleetwave-init: running the agent",
            "deployed and verified",
            "fleetwave-init: agent finished: ok",
            "fleetwave-init: FAILED",
            "fleetwave-init: rebooting",
            "fleetwave-init: powering off",
            // Secure Boot: GRUB from the signed shim, and what the kernel says of it.
            "fleetwave: vm1",
            "EFI stub: UEFI Secure Boot is enabled",
            "bad shim signature",
        ],
    );
    eprintln!("{}: seconds since power-on", case.name);
    for (m, t) in &timeline.marks {
        eprintln!("{t:7.1}  {m}");
    }
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    // Kept for reading after the run (the temporary directory goes).
    let _ = std::fs::write(
        Path::new(CACHE).join(format!("{}.console.log", case.name)),
        &text,
    );
    // The server logs the result a moment after the VM sent it.
    let settled = Instant::now();
    while !["task done", "task FAILED"]
        .iter()
        .any(|m| std::fs::read_to_string(&serve_log).is_ok_and(|t| t.contains(m)))
        && settled.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    let serve_log = std::fs::read_to_string(&serve_log).unwrap_or_default();
    let vm_raw = d.join("vm.raw");
    let converted = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&vm_disk)
        .arg(&vm_raw)
        .status();
    assert!(converted.is_ok_and(|s| s.success()), "qemu-img convert");
    let state = d.join("state");
    Some(Run {
        _dir: dir,
        console: text,
        serve_log,
        reference,
        store,
        state,
        vm_raw,
    })
}

/// The run deployed: the console and the server say so, the VM's disk is the
/// reference disk byte for byte, and the agent verifies it against the store.
fn assert_deployed(r: &Run) {
    assert!(
        r.console.contains("fleetwave-init: agent finished: ok")
            && r.console.contains("fleetwave-init: rebooting"),
        "console:\n{}\nserve:\n{}",
        tail(&r.console, 8000),
        tail(&r.serve_log, 4000)
    );
    assert!(r.serve_log.contains("task done"), "{}", r.serve_log);
    assert!(!r.serve_log.contains("task FAILED"), "{}", r.serve_log);
    let (a, b) = (
        std::fs::read(&r.reference).expect("read"),
        std::fs::read(&r.vm_raw).expect("read"),
    );
    assert_eq!(a.len(), b.len());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "the VM's disk differs from the image");
    let (code, out) = fleetwave(&[
        "agent",
        "verify",
        "golden",
        r.vm_raw.to_str().expect("utf-8"),
        "--store",
        r.store.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn bios_e1000_sata_pxe_boots_the_agent_which_deploys_and_verifies_over_pinned_https() {
    let case = Case {
        name: "bios-e1000-sata",
        firmware: Firmware::Bios,
        nic: "e1000",
        disk: "ide-hd,drive=d0,bus=ide.0",
        host_extra: "",
        ra: true,
        tls: true,
        role: Role::Deploy { captured: None },
    };
    if let Some(r) = pxe_run(&case) {
        assert_deployed(&r);
        // The agent was sent to HTTPS with the pin: plain HTTP refuses the API with
        // TLS on (403), so a task done is a task done over pinned HTTPS.
        assert!(
            r.serve_log.contains("HTTPS listening on 0.0.0.0:8443")
                && r.serve_log.contains("certificate fingerprint sha256:"),
            "{}",
            r.serve_log
        );
        assert!(
            !r.serve_log.contains("status=403"),
            "something asked plain HTTP for the API:\n{}",
            r.serve_log
        );
    }
}

#[test]
fn uefi_virtio_nvme_pxe_boots_the_agent_which_deploys_and_verifies() {
    if !tool("ovmf", "/usr/share/OVMF/OVMF_CODE_4M.fd") {
        return;
    }
    let case = Case {
        name: "uefi-virtio-nvme",
        firmware: Firmware::Uefi,
        nic: "virtio-net-pci",
        disk: "nvme,drive=d0,serial=fleetwave0",
        host_extra: "",
        ra: true,
        tls: false,
        role: Role::Deploy { captured: None },
    };
    if let Some(r) = pxe_run(&case) {
        assert_deployed(&r);
    }
}

/// UEFI firmware's own PXE client (the NIC's iPXE ROM off, as on real UEFI machines):
/// OVMF takes the authoritative offer, loads snponly.efi by TFTP, and iPXE runs the
/// host's script.
#[test]
fn uefi_firmware_pxe_with_the_rom_off_boots_the_agent_which_deploys_and_verifies() {
    if !tool("ovmf", "/usr/share/OVMF/OVMF_CODE_4M.fd") {
        return;
    }
    let case = Case {
        name: "uefi-firmware-pxe",
        firmware: Firmware::Uefi,
        nic: "virtio-net-pci,romfile=",
        disk: "nvme,drive=d0,serial=fleetwave0",
        host_extra: "",
        ra: true,
        tls: false,
        role: Role::Deploy { captured: None },
    };
    if let Some(r) = pxe_run(&case) {
        assert_deployed(&r);
    }
}

/// A disk selector that matches nothing: the server records a failure, never success,
/// the disk is untouched, and the VM still reboots.
#[test]
fn a_task_that_cannot_be_done_is_reported_failed_never_done() {
    let case = Case {
        name: "bios-failing-task",
        firmware: Firmware::Bios,
        nic: "e1000",
        disk: "ide-hd,drive=d0,bus=ide.0",
        host_extra: ", disk: {serial: no-such-disk}",
        ra: true,
        tls: false,
        role: Role::Deploy { captured: None },
    };
    let Some(r) = pxe_run(&case) else {
        return;
    };
    assert!(
        r.console.contains("fleetwave-init: FAILED")
            && r.console.contains("fleetwave-init: rebooting"),
        "console:\n{}",
        tail(&r.console, 8000)
    );
    assert!(r.serve_log.contains("task FAILED"), "{}", r.serve_log);
    // With the tail of the agent's log.
    assert!(r.serve_log.contains("--- last lines of"), "{}", r.serve_log);
    assert!(!r.serve_log.contains("task done"), "{}", r.serve_log);
    // The recorded result: a failure, with the tail of /init's log.
    let db = rusqlite::Connection::open(r.state.join("state.db")).expect("state database");
    let results: Vec<String> = db
        .prepare("SELECT result FROM tasks WHERE result IS NOT NULL")
        .and_then(|mut q| {
            q.query_map([], |row| row.get(0))?
                .collect::<Result<Vec<String>, _>>()
        })
        .expect("results");
    assert_eq!(results.len(), 1, "{results:?}");
    let result: serde_json::Value = serde_json::from_str(&results[0]).expect("json");
    assert_eq!(result["ok"], false, "{result}");
    let log_tail = result["log_tail"].as_str().unwrap_or_default();
    assert!(
        log_tail.contains("fleetwave-init: running the agent"),
        "{result}"
    );
    let disk = std::fs::read(&r.vm_raw).expect("read");
    assert!(disk.iter().all(|b| *b == 0), "the disk was written");
}

/// `build` with its kernel's Authenticode signature taken off (the PE security
/// directory emptied and the table cut): the same kernel, unsigned.
fn unsigned_copy(build: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to.join("secureboot")).expect("mkdir");
    for f in [
        "initrd.img",
        "manifest.json",
        "secureboot/shimx64.efi",
        "secureboot/grubx64.efi",
    ] {
        std::fs::copy(build.join(f), to.join(f)).expect("copy");
    }
    let mut k = std::fs::read(build.join("vmlinuz")).expect("vmlinuz");
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let pe = u32_at(&k, 0x3c) as usize;
    assert_eq!(&k[pe..pe + 4], b"PE\0\0", "vmlinuz is not a PE image");
    let opt = pe + 24;
    assert_eq!(u16::from_le_bytes([k[opt], k[opt + 1]]), 0x20b, "not PE32+");
    // Data directory 4 (the certificate table) of a PE32+ optional header.
    let dir = opt + 112 + 4 * 8;
    let (at, len) = (u32_at(&k, dir) as usize, u32_at(&k, dir + 4) as usize);
    assert!(
        at > 0 && len > 0,
        "the kernel carries no signature to take off"
    );
    k[dir..dir + 8].fill(0);
    k.truncate(at);
    std::fs::write(to.join("vmlinuz"), k).expect("write");
    to.to_path_buf()
}

/// Issue 18, test 3: OVMF enforcing Secure Boot with Microsoft's keys boots Debian's
/// signed shim, GRUB and kernel from serve, and the agent deploys; the same machine
/// refuses a kernel whose signature was taken off (enforcement was on).
#[test]
fn secure_boot_boots_the_signed_chain_which_deploys_and_refuses_an_unsigned_kernel() {
    if !tool("ovmf", "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd") {
        return;
    }
    let case = Case {
        name: "uefi-secure-boot",
        firmware: Firmware::SecureBoot {
            unsigned_kernel: false,
        },
        nic: "virtio-net-pci,romfile=",
        disk: "nvme,drive=d0,serial=fleetwave0",
        host_extra: "",
        ra: false,
        tls: false,
        role: Role::Deploy { captured: None },
    };
    let Some(r) = pxe_run(&case) else {
        return;
    };
    assert!(
        r.console.contains("EFI stub: UEFI Secure Boot is enabled"),
        "the kernel did not boot under Secure Boot:\n{}",
        tail(&r.console, 6000)
    );
    assert!(
        r.serve_log.contains("shimx64.efi") && r.serve_log.contains("grubx64.efi"),
        "{}",
        r.serve_log
    );
    assert_deployed(&r);

    let refused = Case {
        name: "uefi-secure-boot-unsigned",
        firmware: Firmware::SecureBoot {
            unsigned_kernel: true,
        },
        ..case
    };
    let Some(r) = pxe_run(&refused) else {
        return;
    };
    assert!(
        r.console.contains("bad shim signature"),
        "the unsigned kernel was not refused:\n{}",
        tail(&r.console, 6000)
    );
    assert!(
        !r.console.contains("Linux version"),
        "the unsigned kernel ran"
    );
    assert!(!r.serve_log.contains("task done"), "{}", r.serve_log);
    let disk = std::fs::read(&r.vm_raw).expect("read");
    assert!(disk.iter().all(|b| *b == 0), "the disk was written");
}

/// A capture from a VM's disk, then a deploy of that capture to another VM.
#[test]
fn a_vm_captures_its_disk_and_another_vm_gets_that_capture() {
    let capture = Case {
        name: "bios-capture",
        firmware: Firmware::Bios,
        nic: "e1000",
        disk: "ide-hd,drive=d0,bus=ide.0",
        host_extra: "",
        ra: true,
        tls: false,
        role: Role::Capture,
    };
    let Some(first) = pxe_run(&capture) else {
        return;
    };
    assert!(
        first.console.contains("fleetwave-init: agent finished: ok"),
        "console:\n{}\nserve:\n{}",
        tail(&first.console, 8000),
        tail(&first.serve_log, 4000)
    );
    assert!(
        first.serve_log.contains("image version committed"),
        "{}",
        first.serve_log
    );
    assert!(first.serve_log.contains("task done"), "{}", first.serve_log);
    let record = Store::open(&first.store)
        .and_then(|s| s.image("golden"))
        .expect("store")
        .expect("the capture recorded the image");
    assert_eq!(record.versions.len(), 1);
    assert_eq!(record.versions[0].generation, 1);

    let deploy = Case {
        name: "bios-deploy-of-a-vm-capture",
        role: Role::Deploy {
            captured: Some((first.store.clone(), first.reference.clone())),
        },
        ..capture
    };
    if let Some(second) = pxe_run(&deploy) {
        assert_deployed(&second);
    }
}

/// The tools the build copied from this machine run inside the initramfs with the
/// libraries it copied beside them (`ldd`'s list was complete), and so does the agent.
#[test]
fn the_initramfs_tools_run_with_the_libraries_it_holds() {
    if !ready() {
        return;
    }
    let files = netboot_build();
    let manifest = fleetwave::netboot::check_files_dir(&files).expect("a complete build");
    let root = tempfile::tempdir().expect("tempdir");
    let packed = std::fs::read(files.join("initrd.img")).expect("initrd");
    let cpio = zstd::stream::decode_all(&packed[..]).expect("zstd");
    unpack_newc(&cpio, root.path());
    let mut programs: Vec<&str> = manifest.tools.iter().map(String::as_str).collect();
    programs.push("/usr/bin/fleetwave");
    for p in programs {
        let out = Command::new("chroot")
            .arg(root.path())
            .args([p, "--version"])
            .output()
            .expect("chroot");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A missing library is the loader's error, whatever the tool thinks of --version.
        assert!(
            !text.contains("error while loading shared libraries")
                && out.status.code() != Some(127),
            "{p}: {text}"
        );
    }
}

/// Files, directories and symlinks of a newc archive under `root`.
fn unpack_newc(data: &[u8], root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut at = 0;
    loop {
        let field = |i: usize| {
            let s = std::str::from_utf8(&data[at + 6 + i * 8..at + 14 + i * 8]).expect("hex");
            usize::from_str_radix(s, 16).expect("hex")
        };
        assert_eq!(&data[at..at + 6], b"070701", "a newc header at {at}");
        let (mode, size, namesize) = (field(1), field(6), field(11));
        let name = std::str::from_utf8(&data[at + 110..at + 110 + namesize - 1]).expect("name");
        at += (110 + namesize).div_ceil(4) * 4;
        let body = &data[at..at + size];
        at += size.div_ceil(4) * 4;
        if name == "TRAILER!!!" {
            return;
        }
        let path = root.join(name);
        match mode & 0o170000 {
            0o040000 => std::fs::create_dir_all(&path).expect("dir"),
            0o120000 => {
                std::os::unix::fs::symlink(std::str::from_utf8(body).expect("target"), &path)
                    .expect("symlink")
            }
            _ => {
                std::fs::write(&path, body).expect("file");
                std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(mode as u32 & 0o7777),
                )
                .expect("mode");
            }
        }
    }
}

/// A machine the fleet does not know registers its inventory, then powers off as the
/// server says (a registration must not loop through PXE).
#[test]
fn an_unknown_machine_registers_and_powers_off() {
    let case = Case {
        name: "bios-register",
        firmware: Firmware::Bios,
        nic: "e1000",
        disk: "ide-hd,drive=d0,bus=ide.0",
        host_extra: "",
        ra: true,
        tls: false,
        role: Role::Register,
    };
    let Some(r) = pxe_run(&case) else {
        return;
    };
    assert!(
        r.console
            .contains("fleetwave-init: after the task: poweroff")
            && r.console.contains("fleetwave-init: agent finished: ok")
            && r.console.contains("fleetwave-init: powering off"),
        "console:\n{}\nserve:\n{}",
        tail(&r.console, 8000),
        tail(&r.serve_log, 4000)
    );
    assert!(r.serve_log.contains("task done"), "{}", r.serve_log);
    let disk = std::fs::read(&r.vm_raw).expect("read");
    assert!(disk.iter().all(|b| *b == 0), "the disk was written");
}
