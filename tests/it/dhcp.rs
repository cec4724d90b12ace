//! The DHCP server against real clients (busybox udhcpc, ISC dhclient, Kea's
//! perfdhcp) in network namespaces, and against hand-made datagrams on loopback.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use fleetwave::services::dhcp::{self, Config, Server, Stats};
use fleetwave::spec::DhcpMode;
use fleetwave::state::Store;
use tokio_util::sync::CancellationToken;

use crate::netlab::{Lab, lab_fleet, serve_args, workdir};
use crate::tool;

/// A client hook that records what the client was given (udhcpc calls it with
/// `bound`, dhclient sets `reason=BOUND`) in `out`. dhclient's address is configured
/// (inside the client's namespace) so that its unicast RELEASE can leave; udhcpc's is
/// not, so each run starts unconfigured. The path is written into the script:
/// dhclient gives its hook a clean environment.
fn hook(dir: &Path, out: &Path) -> std::path::PathBuf {
    let p = dir.join(format!(
        "hook-{}.sh",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = bound ] || [ \"$reason\" = BOUND ] || [ \"$reason\" = REBOOT ]; then\n  env > '{}'\nfi\nif [ \"$reason\" = BOUND ]; then\n  ip addr add \"$new_ip_address/$new_subnet_mask\" dev \"$interface\"\nfi\nexit 0\n",
        out.display()
    );
    std::fs::write(&p, script).expect("write hook");
    let _ = std::process::Command::new("chmod")
        .arg("+x")
        .arg(&p)
        .status();
    p
}

fn env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One lease by udhcpc on `host` with extra arguments; the variables it was given.
fn udhcpc(lab: &Lab, dir: &Path, host: &str, extra: &[&str]) -> BTreeMap<String, String> {
    let out = dir.join(format!("{host}.udhcpc.env"));
    let _ = std::fs::remove_file(&out);
    let hook = hook(dir, &out);
    let status = lab
        .cmd(host, "udhcpc")
        .args(["-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s"])
        .arg(&hook)
        .args(extra)
        .output()
        .expect("udhcpc runs");
    let env = env_file(&out);
    assert!(
        status.status.success() && env.contains_key("ip"),
        "udhcpc on {host} got no lease: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    env
}

fn dhclient(lab: &Lab, dir: &Path, host: &str, release: bool) -> BTreeMap<String, String> {
    let out = dir.join(format!("{host}.dhclient.env"));
    let hook = hook(dir, &out);
    let lf = dir.join(format!("{host}.leases"));
    let pf = dir.join(format!("{host}.pid"));
    let mut cmd = lab.cmd(host, "dhclient");
    cmd.args(["-4", "-1", "-v", "-sf"])
        .arg(&hook)
        .arg("-lf")
        .arg(&lf)
        .arg("-pf")
        .arg(&pf);
    if release {
        cmd.arg("-r");
    } else {
        let _ = std::fs::remove_file(&out);
    }
    let status = cmd.arg("eth0").output().expect("dhclient runs");
    assert!(
        status.status.success(),
        "dhclient on {host}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    env_file(&out)
}

/// The store's bound leases, read while the server runs (WAL allows a reader).
fn leases(state: &Path) -> BTreeMap<Ipv4Addr, String> {
    Store::open(&state.join("state.db"))
        .expect("open state")
        .leases()
        .expect("leases")
        .into_iter()
        .map(|l| (l.ip, l.mac.to_string()))
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn clients_ready() -> bool {
    tool("udhcpc", "/usr/sbin/udhcpc") && tool("isc-dhcp-client", "/usr/sbin/dhclient")
}

const PC01: &str = "52:54:00:28:00:11";
const PC02: &str = "52:54:00:28:00:12";

#[test]
fn reservations_pool_addresses_and_boot_files_by_architecture() {
    if !clients_ready() {
        return;
    }
    let Some(mut lab) = Lab::new() else { return };
    lab.host("srv", None, &["172.28.0.1/24"]);
    lab.host("bios", Some(PC01), &[]);
    lab.host("uefi", Some("52:54:00:99:00:02"), &[]);
    lab.host("ipxe", Some("52:54:00:99:00:03"), &[]);
    lab.host("os", Some(PC02), &[]);
    let dir = workdir(&lab_fleet());
    let args = serve_args(dir.path());
    let server = lab.serve("srv", &args.iter().map(String::as_str).collect::<Vec<_>>());

    // A known host with a reservation, booting BIOS PXE firmware.
    let bios = udhcpc(
        &lab,
        dir.path(),
        "bios",
        &["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"],
    );
    assert_eq!(bios["ip"], "172.28.0.11", "{bios:?}");
    assert_eq!(bios["siaddr"], "172.28.0.1");
    assert_eq!(bios["boot_file"], "undionly.kpxe");
    assert_eq!(bios["serverid"], "172.28.0.1");
    assert_eq!(bios["router"], "172.28.0.1");
    assert_eq!(bios["subnet"], "255.255.255.0");
    assert_eq!(bios["lease"], "3600");
    // Its own name (option 12), from the fleet: imaged machines learn who they are.
    assert_eq!(bios["hostname"], "pc01", "{bios:?}");

    // An unknown machine with UEFI firmware: a pool address (the site registers them).
    let uefi = udhcpc(
        &lab,
        dir.path(),
        "uefi",
        &["-V", "PXEClient:Arch:00007:UNDI:003000", "-x", "0x5d:0007"],
    );
    assert!(
        !uefi.contains_key("hostname"),
        "an unknown machine named: {uefi:?}"
    );
    let ip: Ipv4Addr = uefi["ip"].parse().expect("ip");
    assert!(
        (Ipv4Addr::new(172, 28, 0, 100)..=Ipv4Addr::new(172, 28, 0, 199)).contains(&ip),
        "{ip} is outside the pool"
    );
    assert_eq!(uefi["boot_file"], "snponly.efi");
    assert_eq!(uefi["siaddr"], "172.28.0.1");

    // iPXE (user class "iPXE") gets its script's URL.
    let ipxe = udhcpc(
        &lab,
        dir.path(),
        "ipxe",
        &[
            "-V",
            "PXEClient:Arch:00000:UNDI:002001",
            "-x",
            "0x4d:69505845",
        ],
    );
    assert_eq!(
        ipxe["boot_file"],
        "http://172.28.0.1:8080/boot/52:54:00:99:00:03.ipxe"
    );

    // An operating system's client (dhclient) on a known host without a reservation:
    // a pool address and no boot file.
    let os = dhclient(&lab, dir.path(), "os", false);
    let os_ip = os
        .get("new_ip_address")
        .expect("dhclient was given an address");
    assert!(os_ip.starts_with("172.28.0.1"), "{os:?}");
    assert!(!os.contains_key("new_filename"), "{os:?}");

    let all = [&bios["ip"], &uefi["ip"], &ipxe["ip"], os_ip];
    let distinct: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), 4, "two clients share an address: {all:?}");

    // Every exchange was recorded with the client's architecture.
    let (status, log) = server.stop();
    assert!(status.success(), "serve exited with {status}; log:\n{log}");
    let obs = Store::open(&dir.path().join("state/state.db"))
        .expect("open")
        .observations(100)
        .expect("observations");
    let arch_of = |mac: &str| {
        obs.iter()
            .find(|o| o.mac.to_string() == mac)
            .map(|o| (o.arch.clone(), o.known))
    };
    assert_eq!(arch_of(PC01), Some(("bios".into(), true)));
    assert_eq!(
        arch_of("52:54:00:99:00:02"),
        Some(("efi-x64".into(), false))
    );
    assert_eq!(
        arch_of("52:54:00:99:00:03"),
        Some(("ipxe-bios".into(), false))
    );
    assert_eq!(arch_of(PC02), Some(("none".into(), true)));
}

#[test]
fn release_frees_and_leases_survive_a_crash_and_a_restart() {
    if !clients_ready() {
        return;
    }
    let Some(mut lab) = Lab::new() else { return };
    lab.host("srv", None, &["172.28.0.1/24"]);
    for (i, name) in ["c1", "c2", "c3", "c4"].iter().enumerate() {
        lab.host(name, Some(&format!("52:54:00:77:00:0{}", i + 1)), &[]);
    }
    let dir = workdir(&lab_fleet());
    let state = dir.path().join("state");
    let args = serve_args(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let server = lab.serve("srv", &args);
    let a1 = udhcpc(&lab, dir.path(), "c1", &[])["ip"].clone();
    let a2 = udhcpc(&lab, dir.path(), "c2", &[])["ip"].clone();
    assert_ne!(a1, a2);

    // dhclient binds, then releases: the lease leaves the store.
    let got = dhclient(&lab, dir.path(), "c3", false);
    let a3: Ipv4Addr = got["new_ip_address"].parse().expect("ip");
    assert!(leases(&state).contains_key(&a3));
    dhclient(&lab, dir.path(), "c3", true);
    wait_until("the released lease is gone", || {
        !leases(&state).contains_key(&a3)
    });

    // A crash right after the ACKs loses nothing: each ACK left after its commit.
    server.crash();
    let server = lab.serve("srv", &args);
    let held = leases(&state);
    assert_eq!(
        held.get(&a1.parse().expect("ip")).map(String::as_str),
        Some("52:54:00:77:00:01")
    );
    assert_eq!(
        held.get(&a2.parse().expect("ip")).map(String::as_str),
        Some("52:54:00:77:00:02")
    );
    // A newcomer gets neither held address; an old client gets its own back.
    let a4 = udhcpc(&lab, dir.path(), "c4", &[])["ip"].clone();
    assert!(a4 != a1 && a4 != a2, "{a4} was handed out twice");
    assert_eq!(udhcpc(&lab, dir.path(), "c1", &[])["ip"], a1);

    // A clean stop, then a restart: the same.
    let (status, log) = server.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("SIGTERM: stopping") && log.contains("stopped"),
        "{log}"
    );
    let _server = lab.serve("srv", &args);
    assert_eq!(udhcpc(&lab, dir.path(), "c2", &[])["ip"], a2);
    let fresh: Vec<String> = leases(&state).keys().map(|ip| ip.to_string()).collect();
    assert_eq!(fresh.len(), 3, "{fresh:?}");
}

/// A second site behind a relay: perfdhcp plays the relay (giaddr 10.77.1.1).
#[test]
fn relayed_requests_are_answered_from_the_relays_subnet() {
    if !tool("kea-admin", "/usr/sbin/perfdhcp") {
        return;
    }
    let Some(mut lab) = Lab::new() else { return };
    lab.host("srv", None, &["172.28.0.1/24"]);
    lab.host("relay", None, &["10.77.1.1/24"]);
    // On-link routes both ways over the bridge; nothing leaves the lab.
    lab.ip("srv", &["route", "add", "10.77.1.0/24", "dev", "eth0"]);
    lab.ip("relay", &["route", "add", "172.28.0.0/24", "dev", "eth0"]);
    let fleet = lab_fleet().replace(
        "images:",
        "  remote:
    interface: eth1
    server: 172.28.0.1
    subnet: 10.77.0.0/16
    relayed: true
    dhcp: {mode: authoritative, pool: 10.77.1.10-10.77.9.250, router: 10.77.1.1, lease: 1h}
images:",
    );
    let dir = workdir(&fleet);
    let args = serve_args(dir.path());
    let server = lab.serve("srv", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = lab
        .cmd("relay", "perfdhcp")
        // A test period, then 2 s (-W) for replies in flight: otherwise the exchanges
        // of the last milliseconds (an ACK waits for its commit) count as drops.
        .args([
            "-4", "-l", "eth0", "-r", "100", "-R", "1000", "-p", "3", "-W", "2000000",
        ])
        .arg("172.28.0.1")
        .output()
        .expect("perfdhcp runs");
    let text = String::from_utf8_lossy(&out.stdout);
    // Exit 3 means something was dropped.
    assert!(out.status.success(), "perfdhcp: {text}\n{}", server.log());
    let held = leases(&dir.path().join("state"));
    assert!(held.len() >= 250, "only {} leases: {text}", held.len());
    let remote: ipnet::Ipv4Net = "10.77.0.0/16".parse().expect("net");
    assert!(held.keys().all(|ip| remote.contains(ip)), "{held:?}");
}

// ---- loopback: the same server code, driven by hand-made datagrams ----

/// A server on 127.0.0.1, replies going back to the test's ports.
struct Loop {
    server_addr: SocketAddrV4,
    pxe_addr: SocketAddrV4,
    client: UdpSocket,
    stats: Arc<Stats>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    writer: Option<fleetwave::state::Writer>,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn start(mode: DhcpMode) -> Loop {
        let spec = crate::spec_of(&lab_fleet());
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let client_port = client.local_addr().expect("addr").port();
        let mut config = Config::from_spec(&spec, &[]);
        config.sites[0].mode = mode;
        config.http_port = 8080;
        // Replies to 127.0.0.1 as if it were the relay, so they reach this test.
        config.relay_port = client_port;
        config.client_port = client_port;
        let stats = Arc::new(Stats::default());
        let server = Arc::new(Mutex::new(Server::new(config, Vec::new(), stats.clone())));
        let s67 = bind_loopback();
        let s4011 = bind_loopback();
        let server_addr = local(&s67);
        let pxe_addr = local(&s4011);
        let stop = CancellationToken::new();
        let t = stop.clone();
        // A real store: ACKs leave only after their lease is committed.
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = Store::open(&dir.path().join("state.db"))
            .expect("store")
            .into_writer();
        let w = writer.handle();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let a = dhcp::run(server.clone(), s67, Some(0), false, w.clone(), t.clone());
                let b = dhcp::run(server, s4011, Some(0), true, w, t);
                let _ = tokio::join!(a, b);
            });
        });
        Loop {
            server_addr,
            pxe_addr,
            client,
            stats,
            stop,
            thread: Some(thread),
            writer: Some(writer),
            _dir: dir,
        }
    }

    fn ask(&self, to: SocketAddrV4, msg: &[u8]) -> Option<Message> {
        self.client.send_to(msg, to).expect("send");
        let mut buf = [0u8; 1500];
        let n = self.client.recv(&mut buf).ok()?;
        Some(Message::decode(&mut Decoder::new(&buf[..n])).expect("reply decodes"))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(w) = self.writer.take() {
            w.close();
        }
    }
}

fn bind_loopback() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_nonblocking(true).expect("nonblocking");
    s
}

fn local(s: &UdpSocket) -> SocketAddrV4 {
    match s.local_addr().expect("addr") {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!("bound to IPv4"),
    }
}

/// A request as a relay at 127.0.0.1 forwards it, selecting the lab's subnet with
/// option 118: every reply then goes to 127.0.0.1, never to a broadcast address.
fn request(kind: MessageType, mac: [u8; 6], opts: Vec<DhcpOption>) -> Vec<u8> {
    let mut m = Message::new_with_id(
        0x1234_5678,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::LOCALHOST,
        &mac,
    );
    m.set_opcode(Opcode::BootRequest);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m.opts_mut()
        .insert(DhcpOption::SubnetSelection(Ipv4Addr::new(172, 28, 0, 0)));
    for o in opts {
        m.opts_mut().insert(o);
    }
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).expect("encode");
    buf
}

fn pxe_bios() -> Vec<DhcpOption> {
    vec![
        DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
        DhcpOption::ClientSystemArchitecture(0u16.into()),
    ]
}

#[test]
fn proxy_dhcp_gives_boot_options_and_never_an_address() {
    let lp = Loop::start(DhcpMode::Proxy);
    let mac = [0x52, 0x54, 0, 0x28, 0, 0x11];
    let offer = lp
        .ask(
            lp.server_addr,
            &request(MessageType::Discover, mac, pxe_bios()),
        )
        .expect("a proxy offer");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(offer.siaddr(), Ipv4Addr::new(172, 28, 0, 1));
    assert!(
        offer
            .fname()
            .is_some_and(|f| f.starts_with(b"undionly.kpxe")),
        "{offer}"
    );
    assert_eq!(
        offer.opts().get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert!(offer.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(offer.opts().get(OptionCode::VendorExtensions).is_some());

    // The PXE client then asks on port 4011 and is answered where it asked from.
    let ack = lp
        .ask(lp.pxe_addr, &request(MessageType::Request, mac, pxe_bios()))
        .expect("an answer on 4011");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);

    // A machine that is not network booting gets nothing from a proxy.
    let plain = request(MessageType::Discover, [2, 0, 0, 0, 0, 9], vec![]);
    assert!(lp.ask(lp.server_addr, &plain).is_none());
}

#[test]
fn malformed_packets_are_dropped_counted_and_the_server_keeps_answering() {
    let lp = Loop::start(DhcpMode::Authoritative);
    let good = request(
        MessageType::Discover,
        [0x52, 0x54, 0, 0x28, 0, 0x11],
        pxe_bios(),
    );
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![1; 10],
        good[..239].to_vec(),
        // Rapid commit (80) with a byte of data: a debug_assert in dhcproto.
        [&good[..240], &[53, 1, 1, 80, 1, 0, 255][..]].concat(),
        // Client FQDN (81) shorter than its fixed part: an underflow in dhcproto.
        [&good[..240], &[53, 1, 1, 81, 1, 0, 255][..]].concat(),
        // An option that runs past the end.
        [&good[..240], &[53, 1, 1, 60, 200, b'P'][..]].concat(),
    ];
    let mut wrong_magic = good.clone();
    wrong_magic[236] = 0;
    bad.push(wrong_magic);
    for b in &bad {
        lp.client.send_to(b, lp.server_addr).expect("send");
    }
    let offer = lp.ask(lp.server_addr, &good).expect("still answering");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(172, 28, 0, 11));
    assert_eq!(
        lp.stats
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed),
        bad.len() as u64
    );
}

#[test]
fn relay_agent_information_comes_back_unchanged() {
    let lp = Loop::start(DhcpMode::Authoritative);
    let mut pkt = request(
        MessageType::Discover,
        [0x52, 0x54, 0, 0x28, 0, 0x12],
        vec![],
    );
    let end = pkt.len() - 1;
    assert_eq!(pkt[end], 255);
    let info = [1u8, 4, b'p', b'o', b'r', b't', 2, 3, 0xaa, 0xbb, 0xcc];
    let mut tail = vec![82, info.len() as u8];
    tail.extend_from_slice(&info);
    tail.push(255);
    pkt.truncate(end);
    pkt.extend_from_slice(&tail);
    lp.client.send_to(&pkt, lp.server_addr).expect("send");
    let mut buf = [0u8; 1500];
    let n = lp
        .client
        .recv(&mut buf)
        .expect("an offer through the relay");
    let reply = &buf[..n];
    let at = reply[240..]
        .windows(2 + info.len())
        .position(|w| w[0] == 82 && w[1] as usize == info.len() && w[2..] == info)
        .is_some();
    assert!(at, "option 82 not echoed: {reply:?}");
    let m = Message::decode(&mut Decoder::new(reply)).expect("decodes");
    assert_eq!(m.giaddr(), Ipv4Addr::new(127, 0, 0, 1));
    assert!(
        (Ipv4Addr::new(172, 28, 0, 100)..=Ipv4Addr::new(172, 28, 0, 199)).contains(&m.yiaddr())
    );
}

fn with(kind: MessageType, mac: [u8; 6], ciaddr: Ipv4Addr, opts: Vec<DhcpOption>) -> Vec<u8> {
    let mut pkt = request(kind, mac, opts);
    pkt[12..16].copy_from_slice(&ciaddr.octets());
    pkt
}

#[test]
fn renewals_extend_and_addresses_that_are_not_the_clients_are_refused() {
    let lp = Loop::start(DhcpMode::Authoritative);
    let pc01 = [0x52, 0x54, 0, 0x28, 0, 0x11];
    let pc02 = [0x52, 0x54, 0, 0x28, 0, 0x12];
    let stranger = [2, 0, 0, 0, 0, 0x42];
    let reserved = Ipv4Addr::new(172, 28, 0, 11);
    let kind = |m: &Message| m.opts().msg_type();

    // RENEWING: a known host renews its reservation (ciaddr set, no option 50).
    let ack = lp
        .ask(
            lp.server_addr,
            &with(MessageType::Request, pc01, reserved, vec![]),
        )
        .expect("an answer");
    assert_eq!(
        (kind(&ack), ack.yiaddr()),
        (Some(MessageType::Ack), reserved)
    );
    assert_eq!(
        ack.opts().get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    // Someone else asking for that reservation: NAK.
    let nak = lp
        .ask(
            lp.server_addr,
            &request(
                MessageType::Request,
                stranger,
                vec![DhcpOption::RequestedIpAddress(reserved)],
            ),
        )
        .expect("an answer");
    assert_eq!(kind(&nak), Some(MessageType::Nak));
    // A host with a reservation asking for a pool address: NAK, so it rediscovers.
    let pool_ip = Ipv4Addr::new(172, 28, 0, 150);
    let nak = lp
        .ask(
            lp.server_addr,
            &request(
                MessageType::Request,
                pc01,
                vec![DhcpOption::RequestedIpAddress(pool_ip)],
            ),
        )
        .expect("an answer");
    assert_eq!(kind(&nak), Some(MessageType::Nak));
    // INIT-REBOOT for a free pool address: granted; then it is nobody else's.
    let ack = lp
        .ask(
            lp.server_addr,
            &request(
                MessageType::Request,
                pc02,
                vec![DhcpOption::RequestedIpAddress(pool_ip)],
            ),
        )
        .expect("an answer");
    assert_eq!(
        (kind(&ack), ack.yiaddr()),
        (Some(MessageType::Ack), pool_ip)
    );
    let nak = lp
        .ask(
            lp.server_addr,
            &with(MessageType::Request, stranger, pool_ip, vec![]),
        )
        .expect("an answer");
    assert_eq!(kind(&nak), Some(MessageType::Nak));
    // A request for another server's offer is left alone.
    let other_server = request(
        MessageType::Request,
        stranger,
        vec![
            DhcpOption::RequestedIpAddress(Ipv4Addr::new(172, 28, 0, 160)),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(172, 28, 0, 2)),
        ],
    );
    assert!(lp.ask(lp.server_addr, &other_server).is_none());
    // INFORM: configuration, no address, no lease time.
    let info = lp
        .ask(
            lp.server_addr,
            &with(
                MessageType::Inform,
                stranger,
                Ipv4Addr::new(172, 28, 0, 77),
                vec![],
            ),
        )
        .expect("an answer");
    assert_eq!(kind(&info), Some(MessageType::Ack));
    assert_eq!(info.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(info.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(info.opts().get(OptionCode::Router).is_some());
}

#[test]
fn a_declined_address_is_not_offered_again() {
    let lp = Loop::start(DhcpMode::Authoritative);
    let mac = [2, 0, 0, 0, 0, 0x51];
    let offer = lp
        .ask(lp.server_addr, &request(MessageType::Discover, mac, vec![]))
        .expect("offer");
    let first = offer.yiaddr();
    // The client finds the address in use (ARP answered) and declines it.
    lp.client
        .send_to(
            &request(
                MessageType::Decline,
                mac,
                vec![DhcpOption::RequestedIpAddress(first)],
            ),
            lp.server_addr,
        )
        .expect("send");
    let again = lp
        .ask(lp.server_addr, &request(MessageType::Discover, mac, vec![]))
        .expect("offer");
    assert_ne!(again.yiaddr(), first);
    let other = lp
        .ask(
            lp.server_addr,
            &request(MessageType::Discover, [2, 0, 0, 0, 0, 0x52], vec![]),
        )
        .expect("offer");
    assert_ne!(other.yiaddr(), first);
}

/// iPXE waits about 11 s for IPv6 unless a router advertisement says there is
/// nothing to configure: serve answers router solicitations on an authoritative
/// site's interface (`ipv6_ra`), with no router lifetime and no DHCPv6 flags.
#[test]
fn serve_answers_router_solicitations_with_nothing_to_configure() {
    if !tool("python3", "/usr/bin/python3") {
        return;
    }
    let Some(mut lab) = Lab::new() else { return };
    lab.host("srv", None, &["172.28.0.1/24"]);
    lab.host("c1", Some(PC01), &[]);
    let dir = workdir(&lab_fleet());
    let args = serve_args(dir.path());
    let server = lab.serve("srv", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = lab
        .cmd("c1", "python3")
        .args([
            "-c",
            "import socket, sys, time\n\
             idx = socket.if_nametoindex('eth0')\n\
             s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n\
             s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)\n\
             s.settimeout(0.5)\n\
             end = time.time() + 30\n\
             while time.time() < end:\n\
             \x20   try:\n\
             \x20       s.sendto(bytes([133, 0, 0, 0, 0, 0, 0, 0]), ('ff02::2', 0, 0, idx))\n\
             \x20       while True:\n\
             \x20           d, a = s.recvfrom(1500)\n\
             \x20           if d[0] == 134:\n\
             \x20               print(d[:16].hex())\n\
             \x20               sys.exit(0)\n\
             \x20   except (socket.timeout, OSError):\n\
             \x20       time.sleep(0.2)\n\
             sys.exit(1)\n",
        ])
        .output()
        .expect("python3");
    let ra = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "no router advertisement: {}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    // Type 134; hop limit, flags (M, O) and router lifetime all zero.
    assert!(ra.starts_with("86"), "{ra}");
    assert_eq!(&ra[8..16], "00000000", "flags or router lifetime set: {ra}");
}
