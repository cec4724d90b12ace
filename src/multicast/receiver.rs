//! The receiver side: join a session, write chunks as they complete (in any order),
//! ask for what is missing, and hand back which chunks are on the disk. The deploy
//! then fetches the rest over HTTP, reads everything back and verifies it, exactly
//! as a unicast deploy does.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use super::wire::{self, Msg, Phase, Status, Want};
use super::{McastError, io, random_id};
use crate::image::manifest::Manifest;
use crate::image::{Meter, Target, placements};
use crate::spec::Digest;

/// How often a receiver reports (and asks for repairs).
const TICK: Duration = Duration::from_millis(100);
/// A hole is asked for once this many later datagrams arrived (datagrams on one
/// LAN segment arrive in order, so the hole is a loss, not a straggler)...
const SETTLE: u32 = 64;
/// ...and asked for again after this long.
const RENACK: Duration = Duration::from_millis(300);
/// How long a turn waits for a datagram, and the most reads per socket in one turn.
const WAIT: Duration = Duration::from_millis(20);
const READS_PER_TURN: usize = 64;
/// Wants per report (in datagrams of [`wire::WANTS_PER_STATUS`]).
const MAX_WANTS: usize = 40 * wire::WANTS_PER_STATUS;

#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    pub group: SocketAddrV4,
    /// The interface to join on.
    pub interface: String,
    /// The version this deploy wants; a session sending another one is refused.
    pub digest: Digest,
    /// How long to wait for the session to be announced.
    pub rendezvous_timeout: Duration,
    /// Leave when the session is silent this long.
    pub idle_timeout: Duration,
    /// Memory for chunks still missing datagrams; past it, new chunks wait for a
    /// repair round.
    pub partial_bytes: usize,
}

impl ReceiveConfig {
    pub fn new(group: SocketAddrV4, interface: String, digest: Digest) -> ReceiveConfig {
        ReceiveConfig {
            group,
            interface,
            digest,
            rendezvous_timeout: Duration::from_secs(900),
            idle_timeout: Duration::from_secs(10),
            partial_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveReport {
    pub session: String,
    pub sender: String,
    /// `complete`, `session ended`, `session silent`, `no session`.
    pub ended: String,
    /// Distinct chunks of the version, those that came by multicast, and those the
    /// disk held already (a resumed deploy).
    pub chunks: usize,
    pub chunks_received: usize,
    pub chunks_already: usize,
    pub datagrams: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Chunks that arrived whole but did not match their hash (asked for again).
    pub bad_chunks: u64,
    pub seconds: f64,
}

struct Partial {
    buf: Vec<u8>,
    got: Vec<bool>,
    missing: u32,
    /// The highest sequence number seen in this chunk.
    seq: u32,
    asked: Option<Instant>,
}

/// Receive version `cfg.digest` (manifest `m`) from its session onto `target`.
/// `have` marks, by manifest index, chunks the target holds already; it comes back
/// with every chunk written and verified. What is still missing is the caller's to
/// fetch.
pub fn receive(
    cfg: &ReceiveConfig,
    m: &Manifest,
    target: &Target,
    have: &mut [bool],
    meter: Option<&Meter>,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<ReceiveReport, McastError> {
    let started = Instant::now();
    // Distinct chunks in first-appearance order: the sender's numbering.
    let mut index: HashMap<Digest, u32> = HashMap::new();
    let mut uniq: Vec<(Digest, u32, Vec<usize>)> = Vec::new();
    for (i, c) in m.chunks.iter().enumerate() {
        let u = *index.entry(c.hash).or_insert_with(|| {
            uniq.push((c.hash, c.len, Vec::new()));
            (uniq.len() - 1) as u32
        });
        uniq[u as usize].2.push(i);
    }
    let mut done: Vec<bool> = uniq
        .iter()
        .map(|u| u.2.iter().all(|&i| have.get(i).copied().unwrap_or(false)))
        .collect();
    let mut report = ReceiveReport {
        chunks: uniq.len(),
        chunks_already: done.iter().filter(|d| **d).count(),
        ..Default::default()
    };
    let mut remaining = done.iter().filter(|d| !**d).count();
    let (data, ctrl) = open(cfg)?;
    let places = placements(m);
    let me = random_id();

    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<(u32, Vec<u8>)>(16);
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let (results_tx, results_rx) = mpsc::channel::<(u32, bool)>();
    let uniq_ref = &uniq;
    let places_ref = &places;
    let ended = std::thread::scope(|s| -> Result<&'static str, McastError> {
        for _ in 0..2 {
            let jobs = Arc::clone(&jobs_rx);
            let results = results_tx.clone();
            s.spawn(move || {
                loop {
                    let job = jobs.lock().map(|j| j.recv());
                    let Ok(Ok((u, raw))) = job else { break };
                    let (hash, len, at) = &uniq_ref[u as usize];
                    let ok = crate::image::store::decompress(&raw, *len as usize)
                        .ok()
                        .filter(|d| blake3::hash(d).as_bytes() == &hash.0)
                        .is_some_and(|d| {
                            at.iter().all(|&i| target.place(&places_ref[i], &d).is_ok())
                        });
                    if ok && let Some(mt) = meter {
                        mt.done.fetch_add(
                            u64::from(*len) * at.len() as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    if results.send((u, ok)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(results_tx);
        let mut rx = Rx {
            cfg,
            me,
            data: &data,
            ctrl: &ctrl,
            session: None,
            payload: 0,
            partial: HashMap::new(),
            partial_bytes: 0,
            writing: Default::default(),
            highest: None,
            answered_round: 0,
            last_datagram: Instant::now(),
            report: &mut report,
        };
        let r = rx.run(
            &mut done,
            &mut remaining,
            &uniq,
            &jobs_tx,
            &results_rx,
            stop,
        );
        drop(jobs_tx);
        // Let the writers finish what they hold.
        for (u, ok) in results_rx.iter() {
            rx.finished(u, ok, &mut done, &mut remaining);
        }
        r
    })?;
    for (u, d) in done.iter().enumerate() {
        if *d {
            for &i in &uniq[u].2 {
                if let Some(h) = have.get_mut(i) {
                    *h = true;
                }
            }
        }
    }
    report.ended = ended.to_string();
    report.seconds = started.elapsed().as_secs_f64();
    info!(
        ended,
        received = report.chunks_received,
        missing = remaining,
        lost = report.lost,
        "multicast receive over"
    );
    Ok(report)
}

fn open(cfg: &ReceiveConfig) -> Result<(UdpSocket, UdpSocket), McastError> {
    let what = || format!("joining {} on {}", cfg.group, cfg.interface);
    let ifindex = super::if_index(&cfg.interface).ok_or_else(|| McastError::Io {
        what: what(),
        source: std::io::Error::new(ErrorKind::NotFound, "no such network interface"),
    })?;
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io(what()))?;
    s.set_reuse_address(true).map_err(io(what()))?;
    s.set_reuse_port(true).map_err(io(what()))?;
    // Bound to the group, and only the groups this socket joined: two sessions on
    // one port never see each other's datagrams.
    s.bind(&SocketAddrV4::new(*cfg.group.ip(), cfg.group.port()).into())
        .map_err(io(what()))?;
    s.set_multicast_all_v4(false).map_err(io(what()))?;
    s.join_multicast_v4_n(cfg.group.ip(), &InterfaceIndexOrAddress::Index(ifindex))
        .map_err(io(what()))?;
    set_rcvbuf(&s, 64 << 20);
    // Datagrams a sender batched stay together up to this socket: one read, not 44.
    super::set_int_option(&s, libc::SOL_UDP, libc::UDP_GRO, 1);
    s.set_nonblocking(true).map_err(io(what()))?;
    // The control socket: reports go out by it, and repairs meant for this receiver
    // alone come in by it, as batched as the group's data.
    let c = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io(what()))?;
    c.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into())
        .map_err(io(what()))?;
    set_rcvbuf(&c, 16 << 20);
    super::set_int_option(&c, libc::SOL_UDP, libc::UDP_GRO, 1);
    c.set_nonblocking(true).map_err(io(what()))?;
    Ok((s.into(), c.into()))
}

/// Wait up to `timeout` for either socket to have a datagram; which ones have.
fn readable(a: &UdpSocket, b: &UdpSocket, timeout: Duration) -> (bool, bool) {
    use std::os::fd::AsRawFd;
    let mut fds = [a.as_raw_fd(), b.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `fds` is a live array of two pollfd, its length passed with it.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as libc::c_int) };
    if n <= 0 {
        // Nothing came (or a signal): a read would say so anyway.
        return (n < 0, n < 0);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

/// A receive buffer large enough to ride out the writer falling behind for a moment;
/// root may exceed `net.core.rmem_max`.
fn set_rcvbuf(s: &Socket, bytes: usize) {
    if !super::set_int_option(s, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes as i32) {
        let _ = s.set_recv_buffer_size(bytes);
    }
}

/// One read from `sock`: bytes, the segment size when the kernel delivered several
/// datagrams at once (0 for one), and the sender.
fn recv_segments(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, usize, SocketAddr)> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain C structs, zero-initialised as recvmsg(2) expects.
    let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in msg points at a live buffer of the stated size.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut segment = 0usize;
    // SAFETY: the kernel filled msg_control; the CMSG macros walk it within its length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let mut v: libc::c_int = 0;
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(c),
                    (&mut v as *mut libc::c_int).cast::<u8>(),
                    std::mem::size_of::<libc::c_int>(),
                );
                segment = usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
        u16::from_be(name.sin_port),
    );
    Ok((n as usize, segment, SocketAddr::V4(from)))
}

struct Rx<'a> {
    cfg: &'a ReceiveConfig,
    me: u64,
    data: &'a UdpSocket,
    ctrl: &'a UdpSocket,
    /// Session id and the sender's control address, once announced.
    session: Option<(u64, SocketAddr)>,
    payload: usize,
    partial: HashMap<u32, Partial>,
    partial_bytes: usize,
    /// Chunks complete and with the writers, not yet on the disk.
    writing: std::collections::HashSet<u32>,
    highest: Option<u32>,
    answered_round: u32,
    last_datagram: Instant,
    report: &'a mut ReceiveReport,
}

impl Rx<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        done: &mut [bool],
        remaining: &mut usize,
        uniq: &[(Digest, u32, Vec<usize>)],
        jobs: &mpsc::SyncSender<(u32, Vec<u8>)>,
        results: &mpsc::Receiver<(u32, bool)>,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<&'static str, McastError> {
        let opened = Instant::now();
        let mut tick = Instant::now();
        let mut buf = vec![0u8; 65_536];
        let mut repairing = false;
        while *remaining > 0 {
            if stop() {
                return Ok("stopped");
            }
            while let Ok((u, ok)) = results.try_recv() {
                self.finished(u, ok, done, remaining);
            }
            if *remaining == 0 {
                break;
            }
            // The group's datagrams and those sent to this receiver alone, whichever
            // came; a bounded number of reads each, so reports keep their pace.
            let ready = readable(self.data, self.ctrl, WAIT);
            for (sock, via_ctrl, is_ready) in
                [(self.data, false, ready.0), (self.ctrl, true, ready.1)]
            {
                if !is_ready {
                    continue;
                }
                for _ in 0..READS_PER_TURN {
                    let (n, segment, from) = match recv_segments(sock, &mut buf) {
                        Ok(x) => x,
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock | ErrorKind::ConnectionRefused
                            ) =>
                        {
                            break;
                        }
                        Err(e) => return Err(io("receiving datagrams")(e)),
                    };
                    // Datagrams the kernel kept together (UDP GRO) come in one read,
                    // each `segment` bytes but the last.
                    let step = if segment > 0 { segment } else { n.max(1) };
                    for one in buf[..n].chunks(step) {
                        match wire::decode(one) {
                            Ok((session, msg)) => {
                                if let Some(end) = self.datagram(
                                    session,
                                    msg,
                                    from,
                                    via_ctrl,
                                    done,
                                    uniq,
                                    jobs,
                                    &mut repairing,
                                )? {
                                    return Ok(end);
                                }
                            }
                            Err(why) => debug!(%from, why, "dropped a datagram"),
                        }
                    }
                }
            }
            if tick.elapsed() >= TICK {
                tick = Instant::now();
                if let Some((_, sender)) = self.session {
                    // Until data flows, the join may have been lost: repeat it.
                    if self.report.datagrams == 0 {
                        self.send_to(
                            sender,
                            &Msg::Join {
                                receiver: self.me,
                                digest: self.cfg.digest,
                            },
                        )?;
                    }
                    let wants = self.wants(done, repairing);
                    self.status(sender, wants, false)?;
                    if self.last_datagram.elapsed() >= self.cfg.idle_timeout {
                        return Ok("session silent");
                    }
                } else if opened.elapsed() >= self.cfg.rendezvous_timeout {
                    return Ok("no session");
                }
            }
        }
        if let Some((_, sender)) = self.session {
            for _ in 0..3 {
                self.status(sender, Vec::new(), true)?;
            }
        }
        Ok("complete")
    }

    #[allow(clippy::too_many_arguments)]
    fn datagram(
        &mut self,
        session: u64,
        msg: Msg,
        from: SocketAddr,
        via_ctrl: bool,
        done: &[bool],
        uniq: &[(Digest, u32, Vec<usize>)],
        jobs: &mpsc::SyncSender<(u32, Vec<u8>)>,
        repairing: &mut bool,
    ) -> Result<Option<&'static str>, McastError> {
        let ours = self.session.is_some_and(|s| s.0 == session);
        match msg {
            Msg::Announce(a) => {
                if a.digest != self.cfg.digest {
                    return Err(McastError::WrongSession {
                        group: self.cfg.group.to_string(),
                        announced: a.digest.to_string(),
                        wanted: self.cfg.digest.to_string(),
                    });
                }
                if a.chunks as usize != uniq.len() {
                    warn!(%from, "the session's chunk count differs from the manifest: ignored");
                    return Ok(None);
                }
                if !ours {
                    info!(%from, session = format!("{session:016x}"), "multicast session found");
                    self.session = Some((session, from));
                    self.report.session = format!("{session:016x}");
                    self.report.sender = from.to_string();
                    self.payload = usize::from(a.payload);
                    self.send_to(
                        from,
                        &Msg::Join {
                            receiver: self.me,
                            digest: self.cfg.digest,
                        },
                    )?;
                }
                self.last_datagram = Instant::now();
                if a.phase == Phase::Repairing {
                    *repairing = true;
                    if a.round > self.answered_round {
                        // A new round: ask for everything still missing, now.
                        self.answered_round = a.round;
                        let wants = self.wants(done, true);
                        self.status(from, wants, false)?;
                    }
                }
            }
            Msg::End if ours => return Ok(Some("session ended")),
            Msg::Refuse { receiver } if receiver == self.me => return Err(McastError::Refused),
            Msg::Data(d) if ours => {
                if d.prefix != self.cfg.digest.0[..8] {
                    return Ok(None);
                }
                self.last_datagram = Instant::now();
                self.report.datagrams += 1;
                // Losses are counted on the group's sequence; a repair sent to this
                // receiver alone is not part of it and may overtake the group's queue.
                let seq = if via_ctrl {
                    self.highest.unwrap_or(0)
                } else {
                    match self.highest {
                        Some(h) if d.seq > h => {
                            self.report.lost += u64::from(d.seq - h - 1);
                            self.highest = Some(d.seq);
                        }
                        None => self.highest = Some(d.seq),
                        _ => {}
                    }
                    d.seq
                };
                let u = d.chunk as usize;
                if u >= uniq.len() || done[u] || self.writing.contains(&d.chunk) {
                    self.report.duplicates += 1;
                    return Ok(None);
                }
                let payload = self.payload;
                let clen = d.clen as usize;
                let start = d.part as usize * payload;
                let expect_parts = clen.div_ceil(payload.max(1));
                // Compressed chunks never need more than their length plus a margin.
                let bound = uniq[u].1 as usize + uniq[u].1 as usize / 64 + 4096;
                if payload == 0
                    || clen > bound
                    || expect_parts != d.parts as usize
                    || start + d.bytes.len() > clen
                    || (d.part + 1 < d.parts && d.bytes.len() != payload)
                    || (d.part + 1 == d.parts && start + d.bytes.len() != clen)
                {
                    debug!(%from, chunk = d.chunk, "datagram does not fit its chunk: dropped");
                    return Ok(None);
                }
                if !self.partial.contains_key(&d.chunk) {
                    if self.partial_bytes + clen > self.cfg.partial_bytes {
                        return Ok(None);
                    }
                    self.partial_bytes += clen;
                    self.partial.insert(
                        d.chunk,
                        Partial {
                            buf: vec![0; clen],
                            got: vec![false; d.parts as usize],
                            missing: d.parts,
                            seq,
                            asked: None,
                        },
                    );
                }
                let Some(p) = self.partial.get_mut(&d.chunk) else {
                    return Ok(None);
                };
                if p.buf.len() != clen || p.got[d.part as usize] {
                    self.report.duplicates += 1;
                    return Ok(None);
                }
                p.buf[start..start + d.bytes.len()].copy_from_slice(d.bytes);
                p.got[d.part as usize] = true;
                p.missing -= 1;
                p.seq = p.seq.max(seq);
                if p.missing == 0
                    && let Some(p) = self.partial.remove(&d.chunk)
                {
                    self.partial_bytes -= p.buf.len();
                    self.writing.insert(d.chunk);
                    if jobs.send((d.chunk, p.buf)).is_err() {
                        return Err(McastError::Io {
                            what: "writing received chunks".into(),
                            source: std::io::Error::other("the writer threads stopped"),
                        });
                    }
                }
            }
            // Another session's, or meant for the sender.
            _ => {}
        }
        Ok(None)
    }

    /// A chunk's writer is done with it: on the disk and verified, or bad.
    fn finished(&mut self, u: u32, ok: bool, done: &mut [bool], remaining: &mut usize) {
        self.writing.remove(&u);
        if ok {
            if !done[u as usize] {
                done[u as usize] = true;
                *remaining -= 1;
                self.report.chunks_received += 1;
            }
        } else {
            self.report.bad_chunks += 1;
            warn!(
                chunk = u,
                "a received chunk did not match its hash: asking again"
            );
        }
    }

    /// What to ask for: holes in chunks that stopped arriving, and once the pass is
    /// over, every chunk not seen at all.
    fn wants(&mut self, done: &[bool], whole: bool) -> Vec<Want> {
        let now = Instant::now();
        let highest = self.highest.unwrap_or(0);
        let mut out = Vec::new();
        let mut keys: Vec<u32> = self.partial.keys().copied().collect();
        keys.sort_unstable();
        for k in keys {
            let Some(p) = self.partial.get_mut(&k) else {
                continue;
            };
            let settled = highest.saturating_sub(p.seq) >= SETTLE;
            let due = p.asked.is_none_or(|t| now - t >= RENACK);
            if !(whole || (settled && due)) {
                continue;
            }
            p.asked = Some(now);
            let mut i = 0;
            while i < p.got.len() {
                if p.got[i] {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < p.got.len() && !p.got[i] {
                    i += 1;
                }
                out.push(Want {
                    chunk: k,
                    first: first as u32,
                    count: (i - first) as u32,
                });
            }
            if out.len() >= MAX_WANTS {
                return out;
            }
        }
        if whole {
            for (u, d) in done.iter().enumerate() {
                let u = u as u32;
                if !*d && !self.partial.contains_key(&u) && !self.writing.contains(&u) {
                    // Runs of whole chunks, one want each.
                    out.push(Want {
                        chunk: u,
                        first: 0,
                        count: u32::MAX,
                    });
                    if out.len() >= MAX_WANTS {
                        break;
                    }
                }
            }
        }
        out
    }

    fn status(
        &mut self,
        to: SocketAddr,
        wants: Vec<Want>,
        complete: bool,
    ) -> Result<(), McastError> {
        let mut batches: Vec<Vec<Want>> = wants
            .chunks(wire::WANTS_PER_STATUS)
            .map(<[Want]>::to_vec)
            .collect();
        if batches.is_empty() {
            batches.push(Vec::new());
        }
        for wants in batches {
            self.send_to(
                to,
                &Msg::Status(Status {
                    receiver: self.me,
                    received: self.report.datagrams,
                    lost: self.report.lost,
                    complete,
                    wants,
                }),
            )?;
        }
        Ok(())
    }

    fn send_to(&self, to: SocketAddr, msg: &Msg) -> Result<(), McastError> {
        let session = self.session.map_or(0, |s| s.0);
        let mut buf = Vec::new();
        wire::encode(&mut buf, session, msg);
        match self.ctrl.send_to(&buf, to) {
            Ok(_) => Ok(()),
            // A full buffer drops a report; the next tick sends another.
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(io(format!("reporting to the sender {to}"))(e)),
        }
    }
}
