//! `fleetwave serve`: parses, checks what it can, binds the sockets the fleet's sites
//! need, and hands everything to [`crate::server::run`].

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::reconcile::follow;
use crate::server::{self, DhcpSetup, DhcpSocket, Listeners};
use crate::services::dhcp;
use crate::source::watch::Origin;
use crate::spec::DhcpMode;

#[derive(Debug, Clone)]
pub struct ServeArgs {
    pub origin: Origin,
    pub interval: Duration,
    /// Only these sites (all when empty).
    pub sites: Vec<String>,
    /// Holds `state.db` (leases, host status, tasks, events) and the git cache.
    pub state_dir: PathBuf,
    /// iPXE binaries, served by TFTP and under `/ipxe/` over HTTP.
    pub ipxe_dir: PathBuf,
    /// The agent's kernel and initrd, under `/files/`.
    pub files_dir: PathBuf,
    pub http_port: u16,
    pub tftp_port: u16,
    pub dhcp_port: u16,
    /// The image store; `None`: the first served site's `image_store`.
    pub image_store: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    pub webhook_secret_file: Option<PathBuf>,
    /// SSH and OpenPGP public keys whose commits are trusted.
    pub trusted_keys: Option<PathBuf>,
    /// Refuse commits not signed by a trusted key.
    pub require_signatures: bool,
    pub untrusted: follow::Untrusted,
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

/// A secret from a file: its first line, which must not be empty.
fn secret(path: &Option<PathBuf>, what: &str) -> Result<Option<String>> {
    let Some(p) = path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read the {what} file {}", p.display()))?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.len() < 16 {
        bail!(
            "{}: the {what} must be at least 16 characters on the first line",
            p.display()
        );
    }
    Ok(Some(line))
}

/// Check everything, bind every socket, then serve until `shutdown`.
pub async fn run(args: &ServeArgs, shutdown: CancellationToken) -> Result<u8> {
    let admin_token = secret(&args.admin_token_file, "admin token")?;
    let webhook_secret = secret(&args.webhook_secret_file, "webhook secret")?;
    // The first revision decides which sockets to bind: it must be valid to start.
    let cache = args.state_dir.join("source.git");
    let (origin, c) = (args.origin.clone(), cache.clone());
    if matches!(origin, Origin::Git { .. }) || args.trusted_keys.is_some() {
        std::fs::create_dir_all(&args.state_dir).with_context(|| {
            format!(
                "cannot create the state directory {}",
                args.state_dir.display()
            )
        })?;
    }
    let signatures = signatures(args)?;
    let rule = signatures.clone();
    let serving = applied_before(&args.state_dir);
    let first = tokio::task::spawn_blocking(move || {
        let mut rev = follow::read(&origin, &c, rule.as_deref().map(|r| &r.keys))?;
        follow::attach_fallback(&mut rev, &origin, &c, rule.as_deref(), serving.as_deref());
        Ok::<_, String>(rev)
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    // Sockets and DHCP settings come from a trusted commit only.
    let bind_from = if first.untrusted(signatures.as_deref())
        && signatures
            .as_ref()
            .is_some_and(|r| r.untrusted == follow::Untrusted::Nothing)
    {
        match &first.fallback {
            Some(fb) => fb.clone(),
            None => bail!(
                "{} (revision {}) is not trusted ({}) and no trusted commit was served before; \
                 push a commit signed by a key in --trusted-keys, or see docs/security.md",
                args.origin.describe(),
                first.id,
                first
                    .signature
                    .as_ref()
                    .map(|s| s.why.as_str())
                    .unwrap_or("unsigned")
            ),
        }
    } else {
        Arc::new(first.clone())
    };
    let spec = match &bind_from.fleet {
        Ok(spec) => spec.clone(),
        Err(problems) => {
            for p in problems {
                eprintln!("{p}");
            }
            bail!(
                "{} (revision {}) is invalid: fix it (`fleetwave validate`) before serving it",
                args.origin.describe(),
                bind_from.id
            );
        }
    };
    for s in &args.sites {
        if !spec.sites.contains_key(s) {
            bail!(
                "--site {s}: no such site in {}; sites: {}",
                args.origin.describe(),
                spec.sites.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut config = dhcp::Config::from_spec(&spec, &args.sites);
    config.http_port = args.http_port;
    info!(
        hosts = spec.hosts.len(),
        sites = config.sites.len(),
        revision = %bind_from.id,
        "fleet loaded"
    );
    let mut sockets = Vec::new();
    let mut seen_interfaces: Vec<&str> = Vec::new();
    for (i, site) in config.sites.iter().enumerate() {
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
        let socket = dhcp::bind(Some(&site.interface), addr)?;
        info!(site = %site.name, interface = %site.interface, mode = ?site.mode, "DHCP listening on {addr}");
        sockets.push(DhcpSocket {
            site: Some(i),
            proxy: false,
            socket,
        });
        if site.mode == DhcpMode::Proxy {
            let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::PXE_PORT);
            let socket = dhcp::bind(Some(&site.interface), addr)?;
            info!(site = %site.name, "proxyDHCP listening on {addr}");
            sockets.push(DhcpSocket {
                site: Some(i),
                proxy: true,
                socket,
            });
        }
    }
    if config.sites.iter().any(|s| s.relayed) {
        // Relayed requests may come in on any interface; requests that are not
        // relayed reach this socket too and are left to the site sockets.
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.dhcp_port);
        let socket = dhcp::bind(None, addr)?;
        info!("DHCP listening on {addr} for relayed requests");
        sockets.push(DhcpSocket {
            site: None,
            proxy: false,
            socket,
        });
    }
    let tftp_addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.tftp_port);
    let tftp = tokio::net::UdpSocket::bind(tftp_addr)
        .await
        .with_context(|| format!("cannot bind TFTP to {tftp_addr}"))?;
    info!(root = %args.ipxe_dir.display(), "TFTP listening on {tftp_addr}");
    let http_addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.http_port);
    let http = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot bind HTTP to {http_addr}"))?;
    let server_ip = config
        .sites
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
            config
                .sites
                .first()
                .and_then(|s| spec.sites.get(&s.name))
                .or_else(|| spec.sites.values().next())
                .map(|s| PathBuf::from(&s.image_store))
        })
        .unwrap_or_else(|| PathBuf::from("/images"));
    match crate::netboot::check_files_dir(&args.files_dir) {
        Ok(m) => info!(kernel = %m.kernel_version, "netboot build in {}", args.files_dir.display()),
        Err(why) => warn!("{why}"),
    }
    let sites = args.sites.clone();
    let listeners = Listeners {
        http,
        tftp: Some(tftp),
        dhcp: Some(DhcpSetup {
            config,
            sites,
            sockets,
        }),
    };
    let config = server::Config {
        origin: args.origin.clone(),
        interval: args.interval,
        state_dir: args.state_dir.clone(),
        ipxe_dir: args.ipxe_dir.clone(),
        files_dir: args.files_dir.clone(),
        image_store,
        base_url,
        admin_token,
        webhook_secret,
        policy: Default::default(),
        clock: Arc::new(crate::clock::SystemClock::default()),
        security: server::Security { signatures },
    };
    match server::run(config, listeners, Some(first), shutdown).await {
        Ok(()) => Ok(super::exit::OK),
        Err(e) => {
            error!("{e:#}");
            Ok(super::exit::ERROR)
        }
    }
}

/// The signature rule of `--trusted-keys` and `--require-signatures`.
fn signatures(args: &ServeArgs) -> Result<Option<Arc<follow::Signatures>>> {
    let Some(path) = &args.trusted_keys else {
        if args.require_signatures {
            bail!(
                "--require-signatures needs --trusted-keys FILE (the keys whose commits are trusted)"
            );
        }
        return Ok(None);
    };
    let keys = crate::source::signature::TrustedKeys::load(path, &args.state_dir)?;
    info!(
        required = args.require_signatures,
        "commit signatures checked against {}",
        keys.describe()
    );
    Ok(Some(Arc::new(follow::Signatures {
        keys,
        required: args.require_signatures,
        untrusted: args.untrusted,
    })))
}

/// The commit the server served before it stopped, from its state database.
fn applied_before(state_dir: &Path) -> Option<String> {
    let db = state_dir.join("state.db");
    if !db.exists() {
        return None;
    }
    let reader = crate::state::Reader::open(&db).ok()?;
    reader
        .meta("applied")
        .ok()
        .flatten()
        .and_then(|t| serde_json::from_str::<crate::protocol::CommitView>(&t).ok())
        .filter(|c| !c.restricted)
        .map(|c| c.id)
}

fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// `fleetwave serve`'s command line.
#[derive(Debug, clap::Args)]
pub struct ServeCli {
    /// The fleet's git repository (file://, https://, ssh:// or a path), followed on
    /// `--branch`; without it, `--fleet` is read from disk.
    #[arg(long)]
    pub source: Option<String>,
    /// The branch of --source to follow.
    #[arg(long, default_value = "main", requires = "source")]
    pub branch: String,
    /// The fleet file inside --source.
    #[arg(long, default_value = "fleet.yaml", requires = "source")]
    pub path: PathBuf,
    /// How often the source is read (a webhook or `fleetwave sync` reads it at once),
    /// e.g. 1m, 30s.
    #[arg(long, default_value = "1m", value_parser = parse_interval)]
    pub interval: Duration,
    /// The fleet file, or a directory holding fleet.yaml, read from disk (re-read every
    /// --interval) when there is no --source.
    #[arg(long, default_value = "fleet.yaml", conflicts_with = "source")]
    pub fleet: PathBuf,
    /// Serve only this site (repeatable); all sites by default.
    #[arg(long = "site")]
    pub sites: Vec<String>,
    /// Directory of the state database (leases, host status, tasks, events) and the
    /// git cache.
    #[arg(long, default_value = "/var/lib/fleetwave")]
    pub state_dir: PathBuf,
    /// iPXE binaries, served by TFTP (Debian's `ipxe` package puts them here).
    #[arg(long, default_value = "/usr/lib/ipxe")]
    pub ipxe_dir: PathBuf,
    /// The agent's kernel (vmlinuz) and initrd (initrd.img), served under /files/.
    #[arg(long, default_value = "/var/lib/fleetwave/netboot")]
    pub files_dir: PathBuf,
    /// The HTTP port (iPXE scripts, boot files, the agent and operator APIs).
    #[arg(long, default_value_t = 80)]
    pub http_port: u16,
    /// The TFTP port.
    #[arg(long, default_value_t = 69)]
    pub tftp_port: u16,
    /// The DHCP port.
    #[arg(long, default_value_t = 67)]
    pub dhcp_port: u16,
    /// The image store the agent API serves (default: the site's `image_store`).
    #[arg(long)]
    pub image_store: Option<PathBuf>,
    /// A file whose first line is the admin token (for retry and sync).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// A file whose first line is the webhook's shared secret.
    #[arg(long)]
    pub webhook_secret_file: Option<PathBuf>,
    /// SSH (allowed_signers lines) and OpenPGP (armored blocks) public keys whose
    /// commits are trusted; never read from the fleet repository (docs/security.md).
    #[arg(long)]
    pub trusted_keys: Option<PathBuf>,
    /// Serve only commits signed by a key of --trusted-keys.
    #[arg(long, requires = "trusted_keys")]
    pub require_signatures: bool,
    /// What an unsigned or untrusted commit may still do: nothing, or non-destructive
    /// work (inventory, verify); deploy, wipe and capture always need a trusted one.
    #[arg(
        long,
        value_enum,
        default_value = "nothing",
        requires = "require_signatures"
    )]
    pub untrusted: follow::Untrusted,
    /// Log filter (tracing's syntax), e.g. `debug` or `fleetwave=debug`.
    #[arg(long, env = "FLEETWAVE_LOG", default_value = "info")]
    pub log: String,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs = crate::spec::parse_duration(s)?;
    if secs == 0 {
        return Err("the interval must be at least 1s".into());
    }
    Ok(Duration::from_secs(secs))
}

impl ServeCli {
    pub fn args(&self) -> ServeArgs {
        let origin = match &self.source {
            Some(url) => Origin::Git {
                url: url.clone(),
                branch: self.branch.clone(),
                path: self.path.clone(),
            },
            None => Origin::Dir(self.fleet.clone()),
        };
        ServeArgs {
            origin,
            interval: self.interval,
            sites: self.sites.clone(),
            state_dir: self.state_dir.clone(),
            ipxe_dir: self.ipxe_dir.clone(),
            files_dir: self.files_dir.clone(),
            http_port: self.http_port,
            tftp_port: self.tftp_port,
            dhcp_port: self.dhcp_port,
            image_store: self.image_store.clone(),
            admin_token_file: self.admin_token_file.clone(),
            webhook_secret_file: self.webhook_secret_file.clone(),
            trusted_keys: self.trusted_keys.clone(),
            require_signatures: self.require_signatures,
            untrusted: self.untrusted,
        }
    }
}
