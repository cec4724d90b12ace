//! The read side of the state database: a connection of its own (WAL lets it read
//! while the writer commits), for the controller's start, status and the CLI.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{AdminTokenRow, EventRow, HostRow, StateError, TaskRow};
use crate::spec::Mac;

pub(crate) const EVENTS: &str = "SELECT id, at, host, kind, message, commit_id, task_id, \
     signer, token_id, outcome, prev, hash FROM events";

pub(crate) fn event_row(r: &rusqlite::Row) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get::<_, i64>(0)?.max(0) as u64,
        at: r.get::<_, i64>(1)?.max(0) as u64,
        host: r.get(2)?,
        kind: r.get(3)?,
        message: r.get(4)?,
        commit: r.get(5)?,
        task: r.get::<_, Option<i64>>(6)?.map(|t| t.max(0) as u64),
        signer: r.get(7)?,
        token: r.get(8)?,
        outcome: r.get(9)?,
        prev: r.get::<_, Option<String>>(10)?.unwrap_or_default(),
        hash: r.get::<_, Option<String>>(11)?.unwrap_or_default(),
    })
}

pub struct Reader {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// An inventory row: the MAC, the host (if known), when, and the inventory as JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InventoryView {
    pub mac: Mac,
    pub host: Option<String>,
    pub at: u64,
    pub inventory: serde_json::Value,
}

impl Reader {
    /// Open the database read-only; it must exist (the writer's [`super::Store::open`]
    /// creates it).
    pub fn open(path: &Path) -> Result<Reader, StateError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StateError::Open {
            path: path.to_owned(),
            source,
        })?;
        let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
        Ok(Reader {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    fn q<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|source| StateError::Query {
            path: self.path.clone(),
            source,
        })
    }

    /// Every host status the controller recorded.
    pub fn hosts(&self) -> Result<Vec<HostRow>, StateError> {
        let rows = self.q(|c| {
            let mut st = c.prepare("SELECT name, mac, phase, status, updated FROM hosts")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, mac, phase, status, updated)| {
                Some(HostRow {
                    name,
                    mac: mac.parse().ok()?,
                    phase,
                    status,
                    updated: updated.max(0) as u64,
                })
            })
            .collect())
    }

    /// Tasks, newest first: of one host, or all.
    pub fn tasks(&self, host: Option<&str>, limit: usize) -> Result<Vec<TaskRow>, StateError> {
        let rows = self.q(|c| {
            let mut st = c.prepare(
                "SELECT id, host, mac, task, commit_id, armed_at, ended_at, result FROM tasks \
                 WHERE ?1 IS NULL OR host = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = st.query_map(params![host, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, host, mac, task, commit, armed, ended, result)| {
                Some(TaskRow {
                    id: id.max(0) as u64,
                    host,
                    mac: mac.parse().ok()?,
                    task: serde_json::from_str(&task).ok()?,
                    commit,
                    armed_at: armed.max(0) as u64,
                    ended_at: ended.map(|e| e.max(0) as u64),
                    result: result.and_then(|r| serde_json::from_str(&r).ok()),
                })
            })
            .collect())
    }

    /// The highest task id ever used (ids are never reused).
    pub fn last_task_id(&self) -> Result<u64, StateError> {
        self.q(|c| {
            c.query_row("SELECT coalesce(max(id), 0) FROM tasks", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map(|n| n.max(0) as u64)
    }

    /// Events after `after` (an id), oldest first, at most `limit`; of one host or all.
    /// Successful admin calls (`AdminCall`, one per status poll) are left out of this
    /// activity feed; `fleetwave audit` shows them.
    pub fn events(
        &self,
        after: u64,
        host: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRow>, StateError> {
        self.q(|c| {
            let mut st = c.prepare(&format!(
                "{EVENTS} WHERE id > ?1 AND (?2 IS NULL OR host = ?2) AND kind != 'AdminCall' \
                 ORDER BY id LIMIT ?3"
            ))?;
            let rows = st.query_map(params![after as i64, host, limit as i64], event_row)?;
            rows.collect()
        })
    }

    /// The newest `limit` events (of one host, or all), oldest first.
    pub fn recent_events(
        &self,
        host: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRow>, StateError> {
        let mut rows: Vec<EventRow> = self.q(|c| {
            let mut st = c.prepare(&format!(
                "{EVENTS} WHERE (?1 IS NULL OR host = ?1) AND kind != 'AdminCall' \
                 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = st.query_map(params![host, limit as i64], event_row)?;
            rows.collect()
        })?;
        rows.reverse();
        Ok(rows)
    }

    /// Every admin token, revoked ones too, oldest first.
    pub fn admin_tokens(&self) -> Result<Vec<AdminTokenRow>, StateError> {
        self.q(|c| {
            let mut st = c.prepare(
                "SELECT id, name, scope, hash, created, revoked FROM admin_tokens ORDER BY created, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(AdminTokenRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    scope: r.get(2)?,
                    hash: r.get(3)?,
                    created: r.get::<_, i64>(4)?.max(0) as u64,
                    revoked: r.get::<_, Option<i64>>(5)?.map(|t| t.max(0) as u64),
                })
            })?;
            rows.collect()
        })
    }

    /// Inventory rows: of known hosts, or (with `unknown`) of machines the fleet lacks.
    pub fn inventory(&self, unknown: bool) -> Result<Vec<InventoryView>, StateError> {
        let rows = self.q(|c| {
            let mut st = c.prepare(
                "SELECT mac, host, at, inventory FROM inventory \
                 WHERE (host IS NULL) = ?1 ORDER BY mac",
            )?;
            let rows = st.query_map([unknown], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(mac, host, at, inv)| {
                Some(InventoryView {
                    mac: mac.parse().ok()?,
                    host,
                    at: at.max(0) as u64,
                    inventory: serde_json::from_str(&inv).ok()?,
                })
            })
            .collect())
    }

    /// A key of the controller's bookkeeping.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StateError> {
        self.q(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
    }
}
