//! Access control and traceability against real tools: commits signed with `git
//! commit -S` by ssh-keygen and gpg keys the test makes, served by the whole server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fleetwave::protocol::FleetStatus;
use fleetwave::reconcile::follow::{Signatures, Untrusted};
use fleetwave::server::Security;
use fleetwave::source::signature::TrustedKeys;

use crate::controller::{Repo, Running, Secrets, serve, wait_for};
use crate::tool;

const PC1: &str = "52:54:00:28:00:11";
const PC2: &str = "52:54:00:28:00:12";

/// Two hosts: pc01 asked to wipe (destructive), pc02 to take inventory, both at
/// `generation` (0: nothing asked).
fn fleet(generation: u64) -> String {
    let actions = |a: &str| {
        if generation == 0 {
            String::new()
        } else {
            format!(
                ", actions: {{{a}: {{generation: {generation}{}}}}}",
                if a == "wipe" { ", mode: fast" } else { "" }
            )
        }
    };
    format!(
        "{}hosts:\n  pc01: {{mac: \"{PC1}\", site: lab{}}}\n  pc02: {{mac: \"{PC2}\", site: lab{}}}\n",
        crate::LAB_SITE,
        actions("wipe"),
        actions("inventory"),
    )
}

/// How a commit is signed.
enum Sign<'a> {
    Unsigned,
    /// With this SSH private key (its `.pub` beside it).
    Ssh(&'a Path),
    /// With this OpenPGP key (fingerprint) of a GnuPG home.
    Gpg {
        home: &'a Path,
        key: &'a str,
    },
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn git(repo: &Repo) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(&repo.work).args([
        "-c",
        "user.name=fleet",
        "-c",
        "user.email=fleet@example.org",
    ]);
    c
}

/// Commit `text` as fleet.yaml, signed as asked, and push it; the commit id.
fn commit(repo: &Repo, text: &str, sign: Sign) -> String {
    std::fs::write(repo.work.join("fleet.yaml"), text).expect("write");
    run(git(repo).args(["add", "fleet.yaml"]));
    let mut c = git(repo);
    match sign {
        Sign::Unsigned => {
            c.args(["commit", "-q", "-m", "unsigned"]);
        }
        Sign::Ssh(key) => {
            c.args(["-c", "gpg.format=ssh", "-c"])
                .arg(format!("user.signingkey={}.pub", key.display()))
                .args(["commit", "-q", "-S", "-m", "signed with ssh"]);
        }
        Sign::Gpg { home, key } => {
            c.env("GNUPGHOME", home)
                .args(["-c", "gpg.format=openpgp", "-c"])
                .arg(format!("user.signingkey={key}"))
                .args(["commit", "-q", "-S", "-m", "signed with gpg"]);
        }
    }
    run(&mut c);
    run(git(repo).args(["push", "-q", "-f", "origin", "main"]));
    run(git(repo).args(["rev-parse", "HEAD"]))
}

/// A commit with `signed`'s header and signature but `other`'s tree: a trusted
/// signature lifted onto content nobody signed. Pushed; its id.
fn tamper(repo: &Repo, signed: &str, other: &str) -> String {
    let text = run(git(repo).args(["cat-file", "commit", signed]));
    let tree = run(git(repo).args(["rev-parse", &format!("{other}^{{tree}}")]));
    let forged = text
        .lines()
        .map(|l| {
            if l.starts_with("tree ") {
                format!("tree {tree}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let path = repo.work.join("forged");
    std::fs::write(&path, forged).expect("write");
    let id = run(git(repo)
        .args(["hash-object", "-t", "commit", "-w"])
        .arg(&path));
    run(git(repo).args(["update-ref", "refs/heads/main", &id]));
    run(git(repo).args(["push", "-q", "-f", "origin", "main"]));
    id
}

/// An ed25519 SSH key `dir/name` (and `.pub`); its allowed_signers line and its
/// SHA256 fingerprint.
fn ssh_key(dir: &Path, name: &str) -> (PathBuf, String, String) {
    let key = dir.join(name);
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key));
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("pub");
    let fp = run(Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub")));
    let fp = fp
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string();
    (key, format!("{name}@example.org {}", public.trim()), fp)
}

/// An OpenPGP signing key in a fresh GnuPG home: the home, the key's fingerprint and
/// its armored public key.
fn gpg_key(dir: &Path, name: &str) -> (PathBuf, String, String) {
    let home = dir.join(format!("gnupg-{name}"));
    std::fs::create_dir_all(&home).expect("mkdir");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let gpg = || {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", &home).args([
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        c
    };
    run(gpg().args([
        "--quick-gen-key",
        &format!("{name} <{}@example.org>", name.to_lowercase()),
        "ed25519",
        "sign",
        "never",
    ]));
    let listing = run(gpg().args(["--with-colons", "--list-keys"]));
    let fpr = listing
        .lines()
        .find_map(|l| l.strip_prefix("fpr:"))
        .and_then(|l| l.split(':').find(|f| f.len() == 40))
        .expect("fingerprint")
        .to_string();
    let armored = run(gpg().args(["--armor", "--export", &fpr]));
    (home, fpr, armored)
}

/// Stops a GnuPG home's agent when the test ends.
struct Agents(Vec<PathBuf>);

impl Drop for Agents {
    fn drop(&mut self) {
        for home in &self.0 {
            let _ = Command::new("gpgconf")
                .env("GNUPGHOME", home)
                .args(["--kill", "gpg-agent"])
                .status();
        }
    }
}

fn tools() -> bool {
    tool("git", "/usr/bin/git")
        && tool("openssh-client", "/usr/bin/ssh-keygen")
        && tool("gnupg", "/usr/bin/gpg")
        && tool("gpgv", "/usr/bin/gpgv")
}

/// The server following `repo`, trusting the keys in `trusted` (file text).
fn serve_signed(d: &Path, repo: &Repo, trusted: &str, untrusted: Untrusted) -> Running {
    let file = d.join("trusted-keys");
    std::fs::write(&file, trusted).expect("write");
    std::fs::create_dir_all(d.join("state")).expect("mkdir");
    let keys = TrustedKeys::load(&file, &d.join("state")).expect("trusted keys");
    let security = Security {
        signatures: Some(Arc::new(Signatures {
            keys,
            required: true,
            untrusted,
        })),
    };
    serve(
        d,
        repo.origin(),
        &d.join("store"),
        Secrets {
            security,
            ..Default::default()
        },
    )
}

fn attempted(url: &str, id: &str) -> FleetStatus {
    wait_for(
        url,
        &format!("{id} attempted"),
        Duration::from_secs(30),
        |s| s.attempted.as_ref().is_some_and(|c| c.id == id),
    )
}

fn host_task(s: &FleetStatus, host: &str) -> Option<String> {
    s.hosts.iter().find(|h| h.name == host)?.task.clone()
}

#[test]
fn ssh_signed_commits_are_served_and_unsigned_untrusted_or_tampered_ones_refused() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (alice, alice_line, alice_fp) = ssh_key(d, "alice");
    let (mallory, _, mallory_fp) = ssh_key(d, "mallory");
    let repo = Repo::new(d);
    let trusted = commit(&repo, &fleet(1), Sign::Ssh(&alice));
    let server = serve_signed(
        d,
        &repo,
        &format!("# who may change the fleet\n{alice_line}\n"),
        Untrusted::Nothing,
    );
    let url = server.url.as_str();
    // A trusted commit is served, its signer shown; its wipe is armed.
    let s = wait_for(
        url,
        "the trusted commit applied",
        Duration::from_secs(30),
        |s| s.applied.as_ref().is_some_and(|c| c.id == trusted) && host_task(s, "pc01").is_some(),
    );
    let sig = s
        .applied
        .as_ref()
        .and_then(|c| c.signature.clone())
        .expect("signature");
    assert!(sig.trusted, "{sig:?}");
    assert_eq!(sig.signer.as_deref(), Some("alice@example.org"));
    assert_eq!(sig.key.as_deref(), Some(alice_fp.as_str()));
    assert!(host_task(&s, "pc01").is_some_and(|t| t.contains("generation 1")));

    // Unsigned: refused, the trusted commit keeps serving (its task unchanged).
    let unsigned = commit(&repo, &fleet(2), Sign::Unsigned);
    let s = attempted(url, &unsigned);
    assert_eq!(
        s.applied.as_ref().map(|c| c.id.as_str()),
        Some(trusted.as_str())
    );
    let problems = &s.attempted.as_ref().expect("attempted").problems;
    assert!(problems[0].starts_with("UntrustedCommit"), "{problems:?}");
    assert!(problems[0].contains("not signed"), "{problems:?}");
    assert!(host_task(&s, "pc01").is_some_and(|t| t.contains("generation 1")));

    // Signed by a key the server does not trust: refused, the key named.
    let foreign = commit(&repo, &fleet(3), Sign::Ssh(&mallory));
    let s = attempted(url, &foreign);
    let sig = s
        .attempted
        .as_ref()
        .and_then(|c| c.signature.clone())
        .expect("signature");
    assert!(!sig.trusted);
    assert_eq!(sig.key.as_deref(), Some(mallory_fp.as_str()));
    assert_eq!(sig.signer, None);
    assert!(sig.why.contains("not in"), "{sig:?}");
    assert_eq!(
        s.applied.as_ref().map(|c| c.id.as_str()),
        Some(trusted.as_str())
    );

    // Alice's signature lifted onto the unsigned commit's tree: a bad signature.
    let forged = tamper(&repo, &trusted, &unsigned);
    let s = attempted(url, &forged);
    let sig = s
        .attempted
        .as_ref()
        .and_then(|c| c.signature.clone())
        .expect("signature");
    assert!(!sig.trusted);
    assert!(sig.why.contains("BAD signature"), "{sig:?}");
    assert_eq!(
        s.applied.as_ref().map(|c| c.id.as_str()),
        Some(trusted.as_str())
    );
    assert!(host_task(&s, "pc01").is_some_and(|t| t.contains("generation 1")));

    // A restart on the forged head still serves the last trusted commit.
    drop(server);
    let server = serve_signed(d, &repo, &format!("{alice_line}\n"), Untrusted::Nothing);
    let url = server.url.as_str();
    let s = attempted(url, &forged);
    assert_eq!(
        s.applied.as_ref().map(|c| c.id.as_str()),
        Some(trusted.as_str())
    );
    let s = wait_for(url, "the trusted task kept", Duration::from_secs(30), |s| {
        host_task(s, "pc01").is_some()
    });
    assert!(host_task(&s, "pc01").is_some_and(|t| t.contains("generation 1")));

    // A trusted commit again: served, and its wipe replaces the old one.
    run(git(&repo).args(["reset", "-q", "--hard", &trusted]));
    let next = commit(&repo, &fleet(4), Sign::Ssh(&alice));
    wait_for(
        url,
        "the next trusted commit applied",
        Duration::from_secs(30),
        |s| {
            s.applied.as_ref().is_some_and(|c| c.id == next)
                && host_task(s, "pc01").is_some_and(|t| t.contains("generation 4"))
        },
    );
}

#[test]
fn gpg_signed_commits_by_trusted_keys_are_served_and_others_refused_with_their_key() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (alice_home, alice_fpr, alice_pub) = gpg_key(d, "Alice");
    let (mallory_home, mallory_fpr, _) = gpg_key(d, "Mallory");
    let _agents = Agents(vec![alice_home.clone(), mallory_home.clone()]);
    let repo = Repo::new(d);
    let trusted = commit(
        &repo,
        &fleet(1),
        Sign::Gpg {
            home: &alice_home,
            key: &alice_fpr,
        },
    );
    let server = serve_signed(d, &repo, &format!("{alice_pub}\n"), Untrusted::Nothing);
    let url = server.url.as_str();
    let s = wait_for(
        url,
        "the trusted commit applied",
        Duration::from_secs(30),
        |s| s.applied.as_ref().is_some_and(|c| c.id == trusted),
    );
    let sig = s
        .applied
        .as_ref()
        .and_then(|c| c.signature.clone())
        .expect("signature");
    assert!(sig.trusted, "{sig:?}");
    assert_eq!(sig.format.as_deref(), Some("openpgp"));
    assert!(
        sig.signer
            .as_deref()
            .is_some_and(|n| n.contains("alice@example.org")),
        "{sig:?}"
    );
    assert_eq!(sig.key.as_deref(), Some(alice_fpr.as_str()));

    let foreign = commit(
        &repo,
        &fleet(2),
        Sign::Gpg {
            home: &mallory_home,
            key: &mallory_fpr,
        },
    );
    let s = attempted(url, &foreign);
    let sig = s
        .attempted
        .as_ref()
        .and_then(|c| c.signature.clone())
        .expect("signature");
    assert!(!sig.trusted, "{sig:?}");
    assert!(sig.why.contains("not in"), "{sig:?}");
    // gpgv names the issuer by fingerprint (or its last 16 digits, the key id).
    let key = sig.key.clone().unwrap_or_default();
    assert!(
        !key.is_empty() && mallory_fpr.ends_with(&key),
        "{key} vs {mallory_fpr}"
    );
    assert_eq!(
        s.applied.as_ref().map(|c| c.id.as_str()),
        Some(trusted.as_str())
    );

    // Alice's signature over other content.
    let forged = tamper(&repo, &trusted, &foreign);
    let s = attempted(url, &forged);
    let sig = s
        .attempted
        .as_ref()
        .and_then(|c| c.signature.clone())
        .expect("signature");
    assert!(!sig.trusted);
    assert!(sig.why.contains("BAD signature"), "{sig:?}");
}

#[test]
fn an_untrusted_commit_may_take_inventory_but_never_wipe_under_non_destructive() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (alice, alice_line, _) = ssh_key(d, "alice");
    let repo = Repo::new(d);
    let trusted = commit(&repo, &fleet(0), Sign::Ssh(&alice));
    let server = serve_signed(d, &repo, &alice_line, Untrusted::NonDestructive);
    let url = server.url.as_str();
    wait_for(
        url,
        "the trusted commit applied",
        Duration::from_secs(30),
        |s| s.applied.as_ref().is_some_and(|c| c.id == trusted),
    );
    let unsigned = commit(&repo, &fleet(1), Sign::Unsigned);
    let s = wait_for(
        url,
        "inventory armed, wipe held",
        Duration::from_secs(30),
        |s| {
            s.applied.as_ref().is_some_and(|c| c.id == unsigned)
                && host_task(s, "pc02").is_some()
                && s.hosts
                    .iter()
                    .any(|h| h.name == "pc01" && h.reason.as_deref() == Some("UntrustedCommit"))
        },
    );
    assert!(s.applied.as_ref().is_some_and(|c| c.restricted));
    assert!(host_task(&s, "pc02").is_some_and(|t| t.starts_with("inventory")));
    let pc01 = s.hosts.iter().find(|h| h.name == "pc01").expect("pc01");
    assert_eq!(pc01.state, "Stalled");
    assert_eq!(pc01.task, None);
    assert!(
        pc01.message.as_deref().is_some_and(|m| m.contains("wipe")),
        "{pc01:?}"
    );
    // Its boot script boots the disk, not the agent.
    let script = crate::controller::script(url, PC1);
    assert!(!script.contains("fleetwave.token="), "{script}");
}

/// The events of the state database in `dir`, as `fleetwave audit --json` prints them.
fn audit_events(state: &Path) -> Vec<fleetwave::state::EventRow> {
    let (code, out) = crate::fleetwave(&[
        "audit",
        "--json",
        "--state-dir",
        state.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{out}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("an event"))
        .collect()
}

fn audit_verify(state: &Path) -> (i32, String) {
    crate::fleetwave(&[
        "audit",
        "verify",
        "--state-dir",
        state.to_str().expect("utf-8"),
    ])
}

#[test]
fn the_audit_trail_records_who_did_what_and_verify_names_an_edited_or_deleted_event() {
    if !tools() || !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") {
        return;
    }
    use crate::controller::{REF, agent, lab_fleet, reference_disk, token};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (alice, alice_line, alice_fp) = ssh_key(d, "alice");
    let repo = Repo::new(d);
    let first = commit(&repo, &lab_fleet(1), Sign::Ssh(&alice));
    let server = serve_signed(d, &repo, &alice_line, Untrusted::Nothing);
    let url = server.url.as_str();
    let limit = Duration::from_secs(30);
    wait_for(url, "the capture armed", limit, |s| {
        crate::controller::state_of(s, "ref-win10") == "Armed"
    });
    let t = token(url, REF).expect("token");
    let (code, out) = agent(url, REF, &t, &reference_disk(d));
    assert_eq!(code, 0, "{out}");
    wait_for(url, "the pilot armed", limit, |s| {
        crate::controller::state_of(s, "pc01") == "Armed"
    });
    drop(server);

    // The version records who made it.
    let store = fleetwave::image::store::Store::open(&d.join("store")).expect("store");
    let images = store.images().expect("images");
    let v = &images["win10"].versions[0];
    let made = v.made_by.clone().expect("made_by");
    assert_eq!(made.host.as_deref(), Some("ref-win10"));
    assert_eq!(made.mac, REF);
    assert_eq!(made.commit.as_deref(), Some(first.as_str()));
    assert_eq!(made.signer.as_deref(), Some("alice@example.org"));

    // Every action is an event with its commit, signer, task, token id and outcome.
    let state = d.join("state");
    let events = audit_events(&state);
    let find = |kind: &str| {
        events
            .iter()
            .find(|e| e.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} event in {events:#?}"))
    };
    let applied = find("CommitApplied");
    assert_eq!(applied.commit.as_deref(), Some(first.as_str()));
    assert_eq!(applied.signer.as_deref(), Some("alice@example.org"));
    assert_eq!(applied.outcome.as_deref(), Some("applied"));
    let armed = find("Armed");
    let tid = fleetwave::state::token_id(&t);
    assert_eq!(armed.token.as_deref(), Some(tid.as_str()));
    assert_eq!(armed.task, Some(made.task));
    assert_eq!(armed.host.as_deref(), Some("ref-win10"));
    let done = find("TaskSucceeded");
    assert_eq!(
        (done.task, done.outcome.as_deref()),
        (Some(made.task), Some("ok"))
    );
    assert_eq!(done.token.as_deref(), Some(tid.as_str()));
    let committed = find("ImageVersionCommitted");
    assert_eq!(committed.signer.as_deref(), Some("alice@example.org"));
    assert!(
        events.iter().any(|e| e.kind == "Progress"),
        "no progress milestone"
    );
    // Each link names the one before.
    for w in events.windows(2) {
        assert_eq!(w[1].prev, w[0].hash, "event {}", w[1].id);
    }
    // The token itself is nowhere in the records.
    let copy = std::fs::read_to_string(state.join("audit.jsonl")).expect("audit.jsonl");
    assert_eq!(copy.lines().count(), events.len());
    assert!(!copy.contains(&t), "the token is in the audit file");
    let _ = alice_fp;

    let (code, out) = audit_verify(&state);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("unbroken"), "{out}");
    let (code, out) = crate::fleetwave(&[
        "audit",
        "--state-dir",
        state.to_str().expect("utf-8"),
        "--host",
        "ref-win10",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("TaskSucceeded") && !out.contains("CommitApplied"),
        "{out}"
    );

    // A row edited in the database: caught at that row.
    let victim = armed.id;
    let save = d.join("saved");
    std::fs::create_dir_all(&save).expect("mkdir");
    for f in ["state.db", "audit.jsonl"] {
        std::fs::copy(state.join(f), save.join(f)).expect("copy");
    }
    let db = rusqlite::Connection::open(state.join("state.db")).expect("db");
    db.execute(
        "UPDATE events SET host = 'pc02' WHERE id = ?1",
        [victim as i64],
    )
    .expect("edit");
    drop(db);
    let (code, out) = audit_verify(&state);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("event {victim}:")) && out.contains("edited"),
        "{out}"
    );

    // Its hash recomputed too (a careful forger): the chain breaks at the next one.
    let db = rusqlite::Connection::open(state.join("state.db")).expect("db");
    let mut e = audit_events(&state)
        .into_iter()
        .find(|e| e.id == victim)
        .expect("event");
    e.hash = fleetwave::state::audit::event_hash(&e);
    db.execute(
        "UPDATE events SET hash = ?2 WHERE id = ?1",
        rusqlite::params![victim as i64, e.hash],
    )
    .expect("rehash");
    drop(db);
    let (code, out) = audit_verify(&state);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("event {}:", victim + 1)), "{out}");

    // A row deleted: named as missing.
    for f in ["state.db", "audit.jsonl"] {
        std::fs::copy(save.join(f), state.join(f)).expect("restore");
    }
    let _ = std::fs::remove_file(state.join("state.db-wal"));
    let _ = std::fs::remove_file(state.join("state.db-shm"));
    let db = rusqlite::Connection::open(state.join("state.db")).expect("db");
    db.execute("DELETE FROM events WHERE id = ?1", [victim as i64])
        .expect("delete");
    drop(db);
    let (code, out) = audit_verify(&state);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("event {victim}:")) && out.contains("missing"),
        "{out}"
    );

    // The whole chain rewritten consistently in the database: the copy disagrees.
    for f in ["state.db", "audit.jsonl"] {
        std::fs::copy(save.join(f), state.join(f)).expect("restore");
    }
    let db = rusqlite::Connection::open(state.join("state.db")).expect("db");
    let mut prev = String::new();
    for mut e in audit_events(&state) {
        if e.id == victim {
            e.host = Some("pc02".into());
        }
        e.prev = prev;
        e.hash = fleetwave::state::audit::event_hash(&e);
        db.execute(
            "UPDATE events SET host = ?2, prev = ?3, hash = ?4 WHERE id = ?1",
            rusqlite::params![e.id as i64, e.host, e.prev, e.hash],
        )
        .expect("rewrite");
        prev = e.hash;
    }
    drop(db);
    let (code, out) = audit_verify(&state);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit.jsonl line") && out.contains(&format!("event {victim}:")),
        "{out}"
    );
}

/// A request with `token` as its bearer: the status code.
fn call(method: &str, url: &str, token: &str) -> u16 {
    let agent = crate::controller::http();
    let auth = format!("Bearer {token}");
    let r = match method {
        "POST" => agent.post(url).header("Authorization", &auth).send_empty(),
        _ => agent.get(url).header("Authorization", &auth).call(),
    };
    r.expect("request").status().as_u16()
}

#[test]
fn admin_tokens_are_scoped_revocable_stored_hashed_and_every_use_is_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("fleet.yaml"), fleet(0)).expect("write");
    let server = serve(
        d,
        fleetwave::source::watch::Origin::Dir(d.join("fleet.yaml")),
        &d.join("store"),
        Secrets::default(),
    );
    let url = server.url.as_str();
    wait_for(url, "applied", Duration::from_secs(20), |s| {
        s.applied.is_some()
    });
    let boot = crate::controller::admin_token_file(d);
    let bf = boot.to_str().expect("utf-8");
    // No token, or a wrong one: refused, for reading too.
    let status_url = format!("{url}/api/v1/status");
    let code = crate::controller::http()
        .get(&status_url)
        .call()
        .expect("GET")
        .status()
        .as_u16();
    assert_eq!(code, 401);
    assert_eq!(call("GET", &status_url, "fwa_not-a-token"), 401);

    // The bootstrap token makes a read token and an operate token.
    let make = |name: &str, scope: &str| {
        let (code, out) = crate::fleetwave(&[
            "token",
            "create",
            name,
            "--scope",
            scope,
            "--server",
            url,
            "--token-file",
            bf,
        ]);
        assert_eq!(code, 0, "{out}");
        out.lines().next().expect("the token").to_string()
    };
    let read = make("dashboard", "read");
    let operate = make("alice", "operate");
    assert!(
        read.starts_with("fwa_") && operate.starts_with("fwa_"),
        "{read}"
    );
    assert_eq!(call("GET", &status_url, &read), 200);
    let sync_url = format!("{url}/api/v1/sync");
    assert_eq!(
        call("POST", &sync_url, &read),
        403,
        "a read token may not sync"
    );
    assert_eq!(call("POST", &sync_url, &operate), 202);
    let (code, out) = crate::fleetwave(&["token", "list", "--server", url, "--token-file", bf]);
    assert_eq!(code, 0, "{out}");
    let read_id = fleetwave::state::token_id(&read);
    assert!(
        out.contains(&read_id) && out.contains("dashboard") && out.contains("operate"),
        "{out}"
    );

    // Revoked: refused from then on.
    let (code, out) = crate::fleetwave(&[
        "token",
        "revoke",
        &read_id,
        "--server",
        url,
        "--token-file",
        bf,
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(call("GET", &status_url, &read), 403);
    drop(server);

    // Stored as hashes only; every use is in the audit trail by token id.
    let state = d.join("state");
    let db = rusqlite::Connection::open(state.join("state.db")).expect("db");
    let stored: Vec<String> = db
        .prepare("SELECT id || name || scope || hash FROM admin_tokens")
        .expect("query")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(stored.len(), 2);
    for row in &stored {
        assert!(
            !row.contains(&read[4..]) && !row.contains(&operate[4..]),
            "{row}"
        );
    }
    drop(db);
    let events = audit_events(&state);
    let uses = |id: &str, outcome: &str| {
        events
            .iter()
            .filter(|e| e.token.as_deref() == Some(id) && e.outcome.as_deref() == Some(outcome))
            .count()
    };
    assert!(uses(&read_id, "ok") >= 1, "{events:#?}");
    assert!(uses(&read_id, "denied") >= 2, "the 403s are recorded");
    let op_id = fleetwave::state::token_id(&operate);
    assert!(events.iter().any(|e| e.kind == "AdminCall"
        && e.token.as_deref() == Some(op_id.as_str())
        && e.message.contains("POST /api/v1/sync by alice")));
    assert!(events.iter().any(|e| e.kind == "AdminTokenRevoked"));
    let copy = std::fs::read_to_string(state.join("audit.jsonl")).expect("audit.jsonl");
    assert!(!copy.contains(&read[4..]) && !copy.contains(crate::controller::TEST_ADMIN));
    let (code, out) = audit_verify(&state);
    assert_eq!(code, 0, "{out}");
}

/// A TCP connection to `port` on 127.0.0.1 from the loopback address `from`.
pub(crate) fn connect_from(from: [u8; 4], port: u16) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&std::net::SocketAddr::from((from, 0)).into())
        .expect("bind a loopback address");
    s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("connect");
    s.into()
}

/// Whether the server closed `c` (reads end of stream) rather than keeping it.
pub(crate) fn closed(c: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    // Generous: the server closes at once (the bound) or at its header timeout.
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut b = [0u8; 64];
    matches!(c.read(&mut b), Ok(0))
        || matches!(c.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

#[test]
fn a_thousand_idle_connections_do_not_keep_a_real_client_out() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("fleet.yaml"), fleet(0)).expect("write");
    let server = serve(
        d,
        fleetwave::source::watch::Origin::Dir(d.join("fleet.yaml")),
        &d.join("store"),
        Secrets::default(),
    );
    let port: u16 = server
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    // 1,000 idle connections, from 20 addresses (50 each, under the per-client bound):
    // the server holds every one, and both ends live in this process.
    let mut idle = Vec::new();
    for i in 0..1000u32 {
        idle.push(connect_from([127, 0, 1, (i / 50) as u8 + 1], port));
    }
    // A real client, from elsewhere, is answered.
    let mut c = connect_from([127, 0, 2, 1], port);
    c.write_all(b"GET /health HTTP/1.1\r\nHost: fleetwave\r\nConnection: close\r\n\r\n")
        .expect("request");
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // One address past its bound: the next connection is closed at once.
    let mut one: Vec<_> = (0..fleetwave::services::http::MAX_CONNECTIONS_PER_CLIENT)
        .map(|_| connect_from([127, 0, 3, 1], port))
        .collect();
    let mut over = connect_from([127, 0, 3, 1], port);
    assert!(
        closed(&mut over),
        "a connection past the per-client bound was kept"
    );
    // An idle connection is closed once it has sent no request for the header timeout.
    assert!(closed(&mut one[0]), "an idle connection was kept open");
    assert!(closed(&mut idle[0]), "an idle connection was kept open");
    drop(server);
}

#[test]
fn an_image_version_is_removed_through_the_api_with_an_operate_token_and_audited() {
    use fleetwave::image::store::{Store, VersionRecord};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("fleet.yaml"), fleet(0)).expect("write");
    let store = Store::open(&d.join("store")).expect("store");
    let digest = format!("blake3:{}", "ab".repeat(32));
    for (i, g) in [(0u8, 1u64), (1, 2)] {
        let mut dg: fleetwave::spec::Digest = digest.parse().expect("digest");
        dg.0[0] = i;
        store
            .add_version(
                "win10",
                VersionRecord {
                    digest: dg,
                    generation: g,
                    captured_at: 0,
                    disk_bytes: 1 << 20,
                    stored_bytes: 1 << 19,
                    made_by: None,
                },
            )
            .expect("version");
    }
    let first = store.images().expect("images")["win10"].versions[0].digest;
    let server = serve(
        d,
        fleetwave::source::watch::Origin::Dir(d.join("fleet.yaml")),
        &d.join("store"),
        Secrets::default(),
    );
    let url = server.url.as_str();
    wait_for(url, "applied", Duration::from_secs(20), |s| {
        s.applied.is_some()
    });
    let boot = crate::controller::admin_token_file(d);
    let bf = boot.to_str().expect("utf-8");
    let (code, out) = crate::fleetwave(&[
        "token",
        "create",
        "viewer",
        "--scope",
        "read",
        "--server",
        url,
        "--token-file",
        bf,
    ]);
    assert_eq!(code, 0, "{out}");
    let read_file = d.join("read.token");
    std::fs::write(&read_file, out.lines().next().expect("token")).expect("write");
    let spec = format!("win10@{first}");
    // A read token may not remove.
    let (code, out) = crate::fleetwave(&[
        "image",
        "rm",
        &spec,
        "--server",
        url,
        "--token-file",
        read_file.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("403"), "{out}");
    assert_eq!(store.images().expect("images")["win10"].versions.len(), 2);
    let (code, out) =
        crate::fleetwave(&["image", "rm", &spec, "--server", url, "--token-file", bf]);
    assert_eq!(code, 0, "{out}");
    let left = &store.images().expect("images")["win10"].versions;
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].digest, first);
    drop(server);
    let events = audit_events(&d.join("state"));
    let removed = events
        .iter()
        .find(|e| e.kind == "ImageVersionRemoved")
        .expect("an ImageVersionRemoved event");
    assert!(removed.message.contains(&spec) && removed.message.contains("bootstrap"));
    assert_eq!(removed.outcome.as_deref(), Some("removed"));
    assert!(
        events
            .iter()
            .any(|e| e.kind == "AdminDenied" && e.message.contains("DELETE"))
    );
}
