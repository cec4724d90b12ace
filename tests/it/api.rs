//! The agent API on loopback: the real `fleetwave agent` capturing into and deploying
//! from a running server's store with the token its iPXE script carried.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use fleetwave::image::store::Store;
use fleetwave::protocol::{Assignment, BootInstruction, Task};
use fleetwave::services::api::Api;
use fleetwave::services::http::{BootTable, HttpState, run};
use fleetwave::spec::Mac;
use tokio_util::sync::CancellationToken;

use crate::{bytes, fleetwave, mkfs_ext4, spec_of, tool};

fn fleet() -> String {
    format!(
        "{}{}",
        crate::LAB_SITE,
        r#"images:
  win10:
    os: windows
    capture: {from: ref-win10, generation: 1}
hosts:
  ref-win10: {mac: "52:54:00:28:00:10", site: lab}
  pc01: {mac: "52:54:00:28:00:11", site: lab, image: win10}
"#
    )
}
const REF: &str = "52:54:00:28:00:10";
const PC01: &str = "52:54:00:28:00:11";

struct Server {
    url: String,
    api: Arc<Api>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(dir: &Path) -> Server {
    let api = Api::new(Store::open(&dir.join("server-store")).expect("store"));
    start_api(dir, api)
}

/// A task for `mac` (its host named after it).
pub fn assignment(mac: &str, task: Task) -> Assignment {
    Assignment {
        mac: mac.parse().expect("mac"),
        host: Some(format!("host-{mac}")),
        id: 1,
        task,
        disk: Default::default(),
        after: Default::default(),
        commit: None,
        signer: None,
    }
}

fn capture_task(generation: u64) -> Task {
    Task::Capture {
        image: "win10".into(),
        generation,
    }
}

/// The agent API alone, with the reference machine armed for a capture (its script
/// carries the token), as the controller would arm it.
fn start_api(dir: &Path, api: Api) -> Server {
    let _ = spec_of(&fleet());
    let token = api.mint(assignment(REF, capture_task(1))).expect("token");
    let mut table = BootTable::default();
    table.hosts.insert(
        REF.parse::<Mac>().expect("mac"),
        BootInstruction::Agent {
            host: "ref-win10".into(),
            site: "lab".into(),
            token,
            task: capture_task(1),
            summary: "capture".into(),
        },
    );
    let api = Arc::new(api);
    let state = HttpState {
        table: tokio::sync::watch::channel(Arc::new(table)).1,
        base_url: "http://127.0.0.1".into(),
        ipxe_root: dir.to_owned(),
        files_root: dir.to_owned(),
        dhcp: None,
        tftp: None,
        api: Some(api.clone()),
        control: None,
        state: None,
        https: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let t = stop.clone();
    let thread = std::thread::spawn(move || {
        let _ = rt.block_on(run(listener, state, t));
    });
    Server {
        url: format!("http://{addr}"),
        api,
        stop,
        thread: Some(thread),
    }
}

/// An HTTP client that hands back error statuses instead of failing on them.
fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// `mac`'s iPXE script.
fn script(url: &str, mac: &str) -> String {
    http()
        .get(format!("{url}/boot/{mac}.ipxe"))
        .call()
        .expect("GET script")
        .body_mut()
        .read_to_string()
        .expect("body")
}

/// The token on the kernel line of `mac`'s script.
fn token_from_script(url: &str, mac: &str) -> String {
    let text = script(url, mac);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("fleetwave.token="))
        .unwrap_or_else(|| panic!("no token in the script:\n{text}"))
        .to_string()
}

#[test]
fn the_agent_captures_and_deploys_through_the_api_with_its_token_only() {
    if !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    for i in 0..8u8 {
        std::fs::write(src.join(format!("f{i}")), vec![i; 700_000]).expect("write");
        std::fs::write(
            src.join(format!("t{i}")),
            format!("line {i}\n").repeat(90_000),
        )
        .expect("write");
    }
    let fs = d.join("fs.img");
    mkfs_ext4(&src, &fs, 48 << 20, &[]);
    let fs = fs.to_str().expect("utf-8");
    let server = start(d);
    let url = server.url.as_str();

    // The reference machine's script boots the agent to capture, with a token.
    let token = token_from_script(url, REF);
    assert_eq!(token.len(), 64);
    let capture = |token: &str, mac: &str| {
        fleetwave(&[
            "agent", "capture", fs, "--image", "win10", "--server", url, "--token", token, "--mac",
            mac, "--json",
        ])
    };
    // A made-up token, and the right token from another machine, are refused.
    let (code, out) = capture("0000", REF);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("HTTP 401"), "{out}");
    let (code, out) = capture(&token, PC01);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("HTTP 403"), "{out}");
    // The right one: every chunk goes up, the server re-hashes and commits.
    let (code, out) = capture(&token, REF);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    let digest = report["digest"].as_str().expect("digest").to_string();
    let server_store = Store::open(&d.join("server-store")).expect("store");
    let recorded = server_store.resolve("win10").expect("recorded");
    assert_eq!(recorded.to_string(), digest);
    // Every distinct chunk went up once (a block that repeats on the disk is one chunk).
    let manifest = server_store.manifest(&recorded).expect("manifest");
    let distinct: std::collections::HashSet<_> = manifest.chunks.iter().map(|c| c.hash).collect();
    assert_eq!(report["new_chunks"], distinct.len());
    assert!(distinct.iter().all(|h| server_store.has_chunk(h)));
    // Reporting the result spent the token: a replay is refused.
    let (code, out) = capture(&token, REF);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("HTTP 401"), "{out}");

    // A second capture of the same disk (a new task) sends nothing.
    let again = server
        .api
        .mint(assignment(REF, capture_task(1)))
        .expect("token");
    let (code, out) = capture(&again, REF);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(report["new_chunks"], 0);

    // pc01 deploys that version over HTTP and verifies it.
    let deploy_token = server
        .api
        .mint(assignment(
            PC01,
            Task::Deploy {
                image: "win10".into(),
                version: digest.parse().expect("digest"),
                multicast: None,
            },
        ))
        .expect("token");
    // The health endpoint lists the task in flight.
    let health: serde_json::Value = {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let body = agent
            .get(format!("{url}/health"))
            .call()
            .expect("health")
            .body_mut()
            .read_to_string()
            .expect("body");
        serde_json::from_str(&body).expect("json")
    };
    let tasks = health["agent_tasks"].as_array().expect("tasks");
    assert!(tasks.iter().any(|t| t["mac"] == PC01), "{health}");
    let target = d.join("pc01.raw");
    std::fs::File::create(&target).expect("create");
    let (code, out) = fleetwave(&[
        "agent",
        "deploy",
        &digest,
        target.to_str().expect("utf-8"),
        "--server",
        url,
        "--token",
        &deploy_token,
        "--mac",
        PC01,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deployed and verified"), "{out}");
    // It reported its progress: written and read back, all of it.
    let p = server
        .api
        .last_progress(PC01.parse().expect("mac"))
        .expect("progress");
    assert!(p.total_bytes > 0 && p.done_bytes == p.total_bytes, "{p:?}");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&target)
        .output()
        .expect("e2fsck");
    assert!(fsck.status.success());
}

#[test]
fn an_upload_whose_content_does_not_match_its_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path());
    let token = server
        .api
        .mint(assignment(REF, capture_task(1)))
        .expect("token");
    let agent = http();
    let data = vec![7u8; 100_000];
    let wrong_name = blake3::hash(b"something else").to_hex().to_string();
    let body = zstd::bulk::compress(&data, 3).expect("zstd");
    let r = agent
        .put(format!("{}/api/v1/chunks/blake3:{wrong_name}", server.url))
        .header("Authorization", &format!("Bearer {token}"))
        .header("X-Fleetwave-Mac", REF)
        .send(&body[..])
        .expect("PUT");
    assert_eq!(r.status().as_u16(), 422);
    // Not zstd at all.
    let right_name = blake3::hash(&data).to_hex().to_string();
    let r = agent
        .put(format!("{}/api/v1/chunks/blake3:{right_name}", server.url))
        .header("Authorization", &format!("Bearer {token}"))
        .header("X-Fleetwave-Mac", REF)
        .send(&data[..])
        .expect("PUT");
    assert_eq!(r.status().as_u16(), 422);
    // Too large for a chunk: 413, or the server hangs up before the body is sent.
    let huge = vec![0u8; 17 << 20];
    let r = agent
        .put(format!("{}/api/v1/chunks/blake3:{right_name}", server.url))
        .header("Authorization", &format!("Bearer {token}"))
        .header("X-Fleetwave-Mac", REF)
        .send(&huge[..]);
    if let Ok(r) = r {
        assert_eq!(r.status().as_u16(), 413);
    }
    // Nothing was stored.
    let store = Store::open(&dir.path().join("server-store")).expect("store");
    assert!(!store.has_chunk(&format!("blake3:{right_name}").parse().expect("digest")));
}

#[test]
fn an_interrupted_upload_resumes_with_what_the_server_lacks() {
    if !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    for i in 0..40 {
        let data = bytes(4 << 20, 7 + i);
        std::fs::write(src.join(format!("f{i}")), data).expect("write");
    }
    let fs = d.join("fs.img");
    mkfs_ext4(&src, &fs, 200 << 20, &["-b", "4096"]);
    let server = start(d);
    let server_store = d.join("server-store");
    let token = server
        .api
        .mint(assignment(REF, capture_task(1)))
        .expect("token");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetwave"))
        .args(["agent", "capture"])
        .arg(&fs)
        .args([
            "--image",
            "win10",
            "--server",
            &server.url,
            "--token",
            &token,
            "--mac",
            REF,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while server.api.store.chunk_count() < 40
        && std::time::Instant::now() < deadline
        && child.try_wait().ok().flatten().is_none()
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let killed = !child.wait().expect("wait").success();
    let uploaded = server.api.store.chunk_count();
    // The next task (a new token) sends only what the server still lacks.
    let again = server
        .api
        .mint(assignment(REF, capture_task(1)))
        .expect("token");
    let (code, out) = fleetwave(&[
        "agent",
        "capture",
        fs.to_str().expect("utf-8"),
        "--image",
        "win10",
        "--server",
        &server.url,
        "--token",
        &again,
        "--mac",
        REF,
        "--json",
    ]);
    assert_eq!(code, 0, "{out}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    let (chunks, new) = (
        r["chunks"].as_u64().expect("n") as usize,
        r["new_chunks"].as_u64().expect("n") as usize,
    );
    if killed {
        assert!(
            uploaded > 0 && new <= chunks - uploaded,
            "{new} of {chunks} sent again after {uploaded} arrived"
        );
    } else {
        eprintln!("note: the first capture finished before it could be killed");
    }
    // Committed: the server only accepts a manifest whose chunks it all holds.
    let store = Store::open(&server_store).expect("store");
    assert_eq!(
        store.resolve("win10").expect("committed").to_string(),
        r["digest"].as_str().expect("digest")
    );
}

#[test]
fn tokens_outlive_a_server_restart_until_their_result_spends_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let db = d.join("state.db");
    let api = |writer: &fleetwave::state::Writer, rows| {
        Api::new(Store::open(&d.join("server-store")).expect("store"))
            .with_state(writer.handle(), rows)
    };
    let get_task = |url: &str, token: &str| -> u16 {
        http()
            .get(format!("{url}/api/v1/task"))
            .header("Authorization", &format!("Bearer {token}"))
            .header("X-Fleetwave-Mac", REF)
            .call()
            .expect("GET task")
            .status()
            .as_u16()
    };
    // First life: the reference host's script (a capture) mints a token.
    let state = fleetwave::state::Store::open(&db).expect("state");
    assert!(state.tokens().expect("tokens").is_empty());
    let writer = state.into_writer();
    let server = start_api(d, api(&writer, vec![]));
    let token = token_from_script(&server.url, REF);
    assert_eq!(get_task(&server.url, &token), 200);
    drop(server);
    writer.close();

    // Second life, from the same database: the agent carries on with its token.
    let state = fleetwave::state::Store::open(&db).expect("state");
    let rows = state.tokens().expect("tokens");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].assignment.mac.to_string(), REF);
    let writer = state.into_writer();
    let server = start_api(d, api(&writer, rows));
    assert_eq!(
        get_task(&server.url, &token),
        200,
        "the restart forgot the token"
    );
    let agent = http();
    let status = agent
        .post(format!("{}/api/v1/result", server.url))
        .header("Authorization", &format!("Bearer {token}"))
        .header("X-Fleetwave-Mac", REF)
        .header("Content-Type", "application/json")
        .send(r#"{"ok": true, "digest": null, "message": "done"}"#)
        .expect("POST result")
        .status()
        .as_u16();
    assert_eq!(status, 204);
    assert_eq!(get_task(&server.url, &token), 401);
    drop(server);
    writer.close();

    // Third life: a spent token stays spent.
    let state = fleetwave::state::Store::open(&db).expect("state");
    let rows = state.tokens().expect("tokens");
    assert!(rows.iter().all(|r| r.token != token), "{rows:?}");
}

/// Every kind of token on every endpoint: a token authorizes exactly its task.
#[test]
fn each_kind_of_token_reaches_only_what_its_task_needs() {
    if !tool("e2fsprogs", "/usr/sbin/mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("a"), bytes(400_000, 3)).expect("write");
    let fs = d.join("fs.img");
    mkfs_ext4(&src, &fs, 8 << 20, &[]);
    let store = Store::open(&d.join("server-store")).expect("store");
    let cap = fleetwave::image::capture(&fs, &store, Some(("win10", 1)), Default::default())
        .expect("capture");
    let version = cap.digest;
    let m = store.manifest(&version).expect("manifest");
    let chunk = m.chunks[0].hash;
    let other_version = format!("blake3:{}", "2".repeat(64));
    let server = start(d);
    let url = server.url.as_str();
    let kinds: Vec<(&str, Task)> = vec![
        ("register", Task::Register),
        ("inventory", Task::Inventory { generation: 1 }),
        ("capture", capture_task(2)),
        (
            "wipe",
            Task::Wipe {
                mode: fleetwave::spec::WipeMode::Fast,
                generation: 1,
            },
        ),
        (
            "deploy",
            Task::Deploy {
                image: "win10".into(),
                version,
                multicast: None,
            },
        ),
        (
            "deploy-mc",
            Task::Deploy {
                image: "win10".into(),
                version,
                multicast: Some("room-a/lab/win10".into()),
            },
        ),
        (
            "verify",
            Task::Verify {
                version,
                generation: 1,
            },
        ),
    ];
    let inventory = r#"{"cpu_model": null, "cpu_threads": 1, "memory_bytes": 1, "disks": [], "nics": [], "dmi": {"vendor": null, "product": null, "serial": null, "uuid": null}}"#;
    let chunk_body = zstd::bulk::compress(&bytes(1000, 9), 3).expect("zstd");
    let chunk_name = format!("blake3:{}", blake3::hash(&bytes(1000, 9)).to_hex());
    let manifest = m.to_bytes();
    // (endpoint, the kinds it allows, the status they get; others get 403).
    type Call<'a> = (&'a str, &'a str, String, Vec<u8>);
    let calls: Vec<(Call, Vec<&str>, u16)> = vec![
        (
            ("GET", "task", String::new(), vec![]),
            kinds.iter().map(|k| k.0).collect(),
            200,
        ),
        (
            ("POST", "register", String::new(), inventory.into()),
            kinds.iter().map(|k| k.0).collect(),
            204,
        ),
        (
            (
                "POST",
                "progress",
                String::new(),
                br#"{"done_bytes": 1, "total_bytes": 2, "bytes_per_sec": 1}"#.to_vec(),
            ),
            kinds.iter().map(|k| k.0).collect(),
            204,
        ),
        (
            (
                "POST",
                "chunks/missing",
                String::new(),
                format!("[\"{chunk}\"]").into_bytes(),
            ),
            vec!["capture"],
            200,
        ),
        (
            ("PUT", "chunks/", chunk_name.clone(), chunk_body.clone()),
            vec!["capture"],
            201,
        ),
        (
            ("GET", "chunks/", chunk.to_string(), vec![]),
            vec!["deploy", "deploy-mc"],
            200,
        ),
        (("GET", "chunks/", chunk_name.clone(), vec![]), vec![], 200),
        (
            ("GET", "manifests/", version.to_string(), vec![]),
            vec!["deploy", "deploy-mc", "verify"],
            200,
        ),
        (
            ("GET", "manifests/", other_version.clone(), vec![]),
            vec![],
            200,
        ),
        (
            ("PUT", "manifests", String::new(), manifest.clone()),
            vec!["capture"],
            201,
        ),
        (
            ("POST", "multicast", String::new(), vec![]),
            vec!["deploy-mc"],
            409,
        ),
        (
            (
                "POST",
                "result",
                String::new(),
                br#"{"ok": true, "digest": null, "message": "x"}"#.to_vec(),
            ),
            kinds.iter().map(|k| k.0).collect(),
            204,
        ),
    ];
    let agent = http();
    let mut wrong = Vec::new();
    for (kind, task) in &kinds {
        let token = server
            .api
            .mint(assignment(PC01, task.clone()))
            .expect("token");
        for ((method, path, arg, body), allowed, ok) in &calls {
            let u = format!("{url}/api/v1/{path}{arg}");
            let auth = format!("Bearer {token}");
            let r = match *method {
                "GET" => agent
                    .get(&u)
                    .header("Authorization", &auth)
                    .header("X-Fleetwave-Mac", PC01)
                    .call(),
                "PUT" => agent
                    .put(&u)
                    .header("Authorization", &auth)
                    .header("X-Fleetwave-Mac", PC01)
                    .header("Content-Type", "application/json")
                    .send(&body[..]),
                _ => agent
                    .post(&u)
                    .header("Authorization", &auth)
                    .header("X-Fleetwave-Mac", PC01)
                    .header("Content-Type", "application/json")
                    .send(&body[..]),
            };
            let got = r.expect("request").status().as_u16();
            let want = if allowed.contains(kind) { *ok } else { 403 };
            if got != want {
                wrong.push(format!(
                    "{kind} token, {method} {path}{arg}: {got}, expected {want}"
                ));
            }
        }
        // Spent by its result: nothing more.
        let r = agent
            .get(format!("{url}/api/v1/task"))
            .header("Authorization", &format!("Bearer {token}"))
            .header("X-Fleetwave-Mac", PC01)
            .call()
            .expect("GET");
        assert_eq!(
            r.status().as_u16(),
            401,
            "{kind} token still works after its result"
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The capture token committed its manifest under its own image and generation.
    let rec = store.image("win10").expect("record").expect("win10");
    assert!(rec.versions.iter().any(|v| v.generation == 2), "{rec:?}");
}
