//! The operator's API, under `/api/v1/` beside the agent API:
//!
//! - `GET /api/v1/status`: where the fleet stands (JSON); `GET /api/v1/observed`: what
//!   the controller plans with (`plan --observed URL`); `GET /api/v1/hosts/{name}`:
//!   one host, its tasks and events; `GET /api/v1/events?after=ID`, or as server-sent
//!   events with `Accept: text/event-stream`; `GET /api/v1/hosts?unknown=true`:
//!   machines that registered but are not in the fleet. Need an admin token of scope
//!   `read` (or `operate`).
//! - `POST /api/v1/retry/{host}`, `POST /api/v1/sync`, and the tokens themselves
//!   (`GET`/`POST /api/v1/tokens`, `DELETE /api/v1/tokens/{id}`): scope `operate`.
//! - `DELETE /api/v1/images/{NAME or NAME@blake3:...}`: remove an image or one version
//!   (scope `operate`); its chunks go at the next `fleetwave image gc`.
//! - Every call with a token, allowed or refused, is an `AdminCall` or `AdminDenied`
//!   event in the audit trail, naming the token by its id.
//! - `POST /api/v1/hooks/git`: a push webhook, signed with the shared secret (GitHub's
//!   `X-Hub-Signature-256`, Gitea's `X-Gitea-Signature`, GitLab's `X-Gitlab-Token`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;
use tracing::{info, warn};

use crate::protocol::{Command, FleetStatus};
use crate::services::tokens::{AdminTokens, Caller, Scope, TokenError};
use crate::state::{EventRow, Op, Reader, WriteHandle, token_id};

/// What the operator's API reaches.
#[derive(Clone)]
pub struct Control {
    pub commands: mpsc::UnboundedSender<Command>,
    /// Wakes the source follower at once.
    pub sync: Arc<Notify>,
    pub events: broadcast::Sender<EventRow>,
    pub reader: Arc<Reader>,
    /// The admin tokens honoured (the bootstrap one of `--admin-token-file` too).
    pub tokens: Arc<AdminTokens>,
    /// Where admin calls are recorded (the audit trail).
    pub journal: Option<WriteHandle>,
    /// The image store, for `DELETE /api/v1/images/...`.
    pub images: Option<Arc<crate::image::store::Store>>,
    /// The webhook's shared secret; none: the webhook is refused.
    pub webhook_secret: Option<String>,
}

pub fn routes<S: Clone + Send + Sync + 'static>(c: Control) -> Router<S> {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/observed", get(observed))
        .route("/api/v1/hosts", get(hosts))
        .route("/api/v1/hosts/{name}", get(host))
        .route("/api/v1/events", get(events))
        .route("/api/v1/retry/{host}", post(retry))
        .route("/api/v1/sync", post(sync))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .route("/api/v1/images/{spec}", delete(remove_image))
        .route("/api/v1/hooks/git", post(hook))
        .with_state(c)
}

fn text(code: StatusCode, s: impl Into<String>) -> Response {
    (code, format!("{}\n", s.into())).into_response()
}

/// Constant-time equality, so a token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller of an admin call, if its bearer token allows `need`. The call, allowed
/// or not, goes to the audit trail (`what`: method and path), but for a request with
/// no token at all: anyone can send those, and they change nothing.
pub(crate) fn authorize(
    c: &Control,
    headers: &HeaderMap,
    need: Scope,
    what: &str,
    host: Option<&str>,
) -> Result<Caller, Box<Response>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let (kind, outcome, message, id, refusal) = match c.tokens.check(bearer, need) {
        Ok(caller) => (
            "AdminCall",
            "ok",
            format!("{what} by {}", caller.name),
            caller.id.clone(),
            Ok(caller),
        ),
        Err((TokenError::Missing, _)) => {
            return Err(Box::new(text(
                StatusCode::UNAUTHORIZED,
                TokenError::Missing.to_string(),
            )));
        }
        Err((e, id)) => {
            warn!("{what} refused: {e}");
            let code = if matches!(e, TokenError::Unknown) {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::FORBIDDEN
            };
            (
                "AdminDenied",
                "denied",
                format!("{what} refused: {e}"),
                // An unknown token is named by its id too: repeated guesses show as one.
                id.unwrap_or_else(|| token_id(bearer.unwrap_or_default())),
                Err(Box::new(text(code, e.to_string()))),
            )
        }
    };
    if let Some(j) = &c.journal {
        let mut e = EventRow::new(host, kind, message).outcome(outcome);
        e.token = Some(id);
        j.write(vec![Op::Event(e)], None);
    }
    refusal
}

pub(crate) async fn ask_status(c: &Control) -> Result<FleetStatus, Response> {
    let (reply, rx) = oneshot::channel();
    c.commands.send(Command::Status { reply }).map_err(|_| {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        )
    })?;
    rx.await.map_err(|_| {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        )
    })
}

async fn status(State(c): State<Control>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&c, &headers, Scope::Read, "GET /api/v1/status", None) {
        return *r;
    }
    match status_with_events(&c).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

/// The controller's status with the newest events: what `GET /api/v1/status` answers
/// and the console's stream sends.
pub(crate) async fn status_with_events(c: &Control) -> Result<FleetStatus, Response> {
    let mut s = ask_status(c).await?;
    let r = c.reader.clone();
    match tokio::task::spawn_blocking(move || r.recent_events(None, 20)).await {
        Ok(Ok(events)) => s.events = events,
        Ok(Err(e)) => return Err(text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => return Err(text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
    Ok(s)
}

async fn observed(State(c): State<Control>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&c, &headers, Scope::Read, "GET /api/v1/observed", None) {
        return *r;
    }
    let (reply, rx) = oneshot::channel();
    if c.commands.send(Command::Observed { reply }).is_err() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        );
    }
    match rx.await {
        Ok(o) => Json(o).into_response(),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        ),
    }
}

async fn host(
    State(c): State<Control>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let what = format!("GET /api/v1/hosts/{name}");
    if let Err(r) = authorize(&c, &headers, Scope::Read, &what, Some(&name)) {
        return *r;
    }
    let s = match ask_status(&c).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(h) = s.hosts.into_iter().find(|h| h.name == name) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("{name} is not in the fleet being served"),
        );
    };
    let r = c.reader.clone();
    let mac = h.mac;
    let found = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::state::StateError>((
            r.tasks(Some(&name), 50)?,
            r.recent_events(Some(&name), 100)?,
            r.inventory(false)?.into_iter().find(|i| i.mac == mac),
        ))
    })
    .await;
    match found {
        Ok(Ok((tasks, events, inventory))) => Json(serde_json::json!({
            "host": h,
            "tasks": tasks,
            "events": events,
            "inventory": inventory,
        }))
        .into_response(),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct HostsQuery {
    #[serde(default)]
    unknown: bool,
}

async fn hosts(
    State(c): State<Control>,
    headers: HeaderMap,
    Query(q): Query<HostsQuery>,
) -> Response {
    if let Err(r) = authorize(&c, &headers, Scope::Read, "GET /api/v1/hosts", None) {
        return *r;
    }
    if !q.unknown {
        return match ask_status(&c).await {
            Ok(s) => Json(s.hosts).into_response(),
            Err(r) => r,
        };
    }
    let r = c.reader.clone();
    match tokio::task::spawn_blocking(move || r.inventory(true)).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    host: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    500
}

async fn events(
    State(c): State<Control>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    if let Err(r) = authorize(&c, &headers, Scope::Read, "GET /api/v1/events", None) {
        return *r;
    }
    let stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if stream {
        let host = q.host.clone();
        let live = BroadcastStream::new(c.events.subscribe()).filter_map(move |e| {
            let e = e.ok()?;
            if host.as_ref().is_some_and(|h| e.host.as_ref() != Some(h)) {
                return None;
            }
            let data = serde_json::to_string(&e).ok()?;
            Some(Ok::<_, Infallible>(
                Event::default().event(e.kind.clone()).data(data),
            ))
        });
        return Sse::new(live)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let r = c.reader.clone();
    let limit = q.limit.min(10_000);
    match tokio::task::spawn_blocking(move || r.events(q.after, q.host.as_deref(), limit)).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn retry(
    State(c): State<Control>,
    headers: HeaderMap,
    UrlPath(host): UrlPath<String>,
) -> Response {
    let what = format!("POST /api/v1/retry/{host}");
    if let Err(r) = authorize(&c, &headers, Scope::Operate, &what, Some(&host)) {
        return *r;
    }
    let (reply, rx) = oneshot::channel();
    if c.commands.send(Command::Retry { host, reply }).is_err() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        );
    }
    match rx.await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(why)) => text(StatusCode::NOT_FOUND, why),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        ),
    }
}

async fn sync(State(c): State<Control>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&c, &headers, Scope::Operate, "POST /api/v1/sync", None) {
        return *r;
    }
    c.sync.notify_one();
    StatusCode::ACCEPTED.into_response()
}

async fn list_tokens(State(c): State<Control>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&c, &headers, Scope::Operate, "GET /api/v1/tokens", None) {
        return *r;
    }
    Json(c.tokens.list()).into_response()
}

#[derive(Deserialize)]
struct NewToken {
    name: String,
    scope: String,
}

async fn create_token(State(c): State<Control>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match authorize(&c, &headers, Scope::Operate, "POST /api/v1/tokens", None) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let req: NewToken = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"name\": ..., \"scope\": \"read\"|\"operate\"}}: {e}"),
            );
        }
    };
    match c.tokens.create(&req.name, &req.scope).await {
        Ok((token, row)) => {
            info!(id = %row.id, name = %row.name, scope = %row.scope, "admin token created");
            if let Some(j) = &c.journal {
                let mut e = EventRow::new(
                    None,
                    "AdminTokenCreated",
                    format!(
                        "token {} ({}, scope {}) created by {}",
                        row.id, row.name, row.scope, caller.name
                    ),
                )
                .outcome("ok");
                e.token = Some(row.id.clone());
                j.write(vec![Op::Event(e)], None);
            }
            (
                StatusCode::CREATED,
                Json(serde_json::json!({
                    "id": row.id, "name": row.name, "scope": row.scope, "token": token,
                })),
            )
                .into_response()
        }
        Err(e @ (TokenError::BadName | TokenError::BadScope)) => {
            text(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn revoke_token(
    State(c): State<Control>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let what = format!("DELETE /api/v1/tokens/{id}");
    let caller = match authorize(&c, &headers, Scope::Operate, &what, None) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    match c.tokens.revoke(&id).await {
        Ok(row) => {
            info!(id = %row.id, name = %row.name, "admin token revoked");
            if let Some(j) = &c.journal {
                let mut e = EventRow::new(
                    None,
                    "AdminTokenRevoked",
                    format!("token {} ({}) revoked by {}", row.id, row.name, caller.name),
                )
                .outcome("ok");
                e.token = Some(row.id.clone());
                j.write(vec![Op::Event(e)], None);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e @ TokenError::NoSuchToken(_)) => text(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn remove_image(
    State(c): State<Control>,
    headers: HeaderMap,
    UrlPath(spec): UrlPath<String>,
) -> Response {
    let what = format!("DELETE /api/v1/images/{spec}");
    let caller = match authorize(&c, &headers, Scope::Operate, &what, None) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let Some(store) = c.images.clone() else {
        return text(StatusCode::NOT_FOUND, "this server has no image store");
    };
    let (name, digest) = match spec.split_once('@') {
        Some((n, d)) => match d.parse::<crate::spec::Digest>() {
            Ok(d) => (n.to_string(), Some(d)),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{spec}: {e}")),
        },
        None => (spec.clone(), None),
    };
    let n2 = name.clone();
    let removed = tokio::task::spawn_blocking(move || store.remove(&n2, digest)).await;
    match removed {
        Ok(Ok(n)) => {
            info!(image = %spec, versions = n, by = %caller.name, "image versions removed");
            if let Some(j) = &c.journal {
                let mut e = EventRow::new(
                    None,
                    "ImageVersionRemoved",
                    format!("{spec}: {n} version(s) removed by {}", caller.name),
                )
                .outcome("removed");
                e.token = Some(caller.id.clone());
                j.write(vec![Op::Event(e)], None);
            }
            // Hosts that followed a removed version are planned again.
            let _ = c.commands.send(Command::ImagesChanged);
            Json(serde_json::json!({"image": name, "removed": n})).into_response()
        }
        Ok(Err(e @ crate::image::store::StoreError::UnknownImage(_))) => {
            text(StatusCode::NOT_FOUND, e.to_string())
        }
        Ok(Err(e)) => text(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Whether a webhook request proves the shared secret, in any of the three styles.
pub fn webhook_signed(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(t) = header("x-gitlab-token") {
        return same(t.as_bytes(), secret.as_bytes());
    }
    let hex = header("x-hub-signature-256")
        .and_then(|v| v.strip_prefix("sha256="))
        .or_else(|| header("x-gitea-signature"));
    let Some(hex) = hex else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    same(hex.to_ascii_lowercase().as_bytes(), want.as_bytes())
}

async fn hook(State(c): State<Control>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = &c.webhook_secret else {
        return text(
            StatusCode::FORBIDDEN,
            "this server takes no webhooks: start `serve` with --webhook-secret-file",
        );
    };
    if !webhook_signed(secret, &headers, &body) {
        warn!("webhook refused: its signature does not match the shared secret");
        return text(
            StatusCode::UNAUTHORIZED,
            "the signature does not match the shared secret",
        );
    }
    info!("webhook: fetching the fleet now");
    c.sync.notify_one();
    StatusCode::ACCEPTED.into_response()
}
