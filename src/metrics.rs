//! Process-wide Prometheus counters, bumped where things happen: HTTP responses and
//! bytes, image bytes moved by agents, multicast datagrams and rate, git fetches and
//! the controller's loop. `services::metrics` adds the fleet's gauges (hosts by
//! state, waves, DHCP and TFTP counters) at scrape time and serves `GET /metrics`.
//!
//! One process-wide set, as Prometheus clients keep: the code that counts (the
//! multicast sender thread, the source follower) need not be handed a registry.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's template (`/api/v1/chunks/{digest}`), never the raw path, so a
    /// client cannot grow the label set.
    pub route: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `in` (request bodies, captures) or `out` (responses, deploys).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

pub struct Metrics {
    pub http_responses: Family<RouteLabels, Counter>,
    pub http_bytes: Family<DirectionLabels, Counter>,
    /// Chunk and manifest bytes: `out` to agents deploying, `in` from agents capturing.
    pub image_bytes: Family<DirectionLabels, Counter>,
    /// `data` (the pass) and `repair` datagrams sent.
    pub multicast_datagrams: Family<KindLabels, Counter>,
    /// Ethernet bytes multicast sessions put on the wire.
    pub multicast_wire_bytes: Counter,
    /// Sessions ended, by how (`complete`, `timeout`, `shutdown`, `no receivers`, `failed`).
    pub multicast_sessions: Family<OutcomeLabels, Counter>,
    /// The rate each group's sender runs at now (bits per second); 0 once it ended.
    pub multicast_rate: Family<GroupLabels, Gauge<f64, AtomicU64>>,
    /// Reads of the fleet's source: `new` revision, `unchanged`, `failed`.
    pub source_reads: Family<OutcomeLabels, Counter>,
    /// Hosts waiting in the controller's queue (due now or later).
    pub reconcile_queue: Gauge,
    /// How long one pass of the controller over its due hosts took.
    pub reconcile_seconds: Histogram,
    /// Hosts reconciled.
    pub reconciles: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    http_responses: Family::default(),
    http_bytes: Family::default(),
    image_bytes: Family::default(),
    multicast_datagrams: Family::default(),
    multicast_wire_bytes: Counter::default(),
    multicast_sessions: Family::default(),
    multicast_rate: Family::default(),
    source_reads: Family::default(),
    reconcile_queue: Gauge::default(),
    // 50 µs to about 13 s.
    reconcile_seconds: Histogram::new(exponential_buckets(0.000_05, 4.0, 10)),
    reconciles: Counter::default(),
});

/// The process's counters.
pub fn get() -> &'static Metrics {
    &METRICS
}

pub fn outcome(s: &str) -> OutcomeLabels {
    OutcomeLabels {
        outcome: s.to_string(),
    }
}

pub const IN: DirectionLabels = DirectionLabels { direction: "in" };
pub const OUT: DirectionLabels = DirectionLabels { direction: "out" };

impl Metrics {
    /// Register every counter into `r` (clones share the values).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "fleetwave_http_responses",
            "HTTP responses by route and status code",
            self.http_responses.clone(),
        );
        r.register_with_unit(
            "fleetwave_http",
            "HTTP body bytes (Content-Length): in = requests, out = responses",
            Unit::Bytes,
            self.http_bytes.clone(),
        );
        r.register_with_unit(
            "fleetwave_image",
            "image data through the agent API: out = deployed to agents, in = captured from them",
            Unit::Bytes,
            self.image_bytes.clone(),
        );
        r.register(
            "fleetwave_multicast_datagrams",
            "multicast datagrams sent: data (the pass) and repair",
            self.multicast_datagrams.clone(),
        );
        r.register_with_unit(
            "fleetwave_multicast_wire",
            "Ethernet bytes sent by multicast sessions",
            Unit::Bytes,
            self.multicast_wire_bytes.clone(),
        );
        r.register(
            "fleetwave_multicast_sessions",
            "multicast sessions ended, by outcome",
            self.multicast_sessions.clone(),
        );
        r.register(
            "fleetwave_multicast_rate_bits_per_second",
            "the rate each group's sender runs at now; 0 once its session ended",
            self.multicast_rate.clone(),
        );
        r.register(
            "fleetwave_source_reads",
            "reads of the fleet's source (git fetch or directory): new, unchanged, failed",
            self.source_reads.clone(),
        );
        r.register(
            "fleetwave_reconcile_queue_hosts",
            "hosts in the controller's queue, due now or later",
            self.reconcile_queue.clone(),
        );
        r.register_with_unit(
            "fleetwave_reconcile_pass",
            "one pass of the controller over the hosts due",
            Unit::Seconds,
            self.reconcile_seconds.clone(),
        );
        r.register(
            "fleetwave_reconciles",
            "hosts reconciled",
            self.reconciles.clone(),
        );
    }
}
