//! The API over HTTPS (issue 15): a self-signed certificate made by Debian's openssl,
//! the whole server with TLS on, the real agent library pinning the certificate, the
//! real CLI, and Debian's curl as an outside client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleetwave::agent::run::Boot;
use fleetwave::protocol::FleetStatus;
use fleetwave::source::watch::Origin;
use fleetwave::tls::Pin;

use crate::controller::{
    PC, REF, Running, Secrets, TEST_ADMIN, admin_token_file, blank, lab_fleet, reference_disk,
    serve,
};
use crate::tool;

/// A self-signed P-256 certificate for 127.0.0.1 (not a CA: rustls's WebPKI check,
/// used when there is no pin, refuses a CA certificate as the server's own) and its
/// key, as `dir/NAME.crt` and `dir/NAME.key`.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "30"])
        .args(["-subj", "/CN=fleetwave-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The fingerprint as openssl prints it, in the server's form (sha256:lowercase hex).
fn openssl_fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .trim()
        .split_once('=')
        .map(|(_, h)| h.replace(':', "").to_lowercase())
        .expect("openssl prints NAME=HEX");
    format!("sha256:{hex}")
}

fn ready() -> bool {
    tool("openssl", "/usr/bin/openssl")
        && tool("curl", "/usr/bin/curl")
        && tool("e2fsprogs", "/usr/sbin/mkfs.ext4")
}

/// A client that trusts exactly `pin` and hands back error statuses.
fn pinned(pin: Pin) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build();
    fleetwave::tls::agent(config, Some(pin))
}

fn status(https: &str, pin: Pin) -> FleetStatus {
    let mut r = pinned(pin)
        .get(format!("{https}/api/v1/status"))
        .header("Authorization", &format!("Bearer {TEST_ADMIN}"))
        .call()
        .expect("GET status over HTTPS");
    assert_eq!(r.status().as_u16(), 200);
    serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("status JSON")
}

fn wait_for(https: &str, pin: Pin, what: &str, pred: impl Fn(&FleetStatus) -> bool) {
    let start = Instant::now();
    loop {
        let s = status(https, pin);
        if pred(&s) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited for {what}: {}",
            serde_json::to_string_pretty(&s).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state_of(https: &str, pin: Pin, host: &str) -> String {
    status(https, pin)
        .hosts
        .iter()
        .find(|h| h.name == host)
        .map(|h| h.state.clone())
        .unwrap_or_default()
}

/// A plain HTTP GET without any token; status and body.
fn plain_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent.get(url).call().expect("GET");
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// `mac`'s iPXE script over plain HTTP, and the value of `fleetwave.KEY=` in it.
fn script_arg(url: &str, mac: &str, key: &str) -> (String, Option<String>) {
    let (code, script) = plain_get(&format!("{url}/boot/{mac}.ipxe"));
    assert_eq!(code, 200, "{script}");
    let v = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("fleetwave.{key}=")))
        .map(str::to_string);
    (script, v)
}

/// The agent library, as the netboot environment runs it, from the script's own
/// kernel command line (server, token, MAC and pin), against `disk`.
fn agent_from_script(script: &str, disk: &Path, pin: Option<&str>) -> (u8, String) {
    let line = script
        .lines()
        .find(|l| l.starts_with("kernel "))
        .expect("the script boots a kernel");
    let line = match pin {
        Some(p) => line
            .split_whitespace()
            .map(|w| {
                if w.starts_with("fleetwave.pin=") {
                    format!("fleetwave.pin={p}")
                } else {
                    w.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => line.to_string(),
    };
    let mut boot = Boot::from_cmdline(&line, Path::new("the script")).expect("cmdline");
    boot.disk = Some(disk.to_owned());
    crate::controller::run_boot(&boot)
}

fn tls_server(d: &Path) -> (Running, PathBuf, Pin) {
    let (cert, key) = certificate(d, "server");
    let tls = fleetwave::tls::load_server(&cert, &key).expect("the certificate loads");
    let pin = tls.pin;
    std::fs::write(d.join("fleet.yaml"), lab_fleet(1)).expect("write");
    let server = serve(
        d,
        Origin::Dir(d.join("fleet.yaml")),
        &d.join("store"),
        Secrets {
            tls: Some(tls),
            ..Default::default()
        },
    );
    (server, cert, pin)
}

#[test]
fn agents_capture_and_deploy_over_pinned_https_and_a_wrong_pin_never_spends_the_token() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (server, cert, pin) = tls_server(d);
    let https = server.https.clone().expect("an HTTPS side");
    let port = https.rsplit(':').next().expect("port");
    let url = server.url.as_str();
    wait_for(&https, pin, "the capture armed", |s| {
        s.hosts
            .iter()
            .any(|h| h.name == "ref-win10" && h.state == "Armed")
    });
    // The script comes over plain HTTP; the agent is sent to HTTPS with the pin
    // openssl computes for the certificate; kernel and initrd stay on HTTP.
    let (script, server_arg) = script_arg(url, REF, "server");
    assert_eq!(
        server_arg.as_deref(),
        Some(format!("https://127.0.0.1:{port}").as_str()),
        "{script}"
    );
    let expected = openssl_fingerprint(&cert);
    assert_eq!(
        script_arg(url, REF, "pin").1.as_deref(),
        Some(expected.as_str())
    );
    assert_eq!(pin.to_string(), expected);
    assert!(
        script.contains(&format!("kernel {url}/files/vmlinuz ")),
        "{script}"
    );
    // Plain HTTP no longer serves what carries tokens.
    let (code, body) = plain_get(&format!("{url}/api/v1/status"));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("HTTPS"), "{body}");

    // A wrong pin: the agent stops at the handshake, naming both fingerprints...
    let wrong = format!("sha256:{}", "0f".repeat(32));
    let ref_disk = reference_disk(d);
    let (code, out) = agent_from_script(&script, &ref_disk, Some(&wrong));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("fingerprint mismatch") && out.contains(&expected) && out.contains(&wrong),
        "{out}"
    );
    // ...and the token never reached the server: the task is still armed, and the
    // same script (same token) with the right pin captures.
    assert_eq!(state_of(&https, pin, "ref-win10"), "Armed");
    let (code, out) = agent_from_script(&script, &ref_disk, None);
    assert_eq!(code, 0, "{out}");
    wait_for(&https, pin, "the pilot armed", |s| {
        s.hosts
            .iter()
            .any(|h| h.name == "pc01" && h.state == "Armed")
    });
    // A deploy of a file disk over pinned HTTPS converges.
    let (script, _) = script_arg(url, PC[0], "server");
    assert!(script.contains("fleetwave.task=deploy"), "{script}");
    let disk = blank(&d.join("pc01.img"), 40 << 20);
    let (code, out) = agent_from_script(&script, &disk, None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deployed and verified"), "{out}");
    wait_for(&https, pin, "pc01 Ready", |s| {
        s.hosts
            .iter()
            .any(|h| h.name == "pc01" && h.state == "Ready")
    });
    drop(server);
}

#[test]
fn the_cli_and_curl_reach_the_api_over_https_by_pin_or_by_a_trusted_root() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (server, cert, pin) = tls_server(d);
    let https = server.https.clone().expect("an HTTPS side");
    let admin = admin_token_file(d);
    let pin_text = pin.to_string();
    // The pin an admin hands out, from the certificate file.
    let (code, out) = crate::fleetwave(&["tls", "fingerprint", cert.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), openssl_fingerprint(&cert));
    // A read token made over HTTPS with --pin.
    let (code, out) = crate::fleetwave(&[
        "token",
        "create",
        "viewer",
        "--scope",
        "read",
        "--server",
        &https,
        "--pin",
        &pin_text,
        "--token-file",
        admin.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{out}");
    let read = out.lines().next().expect("the token").trim().to_string();
    // Debian's curl, trusting the certificate as a CA file, reads the status with it.
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
        .arg(&cert)
        .args(["-H", &format!("Authorization: Bearer {read}")])
        .arg(format!("{https}/api/v1/status"))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: FleetStatus = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert!(s.hosts.iter().any(|h| h.name == "pc01"));
    // curl's own pin form works against the same server.
    let b64 = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in {} -outform der | openssl dgst -sha256 -binary | base64",
            cert.display()
        ))
        .output()
        .expect("sh runs");
    let curl_pin = format!("sha256//{}", String::from_utf8_lossy(&b64.stdout).trim());
    assert_eq!(curl_pin.parse::<Pin>(), Ok(pin));

    let status = |env: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fleetwave"))
            .args(["status", "--server", &https, "--token-file"])
            .arg(&admin)
            .args(args)
            .env_remove("FLEETWAVE_PIN")
            .envs(env.iter().copied())
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
    };
    // The pin from the environment.
    let (code, out) = status(&[("FLEETWAVE_PIN", &pin_text)], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pc01"), "{out}");
    // A wrong pin names both fingerprints.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (code, out) = status(&[], &["--pin", &wrong]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&pin_text) && out.contains(&wrong), "{out}");
    // No pin: the system's roots, here only this certificate (SSL_CERT_FILE).
    let cert_file = cert.to_str().expect("utf-8");
    let (code, out) = status(&[("SSL_CERT_FILE", cert_file)], &[]);
    assert_eq!(code, 0, "{out}");
    // ...and with roots that do not hold it, refused as untrusted.
    let (other, _) = certificate(d, "other");
    let other = other.to_str().expect("utf-8");
    let (code, out) = status(&[("SSL_CERT_FILE", other)], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not trusted"), "{out}");
    drop(server);
}

#[test]
fn a_stalled_tls_handshake_is_closed_and_keeps_no_one_out() {
    use crate::security::{closed, connect_from};
    use fleetwave::services::http::{HANDSHAKE_TIMEOUT, MAX_CONNECTIONS_PER_CLIENT};
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (server, _, pin) = tls_server(d);
    let https = server.https.clone().expect("an HTTPS side");
    let port: u16 = https
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    // One address opens all the connections it may, and never says hello.
    let opened = Instant::now();
    let mut stalled: Vec<_> = (0..MAX_CONNECTIONS_PER_CLIENT)
        .map(|_| connect_from([127, 0, 4, 1], port))
        .collect();
    let mut over = connect_from([127, 0, 4, 1], port);
    assert!(closed(&mut over), "a connection past the bound was kept");
    // Someone else is answered meanwhile, over TLS.
    let asked = Instant::now();
    let _ = status(&https, pin);
    let answered = asked.elapsed();
    assert!(answered < Duration::from_secs(5), "{answered:?}");
    // The stalled handshakes are closed at the handshake timeout.
    assert!(closed(&mut stalled[0]), "a stalled handshake was kept");
    let held = opened.elapsed();
    assert!(
        held >= HANDSHAKE_TIMEOUT - Duration::from_secs(1)
            && held < HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        "held {held:?}"
    );
    eprintln!("stalled handshakes closed after {held:?}; a real client answered in {answered:?}");
    // Its slots are free again.
    drop(stalled);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = connect_from([127, 0, 4, 1], port);
    again
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut b = [0u8; 1];
    assert!(
        matches!(std::io::Read::read(&mut again, &mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the address is still refused after its handshakes were closed"
    );
    drop(server);
}

/// `fleetwave serve` with a certificate it cannot use: the error names the file and
/// what is wrong, and nothing is created.
#[test]
fn serve_refuses_an_unusable_certificate_or_key_naming_the_file() {
    if !tool("openssl", "/usr/bin/openssl") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("fleet.yaml"), lab_fleet(1)).expect("write");
    let (cert, key) = certificate(d, "server");
    let (_, other_key) = certificate(d, "other");
    let garbage = d.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
    )
    .expect("write");
    let text = d.join("text.pem");
    std::fs::write(&text, "just some text\n").expect("write");
    let missing = d.join("missing.pem");
    let state = d.join("state");
    let p = |p: &Path| p.to_str().expect("utf-8").to_string();
    for (c, k, file, words) in [
        (&missing, &key, &missing, "cannot read the TLS certificate"),
        (&garbage, &key, &garbage, "not a PEM certificate file"),
        (&text, &key, &text, "holds no certificate"),
        (
            &cert,
            &other_key,
            &other_key,
            "is not the private key of the certificate",
        ),
        (&cert, &text, &text, "no private key in it"),
        (&cert, &missing, &missing, "cannot read the TLS key"),
    ] {
        let (code, out) = crate::fleetwave(&[
            "serve",
            "--fleet",
            &p(&d.join("fleet.yaml")),
            "--state-dir",
            &p(&state),
            "--tls-cert",
            &p(c),
            "--tls-key",
            &p(k),
            "--http-port",
            "0",
        ]);
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(&p(file)) && out.contains(words),
            "{}: expected {words:?}:\n{out}",
            file.display()
        );
        assert!(!state.exists(), "serve created its state before failing");
    }
    // One of the pair alone is refused by the command line.
    let (code, out) = crate::fleetwave(&["serve", "--tls-cert", &p(&cert)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--tls-key"), "{out}");
}

/// `fleetwave serve` from server.yaml's `tls:` and `listen.https`: the fingerprint is
/// logged at start, the API answers over HTTPS, and SIGHUP after the certificate file
/// was replaced names it as needing a restart (the running one keeps serving).
#[test]
fn serve_reads_tls_from_server_yaml_logs_the_pin_and_sighup_names_a_new_certificate() {
    use std::io::Read as _;
    if !tool("openssl", "/usr/bin/openssl") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("fleet.yaml"), crate::service::lab_without_dhcp()).expect("write");
    let (cert, key) = certificate(d, "server");
    let pin: Pin = openssl_fingerprint(&cert).parse().expect("pin");
    let (http_port, https_port) = (crate::service::free_port(), crate::service::free_port());
    let config = d.join("server.yaml");
    std::fs::write(
        &config,
        format!(
            "fleet: {d}/fleet.yaml\ninterval: 1h\nstate_dir: {d}/state\nimage_store: {d}/store\n\
             ipxe_dir: {d}\nfiles_dir: {d}\nlisten: {{http: {http_port}, https: {https_port}, tftp: 0}}\n\
             admin_token_file: {token}\ntls: {{cert: {cert}, key: {key}}}\n",
            d = d.display(),
            token = admin_token_file(d).display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )
    .expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetwave"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("FLEETWAVE_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve starts");
    let https = format!("https://127.0.0.1:{https_port}");
    let start = Instant::now();
    let up = loop {
        let r = pinned(pin).get(format!("{https}/health")).call();
        if r.as_ref().is_ok_and(|r| r.status().as_u16() == 200) {
            break true;
        }
        if start.elapsed() > Duration::from_secs(30) || child.try_wait().ok().flatten().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if up {
        assert!(status(&https, pin).hosts.iter().any(|h| h.name == "pc01"));
        // A renewed certificate in the same file, then a reload.
        let (new_cert, new_key) = certificate(d, "renewed");
        std::fs::copy(&new_cert, &cert).expect("copy");
        std::fs::copy(&new_key, &key).expect("copy");
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(500));
        // The running certificate still serves until the restart.
        let _ = status(&https, pin);
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    } else {
        let _ = child.kill();
    }
    let _ = child.wait();
    let mut log = String::new();
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut log));
    assert!(up, "serve did not answer over HTTPS:\n{log}");
    assert!(
        log.contains(&format!("certificate fingerprint {pin}")),
        "{log}"
    );
    assert!(
        log.contains("SIGHUP: tls certificate (its fingerprint) changed; that takes a restart"),
        "{log}"
    );
}
