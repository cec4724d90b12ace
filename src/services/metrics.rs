//! `GET /metrics` in the Prometheus text format (OpenMetrics), and the middleware that
//! counts HTTP responses and bytes.
//!
//! The fleet's gauges come from the controller's status at scrape time, the same data
//! as `GET /api/v1/status`, never a second count that could drift from it. The DHCP,
//! TFTP and state database counters are the ones `/health` shows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::HttpBody as _;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use super::http::HttpState;
use crate::metrics::{self, RouteLabels};
use crate::protocol::FleetStatus;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Count each response by route and code, and the bytes of request and response
/// bodies whose length is known.
pub async fn count(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let bytes_in = body_length(req.body());
    let resp = next.run(req).await;
    let m = metrics::get();
    m.http_responses
        .get_or_create(&RouteLabels {
            route: route.clone(),
            code: resp.status().as_u16(),
        })
        .inc();
    let bytes_out = body_length(resp.body());
    m.http_bytes.get_or_create(&metrics::IN).inc_by(bytes_in);
    m.http_bytes.get_or_create(&metrics::OUT).inc_by(bytes_out);
    if resp.status().is_success()
        && (route.starts_with("/api/v1/chunks/{") || route.starts_with("/api/v1/manifests"))
    {
        m.image_bytes.get_or_create(&metrics::IN).inc_by(bytes_in);
        m.image_bytes.get_or_create(&metrics::OUT).inc_by(bytes_out);
    }
    resp
}

/// A body's length when it is known up front (a buffered body, or a request with
/// Content-Length); streamed bodies count 0.
fn body_length(b: &axum::body::Body) -> u64 {
    b.size_hint().exact().unwrap_or(0)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    site: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaveLabels {
    wave: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaveStateLabels {
    wave: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    message: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

pub async fn scrape(State(st): State<HttpState>, headers: axum::http::HeaderMap) -> Response {
    let status = match &st.control {
        Some(c) => match super::admin::authorize(
            c,
            &headers,
            super::tokens::Scope::Read,
            "GET /metrics",
            None,
        ) {
            Err(r) => return *r,
            Ok(_) => match super::admin::ask_status(c).await {
                Ok(s) => Some(s),
                Err(r) => return r,
            },
        },
        None => None,
    };
    let mut r = Registry::default();
    metrics::get().register(&mut r);
    if let Some(s) = &status {
        fleet(&mut r, s);
    }
    if let Some(d) = &st.dhcp {
        let (bound, stats) = super::dhcp::summary(d);
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let by_message = Family::<MessageLabels, Counter>::default();
        for (message, n) in [
            ("discover", v(&stats.discovers)),
            ("request", v(&stats.requests)),
            ("inform", v(&stats.informs)),
            ("release", v(&stats.releases)),
            ("decline", v(&stats.declines)),
            ("malformed", v(&stats.malformed)),
        ] {
            by_message
                .get_or_create(&MessageLabels { message })
                .inc_by(n);
        }
        r.register(
            "fleetwave_dhcp_received",
            "DHCP messages received, by type (malformed: dropped before handling)",
            by_message,
        );
        let by_answer = Family::<AnswerLabels, Counter>::default();
        for (answer, n) in [
            ("offer", v(&stats.offers)),
            ("ack", v(&stats.acks)),
            ("nak", v(&stats.naks)),
            ("ignored", v(&stats.ignored)),
            ("pool_exhausted", v(&stats.exhausted)),
            ("send_error", v(&stats.send_errors)),
        ] {
            by_answer.get_or_create(&AnswerLabels { answer }).inc_by(n);
        }
        r.register(
            "fleetwave_dhcp_answers",
            "what the DHCP server did with what it received",
            by_answer,
        );
        r.register(
            "fleetwave_dhcp_bound_leases",
            "leases bound now",
            ConstGauge::new(bound as i64),
        );
    }
    if let Some(t) = &st.tftp {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let by_result = Family::<ResultLabels, Counter>::default();
        for (result, n) in [
            ("done", v(&t.transfers_done)),
            ("failed", v(&t.transfers_failed)),
            ("refused", v(&t.refused)),
        ] {
            by_result.get_or_create(&ResultLabels { result }).inc_by(n);
        }
        r.register(
            "fleetwave_tftp_transfers",
            "TFTP transfers, by result",
            by_result,
        );
        r.register_with_unit(
            "fleetwave_tftp_sent",
            "bytes of files sent by TFTP",
            Unit::Bytes,
            ConstCounter::new(v(&t.bytes_sent)),
        );
        r.register(
            "fleetwave_tftp_retransmits",
            "TFTP blocks sent again",
            ConstCounter::new(v(&t.retransmits)),
        );
        r.register(
            "fleetwave_tftp_malformed",
            "TFTP packets dropped as malformed",
            ConstCounter::new(v(&t.malformed)),
        );
    }
    if let Some(w) = &st.state {
        r.register(
            "fleetwave_state_commits",
            "state database transactions committed",
            ConstCounter::new(w.commits.load(Ordering::Relaxed)),
        );
    }
    let mut body = String::new();
    if let Err(e) = encode(&mut body, &r) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response();
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// Hosts by site and state, each wave's counts, and whether the newest commit was
/// refused: what an alert on a Stalled commit or a halted wave reads.
fn fleet(r: &mut Registry, s: &FleetStatus) {
    let mut by_state: BTreeMap<(String, String), i64> = BTreeMap::new();
    for h in &s.hosts {
        *by_state
            .entry((h.site.clone(), h.state.clone()))
            .or_default() += 1;
    }
    let hosts = Family::<HostLabels, Gauge>::default();
    for ((site, state), n) in by_state {
        hosts.get_or_create(&HostLabels { site, state }).set(n);
    }
    r.register(
        "fleetwave_hosts",
        "hosts of the fleet by site and state",
        hosts,
    );
    let stalled = s.hosts.iter().filter(|h| h.state == "Stalled").count();
    r.register(
        "fleetwave_hosts_stalled",
        "hosts that need a new commit or a person",
        ConstGauge::new(stalled as i64),
    );
    let gauges = [
        ("fleetwave_wave_hosts", "hosts in the wave"),
        ("fleetwave_wave_done", "hosts of the wave that converged"),
        (
            "fleetwave_wave_in_flight",
            "hosts of the wave being imaged now",
        ),
        ("fleetwave_wave_failed", "hosts of the wave that failed"),
        (
            "fleetwave_wave_failure_budget",
            "failures the wave tolerates before it halts",
        ),
    ];
    let families: Vec<Family<WaveLabels, Gauge>> =
        gauges.iter().map(|_| Family::default()).collect();
    let state = Family::<WaveStateLabels, Gauge>::default();
    for w in &s.waves {
        let l = WaveLabels {
            wave: w.name.clone(),
        };
        let values = [
            w.hosts as i64,
            w.done as i64,
            w.in_flight as i64,
            w.failed as i64,
            i64::from(w.failure_budget),
        ];
        for (f, v) in families.iter().zip(values) {
            f.get_or_create(&l).set(v);
        }
        state
            .get_or_create(&WaveStateLabels {
                wave: w.name.clone(),
                state: w.state.clone(),
            })
            .set(1);
    }
    for ((name, help), f) in gauges.into_iter().zip(families) {
        r.register(name, help, f);
    }
    r.register(
        "fleetwave_wave_state",
        "1 for each wave's state: waiting, open, halted (over its failure budget) or done",
        state,
    );
    let refused = s.attempted.as_ref().is_some_and(|a| !a.problems.is_empty());
    r.register(
        "fleetwave_source_commit_refused",
        "1 when the newest commit read was refused (Stalled); the last good one is served",
        ConstGauge::new(i64::from(refused)),
    );
    if let Some(a) = &s.applied {
        r.register(
            "fleetwave_source_applied_timestamp_seconds",
            "when the revision being served was read",
            ConstGauge::new(a.at as i64),
        );
    }
}
