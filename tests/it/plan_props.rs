//! Properties of `diff` over generated fleets and observed states.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use fleetwave::observed::Observed;
use fleetwave::plan::{self, Params, Step, Via};
use fleetwave::source::{self, Tree};
use fleetwave::spec::FleetSpec;
use proptest::prelude::*;

/// A tree of one in-memory file, so generated fleets go through the real loader.
struct OneFile(String);

impl Tree for OneFile {
    fn read(&self, _: &std::path::Path) -> Result<String, String> {
        Ok(self.0.clone())
    }
    fn glob(&self, _: &str) -> Result<Vec<std::path::PathBuf>, String> {
        Ok(Vec::new())
    }
}

/// (site, image or none, wave, deployed version index or none, wipe generation, wipe done)
type GenHost = (usize, Option<usize>, usize, Option<usize>, u64, u64);

#[derive(Debug, Clone)]
struct Gen {
    sites: usize,
    images: usize,
    /// (transport 0 unicast / 1 multicast / 2 auto, prerequisites among earlier waves)
    waves: Vec<(u8, Vec<usize>)>,
    hosts: Vec<GenHost>,
    /// Versions per image.
    versions: usize,
}

fn fleets() -> impl Strategy<Value = Gen> {
    (1usize..4, 1usize..4, 1usize..6, 0usize..3).prop_flat_map(
        |(sites, images, waves, versions)| {
            let wave = (
                0u8..3,
                prop::collection::vec(any::<prop::sample::Index>(), 0..3),
            );
            let host = (
                0..sites,
                prop::option::of(0..images),
                0..waves,
                prop::option::of(0..3usize),
                0u64..3,
                0u64..3,
            );
            (
                prop::collection::vec(wave, waves),
                prop::collection::vec(host, 1..40),
            )
                .prop_map(move |(w, hosts)| Gen {
                    sites,
                    images,
                    waves: w
                        .into_iter()
                        .enumerate()
                        .map(|(i, (t, after))| {
                            // Only earlier waves: a DAG by construction.
                            let mut a: Vec<usize> = if i == 0 {
                                Vec::new()
                            } else {
                                after.iter().map(|x| x.index(i)).collect()
                            };
                            a.sort();
                            a.dedup();
                            (t, a)
                        })
                        .collect(),
                    hosts,
                    versions,
                })
        },
    )
}

fn digest(image: usize, v: usize) -> String {
    format!("blake3:{}", format!("{:02x}{:02x}", image, v).repeat(16))
}

fn fleet_yaml(g: &Gen) -> String {
    let mut y = String::from("version: 1\nsites:\n");
    for s in 0..g.sites {
        let _ = writeln!(
            y,
            "  s{s}: {{interface: eth0, server: 10.{s}.0.1, subnet: 10.{s}.0.0/16}}"
        );
    }
    y.push_str("images:\n");
    for i in 0..g.images {
        let _ = writeln!(y, "  img{i}: {{os: linux}}");
    }
    y.push_str("multicast:\n");
    for (w, _) in g.waves.iter().enumerate() {
        let _ = writeln!(y, "  mc{w}: {{address: 239.1.{w}.1, min_receivers: 2}}");
    }
    y.push_str("waves:\n");
    for (w, (t, after)) in g.waves.iter().enumerate() {
        let after: Vec<String> = after.iter().map(|a| format!("w{a}")).collect();
        let transport = ["unicast", "multicast", "auto"][*t as usize];
        let mc = if *t == 0 {
            String::new()
        } else {
            format!(", multicast: mc{w}")
        };
        let _ = writeln!(
            y,
            "  w{w}: {{after: [{}], transport: {transport}{mc}}}",
            after.join(", ")
        );
    }
    y.push_str("hosts:\n");
    for (h, (site, image, wave, _, wipe, _)) in g.hosts.iter().enumerate() {
        // A multicast group stays on one site: multicast waves keep their hosts on s0.
        let site = if g.waves[*wave].0 == 0 { *site } else { 0 };
        let _ = write!(
            y,
            "  h{h}: {{mac: \"02:00:00:00:{:02x}:{:02x}\", site: s{site}, wave: w{wave}",
            h / 256,
            h % 256
        );
        if let Some(i) = image {
            let _ = write!(y, ", image: img{i}");
        }
        if *wipe > 0 {
            let _ = write!(y, ", actions: {{wipe: {{mode: fast, generation: {wipe}}}}}");
        }
        y.push_str("}\n");
    }
    y
}

fn observed(g: &Gen) -> Observed {
    let mut o = String::from("{\"images\": {");
    let imgs: Vec<String> = (0..g.images)
        .map(|i| {
            let vs: Vec<String> = (0..g.versions)
                .map(|v| {
                    format!(
                        "{{\"digest\": \"{}\", \"disk_bytes\": 1000, \"stored_bytes\": {}}}",
                        digest(i, v),
                        100 + v
                    )
                })
                .collect();
            format!("\"img{i}\": {{\"versions\": [{}]}}", vs.join(","))
        })
        .collect();
    o.push_str(&imgs.join(","));
    o.push_str("}, \"hosts\": [");
    let hosts: Vec<String> = g
        .hosts
        .iter()
        .enumerate()
        .map(|(h, (_, image, _, deployed, _, wipe_done))| {
            let dep = match (image, deployed) {
                (Some(i), Some(v)) if *v < g.versions => format!(", \"deployed\": \"{}\"", digest(*i, *v)),
                _ => String::new(),
            };
            format!("{{\"mac\": \"02:00:00:00:{:02x}:{:02x}\", \"done\": {{\"wipe\": {wipe_done}}}{dep}}}", h / 256, h % 256)
        })
        .collect();
    o.push_str(&hosts.join(","));
    o.push_str("]}");
    Observed::from_json(&o).expect("generated observed state parses")
}

fn spec_of(g: &Gen) -> FleetSpec {
    let loaded = source::load_each(
        &OneFile(fleet_yaml(g)),
        std::path::Path::new("fleet.yaml"),
        fleetwave::spec::read_file,
    )
    .expect("loads");
    match fleetwave::spec::build(loaded).1 {
        Ok(s) => s,
        Err(p) => panic!("generated fleet invalid: {p:?}\n{}", fleet_yaml(g)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_host_whose_image_changes_is_in_exactly_one_wave(g in fleets()) {
        let spec = spec_of(&g);
        let obs = observed(&g);
        let plan = plan::diff(&spec, &obs, &Params::default());
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for w in &plan.waves {
            for h in &w.hosts {
                if h.steps.iter().any(|s| matches!(s, Step::Deploy { .. })) {
                    *seen.entry(h.host.as_str()).or_default() += 1;
                }
            }
        }
        let by_mac = obs.by_mac();
        for host in spec.hosts.values() {
            let Some(image) = &host.image else { continue };
            let newest = obs.images.get(image).and_then(|i| i.versions.last()).map(|v| v.digest);
            let Some(newest) = newest else { continue }; // stalled: no version
            let deployed = by_mac.get(&host.mac).and_then(|o| o.deployed);
            let wiped = host.actions.wipe.as_ref().is_some_and(|w| w.generation > by_mac.get(&host.mac).map(|o| o.done.wipe).unwrap_or(0));
            let changes = deployed.as_ref() != Some(&newest) || wiped;
            let count = seen.get(host.name.as_str()).copied().unwrap_or(0);
            prop_assert_eq!(count, usize::from(changes), "host {} deployed {:?} newest {}", host.name, deployed, newest);
        }
    }

    #[test]
    fn waves_come_after_their_prerequisites(g in fleets()) {
        let spec = spec_of(&g);
        let plan = plan::diff(&spec, &observed(&g), &Params::default());
        let position: HashMap<&str, usize> = plan.waves.iter().enumerate().map(|(i, w)| (w.name.as_str(), i)).collect();
        for (i, w) in plan.waves.iter().enumerate() {
            for a in &w.after {
                if let Some(&j) = position.get(a.as_str()) {
                    prop_assert!(j < i, "wave {} planned before its prerequisite {}", w.name, a);
                }
            }
        }
        // And in the spec itself, for waves with no work too.
        let order: Vec<&String> = spec.waves.keys().collect();
        for (i, (_, w)) in spec.waves.iter().enumerate() {
            for a in &w.after {
                let j = order.iter().position(|n| *n == a).expect("after names a wave");
                prop_assert!(j < i);
            }
        }
    }

    #[test]
    fn a_multicast_session_holds_one_site_one_image_one_wave(g in fleets()) {
        let spec = spec_of(&g);
        let plan = plan::diff(&spec, &observed(&g), &Params::default());
        for w in &plan.waves {
            let in_wave: HashSet<&str> = w.hosts.iter().map(|h| h.host.as_str()).collect();
            for s in &w.sessions {
                let prefix = format!("{}/", w.name);
                prop_assert!(s.id.starts_with(&prefix), "session {} outside its wave", s.id);
                for name in &s.hosts {
                    prop_assert!(in_wave.contains(name.as_str()), "{} in session {} but not in wave {}", name, s.id, w.name);
                    let host = &spec.hosts[name];
                    prop_assert_eq!(&host.site, &s.site);
                    prop_assert_eq!(host.image.as_deref(), Some(s.image.as_str()));
                    let hp = w.hosts.iter().find(|h| h.host == *name).expect("host plan");
                    let via_session = hp.steps.iter().any(|st| matches!(st, Step::Deploy { via: Via::Multicast { session }, version, .. } if *session == s.id && *version == s.version));
                    prop_assert!(via_session, "{} does not deploy through {}", name, s.id);
                }
            }
        }
    }

    #[test]
    fn the_plan_is_a_pure_function(g in fleets()) {
        let spec = spec_of(&g);
        let obs = observed(&g);
        let a = plan::diff(&spec, &obs, &Params::default());
        let b = plan::diff(&spec, &obs, &Params::default());
        prop_assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    }
}
