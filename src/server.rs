//! The composition root: one `run(config, listeners, shutdown)` that wires the state
//! database, the source follower, the controller and every service, so tests start a
//! whole server on port 0 and `fleetwave serve` only parses and binds.
//!
//! One tokio task per service (a DHCP task per socket, TFTP, HTTP), the source
//! follower and the controller; one shutdown token. The first task to fail stops the
//! others; the state writer commits what is queued before `run` returns.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::image::store::Store as ImageStore;
use crate::multicast::sessions::Sessions;
use crate::reconcile::error::RetryPolicy;
use crate::reconcile::follow::{self, Revision};
use crate::reconcile::{Controller, Inputs, Parts};
use crate::services::admin::Control;
use crate::services::api::Api;
use crate::services::http::{BootTable, HttpState};
use crate::services::{dhcp, http, tftp};
use crate::source::watch::Origin;

pub struct Config {
    pub origin: Origin,
    /// How often the origin is read (a webhook or `fleetwave sync` reads it at once).
    pub interval: Duration,
    /// Holds `state.db` and the git cache.
    pub state_dir: PathBuf,
    /// iPXE binaries, served by TFTP and under `/ipxe/` over HTTP.
    pub ipxe_dir: PathBuf,
    /// The netboot kernel and initrd, under `/files/`.
    pub files_dir: PathBuf,
    pub image_store: PathBuf,
    /// How clients reach the HTTP server when a request names no Host.
    pub base_url: String,
    pub admin_token: Option<String>,
    pub webhook_secret: Option<String>,
    pub policy: RetryPolicy,
    pub clock: Arc<dyn Clock>,
    /// Wakes the source follower at once: the webhook, `fleetwave sync` and SIGHUP
    /// notify it.
    pub sync: Arc<Notify>,
    /// Signatures, admin tokens, limits (docs/security.md).
    pub security: Security,
    /// The API over HTTPS too (needs `Listeners::https`); agents are sent there with
    /// the certificate's pin.
    pub tls: Option<crate::tls::ServerTls>,
}

/// Who may drive the server, and what it trusts (docs/security.md).
#[derive(Default, Clone)]
pub struct Security {
    /// Which commits are trusted; `None`: signatures are not checked.
    pub signatures: Option<Arc<follow::Signatures>>,
}

/// One DHCP socket and what it serves.
pub struct DhcpSocket {
    /// The site it listens for (`None`: relayed requests of any site).
    pub site: Option<usize>,
    /// The proxyDHCP port (4011) rather than 67.
    pub proxy: bool,
    pub socket: UdpSocket,
}

/// The DHCP server's configuration and its sockets.
pub struct DhcpSetup {
    pub config: dhcp::Config,
    /// The sites `serve` was limited to (all when empty).
    pub sites: Vec<String>,
    pub sockets: Vec<DhcpSocket>,
}

/// Sockets the caller bound (port 0 in tests).
pub struct Listeners {
    pub http: TcpListener,
    /// The HTTPS port, served when `Config::tls` is set.
    pub https: Option<TcpListener>,
    pub tftp: Option<tokio::net::UdpSocket>,
    pub dhcp: Option<DhcpSetup>,
}

/// Run until `shutdown`, starting from `first` (the revision the caller read to bind
/// its sockets; the follower takes over from there).
pub async fn run(
    config: Config,
    listeners: Listeners,
    first: Option<Revision>,
    shutdown: CancellationToken,
) -> Result<()> {
    let (tls, https) = match (config.tls.clone(), listeners.https) {
        (Some(t), Some(l)) => {
            let port = l.local_addr().context("the HTTPS socket")?.port();
            let https = http::Https { port, pin: t.pin };
            (
                Some(http::TlsListener {
                    listener: l,
                    config: t.config,
                }),
                Some(https),
            )
        }
        (None, None) => (None, None),
        (Some(_), None) => anyhow::bail!("TLS is configured but no HTTPS socket was bound"),
        (None, Some(_)) => anyhow::bail!("an HTTPS socket was bound but TLS has no certificate"),
    };
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            config.state_dir.display()
        )
    })?;
    let db = config.state_dir.join("state.db");
    let state = crate::state::Store::open(&db)?;
    let leases = state.leases()?;
    let tokens = state.tokens()?;
    let reader = Arc::new(crate::state::Reader::open(&db)?);
    let (tap, observed) = mpsc::unbounded_channel();
    let writer = state.into_writer_with_tap(Some(tap));

    let image_store = ImageStore::open(&config.image_store).with_context(|| {
        format!(
            "cannot open the image store {}",
            config.image_store.display()
        )
    })?;
    info!(store = %config.image_store.display(), "agent API serving the image store");
    let sessions = Arc::new(Sessions::new(config.image_store.clone(), shutdown.clone()));
    info!(tokens = tokens.len(), "task tokens still valid from before");
    let mut api = Api::new(image_store).with_state(writer.handle(), tokens);
    api.sessions = Some(sessions.clone());
    let api = Arc::new(api);

    let mut tasks = tokio::task::JoinSet::new();
    let mut dhcp_server = None;
    let mut dhcp_sites = Vec::new();
    if let Some(setup) = listeners.dhcp {
        let stats = Arc::new(dhcp::Stats::default());
        let server = Arc::new(Mutex::new(dhcp::Server::new(setup.config, leases, stats)));
        for s in setup.sockets {
            tasks.spawn(dhcp::run(
                server.clone(),
                s.socket,
                s.site,
                s.proxy,
                writer.handle(),
                shutdown.clone(),
            ));
        }
        dhcp_server = Some(server);
        dhcp_sites = setup.sites;
    }
    let (boot_tx, boot_rx) = watch::channel(Arc::new(BootTable::default()));
    let tftp_stats = Arc::new(tftp::Stats::default());
    if let Some(sock) = listeners.tftp {
        let mut tftp_config = tftp::Config::new(&config.ipxe_dir);
        tftp_config.generated = Some(http::secure_boot_files(
            config.files_dir.clone(),
            boot_rx.clone(),
            config.base_url.clone(),
            https,
            Some(api.clone()),
        ));
        tasks.spawn(tftp::run(
            sock,
            tftp_config,
            tftp_stats.clone(),
            shutdown.clone(),
        ));
    }

    let (events, _) = broadcast::channel(1024);
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let sync = config.sync.clone();
    let cache = config.state_dir.join("source.git");
    let (rev_tx, revisions) = watch::channel(first.map(Arc::new));
    // The commit served before a restart: what an untrusted head falls back to.
    let serving = reader
        .meta("applied")?
        .and_then(|t| serde_json::from_str::<crate::protocol::CommitView>(&t).ok())
        .filter(|c| !c.restricted)
        .map(|c| c.id);
    tasks.spawn({
        let (origin, interval, sync, shutdown) = (
            config.origin.clone(),
            config.interval,
            sync.clone(),
            shutdown.clone(),
        );
        let rule = config.security.signatures.clone();
        async move {
            follow::follow(
                origin, cache, interval, sync, rev_tx, rule, serving, shutdown,
            )
            .await;
            Ok::<(), std::io::Error>(())
        }
    });

    let controller = Controller::new(Parts {
        api: api.clone(),
        journal: writer.handle(),
        reader: reader.clone(),
        image_store: Arc::new(ImageStore::open(&config.image_store)?),
        sessions: sessions.clone(),
        boot: boot_tx,
        events: events.clone(),
        dhcp: dhcp_server.clone(),
        dhcp_sites,
        clock: config.clock.clone(),
        policy: config.policy,
        source: config.origin.describe(),
        signatures: config.security.signatures.clone(),
    })?;
    tasks.spawn({
        let shutdown = shutdown.clone();
        let inputs = Inputs {
            revisions,
            observed,
            commands,
        };
        async move {
            controller.run(inputs, shutdown).await;
            Ok::<(), std::io::Error>(())
        }
    });

    let admin_tokens = Arc::new(crate::services::tokens::AdminTokens::new(
        config.admin_token.as_deref(),
        reader.admin_tokens()?,
        Some(writer.handle()),
    ));
    let state = HttpState {
        table: boot_rx,
        base_url: config.base_url.clone(),
        ipxe_root: config.ipxe_dir.clone(),
        files_root: config.files_dir.clone(),
        dhcp: dhcp_server.clone(),
        tftp: Some(tftp_stats),
        api: Some(api),
        control: Some(Control {
            commands: commands_tx,
            sync,
            events,
            reader,
            tokens: admin_tokens,
            journal: Some(writer.handle()),
            images: ImageStore::open(&config.image_store).ok().map(Arc::new),
            webhook_secret: config.webhook_secret.clone(),
        }),
        state: Some(writer.stats()),
        https,
    };
    if let (Some(t), Some(c)) = (&tls, &config.tls) {
        match t.listener.local_addr() {
            Ok(a) => info!(
                certificate = %c.cert.display(),
                "HTTPS listening on {a}; certificate fingerprint {} (the agents' pin)",
                c.pin
            ),
            Err(e) => warn!("HTTPS listening (address unknown: {e})"),
        }
    }
    match listeners.http.local_addr() {
        Ok(a) if tls.is_some() => {
            info!("HTTP listening on {a} (boot files and scripts only; the API is on HTTPS)")
        }
        Ok(a) => info!("HTTP listening on {a}"),
        Err(e) => warn!("HTTP listening (address unknown: {e})"),
    }
    tasks.spawn(http::run_with_tls(
        listeners.http,
        tls,
        state,
        shutdown.clone(),
    ));

    let mut failed = None;
    while let Some(done) = tasks.join_next().await {
        let err = match done {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("task ended abnormally: {e}"),
        };
        error!("a service stopped: {err}");
        failed.get_or_insert(err);
        shutdown.cancel();
    }
    drop(dhcp_server);
    // Senders see the cancelled token, tell their receivers the session is over, and end.
    tokio::task::spawn_blocking(move || sessions.join()).await?;
    // Commit what is queued before returning.
    tokio::task::spawn_blocking(move || writer.close()).await?;
    info!("stopped");
    match failed {
        Some(e) => anyhow::bail!("a service stopped: {e}"),
        None => Ok(()),
    }
}
