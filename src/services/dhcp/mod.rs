//! The DHCP server: authoritative (pool and reservations) or proxyDHCP (boot options
//! only, beside another DHCP server), for clients on the wire and behind relays.
//!
//! [`Server::handle`] turns one datagram into a reply and the writes it implies; it
//! does no I/O, so the fuzz target drives the very code the sockets do. [`run`] feeds
//! it from a socket. A DHCPACK leaves only after its lease is committed to the state
//! store, so no restart can hand an acknowledged address to a second client.

pub mod leases;
pub mod pxe;
pub mod wire;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode};
use ipnet::Ipv4Net;
use rustc_hash::FxHashMap;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::spec::{DhcpMode, FleetSpec, IpRange, Mac, UnknownHosts};
use crate::state::{Lease, LeaseState, Observation, Op, WriteHandle};
use leases::{Kind, Leases};
use pxe::{Boot, BootFiles, Client, HttpServer};
use wire::Request;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// PXE boot server discovery (proxyDHCP requests).
pub const PXE_PORT: u16 = 4011;

/// One site's network as the DHCP server sees it.
#[derive(Debug, Clone)]
pub struct SiteNet {
    pub name: String,
    /// Where its clients are, when they are on this server's own segment.
    pub interface: String,
    /// This server's address on the site: server identifier, next-server, HTTP.
    pub server: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// Reached only through DHCP relays.
    pub relayed: bool,
    pub mode: DhcpMode,
    pub pool: Option<IpRange>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_secs: u64,
    pub unknown: UnknownHosts,
    /// UEFI firmware PXE is offered the signed shim (Secure Boot) rather than iPXE.
    pub secure_boot: bool,
}

/// A host of the fleet, as DHCP needs it.
#[derive(Debug, Clone)]
pub struct KnownHost {
    pub name: String,
    /// Its reserved address, if any.
    pub ip: Option<Ipv4Addr>,
}

/// The fleet's hosts by MAC.
pub type HostMap = FxHashMap<Mac, KnownHost>;

#[derive(Debug, Clone)]
pub struct Config {
    pub sites: Vec<SiteNet>,
    pub hosts: HostMap,
    pub boot: BootFiles,
    /// The port of the HTTP server, for iPXE script URLs.
    pub http_port: u16,
    /// How long an offered address is held for the client's request.
    pub offer_secs: u64,
    /// Where replies go: clients listen on 68, relays on 67 (tests change them).
    pub client_port: u16,
    pub relay_port: u16,
}

impl Config {
    /// The sites in `serve` (all when empty) whose DHCP is not off, and every host.
    pub fn from_spec(spec: &FleetSpec, serve: &[String]) -> Config {
        let sites = spec
            .sites
            .iter()
            .filter(|(name, s)| {
                s.dhcp.mode != DhcpMode::Off && (serve.is_empty() || serve.contains(name))
            })
            .map(|(name, s)| SiteNet {
                name: name.clone(),
                interface: s.interface.clone(),
                server: s.server,
                subnet: s.subnet,
                relayed: s.relayed,
                mode: s.dhcp.mode,
                pool: s.dhcp.pool,
                router: s.dhcp.router,
                dns: s.dhcp.dns.clone(),
                domain: s.dhcp.domain.clone(),
                lease_secs: s.dhcp.lease_secs,
                unknown: s.unknown_hosts,
                secure_boot: s.secure_boot,
            })
            .collect();
        let hosts = spec
            .hosts
            .values()
            .map(|h| {
                (
                    h.mac,
                    KnownHost {
                        name: h.name.clone(),
                        ip: h.ip,
                    },
                )
            })
            .collect();
        Config {
            sites,
            hosts,
            boot: BootFiles::default(),
            http_port: 80,
            offer_secs: 60,
            client_port: CLIENT_PORT,
            relay_port: SERVER_PORT,
        }
    }

    pub fn site_index(&self, name: &str) -> Option<usize> {
        self.sites.iter().position(|s| s.name == name)
    }
}

/// Counters, for the health endpoint, logs and tests.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub received: AtomicU64,
    pub discovers: AtomicU64,
    pub requests: AtomicU64,
    pub informs: AtomicU64,
    /// Dropped before handling: too short, broken options, not Ethernet.
    pub malformed: AtomicU64,
    /// Well-formed but not for us: no site matches, another server chosen, an unknown
    /// host under `ignore`, a non-PXE client of a proxy.
    pub ignored: AtomicU64,
    pub offers: AtomicU64,
    pub acks: AtomicU64,
    pub naks: AtomicU64,
    pub releases: AtomicU64,
    pub declines: AtomicU64,
    /// Discovers left unanswered because the pool had no free address.
    pub exhausted: AtomicU64,
    /// Replies that could not be sent.
    pub send_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Where a datagram came in.
#[derive(Debug, Clone, Copy)]
pub struct Ingress {
    pub from: SocketAddrV4,
    /// The site whose interface the socket listens on; `None` for a socket that only
    /// serves relayed requests.
    pub site: Option<usize>,
    /// The PXE port 4011: proxyDHCP requests, answered to their source.
    pub pxe_port: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub to: SocketAddrV4,
}

/// What handling one datagram produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reply: Option<Reply>,
    pub ops: Vec<Op>,
    /// The reply may leave only after `ops` are committed.
    pub durable: bool,
    /// The address the reply gives, for the observation.
    pub ip: Option<Ipv4Addr>,
}

pub struct Server {
    config: Config,
    leases: Leases,
    stats: Arc<Stats>,
}

impl Server {
    /// A server whose lease table starts from the store's rows.
    pub fn new(config: Config, rows: Vec<Lease>, stats: Arc<Stats>) -> Server {
        let leases = Leases::load(rows, |name| config.site_index(name));
        Server {
            config,
            leases,
            stats,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The fleet's hosts of a new revision (reservations, known MACs); sites and
    /// sockets stay as they were bound.
    pub fn set_hosts(&mut self, hosts: HostMap) {
        self.config.hosts = hosts;
    }

    pub fn bound_leases(&self, now: u64) -> usize {
        self.leases.bound(now)
    }

    /// Handle one datagram received at `now` (Unix seconds).
    pub fn handle(&mut self, buf: &[u8], ingress: Ingress, now: u64) -> Outcome {
        bump(&self.stats.received);
        let req = match wire::parse(buf) {
            Ok(r) => r,
            Err(e) => {
                bump(&self.stats.malformed);
                debug!(from = %ingress.from, "dropped a malformed DHCP packet: {e}");
                return Outcome::default();
            }
        };
        match req.kind {
            MessageType::Discover => bump(&self.stats.discovers),
            MessageType::Request => bump(&self.stats.requests),
            MessageType::Inform => bump(&self.stats.informs),
            _ => {}
        }
        let Some(si) = self.site_for(&req, ingress) else {
            bump(&self.stats.ignored);
            debug!(mac = %req.mac, giaddr = %req.msg.giaddr(), "no site serves this request");
            return Outcome::default();
        };
        let known = self.config.hosts.contains_key(&req.mac);
        let client = Client::classify(req.arch(), req.class_id(), req.user_class());
        let site = &self.config.sites[si];
        let mut out = if !known && site.unknown == UnknownHosts::Ignore {
            bump(&self.stats.ignored);
            debug!(mac = %req.mac, site = %site.name, "unknown host ignored by the site's policy");
            Outcome::default()
        } else {
            match (site.mode, ingress.pxe_port) {
                (DhcpMode::Proxy, _) | (_, true) => self.proxy(&req, si, &client, ingress),
                (DhcpMode::Authoritative, false) => self.authoritative(&req, si, &client, now),
                (DhcpMode::Off, false) => Outcome::default(),
            }
        };
        let ciaddr = req.msg.ciaddr();
        let ip = out.ip.or((!ciaddr.is_unspecified()).then_some(ciaddr));
        out.ops.push(Op::Observe(Observation {
            at: now,
            mac: req.mac,
            ip,
            arch: client.arch_name(),
            message: format!("{:?}", req.kind).to_lowercase(),
            known,
        }));
        out
    }

    /// The site a request belongs to: the subnet it selects (option 118), its relay's
    /// subnet, or the interface it arrived on.
    fn site_for(&self, req: &Request, ingress: Ingress) -> Option<usize> {
        let link = req.subnet_selection().or_else(|| {
            let g = req.msg.giaddr();
            (!g.is_unspecified()).then_some(g)
        });
        match link {
            Some(addr) => self
                .config
                .sites
                .iter()
                .position(|s| s.subnet.contains(&addr)),
            None => ingress.site,
        }
    }

    fn authoritative(&mut self, req: &Request, si: usize, client: &Client, now: u64) -> Outcome {
        let mac = req.mac;
        match req.kind {
            MessageType::Discover => {
                let Some(ip) = self.address_for(si, mac, req.requested_ip(), now) else {
                    bump(&self.stats.exhausted);
                    warn!(mac = %mac, site = %self.config.sites[si].name,
                        "no free address in the pool: widen `dhcp.pool` or shorten `dhcp.lease`");
                    return Outcome::default();
                };
                let until = now + self.config.offer_secs;
                self.leases.offer(si, ip, mac, until, now);
                bump(&self.stats.offers);
                self.respond(req, si, client, MessageType::Offer, ip, false)
            }
            MessageType::Request => self.request(req, si, client, now),
            MessageType::Release => {
                let ip = req.msg.ciaddr();
                let mut out = Outcome::default();
                if self.leases.release(ip, mac) {
                    bump(&self.stats.releases);
                    info!(mac = %mac, ip = %ip, "lease released");
                    out.ops.push(Op::DeleteLease(ip));
                }
                out
            }
            MessageType::Decline => {
                let mut out = Outcome::default();
                let Some(ip) = req.requested_ip() else {
                    return out;
                };
                if self.leases.get(ip).is_some_and(|e| e.mac == mac) {
                    bump(&self.stats.declines);
                    let site = &self.config.sites[si];
                    let until = now + site.lease_secs;
                    warn!(mac = %mac, ip = %ip, "client found its address in use; kept out of the pool for one lease time");
                    self.leases.decline(si, ip, mac, until);
                    out.ops.push(Op::PutLease(Lease {
                        ip,
                        mac,
                        site: site.name.clone(),
                        expires: until,
                        state: LeaseState::Declined,
                    }));
                }
                out
            }
            MessageType::Inform => {
                bump(&self.stats.acks);
                self.respond(
                    req,
                    si,
                    client,
                    MessageType::Ack,
                    Ipv4Addr::UNSPECIFIED,
                    false,
                )
            }
            _ => {
                bump(&self.stats.ignored);
                Outcome::default()
            }
        }
    }

    fn request(&mut self, req: &Request, si: usize, client: &Client, now: u64) -> Outcome {
        let mac = req.mac;
        let site = &self.config.sites[si];
        if let Some(sid) = req.server_id()
            && sid != site.server
        {
            // The client took another server's offer: let ours go.
            if let Some(ip) = req.requested_ip()
                && self
                    .leases
                    .get(ip)
                    .is_some_and(|e| e.mac == mac && e.kind == Kind::Offered)
            {
                self.leases.release(ip, mac);
            }
            bump(&self.stats.ignored);
            return Outcome::default();
        }
        let ciaddr = req.msg.ciaddr();
        let Some(ip) = req
            .requested_ip()
            .or((!ciaddr.is_unspecified()).then_some(ciaddr))
        else {
            bump(&self.stats.ignored);
            return Outcome::default();
        };
        if !self.allowed(si, ip, mac) || !self.leases.free_for(ip, mac, now) {
            bump(&self.stats.naks);
            info!(mac = %mac, ip = %ip, "NAK: the address is not this client's to have");
            return self.respond(
                req,
                si,
                client,
                MessageType::Nak,
                Ipv4Addr::UNSPECIFIED,
                false,
            );
        }
        let expires = now + site.lease_secs;
        let old = self.leases.bind(si, ip, mac, expires);
        bump(&self.stats.acks);
        let mut out = self.respond(req, si, client, MessageType::Ack, ip, true);
        out.ops.push(Op::PutLease(Lease {
            ip,
            mac,
            site: self.config.sites[si].name.clone(),
            expires,
            state: LeaseState::Bound,
        }));
        if let Some(old) = old {
            out.ops.push(Op::DeleteLease(old));
        }
        out.durable = true;
        out
    }

    /// The address to offer: the host's reservation, its previous address, the one it
    /// asks for, or the next free one of the pool.
    fn address_for(
        &mut self,
        si: usize,
        mac: Mac,
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        let site = &self.config.sites[si];
        if let Some(fixed) = self.reservation(si, mac) {
            if self.leases.free_for(fixed, mac, now) {
                return Some(fixed);
            }
            warn!(mac = %mac, ip = %fixed, "the reserved address is leased to another client; offering a pool address until it expires");
        }
        let pool = site.pool?;
        if let Some(prev) = self.leases.previous(si, mac, now)
            && pool.contains(prev)
        {
            return Some(prev);
        }
        if let Some(want) = requested
            && pool.contains(want)
            && self.leases.free_for(want, mac, now)
        {
            return Some(want);
        }
        self.leases.next_free(si, pool, mac, now)
    }

    fn reservation(&self, si: usize, mac: Mac) -> Option<Ipv4Addr> {
        let ip = self.config.hosts.get(&mac)?.ip?;
        self.config.sites[si].subnet.contains(&ip).then_some(ip)
    }

    /// Whether `mac` may hold `ip` on the site: its reservation, or a pool address if
    /// it has no reservation there.
    fn allowed(&self, si: usize, ip: Ipv4Addr, mac: Mac) -> bool {
        match self.reservation(si, mac) {
            Some(fixed) => fixed == ip,
            None => self.config.sites[si].pool.is_some_and(|p| p.contains(ip)),
        }
    }

    /// proxyDHCP: boot options for network-boot clients, never an address.
    fn proxy(&mut self, req: &Request, si: usize, client: &Client, ingress: Ingress) -> Outcome {
        let boots = client.pxe || client.http || client.ipxe;
        let kind = match (req.kind, ingress.pxe_port) {
            (MessageType::Discover, false) => MessageType::Offer,
            (MessageType::Request | MessageType::Inform, true) => MessageType::Ack,
            _ => MessageType::Nak,
        };
        if !boots || kind == MessageType::Nak {
            bump(&self.stats.ignored);
            return Outcome::default();
        }
        let mut out = self.respond(req, si, client, kind, Ipv4Addr::UNSPECIFIED, false);
        if kind == MessageType::Offer {
            bump(&self.stats.offers);
        } else {
            bump(&self.stats.acks);
        }
        if let (true, Some(r)) = (ingress.pxe_port, out.reply.as_mut()) {
            r.to = ingress.from;
        }
        out
    }

    /// Build a reply of `kind` giving `yiaddr`.
    fn respond(
        &self,
        req: &Request,
        si: usize,
        client: &Client,
        kind: MessageType,
        yiaddr: Ipv4Addr,
        with_lease: bool,
    ) -> Outcome {
        let site = &self.config.sites[si];
        let q = &req.msg;
        let mut m = Message::new_with_id(
            q.xid(),
            if kind == MessageType::Nak {
                Ipv4Addr::UNSPECIFIED
            } else {
                q.ciaddr()
            },
            yiaddr,
            Ipv4Addr::UNSPECIFIED,
            q.giaddr(),
            &req.mac.0,
        );
        m.set_opcode(Opcode::BootReply).set_htype(HType::Eth);
        let mut flags = q.flags();
        if kind == MessageType::Nak && !q.giaddr().is_unspecified() {
            flags = flags.set_broadcast();
        }
        m.set_flags(flags);
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(site.server));
        let proxy = site.mode == DhcpMode::Proxy;
        if kind != MessageType::Nak {
            if with_lease || kind == MessageType::Offer && !proxy {
                let secs = site.lease_secs.min(u64::from(u32::MAX)) as u32;
                opts.insert(DhcpOption::AddressLeaseTime(secs));
                opts.insert(DhcpOption::Renewal(secs / 2));
                opts.insert(DhcpOption::Rebinding(secs / 8 * 7));
            }
            if !proxy {
                opts.insert(DhcpOption::SubnetMask(site.subnet.netmask()));
                opts.insert(DhcpOption::BroadcastAddr(site.subnet.broadcast()));
                if let Some(r) = site.router {
                    opts.insert(DhcpOption::Router(vec![r]));
                }
                if !site.dns.is_empty() {
                    opts.insert(DhcpOption::DomainNameServer(site.dns.clone()));
                }
                if let Some(d) = &site.domain {
                    opts.insert(DhcpOption::DomainName(d.clone()));
                }
                // A known host's own name (option 12): an imaged machine, all of whose
                // disks are copies of one reference, learns who it is from its lease.
                if let Some(h) = self.config.hosts.get(&req.mac) {
                    opts.insert(DhcpOption::Hostname(h.name.clone()));
                }
            }
            let http = HttpServer {
                address: site.server,
                port: self.config.http_port,
            };
            self.boot_options(
                &mut m,
                client,
                pxe::choose(client, req.mac, &self.config.boot, http, site.secure_boot),
                proxy,
            );
        }
        let to = self.destination(req, kind);
        let reply = wire::encode(&m, req.relay_info.as_deref()).map(|bytes| Reply { bytes, to });
        Outcome {
            reply,
            ops: Vec::new(),
            durable: false,
            ip: (!yiaddr.is_unspecified()).then_some(yiaddr),
        }
    }

    fn boot_options(&self, m: &mut Message, client: &Client, boot: Boot, proxy: bool) {
        let set_file = |m: &mut Message, file: &str| {
            // The header's file field holds 127 bytes and a NUL; longer names go in
            // option 67 only.
            if file.len() < 128 {
                m.set_fname_str(file);
            }
            m.opts_mut()
                .insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
        };
        match boot {
            Boot::Nothing => return,
            Boot::Tftp { next_server, file } => {
                m.set_siaddr(next_server);
                set_file(m, &file);
            }
            Boot::Url { url, vendor_class } => {
                set_file(m, &url);
                if vendor_class {
                    m.opts_mut()
                        .insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
                }
            }
        }
        if client.pxe && !client.http && proxy {
            // A proxyDHCP reply says PXEClient, and discovery control 8: boot the file
            // named here, no boot server discovery. An authoritative offer says
            // neither: UEFI firmware (EDK2) takes a PXEClient offer without its own
            // vendor options for a boot server's and waits for one on port 4011; with
            // the file and next-server alone every PXE client boots it, as with dnsmasq.
            let opts = m.opts_mut();
            opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
            opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
    }

    /// RFC 2131 4.1: to the relay; to a configured client at its address; otherwise
    /// broadcast (an unconfigured client cannot receive unicast without an ARP entry).
    fn destination(&self, req: &Request, kind: MessageType) -> SocketAddrV4 {
        let g = req.msg.giaddr();
        if !g.is_unspecified() {
            return SocketAddrV4::new(g, self.config.relay_port);
        }
        let c = req.msg.ciaddr();
        if !c.is_unspecified() && kind != MessageType::Nak {
            return SocketAddrV4::new(c, self.config.client_port);
        }
        SocketAddrV4::new(Ipv4Addr::BROADCAST, self.config.client_port)
    }
}

/// A DHCP socket: `interface` pins it to the site's segment (and lets broadcasts
/// leave it without a route); every socket takes relayed requests too.
pub fn bind(interface: Option<&str>, addr: SocketAddrV4) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    if let Some(ifname) = interface {
        s.bind_device(Some(ifname.as_bytes())).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot bind DHCP to interface {ifname}: {e}; check `interface` of the site"
                ),
            )
        })?;
    }
    // Bursts of thousands of requests a second must not overflow the default buffer.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&SocketAddr::V4(addr).into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind DHCP to {addr}: {e}")))?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Serve datagrams from `socket` with `server` until `shutdown`.
pub async fn run(
    server: Arc<Mutex<Server>>,
    socket: std::net::UdpSocket,
    site: Option<usize>,
    pxe_port: bool,
    writer: WriteHandle,
    shutdown: CancellationToken,
) -> io::Result<()> {
    // A second handle on the socket, for replies sent by the writer thread once their
    // lease is committed.
    let after_commit = Arc::new(socket.try_clone()?);
    let socket = UdpSocket::from_std(socket)?;
    let stats = server
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stats
        .clone();
    let mut buf = vec![0u8; 1500];
    loop {
        let (n, from) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they are not fatal.
                    debug!("DHCP receive: {e}");
                    continue;
                }
            },
        };
        let SocketAddr::V4(from) = from else { continue };
        let ingress = Ingress {
            from,
            site,
            pxe_port,
        };
        let now = crate::state::now();
        let out = server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle(&buf[..n], ingress, now);
        match (out.reply, out.durable) {
            (Some(reply), true) => {
                let sock = after_commit.clone();
                let stats = stats.clone();
                writer.write(
                    out.ops,
                    Some(Box::new(move || {
                        if let Err(e) = sock.send_to(&reply.bytes, reply.to) {
                            bump(&stats.send_errors);
                            warn!(to = %reply.to, "DHCP reply not sent: {e}");
                        }
                    })),
                );
            }
            (reply, _) => {
                if !out.ops.is_empty() {
                    writer.write(out.ops, None);
                }
                if let Some(reply) = reply
                    && let Err(e) = socket.send_to(&reply.bytes, reply.to).await
                {
                    bump(&stats.send_errors);
                    warn!(to = %reply.to, "DHCP reply not sent: {e}");
                }
            }
        }
    }
}

/// Leases and counters for the health endpoint.
pub fn summary(server: &Mutex<Server>) -> (usize, Arc<Stats>) {
    let s = server.lock().unwrap_or_else(|p| p.into_inner());
    (s.bound_leases(crate::state::now()), s.stats.clone())
}
