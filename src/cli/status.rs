//! `fleetwave status`, `events`, `hosts`, `retry` and `sync`: the operator's view of
//! a running server, through its API.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::exit;
use crate::protocol::{FleetStatus, HostView};
use crate::state::EventRow;
use crate::state::read::InventoryView;

/// Where the server is, and the admin token for the calls that change something.
#[derive(Debug, Clone, clap::Args)]
pub struct Server {
    /// The server's base URL.
    #[arg(long, env = "FLEETWAVE_SERVER", default_value = "http://127.0.0.1")]
    pub server: String,
    /// A file whose first line is an admin token: scope `read` to read, `operate` for
    /// retry, sync and tokens (`fleetwave token create`).
    #[arg(long, env = "FLEETWAVE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The SHA-256 of an https server's certificate, sha256:HEX (`fleetwave tls
    /// fingerprint CERT.pem`, or serve's log): that certificate only is trusted, as
    /// for a self-signed one. Without it, the system's root certificates.
    #[arg(long, env = "FLEETWAVE_PIN")]
    pub pin: Option<crate::tls::Pin>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: Server,
    /// Only hosts of this site.
    #[arg(long)]
    pub site: Option<String>,
    /// Only hosts of this wave.
    #[arg(long)]
    pub wave: Option<String>,
    /// Only hosts in this state (Ready, Armed, Imaging, Stalled, ...).
    #[arg(long)]
    pub state: Option<String>,
    /// The whole status as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub server: Server,
    /// Only events of this host.
    #[arg(long)]
    pub host: Option<String>,
    /// Keep printing new events as they happen.
    #[arg(long)]
    pub follow: bool,
    /// Events as JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct HostsArgs {
    #[command(flatten)]
    pub server: Server,
    /// Machines that PXE-booted and registered but are not in the fleet, with a
    /// fleet.yaml entry to paste.
    #[arg(long)]
    pub unknown: bool,
    /// As JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    #[command(flatten)]
    pub server: Server,
    /// The host to try again.
    pub host: String,
}

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub server: Server,
}

impl Server {
    fn agent(&self) -> ureq::Agent {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        crate::tls::agent(config, self.pin)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.server.trim_end_matches('/'))
    }

    /// The `Authorization` header's value, from --token-file.
    fn bearer(&self) -> Result<Option<String>> {
        let Some(f) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?;
        Ok(Some(format!(
            "Bearer {}",
            text.lines().next().unwrap_or("").trim()
        )))
    }

    pub(crate) fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = self.url(path);
        let mut req = self.agent().get(&url);
        if let Some(b) = self.bearer()? {
            req = req.header("Authorization", &b);
        }
        let mut r = req.call().map_err(|e| unreachable(&url, e))?;
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .with_context(|| format!("{url}: reading the answer"))?;
        if status != 200 {
            bail!("{url}: HTTP {status}: {}", body.trim());
        }
        serde_json::from_str(&body).with_context(|| format!("{url}: not the answer expected"))
    }

    fn post(&self, path: &str) -> Result<()> {
        self.send("POST", path, None).map(|_| ())
    }

    /// `method` on `path` with a JSON body; the answer's body.
    pub(crate) fn send(
        &self,
        method: &str,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> Result<String> {
        let url = self.url(path);
        let bearer = self.bearer()?;
        let a = self.agent();
        let r = match (method, json) {
            ("DELETE", _) => {
                let mut req = a.delete(&url);
                if let Some(b) = &bearer {
                    req = req.header("Authorization", b);
                }
                req.call()
            }
            (_, Some(body)) => {
                let mut req = a.post(&url);
                if let Some(b) = &bearer {
                    req = req.header("Authorization", b);
                }
                req.header("Content-Type", "application/json")
                    .send(body.to_string().as_bytes())
            }
            _ => {
                let mut req = a.post(&url);
                if let Some(b) = &bearer {
                    req = req.header("Authorization", b);
                }
                req.send_empty()
            }
        };
        let mut r = r.map_err(|e| unreachable(&url, e))?;
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        if !(200..300).contains(&status) {
            bail!("{url}: HTTP {status}: {}", body.trim());
        }
        Ok(body)
    }
}

/// A request without an answer. A failed TLS check says so itself (a pin mismatch
/// names both fingerprints): the server was reached, so "is it running" would mislead.
fn unreachable(url: &str, e: ureq::Error) -> anyhow::Error {
    let why = e.to_string();
    if why.contains("TLS with ") {
        return anyhow::anyhow!("{url}: {why}");
    }
    anyhow::Error::new(e).context(format!(
        "cannot reach the server at {url}; is `serve` running there? (--server)"
    ))
}

fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

fn when(at: u64) -> String {
    let now = crate::state::now();
    if at > now {
        format!("in {}", span(at - now))
    } else {
        format!("{} ago", span(now - at))
    }
}

fn span(s: u64) -> String {
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn progress(h: &HostView) -> String {
    match &h.progress {
        Some(p) if p.total_bytes > 0 => format!(
            "{:>3}% {:.0} MB/s",
            p.done_bytes * 100 / p.total_bytes,
            p.bytes_per_sec as f64 / 1e6
        ),
        _ => String::new(),
    }
}

/// `fleetwave status`.
pub fn status(a: &StatusArgs, out: &mut dyn Write) -> Result<u8> {
    let s: FleetStatus = a.server.get("status")?;
    if a.json {
        super::print_json(out, &s)?;
        return Ok(exit::OK);
    }
    writeln!(out, "source: {}", s.source)?;
    match &s.applied {
        Some(c) => writeln!(out, "applied: {} ({})", short(&c.id), when(c.at))?,
        None => writeln!(out, "applied: nothing yet")?,
    }
    if let Some(sig) = s.applied.as_ref().and_then(|c| c.signature.as_ref()) {
        writeln!(
            out,
            "  signed: {} ({}{})",
            if sig.trusted {
                "trusted"
            } else {
                "NOT trusted"
            },
            sig.signer.as_deref().unwrap_or("unknown signer"),
            sig.key
                .as_deref()
                .map(|k| format!(", key {k}"))
                .unwrap_or_default()
        )?;
    }
    if s.applied.as_ref().is_some_and(|c| c.restricted) {
        writeln!(
            out,
            "  untrusted: served for non-destructive work only (--untrusted non-destructive)"
        )?;
    }
    if let Some(c) = &s.attempted
        && !c.problems.is_empty()
    {
        writeln!(
            out,
            "attempted: {} is Stalled ({} problems); the applied revision keeps serving:",
            short(&c.id),
            c.problems.len()
        )?;
        for p in &c.problems {
            for line in p.lines() {
                writeln!(out, "  {line}")?;
            }
        }
    }
    if !s.waves.is_empty() {
        writeln!(out)?;
        for w in &s.waves {
            writeln!(
                out,
                "wave {:<12} {:<8} {}/{} done, {} in flight, {} failed (budget {}){}",
                w.name,
                w.state,
                w.done,
                w.hosts,
                w.in_flight,
                w.failed,
                w.failure_budget,
                if w.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", w.message)
                }
            )?;
        }
    }
    writeln!(out)?;
    let rows: Vec<&HostView> = s
        .hosts
        .iter()
        .filter(|h| a.site.as_ref().is_none_or(|x| *x == h.site))
        .filter(|h| a.wave.as_ref().is_none_or(|x| *x == h.wave))
        .filter(|h| {
            a.state
                .as_ref()
                .is_none_or(|x| x.eq_ignore_ascii_case(&h.state))
        })
        .collect();
    writeln!(
        out,
        "{:<16} {:<8} {:<10} {:<10} {:<14} TASK / REASON",
        "HOST", "SITE", "WAVE", "STATE", "PROGRESS"
    )?;
    for h in &rows {
        let detail = match (&h.task, &h.reason) {
            (Some(t), _) => t.clone(),
            (None, Some(r)) => format!(
                "{r}: {}{}",
                h.message.as_deref().unwrap_or(""),
                h.until
                    .map(|u| format!(" (until {})", when(u)))
                    .unwrap_or_default()
            ),
            (None, None) => h
                .deployed
                .map(|d| format!("holds {}", d.short()))
                .unwrap_or_default(),
        };
        writeln!(
            out,
            "{:<16} {:<8} {:<10} {:<10} {:<14} {}",
            h.name,
            h.site,
            h.wave,
            h.state,
            progress(h),
            detail
        )?;
    }
    let ready = s.hosts.iter().filter(|h| h.state == "Ready").count();
    writeln!(out, "\n{ready} of {} hosts Ready", s.hosts.len())?;
    Ok(exit::OK)
}

fn print_event(e: &EventRow, json: bool, out: &mut dyn Write) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(e)?)?;
    } else {
        writeln!(
            out,
            "{:>6} {:<8} {:<16} {:<12} {}",
            e.id,
            when(e.at),
            e.kind,
            e.host.as_deref().unwrap_or("-"),
            e.message.lines().next().unwrap_or("")
        )?;
    }
    Ok(())
}

/// `fleetwave events`.
pub fn events(a: &EventsArgs, out: &mut dyn Write) -> Result<u8> {
    let mut after = 0;
    loop {
        let host = a
            .host
            .as_ref()
            .map(|h| format!("&host={h}"))
            .unwrap_or_default();
        let rows: Vec<EventRow> = a.server.get(&format!("events?after={after}{host}"))?;
        for e in &rows {
            print_event(e, a.json, out)?;
            after = after.max(e.id);
        }
        out.flush()?;
        // A page at a time, until the end; with --follow, then wait for more.
        if rows.is_empty() {
            if !a.follow {
                return Ok(exit::OK);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// `fleetwave hosts [--unknown]`.
pub fn hosts(a: &HostsArgs, out: &mut dyn Write) -> Result<u8> {
    if !a.unknown {
        let rows: Vec<HostView> = a.server.get("hosts")?;
        if a.json {
            super::print_json(out, &rows)?;
            return Ok(exit::OK);
        }
        for h in rows {
            writeln!(out, "{:<16} {} {:<8} {}", h.name, h.mac, h.site, h.state)?;
        }
        return Ok(exit::OK);
    }
    let rows: Vec<InventoryView> = a.server.get("hosts?unknown=true")?;
    if a.json {
        super::print_json(out, &rows)?;
        return Ok(exit::OK);
    }
    if rows.is_empty() {
        writeln!(out, "no unknown machines have registered")?;
        return Ok(exit::OK);
    }
    for r in &rows {
        let inv = &r.inventory;
        let disks: Vec<String> = inv["disks"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|d| {
                        format!(
                            "{} {:.0} GB {}",
                            d["name"].as_str().unwrap_or("?"),
                            d["size_bytes"].as_u64().unwrap_or(0) as f64 / 1e9,
                            d["model"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        writeln!(
            out,
            "{}  seen {}  {} {}  disks: {}",
            r.mac,
            when(r.at),
            inv["dmi"]["vendor"].as_str().unwrap_or("?"),
            inv["dmi"]["product"].as_str().unwrap_or("?"),
            disks.join(", ")
        )?;
        let name = format!("host-{}", &r.mac.to_string().replace(':', "")[6..]);
        writeln!(
            out,
            "  fleet.yaml:  {name}: {{mac: \"{}\", site: SITE}}\n",
            r.mac
        )?;
    }
    Ok(exit::OK)
}

/// `fleetwave retry HOST`.
pub fn retry(a: &RetryArgs, out: &mut dyn Write) -> Result<u8> {
    a.server.post(&format!("retry/{}", a.host))?;
    writeln!(
        out,
        "{}: its failures are cleared; the server tries it again now",
        a.host
    )?;
    Ok(exit::OK)
}

/// `fleetwave sync`.
pub fn sync(a: &SyncArgs, out: &mut dyn Write) -> Result<u8> {
    a.server.post("sync")?;
    writeln!(out, "the server reads its fleet source now")?;
    Ok(exit::OK)
}

/// The observed state a server at `url` plans with, as JSON (`plan --observed URL`).
pub fn fetch_observed(url: &str) -> Result<String> {
    // `plan` has no --token-file of its own: the same variable as the other commands.
    let server = Server {
        server: url.to_string(),
        token_file: std::env::var_os("FLEETWAVE_TOKEN_FILE").map(PathBuf::from),
        pin: std::env::var("FLEETWAVE_PIN")
            .ok()
            .map(|p| p.parse())
            .transpose()
            .map_err(|e: String| anyhow::anyhow!("FLEETWAVE_PIN: {e}"))?,
    };
    let v: serde_json::Value = server.get("observed")?;
    Ok(v.to_string())
}
