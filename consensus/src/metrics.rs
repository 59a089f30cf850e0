//! Prometheus metrics of a Raft group: entry sizes (group commit), apply latency and the Raft
//! state of this replica, read from openraft's own metrics at scrape time.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::{App, Raft};

/// Metrics recorded on the Raft path. Cheap to clone: every field is a shared handle.
#[derive(Clone)]
pub struct RaftMetrics {
    /// Requests per proposed entry: how much group commit packs together.
    pub entry_requests: Histogram,
    /// Seconds to apply (and write) one batch of committed entries.
    pub apply_seconds: Histogram,
    term: Gauge,
    is_leader: Gauge,
    last_log_index: Gauge,
    applied_index: Gauge,
    applied_seq: Gauge,
}

impl RaftMetrics {
    pub fn register(registry: &mut Registry) -> RaftMetrics {
        let metrics = RaftMetrics {
            entry_requests: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            apply_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 18)),
            term: Gauge::default(),
            is_leader: Gauge::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            applied_seq: Gauge::default(),
        };
        registry.register(
            "raft_entry_requests",
            "Requests packed into one Raft entry",
            metrics.entry_requests.clone(),
        );
        registry.register(
            "raft_apply_seconds",
            "Time to apply a batch of committed entries",
            metrics.apply_seconds.clone(),
        );
        registry.register("raft_term", "Current Raft term", metrics.term.clone());
        registry.register(
            "raft_is_leader",
            "1 on the leader, 0 elsewhere",
            metrics.is_leader.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Index of the last log entry",
            metrics.last_log_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Index of the last applied entry",
            metrics.applied_index.clone(),
        );
        registry.register(
            "raft_applied_seq",
            "Last event seq applied by the state machine",
            metrics.applied_seq.clone(),
        );
        metrics
    }

    fn refresh<A: App>(&self, raft: &Raft<A>, applied_seq: u64) {
        let metrics = raft.metrics().borrow().clone();
        let as_gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.term.set(as_gauge(metrics.current_term));
        self.is_leader
            .set(i64::from(metrics.current_leader == Some(metrics.id)));
        self.last_log_index
            .set(as_gauge(metrics.last_log_index.unwrap_or(0)));
        self.applied_index.set(as_gauge(
            metrics.last_applied.map(|id| id.index).unwrap_or(0),
        ));
        self.applied_seq.set(as_gauge(applied_seq));
    }
}

/// Renders the registry in the Prometheus text format, with the Raft gauges brought up to date.
pub fn render<A: App>(
    registry: &Registry,
    metrics: &RaftMetrics,
    raft: &Raft<A>,
    applied_seq: u64,
) -> String {
    metrics.refresh(raft, applied_seq);
    let mut text = String::new();
    encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

/// The `/metrics` route, to merge into a tonic server's routes (served over HTTP/1.1).
pub fn route<A: App>(
    registry: Arc<Registry>,
    metrics: RaftMetrics,
    raft: Raft<A>,
    machine: crate::StateMachineStore<A>,
) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = render(
                &registry,
                &metrics,
                &raft,
                machine.read(|app| app.applied_seq()),
            );
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    body,
                )
            }
        }),
    )
}
