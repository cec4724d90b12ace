//! `fleetwave lab`: set a lab up, follow its run to the end, verify, summarize.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::disk::{self, BOOT_MARKER};
use super::{LabError, LabHost, LabState, Result, io_at, net, run};
use crate::image::store::Store;
use crate::spec::{Digest, FleetSpec};

/// What `fleetwave lab` was asked.
#[derive(Debug, Clone)]
pub struct LabArgs {
    /// A fleet file, a directory holding fleet.yaml, or a git repository's work tree.
    pub fleet: PathBuf,
    /// A fleet repository and the revision to boot (the pull-request check).
    pub git: Option<(String, String)>,
    pub name: Option<String>,
    pub keep: bool,
    pub vms: usize,
    pub site: Option<String>,
    pub reference_disk: Option<PathBuf>,
    /// What a machine prints when it has booted from its disk; `None`: the reference
    /// disk's own line, which also names the host.
    pub boot_marker: Option<String>,
    pub files_dir: PathBuf,
    pub cache: PathBuf,
    pub agent: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub timeout: Duration,
}

/// One host's line in the summary (also written to `DIR/summary.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostSummary {
    pub host: String,
    /// capture, unicast or multicast.
    pub transport: String,
    /// Bytes the image holds (data moved over the network).
    pub bytes: u64,
    /// Seconds from the agent starting to its verified result.
    pub seconds: Option<f64>,
    /// The version on its disk, verified here after the run.
    pub digest: Option<String>,
    pub verified: bool,
    /// Bytes compared with the reference disk over the image's used ranges, and
    /// whether all were equal (targets only).
    pub compared_bytes: u64,
    pub equal: Option<bool>,
    /// The line the machine printed when it booted from its disk.
    pub booted: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub lab: String,
    pub commit: Option<String>,
    pub hosts: Vec<HostSummary>,
    /// Seconds per phase, in the order they happen.
    pub phases: Vec<(String, f64)>,
    pub ok: bool,
    pub problems: Vec<String>,
}

/// What the monitor saw of one host, in seconds since the lab started.
#[derive(Debug, Default, Clone)]
struct Track {
    on: Option<f64>,
    agent: Option<f64>,
    done: Option<f64>,
    disk: Option<f64>,
    booted_line: Option<String>,
    state: String,
    bytes: u64,
    shown: String,
}

fn root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// What the machine lacks for a lab, by Debian package.
pub fn missing(build_disk: bool) -> Vec<String> {
    let mut need = Vec::new();
    let mut check = |path: &str, package: &str| {
        if !Path::new(path).exists() && !need.iter().any(|n| n == package) {
            need.push(package.to_string());
        }
    };
    check("/usr/bin/qemu-system-x86_64", "qemu-system-x86");
    check("/usr/lib/ipxe/qemu/pxe-e1000.rom", "ipxe-qemu");
    check("/usr/lib/ipxe/undionly.kpxe", "ipxe");
    check("/usr/bin/kmod", "kmod");
    check("/sbin/ip", "iproute2");
    if build_disk {
        check("/bin/busybox", "busybox-static");
        check("/usr/sbin/sgdisk", "gdisk");
        check("/usr/sbin/mkfs.ext4", "e2fsprogs");
        check("/usr/sbin/mkntfs", "ntfs-3g");
        check("/usr/sbin/ntfscp", "ntfs-3g");
        check("/usr/bin/extlinux", "extlinux");
        check(disk::GPTMBR, "syslinux-common");
    }
    let has_git = Command::new("git")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_git {
        need.push("git".into());
    }
    need
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=fleetwave lab",
            "-c",
            "user.email=lab@fleetwave.invalid",
        ])
        .args(args)
        .output()
        .map_err(|e| LabError::Failed(format!("cannot run git: {e}")))?;
    if !out.status.success() {
        return Err(LabError::Failed(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The lab's repository: the fleet committed into `work`, pushed to the bare
/// `fleet.git` serve follows. The commit id.
fn make_repo(dir: &Path, args: &LabArgs) -> Result<String> {
    let work = dir.join("work");
    let bare = dir.join("fleet.git");
    let bare_s = bare.display().to_string();
    let work_s = work.display().to_string();
    match &args.git {
        Some((repo, rev)) => {
            git(dir, &["clone", "-q", repo, &work_s])?;
            git(&work, &["checkout", "-q", "-B", "main", rev])
                .map_err(|e| LabError::Failed(format!("--rev {rev} in {repo}: {e}")))?;
        }
        None => {
            let src = &args.fleet;
            if src.join(".git").exists() {
                git(dir, &["clone", "-q", &src.display().to_string(), &work_s])?;
                git(&work, &["checkout", "-q", "-B", "main"])?;
            } else {
                std::fs::create_dir_all(&work).map_err(io_at(&work))?;
                if src.is_dir() {
                    run(Command::new("cp").arg("-a").arg(src.join(".")).arg(&work))?;
                } else {
                    std::fs::copy(src, work.join("fleet.yaml")).map_err(|e| {
                        LabError::Failed(format!(
                            "{}: {e} (give a fleet file, a directory holding fleet.yaml, \
                             or --git REPO --rev REV)",
                            src.display()
                        ))
                    })?;
                }
                git(&work, &["init", "-q", "-b", "main"])?;
                git(&work, &["add", "-A"])?;
                git(&work, &["commit", "-q", "-m", "the fleet, for the lab"])?;
            }
        }
    }
    let _ = git(&work, &["remote", "remove", "origin"]);
    git(dir, &["init", "-q", "--bare", "-b", "main", &bare_s])?;
    git(&work, &["remote", "add", "origin", &bare_s])?;
    git(&work, &["push", "-q", "-u", "origin", "main"])?;
    // So that commits made by hand in the lab need no identity set up.
    git(&work, &["config", "user.name", "fleetwave lab"])?;
    git(&work, &["config", "user.email", "lab@fleetwave.invalid"])?;
    git(&work, &["rev-parse", "HEAD"])
}

fn load_fleet(work: &Path) -> Result<FleetSpec> {
    let path = work.join("fleet.yaml");
    match crate::cli::load(&crate::source::DirTree, &path) {
        Ok(Ok((spec, _))) => Ok(spec),
        Ok(Err(_)) => Err(LabError::Failed(format!(
            "{} is invalid: `fleetwave validate {}` says where",
            path.display(),
            path.display()
        ))),
        Err(e) => Err(LabError::Failed(format!("{}: {e:#}", path.display()))),
    }
}

/// The netboot build serve hands out: `files_dir` if complete, else built there.
fn netboot_files(args: &LabArgs, out: &mut dyn Write) -> Result<()> {
    if crate::netboot::check_files_dir(&args.files_dir).is_ok() {
        return Ok(());
    }
    let agent = match &args.agent {
        Some(a) => a.clone(),
        None => std::env::current_exe().map_err(io_at(Path::new("/proc/self/exe")))?,
    };
    let _ = writeln!(
        out,
        "building the netboot environment into {} (agent {})",
        args.files_dir.display(),
        agent.display()
    );
    let opts = crate::netboot::BuildOptions {
        out: args.files_dir.clone(),
        cache: args.cache.clone(),
        agent,
        level: 9,
    };
    crate::netboot::build(&opts, out).map_err(|e| {
        LabError::Failed(format!(
            "netboot build: {e} (docs/netboot.md; or point --files-dir at a build)"
        ))
    })?;
    Ok(())
}

/// Removes the lab when dropped, unless told to keep it.
struct Guard {
    state: Option<LabState>,
    keep_files: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = self.state.take() {
            let _ = super::down(&s, self.keep_files);
        }
    }
}

fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Run the lab; the exit code.
pub fn lab(args: &LabArgs, out: &mut dyn Write) -> Result<u8> {
    let started = Instant::now();
    if !root() {
        return Err(LabError::Missing(
            "root (network namespaces, taps, loop devices): run it with sudo".into(),
        ));
    }
    let need = missing(args.reference_disk.is_none());
    if !need.is_empty() {
        return Err(LabError::Missing(format!(
            "these Debian packages: {}",
            need.join(" ")
        )));
    }
    // A missing netboot build is made from a static agent: say so before anything.
    if crate::netboot::check_files_dir(&args.files_dir).is_err() {
        let agent = match &args.agent {
            Some(a) => a.clone(),
            None => std::env::current_exe().map_err(io_at(Path::new("/proc/self/exe")))?,
        };
        if !crate::netboot::is_static(&agent).unwrap_or(false) {
            return Err(LabError::Failed(format!(
                "{} holds no netboot build, and {} is not statically linked, so it cannot \
                 go into one: build fleetwave static (docs/lab.md, quick start) and run that, \
                 pass --agent STATIC_FLEETWAVE, or --files-dir a build",
                args.files_dir.display(),
                agent.display()
            )));
        }
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("fwlab{}", std::process::id() % 100_000));
    if LabState::path(&name).exists() {
        return Err(LabError::Failed(format!(
            "a lab named {name} is running: `fleetwave lab down --name {name}` first"
        )));
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/tmp/fleetwave-lab").join(&name));
    if dir.exists() {
        // Only an earlier lab's directory (or an empty one) is replaced: --dir may
        // name anything.
        let earlier = dir.join("fleet.git").exists() && dir.join("disks").exists();
        let empty = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none());
        if !earlier && !empty {
            return Err(LabError::Failed(format!(
                "{} exists and is not an earlier lab's directory: name another with --dir",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(&dir).map_err(io_at(&dir))?;
    }
    for d in ["state", "store", "disks", "console", "vm"] {
        let p = dir.join(d);
        std::fs::create_dir_all(&p).map_err(io_at(&p))?;
    }
    let commit = make_repo(&dir, args)?;
    let spec = load_fleet(&dir.join("work"))?;
    let site_name = match &args.site {
        Some(s) if spec.sites.contains_key(s) => s.clone(),
        Some(s) => {
            return Err(LabError::Failed(format!(
                "--site {s}: the fleet has no such site ({})",
                spec.sites.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        None if spec.sites.contains_key("lab") => "lab".into(),
        None if spec.sites.len() == 1 => spec.sites.keys().next().cloned().unwrap_or_default(),
        None => {
            return Err(LabError::Failed(format!(
                "the fleet has several sites ({}) and none is named lab: choose one with --site",
                spec.sites.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    };
    let site = spec
        .sites
        .get(&site_name)
        .ok_or_else(|| LabError::Failed(format!("no site {site_name}")))?;
    let references: Vec<&str> = spec
        .images
        .values()
        .filter_map(|i| i.capture.as_ref().map(|c| c.host.as_str()))
        .collect();
    let site_hosts: Vec<&crate::spec::Host> = spec
        .hosts
        .values()
        .filter(|h| h.site == site_name)
        .collect();
    if site_hosts.is_empty() {
        return Err(LabError::Failed(format!(
            "site {site_name} has no hosts: nothing to boot"
        )));
    }
    let _ = writeln!(
        out,
        "lab {name}: site {site_name} ({} on {}), {} hosts, commit {}, in {}",
        site.server,
        site.subnet,
        site_hosts.len(),
        &commit[..commit.len().min(12)],
        dir.display()
    );

    netboot_files(args, out)?;
    let reference = dir.join("disks/reference.raw");
    match &args.reference_disk {
        Some(file) => {
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(file)
                .arg(&reference))?;
        }
        None => {
            let t = Instant::now();
            disk::build(&reference, &args.cache, &dir, out)?;
            let _ = writeln!(out, "reference disk built in {:.1} s", secs(t));
        }
    }
    let disk_bytes = std::fs::metadata(&reference)
        .map_err(io_at(&reference))?
        .len();
    let mut hosts = Vec::new();
    for (i, h) in site_hosts.iter().enumerate() {
        let disk = dir.join("disks").join(format!("{}.raw", h.name));
        let is_ref = references.contains(&h.name.as_str());
        if is_ref {
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(&reference)
                .arg(&disk))?;
        } else {
            let f = std::fs::File::create(&disk).map_err(io_at(&disk))?;
            f.set_len(disk_bytes).map_err(io_at(&disk))?;
        }
        hosts.push(LabHost {
            name: h.name.clone(),
            mac: h.mac.to_string(),
            tap: format!("tap{i}"),
            disk,
            console: dir.join("console").join(format!("{}.log", h.name)),
            reference: is_ref,
        });
    }
    let exe = std::env::current_exe().map_err(io_at(Path::new("/proc/self/exe")))?;
    let token = dir.join("admin-token");
    std::fs::write(
        &token,
        format!("lab-{name}-{}\n", blake3::hash(commit.as_bytes())),
    )
    .map_err(io_at(&token))?;
    let state = LabState {
        name: name.clone(),
        dir: dir.clone(),
        srv_ns: format!("{name}-srv"),
        lan_ns: format!("{name}-lan"),
        interface: site.interface.clone(),
        server: site.server,
        prefix_len: site.subnet.prefix_len(),
        exe: exe.clone(),
        files_dir: args.files_dir.clone(),
        ipxe_dir: PathBuf::from("/usr/lib/ipxe"),
        vms: args.vms.max(1),
        interval_secs: 2,
        hosts,
    };
    // Recorded before anything is made, so `lab down` finds whatever this leaves.
    state.save()?;
    let mut guard = Guard {
        state: Some(state.clone()),
        keep_files: true,
    };
    let stop = crate::cli::stop_flag();
    net::create(&state)?;
    spawn_supervisor(&state)?;
    // From here on this thread's sockets are in the lab's server namespace.
    net::enter(&state.srv_ns)?;
    let _ = writeln!(
        out,
        "server {} in namespace {}; VMs in {} (at most {} at once); setup took {:.1} s",
        state.url(),
        state.srv_ns,
        state.lan_ns,
        state.vms,
        secs(started)
    );
    let _ = out.flush();

    let outcome = follow(&state, &spec, args, stop, started, out);
    let mut summary = match outcome {
        Ok(s) => s,
        Err(e) => {
            if stop.load(Ordering::Relaxed) {
                let _ = writeln!(out, "interrupted: removing the lab");
                guard.keep_files = false;
                return Ok(130);
            }
            let _ = writeln!(
                out,
                "the lab failed: {e}\nlogs, consoles and disks are kept in {} \
                 (serve.log, supervisor.log, console/HOST.log)",
                dir.display()
            );
            return Ok(crate::cli::exit::CHANGES);
        }
    };
    summary.commit = Some(commit.clone());
    summary.phases.push((
        "total, setup included".into(),
        (secs(started) * 10.0).round() / 10.0,
    ));
    print_summary(&summary, out);
    let _ = out.flush();
    let path = dir.join("summary.json");
    if let Ok(text) = serde_json::to_string_pretty(&summary) {
        let _ = std::fs::write(&path, text);
    }
    if args.keep {
        guard.state = None;
        print_keep_help(&state, out);
    } else if summary.ok {
        guard.keep_files = false;
    } else {
        let _ = writeln!(out, "logs, consoles and disks kept in {}", dir.display());
    }
    Ok(if summary.ok {
        crate::cli::exit::OK
    } else {
        crate::cli::exit::CHANGES
    })
}

fn spawn_supervisor(s: &LabState) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let log = s.dir.join("supervisor.log");
    let file = std::fs::File::create(&log).map_err(io_at(&log))?;
    let err = file.try_clone().map_err(io_at(&log))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &s.srv_ns])
        .arg(&s.exe)
        .args(["lab", "supervise", "--name", &s.name])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err);
    // Its own session: a Ctrl-C in the terminal reaches `lab`, which removes the lab
    // in order, not the supervisor halfway.
    // SAFETY: setsid(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(io_at(&s.exe))?;
    Ok(())
}

/// The transport that brings a host its image.
fn transport(spec: &FleetSpec, host: &LabHost) -> String {
    if host.reference {
        return "capture".into();
    }
    let Some(h) = spec.hosts.get(&host.name) else {
        return "-".into();
    };
    if h.image.is_none() {
        return "-".into();
    }
    match spec.waves.get(&h.wave).map(|w| &w.transport) {
        Some(crate::spec::Transport::Multicast) => "multicast".into(),
        Some(crate::spec::Transport::Auto) => "auto".into(),
        _ => "unicast".into(),
    }
}

/// The boot line the console shows after the last finished agent, if any.
fn boot_line(console: &str, marker: &str, host: &str, own_marker: bool) -> Option<String> {
    let after = console.rfind("fleetwave-init: agent finished: ok")?;
    let rest = &console[after..];
    let line = rest.lines().find(|l| l.contains(marker))?;
    // From the line's own text on: the firmware's screen-clearing escapes precede it.
    let from = line.find("fleetwave-lab:").or_else(|| line.find(marker))?;
    let line = line[from..].trim().to_string();
    if own_marker || line.contains(&format!("fleetwave-lab: {host} {BOOT_MARKER}")) {
        Some(line)
    } else {
        None
    }
}

/// Follow the run until every host is Ready and has booted from its disk; then verify.
fn follow(
    s: &LabState,
    spec: &FleetSpec,
    args: &LabArgs,
    stop: &AtomicBool,
    started: Instant,
    out: &mut dyn Write,
) -> Result<Summary> {
    let marker = args.boot_marker.clone().unwrap_or(BOOT_MARKER.to_string());
    let own_marker = args.boot_marker.is_some();
    let imaged: Vec<&LabHost> = s
        .hosts
        .iter()
        .filter(|h| transport(spec, h) != "-")
        .collect();
    let mut tracks: BTreeMap<String, Track> = BTreeMap::new();
    let mut quiet_since: Option<Instant> = None;
    let mut last_line = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(LabError::Failed("interrupted".into()));
        }
        if started.elapsed() > args.timeout {
            let now: Vec<String> = tracks
                .iter()
                .map(|(h, t)| format!("{h}: {}", t.state))
                .collect();
            return Err(LabError::Failed(format!(
                "not done after {:?} ({}); raise --timeout if the machine is busy",
                args.timeout,
                now.join(", ")
            )));
        }
        let t = secs(started);
        // The consoles: when each machine reached each point.
        for h in &s.hosts {
            let text = std::fs::read(&h.console)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let tr = tracks.entry(h.name.clone()).or_default();
            if tr.on.is_none() && !text.is_empty() {
                tr.on = Some(t);
            }
            if tr.agent.is_none() && text.contains("fleetwave-init: running the agent") {
                tr.agent = Some(t);
            }
            if tr.done.is_none() && text.contains("fleetwave-init: agent finished: ok") {
                tr.done = Some(t);
            }
            if tr.disk.is_none()
                && let Some(line) = boot_line(&text, &marker, &h.name, own_marker)
            {
                tr.disk = Some(t);
                tr.booted_line = Some(line);
            }
        }
        let Some(status) = super::supervise::status(&s.url(), &s.dir) else {
            if quiet_since.is_none() {
                quiet_since = Some(Instant::now());
                let _ = writeln!(out, "[{t:6.1}s] the server does not answer (starting?)");
            }
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        quiet_since = None;
        let mut all_ready = status.applied.is_some();
        for h in &s.hosts {
            let Some(v) = status.hosts.iter().find(|v| v.name == h.name) else {
                continue;
            };
            let tr = tracks.entry(h.name.clone()).or_default();
            tr.state = v.state.clone();
            if v.state == "Stalled" {
                return Err(LabError::Failed(format!(
                    "{} is Stalled: {} {} (`fleetwave status` in the lab says more)",
                    h.name,
                    v.reason.clone().unwrap_or_default(),
                    v.message.clone().unwrap_or_default()
                )));
            }
            if v.state != "Ready" {
                all_ready = false;
            }
            let mut line = format!("{:<10} {:<9} wave {:<8}", h.name, v.state, v.wave);
            if let Some(p) = &v.progress {
                tr.bytes = tr.bytes.max(p.total_bytes);
                line.push_str(&format!(
                    " {:>6.1}/{:.1} MB {:>6.1} MB/s",
                    p.done_bytes as f64 / 1e6,
                    p.total_bytes as f64 / 1e6,
                    p.bytes_per_sec as f64 / 1e6
                ));
            }
            if tr.disk.is_some() {
                line.push_str(" booted from disk");
            }
            if line != tr.shown {
                let _ = writeln!(out, "[{t:6.1}s] {line}");
                tr.shown = line;
                last_line = Instant::now();
            }
        }
        let booted = imaged
            .iter()
            .all(|h| tracks.get(&h.name).is_some_and(|t| t.disk.is_some()));
        if all_ready && booted {
            break;
        }
        if last_line.elapsed() > Duration::from_secs(60) {
            let waiting: Vec<&str> = imaged
                .iter()
                .filter(|h| tracks.get(&h.name).is_none_or(|t| t.disk.is_none()))
                .map(|h| h.name.as_str())
                .collect();
            let _ = writeln!(
                out,
                "[{t:6.1}s] waiting for {} to boot from disk",
                waiting.join(", ")
            );
            last_line = Instant::now();
        }
        let _ = out.flush();
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every VM has powered off (or is about to): the disks are still.
    let _ = out.flush();
    wait_vms_off(s);
    let t_verify = Instant::now();
    let mut summary = verify(s, spec, &tracks, out)?;
    let verify_secs = secs(t_verify);
    summary.lab = s.name.clone();
    phases(&mut summary, s, spec, &tracks, verify_secs);
    Ok(summary)
}

fn wait_vms_off(s: &LabState) {
    for _ in 0..300 {
        if s.hosts.iter().all(|h| !s.pid_file(&h.name).exists()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Check every imaged disk against the version the server recorded and, for targets,
/// against the reference disk's bytes.
fn verify(
    s: &LabState,
    spec: &FleetSpec,
    tracks: &BTreeMap<String, Track>,
    out: &mut dyn Write,
) -> Result<Summary> {
    let store_dir = s.dir.join("store");
    let store = Store::open(&store_dir)
        .map_err(|e| LabError::Failed(format!("{}: {e}", store_dir.display())))?;
    let status = super::supervise::status(&s.url(), &s.dir)
        .ok_or_else(|| LabError::Failed("the server stopped answering".into()))?;
    let reference = s.dir.join("disks/reference.raw");
    let used = {
        let f = std::fs::File::open(&reference).map_err(io_at(&reference))?;
        let len = f.metadata().map_err(io_at(&reference))?.len();
        crate::image::layout::read(&f, len)
            .map_err(io_at(&reference))?
            .used
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut summary = Summary {
        ok: true,
        ..Default::default()
    };
    for h in &s.hosts {
        let kind = transport(spec, h);
        if kind == "-" {
            continue;
        }
        let tr = tracks.get(&h.name).cloned().unwrap_or_default();
        let mut line = HostSummary {
            host: h.name.clone(),
            transport: kind.clone(),
            seconds: tr.agent.zip(tr.done).map(|(a, d)| d - a),
            booted: tr.booted_line.clone(),
            ..Default::default()
        };
        // The version: what the host was deployed, or the newest its capture made.
        let digest: Option<Digest> = if h.reference {
            spec.images
                .iter()
                .find(|(_, i)| i.capture.as_ref().is_some_and(|c| c.host == h.name))
                .and_then(|(name, _)| store.image(name).ok().flatten())
                .and_then(|r| r.versions.last().map(|v| v.digest))
        } else {
            status
                .hosts
                .iter()
                .find(|v| v.name == h.name)
                .and_then(|v| v.deployed)
        };
        match digest {
            None => {
                summary
                    .problems
                    .push(format!("{}: the server recorded no version", h.name));
            }
            Some(d) => {
                line.digest = Some(d.to_string());
                if let Ok(m) = store.manifest(&d) {
                    line.bytes = m.data_bytes;
                }
                match crate::image::verify(&store, &d, &h.disk, threads) {
                    Ok(r) if r.bad == 0 => line.verified = true,
                    Ok(r) => summary.problems.push(format!(
                        "{}: {} of {} pieces of its disk differ from {}",
                        h.name,
                        r.bad,
                        r.checked,
                        d.short()
                    )),
                    Err(e) => summary
                        .problems
                        .push(format!("{}: cannot verify its disk: {e}", h.name)),
                }
            }
        }
        if !h.reference {
            let (n, equal) = compare(&reference, &h.disk, &used)?;
            line.compared_bytes = n;
            line.equal = Some(equal);
            if !equal {
                summary.problems.push(format!(
                    "{}: its disk differs from the reference disk",
                    h.name
                ));
            }
        }
        if line.booted.is_none() {
            summary
                .problems
                .push(format!("{}: never seen booting from its disk", h.name));
        }
        summary.hosts.push(line);
    }
    summary.ok = summary.problems.is_empty();
    let _ = out.flush();
    Ok(summary)
}

/// Compare two disks over `ranges`: bytes compared, and whether all were equal.
fn compare(a: &Path, b: &Path, ranges: &[(u64, u64)]) -> Result<(u64, bool)> {
    use std::os::unix::fs::FileExt;
    let fa = std::fs::File::open(a).map_err(io_at(a))?;
    let fb = std::fs::File::open(b).map_err(io_at(b))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut n = 0;
    for &(start, len) in ranges {
        let mut at = start;
        while at < start + len {
            let k = ((start + len - at) as usize).min(ba.len());
            fa.read_exact_at(&mut ba[..k], at).map_err(io_at(a))?;
            if fb.read_exact_at(&mut bb[..k], at).is_err() || ba[..k] != bb[..k] {
                return Ok((n, false));
            }
            n += k as u64;
            at += k as u64;
        }
    }
    Ok((n, true))
}

fn phases(
    summary: &mut Summary,
    s: &LabState,
    spec: &FleetSpec,
    tracks: &BTreeMap<String, Track>,
    verify_secs: f64,
) {
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let of = |kind: &str| -> Vec<&Track> {
        s.hosts
            .iter()
            .filter(|h| transport(spec, h) == kind)
            .filter_map(|h| tracks.get(&h.name))
            .collect()
    };
    let all: Vec<&Track> = s.hosts.iter().filter_map(|h| tracks.get(&h.name)).collect();
    let max = |v: Vec<f64>| {
        v.into_iter()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    let min = |v: Vec<f64>| {
        v.into_iter()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))))
    };
    let p = &mut summary.phases;
    if let Some(x) = max(all.iter().filter_map(|t| Some(t.agent? - t.on?)).collect()) {
        p.push(("boot to agent (slowest host)".into(), round(x)));
    }
    for kind in ["capture", "unicast", "multicast"] {
        let ts = of(kind);
        let (first, last) = (
            min(ts.iter().filter_map(|t| t.agent).collect()),
            max(ts.iter().filter_map(|t| t.done).collect()),
        );
        if let (Some(a), Some(b)) = (first, last) {
            p.push((kind.into(), round(b - a)));
        }
    }
    p.push(("verify (all disks, here)".into(), round(verify_secs)));
    if let Some(x) = max(all.iter().filter_map(|t| Some(t.disk? - t.done?)).collect()) {
        p.push(("boot from disk (slowest host)".into(), round(x)));
    }
    let first_on = min(all.iter().filter_map(|t| t.on).collect());
    let last_disk = max(all.iter().filter_map(|t| t.disk).collect());
    if let (Some(a), Some(b)) = (first_on, last_disk) {
        p.push(("first power-on to last disk boot".into(), round(b - a)));
    }
}

fn print_summary(s: &Summary, out: &mut dyn Write) {
    let _ = writeln!(
        out,
        "\n{:<10} {:<9} {:>9} {:>7}  {:<14} {:<8} {:<10} booted from disk",
        "host", "transport", "bytes", "time", "digest", "verified", "= ref"
    );
    for h in &s.hosts {
        let _ = writeln!(
            out,
            "{:<10} {:<9} {:>9} {:>7}  {:<14} {:<8} {:<10} {}",
            h.host,
            h.transport,
            format!("{:.1} MB", h.bytes as f64 / 1e6),
            h.seconds.map_or("-".into(), |x| format!("{x:.1} s")),
            h.digest.as_deref().map_or("-", |d| &d[..d.len().min(14)]),
            if h.verified { "yes" } else { "NO" },
            match h.equal {
                Some(true) => format!("{:.1} MB", h.compared_bytes as f64 / 1e6),
                Some(false) => "DIFFERS".into(),
                None => "-".into(),
            },
            h.booted.as_deref().unwrap_or("NO")
        );
    }
    let _ = writeln!(out, "\nphases (seconds):");
    for (k, v) in &s.phases {
        let _ = writeln!(out, "  {k:<36} {v:>7.1}");
    }
    if s.ok {
        let _ = writeln!(
            out,
            "\nlab {}: every machine imaged, verified and booted",
            s.lab
        );
    } else {
        let _ = writeln!(out, "\nlab {}: FAILED", s.lab);
        for p in &s.problems {
            let _ = writeln!(out, "  {p}");
        }
    }
}

fn print_keep_help(s: &LabState, out: &mut dyn Write) {
    let work = s.work();
    let _ = writeln!(
        out,
        "\nThe lab is kept running. Watch it:
  export FLEETWAVE_TOKEN_FILE={dir}/admin-token
  ip netns exec {srv} fleetwave status --server {url}
  ip netns exec {srv} fleetwave events --server {url} --follow
  the web console: ip netns exec {srv} a browser at {url}/console/ (token in {dir}/admin-token)
  tail -f {dir}/console/HOST.log        (each VM's serial console)
  tail -f {dir}/supervisor.log          (VMs powered on and off)
Change it (e.g. bump the image's capture generation) and watch it converge again:
  $EDITOR {work}/fleet.yaml
  git -C {work} commit -am 'capture again' && git -C {work} push
Pull a machine's plug, and put it back:
  fleetwave lab power HOST off --name {name}; fleetwave lab power HOST on --name {name}
Remove it:
  fleetwave lab down --name {name}",
        srv = s.srv_ns,
        url = s.url(),
        dir = s.dir.display(),
        work = work.display(),
        name = s.name,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_line_counts_only_after_a_finished_agent_and_names_the_host() {
        let before = "fleetwave-lab: pc01 booted from disk (release 1)\n";
        let agent = "fleetwave-init: agent finished: ok\nfleetwave-init: rebooting\n";
        // The firmware clears the screen on the same line before the system prints.
        let after = "\x1bc\x1b[?7l\x1b[2Jfleetwave-lab: pc01 booted from disk (mac x)\n";
        assert_eq!(boot_line(before, BOOT_MARKER, "pc01", false), None);
        let text = format!("{before}{agent}{after}");
        assert_eq!(
            boot_line(&text, BOOT_MARKER, "pc01", false).as_deref(),
            Some("fleetwave-lab: pc01 booted from disk (mac x)")
        );
        // Another machine's name is not this machine booting.
        assert_eq!(boot_line(&text, BOOT_MARKER, "pc02", false), None);
        // An own marker is taken as it is.
        let own = format!("{agent}SAC started and initialized\n");
        assert_eq!(
            boot_line(&own, "SAC started", "pc02", true).as_deref(),
            Some("SAC started and initialized")
        );
    }
}
