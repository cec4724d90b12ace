//! TFTP packets (RFC 1350) with options (RFC 2347): parsing that never panics on what
//! the network sends, and encoding of what the server sends back.

use std::fmt;

pub const RRQ: u16 = 1;
pub const WRQ: u16 = 2;
pub const DATA: u16 = 3;
pub const ACK: u16 = 4;
pub const ERROR: u16 = 5;
pub const OACK: u16 = 6;

/// TFTP error codes (RFC 1350, 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    IllegalOperation = 4,
    UnknownTransferId = 5,
    /// The client refused our options, or we refuse its.
    OptionsRefused = 8,
}

/// A request: read or write, with its options in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub write: bool,
    pub filename: String,
    pub mode: String,
    /// Option names lower-cased, values as sent.
    pub options: Vec<(String, String)>,
}

/// What a client sends during a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack(u16),
    Error(u16, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }
}

fn opcode(buf: &[u8]) -> Result<u16, Malformed> {
    match buf {
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(Malformed("shorter than an opcode")),
    }
}

/// NUL-terminated strings, as requests carry them.
fn strings(mut rest: &[u8]) -> Result<Vec<String>, Malformed> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(Malformed("string without its terminating NUL"))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| Malformed("string is not UTF-8"))?;
        out.push(s.to_string());
        rest = &rest[end + 1..];
    }
    Ok(out)
}

/// Parse a packet that arrived on the listening port.
pub fn parse_request(buf: &[u8]) -> Result<Request, (Malformed, u16)> {
    let op = opcode(buf).map_err(|e| (e, 0))?;
    if op != RRQ && op != WRQ {
        return Err((Malformed("not a request"), op));
    }
    let fields = strings(&buf[2..]).map_err(|e| (e, op))?;
    let mut it = fields.into_iter();
    let (Some(filename), Some(mode)) = (it.next(), it.next()) else {
        return Err((Malformed("request without file name and mode"), op));
    };
    let rest: Vec<String> = it.collect();
    if !rest.len().is_multiple_of(2) {
        return Err((Malformed("option without a value"), op));
    }
    let options = rest
        .chunks_exact(2)
        .map(|kv| (kv[0].to_ascii_lowercase(), kv[1].clone()))
        .collect();
    Ok(Request {
        write: op == WRQ,
        filename,
        mode: mode.to_ascii_lowercase(),
        options,
    })
}

/// Parse what a client sends back during a read transfer.
pub fn parse_reply(buf: &[u8]) -> Result<Reply, Malformed> {
    match opcode(buf)? {
        ACK => match buf {
            [_, _, a, b, ..] => Ok(Reply::Ack(u16::from_be_bytes([*a, *b]))),
            _ => Err(Malformed("ACK without a block number")),
        },
        ERROR => {
            let code = match buf {
                [_, _, a, b, ..] => u16::from_be_bytes([*a, *b]),
                _ => return Err(Malformed("ERROR without a code")),
            };
            let msg = buf
                .get(4..)
                .map(|m| {
                    String::from_utf8_lossy(m.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
                })
                .unwrap_or_default();
            Ok(Reply::Error(code, msg))
        }
        _ => Err(Malformed("neither ACK nor ERROR during a read")),
    }
}

pub fn data(block: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn error(code: ErrorCode, msg: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + msg.len());
    out.extend_from_slice(&ERROR.to_be_bytes());
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    out.push(0);
    out
}

pub fn oack(options: &[(String, String)]) -> Vec<u8> {
    let mut out = OACK.to_be_bytes().to_vec();
    for (k, v) in options {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_with_options_parses() {
        let pkt = b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001468\x00TSIZE\x000\x00";
        let r = parse_request(pkt).unwrap();
        assert_eq!(r.filename, "undionly.kpxe");
        assert_eq!(
            r.options,
            vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "0".into())
            ]
        );
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        for pkt in [
            &b""[..],
            b"\x00",
            b"\x00\x01",
            b"\x00\x01file",
            b"\x00\x01f\x00octet\x00blksize\x00",
            b"\x00\x09x\x00",
            b"\x00\x01\xff\xfe\x00octet\x00",
        ] {
            assert!(parse_request(pkt).is_err(), "{pkt:?}");
        }
        for pkt in [
            &b""[..],
            b"\x00\x04\x01",
            b"\x00\x03\x00\x01data",
            b"\x00\x05",
        ] {
            assert!(parse_reply(pkt).is_err(), "{pkt:?}");
        }
    }
}
