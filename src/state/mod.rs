//! The server's own durable state in SQLite: DHCP leases, DHCP observations, the
//! agents' task tokens, and the controller's records: each host's status, the tasks it
//! armed and their results, inventory, and an append-only event log.
//!
//! SQLite in WAL mode with `synchronous=FULL`: a committed write survives a crash of
//! the process or the machine. One writer thread owns the connection and commits
//! writes in batches (group commit), so thousands of leases a second cost a handful of
//! fsyncs; whatever must wait for durability (a DHCPACK) runs after its batch commits.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::protocol::{Assignment, Inventory, Progress, Task, TaskResult};
use crate::spec::Mac;

pub mod audit;
pub mod read;
pub use read::Reader;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}; check that the directory exists and is writable")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state database {path}: {source}")]
    Query {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state database {path}: the lease of {ip} names a MAC of {len} bytes; the file is damaged"
    )]
    Damaged {
        path: PathBuf,
        ip: Ipv4Addr,
        len: usize,
    },
}

/// What a lease row says about its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Handed to `mac` until `expires`.
    Bound,
    /// A client reported the address in use by someone else (DHCPDECLINE): not handed
    /// out until `expires`.
    Declined,
}

impl LeaseState {
    fn as_str(self) -> &'static str {
        match self {
            LeaseState::Bound => "bound",
            LeaseState::Declined => "declined",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    /// The site whose subnet the address belongs to.
    pub site: String,
    /// Unix seconds.
    pub expires: u64,
    pub state: LeaseState,
}

/// One DHCP exchange as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Unix seconds.
    pub at: u64,
    pub mac: Mac,
    /// The address handed out or in use, if any.
    pub ip: Option<Ipv4Addr>,
    /// Boot architecture, as `pxe::Arch` names it (`bios`, `efi-x64`, ...).
    pub arch: String,
    /// The DHCP message type received.
    pub message: String,
    /// Whether the fleet knows the MAC.
    pub known: bool,
}

/// A task token as stored: a restarted server still honours the tokens of agents
/// that booted before it went down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub token: String,
    pub assignment: Assignment,
    /// Unix seconds.
    pub expires: u64,
}

/// A task's result as the agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRow {
    /// The task's id (0 for a registration).
    pub task: u64,
    pub mac: Mac,
    pub host: Option<String>,
    /// Unix seconds.
    pub at: u64,
    pub result: TaskResult,
}

/// A machine's inventory as its agent reported it.
#[derive(Debug, Clone)]
pub struct InventoryRow {
    pub mac: Mac,
    /// `None` for a machine the fleet does not know.
    pub host: Option<String>,
    pub at: u64,
    pub inventory: Inventory,
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    /// Its place in the log (0 until written).
    #[serde(default)]
    pub id: u64,
    pub at: u64,
    pub host: Option<String>,
    /// A reason in the Flux style: `Armed`, `TaskSucceeded`, `CommitStalled`, ...
    pub kind: String,
    pub message: String,
    pub commit: Option<String>,
    /// The task it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u64>,
    /// Who signed the commit it acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The id of the token minted or used ([`token_id`]), never the token itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// How it ended: `applied`, `refused`, `armed`, `ok`, `failed`, `denied`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The hash of the event before it (empty for the first): the audit chain.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prev: String,
    /// This event's hash ([`audit::event_hash`]), set when it is written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl EventRow {
    pub fn new(host: Option<&str>, kind: &str, message: String) -> EventRow {
        EventRow {
            id: 0,
            at: now(),
            host: host.map(str::to_string),
            kind: kind.to_string(),
            message,
            commit: None,
            task: None,
            signer: None,
            token: None,
            outcome: None,
            prev: String::new(),
            hash: String::new(),
        }
    }

    pub fn task(mut self, id: u64) -> Self {
        self.task = Some(id);
        self
    }

    /// The token's id, from the token.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token_id(token));
        self
    }

    pub fn outcome(mut self, outcome: &str) -> Self {
        self.outcome = Some(outcome.to_string());
        self
    }
}

/// What names a token in records: the first 16 hex digits of its BLAKE3 hash. It
/// identifies the token without being able to stand in for it.
pub fn token_id(token: &str) -> String {
    let h = blake3::hash(token.as_bytes()).to_hex();
    h[..16].to_string()
}

/// A task the controller armed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRow {
    pub id: u64,
    pub host: String,
    pub mac: Mac,
    pub task: Task,
    /// The commit that asked for it.
    pub commit: Option<String>,
    pub armed_at: u64,
    pub ended_at: Option<u64>,
    pub result: Option<TaskResult>,
}

/// A host's status as the controller keeps it: its phase for queries, the rest as
/// the controller's own JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub name: String,
    pub mac: Mac,
    pub phase: String,
    pub status: String,
    pub updated: u64,
}

/// A write for the writer thread.
#[derive(Debug, Clone)]
pub enum Op {
    PutLease(Lease),
    DeleteLease(Ipv4Addr),
    Observe(Observation),
    PutToken(TokenRow),
    /// A token whose result came back, or whose task was disarmed: never honoured again.
    SpendToken(String),
    /// An agent's progress: handed to the controller, not written.
    Progress {
        task: u64,
        mac: Mac,
        progress: Progress,
    },
    Result(ResultRow),
    Inventory(InventoryRow),
    Event(EventRow),
    PutHost(HostRow),
    PutTask(TaskRow),
    /// A key of the controller's bookkeeping (`applied_commit`, `next_task`, ...).
    PutMeta(String, String),
    /// An admin token minted (stored by its hash).
    PutAdminToken(AdminTokenRow),
    /// An admin token revoked at this time (Unix seconds): never honoured again.
    RevokeAdminToken {
        id: String,
        at: u64,
    },
}

/// An admin token as stored: its hash, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenRow {
    /// [`token_id`] of the token: how records and `fleetwave token` name it.
    pub id: String,
    /// Who or what it is for (`ci`, `alice`), given when it was created.
    pub name: String,
    /// `read` or `operate`.
    pub scope: String,
    /// BLAKE3 of the token, hex.
    #[serde(skip_serializing, default)]
    pub hash: String,
    pub created: u64,
    pub revoked: Option<u64>,
}

/// Runs after the batch holding a write has committed.
pub type AfterCommit = Box<dyn FnOnce() + Send>;

struct Batch {
    ops: Vec<Op>,
    after: Option<AfterCommit>,
}

/// The database, opened and migrated, before the writer thread takes it.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The JSON-lines copy of the event chain (`audit.jsonl` beside the database).
    audit: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS leases (
    ip      INTEGER PRIMARY KEY,
    mac     BLOB    NOT NULL,
    site    TEXT    NOT NULL,
    expires INTEGER NOT NULL,
    state   TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS observations (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,
    mac     TEXT    NOT NULL,
    ip      TEXT,
    arch    TEXT    NOT NULL,
    message TEXT    NOT NULL,
    known   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS observations_mac ON observations (mac, at);
CREATE TABLE IF NOT EXISTS tokens (
    token   TEXT    PRIMARY KEY,
    mac     BLOB    NOT NULL,
    host    TEXT,
    task    TEXT    NOT NULL,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS hosts (
    name    TEXT    PRIMARY KEY,
    mac     TEXT    NOT NULL,
    phase   TEXT    NOT NULL,
    status  TEXT    NOT NULL,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id       INTEGER PRIMARY KEY,
    host     TEXT    NOT NULL,
    mac      TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    task     TEXT    NOT NULL,
    commit_id TEXT,
    armed_at INTEGER NOT NULL,
    ended_at INTEGER,
    result   TEXT
);
CREATE INDEX IF NOT EXISTS tasks_host ON tasks (host, id);
CREATE TABLE IF NOT EXISTS inventory (
    mac       TEXT    PRIMARY KEY,
    host      TEXT,
    at        INTEGER NOT NULL,
    inventory TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    host      TEXT,
    kind      TEXT    NOT NULL,
    message   TEXT    NOT NULL,
    commit_id TEXT
);
CREATE INDEX IF NOT EXISTS events_host ON events (host, id);
CREATE TABLE IF NOT EXISTS admin_tokens (
    id      TEXT    PRIMARY KEY,
    name    TEXT    NOT NULL,
    scope   TEXT    NOT NULL,
    hash    TEXT    NOT NULL,
    created INTEGER NOT NULL,
    revoked INTEGER
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// Drops the tokens that have expired (`?1`: now, Unix seconds).
const PRUNE_TOKENS: &str = "DELETE FROM tokens WHERE expires <= ?1";

impl Store {
    /// Open (or create) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StateError> {
        let open = |source| StateError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open)?;
        conn.execute_batch(SCHEMA).map_err(open)?;
        audit::migrate(&conn).map_err(open)?;
        Ok(Store {
            conn,
            path: path.to_owned(),
            audit: audit::file_beside(path),
        })
    }

    fn query_err(&self) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        |source| StateError::Query {
            path: self.path.clone(),
            source,
        }
    }

    /// Every lease row, bound or declined, expired or not.
    pub fn leases(&self) -> Result<Vec<Lease>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT ip, mac, site, expires, state FROM leases ORDER BY ip")
            .map_err(self.query_err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(self.query_err())?;
        let mut out = Vec::new();
        for row in rows {
            let (ip, mac, site, expires, state) = row.map_err(self.query_err())?;
            let ip = Ipv4Addr::from(ip);
            let mac: [u8; 6] = mac.as_slice().try_into().map_err(|_| StateError::Damaged {
                path: self.path.clone(),
                ip,
                len: mac.len(),
            })?;
            let state = if state == "declined" {
                LeaseState::Declined
            } else {
                LeaseState::Bound
            };
            out.push(Lease {
                ip,
                mac: Mac(mac),
                site,
                expires: expires.max(0) as u64,
                state,
            });
        }
        Ok(out)
    }

    /// The most recent observations, newest first.
    pub fn observations(&self, limit: usize) -> Result<Vec<Observation>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT at, mac, ip, arch, message, known FROM observations \
                 ORDER BY id DESC LIMIT ?1",
            )
            .map_err(self.query_err())?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, bool>(5)?,
                ))
            })
            .map_err(self.query_err())?;
        let mut out = Vec::new();
        for row in rows {
            let (at, mac, ip, arch, message, known) = row.map_err(self.query_err())?;
            // Rows this code wrote always parse; skip anything else rather than fail a listing.
            let (Ok(mac), ip) = (mac.parse(), ip.and_then(|ip| ip.parse().ok())) else {
                continue;
            };
            out.push(Observation {
                at: at.max(0) as u64,
                mac,
                ip,
                arch,
                message,
                known,
            });
        }
        Ok(out)
    }

    /// Task tokens neither spent nor expired; expired rows are dropped on the way.
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StateError> {
        let now = now() as i64;
        self.conn
            .execute(PRUNE_TOKENS, [now])
            .map_err(self.query_err())?;
        let mut stmt = self
            .conn
            .prepare("SELECT token, mac, host, task, expires FROM tokens")
            .map_err(self.query_err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(self.query_err())?;
        let mut out = Vec::new();
        for row in rows {
            let (token, mac, host, task, expires) = row.map_err(self.query_err())?;
            // A damaged row (or one from before typed tasks) costs one agent a
            // reboot, not the server its start.
            let (Ok(mac), Ok(assignment)) = (
                <[u8; 6]>::try_from(mac.as_slice()),
                serde_json::from_str::<Assignment>(&task),
            ) else {
                warn!(
                    "state database {}: a task token row is damaged; skipped",
                    self.path.display()
                );
                continue;
            };
            if assignment.mac != Mac(mac) {
                continue;
            }
            let _ = host;
            out.push(TokenRow {
                token,
                assignment,
                expires: expires.max(0) as u64,
            });
        }
        Ok(out)
    }

    /// Hand the connection to a writer thread.
    pub fn into_writer(self) -> Writer {
        self.into_writer_with_tap(None)
    }

    /// [`Store::into_writer`], and every observation (DHCP seen, inventory, progress,
    /// result) is handed to `tap` once it is durable: the controller reacts only to
    /// what a restart would also find.
    pub fn into_writer_with_tap(self, tap: Option<Tap>) -> Writer {
        let (tx, rx) = mpsc::channel::<Batch>();
        let stats = Arc::new(WriterStats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || write_loop(self, rx, tap, &st));
        match thread {
            Ok(thread) => Writer {
                tx: Some(tx),
                thread: Some(thread),
                stats,
            },
            Err(e) => {
                error!("cannot start the state writer thread: {e}");
                Writer {
                    tx: None,
                    thread: None,
                    stats,
                }
            }
        }
    }
}

/// Queues writes for the writer thread. Dropping it (or [`Writer::close`]) lets the
/// thread commit what is queued and stop.
pub struct Writer {
    tx: Option<mpsc::Sender<Batch>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<WriterStats>,
}

/// What the writer thread has done, for `/health` and the benchmark.
#[derive(Debug, Default, Serialize)]
pub struct WriterStats {
    /// Rows written (inserts, updates, deletes).
    pub writes: AtomicU64,
    /// Transactions committed (each one fsync in WAL mode).
    pub commits: AtomicU64,
}

/// A cheap handle to queue writes from many tasks.
#[derive(Clone)]
pub struct WriteHandle {
    tx: Option<mpsc::Sender<Batch>>,
}

impl WriteHandle {
    /// Queue `ops`; `after` runs once they are durable (and never if the commit fails).
    pub fn write(&self, ops: Vec<Op>, after: Option<AfterCommit>) {
        let sent = match &self.tx {
            Some(tx) => tx.send(Batch { ops, after }).is_ok(),
            None => false,
        };
        if !sent {
            warn!("state writer stopped: a write was not recorded");
        }
    }
}

impl Writer {
    pub fn stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    pub fn handle(&self) -> WriteHandle {
        WriteHandle {
            tx: self.tx.clone(),
        }
    }

    /// Commit what is queued and stop the thread. Handles still held keep working
    /// until they are dropped; the thread stops after the last one.
    pub fn close(mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("state writer thread panicked");
        }
    }
}

/// The most writes committed in one transaction.
const MAX_BATCH: usize = 4096;

/// Where committed observations go.
pub type Tap = tokio::sync::mpsc::UnboundedSender<Op>;

fn write_loop(store: Store, rx: mpsc::Receiver<Batch>, tap: Option<Tap>, stats: &WriterStats) {
    let mut conn = store.conn;
    let mut chain = match audit::Chain::start(&conn, &store.audit) {
        Ok(c) => c,
        Err(e) => {
            error!(
                "state database {}: cannot read the end of the audit chain: {e}; events are \
                 chained from a fresh start",
                store.path.display()
            );
            audit::Chain::default()
        }
    };
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        let mut ops = batches[0].ops.len();
        while ops < MAX_BATCH {
            match rx.try_recv() {
                Ok(b) => {
                    ops += b.ops.len();
                    batches.push(b);
                }
                Err(_) => break,
            }
        }
        let before = chain.clone();
        match commit(&mut conn, &batches, &mut chain) {
            Ok(written) => {
                chain.append(&store.audit, &written);
                let written = batches
                    .iter()
                    .flat_map(|b| &b.ops)
                    .filter(|o| !matches!(o, Op::Progress { .. }))
                    .count();
                stats.writes.fetch_add(written as u64, Ordering::Relaxed);
                stats.commits.fetch_add(1, Ordering::Relaxed);
                if let Some(tap) = &tap {
                    for op in batches.iter().flat_map(|b| &b.ops) {
                        if matches!(
                            op,
                            Op::Observe(_) | Op::Progress { .. } | Op::Result(_) | Op::Inventory(_)
                        ) {
                            let _ = tap.send(op.clone());
                        }
                    }
                }
                for b in batches {
                    if let Some(after) = b.after {
                        after();
                    }
                }
            }
            Err(e) => {
                chain = before;
                error!(
                    "state database {}: commit of {ops} writes failed: {e}; their replies are not sent",
                    store.path.display()
                )
            }
        }
    }
}

/// Commit `batches` in one transaction; the events written, chained.
fn commit(
    conn: &mut Connection,
    batches: &[Batch],
    chain: &mut audit::Chain,
) -> rusqlite::Result<Vec<EventRow>> {
    let mut written = Vec::new();
    let tx = conn.transaction()?;
    {
        let mut put = tx.prepare_cached(
            "INSERT OR REPLACE INTO leases (ip, mac, site, expires, state) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut del = tx.prepare_cached("DELETE FROM leases WHERE ip = ?1")?;
        let mut obs = tx.prepare_cached(
            "INSERT INTO observations (at, mac, ip, arch, message, known) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut put_token = tx.prepare_cached(
            "INSERT OR REPLACE INTO tokens (token, mac, host, task, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut spend = tx.prepare_cached("DELETE FROM tokens WHERE token = ?1")?;

        for op in batches.iter().flat_map(|b| &b.ops) {
            match op {
                Op::PutLease(l) => {
                    put.execute(params![
                        u32::from(l.ip),
                        &l.mac.0[..],
                        l.site,
                        l.expires as i64,
                        l.state.as_str()
                    ])?;
                }
                Op::DeleteLease(ip) => {
                    del.execute([u32::from(*ip)])?;
                }
                Op::Observe(o) => {
                    obs.execute(params![
                        o.at as i64,
                        o.mac.to_string(),
                        o.ip.map(|ip| ip.to_string()),
                        o.arch,
                        o.message,
                        o.known
                    ])?;
                }
                Op::PutToken(t) => {
                    put_token.execute(params![
                        t.token,
                        &t.assignment.mac.0[..],
                        t.assignment.host,
                        json(&t.assignment)?,
                        t.expires as i64
                    ])?;
                }
                Op::SpendToken(token) => {
                    spend.execute([token])?;
                }
                Op::Progress { .. } => {}
                Op::Result(r) => {
                    tx.prepare_cached("UPDATE tasks SET ended_at = ?2, result = ?3 WHERE id = ?1")?
                        .execute(params![r.task as i64, r.at as i64, json(&r.result)?])?;
                }
                Op::Inventory(i) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO inventory (mac, host, at, inventory) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![
                        i.mac.to_string(),
                        i.host,
                        i.at as i64,
                        json(&i.inventory)?
                    ])?;
                }
                Op::Event(e) => {
                    let e = chain.link(e.clone());
                    tx.prepare_cached(
                        "INSERT INTO events (id, at, host, kind, message, commit_id, task_id, \
                         signer, token_id, outcome, prev, hash) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    )?
                    .execute(params![
                        e.id as i64,
                        e.at as i64,
                        e.host,
                        e.kind,
                        e.message,
                        e.commit,
                        e.task.map(|t| t as i64),
                        e.signer,
                        e.token,
                        e.outcome,
                        e.prev,
                        e.hash
                    ])?;
                    written.push(e);
                }
                Op::PutHost(h) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO hosts (name, mac, phase, status, updated) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![
                        h.name,
                        h.mac.to_string(),
                        h.phase,
                        h.status,
                        h.updated as i64
                    ])?;
                }
                Op::PutTask(t) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO tasks (id, host, mac, kind, task, commit_id, armed_at, ended_at, result) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )?
                    .execute(params![
                        t.id as i64,
                        t.host,
                        t.mac.to_string(),
                        t.task.kind(),
                        json(&t.task)?,
                        t.commit,
                        t.armed_at as i64,
                        t.ended_at.map(|x| x as i64),
                        t.result.as_ref().map(json).transpose()?
                    ])?;
                }
                Op::PutAdminToken(t) => {
                    tx.prepare_cached(
                        "INSERT INTO admin_tokens (id, name, scope, hash, created, revoked) \
                         VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                    )?
                    .execute(params![
                        t.id,
                        t.name,
                        t.scope,
                        t.hash,
                        t.created as i64
                    ])?;
                }
                Op::RevokeAdminToken { id, at } => {
                    tx.prepare_cached(
                        "UPDATE admin_tokens SET revoked = ?2 WHERE id = ?1 AND revoked IS NULL",
                    )?
                    .execute(params![id, *at as i64])?;
                }
                Op::PutMeta(k, v) => {
                    tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                        .execute(params![k, v])?;
                }
            }
        }
        // Tokens of hosts that never reported go when they expire, not at the next
        // restart: a server up for months would otherwise keep every one.
        if batches
            .iter()
            .flat_map(|b| &b.ops)
            .any(|o| matches!(o, Op::PutToken(_)))
        {
            tx.execute(PRUNE_TOKENS, [now() as i64])?;
        }
    }
    tx.commit()?;
    Ok(written)
}

fn json(v: &impl Serialize) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(ip: [u8; 4], mac: u8) -> Lease {
        Lease {
            ip: ip.into(),
            mac: Mac([0x52, 0x54, 0, 0, 0, mac]),
            site: "lab".into(),
            expires: 100,
            state: LeaseState::Bound,
        }
    }

    #[test]
    fn tokens_are_kept_until_spent_and_expired_ones_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let token = |name: &str, expires: u64| TokenRow {
            token: name.into(),
            assignment: Assignment {
                mac: Mac([0x52, 0x54, 0, 0, 0, 1]),
                host: Some("pc01".into()),
                id: 7,
                task: Task::Inventory { generation: 1 },
                disk: Default::default(),
                after: Default::default(),
                commit: None,
                signer: None,
            },
            expires,
        };
        let later = now() + 3600;
        let writer = Store::open(&path).expect("open").into_writer();
        writer.handle().write(
            vec![
                Op::PutToken(token("old", 1)),
                Op::PutToken(token("spent", later)),
            ],
            None,
        );
        writer
            .handle()
            .write(vec![Op::SpendToken("spent".into())], None);
        // The next token written prunes the expired one.
        writer
            .handle()
            .write(vec![Op::PutToken(token("live", later))], None);
        writer.close();
        let count: i64 = Store::open(&path)
            .expect("open")
            .conn
            .query_row("SELECT count(*) FROM tokens", [], |r| r.get(0))
            .expect("count");
        assert_eq!(count, 1);
        let rows = Store::open(&path).expect("open").tokens().expect("tokens");
        assert_eq!(rows, vec![token("live", later)]);
    }

    #[test]
    fn leases_survive_reopening_and_callbacks_run_after_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let writer = Store::open(&path).expect("open").into_writer();
        let (tx, rx) = mpsc::channel();
        writer.handle().write(
            vec![
                Op::PutLease(lease([10, 0, 0, 5], 1)),
                Op::PutLease(lease([10, 0, 0, 6], 2)),
            ],
            None,
        );
        writer.handle().write(
            vec![Op::DeleteLease([10, 0, 0, 6].into())],
            Some(Box::new(move || tx.send(()).expect("send"))),
        );
        rx.recv().expect("callback ran");
        writer.close();
        let leases = Store::open(&path).expect("reopen").leases().expect("read");
        assert_eq!(leases, vec![lease([10, 0, 0, 5], 1)]);
    }
}
