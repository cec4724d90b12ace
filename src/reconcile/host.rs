//! One host's lifecycle, pure: observations update its status, and
//! [`reconcile`] turns (what is due, the gates, its status, now) into an action.
//!
//! Pending → Armed (a task and its token exist; the boot script says so) → Booting
//! (DHCP seen) → Imaging (agent progress) → Verifying (all written, read-back under
//! way) → Ready (the digest read back from the disk is the version asked for). A failed
//! attempt is retried with backoff up to a limit, then Stalled until a new commit or
//! `fleetwave retry`.

use serde::{Deserialize, Serialize};

use super::error::{Hold, RetryPolicy};
use crate::observed::DoneGenerations;
use crate::protocol::{Condition, Progress, Task, TaskResult};
use crate::spec::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Work is due and waits for a gate (a wave, a window, a capture).
    Pending,
    Armed,
    Booting,
    Imaging,
    Verifying,
    /// Nothing is due: the disk holds what the fleet asks for.
    Ready,
    /// The last attempt failed; the next one is due after a backoff.
    Failed,
    Stalled,
    Suspended,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Armed => "Armed",
            Phase::Booting => "Booting",
            Phase::Imaging => "Imaging",
            Phase::Verifying => "Verifying",
            Phase::Ready => "Ready",
            Phase::Failed => "Failed",
            Phase::Stalled => "Stalled",
            Phase::Suspended => "Suspended",
        }
    }

    /// A task is armed and not ended.
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            Phase::Armed | Phase::Booting | Phase::Imaging | Phase::Verifying
        )
    }
}

/// A task armed for the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Armed {
    pub id: u64,
    pub task: Task,
    pub token: String,
    pub armed_at: u64,
    pub commit: Option<String>,
    /// When the machine was first seen booting for it (DHCP).
    pub booted_at: Option<u64>,
    pub progress: Option<Progress>,
    /// When the agent last said anything.
    pub heard_at: Option<u64>,
    /// Wake-on-LAN packets sent for it, and when the last one went.
    #[serde(default)]
    pub wakes: u32,
    #[serde(default)]
    pub woken_at: Option<u64>,
}

/// Wake-on-LAN packets per armed task, at most.
pub const WAKES: u32 = 5;

/// Whether to send a Wake-on-LAN packet for an armed task now, and when to look again:
/// at once when armed, then after 1, 2, 4 and 8 minutes while the machine stays silent.
pub fn wake_due(a: &Armed, now: u64) -> (bool, Option<u64>) {
    if a.booted_at.is_some() || a.heard_at.is_some() || a.wakes >= WAKES {
        return (false, None);
    }
    let next = match a.woken_at {
        None => now,
        Some(last) => last + 60 * (1u64 << (a.wakes.saturating_sub(1)).min(6)),
    };
    if now >= next {
        let after = 60 * (1u64 << a.wakes.min(6));
        (true, (a.wakes + 1 < WAKES).then_some(now + after))
    } else {
        (false, Some(next))
    }
}

/// Everything the controller knows of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub phase: Phase,
    pub task: Option<Armed>,
    /// The version last deployed and verified on its disk.
    pub deployed: Option<Digest>,
    pub done: DoneGenerations,
    pub disk_bytes: Option<u64>,
    /// Failed attempts of the current step, in a row.
    pub failures: u32,
    /// Why the host is not moving, if it is not.
    pub hold: Option<Hold>,
    /// The commit a Stalled-for-retries host gave up at: a new commit tries again.
    pub stalled_at_commit: Option<String>,
    pub last_seen: Option<u64>,
    pub conditions: Vec<Condition>,
}

impl Default for HostStatus {
    fn default() -> Self {
        HostStatus {
            phase: Phase::Pending,
            task: None,
            deployed: None,
            done: DoneGenerations::default(),
            disk_bytes: None,
            failures: 0,
            hold: None,
            stalled_at_commit: None,
            last_seen: None,
            conditions: Vec::new(),
        }
    }
}

impl HostStatus {
    /// Set condition `kind`, keeping its time when nothing about it changed.
    pub fn set_condition(
        &mut self,
        kind: &str,
        status: bool,
        reason: &str,
        message: &str,
        commit: Option<&str>,
        now: u64,
    ) {
        let new = Condition {
            kind: kind.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            commit: commit.map(str::to_string),
            at: now,
        };
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(c) if c.status == status && c.reason == reason && c.message == message => {}
            Some(c) => *c = new,
            None => self.conditions.push(new),
        }
    }

    pub fn condition(&self, kind: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

/// What the controller must do for a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Arm this task (mint its token, record it, publish its boot script).
    Arm(Task),
    /// Withdraw the armed task (spend its token): the spec moved on, or the
    /// attempt failed.
    Disarm {
        why: String,
    },
}

/// What a wave (or window) gate says about a host's due work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Open,
    Wait {
        reason: String,
        message: String,
        until: Option<u64>,
    },
}

/// What the plan says is due for the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Nothing: the host converged.
    Nothing,
    Task(Task),
    /// Work is due but cannot start until something else happens (a capture).
    Blocked {
        reason: String,
        message: String,
    },
    /// Work is due and cannot run until the fleet changes.
    Stalled {
        reason: String,
        message: String,
    },
}

pub struct Input<'a> {
    pub due: &'a Due,
    pub gate: &'a Gate,
    pub suspended: bool,
    pub commit: Option<&'a str>,
    pub policy: &'a RetryPolicy,
}

/// The decision, and when to look again (Unix seconds; `None`: on the next event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub requeue_at: Option<u64>,
}

fn decide(action: Action, requeue_at: Option<u64>) -> Decision {
    Decision { action, requeue_at }
}

/// Reconcile one host: level-triggered, it reads only what is due and what is known.
/// `jitter` in [0, 1) spreads backoffs.
pub fn reconcile(input: &Input, s: &mut HostStatus, now: u64, jitter: f64) -> Decision {
    let commit = input.commit;
    if let Some(armed) = &s.task {
        let started = armed.booted_at.is_some() || armed.heard_at.is_some();
        if input.suspended && !started {
            s.phase = Phase::Suspended;
            return decide(
                Action::Disarm {
                    why: "the host was suspended".into(),
                },
                None,
            );
        }
        let wanted = matches!(input.due, Due::Task(t) if *t == armed.task);
        if !wanted && !started {
            return decide(
                Action::Disarm {
                    why: format!("the fleet no longer asks for {}", armed.task.summary()),
                },
                Some(now),
            );
        }
        if started {
            let last = armed.heard_at.or(armed.booted_at).unwrap_or(armed.armed_at);
            let silent_until = last + input.policy.silence_secs;
            if now >= silent_until {
                let why = format!(
                    "the agent has been silent for {} s (powered off or crashed?)",
                    now - last
                );
                fail(s, &why, input.policy, now, jitter);
                return decide(Action::Disarm { why }, s.retry_at());
            }
            return decide(Action::Nothing, Some(silent_until));
        }
        // Armed, waiting for the machine to boot: nothing to do but wait.
        return decide(Action::Nothing, None);
    }

    if input.suspended {
        s.phase = Phase::Suspended;
        s.hold = None;
        return decide(Action::Nothing, None);
    }
    match input.due {
        Due::Nothing => {
            s.phase = Phase::Ready;
            s.hold = None;
            s.failures = 0;
            s.stalled_at_commit = None;
            s.set_condition(
                "Ready",
                true,
                "Converged",
                "the disk holds what the fleet asks for",
                commit,
                now,
            );
            decide(Action::Nothing, None)
        }
        Due::Stalled { reason, message } => {
            s.phase = Phase::Stalled;
            s.hold = Some(Hold::Stalled {
                reason: reason.clone(),
                message: message.clone(),
            });
            s.set_condition("Ready", false, reason, message, commit, now);
            decide(Action::Nothing, None)
        }
        Due::Blocked { reason, message } => {
            s.phase = Phase::Pending;
            s.hold = Some(Hold::Waiting {
                reason: reason.clone(),
                message: message.clone(),
                until: None,
            });
            s.set_condition("Ready", false, reason, message, commit, now);
            decide(Action::Nothing, None)
        }
        Due::Task(task) => {
            if s.failures >= input.policy.attempts {
                // Out of retries: only a new commit (or a person) tries again.
                if s.stalled_at_commit.is_none() {
                    s.stalled_at_commit = commit.map(str::to_string);
                }
                if s.stalled_at_commit.as_deref() == commit {
                    let message = format!(
                        "{} failed {} times; fix the cause, then `fleetwave retry` or commit",
                        task.summary(),
                        s.failures
                    );
                    s.phase = Phase::Stalled;
                    s.hold = Some(Hold::Stalled {
                        reason: "RetriesExhausted".into(),
                        message: message.clone(),
                    });
                    s.set_condition("Ready", false, "RetriesExhausted", &message, commit, now);
                    return decide(Action::Nothing, None);
                }
                s.failures = 0;
                s.stalled_at_commit = None;
            }
            if let Some(Hold::Transient { retry_at, .. }) = &s.hold
                && *retry_at > now
            {
                s.phase = Phase::Failed;
                return decide(Action::Nothing, Some(*retry_at));
            }
            match input.gate {
                Gate::Wait {
                    reason,
                    message,
                    until,
                } => {
                    s.phase = Phase::Pending;
                    s.hold = Some(Hold::Waiting {
                        reason: reason.clone(),
                        message: message.clone(),
                        until: *until,
                    });
                    s.set_condition("Ready", false, reason, message, commit, now);
                    decide(Action::Nothing, *until)
                }
                Gate::Open => {
                    s.phase = Phase::Armed;
                    s.hold = None;
                    let message = format!("armed: {}", task.summary());
                    s.set_condition("Ready", false, "Armed", &message, commit, now);
                    decide(Action::Arm(task.clone()), None)
                }
            }
        }
    }
}

/// Record a failed attempt: backoff, and the task is gone.
fn fail(s: &mut HostStatus, why: &str, policy: &RetryPolicy, now: u64, jitter: f64) {
    s.failures += 1;
    s.task = None;
    s.phase = Phase::Failed;
    let retry_at = now + policy.backoff(s.failures, jitter);
    s.hold = Some(Hold::Transient {
        reason: "TaskFailed".into(),
        message: why.to_string(),
        retry_at,
    });
}

impl HostStatus {
    fn retry_at(&self) -> Option<u64> {
        match &self.hold {
            Some(Hold::Transient { retry_at, .. }) => Some(*retry_at),
            _ => None,
        }
    }
}

/// What the network or the agent said about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A DHCP request from its MAC.
    Dhcp,
    Progress {
        task: u64,
        progress: Progress,
    },
    Result {
        task: u64,
        result: TaskResult,
    },
    /// Its inventory: the size of its largest disk.
    Inventory {
        disk_bytes: Option<u64>,
    },
}

/// What an observation meant, for the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Noted {
    Nothing,
    Booting,
    Imaging,
    Succeeded(String),
    Failed(String),
    /// A verify found the disk no longer holds its version.
    Drifted(String),
    /// A result for a task that is not the armed one (an old agent): ignored.
    Stale,
}

/// Fold an observation into the status. Pure.
pub fn observe(
    s: &mut HostStatus,
    seen: &Seen,
    policy: &RetryPolicy,
    commit: Option<&str>,
    now: u64,
    jitter: f64,
) -> Noted {
    s.last_seen = Some(now);
    match seen {
        Seen::Dhcp => {
            if let Some(a) = &mut s.task
                && a.booted_at.is_none()
            {
                a.booted_at = Some(now);
                s.phase = Phase::Booting;
                return Noted::Booting;
            }
            Noted::Nothing
        }
        Seen::Inventory { disk_bytes } => {
            if disk_bytes.is_some() {
                s.disk_bytes = *disk_bytes;
            }
            if let Some(a) = &mut s.task {
                a.heard_at = Some(now);
                a.booted_at.get_or_insert(now);
                if s.phase == Phase::Armed {
                    s.phase = Phase::Booting;
                }
            }
            Noted::Nothing
        }
        Seen::Progress { task, progress } => {
            let Some(a) = s.task.as_mut().filter(|a| a.id == *task) else {
                return Noted::Stale;
            };
            a.heard_at = Some(now);
            a.booted_at.get_or_insert(now);
            a.progress = Some(progress.clone());
            let was = s.phase;
            s.phase = if progress.total_bytes > 0 && progress.done_bytes >= progress.total_bytes {
                Phase::Verifying
            } else {
                Phase::Imaging
            };
            if was != Phase::Imaging && s.phase == Phase::Imaging {
                Noted::Imaging
            } else {
                Noted::Nothing
            }
        }
        Seen::Result { task, result } => {
            let Some(a) = s.task.clone().filter(|a| a.id == *task) else {
                return Noted::Stale;
            };
            s.task = None;
            let summary = a.task.summary();
            if !result.ok {
                if let Task::Verify {
                    version,
                    generation,
                } = &a.task
                {
                    // The check ran and found a difference: drift, not a failed attempt.
                    s.done.verify = *generation;
                    let message = format!("the disk no longer holds {version}: {}", result.message);
                    s.set_condition("Drifted", true, "VerifyFailed", &message, commit, now);
                    s.failures = 0;
                    s.hold = None;
                    s.phase = Phase::Pending;
                    return Noted::Drifted(message);
                }
                let why = format!("{summary} failed: {}", result.message);
                fail(s, &why, policy, now, jitter);
                return Noted::Failed(why);
            }
            match &a.task {
                Task::Deploy { version, .. } => {
                    if result.digest != Some(*version) {
                        let why = format!(
                            "{summary}: the agent verified {}, not the version asked for",
                            result
                                .digest
                                .map_or_else(|| "nothing".to_string(), |d| d.to_string())
                        );
                        fail(s, &why, policy, now, jitter);
                        return Noted::Failed(why);
                    }
                    s.deployed = Some(*version);
                    s.set_condition(
                        "Drifted",
                        false,
                        "Deployed",
                        "freshly deployed and verified",
                        commit,
                        now,
                    );
                }
                Task::Capture { generation, .. } => s.done.capture = *generation,
                Task::Wipe { generation, .. } => {
                    s.done.wipe = *generation;
                    s.deployed = None;
                }
                Task::Inventory { generation } => s.done.inventory = *generation,
                Task::Register => {}
                Task::Verify {
                    version,
                    generation,
                } => {
                    s.done.verify = *generation;
                    s.deployed = Some(*version);
                    s.set_condition(
                        "Drifted",
                        false,
                        "Verified",
                        "the disk holds its version",
                        commit,
                        now,
                    );
                }
            }
            s.failures = 0;
            s.hold = None;
            s.phase = Phase::Pending;
            Noted::Succeeded(format!("{summary}: {}", result.message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: u8) -> Digest {
        Digest([b; 32])
    }

    fn deploy() -> Task {
        Task::Deploy {
            image: "win10".into(),
            version: digest(1),
            multicast: None,
        }
    }

    fn input<'a>(due: &'a Due, gate: &'a Gate, policy: &'a RetryPolicy) -> Input<'a> {
        Input {
            due,
            gate,
            suspended: false,
            commit: Some("c1"),
            policy,
        }
    }

    fn armed(s: &mut HostStatus, task: Task, id: u64, now: u64) {
        s.task = Some(Armed {
            id,
            task,
            token: "t".into(),
            armed_at: now,
            commit: Some("c1".into()),
            booted_at: None,
            progress: None,
            heard_at: None,
            wakes: 0,
            woken_at: None,
        });
    }

    #[test]
    fn wake_on_lan_goes_out_when_armed_then_backs_off_and_stops_once_the_machine_boots() {
        let mut s = HostStatus::default();
        armed(&mut s, deploy(), 1, 0);
        let a = s.task.as_mut().expect("armed");
        let mut sent = Vec::new();
        let mut now = 0;
        loop {
            let (send, next) = wake_due(a, now);
            if send {
                sent.push(now);
                a.wakes += 1;
                a.woken_at = Some(now);
            }
            match next {
                Some(n) => now = n,
                None => break,
            }
        }
        assert_eq!(sent, vec![0, 60, 180, 420, 900]);
        let mut b = s.task.clone().expect("armed");
        b.wakes = 1;
        b.woken_at = Some(0);
        b.booted_at = Some(10);
        assert_eq!(wake_due(&b, 60), (false, None));
    }

    fn result(ok: bool, d: Option<Digest>) -> TaskResult {
        TaskResult {
            ok,
            digest: d,
            message: "m".into(),
            log_tail: None,
        }
    }

    #[test]
    fn a_due_deploy_behind_an_open_gate_is_armed_and_a_closed_one_waits_until_it_opens() {
        let p = RetryPolicy::default();
        let due = Due::Task(deploy());
        let mut s = HostStatus::default();
        let wait = Gate::Wait {
            reason: "OutsideWindow".into(),
            message: "Sat 22:00".into(),
            until: Some(5000),
        };
        let d = reconcile(&input(&due, &wait, &p), &mut s, 1000, 0.5);
        assert_eq!(d, decide(Action::Nothing, Some(5000)));
        assert_eq!(s.phase, Phase::Pending);
        let d = reconcile(&input(&due, &Gate::Open, &p), &mut s, 5000, 0.5);
        assert_eq!(d.action, Action::Arm(deploy()));
        assert_eq!(s.phase, Phase::Armed);
    }

    #[test]
    fn a_host_follows_dhcp_progress_and_a_verified_result_to_ready() {
        let p = RetryPolicy::default();
        let mut s = HostStatus::default();
        armed(&mut s, deploy(), 7, 100);
        s.phase = Phase::Armed;
        assert_eq!(
            observe(&mut s, &Seen::Dhcp, &p, None, 110, 0.5),
            Noted::Booting
        );
        let progress = |done| Seen::Progress {
            task: 7,
            progress: Progress {
                done_bytes: done,
                total_bytes: 100,
                bytes_per_sec: 1,
            },
        };
        assert_eq!(
            observe(&mut s, &progress(10), &p, None, 120, 0.5),
            Noted::Imaging
        );
        observe(&mut s, &progress(100), &p, None, 130, 0.5);
        assert_eq!(s.phase, Phase::Verifying);
        let r = Seen::Result {
            task: 7,
            result: result(true, Some(digest(1))),
        };
        assert!(matches!(
            observe(&mut s, &r, &p, None, 140, 0.5),
            Noted::Succeeded(_)
        ));
        assert_eq!(s.deployed, Some(digest(1)));
        let d = reconcile(&input(&Due::Nothing, &Gate::Open, &p), &mut s, 140, 0.5);
        assert_eq!(d.action, Action::Nothing);
        assert_eq!(s.phase, Phase::Ready);
    }

    #[test]
    fn a_result_that_verified_another_version_is_a_failure_not_ready() {
        let p = RetryPolicy::default();
        let mut s = HostStatus::default();
        armed(&mut s, deploy(), 7, 100);
        let r = Seen::Result {
            task: 7,
            result: result(true, Some(digest(9))),
        };
        assert!(matches!(
            observe(&mut s, &r, &p, None, 140, 0.5),
            Noted::Failed(_)
        ));
        assert_eq!(s.deployed, None);
        assert_eq!(s.phase, Phase::Failed);
    }

    #[test]
    fn failures_back_off_then_stall_until_a_new_commit() {
        let p = RetryPolicy::default();
        let due = Due::Task(deploy());
        let mut s = HostStatus::default();
        let mut now = 1000;
        for attempt in 1..=3u64 {
            let d = reconcile(&input(&due, &Gate::Open, &p), &mut s, now, 0.5);
            assert_eq!(d.action, Action::Arm(deploy()), "attempt {attempt}");
            armed(&mut s, deploy(), attempt, now);
            let r = Seen::Result {
                task: attempt,
                result: result(false, None),
            };
            observe(&mut s, &r, &p, None, now, 0.5);
            // Backing off: not armed again before its time.
            let d = reconcile(&input(&due, &Gate::Open, &p), &mut s, now + 1, 0.5);
            if attempt < 3 {
                let at = d.requeue_at.expect("requeued");
                assert_eq!(at, now + p.backoff(attempt as u32, 0.5));
                assert_eq!(d.action, Action::Nothing);
                now = at;
            }
        }
        assert_eq!(s.phase, Phase::Stalled);
        assert_eq!(s.hold.as_ref().map(Hold::reason), Some("RetriesExhausted"));
        // Same commit, much later: still stalled.
        let d = reconcile(&input(&due, &Gate::Open, &p), &mut s, now + 100_000, 0.5);
        assert_eq!(d.action, Action::Nothing);
        // A new commit tries again.
        let mut i = input(&due, &Gate::Open, &p);
        i.commit = Some("c2");
        let d = reconcile(&i, &mut s, now + 100_001, 0.5);
        assert_eq!(d.action, Action::Arm(deploy()));
    }

    #[test]
    fn a_booted_agent_that_falls_silent_fails_its_attempt_and_is_disarmed() {
        let p = RetryPolicy::default();
        let due = Due::Task(deploy());
        let mut s = HostStatus::default();
        armed(&mut s, deploy(), 1, 0);
        observe(&mut s, &Seen::Dhcp, &p, None, 10, 0.5);
        let d = reconcile(&input(&due, &Gate::Open, &p), &mut s, 20, 0.5);
        assert_eq!(d, decide(Action::Nothing, Some(10 + p.silence_secs)));
        let d = reconcile(
            &input(&due, &Gate::Open, &p),
            &mut s,
            10 + p.silence_secs,
            0.5,
        );
        assert!(matches!(d.action, Action::Disarm { .. }));
        assert_eq!(s.phase, Phase::Failed);
        assert!(s.task.is_none());
    }

    #[test]
    fn an_armed_task_the_fleet_no_longer_asks_for_is_withdrawn_before_it_starts() {
        let p = RetryPolicy::default();
        let mut s = HostStatus::default();
        armed(&mut s, deploy(), 1, 0);
        let d = reconcile(&input(&Due::Nothing, &Gate::Open, &p), &mut s, 5, 0.5);
        assert!(matches!(d.action, Action::Disarm { .. }));
        // Once started, it is left to finish.
        armed(&mut s, deploy(), 2, 0);
        observe(&mut s, &Seen::Dhcp, &p, None, 1, 0.5);
        let d = reconcile(&input(&Due::Nothing, &Gate::Open, &p), &mut s, 5, 0.5);
        assert_eq!(d.action, Action::Nothing);
    }

    #[test]
    fn a_result_for_an_older_task_changes_nothing() {
        let p = RetryPolicy::default();
        let mut s = HostStatus::default();
        armed(&mut s, deploy(), 5, 0);
        let r = Seen::Result {
            task: 4,
            result: result(true, Some(digest(1))),
        };
        assert_eq!(observe(&mut s, &r, &p, None, 1, 0.5), Noted::Stale);
        assert!(s.task.is_some());
        assert_eq!(s.deployed, None);
    }

    #[test]
    fn a_verify_that_finds_drift_records_it_and_runs_once_per_generation() {
        let p = RetryPolicy::default();
        let mut s = HostStatus::default();
        let verify = Task::Verify {
            version: digest(1),
            generation: 2,
        };
        armed(&mut s, verify, 3, 0);
        let r = Seen::Result {
            task: 3,
            result: result(false, None),
        };
        assert!(matches!(
            observe(&mut s, &r, &p, None, 1, 0.5),
            Noted::Drifted(_)
        ));
        assert_eq!(s.done.verify, 2);
        assert_eq!(s.failures, 0);
        assert!(s.condition("Drifted").is_some_and(|c| c.status));
    }
}
