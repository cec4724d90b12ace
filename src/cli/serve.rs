//! `fleetwave serve`: every boot service of the fleet's sites in one process.
//!
//! One tokio task per service (a DHCP task per socket, TFTP, HTTP) and one shutdown
//! token; SIGINT or SIGTERM cancels it, each service finishes what it is doing, and
//! the state writer commits what is queued before the process exits.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::diag::Palette;
use crate::plan::{self, Params};
use crate::services::{dhcp, http, tftp};
use crate::source::DirTree;
use crate::spec::DhcpMode;
use crate::state::Store;

#[derive(Debug, Clone)]
pub struct ServeArgs {
    pub fleet: PathBuf,
    pub observed: Option<PathBuf>,
    /// Only these sites (all when empty).
    pub sites: Vec<String>,
    /// Holds `state.db` (leases, observations).
    pub state_dir: PathBuf,
    /// iPXE binaries, served by TFTP and under `/ipxe/` over HTTP.
    pub ipxe_dir: PathBuf,
    /// The agent's kernel and initrd, under `/files/`.
    pub files_dir: PathBuf,
    pub http_port: u16,
    pub tftp_port: u16,
    pub dhcp_port: u16,
    /// The image store the agent API serves; `None`: the first served site's
    /// `image_store`.
    pub image_store: Option<PathBuf>,
}

/// Run until SIGINT/SIGTERM. Exit code as for other commands.
pub fn serve(args: &ServeArgs) -> Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(stop_on_signal(shutdown.clone()));
        let result = run(args, shutdown.clone()).await;
        signals.abort();
        result
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; stop the server with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}

/// Start every service and wait until `shutdown`.
pub async fn run(args: &ServeArgs, shutdown: CancellationToken) -> Result<u8> {
    let entry = super::entry_file(&args.fleet);
    let (spec, _sources) = match super::load(&DirTree, &entry)? {
        Ok(x) => x,
        Err(invalid) => {
            let mut err = std::io::stderr();
            super::print_problems(&mut err, &invalid, super::Format::Text, Palette::PLAIN)?;
            bail!(
                "{} is invalid: fix it (`fleetwave validate`) before serving it",
                entry.display()
            );
        }
    };
    for s in &args.sites {
        if !spec.sites.contains_key(s) {
            bail!(
                "--site {s}: no such site in {}; sites: {}",
                entry.display(),
                spec.sites.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let observed = super::read_observed(args.observed.as_deref())?;
    let plan = plan::diff(&spec, &observed, &Params::default());

    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create state directory {}", args.state_dir.display()))?;
    let store = Store::open(&args.state_dir.join("state.db"))?;
    let rows = store.leases()?;
    let tokens = store.tokens()?;
    let writer = store.into_writer();

    let mut config = dhcp::Config::from_spec(&spec, &args.sites);
    config.http_port = args.http_port;
    let stats = Arc::new(dhcp::Stats::default());
    info!(
        leases = rows.len(),
        hosts = spec.hosts.len(),
        sites = config.sites.len(),
        "fleet loaded"
    );
    let sites = config.sites.clone();
    let server = Arc::new(Mutex::new(dhcp::Server::new(config, rows, stats)));

    let mut tasks = tokio::task::JoinSet::new();
    let mut seen_interfaces: Vec<&str> = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        if site.relayed {
            info!(site = %site.name, "served through DHCP relays");
            continue;
        }
        if !interface_exists(&site.interface) {
            bail!(
                "site {}: interface {} does not exist on this machine; fix `interface`, \
                 set `relayed: true` if its clients come through a DHCP relay, or leave \
                 the site to another server (--site)",
                site.name,
                site.interface
            );
        }
        if seen_interfaces.contains(&site.interface.as_str()) {
            warn!(site = %site.name, interface = %site.interface,
                "another site already serves this interface; this one is reached only through relays");
            continue;
        }
        seen_interfaces.push(&site.interface);
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.dhcp_port);
        let sock = dhcp::bind(Some(&site.interface), addr)?;
        info!(site = %site.name, interface = %site.interface, mode = ?site.mode, "DHCP listening on {addr}");
        tasks.spawn(dhcp::run(
            server.clone(),
            sock,
            Some(i),
            false,
            writer.handle(),
            shutdown.clone(),
        ));
        if site.mode == DhcpMode::Proxy {
            let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::PXE_PORT);
            let sock = dhcp::bind(Some(&site.interface), addr)?;
            info!(site = %site.name, "proxyDHCP listening on {addr}");
            tasks.spawn(dhcp::run(
                server.clone(),
                sock,
                Some(i),
                true,
                writer.handle(),
                shutdown.clone(),
            ));
        }
    }
    if sites.iter().any(|s| s.relayed) {
        // Relayed requests may come in on any interface; requests that are not
        // relayed reach this socket too and are left to the site sockets.
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.dhcp_port);
        let sock = dhcp::bind(None, addr)?;
        info!("DHCP listening on {addr} for relayed requests");
        tasks.spawn(dhcp::run(
            server.clone(),
            sock,
            None,
            false,
            writer.handle(),
            shutdown.clone(),
        ));
    }

    let tftp_stats = Arc::new(tftp::Stats::default());
    let tftp_addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.tftp_port);
    let tftp_sock = tokio::net::UdpSocket::bind(tftp_addr)
        .await
        .with_context(|| format!("cannot bind TFTP to {tftp_addr}"))?;
    info!(root = %args.ipxe_dir.display(), "TFTP listening on {tftp_addr}");
    tasks.spawn(tftp::run(
        tftp_sock,
        tftp::Config::new(&args.ipxe_dir),
        tftp_stats.clone(),
        shutdown.clone(),
    ));

    let http_addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.http_port);
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot bind HTTP to {http_addr}"))?;
    let server_ip = sites
        .first()
        .map(|s| s.server)
        .or_else(|| spec.sites.values().next().map(|s| s.server))
        .unwrap_or(Ipv4Addr::LOCALHOST);
    let base_url = dhcp::pxe::HttpServer {
        address: server_ip,
        port: args.http_port,
    }
    .base();
    let image_store = args
        .image_store
        .clone()
        .or_else(|| {
            sites
                .first()
                .and_then(|s| spec.sites.get(&s.name))
                .or_else(|| spec.sites.values().next())
                .map(|s| PathBuf::from(&s.image_store))
        })
        .unwrap_or_else(|| PathBuf::from("/images"));
    let store = crate::image::store::Store::open(&image_store)?;
    info!(store = %image_store.display(), "agent API serving the image store");
    let sessions = Arc::new(crate::multicast::sessions::Sessions::from_plan(
        &spec,
        &plan,
        image_store.clone(),
        shutdown.clone(),
    ));
    info!(tokens = tokens.len(), "task tokens still valid from before");
    let mut api = crate::services::api::Api::new(store).with_state(writer.handle(), tokens);
    api.sessions = Some(sessions.clone());
    let state = http::HttpState {
        table: Arc::new(http::BootTable::from_plan(&spec, &plan)),
        base_url,
        ipxe_root: args.ipxe_dir.clone(),
        files_root: args.files_dir.clone(),
        dhcp: Some(server.clone()),
        tftp: Some(tftp_stats),
        api: Some(Arc::new(api)),
    };
    info!("HTTP listening on {http_addr}");
    tasks.spawn(http::run(listener, state, shutdown.clone()));

    // The first service to fail stops the others.
    let mut failed = false;
    while let Some(done) = tasks.join_next().await {
        let err = match done {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("task ended abnormally: {e}"),
        };
        error!("a service stopped: {err}");
        failed = true;
        shutdown.cancel();
    }
    drop(server);
    // Senders see the cancelled token, tell their receivers the session is over, and end.
    tokio::task::spawn_blocking(move || sessions.join()).await?;
    // Commit what is queued before exiting.
    tokio::task::spawn_blocking(move || writer.close()).await?;
    info!("stopped");
    Ok(if failed {
        super::exit::ERROR
    } else {
        super::exit::OK
    })
}

fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}
