//! `diff(desired, observed) -> Plan`: what has to happen to which host, in which wave.
//!
//! Pure: the same inputs give the same plan, byte for byte. The controller will run
//! this same function and then apply it.

pub mod render;
pub mod review;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::observed::{ImageVersion, Observed, ObservedHost};
use crate::spec::{Digest, FleetSpec, Host, Transport, WipeMode};

/// Assumptions behind the byte and duration estimates.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Params {
    /// The server's link, shared by every transfer of a wave.
    pub server_link_bps: u64,
    /// One client's link.
    pub host_link_bps: u64,
    /// Netboot, partition fix-up and read-back verify, per host, on top of the transfer.
    pub per_host_overhead_secs: u64,
    /// Disk read rate of a capture, for its estimate.
    pub capture_bytes_per_sec: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            server_link_bps: 1_000_000_000,
            host_link_bps: 1_000_000_000,
            per_host_overhead_secs: 90,
            capture_bytes_per_sec: 100_000_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Plan {
    /// Captures run before any wave: the waves may need their images.
    pub captures: Vec<HostPlan>,
    /// Waves with work, in DAG order.
    pub waves: Vec<WavePlan>,
    /// Hosts that cannot converge until the fleet changes (no image version, say).
    pub stalled: Vec<Stalled>,
    /// Suspended hosts that would otherwise have work.
    pub suspended: Vec<String>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Totals {
    pub hosts: usize,
    pub steps: usize,
    /// Bytes over the network, where sizes are known.
    pub bytes: u64,
    /// Steps whose size is not known yet (their image is still to be captured).
    pub unknown_size_steps: usize,
    /// Along the longest chain of waves.
    pub estimated_secs: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WavePlan {
    pub name: String,
    pub after: Vec<String>,
    pub transport: Transport,
    pub max_parallel: Option<u32>,
    pub canary: u32,
    /// Failures tolerated among this wave's hosts.
    pub failure_budget: u32,
    /// Destructive work starts only inside these; empty means any time.
    pub windows: Vec<String>,
    pub hosts: Vec<HostPlan>,
    pub sessions: Vec<MulticastSession>,
    pub bytes: u64,
    pub estimated_secs: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostPlan {
    pub host: String,
    pub mac: crate::spec::Mac,
    pub site: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    Inventory {
        generation: u64,
    },
    Capture {
        image: String,
        generation: u64,
    },
    Wipe {
        mode: WipeMode,
        generation: u64,
    },
    Deploy {
        image: String,
        version: Version,
        /// Bytes this host pulls over unicast; 0 for multicast (counted on the session).
        bytes: Option<u64>,
        via: Via,
    },
    /// Check that the disk holds `digest`: the version deployed earlier in this plan,
    /// or else the one the host last reported.
    Verify {
        generation: u64,
        digest: Digest,
    },
}

/// Which version of an image a deploy writes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Version {
    Digest {
        digest: Digest,
    },
    /// The version the planned capture of this generation will produce.
    NextCapture {
        generation: u64,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum Via {
    Unicast,
    Multicast { session: String },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MulticastSession {
    /// `wave/site/image`.
    pub id: String,
    pub group: String,
    pub address: String,
    pub port: u16,
    pub site: String,
    pub image: String,
    pub version: Version,
    pub hosts: Vec<String>,
    pub min_receivers: u32,
    pub max_wait_secs: u64,
    pub max_rate_bps: u64,
    /// Bytes sent once for the whole session.
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stalled {
    pub host: String,
    pub reason: String,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.totals.steps == 0 && self.stalled.is_empty()
    }

    /// Every host plan, captures first.
    pub fn host_plans(&self) -> impl Iterator<Item = (&str, &HostPlan)> {
        self.captures.iter().map(|h| ("(captures)", h)).chain(
            self.waves
                .iter()
                .flat_map(|w| w.hosts.iter().map(move |h| (w.name.as_str(), h))),
        )
    }
}

/// The version an image's hosts should run, or why there is none.
enum Want<'a> {
    Version(&'a ImageVersion),
    /// Pinned or known digest without size information.
    Digest(Digest),
    NextCapture(u64),
    Stalled(String),
}

fn wanted<'a>(spec: &FleetSpec, observed: &'a Observed, image: &str) -> Want<'a> {
    let Some(img) = spec.images.get(image) else {
        return Want::Stalled(format!("image `{image}` is not defined"));
    };
    let versions = observed
        .images
        .get(image)
        .map(|i| i.versions.as_slice())
        .unwrap_or(&[]);
    if let Some(pin) = &img.pin {
        return match versions.iter().find(|v| v.digest == *pin) {
            Some(v) => Want::Version(v),
            None => Want::Digest(*pin),
        };
    }
    match &img.capture {
        Some(c) => {
            // A newer generation is asked for: deploy what it will produce, not the old one.
            if let Some(v) = versions.iter().rev().find(|v| v.generation >= c.generation) {
                Want::Version(v)
            } else if spec.hosts.get(&c.host).is_some_and(|h| !h.suspend) {
                Want::NextCapture(c.generation)
            } else {
                Want::Stalled(format!(
                    "image `{image}` has no version of generation {} and its reference host `{}` is suspended",
                    c.generation, c.host
                ))
            }
        }
        None => match versions.last() {
            Some(v) => Want::Version(v),
            None => Want::Stalled(format!(
                "image `{image}` has no version yet and no `capture:`; capture it or import one"
            )),
        },
    }
}

/// The steps a host needs, in the order they run. Captures come back separately.
fn host_steps(
    spec: &FleetSpec,
    observed: &Observed,
    host: &Host,
    seen: Option<&ObservedHost>,
    stalled: &mut Vec<Stalled>,
) -> (Option<Step>, Vec<Step>) {
    let done = seen.map(|s| s.done).unwrap_or_default();
    let mut steps = Vec::new();
    let mut capture = None;
    let a = &host.actions;
    if let Some(g) = a.inventory
        && g > done.inventory
    {
        steps.push(Step::Inventory { generation: g });
    }
    // A capture is due while the store holds no version of that generation; the
    // store, not the host, is what the deploys depend on.
    if let Some(c) = &a.capture
        && !observed
            .images
            .get(&c.image)
            .is_some_and(|i| i.versions.iter().any(|v| v.generation >= c.generation))
    {
        capture = Some(Step::Capture {
            image: c.image.clone(),
            generation: c.generation,
        });
    }
    let mut wiped = false;
    if let Some(w) = &a.wipe
        && w.generation > done.wipe
    {
        steps.push(Step::Wipe {
            mode: w.mode,
            generation: w.generation,
        });
        wiped = true;
    }
    if let Some(image) = &host.image {
        let deployed = seen.and_then(|s| s.deployed.as_ref());
        let (version, bytes) = match wanted(spec, observed, image) {
            Want::Version(v) => (
                Some(Version::Digest { digest: v.digest }),
                Some(v.stored_bytes),
            ),
            Want::Digest(d) => (Some(Version::Digest { digest: d }), None),
            Want::NextCapture(generation) => (Some(Version::NextCapture { generation }), None),
            Want::Stalled(reason) => {
                stalled.push(Stalled {
                    host: host.name.clone(),
                    reason,
                });
                (None, None)
            }
        };
        if let Some(version) = version {
            let current =
                matches!(&version, Version::Digest { digest } if Some(digest) == deployed);
            if !current || wiped {
                steps.push(Step::Deploy {
                    image: image.clone(),
                    version,
                    bytes,
                    via: Via::Unicast,
                });
            }
        }
    }
    if let Some(g) = a.verify
        && g > done.verify
    {
        let planned = steps.iter().rev().find_map(|s| match s {
            Step::Deploy {
                version: Version::Digest { digest },
                ..
            } => Some(*digest),
            _ => None,
        });
        match planned.or_else(|| seen.and_then(|s| s.deployed)) {
            Some(digest) => steps.push(Step::Verify { generation: g, digest }),
            None => stalled.push(Stalled {
                host: host.name.clone(),
                reason: format!(
                    "verify (generation {g}): no version is known to be on its disk; deploy one first"
                ),
            }),
        }
    }
    (capture, steps)
}

fn secs_for(bytes: u64, bps: u64) -> u64 {
    if bps == 0 {
        return 0;
    }
    (bytes.saturating_mul(8)).div_ceil(bps)
}

/// The plan that takes the fleet from `observed` to `spec`.
pub fn diff(spec: &FleetSpec, observed: &Observed, params: &Params) -> Plan {
    let by_mac = observed.by_mac();
    let mut stalled = Vec::new();
    let mut suspended = Vec::new();
    let mut captures = Vec::new();
    let mut per_wave: HashMap<&str, Vec<HostPlan>> = HashMap::new();
    // Each host's steps depend only on that host: computed on all cores, in order.
    let hosts: Vec<&Host> = spec.hosts.values().collect();
    let computed = crate::par::map_chunks(&hosts, |chunk| {
        chunk
            .iter()
            .map(|host| {
                let seen = by_mac.get(&host.mac).copied();
                let mut host_stalled = Vec::new();
                let (capture, steps) = host_steps(spec, observed, host, seen, &mut host_stalled);
                (capture, steps, host_stalled)
            })
            .collect()
    });
    for (host, (capture, steps, host_stalled)) in hosts.into_iter().zip(computed) {
        if host.suspend {
            if capture.is_some() || !steps.is_empty() || !host_stalled.is_empty() {
                suspended.push(host.name.clone());
            }
            continue;
        }
        stalled.extend(host_stalled);
        let plan_of = |steps| HostPlan {
            host: host.name.clone(),
            mac: host.mac,
            site: host.site.clone(),
            steps,
        };
        if let Some(c) = capture {
            captures.push(plan_of(vec![c]));
        }
        if !steps.is_empty() {
            per_wave.entry(&host.wave).or_default().push(plan_of(steps));
        }
    }

    let mut waves = Vec::new();
    for (name, wave) in &spec.waves {
        let Some(mut hosts) = per_wave.remove(name.as_str()) else {
            continue;
        };
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        let sessions = form_sessions(spec, name, wave, &mut hosts);
        let mut bytes: u64 = sessions.iter().filter_map(|s| s.bytes).sum();
        let mut unicast_hosts = 0u64;
        let mut largest: u64 = 0;
        for h in &hosts {
            for s in &h.steps {
                if let Step::Deploy {
                    bytes: Some(b),
                    via: Via::Unicast,
                    ..
                } = s
                {
                    bytes += b;
                    unicast_hosts += 1;
                    largest = largest.max(*b);
                }
            }
        }
        let estimated_secs = estimate_wave(
            params,
            wave.max_parallel,
            hosts.len() as u64,
            unicast_hosts,
            bytes,
            largest,
            &sessions,
        );
        waves.push(WavePlan {
            name: name.clone(),
            after: wave.after.clone(),
            transport: wave.transport,
            max_parallel: wave.max_parallel,
            canary: wave.canary,
            failure_budget: wave.failure_budget.allowed(hosts.len()),
            windows: spec
                .windows_for(name)
                .iter()
                .map(|w| w.text.clone())
                .collect(),
            hosts,
            sessions,
            bytes,
            estimated_secs,
        });
    }
    captures.sort_by(|a, b| a.host.cmp(&b.host));
    stalled.sort_by(|a, b| a.host.cmp(&b.host));
    suspended.sort();
    let totals = totals(spec, observed, params, &captures, &waves);
    Plan {
        captures,
        waves,
        stalled,
        suspended,
        totals,
    }
}

/// Group the deploys of a wave into multicast sessions where its transport asks for it.
fn form_sessions(
    spec: &FleetSpec,
    wave_name: &str,
    wave: &crate::spec::Wave,
    hosts: &mut [HostPlan],
) -> Vec<MulticastSession> {
    if wave.transport == Transport::Unicast {
        return Vec::new();
    }
    let Some(group_name) = &wave.multicast else {
        return Vec::new();
    };
    let Some(group) = spec.multicast.get(group_name) else {
        return Vec::new();
    };
    // (site, image, version) -> (version, bytes, host indexes)
    type Bucket = (Version, Option<u64>, Vec<usize>);
    let mut buckets: BTreeMap<(String, String, String), Bucket> = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        for s in &h.steps {
            if let Step::Deploy {
                image,
                version,
                bytes,
                ..
            } = s
            {
                let key_version = match version {
                    Version::Digest { digest } => digest.to_string(),
                    Version::NextCapture { generation } => format!("next capture {generation}"),
                };
                buckets
                    .entry((h.site.clone(), image.clone(), key_version))
                    .or_insert_with(|| (version.clone(), *bytes, Vec::new()))
                    .2
                    .push(i);
            }
        }
    }
    let mut sessions = Vec::new();
    for ((site, image, _), (version, bytes, members)) in buckets {
        // Auto: multicast only where it beats unicast and the group would start at all.
        let worth = members.len() >= 2 && members.len() as u32 >= group.min_receivers;
        if wave.transport == Transport::Auto && !worth {
            continue;
        }
        let id = format!("{wave_name}/{site}/{image}");
        for &i in &members {
            for s in &mut hosts[i].steps {
                if let Step::Deploy { via, bytes, .. } = s {
                    *via = Via::Multicast {
                        session: id.clone(),
                    };
                    *bytes = bytes.map(|_| 0);
                }
            }
        }
        sessions.push(MulticastSession {
            id,
            group: group_name.clone(),
            address: group.address.to_string(),
            port: group.port,
            site,
            image,
            version,
            hosts: members.iter().map(|&i| hosts[i].host.clone()).collect(),
            min_receivers: group.min_receivers,
            max_wait_secs: group.max_wait_secs,
            max_rate_bps: group.max_rate_bps,
            bytes,
        });
    }
    sessions
}

/// A wave's duration: transfers share the server's link, one host never exceeds its own
/// link, `max_parallel` runs hosts in batches, and every host pays a fixed overhead.
fn estimate_wave(
    p: &Params,
    max_parallel: Option<u32>,
    hosts: u64,
    unicast_hosts: u64,
    bytes: u64,
    largest_unicast: u64,
    sessions: &[MulticastSession],
) -> u64 {
    if hosts == 0 {
        return 0;
    }
    let parallel = max_parallel.map(u64::from).unwrap_or(hosts).max(1);
    let batches = hosts.div_ceil(parallel);
    let shared = secs_for(bytes, p.server_link_bps);
    let per_host = secs_for(largest_unicast, p.host_link_bps);
    let unicast_batches = if unicast_hosts > 0 {
        unicast_hosts.div_ceil(parallel) * per_host
    } else {
        0
    };
    let session = sessions
        .iter()
        .map(|s| secs_for(s.bytes.unwrap_or(0), s.max_rate_bps.min(p.server_link_bps)))
        .max()
        .unwrap_or(0);
    shared.max(unicast_batches).max(session) + batches * p.per_host_overhead_secs
}

fn totals(
    spec: &FleetSpec,
    observed: &Observed,
    p: &Params,
    captures: &[HostPlan],
    waves: &[WavePlan],
) -> Totals {
    let by_mac = observed.by_mac();
    let mut steps = 0;
    let mut hosts: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut unknown = 0;
    let mut capture_secs = 0;
    for c in captures {
        steps += c.steps.len();
        hosts.insert(&c.host);
        let disk = spec
            .hosts
            .get(&c.host)
            .and_then(|h| by_mac.get(&h.mac))
            .and_then(|o| o.disk_bytes);
        match disk {
            Some(b) => capture_secs = capture_secs.max(b / p.capture_bytes_per_sec.max(1)),
            None => unknown += 1,
        }
    }
    let mut bytes = 0;
    for w in waves {
        bytes += w.bytes;
        for h in &w.hosts {
            steps += h.steps.len();
            hosts.insert(&h.host);
            unknown += h
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Deploy { bytes: None, .. }))
                .count();
        }
    }
    // Longest path through the wave DAG (waves are already in DAG order).
    let mut finish: HashMap<&str, u64> = HashMap::new();
    for (name, wave) in &spec.waves {
        let start = wave
            .after
            .iter()
            .filter_map(|a| finish.get(a.as_str()))
            .max()
            .copied()
            .unwrap_or(capture_secs);
        let own = waves
            .iter()
            .find(|w| w.name == *name)
            .map(|w| w.estimated_secs)
            .unwrap_or(0);
        finish.insert(name, start + own);
    }
    Totals {
        hosts: hosts.len(),
        steps,
        bytes,
        unknown_size_steps: unknown,
        estimated_secs: finish.values().max().copied().unwrap_or(capture_secs),
    }
}
