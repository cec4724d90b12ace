//! `plan --git` on a real repository built commit by commit with the git CLI.

use std::path::Path;
use std::process::Command;

use fleetwave::cli::{self, Format, GitArgs};
use fleetwave::diag::Palette;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Fleet Admin")
        .env("GIT_AUTHOR_EMAIL", "admin@example.invalid")
        .env("GIT_COMMITTER_NAME", "Fleet Admin")
        .env("GIT_COMMITTER_EMAIL", "admin@example.invalid")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn commit(dir: &Path, files: &[(&str, &str)], message: &str) -> String {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", message]);
    git(dir, &["rev-parse", "HEAD"])
}

const BASE: &str = r#"version: 1
include: [rooms/*.yaml]
sites:
  lab: {interface: ens34, server: 172.28.0.1, subnet: 172.28.0.0/24, dhcp: {mode: authoritative, pool: 172.28.0.100-172.28.0.199}}
images:
  win10: {os: windows, capture: {from: ref-win10, generation: 1}}
hosts:
  ref-win10: {mac: "52:54:00:28:00:10", site: lab}
multicast:
  room-a: {address: 239.28.0.1, min_receivers: 2}
waves:
  pilot: {transport: unicast}
  room-a: {after: [pilot], transport: multicast, multicast: room-a}
"#;

const ROOM_A: &str = r#"hosts:
  pc01: {mac: "52:54:00:28:00:11", site: lab, image: win10, wave: pilot}
  pc02: {mac: "52:54:00:28:00:12", site: lab, image: win10, wave: room-a}
  pc03: {mac: "52:54:00:28:00:13", site: lab, image: win10, wave: room-a}
"#;

fn review(repo: &Path, base: &str, head: &str, format: Format) -> (u8, String) {
    let mut out = Vec::new();
    let args = GitArgs {
        repo,
        base,
        head,
        file: Path::new("fleet.yaml"),
    };
    let code = cli::plan_git(&args, None, format, &mut out, Palette::PLAIN).expect("review runs");
    (code, String::from_utf8(out).expect("utf-8"))
}

#[test]
fn review_of_a_pull_request_shows_hosts_waves_and_effect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path();
    git(repo, &["init", "-q", "-b", "main"]);
    let base = commit(
        repo,
        &[("fleet.yaml", BASE), ("rooms/a.yaml", ROOM_A)],
        "lab",
    );
    // The pull request: a new room file picked up by the include glob, pc01 moved to
    // room-a, a new capture generation, a wave that waits for room-a.
    let head_fleet = BASE.replace("generation: 1", "generation: 2")
        + "  room-b: {after: [room-a], transport: unicast, max_parallel: 5}\n"
        + "windows: [\"Sat 22:00 - Sun 06:00\"]\n";
    let room_a = ROOM_A.replace("image: win10, wave: pilot", "image: win10, wave: room-a");
    let room_b =
        "hosts:\n  pc04: {mac: \"52:54:00:28:00:14\", site: lab, image: win10, wave: room-b}\n";
    let head = commit(
        repo,
        &[
            ("fleet.yaml", &head_fleet),
            ("rooms/a.yaml", &room_a),
            ("rooms/b.yaml", room_b),
        ],
        "room b",
    );

    let (code, json) = review(repo, "main~1", "main", Format::Json);
    assert_eq!(code, 1, "changes exit 1");
    let r: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(r["base"], base);
    assert_eq!(r["head"], head);
    assert_eq!(r["hosts_added"][0]["name"], "pc04");
    assert_eq!(r["hosts_added"].as_array().map(Vec::len), Some(1));
    assert_eq!(r["hosts_removed"].as_array().map(Vec::len), Some(0));
    let pc01 = &r["hosts_changed"][0];
    assert_eq!(pc01["name"], "pc01");
    assert_eq!(pc01["changes"][0]["field"], "wave");
    assert_eq!(pc01["changes"][0]["from"], "pilot");
    assert_eq!(pc01["changes"][0]["to"], "room-a");
    assert_eq!(r["waves_added"][0], "room-b");
    assert_eq!(r["windows_changed"]["from"], "-");
    assert_eq!(r["windows_changed"]["to"], "Sat 22:00 - Sun 06:00");
    assert_eq!(
        r["images_changed"][0]["changes"][0]["to"],
        "from ref-win10 generation 2"
    );
    // The effect: pc04 deploys in room-b; pc01 is now part of room-a's multicast session.
    let effect = r["effect"].as_array().expect("effect");
    let wave_of = |host: &str| {
        effect
            .iter()
            .find(|e| {
                e["hosts"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|x| x["host"] == host))
            })
            .map(|e| e["wave"].clone())
    };
    assert_eq!(wave_of("pc04"), Some("room-b".into()));
    assert_eq!(wave_of("pc01"), Some("room-a".into()));
    assert_eq!(
        wave_of("ref-win10"),
        Some("(captures)".into()),
        "capture generation 2 is new work"
    );
    assert!(
        r["cancelled"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == "pc01 (pilot)"))
    );

    let (_, md) = review(repo, &base, &head, Format::Markdown);
    assert!(md.contains("#### Hosts added"), "{md}");
    assert!(md.contains("| `pc01` | wave | pilot | room-a |"), "{md}");
    assert!(md.contains("#### Wave `room-b`"), "{md}");
}

/// A repository whose first commit is the lab, split into fleet.yaml and rooms/a.yaml.
fn lab_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    git(dir.path(), &["init", "-q", "-b", "main"]);
    commit(
        dir.path(),
        &[("fleet.yaml", BASE), ("rooms/a.yaml", ROOM_A)],
        "lab",
    );
    dir
}

#[test]
fn review_of_identical_commits_has_no_changes() {
    let dir = lab_repo();
    let repo = dir.path();
    commit(repo, &[("README.md", "notes\n")], "docs only");
    let (code, text) = review(repo, "HEAD~1", "HEAD", Format::Text);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("No changes to the fleet."));
}

#[test]
fn an_invalid_head_is_an_error_that_names_the_revision() {
    let dir = lab_repo();
    let repo = dir.path();
    let broken = ROOM_A.replace("52:54:00:28:00:13", "52:54:00:28:00:12");
    commit(repo, &[("rooms/a.yaml", &broken)], "typo");
    let (code, text) = review(repo, "HEAD~1", "HEAD", Format::Text);
    assert_eq!(code, 2);
    assert!(text.contains("duplicate MAC 52:54:00:28:00:12"), "{text}");
    assert!(text.contains("HEAD:rooms/a.yaml:4:15"), "{text}");
}

/// The revision, the branches there are, and none of libgit2's error class and code.
#[test]
fn an_unknown_revision_is_an_error_that_lists_the_branches() {
    let dir = lab_repo();
    let repo = dir.path();
    let mut out = Vec::new();
    let args = GitArgs {
        repo,
        base: "no-such-branch",
        head: "HEAD",
        file: Path::new("fleet.yaml"),
    };
    let err = cli::plan_git(&args, None, Format::Text, &mut out, Palette::PLAIN)
        .expect_err("unknown revision");
    let text = format!("{err:#}");
    assert!(text.contains("no revision `no-such-branch`"), "{text}");
    assert!(text.contains("its branches: main"), "{text}");
    assert!(!text.contains("class="), "{text}");
}
