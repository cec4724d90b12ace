//! The `fleetwave` command: argument parsing lives in main.rs, the work here, writing
//! to the given streams so tests can run it in-process too.

pub mod agent;
pub mod audit;
pub mod image;
pub mod lab;
pub mod multicast;
pub mod netboot;
pub mod serve;
pub mod server_config;
pub mod status;
pub mod token;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::diag::{self, Diagnostic, JsonDiagnostic, Palette};
use crate::observed::Observed;
use crate::plan::{self, Params, render};
use crate::source::git::CommitTree;
use crate::source::{self, DirTree, Sources, Tree};
use crate::spec::{self, FleetSpec};

/// Exit codes shared by the subcommands.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// A flag SIGINT and SIGTERM set, for long one-shot commands that must end cleanly
/// (a multicast sender tells its receivers the session is over).
pub fn stop_flag() -> &'static std::sync::atomic::AtomicBool {
    let handler: extern "C" fn(libc::c_int) = on_stop_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    &STOP
}

pub mod exit {
    /// validate: valid; plan: nothing to do.
    pub const OK: u8 = 0;
    /// validate: invalid; plan: there are changes.
    pub const CHANGES: u8 = 1;
    /// Usage, I/O, or (for plan) an invalid fleet.
    pub const ERROR: u8 = 2;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Markdown,
    Json,
}

/// A fleet that failed to load: the problems and the files to show them against.
pub struct Invalid {
    pub sources: Sources,
    pub problems: Vec<Diagnostic>,
}

/// With FLEETWAVE_TIMINGS set, phase times go to stderr (the benchmark reads them).
pub fn timing(phase: &str, since: std::time::Instant) {
    if std::env::var_os("FLEETWAVE_TIMINGS").is_some() {
        eprintln!(
            "timing: {phase}: {:.1} ms",
            since.elapsed().as_secs_f64() * 1000.0
        );
    }
}

/// `fleet.yaml` inside a directory, or the file itself.
pub fn entry_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("fleet.yaml")
    } else {
        path.to_path_buf()
    }
}

/// Read and validate a fleet from a tree. `Err` is an I/O problem (no such file).
pub fn load(tree: &dyn Tree, entry: &Path) -> Result<Result<(FleetSpec, Sources), Invalid>> {
    let started = std::time::Instant::now();
    let loaded = source::load_each(tree, entry, spec::read_file).map_err(anyhow::Error::msg)?;
    timing("read, parse and read entries", started);
    let started = std::time::Instant::now();
    let (sources, built) = spec::build(loaded);
    timing("validate", started);
    Ok(match built {
        Ok(spec) => Ok((spec, sources)),
        Err(problems) => Err(Invalid { sources, problems }),
    })
}

pub(crate) fn print_problems(
    out: &mut dyn Write,
    invalid: &Invalid,
    format: Format,
    p: Palette,
) -> Result<()> {
    match format {
        Format::Json => {
            let list: Vec<JsonDiagnostic> = invalid
                .problems
                .iter()
                .map(|d| JsonDiagnostic::from(d, &invalid.sources))
                .collect();
            print_json(out, &serde_json::json!({"valid": false, "problems": list}))?;
        }
        _ => {
            for d in &invalid.problems {
                writeln!(out, "{}", diag::render(d, &invalid.sources, p))?;
            }
            let n = invalid.problems.len();
            writeln!(
                out,
                "{}{n} problem{} found{}",
                p.red,
                if n == 1 { "" } else { "s" },
                p.reset
            )?;
        }
    }
    Ok(())
}

/// A report as pretty JSON on its own lines (`--json`).
pub(crate) fn print_json(out: &mut dyn Write, value: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// `fleetwave validate [PATH]`.
pub fn validate(path: &Path, format: Format, out: &mut dyn Write, p: Palette) -> Result<u8> {
    let entry = entry_file(path);
    match load(&DirTree, &entry)? {
        Ok((spec, sources)) => {
            match format {
                Format::Json => {
                    print_json(out, &serde_json::json!({"valid": true, "problems": []}))?;
                }
                _ => writeln!(
                    out,
                    "{}ok{}: {} valid: {} file{}, {} site{}, {} host{}, {} image{}, {} wave{}",
                    p.green,
                    p.reset,
                    entry.display(),
                    sources.files.len(),
                    plural(sources.files.len()),
                    spec.sites.len(),
                    plural(spec.sites.len()),
                    spec.hosts.len(),
                    plural(spec.hosts.len()),
                    spec.images.len(),
                    plural(spec.images.len()),
                    spec.waves.values().filter(|w| w.declared).count(),
                    plural(spec.waves.values().filter(|w| w.declared).count()),
                )?,
            }
            crate::par::discard((spec, sources));
            Ok(exit::OK)
        }
        Err(invalid) => {
            print_problems(out, &invalid, format, p)?;
            Ok(exit::CHANGES)
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub(crate) fn read_observed(path: Option<&Path>) -> Result<Observed> {
    match path {
        None => Ok(Observed::default()),
        Some(p) => {
            // A running server's: what it recorded of every host, and its store.
            let text = match p
                .to_str()
                .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            {
                Some(url) => status::fetch_observed(url)?,
                None => std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read observed state {}", p.display()))?,
            };
            Observed::from_json(&text).map_err(|e| {
                // JSON errors lead with LINE:COL; others are about the file as a whole.
                let sep = if e.starts_with(|c: char| c.is_ascii_digit()) {
                    ":"
                } else {
                    ": "
                };
                anyhow::anyhow!("{}{sep}{e}", p.display())
            })
        }
    }
}

/// `fleetwave plan [PATH]`.
pub fn plan(
    path: &Path,
    observed: Option<&Path>,
    format: Format,
    out: &mut dyn Write,
    p: Palette,
) -> Result<u8> {
    // The observed state is read while the fleet loads.
    let (observed, loaded) = std::thread::scope(|s| {
        let observed = s.spawn(|| read_observed(observed));
        let loaded = load(&DirTree, &entry_file(path));
        (observed.join(), loaded)
    });
    let observed =
        observed.map_err(|_| anyhow::anyhow!("internal: observed-state reader panicked"))??;
    let (spec, _) = match loaded? {
        Ok(ok) => ok,
        Err(invalid) => {
            print_problems(
                out,
                &invalid,
                if format == Format::Json {
                    Format::Json
                } else {
                    Format::Text
                },
                p,
            )?;
            return Ok(exit::ERROR);
        }
    };
    let started = std::time::Instant::now();
    let plan = plan::diff(&spec, &observed, &Params::default());
    timing("plan", started);
    let started = std::time::Instant::now();
    match format {
        Format::Text => out.write_all(render::plan_text(&plan, p).as_bytes())?,
        Format::Markdown => out.write_all(render::plan_markdown(&plan).as_bytes())?,
        Format::Json => {
            print_json(out, &plan)?;
        }
    }
    timing("output", started);
    let code = if plan.is_empty() {
        exit::OK
    } else {
        exit::CHANGES
    };
    crate::par::discard((spec, plan, observed));
    Ok(code)
}

/// What to compare for `fleetwave plan --git`.
pub struct GitArgs<'a> {
    pub repo: &'a Path,
    pub base: &'a str,
    pub head: &'a str,
    /// The fleet file inside the repository.
    pub file: &'a Path,
}

/// `fleetwave plan --git REPO --base REV --head REV`.
pub fn plan_git(
    args: &GitArgs,
    observed: Option<&Path>,
    format: Format,
    out: &mut dyn Write,
    p: Palette,
) -> Result<u8> {
    let observed = read_observed(observed)?;
    let mut fleets = Vec::new();
    for rev in [args.base, args.head] {
        let tree = CommitTree::open(args.repo, rev)?;
        match load(&tree, args.file)? {
            Ok((spec, _)) => fleets.push((tree.commit, spec)),
            Err(mut invalid) => {
                // Name the revision in every path: the same file differs between the two.
                for f in &mut invalid.sources.files {
                    f.display = format!("{rev}:{}", f.display);
                }
                print_problems(
                    out,
                    &invalid,
                    if format == Format::Json {
                        Format::Json
                    } else {
                        Format::Text
                    },
                    p,
                )?;
                return Ok(exit::ERROR);
            }
        }
    }
    let (head_rev, head) = fleets.pop().context("internal: head fleet missing")?;
    let (base_rev, base) = fleets.pop().context("internal: base fleet missing")?;
    let params = Params::default();
    let base_plan = plan::diff(&base, &observed, &params);
    let head_plan = plan::diff(&head, &observed, &params);
    let review = plan::review::review(&base_rev, &head_rev, &base, &head, &base_plan, &head_plan);
    match format {
        Format::Text => out.write_all(render::review(&review, false, p).as_bytes())?,
        Format::Markdown => {
            out.write_all(render::review(&review, true, Palette::PLAIN).as_bytes())?
        }
        Format::Json => {
            print_json(out, &review)?;
        }
    }
    Ok(if review.has_changes() {
        exit::CHANGES
    } else {
        exit::OK
    })
}

/// The JSON Schema of fleet.yaml, as checked in under schemas/.
pub fn schema() -> String {
    let schema = schemars::schema_for!(spec::wire::FleetFile);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}
