//! The HTTP server on loopback: iPXE scripts for each state a host can be in, boot
//! files confined to their root, and the health endpoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use fleetwave::observed::Observed;
use fleetwave::plan::{self, Params};
use fleetwave::services::http::{BootTable, HttpState, run};
use tokio_util::sync::CancellationToken;

const DIGEST: &str = "blake3:1111111111111111111111111111111111111111111111111111111111111111";

fn fleet() -> String {
    format!(
        "{}{}",
        crate::LAB_SITE,
        r#"    unknown_hosts: register
images:
  win10:
    os: windows
    capture: {from: ref-win10, generation: 1}
  linux:
    os: linux
hosts:
  ref-win10: {mac: "52:54:00:28:00:10", site: lab}
  pc01: {mac: "52:54:00:28:00:11", site: lab, image: win10, wave: pilot}
  pc02: {mac: "52:54:00:28:00:12", site: lab, image: win10, wave: pilot}
  pc03: {mac: "52:54:00:28:00:13", site: lab, image: win10, wave: pilot, suspend: true}
  pc04: {mac: "52:54:00:28:00:14", site: lab, actions: {wipe: {mode: fast, generation: 1}}}
  pc05: {mac: "52:54:00:28:00:15", site: lab, image: linux}
waves:
  pilot: {transport: unicast}
"#
    )
}

fn observed() -> Observed {
    Observed::from_json(&format!(
        r#"{{
  "hosts": [
    {{"mac": "52:54:00:28:00:10", "done": {{"capture": 1}}}},
    {{"mac": "52:54:00:28:00:11", "deployed": "{DIGEST}"}}
  ],
  "images": {{"win10": {{"versions": [
    {{"digest": "{DIGEST}", "generation": 1, "disk_bytes": 1000000, "stored_bytes": 400000}}
  ]}}}}
}}"#
    ))
    .expect("observed state")
}

struct Http {
    addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Http {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start() -> Http {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = crate::spec_of(&fleet());
    let plan = plan::diff(&spec, &observed(), &Params::default());
    let ipxe = dir.path().join("ipxe");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&ipxe).expect("mkdir");
    std::fs::create_dir_all(&files).expect("mkdir");
    std::fs::write(ipxe.join("snponly.efi"), vec![7u8; 300_000]).expect("write");
    std::fs::write(dir.path().join("secret"), "not served").expect("write");
    std::os::unix::fs::symlink(dir.path().join("secret"), files.join("link-out")).expect("symlink");
    let state = HttpState {
        table: Arc::new(BootTable::from_plan(&spec, &plan)),
        base_url: "http://172.28.0.1:8080".into(),
        ipxe_root: ipxe,
        files_root: files,
        dhcp: None,
        tftp: None,
        api: None,
    };
    let stop = CancellationToken::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let t = stop.clone();
    let thread = std::thread::spawn(move || {
        let _ = rt.block_on(run(listener, state, t));
    });
    Http {
        addr,
        stop,
        thread: Some(thread),
        _dir: dir,
    }
}

/// GET over a plain socket, the way iPXE asks: status and body.
fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 172.28.0.1:8080\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, raw[split + 4..].to_vec())
}

fn script(addr: SocketAddr, mac: &str) -> String {
    let (status, body) = get(addr, &format!("/boot/{mac}.ipxe"));
    assert_eq!(status, 200, "{mac}: {}", String::from_utf8_lossy(&body));
    let text = String::from_utf8(body).expect("utf-8");
    assert!(text.starts_with("#!ipxe\n"), "{text}");
    text
}

#[test]
fn each_host_state_gets_its_script() {
    let h = start();
    let local = "sanboot --no-describe --drive 0x80";
    // Converged: the local disk.
    let s = script(h.addr, "52:54:00:28:00:11");
    assert!(s.contains("pc01: nothing due") && s.contains(local), "{s}");
    // Its capture done: the reference machine boots its disk too.
    let s = script(h.addr, "52:54:00:28:00:10");
    assert!(s.contains(local), "{s}");
    // Due for a deploy: the agent, with the version and transport.
    let s = script(h.addr, "52-54-00-28-00-12");
    assert!(
        s.contains("kernel http://172.28.0.1:8080/files/vmlinuz initrd=initrd.img")
            && s.contains("fleetwave.task=deploy")
            && s.contains(&format!("fleetwave.version={DIGEST}"))
            && s.contains("fleetwave.via=unicast")
            && s.contains("fleetwave.host=pc02")
            && s.contains("initrd http://172.28.0.1:8080/files/initrd.img"),
        "{s}"
    );
    // Suspended: nothing happens to it.
    let s = script(h.addr, "52:54:00:28:00:13");
    assert!(s.contains("pc03: suspended") && s.contains(local), "{s}");
    // A one-shot wipe.
    let s = script(h.addr, "52:54:00:28:00:14");
    assert!(
        s.contains("fleetwave.task=wipe") && s.contains("fleetwave.mode=fast"),
        "{s}"
    );
    // An image that was never captured: stalled, so the disk is left alone.
    let s = script(h.addr, "52:54:00:28:00:15");
    assert!(s.contains("pc05: stalled") && s.contains(local), "{s}");
    // An unknown machine on a site that registers them.
    let s = script(h.addr, "52:54:00:99:99:99");
    assert!(s.contains("fleetwave.task=register"), "{s}");
    // Not a MAC.
    assert_eq!(get(h.addr, "/boot/not-a-mac.ipxe").0, 400);
}

#[test]
fn boot_files_are_served_whole_and_confined_to_their_root() {
    let h = start();
    let (status, body) = get(h.addr, "/ipxe/snponly.efi");
    assert_eq!((status, body.len()), (200, 300_000));
    assert!(body.iter().all(|&b| b == 7));
    assert_eq!(get(h.addr, "/ipxe/missing.efi").0, 404);
    assert_eq!(get(h.addr, "/files/link-out").0, 403);
    // Sent as is, without a client normalising the path first.
    assert_eq!(get(h.addr, "/files/../secret").0, 403);
    assert_eq!(get(h.addr, "/files/%2e%2e/secret").0, 403);
    let (status, body) = get(h.addr, "/health");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["hosts"], 6);
}
