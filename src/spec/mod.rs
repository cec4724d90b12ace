//! The desired state: validated domain types built from the wire types.
//!
//! Pure: no I/O, no clock. Everything past [`build`] can trust its input: names
//! resolve, addresses fit their subnets, waves form a DAG.

mod resolve;
pub(crate) use resolve::did_you_mean;
pub mod types;
pub mod wire;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use indexmap::IndexMap;
use ipnet::Ipv4Net;
use serde::Serialize;

pub use resolve::{ReadDocument, build, read_file};
pub use types::{Digest, IpRange, Mac, SizeRange, Window, parse_duration, parse_rate};
pub use wire::{DhcpMode, Heal, Os, Transport, UnknownHosts, WipeMode};

/// The name of the wave that holds hosts no wave claims.
pub const DEFAULT_WAVE: &str = "default";

/// The whole desired state of a fleet.
#[derive(Debug, Clone, Serialize)]
pub struct FleetSpec {
    pub sites: IndexMap<String, Site>,
    pub images: IndexMap<String, Image>,
    /// Every host, with group defaults and wave membership already applied.
    pub hosts: IndexMap<String, Host, rustc_hash::FxBuildHasher>,
    pub groups: IndexMap<String, Group>,
    pub multicast: IndexMap<String, MulticastGroup>,
    /// In an order that respects `after` (ties broken by name).
    pub waves: IndexMap<String, Wave>,
    /// Fleet-wide maintenance windows; empty means "any time".
    pub windows: Vec<Window>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Site {
    pub interface: String,
    pub server: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// Clients come through a DHCP relay; `server` may lie outside `subnet`.
    pub relayed: bool,
    pub dhcp: Dhcp,
    pub unknown_hosts: UnknownHosts,
    pub image_store: String,
    /// Wake the site's hosts (Wake-on-LAN) when they must boot for a task.
    pub wake: bool,
    /// UEFI firmware PXE gets the signed shim → GRUB chain rather than iPXE.
    pub secure_boot: bool,
    /// Answer router solicitations with "nothing to configure" (src/netboot/ra.rs).
    pub ipv6_ra: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dhcp {
    pub mode: DhcpMode,
    pub pool: Option<IpRange>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_secs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Image {
    pub os: Option<Os>,
    pub description: Option<String>,
    /// The host it is captured from and the generation asked for.
    pub capture: Option<CaptureSource>,
    pub pin: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureSource {
    pub host: String,
    pub generation: u64,
}

/// A host's labels, sorted by key. Hosts have a handful: a sorted list takes a tenth
/// of the memory of a `BTreeMap`'s first node, which at 100,000 hosts was 54 MB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Add `key` unless it is there already (a host's own label beats a group's).
    pub fn add_missing(&mut self, key: &str, value: &str) {
        if let Err(i) = self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
            self.0.insert(i, (key.to_string(), value.to_string()));
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<'a> FromIterator<(&'a String, &'a String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (&'a String, &'a String)>>(it: I) -> Self {
        let mut l = Labels::default();
        for (k, v) in it {
            l.add_missing(k, v);
        }
        l.0.shrink_to_fit();
        l
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub name: String,
    pub mac: Mac,
    pub site: String,
    pub ip: Option<Ipv4Addr>,
    /// Own labels plus those added by groups.
    pub labels: Labels,
    /// Groups the host is in (named or selected), sorted.
    pub groups: Vec<String>,
    pub image: Option<String>,
    pub wave: String,
    pub disk: DiskSelector,
    pub suspend: bool,
    /// Wake-on-LAN: the host's own or its groups' choice; `None`: its site's.
    pub wake: Option<bool>,
    /// What follows when a verify finds drift.
    pub heal: Heal,
    pub actions: Actions,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DiskSelector {
    pub size: Option<SizeRange>,
    pub serial: Option<String>,
    /// Glob pattern.
    pub model: Option<String>,
    pub path: Option<String>,
}

impl DiskSelector {
    pub fn is_empty(&self) -> bool {
        *self == DiskSelector::default()
    }
}

/// One-shot actions; each is due while the observed generation is below this one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Actions {
    pub capture: Option<CaptureAction>,
    pub wipe: Option<WipeAction>,
    pub inventory: Option<u64>,
    pub verify: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureAction {
    pub image: String,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WipeAction {
    pub mode: WipeMode,
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub selector: Option<BTreeMap<String, String>>,
    /// Hosts in the group, by name.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MulticastGroup {
    pub address: Ipv4Addr,
    pub port: u16,
    pub min_receivers: u32,
    pub max_wait_secs: u64,
    pub max_rate_bps: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Wave {
    pub after: Vec<String>,
    pub transport: Transport,
    pub multicast: Option<String>,
    pub max_parallel: Option<u32>,
    pub canary: u32,
    pub failure_budget: FailureBudget,
    /// This wave's windows; `None` means the fleet's.
    pub windows: Option<Vec<Window>>,
    /// False for the implicit `default` wave.
    pub declared: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureBudget {
    Count(u32),
    /// Percent of the wave's hosts.
    Percent(f64),
}

impl FailureBudget {
    /// Failures allowed among `hosts` hosts.
    pub fn allowed(&self, hosts: usize) -> u32 {
        match *self {
            FailureBudget::Count(n) => n,
            FailureBudget::Percent(p) => ((hosts as f64) * p / 100.0).floor() as u32,
        }
    }
}

impl FleetSpec {
    /// The host with this MAC, if any. Linear: callers that look up many build a map.
    pub fn host_by_mac(&self, mac: Mac) -> Option<&Host> {
        self.hosts.values().find(|h| h.mac == mac)
    }

    /// The windows that gate destructive work in a wave.
    pub fn windows_for(&self, wave: &str) -> &[Window] {
        match self.waves.get(wave).and_then(|w| w.windows.as_ref()) {
            Some(w) => w,
            None => &self.windows,
        }
    }
}
