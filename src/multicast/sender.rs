//! The sender side of a multicast session: one thread, one UDP socket (data and
//! announcements to the group, control from receivers by unicast). It returns when
//! the session is over, and dropping it frees everything.
//!
//! A repair only one receiver asked for goes to that receiver alone, by unicast: a
//! machine on a bad port or a late joiner does not load every other machine's link
//! and CPU with what it missed. What several asked for goes to the group.

use std::collections::{BTreeMap, HashMap};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use super::wire::{self, Announce, Data, Msg, Phase};
use super::{McastError, io, random_id};
use crate::image::store::Store;
use crate::spec::Digest;

/// Ethernet, IPv4 and UDP headers: what a datagram costs on the wire beyond its payload.
const FRAME_OVERHEAD: usize = 14 + wire::IP_UDP;
/// Receivers not heard from for this long have left.
const GONE: Duration = Duration::from_secs(5);
/// How often the sender announces the session and adjusts its rate.
const TICK: Duration = Duration::from_millis(100);
/// During the pass, repairs take at most this share (in percent) of the datagrams sent:
/// a receiver losing more than that cannot slow the others by more; the rest of its
/// repairs follow the pass.
const PASS_REPAIR_PERCENT: u64 = 10;
/// After announcing a repair round, how long receivers have to ask.
const ROUND_WAIT: Duration = Duration::from_millis(250);
/// Rate when `max_rate` is unlimited: a start, then found by loss reports.
const START_RATE: f64 = 400e6 / 8.0;
const FLOOR_RATE: f64 = 8e6 / 8.0;
const UNLIMITED: f64 = 40e9 / 8.0;

#[derive(Debug, Clone)]
pub struct SendConfig {
    pub group: SocketAddrV4,
    /// This server's address on the site's network: multicast leaves by its interface.
    pub bind: Ipv4Addr,
    pub min_receivers: u32,
    pub max_wait: Duration,
    /// Bits per second on the wire, headers included; 0: no limit but the one loss
    /// reports find.
    pub max_rate_bps: u64,
    /// The path MTU; datagrams are sized to it.
    pub mtu: usize,
    pub ttl: u32,
    /// Deliver the session to receivers on this machine too.
    pub loopback: bool,
    /// Hand the kernel up to this many datagrams at once (UDP segmentation offload);
    /// 1 sends them one by one.
    pub batch: usize,
    /// End the session if nobody joins within this time.
    pub join_timeout: Duration,
    /// End repairing after this long past the pass; receivers then use HTTP.
    pub repair_timeout: Duration,
}

impl SendConfig {
    pub fn new(group: SocketAddrV4, bind: Ipv4Addr) -> SendConfig {
        SendConfig {
            group,
            bind,
            min_receivers: 1,
            max_wait: Duration::from_secs(600),
            max_rate_bps: 900_000_000,
            mtu: super::mtu_of(bind),
            ttl: 1,
            loopback: false,
            batch: 64,
            join_timeout: Duration::from_secs(3600),
            repair_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    pub session: String,
    pub digest: Digest,
    pub group: String,
    /// `complete` (every receiver that stayed finished), `timeout`, `shutdown`,
    /// `no receivers`.
    pub ended: String,
    pub receivers_joined: usize,
    pub receivers_complete: usize,
    /// Receivers whose loss did not follow the rate: excluded from rate decisions.
    pub receivers_lossy: usize,
    pub chunks: usize,
    pub payload_bytes: usize,
    pub waited_secs: f64,
    /// From the first data datagram to the end of the pass.
    pub pass_secs: f64,
    /// From the first data datagram to the end of the session.
    pub send_secs: f64,
    pub datagrams: u64,
    pub repair_datagrams: u64,
    /// Repairs sent to the one receiver that asked (included in `repair_datagrams`).
    pub repairs_unicast: u64,
    /// Datagrams and repairs sent before the pass was over.
    pub pass_datagrams: u64,
    pub pass_repairs: u64,
    /// Bytes put on the wire (Ethernet frames), and the data they carried.
    pub wire_bytes: u64,
    pub data_bytes: u64,
    pub rounds: u32,
    pub final_rate_bps: u64,
}

struct Receiver {
    addr: SocketAddr,
    heard: Instant,
    received: u64,
    lost: u64,
    /// Counts at the last rate decision.
    seen: (u64, u64),
    complete: bool,
    lossy: bool,
    /// Rate decisions at which this receiver lost packets while the rate was low.
    strikes: u32,
}

struct Tx<'a> {
    sock: UdpSocket,
    cfg: &'a SendConfig,
    store: &'a Store,
    session: u64,
    digest: Digest,
    prefix: [u8; 8],
    payload: usize,
    chunks: Vec<Digest>,
    /// Compressed lengths, known once a chunk was read.
    clens: Vec<u32>,
    cache: Vec<(u32, Vec<u8>)>,
    seq: u32,
    buf: Vec<u8>,
    /// Datagrams waiting to go out in one send (all `segment` bytes but the last), and
    /// where to.
    batch: Vec<u8>,
    batch_to: SocketAddr,
    batched: usize,
    batch_frames: usize,
    /// The segment size the kernel cuts batches into; `None`: one datagram per send.
    segment: Option<usize>,
    max_batch: usize,
    /// Bytes per second.
    rate: f64,
    max_rate: f64,
    peak_rate: f64,
    tokens: f64,
    refilled: Instant,
    receivers: HashMap<u64, Receiver>,
    /// Parts to send again: to the one receiver that asked, or (`None`) to the group.
    repairs: BTreeMap<(u32, u32), Option<SocketAddr>>,
    phase: Phase,
    round: u32,
    report: SessionReport,
}

/// Ask the scheduler to favour this thread: pacing is lost time when the thread waits
/// behind busy ones (HTTP deploys, other sessions). Needs root or CAP_SYS_NICE; without
/// them the session runs at normal priority.
fn raise_priority() {
    // SAFETY: gettid and setpriority take and return plain integers.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -10)
    };
    if r != 0 {
        debug!(
            "multicast sender stays at normal priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Run one session of version `digest` from `store` until it is over (every receiver
/// done, timeout) or `stop` says so (server shutdown).
pub fn send(
    store: &Store,
    digest: &Digest,
    cfg: &SendConfig,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<SessionReport, McastError> {
    let m = store.manifest(digest)?;
    let mut seen = std::collections::HashSet::new();
    let chunks: Vec<Digest> = m
        .chunks
        .iter()
        .filter(|c| seen.insert(c.hash))
        .map(|c| c.hash)
        .collect();
    let sock = open(cfg)?;
    let payload = cfg
        .mtu
        .saturating_sub(wire::IP_UDP + wire::DATA_HEADER)
        .clamp(256, 65_000);
    let max_rate = match cfg.max_rate_bps {
        0 => UNLIMITED,
        b => b as f64 / 8.0,
    };
    let session = random_id();
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest.0[..8]);
    let mut tx = Tx {
        sock,
        cfg,
        store,
        session,
        digest: *digest,
        prefix,
        payload,
        clens: vec![0; chunks.len()],
        report: SessionReport {
            session: format!("{session:016x}"),
            digest: *digest,
            group: cfg.group.to_string(),
            ended: String::new(),
            receivers_joined: 0,
            receivers_complete: 0,
            receivers_lossy: 0,
            chunks: chunks.len(),
            payload_bytes: payload,
            waited_secs: 0.0,
            pass_secs: 0.0,
            send_secs: 0.0,
            datagrams: 0,
            repair_datagrams: 0,
            repairs_unicast: 0,
            pass_datagrams: 0,
            pass_repairs: 0,
            wire_bytes: 0,
            data_bytes: 0,
            rounds: 0,
            final_rate_bps: 0,
        },
        chunks,
        cache: Vec::new(),
        seq: 0,
        buf: Vec::with_capacity(cfg.mtu),
        batch: Vec::with_capacity(65_536),
        batch_to: cfg.group.into(),
        batched: 0,
        batch_frames: 0,
        segment: None,
        max_batch: 1,
        // A configured rate is the LAN's: start there and back off only on loss.
        rate: if cfg.max_rate_bps > 0 {
            max_rate
        } else {
            START_RATE
        },
        max_rate,
        peak_rate: 0.0,
        tokens: 0.0,
        refilled: Instant::now(),
        receivers: HashMap::new(),
        repairs: BTreeMap::new(),
        phase: Phase::Waiting,
        round: 0,
    };
    let segment = payload + wire::DATA_HEADER;
    let max_batch = cfg.batch.min(64).min(65_000 / segment);
    if max_batch > 1
        && super::set_int_option(&tx.sock, libc::SOL_UDP, libc::UDP_SEGMENT, segment as i32)
    {
        tx.segment = Some(segment);
        tx.max_batch = max_batch;
    }
    info!(session = %tx.report.session, %digest, group = %cfg.group, chunks = tx.chunks.len(), "multicast session open");
    raise_priority();
    let ended = tx.run(stop)?;
    tx.finish(ended);
    info!(
        session = %tx.report.session,
        ended = %tx.report.ended,
        complete = tx.report.receivers_complete,
        joined = tx.report.receivers_joined,
        repairs = tx.report.repair_datagrams,
        repairs_unicast = tx.report.repairs_unicast,
        secs = tx.report.send_secs,
        "multicast session over"
    );
    Ok(tx.report)
}

fn open(cfg: &SendConfig) -> Result<UdpSocket, McastError> {
    let what = || format!("multicast socket on {} for {}", cfg.bind, cfg.group);
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io(what()))?;
    s.bind(&SocketAddrV4::new(cfg.bind, 0).into())
        .map_err(io(what()))?;
    s.set_multicast_if_v4(&cfg.bind).map_err(io(what()))?;
    s.set_multicast_ttl_v4(cfg.ttl).map_err(io(what()))?;
    // Receivers on this machine (tests on one host) need the loop; otherwise it
    // costs a copy of every datagram.
    s.set_multicast_loop_v4(cfg.loopback).map_err(io(what()))?;
    let _ = s.set_send_buffer_size(4 << 20);
    let _ = s.set_recv_buffer_size(4 << 20);
    s.set_nonblocking(true).map_err(io(what()))?;
    Ok(s.into())
}

impl Tx<'_> {
    fn run(&mut self, stop: &(dyn Fn() -> bool + Sync)) -> Result<&'static str, McastError> {
        let opened = Instant::now();
        let mut tick = Instant::now();
        // Rendezvous.
        loop {
            if stop() {
                return Ok("shutdown");
            }
            if tick.elapsed() >= TICK {
                tick = Instant::now();
                self.announce()?;
            }
            self.poll()?;
            let joined = self.receivers.len();
            if joined as u32 >= self.cfg.min_receivers.max(1)
                || (joined > 0 && opened.elapsed() >= self.cfg.max_wait)
            {
                break;
            }
            if joined == 0 && opened.elapsed() >= self.cfg.join_timeout {
                return Ok("no receivers");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.report.waited_secs = opened.elapsed().as_secs_f64();
        self.phase = Phase::Sending;
        let started = Instant::now();
        self.refilled = started;
        let mut cursor = (0u32, 0u32);
        let mut pass_done = false;
        let mut pass_end = started;
        let mut next_round = started;
        let mut sent_since_poll = 0u32;
        loop {
            if stop() {
                self.report.send_secs = started.elapsed().as_secs_f64();
                return Ok("shutdown");
            }
            if sent_since_poll >= 64 || tick.elapsed() >= TICK {
                sent_since_poll = 0;
                self.flush()?;
                self.poll()?;
                if tick.elapsed() >= TICK {
                    tick = Instant::now();
                    self.adjust_rate();
                    self.announce()?;
                }
            }
            let repair_due = pass_done
                || self.report.repair_datagrams * 100 < self.report.datagrams * PASS_REPAIR_PERCENT;
            let queued = if repair_due {
                self.repairs.pop_first()
            } else {
                None
            };
            let next = match queued {
                Some((r, to)) => Some((r, Some(to))),
                None if !pass_done => {
                    let c = cursor;
                    cursor = self.after(c)?;
                    if cursor.0 as usize >= self.chunks.len() {
                        pass_done = true;
                        pass_end = Instant::now();
                        self.report.pass_secs = started.elapsed().as_secs_f64();
                        self.phase = Phase::Repairing;
                    }
                    Some((c, None))
                }
                None => None,
            };
            if let Some(((chunk, part), repair)) = next {
                if (chunk as usize) < self.chunks.len() {
                    self.send_part(chunk, part, repair)?;
                    sent_since_poll += 1;
                }
                continue;
            }
            // The pass is over and nothing is queued: finish, or start a repair round.
            self.flush()?;
            let waiting = self
                .receivers
                .values()
                .any(|r| !r.complete && r.heard.elapsed() < GONE);
            if !waiting {
                self.report.send_secs = started.elapsed().as_secs_f64();
                return Ok("complete");
            }
            if pass_end.elapsed() >= self.cfg.repair_timeout {
                self.report.send_secs = started.elapsed().as_secs_f64();
                return Ok("timeout");
            }
            if Instant::now() >= next_round {
                self.round += 1;
                self.announce()?;
                next_round = Instant::now() + ROUND_WAIT;
            }
            self.poll()?;
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The part after `(chunk, part)` in the pass.
    fn after(&mut self, (chunk, part): (u32, u32)) -> Result<(u32, u32), McastError> {
        let parts = self.parts(chunk)?;
        Ok(if part + 1 < parts {
            (chunk, part + 1)
        } else {
            (chunk + 1, 0)
        })
    }

    fn parts(&mut self, chunk: u32) -> Result<u32, McastError> {
        let clen = match self.clens.get(chunk as usize) {
            Some(&0) => self.load(chunk)?.len() as u32,
            Some(&n) => n,
            None => return Ok(1),
        };
        Ok(clen.div_ceil(self.payload as u32).max(1))
    }

    /// A chunk's compressed bytes; the last few are kept (repairs come in chunk order).
    fn load(&mut self, chunk: u32) -> Result<&[u8], McastError> {
        if let Some(i) = self.cache.iter().position(|c| c.0 == chunk) {
            return Ok(&self.cache[i].1);
        }
        let raw = self.store.chunk_raw(&self.chunks[chunk as usize])?;
        self.clens[chunk as usize] = raw.len() as u32;
        if self.cache.len() >= 8 {
            self.cache.remove(0);
        }
        self.cache.push((chunk, raw));
        Ok(&self.cache[self.cache.len() - 1].1)
    }

    /// Send a part of the pass (`repair` None), or again: `Some(Some(receiver))` to one
    /// receiver, `Some(None)` to the group.
    fn send_part(
        &mut self,
        chunk: u32,
        part: u32,
        repair: Option<Option<SocketAddr>>,
    ) -> Result<(), McastError> {
        let payload = self.payload;
        let to = match repair {
            Some(Some(r)) => r,
            _ => self.cfg.group.into(),
        };
        let unicast = to != SocketAddr::from(self.cfg.group);
        // A datagram to one receiver takes no number of the group's sequence, by which
        // receivers count their losses; they leave it out of that count.
        let seq = self.seq;
        let (session, prefix) = (self.session, self.prefix);
        let mut buf = std::mem::take(&mut self.buf);
        let data = self.load(chunk)?;
        let clen = data.len() as u32;
        let parts = clen.div_ceil(payload as u32).max(1);
        let start = part as usize * payload;
        if part >= parts || start >= data.len() {
            self.buf = buf;
            return Ok(());
        }
        let end = (start + payload).min(data.len());
        wire::encode(
            &mut buf,
            session,
            &Msg::Data(Data {
                prefix,
                seq,
                chunk,
                part,
                parts,
                clen,
                bytes: &data[start..end],
            }),
        );
        let frame = buf.len() + FRAME_OVERHEAD;
        if !unicast {
            self.seq = self.seq.wrapping_add(1);
        }
        self.report.datagrams += 1;
        self.report.repair_datagrams += u64::from(repair.is_some());
        self.report.repairs_unicast += u64::from(unicast);
        if repair.is_none() {
            // After the pass's last datagram these are the pass's figures.
            self.report.pass_datagrams = self.report.datagrams;
            self.report.pass_repairs = self.report.repair_datagrams;
        }
        self.report.wire_bytes += frame as u64;
        let m = crate::metrics::get();
        m.multicast_wire_bytes.inc_by(frame as u64);
        m.multicast_datagrams
            .get_or_create(&crate::metrics::KindLabels {
                kind: if repair.is_some() { "repair" } else { "data" },
            })
            .inc();
        self.report.data_bytes += (end - start) as u64;
        let r = match self.segment {
            Some(seg) => {
                if self.batch_to != to {
                    self.flush()?;
                    self.batch_to = to;
                }
                // The kernel cuts a batch into `seg`-byte datagrams; only the last
                // may be shorter, so a short one closes the batch.
                self.batch.extend_from_slice(&buf);
                self.batched += 1;
                self.batch_frames += frame;
                if buf.len() != seg || self.batched >= self.max_batch {
                    self.flush()
                } else {
                    Ok(())
                }
            }
            None => {
                self.pace(frame);
                self.transmit(&buf, to)
            }
        };
        self.buf = buf;
        r
    }

    /// Send the datagrams batched so far.
    fn flush(&mut self) -> Result<(), McastError> {
        if self.batched == 0 {
            return Ok(());
        }
        self.pace(self.batch_frames);
        let batch = std::mem::take(&mut self.batch);
        let r = self.transmit(&batch, self.batch_to);
        self.batch = batch;
        self.batch.clear();
        self.batched = 0;
        self.batch_frames = 0;
        r
    }

    /// Wait until the rate allows `frame` more bytes.
    fn pace(&mut self, frame: usize) {
        // 20 ms of credit: a sender thread the scheduler held back that long catches up
        // instead of losing the time (on 2 busy cores it lost 15% of line rate at 2 ms).
        let burst = (self.rate * 0.02).max(128.0 * 1024.0);
        loop {
            let now = Instant::now();
            self.tokens =
                (self.tokens + (now - self.refilled).as_secs_f64() * self.rate).min(burst);
            self.refilled = now;
            if self.tokens >= frame as f64 {
                self.tokens -= frame as f64;
                return;
            }
            let wait = (frame as f64 - self.tokens) / self.rate;
            std::thread::sleep(Duration::from_secs_f64(wait.max(20e-6)));
        }
    }

    fn transmit(&self, buf: &[u8], to: SocketAddr) -> Result<(), McastError> {
        loop {
            match self.sock.send_to(buf, to) {
                Ok(_) => return Ok(()),
                // A full socket buffer or queue: wait for it to drain.
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(105) => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                // One receiver's path failing (a firewall, a route) ends nothing: that
                // receiver asks again or fetches over HTTP.
                Err(e) if to != SocketAddr::from(self.cfg.group) => {
                    debug!(%to, error = %e, "a datagram to one receiver was not sent");
                    return Ok(());
                }
                Err(e) => return Err(io(format!("sending to {to}"))(e)),
            }
        }
    }

    fn announce(&mut self) -> Result<(), McastError> {
        let msg = Msg::Announce(Announce {
            digest: self.digest,
            phase: self.phase,
            round: self.round,
            payload: self.payload as u16,
            chunks: self.chunks.len() as u32,
            receivers: self.receivers.len().min(usize::from(u16::MAX)) as u16,
        });
        let mut buf = Vec::new();
        wire::encode(&mut buf, self.session, &msg);
        self.transmit(&buf, self.cfg.group.into())
    }

    /// Handle whatever receivers sent.
    fn poll(&mut self) -> Result<(), McastError> {
        let mut buf = [0u8; 2048];
        loop {
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                // ICMP errors from a receiver that went away surface here.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(io("receiving control datagrams")(e)),
            };
            let Ok((session, msg)) = wire::decode(&buf[..n]) else {
                continue;
            };
            if session != self.session {
                continue;
            }
            match msg {
                Msg::Join { receiver, digest } => {
                    let reply = if digest == self.digest {
                        let now = Instant::now();
                        let r = self.receivers.entry(receiver).or_insert_with(|| {
                            info!(%from, receiver = format!("{receiver:016x}"), "receiver joined");
                            Receiver {
                                addr: from,
                                heard: now,
                                received: 0,
                                lost: 0,
                                seen: (0, 0),
                                complete: false,
                                lossy: false,
                                strikes: 0,
                            }
                        });
                        r.heard = now;
                        Msg::Welcome { receiver }
                    } else {
                        warn!(%from, wants = %digest, "receiver wants another version: refused");
                        Msg::Refuse { receiver }
                    };
                    let mut out = Vec::new();
                    wire::encode(&mut out, self.session, &reply);
                    self.transmit(&out, from)?;
                }
                Msg::Status(s) => {
                    let Some(r) = self.receivers.get_mut(&s.receiver) else {
                        continue;
                    };
                    r.heard = Instant::now();
                    r.addr = from;
                    r.received = s.received;
                    r.lost = s.lost;
                    if s.complete && !r.complete {
                        r.complete = true;
                        info!(%from, "receiver complete");
                    }
                    for w in s.wants {
                        self.want(w, from)?;
                    }
                }
                _ => {}
            }
        }
    }

    /// Queue the parts receiver `from` asks for: to it alone, or to the group once
    /// another receiver asks for the same part before it went out.
    fn want(&mut self, w: wire::Want, from: SocketAddr) -> Result<(), McastError> {
        if w.chunk as usize >= self.chunks.len() {
            return Ok(());
        }
        let parts = self.parts(w.chunk)?;
        let end = w.first.saturating_add(w.count).min(parts);
        for p in w.first..end {
            let to = self.repairs.entry((w.chunk, p)).or_insert(Some(from));
            if *to != Some(from) {
                *to = None;
            }
        }
        Ok(())
    }

    /// Back off when most receivers lose datagrams, speed up when none do. A receiver
    /// that keeps losing while the rate is low has a bad path, not a busy network.
    fn adjust_rate(&mut self) {
        let low = self.rate <= self.peak_rate * 0.5;
        let mut counted = 0usize;
        let mut losing = 0usize;
        let mut flagged = false;
        for r in self.receivers.values_mut() {
            let (dr, dl) = (
                r.received - r.seen.0.min(r.received),
                r.lost - r.seen.1.min(r.lost),
            );
            r.seen = (r.received, r.lost);
            if r.complete || r.lossy || dr + dl < 50 {
                continue;
            }
            counted += 1;
            let lossy_now = dl * 50 > dr + dl; // over 2%
            if lossy_now {
                losing += 1;
                if low {
                    r.strikes += 1;
                    if r.strikes >= 3 {
                        r.lossy = true;
                        flagged = true;
                        warn!(addr = %r.addr, "receiver keeps losing datagrams at a low rate: its path is lossy; it no longer sets the rate");
                    }
                }
            }
        }
        self.peak_rate = self.peak_rate.max(self.rate);
        if flagged {
            // The backing off was for nothing: return to where the others were.
            self.rate = self.peak_rate;
        } else if counted > 0 && losing * 2 > counted {
            self.rate = (self.rate * 0.75).max(FLOOR_RATE);
        } else {
            self.rate = (self.rate * 1.1).min(self.max_rate);
        }
        self.publish_rate(self.rate * 8.0);
    }

    fn publish_rate(&self, bits: f64) {
        crate::metrics::get()
            .multicast_rate
            .get_or_create(&crate::metrics::GroupLabels {
                group: self.cfg.group.to_string(),
            })
            .set(bits);
    }

    fn finish(&mut self, ended: &str) {
        let mut buf = Vec::new();
        wire::encode(&mut buf, self.session, &Msg::End);
        for _ in 0..3 {
            let _ = self.transmit(&buf, self.cfg.group.into());
        }
        let r = &mut self.report;
        r.ended = ended.to_string();
        r.receivers_joined = self.receivers.len();
        r.receivers_complete = self.receivers.values().filter(|x| x.complete).count();
        r.receivers_lossy = self.receivers.values().filter(|x| x.lossy).count();
        r.rounds = self.round;
        r.final_rate_bps = (self.rate * 8.0) as u64;
        self.publish_rate(0.0);
        crate::metrics::get()
            .multicast_sessions
            .get_or_create(&crate::metrics::outcome(ended))
            .inc();
    }
}
