//! Reading a DHCP request off the wire without trusting it.
//!
//! dhcproto's option decoder assumes well-formed lengths: some options trip a
//! `debug_assert!` (a panic in debug builds, a wrong parse in release) and one bad
//! option silently ends the option list, dropping the message type that may follow.
//! So every option is walked and its length checked here first; options that pass are
//! decoded one at a time, and a packet with a broken option list is refused whole.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder};

use crate::spec::Mac;

/// Fixed BOOTP header (236 bytes) plus the magic cookie.
pub const HEADER_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Relay agent information (RFC 3046), echoed back byte for byte.
pub const RELAY_AGENT_INFO: u8 = 82;

/// Why a packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("{0} bytes is shorter than a DHCP header")]
    Short(usize),
    #[error("not a BOOTREQUEST (op {0})")]
    NotRequest(u8),
    #[error("no DHCP magic cookie")]
    Magic,
    #[error("hardware type {htype} with address length {hlen}: only Ethernet is served")]
    Hardware { htype: u8, hlen: u8 },
    #[error("option {code} runs past the end of the packet")]
    Overrun { code: u8 },
    #[error("option {code} has length {len}, which its type does not allow")]
    Length { code: u8, len: usize },
    #[error("no DHCP message type (option 53): a plain BOOTP request")]
    NoMessageType,
    #[error("header: {0}")]
    Header(String),
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct Request {
    pub msg: Message,
    pub kind: MessageType,
    pub mac: Mac,
    /// Option 82 as received (sub-options concatenated), to echo in the reply.
    pub relay_info: Option<Vec<u8>>,
    /// Options that failed to decode and were left out (a non-UTF-8 host name, say).
    pub skipped: usize,
}

impl Request {
    pub fn opt(&self, code: OptionCode) -> Option<&DhcpOption> {
        self.msg.opts().get(code)
    }

    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        match self.opt(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        }
    }

    pub fn server_id(&self) -> Option<Ipv4Addr> {
        match self.opt(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        }
    }

    pub fn subnet_selection(&self) -> Option<Ipv4Addr> {
        match self.opt(OptionCode::SubnetSelection) {
            Some(DhcpOption::SubnetSelection(ip)) => Some(*ip),
            _ => None,
        }
    }

    pub fn class_id(&self) -> Option<&[u8]> {
        match self.opt(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) => Some(v),
            _ => None,
        }
    }

    pub fn user_class(&self) -> Option<&[u8]> {
        match self.opt(OptionCode::UserClass) {
            Some(DhcpOption::UserClass(v)) => Some(v),
            _ => None,
        }
    }

    /// Option 93: the first architecture the client lists.
    pub fn arch(&self) -> Option<u16> {
        match self.opt(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
            _ => None,
        }
    }

    /// Option 57: the largest reply the client accepts.
    pub fn max_message_size(&self) -> Option<u16> {
        match self.opt(OptionCode::MaxMessageSize) {
            Some(DhcpOption::MaxMessageSize(n)) => Some(*n),
            _ => None,
        }
    }
}

/// Lengths each option's decoder can take without asserting or misreading.
fn length_ok(code: u8, len: usize) -> bool {
    match code {
        80 => len == 0,
        19 | 20 | 23 | 27 | 29 | 30 | 31 | 34 | 36 | 37 | 39 | 46 | 52 | 53 | 116 | 156 | 157 => {
            len == 1
        }
        13 | 22 | 26 | 57 => len == 2,
        94 => len == 3,
        1
        | 2
        | 16
        | 24
        | 28
        | 32
        | 35
        | 38
        | 50
        | 51
        | 54
        | 58
        | 59
        | 91
        | 106
        | 118
        | 150
        | 152..=155 => len == 4,
        3..=11 | 41 | 42 | 44 | 45 | 48 | 49 | 65 | 68..=76 | 89 | 92 => len.is_multiple_of(4),
        21 | 33 => len.is_multiple_of(8),
        25 => len.is_multiple_of(2),
        93 => len >= 2 && len.is_multiple_of(2),
        151 => len >= 1,
        81 => len >= 3,
        _ => true,
    }
}

/// Check and decode one request datagram.
pub fn parse(buf: &[u8]) -> Result<Request, Malformed> {
    if buf.len() < HEADER_LEN {
        return Err(Malformed::Short(buf.len()));
    }
    if buf[0] != 1 {
        return Err(Malformed::NotRequest(buf[0]));
    }
    let (htype, hlen) = (buf[1], buf[2]);
    if htype != 1 || hlen != 6 {
        return Err(Malformed::Hardware { htype, hlen });
    }
    if buf[236..240] != MAGIC {
        return Err(Malformed::Magic);
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&buf[28..34]);

    // The fixed header alone, with an empty option list, through dhcproto.
    let mut header = Vec::with_capacity(HEADER_LEN + 1);
    header.extend_from_slice(&buf[..HEADER_LEN]);
    header.push(255);
    let mut msg = Message::decode(&mut Decoder::new(&header))
        .map_err(|e| Malformed::Header(e.to_string()))?;

    let mut relay_info = None;
    let mut skipped = 0;
    let opts = &buf[HEADER_LEN..];
    let mut i = 0;
    // One option, or a run of the same code split across entries (RFC 3396).
    let mut run: Vec<u8> = Vec::new();
    while i < opts.len() {
        let code = opts[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        run.clear();
        while i < opts.len() && opts[i] == code {
            let Some(&len) = opts.get(i + 1) else {
                return Err(Malformed::Overrun { code });
            };
            let end = i + 2 + len as usize;
            let Some(data) = opts.get(i + 2..end) else {
                return Err(Malformed::Overrun { code });
            };
            run.extend_from_slice(data);
            i = end;
        }
        if !length_ok(code, run.len()) {
            return Err(Malformed::Length {
                code,
                len: run.len(),
            });
        }
        if code == RELAY_AGENT_INFO {
            relay_info = Some(run.clone());
            continue;
        }
        match decode_one(code, &run) {
            Some(opt) => {
                msg.opts_mut().insert(opt);
            }
            None => skipped += 1,
        }
    }
    let kind = msg.opts().msg_type().ok_or(Malformed::NoMessageType)?;
    Ok(Request {
        msg,
        kind,
        mac: Mac(mac),
        relay_info,
        skipped,
    })
}

/// Decode one option whose length already passed [`length_ok`]; `None` if dhcproto
/// cannot read it (it is then left out rather than ending the list).
fn decode_one(code: u8, data: &[u8]) -> Option<DhcpOption> {
    // A concatenated run longer than one entry cannot be framed for dhcproto; nothing
    // this server reads is that long (option 82 is kept raw above).
    let len = u8::try_from(data.len()).ok()?;
    let mut framed = Vec::with_capacity(data.len() + 2);
    framed.push(code);
    framed.push(len);
    framed.extend_from_slice(data);
    let opt = DhcpOption::decode(&mut Decoder::new(&framed)).ok()?;
    match opt {
        DhcpOption::Pad | DhcpOption::End => None,
        opt => Some(opt),
    }
}

/// Encode a reply, appending option 82 exactly as the relay sent it (RFC 3046 2.2).
pub fn encode(msg: &Message, relay_info: Option<&[u8]>) -> Option<Vec<u8>> {
    use dhcproto::{Encodable, Encoder};
    let mut out = Vec::with_capacity(400);
    msg.encode(&mut Encoder::new(&mut out)).ok()?;
    if let Some(info) = relay_info {
        if out.last() == Some(&255) {
            out.pop();
        }
        for chunk in info.chunks(255) {
            out.push(RELAY_AGENT_INFO);
            out.push(chunk.len() as u8);
            out.extend_from_slice(chunk);
        }
        out.push(255);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discover(options: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; HEADER_LEN];
        p[0] = 1;
        p[1] = 1;
        p[2] = 6;
        p[28..34].copy_from_slice(&[0x52, 0x54, 0, 0x28, 0, 0x11]);
        p[236..240].copy_from_slice(&MAGIC);
        p.extend_from_slice(options);
        p
    }

    #[test]
    fn a_good_discover_decodes() {
        let r = parse(&discover(&[53, 1, 1, 93, 2, 0, 7, 255])).expect("valid");
        assert_eq!(r.kind, MessageType::Discover);
        assert_eq!(r.arch(), Some(7));
        assert_eq!(r.mac.to_string(), "52:54:00:28:00:11");
    }

    #[test]
    fn lengths_that_trip_dhcproto_are_refused() {
        // Client FQDN shorter than its 3 fixed bytes: dhcproto subtracts 3 from it.
        assert_eq!(
            parse(&discover(&[53, 1, 1, 81, 1, 0, 255])).err(),
            Some(Malformed::Length { code: 81, len: 1 })
        );
        // Rapid commit with data: a debug_assert in dhcproto.
        assert!(parse(&discover(&[53, 1, 1, 80, 1, 0, 255])).is_err());
        // An option running off the end.
        assert_eq!(
            parse(&discover(&[53, 1, 1, 60, 40, b'P'])).err(),
            Some(Malformed::Overrun { code: 60 })
        );
    }

    #[test]
    fn a_bad_option_before_the_message_type_does_not_hide_it() {
        // A host name that is not UTF-8 ends dhcproto's option list; here it is skipped.
        let r = parse(&discover(&[12, 2, 0xff, 0xfe, 53, 1, 3, 255])).expect("valid");
        assert_eq!(r.kind, MessageType::Request);
        assert_eq!(r.skipped, 1);
    }

    #[test]
    fn relay_information_is_echoed_verbatim() {
        let info = [1, 3, b'a', b'b', b'c', 2, 2, 9, 9];
        let mut opts = vec![53, 1, 1, 82, info.len() as u8];
        opts.extend_from_slice(&info);
        opts.push(255);
        let r = parse(&discover(&opts)).expect("valid");
        assert_eq!(r.relay_info.as_deref(), Some(&info[..]));
        let out = encode(&r.msg, r.relay_info.as_deref()).expect("encodes");
        let tail = &out[out.len() - info.len() - 3..];
        assert_eq!(tail[0], 82);
        assert_eq!(&tail[2..2 + info.len()], &info);
        assert_eq!(out.last(), Some(&255));
    }
}
