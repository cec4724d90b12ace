//! The server's image store, reached through the agent API with a task token: what
//! the agent in the netboot environment captures into and deploys from. Connections
//! are kept alive and shared by the worker threads.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::manifest::Manifest;
use super::store::{Repo, StoreError, decompress};
use crate::spec::{Digest, Mac};
use crate::tls::Pin;

pub struct Remote {
    base: String,
    token: String,
    mac: Mac,
    agent: ureq::Agent,
}

type Result<T> = std::result::Result<T, StoreError>;

/// The request never got an answer: name the URL and what to check.
fn unreachable(url: String, e: ureq::Error) -> StoreError {
    let why = match e {
        // The connector's words already say what to check (a pin mismatch names both
        // fingerprints); the server was reached.
        ureq::Error::Io(e) if e.to_string().starts_with("TLS with ") => e.to_string(),
        ureq::Error::Io(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Timeout(_) => format!(
            "{e}: is the server running and reachable from this machine? (the URL comes from \
             --server or fleetwave.server=)"
        ),
        e => e.to_string(),
    };
    StoreError::Server { url, why }
}

impl Remote {
    /// `server` is the base URL, e.g. `http://172.28.0.1` or `https://172.28.0.1:443`;
    /// an https server's certificate must have the SHA-256 `pin`, or without one
    /// chain to the system's roots.
    pub fn new(server: &str, token: &str, mac: Mac, pin: Option<Pin>) -> Remote {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build();
        Remote {
            base: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            mac,
            agent: crate::tls::agent(config, pin),
        }
    }

    /// The MAC the token is bound to.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.base)
    }

    /// A failure of the request to `path`, named by its URL.
    fn net(&self, path: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Server {
            url: self.url(path),
            why: e.to_string(),
        }
    }

    fn auth(&self) -> (String, String) {
        (format!("Bearer {}", self.token), self.mac.to_string())
    }

    /// Send `body` as JSON to `path` (POST), expecting `want`; the response body.
    pub fn post_json(&self, path: &str, body: &impl Serialize) -> Result<Vec<u8>> {
        let (auth, mac) = self.auth();
        let text = serde_json::to_vec(body).map_err(|e| self.net(path, e))?;
        let mut r = self
            .agent
            .post(self.url(path))
            .header("Authorization", &auth)
            .header("X-Fleetwave-Mac", &mac)
            .header("Content-Type", "application/json")
            .send(&text[..])
            .map_err(|e| unreachable(self.url(path), e))?;
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(|e| self.net(path, e))?;
        if !(200..300).contains(&status) {
            return Err(self.net(
                path,
                format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
            ));
        }
        Ok(body)
    }

    fn get(&self, path: &str, limit: u64) -> Result<(u16, Vec<u8>)> {
        let (auth, mac) = self.auth();
        let mut r = self
            .agent
            .get(self.url(path))
            .header("Authorization", &auth)
            .header("X-Fleetwave-Mac", &mac)
            .call()
            .map_err(|e| unreachable(self.url(path), e))?;
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| self.net(path, e))?;
        Ok((status, body))
    }

    /// The task this token was minted for.
    pub fn task(&self) -> Result<crate::protocol::Assignment> {
        let (status, body) = self.get("task", 1 << 20)?;
        if status != 200 {
            return Err(self.net(
                "task",
                format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| self.net("task", e))
    }
}

impl Repo for Remote {
    fn lacks(&self, d: &Digest) -> Result<bool> {
        Ok(self.lacks_many(std::slice::from_ref(d))?[0])
    }

    fn lacks_many(&self, ds: &[Digest]) -> Result<Vec<bool>> {
        let body = self.post_json("chunks/missing", &ds)?;
        let missing: Vec<Digest> =
            serde_json::from_slice(&body).map_err(|e| self.net("chunks/missing", e))?;
        Ok(ds.iter().map(|d| missing.contains(d)).collect())
    }

    fn put_chunk(&self, d: &Digest, _data: &[u8], compressed: &[u8]) -> Result<u64> {
        let (auth, mac) = self.auth();
        let path = format!("chunks/{d}");
        let mut r = self
            .agent
            .put(self.url(&path))
            .header("Authorization", &auth)
            .header("X-Fleetwave-Mac", &mac)
            .send(compressed)
            .map_err(|e| unreachable(self.url(&path), e))?;
        let status = r.status().as_u16();
        if !(200..300).contains(&status) {
            let text = r.body_mut().read_to_string().unwrap_or_default();
            return Err(self.net(&path, format!("HTTP {status}: {}", text.trim())));
        }
        Ok(compressed.len() as u64)
    }

    fn chunk(&self, d: &Digest, len: usize) -> Result<Vec<u8>> {
        let path = format!("chunks/{d}");
        let (status, raw) = self.get(&path, (len as u64) * 2 + 65536)?;
        match status {
            200 => {}
            404 => return Err(StoreError::MissingChunk(*d)),
            s => {
                return Err(self.net(
                    &path,
                    format!("HTTP {s}: {}", String::from_utf8_lossy(&raw).trim()),
                ));
            }
        }
        let corrupt = |actual| StoreError::CorruptChunk {
            digest: *d,
            actual,
            path: PathBuf::from(self.url(&path)),
        };
        let data = decompress(&raw, len).map_err(|_| corrupt(Digest([0; 32])))?;
        let actual = Digest(*blake3::hash(&data).as_bytes());
        if actual != *d {
            return Err(corrupt(actual));
        }
        Ok(data)
    }

    fn manifest(&self, d: &Digest) -> Result<Manifest> {
        let path = format!("manifests/{d}");
        let (status, body) = self.get(&path, 1 << 30)?;
        match status {
            200 => {}
            404 => return Err(StoreError::MissingManifest(*d)),
            s => return Err(self.net(&path, format!("HTTP {s}"))),
        }
        if Manifest::digest_of(&body) != *d {
            return Err(StoreError::CorruptManifest {
                digest: *d,
                path: PathBuf::from(self.url(&path)),
                why: "what the server sent does not hash to its name".into(),
            });
        }
        let m: Manifest = serde_json::from_slice(&body).map_err(|e| self.net(&path, e))?;
        m.check().map_err(|why| StoreError::CorruptManifest {
            digest: *d,
            path: PathBuf::from(self.url(&path)),
            why,
        })?;
        Ok(m)
    }

    fn commit(&self, m: &Manifest, image: Option<(&str, u64)>) -> Result<(Digest, u64)> {
        let (auth, mac) = self.auth();
        let mut url = self.url("manifests");
        if let Some((name, generation)) = image {
            url = format!("{url}?image={name}&generation={generation}");
        }
        let mut r = self
            .agent
            .put(&url)
            .header("Authorization", &auth)
            .header("X-Fleetwave-Mac", &mac)
            .header("Content-Type", "application/json")
            .send(&m.to_bytes()[..])
            .map_err(|e| unreachable(url.clone(), e))?;
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .read_to_vec()
            .map_err(|e| self.net("manifests", e))?;
        if status != 201 {
            return Err(self.net(
                "manifests",
                format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
            ));
        }
        #[derive(serde::Deserialize)]
        struct Committed {
            digest: Digest,
            stored_bytes: u64,
        }
        let c: Committed = serde_json::from_slice(&body).map_err(|e| self.net("manifests", e))?;
        Ok((c.digest, c.stored_bytes))
    }
}
