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
use crate::tls::Pin;

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

/// The iPXE script for `mac` (see [`decide`]). The kernel and initrd come from
/// `base_url` (plain HTTP: what iPXE fetches); the agent is sent to the HTTPS side
/// with its pin when there is one.
pub fn script(
    table: &BootTable,
    mac: Mac,
    base_url: &str,
    https: Option<&Https>,
    api: Option<&Api>,
) -> Option<String> {
    let (comment, agent) = decide(table, mac, api)?;
    let mut s = String::from("#!ipxe\n");
    let _ = writeln!(s, "# fleetwave: {comment}");
    match agent {
        None => s.push_str(LOCAL_BOOT),
        Some(args) => {
            let cmdline = kernel_cmdline(base_url, https, mac, &args);
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
    https: Option<&Https>,
    api: Option<&Api>,
) -> Option<String> {
    let (comment, agent) = decide(table, mac, api)?;
    let mut s = String::from("set timeout=0\n");
    let _ = writeln!(s, "echo 'fleetwave: {}'", comment.replace('\'', ""));
    match agent {
        // Back to the firmware, which boots its next entry: the disk.
        None => s.push_str("exit\n"),
        Some(args) => {
            let cmdline = kernel_cmdline(base_url, https, mac, &args);
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
    https: Option<Https>,
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
            grub_config(&table, mac, &base_url, https.as_ref(), api.as_deref())
                .map(|s| tftp::Generated::Bytes(s.into_bytes()))
        }
    }))
}

/// The API's HTTPS side when TLS is on: where agents are sent, and the pin of the
/// certificate they must find there.
#[derive(Debug, Clone, Copy)]
pub struct Https {
    pub port: u16,
    pub pin: Pin,
}

/// The host of an authority (`HOST`, `HOST:PORT`, `[V6]:PORT`), without the port.
fn host_of(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(rest) => rest.find(']').map_or(authority, |i| &authority[..i + 2]),
        None => authority.split(':').next().unwrap_or(authority),
    }
}

/// The URL the agent is given: `base` itself, or the same host's HTTPS port.
pub fn agent_url(base: &str, https: Option<&Https>) -> String {
    match https {
        None => base.to_string(),
        Some(h) => {
            let authority = base
                .split_once("://")
                .map_or(base, |(_, rest)| rest)
                .trim_end_matches('/');
            format!("https://{}:{}", host_of(authority), h.port)
        }
    }
}

fn kernel_cmdline(base: &str, https: Option<&Https>, mac: Mac, args: &[(&str, String)]) -> String {
    let server = agent_url(base, https);
    let mut cmdline = format!(
        "initrd=initrd.img console=tty0 console=ttyS0,115200 fleetwave.server={server} fleetwave.mac={mac}"
    );
    if let Some(h) = https {
        let _ = write!(cmdline, " fleetwave.pin={}", h.pin);
    }
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
    /// TLS is on: agents are sent to this HTTPS port with the pin, and plain HTTP
    /// serves only what firmware and iPXE fetch ([`boot_router`]).
    pub https: Option<Https>,
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

/// What plain HTTP serves when TLS is on: what stock firmware and iPXE fetch (they
/// cannot pin a certificate) and `/health`. Anything else, the APIs, the console and
/// `/metrics`, which carry tokens, is refused with where to go instead: a token sent
/// in the clear by mistake should fail loudly, not work.
pub fn boot_router(state: HttpState) -> Router {
    let port = state.https.map(|h| h.port).unwrap_or(443);
    Router::new()
        .route("/boot/{file}", get(boot_script))
        .route("/ipxe/{*path}", get(ipxe_file))
        .route("/files/{*path}", get(boot_file))
        .route("/health", get(health))
        .fallback(move |uri: axum::http::Uri| async move {
            text(
                StatusCode::FORBIDDEN,
                format!(
                    "this server serves {uri} over HTTPS only (TLS is on): use https://SERVER:{port}{uri}\n"
                ),
            )
        })
        .with_state(state)
        .layer(axum::middleware::from_fn(super::metrics::count))
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

/// A TLS handshake must be done within this; a client that connects and sends
/// nothing (or trickles) is closed after it, like one that sends no request headers.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTPS side: its socket and the server's rustls configuration.
pub struct TlsListener {
    pub listener: TcpListener,
    pub config: Arc<rustls::ServerConfig>,
}

/// Serve on `listener` until `shutdown`; requests in flight finish first.
pub async fn run(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> io::Result<()> {
    run_with_tls(listener, None, state, shutdown).await
}

/// Bounds shared by the plain and the TLS listener: one client cannot hold more
/// connections by using both.
struct Limits {
    clients: Arc<super::PerClient>,
    total: Arc<tokio::sync::Semaphore>,
    connections: tokio_util::task::TaskTracker,
}

/// Serve plain HTTP on `listener` and, when `tls` is given, the whole router over
/// HTTPS on its listener (plain HTTP then keeps only [`boot_router`]), until
/// `shutdown`.
///
/// Accepts by hand (rather than `axum::serve`) to bound connections per client and in
/// all, and to time out slow or idle ones (and slow TLS handshakes): a machine that
/// opens thousands of connections and sends nothing cannot starve the others.
pub async fn run_with_tls(
    listener: TcpListener,
    tls: Option<TlsListener>,
    state: HttpState,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let limits = Arc::new(Limits {
        clients: super::PerClient::new(MAX_CONNECTIONS_PER_CLIENT),
        total: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        connections: tokio_util::task::TaskTracker::new(),
    });
    let plain_app = match &tls {
        Some(_) => boot_router(state.clone()),
        None => router(state.clone()),
    };
    let plain = accept(listener, plain_app, None, limits.clone(), shutdown.clone());
    let secure = async {
        if let Some(t) = tls {
            let acceptor = tokio_rustls::TlsAcceptor::from(t.config);
            accept(
                t.listener,
                router(state),
                Some(acceptor),
                limits.clone(),
                shutdown.clone(),
            )
            .await;
        }
    };
    tokio::join!(plain, secure);
    limits.connections.close();
    // Requests in flight get a moment to finish; an event stream never would.
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), limits.connections.wait()).await;
    Ok(())
}

/// Accept on `listener` until `shutdown`, each connection in its own task.
async fn accept(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;

    let scheme = if tls.is_some() { "HTTPS" } else { "HTTP" };
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors (EMFILE) and the like: wait for some to close
                    // rather than spin.
                    tracing::warn!("{scheme}: cannot accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = limits.clients.take(peer.ip()) else {
            tracing::debug!(%peer, "{scheme}: too many connections from this client; closed");
            continue;
        };
        let Ok(permit) = limits.total.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{scheme}: {MAX_CONNECTIONS} connections open; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        limits.connections.spawn(async move {
            let _held = (slot, permit);
            let Some(acceptor) = tls else {
                return serve_connection(TokioIo::new(stream), service, peer, shutdown).await;
            };
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake not done in {HANDSHAKE_TIMEOUT:?}; closed");
                        return;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            serve_connection(TokioIo::new(stream), service, peer, shutdown).await
        });
    }
}

/// HTTP/1.1 on one connection, with the header timeout and size bounds.
async fn serve_connection<I>(
    io: I,
    service: hyper_util::service::TowerToHyperService<Router>,
    peer: std::net::SocketAddr,
    shutdown: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192) * 4)
        .max_header_size(MAX_HEADER_BYTES);
    let conn = builder.serve_connection(io, service).with_upgrades();
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
    match script(&table, mac, &base, st.https.as_ref(), st.api.as_deref()) {
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
        assert_eq!(script(&table, mac, "http://10.0.0.1", None, None), None);
        table.register_sites.push("lab".into());
        let s = script(&table, mac, "http://10.0.0.1", None, None).expect("script");
        assert!(s.contains("fleetwave.task=register"), "{s}");
    }

    #[test]
    fn with_tls_the_agent_goes_to_the_https_port_with_the_pin_and_boot_files_stay_on_http() {
        let mac: Mac = "52:54:00:aa:bb:cc".parse().expect("mac");
        let mut table = BootTable::default();
        table.register_sites.push("lab".into());
        let https = Https {
            port: 8443,
            pin: Pin([7; 32]),
        };
        let pin = format!("fleetwave.pin=sha256:{}", "07".repeat(32));
        let s = script(&table, mac, "http://10.0.0.1:8080", Some(&https), None).expect("script");
        assert!(
            s.contains("kernel http://10.0.0.1:8080/files/vmlinuz "),
            "{s}"
        );
        assert!(
            s.contains("initrd http://10.0.0.1:8080/files/initrd.img"),
            "{s}"
        );
        assert!(
            s.contains(" fleetwave.server=https://10.0.0.1:8443 "),
            "{s}"
        );
        assert!(s.contains(&pin), "{s}");
        let g = grub_config(&table, mac, "http://10.0.0.1", Some(&https), None).expect("grub");
        assert!(
            g.contains(" fleetwave.server=https://10.0.0.1:8443 "),
            "{g}"
        );
        assert!(g.contains(&pin), "{g}");
        let plain = script(&table, mac, "http://10.0.0.1", None, None).expect("script");
        assert!(!plain.contains("fleetwave.pin="), "{plain}");
        assert_eq!(
            agent_url("http://[fd00::1]:80", Some(&https)),
            "https://[fd00::1]:8443"
        );
        assert_eq!(
            agent_url("http://fleet.example/", Some(&https)),
            "https://fleet.example:8443"
        );
    }
}
