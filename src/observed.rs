//! The observed state: what is known of the machines and the image store.
//!
//! Until the server records observations itself, `fleetwave plan --observed FILE` reads
//! it from JSON (format in docs/observed-state.md). No file means nothing is known yet:
//! no image has a version and no host has done anything.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::spec::{Digest, Mac};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observed {
    /// Machines, by MAC (names live in git and may change; the MAC is what the network sees).
    #[serde(default)]
    pub hosts: Vec<ObservedHost>,
    /// Image versions in the store, by image name.
    #[serde(default)]
    pub images: BTreeMap<String, ObservedImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservedHost {
    pub mac: Mac,
    /// The image version last deployed and verified on the disk, if any.
    pub deployed: Option<Digest>,
    /// The generation of each one-shot action last completed.
    #[serde(default)]
    pub done: DoneGenerations,
    /// Size of the disk the host images (from inventory), in bytes.
    pub disk_bytes: Option<u64>,
    /// When the host was last seen (RFC 3339), for people.
    pub last_seen: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoneGenerations {
    #[serde(default)]
    pub capture: u64,
    #[serde(default)]
    pub wipe: u64,
    #[serde(default)]
    pub inventory: u64,
    #[serde(default)]
    pub verify: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservedImage {
    /// Versions, oldest first.
    #[serde(default)]
    pub versions: Vec<ImageVersion>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageVersion {
    pub digest: Digest,
    /// The capture generation that produced it.
    #[serde(default)]
    pub generation: u64,
    /// Logical size: the disk the image restores.
    pub disk_bytes: u64,
    /// What crosses the network for one unicast deploy (compressed, zero runs skipped).
    pub stored_bytes: u64,
    pub captured_at: Option<String>,
}

impl Observed {
    /// Parse the JSON form; errors name the line and column.
    pub fn from_json(text: &str) -> Result<Observed, String> {
        let o: Observed = serde_json::from_str(text).map_err(|e| {
            let text = e.to_string();
            // serde_json appends its own " at line L column C"; we lead with it instead.
            let msg = text.split(" at line ").next().unwrap_or(&text);
            format!("{}:{}: {msg}", e.line(), e.column())
        })?;
        let mut seen = HashMap::new();
        for h in &o.hosts {
            if seen.insert(h.mac, ()).is_some() {
                return Err(format!(
                    "host {} appears twice in `hosts`; list each MAC once",
                    h.mac
                ));
            }
        }
        Ok(o)
    }

    /// Hosts by MAC, for lookups during a plan.
    pub fn by_mac(&self) -> rustc_hash::FxHashMap<Mac, &ObservedHost> {
        self.hosts.iter().map(|h| (h.mac, h)).collect()
    }

    pub fn version(&self, image: &str, digest: &Digest) -> Option<&ImageVersion> {
        self.images
            .get(image)?
            .versions
            .iter()
            .find(|v| v.digest == *digest)
    }
}
