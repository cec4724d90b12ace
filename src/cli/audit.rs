//! `fleetwave audit`: read the audit trail from the state database, and check that
//! its hash chain (and the `audit.jsonl` copy) is unbroken. Reads the files directly,
//! read-only, so it works with the server stopped too.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::exit;
use crate::state::EventRow;
use crate::state::audit::{self, Filter};

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// The server's state directory (holds state.db and audit.jsonl).
    #[arg(long, global = true, default_value = "/var/lib/fleetwave")]
    pub state_dir: PathBuf,
    /// Only events of this host.
    #[arg(long)]
    pub host: Option<String>,
    /// Only events since: a duration back from now (`2h`, `7d`) or Unix seconds.
    #[arg(long)]
    pub since: Option<String>,
    /// Only events about this commit (an id or its prefix).
    #[arg(long)]
    pub commit: Option<String>,
    /// One JSON object per line, every field (with the chain's hashes).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of the database and of audit.jsonl; name the first break.
    /// Exit 0 unbroken, 1 broken, 2 unreadable.
    Verify,
}

pub fn run(a: &AuditArgs, out: &mut dyn Write) -> Result<u8> {
    let db = a.state_dir.join("state.db");
    if !db.exists() {
        bail!(
            "{} does not exist; point --state-dir at the server's state directory",
            db.display()
        );
    }
    match a.command {
        Some(AuditCommand::Verify) => verify(a, out),
        None => list(a, out),
    }
}

fn verify(a: &AuditArgs, out: &mut dyn Write) -> Result<u8> {
    let db = a.state_dir.join("state.db");
    let file = audit::file_beside(&db);
    let r = audit::verify(&db, &file)?;
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
    }
    match &r.broken {
        None => {
            if !a.json {
                writeln!(
                    out,
                    "the audit trail is unbroken: {} events in {}, {} lines in {}{}{}",
                    r.events,
                    db.display(),
                    r.lines,
                    file.display(),
                    if r.behind > 0 {
                        format!(
                            " ({} newer events not yet copied; the server appends them)",
                            r.behind
                        )
                    } else {
                        String::new()
                    },
                    if r.unchained > 0 {
                        format!(
                            "; {} older events from before the chain are not covered",
                            r.unchained
                        )
                    } else {
                        String::new()
                    }
                )?;
            }
            Ok(exit::OK)
        }
        Some(b) => {
            if !a.json {
                writeln!(
                    out,
                    "BROKEN: {}, event {}: {}\nEverything from there on cannot be trusted; \
                     see docs/security.md (\"audit verify reports a break\").",
                    b.place, b.id, b.why
                )?;
            }
            Ok(exit::CHANGES)
        }
    }
}

fn list(a: &AuditArgs, out: &mut dyn Write) -> Result<u8> {
    let since = match &a.since {
        None => None,
        Some(s) if s.bytes().all(|b| b.is_ascii_digit()) => Some(s.parse::<u64>()?),
        Some(s) => {
            let back = crate::spec::parse_duration(s)
                .map_err(|e| anyhow::anyhow!("--since {s}: {e}; write 2h, 7d or Unix seconds"))?;
            Some(crate::state::now().saturating_sub(back))
        }
    };
    let filter = Filter {
        host: a.host.clone(),
        since,
        commit: a.commit.clone(),
    };
    for e in audit::read(&a.state_dir.join("state.db"), &filter)? {
        print(&e, a.json, out)?;
    }
    Ok(exit::OK)
}

fn print(e: &EventRow, json: bool, out: &mut dyn Write) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(e)?)?;
        return Ok(());
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "{:>6} {} {:<22} host={} task={} commit={} signer={} token={} outcome={}  {}",
        e.id,
        utc(e.at),
        e.kind,
        opt(&e.host),
        e.task.map_or("-".into(), |t| t.to_string()),
        e.commit.as_deref().map_or("-", |c| &c[..12.min(c.len())]),
        opt(&e.signer),
        opt(&e.token),
        opt(&e.outcome),
        e.message.lines().next().unwrap_or("")
    )?;
    Ok(())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (days to civil date: H. Hinnant's method).
pub fn utc(at: u64) -> String {
    let days = (at / 86400) as i64;
    let secs = at % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates_are_calendar_dates() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_798_761_599), "2026-12-31T23:59:59Z");
    }
}
