//! Writes a large, valid fleet and an observed state for benchmarks:
//! `cargo run --release --example gen_fleet -- HOSTS [DIR]` writes DIR/fleet.yaml and DIR/observed.json.
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
    // --split: the same hosts, one file per room under rooms/, pulled in by `include:`.
    let split = args.next().is_some_and(|a| a == "--split");
    let mut rooms: Vec<String> = vec![String::new(); 400];
    std::fs::create_dir_all(&dir)?;
    let per_site = 250;
    let sites = hosts.div_ceil(per_site);
    let mut s = String::with_capacity(hosts * 140);
    s.push_str("# yaml-language-server: $schema=fleet.schema.json\n");
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
    s.push_str("windows: [\"Sat 22:00 - Sun 06:00\", \"Mon-Fri 19:00 - 23:00\"]\n");
    if split {
        s.push_str("include: [rooms/*.yaml]\n");
    }
    s.push_str("hosts:\n  ref0: {mac: \"02:ff:00:00:00:01\", site: site0, ip: 10.0.0.254}\n");
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
        let room = (h / 25) % 400;
        let out = if split { &mut rooms[room] } else { &mut s };
        let _ = writeln!(
            out,
            "  pc{h:06}: {{mac: \"02:00:{:02x}:{:02x}:{:02x}:{:02x}\", site: site{site}, ip: 10.{a}.{b}.{n}, image: {image}, wave: {wave}, labels: {{room: r{}}}}}",
            (h >> 24) & 0xff,
            (h >> 16) & 0xff,
            (h >> 8) & 0xff,
            h & 0xff,
            room
        );
    }
    if split {
        std::fs::create_dir_all(dir.join("rooms"))?;
        for (r, hosts) in rooms.iter().enumerate().filter(|(_, h)| !h.is_empty()) {
            let text =
                format!("# yaml-language-server: $schema=../fleet.schema.json\nhosts:\n{hosts}");
            std::fs::write(dir.join(format!("rooms/r{r:03}.yaml")), text)?;
        }
    }
    let path = dir.join("fleet.yaml");
    std::fs::File::create(&path)?.write_all(s.as_bytes())?;
    eprintln!(
        "wrote {} ({} bytes, {hosts} hosts)",
        path.display(),
        s.len()
    );

    // Observed state: every image has versions; most hosts already run the newest,
    // the rest run an older one or nothing, so the plan has real work.
    let digest = |n: u8| format!("blake3:{}", format!("{n:02x}").repeat(32));
    let mut o = String::with_capacity(hosts * 100);
    let version = |d: String, disk: u64, stored: u64| {
        format!(
            r#"{{"digest": "{d}", "generation": 1, "disk_bytes": {disk}, "stored_bytes": {stored}}}"#
        )
    };
    let _ = write!(
        o,
        r#"{{"images": {{"ref": {{"versions": [{}]}}, "win11": {{"versions": [{}, {}]}}, "ubuntu": {{"versions": [{}]}}}}, "hosts": ["#,
        version(digest(1), 64_000_000_000, 20_000_000_000),
        version(digest(2), 128_000_000_000, 30_000_000_000),
        version(digest(3), 128_000_000_000, 31_000_000_000),
        version(digest(4), 64_000_000_000, 8_000_000_000),
    );
    for h in 0..hosts {
        let deployed = match (h % 4, h % 7 == 0) {
            (0, _) => String::new(),
            (_, true) => format!(r#", "deployed": "{}""#, digest(4)),
            (1, false) => format!(r#", "deployed": "{}""#, digest(2)),
            (_, false) => format!(r#", "deployed": "{}""#, digest(3)),
        };
        let sep = if h == 0 { "" } else { "," };
        let _ = write!(
            o,
            "{sep}\n{{\"mac\": \"02:00:{:02x}:{:02x}:{:02x}:{:02x}\"{deployed}}}",
            (h >> 24) & 0xff,
            (h >> 16) & 0xff,
            (h >> 8) & 0xff,
            h & 0xff
        );
    }
    o.push_str("]}\n");
    std::fs::File::create(dir.join("observed.json"))?.write_all(o.as_bytes())?;
    Ok(())
}
