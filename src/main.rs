use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleetwave::cli::{self, Format, GitArgs, exit};
use fleetwave::diag::Palette;

/// jemalloc: a plan of 100,000 hosts ran 13 % faster in 30 MB less memory than with
/// glibc's malloc (docs/dependencies.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Declarative imaging for computer fleets.
#[derive(Parser)]
#[command(name = "fleetwave", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a fleet and report every problem (exit 0 valid, 1 invalid, 2 error).
    Validate {
        /// The fleet file, or a directory holding fleet.yaml.
        #[arg(default_value = "fleet.yaml")]
        path: PathBuf,
        /// Output: text for people, json for tools (each problem with file, line, column).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show what would happen to which machines, in which wave (exit 0 nothing to do,
    /// 1 changes, 2 error).
    Plan {
        /// The fleet file, or a directory holding fleet.yaml.
        #[arg(default_value = "fleet.yaml")]
        path: PathBuf,
        /// Observed state: a JSON file (docs/observed-state.md) or a running server's URL
        /// (http://172.28.0.1); without it nothing is known yet.
        #[arg(long)]
        observed: Option<PathBuf>,
        /// Output: text for people, markdown for a pull-request comment, json for tools.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Compare two commits of this fleet repository instead (the pull-request view).
        #[arg(long, requires_all = ["base", "head"])]
        git: Option<PathBuf>,
        /// Base revision (e.g. origin/main).
        #[arg(long, requires = "git")]
        base: Option<String>,
        /// Head revision (e.g. HEAD).
        #[arg(long, requires = "git")]
        head: Option<String>,
        /// The fleet file inside the repository, with --git.
        #[arg(long, default_value = "fleet.yaml")]
        file: PathBuf,
    },
    /// Print the JSON Schema of fleet.yaml (or of the server's server.yaml).
    Schema {
        /// The schema of the server's configuration file instead.
        #[arg(long)]
        server: bool,
    },
    /// The image store: list, check, remove, collect garbage.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// The imaging agent's work on a disk, against a local image store or the server's
    /// (through the agent API, with a task token).
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Multicast sessions: send an image version to many machines at once.
    Multicast {
        #[command(subcommand)]
        command: MulticastCommand,
    },
    /// The netboot environment PXE-booted machines run: kernel, initramfs, agent.
    Netboot {
        #[command(subcommand)]
        command: NetbootCommand,
    },
    /// Run the controller and the boot services (DHCP, TFTP, HTTP with the agent and
    /// operator APIs) of the fleet's sites until SIGINT/SIGTERM.
    Serve(cli::serve::ServeCli),
    /// Where the fleet stands: every host's state, task and reason (from a server).
    Status(cli::status::StatusArgs),
    /// The server's event log.
    Events(cli::status::EventsArgs),
    /// Hosts as the server sees them; with --unknown, machines not in the fleet.
    Hosts(cli::status::HostsArgs),
    /// Clear a Stalled host's failures so the server tries it again now.
    Retry(cli::status::RetryArgs),
    /// Make the server read its fleet source now.
    Sync(cli::status::SyncArgs),
    /// The fleet's lab site in QEMU VMs on this machine, through `serve --source`:
    /// capture, unicast and multicast deploys, verified disks, each VM booted from its
    /// disk (root; docs/lab.md). `lab down` removes a lab kept with --keep.
    Lab(cli::lab::LabCli),
    /// The audit trail (who did what, with which commit and token): list it, or
    /// `audit verify` its hash chain.
    Audit(cli::audit::AuditArgs),
    /// Admin tokens of a running server: create, list, revoke.
    Token(cli::token::TokenArgs),
    /// The server's TLS certificate: `tls fingerprint CERT.pem` prints the pin
    /// (sha256:HEX) clients give with --pin.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Print the SHA-256 fingerprint of a PEM certificate's first (end-entity)
    /// certificate as sha256:HEX: what `--pin` and `fleetwave.pin=` take.
    Fingerprint {
        /// The certificate, PEM (e.g. serve's --tls-cert).
        cert: PathBuf,
    },
}

#[derive(Subcommand)]
enum NetbootCommand {
    /// Build vmlinuz, initrd.img and manifest.json from Debian's kernel package,
    /// busybox and a statically linked agent (docs/netboot.md).
    Build {
        /// Where the build goes: `serve --files-dir` hands it out.
        #[arg(long, default_value = "/var/lib/fleetwave/netboot")]
        out: PathBuf,
        /// Downloaded and unpacked kernel packages, reused by later builds.
        #[arg(long, default_value = "/var/cache/fleetwave/netboot")]
        cache: PathBuf,
        /// The agent binary, statically linked; default: this program, if it is.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// zstd level of the initramfs (1-19): 9 is 10 % larger than 19 and ten
        /// times faster.
        #[arg(long, default_value_t = 9)]
        level: i32,
        /// Print the manifest as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Answer IPv6 router solicitations with "no router, nothing to configure", so
    /// iPXE stops waiting for IPv6 on a site without an IPv6 router (until SIGTERM).
    Ra {
        /// The interface of the PXE clients' network.
        #[arg(long)]
        interface: String,
    },
    /// Check that a directory holds a complete build (exit 1, saying what to do, if not).
    Check {
        /// The build's directory (`serve --files-dir`).
        #[arg(default_value = "/var/lib/fleetwave/netboot")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Images, their versions, logical and stored sizes and dedup ratio.
    Ls {
        /// The image store's directory.
        #[arg(long, default_value = "/images")]
        store: PathBuf,
    },
    /// Re-hash every manifest and every chunk an image uses (exit 1 on any problem).
    Verify {
        /// The image store's directory.
        #[arg(long, default_value = "/images")]
        store: PathBuf,
    },
    /// Remove an image (NAME) or one version (NAME@blake3:...), then unused chunks.
    /// With --server, through the running server's API (audited; needs an operate
    /// token); its chunks then go at the next `image gc`.
    Rm {
        /// NAME (every version) or NAME@blake3:... (that version).
        spec: String,
        /// The image store's directory.
        #[arg(long, default_value = "/images")]
        store: PathBuf,
        /// The server whose store it is (http://... or https://...).
        #[arg(long)]
        server: Option<String>,
        /// A file whose first line is an admin token of scope operate.
        #[arg(long, env = "FLEETWAVE_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// The SHA-256 of an https server's certificate, sha256:HEX (as for status).
        #[arg(long, env = "FLEETWAVE_PIN")]
        pin: Option<fleetwave::tls::Pin>,
    },
    /// Delete manifests and chunks no image uses.
    Gc {
        /// The image store's directory.
        #[arg(long, default_value = "/images")]
        store: PathBuf,
    },
}

#[derive(Subcommand)]
enum MulticastCommand {
    /// Send one image version (NAME, NAME@blake3:... or a digest) to the receivers
    /// that join GROUP (`fleetwave agent deploy --multicast GROUP`); exit 0 when every
    /// receiver that stayed completed.
    Send {
        /// The image version: NAME (its newest), NAME@blake3:... or blake3:...
        image: String,
        /// The image store's directory.
        #[arg(long, default_value = "/images")]
        store: PathBuf,
        /// The multicast group and port, e.g. 239.28.0.1:9000.
        #[arg(long)]
        group: String,
        /// This server's address on the receivers' network (multicast leaves there).
        #[arg(long)]
        bind: std::net::Ipv4Addr,
        /// Start when this many receivers have joined (or at --max-wait).
        #[arg(long, default_value_t = 1)]
        min_receivers: u32,
        /// Start anyway this long after the session opened, e.g. 30s or 10m.
        #[arg(long, default_value = "10m")]
        max_wait: String,
        /// Never faster than this on the wire, e.g. 900Mbit; 0: as fast as the
        /// receivers keep up.
        #[arg(long, default_value = "900Mbit")]
        max_rate: String,
        /// Print the report as JSON on stdout (anything else goes to stderr).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Capture a disk or disk image file into the store as a new version of IMAGE.
    Capture {
        /// Block device or disk image file.
        disk: PathBuf,
        /// The image this capture is a new version of (created if it is new).
        #[arg(long)]
        image: String,
        /// The capture generation this version answers.
        #[arg(long, default_value_t = 1)]
        generation: u64,
        /// zstd level (1-19) for chunks that compress; 0 is fleetwave's setting for
        /// chunks, smaller than level 6 at about its cost. Others are stored at level 1.
        #[arg(long, default_value_t = fleetwave::image::store::CHUNK_LEVEL)]
        level: i32,
        #[command(flatten)]
        repo: RepoArgs,
        /// Print the report as JSON on stdout (anything else goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Write an image version (NAME, NAME@blake3:..., or a digest) onto a disk, then
    /// read it back and verify it (exit 1 if verification fails).
    Deploy {
        /// The image version: NAME (its newest), NAME@blake3:... or blake3:...; with
        /// --server, blake3:...
        image: String,
        /// Block device or disk image file (a missing file is created at the image's size).
        target: PathBuf,
        #[command(flatten)]
        repo: RepoArgs,
        /// Receive from a multicast session first, then fetch what is missing over
        /// HTTP: the session the server names for this task, or GROUP:PORT.
        #[arg(long, num_args = 0..=1, default_missing_value = "server", value_name = "GROUP:PORT")]
        multicast: Option<String>,
        /// The interface to join the multicast group on.
        #[arg(long, requires = "multicast")]
        interface: Option<String>,
        /// Print the report as JSON on stdout (anything else goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Wipe a disk: `fast` (partition tables and filesystem signatures at both ends of
    /// the disk and of each partition), `normal` (zeros everywhere) or `full` (random,
    /// then zeros); always read back.
    Wipe {
        /// Block device or disk image file.
        disk: PathBuf,
        /// How thoroughly to wipe (see above).
        #[arg(long, value_parser = ["fast", "normal", "full"])]
        mode: String,
        /// Confirm that the disk's data is to be destroyed.
        #[arg(long)]
        yes: bool,
        /// Print the report as JSON on stdout (anything else goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Carry out the task the kernel command line's fleetwave.server, .mac and .token
    /// name (what the netboot environment runs), and report to the server.
    Run {
        /// Where to read fleetwave.server=, .mac= and .token= (a file in tests).
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
    },
    /// Print what the machine does once the task on the kernel command line has ended
    /// (reboot or poweroff), asked of the server (what the netboot environment's /init
    /// asks before the agent runs); exit 1 when the server cannot be asked.
    After {
        /// The kernel command line with fleetwave.server=, .mac=, .token= and .pin=.
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
    },
    /// Report the task named on the kernel command line as failed, with a reason and
    /// the tail of a log (what the netboot environment does when a step fails).
    Fail {
        /// What went wrong, in one line (the report's message).
        #[arg(long)]
        reason: String,
        /// The log whose last lines go with the report.
        #[arg(long)]
        log: Option<PathBuf>,
        /// The kernel command line with fleetwave.server=, .mac= and .token=.
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
    },
    /// What this machine has: CPU, memory, disks, NICs, DMI identity.
    Inventory {
        /// Print the report as JSON on stdout (anything else goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// The disk a host's selector picks here (exit 1, with the disks, when none or
    /// several fit). Removable and USB disks are never picked.
    Disk {
        /// Size range, e.g. `100G-1T` or `>=200G`.
        #[arg(long)]
        size: Option<String>,
        /// The disk's serial number, exactly.
        #[arg(long)]
        serial: Option<String>,
        /// Glob over the model, e.g. `Samsung*`.
        #[arg(long)]
        model: Option<String>,
        /// The disk's path, e.g. /dev/nvme0n1 or /dev/disk/by-id/...
        #[arg(long)]
        path: Option<String>,
        /// The image's disk size in bytes: smaller disks are never picked.
        #[arg(long, default_value_t = 0)]
        need: u64,
    },
    /// Check whether a disk still holds an image version (exit 1 when it drifted).
    Verify {
        /// The image version: NAME (its newest), NAME@blake3:... or blake3:...; with
        /// --server, blake3:...
        image: String,
        /// Block device or disk image file.
        disk: PathBuf,
        #[command(flatten)]
        repo: RepoArgs,
        /// Print the report as JSON on stdout (anything else goes to stderr).
        #[arg(long)]
        json: bool,
    },
}

/// A local image store, or the server's through the agent API.
#[derive(clap::Args)]
struct RepoArgs {
    /// The local image store (without --server).
    #[arg(long, default_value = "/images")]
    store: PathBuf,
    /// The fleetwave server, e.g. http://172.28.0.1 (then --token and --mac).
    #[arg(long, requires_all = ["token", "mac"])]
    server: Option<String>,
    /// The task token from the kernel command line (fleetwave.token=...).
    #[arg(long, env = "FLEETWAVE_TOKEN")]
    token: Option<String>,
    /// This machine's MAC, the one the token is bound to.
    #[arg(long)]
    mac: Option<String>,
    /// The SHA-256 of an https server's certificate, sha256:HEX (`fleetwave tls
    /// fingerprint CERT.pem`; fleetwave.pin= on the kernel command line): that
    /// certificate only is trusted. Without it, the system's root certificates.
    #[arg(long, env = "FLEETWAVE_PIN")]
    pin: Option<fleetwave::tls::Pin>,
}

impl RepoArgs {
    fn parse_mac(&self) -> anyhow::Result<Option<fleetwave::spec::Mac>> {
        self.mac
            .as_deref()
            .map(|m| m.parse().map_err(|e| anyhow::anyhow!("--mac: {e}")))
            .transpose()
    }
}

fn with_where<T>(
    r: &RepoArgs,
    f: impl FnOnce(&cli::image::Where) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mac = r.parse_mac()?;
    let server = match (&r.server, &r.token, mac) {
        (Some(s), Some(t), Some(m)) => Some((s.as_str(), t.as_str(), m)),
        _ => None,
    };
    f(&cli::image::Where {
        store: &r.store,
        server,
        pin: r.pin,
    })
}

fn main() -> ExitCode {
    let args = Cli::parse();
    if let Command::Serve(serve) = &args.command {
        // The file is read before logging starts: it may choose the log format.
        let file = match serve.file() {
            Ok(f) => f,
            Err(e) => return finish(Err(e)),
        };
        init_logs(&serve.logging(&file));
        let reread = || serve.file().and_then(|f| serve.args(&f));
        return finish(
            serve
                .args(&file)
                .and_then(|a| cli::serve::serve(&a, &reread)),
        );
    }
    fleetwave::par::one_shot_process();
    let stdout = std::io::stdout();
    let palette = Palette::for_stream(stdout.is_terminal());
    // Buffered: a plan of 100,000 hosts is millions of small writes (JSON took 640 ms
    // to print unbuffered). `agent run` reports as it goes, so it writes through.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let result = match args.command {
        Command::Validate { path, format } => cli::validate(&path, format, &mut out, palette),
        Command::Plan {
            path,
            observed,
            format,
            git,
            base,
            head,
            file,
        } => match (git, base, head) {
            (Some(repo), Some(base), Some(head)) => {
                let g = GitArgs {
                    repo: &repo,
                    base: &base,
                    head: &head,
                    file: &file,
                };
                cli::plan_git(&g, observed.as_deref(), format, &mut out, palette)
            }
            _ => cli::plan(&path, observed.as_deref(), format, &mut out, palette),
        },
        Command::Serve(_) => unreachable!("handled above"),
        Command::Status(a) => cli::status::status(&a, &mut out),
        Command::Events(a) => cli::status::events(&a, &mut out),
        Command::Hosts(a) => cli::status::hosts(&a, &mut out),
        Command::Retry(a) => cli::status::retry(&a, &mut out),
        Command::Sync(a) => cli::status::sync(&a, &mut out),
        Command::Lab(a) => cli::lab::lab(a, &mut out),
        Command::Audit(a) => cli::audit::run(&a, &mut out),
        Command::Token(a) => cli::token::run(&a, &mut out),
        Command::Tls {
            command: TlsCommand::Fingerprint { cert },
        } => fleetwave::tls::fingerprint(&cert)
            .map_err(anyhow::Error::from)
            .and_then(|pin| {
                writeln!(out, "{pin}")?;
                Ok(exit::OK)
            }),
        Command::Image { command } => match command {
            ImageCommand::Ls { store } => cli::image::ls(&store, &mut out),
            ImageCommand::Verify { store } => cli::image::verify_store(&store, &mut out),
            ImageCommand::Rm {
                spec,
                server: Some(server),
                token_file,
                pin,
                ..
            } => cli::image::rm_on_server(
                &cli::status::Server {
                    server,
                    token_file,
                    pin,
                },
                &spec,
                &mut out,
            ),
            ImageCommand::Rm { spec, store, .. } => cli::image::rm(&store, &spec, &mut out),
            ImageCommand::Gc { store } => cli::image::gc(&store, &mut out),
        },
        Command::Agent { command } => match command {
            AgentCommand::Capture {
                disk,
                image,
                generation,
                level,
                repo,
                json,
            } => with_where(&repo, |w| {
                cli::image::capture(w, &disk, &image, generation, level, json, &mut out)
            }),
            AgentCommand::Deploy {
                image,
                target,
                repo,
                multicast,
                interface,
                json,
            } => match multicast
                .as_deref()
                .map(|g| parse_group("--multicast", g))
                .transpose()
            {
                Ok(multicast) => {
                    let via = cli::image::Transport {
                        multicast,
                        interface,
                    };
                    with_where(&repo, |w| {
                        cli::image::deploy(w, &image, &target, &via, json, &mut out)
                    })
                }
                Err(e) => Err(e),
            },
            AgentCommand::Verify {
                image,
                disk,
                repo,
                json,
            } => with_where(&repo, |w| {
                cli::image::verify_disk(w, &image, &disk, json, &mut out)
            }),
            AgentCommand::Inventory { json } => cli::agent::inventory(json, &mut out),
            AgentCommand::Run { cmdline } => match out.flush() {
                Ok(()) => cli::agent::run(&cmdline, &mut std::io::stdout().lock()),
                Err(e) => Err(e.into()),
            },
            AgentCommand::Fail {
                reason,
                log,
                cmdline,
            } => cli::netboot::agent_fail(&cmdline, &reason, log.as_deref(), &mut out),
            AgentCommand::After { cmdline } => cli::netboot::agent_after(&cmdline, &mut out),
            AgentCommand::Wipe {
                disk,
                mode,
                yes,
                json,
            } => cli::agent::wipe(&disk, &mode, yes, json, &mut out),
            AgentCommand::Disk {
                size,
                serial,
                model,
                path,
                need,
            } => match size.as_deref().map(str::parse).transpose() {
                Ok(size) => {
                    let sel = fleetwave::spec::DiskSelector {
                        size,
                        serial,
                        model,
                        path,
                    };
                    cli::agent::disk(&sel, need, &mut out)
                }
                Err(e) => Err(anyhow::anyhow!("--size: {e}")),
            },
        },
        Command::Multicast {
            command:
                MulticastCommand::Send {
                    image,
                    store,
                    group,
                    bind,
                    min_receivers,
                    max_wait,
                    max_rate,
                    json,
                },
        } => multicast_send(
            &image,
            &store,
            &group,
            bind,
            min_receivers,
            &max_wait,
            &max_rate,
            json,
            &mut out,
        ),
        Command::Netboot { command } => match command {
            NetbootCommand::Build {
                out: dir,
                cache,
                agent,
                level,
                json,
            } => {
                let a = cli::netboot::BuildArgs {
                    out: dir,
                    cache,
                    agent,
                    level,
                    json,
                };
                cli::netboot::build(&a, &mut out)
            }
            NetbootCommand::Check { dir } => cli::netboot::check(&dir, &mut out),
            NetbootCommand::Ra { interface } => cli::netboot::ra(&interface, &mut out),
        },
        Command::Schema { server } => out
            .write_all(
                if server {
                    cli::server_config::schema()
                } else {
                    cli::schema()
                }
                .as_bytes(),
            )
            .map(|_| exit::OK)
            .map_err(Into::into),
    };
    // The output before any error message; a write that fails here is an error too.
    let result = match (result, out.flush()) {
        (Ok(_), Err(e)) => Err(anyhow::Error::from(e).context("writing to stdout")),
        (r, _) => r,
    };
    finish(result)
}

#[allow(clippy::too_many_arguments)]
fn multicast_send(
    image: &str,
    store: &std::path::Path,
    group: &str,
    bind: std::net::Ipv4Addr,
    min_receivers: u32,
    max_wait: &str,
    max_rate: &str,
    json: bool,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<u8> {
    use fleetwave::spec::{parse_duration, parse_rate};
    let group = parse_group("--group", group)?.ok_or_else(|| {
        anyhow::anyhow!("--group server: write the group as ADDRESS:PORT, e.g. 239.28.0.1:9000")
    })?;
    let max_wait = parse_duration(max_wait).map_err(|e| anyhow::anyhow!("--max-wait: {e}"))?;
    let max_rate_bps = match max_rate {
        "0" => 0,
        r => parse_rate(r).map_err(|e| anyhow::anyhow!("--max-rate: {e}"))?,
    };
    let a = cli::multicast::SendArgs {
        store,
        image,
        group,
        bind,
        min_receivers,
        max_wait: std::time::Duration::from_secs(max_wait),
        max_rate_bps,
        json,
    };
    cli::multicast::send(&a, out)
}

/// The value of `flag` (`--multicast` or `--group`): `server` (`--multicast` alone)
/// or GROUP:PORT.
fn parse_group(flag: &str, s: &str) -> anyhow::Result<Option<std::net::SocketAddrV4>> {
    if s == "server" {
        return Ok(None);
    }
    let g: std::net::SocketAddrV4 = s.parse().map_err(|_| {
        anyhow::anyhow!("{flag} {s:?}: write the group as ADDRESS:PORT, e.g. 239.28.0.1:9000")
    })?;
    if !g.ip().is_multicast() {
        anyhow::bail!(
            "{flag} {s}: {} is not a multicast address (224.0.0.0/4)",
            g.ip()
        );
    }
    Ok(Some(g))
}

fn finish(result: anyhow::Result<u8>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // The chain, without causes an outer message already quotes.
            let mut text = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !text.contains(&c) {
                    text = format!("{text}: {c}");
                }
            }
            eprintln!("fleetwave: error: {text}");
            ExitCode::from(exit::ERROR)
        }
    }
}

fn init_logs(logging: &cli::serve::Logging) {
    use tracing_subscriber::EnvFilter;
    let text = &logging.filter;
    let filter = EnvFilter::try_new(text).unwrap_or_else(|e| {
        eprintln!("fleetwave: --log {text:?}: {e}; using `info`");
        EnvFilter::new("info")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match logging.format {
        // One object a line; span fields (host, task, commit) are flattened into it.
        cli::server_config::LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        cli::server_config::LogFormat::Text => {
            logs.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every argument and option says what it is in `--help`.
    #[test]
    fn every_argument_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &format!("{path} {}", sub.get_name()), missing);
                }
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "fleetwave", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }
}
