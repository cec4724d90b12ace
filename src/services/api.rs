//! The agent API, under `/api/v1/` on the HTTP server.
//!
//! Every call carries the task token it was booted with (`Authorization: Bearer T`) and
//! its MAC (`X-Fleetwave-Mac`). Tokens are random, minted when a host's iPXE script
//! boots the agent, bound to that MAC, and expire; reporting the task's result spends
//! the token. Unknown, expired or spent tokens get 401; a token used from another MAC
//! gets 403. `serve` keeps tokens in its state database, so a restarted server still
//! honours the agents at work. Uploads are size-limited and re-hashed before they are stored.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::image::manifest::Manifest;
use crate::image::store::{Repo, Store, StoreError};
use crate::spec::{Digest, Mac};
use crate::state::{Op, TokenRow};

/// The largest chunk accepted (the chunker's maximum is 2 MiB).
pub const MAX_CHUNK: usize = 16 << 20;
/// The largest manifest accepted.
pub const MAX_MANIFEST: usize = 512 << 20;
/// How long a token lives.
pub const TOKEN_SECS: u64 = 12 * 3600;

#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub mac: Mac,
    pub host: Option<String>,
    /// The task as the script's kernel command line gives it.
    pub task: Vec<(String, String)>,
    /// Unix seconds.
    pub expires: u64,
    pub spent: bool,
    pub progress: Option<Progress>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_sec: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    pub ok: bool,
    /// The version the disk was verified to hold, for a deploy or capture.
    pub digest: Option<Digest>,
    pub message: String,
}

/// Tokens and the image store.
pub struct Api {
    pub store: Store,
    grants: Mutex<HashMap<String, Grant>>,
    /// The multicast sessions agents may ask to join.
    pub sessions: Option<Arc<crate::multicast::sessions::Sessions>>,
    /// Where tokens are kept across restarts.
    journal: Option<crate::state::WriteHandle>,
}

fn random_token() -> String {
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

    /// Keep tokens in the state database, starting from the ones it holds (minted
    /// before a restart, for agents that are still at work).
    pub fn with_state(mut self, journal: crate::state::WriteHandle, rows: Vec<TokenRow>) -> Api {
        let g = self.grants.get_mut().unwrap_or_else(|p| p.into_inner());
        for r in rows {
            g.insert(
                r.token,
                Grant {
                    mac: r.mac,
                    host: r.host,
                    task: r.task,
                    expires: r.expires,
                    spent: false,
                    progress: None,
                },
            );
        }
        self.journal = Some(journal);
        self
    }

    /// A fresh token for `mac` to carry out `task`; `None` if no randomness is
    /// available (the script then boots nothing).
    pub fn mint(&self, mac: Mac, host: Option<&str>, task: &[(&str, String)]) -> Option<String> {
        let token = random_token();
        if token.is_empty() {
            return None;
        }
        let grant = Grant {
            mac,
            host: host.map(str::to_string),
            task: task
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            expires: crate::state::now() + TOKEN_SECS,
            spent: false,
            progress: None,
        };
        if let Some(j) = &self.journal {
            j.write(
                vec![Op::PutToken(TokenRow {
                    token: token.clone(),
                    mac,
                    host: grant.host.clone(),
                    task: grant.task.clone(),
                    expires: grant.expires,
                })],
                None,
            );
        }
        let mut g = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::state::now();
        g.retain(|_, x| x.expires > now && !x.spent);
        g.insert(token.clone(), grant);
        Some(token)
    }

    /// The grant a request's headers prove, or the status that refuses it.
    fn authorize(&self, headers: &HeaderMap) -> Result<(String, Grant), Refusal> {
        let refuse = |code: StatusCode, why: &str| Refusal(code, format!("{why}\n"));
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "a task token is required"))?;
        let g = self.grants.lock().unwrap_or_else(|p| p.into_inner());
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
        if mac != Some(grant.mac) {
            warn!(mac = ?mac, bound = %grant.mac, "task token used from another MAC");
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "this task token belongs to another machine",
            ));
        }
        Ok((token.to_string(), grant.clone()))
    }

    /// Tasks in flight (tokens not spent nor expired), for the health endpoint.
    pub fn tasks(&self) -> Vec<serde_json::Value> {
        let now = crate::state::now();
        let g = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<serde_json::Value> = g
            .values()
            .filter(|x| !x.spent && x.expires > now)
            .map(|x| {
                serde_json::json!({
                    "mac": x.mac,
                    "host": x.host,
                    "task": x.task.iter().find(|(k, _)| k == "task").map(|(_, v)| v),
                    "progress": x.progress,
                })
            })
            .collect();
        out.sort_by_key(|v| v["mac"].to_string());
        out
    }

    /// The latest progress any of `mac`'s tasks reported.
    pub fn last_progress(&self, mac: Mac) -> Option<Progress> {
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|g| g.mac == mac)
            .find_map(|g| g.progress.clone())
    }

    fn update(&self, token: &str, f: impl FnOnce(&mut Grant)) {
        if let Some(g) = self
            .grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(token)
        {
            f(g);
        }
    }
}

pub fn routes<S: Clone + Send + Sync + 'static>(api: Arc<Api>) -> Router<S> {
    Router::new()
        .route("/api/v1/task", get(task))
        .route("/api/v1/register", post(register))
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

/// Run `f` with the request's token and grant, or answer the refusal.
fn granted(api: &Api, headers: &HeaderMap, f: impl FnOnce(String, Grant) -> Response) -> Response {
    match api.authorize(headers) {
        Ok((token, g)) => f(token, g),
        Err(r) => r.into_response(),
    }
}

/// The digest a path names, once the request is authorized.
fn authorized_digest(api: &Api, headers: &HeaderMap, name: &str) -> Result<Digest, Refusal> {
    api.authorize(headers)?;
    digest(name)
}

async fn task(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    granted(&api, &headers, |_, g| {
        Json(serde_json::json!({
            "mac": g.mac,
            "host": g.host,
            "task": g.task.iter().cloned().collect::<HashMap<_, _>>(),
        }))
        .into_response()
    })
}

/// Start (or find) the multicast session the task names: `{group, digest}`. 404 when
/// the task is not a multicast deploy, 409 when the session cannot run now (the agent
/// then deploys by unicast).
async fn multicast(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    granted(&api, &headers, |_, g| {
        let session = g
            .task
            .iter()
            .find(|(k, _)| k == "via")
            .and_then(|(_, v)| v.strip_prefix("multicast:"));
        let (Some(id), Some(sessions)) = (session, &api.sessions) else {
            return (
                StatusCode::NOT_FOUND,
                "this task is not a multicast deploy\n",
            )
                .into_response();
        };
        match sessions.ensure(id) {
            Ok(r) => {
                info!(mac = %g.mac, session = %r.id, "agent joins a multicast session");
                Json(serde_json::json!({"group": r.group, "digest": r.digest})).into_response()
            }
            Err(why) => (StatusCode::CONFLICT, format!("{why}\n")).into_response(),
        }
    })
}

async fn register(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(inventory): Json<serde_json::Value>,
) -> Response {
    granted(&api, &headers, |_, g| {
        info!(mac = %g.mac, inventory = %inventory, "inventory reported");
        StatusCode::NO_CONTENT.into_response()
    })
}

async fn progress(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(p): Json<Progress>,
) -> Response {
    granted(&api, &headers, |token, _| {
        api.update(&token, |g| g.progress = Some(p));
        StatusCode::NO_CONTENT.into_response()
    })
}

async fn result(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Json(r): Json<TaskResult>,
) -> Response {
    granted(&api, &headers, |token, g| {
        if r.ok {
            info!(mac = %g.mac, host = ?g.host, digest = ?r.digest, "task done: {}", r.message);
        } else {
            warn!(mac = %g.mac, host = ?g.host, "task FAILED: {}", r.message);
        }
        api.update(&token, |g| g.spent = true);
        if let Some(j) = &api.journal {
            j.write(vec![Op::SpendToken(token)], None);
        }
        StatusCode::NO_CONTENT.into_response()
    })
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
    if let Err(r) = api.authorize(&headers) {
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
    let d = match authorized_digest(&api, &headers, &name) {
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
        match a.store.put_chunk(&d, &body) {
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
    let d = match authorized_digest(&api, &headers, &name) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let a = api.clone();
    match blocking(move || a.store.chunk_raw(&d)).await {
        Ok(Ok(b)) => ([(header::CONTENT_TYPE, "application/zstd")], b).into_response(),
        Ok(Err(e)) => store_error(e),
        Err(r) => r.into_response(),
    }
}

async fn get_manifest(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let d = match authorized_digest(&api, &headers, &name) {
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

#[derive(Deserialize)]
struct Commit {
    image: Option<String>,
    generation: Option<u64>,
}

async fn put_manifest(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<Commit>,
    body: Bytes,
) -> Response {
    let (token, g) = match api.authorize(&headers) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let m: Manifest = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("manifest: {e}\n")).into_response();
        }
    };
    let a = api.clone();
    let r = blocking(move || {
        let image = q.image.as_deref().map(|n| (n, q.generation.unwrap_or(1)));
        a.store.commit(&m, image)
    })
    .await;
    match r {
        Ok(Ok((digest, stored))) => {
            info!(mac = %g.mac, %digest, "image version committed");
            api.update(&token, |_| {});
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
