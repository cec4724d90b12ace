//! Admin tokens: bearer tokens for the operator's API, stored as BLAKE3 hashes (a
//! copy of the state database gives no usable token), each with a name and a scope,
//! listed and revoked with `fleetwave token`.
//!
//! The token of `--admin-token-file` is the bootstrap: scope `operate`, named
//! `bootstrap`, never stored; with it the first named tokens are made, and it can then
//! be dropped from the server's flags (docs/security.md).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::state::{AdminTokenRow, Op, WriteHandle, token_id};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Status, hosts, events, the observed state.
    Read,
    /// Read, and change things: retry, sync, tokens.
    Operate,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "operate" => Some(Scope::Operate),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Operate => "operate",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "an admin token is required (Authorization: Bearer ...; `fleetwave --token-file FILE`)"
    )]
    Missing,
    #[error("this admin token is not known to the server (mistyped, or from another server)")]
    Unknown,
    #[error("admin token {id} ({name}) was revoked")]
    Revoked { id: String, name: String },
    #[error("admin token {id} ({name}) has scope {has}; this call needs {needs}")]
    Scope {
        id: String,
        name: String,
        has: &'static str,
        needs: &'static str,
    },
    #[error("a token name is 1 to 64 letters, digits, `-`, `_`, `.` or `@`")]
    BadName,
    #[error("the scope is `read` or `operate`")]
    BadScope,
    #[error("no admin token {0}; `fleetwave token list` shows them")]
    NoSuchToken(String),
    #[error("no randomness available to make a token")]
    NoRandomness,
    #[error("the state database did not record the change; see the server's log")]
    NotRecorded,
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: String,
    pub name: String,
}

/// The admin tokens the server honours.
pub struct AdminTokens {
    /// `--admin-token-file`'s token: its id and hash.
    bootstrap: Option<(String, String)>,
    /// By id.
    tokens: Mutex<HashMap<String, AdminTokenRow>>,
    journal: Option<WriteHandle>,
}

fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// Constant-time equality, so a hash cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminTokens {
    pub fn new(
        bootstrap: Option<&str>,
        rows: Vec<AdminTokenRow>,
        journal: Option<WriteHandle>,
    ) -> AdminTokens {
        AdminTokens {
            bootstrap: bootstrap.map(|t| (token_id(t), hash(t))),
            tokens: Mutex::new(rows.into_iter().map(|r| (r.id.clone(), r)).collect()),
            journal,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AdminTokenRow>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who `bearer` is, if it may do what `need` asks. The error carries the token's
    /// id when it is known, for the audit trail.
    pub fn check(
        &self,
        bearer: Option<&str>,
        need: Scope,
    ) -> Result<Caller, (TokenError, Option<String>)> {
        let token = bearer.ok_or((TokenError::Missing, None))?;
        let id = token_id(token);
        let h = hash(token);
        if let Some((bid, bhash)) = &self.bootstrap
            && same(bhash.as_bytes(), h.as_bytes())
        {
            return Ok(Caller {
                id: bid.clone(),
                name: "bootstrap".into(),
            });
        }
        let tokens = self.lock();
        let row = tokens
            .get(&id)
            .filter(|r| same(r.hash.as_bytes(), h.as_bytes()))
            .ok_or((TokenError::Unknown, None))?;
        if row.revoked.is_some() {
            return Err((
                TokenError::Revoked {
                    id: id.clone(),
                    name: row.name.clone(),
                },
                Some(id),
            ));
        }
        let has = Scope::parse(&row.scope).unwrap_or(Scope::Read);
        if has < need {
            return Err((
                TokenError::Scope {
                    id: id.clone(),
                    name: row.name.clone(),
                    has: has.name(),
                    needs: need.name(),
                },
                Some(id),
            ));
        }
        Ok(Caller {
            id,
            name: row.name.clone(),
        })
    }

    /// Write `ops` and wait until they are durable.
    async fn durable(&self, ops: Vec<Op>) -> Result<(), TokenError> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        j.write(
            ops,
            Some(Box::new(move || {
                let _ = tx.send(());
            })),
        );
        rx.await.map_err(|_| TokenError::NotRecorded)
    }

    /// A new token: the token itself (shown once) and its row.
    pub async fn create(
        &self,
        name: &str,
        scope: &str,
    ) -> Result<(String, AdminTokenRow), TokenError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
        if !valid {
            return Err(TokenError::BadName);
        }
        let scope = Scope::parse(scope).ok_or(TokenError::BadScope)?;
        let secret = crate::services::api::random_token();
        if secret.is_empty() {
            return Err(TokenError::NoRandomness);
        }
        // A recognisable prefix lets secret scanners find a leaked token.
        let token = format!("fwa_{secret}");
        let row = AdminTokenRow {
            id: token_id(&token),
            name: name.to_string(),
            scope: scope.name().to_string(),
            hash: hash(&token),
            created: crate::state::now(),
            revoked: None,
        };
        self.durable(vec![Op::PutAdminToken(row.clone())]).await?;
        self.lock().insert(row.id.clone(), row.clone());
        Ok((token, row))
    }

    /// Revoke token `id`; honoured no more from this moment.
    pub async fn revoke(&self, id: &str) -> Result<AdminTokenRow, TokenError> {
        let at = crate::state::now();
        let row = {
            let mut tokens = self.lock();
            let row = tokens
                .get_mut(id)
                .ok_or_else(|| TokenError::NoSuchToken(id.to_string()))?;
            row.revoked.get_or_insert(at);
            row.clone()
        };
        self.durable(vec![Op::RevokeAdminToken {
            id: id.to_string(),
            at,
        }])
        .await?;
        Ok(row)
    }

    /// Every token (revoked ones too), oldest first; the hashes are not serialized.
    pub fn list(&self) -> Vec<AdminTokenRow> {
        let mut v: Vec<AdminTokenRow> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_token_reads_an_operate_token_operates_and_a_revoked_one_nothing() {
        let t = AdminTokens::new(Some("bootstrap-token-0123456789"), Vec::new(), None);
        assert_eq!(
            t.check(Some("bootstrap-token-0123456789"), Scope::Operate)
                .map(|c| c.name),
            Ok("bootstrap".into())
        );
        let (read, row) = t.create("dash", "read").await.expect("create");
        assert!(read.starts_with("fwa_"));
        assert_eq!(row.id, token_id(&read));
        assert!(t.check(Some(&read), Scope::Read).is_ok());
        assert!(matches!(
            t.check(Some(&read), Scope::Operate),
            Err((TokenError::Scope { .. }, Some(_)))
        ));
        let (op, _) = t.create("ci", "operate").await.expect("create");
        assert!(t.check(Some(&op), Scope::Operate).is_ok());
        t.revoke(&token_id(&op)).await.expect("revoke");
        assert!(matches!(
            t.check(Some(&op), Scope::Read),
            Err((TokenError::Revoked { .. }, Some(_)))
        ));
        assert_eq!(
            t.check(Some("fwa_guess"), Scope::Read).map_err(|e| e.0),
            Err(TokenError::Unknown)
        );
        assert_eq!(
            t.check(None, Scope::Read).map_err(|e| e.0),
            Err(TokenError::Missing)
        );
        assert_eq!(
            t.create("a b", "read").await.err(),
            Some(TokenError::BadName)
        );
        assert_eq!(
            t.create("x", "admin").await.err(),
            Some(TokenError::BadScope)
        );
    }
}
