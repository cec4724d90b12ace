//! The whole DHCP receive path: length checks, decoding, lease logic and the reply's
//! encoding, as a socket drives it. The first byte picks where the datagram came in
//! (an authoritative site, a proxy site, the proxy's port 4011, a relay-only socket).

#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, OnceLock};

use dhcproto::{Decodable, Decoder};
use fleetwave::services::dhcp::pxe::BootFiles;
use fleetwave::services::dhcp::{Config, HostMap, Ingress, KnownHost, Server, SiteNet, Stats};
use fleetwave::spec::{DhcpMode, IpRange, Mac, UnknownHosts};
use libfuzzer_sys::fuzz_target;

fn site(name: &str, third: u8, mode: DhcpMode, relayed: bool) -> SiteNet {
    SiteNet {
        name: name.into(),
        interface: "eth0".into(),
        server: Ipv4Addr::new(172, 28, 0, 1),
        subnet: format!("172.28.{third}.0/24").parse().expect("literal"),
        relayed,
        mode,
        // A small pool, so exhaustion and reuse are reached too.
        pool: Some(IpRange {
            first: Ipv4Addr::new(172, 28, third, 100),
            last: Ipv4Addr::new(172, 28, third, 107),
        }),
        router: Some(Ipv4Addr::new(172, 28, third, 1)),
        dns: vec![Ipv4Addr::new(172, 28, third, 1)],
        domain: Some("lab.example".into()),
        lease_secs: 3600,
        unknown: if third == 2 {
            UnknownHosts::Ignore
        } else {
            UnknownHosts::Register
        },
        secure_boot: third == 3,
    }
}

fn server() -> &'static Mutex<Server> {
    static S: OnceLock<Mutex<Server>> = OnceLock::new();
    S.get_or_init(|| {
        let mut hosts = HostMap::default();
        hosts.insert(
            Mac([0x52, 0x54, 0, 0x28, 0, 0x11]),
            KnownHost {
                name: "pc01".into(),
                ip: Some(Ipv4Addr::new(172, 28, 0, 11)),
            },
        );
        hosts.insert(
            Mac([0x52, 0x54, 0, 0x28, 0, 0x12]),
            KnownHost {
                name: "pc02".into(),
                ip: None,
            },
        );
        let config = Config {
            sites: vec![
                site("lab", 0, DhcpMode::Authoritative, false),
                site("proxy", 1, DhcpMode::Proxy, false),
                site("remote", 2, DhcpMode::Authoritative, true),
            ],
            hosts,
            boot: BootFiles::default(),
            http_port: 8080,
            offer_secs: 60,
            client_port: 68,
            relay_port: 67,
        };
        Mutex::new(Server::new(config, Vec::new(), Arc::new(Stats::default())))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, packet)) = data.split_first() else {
        return;
    };
    let ingress = Ingress {
        from: SocketAddrV4::new(Ipv4Addr::new(172, 28, 0, 50), 68),
        site: match which % 4 {
            3 => None,
            n => Some((n as usize).min(1)),
        },
        pxe_port: which % 4 == 2,
    };
    // Time moves with the input, so expiry paths run too.
    let now = 1_000_000 + u64::from(which) * 97;
    let mut s = server().lock().unwrap_or_else(|p| p.into_inner());
    let out = s.handle(packet, ingress, now);
    if let Some(reply) = out.reply {
        // What the server sends must itself be a well-formed DHCP message.
        let m = dhcproto::v4::Message::decode(&mut Decoder::new(&reply.bytes));
        assert!(m.is_ok(), "the server sent a reply it cannot read back");
    }
});
