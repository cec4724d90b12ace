//! The HTTP server on loopback: iPXE scripts for each state a host can be in, boot
//! files confined to their root, and the health endpoint.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use fleetwave::image::store::{Store, VersionRecord};
use fleetwave::reconcile::host::HostStatus;
use fleetwave::source::watch::Origin;
use fleetwave::state::{HostRow, Op};

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

struct Http {
    addr: SocketAddr,
    _server: crate::controller::Running,
    _dir: tempfile::TempDir,
}

/// The whole server on the fleet above, with the version of `win10` in its store and
/// pc01 recorded as holding it.
fn start() -> Http {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("fleet.yaml"), fleet()).expect("write");
    let store = Store::open(&d.join("store")).expect("store");
    let digest: fleetwave::spec::Digest = DIGEST.parse().expect("digest");
    store
        .add_version(
            "win10",
            VersionRecord {
                digest,
                generation: 1,
                captured_at: 0,
                disk_bytes: 1_000_000,
                stored_bytes: 400_000,
                made_by: None,
            },
        )
        .expect("version");
    let state = fleetwave::state::Store::open(&{
        std::fs::create_dir_all(d.join("state")).expect("mkdir");
        d.join("state/state.db")
    })
    .expect("state")
    .into_writer();
    let held = HostStatus {
        deployed: Some(digest),
        ..HostStatus::default()
    };
    state.handle().write(
        vec![Op::PutHost(HostRow {
            name: "pc01".into(),
            mac: "52:54:00:28:00:11".parse().expect("mac"),
            phase: "Ready".into(),
            status: serde_json::to_string(&held).expect("json"),
            updated: 0,
        })],
        None,
    );
    state.close();
    let ipxe = d.join("ipxe");
    let files = d.join("files");
    std::fs::create_dir_all(&ipxe).expect("mkdir");
    std::fs::create_dir_all(&files).expect("mkdir");
    std::fs::write(ipxe.join("snponly.efi"), vec![7u8; 300_000]).expect("write");
    std::fs::write(d.join("secret"), "not served").expect("write");
    std::os::unix::fs::symlink(d.join("secret"), files.join("link-out")).expect("symlink");
    let server = crate::controller::serve_with(
        d,
        Origin::Dir(d.join("fleet.yaml")),
        &d.join("store"),
        Default::default(),
        &ipxe,
        &files,
    );
    let addr: SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    crate::controller::wait_for(
        &server.url,
        "the fleet applied",
        std::time::Duration::from_secs(20),
        |s| s.applied.is_some() && crate::controller::state_of(s, "pc02") == "Armed",
    );
    Http {
        addr,
        _server: server,
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
    assert!(s.contains("pc01: Ready") && s.contains(local), "{s}");
    // Its image has a version of the generation asked for: the reference boots its disk.
    let s = script(h.addr, "52:54:00:28:00:10");
    assert!(s.contains(local), "{s}");
    // Armed for a deploy: the agent, with its task's token; the task itself comes
    // from the API.
    let s = script(h.addr, "52-54-00-28-00-12");
    assert!(
        s.contains("kernel http://172.28.0.1:8080/files/vmlinuz initrd=initrd.img")
            && s.contains("fleetwave.task=deploy")
            && s.contains(&format!("deploy win10@{DIGEST} by unicast"))
            && s.contains("fleetwave.token=")
            && s.contains("fleetwave.host=pc02")
            && s.contains("initrd http://172.28.0.1:8080/files/initrd.img"),
        "{s}"
    );
    // Suspended: nothing happens to it.
    let s = script(h.addr, "52:54:00:28:00:13");
    assert!(s.contains("pc03: Suspended") && s.contains(local), "{s}");
    // A one-shot wipe.
    let s = script(h.addr, "52:54:00:28:00:14");
    assert!(
        s.contains("fleetwave.task=wipe") && s.contains("wipe (fast, generation 1)"),
        "{s}"
    );
    // An image that was never captured: stalled, so the disk is left alone.
    let s = script(h.addr, "52:54:00:28:00:15");
    assert!(s.contains("pc05: Stalled") && s.contains(local), "{s}");
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
