//! The web console in a real headless Chromium, driven over the DevTools protocol:
//! the page loads, a host's progress bar moves as an agent reports (without a
//! reload), and a Stalled commit shows its reason. Screenshots are kept under
//! `target/tmp/console-screenshots/` for a person (or a CI artifact step) to look at.

use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

use crate::controller::{Repo, Secrets, lab_fleet, serve, state_of, token, wait_for};
use crate::tool;

/// Debian's package; `/usr/bin/chromium-headless-shell` is a script that runs this
/// without exec, so killing the script would leave the browser running.
const CHROMIUM: &str = "/usr/lib/chromium/chromium-headless-shell";
const LIMIT: Duration = Duration::from_secs(30);

/// A headless Chromium with its DevTools endpoint; killed on drop.
struct Browser {
    child: Child,
    page: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The browser and its renderers share the process group it was given.
        // SAFETY: signals a process group this test created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().expect("tempdir");
        let child = Command::new(CHROMIUM)
            .args([
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        // With port 0 the browser writes the port it took here.
        let port_file = profile.path().join("DevToolsActivePort");
        let start = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse::<u16>().ok())
            {
                break p;
            }
            assert!(start.elapsed() < LIMIT, "chromium did not open DevTools");
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut r = crate::controller::http()
            .put(format!("http://127.0.0.1:{port}/json/new?about:blank"))
            .send_empty()
            .expect("a new tab");
        let target: Value = serde_json::from_str(&r.body_mut().read_to_string().expect("body"))
            .expect("target JSON");
        let url = target["webSocketDebuggerUrl"].as_str().expect("ws url");
        let (page, _) = tungstenite::connect(url).expect("DevTools socket");
        let mut b = Browser {
            child,
            page,
            next_id: 0,
            _profile: profile,
        };
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b
    }

    /// One DevTools call; events that arrive meanwhile are dropped.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::text(msg)).expect("send");
        loop {
            let m = self.page.read().expect("DevTools reply");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        assert!(r["exceptionDetails"].is_null(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluate `expr` until it is true.
    fn wait(&mut self, what: &str, expr: &str) {
        let start = Instant::now();
        while self.eval(expr) != Value::Bool(true) {
            if start.elapsed() > LIMIT {
                let html = self.eval("document.getElementById('main').innerText");
                panic!("waited for {what}; the page shows:\n{html}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn go(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let data = r["data"].as_str().expect("png data");
        let png = base64(data);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("screenshot written");
        eprintln!("screenshot: {}", path.display());
        path
    }
}

fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s.bytes().filter(|c| *c != b'=' && *c != b'\n').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for q in clean.chunks(4) {
        let n = q
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | (u32::from(val(*c)) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..q.len()]);
    }
    out
}

fn progress(url: &str, token: &str, done: u64, total: u64) {
    let r = crate::controller::http()
        .post(format!("{url}/api/v1/progress"))
        .header("Authorization", &format!("Bearer {token}"))
        .header("X-Fleetwave-MAC", REF)
        .header("Content-Type", "application/json")
        .send(
            json!({"done_bytes": done, "total_bytes": total, "bytes_per_sec": 20_000_000})
                .to_string(),
        )
        .expect("POST progress");
    assert_eq!(r.status().as_u16(), 204);
}

const REF: &str = "52:54:00:28:00:10";

#[test]
fn the_console_shows_the_fleet_moves_a_progress_bar_live_and_shows_a_stalled_commit() {
    if !tool("chromium-headless-shell", CHROMIUM) || !tool("git", "/usr/bin/git") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let repo = Repo::new(d);
    let first = repo.commit(&lab_fleet(1), "the lab");
    let server = serve(d, repo.origin(), &d.join("store"), Secrets::default());
    let url = server.url.clone();
    wait_for(&url, "the capture armed", LIMIT, |s| {
        state_of(s, "ref-win10") == "Armed"
    });

    let mut b = Browser::start();
    // Reading the status takes a token of scope read: the page keeps it in its tab.
    b.go(&format!("{url}/console/"));
    b.wait("the page", "document.readyState === 'complete'");
    b.eval(&format!(
        "sessionStorage.setItem('fleetwave-token', '{}')",
        crate::controller::TEST_ADMIN
    ));
    b.go(&format!("{url}/console/"));
    b.wait(
        "the fleet page",
        "window.fwUpdates >= 1 && document.querySelector('tr[data-host=\"pc03\"]') !== null",
    );
    let text = b.eval("document.getElementById('main').innerText");
    let text = text.as_str().expect("text");
    assert!(
        text.contains(&first[..12]),
        "the commit served is not shown:\n{text}"
    );
    assert!(text.contains("room-a") && text.contains("Armed"), "{text}");
    b.screenshot("fleet.png");

    // The reference boots and reports: its bar moves, with no reload of the page.
    let t = token(&url, REF).expect("the reference is armed");
    let r = crate::controller::http()
        .get(format!("{url}/api/v1/task"))
        .header("Authorization", &format!("Bearer {t}"))
        .header("X-Fleetwave-MAC", REF)
        .call()
        .expect("GET task");
    assert_eq!(r.status().as_u16(), 200);
    let loaded_at = b.eval("window.fwLoadedAt");
    let bar = "(document.querySelector('.bar[data-host=\"ref-win10\"]') || {getAttribute: () => null}).getAttribute('aria-valuenow')";
    progress(&url, &t, 100 << 20, 400 << 20);
    b.wait("the bar at 25%", &format!("{bar} === '25'"));
    b.screenshot("progress-25.png");
    progress(&url, &t, 300 << 20, 400 << 20);
    b.wait("the bar at 75%", &format!("{bar} === '75'"));
    assert_eq!(b.eval("window.fwLoadedAt"), loaded_at, "the page reloaded");
    b.screenshot("progress-75.png");

    // The host's own page: conditions and its armed task.
    b.go(&format!("{url}/console/#/host/ref-win10"));
    b.wait(
        "the host page",
        "document.getElementById('main').innerText.includes('Conditions')",
    );
    b.screenshot("host.png");
    // On a phone's width the page still reads.
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    );
    b.go(&format!("{url}/console/#/"));
    b.wait("the fleet page on a phone", "window.fwUpdates >= 1");
    let overflow = b.eval("document.documentElement.scrollWidth <= window.innerWidth + 1");
    assert_eq!(
        overflow,
        Value::Bool(true),
        "the page is wider than a phone"
    );
    b.screenshot("phone.png");
    b.call("Emulation.clearDeviceMetricsOverride", json!({}));

    // A bad commit: the page says it is Stalled, why and where, live.
    b.go(&format!("{url}/console/#/"));
    b.wait("the fleet page again", "window.fwUpdates >= 1");
    repo.commit(
        &lab_fleet(1).replace("wave: pilot}", "wave: pilot, disk: {size: lots}}"),
        "a mistake",
    );
    b.wait(
        "the Stalled commit",
        "(document.getElementById('stalled-commit') || {innerText: ''}).innerText.includes('fleet.yaml:')",
    );
    let alert = b.eval("document.getElementById('stalled-commit').innerText");
    assert!(
        alert
            .as_str()
            .is_some_and(|a| a.contains("Stalled") && a.contains("size")),
        "{alert}"
    );
    b.screenshot("stalled-commit.png");
}
