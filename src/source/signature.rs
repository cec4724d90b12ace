//! Who signed a commit, and whether this server trusts them.
//!
//! The trusted keys come from the server's own configuration (`--trusted-keys FILE`),
//! never from the fleet repository: whoever can push could otherwise add their own key.
//! SSH signatures (SSHSIG, `gpg.format=ssh`) are checked in-process with `ssh-key`;
//! OpenPGP signatures with `gpgv`, GnuPG's verify-only tool, against a keyring made of
//! the configured keys and nothing else (docs/dependencies.md says why).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use base64ct::Encoding;
use ssh_key::{HashAlg, PublicKey, SshSig};

use crate::protocol::CommitSignature;

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("cannot read the trusted keys file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}:{line}: {why}; write SSH keys as `NAME ssh-ed25519 AAAA...` (allowed_signers style) \
         and OpenPGP keys as the armored block `gpg --export --armor KEY` prints"
    )]
    Line {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{path} holds no key: add the SSH or OpenPGP public keys whose commits may be served")]
    Empty { path: PathBuf },
    #[error(
        "{path} holds OpenPGP keys but gpgv cannot run ({why}); install it (apt-get install gpgv)"
    )]
    Gpgv { path: PathBuf, why: String },
    #[error("cannot write the OpenPGP keyring {path}: {source}")]
    Keyring {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One SSH signing key and the name it is trusted under.
#[derive(Debug, Clone)]
struct SshSigner {
    name: String,
    key: PublicKey,
}

/// The keys whose signatures the server trusts.
#[derive(Debug)]
pub struct TrustedKeys {
    /// The file they came from, for messages.
    path: PathBuf,
    ssh: Vec<SshSigner>,
    /// The OpenPGP keys as one binary keyring, gpgv's input; `None` without any.
    keyring: Option<PathBuf>,
    /// A private GnuPG home for gpgv, so it never reads the server user's own keys.
    gnupg_home: PathBuf,
}

/// Unique names for the files one verification hands gpgv.
static NEXT: AtomicU64 = AtomicU64::new(0);

impl TrustedKeys {
    /// Read `path`; the OpenPGP keys are written as a keyring under `work` (a
    /// directory of the server's state).
    pub fn load(path: &Path, work: &Path) -> Result<TrustedKeys, SignatureError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignatureError::Read {
            path: path.to_owned(),
            source,
        })?;
        let line_err = |line: usize, why: String| SignatureError::Line {
            path: path.to_owned(),
            line,
            why,
        };
        let mut ssh = Vec::new();
        let mut keyring = Vec::new();
        let mut armor: Option<(usize, Vec<&str>)> = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if let Some((start, body)) = armor.as_mut() {
                if line == "-----END PGP PUBLIC KEY BLOCK-----" {
                    let bytes = dearmor(body).map_err(|why| line_err(*start, why))?;
                    keyring.extend(bytes);
                    armor = None;
                } else {
                    body.push(line);
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line == "-----BEGIN PGP PUBLIC KEY BLOCK-----" {
                armor = Some((n, Vec::new()));
                continue;
            }
            ssh.push(ssh_line(line).map_err(|why| line_err(n, why))?);
        }
        if let Some((start, _)) = armor {
            return Err(line_err(
                start,
                "an OpenPGP key block with no END line".into(),
            ));
        }
        if ssh.is_empty() && keyring.is_empty() {
            return Err(SignatureError::Empty {
                path: path.to_owned(),
            });
        }
        let gnupg_home = work.join("gnupg");
        let keyring = if keyring.is_empty() {
            None
        } else {
            let write = |p: &Path, bytes: &[u8]| -> Result<(), SignatureError> {
                std::fs::write(p, bytes).map_err(|source| SignatureError::Keyring {
                    path: p.to_owned(),
                    source,
                })
            };
            std::fs::create_dir_all(&gnupg_home).map_err(|source| SignatureError::Keyring {
                path: gnupg_home.clone(),
                source,
            })?;
            set_private(&gnupg_home);
            let file = gnupg_home.join("trusted.gpg");
            write(&file, &keyring)?;
            // Fail at start, not at the first signed commit.
            match Command::new("gpgv").arg("--version").output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return Err(SignatureError::Gpgv {
                        path: path.to_owned(),
                        why: format!("exit {}", o.status),
                    });
                }
                Err(e) => {
                    return Err(SignatureError::Gpgv {
                        path: path.to_owned(),
                        why: e.to_string(),
                    });
                }
            }
            Some(file)
        };
        Ok(TrustedKeys {
            path: path.to_owned(),
            ssh,
            keyring,
            gnupg_home,
        })
    }

    /// How many keys of each kind, for the log.
    pub fn describe(&self) -> String {
        format!(
            "{} SSH key(s){} from {}",
            self.ssh.len(),
            if self.keyring.is_some() {
                " and OpenPGP keys"
            } else {
                ""
            },
            self.path.display()
        )
    }

    /// Who signed `commit` of `repo`, and whether that is trusted.
    pub fn verify(&self, repo: &git2::Repository, commit: &str) -> CommitSignature {
        let untrusted = |format: Option<&str>, why: String| CommitSignature {
            trusted: false,
            format: format.map(str::to_string),
            signer: None,
            key: None,
            why,
        };
        let Ok(oid) = git2::Oid::from_str(commit) else {
            return untrusted(None, format!("`{commit}` is not a commit id"));
        };
        let (sig, data) = match repo.extract_signature(&oid, None) {
            Ok(parts) => parts,
            Err(e) if e.code() == git2::ErrorCode::NotFound => {
                return untrusted(
                    None,
                    "the commit is not signed; sign it (`git commit -S`) with a key the server trusts"
                        .into(),
                );
            }
            Err(e) => {
                return untrusted(
                    None,
                    format!("cannot read the commit's signature: {}", e.message()),
                );
            }
        };
        let (Ok(sig), Ok(data)) = (std::str::from_utf8(&sig), std::str::from_utf8(&data)) else {
            return untrusted(None, "the commit's signature is not text".into());
        };
        if sig
            .trim_start()
            .starts_with("-----BEGIN SSH SIGNATURE-----")
        {
            self.verify_ssh(sig, data.as_bytes())
        } else if sig
            .trim_start()
            .starts_with("-----BEGIN PGP SIGNATURE-----")
        {
            self.verify_pgp(sig, data.as_bytes())
        } else {
            untrusted(
                None,
                "the signature is neither SSH nor OpenPGP (x509 is not supported)".into(),
            )
        }
    }

    fn verify_ssh(&self, pem: &str, data: &[u8]) -> CommitSignature {
        let mut out = CommitSignature {
            trusted: false,
            format: Some("ssh".into()),
            signer: None,
            key: None,
            why: String::new(),
        };
        let sig = match SshSig::from_pem(pem) {
            Ok(s) => s,
            Err(e) => {
                out.why = format!("the SSH signature cannot be read: {e}");
                return out;
            }
        };
        out.key = Some(sig.public_key().fingerprint(HashAlg::Sha256).to_string());
        let Some(signer) = self
            .ssh
            .iter()
            .find(|s| s.key.key_data() == sig.public_key())
        else {
            out.why = format!(
                "signed by an SSH key that is not in {}",
                self.path.display()
            );
            return out;
        };
        out.signer = Some(signer.name.clone());
        match signer.key.verify("git", data, &sig) {
            Ok(()) => {
                out.trusted = true;
                out.why = "a good signature by a trusted key".into();
            }
            Err(e) => {
                out.why = format!(
                    "BAD signature ({e}): the commit was changed after it was signed, or the \
                     signature was copied from another commit"
                );
            }
        }
        out
    }

    fn verify_pgp(&self, armored: &str, data: &[u8]) -> CommitSignature {
        let mut out = CommitSignature {
            trusted: false,
            format: Some("openpgp".into()),
            signer: None,
            key: None,
            why: String::new(),
        };
        let Some(keyring) = &self.keyring else {
            out.why = format!(
                "signed with OpenPGP, and {} holds no OpenPGP key",
                self.path.display()
            );
            return out;
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = self
            .gnupg_home
            .join(format!("verify-{}-{n}", std::process::id()));
        let (sig_file, data_file) = (base.with_extension("sig"), base.with_extension("data"));
        let written = std::fs::write(&sig_file, armored).and(std::fs::write(&data_file, data));
        let run = written.and_then(|()| {
            Command::new("gpgv")
                .env("GNUPGHOME", &self.gnupg_home)
                .arg("--status-fd=1")
                .arg("--keyring")
                .arg(keyring)
                .arg(&sig_file)
                .arg(&data_file)
                .output()
        });
        let _ = std::fs::remove_file(&sig_file);
        let _ = std::fs::remove_file(&data_file);
        let o = match run {
            Ok(o) => o,
            Err(e) => {
                out.why = format!("cannot run gpgv: {e}; install gpgv");
                return out;
            }
        };
        let status = String::from_utf8_lossy(&o.stdout);
        let (mut good, mut valid) = (false, false);
        for line in status.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("[GNUPG:]") {
                continue;
            }
            let word = w.next().unwrap_or("");
            let rest: Vec<&str> = w.collect();
            match word {
                "GOODSIG" => {
                    good = true;
                    out.signer = Some(rest.get(1..).unwrap_or_default().join(" "));
                }
                "VALIDSIG" => {
                    valid = true;
                    // The primary key's fingerprint is the tenth field; the signing
                    // (sub)key's the first.
                    out.key = rest.get(9).or(rest.first()).map(|s| s.to_string());
                }
                "BADSIG" => {
                    out.signer = Some(rest.get(1..).unwrap_or_default().join(" "));
                    out.key = rest.first().map(|s| s.to_string());
                    out.why = "BAD signature: the commit was changed after it was signed, or \
                               the signature was copied from another commit"
                        .into();
                }
                "EXPKEYSIG" | "REVKEYSIG" | "EXPSIG" => {
                    out.signer = Some(rest.get(1..).unwrap_or_default().join(" "));
                    out.key = rest.first().map(|s| s.to_string());
                    out.why = format!("the signing key is expired or revoked ({word})");
                }
                "ERRSIG" => {
                    // The issuer's fingerprint when the signature carries it, else its id.
                    out.key = rest
                        .get(6)
                        .filter(|f| **f != "-")
                        .or(rest.first())
                        .map(|s| s.to_string());
                    if out.why.is_empty() {
                        out.why = if rest.get(5) == Some(&"9") {
                            format!(
                                "signed by an OpenPGP key that is not in {}",
                                self.path.display()
                            )
                        } else {
                            "the OpenPGP signature cannot be checked".into()
                        };
                    }
                }
                _ => {}
            }
        }
        if good && valid && o.status.success() && out.why.is_empty() {
            out.trusted = true;
            out.why = "a good signature by a trusted key".into();
        } else if out.why.is_empty() {
            out.why = format!(
                "gpgv did not accept the signature: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        out
    }
}

/// One allowed_signers-style line: `NAMES [OPTIONS] KEYTYPE BASE64 [COMMENT]`. The
/// options (`namespaces=`, `valid-after=`) are not read: every key here signs git
/// commits only.
fn ssh_line(line: &str) -> Result<SshSigner, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .skip(1)
        .position(|w| w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-"))
        .map(|p| p + 1)
        .ok_or("no SSH key type (ssh-ed25519, ecdsa-sha2-nistp256) after the signer's name")?;
    let Some(b64) = words.get(at + 1) else {
        return Err(format!("{} with no key after it", words[at]));
    };
    let key = PublicKey::from_openssh(&format!("{} {b64}", words[at]))
        .map_err(|e| format!("not an SSH public key: {e}"))?;
    match key.algorithm() {
        ssh_key::Algorithm::Ed25519
        | ssh_key::Algorithm::SkEd25519
        | ssh_key::Algorithm::Ecdsa { .. }
        | ssh_key::Algorithm::SkEcdsaSha2NistP256 => {}
        other => {
            return Err(format!(
                "{other} keys are not supported; sign with an ed25519 key (ssh-keygen -t ed25519)"
            ));
        }
    }
    Ok(SshSigner {
        name: words[0].to_string(),
        key,
    })
}

/// The bytes of an ASCII-armored block's body: header lines, a blank line, base64,
/// then the `=CRC` line (not checked: gpgv checks the key packets themselves).
fn dearmor(lines: &[&str]) -> Result<Vec<u8>, String> {
    let body = match lines.iter().position(|l| l.is_empty()) {
        Some(blank) if lines[..blank].iter().all(|l| l.contains(':')) => &lines[blank + 1..],
        _ => lines,
    };
    let b64: String = body
        .iter()
        .take_while(|l| !l.starts_with('='))
        .copied()
        .collect();
    base64ct::Base64::decode_vec(&b64).map_err(|e| format!("the OpenPGP key block: {e}"))
}

#[cfg(unix)]
fn set_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}
