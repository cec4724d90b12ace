//! The agent API's request bodies through the real router: inventory, progress,
//! result, the missing-chunks list, a chunk upload and a manifest commit, each with a
//! valid token, so the body is what gets past authorization. The first byte picks the
//! call. No body may panic the server (a 4xx is fine).

#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use fleetwave::image::store::Store;
use fleetwave::protocol::{Assignment, Task};
use fleetwave::services::api::{Api, routes};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const CAPTURE: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const REGISTER: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const MAC: &str = "52:54:00:28:00:10";

struct World {
    rt: tokio::runtime::Runtime,
    api: Arc<Api>,
    router: axum::Router,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fleetwave-fuzz-api-{}", std::process::id()));
        let store = Store::open(&dir).expect("a store in the temp directory");
        let api = Arc::new(Api::new(store));
        let router = routes(api.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        World { rt, api, router }
    })
}

fn grant(api: &Api, token: &str, task: Task) {
    let assignment = Assignment {
        mac: MAC.parse().expect("mac"),
        host: Some("ref".into()),
        id: 1,
        task,
        disk: Default::default(),
        after: Default::default(),
        commit: None,
        signer: None,
    };
    api.grant(token, assignment, u64::MAX / 2);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let w = world();
    // Fresh grants: a result spends its token.
    grant(
        &w.api,
        CAPTURE,
        Task::Capture {
            image: "win".into(),
            generation: 1,
        },
    );
    grant(&w.api, REGISTER, Task::Register);
    let (method, path, token) = match which % 7 {
        0 => ("POST", "/api/v1/register".to_string(), REGISTER),
        1 => ("POST", "/api/v1/progress".into(), CAPTURE),
        2 => ("POST", "/api/v1/result".into(), CAPTURE),
        3 => ("POST", "/api/v1/chunks/missing".into(), CAPTURE),
        4 => (
            "PUT",
            // The name is the body's hash: the upload gets past the name check.
            format!("/api/v1/chunks/blake3:{}", blake3::hash(body).to_hex()),
            CAPTURE,
        ),
        5 => ("PUT", "/api/v1/manifests".into(), CAPTURE),
        _ => ("GET", "/api/v1/task".into(), CAPTURE),
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"))
        .header("x-fleetwave-mac", MAC)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .expect("request");
    let r = w.rt.block_on(w.router.clone().oneshot(req));
    let status = r.expect("infallible").status();
    assert!(
        !status.is_server_error() || status.as_u16() == 503,
        "{status}"
    );
});
