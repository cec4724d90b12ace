//! The agent API, under `/api/v1/` on the HTTP server.
//!
//! Every call carries the task token it was booted with (`Authorization: Bearer T`) and
//! its MAC (`X-Fleetwave-Mac`). A token exists only for a task the controller armed
//! (or a registration of an unknown machine), is bound to that MAC, and authorizes
//! exactly its task: a deploy token reads only its version's manifest and chunks, a
//! capture token writes only chunks and the one manifest of its image and generation,
//! a register token only posts inventory. Reporting the result spends it. Unknown,
//! expired or spent tokens get 401; a token used from another MAC, or for what its
//! task does not need, gets 403. Tokens live in the state database, so a restarted
//! server still honours the agents at work. Uploads are size-limited and re-hashed
//! before they are stored.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Serialize;
use tracing::{info, warn};

use crate::image::manifest::Manifest;
use crate::image::store::{MadeBy, Store, StoreError};
use crate::protocol::{Assignment, Task};
pub use crate::protocol::{Progress, TaskResult};
use crate::spec::{Digest, Mac};
use crate::state::{Op, TokenRow};

/// The largest chunk accepted (the chunker's maximum is 2 MiB).
pub const MAX_CHUNK: usize = 16 << 20;
/// The largest manifest accepted.
pub const MAX_MANIFEST: usize = 512 << 20;
/// How long a token lives.
pub const TOKEN_SECS: u64 = 12 * 3600;
/// The largest inventory accepted.
const MAX_INVENTORY: usize = 1 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub assignment: Assignment,
    /// Unix seconds.
    pub expires: u64,
    pub spent: bool,
    pub progress: Option<Progress>,
    /// The chunks of a deploy's version, read once on the first chunk request.
    #[serde(skip)]
    chunks: Option<Arc<HashSet<Digest>>>,
}

/// What a request needs its token's task to allow.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// Reading its own task, reporting progress and the result.
    Any,
    /// Posting inventory.
    Inventory,
    /// Uploading chunks (and asking which are missing).
    CaptureChunks,
    /// Reading this manifest.
    Manifest(Digest),
    /// Reading a chunk of the task's version.
    Chunk,
    /// Joining the task's multicast session.
    Multicast,
}

/// Whether `task` allows `need`. A chunk read is checked against the version's
/// chunk list separately (it needs the store).
fn allows(task: &Task, need: Need) -> bool {
    match (task, need) {
        (_, Need::Any | Need::Inventory) => true,
        (Task::Capture { .. }, Need::CaptureChunks) => true,
        (Task::Deploy { version, .. } | Task::Verify { version, .. }, Need::Manifest(d)) => {
            *version == d
        }
        (Task::Deploy { .. }, Need::Chunk) => true,
        (
            Task::Deploy {
                multicast: Some(_), ..
            },
            Need::Multicast,
        ) => true,
        _ => false,
    }
}

/// An observation the API hands on (to the state database, and from there to the
/// controller).
pub type Journal = crate::state::WriteHandle;

/// Tokens and the image store.
pub struct Api {
    pub store: Store,
    grants: Mutex<HashMap<String, Grant>>,
    /// The multicast sessions agents may ask to join.
    pub sessions: Option<Arc<crate::multicast::sessions::Sessions>>,
    /// Where tokens and observations are kept.
    journal: Option<Journal>,
}

pub fn random_token() -> String {
    let mut seed = [0u8; 32];
    // /dev/urandom never blocks once the kernel is seeded; failing to read it is a
    // broken system, and a token must not be guessable, so fall back to nothing.
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
    if ok.is_err() {
        return String::new();
    }
    seed.iter().map(|b| format!("{b:02x}")).collect()
}

impl Api {
    pub fn new(store: Store) -> Api {
        Api {
            store,
            grants: Mutex::default(),
            sessions: None,
            journal: None,
        }
    }

    /// Keep tokens in the state database, starting from the ones it holds (armed
    /// before a restart, for agents that are still at work).
    pub fn with_state(mut self, journal: Journal, rows: Vec<TokenRow>) -> Api {
        let g = self.grants.get_mut().unwrap_or_else(|p| p.into_inner());
        for r in rows {
            g.insert(
                r.token,
                Grant {
                    assignment: r.assignment,
                    expires: r.expires,
                    spent: false,
                    progress: None,
                    chunks: None,
                },
            );
        }
        self.journal = Some(journal);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Grant>> {
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Honour `token` for `assignment` until `expires` (Unix seconds). The caller
    /// made the token (the controller, when it arms a task) and records it.
    pub fn grant(&self, token: &str, assignment: Assignment, expires: u64) {
        let mut g = self.lock();
        let now = crate::state::now();
        g.retain(|_, x| x.expires > now && !x.spent);
        g.insert(
            token.to_string(),
            Grant {
                assignment,
                expires,
                spent: false,
                progress: None,
                chunks: None,
            },
        );
    }

    /// Stop honouring `token` (its task was disarmed).
    pub fn revoke(&self, token: &str) {
        self.lock().remove(token);
    }

    /// A fresh token for `assignment`, recorded in the state database; `None` if no
    /// randomness is available.
    pub fn mint(&self, assignment: Assignment) -> Option<String> {
        let token = random_token();
        if token.is_empty() {
            return None;
        }
        let expires = crate::state::now() + TOKEN_SECS;
        if let Some(j) = &self.journal {
            j.write(
                vec![Op::PutToken(TokenRow {
                    token: token.clone(),
                    assignment: assignment.clone(),
                    expires,
                })],
                None,
            );
        }
        self.grant(&token, assignment, expires);
        Some(token)
    }

    /// The registration token of an unknown machine: one at a time per MAC, reused
    /// while it lives, so asking for scripts does not pile up tokens.
    pub fn register_token(&self, mac: Mac) -> Option<String> {
        let now = crate::state::now();
        let found = self
            .lock()
            .iter()
            .find(|(_, g)| {
                g.assignment.mac == mac
                    && g.assignment.task == Task::Register
                    && !g.spent
                    && g.expires > now + 600
            })
            .map(|(t, _)| t.clone());
        found.or_else(|| {
            self.mint(Assignment {
                mac,
                host: None,
                id: 0,
                task: Task::Register,
                disk: Default::default(),
                after: crate::protocol::After::Poweroff,
                commit: None,
                signer: None,
            })
        })
    }

    /// The grant a request's headers prove, if it allows `need`; or the refusal.
    fn authorize(&self, headers: &HeaderMap, need: Need) -> Result<(String, Grant), Refusal> {
        let refuse = |code: StatusCode, why: &str| Refusal(code, format!("{why}\n"));
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "a task token is required"))?;
        let g = self.lock();
        let grant = g
            .get(token)
            .filter(|x| !x.spent && x.expires > crate::state::now())
            .ok_or_else(|| {
                refuse(
                    StatusCode::UNAUTHORIZED,
                    "unknown, expired or already used task token: reboot the host for a new task",
                )
            })?;
        let mac = headers
            .get("x-fleetwave-mac")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Mac>().ok());
        if mac != Some(grant.assignment.mac) {
            warn!(mac = %mac.map_or_else(|| "none".to_string(), |m| m.to_string()), bound = %grant.assignment.mac,
                "task token used from another MAC");
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "this task token belongs to another machine",
            ));
        }
        if !allows(&grant.assignment.task, need) {
            warn!(mac = %grant.assignment.mac, task = grant.assignment.task.kind(), need = ?need,
                "task token used beyond its task");
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "this token authorizes {} only\n",
                    grant.assignment.task.summary()
                ),
            ));
        }
        Ok((token.to_string(), grant.clone()))
    }

    /// Tasks in flight (tokens not spent nor expired), for the health endpoint.
    pub fn tasks(&self) -> Vec<serde_json::Value> {
        let now = crate::state::now();
        let g = self.lock();
        let mut out: Vec<serde_json::Value> = g
            .values()
            .filter(|x| !x.spent && x.expires > now)
            .map(|x| {
                serde_json::json!({
                    "mac": x.assignment.mac,
                    "host": x.assignment.host,
                    "task": x.assignment.task.kind(),
                    "progress": x.progress,
                })
            })
            .collect();
        out.sort_by_key(|v| v["mac"].to_string());
        out
    }

    /// The latest progress any of `mac`'s tasks reported.
    pub fn last_progress(&self, mac: Mac) -> Option<Progress> {
        self.lock()
            .values()
            .filter(|g| g.assignment.mac == mac)
            .find_map(|g| g.progress.clone())
    }

    fn update(&self, token: &str, f: impl FnOnce(&mut Grant)) {
        if let Some(g) = self.lock().get_mut(token) {
            f(g);
        }
    }

    /// Queue `ops`; with `durable`, wait until they are committed.
    async fn record(&self, ops: Vec<Op>, durable: bool) -> Result<(), Refusal> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        if !durable {
            j.write(ops, None);
            return Ok(());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        j.write(
            ops,
            Some(Box::new(move || {
                let _ = tx.send(());
            })),
        );
        rx.await.map_err(|_| {
            Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server could not record this; send it again\n".into(),
            )
        })
    }

    /// Whether `d` is a chunk of the deploy's version (the list read once per grant).
    fn chunk_of_version(&self, token: &str, grant: &Grant, d: &Digest) -> Result<bool, Refusal> {
        let set = match &grant.chunks {
            Some(s) => s.clone(),
            None => {
                let Task::Deploy { version, .. } = &grant.assignment.task else {
                    return Ok(false);
                };
                let m = self.store.manifest(version).map_err(|e| {
                    Refusal(StatusCode::NOT_FOUND, format!("the task's version: {e}\n"))
                })?;
                let set: Arc<HashSet<Digest>> = Arc::new(m.chunks.iter().map(|c| c.hash).collect());
                self.update(token, |g| g.chunks = Some(set.clone()));
                set
            }
        };
        Ok(set.contains(d))
    }
}

pub fn routes<S: Clone + Send + Sync + 'static>(api: Arc<Api>) -> Router<S> {
    Router::new()
        .route("/api/v1/task", get(task))
        .route(
            "/api/v1/register",
            post(register).layer(DefaultBodyLimit::max(MAX_INVENTORY)),
        )
        .route("/api/v1/progress", post(progress))
        .route("/api/v1/result", post(result))
        .route("/api/v1/chunks/missing", post(missing))
        .route("/api/v1/multicast", post(multicast))
        .route(
            "/api/v1/chunks/{digest}",
            get(get_chunk)
                .put(put_chunk)
                .layer(DefaultBodyLimit::max(MAX_CHUNK)),
        )
        .route("/api/v1/manifests/{digest}", get(get_manifest))
        .route(
            "/api/v1/manifests",
            put(put_manifest).layer(DefaultBodyLimit::max(MAX_MANIFEST)),
        )
        .with_state(api)
}

/// A refused request: its status and the reason, as text.
#[derive(Debug)]
pub struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn store_error(e: StoreError) -> Response {
    let code = match e {
        StoreError::MissingChunk(_) | StoreError::MissingManifest(_) => StatusCode::NOT_FOUND,
        StoreError::UnknownImage(_) | StoreError::BadName(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, format!("{e}\n")).into_response()
}

/// Run blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response())
}

async fn task(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    match api.authorize(&headers, Need::Any) {
        Ok((_, g)) => Json(g.assignment).into_response(),
        Err(r) => r.into_response(),
    }
}

/// Start (or find) the multicast session the task names: `{group, digest}`. 403 when
/// the task is not a multicast deploy, 409 when the session cannot run now (the agent
/// then deploys by unicast).
async fn multicast(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    let g = match api.authorize(&headers, Need::Multicast) {
        Ok((_, g)) => g,
        Err(r) => return r.into_response(),
    };
    let Task::Deploy {
        multicast: Some(id),
        ..
    } = &g.assignment.task
    else {
        return (StatusCode::FORBIDDEN, "not a multicast deploy\n").into_response();
    };
    let Some(sessions) = &api.sessions else {
        return (
            StatusCode::CONFLICT,
            "this server runs no multicast sessions\n",
        )
            .into_response();
    };
    match sessions.ensure(id) {
        Ok(r) => {
            info!(mac = %g.assignment.mac, session = %r.id, "agent joins a multicast session");
            Json(serde_json::json!({"group": r.group, "digest": r.digest})).into_response()
        }
        Err(why) => (StatusCode::CONFLICT, format!("{why}\n")).into_response(),
    }
}

async fn register(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(inventory): Json<crate::protocol::Inventory>,
) -> Response {
    let g = match api.authorize(&headers, Need::Inventory) {
        Ok((_, g)) => g,
        Err(r) => return r.into_response(),
    };
    info!(mac = %g.assignment.mac, host = g.assignment.host.as_deref().unwrap_or("-"), disks = inventory.disks.len(),
        "inventory reported");
    let op = Op::Inventory(crate::state::InventoryRow {
        mac: g.assignment.mac,
        host: g.assignment.host.clone(),
        at: crate::state::now(),
        inventory,
    });
    match api.record(vec![op], true).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r.into_response(),
    }
}

async fn progress(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(p): Json<Progress>,
) -> Response {
    let (token, g) = match api.authorize(&headers, Need::Any) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    api.update(&token, |g| g.progress = Some(p.clone()));
    // Advisory: handed on, not waited for.
    let _ = api
        .record(
            vec![Op::Progress {
                task: g.assignment.id,
                mac: g.assignment.mac,
                progress: p,
            }],
            false,
        )
        .await;
    StatusCode::NO_CONTENT.into_response()
}

async fn result(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(r): Json<TaskResult>,
) -> Response {
    let (token, g) = match api.authorize(&headers, Need::Any) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let a = &g.assignment;
    if r.ok {
        info!(mac = %a.mac, host = a.host.as_deref().unwrap_or("-"), task = a.task.kind(),
            digest = %r.digest.map_or_else(|| "none".to_string(), |d| d.to_string()),
            "task done: {}", r.message);
    } else {
        warn!(mac = %a.mac, host = a.host.as_deref().unwrap_or("-"), task = a.task.kind(), "task FAILED: {}{}", r.message,
            r.log_tail.as_deref().map(|t| format!("\n{t}")).unwrap_or_default());
    }
    api.update(&token, |g| g.spent = true);
    let ops = vec![
        Op::SpendToken(token),
        Op::Result(crate::state::ResultRow {
            task: a.id,
            mac: a.mac,
            host: a.host.clone(),
            at: crate::state::now(),
            result: r,
        }),
    ];
    // The agent reboots once it has this answer: the result must be on disk by then.
    match api.record(ops, true).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r.into_response(),
    }
}

fn digest(s: &str) -> Result<Digest, Refusal> {
    s.parse()
        .map_err(|e: String| Refusal(StatusCode::BAD_REQUEST, format!("{e}\n")))
}

async fn missing(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(wanted): Json<Vec<Digest>>,
) -> Response {
    if let Err(r) = api.authorize(&headers, Need::CaptureChunks) {
        return r.into_response();
    }
    let a = api.clone();
    match blocking(move || {
        wanted
            .into_iter()
            .filter(|d| !a.store.has_chunk(d))
            .collect::<Vec<_>>()
    })
    .await
    {
        Ok(m) => Json(m).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn put_chunk(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Response {
    let d = match api
        .authorize(&headers, Need::CaptureChunks)
        .and_then(|_| digest(&name))
    {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let a = api.clone();
    let r = blocking(move || {
        // Re-hash what arrived: a chunk is stored only under its true name.
        let data = match zstd::bulk::decompress(&body, MAX_CHUNK) {
            Ok(x) => x,
            Err(e) => {
                return (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("not a zstd chunk: {e}\n"),
                )
                    .into_response();
            }
        };
        let actual = Digest(*blake3::hash(&data).as_bytes());
        if actual != d {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the chunk's data hashes to {actual}, not {d}\n"),
            )
                .into_response();
        }
        match a.store.put_chunk(&d, &data, &body) {
            Ok(_) => StatusCode::CREATED.into_response(),
            Err(e) => store_error(e),
        }
    })
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn get_chunk(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let d = match digest(&name) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let (token, g) = match api.authorize(&headers, Need::Chunk) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let a = api.clone();
    let r = blocking(move || {
        match a.chunk_of_version(&token, &g, &d) {
            Ok(true) => {}
            Ok(false) => {
                return Refusal(
                    StatusCode::FORBIDDEN,
                    format!("chunk {d} is not part of this task's version\n"),
                )
                .into_response();
            }
            Err(r) => return r.into_response(),
        }
        match a.store.chunk_raw(&d) {
            Ok(b) => ([(header::CONTENT_TYPE, "application/zstd")], b).into_response(),
            Err(e) => store_error(e),
        }
    })
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn get_manifest(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let d = match digest(&name).and_then(|d| api.authorize(&headers, Need::Manifest(d)).map(|_| d))
    {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let a = api.clone();
    match blocking(move || a.store.manifest(&d).map(|m| m.to_bytes())).await {
        Ok(Ok(b)) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Ok(Err(e)) => store_error(e),
        Err(r) => r.into_response(),
    }
}

/// Commit a capture's manifest as a version of the image and generation its task
/// names (whatever the request says).
async fn put_manifest(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    let (token, g) = match api.authorize(&headers, Need::CaptureChunks) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let Task::Capture { image, generation } = g.assignment.task.clone() else {
        return (StatusCode::FORBIDDEN, "not a capture task\n").into_response();
    };
    let m: Manifest = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("manifest: {e}\n")).into_response();
        }
    };
    if let Err(why) = m.check() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("manifest is inconsistent: {why}\n"),
        )
            .into_response();
    }
    let a = api.clone();
    let name = image.clone();
    let made_by = MadeBy {
        task: g.assignment.id,
        host: g.assignment.host.clone(),
        mac: g.assignment.mac.to_string(),
        commit: g.assignment.commit.clone(),
        signer: g.assignment.signer.clone(),
    };
    let r = blocking(move || {
        a.store
            .commit_made_by(&m, Some((&name, generation)), Some(made_by))
    })
    .await;
    match r {
        Ok(Ok((digest, stored))) => {
            info!(mac = %g.assignment.mac, image = %image, generation, %digest,
                "image version committed");
            let mut e = crate::state::EventRow::new(
                g.assignment.host.as_deref(),
                "ImageVersionCommitted",
                format!("{image} generation {generation}: {digest} ({stored} bytes stored)"),
            )
            .task(g.assignment.id)
            .token(&token)
            .outcome("committed");
            e.commit = g.assignment.commit.clone();
            e.signer = g.assignment.signer.clone();
            let _ = api.record(vec![Op::Event(e)], false).await;
            (
                StatusCode::CREATED,
                Json(serde_json::json!({"digest": digest, "stored_bytes": stored})),
            )
                .into_response()
        }
        Ok(Err(StoreError::MissingChunk(d))) => (
            StatusCode::CONFLICT,
            format!("chunk {d} was never uploaded; upload the missing chunks first\n"),
        )
            .into_response(),
        Ok(Err(e)) => store_error(e),
        Err(r) => r.into_response(),
    }
}
