//! The TFTP server against real clients (atftp, busybox tftp, tftp-hpa) on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::{bytes, tool};
use fleetwave::services::tftp::{self, Config, Stats};
use tokio_util::sync::CancellationToken;

/// A server on 127.0.0.1, port chosen by the kernel, stopped and joined on drop.
struct Server {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    fn start(root: &Path) -> Server {
        Server::start_with(root, |_| {})
    }

    /// [`Server::start`] with `adjust` applied to its configuration.
    fn start_with(root: &Path, adjust: impl FnOnce(&mut Config)) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let socket = rt
            .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let addr = socket.local_addr().expect("local addr");
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let (s, t) = (stats.clone(), stop.clone());
        let mut config = Config::new(root);
        config.timeout = std::time::Duration::from_millis(500);
        // Every test client is 127.0.0.1; a lab's machines each have their own address.
        config.max_per_client = 64;
        adjust(&mut config);
        let thread = std::thread::spawn(move || rt.block_on(tftp::run(socket, config, s, t)));
        Server {
            addr,
            stats,
            stop,
            thread: Some(thread),
        }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Wait (10 s at most) for a counter the server updates just after the client has
/// what it needs and exits.
fn settle(counter: &std::sync::atomic::AtomicU64, want: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while counter.load(Ordering::Relaxed) < want && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("client runs")
}

struct Files {
    dir: tempfile::TempDir,
    root: PathBuf,
    out: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::create_dir_all(&out).expect("mkdir");
    Files { dir, root, out }
}

fn same(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[test]
fn atftp_fetches_byte_identical_at_every_block_size_and_window() {
    if !tool("atftp", "/usr/bin/atftp") {
        return;
    }
    let f = files();
    // Odd size, and a size that is an exact multiple of 512 and 8192 (empty last block).
    std::fs::write(f.root.join("odd.bin"), bytes(3_000_001, 1)).expect("write");
    std::fs::write(f.root.join("even.bin"), bytes(8192 * 40, 2)).expect("write");
    std::fs::write(f.root.join("empty.bin"), b"").expect("write");
    let server = Server::start(&f.root);
    for file in ["odd.bin", "even.bin", "empty.bin"] {
        for (blksize, window) in [
            (512, 1),
            (1468, 1),
            (8192, 1),
            (65464, 1),
            (1468, 8),
            (512, 16),
        ] {
            let out = f.out.join(format!("{file}-{blksize}-{window}"));
            let o = run(Command::new("atftp")
                .args([
                    "--option",
                    &format!("blksize {blksize}"),
                    "--option",
                    "tsize 0",
                ])
                .args(["--option", &format!("windowsize {window}")])
                .args(["-g", "-r", file, "-l"])
                .arg(&out)
                .args(["127.0.0.1", &server.port()]));
            assert!(
                same(&f.root.join(file), &out),
                "{file} at blksize {blksize} window {window}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    assert_eq!(server.stats.transfers_failed.load(Ordering::Relaxed), 0);
}

#[test]
fn busybox_fetches_byte_identical_at_every_block_size() {
    if !tool("busybox-static", "/usr/bin/busybox") {
        return;
    }
    let f = files();
    std::fs::write(f.root.join("ipxe.efi"), bytes(1_048_583, 3)).expect("write");
    let server = Server::start(&f.root);
    for blksize in [512, 1468, 8192, 65464] {
        let out = f.out.join(format!("ipxe-{blksize}"));
        let o = run(Command::new("busybox")
            .args([
                "tftp",
                "-g",
                "-b",
                &blksize.to_string(),
                "-r",
                "ipxe.efi",
                "-l",
            ])
            .arg(&out)
            .args(["127.0.0.1", &server.port()]));
        assert!(
            same(&f.root.join("ipxe.efi"), &out),
            "blksize {blksize}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn a_100_mib_file_crosses_block_number_rollover() {
    if !tool("atftp", "/usr/bin/atftp") {
        return;
    }
    let f = files();
    // 100 MiB in 1024-byte blocks: 102,400 blocks, so block numbers wrap past 65535.
    let data = bytes(100 << 20, 4);
    std::fs::write(f.root.join("big.img"), &data).expect("write");
    let server = Server::start(&f.root);
    let out = f.out.join("big.img");
    let o = run(Command::new("atftp")
        .args(["--option", "blksize 1024", "--option", "windowsize 16"])
        .args(["-g", "-r", "big.img", "-l"])
        .arg(&out)
        .args(["127.0.0.1", &server.port()]));
    assert!(
        same(&f.root.join("big.img"), &out),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn traversal_and_absolute_paths_and_symlinks_out_are_refused() {
    if !tool("tftp-hpa", "/usr/bin/tftp") {
        return;
    }
    let f = files();
    std::fs::write(f.dir.path().join("secret"), b"outside the root").expect("write");
    std::os::unix::fs::symlink(f.dir.path().join("secret"), f.root.join("link-out"))
        .expect("symlink");
    let server = Server::start(&f.root);
    for (i, name) in [
        "../secret",
        "/etc/passwd",
        "link-out",
        "a/../../secret",
        "missing.bin",
    ]
    .iter()
    .enumerate()
    {
        let out = f.out.join(format!("refused-{i}"));
        // tftp-hpa exits 0 and leaves an empty file on errors: judge by contents.
        let o = run(Command::new("tftp")
            .args([
                "-m",
                "binary",
                "127.0.0.1",
                &server.port(),
                "-c",
                "get",
                name,
            ])
            .arg(&out));
        let got = std::fs::read(&out).unwrap_or_default();
        assert!(got.is_empty(), "{name} was served: {} bytes", got.len());
        let said =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        let expect = if *name == "missing.bin" {
            "not found"
        } else {
            "refused"
        };
        assert!(said.contains(expect), "{name}: client said {said:?}");
    }
    settle(&server.stats.transfers_failed, 5);
    assert_eq!(server.stats.transfers_failed.load(Ordering::Relaxed), 5);
}

#[test]
fn writes_are_refused_and_nothing_is_written() {
    if !tool("atftp", "/usr/bin/atftp") {
        return;
    }
    let f = files();
    let local = f.out.join("upload.bin");
    std::fs::write(&local, bytes(10_000, 5)).expect("write");
    let server = Server::start(&f.root);
    let o = run(Command::new("atftp")
        .args(["-p", "-r", "upload.bin", "-l"])
        .arg(&local)
        .args(["127.0.0.1", &server.port()]));
    assert!(
        !o.status.success(),
        "atftp reported success for a refused write"
    );
    assert!(!f.root.join("upload.bin").exists());
    assert_eq!(server.stats.refused.load(Ordering::Relaxed), 1);
}

#[test]
fn many_clients_at_once_all_get_their_files() {
    if !tool("busybox-static", "/usr/bin/busybox") {
        return;
    }
    let f = files();
    for i in 0..4 {
        std::fs::write(
            f.root.join(format!("f{i}")),
            bytes(700_000 + i * 333, 10 + i as u64),
        )
        .expect("write");
    }
    let server = Server::start(&f.root);
    let children: Vec<_> = (0..32)
        .map(|i| {
            let out = f.out.join(format!("c{i}"));
            let child = Command::new("busybox")
                .args([
                    "tftp",
                    "-g",
                    "-b",
                    "1468",
                    "-r",
                    &format!("f{}", i % 4),
                    "-l",
                ])
                .arg(&out)
                .args(["127.0.0.1", &server.port()])
                .spawn()
                .expect("client starts");
            (i, out, child)
        })
        .collect();
    for (i, out, mut child) in children {
        let _ = child.wait();
        assert!(
            same(&f.root.join(format!("f{}", i % 4)), &out),
            "client {i}"
        );
    }
    settle(&server.stats.transfers_done, 32);
    assert_eq!(server.stats.transfers_done.load(Ordering::Relaxed), 32);
    assert_eq!(server.stats.transfers_failed.load(Ordering::Relaxed), 0);
}

#[test]
fn netascii_reads_come_back_as_the_text_file() {
    if !tool("tftp-hpa", "/usr/bin/tftp") {
        return;
    }
    let f = files();
    let text = "#!ipxe\nchain http://172.28.0.1/boot/${mac}.ipxe\r\nsecond\rline\n";
    std::fs::write(f.root.join("boot.ipxe"), text).expect("write");
    let server = Server::start(&f.root);
    let out = f.out.join("boot.ipxe");
    run(Command::new("tftp")
        .args([
            "-m",
            "ascii",
            "127.0.0.1",
            &server.port(),
            "-c",
            "get",
            "boot.ipxe",
        ])
        .arg(&out));
    assert_eq!(std::fs::read_to_string(&out).unwrap_or_default(), text);
}

/// A bare UDP socket speaking TFTP by hand, for what no real client will do.
fn raw_client() -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    s
}

fn rrq(name: &str) -> Vec<u8> {
    let mut p = vec![0, 1];
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(b"\0octet\0");
    p
}

#[test]
fn a_silent_client_is_given_up_with_an_error_and_frees_its_slot() {
    let f = files();
    std::fs::write(f.root.join("boot.bin"), bytes(5000, 7)).expect("write");
    let server = Server::start(&f.root);
    let c = raw_client();
    c.send_to(&rrq("boot.bin"), server.addr).expect("send");
    let mut buf = [0u8; 1024];
    let mut data_packets = 0;
    // Never ACK: block 1 comes again on each timeout, then an ERROR ends the transfer.
    let error = loop {
        let (n, _) = c.recv_from(&mut buf).expect("server answers");
        match u16::from_be_bytes([buf[0], buf[1]]) {
            3 => {
                assert_eq!(
                    u16::from_be_bytes([buf[2], buf[3]]),
                    1,
                    "only block 1 without an ACK"
                );
                data_packets += 1;
            }
            5 => break String::from_utf8_lossy(&buf[4..n]).into_owned(),
            op => panic!("unexpected opcode {op}"),
        }
    };
    assert_eq!(data_packets, 5, "one send and four retransmissions");
    assert!(error.contains("timed out"), "{error}");
    settle(&server.stats.transfers_failed, 1);
    assert_eq!(server.stats.transfers_failed.load(Ordering::Relaxed), 1);
}

#[test]
fn garbage_on_the_port_does_not_stop_the_server() {
    if !tool("busybox-static", "/usr/bin/busybox") {
        return;
    }
    let f = files();
    std::fs::write(f.root.join("ok.bin"), bytes(20_000, 8)).expect("write");
    let server = Server::start(&f.root);
    let c = raw_client();
    let junk: [&[u8]; 7] = [
        b"",
        b"\x00",
        b"\x00\x01no-terminator",
        b"\x00\x01file\x00octet\x00blksize\x00",
        b"\x00\x03\x00\x01stray data",
        b"\xff\xff\xff\xff",
        &[0u8; 1500],
    ];
    for j in junk {
        c.send_to(j, server.addr).expect("send");
    }
    let out = f.out.join("ok.bin");
    run(Command::new("busybox")
        .args(["tftp", "-g", "-r", "ok.bin", "-l"])
        .arg(&out)
        .args(["127.0.0.1", &server.port()]));
    assert!(same(&f.root.join("ok.bin"), &out));
    assert!(server.stats.malformed.load(Ordering::Relaxed) >= 6);
}

#[test]
fn shutdown_ends_transfers_in_flight() {
    let f = files();
    std::fs::write(f.root.join("slow.bin"), bytes(50_000, 9)).expect("write");
    let mut server = Server::start(&f.root);
    let c = raw_client();
    c.send_to(&rrq("slow.bin"), server.addr).expect("send");
    let mut buf = [0u8; 1024];
    let (_, from) = c.recv_from(&mut buf).expect("block 1");
    // Stop with the transfer waiting for our ACK: the client hears why, and run() returns.
    server.stop.cancel();
    let (n, _) = c.recv_from(&mut buf).expect("an error packet");
    assert_eq!(
        u16::from_be_bytes([buf[0], buf[1]]),
        5,
        "expected ERROR, got {:?}",
        &buf[..n]
    );
    assert!(String::from_utf8_lossy(&buf[4..n]).contains("shutting down"));
    let started = std::time::Instant::now();
    let result = server.thread.take().map(|t| t.join());
    assert!(matches!(result, Some(Ok(Ok(())))), "server ended cleanly");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "no transfer outlived the server"
    );
    let _ = from;
}

#[test]
fn one_address_cannot_hold_every_transfer_and_others_are_still_served() {
    let f = files();
    std::fs::write(f.root.join("boot.bin"), bytes(50_000, 3)).expect("write");
    // A long retransmission timeout: the silent transfers below hold their slots for
    // the whole test, however slow the machine.
    let server = Server::start_with(&f.root, |c| c.timeout = std::time::Duration::from_secs(60));
    // 64 silent transfers from 127.0.0.1 (its bound in these tests), never ACKed: each
    // holds its slot until its retries run out.
    let silent: Vec<_> = (0..64)
        .map(|_| {
            let c = raw_client();
            c.send_to(&rrq("boot.bin"), server.addr).expect("send");
            let mut buf = [0u8; 1024];
            let (_, _) = c.recv_from(&mut buf).expect("block 1");
            assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), 3, "DATA");
            c
        })
        .collect();
    // The next one from the same address is refused at once.
    let c = raw_client();
    c.send_to(&rrq("boot.bin"), server.addr).expect("send");
    let mut buf = [0u8; 1024];
    let (n, _) = c.recv_from(&mut buf).expect("an answer");
    assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), 5, "ERROR");
    assert!(
        String::from_utf8_lossy(&buf[4..n]).contains("too many transfers"),
        "{}",
        String::from_utf8_lossy(&buf[4..n])
    );
    // Another address is served.
    let other = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    other
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    other.send_to(&rrq("boot.bin"), server.addr).expect("send");
    let (_, _) = other.recv_from(&mut buf).expect("an answer");
    assert_eq!(
        u16::from_be_bytes([buf[0], buf[1]]),
        3,
        "DATA for another client"
    );
    drop(silent);
}
