//! The controller under load: `fleetwave serve` following a git repository, and
//! thousands of simulated agents (the real agent library, deploying a small image onto
//! sparse files) converging through it wave by wave. Prints the latency from a commit
//! to the armed boot script (by webhook and by polling), the swarm's wall time, the
//! server's CPU seconds and peak memory, and its SQLite writes per host.
//!
//! `cargo run --release --example swarm -- --bin target/release/fleetwave --hosts 10000`
//! (bench/controller.sh does this).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetwave::agent::run::{Boot, run};

struct Args {
    bin: PathBuf,
    hosts: usize,
    threads: usize,
    work: PathBuf,
    waves: usize,
}

fn args() -> Args {
    let mut a = Args {
        bin: PathBuf::from("target/release/fleetwave"),
        hosts: 10_000,
        threads: 8,
        work: std::env::temp_dir().join("fleetwave-swarm"),
        waves: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        match k.as_str() {
            "--bin" => a.bin = v.into(),
            "--hosts" => a.hosts = v.parse().expect("--hosts N"),
            "--threads" => a.threads = v.parse().expect("--threads N"),
            "--work" => a.work = v.into(),
            "--waves" => a.waves = v.parse().expect("--waves N"),
            other => panic!("unknown option {other}"),
        }
    }
    a
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn git(dir: &Path, args: &[&str]) -> String {
    sh(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.org",
        ])
        .args(args))
}

fn mac(i: usize) -> String {
    format!(
        "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
        (i >> 24) & 0xff,
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

fn fleet(a: &Args, probe_generation: u64) -> String {
    let mut s = String::from(
        "version: 1
sites:
  lab: {interface: eth0, server: 127.0.0.1, subnet: 127.0.0.0/8, dhcp: {mode: off}}
images:
  win10: {os: windows}
hosts:
",
    );
    s.push_str(&format!(
        "  probe: {{mac: \"{}\", site: lab, actions: {{inventory: {{generation: {probe_generation}}}}}}}\n",
        mac(0xffffff)
    ));
    for i in 0..a.hosts {
        s.push_str(&format!(
            "  pc{i:05}: {{mac: \"{}\", site: lab, image: win10, wave: w{}}}\n",
            mac(i + 1),
            i * a.waves / a.hosts
        ));
    }
    s.push_str("waves:\n");
    for w in 0..a.waves {
        let after = if w == 0 {
            String::new()
        } else {
            format!("after: [w{}], ", w - 1)
        };
        s.push_str(&format!("  w{w}: {{{after}max_parallel: 1000}}\n"));
    }
    s
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// The token of `mac`'s script if it boots the agent for a task whose summary
/// contains `task`.
fn token(agent: &ureq::Agent, url: &str, mac: &str, task: &str) -> Option<String> {
    let mut r = agent.get(format!("{url}/boot/{mac}.ipxe")).call().ok()?;
    let text = r.body_mut().read_to_string().ok()?;
    if !text.lines().nth(1).is_some_and(|l| l.contains(task)) {
        return None;
    }
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("fleetwave.token="))
        .map(str::to_string)
}

/// Seconds from `commit` until the probe's script carries an inventory task.
fn latency(a: &Args, url: &str, repo: &Path, generation: u64, hook: Option<&str>) -> f64 {
    let agent = http();
    std::fs::write(repo.join("fleet.yaml"), fleet(a, generation)).expect("write");
    git(repo, &["commit", "-qam", &format!("probe {generation}")]);
    let start = Instant::now();
    git(repo, &["push", "-q", "origin", "main"]);
    if let Some(secret) = hook {
        use hmac::{KeyInit as _, Mac as _};
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("hmac");
        m.update(body);
        let sig: String = m
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let r = agent
            .post(format!("{url}/api/v1/hooks/git"))
            .header("X-Hub-Signature-256", &format!("sha256={sig}"))
            .send(&body[..])
            .expect("webhook");
        assert_eq!(r.status().as_u16(), 202);
    }
    let probe = mac(0xffffff);
    loop {
        // This generation's task, not the last one (whose result the controller may
        // not have taken in yet).
        let task = format!("inventory (generation {generation})");
        if let Some(t) = token(&agent, url, &probe, &task) {
            let secs = start.elapsed().as_secs_f64();
            // Spend it, so the next bump arms a new one.
            let boot = Boot {
                server: url.into(),
                pin: None,
                token: t,
                mac: probe.parse().expect("mac"),
                root: "/".into(),
                disk: None,
            };
            let _ = run(&boot, &mut std::io::sink());
            return secs;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "never armed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (CPU seconds, peak resident MB) of a process.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .unwrap_or(0.0);
    (ticks / 100.0, hwm / 1024.0)
}

fn main() {
    let a = args();
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(a.work.join("disks")).expect("work dir");
    let w = a.work.canonicalize().expect("work dir");
    // The image: a small ext4 filesystem with a few files.
    let src = w.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    for i in 0..4u8 {
        std::fs::write(src.join(format!("f{i}")), vec![i; 64 << 10]).expect("write");
    }
    let img = w.join("ref.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(2 << 20))
        .expect("image");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img));
    let store = fleetwave::image::store::Store::open(&w.join("store")).expect("store");
    let cap = fleetwave::image::capture(&img, &store, Some(("win10", 1)), Default::default())
        .expect("capture");
    // The fleet repository.
    let bare = w.join("fleet.git");
    let repo = w.join("fleet");
    std::fs::create_dir_all(&repo).expect("mkdir");
    sh(Command::new("git")
        .args(["init", "-q", "--bare", "-b", "main"])
        .arg(&bare));
    git(&repo, &["init", "-q", "-b", "main"]);
    git(
        &repo,
        &["remote", "add", "origin", bare.to_str().expect("utf-8")],
    );
    std::fs::write(repo.join("fleet.yaml"), fleet(&a, 1)).expect("write");
    git(&repo, &["add", "fleet.yaml"]);
    git(&repo, &["commit", "-qm", "the fleet"]);
    git(&repo, &["push", "-q", "origin", "main"]);
    let secret = "swarm-webhook-secret-0123456789";
    std::fs::write(w.join("secret"), secret).expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let url = format!("http://127.0.0.1:{port}");
    let interval = 5;
    let mut server = Command::new(&a.bin)
        .args(["serve", "--source"])
        .arg(format!("file://{}", bare.display()))
        .args(["--interval", &format!("{interval}s"), "--state-dir"])
        .arg(w.join("state"))
        .arg("--image-store")
        .arg(w.join("store"))
        .arg("--files-dir")
        .arg(&w)
        .arg("--ipxe-dir")
        .arg(&w)
        .arg("--webhook-secret-file")
        .arg(w.join("secret"))
        .args(["--http-port", &port.to_string(), "--tftp-port", "0"])
        .env("FLEETWAVE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(w.join("serve.log")).expect("log"))
        .spawn()
        .expect("serve starts");
    let pid = server.id();
    // Killed however this ends, a panic included.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
    let _guard = Kill(pid);
    let agent = http();
    let up = Instant::now();
    while agent.get(format!("{url}/health")).call().is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(60),
            "serve did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The probe's first inventory task, armed by the first commit.
    let _ = latency(&a, &url, &repo, 2, Some(secret));
    let mut by_hook = Vec::new();
    let mut by_poll = Vec::new();
    for g in 0..3 {
        by_hook.push(latency(&a, &url, &repo, 10 + g, Some(secret)));
    }
    for g in 0..3 {
        by_poll.push(latency(&a, &url, &repo, 20 + g, None));
    }
    let (cpu0, _) = usage(pid);
    // The swarm: every host, as its wave opens.
    let queue: Arc<Mutex<VecDeque<usize>>> = Arc::new(Mutex::new((1..=a.hosts).collect()));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.threads {
            let (queue, done, failed, url, w) = (
                queue.clone(),
                done.clone(),
                failed.clone(),
                url.clone(),
                w.clone(),
            );
            s.spawn(move || {
                let agent = http();
                loop {
                    let Some(i) = queue.lock().expect("queue").pop_front() else {
                        return;
                    };
                    let m = mac(i);
                    let Some(t) = token(&agent, &url, &m, "deploy win10@") else {
                        // Its wave is not open yet.
                        queue.lock().expect("queue").push_back(i);
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let disk = w.join("disks").join(format!("{i}.img"));
                    let _ = std::fs::File::create(&disk);
                    let boot = Boot {
                        server: url.clone(),
                        pin: None,
                        token: t,
                        mac: m.parse().expect("mac"),
                        root: "/".into(),
                        disk: Some(disk.clone()),
                    };
                    match run(&boot, &mut std::io::sink()) {
                        Ok(o) if o.code == 0 => {
                            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                            if n % 1000 == 0 {
                                eprintln!("{n} hosts deployed");
                            }
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            queue.lock().expect("queue").push_back(i);
                        }
                    }
                    let _ = std::fs::remove_file(&disk);
                }
            });
        }
    });
    // Until the server says every host is Ready.
    loop {
        let mut r = agent
            .get(format!("{url}/api/v1/status"))
            .call()
            .expect("status");
        let s: fleetwave::protocol::FleetStatus = serde_json::from_str(
            &r.body_mut()
                .with_config()
                .limit(1 << 30)
                .read_to_string()
                .expect("body"),
        )
        .expect("status");
        if s.hosts.iter().filter(|h| h.state == "Ready").count() >= a.hosts {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, rss) = usage(pid);
    let mut r = agent.get(format!("{url}/health")).call().expect("health");
    let health: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("json");
    let writes = health["state_database"]["writes"].as_u64().unwrap_or(0);
    let commits = health["state_database"]["commits"].as_u64().unwrap_or(0);
    let _ = server.kill();
    let _ = server.wait();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "machine: {} cores; image {} ({} bytes stored); {} hosts in {} waves, {} agent threads",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cap.digest.short(),
        cap.stored_bytes,
        a.hosts,
        a.waves,
        a.threads
    );
    println!();
    println!("| commit to armed boot script | runs (s) | median |");
    println!("|---|---|---|");
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| webhook | {} | {:.2} s |",
        fmt(&by_hook),
        median(&mut by_hook.clone())
    );
    println!(
        "| polling every {interval} s | {} | {:.2} s |",
        fmt(&by_poll),
        median(&mut by_poll.clone())
    );
    println!();
    println!(
        "| hosts | wall time | hosts/s | server CPU | server peak RSS | SQLite rows written per host | commits (fsyncs) | agent retries |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {wall:.1} s | {:.0} | {:.1} s | {rss:.0} MB | {:.1} | {commits} | {} |",
        a.hosts,
        a.hosts as f64 / wall,
        cpu1 - cpu0,
        writes as f64 / (a.hosts + 1) as f64,
        failed.load(Ordering::Relaxed)
    );
}
