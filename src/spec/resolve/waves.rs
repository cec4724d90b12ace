//! `waves:` and `windows:`: wave membership, then the order waves run in.

use super::*;

pub(super) fn resolve_windows(list: &[Sp<String>], cx: &mut Cx) -> Vec<Window> {
    list.iter()
        .filter_map(|w| {
            cx.parse::<Window>(w, "see docs/fleet-yaml.md#windows for the accepted forms")
        })
        .collect()
}

pub(super) fn resolve_waves(raw: &Raw, cx: &mut Cx) -> IndexMap<String, Wave> {
    let mut out = IndexMap::new();
    for (name, e) in &raw.waves.ok {
        let w = &e.value;
        for a in &w.after {
            // The implicit wave of unassigned hosts may be waited for too.
            if a.value != DEFAULT_WAVE {
                raw.waves.check_ref(cx, a, || format!("wave `{name}`"));
            }
            if a.value == *name {
                cx.err(
                    Diagnostic::new(format!("wave `{name}` is after itself"), a.loc)
                        .hint("remove it from its own `after`"),
                );
            }
        }
        let transport = w
            .transport
            .as_ref()
            .map(|t| t.value)
            .unwrap_or(Transport::Unicast);
        if let Some(m) = &w.multicast {
            raw.multicast.check_ref(cx, m, || format!("wave `{name}`"));
            if transport == Transport::Unicast {
                cx.err(
                    Diagnostic::new(
                        format!(
                            "wave `{name}` names a multicast group but its transport is unicast"
                        ),
                        m.loc,
                    )
                    .hint("set `transport: multicast` (or auto), or remove `multicast:`"),
                );
            }
        } else if transport != Transport::Unicast {
            let loc = w.transport.as_ref().map(|t| t.loc).unwrap_or(e.loc);
            cx.err(
                Diagnostic::new(
                    format!(
                        "wave `{name}` uses {} transport but names no multicast group",
                        if transport == Transport::Auto {
                            "auto"
                        } else {
                            "multicast"
                        }
                    ),
                    loc,
                )
                .hint("add `multicast: <group>` naming an entry of the `multicast:` section"),
            );
        }
        let failure_budget = match &w.failure_budget {
            None => FailureBudget::Count(0),
            Some(Sp {
                value: wire::FailureBudget::Count(n),
                ..
            }) => FailureBudget::Count(*n),
            Some(Sp {
                value: wire::FailureBudget::Share(s),
                loc,
            }) => {
                match s
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<f64>().ok())
                    .filter(|p| (0.0..=100.0).contains(p))
                {
                    Some(p) => FailureBudget::Percent(p),
                    None => {
                        cx.err(
                            Diagnostic::new(format!("invalid failure budget `{s}`"), *loc)
                                .hint("write a count like 3 or a share like \"10%\" (0-100%)"),
                        );
                        FailureBudget::Count(0)
                    }
                }
            }
        };
        if let Some(m) = &w.members {
            for h in &m.hosts {
                raw.hosts.check_ref(cx, h, || format!("wave `{name}`"));
            }
            for g in &m.groups {
                raw.groups.check_ref(cx, g, || format!("wave `{name}`"));
            }
        }
        if let Some(p) = &w.max_parallel
            && p.value == 0
        {
            cx.err(
                Diagnostic::new("max_parallel must be at least 1", p.loc)
                    .hint("remove it for no limit"),
            );
        }
        let windows = w.windows.as_ref().map(|l| resolve_windows(l, cx));
        out.insert(
            name.clone(),
            Wave {
                after: w.after.iter().map(|a| a.value.clone()).collect(),
                transport,
                multicast: w.multicast.as_ref().map(|m| m.value.clone()),
                max_parallel: w.max_parallel.as_ref().map(|p| p.value),
                canary: w.canary.as_ref().map(|c| c.value).unwrap_or(0),
                failure_budget,
                windows,
                declared: true,
            },
        );
    }
    out
}

/// Give every host exactly one wave: its own `wave:` (or its groups'), or the wave whose
/// `members` select it, or the implicit `default` wave.
pub(super) fn assign_waves(
    raw: &Raw,
    hosts: &mut IndexMap<String, Host, FxBuildHasher>,
    waves: &mut IndexMap<String, Wave>,
    cx: &mut Cx,
) {
    // host -> (wave, where the claim was made)
    let mut claims: FxHashMap<String, (String, Option<Loc>)> = FxHashMap::default();
    for (wname, e) in &raw.waves.ok {
        let Some(m) = &e.value.members else { continue };
        let mut claim = |host: &str, loc: Loc, cx: &mut Cx| {
            let Some(h) = hosts.get(host) else { return };
            if !h.wave.is_empty() && h.wave != *wname {
                cx.err(
                    Diagnostic::new(format!("host `{host}` is in wave `{}` but wave `{wname}` also claims it", h.wave), loc)
                        .note_opt(raw.hosts.ok.get(host).and_then(|e| e.value.wave.as_ref()).map(|w| (format!("`{host}` names wave `{}` here", h.wave), w.loc)))
                        .hint("a host is in one wave: remove it from this wave's members or change its `wave:`"),
                );
                return;
            }
            match claims.get(host) {
                Some((other, other_loc)) if other != wname => {
                    let mut d = Diagnostic::new(
                        format!("host `{host}` is claimed by waves `{other}` and `{wname}`"),
                        loc,
                    )
                    .hint("a host is in one wave: narrow the members of one of them");
                    if let Some(l) = other_loc {
                        d = d.note(format!("wave `{other}` claims it here"), *l);
                    }
                    cx.err(d);
                }
                Some(_) => {}
                None => {
                    claims.insert(host.to_string(), (wname.clone(), Some(loc)));
                }
            }
        };
        for h in &m.hosts {
            claim(&h.value, h.loc, cx);
        }
        for g in &m.groups {
            let members: Vec<String> = hosts
                .values()
                .filter(|h| h.groups.contains(&g.value))
                .map(|h| h.name.clone())
                .collect();
            for h in members {
                claim(&h, g.loc, cx);
            }
        }
        if let Some(sel) = &m.selector {
            let members: Vec<String> = hosts
                .values()
                .filter(|h| selects(sel, &h.labels))
                .map(|h| h.name.clone())
                .collect();
            for h in members {
                claim(&h, e.loc, cx);
            }
        }
    }
    let mut needs_default = false;
    for h in hosts.values_mut() {
        if h.wave.is_empty() {
            match claims.get(&h.name) {
                Some((w, _)) => h.wave = w.clone(),
                None => {
                    h.wave = DEFAULT_WAVE.to_string();
                    needs_default = true;
                }
            }
        }
    }
    let referenced = waves
        .values()
        .any(|w| w.after.iter().any(|a| a == DEFAULT_WAVE));
    if (needs_default || referenced) && !waves.contains_key(DEFAULT_WAVE) {
        waves.insert(
            DEFAULT_WAVE.to_string(),
            Wave {
                after: Vec::new(),
                transport: Transport::Unicast,
                multicast: None,
                max_parallel: None,
                canary: 0,
                failure_budget: FailureBudget::Count(0),
                windows: None,
                declared: false,
            },
        );
    }
}

/// Order waves so each comes after everything in its `after`; report cycles.
pub(super) fn order_waves(
    raw: &Raw,
    waves: IndexMap<String, Wave>,
    cx: &mut Cx,
) -> IndexMap<String, Wave> {
    let mut graph: DiGraph<&str, ()> = DiGraph::new();
    let mut index: BTreeMap<&str, NodeIndex> = BTreeMap::new();
    for name in waves.keys() {
        index.insert(name, graph.add_node(name));
    }
    for (name, w) in &waves {
        for a in &w.after {
            if let (Some(&from), Some(&to)) = (index.get(a.as_str()), index.get(name.as_str()))
                && from != to
            {
                graph.add_edge(from, to, ());
            }
        }
    }
    for scc in petgraph::algo::tarjan_scc(&graph) {
        if scc.len() < 2 {
            continue;
        }
        // Walk the cycle from its alphabetically first wave, so the message is stable.
        let members: BTreeSet<&str> = scc.iter().map(|n| graph[*n]).collect();
        let Some(&start) = members.iter().next() else {
            continue;
        };
        let mut path = vec![start];
        let mut cur = start;
        loop {
            // Next: a member wave that lists `cur` in its `after` (edges go from prerequisite to dependent).
            let next = members.iter().copied().find(|m| {
                waves[*m].after.iter().any(|a| a == cur) && (!path.contains(m) || *m == start)
            });
            match next {
                Some(n) if n == start => {
                    path.push(start);
                    break;
                }
                Some(n) => {
                    path.push(n);
                    cur = n;
                }
                None => break,
            }
        }
        // Point at the `after` entry that closes the cycle.
        let closing = path.len().checked_sub(2).map(|i| (path[i], path[i + 1]));
        let loc = closing
            .and_then(|(prev, last)| {
                raw.waves.ok.get(last).and_then(|e| {
                    e.value
                        .after
                        .iter()
                        .find(|a| a.value == prev)
                        .map(|a| a.loc)
                })
            })
            .or_else(|| raw.waves.ok.get(start).map(|e| e.loc))
            .unwrap_or_default();
        let shown: Vec<&str> = path.iter().rev().copied().collect();
        cx.err(
            Diagnostic::new(format!("waves wait for each other in a cycle: {} (→ means \"waits for\")", shown.join(" → ")), loc)
                .hint("each wave waits for those in its `after`; break the cycle by removing one of these entries"),
        );
    }
    // Kahn's algorithm with a sorted ready set: a stable order, ties by name.
    let mut indegree: HashMap<NodeIndex, usize> = graph
        .node_indices()
        .map(|n| {
            (
                n,
                graph
                    .neighbors_directed(n, petgraph::Direction::Incoming)
                    .count(),
            )
        })
        .collect();
    let mut ready: BTreeSet<(&str, NodeIndex)> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(n, _)| (graph[*n], *n))
        .collect();
    let mut order: Vec<&str> = Vec::new();
    while let Some(first) = ready.pop_first() {
        order.push(first.0);
        for next in graph.neighbors_directed(first.1, petgraph::Direction::Outgoing) {
            if let Some(d) = indegree.get_mut(&next) {
                *d -= 1;
                if *d == 0 {
                    ready.insert((graph[next], next));
                }
            }
        }
    }
    // Waves on a cycle (already reported) go last, so nothing is lost.
    for name in waves.keys() {
        if !order.contains(&name.as_str()) {
            order.push(name);
        }
    }
    let order: Vec<String> = order.into_iter().map(String::from).collect();
    let mut waves = waves;
    order
        .iter()
        .filter_map(|n| waves.swap_remove_entry(n))
        .collect()
}
