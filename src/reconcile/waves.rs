//! The wave gates, pure: which hosts with due work may start now.
//!
//! Waves open in DAG order: a wave opens when every wave it comes `after` is done
//! (each of its hosts Ready, or failed within that wave's budget). Inside an open
//! wave the canaries go first and the rest only once every canary is Ready; at most
//! `max_parallel` hosts are in flight; a wave over its failure budget arms nothing
//! more. Maintenance windows hold destructive work until they open.

use std::collections::HashMap;

use super::host::Gate;
pub use crate::protocol::WaveView;
use crate::spec::{FleetSpec, Window};

/// Where one member of a wave stands, as the gates see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// Nothing due.
    Done,
    /// A task armed and not ended.
    InFlight,
    /// Work due, not started; `destructive` when it writes the disk.
    Due { destructive: bool },
    /// Out of retries (or stalled by the fleet): counts against the budget.
    Failed,
    /// Suspended or held by something else (a capture to come): neither blocks nor
    /// counts.
    Idle,
}

/// Minutes of the week (Monday 00:00 = 0) at Unix time `now` (UTC).
pub fn minute_of_week(now: u64) -> u32 {
    // 1970-01-01 was a Thursday: day 3 of a week that starts on Monday.
    let minutes = now / 60;
    (((minutes / 1440 + 3) % 7) * 1440 + minutes % 1440) as u32
}

/// The Unix time the windows next open at or after `now`; `None` if none ever does.
pub fn next_opening(windows: &[Window], now: u64) -> Option<u64> {
    let start = now - now % 60;
    (0..7 * 24 * 60u64)
        .map(|m| start + m * 60)
        .find(|&t| windows.iter().any(|w| w.contains(minute_of_week(t))))
}

/// Whether destructive work may start at `now` (no windows: any time).
pub fn window_open(windows: &[Window], now: u64) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(minute_of_week(now)))
}

/// The gate of every host with due work, and each wave's view. `members` gives each
/// host's place; hosts are taken in name order (the plan's order) for canaries and
/// for the parallel slots.
pub fn gates(
    spec: &FleetSpec,
    members: &HashMap<&str, Member>,
    now: u64,
) -> (HashMap<String, Gate>, Vec<WaveView>) {
    let mut by_wave: HashMap<&str, Vec<(&str, Member)>> = HashMap::new();
    for h in spec.hosts.values() {
        let m = members
            .get(h.name.as_str())
            .copied()
            .unwrap_or(Member::Idle);
        by_wave
            .entry(h.wave.as_str())
            .or_default()
            .push((&h.name, m));
    }
    let mut complete: HashMap<&str, bool> = HashMap::new();
    let mut out = HashMap::new();
    let mut views = Vec::new();
    // `spec.waves` is in DAG order: every wave's `after` is decided before it.
    for (name, wave) in &spec.waves {
        let mut hosts = by_wave.remove(name.as_str()).unwrap_or_default();
        hosts.sort_by(|a, b| a.0.cmp(b.0));
        let count = |f: fn(Member) -> bool| hosts.iter().filter(|(_, m)| f(*m)).count();
        let done = count(|m| m == Member::Done);
        let failed = count(|m| m == Member::Failed);
        let in_flight = count(|m| m == Member::InFlight);
        let budget = wave.failure_budget.allowed(hosts.len());
        let blocking_before: Vec<&str> = wave
            .after
            .iter()
            .filter(|a| !complete.get(a.as_str()).copied().unwrap_or(true))
            .map(String::as_str)
            .collect();
        let halted = failed as u32 > budget;
        let settled = hosts
            .iter()
            .all(|(_, m)| matches!(m, Member::Done | Member::Failed | Member::Idle));
        complete.insert(
            name.as_str(),
            blocking_before.is_empty() && settled && !halted,
        );
        let canaries: Vec<&str> = hosts
            .iter()
            .take(wave.canary as usize)
            .map(|(h, _)| *h)
            .collect();
        let canaries_ready = hosts
            .iter()
            .take(wave.canary as usize)
            .all(|(_, m)| *m == Member::Done);
        let windows = spec.windows_for(name);
        let (state, message) = if !blocking_before.is_empty() {
            (
                "waiting",
                format!("waits for wave {} to finish", blocking_before.join(", ")),
            )
        } else if halted {
            (
                "halted",
                format!(
                    "{failed} hosts failed, over the failure budget of {budget}: nothing more is armed until a commit or `fleetwave retry`"
                ),
            )
        } else if settled && done + failed < hosts.len() {
            // Hosts held by something outside the wave (a capture to come, `suspend`):
            // it does not block the waves after it, but it is not done either.
            let idle = hosts.len() - done - failed;
            (
                "idle",
                format!("{idle} of its hosts have nothing due now (see each host's reason)"),
            )
        } else if settled {
            ("done", String::new())
        } else {
            ("open", String::new())
        };
        let mut slots = wave
            .max_parallel
            .map_or(usize::MAX, |m| (m as usize).saturating_sub(in_flight));
        for (i, (host, m)) in hosts.iter().enumerate() {
            let Member::Due { destructive } = *m else {
                continue;
            };
            let wait = |reason: &str, message: String, until: Option<u64>| Gate::Wait {
                reason: reason.into(),
                message,
                until,
            };
            let gate = if state == "waiting" {
                wait("WaveWaiting", format!("wave {name} {message}"), None)
            } else if state == "halted" {
                wait(
                    "FailureBudgetExceeded",
                    format!("wave {name}: {message}"),
                    None,
                )
            } else if i >= canaries.len() && !canaries_ready {
                wait(
                    "CanariesFirst",
                    format!(
                        "wave {name} waits for its canaries ({}) to be Ready",
                        canaries.join(", ")
                    ),
                    None,
                )
            } else if destructive && !window_open(windows, now) {
                let until = next_opening(windows, now);
                let texts: Vec<&str> = windows.iter().map(|w| w.text.as_str()).collect();
                wait(
                    "OutsideWindow",
                    format!(
                        "destructive work waits for a maintenance window ({})",
                        texts.join(", ")
                    ),
                    until,
                )
            } else if slots == 0 {
                wait(
                    "MaxParallel",
                    format!(
                        "wave {name} has {} hosts in flight (max_parallel)",
                        wave.max_parallel.unwrap_or(0)
                    ),
                    None,
                )
            } else {
                slots -= 1;
                Gate::Open
            };
            out.insert(host.to_string(), gate);
        }
        views.push(WaveView {
            name: name.clone(),
            state: state.into(),
            message,
            hosts: hosts.len(),
            done,
            in_flight,
            failed,
            failure_budget: budget,
            canaries: canaries.iter().map(|c| c.to_string()).collect(),
        });
    }
    (out, views)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet of `hosts` in wave `w1`, then `w2` after it.
    pub(crate) fn spec(waves: &str, hosts: &str) -> FleetSpec {
        let text = format!(
            "version: 1
sites:
  lab: {{interface: eth0, server: 172.28.0.1, subnet: 172.28.0.0/24, dhcp: {{mode: off}}}}
images:
  win10: {{os: windows}}
hosts:
{hosts}waves:
{waves}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fleet.yaml");
        std::fs::write(&path, text).expect("write");
        match crate::cli::load(&crate::source::DirTree, &path).expect("load") {
            Ok((spec, _)) => spec,
            Err(i) => panic!(
                "test fleet invalid: {:?}",
                i.problems
                    .iter()
                    .map(|d| crate::diag::render(d, &i.sources, crate::diag::Palette::PLAIN))
                    .collect::<Vec<_>>()
            ),
        }
    }

    fn hosts(wave: &str, n: usize, first: usize) -> String {
        (first..first + n)
            .map(|i| {
                format!("  pc{i:02}: {{mac: \"52:54:00:00:00:{i:02x}\", site: lab, image: win10, wave: {wave}}}\n")
            })
            .collect()
    }

    const DUE: Member = Member::Due { destructive: true };

    fn open(gates: &HashMap<String, Gate>) -> Vec<&str> {
        let mut v: Vec<&str> = gates
            .iter()
            .filter(|(_, g)| **g == Gate::Open)
            .map(|(h, _)| h.as_str())
            .collect();
        v.sort();
        v
    }

    fn reason<'a>(gates: &'a HashMap<String, Gate>, host: &str) -> &'a str {
        match gates.get(host) {
            Some(Gate::Wait { reason, .. }) => reason,
            Some(Gate::Open) => "Open",
            None => "none",
        }
    }

    #[test]
    fn the_second_wave_waits_until_every_host_of_the_first_is_ready() {
        let s = spec(
            "  w1: {}\n  w2: {after: [w1]}\n",
            &(hosts("w1", 2, 1) + &hosts("w2", 2, 3)),
        );
        let mut m: HashMap<&str, Member> = HashMap::new();
        m.insert("pc01", Member::Done);
        m.insert("pc02", Member::InFlight);
        m.insert("pc03", DUE);
        m.insert("pc04", DUE);
        let (g, views) = gates(&s, &m, 0);
        assert!(open(&g).is_empty());
        assert_eq!(reason(&g, "pc03"), "WaveWaiting");
        assert_eq!(views[1].state, "waiting");
        m.insert("pc02", Member::Done);
        let (g, views) = gates(&s, &m, 0);
        assert_eq!(open(&g), vec!["pc03", "pc04"]);
        assert_eq!(views[0].state, "done");
    }

    #[test]
    fn canaries_go_first_and_the_rest_follow_once_they_are_ready() {
        let s = spec("  w1: {canary: 1}\n", &hosts("w1", 3, 1));
        let mut m: HashMap<&str, Member> = HashMap::new();
        for h in ["pc01", "pc02", "pc03"] {
            m.insert(h, DUE);
        }
        let (g, _) = gates(&s, &m, 0);
        assert_eq!(open(&g), vec!["pc01"]);
        assert_eq!(reason(&g, "pc02"), "CanariesFirst");
        m.insert("pc01", Member::Done);
        let (g, _) = gates(&s, &m, 0);
        assert_eq!(open(&g), vec!["pc02", "pc03"]);
    }

    #[test]
    fn at_most_max_parallel_hosts_are_in_flight() {
        let s = spec("  w1: {max_parallel: 2}\n", &hosts("w1", 4, 1));
        let mut m: HashMap<&str, Member> = HashMap::new();
        m.insert("pc01", Member::InFlight);
        for h in ["pc02", "pc03", "pc04"] {
            m.insert(h, DUE);
        }
        let (g, _) = gates(&s, &m, 0);
        assert_eq!(open(&g), vec!["pc02"]);
        assert_eq!(reason(&g, "pc03"), "MaxParallel");
    }

    #[test]
    fn a_wave_over_its_failure_budget_arms_nothing_more_and_its_successors_wait() {
        let s = spec(
            "  w1: {failure_budget: 1}\n  w2: {after: [w1]}\n",
            &(hosts("w1", 4, 1) + &hosts("w2", 1, 5)),
        );
        let mut m: HashMap<&str, Member> = HashMap::new();
        m.insert("pc01", Member::Failed);
        m.insert("pc02", Member::Done);
        m.insert("pc03", DUE);
        m.insert("pc04", Member::Done);
        m.insert("pc05", DUE);
        // One failure is within the budget: the wave goes on.
        let (g, _) = gates(&s, &m, 0);
        assert_eq!(open(&g), vec!["pc03"]);
        // A wave settled within its budget lets the next one start.
        m.insert("pc03", Member::Done);
        let (g, _) = gates(&s, &m, 0);
        assert_eq!(open(&g), vec!["pc05"]);
        // Two are over it: halted, and the next wave waits.
        m.insert("pc02", Member::Failed);
        m.insert("pc03", DUE);
        let (g, views) = gates(&s, &m, 0);
        assert!(open(&g).is_empty());
        assert_eq!(reason(&g, "pc03"), "FailureBudgetExceeded");
        assert_eq!(views[0].state, "halted");
        assert_eq!(reason(&g, "pc05"), "WaveWaiting");
    }

    #[test]
    fn a_closed_window_holds_destructive_work_until_it_opens_and_says_when() {
        // 2026-12-05 is a Saturday; the window opens at 22:00 UTC.
        let s = spec(
            "  w1: {windows: [\"Sat 22:00 - Sun 06:00\"]}\n",
            &hosts("w1", 1, 1),
        );
        let sat_noon = 1_796_472_000; // 2026-12-05 12:00 UTC, a Saturday
        assert_eq!(minute_of_week(sat_noon), 5 * 1440 + 12 * 60);
        let mut m: HashMap<&str, Member> = HashMap::new();
        m.insert("pc01", DUE);
        let (g, _) = gates(&s, &m, sat_noon);
        let Some(Gate::Wait { reason, until, .. }) = g.get("pc01") else {
            panic!("not held: {g:?}");
        };
        assert_eq!(reason, "OutsideWindow");
        assert_eq!(*until, Some(sat_noon + 10 * 3600));
        let (g, _) = gates(&s, &m, sat_noon + 10 * 3600);
        assert_eq!(open(&g), vec!["pc01"]);
        // Work that writes nothing is not held.
        m.insert("pc01", Member::Due { destructive: false });
        let (g, _) = gates(&s, &m, sat_noon);
        assert_eq!(open(&g), vec!["pc01"]);
    }
}
