//! The operator's web console, served by `serve` at `/console/`: one page of plain
//! HTML, CSS and JavaScript compiled into the binary (no bundler, no build step),
//! drawn from the same JSON as `fleetwave status`:
//!
//! - `GET /api/v1/status/stream`: `GET /api/v1/status` as server-sent events, a new
//!   snapshot whenever it changes, so the page moves without reloading.
//! - `GET /api/v1/images`: every image's versions (sizes, what they share).
//! - `GET /api/v1/multicast/sessions`: sessions sending now and the newest that ended.
//! - `POST /api/v1/wake/{host}`: a Wake-on-LAN packet now (scope operate).
//!
//! The page itself is open; what it reads needs a token of scope `read`, as
//! `GET /api/v1/status` does, and its actions (retry, sync, wake) one of scope
//! `operate` (docs/security.md). The page keeps the token in the browser tab.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::sync::oneshot;

use super::admin::{authorize, status_with_events};
use super::http::HttpState;
use super::tokens::Scope;
use crate::protocol::{Command, FleetStatus};
use crate::spec::Digest;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");

/// How often the stream looks for a change in the status.
const STREAM_EVERY: Duration = Duration::from_millis(500);

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(|| async { page(INDEX, "text/html") }))
        .route(
            "/console/app.js",
            get(|| async { page(SCRIPT, "text/javascript") }),
        )
        .route(
            "/console/style.css",
            get(|| async { page(STYLE, "text/css") }),
        )
        .route("/api/v1/status/stream", get(stream))
        .route("/api/v1/images", get(images))
        .route("/api/v1/multicast/sessions", get(sessions))
        .route("/api/v1/wake/{host}", post(wake))
}

fn page(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            // A new server version brings a new page: never a stale one.
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        body,
    )
        .into_response()
}

fn unavailable(why: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
}

/// The status with its newest events, as `GET /api/v1/status` answers.
async fn snapshot(st: &HttpState) -> Result<FleetStatus, Response> {
    let Some(c) = &st.control else {
        return Err(unavailable("this server runs no controller"));
    };
    status_with_events(c).await
}

/// Whether the request's token may read (a refusal to send back if not).
fn may_read(st: &HttpState, headers: &HeaderMap, what: &str) -> Result<(), Box<Response>> {
    let Some(c) = &st.control else {
        return Err(Box::new(unavailable("this server runs no controller")));
    };
    authorize(c, headers, Scope::Read, what, None).map(|_| ())
}

async fn stream(State(st): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(r) = may_read(&st, &headers, "GET /api/v1/status/stream") {
        return *r;
    }
    let snapshots = status_stream(st);
    Sse::new(snapshots)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A snapshot at once, then one each time the status changes; ends when the
/// controller stops.
fn status_stream(
    st: HttpState,
) -> impl tokio_stream::Stream<Item = Result<Event, Infallible>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let Ok(s) = snapshot(&st).await else {
                return;
            };
            let Ok(json) = serde_json::to_string(&s) else {
                return;
            };
            if json != last {
                if tx
                    .send(Ok(Event::default().event("status").data(json.clone())))
                    .await
                    .is_err()
                {
                    // The page went away.
                    return;
                }
                last = json;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(STREAM_EVERY) => {}
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[derive(Serialize)]
struct ImageView {
    name: String,
    versions: Vec<VersionView>,
}

#[derive(Serialize)]
struct VersionView {
    digest: Digest,
    generation: u64,
    captured_at: u64,
    disk_bytes: u64,
    /// Compressed bytes of its chunks.
    stored_bytes: u64,
    /// Compressed bytes of the chunks no older version of the image has: what this
    /// version added to the store.
    new_bytes: u64,
    chunks: usize,
    /// Who captured it: the task, the host, the commit and its signer.
    made_by: Option<crate::image::store::MadeBy>,
}

async fn images(State(st): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(r) = may_read(&st, &headers, "GET /api/v1/images") {
        return *r;
    }
    let Some(api) = st.api.clone() else {
        return unavailable("this server serves no image store");
    };
    let listed = tokio::task::spawn_blocking(move || {
        let store = &api.store;
        let mut out = Vec::new();
        for (name, record) in store.images()? {
            let mut seen: HashSet<Digest> = HashSet::new();
            let mut versions = Vec::new();
            for v in &record.versions {
                let chunks: Vec<Digest> = store
                    .manifest(&v.digest)
                    .map(|m| m.chunks.iter().map(|c| c.hash).collect())
                    .unwrap_or_default();
                let fresh: HashSet<Digest> = chunks
                    .iter()
                    .filter(|c| !seen.contains(*c))
                    .copied()
                    .collect();
                let new_bytes = store.stored_size(fresh.iter());
                seen.extend(chunks.iter().copied());
                versions.push(VersionView {
                    digest: v.digest,
                    generation: v.generation,
                    captured_at: v.captured_at,
                    disk_bytes: v.disk_bytes,
                    stored_bytes: v.stored_bytes,
                    new_bytes,
                    chunks: chunks.len(),
                    made_by: v.made_by.clone(),
                });
            }
            versions.reverse();
            out.push(ImageView { name, versions });
        }
        Ok::<_, crate::image::store::StoreError>(out)
    })
    .await;
    match listed {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

#[derive(Serialize)]
struct RunningView {
    id: String,
    group: String,
    digest: Digest,
    /// The sender's rate now, bits per second.
    rate_bps: f64,
}

async fn sessions(State(st): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(r) = may_read(&st, &headers, "GET /api/v1/multicast/sessions") {
        return *r;
    }
    let Some(s) = st.api.as_ref().and_then(|a| a.sessions.clone()) else {
        return Json(serde_json::json!({"running": [], "ended": []})).into_response();
    };
    let rates = &crate::metrics::get().multicast_rate;
    let running: Vec<RunningView> = s
        .running()
        .into_iter()
        .map(|r| RunningView {
            rate_bps: rates
                .get_or_create(&crate::metrics::GroupLabels {
                    group: r.group.to_string(),
                })
                .get(),
            id: r.id,
            group: r.group.to_string(),
            digest: r.digest,
        })
        .collect();
    Json(serde_json::json!({"running": running, "ended": s.ended()})).into_response()
}

async fn wake(
    State(st): State<HttpState>,
    headers: HeaderMap,
    UrlPath(host): UrlPath<String>,
) -> Response {
    let Some(c) = &st.control else {
        return unavailable("this server runs no controller");
    };
    if let Err(r) = authorize(c, &headers, Scope::Operate, "POST /api/v1/wake", None) {
        return *r;
    }
    let (reply, rx) = oneshot::channel();
    if c.commands.send(Command::Wake { host, reply }).is_err() {
        return unavailable("the controller is stopping");
    }
    match rx.await {
        Ok(Ok(msg)) => (StatusCode::ACCEPTED, format!("{msg}\n")).into_response(),
        Ok(Err(why)) => (StatusCode::CONFLICT, format!("{why}\n")).into_response(),
        Err(_) => unavailable("the controller is stopping"),
    }
}
