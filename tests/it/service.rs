//! `fleetwave serve` run as an operator runs it: from its configuration file, logging
//! JSON for a collector.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::controller::{http, lab_fleet, state_of, wait_for};

/// The lab without DHCP, so the server needs no interface.
pub(crate) fn lab_without_dhcp() -> String {
    lab_fleet(1).replace(
        "dhcp: {mode: authoritative, pool: 172.28.0.100-172.28.0.199, router: 172.28.0.1, lease: 1h}",
        "dhcp: {mode: off}",
    )
}

/// A TCP port that nobody holds, for a server under test. It comes from below the
/// kernel's ephemeral range (32768 and up): a port the kernel hands out and takes back
/// can go to another test's socket before the server binds it, which failed a CI run
/// with "Address already in use". Each call takes the next port; processes start apart.
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start.wrapping_add(n) % SPAN);
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in {FIRST}..{}", FIRST + SPAN)
}

fn serve(args: &[&str], dir: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_fleetwave"))
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .env_remove("FLEETWAVE_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts")
}

#[test]
fn serve_takes_its_settings_from_server_yaml_with_flags_over_them_and_logs_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("fleet.yaml"), lab_without_dhcp()).expect("fleet written");
    let port = free_port();
    // The file says port 1; the flag's port wins.
    let config = format!(
        "# yaml-language-server: $schema=schemas/server.schema.json\n\
         fleet: {d}/fleet.yaml\ninterval: 1h\nstate_dir: {d}/state\nimage_store: {d}/store\n\
         ipxe_dir: {d}\nfiles_dir: {d}\nlisten: {{http: 1, tftp: 0}}\n\
         log: info\nlog_format: json\nadmin_token_file: {token}\n",
        d = d.display(),
        token = crate::controller::admin_token_file(d).display()
    );
    // Apart from the fleet, whose directory the server watches.
    std::fs::create_dir(d.join("etc")).expect("mkdir");
    let config_path = d.join("etc/server.yaml");
    std::fs::write(&config_path, &config).expect("config written");
    let mut child = serve(
        &[
            "--config",
            "etc/server.yaml",
            "--http-port",
            &port.to_string(),
        ],
        d,
    );
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while http().get(format!("{url}/health")).call().is_err() {
        if start.elapsed() > Duration::from_secs(30) || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("serve did not come up on the flag's port:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(&url, "the capture armed", Duration::from_secs(30), |s| {
        state_of(s, "ref-win10") == "Armed"
    });
    // SIGHUP reads the source at once (the interval is an hour) and the file again,
    // and names what only a restart changes.
    let reads = || {
        let text = crate::controller::get(&format!("{url}/metrics")).1;
        crate::controller::metric(
            &text,
            r#"fleetwave_source_reads_total{outcome="unchanged"}"#,
        )
    };
    let before = std::panic::catch_unwind(reads).unwrap_or(0.0);
    std::fs::write(&config_path, config.replace("interval: 1h", "interval: 2h")).expect("edited");
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let start = Instant::now();
    while std::panic::catch_unwind(reads).unwrap_or(0.0) <= before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "SIGHUP read nothing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM: a clean stop, then every line of its log is one JSON object.
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("serve stops");
    let mut log = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut log)
        .expect("log read");
    assert!(status.success(), "serve stopped with {status}:\n{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    let armed = lines
        .iter()
        .find(|l| {
            l["host"] == "ref-win10"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("armed"))
        })
        .unwrap_or_else(|| panic!("no armed line for ref-win10:\n{log}"));
    assert!(armed["task"].as_u64().is_some(), "{armed}");
    assert!(
        armed["commit"]
            .as_str()
            .is_some_and(|c| !c.is_empty() && c != "-"),
        "{armed}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("SIGHUP: interval changed"))),
        "{log}"
    );
}

#[test]
fn a_mistake_in_server_yaml_is_named_with_its_place_and_nothing_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(
        d.join("server.yaml"),
        format!("state_dir: {}/state\nlisten:\n  htpp: 8080\n", d.display()),
    )
    .expect("config written");
    let out = serve(&["--config", "server.yaml"], d)
        .wait_with_output()
        .expect("serve ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("server.yaml:3:3"), "{err}");
    assert!(err.contains("did you mean `http`"), "{err}");
    // It stopped before creating anything.
    assert!(!d.join("state").exists());
}
