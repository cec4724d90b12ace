//! Wire types: exactly the shape of `fleet.yaml`. Unknown fields are rejected; values
//! stay as written (strings for addresses, durations and rates) so that the domain
//! layer can check them all and report every problem with its position.
//!
//! `schemas/fleet.schema.json` is generated from these types.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::source::Sp;

/// A fleet file. The entry file needs `version`; included files hold any of the
/// other sections and are merged into it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "fleetwave fleet")]
pub struct FleetFile {
    /// Format version; must be 1. Required in the entry file.
    pub version: Option<u32>,
    /// Other fleet files to merge in: paths or glob patterns, relative to this file.
    #[serde(default)]
    #[schemars(schema_with = "string_or_list")]
    pub include: Vec<String>,
    /// Sites: one L2 network each, served by this server.
    #[serde(default)]
    pub sites: IndexMap<String, Site>,
    /// Images: what can be deployed, and how each is captured.
    #[serde(default)]
    pub images: IndexMap<String, Image>,
    /// Hosts by name.
    #[serde(default)]
    pub hosts: IndexMap<String, Host>,
    /// Groups give defaults to every host they select.
    #[serde(default)]
    pub groups: IndexMap<String, Group>,
    /// Multicast groups used by waves with multicast transport.
    #[serde(default)]
    pub multicast: IndexMap<String, Multicast>,
    /// Deploy waves, ordered by `after`.
    #[serde(default)]
    pub waves: IndexMap<String, Wave>,
    /// Maintenance windows: destructive work (deploy, wipe) only starts inside one.
    /// Examples: "Sat 22:00 - Sun 06:00", "Mon-Fri 19:00 - 23:00", "daily 01:00 - 05:00".
    #[serde(default)]
    pub windows: Vec<String>,
}

/// The section names, in the order the loader reads them.
pub const SECTIONS: &[&str] = &[
    "version",
    "include",
    "sites",
    "images",
    "hosts",
    "groups",
    "multicast",
    "waves",
    "windows",
];

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Network interface of this server on the site's network (DHCP, TFTP and multicast bind here).
    pub interface: Sp<String>,
    /// This server's IPv4 address on that network (next-server, HTTP, multicast source).
    pub server: Sp<String>,
    /// The site's clients reach this server through a DHCP relay (their requests carry
    /// the relay's address in the subnet). `server` is then this server's routed
    /// address and may lie outside `subnet`. Default: false.
    pub relayed: Option<Sp<bool>>,
    /// The site's subnet in CIDR form, e.g. 172.28.0.0/24.
    pub subnet: Sp<String>,
    /// DHCP service for the site. Without it: proxy mode (PXE options only).
    pub dhcp: Option<Dhcp>,
    /// What happens to machines whose MAC is not in the fleet. Default: register.
    pub unknown_hosts: Option<Sp<UnknownHosts>>,
    /// Where image chunks and manifests are stored. Default: /images.
    pub image_store: Option<Sp<String>>,
    /// true: send Wake-on-LAN packets to the site's hosts when they must boot for a
    /// task (a host or group may say otherwise). Default: false.
    pub wake: Option<bool>,
    /// true: UEFI machines that PXE-boot with their firmware are offered Debian's
    /// signed shim and GRUB instead of iPXE, so they boot with Secure Boot on (no key
    /// to enrol, nothing to turn off). Default: false.
    pub secure_boot: Option<bool>,
    /// Answer IPv6 router solicitations on `interface` with "no router, nothing to
    /// configure", so iPXE stops waiting about 11 s for IPv6 autoconfiguration.
    /// Default: true with `dhcp.mode: authoritative` (the segment is the server's),
    /// false otherwise (a network with its own IPv6 router).
    pub ipv6_ra: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UnknownHosts {
    /// Boot unknown machines into inventory and list them for an admin to adopt.
    Register,
    /// Do not answer unknown machines at all.
    Ignore,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dhcp {
    /// authoritative: hand out addresses; proxy: only PXE options beside another DHCP
    /// server; off: no DHCP (PXE configured elsewhere).
    pub mode: Sp<DhcpMode>,
    /// Dynamic pool as `first-last`, e.g. 172.28.0.100-172.28.0.199. Authoritative mode only.
    pub pool: Option<Sp<String>>,
    /// Default gateway handed to clients.
    pub router: Option<Sp<String>>,
    /// DNS servers handed to clients.
    #[serde(default)]
    pub dns: Vec<Sp<String>>,
    /// DNS domain name handed to clients.
    pub domain: Option<String>,
    /// Lease time, e.g. 1h, 30m, 1d. Default: 1h.
    pub lease: Option<Sp<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    Authoritative,
    Proxy,
    Off,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Operating system on the image (informational; guides filesystem handling).
    pub os: Option<Os>,
    /// Free text for people.
    pub description: Option<String>,
    /// Capture this image from a reference host. Bump `generation` to ask for a new capture.
    pub capture: Option<ImageCapture>,
    /// Deploy exactly this version (`blake3:<64 hex digits>`); otherwise the newest captured.
    pub pin: Option<Sp<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    Windows,
    Linux,
    Other,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageCapture {
    /// The reference host whose disk becomes the image.
    pub from: Sp<String>,
    /// Capture again whenever this number grows.
    #[schemars(range(min = 1))]
    pub generation: Sp<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The boot NIC's MAC address, e.g. 52:54:00:28:00:11.
    pub mac: Sp<String>,
    /// Site the host lives on (or from a group).
    pub site: Option<Sp<String>>,
    /// Fixed IPv4 address (a DHCP reservation); inside the site's subnet, outside its pool.
    pub ip: Option<Sp<String>>,
    /// Labels that groups and waves select on.
    #[serde(default)]
    #[schemars(schema_with = "labels")]
    pub labels: IndexMap<String, String>,
    /// Groups this host belongs to, besides those whose selector matches it.
    #[serde(default)]
    pub groups: Vec<Sp<String>>,
    /// Image the host should run.
    pub image: Option<Sp<String>>,
    /// Wave the host is deployed in.
    pub wave: Option<Sp<String>>,
    /// Which disk to image when the host has several.
    pub disk: Option<DiskSelector>,
    /// true: leave this host alone (no steps are planned for it).
    pub suspend: Option<bool>,
    /// true: wake the host (Wake-on-LAN) when it must boot for a task; false: never.
    /// Default: from its groups, else its site's `wake`.
    pub wake: Option<bool>,
    /// When a verify finds drift: report it, or redeploy. Default: from its groups,
    /// else report.
    pub heal: Option<Heal>,
    /// One-shot actions; each runs once per `generation` bump.
    pub actions: Option<Actions>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSelector {
    /// Size: "256G" (within 5%), ">=200G", "<=2T", "200G-600G". K/M/G/T are powers of
    /// 1000, KiB/MiB/GiB/TiB powers of 1024.
    pub size: Option<Sp<String>>,
    /// Exact serial number.
    pub serial: Option<String>,
    /// Model, glob pattern allowed ("Samsung SSD 980*").
    pub model: Option<Sp<String>>,
    /// Device path, e.g. /dev/nvme0n1 or /dev/disk/by-path/...
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Actions {
    /// Capture this host's disk into an image.
    pub capture: Option<CaptureAction>,
    /// Erase the disk.
    pub wipe: Option<WipeAction>,
    /// Collect hardware inventory.
    pub inventory: Option<Generation>,
    /// Check the disk still holds the deployed image version.
    pub verify: Option<Generation>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureAction {
    pub image: Sp<String>,
    #[schemars(range(min = 1))]
    pub generation: Sp<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WipeAction {
    /// fast: partition tables and signatures at both ends; normal: zeros over the whole
    /// disk; full: a random pass, then zeros, read back.
    pub mode: WipeMode,
    #[schemars(range(min = 1))]
    pub generation: Sp<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WipeMode {
    Fast,
    Normal,
    Full,
}

/// What follows when a verify finds that a disk no longer holds its version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Heal {
    /// Record it (condition `Drifted`) and change nothing.
    #[default]
    Report,
    /// Record it and deploy the version again, in the host's wave.
    Redeploy,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    #[schemars(range(min = 1))]
    pub generation: Sp<u64>,
}

/// Label selector: every listed label must have the given value.
pub type Selector = IndexMap<String, String>;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Hosts with all these labels are in the group (as are hosts that name it).
    #[schemars(schema_with = "labels")]
    pub selector: Option<Sp<Selector>>,
    /// Defaults for member hosts; a host's own value wins.
    pub site: Option<Sp<String>>,
    pub image: Option<Sp<String>>,
    pub wave: Option<Sp<String>>,
    pub disk: Option<DiskSelector>,
    pub suspend: Option<bool>,
    pub wake: Option<bool>,
    pub heal: Option<Heal>,
    /// Labels added to member hosts (a host's own label wins).
    #[serde(default)]
    #[schemars(schema_with = "labels")]
    pub labels: IndexMap<String, String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Multicast {
    /// IPv4 multicast address, normally in 239.0.0.0/8.
    pub address: Sp<String>,
    /// First UDP port of the session. Default: 9000.
    pub port: Option<Sp<u16>>,
    /// Start as soon as this many receivers have joined. Default: 1.
    pub min_receivers: Option<Sp<u32>>,
    /// Start anyway after this long, e.g. 10m. Default: 5m.
    pub max_wait: Option<Sp<String>>,
    /// Send no faster than this, e.g. 900Mbit, 1Gbit, 100MB/s. Default: 900Mbit.
    pub max_rate: Option<Sp<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// Waves that must finish first.
    #[serde(default)]
    pub after: Vec<Sp<String>>,
    /// Hosts in this wave, besides those that name it with `wave:`.
    pub members: Option<Members>,
    /// unicast, multicast, or auto (multicast when enough hosts share an image). Default: unicast.
    pub transport: Option<Sp<Transport>>,
    /// Multicast group; required for multicast and auto transport.
    pub multicast: Option<Sp<String>>,
    /// At most this many hosts imaging at once. Default: no limit.
    pub max_parallel: Option<Sp<u32>>,
    /// Deploy this many hosts first and continue only when they converge.
    pub canary: Option<Sp<u32>>,
    /// Failures tolerated before the wave stops: a count (3) or a share ("10%"). Default: 0.
    pub failure_budget: Option<Sp<FailureBudget>>,
    /// Maintenance windows for this wave, instead of the fleet's.
    pub windows: Option<Vec<Sp<String>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Members {
    #[serde(default)]
    pub hosts: Vec<Sp<String>>,
    #[serde(default)]
    pub groups: Vec<Sp<String>>,
    /// Hosts with all these labels (own or from groups).
    #[schemars(schema_with = "labels")]
    pub selector: Option<Selector>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Unicast,
    Multicast,
    Auto,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum FailureBudget {
    Count(u32),
    /// A share of the wave's hosts, e.g. "10%".
    Share(String),
}

/// Label values are text, but `rack: 12` and `gpu: true` mean the text "12" and "true".
fn labels(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": {"type": ["string", "number", "boolean"]}
    })
}

fn string_or_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}}
        ]
    })
}
