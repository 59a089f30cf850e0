//! Prometheus metrics of the projection: applied seq and lag per shard, batch sizes and write
//! times, gaps and alarms.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use proto::auticuro::v1 as pb;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: u32,
}

/// Cheap to clone: every field is a shared handle.
#[derive(Clone)]
pub struct ProjectionMetrics {
    registry: Arc<Registry>,
    applied_seq: Family<ShardLabel, Gauge>,
    /// Milliseconds between an event's leader time and its projection, at the last batch.
    lag_ms: Family<ShardLabel, Gauge>,
    /// Events the shard has that the projection has not applied yet (sampled).
    lag_events: Family<ShardLabel, Gauge>,
    /// The first missing seq while a gap stops the shard's projection, 0 otherwise.
    gap: Family<ShardLabel, Gauge>,
    batch_events: Histogram,
    batch_write_seconds: Histogram,
    /// Gaps opened and undecodable messages skipped.
    pub alarms: Counter,
    /// Events dropped because a gap held too many (read again after a restart).
    pub dropped: Counter,
}

impl Default for ProjectionMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("query");
        let mut metrics = ProjectionMetrics {
            registry: Arc::default(),
            applied_seq: Family::default(),
            lag_ms: Family::default(),
            lag_events: Family::default(),
            gap: Family::default(),
            batch_events: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            batch_write_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            alarms: Counter::default(),
            dropped: Counter::default(),
        };
        registry.register(
            "projection_applied_seq",
            "Last event seq projected, per shard",
            metrics.applied_seq.clone(),
        );
        registry.register(
            "projection_lag_ms",
            "Leader time to projection of the last batch, per shard",
            metrics.lag_ms.clone(),
        );
        registry.register(
            "projection_lag_events",
            "Events the shard has and the projection has not applied yet, per shard (sampled)",
            metrics.lag_events.clone(),
        );
        registry.register(
            "projection_gap",
            "First missing seq while a gap stops the shard's projection (0: none)",
            metrics.gap.clone(),
        );
        registry.register(
            "projection_batch_events",
            "Events per SQL transaction",
            metrics.batch_events.clone(),
        );
        registry.register(
            "projection_batch_write_seconds",
            "Time to write a batch (its SQL transaction)",
            metrics.batch_write_seconds.clone(),
        );
        registry.register(
            "projection_alarms",
            "Gaps opened and undecodable messages skipped",
            metrics.alarms.clone(),
        );
        registry.register(
            "projection_dropped_events",
            "Events dropped while a gap held too many",
            metrics.dropped.clone(),
        );
        metrics.registry = Arc::new(registry);
        metrics
    }
}

impl ProjectionMetrics {
    /// Records a gap (or its end); a newly opened gap raises an alarm and logs an error.
    pub fn set_gap(&self, shard: u32, gap: Option<(u64, u64)>, applied: u64) {
        let gauge = self.gap.get_or_create(&ShardLabel { shard });
        let missing = gap.map_or(0, |(missing, _)| missing as i64);
        let before = gauge.set(missing);
        if let Some((missing, first_held)) = gap
            && before != missing as i64
        {
            self.alarms.inc();
            tracing::error!(
                shard,
                applied,
                missing,
                first_held,
                "gap in the event stream: the shard's projection stops until the missing events arrive"
            );
        }
    }

    /// Records a batch written in `took`.
    pub fn applied(&self, batch: &[pb::Event], took: std::time::Duration) {
        self.batch_events.observe(batch.len() as f64);
        self.batch_write_seconds.observe(took.as_secs_f64());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for event in batch {
            let label = ShardLabel {
                shard: event.shard_id,
            };
            self.applied_seq.get_or_create(&label).set(event.seq as i64);
            self.lag_ms
                .get_or_create(&label)
                .set(now_ms - event.timestamp_ms);
        }
    }

    /// The last seq of `shard` projected (0 before the first).
    pub fn applied_seq_of(&self, shard: u32) -> u64 {
        let seq = self.applied_seq.get_or_create(&ShardLabel { shard }).get();
        u64::try_from(seq).unwrap_or(0)
    }

    /// Records how far the projection of `shard` is behind the shard's last event.
    pub fn set_lag_events(&self, shard: u32, lag: u64) {
        self.lag_events
            .get_or_create(&ShardLabel { shard })
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    /// The gap gauge of a shard (0 when there is none).
    pub fn gap_of(&self, shard: u32) -> i64 {
        self.gap.get_or_create(&ShardLabel { shard }).get()
    }

    pub fn alarm_count(&self) -> u64 {
        self.alarms.get()
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
