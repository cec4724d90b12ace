//! `fleetwave multicast send`: one multicast session from a local image store, the
//! same sender `fleetwave serve` runs for a wave's session.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::exit;
use crate::image::store::Store;
use crate::multicast::{self, SendConfig};

pub struct SendArgs<'a> {
    pub store: &'a Path,
    pub image: &'a str,
    pub group: SocketAddrV4,
    pub bind: Ipv4Addr,
    pub min_receivers: u32,
    pub max_wait: Duration,
    pub max_rate_bps: u64,
    pub json: bool,
}

pub fn send(a: &SendArgs, out: &mut dyn Write) -> Result<u8> {
    let store = Store::open_existing(a.store)?;
    let digest = store.resolve(a.image)?;
    let mut cfg = SendConfig::new(a.group, a.bind);
    cfg.min_receivers = a.min_receivers;
    cfg.max_wait = a.max_wait;
    cfg.max_rate_bps = a.max_rate_bps;
    let stop = super::stop_flag();
    let r = multicast::send(&store, &digest, &cfg, &|| {
        stop.load(std::sync::atomic::Ordering::Relaxed)
    })?;
    if a.json {
        super::print_json(out, &r)?;
    } else {
        writeln!(
            out,
            "session {} of {} on {}: {}; {} of {} receivers complete ({} lossy); \
             {} datagrams ({} repairs, {} of them to one receiver; {} rounds), {:.1} MB \
             on the wire in {:.2} s \
             (pass {:.2} s, {:.0} Mbit/s), waited {:.1} s",
            r.session,
            r.digest,
            r.group,
            r.ended,
            r.receivers_complete,
            r.receivers_joined,
            r.receivers_lossy,
            r.datagrams,
            r.repair_datagrams,
            r.repairs_unicast,
            r.rounds,
            r.wire_bytes as f64 / 1e6,
            r.send_secs,
            r.pass_secs,
            r.wire_bytes as f64 * 8.0 / r.pass_secs.max(1e-9) / 1e6,
            r.waited_secs
        )?;
    }
    Ok(if r.ended == "complete" {
        exit::OK
    } else {
        exit::CHANGES
    })
}
