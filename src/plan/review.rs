//! The pull-request view: what changes between two versions of a fleet, and what
//! that change will make happen to which machines, in which wave.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{HostPlan, Plan, Step};
use crate::spec::{FleetSpec, Host, Wave};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Review {
    pub base: String,
    pub head: String,
    pub hosts_added: Vec<HostSummary>,
    pub hosts_removed: Vec<HostSummary>,
    pub hosts_changed: Vec<Changed>,
    pub images_changed: Vec<Changed>,
    pub waves_added: Vec<String>,
    pub waves_removed: Vec<String>,
    pub waves_changed: Vec<Changed>,
    pub sites_changed: Vec<Changed>,
    pub multicast_changed: Vec<Changed>,
    /// The fleet-wide maintenance windows, when they change.
    pub windows_changed: Option<FieldChange>,
    /// Hosts this change leaves unable to converge, and why.
    pub stalled: Vec<super::Stalled>,
    /// Steps the head plans that the base did not (or planned differently), by wave.
    pub effect: Vec<WaveEffect>,
    /// `host (wave)` whose base steps the head no longer plans there.
    pub cancelled: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostSummary {
    pub name: String,
    pub mac: String,
    pub site: String,
    pub image: Option<String>,
    pub wave: String,
}

/// One named thing and what changed in it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Changed {
    pub name: String,
    pub changes: Vec<FieldChange>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldChange {
    pub field: String,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WaveEffect {
    pub wave: String,
    pub hosts: Vec<HostPlan>,
}

impl Review {
    pub fn has_changes(&self) -> bool {
        !(self.hosts_added.is_empty()
            && self.hosts_removed.is_empty()
            && self.hosts_changed.is_empty()
            && self.images_changed.is_empty()
            && self.waves_added.is_empty()
            && self.waves_removed.is_empty()
            && self.waves_changed.is_empty()
            && self.sites_changed.is_empty()
            && self.multicast_changed.is_empty()
            && self.windows_changed.is_none())
    }
}

fn summary(h: &Host) -> HostSummary {
    HostSummary {
        name: h.name.clone(),
        mac: h.mac.to_string(),
        site: h.site.clone(),
        image: h.image.clone(),
        wave: h.wave.clone(),
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

/// Field-by-field changes of two values; `fields` maps a name to a rendering.
/// A field's name and how to show its value.
type Field<T> = (&'static str, fn(&T) -> String);

fn compare<T>(a: &T, b: &T, fields: &[Field<T>]) -> Vec<FieldChange> {
    fields
        .iter()
        .filter_map(|(name, f)| {
            let (from, to) = (f(a), f(b));
            (from != to).then(|| FieldChange {
                field: name.to_string(),
                from,
                to,
            })
        })
        .collect()
}

const HOST_FIELDS: &[Field<Host>] = &[
    ("image", |h| opt(&h.image)),
    ("wave", |h| h.wave.clone()),
    ("mac", |h| h.mac.to_string()),
    ("site", |h| h.site.clone()),
    ("ip", |h| opt(&h.ip)),
    ("suspend", |h| h.suspend.to_string()),
    ("disk", |h| {
        if h.disk.is_empty() {
            "-".into()
        } else {
            serde_json::to_string(&h.disk).unwrap_or_default()
        }
    }),
    ("actions.capture", |h| {
        opt(&h
            .actions
            .capture
            .as_ref()
            .map(|c| format!("{} generation {}", c.image, c.generation)))
    }),
    ("actions.wipe", |h| {
        opt(&h
            .actions
            .wipe
            .as_ref()
            .map(|w| format!("{:?} generation {}", w.mode, w.generation).to_lowercase()))
    }),
    ("actions.inventory", |h| {
        opt(&h.actions.inventory.map(|g| format!("generation {g}")))
    }),
    ("actions.verify", |h| {
        opt(&h.actions.verify.map(|g| format!("generation {g}")))
    }),
    ("labels", |h| {
        h.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }),
];

const WAVE_FIELDS: &[Field<Wave>] = &[
    ("after", |w| w.after.join(", ")),
    ("transport", |w| format!("{:?}", w.transport).to_lowercase()),
    ("multicast", |w| opt(&w.multicast)),
    ("max_parallel", |w| opt(&w.max_parallel)),
    ("canary", |w| w.canary.to_string()),
    ("failure_budget", |w| match w.failure_budget {
        crate::spec::FailureBudget::Count(n) => n.to_string(),
        crate::spec::FailureBudget::Percent(p) => format!("{p}%"),
    }),
    ("windows", |w| {
        opt(&w.windows.as_ref().map(|l| {
            l.iter()
                .map(|x| x.text.clone())
                .collect::<Vec<_>>()
                .join("; ")
        }))
    }),
];

/// Changes of a keyed collection: (added, removed, changed).
fn keyed<T, S: std::hash::BuildHasher>(
    base: &indexmap::IndexMap<String, T, S>,
    head: &indexmap::IndexMap<String, T, S>,
    fields: &[Field<T>],
) -> (Vec<String>, Vec<String>, Vec<Changed>) {
    let added = head
        .keys()
        .filter(|k| !base.contains_key(*k))
        .cloned()
        .collect();
    let removed = base
        .keys()
        .filter(|k| !head.contains_key(*k))
        .cloned()
        .collect();
    let mut changed: Vec<Changed> = head
        .iter()
        .filter_map(|(k, h)| {
            let b = base.get(k)?;
            let changes = compare(b, h, fields);
            (!changes.is_empty()).then(|| Changed {
                name: k.clone(),
                changes,
            })
        })
        .collect();
    changed.sort_by(|a, b| a.name.cmp(&b.name));
    (added, removed, changed)
}

/// Compare two fleets and the plans each gives against the same observed state.
pub fn review(
    base_rev: &str,
    head_rev: &str,
    base: &FleetSpec,
    head: &FleetSpec,
    base_plan: &Plan,
    head_plan: &Plan,
) -> Review {
    let (added, removed, hosts_changed) = keyed(&base.hosts, &head.hosts, HOST_FIELDS);
    let mut hosts_added: Vec<HostSummary> = added.iter().map(|n| summary(&head.hosts[n])).collect();
    let mut hosts_removed: Vec<HostSummary> =
        removed.iter().map(|n| summary(&base.hosts[n])).collect();
    hosts_added.sort_by(|a, b| a.name.cmp(&b.name));
    hosts_removed.sort_by(|a, b| a.name.cmp(&b.name));
    let (waves_added, waves_removed, waves_changed) = keyed(&base.waves, &head.waves, WAVE_FIELDS);
    let (img_added, img_removed, mut images_changed) = keyed(
        &base.images,
        &head.images,
        &[
            ("pin", |i| opt(&i.pin)),
            ("capture", |i| {
                opt(&i
                    .capture
                    .as_ref()
                    .map(|c| format!("from {} generation {}", c.host, c.generation)))
            }),
            ("os", |i| {
                opt(&i.os.map(|o| format!("{o:?}").to_lowercase()))
            }),
        ],
    );
    for (names, what) in [(img_added, "added"), (img_removed, "removed")] {
        for n in names {
            images_changed.push(Changed {
                name: n,
                changes: vec![FieldChange {
                    field: "image".into(),
                    from: if what == "added" {
                        "-".into()
                    } else {
                        "defined".into()
                    },
                    to: if what == "added" {
                        "defined".into()
                    } else {
                        "-".into()
                    },
                }],
            });
        }
    }
    images_changed.sort_by(|a, b| a.name.cmp(&b.name));
    let (s_added, s_removed, mut sites_changed) = keyed(
        &base.sites,
        &head.sites,
        &[("settings", |s| serde_json::to_string(s).unwrap_or_default())],
    );
    let (m_added, m_removed, mut multicast_changed) = keyed(
        &base.multicast,
        &head.multicast,
        &[("settings", |m| serde_json::to_string(m).unwrap_or_default())],
    );
    for (list, added, removed) in [
        (&mut sites_changed, s_added, s_removed),
        (&mut multicast_changed, m_added, m_removed),
    ] {
        for n in added {
            list.push(Changed {
                name: n,
                changes: vec![FieldChange {
                    field: "defined".into(),
                    from: "-".into(),
                    to: "yes".into(),
                }],
            });
        }
        for n in removed {
            list.push(Changed {
                name: n,
                changes: vec![FieldChange {
                    field: "defined".into(),
                    from: "yes".into(),
                    to: "-".into(),
                }],
            });
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }

    // The effect: host plans of the head that differ from the base's.
    let base_steps: BTreeMap<(&str, &str), &Vec<Step>> = base_plan
        .host_plans()
        .map(|(w, h)| ((w, h.host.as_str()), &h.steps))
        .collect();
    let head_keys: std::collections::HashSet<(&str, &str)> = head_plan
        .host_plans()
        .map(|(w, h)| (w, h.host.as_str()))
        .collect();
    let mut effect: Vec<WaveEffect> = Vec::new();
    for (wave, h) in head_plan.host_plans() {
        if base_steps.get(&(wave, h.host.as_str())) == Some(&&h.steps) {
            continue;
        }
        match effect.last_mut() {
            Some(e) if e.wave == wave => e.hosts.push(h.clone()),
            _ => effect.push(WaveEffect {
                wave: wave.to_string(),
                hosts: vec![h.clone()],
            }),
        }
    }
    let mut cancelled: Vec<String> = base_steps
        .keys()
        .filter(|k| !head_keys.contains(*k))
        .map(|(w, h)| format!("{h} ({w})"))
        .collect();
    cancelled.dedup();
    Review {
        base: base_rev.to_string(),
        head: head_rev.to_string(),
        hosts_added,
        hosts_removed,
        hosts_changed,
        images_changed,
        waves_added,
        waves_removed,
        waves_changed,
        sites_changed,
        multicast_changed,
        windows_changed: {
            let show = |s: &FleetSpec| {
                s.windows
                    .iter()
                    .map(|w| w.text.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let (from, to) = (show(base), show(head));
            (from != to).then(|| FieldChange {
                field: "windows".into(),
                from: if from.is_empty() { "-".into() } else { from },
                to: if to.is_empty() { "-".into() } else { to },
            })
        },
        // Only what this change stalls: hosts stalled before it are not its doing.
        stalled: head_plan
            .stalled
            .iter()
            .filter(|s| !base_plan.stalled.contains(s))
            .cloned()
            .collect(),
        effect,
        cancelled,
    }
}
