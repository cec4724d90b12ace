//! The multicast session's datagrams. Big-endian, each starting with a 16-byte header:
//! magic `FWMC`, version, kind, two reserved bytes, the session id. Decoding checks
//! every length: a malformed or foreign datagram is an `Err`, never a panic.

use crate::spec::Digest;

pub const MAGIC: [u8; 4] = *b"FWMC";
pub const VERSION: u8 = 1;
pub const HEADER: usize = 16;
/// Header of a data datagram: digest prefix, sequence, chunk, part, parts, chunk length.
pub const DATA_HEADER: usize = HEADER + 8 + 20;
/// IPv4 and UDP headers, subtracted from the MTU for the datagram size.
pub const IP_UDP: usize = 28;
/// Wants per status datagram: keeps it under 1,500 bytes.
pub const WANTS_PER_STATUS: usize = 100;

const ANNOUNCE: u8 = 1;
const DATA: u8 = 2;
const END: u8 = 3;
const JOIN: u8 = 16;
const WELCOME: u8 = 17;
const REFUSE: u8 = 18;
const STATUS: u8 = 19;

/// Where the sender is, as announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for receivers to join.
    Waiting,
    /// Sending the image once, in order.
    Sending,
    /// The pass is over: receivers ask for what they lack, round after round.
    Repairing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub digest: Digest,
    pub phase: Phase,
    /// 0 during the pass; each repair round after it counts up.
    pub round: u32,
    /// Payload bytes per data datagram.
    pub payload: u16,
    /// Distinct chunks the session sends.
    pub chunks: u32,
    pub receivers: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data<'a> {
    /// The first 8 bytes of the version's digest: a datagram names its image.
    pub prefix: [u8; 8],
    /// Counts every data datagram the session sends (repairs too): gaps are losses.
    pub seq: u32,
    pub chunk: u32,
    /// The datagram's place in the chunk: bytes from `part * payload`.
    pub part: u32,
    pub parts: u32,
    /// The compressed chunk's length.
    pub clen: u32,
    pub bytes: &'a [u8],
}

/// Parts `first..first+count` of `chunk` (all of them: `count == u32::MAX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub chunk: u32,
    pub first: u32,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub receiver: u64,
    /// Data datagrams received and lost (sequence gaps) since joining.
    pub received: u64,
    pub lost: u64,
    pub complete: bool,
    pub wants: Vec<Want>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg<'a> {
    Announce(Announce),
    Data(Data<'a>),
    End,
    Join { receiver: u64, digest: Digest },
    Welcome { receiver: u64 },
    Refuse { receiver: u64 },
    Status(Status),
}

fn header(out: &mut Vec<u8>, kind: u8, session: u64) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, kind, 0, 0]);
    out.extend_from_slice(&session.to_be_bytes());
}

/// Encode `msg` into `out` (cleared first).
pub fn encode(out: &mut Vec<u8>, session: u64, msg: &Msg) {
    out.clear();
    match msg {
        Msg::Announce(a) => {
            header(out, ANNOUNCE, session);
            out.extend_from_slice(&a.digest.0);
            out.push(match a.phase {
                Phase::Waiting => 0,
                Phase::Sending => 1,
                Phase::Repairing => 2,
            });
            out.extend_from_slice(&a.round.to_be_bytes());
            out.extend_from_slice(&a.payload.to_be_bytes());
            out.extend_from_slice(&a.chunks.to_be_bytes());
            out.extend_from_slice(&a.receivers.to_be_bytes());
        }
        Msg::Data(d) => {
            header(out, DATA, session);
            out.extend_from_slice(&d.prefix);
            for v in [d.seq, d.chunk, d.part, d.parts, d.clen] {
                out.extend_from_slice(&v.to_be_bytes());
            }
            out.extend_from_slice(d.bytes);
        }
        Msg::End => header(out, END, session),
        Msg::Join { receiver, digest } => {
            header(out, JOIN, session);
            out.extend_from_slice(&receiver.to_be_bytes());
            out.extend_from_slice(&digest.0);
        }
        Msg::Welcome { receiver } => {
            header(out, WELCOME, session);
            out.extend_from_slice(&receiver.to_be_bytes());
        }
        Msg::Refuse { receiver } => {
            header(out, REFUSE, session);
            out.extend_from_slice(&receiver.to_be_bytes());
        }
        Msg::Status(s) => {
            header(out, STATUS, session);
            out.extend_from_slice(&s.receiver.to_be_bytes());
            out.extend_from_slice(&s.received.to_be_bytes());
            out.extend_from_slice(&s.lost.to_be_bytes());
            out.push(u8::from(s.complete));
            out.extend_from_slice(&(s.wants.len() as u16).to_be_bytes());
            for w in &s.wants {
                for v in [w.chunk, w.first, w.count] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated datagram");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn digest(&mut self) -> Result<Digest, &'static str> {
        Ok(Digest(self.array()?))
    }
}

/// The session id and message of a datagram.
pub fn decode(buf: &[u8]) -> Result<(u64, Msg<'_>), &'static str> {
    let mut c = Cursor(buf);
    if c.array::<4>()? != MAGIC {
        return Err("not a fleetwave multicast datagram");
    }
    if c.u8()? != VERSION {
        return Err("another protocol version");
    }
    let kind = c.u8()?;
    c.take(2)?;
    let session = c.u64()?;
    let msg = match kind {
        ANNOUNCE => Msg::Announce(Announce {
            digest: c.digest()?,
            phase: match c.u8()? {
                0 => Phase::Waiting,
                1 => Phase::Sending,
                2 => Phase::Repairing,
                _ => return Err("unknown phase"),
            },
            round: c.u32()?,
            payload: c.u16()?,
            chunks: c.u32()?,
            receivers: c.u16()?,
        }),
        DATA => {
            let prefix = c.array()?;
            let (seq, chunk, part, parts, clen) =
                (c.u32()?, c.u32()?, c.u32()?, c.u32()?, c.u32()?);
            if parts == 0 || part >= parts || c.0.is_empty() {
                return Err("data datagram with impossible part numbers");
            }
            Msg::Data(Data {
                prefix,
                seq,
                chunk,
                part,
                parts,
                clen,
                bytes: c.0,
            })
        }
        END => Msg::End,
        JOIN => Msg::Join {
            receiver: c.u64()?,
            digest: c.digest()?,
        },
        WELCOME => Msg::Welcome { receiver: c.u64()? },
        REFUSE => Msg::Refuse { receiver: c.u64()? },
        STATUS => {
            let receiver = c.u64()?;
            let received = c.u64()?;
            let lost = c.u64()?;
            let complete = c.u8()? != 0;
            let n = usize::from(c.u16()?);
            if n > WANTS_PER_STATUS || c.0.len() != n * 12 {
                return Err("status datagram of the wrong length");
            }
            let mut wants = Vec::with_capacity(n);
            for _ in 0..n {
                wants.push(Want {
                    chunk: c.u32()?,
                    first: c.u32()?,
                    count: c.u32()?,
                });
            }
            Msg::Status(Status {
                receiver,
                received,
                lost,
                complete,
                wants,
            })
        }
        _ => return Err("unknown message kind"),
    };
    Ok((session, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips_and_every_truncation_is_refused() {
        let d = Digest([7; 32]);
        let msgs = [
            Msg::Announce(Announce {
                digest: d,
                phase: Phase::Repairing,
                round: 3,
                payload: 1428,
                chunks: 900,
                receivers: 3,
            }),
            Msg::Data(Data {
                prefix: [1; 8],
                seq: 9,
                chunk: 4,
                part: 2,
                parts: 5,
                clen: 7000,
                bytes: b"payload",
            }),
            Msg::End,
            Msg::Join {
                receiver: 5,
                digest: d,
            },
            Msg::Welcome { receiver: 5 },
            Msg::Refuse { receiver: 5 },
            Msg::Status(Status {
                receiver: 5,
                received: 1000,
                lost: 12,
                complete: false,
                wants: vec![Want {
                    chunk: 1,
                    first: 0,
                    count: u32::MAX,
                }],
            }),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            encode(&mut buf, 42, m);
            assert_eq!(decode(&buf), Ok((42, m.clone())));
            for n in 0..buf.len() {
                let cut = decode(&buf[..n]);
                // Only a data datagram cut inside its payload is still a datagram.
                let shorter_data = matches!(m, Msg::Data(_)) && n > DATA_HEADER;
                assert_eq!(cut.is_err(), !shorter_data, "{m:?} cut at {n}");
            }
        }
        assert!(decode(b"GARBAGE-GARBAGE-GARBAGE").is_err());
    }
}
