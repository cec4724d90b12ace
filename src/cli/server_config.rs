//! The server's configuration file (`/etc/fleetwave/server.yaml`): how `serve` runs,
//! never what the fleet is (that lives in git). Read with the fleet's YAML reader, so
//! a mistake is reported as file:line:column with the line and a hint, as `validate`
//! reports the fleet's. Flags given on the command line override it.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;

use crate::diag::{self, Diagnostic, Loc, Palette, SourceFile, Sources};
use crate::source::Sp;
use crate::source::yaml;

/// `/etc/fleetwave/server.yaml`. Every field is optional: what is missing takes the
/// flag's default (`fleetwave serve --help`).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The fleet's git repository, followed on a branch. Without it, `fleet` is read
    /// from disk.
    pub source: Option<SourceConfig>,
    /// The fleet file, or a directory holding fleet.yaml, read from disk when there is
    /// no `source`.
    pub fleet: Option<PathBuf>,
    /// How often the source is read (a webhook or `fleetwave sync` reads it at once),
    /// e.g. `1m`, `30s`.
    pub interval: Option<Sp<String>>,
    /// Serve only these sites; all sites of the fleet by default.
    pub sites: Option<Vec<String>>,
    /// The state database (leases, host status, tasks, events) and the git cache.
    pub state_dir: Option<PathBuf>,
    /// iPXE binaries served by TFTP.
    pub ipxe_dir: Option<PathBuf>,
    /// The netboot build (`fleetwave netboot build --out`), served under /files/.
    pub files_dir: Option<PathBuf>,
    /// The image store the agent API serves (default: the site's `image_store`).
    pub image_store: Option<PathBuf>,
    /// Ports to listen on (all addresses; DHCP on each site's interface).
    pub listen: Option<Listen>,
    /// Serve the API, console and metrics over HTTPS too (port `listen.https`), with
    /// this certificate and key; agents are sent there with the certificate's pin.
    pub tls: Option<TlsConfig>,
    /// A file whose first line is the admin token (retry, sync).
    pub admin_token_file: Option<PathBuf>,
    /// A file whose first line is the push webhook's shared secret.
    pub webhook_secret_file: Option<PathBuf>,
    /// SSH and OpenPGP public keys whose commits are trusted (docs/security.md).
    pub trusted_keys: Option<PathBuf>,
    /// Serve only commits signed by a key of `trusted_keys`.
    pub require_signatures: Option<bool>,
    /// What an unsigned or untrusted commit may still do: `nothing` (the default) or
    /// `non-destructive` (inventory and verify).
    pub untrusted: Option<crate::reconcile::follow::Untrusted>,
    /// Log filter in tracing's syntax: `info`, `debug`, `fleetwave=debug`.
    pub log: Option<String>,
    /// `text` for people, `json` for a log collector (one object a line).
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// file://, https://, ssh:// or a path.
    pub url: String,
    /// Default `main`.
    pub branch: Option<String>,
    /// The fleet file inside the repository; default `fleet.yaml`.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate, PEM (a chain: the server's own certificate first).
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// The IPv4 address HTTP and TFTP listen on; default 0.0.0.0 (every address).
    /// DHCP listens on each site's interface.
    pub address: Option<std::net::Ipv4Addr>,
    /// Default 80.
    pub http: Option<u16>,
    /// Default 443; used only with `tls`.
    pub https: Option<u16>,
    /// Default 69.
    pub tftp: Option<u16>,
    /// Default 67.
    pub dhcp: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The configuration at `path`, or the problems found in it, rendered with their
/// place (file:line:column, the line, a hint).
pub fn read(path: &Path) -> Result<ServerConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the server configuration {}: {e}",
            path.display()
        )
    })?;
    parse(&path.display().to_string(), &text)
}

/// Parse `text`, read from `display`.
pub fn parse(display: &str, text: &str) -> Result<ServerConfig, String> {
    let sources = Sources {
        files: vec![SourceFile {
            display: display.to_string(),
            text: text.to_string(),
        }],
    };
    let render = |d: Diagnostic| diag::render(&d, &sources, Palette::for_stream(false));
    let mut keep = |_: &yaml::Node, k: yaml::Node, v: yaml::Node| Some((k, v));
    let node = yaml::parse_with(text, 0, &mut keep).map_err(|e| {
        let loc = Loc {
            file: 0,
            line: e.line,
            col: e.col,
            len: 1,
        };
        let mut d = Diagnostic::new(e.message, loc);
        if let Some(h) = e.hint {
            d = d.hint(h);
        }
        render(d)
    })?;
    if matches!(node.value, yaml::Value::Null) {
        return Ok(ServerConfig::default());
    }
    let config: ServerConfig = yaml::from_node(&node).map_err(|e| {
        let e = *e.0;
        let loc = e.loc.unwrap_or(node.loc);
        let message = match &e.field {
            Some(f) if e.message.starts_with("unknown field") => {
                format!("{} in `{f}`", e.message)
            }
            Some(f) if !e.message.contains(f.as_str()) => format!("`{f}`: {}", e.message),
            _ => e.message,
        };
        let mut d = Diagnostic::new(message, loc);
        d = match e.unknown {
            Some((word, expected)) => d.hint(match crate::spec::did_you_mean(&word, &expected) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("allowed here: {}", expected.join(", ")),
            }),
            None => d.hint("docs/install.md describes every field of server.yaml"),
        };
        render(d)
    })?;
    if let Some(i) = &config.interval
        && let Err(e) = super::serve::parse_interval(i)
    {
        let d = Diagnostic::new(format!("`interval`: {e}"), i.loc)
            .hint("a duration such as 30s, 1m or 1h");
        return Err(render(d));
    }
    Ok(config)
}

/// The JSON Schema of server.yaml (`fleetwave schema --server`).
pub fn schema() -> String {
    let schema = schemars::schema_for!(ServerConfig);
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_configuration_reads() {
        let c = parse(
            "server.yaml",
            "source: {url: 'https://git.example/fleet.git', branch: prod}\n\
             interval: 30s\nstate_dir: /srv/fw\nlisten: {http: 8080, https: 8443}\nlog_format: json\n\
             tls: {cert: /etc/fleetwave/tls/cert.pem, key: /etc/fleetwave/tls/key.pem}\n",
        )
        .expect("valid");
        assert_eq!(
            c.source.as_ref().map(|s| s.url.as_str()),
            Some("https://git.example/fleet.git")
        );
        assert_eq!(c.listen.as_ref().and_then(|l| l.http), Some(8080));
        assert_eq!(c.listen.as_ref().and_then(|l| l.https), Some(8443));
        assert_eq!(
            c.tls.map(|t| t.key),
            Some(PathBuf::from("/etc/fleetwave/tls/key.pem"))
        );
        assert_eq!(c.log_format, Some(LogFormat::Json));
    }

    #[test]
    fn a_mistake_is_reported_at_its_line_and_column_with_a_hint() {
        let e = parse("server.yaml", "state_dir: /srv\nlisten:\n  htpp: 8080\n").expect_err("typo");
        assert!(e.contains("server.yaml:3:3"), "{e}");
        assert!(e.contains("did you mean `http`"), "{e}");
        let e = parse("server.yaml", "interval: soon\n").expect_err("bad interval");
        assert!(e.contains("server.yaml:1:11"), "{e}");
        let e = parse("server.yaml", "listen: {http: 70000}\n").expect_err("bad port");
        assert!(e.contains("server.yaml:1:16"), "{e}");
    }

    #[test]
    fn the_packaged_default_reads() {
        let c = parse("dist/server.yaml", include_str!("../../dist/server.yaml")).expect("valid");
        assert_eq!(c.log_format, Some(LogFormat::Text));
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let c = parse("server.yaml", "# nothing set\n").expect("valid");
        assert!(c.source.is_none() && c.listen.is_none());
    }
}
