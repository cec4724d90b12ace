//! `hosts:`: each host with its group defaults and selectors applied, its disk, address
//! and actions.

use super::*;

fn disk_selector(d: &wire::DiskSelector, cx: &mut Cx) -> DiskSelector {
    let size = d
        .size
        .as_ref()
        .and_then(|s| cx.parse::<SizeRange>(s, "write it like 256G, >=200G or 200G-600G"));
    if let Some(m) = &d.model
        && let Err(e) = glob::Pattern::new(&m.value)
    {
        cx.err(
            Diagnostic::new(format!("invalid model pattern `{}`: {e}", m.value), m.loc)
                .hint("use * and ? as wildcards"),
        );
    }
    DiskSelector {
        size,
        serial: d.serial.clone(),
        model: d.model.as_ref().map(|m| m.value.clone()),
        path: d.path.clone(),
    }
}

pub(super) fn selects(selector: &IndexMap<String, String>, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Group selectors indexed by one of their labels, so matching a host costs a few
/// lookups instead of a pass over every group (thousands of rooms, 100,000 hosts).
struct SelectorIndex<'a> {
    by_label: FxHashMap<(&'a str, &'a str), Vec<(&'a str, &'a Selector)>>,
    /// Empty selectors: they select every host.
    everyone: Vec<&'a str>,
}

impl<'a> SelectorIndex<'a> {
    fn new(groups: &'a Section<wire::Group>) -> Self {
        let mut index = SelectorIndex {
            by_label: FxHashMap::default(),
            everyone: Vec::new(),
        };
        for (name, g) in &groups.ok {
            let Some(sel) = &g.value.selector else {
                continue;
            };
            match sel.value.first() {
                Some((k, v)) => index
                    .by_label
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push((name.as_str(), &sel.value)),
                None => index.everyone.push(name),
            }
        }
        index
    }

    fn matching(&self, labels: &Labels) -> Vec<&'a str> {
        let mut out = self.everyone.clone();
        for (k, v) in labels.iter() {
            if let Some(candidates) = self.by_label.get(&(k.as_str(), v.as_str())) {
                out.extend(
                    candidates
                        .iter()
                        .filter(|(_, sel)| selects(sel, labels))
                        .map(|(n, _)| *n),
                );
            }
        }
        out
    }
}

pub(super) fn resolve_hosts(
    raw: &Raw,
    sites: &IndexMap<String, Site>,
    cx: &mut Cx,
) -> IndexMap<String, Host, FxBuildHasher> {
    let selectors = SelectorIndex::new(&raw.groups);
    let entries: Vec<(&String, &Entry<wire::Host>)> = raw.hosts.ok.iter().collect();
    // Per-host checks touch nothing shared, so they run on every core; duplicates
    // across hosts are found afterwards, in file order.
    let resolved = crate::par::map_chunks(&entries, |chunk| {
        chunk
            .iter()
            .map(|(name, e)| {
                let mut local = Cx {
                    problems: Vec::new(),
                };
                let host = resolve_host(raw, sites, &selectors, name, e, &mut local);
                (host, local.problems)
            })
            .collect()
    });
    let mut out = IndexMap::with_capacity_and_hasher(entries.len(), FxBuildHasher);
    let mut macs: FxHashMap<Mac, (&str, Loc)> =
        FxHashMap::with_capacity_and_hasher(entries.len(), FxBuildHasher);
    let mut ips: FxHashMap<Ipv4Addr, (&str, Loc)> = FxHashMap::default();
    for ((name, e), (host, problems)) in entries.iter().zip(resolved) {
        cx.problems.extend(problems);
        let Some(host) = host else { continue };
        let mut unique = true;
        match macs.get(&host.mac) {
            Some((other, loc)) => {
                cx.err(
                    Diagnostic::new(
                        format!(
                            "duplicate MAC {}: hosts `{other}` and `{name}` both use it",
                            host.mac
                        ),
                        e.value.mac.loc,
                    )
                    .note(format!("`{other}` uses it here"), *loc)
                    .hint("every machine has its own MAC; fix the typo or remove one of the hosts"),
                );
                unique = false;
            }
            None => {
                macs.insert(host.mac, (name, e.value.mac.loc));
            }
        }
        if let (Some(addr), Some(ip_s)) = (host.ip, &e.value.ip) {
            match ips.get(&addr) {
                Some((other, loc)) => {
                    cx.err(
                        Diagnostic::new(format!("duplicate fixed IP {addr}: hosts `{other}` and `{name}` both use it"), ip_s.loc)
                            .note(format!("`{other}` uses it here"), *loc)
                            .hint("give each host its own address"),
                    );
                    unique = false;
                }
                None => {
                    ips.insert(addr, (name, ip_s.loc));
                }
            }
        }
        if unique {
            out.insert((*name).clone(), host);
        }
    }
    out
}

/// What an address of the site is already used for, if anything.
fn reserved_address(site: &Site, addr: Ipv4Addr) -> Option<&'static str> {
    if addr == site.server {
        Some("the server's address")
    } else if Some(addr) == site.dhcp.router {
        Some("the router's address")
    } else if addr == site.subnet.network() {
        Some("the network address of the subnet")
    } else if addr == site.subnet.broadcast() {
        Some("the broadcast address of the subnet")
    } else {
        None
    }
}

/// One host with its group defaults applied, or `None` when it has problems (reported).
fn resolve_host(
    raw: &Raw,
    sites: &IndexMap<String, Site>,
    selectors: &SelectorIndex,
    name: &str,
    e: &Entry<wire::Host>,
    cx: &mut Cx,
) -> Option<Host> {
    let h = &e.value;
    let mac = match h.mac.value.parse::<Mac>() {
        Ok(m) => Some(m),
        Err(e) => {
            let hint = if e.contains("multicast") {
                "the first pair of a NIC's MAC is even; check for a typo in it"
            } else {
                "write it as six hex pairs separated by colons, like 52:54:00:28:00:11"
            };
            cx.err(Diagnostic::new(e, h.mac.loc).hint(hint));
            None
        }
    };
    // Groups: named by the host, or selecting it by its own labels.
    // Own labels first: a group's label never replaces one the host has.
    let own_labels: Labels = h.labels.iter().collect();
    let mut groups: Vec<&str> = Vec::new();
    for g in &h.groups {
        if raw.groups.check_ref(cx, g, || format!("host `{name}`"))
            && raw.groups.ok.contains_key(&g.value)
        {
            groups.push(&g.value);
        }
    }
    for gname in selectors.matching(&own_labels) {
        if !groups.contains(&gname) {
            groups.push(gname);
        }
    }
    groups.sort_unstable();
    let group_entries: Vec<(&str, &wire::Group)> = groups
        .iter()
        .map(|g| (*g, &*raw.groups.ok[*g].value))
        .collect();

    let site = pick(
        cx,
        name,
        h.site.as_ref(),
        &group_entries,
        |g| g.site.as_ref(),
        "site",
    );
    let image = pick(
        cx,
        name,
        h.image.as_ref(),
        &group_entries,
        |g| g.image.as_ref(),
        "image",
    );
    let wave = pick(
        cx,
        name,
        h.wave.as_ref(),
        &group_entries,
        |g| g.wave.as_ref(),
        "wave",
    );
    let disk = match &h.disk {
        Some(d) => Some(d),
        None => {
            let from: Vec<(&str, &wire::DiskSelector)> = group_entries
                .iter()
                .filter_map(|(n, g)| g.disk.as_ref().map(|d| (*n, d)))
                .collect();
            if from.len() > 1 {
                cx.err(
                    Diagnostic::new(
                        format!(
                            "host `{name}` gets a disk selector from several groups: {}",
                            from.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                        ),
                        e.loc,
                    )
                    .hint("set `disk` on the host, or keep it in one group only"),
                );
            }
            from.first().map(|(_, d)| *d)
        }
    };
    let suspend = h
        .suspend
        .or_else(|| group_entries.iter().find_map(|(_, g)| g.suspend))
        .unwrap_or(false);
    let wake = h
        .wake
        .or_else(|| group_entries.iter().find_map(|(_, g)| g.wake));
    let heal = h
        .heal
        .or_else(|| group_entries.iter().find_map(|(_, g)| g.heal))
        .unwrap_or_default();
    let mut labels = own_labels;
    for (_, g) in &group_entries {
        for (k, v) in &g.labels {
            labels.add_missing(k, v);
        }
    }

    // A default that came from a group was checked once, at the group.
    let own = |v: Option<&Sp<String>>, o: &Option<Sp<String>>| v.is_some() && o.is_some();
    let site_name = match site {
        Some(s) => {
            if own(site, &h.site) {
                raw.sites.check_ref(cx, s, || format!("host `{name}`"));
            } else if !raw.sites.knows(&s.value) {
                return None;
            }
            Some(s.value.clone())
        }
        None => {
            cx.err(
                Diagnostic::new(format!("host `{name}` has no site"), e.loc)
                    .hint("set `site:` on the host or on a group that selects it"),
            );
            None
        }
    };
    if let Some(i) = image
        && own(image, &h.image)
    {
        raw.images.check_ref(cx, i, || format!("host `{name}`"));
    }
    if let Some(w) = wave
        && own(wave, &h.wave)
    {
        raw.waves.check_ref(cx, w, || format!("host `{name}`"));
    }
    let site = site_name.as_deref().and_then(|s| sites.get(s));
    let mut ip = None;
    if let Some(ip_s) = &h.ip
        && let Some(addr) = cx.std::<Ipv4Addr>(
            ip_s,
            "fixed IP",
            "write the fixed address as an IPv4 address, like 172.28.0.11",
        )
    {
        ip = Some(addr);
        if let (Some(site), Some(sname)) = (site, site_name.as_deref()) {
            if !site.subnet.contains(&addr) {
                cx.err(
                    Diagnostic::new(format!("fixed IP {addr} of host `{name}` is outside subnet {} of site `{sname}`", site.subnet), ip_s.loc)
                        .hint("pick an address inside the site's subnet, or move the host to the right site"),
                );
            } else if let Some(pool) = site.dhcp.pool.filter(|p| p.contains(addr)) {
                cx.err(
                    Diagnostic::new(format!("fixed IP {addr} of host `{name}` is inside the dynamic pool {pool} of site `{sname}`"), ip_s.loc)
                        .hint("reservations must lie outside the pool, or a pool client could be handed the same address"),
                );
            } else if let Some(what) = reserved_address(site, addr) {
                cx.err(
                    Diagnostic::new(
                        format!("fixed IP {addr} of host `{name}` is {what}"),
                        ip_s.loc,
                    )
                    .hint("pick a free host address"),
                );
            }
        }
    }
    let disk = disk.map(|d| disk_selector(d, cx)).unwrap_or_default();
    let mut actions = Actions::default();
    if let Some(a) = &h.actions {
        if let Some(c) = &a.capture {
            raw.images
                .check_ref(cx, &c.image, || format!("capture action of host `{name}`"));
            actions.capture = Some(CaptureAction {
                image: c.image.value.clone(),
                generation: cx.generation(&c.generation),
            });
        }
        actions.wipe = a.wipe.as_ref().map(|w| WipeAction {
            mode: w.mode,
            generation: cx.generation(&w.generation),
        });
        actions.inventory = a.inventory.as_ref().map(|g| cx.generation(&g.generation));
        actions.verify = a.verify.as_ref().map(|g| cx.generation(&g.generation));
    }
    if !cx.problems.is_empty() {
        return None;
    }
    Some(Host {
        name: name.to_string(),
        mac: mac?,
        site: site_name?,
        ip,
        labels,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        image: image.map(|i| i.value.clone()),
        wave: wave.map(|w| w.value.clone()).unwrap_or_default(),
        disk,
        suspend,
        wake,
        heal,
        actions,
    })
}

/// The host's own value, or the one its groups agree on.
pub(super) fn pick<'a>(
    cx: &mut Cx,
    host: &str,
    own: Option<&'a Sp<String>>,
    groups: &[(&str, &'a wire::Group)],
    field: fn(&'a wire::Group) -> Option<&'a Sp<String>>,
    what: &str,
) -> Option<&'a Sp<String>> {
    if own.is_some() {
        return own;
    }
    let mut found: Option<(&str, &'a Sp<String>)> = None;
    for (gname, g) in groups {
        if let Some(v) = field(g) {
            match found {
                Some((first, fv)) if fv.value != v.value => {
                    cx.err(
                        Diagnostic::new(
                            format!("host `{host}` gets {what} `{}` from group `{first}` and `{}` from group `{gname}`", fv.value, v.value),
                            v.loc,
                        )
                        .note(format!("group `{first}` sets it here"), fv.loc)
                        .hint(format!("set `{what}` on the host itself, or make the groups agree")),
                    );
                }
                Some(_) => {}
                None => found = Some((gname, v)),
            }
        }
    }
    found.map(|(_, v)| v)
}
