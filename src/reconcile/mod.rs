//! The controller: between `plan` and the services. It follows the fleet's origin,
//! diffs each revision against what the machines reported, and arms each host's next
//! task when its wave, window and retry policy allow; the services only read what it
//! publishes (the boot table, the multicast sessions) and report what they see.
//!
//! Level-triggered, kube style: a work queue keyed by host ([`scheduler`]); each run
//! reads desired and observed state, never "what changed". The pure parts take `now`
//! and return decisions: [`host`] (one host's lifecycle) and [`waves`] (the gates).
//! Nothing below this module imports it.

pub mod error;
pub mod follow;
pub mod host;
pub mod scheduler;
pub mod waves;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::image::store::Store as ImageStore;
use crate::multicast::sessions::Sessions;
use crate::observed::{ImageVersion, Observed, ObservedHost, ObservedImage};
use crate::plan::{self, Params, Step, Version, Via};
use crate::protocol::{
    After, Assignment, BootInstruction, Command, CommitView, DiskWanted, FleetStatus, HostView,
    Task,
};
use crate::services::api::{Api, TOKEN_SECS, random_token};
use crate::services::dhcp;
use crate::services::http::BootTable;
use crate::spec::{FleetSpec, Mac, UnknownHosts};
use crate::state::{EventRow, HostRow, Op, Reader, TaskRow, TokenRow, WriteHandle};
use error::{Hold, RetryPolicy};
use follow::{Revision, RevisionFeed};
use host::{Action, Due, Gate, HostStatus, Input, Noted, Phase, Seen};
use scheduler::Scheduler;
use waves::Member;

/// What the controller reads from and writes to.
pub struct Parts {
    pub api: Arc<Api>,
    pub journal: WriteHandle,
    pub reader: Arc<Reader>,
    pub image_store: Arc<ImageStore>,
    pub sessions: Arc<Sessions>,
    pub boot: watch::Sender<Arc<BootTable>>,
    pub events: broadcast::Sender<EventRow>,
    /// The DHCP server, told the fleet's hosts on each new revision.
    pub dhcp: Option<Arc<Mutex<dhcp::Server>>>,
    pub dhcp_sites: Vec<String>,
    pub clock: Arc<dyn Clock>,
    pub policy: RetryPolicy,
    /// Where the fleet comes from, for status.
    pub source: String,
    /// Which commits are trusted, and what an untrusted one may do.
    pub signatures: Option<Arc<follow::Signatures>>,
}

/// What the controller reacts to.
pub struct Inputs {
    pub revisions: RevisionFeed,
    /// Observations, once durable (from the state writer's tap).
    pub observed: mpsc::UnboundedReceiver<Op>,
    pub commands: mpsc::UnboundedReceiver<Command>,
}

pub struct Controller {
    parts: Parts,
    spec: Option<Arc<FleetSpec>>,
    applied: Option<CommitView>,
    attempted: Option<CommitView>,
    statuses: HashMap<String, HostStatus>,
    by_mac: FxHashMap<Mac, String>,
    scheduler: Scheduler,
    dues: HashMap<String, Due>,
    gates: HashMap<String, Gate>,
    waves: Vec<waves::WaveView>,
    /// Observed state changed: plan again before reconciling.
    dirty: bool,
    /// What hosts boot changed: publish the boot table.
    boot_dirty: bool,
    next_task: u64,
}

fn ms(secs: u64) -> u64 {
    secs.saturating_mul(1000)
}

impl Controller {
    /// A controller that carries on from what the state database recorded.
    pub fn new(parts: Parts) -> Result<Controller, crate::state::StateError> {
        let mut statuses = HashMap::new();
        for row in parts.reader.hosts()? {
            match serde_json::from_str::<HostStatus>(&row.status) {
                Ok(s) => {
                    statuses.insert(row.name, s);
                }
                Err(e) => {
                    warn!(host = %row.name, "recorded status unreadable ({e}); starting afresh")
                }
            }
        }
        let next_task = parts.reader.last_task_id()? + 1;
        let applied = parts
            .reader
            .meta("applied")?
            .and_then(|t| serde_json::from_str(&t).ok());
        // A result recorded just before a crash may not have reached its host's status:
        // the result (durable before the agent was answered) wins.
        let now = parts.clock.now();
        for (name, s) in statuses.iter_mut() {
            let Some(a) = s.task.clone() else {
                continue;
            };
            let ended = parts
                .reader
                .tasks(Some(name), 20)?
                .into_iter()
                .find(|t| t.id == a.id)
                .and_then(|t| t.result);
            match ended {
                Some(result) => {
                    info!(host = %name, task = a.id, ok = result.ok,
                        "taking in a result recorded before the restart");
                    host::observe(
                        s,
                        &Seen::Result { task: a.id, result },
                        &parts.policy,
                        applied_commit(&parts)?.as_deref(),
                        now,
                        parts.clock.jitter(),
                    );
                }
                None => info!(host = %name, task = a.id, "carrying on with an armed task"),
            }
        }
        Ok(Controller {
            parts,
            spec: None,
            applied,
            attempted: None,
            statuses,
            by_mac: FxHashMap::default(),
            scheduler: Scheduler::default(),
            dues: HashMap::new(),
            gates: HashMap::new(),
            waves: Vec::new(),
            dirty: true,
            boot_dirty: true,
            next_task,
        })
    }

    /// Run until `shutdown`.
    pub async fn run(mut self, mut inputs: Inputs, shutdown: CancellationToken) {
        if let Some(rev) = inputs.revisions.borrow_and_update().clone() {
            self.on_revision(&rev);
        }
        loop {
            self.step();
            let wait = self.scheduler.next().map(|at| {
                let now = self.parts.clock.now_ms();
                std::time::Duration::from_millis(at.saturating_sub(now))
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = inputs.revisions.changed() => {
                    if changed.is_err() {
                        // The follower stopped (shutdown): keep serving what we have.
                        inputs.revisions = watch::channel(None).1;
                        continue;
                    }
                    let rev = inputs.revisions.borrow_and_update().clone();
                    if let Some(rev) = rev {
                        self.on_revision(&rev);
                    }
                }
                Some(op) = inputs.observed.recv() => self.on_op(op),
                Some(cmd) = inputs.commands.recv() => self.on_command(cmd),
                _ = sleep(wait) => {}
            }
            // Take every observation already waiting: one plan for a burst of them.
            while let Ok(op) = inputs.observed.try_recv() {
                self.on_op(op);
            }
        }
    }

    fn commit(&self) -> Option<&str> {
        self.applied.as_ref().map(|c| c.id.as_str())
    }

    fn event(&self, host: Option<&str>, kind: &str, message: String) {
        self.record(EventRow::new(host, kind, message));
    }

    /// Record `e` in the audit trail, with the time, and the commit served and its
    /// signer unless it names its own.
    fn record(&self, mut e: EventRow) {
        e.at = self.parts.clock.now();
        if e.commit.is_none() {
            e.commit = self.commit().map(str::to_string);
            e.signer = self
                .applied
                .as_ref()
                .and_then(|c| c.signature.as_ref())
                .and_then(|s| s.signer.clone());
        }
        let _ = self.parts.events.send(e.clone());
        self.parts.journal.write(vec![Op::Event(e)], None);
    }

    /// An event about revision `rev` itself (applied or refused).
    fn revision_event(&self, rev: &Revision, kind: &str, outcome: &str, message: String) {
        let mut e = EventRow::new(None, kind, message).outcome(outcome);
        e.commit = Some(rev.id.clone());
        e.signer = rev.signature.as_ref().and_then(|s| s.signer.clone());
        self.record(e);
    }

    fn on_revision(&mut self, rev: &Revision) {
        let rule = self.parts.signatures.clone();
        let untrusted = rev.untrusted(rule.as_deref());
        // A restart on an untrusted head: serve the last trusted commit first.
        if untrusted
            && self.spec.is_none()
            && let Some(fb) = &rev.fallback
        {
            self.on_revision(fb);
        }
        let view = |problems: Vec<String>, restricted: bool| CommitView {
            id: rev.id.clone(),
            at: rev.at,
            problems,
            signature: rev.signature.clone(),
            restricted,
        };
        let restricted = untrusted
            && rule
                .as_ref()
                .is_some_and(|r| r.untrusted == follow::Untrusted::NonDestructive);
        if untrusted && !(restricted && rev.fleet.is_ok()) {
            let why = untrusted_why(rev);
            warn!(revision = %rev.id, "{why}; the last trusted one keeps serving");
            let mut problems = vec![format!("UntrustedCommit: {why}")];
            if let Err(p) = &rev.fleet {
                problems.extend(p.iter().cloned());
            }
            self.attempted = Some(view(problems, false));
            self.revision_event(
                rev,
                "UntrustedCommit",
                "refused",
                format!(
                    "revision {} refused: {why}; {} keeps serving",
                    rev.id,
                    self.commit().unwrap_or("nothing")
                ),
            );
            return;
        }
        match &rev.fleet {
            Err(problems) => {
                warn!(revision = %rev.id, problems = problems.len(),
                    "revision is invalid; the last good one keeps serving");
                self.attempted = Some(view(problems.clone(), false));
                self.revision_event(
                    rev,
                    "CommitStalled",
                    "refused",
                    format!(
                        "revision {} is invalid ({} problems); {} keeps serving:\n{}",
                        rev.id,
                        problems.len(),
                        self.commit().unwrap_or("nothing"),
                        problems.join("\n")
                    ),
                );
            }
            Ok(spec) => {
                self.attempted = Some(view(Vec::new(), restricted));
                if self.spec.is_some() && self.commit() == Some(rev.id.as_str()) {
                    return;
                }
                self.applied = Some(view(Vec::new(), restricted));
                if let Ok(text) = serde_json::to_string(&self.applied) {
                    self.parts
                        .journal
                        .write(vec![Op::PutMeta("applied".into(), text)], None);
                }
                if restricted {
                    self.revision_event(
                        rev,
                        "UntrustedCommit",
                        "restricted",
                        format!(
                            "serving revision {} for non-destructive work only: {}",
                            rev.id,
                            untrusted_why(rev)
                        ),
                    );
                } else {
                    self.revision_event(
                        rev,
                        "CommitApplied",
                        "applied",
                        format!("serving revision {}", rev.id),
                    );
                }
                self.apply_spec(spec.clone());
            }
        }
    }

    fn apply_spec(&mut self, spec: Arc<FleetSpec>) {
        self.by_mac = spec
            .hosts
            .values()
            .map(|h| (h.mac, h.name.clone()))
            .collect();
        // Hosts that left the fleet: withdraw what they were armed with, forget them.
        let gone: Vec<String> = self
            .statuses
            .keys()
            .filter(|h| !spec.hosts.contains_key(*h))
            .cloned()
            .collect();
        for name in gone {
            if let Some(s) = self.statuses.remove(&name)
                && let Some(a) = s.task
            {
                self.withdraw(&name, &a, "the host left the fleet");
            }
            self.scheduler.cancel(&name);
        }
        if let Some(d) = &self.parts.dhcp {
            let config = dhcp::Config::from_spec(&spec, &self.parts.dhcp_sites);
            d.lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_hosts(config.hosts);
        }
        let now = self.parts.clock.now_ms();
        for name in spec.hosts.keys() {
            self.statuses.entry(name.clone()).or_default();
            self.scheduler.schedule(name, now);
        }
        self.spec = Some(spec);
        self.dirty = true;
        self.boot_dirty = true;
    }

    fn host_of(&self, mac: Mac) -> Option<String> {
        self.by_mac.get(&mac).cloned()
    }

    fn on_op(&mut self, op: Op) {
        let now = self.parts.clock.now();
        let (mac, seen) = match op {
            Op::Observe(o) => (o.mac, Seen::Dhcp),
            Op::Progress {
                task,
                mac,
                progress,
            } => (mac, Seen::Progress { task, progress }),
            Op::Result(r) => (
                r.mac,
                Seen::Result {
                    task: r.task,
                    result: r.result,
                },
            ),
            Op::Inventory(i) => {
                if i.host.is_none() {
                    self.event(
                        None,
                        "UnknownHostRegistered",
                        format!(
                            "unknown machine {} reported its inventory ({} disks); see `fleetwave hosts --unknown`",
                            i.mac,
                            i.inventory.disks.len()
                        ),
                    );
                    return;
                }
                let largest = i.inventory.disks.iter().map(|d| d.size_bytes).max();
                (
                    i.mac,
                    Seen::Inventory {
                        disk_bytes: largest,
                    },
                )
            }
            _ => return,
        };
        let Some(name) = self.host_of(mac) else {
            return;
        };
        let commit = self.commit().map(str::to_string);
        let jitter = self.parts.clock.jitter();
        let policy = self.parts.policy;
        let Some(s) = self.statuses.get_mut(&name) else {
            return;
        };
        let before = s.phase;
        let armed = s.task.clone();
        let noted = host::observe(s, &seen, &policy, commit.as_deref(), now, jitter);
        let after = s.phase;
        let task = s.task.as_ref().map(|a| a.task.summary());
        // Events about the armed task carry its id and its token's.
        let about = |e: EventRow| match &armed {
            Some(a) => e.task(a.id).token(&a.token),
            None => e,
        };
        if let (Seen::Progress { progress, .. }, Some(a)) = (&seen, &armed)
            && let Some(m) = milestone(a.progress.as_ref(), progress)
        {
            self.record(about(EventRow::new(
                Some(&name),
                "Progress",
                format!("{name}: {m} % of {} done", a.task.summary()),
            )));
        }
        match noted {
            Noted::Nothing | Noted::Stale => {}
            Noted::Booting => self.record(about(EventRow::new(
                Some(&name),
                "Booting",
                format!("{name} is booting for {}", task.unwrap_or_default()),
            ))),
            Noted::Imaging => self.record(about(EventRow::new(
                Some(&name),
                "Imaging",
                format!("{name}: agent at work"),
            ))),
            Noted::Succeeded(m) => {
                self.record(about(
                    EventRow::new(Some(&name), "TaskSucceeded", m).outcome("ok"),
                ));
                self.finished(&name);
            }
            Noted::Failed(m) => {
                self.record(about(
                    EventRow::new(Some(&name), "TaskFailed", m).outcome("failed"),
                ));
                self.finished(&name);
            }
            Noted::Drifted(m) => {
                self.event(Some(&name), "Drifted", m);
                let heal = self
                    .spec
                    .as_ref()
                    .and_then(|sp| sp.hosts.get(&name))
                    .map(|h| h.heal);
                if heal == Some(crate::spec::Heal::Redeploy)
                    && let Some(s) = self.statuses.get_mut(&name)
                {
                    // Forget what it held: the plan deploys it again, in its wave.
                    s.deployed = None;
                    self.event(
                        Some(&name),
                        "Healing",
                        format!("{name}: heal: redeploy; its version is deployed again"),
                    );
                }
                self.finished(&name);
            }
        }
        if before != after {
            self.persist(&name);
            self.dirty = true;
        }
        self.scheduler.schedule(&name, ms(now));
    }

    /// A task ended: its boot script turns to the disk, the plan changes.
    fn finished(&mut self, name: &str) {
        self.boot_dirty = true;
        self.dirty = true;
        self.persist(name);
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Observed { reply } => {
                let _ = reply.send(self.observed());
            }
            Command::ImagesChanged => {
                self.dirty = true;
                self.boot_dirty = true;
            }
            Command::Retry { host, reply } => {
                let now = self.parts.clock.now_ms();
                let r = match self.statuses.get_mut(&host) {
                    None => Err(format!("{host} is not in the fleet being served")),
                    Some(s) => {
                        s.failures = 0;
                        s.stalled_at_commit = None;
                        if !matches!(s.hold, Some(Hold::Waiting { .. })) {
                            s.hold = None;
                        }
                        self.scheduler.schedule(&host, now);
                        self.dirty = true;
                        Ok(())
                    }
                };
                if r.is_ok() {
                    self.event(Some(&host), "Retry", format!("{host}: retry asked for"));
                    self.persist(&host);
                }
                let _ = reply.send(r);
            }
            Command::Wake { host, reply } => {
                let _ = reply.send(self.wake_now(&host));
            }
        }
    }

    /// An operator's wake: whatever the host's `wake` setting, which governs the
    /// controller's own.
    fn wake_now(&mut self, name: &str) -> Result<String, String> {
        let spec = self.spec.clone().ok_or("no fleet is being served yet")?;
        let h = spec
            .hosts
            .get(name)
            .ok_or_else(|| format!("{name} is not in the fleet being served"))?;
        let site = spec
            .sites
            .get(&h.site)
            .ok_or_else(|| format!("{name}: its site {} is not served", h.site))?;
        crate::services::wol::wake(&site.interface, site.subnet.broadcast(), h.mac)
            .map_err(|e| format!("{name}: cannot send Wake-on-LAN on {}: {e}", site.interface))?;
        let msg = format!(
            "{name}: Wake-on-LAN packet sent on {} by an operator",
            site.interface
        );
        self.event(Some(name), "WakeSent", msg.clone());
        Ok(msg)
    }

    /// What is known, as the planner reads it.
    fn observed(&self) -> Observed {
        let hosts = self
            .spec
            .iter()
            .flat_map(|spec| spec.hosts.values())
            .filter_map(|h| {
                let s = self.statuses.get(&h.name)?;
                Some(ObservedHost {
                    mac: h.mac,
                    deployed: s.deployed,
                    done: s.done,
                    disk_bytes: s.disk_bytes,
                    last_seen: None,
                })
            })
            .collect();
        let images = match self.parts.image_store.images() {
            Ok(images) => images
                .into_iter()
                .map(|(name, rec)| {
                    let versions = rec
                        .versions
                        .into_iter()
                        .map(|v| ImageVersion {
                            digest: v.digest,
                            generation: v.generation,
                            disk_bytes: v.disk_bytes,
                            stored_bytes: v.stored_bytes,
                            captured_at: None,
                        })
                        .collect();
                    (name, ObservedImage { versions })
                })
                .collect(),
            Err(e) => {
                warn!("cannot list the image store: {e}");
                Default::default()
            }
        };
        Observed { hosts, images }
    }

    /// Plan again, and gate every host's due work.
    fn replan(&mut self) {
        let Some(spec) = self.spec.clone() else {
            return;
        };
        let now = self.parts.clock.now();
        let observed = self.observed();
        let plan = plan::diff(&spec, &observed, &Params::default());
        let mut dues: HashMap<String, Due> = HashMap::new();
        for s in &plan.stalled {
            dues.insert(
                s.host.clone(),
                Due::Stalled {
                    reason: "ImageUnavailable".into(),
                    message: s.reason.clone(),
                },
            );
        }
        // Captures come first; a host's first step is what is due for it now.
        for (_, hp) in plan.host_plans() {
            let Some(step) = hp.steps.first() else {
                continue;
            };
            dues.entry(hp.host.clone())
                .and_modify(|d| {
                    if matches!(d, Due::Stalled { .. }) {
                        *d = due_of(step);
                    }
                })
                .or_insert_with(|| due_of(step));
        }
        // An untrusted commit served for non-destructive work: what writes disks or
        // makes image versions waits for a trusted one.
        if self.applied.as_ref().is_some_and(|c| c.restricted) {
            for d in dues.values_mut() {
                if let Due::Task(t) = d
                    && needs_trust(t)
                {
                    *d = Due::Stalled {
                        reason: "UntrustedCommit".into(),
                        message: format!(
                            "{} needs a commit signed by a trusted key; the commit served is not",
                            t.summary()
                        ),
                    };
                }
            }
        }
        let mut members: HashMap<&str, Member> = HashMap::new();
        for h in spec.hosts.values() {
            let s = self.statuses.get(&h.name);
            let due = dues.get(&h.name).unwrap_or(&Due::Nothing);
            let m = if h.suspend {
                Member::Idle
            } else if s.is_some_and(|s| s.task.is_some()) {
                Member::InFlight
            } else if s.is_some_and(|s| s.phase == Phase::Stalled) {
                Member::Failed
            } else {
                match due {
                    Due::Nothing => Member::Done,
                    Due::Task(t) => Member::Due {
                        destructive: t.destructive(),
                    },
                    Due::Blocked { .. } | Due::Stalled { .. } => Member::Idle,
                }
            };
            members.insert(&h.name, m);
        }
        let (gates, views) = waves::gates(&spec, &members, now);
        // Hosts whose due work or gate changed are looked at again now.
        let now_ms = self.parts.clock.now_ms();
        for h in spec.hosts.keys() {
            let due = dues.get(h).unwrap_or(&Due::Nothing);
            if self.dues.get(h).unwrap_or(&Due::Nothing) != due || self.gates.get(h) != gates.get(h)
            {
                self.scheduler.schedule(h, now_ms);
            }
        }
        self.parts.sessions.replan(&spec, &plan);
        self.dues = dues;
        self.gates = gates;
        self.waves = views;
    }

    /// Replan if needed, reconcile every due host, publish what changed.
    fn step(&mut self) {
        if self.spec.is_none() {
            return;
        }
        let started = std::time::Instant::now();
        let m = crate::metrics::get();
        // Reconciling can change what the gates see (a host armed takes a slot): plan
        // and gate again until nothing moves, a few rounds at most.
        for _ in 0..4 {
            if self.dirty {
                self.dirty = false;
                self.replan();
            }
            let now_ms = self.parts.clock.now_ms();
            let due = self.scheduler.pop_due(now_ms);
            if due.is_empty() {
                break;
            }
            // A gate that was waiting for this moment (a window opening) is decided
            // again before its hosts are.
            let now = now_ms / 1000;
            if due.iter().any(|h| {
                matches!(self.gates.get(h), Some(Gate::Wait { until: Some(t), .. }) if *t <= now)
            }) {
                self.replan();
            }
            m.reconciles.inc_by(due.len() as u64);
            for name in due {
                self.reconcile_host(&name);
            }
        }
        m.reconcile_queue.set(self.scheduler.len() as i64);
        m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
        if self.boot_dirty {
            self.boot_dirty = false;
            self.publish_boot();
        }
    }

    fn reconcile_host(&mut self, name: &str) {
        let Some(spec) = self.spec.clone() else {
            return;
        };
        let Some(h) = spec.hosts.get(name) else {
            return;
        };
        let now = self.parts.clock.now();
        let jitter = self.parts.clock.jitter();
        let commit = self.commit().map(str::to_string);
        let due = self.dues.get(name).cloned().unwrap_or(Due::Nothing);
        let gate = self.gates.get(name).cloned().unwrap_or(Gate::Open);
        let policy = self.parts.policy;
        let Some(s) = self.statuses.get_mut(name) else {
            return;
        };
        let before = s.clone();
        let input = Input {
            due: &due,
            gate: &gate,
            suspended: h.suspend,
            commit: commit.as_deref(),
            policy: &policy,
        };
        let d = host::reconcile(&input, s, now, jitter);
        match d.action {
            Action::Nothing => {}
            Action::Arm(task) => self.arm(name, task, now),
            Action::Disarm { why } => {
                if let Some(a) = &before.task {
                    self.withdraw(name, a, &why);
                }
                if let Some(s) = self.statuses.get_mut(name) {
                    s.task = None;
                }
                self.boot_dirty = true;
            }
        }
        if let Some(at) = d.requeue_at {
            self.scheduler.schedule(name, ms(at));
        }
        self.wake(name, now);
        let Some(s) = self.statuses.get(name) else {
            return;
        };
        if s.phase != before.phase {
            self.dirty = true;
            match s.phase {
                Phase::Ready => self.event(Some(name), "Ready", format!("{name} is Ready")),
                Phase::Stalled => self.event(
                    Some(name),
                    "Stalled",
                    format!(
                        "{name} is Stalled: {}",
                        s.hold.as_ref().map(Hold::message).unwrap_or_default()
                    ),
                ),
                _ => {}
            }
        }
        if *s != before {
            self.persist(name);
        }
    }

    fn arm(&mut self, name: &str, task: Task, now: u64) {
        let Some(h) = self.spec.as_ref().and_then(|s| s.hosts.get(name)).cloned() else {
            return;
        };
        let token = random_token();
        if token.is_empty() {
            warn!(host = %name, "no randomness for a task token; not armed");
            return;
        }
        let id = self.next_task;
        self.next_task += 1;
        let assignment = Assignment {
            mac: h.mac,
            host: Some(name.to_string()),
            id,
            task: task.clone(),
            disk: DiskWanted::from_selector(&h.disk),
            after: After::Reboot,
            commit: self.commit().map(str::to_string),
            signer: self
                .applied
                .as_ref()
                .and_then(|c| c.signature.as_ref())
                .and_then(|s| s.signer.clone()),
        };
        let expires = now + TOKEN_SECS;
        self.parts.api.grant(&token, assignment.clone(), expires);
        let commit = self.commit().map(str::to_string);
        if let Some(s) = self.statuses.get_mut(name) {
            s.task = Some(host::Armed {
                id,
                task: task.clone(),
                token: token.clone(),
                armed_at: now,
                commit: commit.clone(),
                booted_at: None,
                progress: None,
                heard_at: None,
                wakes: 0,
                woken_at: None,
            });
        }
        // The token, the task and the host's status in one transaction: a crash leaves
        // all three or none, so a restart never meets a token it does not know of.
        let mut ops = vec![
            Op::PutToken(TokenRow {
                token: token.clone(),
                assignment,
                expires,
            }),
            Op::PutTask(TaskRow {
                id,
                host: name.to_string(),
                mac: h.mac,
                task: task.clone(),
                commit,
                armed_at: now,
                ended_at: None,
                result: None,
            }),
        ];
        ops.extend(self.host_row(name).map(Op::PutHost));
        self.parts.journal.write(ops, None);
        info!(host = %name, task = id, commit = self.commit().unwrap_or("-"),
            "armed: {}", task.summary());
        self.record(
            EventRow::new(
                Some(name),
                "Armed",
                format!("{name}: armed task {id}: {} (token minted)", task.summary()),
            )
            .task(id)
            .token(&token)
            .outcome("armed"),
        );
        self.boot_dirty = true;
    }

    /// Wake-on-LAN for an armed host that has not booted, where the fleet allows it.
    fn wake(&mut self, name: &str, now: u64) {
        let Some(spec) = self.spec.clone() else {
            return;
        };
        let Some(h) = spec.hosts.get(name) else {
            return;
        };
        let Some(site) = spec.sites.get(&h.site) else {
            return;
        };
        if !h.wake.unwrap_or(site.wake) {
            return;
        }
        let Some(a) = self.statuses.get_mut(name).and_then(|s| s.task.as_mut()) else {
            return;
        };
        let (send, next) = host::wake_due(a, now);
        if send {
            a.wakes += 1;
            a.woken_at = Some(now);
            let n = a.wakes;
            match crate::services::wol::wake(&site.interface, site.subnet.broadcast(), h.mac) {
                Ok(()) => self.event(
                    Some(name),
                    "WakeSent",
                    format!("{name}: Wake-on-LAN packet {n} sent on {}", site.interface),
                ),
                Err(e) => warn!(host = %name, interface = %site.interface,
                    "cannot send Wake-on-LAN: {e}"),
            }
            self.persist(name);
        }
        if let Some(at) = next {
            self.scheduler.schedule(name, ms(at));
        }
    }

    /// Stop honouring an armed task's token.
    fn withdraw(&self, name: &str, a: &host::Armed, why: &str) {
        self.parts.api.revoke(&a.token);
        self.parts
            .journal
            .write(vec![Op::SpendToken(a.token.clone())], None);
        self.record(
            EventRow::new(
                Some(name),
                "Disarmed",
                format!("{name}: task {} withdrawn: {why} (token revoked)", a.id),
            )
            .task(a.id)
            .token(&a.token)
            .outcome("withdrawn"),
        );
    }

    /// A host's status as a row of the state database.
    fn host_row(&self, name: &str) -> Option<HostRow> {
        let s = self.statuses.get(name)?;
        let mac = self.spec.as_ref()?.hosts.get(name)?.mac;
        Some(HostRow {
            name: name.to_string(),
            mac,
            phase: s.phase.name().to_string(),
            status: serde_json::to_string(s).ok()?,
            updated: self.parts.clock.now(),
        })
    }

    fn persist(&self, name: &str) {
        if let Some(row) = self.host_row(name) {
            self.parts.journal.write(vec![Op::PutHost(row)], None);
        }
    }

    fn publish_boot(&self) {
        let Some(spec) = &self.spec else {
            return;
        };
        let hosts = spec
            .hosts
            .values()
            .map(|h| {
                let s = self.statuses.get(&h.name);
                let boot = match s.and_then(|s| s.task.as_ref()) {
                    Some(a) => BootInstruction::Agent {
                        host: h.name.clone(),
                        site: h.site.clone(),
                        token: a.token.clone(),
                        task: a.task.clone(),
                        summary: format!("{} (task {}, wave {})", a.task.summary(), a.id, h.wave),
                    },
                    None => BootInstruction::LocalDisk {
                        host: h.name.clone(),
                        why: s
                            .map(|s| match &s.hold {
                                Some(hold) => format!("{}: {}", s.phase.name(), hold.message()),
                                None => s.phase.name().to_string(),
                            })
                            .unwrap_or_else(|| "nothing due".into()),
                    },
                };
                (h.mac, boot)
            })
            .collect();
        let register_sites = spec
            .sites
            .iter()
            .filter(|(_, s)| s.unknown_hosts == UnknownHosts::Register)
            .map(|(n, _)| n.clone())
            .collect();
        self.parts.boot.send_replace(Arc::new(BootTable {
            hosts,
            register_sites,
        }));
    }

    /// Where everything stands.
    pub fn status(&self) -> FleetStatus {
        let hosts = self
            .spec
            .iter()
            .flat_map(|spec| spec.hosts.values())
            .map(|h| {
                let s = self.statuses.get(&h.name).cloned().unwrap_or_default();
                let (reason, message, until) = match &s.hold {
                    None => (None, None, None),
                    Some(hold) => {
                        let until = match hold {
                            Hold::Waiting { until, .. } => *until,
                            Hold::Transient { retry_at, .. } => Some(*retry_at),
                            Hold::Stalled { .. } => None,
                        };
                        (
                            Some(hold.reason().to_string()),
                            Some(hold.message().to_string()),
                            until,
                        )
                    }
                };
                HostView {
                    name: h.name.clone(),
                    mac: h.mac,
                    site: h.site.clone(),
                    wave: h.wave.clone(),
                    image: h.image.clone(),
                    state: s.phase.name().to_string(),
                    task: s.task.as_ref().map(|a| a.task.summary()),
                    progress: s.task.as_ref().and_then(|a| a.progress.clone()),
                    reason,
                    message,
                    until,
                    deployed: s.deployed,
                    failures: s.failures,
                    last_seen: s.last_seen,
                    conditions: s.conditions.clone(),
                }
            })
            .collect();
        FleetStatus {
            source: self.parts.source.clone(),
            applied: self.applied.clone(),
            attempted: self.attempted.clone(),
            hosts,
            waves: self.waves.clone(),
            // Read by the HTTP handler, off the controller's loop.
            events: Vec::new(),
        }
    }
}

/// The quarter (25, 50, 75) a task's progress passed between two reports, if any.
fn milestone(
    before: Option<&crate::protocol::Progress>,
    now: &crate::protocol::Progress,
) -> Option<u64> {
    // In u128: the agent's numbers are not trusted to be small.
    let quarter = |p: &crate::protocol::Progress| {
        (u128::from(p.done_bytes.min(p.total_bytes)) * 4)
            .checked_div(u128::from(p.total_bytes))
            .map_or(0, |q| q.min(3) as u64)
    };
    let (was, is) = (before.map_or(0, quarter), quarter(now));
    (is > was).then_some(is * 25)
}

/// Whether a task may only be armed by a trusted commit: it writes a disk (deploy,
/// wipe) or makes an image version the fleet's hosts then deploy (capture).
fn needs_trust(t: &Task) -> bool {
    t.destructive() || matches!(t, Task::Capture { .. })
}

/// Why a revision is not trusted, with its signer and key, in one line.
fn untrusted_why(rev: &Revision) -> String {
    match &rev.signature {
        None => format!("revision {} carries no signature check", rev.id),
        Some(s) => format!(
            "revision {} is not trusted: {}{}{}",
            rev.id,
            s.why,
            s.signer
                .as_ref()
                .map(|n| format!("; signer {n}"))
                .unwrap_or_default(),
            s.key
                .as_ref()
                .map(|k| format!("; key {k}"))
                .unwrap_or_default()
        ),
    }
}

/// The applied revision's id, as recorded.
fn applied_commit(parts: &Parts) -> Result<Option<String>, crate::state::StateError> {
    Ok(parts
        .reader
        .meta("applied")?
        .and_then(|t| serde_json::from_str::<CommitView>(&t).ok())
        .map(|c| c.id))
}

/// The task a plan step asks for, or why it cannot start yet.
fn due_of(step: &Step) -> Due {
    match step {
        Step::Inventory { generation } => Due::Task(Task::Inventory {
            generation: *generation,
        }),
        Step::Capture { image, generation } => Due::Task(Task::Capture {
            image: image.clone(),
            generation: *generation,
        }),
        Step::Wipe { mode, generation } => Due::Task(Task::Wipe {
            mode: *mode,
            generation: *generation,
        }),
        Step::Deploy {
            image,
            version: Version::Digest { digest },
            via,
            ..
        } => Due::Task(Task::Deploy {
            image: image.clone(),
            version: *digest,
            multicast: match via {
                Via::Unicast => None,
                Via::Multicast { session } => Some(session.clone()),
            },
        }),
        Step::Deploy {
            image,
            version: Version::NextCapture { generation },
            ..
        } => Due::Blocked {
            reason: "WaitingForCapture".into(),
            message: format!("waits for the capture of {image} (generation {generation})"),
        },
        Step::Verify { generation, digest } => Due::Task(Task::Verify {
            version: *digest,
            generation: *generation,
        }),
    }
}

async fn sleep(d: Option<std::time::Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::TokioClock;
    use crate::image::store::VersionRecord;

    /// A controller on `fleet` (in a temporary directory), its clock starting at `start`,
    /// running until the test ends; the channel to ask it for its status.
    struct Running {
        commands: mpsc::UnboundedSender<Command>,
        boot: watch::Receiver<Arc<BootTable>>,
        _dir: tempfile::TempDir,
        _stop: tokio_util::sync::DropGuard,
    }

    fn start(fleet: &str, start: u64) -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("fleet.yaml"), fleet).expect("write");
        let rev = follow::read(
            &crate::source::watch::Origin::Dir(d.join("fleet.yaml")),
            d,
            None,
        )
        .expect("read");
        assert!(rev.fleet.is_ok(), "{:?}", rev.fleet.err());
        let store = ImageStore::open(&d.join("store")).expect("store");
        store
            .add_version(
                "win10",
                VersionRecord {
                    digest: crate::spec::Digest([7; 32]),
                    generation: 1,
                    captured_at: 0,
                    disk_bytes: 1 << 20,
                    stored_bytes: 1 << 19,
                    made_by: None,
                },
            )
            .expect("version");
        let db = d.join("state.db");
        let state = crate::state::Store::open(&db).expect("state");
        let reader = Arc::new(Reader::open(&db).expect("reader"));
        let (_tap, observed) = mpsc::unbounded_channel();
        let writer = state.into_writer();
        let stop = CancellationToken::new();
        let api = Arc::new(Api::new(ImageStore::open(&d.join("store")).expect("store")));
        let (boot_tx, boot) = watch::channel(Arc::new(BootTable::default()));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let controller = Controller::new(Parts {
            api,
            journal: writer.handle(),
            reader,
            image_store: Arc::new(store),
            sessions: Arc::new(Sessions::new(d.join("store"), stop.clone())),
            boot: boot_tx,
            events: broadcast::channel(64).0,
            dhcp: None,
            dhcp_sites: Vec::new(),
            clock: Arc::new(TokioClock::new(start)),
            policy: RetryPolicy::default(),
            source: "test".into(),
            signatures: None,
        })
        .expect("controller");
        let (_rev_tx, revisions) = watch::channel(Some(Arc::new(rev)));
        let inputs = Inputs {
            revisions,
            observed,
            commands: commands_rx,
        };
        let s = stop.clone();
        tokio::spawn(async move {
            let _keep = (_rev_tx, _tap, writer);
            controller.run(inputs, s).await;
        });
        Running {
            commands,
            boot,
            _dir: dir,
            _stop: stop.drop_guard(),
        }
    }

    impl Running {
        async fn host(&self, name: &str) -> HostView {
            let (reply, rx) = tokio::sync::oneshot::channel();
            self.commands
                .send(Command::Status { reply })
                .expect("controller running");
            let s = rx.await.expect("status");
            s.hosts
                .into_iter()
                .find(|h| h.name == name)
                .expect("host in status")
        }

        fn armed(&self, mac: &str) -> bool {
            let mac: Mac = mac.parse().expect("mac");
            matches!(
                self.boot.borrow().hosts.get(&mac),
                Some(BootInstruction::Agent { .. })
            )
        }
    }

    const SAT_NOON: u64 = 1_796_472_000; // 2026-12-05 12:00 UTC, a Saturday

    fn fleet(windows: &str) -> String {
        let windows = if windows.is_empty() {
            String::new()
        } else {
            format!("windows: [{windows}]")
        };
        format!(
            "version: 1
sites:
  lab: {{interface: eth0, server: 172.28.0.1, subnet: 172.28.0.0/24, dhcp: {{mode: off}}}}
images:
  win10: {{os: windows}}
hosts:
  pc01: {{mac: \"52:54:00:00:00:01\", site: lab, image: win10, wave: w1}}
waves:
  w1: {{{windows}}}
"
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_deploy_due_outside_its_window_waits_and_is_armed_when_the_window_opens() {
        let c = start(&fleet("\"Sat 22:00 - Sun 06:00\""), SAT_NOON);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let h = c.host("pc01").await;
        assert_eq!(h.state, "Pending");
        assert_eq!(h.reason.as_deref(), Some("OutsideWindow"));
        assert_eq!(h.until, Some(SAT_NOON + 10 * 3600));
        assert!(!c.armed("52:54:00:00:00:01"));
        // Ten hours later, to the second, the window opens.
        tokio::time::sleep(Duration::from_secs(10 * 3600 - 60)).await;
        assert_eq!(c.host("pc01").await.state, "Pending");
        tokio::time::sleep(Duration::from_secs(61)).await;
        let h = c.host("pc01").await;
        assert_eq!(h.state, "Armed", "{h:?}");
        assert!(c.armed("52:54:00:00:00:01"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deploy_with_no_window_to_wait_for_is_armed_at_once() {
        let c = start(&fleet(""), SAT_NOON);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(c.host("pc01").await.state, "Armed");
    }
}
