//! `multicast:` groups, and the check that a group's receivers share a site.

use super::*;

pub(super) fn resolve_multicast(raw: &Raw, cx: &mut Cx) -> IndexMap<String, MulticastGroup> {
    let mut out = IndexMap::new();
    let mut addresses: HashMap<(Ipv4Addr, u16), (String, Loc)> = HashMap::new();
    for (name, e) in &raw.multicast.ok {
        let m = &e.value;
        let Some(address) = cx.std::<Ipv4Addr>(
            &m.address,
            "multicast address",
            "use an IPv4 multicast address, normally in 239.0.0.0/8",
        ) else {
            continue;
        };
        if !address.is_multicast() {
            cx.err(
                Diagnostic::new(
                    format!("{address} is not a multicast address"),
                    m.address.loc,
                )
                .hint("use an address in 239.0.0.0/8 (organisation-local multicast)"),
            );
            continue;
        }
        let port = m.port.as_ref().map(|p| p.value).unwrap_or(9000);
        if let Some(p) = &m.port
            && p.value < 1024
        {
            cx.err(
                Diagnostic::new(format!("port {} is a privileged port", p.value), p.loc)
                    .hint("use a port of 1024 or above, like 9000"),
            );
        }
        if let Some((other, loc)) = addresses.get(&(address, port)) {
            cx.err(
                Diagnostic::new(format!("multicast group `{name}` uses {address}:{port} like `{other}`"), m.address.loc)
                    .note("also used here", *loc)
                    .hint("give each multicast group its own address or port, or sessions would receive each other's data"),
            );
        }
        addresses.insert((address, port), (name.clone(), m.address.loc));
        let min_receivers = m.min_receivers.as_ref().map(|v| v.value).unwrap_or(1);
        if let Some(v) = &m.min_receivers
            && v.value == 0
        {
            cx.err(
                Diagnostic::new("min_receivers must be at least 1", v.loc)
                    .hint("a session needs a receiver; use 1 to start with the first one"),
            );
        }
        let max_wait_secs = match &m.max_wait {
            Some(w) => cx
                .with(w, parse_duration, "write it like 10m or 1h")
                .unwrap_or(300),
            None => 300,
        };
        let max_rate_bps = match &m.max_rate {
            Some(r) => cx
                .with(r, parse_rate, "write it like 900Mbit, 1Gbit or 100MB/s")
                .unwrap_or(900_000_000),
            None => 900_000_000,
        };
        out.insert(
            name.clone(),
            MulticastGroup {
                address,
                port,
                min_receivers,
                max_wait_secs,
                max_rate_bps,
            },
        );
    }
    out
}

/// A multicast group serves one L2 segment: its hosts must all be on one site.
pub(super) fn check_multicast_sites(
    raw: &Raw,
    hosts: &IndexMap<String, Host, FxBuildHasher>,
    waves: &IndexMap<String, Wave>,
    cx: &mut Cx,
) {
    let mut sites: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for h in hosts.values() {
        if h.image.is_none() {
            continue;
        }
        let Some(group) = waves.get(&h.wave).and_then(|w| w.multicast.as_deref()) else {
            continue;
        };
        sites
            .entry(group)
            .or_default()
            .entry(&h.site)
            .or_insert(&h.name);
    }
    for (group, by_site) in sites {
        if by_site.len() < 2 {
            continue;
        }
        let Some(e) = raw.multicast.ok.get(group) else {
            continue;
        };
        let examples: Vec<String> = by_site
            .iter()
            .map(|(s, h)| format!("`{h}` on `{s}`"))
            .collect();
        cx.err(
            Diagnostic::new(
                format!(
                    "multicast group `{group}` has hosts on several sites: {}",
                    examples.join(", ")
                ),
                e.loc,
            )
            .notes(by_site.iter().filter_map(|(s, h)| {
                let e = raw.hosts.ok.get(*h)?;
                let loc = e.value.site.as_ref().map(|x| x.loc).unwrap_or(e.loc);
                Some((format!("`{h}` is on site `{s}`"), loc))
            }))
            .hint(
                "multicast stays inside one network: use one multicast group (and wave) per site",
            ),
        );
    }
}
