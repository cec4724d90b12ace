//! Wake-on-LAN: the magic packet (six 0xff bytes, then the MAC sixteen times) as a UDP
//! broadcast on the site's interface, to port 9 (discard), which NICs listen for
//! whatever the port.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};

use crate::spec::Mac;

pub fn magic_packet(mac: Mac) -> [u8; 102] {
    let mut p = [0xffu8; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(&mac.0);
    }
    p
}

/// Send `mac`'s magic packet to `broadcast` on `interface`.
pub fn wake(interface: &str, broadcast: Ipv4Addr, mac: Mac) -> io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_broadcast(true)?;
    // Out of the site's interface, whatever the routing table says.
    s.bind_device(Some(interface.as_bytes()))?;
    let to = SocketAddrV4::new(broadcast, 9);
    s.send_to(&magic_packet(mac), &to.into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_magic_packet_is_six_ff_then_the_mac_sixteen_times() {
        let mac = Mac([0x52, 0x54, 0, 0x28, 0, 0x11]);
        let p = magic_packet(mac);
        assert_eq!(&p[..6], &[0xff; 6]);
        assert!(p[6..].chunks(6).all(|c| c == mac.0));
        assert_eq!(p[6..].chunks(6).count(), 16);
    }
}
