//! The server's multicast sessions: the plan names them, the first agent of a session
//! that asks starts its sender, and each sender's thread ends (and frees its socket)
//! when its session is over or the server stops.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::{SendConfig, SessionReport, send};
use crate::image::store::Store;
use crate::plan::{Plan, Version};
use crate::spec::{Digest, FleetSpec};

/// A session as the plan forms it.
#[derive(Debug, Clone)]
struct Planned {
    group: SocketAddrV4,
    bind: Ipv4Addr,
    digest: Option<Digest>,
    min_receivers: u32,
    max_wait: Duration,
    max_rate_bps: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Running {
    pub id: String,
    pub group: SocketAddrV4,
    pub digest: Digest,
}

/// The sender running on each group, and its thread.
type Senders = Arc<Mutex<HashMap<SocketAddrV4, (Running, JoinHandle<()>)>>>;

pub struct Sessions {
    /// Replaced whenever the controller plans again.
    planned: Mutex<HashMap<String, Planned>>,
    store: PathBuf,
    running: Senders,
    stop: CancellationToken,
    /// The newest sessions' reports, newest last, for the console.
    ended: Arc<Mutex<VecDeque<SessionReport>>>,
}

/// How many ended sessions' reports are kept.
const KEEP_ENDED: usize = 20;

impl Sessions {
    /// No sessions until the controller plans.
    pub fn new(store: PathBuf, stop: CancellationToken) -> Sessions {
        Sessions {
            planned: Mutex::default(),
            store,
            running: Arc::default(),
            stop,
            ended: Arc::default(),
        }
    }

    pub fn from_plan(
        spec: &FleetSpec,
        plan: &Plan,
        store: PathBuf,
        stop: CancellationToken,
    ) -> Sessions {
        Sessions {
            planned: Mutex::new(planned(spec, plan)),
            store,
            running: Arc::default(),
            stop,
            ended: Arc::default(),
        }
    }

    /// The sessions of a new plan; senders already running go on.
    pub fn replan(&self, spec: &FleetSpec, plan: &Plan) {
        *self.planned.lock().unwrap_or_else(|e| e.into_inner()) = planned(spec, plan);
    }

    /// The group and version of session `id`, started if it is not running.
    /// Refused when the plan has no such session, its version is not captured yet,
    /// or its group is busy with another session.
    pub fn ensure(&self, id: &str) -> Result<Running, String> {
        let p = self
            .planned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| format!("the plan has no multicast session {id:?}"))?;
        let digest = p
            .digest
            .ok_or_else(|| format!("session {id}: its image has no captured version yet"))?;
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|_, (_, h)| !h.is_finished());
        if let Some((r, _)) = running.get(&p.group) {
            if r.id == id && r.digest == digest {
                return Ok(r.clone());
            }
            return Err(format!(
                "group {} is busy with session {}; deploy by unicast or wait",
                p.group, r.id
            ));
        }
        let mut cfg = SendConfig::new(p.group, p.bind);
        cfg.min_receivers = p.min_receivers;
        cfg.max_wait = p.max_wait;
        cfg.max_rate_bps = p.max_rate_bps;
        // Nobody joined in the whole wait: the agents that asked went elsewhere.
        cfg.join_timeout = p.max_wait.max(Duration::from_secs(60));
        let me = Running {
            id: id.to_string(),
            group: p.group,
            digest,
        };
        let (store, stop, all, mine, ended) = (
            self.store.clone(),
            self.stop.clone(),
            Arc::clone(&self.running),
            me.clone(),
            Arc::clone(&self.ended),
        );
        let handle = std::thread::Builder::new()
            .name(format!("multicast {id}"))
            .spawn(move || {
                let r = Store::open(&store)
                    .map_err(super::McastError::from)
                    .and_then(|s| send(&s, &mine.digest, &cfg, &|| stop.is_cancelled()));
                match r {
                    Ok(rep) => {
                        info!(session = %mine.id, ended = %rep.ended,
                            complete = rep.receivers_complete, joined = rep.receivers_joined,
                            "multicast session ended");
                        let mut ended = ended.lock().unwrap_or_else(|e| e.into_inner());
                        if ended.len() == KEEP_ENDED {
                            ended.pop_front();
                        }
                        ended.push_back(rep);
                    }
                    Err(e) => {
                        crate::metrics::get()
                            .multicast_sessions
                            .get_or_create(&crate::metrics::outcome("failed"))
                            .inc();
                        error!(session = %mine.id, "multicast session failed: {e}")
                    }
                }
                let mut all = all.lock().unwrap_or_else(|e| e.into_inner());
                if all.get(&mine.group).is_some_and(|(r, _)| r.id == mine.id) {
                    all.remove(&mine.group);
                }
            })
            .map_err(|e| format!("cannot start the sender thread: {e}"))?;
        info!(session = %id, group = %p.group, %digest, "multicast session started");
        running.insert(p.group, (me.clone(), handle));
        Ok(me)
    }

    /// Sessions sending now (for `/health`).
    pub fn running(&self) -> Vec<Running> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Running> = running
            .values()
            .filter(|(_, h)| !h.is_finished())
            .map(|(r, _)| r.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The reports of the newest sessions that ended, newest first.
    pub fn ended(&self) -> Vec<SessionReport> {
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        ended.iter().rev().cloned().collect()
    }

    /// Wait for every sender to end (after the stop token was cancelled).
    pub fn join(&self) {
        let handles: Vec<JoinHandle<()>> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, (_, h))| h)
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

/// The sessions a plan forms, by id.
fn planned(spec: &FleetSpec, plan: &Plan) -> HashMap<String, Planned> {
    plan.waves
        .iter()
        .flat_map(|w| &w.sessions)
        .filter_map(|s| {
            let bind = spec.sites.get(&s.site)?.server;
            let group = SocketAddrV4::new(s.address.parse().ok()?, s.port);
            Some((
                s.id.clone(),
                Planned {
                    group,
                    bind,
                    digest: match &s.version {
                        Version::Digest { digest } => Some(*digest),
                        Version::NextCapture { .. } => None,
                    },
                    min_receivers: s.min_receivers,
                    max_wait: Duration::from_secs(s.max_wait_secs),
                    max_rate_bps: s.max_rate_bps,
                },
            ))
        })
        .collect()
}
