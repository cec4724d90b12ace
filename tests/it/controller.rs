//! The whole server (`server::run`: source follower, controller, state, HTTP with the
//! agent and operator APIs) on loopback, driven by real git commits and by the real
//! agent library against disk image files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetwave::agent::run::{Boot, run as agent_run};
use fleetwave::protocol::FleetStatus;
use fleetwave::server::{self, Listeners};
use fleetwave::source::watch::Origin;
use tokio_util::sync::CancellationToken;

use crate::{fleetwave as cli, mkfs_ext4, tool};

/// A server running in its own runtime thread; stopped on drop.
pub struct Running {
    pub url: String,
    /// The HTTPS side's base URL, when the server was given TLS.
    pub https: Option<String>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The admin token every test server takes (its bootstrap token, scope operate), and
/// that [`get`] sends: every operator endpoint needs one.
pub const TEST_ADMIN: &str = "an-admin-token-of-some-length";

/// [`TEST_ADMIN`] in `dir/admin.token`, for the CLI's --token-file; its path.
pub fn admin_token_file(dir: &Path) -> PathBuf {
    let f = dir.join("admin.token");
    std::fs::write(&f, format!("{TEST_ADMIN}\n")).expect("write the admin token");
    f
}

/// Secrets for the operator's API.
#[derive(Default, Clone)]
pub struct Secrets {
    pub admin: Option<String>,
    pub webhook: Option<String>,
    /// Trusted keys and the rules that go with them.
    pub security: server::Security,
    /// Serve the API over HTTPS too (on another 127.0.0.1 port).
    pub tls: Option<fleetwave::tls::ServerTls>,
}

/// `server::run` on 127.0.0.1:0 following `origin`, state under `dir/state`, images in
/// `store`; the origin is read every 200 ms.
pub fn serve(dir: &Path, origin: Origin, store: &Path, secrets: Secrets) -> Running {
    serve_with(dir, origin, store, secrets, dir, dir)
}

/// [`serve`] with the TFTP/iPXE and netboot file roots.
pub fn serve_with(
    dir: &Path,
    origin: Origin,
    store: &Path,
    secrets: Secrets,
    ipxe: &Path,
    files: &Path,
) -> Running {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let http = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", http.local_addr().expect("addr"));
    let https = secrets.tls.as_ref().map(|_| {
        rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind")
    });
    let https_url = https
        .as_ref()
        .map(|l| format!("https://{}", l.local_addr().expect("addr")));
    let config = server::Config {
        origin,
        interval: Duration::from_millis(200),
        state_dir: dir.join("state"),
        ipxe_dir: ipxe.to_owned(),
        files_dir: files.to_owned(),
        image_store: store.to_owned(),
        base_url: url.clone(),
        admin_token: Some(secrets.admin.unwrap_or_else(|| TEST_ADMIN.into())),
        webhook_secret: secrets.webhook,
        policy: Default::default(),
        clock: Arc::new(fleetwave::clock::SystemClock::default()),
        sync: Default::default(),
        security: secrets.security,
        tls: secrets.tls,
    };
    let stop = CancellationToken::new();
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        let listeners = Listeners {
            http,
            https,
            tftp: None,
            dhcp: None,
        };
        if let Err(e) = rt.block_on(server::run(config, listeners, None, s)) {
            eprintln!("server stopped: {e:#}");
        }
    });
    Running {
        url,
        https: https_url,
        stop,
        thread: Some(thread),
    }
}

/// An HTTP client that hands back error statuses instead of failing on them.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

pub fn get(url: &str) -> (u16, String) {
    let mut r = http()
        .get(url)
        .header("Authorization", &format!("Bearer {TEST_ADMIN}"))
        .call()
        .expect("GET");
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap_or_default())
}

pub fn status(url: &str) -> FleetStatus {
    let (code, body) = get(&format!("{url}/api/v1/status"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// Poll the status until `pred` holds; panics with the last status after `limit`.
pub fn wait_for(
    url: &str,
    what: &str,
    limit: Duration,
    pred: impl Fn(&FleetStatus) -> bool,
) -> FleetStatus {
    let start = Instant::now();
    loop {
        let s = status(url);
        if pred(&s) {
            return s;
        }
        if start.elapsed() > limit {
            panic!(
                "waited {limit:?} for {what}; status:\n{}",
                serde_json::to_string_pretty(&s).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn state_of<'a>(s: &'a FleetStatus, host: &str) -> &'a str {
    s.hosts
        .iter()
        .find(|h| h.name == host)
        .map(|h| h.state.as_str())
        .unwrap_or("absent")
}

/// The value of the sample `series` (name and labels as printed) in a scrape.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// `mac`'s iPXE script.
pub fn script(url: &str, mac: &str) -> String {
    get(&format!("{url}/boot/{mac}.ipxe")).1
}

/// The token on the kernel line of `mac`'s script, if the script boots the agent.
pub fn token(url: &str, mac: &str) -> Option<String> {
    script(url, mac)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fleetwave.token="))
        .map(str::to_string)
}

/// The agent library, as the netboot environment runs it, against `disk`.
pub fn agent(url: &str, mac: &str, token: &str, disk: &Path) -> (u8, String) {
    let boot = Boot {
        server: url.to_string(),
        pin: None,
        token: token.to_string(),
        mac: mac.parse().expect("mac"),
        root: PathBuf::from("/"),
        disk: Some(disk.to_owned()),
    };
    run_boot(&boot)
}

/// Run the agent for `boot`: its exit code and everything it printed (an error that
/// kept it from fetching its task as `error: ...`, code 2).
pub fn run_boot(boot: &Boot) -> (u8, String) {
    let mut out = Vec::new();
    let code = match agent_run(boot, &mut out) {
        Ok(o) => o.code,
        Err(e) => {
            out.extend(format!("error: {e:#}").bytes());
            2
        }
    };
    (code, String::from_utf8_lossy(&out).to_string())
}

/// A git repository the test owns: a bare one the server follows, and a work tree
/// that commits to it.
pub struct Repo {
    pub bare: PathBuf,
    pub work: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=fleet",
            "-c",
            "user.email=fleet@example.org",
        ])
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Repo {
    pub fn new(dir: &Path) -> Repo {
        let bare = dir.join("fleet.git");
        let work = dir.join("fleet-work");
        std::fs::create_dir_all(&work).expect("mkdir");
        git(
            dir,
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                bare.to_str().expect("utf-8"),
            ],
        );
        git(&work, &["init", "-q", "-b", "main"]);
        git(
            &work,
            &["remote", "add", "origin", bare.to_str().expect("utf-8")],
        );
        Repo { bare, work }
    }

    /// Commit `fleet` as fleet.yaml and push it; the commit id.
    pub fn commit(&self, fleet: &str, message: &str) -> String {
        std::fs::write(self.work.join("fleet.yaml"), fleet).expect("write");
        git(&self.work, &["add", "fleet.yaml"]);
        git(&self.work, &["commit", "-q", "-m", message]);
        git(&self.work, &["push", "-q", "origin", "main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    pub fn origin(&self) -> Origin {
        Origin::Git {
            url: format!("file://{}", self.bare.display()),
            branch: "main".into(),
            path: "fleet.yaml".into(),
        }
    }
}

pub const REF: &str = "52:54:00:28:00:10";
pub const PC: [&str; 3] = [
    "52:54:00:28:00:11",
    "52:54:00:28:00:12",
    "52:54:00:28:00:13",
];

/// The lab's shape: a reference captured, a pilot wave of one, a second wave of two.
pub fn lab_fleet(generation: u64) -> String {
    format!(
        "{}images:
  win10:
    os: windows
    capture: {{from: ref-win10, generation: {generation}}}
hosts:
  ref-win10: {{mac: \"{REF}\", site: lab}}
  pc01: {{mac: \"{}\", site: lab, image: win10, wave: pilot}}
  pc02: {{mac: \"{}\", site: lab, image: win10, wave: room-a}}
  pc03: {{mac: \"{}\", site: lab, image: win10, wave: room-a}}
waves:
  pilot: {{transport: unicast}}
  room-a: {{after: [pilot], transport: unicast, max_parallel: 20}}
",
        crate::LAB_SITE,
        PC[0],
        PC[1],
        PC[2]
    )
}

/// A reference disk: an ext4 filesystem with some files.
pub fn reference_disk(d: &Path) -> PathBuf {
    let src = d.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    for i in 0..6u8 {
        std::fs::write(
            src.join(format!("f{i}")),
            crate::bytes(300_000, i as u64 + 1),
        )
        .expect("write");
        std::fs::write(
            src.join(format!("t{i}")),
            format!("line {i}\n").repeat(30_000),
        )
        .expect("write");
    }
    let disk = d.join("ref.img");
    mkfs_ext4(&src, &disk, 32 << 20, &[]);
    disk
}

/// An empty target disk of `bytes`.
pub fn blank(path: &Path, bytes: u64) -> PathBuf {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .expect("blank disk");
    path.to_owned()
}

fn fsck_clean(disk: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .expect("e2fsck");
    assert!(
        out.status.success(),
        "{} is not a clean ext4: {}",
        disk.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_commit_converges_the_lab_wave_by_wave_through_capture_and_verified_deploys() {
    if !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") || !tool("git", "/usr/bin/git") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let repo = Repo::new(d);
    let first = repo.commit(&lab_fleet(1), "the lab");
    let secret = "a-webhook-secret-of-some-length";
    let server = serve(
        d,
        repo.origin(),
        &d.join("store"),
        Secrets {
            admin: Some(TEST_ADMIN.into()),
            webhook: Some(secret.into()),
            ..Default::default()
        },
    );
    let url = server.url.as_str();
    let limit = Duration::from_secs(30);
    // The commit is applied; the reference is armed to capture, the others wait for it.
    let s = wait_for(url, "the capture armed", limit, |s| {
        state_of(s, "ref-win10") == "Armed"
    });
    assert_eq!(
        s.applied.as_ref().map(|c| c.id.as_str()),
        Some(first.as_str())
    );
    for (i, pc) in ["pc01", "pc02", "pc03"].iter().enumerate() {
        assert_eq!(state_of(&s, pc), "Pending", "{pc}");
        assert!(token(url, PC[i]).is_none(), "{pc} armed before the capture");
    }
    // The reference machine boots the agent: it captures.
    let ref_disk = reference_disk(d);
    let t = token(url, REF).expect("the reference's script carries a token");
    let (code, out) = agent(url, REF, &t, &ref_disk);
    assert_eq!(code, 0, "{out}");
    // The pilot wave is armed; the second wave is not, until the pilot is Ready.
    let s = wait_for(url, "the pilot armed", limit, |s| {
        state_of(s, "pc01") == "Armed"
    });
    let captured = s
        .hosts
        .iter()
        .find(|h| h.name == "ref-win10")
        .map(|h| h.state.clone());
    assert_eq!(captured.as_deref(), Some("Ready"));
    assert_eq!(state_of(&s, "pc02"), "Pending");
    let room = s.waves.iter().find(|w| w.name == "room-a").expect("wave");
    assert_eq!(room.state, "waiting", "{room:?}");
    assert!(
        token(url, PC[1]).is_none(),
        "the second wave was armed early"
    );
    let script1 = script(url, PC[0]);
    assert!(script1.contains("fleetwave.task=deploy"), "{script1}");
    // A second fetch of the script gives the same token: one task, one token.
    let t1 = token(url, PC[0]).expect("token");
    assert_eq!(token(url, PC[0]).as_deref(), Some(t1.as_str()));
    let disks: Vec<PathBuf> = (1..=3)
        .map(|i| blank(&d.join(format!("pc0{i}.img")), 40 << 20))
        .collect();
    let (code, out) = agent(url, PC[0], &t1, &disks[0]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deployed and verified"), "{out}");
    // Its script turns to its own disk; the second wave is armed.
    let s = wait_for(url, "the second wave armed", limit, |s| {
        state_of(s, "pc02") == "Armed" && state_of(s, "pc03") == "Armed"
    });
    assert_eq!(state_of(&s, "pc01"), "Ready");
    assert!(
        script(url, PC[0]).contains("sanboot"),
        "pc01 is not sent to its disk"
    );
    for i in 1..3 {
        let t = token(url, PC[i]).expect("token");
        let (code, out) = agent(url, PC[i], &t, &disks[i]);
        assert_eq!(code, 0, "{out}");
    }
    let s = wait_for(url, "every host Ready", limit, |s| {
        s.hosts.iter().all(|h| h.state == "Ready")
    });
    // Every disk holds the captured version, verified by the agent and again here.
    let version = s.hosts[1].deployed.expect("deployed");
    for (h, disk) in s.hosts[1..].iter().zip(&disks) {
        assert_eq!(h.deployed, Some(version), "{}", h.name);
        fsck_clean(disk);
        let (code, out) = cli(&[
            "agent",
            "verify",
            &version.to_string(),
            disk.to_str().expect("utf-8"),
            "--store",
            d.join("store").to_str().expect("utf-8"),
        ]);
        assert_eq!(code, 0, "{out}");
    }
    // The events tell the story, in order.
    let (code, body) = get(&format!("{url}/api/v1/events"));
    assert_eq!(code, 200);
    let events: Vec<serde_json::Value> = serde_json::from_str(&body).expect("events");
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    let pos = |k: &str, host: &str| {
        events
            .iter()
            .position(|e| e["kind"] == k && e["host"] == host)
            .unwrap_or_else(|| panic!("no {k} event for {host}: {kinds:?}"))
    };
    assert!(pos("Ready", "pc01") < pos("Armed", "pc02"), "{kinds:?}");
    // The pilot is armed once the capture's version is committed, not before.
    assert!(
        pos("ImageVersionCommitted", "ref-win10") < pos("Armed", "pc01"),
        "{kinds:?}"
    );

    // Prometheus sees the same fleet, and what moved to get there.
    let (code, text) = get(&format!("{url}/metrics"));
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        metric(&text, r#"fleetwave_hosts{site="lab",state="Ready"}"#),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"fleetwave_wave_done{wave="room-a"}"#),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"fleetwave_wave_state{wave="room-a",state="done"}"#),
        1.0
    );
    assert_eq!(metric(&text, "fleetwave_source_commit_refused"), 0.0);
    // Deploys took the image out, the capture brought it in (the counters are the
    // process's, shared with the other tests running in it: at least this test's).
    let image_in = metric(&text, r#"fleetwave_image_bytes_total{direction="in"}"#);
    let image_out = metric(&text, r#"fleetwave_image_bytes_total{direction="out"}"#);
    assert!(
        image_in > 0.0 && image_out > 0.0,
        "in {image_in}, out {image_out}"
    );
    let results = r#"fleetwave_http_responses_total{route="/api/v1/result",code="204"}"#;
    assert!(metric(&text, results) >= 4.0);
    assert!(metric(&text, "fleetwave_reconciles_total") >= 4.0);
    assert!(metric(&text, r#"fleetwave_source_reads_total{outcome="new"}"#) >= 1.0);
    assert!(
        text.contains("fleetwave_reconcile_pass_seconds_bucket"),
        "{text}"
    );

    // A bad commit is Stalled with its place; the last good one keeps serving.
    let bad = repo.commit(
        &lab_fleet(1).replace("wave: pilot}", "wave: pilot, disk: {size: lots}}"),
        "a mistake",
    );
    let s = wait_for(url, "the bad commit seen", limit, |s| {
        s.attempted.as_ref().is_some_and(|c| c.id == bad)
    });
    let problems = &s.attempted.as_ref().expect("attempted").problems;
    assert!(
        problems
            .iter()
            .any(|p| p.contains("fleet.yaml:") && p.contains("size")),
        "{problems:?}"
    );
    assert_eq!(
        s.applied.as_ref().map(|c| c.id.as_str()),
        Some(first.as_str())
    );
    assert!(s.hosts.iter().all(|h| h.state == "Ready"));
    let text = get(&format!("{url}/metrics")).1;
    assert_eq!(
        metric(&text, "fleetwave_source_commit_refused"),
        1.0,
        "{text}"
    );
    // A webhook with a wrong signature is refused; a right one fetches at once.
    let body = r#"{"ref":"refs/heads/main"}"#;
    let hook = |sig: &str| {
        http()
            .post(format!("{url}/api/v1/hooks/git"))
            .header("X-Hub-Signature-256", sig)
            .send(body)
            .expect("POST")
            .status()
            .as_u16()
    };
    assert_eq!(hook("sha256=0000"), 401);
    // The next good commit recovers: a new generation captures again.
    let good = repo.commit(&lab_fleet(2), "capture again");
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(body.as_bytes());
    let sig: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hook(&format!("sha256={sig}")), 202);
    let s = wait_for(url, "the good commit applied", limit, |s| {
        s.applied.as_ref().is_some_and(|c| c.id == good) && state_of(s, "ref-win10") == "Armed"
    });
    assert!(s.attempted.as_ref().is_some_and(|c| c.problems.is_empty()));
}

/// What the netboot environment does: iPXE fetches the script, boots its kernel line,
/// and `fleetwave agent run` reads it, picks the disk by the host's selector (a loop
/// device), deploys and reports. Then a verify action (once per generation) finds the
/// disk intact, and after a byte is changed, drifted.
#[test]
fn agent_run_follows_the_script_to_a_verified_disk_and_verify_actions_find_drift() {
    if !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") || !tool("mount", "/usr/sbin/losetup") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // The version to deploy, already in the server's store.
    let src = d.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("os.txt"), "the golden image\n".repeat(40_000)).expect("write");
    let fs = d.join("fs.img");
    mkfs_ext4(&src, &fs, 40 << 20, &[]);
    let store = fleetwave::image::store::Store::open(&d.join("store")).expect("store");
    let cap = fleetwave::image::capture(&fs, &store, Some(("linux", 1)), Default::default())
        .expect("capture");
    let Some(disk) = crate::Loop::attach(&d.join("disk"), 64 << 20) else {
        return;
    };
    let dev = disk.dev.clone();
    let pc = PC[0];
    let fleet_healing = |verify: Option<u64>, heal: &str| {
        let actions = verify
            .map(|g| format!("actions: {{verify: {{generation: {g}}}}}, "))
            .unwrap_or_default();
        format!(
            "{}images:\n  linux: {{os: linux}}\nhosts:\n  pc01: {{mac: \"{pc}\", site: lab, image: linux, heal: {heal}, {actions}disk: {{path: {dev}}}}}\n",
            crate::LAB_SITE
        )
    };
    let fleet = |verify: Option<u64>| fleet_healing(verify, "report");
    std::fs::write(d.join("fleet.yaml"), fleet(None)).expect("write");
    let server = serve(
        d,
        Origin::Dir(d.join("fleet.yaml")),
        &d.join("store"),
        Secrets::default(),
    );
    let url = server.url.as_str();
    let limit = Duration::from_secs(30);
    let cmdline = d.join("cmdline");
    // The kernel line of the script, run as the netboot kernel would.
    let run = |task: &str| {
        let s = wait_for(url, &format!("a {task} armed"), limit, |s| {
            s.hosts
                .first()
                .and_then(|h| h.task.as_deref())
                .is_some_and(|t| t.starts_with(task))
        });
        let script = script(url, pc);
        let kernel = script
            .lines()
            .find(|l| l.starts_with("kernel "))
            .unwrap_or_else(|| panic!("no kernel line:\n{script}"))
            .to_string();
        assert!(
            kernel.contains(&format!("fleetwave.task={task}")),
            "{kernel}"
        );
        std::fs::write(&cmdline, &kernel).expect("write");
        let (code, out) = cli(&[
            "agent",
            "run",
            "--cmdline",
            cmdline.to_str().expect("utf-8"),
        ]);
        (s, code, out)
    };
    let (_, code, out) = run("deploy");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deployed and verified"), "{out}");
    fsck_clean(Path::new(&dev));
    let s = wait_for(url, "pc01 Ready", limit, |s| state_of(s, "pc01") == "Ready");
    assert_eq!(s.hosts[0].deployed, Some(cap.digest));
    // The result spent the token: the same kernel line is refused.
    let (code, out) = cli(&[
        "agent",
        "run",
        "--cmdline",
        cmdline.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("401"), "{out}");

    // A verify action: the disk holds its version.
    std::fs::write(d.join("fleet.yaml"), fleet(Some(1))).expect("write");
    let (_, code, out) = run("verify");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("holds"), "{out}");
    let s = wait_for(url, "verified", limit, |s| state_of(s, "pc01") == "Ready");
    assert!(
        s.hosts[0]
            .conditions
            .iter()
            .any(|c| c.kind == "Drifted" && !c.status),
        "{:?}",
        s.hosts[0].conditions
    );
    // Once per generation: nothing is armed again for generation 1.
    std::thread::sleep(Duration::from_millis(600));
    assert!(token(url, pc).is_none(), "the verify ran twice");

    // Change one byte the image holds: the next generation's verify reports drift.
    let m = store.manifest(&cap.digest).expect("manifest");
    let at = fleetwave::image::placements(&m)[0][0].0 + 100;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .expect("open disk");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        f.write_all_at(&[!b[0]], at).expect("write");
        f.sync_all().expect("sync");
    }
    std::fs::write(d.join("fleet.yaml"), fleet(Some(2))).expect("write");
    let (_, code, out) = run("verify");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("drifted"), "{out}");
    let s = wait_for(url, "drift recorded", limit, |s| {
        s.hosts[0]
            .conditions
            .iter()
            .any(|c| c.kind == "Drifted" && c.status)
    });
    // The default heal policy is to report: nothing is redeployed.
    assert!(s.hosts[0].task.is_none(), "{:?}", s.hosts[0]);

    // With `heal: redeploy`, the next verify's drift brings the version back.
    std::fs::write(d.join("fleet.yaml"), fleet_healing(Some(3), "redeploy")).expect("write");
    let (_, code, out) = run("verify");
    assert_eq!(code, 1, "{out}");
    let (_, code, out) = run("deploy");
    assert_eq!(code, 0, "{out}");
    let s = wait_for(url, "healed", limit, |s| state_of(s, "pc01") == "Ready");
    assert_eq!(s.hosts[0].deployed, Some(cap.digest));
    fsck_clean(Path::new(&dev));
    let (code, out) = cli(&[
        "agent",
        "verify",
        &cap.digest.to_string(),
        &dev,
        "--store",
        d.join("store").to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{out}");
}

/// `fleetwave serve` as a process, so it can be killed with SIGKILL.
struct Process {
    child: std::process::Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_process(d: &Path, repo: &Repo, port: u16) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_fleetwave"))
        .args(["serve", "--source"])
        .arg(format!("file://{}", repo.bare.display()))
        .args(["--interval", "1s", "--state-dir"])
        .arg(d.join("state"))
        .arg("--image-store")
        .arg(d.join("store"))
        .args(["--ipxe-dir"])
        .arg(d)
        .arg("--files-dir")
        .arg(d)
        .args(["--http-port", &port.to_string(), "--tftp-port", "0"])
        .arg("--admin-token-file")
        .arg(admin_token_file(d))
        .env("FLEETWAVE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve starts");
    Process { child }
}

#[test]
fn a_server_killed_mid_wave_resumes_without_imaging_any_host_twice() {
    if !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") || !tool("git", "/usr/bin/git") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let repo = Repo::new(d);
    // No DHCP on this site: the process needs no interface.
    let fleet = lab_fleet(1).replace("dhcp: {mode: authoritative, pool: 172.28.0.100-172.28.0.199, router: 172.28.0.1, lease: 1h}", "dhcp: {mode: off}");
    repo.commit(&fleet, "the lab");
    let port = crate::service::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let limit = Duration::from_secs(30);
    let wait_up = |url: &str| {
        let start = Instant::now();
        while http().get(format!("{url}/health")).call().is_err() {
            assert!(start.elapsed() < limit, "serve did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut server = serve_process(d, &repo, port);
    wait_up(&url);
    wait_for(&url, "the capture armed", limit, |s| {
        state_of(s, "ref-win10") == "Armed"
    });
    let ref_disk = reference_disk(d);
    let t = token(&url, REF).expect("token");
    let (code, out) = agent(&url, REF, &t, &ref_disk);
    assert_eq!(code, 0, "{out}");
    wait_for(&url, "the pilot armed", limit, |s| {
        state_of(s, "pc01") == "Armed"
    });
    let t1 = token(&url, PC[0]).expect("token");

    // SIGKILL, mid-wave: pc01 armed, its agent about to start.
    let _ = server.child.kill();
    let _ = server.child.wait();
    drop(server);
    let server = serve_process(d, &repo, port);
    wait_up(&url);
    // The same task and token, not a new one; the capture is not armed again.
    let s = wait_for(&url, "the restarted server applied", limit, |s| {
        s.applied.is_some()
    });
    assert_eq!(state_of(&s, "ref-win10"), "Ready");
    assert_eq!(token(&url, PC[0]).as_deref(), Some(t1.as_str()));
    let disk = blank(&d.join("pc01.img"), 40 << 20);
    let (code, out) = agent(&url, PC[0], &t1, &disk);
    assert_eq!(code, 0, "{out}");
    // The wave resumes: the second wave is armed, run, and everything is Ready.
    wait_for(&url, "the second wave armed", limit, |s| {
        state_of(s, "pc02") == "Armed" && state_of(s, "pc03") == "Armed"
    });
    for (i, mac) in PC.iter().enumerate().skip(1) {
        let disk = blank(&d.join(format!("pc0{}.img", i + 1)), 40 << 20);
        let t = token(&url, mac).expect("token");
        let (code, out) = agent(&url, mac, &t, &disk);
        assert_eq!(code, 0, "{out}");
    }
    wait_for(&url, "every host Ready", limit, |s| {
        s.hosts.iter().all(|h| h.state == "Ready")
    });
    // Each host was given exactly one task: none imaged twice, none forgotten.
    drop(server);
    let reader = fleetwave::state::Reader::open(&d.join("state/state.db")).expect("state");
    let tasks = reader.tasks(None, 100).expect("tasks");
    for host in ["ref-win10", "pc01", "pc02", "pc03"] {
        let n = tasks.iter().filter(|t| t.host == host).count();
        assert_eq!(n, 1, "{host} got {n} tasks: {tasks:?}");
    }
    assert!(
        tasks
            .iter()
            .all(|t| t.result.as_ref().is_some_and(|r| r.ok)),
        "{tasks:?}"
    );
}

#[test]
fn plan_reads_the_observed_state_from_a_running_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fleet = lab_fleet(1);
    std::fs::write(d.join("fleet.yaml"), &fleet).expect("write");
    let server = serve(
        d,
        Origin::Dir(d.join("fleet.yaml")),
        &d.join("store"),
        Secrets::default(),
    );
    wait_for(&server.url, "applied", Duration::from_secs(20), |s| {
        s.applied.is_some()
    });
    // With the token the other commands take (`plan` reads FLEETWAVE_TOKEN_FILE).
    let out = Command::new(env!("CARGO_BIN_EXE_fleetwave"))
        .args(["plan", d.join("fleet.yaml").to_str().expect("utf-8")])
        .args(["--observed", &server.url])
        .env("FLEETWAVE_TOKEN_FILE", admin_token_file(d))
        .output()
        .expect("plan runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("capture win10"), "{text}");
    // Unreachable: the error names the URL.
    let (code, out) = cli(&[
        "plan",
        d.join("fleet.yaml").to_str().expect("utf-8"),
        "--observed",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("http://127.0.0.1:9/api/v1/observed"), "{out}");
}

#[test]
fn an_unknown_machine_registers_and_the_operator_commands_show_and_act() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fleet = lab_fleet(1).replace("lease: 1h}\n", "lease: 1h}\n    unknown_hosts: register\n");
    std::fs::write(d.join("fleet.yaml"), &fleet).expect("write");
    let admin = TEST_ADMIN;
    let token_file = admin_token_file(d);
    let tf = token_file.to_str().expect("utf-8");
    let server = serve(
        d,
        Origin::Dir(d.join("fleet.yaml")),
        &d.join("store"),
        Secrets {
            admin: Some(admin.into()),
            webhook: None,
            ..Default::default()
        },
    );
    let url = server.url.as_str();
    wait_for(url, "applied", Duration::from_secs(20), |s| {
        s.applied.is_some()
    });
    // An unknown machine PXE-boots: its script registers it, with a token that can
    // only report inventory.
    let stranger = "52:54:00:77:66:55";
    let s = script(url, stranger);
    assert!(s.contains("fleetwave.task=register"), "{s}");
    let t = token(url, stranger).expect("a registration token");
    assert_eq!(
        token(url, stranger).as_deref(),
        Some(t.as_str()),
        "one token per machine"
    );
    let (code, out) = agent(url, stranger, &t, Path::new("/nonexistent"));
    assert_eq!(code, 0, "{out}");
    // Reading needs a token too.
    let (code, out) = cli(&["hosts", "--unknown", "--server", url]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("401"), "{out}");
    let (code, out) = cli(&["hosts", "--unknown", "--server", url, "--token-file", tf]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(stranger), "{out}");
    assert!(
        out.contains(&format!("{{mac: \"{stranger}\", site: SITE}}")),
        "{out}"
    );
    // The status table names every host and why it waits.
    let (code, out) = cli(&["status", "--server", url, "--token-file", tf]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ref-win10") && out.contains("Armed"), "{out}");
    assert!(out.contains("WaitingForCapture"), "{out}");
    let (code, out) = cli(&[
        "status",
        "--server",
        url,
        "--wave",
        "room-a",
        "--token-file",
        tf,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("pc01 ") && out.contains("pc02"), "{out}");
    // Retry and sync need the admin token.
    let (code, out) = cli(&["retry", "pc01", "--server", url]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("401"), "{out}");
    let (code, out) = cli(&["retry", "pc01", "--server", url, "--token-file", tf]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&["retry", "nobody", "--server", url, "--token-file", tf]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not in the fleet"), "{out}");
    let (code, out) = cli(&["sync", "--server", url, "--token-file", tf]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&["events", "--server", url, "--token-file", tf]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("UnknownHostRegistered") && out.contains("Retry"),
        "{out}"
    );
    // The status carries the newest events too.
    let s = status(url);
    assert!(
        s.events.iter().any(|e| e.kind == "UnknownHostRegistered"),
        "{:?}",
        s.events
    );
    // One host's page: its tasks and events.
    let (code, body) = get(&format!("{url}/api/v1/hosts/ref-win10"));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["tasks"][0]["task"]["kind"], "capture", "{v}");
}

/// Wake-on-LAN: a host that must boot for a task gets its magic packet on the site's
/// interface, seen by a listener in another namespace on the same bridge.
#[test]
fn an_armed_host_that_may_be_woken_gets_its_magic_packet() {
    let Some(mut lab) = crate::netlab::Lab::new() else {
        return;
    };
    let pc = "52:54:00:28:00:31";
    lab.host("srv", None, &["172.28.0.1/24"]);
    lab.host("pc", Some(pc), &["172.28.0.31/24"]);
    let fleet = format!(
        "{}    wake: true\nhosts:\n  pc01: {{mac: \"{pc}\", site: lab, actions: {{inventory: {{generation: 1}}}}}}\n  pc02: {{mac: \"52:54:00:28:00:32\", site: lab, wake: false, actions: {{inventory: {{generation: 1}}}}}}\n",
        crate::LAB_SITE
    );
    let dir = crate::netlab::workdir(&fleet);
    let d = dir.path();
    // The listener first: it takes whatever reaches UDP port 9 for 30 s.
    let mut listener = lab
        .cmd("pc", "python3")
        .args([
            "-c",
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('', 9))\n\
             print('ready', flush=True)\n\
             s.settimeout(30)\n\
             seen = []\n\
             try:\n\
             \x20   while True:\n\
             \x20       d, a = s.recvfrom(512)\n\
             \x20       seen.append(d.hex())\n\
             \x20       if len(seen) >= 1: break\n\
             except socket.timeout:\n\
             \x20   pass\n\
             print('\\n'.join(seen))\n",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 listener");
    // Bound before the server starts: the first packet goes out when the task is armed.
    let mut stdout = std::io::BufReader::new(listener.stdout.take().expect("piped"));
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut ready).expect("listener output");
    assert_eq!(ready.trim(), "ready");
    let args = crate::netlab::serve_args(d);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serve = lab.serve("srv", &args);
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut seen).expect("listener output");
    let _ = listener.wait();
    let want: String = std::iter::repeat_n("ff".to_string(), 6)
        .chain(std::iter::repeat_n(pc.replace(':', ""), 16))
        .collect();
    assert!(
        seen.lines().any(|l| l == want),
        "no magic packet for {pc}; got {seen:?}\nserver:\n{}",
        serve.log()
    );
    // pc02 says `wake: false`: it is armed, and no packet is sent for it. The event
    // log is written behind the decisions: wait for both hosts' lines.
    let read = || {
        let out = lab
            .cmd("srv", "busybox")
            .args([
                "wget",
                "-q",
                "--header",
                &format!("Authorization: Bearer {TEST_ADMIN}"),
                "-O",
                "-",
                "http://127.0.0.1:8080/api/v1/events",
            ])
            .output()
            .expect("wget");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let start = Instant::now();
    let mut events = read();
    while !(events.contains("pc02: armed") && events.contains("pc01: Wake-on-LAN"))
        && start.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(100));
        events = read();
    }
    // Anything decided with pc02's arming is written by now.
    std::thread::sleep(Duration::from_millis(500));
    let events = read();
    assert!(
        events.contains("pc01: Wake-on-LAN packet 1 sent on eth0"),
        "{events}"
    );
    assert!(events.contains("pc02: armed"), "{events}");
    assert!(!events.contains("pc02: Wake"), "{events}");
    drop(serve);
}
