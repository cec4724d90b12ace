//! `fleetwave token create|list|revoke`: the admin tokens of a running server, through
//! its API (with an `operate` token: the bootstrap one of `serve --admin-token-file`,
//! or one made before).

use std::io::Write;

use anyhow::{Context, Result};

use super::exit;
use super::status::Server;
use crate::state::AdminTokenRow;

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed once (the server keeps only its hash).
    Create {
        /// Who or what it is for: `alice`, `ci`, `dashboard`.
        name: String,
        /// `read` (status, hosts, events) or `operate` (also retry, sync, tokens).
        #[arg(long, default_value = "read")]
        scope: String,
        #[command(flatten)]
        server: Server,
    },
    /// Every token: id, name, scope, created, revoked.
    List {
        #[command(flatten)]
        server: Server,
    },
    /// Stop honouring a token, by its id (`token list`).
    Revoke {
        /// The token's id (16 hex digits), as `token list` and the audit trail show it.
        id: String,
        #[command(flatten)]
        server: Server,
    },
}

pub fn run(a: &TokenArgs, out: &mut dyn Write) -> Result<u8> {
    match &a.command {
        TokenCommand::Create {
            name,
            scope,
            server,
        } => {
            let body = serde_json::json!({"name": name, "scope": scope});
            let answer = server.send("POST", "tokens", Some(&body))?;
            let v: serde_json::Value =
                serde_json::from_str(&answer).context("the server's answer is not JSON")?;
            writeln!(
                out,
                "{}\n# id {}, name {}, scope {}: keep it in a file (mode 600) and pass \
                 --token-file; it is not shown again",
                v["token"].as_str().unwrap_or_default(),
                v["id"].as_str().unwrap_or_default(),
                v["name"].as_str().unwrap_or_default(),
                v["scope"].as_str().unwrap_or_default()
            )?;
        }
        TokenCommand::List { server } => {
            let rows: Vec<AdminTokenRow> = server.get("tokens")?;
            writeln!(
                out,
                "{:<16} {:<8} {:<20} {:<20} name",
                "id", "scope", "created", "revoked"
            )?;
            for r in rows {
                writeln!(
                    out,
                    "{:<16} {:<8} {:<20} {:<20} {}",
                    r.id,
                    r.scope,
                    super::audit::utc(r.created),
                    r.revoked.map_or("-".into(), super::audit::utc),
                    r.name
                )?;
            }
        }
        TokenCommand::Revoke { id, server } => {
            server.send("DELETE", &format!("tokens/{id}"), None)?;
            writeln!(out, "token {id} revoked: the server refuses it from now on")?;
        }
    }
    Ok(exit::OK)
}
