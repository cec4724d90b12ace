//! Following the fleet's origin: every `interval`, on a webhook and on `fleetwave
//! sync`, read the newest revision and hand it to the controller. A fetch that fails
//! changes nothing (the last revision keeps serving); an invalid revision is handed on
//! with its problems, for the controller to report as Stalled.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::diag::{self, Palette};
use crate::protocol::CommitSignature;
use crate::source::git::CommitTree;
use crate::source::signature::TrustedKeys;
use crate::source::watch::{Origin, fetch};
use crate::source::{DirTree, Tree};
use crate::spec::{self, FleetSpec};

/// One revision of the fleet, validated or not.
#[derive(Debug, Clone)]
pub struct Revision {
    /// The commit id, or `dir:<hash of the files>` for a directory.
    pub id: String,
    /// Unix seconds when it was read.
    pub at: u64,
    /// The fleet, or its problems as `validate` prints them (file:line:column).
    pub fleet: Validated,
    /// Who signed the commit, when the server has trusted keys.
    pub signature: Option<CommitSignature>,
    /// For an untrusted revision: the last trusted one, to serve when nothing is being
    /// served yet (a restart).
    pub fallback: Option<Arc<Revision>>,
}

/// What an unsigned or untrusted commit may still do.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Untrusted {
    /// Nothing: the last trusted commit keeps serving, as for an invalid one.
    #[default]
    Nothing,
    /// Non-destructive work (inventory, verify); deploy, wipe and capture are held.
    NonDestructive,
}

/// The server's rule for commit signatures.
#[derive(Debug)]
pub struct Signatures {
    pub keys: TrustedKeys,
    /// Untrusted commits are refused (else signatures are only recorded).
    pub required: bool,
    pub untrusted: Untrusted,
}

impl Revision {
    /// Whether the rule refuses it: signatures required and not a trusted one.
    pub fn untrusted(&self, rule: Option<&Signatures>) -> bool {
        rule.is_some_and(|r| r.required) && !self.signature.as_ref().is_some_and(|s| s.trusted)
    }
}

/// A validated fleet, or its problems rendered.
pub type Validated = Result<Arc<FleetSpec>, Vec<String>>;

pub type RevisionFeed = watch::Receiver<Option<Arc<Revision>>>;

/// Read and validate the newest revision; `Err` when it cannot be read at all.
pub fn read(origin: &Origin, cache: &Path, keys: Option<&TrustedKeys>) -> Result<Revision, String> {
    match origin {
        Origin::Git { url, branch, path } => {
            let commit = fetch(url, branch, cache)?;
            read_commit(cache, &commit, path, keys)
        }
        Origin::Dir(path) => {
            let entry = if path.is_dir() {
                path.join("fleet.yaml")
            } else {
                path.clone()
            };
            let (hash, fleet) = load(&DirTree, &entry)?;
            Ok(Revision {
                id: format!("dir:{}", &hash[..16]),
                at: crate::state::now(),
                fleet,
                signature: None,
                fallback: None,
            })
        }
    }
}

/// One commit of the source cache, its signature checked against `keys`.
pub fn read_commit(
    cache: &Path,
    commit: &str,
    path: &Path,
    keys: Option<&TrustedKeys>,
) -> Result<Revision, String> {
    let tree = CommitTree::open(cache, commit).map_err(|e| e.to_string())?;
    let signature = keys.map(|k| k.verify(tree.repository(), commit));
    let (_, fleet) = load(&tree, path)?;
    Ok(Revision {
        id: commit.to_string(),
        at: crate::state::now(),
        fleet,
        signature,
        fallback: None,
    })
}

/// For a revision the rule refuses: attach `serving` (the last trusted commit), read
/// again and checked, so a server that starts on an untrusted head still serves it.
pub fn attach_fallback(
    rev: &mut Revision,
    origin: &Origin,
    cache: &Path,
    rule: Option<&Signatures>,
    serving: Option<&str>,
) {
    let (Some(rule), Some(serving), Origin::Git { path, .. }) = (rule, serving, origin) else {
        return;
    };
    if !rev.untrusted(Some(rule)) || serving == rev.id {
        return;
    }
    match read_commit(cache, serving, path, Some(&rule.keys)) {
        Ok(fb) if !fb.untrusted(Some(rule)) && fb.fleet.is_ok() => {
            rev.fallback = Some(Arc::new(fb));
        }
        Ok(_) => {
            warn!(revision = %serving, "the last applied revision is not trusted either; nothing is served")
        }
        Err(e) => warn!(revision = %serving, "cannot read the last applied revision: {e}"),
    }
}

/// The fleet at `entry` of `tree`: a hash of its files, and the spec or its problems.
fn load(tree: &dyn Tree, entry: &Path) -> Result<(String, Validated), String> {
    let loaded = crate::source::load_each(tree, entry, spec::read_file)?;
    let (sources, built) = spec::build(loaded);
    let mut h = blake3::Hasher::new();
    for f in &sources.files {
        h.update(f.display.as_bytes());
        h.update(&[0]);
        h.update(f.text.as_bytes());
        h.update(&[0]);
    }
    let hash = h.finalize().to_hex().to_string();
    Ok((
        hash,
        built.map(Arc::new).map_err(|problems| {
            problems
                .iter()
                .map(|d| diag::render(d, &sources, Palette::PLAIN))
                .collect()
        }),
    ))
}

/// Wake `trigger` whenever something changes in the directory of a fleet on disk.
/// `None` (and a warning) when the platform cannot watch it: the interval still reads it.
fn watch_dir(path: &Path, trigger: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    let mut w = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if e.is_ok_and(|e| !e.kind.is_access()) {
            trigger.notify_one();
        }
    })
    .map_err(|e| {
        warn!(
            "cannot watch {}: {e}; reading it every interval",
            dir.display()
        )
    })
    .ok()?;
    w.watch(&dir, notify::RecursiveMode::Recursive)
        .map_err(|e| {
            warn!(
                "cannot watch {}: {e}; reading it every interval",
                dir.display()
            )
        })
        .ok()?;
    Some(w)
}

/// Follow `origin` until `shutdown`, publishing each new revision on `tx`. `serving`
/// is the commit applied before (from the state database).
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    origin: Origin,
    cache: PathBuf,
    interval: Duration,
    trigger: Arc<Notify>,
    tx: watch::Sender<Option<Arc<Revision>>>,
    rule: Option<Arc<Signatures>>,
    mut serving: Option<String>,
    shutdown: CancellationToken,
) {
    // A fleet on disk is read again as soon as it changes.
    let _watcher = match &origin {
        Origin::Dir(p) => watch_dir(p, trigger.clone()),
        Origin::Git { .. } => None,
    };
    loop {
        let (o, c, r, s) = (origin.clone(), cache.clone(), rule.clone(), serving.clone());
        let read = move || {
            let mut rev = read(&o, &c, r.as_deref().map(|r| &r.keys))?;
            attach_fallback(&mut rev, &o, &c, r.as_deref(), s.as_deref());
            Ok::<_, String>(rev)
        };
        match tokio::task::spawn_blocking(read).await {
            Ok(Ok(rev)) => {
                let new = tx.borrow().as_ref().is_none_or(|r| r.id != rev.id);
                let reads = &crate::metrics::get().source_reads;
                if new {
                    reads.get_or_create(&crate::metrics::outcome("new")).inc();
                    info!(revision = %rev.id, valid = rev.fleet.is_ok(),
                        trusted = rev.signature.as_ref().map(|s| s.trusted),
                        "new revision of the fleet");
                    if !rev.untrusted(rule.as_deref()) && rev.fleet.is_ok() {
                        serving = Some(rev.id.clone());
                    }
                    tx.send_replace(Some(Arc::new(rev)));
                } else {
                    reads
                        .get_or_create(&crate::metrics::outcome("unchanged"))
                        .inc();
                }
            }
            Ok(Err(e)) => {
                let reads = &crate::metrics::get().source_reads;
                reads
                    .get_or_create(&crate::metrics::outcome("failed"))
                    .inc();
                warn!("cannot read the fleet from {}: {e}", origin.describe())
            }
            Err(e) => warn!("the source reader stopped: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = trigger.notified() => {}
        }
    }
}
