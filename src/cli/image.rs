//! `fleetwave image ...` (the store) and `fleetwave agent capture|deploy|verify`
//! against a local store.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};

use super::exit;
use crate::image::Meter;
use crate::image::manifest::Manifest;
use crate::image::remote::Remote;
use crate::image::store::{Repo, Store};
use crate::image::{self, CaptureOptions};
use crate::multicast;
use crate::services::api::{Progress, TaskResult};
use crate::spec::{Digest, Mac};

/// An existing store: every command but capture only reads it or removes from it.
fn open(store: &Path) -> Result<Store> {
    Ok(Store::open_existing(store)?)
}

/// Where the agent's images are: a local store, or the server's through its API.
pub struct Where<'a> {
    pub store: &'a Path,
    /// Server URL, task token and this machine's MAC.
    pub server: Option<(&'a str, &'a str, Mac)>,
    /// The server certificate's SHA-256, for an https server (`--pin`).
    pub pin: Option<crate::tls::Pin>,
}

enum Opened {
    Local(Store),
    Remote(Remote),
}

impl Opened {
    fn repo(&self) -> &dyn Repo {
        match self {
            Opened::Local(s) => s,
            Opened::Remote(r) => r,
        }
    }

    /// Tell the server how the task ended (a no-op for a local store); a failure
    /// carries the tail of the netboot log when there is one.
    fn report(&self, result: &TaskResult) {
        // In the netboot environment a failure carries the tail of /init's log.
        let mut result = result.clone();
        if !result.ok && result.log_tail.is_none() {
            result.log_tail = crate::netboot::log_tail();
        }
        if let Opened::Remote(r) = self
            && let Err(e) = r.post_json("result", &result)
        {
            eprintln!("fleetwave: could not report the result to the server: {e}");
        }
    }
}

/// Report `meter` every second while `f` runs: a progress bar on a terminal, and the
/// server's progress endpoint when working against a server.
fn metered<T>(o: &Opened, label: &str, f: impl FnOnce(&Arc<Meter>) -> T) -> T {
    use std::io::IsTerminal;
    let meter = Arc::new(Meter::default());
    // Dropping the sender ends the progress thread at once, not at its next tick.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_message(label.to_string());
        b
    });
    let remote = match o {
        Opened::Remote(r) => Some(r),
        Opened::Local(_) => None,
    };
    let started = std::time::Instant::now();
    let post = |r: &Remote| {
        let done = meter.done.load(Ordering::Relaxed);
        let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
        let p = Progress {
            done_bytes: done,
            total_bytes: meter.total.load(Ordering::Relaxed),
            bytes_per_sec: rate as u64,
        };
        // Progress is advisory: a lost report changes nothing.
        let _ = r.post_json("progress", &p);
    };
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let stopped = stopped;
            let mut last_post = std::time::Instant::now();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(std::time::Duration::from_millis(200))
            {
                let done = meter.done.load(Ordering::Relaxed);
                let total = meter.total.load(Ordering::Relaxed);
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                }
                if let Some(r) = remote
                    && last_post.elapsed().as_secs() >= 1
                {
                    last_post = std::time::Instant::now();
                    post(r);
                }
            }
        });
        let out = f(&meter);
        drop(stop);
        out
    });
    // The last word before the result.
    if let Some(r) = remote {
        post(r);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out
}

/// The store to work against; a local one is created only for a capture (`create`).
fn open_where(w: &Where, create: bool) -> Result<Opened> {
    Ok(match w.server {
        Some((url, token, mac)) => Opened::Remote(Remote::new(url, token, mac, w.pin)),
        None if create => Opened::Local(Store::open(w.store)?),
        None => Opened::Local(open(w.store)?),
    })
}

/// Resolve an image spec: locally by name; against a server it must be a digest.
fn resolve(o: &Opened, spec: &str) -> Result<Digest> {
    match o {
        Opened::Local(s) => Ok(s.resolve(spec)?),
        Opened::Remote(_) => spec
            .rsplit('@')
            .next()
            .unwrap_or(spec)
            .parse()
            .map_err(|e| {
                anyhow::anyhow!("{spec}: against a server, name the version by its digest ({e})")
            }),
    }
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// `fleetwave agent capture DISK`.
pub fn capture(
    w: &Where,
    disk: &Path,
    name: &str,
    generation: u64,
    level: i32,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    // Before the store: a mistyped disk must not leave an empty store behind.
    std::fs::metadata(disk)
        .with_context(|| format!("cannot capture {}: check the disk's path", disk.display()))?;
    let o = open_where(w, true)?;
    let r = metered(&o, "capture", |meter| {
        let opts = CaptureOptions {
            level,
            meter: Some(meter.clone()),
            ..CaptureOptions::default()
        };
        image::capture(disk, o.repo(), Some((name, generation)), opts)
    });
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            o.report(&TaskResult {
                ok: false,
                digest: None,
                message: e.to_string(),
                log_tail: None,
            });
            return Err(e.into());
        }
    };
    o.report(&TaskResult {
        ok: true,
        digest: Some(r.digest),
        message: format!("captured {} chunks, {} new", r.chunks, r.new_chunks),
        log_tail: None,
    });
    if json {
        super::print_json(out, &r)?;
    } else {
        writeln!(
            out,
            "captured {} into {name}: {}\n  disk {}, used {}, data {}, stored {} ({} chunks, {} new: {})\n  {:.1} s",
            disk.display(),
            r.digest,
            mb(r.disk_bytes),
            mb(r.used_bytes),
            mb(r.data_bytes),
            mb(r.stored_bytes),
            r.chunks,
            r.new_chunks,
            mb(r.new_stored_bytes),
            r.seconds
        )?;
    }
    Ok(exit::OK)
}

/// How a deploy gets its chunks: over HTTP (or from the local store) only, or from a
/// multicast session first.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// `None`: unicast. `Some(None)`: the session the server names for this task.
    /// `Some(Some(group))`: that group (a session started by `fleetwave multicast send`).
    pub multicast: Option<Option<std::net::SocketAddrV4>>,
    /// The interface to join on (default: the one with this machine's MAC, else the
    /// first that is up).
    pub interface: Option<String>,
}

/// `fleetwave agent deploy IMAGE TARGET`.
pub fn deploy(
    w: &Where,
    spec: &str,
    target: &Path,
    via: &Transport,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    let o = open_where(w, false)?;
    let digest = resolve(&o, spec)?;
    let m = o.repo().manifest(&digest)?;
    deploy_opened(&o, &digest, &m, target, via, json, out)
}

/// Deploy version `digest`, whose manifest the caller already has.
pub fn deploy_version(
    w: &Where,
    digest: &Digest,
    m: &Manifest,
    target: &Path,
    via: &Transport,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    deploy_opened(&open_where(w, false)?, digest, m, target, via, json, out)
}

/// The group and interface a multicast deploy joins; `None` (and a note on stderr)
/// when the server has no session for it, so the deploy goes on by unicast.
fn join_of(
    o: &Opened,
    digest: &Digest,
    via: &Transport,
) -> Result<Option<multicast::ReceiveConfig>> {
    let Some(group) = via.multicast else {
        return Ok(None);
    };
    let (group, mac) = match (group, o) {
        (Some(g), Opened::Remote(r)) => (g, Some(r.mac())),
        (Some(g), Opened::Local(_)) => (g, None),
        (None, Opened::Local(_)) => {
            anyhow::bail!(
                "--multicast without a group needs --server: name the group, e.g. --multicast 239.28.0.1:9000"
            )
        }
        (None, Opened::Remote(r)) => match r.post_json("multicast", &serde_json::json!({})) {
            Ok(body) => {
                #[derive(serde::Deserialize)]
                struct Joined {
                    group: std::net::SocketAddrV4,
                    digest: Digest,
                }
                let j: Joined = serde_json::from_slice(&body)
                    .context("the server's answer to the multicast request")?;
                if j.digest != *digest {
                    anyhow::bail!(
                        "the server's session on {} sends {}, but this deploy is of {digest}",
                        j.group,
                        j.digest
                    );
                }
                (j.group, Some(r.mac()))
            }
            Err(e) => {
                // stderr: stdout may be a `--json` report.
                eprintln!("fleetwave: no multicast session ({e}); deploying by unicast");
                return Ok(None);
            }
        },
    };
    let interface = via
        .interface
        .clone()
        .or_else(|| mac.and_then(crate::agent::nic_with_mac))
        .or_else(multicast::default_interface)
        .context(
            "no network interface is up to join the multicast group on: name one with --interface",
        )?;
    Ok(Some(multicast::ReceiveConfig::new(
        group, interface, *digest,
    )))
}

fn deploy_opened(
    o: &Opened,
    digest: &Digest,
    m: &Manifest,
    target: &Path,
    via: &Transport,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    // More threads than cores: over the network, fetches wait on round trips.
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(4);
    let join = join_of(o, digest, via)?;
    let mut received = None;
    let result = metered(o, "deploy", |meter| -> Result<image::DeployReport> {
        let t = image::Target::open(digest, m, target)?;
        let mut have = t.present(m, threads);
        if let Some(cfg) = &join {
            let r = multicast::receive(cfg, m, &t, &mut have, Some(meter), &|| false)?;
            received = Some(r);
        }
        Ok(t.finish(o.repo(), digest, m, &have, threads, Some(meter))?)
    });
    o.report(&match &result {
        Ok(r) => TaskResult {
            ok: true,
            digest: Some(r.verified),
            message: match &received {
                Some(x) => format!(
                    "deployed and verified {} chunks ({} by multicast, {} over HTTP)",
                    r.chunks, x.chunks_received, r.chunks_written
                ),
                None => format!("deployed and verified {} chunks", r.chunks),
            },
            log_tail: None,
        },
        Err(e) => TaskResult {
            ok: false,
            digest: None,
            message: format!("{e:#}"),
            log_tail: None,
        },
    });
    if let (Some(x), false) = (&received, json) {
        writeln!(
            out,
            "multicast session {} from {}: {} of {} chunks received ({} datagrams, {} lost, \
             {} already on the disk), {}",
            x.session,
            x.sender,
            x.chunks_received,
            x.chunks,
            x.datagrams,
            x.lost,
            x.chunks_already,
            x.ended
        )?;
    }
    match result {
        Ok(r) => {
            if json {
                super::print_json(
                    out,
                    &serde_json::json!({"deploy": r, "multicast": received}),
                )?;
            } else {
                writeln!(
                    out,
                    "deployed and verified {} on {}: {} chunks ({} written now, {}) in {:.1} s",
                    r.verified,
                    target.display(),
                    r.chunks,
                    r.chunks_written,
                    mb(r.bytes_written),
                    r.seconds
                )?;
                if r.read_back != "device" {
                    writeln!(
                        out,
                        "  read back through the page cache: {} refuses direct I/O",
                        target.display()
                    )?;
                }
                if let Some(g) = &r.grown {
                    writeln!(
                        out,
                        "  partition {} grown from {} to {} for the larger disk; {}",
                        g.partition,
                        mb(g.old_bytes),
                        mb(g.new_bytes),
                        g.filesystem.as_deref().unwrap_or("filesystem left as is")
                    )?;
                }
            }
            Ok(exit::OK)
        }
        Err(e)
            if e.downcast_ref::<image::ImageError>()
                .is_some_and(|x| matches!(x, image::ImageError::Verify { .. })) =>
        {
            if json {
                super::print_json(
                    out,
                    &serde_json::json!({"deploy": null, "multicast": received, "failed": e.to_string()}),
                )?;
            } else {
                writeln!(out, "FAILED: {e}")?;
            }
            Ok(exit::CHANGES)
        }
        Err(e) => Err(e),
    }
}

/// `fleetwave agent verify IMAGE DISK`: exit 0 when the disk holds the version, 1 when
/// it drifted.
pub fn verify_disk(
    w: &Where,
    spec: &str,
    disk: &Path,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    let o = open_where(w, false)?;
    let digest = resolve(&o, spec)?;
    let m = o.repo().manifest(&digest)?;
    verify_opened(&o, &digest, &m, disk, json, out)
}

/// Verify `disk` against version `digest`, whose manifest the caller already has.
pub fn verify_version(
    w: &Where,
    digest: &Digest,
    m: &Manifest,
    disk: &Path,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    verify_opened(&open_where(w, false)?, digest, m, disk, json, out)
}

fn verify_opened(
    o: &Opened,
    digest: &Digest,
    m: &Manifest,
    disk: &Path,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8> {
    let digest = *digest;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let r = image::verify_manifest(m, &digest, disk, threads)?;
    o.report(&TaskResult {
        ok: r.bad == 0,
        digest: (r.bad == 0).then_some(digest),
        message: format!("{} of {} regions differ", r.bad, r.checked),
        log_tail: None,
    });
    if json {
        super::print_json(out, &r)?;
    } else if r.bad == 0 {
        writeln!(
            out,
            "{} holds {} ({} regions checked)",
            disk.display(),
            digest,
            r.checked
        )?;
    } else {
        writeln!(
            out,
            "{} has drifted from {}: {} of {} regions differ, the first at byte {}",
            disk.display(),
            digest,
            r.bad,
            r.checked,
            r.first_bad.unwrap_or(0)
        )?;
    }
    Ok(if r.bad == 0 { exit::OK } else { exit::CHANGES })
}

/// `fleetwave image ls`.
pub fn ls(store: &Path, out: &mut dyn Write) -> Result<u8> {
    let s = open(store)?;
    let images = s.images()?;
    if images.is_empty() {
        writeln!(out, "no images in {}", store.display())?;
    }
    for (name, rec) in images {
        writeln!(out, "{name}")?;
        for v in &rec.versions {
            let m = s.manifest(&v.digest)?;
            let logical = m.used_bytes();
            writeln!(
                out,
                "  {}  generation {}  disk {}  logical {}  stored {}  dedup {:.2}x",
                v.digest,
                v.generation,
                mb(v.disk_bytes),
                mb(logical),
                mb(v.stored_bytes),
                logical as f64 / v.stored_bytes.max(1) as f64
            )?;
        }
    }
    Ok(exit::OK)
}

/// `fleetwave image verify`: every manifest and every chunk it uses, re-hashed.
pub fn verify_store(store: &Path, out: &mut dyn Write) -> Result<u8> {
    let s = open(store)?;
    let mut problems = Vec::new();
    let mut checked = BTreeSet::new();
    for (name, rec) in s.images()? {
        for v in &rec.versions {
            let m = match s.manifest(&v.digest) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("{name}: {e}"));
                    continue;
                }
            };
            for c in &m.chunks {
                if !checked.insert(c.hash) {
                    continue;
                }
                if let Err(e) = s.chunk(&c.hash, c.len as usize) {
                    problems.push(format!("{name}@{}: {e}", v.digest));
                }
            }
        }
    }
    for p in &problems {
        writeln!(out, "{p}")?;
    }
    writeln!(
        out,
        "{} chunks checked, {} problem{}",
        checked.len(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    )?;
    Ok(if problems.is_empty() {
        exit::OK
    } else {
        exit::CHANGES
    })
}

/// `fleetwave image rm NAME[@DIGEST]`, then the store's garbage collection.
pub fn rm(store: &Path, spec: &str, out: &mut dyn Write) -> Result<u8> {
    let s = open(store)?;
    let (name, digest) = match spec.split_once('@') {
        Some((n, d)) => (
            n,
            Some(
                d.parse::<Digest>()
                    .map_err(|e| anyhow::anyhow!("{spec}: {e}"))?,
            ),
        ),
        None => (spec, None),
    };
    let n = s.remove(name, digest)?;
    let (manifests, chunks, bytes) = s.gc()?;
    writeln!(
        out,
        "removed {n} version{} of {name}; freed {manifests} manifest{}, {chunks} chunk{} ({})",
        if n == 1 { "" } else { "s" },
        if manifests == 1 { "" } else { "s" },
        if chunks == 1 { "" } else { "s" },
        mb(bytes)
    )?;
    Ok(exit::OK)
}

/// `fleetwave image rm SPEC --server URL`: through the server's API, audited.
pub fn rm_on_server(server: &super::status::Server, spec: &str, out: &mut dyn Write) -> Result<u8> {
    let answer = server.send("DELETE", &format!("images/{spec}"), None)?;
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
    writeln!(
        out,
        "removed {} version(s) of {}; run `fleetwave image gc` on the server to free their chunks",
        v["removed"].as_u64().unwrap_or(0),
        v["image"].as_str().unwrap_or(spec)
    )?;
    Ok(exit::OK)
}

/// `fleetwave image gc`.
pub fn gc(store: &Path, out: &mut dyn Write) -> Result<u8> {
    let s = open(store)?;
    let (manifests, chunks, bytes) = s.gc()?;
    writeln!(
        out,
        "freed {manifests} manifests and {chunks} chunks ({})",
        mb(bytes)
    )?;
    Ok(exit::OK)
}
