//! Multicast deploys across a namespace bridge: a server and three receivers, the real
//! `fleetwave serve` / `fleetwave multicast send` and `fleetwave agent deploy
//! --multicast` processes, loss injected by the kernel (nftables).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetwave::image::store::Store;

use crate::netlab::{Lab, serve_args, workdir};
use crate::{bytes, mkfs_ext4, tool};

const SERVER: &str = "172.28.0.1";
const MACS: [&str; 3] = [
    "52:54:00:28:00:21",
    "52:54:00:28:00:22",
    "52:54:00:28:00:23",
];

/// The lab: `srv` at 172.28.0.1, `r1`..`r3` at .21-.23 with the MACs above.
fn lab() -> Option<Lab> {
    let mut lab = Lab::new()?;
    lab.host("srv", None, &["172.28.0.1/24"]);
    for (i, mac) in MACS.iter().enumerate() {
        let addr = format!("172.28.0.2{}/24", i + 1);
        lab.host(&format!("r{}", i + 1), Some(mac), &[&addr]);
    }
    Some(lab)
}

/// The lab, a work directory and the path of a store in it; `None` (a skip) without
/// the tools or root.
fn setup() -> Option<(Lab, tempfile::TempDir, PathBuf)> {
    if !tools() {
        return None;
    }
    let lab = lab()?;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    Some((lab, dir, store))
}

fn tools() -> bool {
    tool("e2fsprogs", "/usr/sbin/mkfs.ext4")
        && tool("nftables", "/usr/sbin/nft")
        && tool("busybox-static", "/usr/bin/busybox")
}

/// An ext4 disk image of 24 MiB with `seed`'s files (random and text), captured into
/// `store` as `name`; the image file and the version's digest.
fn image(dir: &Path, store: &Path, name: &str, seed: u64) -> (PathBuf, String) {
    let src = dir.join(format!("src-{name}"));
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("random.bin"), bytes(6 << 20, seed)).expect("write");
    let text: String = (0..150_000)
        .map(|i| format!("{name} line {i} {}\n", i * seed as usize % 9973))
        .collect();
    std::fs::write(src.join("text.txt"), text).expect("write");
    let img = dir.join(format!("{name}.img"));
    mkfs_ext4(&src, &img, 24 << 20, &[]);
    let store = Store::open(store).expect("store");
    let cap = fleetwave::image::capture(&img, &store, Some((name, 1)), Default::default())
        .expect("capture");
    (img, cap.digest.to_string())
}

/// Drop `percent`% of the UDP datagrams reaching `host`: the group's and those sent to
/// it alone (the kernel's nftables; the machine's kernel has no netem).
fn lose(lab: &Lab, host: &str, percent: u32) {
    let p = percent.to_string();
    drop_udp(
        lab,
        host,
        &["numgen", "random", "mod", "100", "<", &p, "drop"],
    );
}

/// An nftables rule on every UDP datagram reaching `host`, before anything else
/// sees it: `verdict` says which to drop.
fn drop_udp(lab: &Lab, host: &str, verdict: &[&str]) {
    let nft = |args: &[&str]| {
        let ok = lab.cmd(host, "nft").args(args).status();
        assert!(ok.is_ok_and(|s| s.success()), "nft {args:?}");
    };
    nft(&["add", "table", "inet", "fwloss"]);
    nft(&[
        "add",
        "chain",
        "inet",
        "fwloss",
        "in",
        "{ type filter hook prerouting priority -300; }",
    ]);
    let mut rule = vec![
        "add", "rule", "inet", "fwloss", "in", "meta", "l4proto", "udp",
    ];
    rule.extend_from_slice(verdict);
    nft(&rule);
}

/// A started command whose output goes to `log`.
fn spawn(mut c: Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log");
    let err = out.try_clone().expect("log");
    c.stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("starts")
}

/// Wait for `child`, killing it after `limit`; exit code and log.
fn finish(mut child: Child, log: &Path, limit: Duration) -> (i32, String) {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {limit:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(log).unwrap_or_default(),
    )
}

/// The task token in `mac`'s iPXE script, fetched inside `host` (as its firmware would).
fn token(lab: &Lab, host: &str, mac: &str) -> String {
    let out = lab
        .cmd(host, "busybox")
        .args([
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{SERVER}:8080/boot/{mac}.ipxe"),
        ])
        .output()
        .expect("wget");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("fleetwave.token="))
        .unwrap_or_else(|| panic!("no token in the script of {mac}:\n{text}"))
        .to_string()
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read") == std::fs::read(b).expect("read")
}

/// The multicast figures a `--json` deploy printed.
fn report(log: &str) -> serde_json::Value {
    let start = log.find('{').unwrap_or_else(|| panic!("no JSON:\n{log}"));
    let mut de = serde_json::Deserializer::from_str(&log[start..]).into_iter();
    match de.next() {
        Some(Ok(v)) => v,
        _ => panic!("no JSON report:\n{log}"),
    }
}

/// `fleetwave multicast send IMAGE` in `srv` from `store` to `group`, waiting for
/// `min` receivers, at `rate`; its output goes to `log`.
fn send(
    lab: &Lab,
    store: &Path,
    image: &str,
    group: &str,
    min: &str,
    rate: &str,
    log: &Path,
) -> Child {
    let mut c = lab.cmd("srv", env!("CARGO_BIN_EXE_fleetwave"));
    c.args(["multicast", "send", image, "--store"])
        .arg(store)
        .args(["--group", group, "--bind", SERVER, "--min-receivers", min])
        .args(["--max-wait", "60s", "--max-rate", rate, "--json"]);
    spawn(c, log)
}

/// `fleetwave agent deploy VERSION TARGET --multicast GROUP --json` in `host`, onto a
/// new empty file; the output goes to TARGET.log.
fn receive(
    lab: &Lab,
    host: &str,
    store: &Path,
    version: &str,
    group: &str,
    target: &Path,
) -> Child {
    std::fs::File::create(target).expect("target");
    let mut c = lab.cmd(host, env!("CARGO_BIN_EXE_fleetwave"));
    c.args(["agent", "deploy", version])
        .arg(target)
        .arg("--store")
        .arg(store)
        .args(["--multicast", group, "--json"]);
    spawn(c, &log_of(target))
}

fn log_of(target: &Path) -> PathBuf {
    let mut p = target.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

/// The three hosts in wave `room-a`, multicast on 239.28.0.1:9000 with `session`'s
/// settings (min_receivers, max_wait, max_rate).
fn room_fleet(fleet_head: &str, session: &str) -> String {
    format!(
        "{fleet_head}multicast:\n  room-a: {{address: 239.28.0.1, port: 9000, {session}}}\n\
         hosts:\n{}waves:\n  room-a: {{transport: multicast, multicast: room-a}}\n",
        MACS.iter()
            .enumerate()
            .map(|(i, m)| format!(
                "  pc0{}: {{mac: \"{m}\", site: lab, image: win10, wave: room-a}}\n",
                i + 1
            ))
            .collect::<String>()
    )
}

/// Receiver `i` deploys `digest` from the server with its task `token`, joining the
/// session, onto `disk{i}.img` (kept if it exists: a restarted deploy resumes);
/// its output goes to `r{i}.log`.
fn deploy_from_server(lab: &Lab, d: &Path, digest: &str, i: usize, token: &str) -> Child {
    let target = d.join(format!("disk{i}.img"));
    if !target.exists() {
        std::fs::File::create(&target).expect("target");
    }
    let mut c = lab.cmd(&format!("r{}", i + 1), env!("CARGO_BIN_EXE_fleetwave"));
    c.args(["agent", "deploy", digest])
        .arg(&target)
        .args([
            "--server",
            &format!("http://{SERVER}:8080"),
            "--token",
            token,
        ])
        .args(["--mac", MACS[i], "--multicast", "--json"]);
    spawn(c, &d.join(format!("r{i}.log")))
}

#[test]
fn a_wave_converges_by_multicast_with_a_late_a_restarted_and_a_lossy_receiver() {
    if !tools() {
        return;
    }
    let Some(lab) = lab() else {
        return;
    };
    let fleet_head = format!("{}images:\n  win10: {{os: windows}}\n", crate::LAB_SITE);
    let dir = workdir(&fleet_head);
    let d = dir.path();
    let (img, digest) = image(d, &d.join("store"), "win10", 11);
    // A slow group (8 Mbit/s): the session lasts long enough to join late and to
    // kill a receiver in the middle of it.
    let fleet = room_fleet(
        &fleet_head,
        "min_receivers: 2, max_wait: 30s, max_rate: 8Mbit",
    );
    std::fs::write(d.join("fleet.yaml"), &fleet).expect("write");
    // The version is in the server's store: the controller arms the wave's deploys.
    let args = serve_args(d);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut serve = lab.serve("srv", &args);
    lose(&lab, "r1", 5);

    let deploy = |i: usize, token: &str| deploy_from_server(&lab, d, &digest, i, token);
    let tokens: Vec<String> = (0..3)
        .map(|i| token(&lab, &format!("r{}", i + 1), MACS[i]))
        .collect();
    let r0 = deploy(0, &tokens[0]);
    let r1 = deploy(1, &tokens[1]);
    serve.wait_for("receiver joined", Duration::from_secs(30));
    // The session runs; receiver 2 is killed in the middle of it and started again
    // (same task, same token), and receiver 3 joins late.
    std::thread::sleep(Duration::from_secs(2));
    let mut r1 = r1;
    let _ = r1.kill();
    let _ = r1.wait();
    let partial = std::fs::read_to_string(d.join("r1.log")).unwrap_or_default();
    assert!(
        !partial.contains("deployed and verified"),
        "receiver 2 finished before it could be killed; slow the group down:\n{partial}"
    );
    let r1 = deploy(1, &tokens[1]);
    let r2 = deploy(2, &tokens[2]);

    let limit = Duration::from_secs(180);
    let results: Vec<(i32, String)> = [(0, r0), (1, r1), (2, r2)]
        .into_iter()
        .map(|(i, c)| finish(c, &d.join(format!("r{i}.log")), limit))
        .collect();
    for (i, (code, out)) in results.iter().enumerate() {
        assert_eq!(
            *code,
            0,
            "receiver {}: {out}\nserver:\n{}",
            i + 1,
            serve.log()
        );
        let r = report(out);
        assert_eq!(r["deploy"]["verified"], digest.as_str(), "{out}");
        assert!(
            r["multicast"]["chunks_received"].as_u64().unwrap_or(0) > 0,
            "receiver {} got nothing by multicast: {out}",
            i + 1
        );
        assert!(
            same(&img, &d.join(format!("disk{i}.img"))),
            "receiver {}'s disk differs from the image",
            i + 1
        );
    }
    // The lossy receiver lost datagrams and still converged; the restarted one kept
    // what its first run had written.
    assert!(
        report(&results[0].1)["multicast"]["lost"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    assert!(
        report(&results[1].1)["multicast"]["chunks_already"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{}",
        results[1].1
    );
    // The session ended by itself and freed its sender.
    serve.wait_for("multicast session ended", Duration::from_secs(30));
    let health = lab
        .cmd("srv", "busybox")
        .args(["wget", "-q", "-O", "-", "http://127.0.0.1:8080/health"])
        .output()
        .expect("health");
    let health: serde_json::Value = serde_json::from_slice(&health.stdout).expect("health is JSON");
    assert_eq!(
        health["multicast_sessions"],
        serde_json::json!([]),
        "{health}"
    );
    let (status, log) = serve.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn sessions_on_one_port_do_not_mix_a_wrong_session_is_refused_and_shutdown_ends_them() {
    let Some((lab, dir, store)) = setup() else {
        return;
    };
    let d = dir.path();
    let (img_a, a) = image(d, &store, "alpha", 3);
    let (img_b, b) = image(d, &store, "beta", 5);
    let send = |image: &str, group: &str, min: &str, log: &str| {
        send(&lab, &store, image, group, min, "0", &d.join(log))
    };
    let receive = |host: &str, image: &str, group: &str, target: &str| {
        receive(&lab, host, &store, image, group, &d.join(target))
    };
    // Two sessions on the same port, different groups; r1 receives both at once.
    let sa = send("alpha", "239.28.0.1:9000", "2", "send-a.log");
    let sb = send("beta", "239.28.0.2:9000", "1", "send-b.log");
    let ra1 = receive("r1", &a, "239.28.0.1:9000", "a1.img");
    let rb1 = receive("r1", &b, "239.28.0.2:9000", "b1.img");
    let ra2 = receive("r2", &a, "239.28.0.1:9000", "a2.img");
    // A receiver pointed at the wrong session refuses it and writes nothing.
    let wrong = receive("r3", &b, "239.28.0.1:9000", "wrong.img");
    let limit = Duration::from_secs(120);
    let (code, out) = finish(wrong, &d.join("wrong.img.log"), limit);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("refused"), "{out}");
    assert!(
        std::fs::read(d.join("wrong.img"))
            .expect("target")
            .iter()
            .all(|&b| b == 0),
        "the refused deploy wrote to its target"
    );
    for (child, target, img) in [
        (ra1, "a1.img", &img_a),
        (rb1, "b1.img", &img_b),
        (ra2, "a2.img", &img_a),
    ] {
        let (code, out) = finish(child, &d.join(format!("{target}.log")), limit);
        assert_eq!(code, 0, "{target}: {out}");
        let r = report(&out);
        assert_eq!(
            r["multicast"]["chunks_received"], r["multicast"]["chunks"],
            "{target}: everything should come by multicast: {out}"
        );
        assert!(
            same(img, &d.join(target)),
            "{target} differs from its image"
        );
    }
    for (child, log) in [(sa, "send-a.log"), (sb, "send-b.log")] {
        let (code, out) = finish(child, &d.join(log), limit);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("complete"), "{out}");
    }

    // A session that never fills up: SIGTERM ends it, and its waiting receiver falls
    // back to the store and still converges.
    let waiting = send("alpha", "239.28.0.3:9000", "3", "send-c.log");
    let r = receive("r2", &a, "239.28.0.3:9000", "c.img");
    std::thread::sleep(Duration::from_secs(2));
    let _ = Command::new("kill")
        .args(["-TERM", &waiting.id().to_string()])
        .status();
    let (_, out) = finish(waiting, &d.join("send-c.log"), Duration::from_secs(10));
    assert!(out.contains("shutdown"), "{out}");
    let (code, out) = finish(r, &d.join("c.img.log"), limit);
    assert_eq!(code, 0, "{out}");
    assert!(same(&img_a, &d.join("c.img")));
}

#[test]
fn a_lossy_receivers_repairs_go_to_it_alone_and_take_a_bounded_share_of_the_pass() {
    let Some((lab, dir, store)) = setup() else {
        return;
    };
    let d = dir.path();
    let (img, digest) = image(d, &store, "gamma", 7);
    // Far more loss than the share of the pass repairs may take.
    lose(&lab, "r1", 25);
    let group = "239.28.0.4:9000";
    let sender = send(
        &lab,
        &store,
        "gamma",
        group,
        "2",
        "200Mbit",
        &d.join("send.log"),
    );
    let receivers: Vec<_> = ["r1", "r2"]
        .iter()
        .map(|host| {
            let target = d.join(format!("{host}.img"));
            (*host, receive(&lab, host, &store, &digest, group, &target))
        })
        .collect();
    let limit = Duration::from_secs(120);
    let mut reports = Vec::new();
    for (host, child) in receivers {
        let (code, out) = finish(child, &log_of(&d.join(format!("{host}.img"))), limit);
        assert_eq!(code, 0, "{host}: {out}");
        assert!(
            same(&img, &d.join(format!("{host}.img"))),
            "{host}'s disk differs"
        );
        reports.push(report(&out)["multicast"].clone());
    }
    let (code, out) = finish(sender, &d.join("send.log"), limit);
    assert_eq!(code, 0, "{out}");
    let sent = report(&out);
    // The lossy receiver lost datagrams and got them again; every repair went to it
    // alone, so the clean one received each datagram once.
    assert!(
        reports[0]["lost"].as_u64().unwrap_or(0) > 0,
        "{:?}",
        reports[0]
    );
    let n = |k: &str| sent[k].as_u64().unwrap_or(0);
    assert!(n("repair_datagrams") > 0, "{sent}");
    assert_eq!(n("repairs_unicast"), n("repair_datagrams"), "{sent}");
    assert_eq!(reports[1]["duplicates"], 0, "{:?}", reports[1]);
    assert_eq!(reports[1]["lost"], 0, "{:?}", reports[1]);
    // During the pass its repairs took at most a tenth of what was sent; the rest
    // came after the pass.
    assert!(n("pass_repairs") > 0, "{sent}");
    assert!(
        n("pass_repairs") * 100 <= n("pass_datagrams") * 10 + 100,
        "{sent}"
    );
    assert!(n("repair_datagrams") > n("pass_repairs"), "{sent}");
}

/// Drop every UDP datagram reaching `host` from now on (TCP still passes).
fn cut(lab: &Lab, host: &str) {
    drop_udp(lab, host, &["drop"]);
}

/// Allocated bytes of a file (what a receiver has written so far).
fn written(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Issue 17: a session that starts on `max_wait` with fewer receivers than
/// `min_receivers`, and a receiver cut off from the group mid-pass that fills in what
/// it missed over HTTP from the server after the session.
#[test]
fn a_session_starts_on_max_wait_short_of_receivers_and_a_cut_off_receiver_fills_in_over_http() {
    if !tools() {
        return;
    }
    let Some(lab) = lab() else {
        return;
    };
    let fleet_head = format!("{}images:\n  win10: {{os: windows}}\n", crate::LAB_SITE);
    let dir = workdir(&fleet_head);
    let d = dir.path();
    let (img, digest) = image(d, &d.join("store"), "win10", 23);
    // Three receivers wanted, two come: the session must start when max_wait is up.
    let fleet = room_fleet(
        &fleet_head,
        "min_receivers: 3, max_wait: 5s, max_rate: 4Mbit",
    );
    std::fs::write(d.join("fleet.yaml"), &fleet).expect("write");
    let args = serve_args(d);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut serve = lab.serve("srv", &args);
    let deploy = |i: usize| {
        let token = token(&lab, &format!("r{}", i + 1), MACS[i]);
        deploy_from_server(&lab, d, &digest, i, &token)
    };
    let r0 = deploy(0);
    let r1 = deploy(1);
    serve.wait_for("receiver joined", Duration::from_secs(30));
    // Receiver 2 is cut off from every datagram once it holds a few MB of the pass;
    // its TCP (HTTP) still works.
    let target1 = d.join("disk1.img");
    let start = Instant::now();
    while written(&target1) < 2 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "receiver 2 received nothing by multicast:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cut(&lab, "r2");

    let limit = Duration::from_secs(180);
    let results: Vec<(i32, String)> = [(0, r0), (1, r1)]
        .into_iter()
        .map(|(i, c)| finish(c, &d.join(format!("r{i}.log")), limit))
        .collect();
    for (i, (code, out)) in results.iter().enumerate() {
        assert_eq!(
            *code,
            0,
            "receiver {}: {out}\nserver:\n{}",
            i + 1,
            serve.log()
        );
        assert_eq!(report(out)["deploy"]["verified"], digest.as_str(), "{out}");
        assert!(
            same(&img, &d.join(format!("disk{i}.img"))),
            "receiver {}'s disk differs from the image",
            i + 1
        );
    }
    // The cut-off receiver got part by multicast and the rest over HTTP.
    let cut = report(&results[1].1);
    let by_multicast = cut["multicast"]["chunks_received"].as_u64().unwrap_or(0);
    let over_http = cut["deploy"]["chunks_written"].as_u64().unwrap_or(0);
    assert!(by_multicast > 0 && over_http > 0, "{cut}");
    let whole = report(&results[0].1);
    assert_eq!(
        whole["multicast"]["chunks_received"].as_u64(),
        whole["multicast"]["chunks"].as_u64(),
        "the receiver that was not cut off got everything by multicast: {whole}"
    );
    // The sender waited its max_wait for a third receiver, then sent to two.
    serve.wait_for("multicast session ended", Duration::from_secs(120));
    let sessions = lab
        .cmd("srv", "busybox")
        .args([
            "wget",
            "-q",
            "--header",
            &format!("Authorization: Bearer {}", crate::controller::TEST_ADMIN),
            "-O",
            "-",
            "http://127.0.0.1:8080/api/v1/multicast/sessions",
        ])
        .output()
        .expect("sessions");
    let sessions: serde_json::Value =
        serde_json::from_slice(&sessions.stdout).expect("sessions are JSON");
    let ended = &sessions["ended"][0];
    assert_eq!(ended["receivers_joined"], 2, "{sessions}");
    assert!(
        ended["waited_secs"].as_f64().unwrap_or(0.0) >= 4.9,
        "the session started before max_wait with 2 of 3 receivers: {sessions}"
    );
    let (status, log) = serve.stop();
    assert!(status.success(), "{log}");
}
