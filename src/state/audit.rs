//! The audit trail: every event carries the hash of the one before it, in the state
//! database and in a JSON-lines copy (`audit.jsonl` beside it). An edited, removed or
//! inserted row breaks the chain at that row, and the copy disagrees with the database
//! where one of the two was changed; `fleetwave audit verify` names the first break.
//!
//! A chain in one database proves nothing against someone who rewrites all of it:
//! ship `audit.jsonl` off the machine (syslog, a log collector) to keep a copy they
//! cannot reach (docs/security.md).

use std::collections::HashMap;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use tracing::warn;

use super::read::{EVENTS, event_row};
use super::{EventRow, StateError};

/// The JSON-lines copy of the chain for the database at `db`.
pub fn file_beside(db: &Path) -> PathBuf {
    db.with_file_name("audit.jsonl")
}

/// Add the chain's columns to a database made before them. Older rows keep no hash:
/// they come before the chain and are counted apart by [`verify`].
pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_hash: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('events') WHERE name = 'hash'")?
        .exists([])?;
    if !has_hash {
        conn.execute_batch(
            "ALTER TABLE events ADD COLUMN task_id INTEGER;
             ALTER TABLE events ADD COLUMN signer TEXT;
             ALTER TABLE events ADD COLUMN token_id TEXT;
             ALTER TABLE events ADD COLUMN outcome TEXT;
             ALTER TABLE events ADD COLUMN prev TEXT;
             ALTER TABLE events ADD COLUMN hash TEXT;",
        )?;
    }
    Ok(())
}

/// What an event's hash covers, in this order: every field but the hash itself.
#[derive(Serialize)]
struct Covered<'a> {
    id: u64,
    at: u64,
    host: &'a Option<String>,
    kind: &'a str,
    message: &'a str,
    commit: &'a Option<String>,
    task: Option<u64>,
    signer: &'a Option<String>,
    token: &'a Option<String>,
    outcome: &'a Option<String>,
    prev: &'a str,
}

/// BLAKE3 (hex) of the event's fields as compact JSON, `prev` included.
pub fn event_hash(e: &EventRow) -> String {
    let covered = Covered {
        id: e.id,
        at: e.at,
        host: &e.host,
        kind: &e.kind,
        message: &e.message,
        commit: &e.commit,
        task: e.task,
        signer: &e.signer,
        token: &e.token,
        outcome: &e.outcome,
        prev: &e.prev,
    };
    // Serializing plain strings and numbers cannot fail.
    let bytes = serde_json::to_vec(&covered).unwrap_or_default();
    blake3::hash(&bytes).to_hex().to_string()
}

/// The end of the chain, as the writer extends it.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    last_id: u64,
    last_hash: String,
}

impl Chain {
    /// The chain's end in the database; the JSON-lines copy is brought up to it (a
    /// crash between a commit and its append leaves the copy behind).
    pub(super) fn start(conn: &Connection, file: &Path) -> Result<Chain, String> {
        let last = conn
            .query_row(
                "SELECT id, hash FROM events ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(|e| e.to_string())?;
        let chain = match last {
            Some((id, hash)) => Chain {
                last_id: id.max(0) as u64,
                last_hash: hash.unwrap_or_default(),
            },
            None => Chain::default(),
        };
        let in_file = last_line_id(file);
        if in_file > chain.last_id {
            warn!(
                "{} goes on to event {in_file}, past the database's last ({}): the database \
                 was restored from a backup or rows were removed; `fleetwave audit verify` \
                 tells which",
                file.display(),
                chain.last_id
            );
        } else if in_file < chain.last_id {
            let rows: Vec<EventRow> = conn
                .prepare(&format!(
                    "{EVENTS} WHERE id > ?1 AND hash IS NOT NULL ORDER BY id"
                ))
                .and_then(|mut st| {
                    st.query_map([in_file as i64], event_row)?
                        .collect::<rusqlite::Result<_>>()
                })
                .map_err(|e| e.to_string())?;
            chain.append(file, &rows);
        }
        Ok(chain)
    }

    /// `e` as the next link: its id, the previous hash, its own.
    pub(super) fn link(&mut self, mut e: EventRow) -> EventRow {
        e.id = self.last_id + 1;
        e.prev = std::mem::take(&mut self.last_hash);
        e.hash = event_hash(&e);
        self.last_id = e.id;
        self.last_hash = e.hash.clone();
        e
    }

    /// Append committed events to the JSON-lines copy. A failure is logged: the
    /// database holds them, and the next start appends what the copy lacks.
    pub(super) fn append(&self, file: &Path, events: &[EventRow]) {
        if events.is_empty() {
            return;
        }
        let mut text = String::new();
        for e in events {
            match serde_json::to_string(e) {
                Ok(line) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                Err(e) => warn!("an audit event cannot be written as JSON: {e}"),
            }
        }
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = r {
            warn!(
                "cannot append to the audit file {}: {e}; the events are in the state \
                 database and are appended at the next start",
                file.display()
            );
        }
    }
}

/// The id of the last complete line of the JSON-lines copy (0 when there is none).
fn last_line_id(file: &Path) -> u64 {
    let Ok(mut f) = std::fs::File::open(file) else {
        return 0;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    // One event is far below this; the tail holds the last whole line.
    let start = len.saturating_sub(256 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return 0;
    }
    let mut tail = Vec::new();
    if f.read_to_end(&mut tail).is_err() {
        return 0;
    }
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<EventRow>(l).ok())
        .map_or(0, |e| e.id)
}

/// The first place the trail is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// `the database` or `audit.jsonl line N`.
    pub place: String,
    /// The event where the chain breaks.
    pub id: u64,
    pub why: String,
}

/// What `fleetwave audit verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Chained events in the database.
    pub events: u64,
    /// Rows from before the chain existed (an older fleetwave), not covered.
    pub unchained: u64,
    /// Lines of the JSON-lines copy checked.
    pub lines: u64,
    /// Events the copy does not have yet (appended at the server's next start).
    pub behind: u64,
    pub broken: Option<Break>,
}

/// The state database at `db`, read only (the audit commands run beside a server).
fn open_read_only(db: &Path) -> Result<Connection, StateError> {
    Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
        StateError::Open {
            path: db.to_owned(),
            source,
        }
    })
}

/// Check the database's chain, then the JSON-lines copy's, then that the two agree.
pub fn verify(db: &Path, file: &Path) -> Result<Report, StateError> {
    let query = |source| StateError::Query {
        path: db.to_owned(),
        source,
    };
    let conn = open_read_only(db)?;
    let mut st = conn
        .prepare(&format!("{EVENTS} ORDER BY id"))
        .map_err(query)?;
    let rows = st.query_map([], event_row).map_err(query)?;
    let mut report = Report::default();
    let mut hashes: HashMap<u64, String> = HashMap::new();
    let mut prev: Option<(u64, String)> = None;
    let broken = |id: u64, why: String| Break {
        place: "the database".into(),
        id,
        why,
    };
    for row in rows {
        let e = row.map_err(query)?;
        if report.broken.is_some() {
            continue;
        }
        if e.hash.is_empty() {
            if prev.is_none() {
                report.unchained += 1;
            } else {
                report.broken = Some(broken(
                    e.id,
                    "it has no hash: it was written outside fleetwave, or its hash was erased"
                        .into(),
                ));
            }
            continue;
        }
        report.events += 1;
        let (prev_id, prev_hash) = prev.clone().unwrap_or((0, String::new()));
        if prev.is_some() && e.id != prev_id + 1 {
            report.broken = Some(broken(
                prev_id + 1,
                format!(
                    "it is missing: deleted (the chain jumps from event {prev_id} to {})",
                    e.id
                ),
            ));
            continue;
        }
        if e.prev != prev_hash {
            report.broken = Some(broken(
                e.id,
                format!(
                    "it does not follow event {prev_id}: the event before it was removed or \
                     replaced, or this one was inserted"
                ),
            ));
            continue;
        }
        if event_hash(&e) != e.hash {
            report.broken = Some(broken(
                e.id,
                "its content does not match its hash: the row was edited".into(),
            ));
            continue;
        }
        hashes.insert(e.id, e.hash.clone());
        prev = Some((e.id, e.hash));
    }
    let last_db = prev.map_or(0, |(id, _)| id);
    if report.broken.is_some() {
        return Ok(report);
    }
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.behind = report.events;
            return Ok(report);
        }
        Err(e) => {
            report.broken = Some(Break {
                place: file.display().to_string(),
                id: 0,
                why: format!("cannot be read: {e}"),
            });
            return Ok(report);
        }
    };
    let mut prev: Option<(u64, String)> = None;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let place = format!("{} line {}", file.display(), i + 1);
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                report.broken = Some(Break {
                    place,
                    id: 0,
                    why: format!("cannot be read: {e}"),
                });
                return Ok(report);
            }
        };
        report.lines += 1;
        let fail = |id: u64, why: String| Break {
            place: place.clone(),
            id,
            why,
        };
        let e: EventRow = match serde_json::from_str(&line) {
            Ok(e) => e,
            Err(e) => {
                report.broken = Some(fail(0, format!("not an event: {e}")));
                return Ok(report);
            }
        };
        let (prev_id, prev_hash) = prev.clone().unwrap_or((0, String::new()));
        let why = if prev.is_some() && e.id != prev_id + 1 {
            Some(format!(
                "the copy jumps from event {prev_id} to {}: lines were removed",
                e.id
            ))
        } else if prev.is_some() && e.prev != prev_hash {
            Some(format!("it does not follow event {prev_id} in the copy"))
        } else if event_hash(&e) != e.hash {
            Some("its content does not match its hash: the line was edited".into())
        } else {
            match hashes.get(&e.id) {
                Some(h) if *h != e.hash => Some(
                    "it differs from the database's event of that id: one of the two was \
                     rewritten (the database, if its chain still holds)"
                        .into(),
                ),
                None => Some(
                    "the database has no such event: it was deleted there (or the database \
                     was restored from a backup)"
                        .into(),
                ),
                _ => None,
            }
        };
        if let Some(why) = why {
            report.broken = Some(fail(e.id, why));
            return Ok(report);
        }
        prev = Some((e.id, e.hash));
    }
    let last_file = prev.map_or(0, |(id, _)| id);
    report.behind = last_db.saturating_sub(last_file);
    Ok(report)
}

/// Which events `fleetwave audit` prints.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub host: Option<String>,
    /// Unix seconds.
    pub since: Option<u64>,
    /// A commit id or its prefix.
    pub commit: Option<String>,
}

/// The events of the database at `db` that `filter` selects, oldest first.
pub fn read(db: &Path, filter: &Filter) -> Result<Vec<EventRow>, StateError> {
    let query = |source| StateError::Query {
        path: db.to_owned(),
        source,
    };
    let conn = open_read_only(db)?;
    let mut st = conn
        .prepare(&format!(
            "{EVENTS} WHERE (?1 IS NULL OR host = ?1) AND at >= ?2 \
             AND (?3 IS NULL OR commit_id LIKE ?3 || '%') ORDER BY id"
        ))
        .map_err(query)?;
    let rows = st
        .query_map(
            params![filter.host, filter.since.unwrap_or(0) as i64, filter.commit],
            event_row,
        )
        .map_err(query)?;
    rows.collect::<rusqlite::Result<_>>().map_err(query)
}
