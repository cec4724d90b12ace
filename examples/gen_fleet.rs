//! Writes a large, valid fleet for benchmarks: `cargo run --release --example gen_fleet -- HOSTS [DIR]`.
//!
//! Hosts are spread over sites of up to 250 hosts each (one /24 per site), grouped in
//! rooms of 25 by label, and assigned to three waves: a canary wave, then unicast and
//! multicast waves per site, so validate and plan do all their work.

use std::fmt::Write as _;
use std::io::Write;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let hosts: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
    std::fs::create_dir_all(&dir)?;
    let per_site = 250;
    let sites = hosts.div_ceil(per_site);
    let mut s = String::with_capacity(hosts * 140);
    s.push_str("# yaml-language-server: $schema=https://fleetwave.invalid/fleet.schema.json\n");
    let _ = writeln!(
        s,
        "# Generated: {hosts} hosts on {sites} sites.\nversion: 1\nsites:"
    );
    for i in 0..sites {
        let (a, b) = (i / 250, i % 250);
        let _ = writeln!(
            s,
            "  site{i}:\n    interface: eth{}\n    server: 10.{a}.{b}.1\n    subnet: 10.{a}.{b}.0/24\n    dhcp: {{mode: authoritative, pool: 10.{a}.{b}.2-10.{a}.{b}.3, router: 10.{a}.{b}.1, lease: 1h}}",
            i % 8
        );
    }
    s.push_str("images:\n  ref: {os: windows, capture: {from: ref0, generation: 1}}\n  win11: {os: windows}\n  ubuntu: {os: linux}\n");
    s.push_str("groups:\n");
    for r in 0..hosts.div_ceil(25).min(400) {
        let _ = writeln!(
            s,
            "  room{r}: {{selector: {{room: r{r}}}, labels: {{floor: f{}}}}}",
            r % 10
        );
    }
    s.push_str("multicast:\n");
    for i in 0..sites {
        let _ = writeln!(
            s,
            "  mc{i}: {{address: 239.{}.{}.1, port: 9000, min_receivers: 10, max_wait: 10m, max_rate: 900Mbit}}",
            i / 250,
            i % 250
        );
    }
    s.push_str("waves:\n  canary: {transport: unicast, max_parallel: 10}\n");
    for i in 0..sites {
        let _ = writeln!(
            s,
            "  site{i}-uni: {{after: [canary], transport: unicast, max_parallel: 50, failure_budget: \"5%\"}}\n  site{i}-multi: {{after: [site{i}-uni], transport: multicast, multicast: mc{i}, canary: 2}}"
        );
    }
    s.push_str("windows: [\"Sat 22:00 - Sun 06:00\", \"Mon-Fri 19:00 - 23:00\"]\nhosts:\n  ref0: {mac: \"02:ff:00:00:00:01\", site: site0, ip: 10.0.0.254}\n");
    for h in 0..hosts {
        let site = h / per_site;
        let (a, b) = (site / 250, site % 250);
        let n = h % per_site + 4;
        let wave = if h < 20 {
            "canary".to_string()
        } else if h % 3 == 0 {
            format!("site{site}-uni")
        } else {
            format!("site{site}-multi")
        };
        let image = if h % 7 == 0 { "ubuntu" } else { "win11" };
        let _ = writeln!(
            s,
            "  pc{h:06}: {{mac: \"02:00:{:02x}:{:02x}:{:02x}:{:02x}\", site: site{site}, ip: 10.{a}.{b}.{n}, image: {image}, wave: {wave}, labels: {{room: r{}}}}}",
            (h >> 24) & 0xff,
            (h >> 16) & 0xff,
            (h >> 8) & 0xff,
            h & 0xff,
            (h / 25) % 400
        );
    }
    let path = dir.join("fleet.yaml");
    std::fs::File::create(&path)?.write_all(s.as_bytes())?;
    eprintln!(
        "wrote {} ({} bytes, {hosts} hosts)",
        path.display(),
        s.len()
    );
    Ok(())
}
