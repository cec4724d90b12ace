//! A boot storm: N simulated PXE clients start at once, and each does what BIOS
//! firmware and then iPXE do: DHCP (DISCOVER, OFFER, REQUEST, ACK) as a BIOS PXE
//! client, a TFTP read of the boot file its offer names (blksize 1432, as PXE ROMs ask),
//! then an HTTP GET of its per-host script `/boot/MAC.ipxe`.
//!
//! Run it inside a network namespace whose `eth0` is on the server's segment and has
//! an address of its own (the simulated clients share it for TFTP and HTTP):
//!
//! ```sh
//! ip netns exec CLIENT target/release/examples/bootstorm --clients 500 --server 172.28.0.1
//! ```
//!
//! It prints the wall time for all clients and the spread of per-client times.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 500)]
    clients: u32,
    #[arg(long, default_value = "eth0")]
    interface: String,
    /// The boot server (HTTP; TFTP and DHCP come from what DHCP says).
    #[arg(long)]
    server: Ipv4Addr,
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    #[arg(long, default_value_t = 69)]
    tftp_port: u16,
    /// Distinguishes the MACs of separate runs.
    #[arg(long, default_value_t = 1)]
    run: u8,
}

type Inbox = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Message>>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let socket = Arc::new(dhcp_socket(&args.interface)?);
    let inbox: Inbox = Arc::default();
    tokio::spawn(dispatch(socket.clone(), inbox.clone()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let (socket, inbox) = (socket.clone(), inbox.clone());
        let (server, http_port, tftp_port, run) =
            (args.server, args.http_port, args.tftp_port, args.run);
        tasks.spawn(async move {
            let t0 = Instant::now();
            let r = client(i, run, &socket, &inbox, server, http_port, tftp_port).await;
            (r, t0.elapsed())
        });
    }
    let mut times = Vec::new();
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((Ok(phases), t)) => times.push((t, phases)),
            Ok((Err(e), _)) => failures.push(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let wall = started.elapsed();
    times.sort_by_key(|(t, _)| *t);
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
            .map(|(t, _)| t.as_secs_f64())
            .unwrap_or(0.0)
    };
    let mean = |k: usize| {
        times.iter().map(|(_, ph)| ph[k].as_secs_f64()).sum::<f64>() / times.len().max(1) as f64
    };
    println!(
        "clients {} ok {} failed {} wall {:.2} s; per client p50 {:.2} s p99 {:.2} s max {:.2} s; mean dhcp {:.3} s tftp {:.3} s http {:.3} s",
        args.clients,
        times.len(),
        failures.len(),
        wall.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        mean(0),
        mean(1),
        mean(2),
    );
    for f in failures.iter().take(5) {
        println!("  failure: {f}");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

/// Port 68 on the interface, able to send and receive broadcasts without a route.
fn dhcp_socket(interface: &str) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(interface.as_bytes()))?;
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)).into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// Hand each reply to the client whose transaction it answers.
async fn dispatch(socket: Arc<UdpSocket>, inbox: Inbox) {
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, _)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
            continue;
        };
        if m.opcode() != Opcode::BootReply {
            continue;
        }
        let tx = inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&m.xid())
            .cloned();
        if let Some(tx) = tx {
            let _ = tx.send(m);
        }
    }
}

fn packet(kind: MessageType, xid: u32, mac: [u8; 6], extra: Vec<DhcpOption>) -> Vec<u8> {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.set_opcode(Opcode::BootRequest)
        .set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    o.insert(DhcpOption::ClientSystemArchitecture(0u16.into()));
    for x in extra {
        o.insert(x);
    }
    let mut buf = Vec::new();
    let _ = m.encode(&mut Encoder::new(&mut buf));
    buf
}

/// Send until a reply of `want` arrives: 4 tries, 1 s apart (PXE firmware waits longer).
async fn exchange(
    socket: &UdpSocket,
    rx: &mut mpsc::UnboundedReceiver<Message>,
    pkt: &[u8],
    want: MessageType,
) -> Result<Message, String> {
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    for _ in 0..4 {
        socket
            .send_to(pkt, to)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if m.opts().msg_type() == Some(want) {
                return Ok(m);
            }
        }
    }
    Err(format!("no {want:?}"))
}

async fn client(
    i: u32,
    run: u8,
    socket: &UdpSocket,
    inbox: &Inbox,
    server: Ipv4Addr,
    http_port: u16,
    tftp_port: u16,
) -> Result<[Duration; 3], String> {
    let mac = [0x02, 0xfb, run, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    let mac_text = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let xid = 0x5100_0000 ^ (u32::from(run) << 20) ^ i;
    let (tx, mut rx) = mpsc::unbounded_channel();
    inbox
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(xid, tx);
    let t0 = Instant::now();
    let offer = exchange(
        socket,
        &mut rx,
        &packet(MessageType::Discover, xid, mac, vec![]),
        MessageType::Offer,
    )
    .await?;
    let server_id = match offer.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
        _ => return Err("offer without a server identifier".into()),
    };
    let ack = exchange(
        socket,
        &mut rx,
        &packet(
            MessageType::Request,
            xid,
            mac,
            vec![
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
                DhcpOption::ServerIdentifier(server_id),
            ],
        ),
        MessageType::Ack,
    )
    .await?;
    inbox.lock().unwrap_or_else(|p| p.into_inner()).remove(&xid);
    let dhcp = t0.elapsed();

    let file = ack
        .fname()
        .or(offer.fname())
        .map(|f| {
            String::from_utf8_lossy(f)
                .trim_end_matches('\0')
                .to_string()
        })
        .filter(|f| !f.is_empty())
        .ok_or("no boot file in the offer")?;
    let next = if ack.siaddr().is_unspecified() {
        offer.siaddr()
    } else {
        ack.siaddr()
    };
    let t1 = Instant::now();
    let got = tftp_get(SocketAddrV4::new(next, tftp_port), &file).await?;
    if got == 0 {
        return Err(format!("TFTP {file}: empty"));
    }
    let tftp = t1.elapsed();

    let t2 = Instant::now();
    let script = http_get(
        SocketAddrV4::new(server, http_port),
        &format!("/boot/{mac_text}.ipxe"),
    )
    .await?;
    if !script.starts_with("#!ipxe") {
        return Err(format!("script for {mac_text} is not an iPXE script"));
    }
    Ok([dhcp, tftp, t2.elapsed()])
}

/// RFC 1350 read with blksize 1432 and tsize; the byte count.
async fn tftp_get(server: SocketAddrV4, file: &str) -> Result<u64, String> {
    let sock = UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| e.to_string())?;
    let mut rrq = vec![0, 1];
    for part in [file, "octet", "blksize", "1432", "tsize", "0"] {
        rrq.extend_from_slice(part.as_bytes());
        rrq.push(0);
    }
    let mut buf = vec![0u8; 1500];
    let mut peer: Option<SocketAddr> = None;
    let mut last: Vec<u8> = rrq.clone();
    let mut expect: u16 = 1;
    let mut total = 0u64;
    let mut blksize = 512usize;
    let mut tries = 0;
    sock.send_to(&rrq, server)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let r = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await;
        let (n, from) = match r {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                tries += 1;
                if tries > 5 {
                    return Err(format!("TFTP {file}: timed out"));
                }
                let to = peer.unwrap_or(SocketAddr::V4(server));
                sock.send_to(&last, to).await.map_err(|e| e.to_string())?;
                continue;
            }
        };
        let pkt = &buf[..n];
        peer.get_or_insert(from);
        match pkt.get(1) {
            Some(6) => {
                // OACK: take the block size, ack block 0.
                let fields: Vec<&[u8]> = pkt[2..].split(|&b| b == 0).collect();
                for kv in fields.chunks(2) {
                    if let [k, v] = kv
                        && k.eq_ignore_ascii_case(b"blksize")
                    {
                        blksize = std::str::from_utf8(v)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(512);
                    }
                }
                last = vec![0, 4, 0, 0];
            }
            Some(3) if n >= 4 => {
                let block = u16::from_be_bytes([pkt[2], pkt[3]]);
                if block == expect {
                    total += (n - 4) as u64;
                    expect = expect.wrapping_add(1);
                }
                last = vec![0, 4, pkt[2], pkt[3]];
                if block.wrapping_add(1) == expect && n - 4 < blksize {
                    sock.send_to(&last, from).await.map_err(|e| e.to_string())?;
                    return Ok(total);
                }
            }
            Some(5) => {
                return Err(format!(
                    "TFTP {file}: error {}",
                    String::from_utf8_lossy(&pkt[4..])
                ));
            }
            _ => continue,
        }
        tries = 0;
        sock.send_to(&last, from).await.map_err(|e| e.to_string())?;
    }
}

async fn http_get(server: SocketAddrV4, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(server)
        .await
        .map_err(|e| format!("HTTP connect: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("HTTP: no header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "HTTP {path}: {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    Ok(body.to_string())
}
