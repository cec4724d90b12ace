//! The HTTP server: per-host iPXE scripts, boot files, and a health endpoint.
//!
//! - `GET /boot/{mac}.ipxe`: what the host boots now, derived from the plan: its local
//!   disk when nothing is due, the imaging agent with its task when something is, the
//!   agent in registration mode for a machine the fleet does not know.
//! - `GET /ipxe/{path}`: iPXE binaries (UEFI HTTP boot); `GET /files/{path}`: the
//!   agent's kernel and initrd. Read-only, confined to their roots.
//! - `GET /health`: counters of every service, as JSON; `GET /metrics`: the same and
//!   the fleet's gauges for Prometheus (`services::metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rustc_hash::FxHashMap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::protocol::BootInstruction;
use crate::services::api::Api;
use crate::services::dhcp;
use crate::services::tftp;
use crate::spec::Mac;

/// Every known host's boot instruction, by MAC, as the controller last published it.
#[derive(Debug, Clone, Default)]
pub struct BootTable {
    pub hosts: FxHashMap<Mac, BootInstruction>,
    /// Sites whose unknown machines are registered, for the register script.
    pub register_sites: Vec<String>,
}

/// The boot table as the controller publishes it: services read the newest one.
pub type BootFeed = tokio::sync::watch::Receiver<Arc<BootTable>>;

/// What `mac` boots now: a comment for the script, and the agent's kernel arguments
/// (`None`: its local disk). `None` when the MAC is unknown and no site registers
/// unknown machines. An armed task carries its token; an unknown machine gets a
/// registration token from `api` (one that can only post inventory).
/// The agent's `fleetwave.*` kernel arguments, by name.
type AgentArgs = Vec<(&'static str, String)>;

fn decide(table: &BootTable, mac: Mac, api: Option<&Api>) -> Option<(String, Option<AgentArgs>)> {
    match table.hosts.get(&mac) {
        Some(BootInstruction::LocalDisk { host, why }) => {
            Some((format!("{host}: {why}; booting the local disk"), None))
        }
        Some(BootInstruction::Agent {
            host,
            site,
            token,
            task,
            summary,
        }) => Some((
            format!("{host}: {summary}"),
            Some(vec![
                ("host", host.clone()),
                ("site", site.clone()),
                ("task", task.kind().to_string()),
                ("token", token.clone()),
            ]),
        )),
        None if !table.register_sites.is_empty() => {
            let mut args = vec![("task", "register".to_string())];
            if let Some(t) = api.and_then(|a| a.register_token(mac)) {
                args.push(("token", t));
            }
            Some((
                format!("unknown machine {mac}: registering its inventory"),
                Some(args),
            ))
        }
        None => None,
    }
}

/// The iPXE script for `mac` (see [`decide`]).
pub fn script(table: &BootTable, mac: Mac, base_url: &str, api: Option<&Api>) -> Option<String> {
    let (comment, agent) = decide(table, mac, api)?;
    let mut s = String::from("#!ipxe\n");
    let _ = writeln!(s, "# fleetwave: {comment}");
    match agent {
        None => s.push_str(LOCAL_BOOT),
        Some(args) => {
            let cmdline = kernel_cmdline(base_url, mac, &args);
            let _ = writeln!(
                s,
                "kernel {base_url}/files/vmlinuz {cmdline} || goto failed"
            );
            let _ = writeln!(s, "initrd {base_url}/files/initrd.img || goto failed");
            s.push_str("boot || goto failed\n:failed\necho fleetwave: the agent did not boot; retrying in 30 s\nsleep 30\nreboot\n");
        }
    }
    Some(s)
}

/// The GRUB configuration for `mac`, what Secure Boot machines run after Debian's
/// signed shim and GRUB: the same decision and token as its iPXE script. The kernel
/// and initrd come by TFTP from the same server (GRUB's root is `(tftp,SERVER)`);
/// shim verifies the kernel's signature, not the initrd's.
pub fn grub_config(
    table: &BootTable,
    mac: Mac,
    base_url: &str,
    api: Option<&Api>,
) -> Option<String> {
    let (comment, agent) = decide(table, mac, api)?;
    let mut s = String::from("set timeout=0\n");
    let _ = writeln!(s, "echo 'fleetwave: {}'", comment.replace('\'', ""));
    match agent {
        // Back to the firmware, which boots its next entry: the disk.
        None => s.push_str("exit\n"),
        Some(args) => {
            let cmdline = kernel_cmdline(base_url, mac, &args);
            let _ = writeln!(s, "linux /vmlinuz {cmdline}");
            s.push_str("initrd /initrd.img\nboot\n");
            s.push_str(
                "echo 'fleetwave: the agent did not boot; retrying in 30 s'\nsleep 30\nreboot\n",
            );
        }
    }
    Some(s)
}

/// BIOS boots the first disk; UEFI returns to the firmware's next boot entry.
const LOCAL_BOOT: &str = "iseq ${platform} efi && goto efi ||
sanboot --no-describe --drive 0x80 || goto failed
:efi
exit
:failed
echo fleetwave: the local disk did not boot
sleep 10
exit
";

/// What TFTP serves Secure Boot machines beside the root: the signed shim and GRUB
/// from the netboot build, GRUB's first configuration (which chains to the host's
/// own by the MAC GRUB booted from), each host's configuration, and the kernel and
/// initrd it names.
pub fn secure_boot_files(
    files_root: PathBuf,
    table: BootFeed,
    base_url: String,
    api: Option<Arc<Api>>,
) -> tftp::Generator {
    let existing = |p: PathBuf| p.is_file().then_some(tftp::Generated::File(p));
    tftp::Generator(Arc::new(move |name: &str| match name {
        "shimx64.efi" | "grubx64.efi" => {
            existing(files_root.join(crate::netboot::SECURE_BOOT_DIR).join(name))
        }
        "vmlinuz" | "initrd.img" => existing(files_root.join(name)),
        "grub/grub.cfg" => Some(tftp::Generated::Bytes(
            b"set timeout=0\nconfigfile /grub/${net_default_mac}.cfg\n".to_vec(),
        )),
        _ => {
            let mac: Mac = name
                .strip_prefix("grub/")?
                .strip_suffix(".cfg")?
                .parse()
                .ok()?;
            let table = table.borrow().clone();
            grub_config(&table, mac, &base_url, api.as_deref())
                .map(|s| tftp::Generated::Bytes(s.into_bytes()))
        }
    }))
}

fn kernel_cmdline(base: &str, mac: Mac, args: &[(&str, String)]) -> String {
    let mut cmdline = format!(
        "initrd=initrd.img console=tty0 console=ttyS0,115200 fleetwave.server={base} fleetwave.mac={mac}"
    );
    for (k, v) in args {
        let _ = write!(cmdline, " fleetwave.{k}={v}");
    }
    cmdline
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub table: BootFeed,
    /// How clients reach this server when a request names no Host.
    pub base_url: String,
    pub ipxe_root: PathBuf,
    pub files_root: PathBuf,
    pub dhcp: Option<Arc<Mutex<dhcp::Server>>>,
    pub tftp: Option<Arc<tftp::Stats>>,
    /// The agent API and its image store.
    pub api: Option<Arc<Api>>,
    /// The operator's API (status, events, retry, sync, webhook).
    pub control: Option<super::admin::Control>,
    /// The state database's writes, for `/health`.
    pub state: Option<Arc<crate::state::WriterStats>>,
}

pub fn router(state: HttpState) -> Router {
    let api = state.api.clone();
    let control = state.control.clone();
    let mut r = Router::new()
        .route("/boot/{file}", get(boot_script))
        .route("/ipxe/{*path}", get(ipxe_file))
        .route("/files/{*path}", get(boot_file))
        .route("/health", get(health))
        .route("/metrics", get(super::metrics::scrape))
        .merge(super::console::routes())
        .with_state(state);
    if let Some(api) = api {
        r = r.merge(super::api::routes(api));
    }
    if let Some(c) = control {
        r = r.merge(super::admin::routes(c));
    }
    r.layer(axum::middleware::from_fn(super::metrics::count))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
}

/// Connections one client address may hold open at once. iPXE and an agent use one
/// or two; a room behind one NAT address stays far below it.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 64;
/// Connections in all; beyond it new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// A request's headers must arrive within this, and an idle kept-alive connection is
/// closed after it (hyper's header timer runs while it waits for the next request).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// The largest request head (start line and headers).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Serve on `listener` until `shutdown`; requests in flight finish first.
///
/// Accepts by hand (rather than `axum::serve`) to bound connections per client and in
/// all, and to time out slow or idle ones: a machine that opens thousands of
/// connections and sends nothing cannot starve the others.
pub async fn run(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let app = router(state);
    let clients = super::PerClient::new(MAX_CONNECTIONS_PER_CLIENT);
    let total = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors (EMFILE) and the like: wait for some to close
                    // rather than spin.
                    tracing::warn!("HTTP: cannot accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = clients.take(peer.ip()) else {
            tracing::debug!(%peer, "HTTP: too many connections from this client; closed");
            continue;
        };
        let Ok(permit) = total.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "HTTP: {MAX_CONNECTIONS} connections open; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _held = (slot, permit);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES.max(8192) * 4)
                .max_header_size(MAX_HEADER_BYTES);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
        });
    }
    connections.close();
    // Requests in flight get a moment to finish; an event stream never would.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), connections.wait()).await;
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn boot_script(
    State(st): State<HttpState>,
    headers: HeaderMap,
    UrlPath(file): UrlPath<String>,
) -> Response {
    let Some(mac) = file.strip_suffix(".ipxe") else {
        return text(
            StatusCode::NOT_FOUND,
            "scripts are named /boot/MAC.ipxe\n".into(),
        );
    };
    let Ok(mac) = mac.replace('-', ":").parse::<Mac>() else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{mac:?} is not a MAC address; ask for /boot/52:54:00:28:00:11.ipxe\n"),
        );
    };
    // The address the client used reaches this server from its site.
    let base = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".:-[]".contains(&b))
        })
        .map(|h| format!("http://{h}"))
        .unwrap_or_else(|| st.base_url.clone());
    let table = st.table.borrow().clone();
    match script(&table, mac, &base, st.api.as_deref()) {
        Some(s) => text(StatusCode::OK, s),
        None => text(
            StatusCode::NOT_FOUND,
            format!(
                "#!ipxe\necho fleetwave: {mac} is not in the fleet and no site registers unknown machines\nexit\n"
            ),
        ),
    }
}

async fn ipxe_file(State(st): State<HttpState>, UrlPath(path): UrlPath<String>) -> Response {
    serve_file(st.ipxe_root.clone(), path).await
}

async fn boot_file(State(st): State<HttpState>, UrlPath(path): UrlPath<String>) -> Response {
    serve_file(st.files_root.clone(), path).await
}

/// Stream a file from `root`, refusing anything that leads out of it.
async fn serve_file(root: PathBuf, path: String) -> Response {
    let found = tokio::task::spawn_blocking(move || {
        let root = root.canonicalize().map_err(|_| "file not found")?;
        super::confine(&root, &path)
    })
    .await
    .unwrap_or(Err("file not found"));
    let real = match found {
        Ok(p) => p,
        Err(why @ "file not found") => return text(StatusCode::NOT_FOUND, format!("{why}\n")),
        Err(why) => return text(StatusCode::FORBIDDEN, format!("{why}\n")),
    };
    let file = match tokio::fs::File::open(&real).await {
        Ok(f) => f,
        Err(e) => return text(StatusCode::NOT_FOUND, format!("{e}\n")),
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        256 * 1024,
    ));
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response()
}

async fn health(State(st): State<HttpState>) -> Response {
    let mut doc = BTreeMap::new();
    doc.insert("status", serde_json::json!("ok"));
    let table = st.table.borrow().clone();
    doc.insert("hosts", serde_json::json!(table.hosts.len()));
    let due = table
        .hosts
        .values()
        .filter(|b| matches!(b, BootInstruction::Agent { .. }))
        .count();
    doc.insert("hosts_due", serde_json::json!(due));
    if let Some(d) = &st.dhcp {
        let (bound, stats) = dhcp::summary(d);
        doc.insert(
            "dhcp",
            serde_json::json!({"bound_leases": bound, "counters": &*stats}),
        );
    }
    if let Some(t) = &st.tftp {
        doc.insert("tftp", serde_json::json!(&**t));
    }
    if let Some(w) = &st.state {
        doc.insert("state_database", serde_json::json!(&**w));
    }
    if let Some(a) = &st.api {
        doc.insert("agent_tasks", serde_json::json!(a.tasks()));
        if let Some(s) = &a.sessions {
            doc.insert("multicast_sessions", serde_json::json!(s.running()));
        }
    }
    let body = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into());
    ([(header::CONTENT_TYPE, "application/json")], body + "\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_machine_is_registered_only_where_a_site_asks_for_it() {
        let mac: Mac = "52:54:00:aa:bb:cc".parse().expect("mac");
        let mut table = BootTable::default();
        assert_eq!(script(&table, mac, "http://10.0.0.1", None), None);
        table.register_sites.push("lab".into());
        let s = script(&table, mac, "http://10.0.0.1", None).expect("script");
        assert!(s.contains("fleetwave.task=register"), "{s}");
    }
}
