//! A router advertisement that says "no router here, nothing to configure".
//!
//! iPXE waits for IPv6 autoconfiguration before it uses the IPv4 lease it already has
//! (about 16 s under TCG when no advertisement comes). An advertisement with router
//! lifetime 0 and neither the M nor the O flag ends that wait at once, and tells
//! hosts neither to route through this server nor to ask DHCPv6: nothing on the site
//! changes. Sent in answer to every router solicitation on the interface, and
//! every 30 s.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const UNSOLICITED_EVERY: Duration = Duration::from_secs(30);

/// The ICMPv6 message (RFC 4861 4.2): type, code, checksum (the kernel fills it in
/// on an ICMPv6 raw socket), hop limit 0 (unspecified), flags 0 (no DHCPv6), router
/// lifetime 0 (not a default router), reachable time and retransmit timer 0.
pub fn advertisement() -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0] = ROUTER_ADVERTISEMENT;
    m
}

/// Answer router solicitations on `interface` until `stop` is set.
pub fn serve(interface: &str, stop: &AtomicBool) -> io::Result<()> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| io::Error::other(format!("{interface:?}: not an interface name")))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string and returns 0 if unknown.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::other(format!("no interface named {interface}")));
    }
    let at =
        |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{interface}: {what}: {e}"));
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .map_err(|e| at("ICMPv6 raw socket (needs root or CAP_NET_RAW)", e))?;
    s.bind_device(Some(interface.as_bytes()))
        .map_err(|e| at("bind to device", e))?;
    // Neighbour discovery is only accepted from hop limit 255 (RFC 4861 6.1.2).
    s.set_multicast_hops_v6(255)
        .map_err(|e| at("hop limit", e))?;
    s.set_unicast_hops_v6(255).map_err(|e| at("hop limit", e))?;
    s.set_multicast_if_v6(index)
        .map_err(|e| at("multicast interface", e))?;
    s.join_multicast_v6(&ALL_ROUTERS, index)
        .map_err(|e| at("join ff02::2", e))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| at("timeout", e))?;
    let to = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, index));
    let ra = advertisement();
    let mut last = None::<Instant>;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    while !stop.load(Ordering::Relaxed) {
        let solicited = match s.recv_from(&mut buf) {
            // SAFETY: recv_from initialised the first n bytes.
            Ok((n, _)) => n > 0 && unsafe { buf[0].assume_init() } == ROUTER_SOLICITATION,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                false
            }
            Err(e) => return Err(at("receive", e)),
        };
        if solicited || last.is_none_or(|t| t.elapsed() >= UNSOLICITED_EVERY) {
            // A lost advertisement costs a client its wait; the next solicitation retries.
            let _ = s.send_to(&ra, &to);
            last = Some(Instant::now());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_advertisement_configures_nothing() {
        let m = super::advertisement();
        assert_eq!(m[0], 134);
        // M and O flags clear, router lifetime 0.
        assert_eq!(m[5], 0);
        assert_eq!(&m[6..8], &[0, 0]);
    }
}
