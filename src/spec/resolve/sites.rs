//! `sites:`: addresses, subnets, DHCP pools and the checks between them.

use super::*;

pub(super) fn resolve_sites(raw: &Raw, cx: &mut Cx) -> IndexMap<String, Site> {
    let mut out = IndexMap::new();
    for (name, e) in &raw.sites.ok {
        let s = &e.value;
        let before = cx.problems.len();
        let server = cx.std::<Ipv4Addr>(
            &s.server,
            "server address",
            "give this server's IPv4 address on the site, like 172.28.0.1",
        );
        let subnet = cx.std::<Ipv4Net>(
            &s.subnet,
            "subnet",
            "write the subnet in CIDR form, like 172.28.0.0/24",
        );
        if let Some(net) = subnet
            && net != net.trunc()
        {
            cx.err(
                Diagnostic::new(format!("subnet {net} has host bits set"), s.subnet.loc).hint(
                    format!(
                        "did you mean {}? a subnet is written with its network address",
                        net.trunc()
                    ),
                ),
            );
        }
        let subnet = subnet.map(|n| n.trunc());
        let relayed = s.relayed.as_ref().is_some_and(|r| r.value);
        if let (Some(ip), Some(net), false) = (server, subnet, relayed)
            && !net.contains(&ip)
        {
            cx.err(
                Diagnostic::new(
                    format!("server address {ip} is outside the site's subnet {net}"),
                    s.server.loc,
                )
                .note("subnet declared here", s.subnet.loc)
                .hint("the server must have an address on the network it serves; if its clients come through a DHCP relay, add `relayed: true`"),
            );
        }
        let mut dhcp = Dhcp {
            // Without a `dhcp:` section, only PXE options: never hand out addresses on a
            // network nobody said was ours.
            mode: DhcpMode::Proxy,
            pool: None,
            router: None,
            dns: Vec::new(),
            domain: None,
            lease_secs: 3600,
        };
        if let Some(d) = &s.dhcp {
            dhcp.mode = d.mode.value;
            dhcp.domain = d.domain.clone();
            if let Some(p) = &d.pool
                && let Some(pool) = cx.parse::<IpRange>(
                    p,
                    "write the pool as first-last, like 172.28.0.100-172.28.0.199",
                )
            {
                if let Some(net) = subnet
                    && !(net.contains(&pool.first) && net.contains(&pool.last))
                {
                    cx.err(
                        Diagnostic::new(
                            format!("pool {pool} is outside the site's subnet {net}"),
                            p.loc,
                        )
                        .note("subnet declared here", s.subnet.loc)
                        .hint("pick a pool inside the subnet"),
                    );
                } else if let (Some(net), Some(ip)) = (subnet, server) {
                    let taken = [
                        ("the server's address", ip),
                        ("the network address", net.network()),
                        ("the broadcast address", net.broadcast()),
                    ];
                    if let Some((what, addr)) = taken.iter().find(|(_, a)| pool.contains(*a)) {
                        cx.err(
                            Diagnostic::new(format!("pool {pool} contains {what} {addr}"), p.loc)
                                .hint(format!(
                                    "keep {addr} out of the pool; hand out only free host addresses"
                                )),
                        );
                    }
                }
                if d.mode.value != DhcpMode::Authoritative {
                    cx.err(
                            Diagnostic::new("a pool needs `mode: authoritative`", p.loc)
                                .note("mode set here", d.mode.loc)
                                .hint("in proxy mode the other DHCP server hands out addresses; remove the pool"),
                        );
                }
                dhcp.pool = Some(pool);
            }
            if let Some(r) = &d.router
                && let Some(ip) =
                    cx.std::<Ipv4Addr>(r, "router address", "give the gateway's IPv4 address")
            {
                if let Some(net) = subnet
                    && !net.contains(&ip)
                {
                    cx.err(
                        Diagnostic::new(
                            format!("router {ip} is outside the site's subnet {net}"),
                            r.loc,
                        )
                        .hint("clients can only reach a gateway on their own subnet"),
                    );
                }
                dhcp.router = Some(ip);
            }
            for dns in &d.dns {
                if let Some(ip) = cx.std::<Ipv4Addr>(
                    dns,
                    "DNS server address",
                    "give DNS servers as IPv4 addresses",
                ) {
                    dhcp.dns.push(ip);
                }
            }
            if let Some(l) = &d.lease
                && let Some(secs) = cx.with(l, parse_duration, "write the lease like 1h, 30m or 1d")
            {
                if secs < 60 {
                    cx.err(
                        Diagnostic::new(
                            format!("lease `{}` is shorter than a minute", l.value),
                            l.loc,
                        )
                        .hint("use at least 1m; clients renew at half the lease"),
                    );
                }
                dhcp.lease_secs = secs;
            }
        }
        // A router that is also the server was reported with the pool already.
        if let (Some(pool), Some(router), Some(d)) = (dhcp.pool, dhcp.router, &s.dhcp)
            && pool.contains(router)
            && Some(router) != server
            && let Some(p) = &d.pool
        {
            cx.err(
                Diagnostic::new(
                    format!("pool {pool} contains the router's address {router}"),
                    p.loc,
                )
                .hint(format!(
                    "keep {router} out of the pool; hand out only free host addresses"
                )),
            );
        }
        if s.interface.value.is_empty()
            || s.interface.value.len() > 15
            || s.interface.value.contains(['/', ' '])
        {
            cx.err(
                Diagnostic::new(
                    format!("invalid interface name `{}`", s.interface.value),
                    s.interface.loc,
                )
                .hint("Linux interface names are 1 to 15 characters, without `/` or spaces"),
            );
        }
        let image_store = s
            .image_store
            .as_ref()
            .map(|p| p.value.clone())
            .unwrap_or_else(|| "/images".into());
        if let Some(p) = &s.image_store
            && !p.value.starts_with('/')
        {
            cx.err(
                Diagnostic::new(
                    format!("image store `{}` is not an absolute path", p.value),
                    p.loc,
                )
                .hint("write the full path, like /images"),
            );
        }
        if cx.problems.len() != before {
            continue;
        }
        if let (Some(server), Some(subnet)) = (server, subnet) {
            let authoritative = dhcp.mode == crate::spec::DhcpMode::Authoritative;
            out.insert(
                name.clone(),
                Site {
                    interface: s.interface.value.clone(),
                    server,
                    subnet,
                    relayed: s.relayed.as_ref().is_some_and(|r| r.value),
                    dhcp,
                    unknown_hosts: s
                        .unknown_hosts
                        .as_ref()
                        .map(|u| u.value)
                        .unwrap_or(UnknownHosts::Register),
                    image_store,
                    wake: s.wake.unwrap_or(false),
                    secure_boot: s.secure_boot.unwrap_or(false),
                    ipv6_ra: s.ipv6_ra.unwrap_or(authoritative),
                },
            );
        }
    }
    out
}

/// Sites are separate networks: overlapping subnets would make addresses ambiguous.
pub(super) fn check_subnet_overlap(raw: &Raw, sites: &IndexMap<String, Site>, cx: &mut Cx) {
    let list: Vec<(&String, &Site)> = sites.iter().collect();
    for (i, (a, sa)) in list.iter().enumerate() {
        for (b, sb) in &list[i + 1..] {
            if sa.subnet.contains(&sb.subnet.network()) || sb.subnet.contains(&sa.subnet.network())
            {
                let (Some(ea), Some(eb)) = (raw.sites.ok.get(*a), raw.sites.ok.get(*b)) else {
                    continue;
                };
                cx.err(
                    Diagnostic::new(
                        format!(
                            "subnet {} of site `{b}` overlaps subnet {} of site `{a}`",
                            sb.subnet, sa.subnet
                        ),
                        eb.value.subnet.loc,
                    )
                    .note(format!("site `{a}` declares it here"), ea.value.subnet.loc)
                    .hint("each site is its own network; give each a subnet of its own"),
                );
            }
        }
    }
}
