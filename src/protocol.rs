//! What the agent and the server say to each other: typed tasks, their results,
//! progress and inventory, and what a host is told to boot. Both sides use these
//! types, so a field renamed on one side cannot go unnoticed on the other.

use serde::{Deserialize, Serialize};

use crate::spec::{Digest, DiskSelector, Mac, WipeMode};

/// One piece of work for the agent on one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// An unknown machine: report its inventory, nothing else.
    Register,
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
        version: Digest,
        /// The multicast session to join; unicast when `None` (or when the session
        /// cannot run).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        multicast: Option<String>,
    },
    /// Check that the disk still holds `version`.
    Verify {
        version: Digest,
        generation: u64,
    },
}

impl Task {
    /// The task's kind, as the kernel command line and the logs name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Task::Register => "register",
            Task::Inventory { .. } => "inventory",
            Task::Capture { .. } => "capture",
            Task::Wipe { .. } => "wipe",
            Task::Deploy { .. } => "deploy",
            Task::Verify { .. } => "verify",
        }
    }

    /// Whether it writes the disk (gated by maintenance windows).
    pub fn destructive(&self) -> bool {
        matches!(self, Task::Wipe { .. } | Task::Deploy { .. })
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        match self {
            Task::Register => "register (inventory of an unknown machine)".into(),
            Task::Inventory { generation } => format!("inventory (generation {generation})"),
            Task::Capture { image, generation } => {
                format!("capture {image} (generation {generation})")
            }
            Task::Wipe { mode, generation } => {
                format!("wipe ({}, generation {generation})", wipe_mode_name(*mode))
            }
            Task::Deploy {
                image,
                version,
                multicast,
            } => match multicast {
                Some(s) => format!("deploy {image}@{version} by multicast:{s}"),
                None => format!("deploy {image}@{version} by unicast"),
            },
            Task::Verify {
                version,
                generation,
            } => format!("verify {version} (generation {generation})"),
        }
    }
}

pub fn wipe_mode_name(m: WipeMode) -> &'static str {
    match m {
        WipeMode::Fast => "fast",
        WipeMode::Normal => "normal",
        WipeMode::Full => "full",
    }
}

/// The host's disk selector as the agent receives it: the fleet's text, parsed on
/// the agent (a model glob's spaces would not survive a kernel command line).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskWanted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl DiskWanted {
    pub fn from_selector(d: &DiskSelector) -> DiskWanted {
        DiskWanted {
            size: d.size.map(|r| {
                if r.max == u64::MAX {
                    format!(">={}", r.min)
                } else {
                    format!("{}-{}", r.min, r.max)
                }
            }),
            serial: d.serial.clone(),
            model: d.model.clone(),
            path: d.path.clone(),
        }
    }

    /// The selector, or what is wrong with the size.
    pub fn to_selector(&self) -> Result<DiskSelector, String> {
        Ok(DiskSelector {
            size: self
                .size
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e| format!("disk size: {e}"))?,
            serial: self.serial.clone(),
            model: self.model.clone(),
            path: self.path.clone(),
        })
    }
}

/// What the machine does once its task has ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum After {
    /// Boot again: the server's script then says what comes next (its own disk, once
    /// the task is done).
    #[default]
    Reboot,
    Poweroff,
}

/// `GET /api/v1/task`: the task a token authorizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub mac: Mac,
    pub host: Option<String>,
    /// The task's id in the server's records (0 for a registration).
    #[serde(default)]
    pub id: u64,
    pub task: Task,
    #[serde(default)]
    pub disk: DiskWanted,
    #[serde(default)]
    pub after: After,
    /// The commit that asked for the task, and who signed it: recorded with what the
    /// task makes (an image version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_sec: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub ok: bool,
    /// The version the disk was verified to hold, for a deploy, capture or verify.
    pub digest: Option<Digest>,
    pub message: String,
    /// The last lines of the agent's log, with a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

/// What the agent reports of its machine.
pub type Inventory = crate::agent::Inventory;

/// What one known host is told to boot now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootInstruction {
    /// Nothing due (or the host waits, is suspended or stalled): its own disk.
    LocalDisk { host: String, why: String },
    /// The agent, to carry out an armed task.
    Agent {
        host: String,
        site: String,
        /// The armed task's token: the same on every fetch of the script, until spent.
        token: String,
        task: Task,
        summary: String,
    },
}

/// A condition in the Flux style: `Ready`, `Drifted`, ...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub commit: Option<String>,
    pub at: u64,
}

/// A revision of the fleet, as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitView {
    pub id: String,
    /// Unix seconds when the server read it.
    pub at: u64,
    /// Empty when it applied; otherwise why it was refused (file:line:column).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Who signed it, when the server checks signatures (`--trusted-keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<CommitSignature>,
    /// Applied although untrusted (`--untrusted non-destructive`): destructive work
    /// it asks for is held as `UntrustedCommit`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restricted: bool,
}

/// What the server made of a commit's signature.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitSignature {
    /// A good signature by a key of `--trusted-keys`.
    pub trusted: bool,
    /// `ssh` or `openpgp`; none for an unsigned commit.
    pub format: Option<String>,
    /// The key's name in `--trusted-keys` (SSH) or its user id (OpenPGP), when known.
    pub signer: Option<String>,
    /// The key: `SHA256:...` (SSH) or its fingerprint or id (OpenPGP).
    pub key: Option<String>,
    /// Why it is trusted or not, in a sentence.
    pub why: String,
}

/// One host in `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub mac: Mac,
    pub site: String,
    pub wave: String,
    pub image: Option<String>,
    pub state: String,
    /// The armed task, if any.
    pub task: Option<String>,
    pub progress: Option<Progress>,
    /// Why it is not moving (Stalled, Waiting) and until when.
    pub reason: Option<String>,
    pub message: Option<String>,
    pub until: Option<u64>,
    pub deployed: Option<Digest>,
    pub failures: u32,
    pub last_seen: Option<u64>,
    pub conditions: Vec<Condition>,
}

/// A wave in `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveView {
    pub name: String,
    /// `waiting` (for the waves before it), `open`, `idle` (its hosts wait for
    /// something outside it, such as a capture), `halted` (over its failure budget)
    /// or `done`.
    pub state: String,
    pub message: String,
    pub hosts: usize,
    pub done: usize,
    pub in_flight: usize,
    pub failed: usize,
    pub failure_budget: u32,
    pub canaries: Vec<String>,
}

/// `GET /api/v1/status`: where the fleet stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Where the fleet comes from (a git URL and branch, or a directory).
    pub source: String,
    /// The revision being served.
    pub applied: Option<CommitView>,
    /// The newest revision read, applied or not.
    pub attempted: Option<CommitView>,
    pub hosts: Vec<HostView>,
    pub waves: Vec<WaveView>,
    /// The newest events.
    pub events: Vec<crate::state::EventRow>,
}

/// What the HTTP API asks of the controller.
#[derive(Debug)]
pub enum Command {
    Status {
        reply: tokio::sync::oneshot::Sender<FleetStatus>,
    },
    /// What the controller plans with (`plan --observed URL`).
    Observed {
        reply: tokio::sync::oneshot::Sender<crate::observed::Observed>,
    },
    /// Clear a host's failures so it is tried again now.
    Retry {
        host: String,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Send a host's Wake-on-LAN packet now, on its site's interface.
    Wake {
        host: String,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    /// The image store changed (a version removed): plan again.
    ImagesChanged,
}
