//! Plans and reviews as text for a terminal and as Markdown for a pull-request comment.
//! (JSON is the serde form of the same types.)

use std::fmt::Write;

use super::review::{Changed, Review};
use super::{HostPlan, MulticastSession, Plan, Step, Version, Via, WavePlan};
use crate::diag::Palette;

/// Hosts listed per wave in Markdown before the rest are summarised: pull-request
/// comments have a size limit.
pub const MARKDOWN_HOSTS_PER_WAVE: usize = 100;

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

fn rate(bps: u64) -> String {
    if bps >= 1_000_000_000 && bps.is_multiple_of(1_000_000_000) {
        format!("{} Gbit/s", bps / 1_000_000_000)
    } else {
        format!("{} Mbit/s", bps / 1_000_000)
    }
}

fn version(v: &Version) -> String {
    match v {
        Version::Digest { digest } => digest.short(),
        Version::NextCapture { generation } => format!("(capture generation {generation})"),
    }
}

/// One step in a few words.
pub fn step(s: &Step) -> String {
    match s {
        Step::Inventory { generation } => format!("inventory (generation {generation})"),
        Step::Capture { image, generation } => format!("capture {image} (generation {generation})"),
        Step::Wipe { mode, generation } => {
            format!(
                "wipe {} (generation {generation})",
                format!("{mode:?}").to_lowercase()
            )
        }
        Step::Deploy {
            image,
            version: v,
            bytes: b,
            via,
        } => {
            let how = match via {
                Via::Unicast => match b {
                    Some(b) => format!("unicast, {}", bytes(*b)),
                    None => "unicast".to_string(),
                },
                Via::Multicast { session } => format!("multicast {session}"),
            };
            format!("deploy {image}@{} ({how})", version(v))
        }
        Step::Verify { generation, digest } => {
            format!("verify {} (generation {generation})", digest.short())
        }
    }
}

fn steps(h: &HostPlan) -> String {
    h.steps.iter().map(step).collect::<Vec<_>>().join(", then ")
}

fn session_line(s: &MulticastSession) -> String {
    format!(
        "session {} -> {}:{}, {} host{} (starts at {} or after {}, at most {}){}",
        s.id,
        s.address,
        s.port,
        s.hosts.len(),
        if s.hosts.len() == 1 { "" } else { "s" },
        s.min_receivers,
        duration(s.max_wait_secs),
        rate(s.max_rate_bps),
        s.bytes
            .map(|b| format!(", {}", bytes(b)))
            .unwrap_or_default()
    )
}

fn wave_facts(w: &WavePlan) -> Vec<String> {
    let mut facts = Vec::new();
    if !w.after.is_empty() {
        facts.push(format!("after {}", w.after.join(", ")));
    }
    facts.push(format!("{:?}", w.transport).to_lowercase());
    facts.push(format!(
        "{} host{}",
        w.hosts.len(),
        if w.hosts.len() == 1 { "" } else { "s" }
    ));
    if let Some(p) = w.max_parallel {
        facts.push(format!("{p} at a time"));
    }
    if w.canary > 0 {
        facts.push(format!("{} canary first", w.canary));
    }
    facts.push(format!(
        "{} failure{} tolerated",
        w.failure_budget,
        if w.failure_budget == 1 { "" } else { "s" }
    ));
    facts.push(bytes(w.bytes));
    facts.push(format!("about {}", duration(w.estimated_secs)));
    facts
}

fn headline(plan: &Plan) -> String {
    let t = &plan.totals;
    if plan.is_empty() && plan.suspended.is_empty() {
        return "No changes: every host has converged.".into();
    }
    if plan.is_empty() {
        return "No changes, except for the suspended hosts listed below.".into();
    }
    let mut s = format!(
        "{} host{}, {} step{}, {} to move, about {}",
        t.hosts,
        if t.hosts == 1 { "" } else { "s" },
        t.steps,
        if t.steps == 1 { "" } else { "s" },
        bytes(t.bytes),
        duration(t.estimated_secs)
    );
    if t.unknown_size_steps > 0 {
        let _ = write!(
            s,
            " (+{} step{} of a size not known yet)",
            t.unknown_size_steps,
            if t.unknown_size_steps == 1 { "" } else { "s" }
        );
    }
    s
}

fn host_table_text(out: &mut String, hosts: &[HostPlan], p: Palette) {
    let w_name = hosts.iter().map(|h| h.host.len()).max().unwrap_or(0);
    let w_site = hosts.iter().map(|h| h.site.len()).max().unwrap_or(0);
    for h in hosts {
        let _ = writeln!(
            out,
            "    {}{:w_name$}{}  {}  {:w_site$}  {}",
            p.bold,
            h.host,
            p.reset,
            h.mac,
            h.site,
            steps(h)
        );
    }
}

/// The plan for a terminal.
pub fn plan_text(plan: &Plan, p: Palette) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}Plan:{} {}", p.bold, p.reset, headline(plan));
    if !plan.captures.is_empty() {
        let _ = writeln!(out, "\n  {}Captures{} (before any wave)", p.yellow, p.reset);
        host_table_text(&mut out, &plan.captures, p);
    }
    for w in &plan.waves {
        let _ = writeln!(
            out,
            "\n  {}Wave {}{} ({})",
            p.yellow,
            w.name,
            p.reset,
            wave_facts(w).join(", ")
        );
        if !w.windows.is_empty() {
            let _ = writeln!(out, "    only inside: {}", w.windows.join("; "));
        }
        for s in &w.sessions {
            let _ = writeln!(out, "    {}{}{}", p.cyan, session_line(s), p.reset);
        }
        host_table_text(&mut out, &w.hosts, p);
    }
    if !plan.stalled.is_empty() {
        let _ = writeln!(
            out,
            "\n  {}Stalled{} (need a change to the fleet)",
            p.red, p.reset
        );
        for s in &plan.stalled {
            let _ = writeln!(out, "    {}: {}", s.host, s.reason);
        }
    }
    if !plan.suspended.is_empty() {
        let _ = writeln!(
            out,
            "\n  Suspended, left alone: {}",
            plan.suspended.join(", ")
        );
    }
    out
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

fn host_table_md(out: &mut String, hosts: &[HostPlan]) {
    let _ = writeln!(out, "| host | MAC | site | steps |\n|---|---|---|---|");
    for h in hosts.iter().take(MARKDOWN_HOSTS_PER_WAVE) {
        let _ = writeln!(
            out,
            "| `{}` | `{}` | {} | {} |",
            h.host,
            h.mac,
            h.site,
            md_escape(&steps(h))
        );
    }
    if hosts.len() > MARKDOWN_HOSTS_PER_WAVE {
        let _ = writeln!(
            out,
            "\n...and {} more hosts (run `fleetwave plan` for all).",
            hosts.len() - MARKDOWN_HOSTS_PER_WAVE
        );
    }
}

/// The plan as a pull-request comment.
pub fn plan_markdown(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### fleetwave plan\n\n**{}**", headline(plan));
    if !plan.captures.is_empty() {
        let _ = writeln!(out, "\n#### Captures (before any wave)\n");
        host_table_md(&mut out, &plan.captures);
    }
    for w in &plan.waves {
        let _ = writeln!(
            out,
            "\n#### Wave `{}`\n\n{}",
            w.name,
            wave_facts(w).join(" · ")
        );
        if !w.windows.is_empty() {
            let _ = writeln!(out, "\nOnly inside: {}", w.windows.join("; "));
        }
        for s in &w.sessions {
            let _ = writeln!(out, "\n- multicast {}", session_line(s));
        }
        out.push('\n');
        host_table_md(&mut out, &w.hosts);
    }
    if !plan.stalled.is_empty() {
        let _ = writeln!(out, "\n#### Stalled (need a change to the fleet)\n");
        for s in &plan.stalled {
            let _ = writeln!(out, "- `{}`: {}", s.host, md_escape(&s.reason));
        }
    }
    if !plan.suspended.is_empty() {
        let _ = writeln!(
            out,
            "\nSuspended, left alone: {}",
            plan.suspended.join(", ")
        );
    }
    out
}

fn changed_lines(out: &mut String, title: &str, list: &[Changed], md: bool) {
    if list.is_empty() {
        return;
    }
    if md {
        let _ = writeln!(
            out,
            "\n#### {title}\n\n| name | field | from | to |\n|---|---|---|---|"
        );
        for c in list {
            for f in &c.changes {
                let _ = writeln!(
                    out,
                    "| `{}` | {} | {} | {} |",
                    c.name,
                    f.field,
                    md_escape(&f.from),
                    md_escape(&f.to)
                );
            }
        }
    } else {
        let _ = writeln!(out, "\n  {title}");
        for c in list {
            for f in &c.changes {
                let _ = writeln!(out, "    {}: {} {} -> {}", c.name, f.field, f.from, f.to);
            }
        }
    }
}

fn short_rev(r: &str) -> &str {
    &r[..12.min(r.len())]
}

/// The review of a change, for a terminal (`md = false`) or a pull request.
pub fn review(r: &Review, md: bool, p: Palette) -> String {
    let mut out = String::new();
    let head = if md { "### fleetwave plan: " } else { "" };
    let _ = writeln!(
        out,
        "{head}{}Change{} {} -> {}",
        p.bold,
        p.reset,
        short_rev(&r.base),
        short_rev(&r.head)
    );
    if !r.has_changes() {
        let _ = writeln!(out, "\nNo changes to the fleet.");
        return out;
    }
    let list = |out: &mut String, title: &str, items: Vec<String>| {
        if items.is_empty() {
            return;
        }
        if md {
            let _ = writeln!(out, "\n#### {title}\n");
            for i in items {
                let _ = writeln!(out, "- {i}");
            }
        } else {
            let _ = writeln!(out, "\n  {title}");
            for i in items {
                let _ = writeln!(out, "    {i}");
            }
        }
    };
    let host = |h: &super::review::HostSummary| {
        format!(
            "{} ({}, site {}, image {}, wave {})",
            h.name,
            h.mac,
            h.site,
            h.image.as_deref().unwrap_or("-"),
            h.wave
        )
    };
    list(
        &mut out,
        "Hosts added",
        r.hosts_added.iter().map(host).collect(),
    );
    list(
        &mut out,
        "Hosts removed",
        r.hosts_removed.iter().map(host).collect(),
    );
    changed_lines(&mut out, "Hosts changed", &r.hosts_changed, md);
    changed_lines(&mut out, "Images changed", &r.images_changed, md);
    list(&mut out, "Waves added", r.waves_added.clone());
    list(&mut out, "Waves removed", r.waves_removed.clone());
    changed_lines(&mut out, "Waves changed", &r.waves_changed, md);
    changed_lines(&mut out, "Sites changed", &r.sites_changed, md);
    changed_lines(
        &mut out,
        "Multicast groups changed",
        &r.multicast_changed,
        md,
    );
    if let Some(w) = &r.windows_changed {
        list(
            &mut out,
            "Maintenance windows changed",
            vec![format!(
                "from {} to {}",
                if w.from == "-" { "none" } else { &w.from },
                if w.to == "-" { "none" } else { &w.to }
            )],
        );
    }
    if !r.effect.is_empty() || !r.cancelled.is_empty() {
        if md {
            let _ = writeln!(out, "\n### What this change will do");
        } else {
            let _ = writeln!(out, "\n{}What this change will do{}", p.bold, p.reset);
        }
        for e in &r.effect {
            if md {
                let _ = writeln!(
                    out,
                    "\n#### {}\n",
                    if e.wave == "(captures)" {
                        "Captures".to_string()
                    } else {
                        format!("Wave `{}`", e.wave)
                    }
                );
                host_table_md(&mut out, &e.hosts);
            } else {
                let _ = writeln!(
                    out,
                    "\n  {}{}{}",
                    p.yellow,
                    if e.wave == "(captures)" {
                        "Captures".to_string()
                    } else {
                        format!("Wave {}", e.wave)
                    },
                    p.reset
                );
                host_table_text(&mut out, &e.hosts, p);
            }
        }
        list(&mut out, "No longer planned", r.cancelled.clone());
    }
    list(
        &mut out,
        "Stalled after this change (need another change to converge)",
        r.stalled
            .iter()
            .map(|s| format!("{}: {}", s.host, s.reason))
            .collect(),
    );
    out
}
