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

use super::server_config::{self, LogFormat, ServerConfig};

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
    /// Where HTTP and TFTP listen (DHCP listens on each site's interface).
    pub listen_address: Ipv4Addr,
    /// The image store; `None`: the first served site's `image_store`.
    pub image_store: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    pub webhook_secret_file: Option<PathBuf>,
    /// SSH and OpenPGP public keys whose commits are trusted.
    pub trusted_keys: Option<PathBuf>,
    /// Refuse commits not signed by a trusted key.
    pub require_signatures: bool,
    pub untrusted: follow::Untrusted,
    /// The API over HTTPS too, with this certificate and key (PEM).
    pub tls: Option<TlsFiles>,
    /// The HTTPS port, when `tls` is set.
    pub https_port: u16,
}

/// The server's certificate (chain) and private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Reads the configuration again (the file and the flags), for SIGHUP.
pub type Reread<'a> = &'a (dyn Fn() -> Result<ServeArgs> + Sync);

/// Run until SIGINT/SIGTERM. Exit code as for other commands.
pub fn serve(args: &ServeArgs, reread: Reread) -> Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let sync = Arc::new(tokio::sync::Notify::new());
        // The signal handler never ends: after SIGTERM the server finishes what it
        // has queued, and `run` returns.
        tokio::select! {
            r = run(args, sync.clone(), shutdown.clone()) => r,
            never = on_signals(args, reread, &sync, &shutdown) => match never {},
        }
    })
}

/// SIGTERM and SIGINT stop the server. SIGHUP (systemd's reload) reads the fleet's
/// source at once and the configuration again: the source is followed anew; what
/// only a restart changes (ports, directories, the source's address) is named.
async fn on_signals(
    running: &ServeArgs,
    reread: Reread<'_>,
    sync: &tokio::sync::Notify,
    shutdown: &CancellationToken,
) -> std::convert::Infallible {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    // The certificate as it was read at start: a new one in the same file (a renewal)
    // is told apart by its fingerprint.
    let pin_of = |a: &ServeArgs| {
        a.tls
            .as_ref()
            .and_then(|t| crate::tls::fingerprint(&t.cert).ok())
    };
    let started_with = pin_of(running);
    loop {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
            _ = hup.recv() => {
                match reread() {
                    Ok(new) => {
                        let mut changed = restart_needed(running, &new);
                        if pin_of(&new) != started_with && !changed.contains(&"tls") {
                            changed.push("tls certificate (its fingerprint)");
                        }
                        if changed.is_empty() {
                            info!("SIGHUP: configuration unchanged; reading the fleet's source now");
                        } else {
                            warn!("SIGHUP: {} changed; that takes a restart (systemctl restart fleetwave); reading the fleet's source now",
                                changed.join(", "));
                        }
                    }
                    Err(e) => error!("SIGHUP: the configuration is not valid, the running one stays: {e:#}"),
                }
                sync.notify_one();
                continue;
            }
        }
        shutdown.cancel();
        return std::future::pending().await;
    }
}

/// The settings that differ between `a` and `b`.
fn restart_needed(a: &ServeArgs, b: &ServeArgs) -> Vec<&'static str> {
    let d = |x: &dyn std::fmt::Debug, y: &dyn std::fmt::Debug| format!("{x:?}") != format!("{y:?}");
    let mut out = Vec::new();
    for (name, differs) in [
        ("source", d(&a.origin, &b.origin)),
        ("interval", a.interval != b.interval),
        ("sites", a.sites != b.sites),
        ("state_dir", a.state_dir != b.state_dir),
        ("ipxe_dir", a.ipxe_dir != b.ipxe_dir),
        ("files_dir", a.files_dir != b.files_dir),
        (
            "listen",
            (a.http_port, a.tftp_port, a.dhcp_port, a.listen_address)
                != (b.http_port, b.tftp_port, b.dhcp_port, b.listen_address),
        ),
        ("image_store", a.image_store != b.image_store),
        ("admin_token_file", a.admin_token_file != b.admin_token_file),
        (
            "webhook_secret_file",
            a.webhook_secret_file != b.webhook_secret_file,
        ),
        ("trusted_keys", a.trusted_keys != b.trusted_keys),
        // A restart, not a reload: the pin is handed to agents when they boot, so a new
        // certificate is a deliberate, visible event (docs/security.md).
        ("tls", (&a.tls, a.https_port) != (&b.tls, b.https_port)),
        (
            "require_signatures",
            (a.require_signatures, a.untrusted) != (b.require_signatures, b.untrusted),
        ),
    ] {
        if differs {
            out.push(name);
        }
    }
    out
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
pub async fn run(
    args: &ServeArgs,
    sync: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) -> Result<u8> {
    // Checked before anything is created or bound: a bad certificate names its file.
    let tls = match &args.tls {
        Some(t) => Some(crate::tls::load_server(&t.cert, &t.key)?),
        None => None,
    };
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
    let tftp_addr = SocketAddrV4::new(args.listen_address, args.tftp_port);
    let tftp = tokio::net::UdpSocket::bind(tftp_addr)
        .await
        .with_context(|| format!("cannot bind TFTP to {tftp_addr}"))?;
    info!(root = %args.ipxe_dir.display(), "TFTP listening on {tftp_addr}");
    let http_addr = SocketAddrV4::new(args.listen_address, args.http_port);
    let http = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot bind HTTP to {http_addr}"))?;
    let https = match &tls {
        Some(_) => {
            let addr = SocketAddrV4::new(args.listen_address, args.https_port);
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot bind HTTPS to {addr}"))?,
            )
        }
        None => None,
    };
    // iPXE waits for IPv6 unless told there is nothing to configure (ipv6_ra).
    let _ra = RaResponders::start(
        spec.sites
            .iter()
            .filter(|(name, s)| {
                s.ipv6_ra
                    && !s.relayed
                    && (args.sites.is_empty() || args.sites.contains(name))
                    && interface_exists(&s.interface)
            })
            .map(|(_, s)| s.interface.clone()),
    );
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
        https,
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
        sync,
        security: server::Security { signatures },
        tls,
    };
    match server::run(config, listeners, Some(first), shutdown).await {
        Ok(()) => Ok(super::exit::OK),
        Err(e) => {
            error!("{e:#}");
            Ok(super::exit::ERROR)
        }
    }
}

/// One thread per interface answering router solicitations; stopped on drop.
struct RaResponders {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RaResponders {
    fn start(interfaces: impl Iterator<Item = String>) -> RaResponders {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut seen = Vec::new();
        let mut threads = Vec::new();
        for interface in interfaces {
            if seen.contains(&interface) {
                continue;
            }
            seen.push(interface.clone());
            let stop = stop.clone();
            let name = interface.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ra {interface}"))
                .spawn(move || {
                    info!(%interface, "answering IPv6 router solicitations: no router, nothing to configure");
                    if let Err(e) = crate::netboot::ra::serve(&interface, &stop) {
                        // Not fatal: iPXE then waits for IPv6 before it boots.
                        warn!(%interface, "no IPv6 router advertisements ({e}); iPXE will wait about 11 s for IPv6 on each boot");
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    warn!(interface = %name, "cannot start the router advertisement thread: {e}")
                }
            }
        }
        RaResponders { stop, threads }
    }
}

impl Drop for RaResponders {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
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

/// `fleetwave serve`'s command line. Every option may instead come from the server's
/// configuration file (`--config`); a flag given here overrides it.
#[derive(Debug, clap::Args)]
pub struct ServeCli {
    /// The server's configuration file (docs/install.md), e.g. /etc/fleetwave/server.yaml.
    #[arg(long, env = "FLEETWAVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The fleet's git repository (file://, https://, ssh:// or a path), followed on
    /// `--branch`; without it, `--fleet` is read from disk.
    #[arg(long)]
    pub source: Option<String>,
    /// The branch of the source to follow [default: main].
    #[arg(long)]
    pub branch: Option<String>,
    /// The fleet file inside the source [default: fleet.yaml].
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// How often the source is read (a webhook or `fleetwave sync` reads it at once),
    /// e.g. 1m, 30s [default: 1m].
    #[arg(long, value_parser = parse_interval)]
    pub interval: Option<Duration>,
    /// The fleet file, or a directory holding fleet.yaml, read from disk (and re-read
    /// as it changes) when there is no source [default: fleet.yaml].
    #[arg(long, conflicts_with = "source")]
    pub fleet: Option<PathBuf>,
    /// Serve only this site (repeatable); all sites by default.
    #[arg(long = "site")]
    pub sites: Vec<String>,
    /// Directory of the state database (leases, host status, tasks, events) and the
    /// git cache [default: /var/lib/fleetwave].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// iPXE binaries, served by TFTP (Debian's `ipxe` package puts them here)
    /// [default: /usr/lib/ipxe].
    #[arg(long)]
    pub ipxe_dir: Option<PathBuf>,
    /// The agent's kernel (vmlinuz) and initrd (initrd.img), served under /files/
    /// [default: /var/lib/fleetwave/netboot].
    #[arg(long)]
    pub files_dir: Option<PathBuf>,
    /// The HTTP port (iPXE scripts, boot files, the agent and operator APIs) [default: 80].
    #[arg(long)]
    pub http_port: Option<u16>,
    /// The TFTP port [default: 69].
    #[arg(long)]
    pub tftp_port: Option<u16>,
    /// The DHCP port [default: 67].
    #[arg(long)]
    pub dhcp_port: Option<u16>,
    /// The address HTTP and TFTP listen on [default: 0.0.0.0, every address]; DHCP
    /// listens on each site's interface.
    #[arg(long)]
    pub listen_address: Option<Ipv4Addr>,
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
    #[arg(long)]
    pub require_signatures: bool,
    /// What an unsigned or untrusted commit may still do: nothing, or non-destructive
    /// work (inventory, verify); deploy, wipe and capture always need a trusted one
    /// [default: nothing].
    #[arg(long, value_enum)]
    pub untrusted: Option<follow::Untrusted>,
    /// The server's certificate (PEM; a chain, end-entity first): with --tls-key, the
    /// API, console and metrics are served over HTTPS too, and agents are sent there
    /// with the certificate's fingerprint to pin (docs/security.md).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The HTTPS port, when TLS is on [default: 443].
    #[arg(long)]
    pub https_port: Option<u16>,
    /// Log filter (tracing's syntax), e.g. `debug` or `fleetwave=debug` [default: info].
    #[arg(long, env = "FLEETWAVE_LOG")]
    pub log: Option<String>,
    /// Log lines as text for people or JSON objects for a collector [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

pub(crate) fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs = crate::spec::parse_duration(s)?;
    if secs == 0 {
        return Err("the interval must be at least 1s".into());
    }
    Ok(Duration::from_secs(secs))
}

/// How `serve` logs.
pub struct Logging {
    pub filter: String,
    pub format: LogFormat,
}

impl ServeCli {
    /// The configuration file named by `--config`, or none.
    pub fn file(&self) -> Result<ServerConfig> {
        match &self.config {
            Some(p) => server_config::read(p).map_err(|problems| {
                eprint!("{problems}");
                anyhow::anyhow!(
                    "{} is invalid: fix it (docs/install.md lists its fields)",
                    p.display()
                )
            }),
            None => Ok(ServerConfig::default()),
        }
    }

    pub fn logging(&self, file: &ServerConfig) -> Logging {
        Logging {
            filter: self
                .log
                .clone()
                .or_else(|| file.log.clone())
                .unwrap_or_else(|| "info".into()),
            format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
        }
    }

    /// Flags over the file over the defaults.
    pub fn args(&self, file: &ServerConfig) -> Result<ServeArgs> {
        let source = match (&self.source, &file.source) {
            (Some(url), f) => Some((
                url.clone(),
                f.as_ref().and_then(|f| f.branch.clone()),
                f.as_ref().and_then(|f| f.path.clone()),
            )),
            // A --fleet flag picks the directory source over the file's git source.
            (None, Some(_)) if self.fleet.is_some() => None,
            (None, Some(f)) => Some((f.url.clone(), f.branch.clone(), f.path.clone())),
            (None, None) => None,
        };
        let origin = match source {
            Some((url, branch, path)) => Origin::Git {
                url,
                branch: self
                    .branch
                    .clone()
                    .or(branch)
                    .unwrap_or_else(|| "main".into()),
                path: self
                    .path
                    .clone()
                    .or(path)
                    .unwrap_or_else(|| "fleet.yaml".into()),
            },
            None => {
                if self.branch.is_some() || self.path.is_some() {
                    bail!("--branch and --path choose within a git source: give --source too");
                }
                Origin::Dir(
                    self.fleet
                        .clone()
                        .or_else(|| file.fleet.clone())
                        .unwrap_or_else(|| "fleet.yaml".into()),
                )
            }
        };
        let interval = match (self.interval, &file.interval) {
            (Some(i), _) => i,
            // Checked with its place when the file was read.
            (None, Some(i)) => parse_interval(i).map_err(anyhow::Error::msg)?,
            (None, None) => Duration::from_secs(60),
        };
        let listen = file.listen.as_ref();
        // Flags over the file, as a pair: a certificate never goes with another's key.
        let tls = match (&self.tls_cert, &self.tls_key, &file.tls) {
            (Some(cert), Some(key), _) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None, Some(t)) => Some(TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            (None, None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together: give both"),
        };
        Ok(ServeArgs {
            origin,
            interval,
            sites: if self.sites.is_empty() {
                file.sites.clone().unwrap_or_default()
            } else {
                self.sites.clone()
            },
            state_dir: pick(&self.state_dir, &file.state_dir, "/var/lib/fleetwave"),
            ipxe_dir: pick(&self.ipxe_dir, &file.ipxe_dir, "/usr/lib/ipxe"),
            files_dir: pick(
                &self.files_dir,
                &file.files_dir,
                "/var/lib/fleetwave/netboot",
            ),
            http_port: self.http_port.or(listen.and_then(|l| l.http)).unwrap_or(80),
            tftp_port: self.tftp_port.or(listen.and_then(|l| l.tftp)).unwrap_or(69),
            dhcp_port: self.dhcp_port.or(listen.and_then(|l| l.dhcp)).unwrap_or(67),
            listen_address: self
                .listen_address
                .or(listen.and_then(|l| l.address))
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            image_store: self
                .image_store
                .clone()
                .or_else(|| file.image_store.clone()),
            admin_token_file: self
                .admin_token_file
                .clone()
                .or_else(|| file.admin_token_file.clone()),
            webhook_secret_file: self
                .webhook_secret_file
                .clone()
                .or_else(|| file.webhook_secret_file.clone()),
            trusted_keys: self
                .trusted_keys
                .clone()
                .or_else(|| file.trusted_keys.clone()),
            require_signatures: self.require_signatures || file.require_signatures == Some(true),
            untrusted: self.untrusted.or(file.untrusted).unwrap_or_default(),
            tls,
            https_port: self
                .https_port
                .or(listen.and_then(|l| l.https))
                .unwrap_or(443),
        })
    }
}

fn pick(flag: &Option<PathBuf>, file: &Option<PathBuf>, default: &str) -> PathBuf {
    flag.clone()
        .or_else(|| file.clone())
        .unwrap_or_else(|| default.into())
}
