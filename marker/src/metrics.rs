//! Prometheus metrics of a coordinator replica, derived from its replicated event log (so every
//! replica reports the same counts) plus the driver's retries of unknown storage outcomes.

use std::time::Duration;

use consensus::{StateMachineStore, event_log, now_ms};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::machine::CoordinatorMachine;
use crate::saga::{AbortReason, Decision, LifecycleEvent, LifecycleKind};

/// How often the counters catch up with the event log.
const REFRESH: Duration = Duration::from_secs(1);
/// Lifecycle events read at a time.
const PAGE_EVENTS: usize = 10_000;

#[derive(Clone, Default)]
pub struct CoordinatorMetrics {
    submitted: Counter,
    /// By `decision` (commit, abort) and `reason` (for aborts).
    decided: Family<Vec<(&'static str, &'static str)>, Counter>,
    in_flight: Gauge,
    oldest_in_flight_age_ms: Gauge,
    /// Storage commands whose outcome was unknown and were sent again.
    pub retries: Counter,
}

impl CoordinatorMetrics {
    pub fn register(registry: &mut Registry) -> CoordinatorMetrics {
        let metrics = CoordinatorMetrics::default();
        registry.register(
            "transactions_submitted",
            "Transactions begun",
            metrics.submitted.clone(),
        );
        registry.register(
            "transactions_decided",
            "Decisions, by decision and abort reason",
            metrics.decided.clone(),
        );
        registry.register(
            "in_flight",
            "Transactions not done yet",
            metrics.in_flight.clone(),
        );
        registry.register(
            "oldest_in_flight_age_ms",
            "Age of the oldest transaction not done yet",
            metrics.oldest_in_flight_age_ms.clone(),
        );
        registry.register(
            "storage_retries",
            "Storage commands resent after an unknown outcome",
            metrics.retries.clone(),
        );
        metrics
    }

    fn count(&self, event: &LifecycleEvent) {
        match (event.kind, &event.transaction.decision) {
            (LifecycleKind::Begun, _) => {
                self.submitted.inc();
            }
            (LifecycleKind::Decided, Some(Decision::Commit)) => {
                self.decided
                    .get_or_create(&vec![("decision", "commit"), ("reason", "")])
                    .inc();
            }
            (LifecycleKind::Decided, Some(Decision::Abort { reason, .. })) => {
                let reason = match reason {
                    AbortReason::Rejected => "rejected",
                    AbortReason::Deadline => "deadline",
                    AbortReason::Forced => "forced",
                    AbortReason::ResolvedStale => "resolved_stale",
                };
                self.decided
                    .get_or_create(&vec![("decision", "abort"), ("reason", reason)])
                    .inc();
            }
            _ => {}
        }
    }

    /// Follows the event log and the in-flight set for as long as the replica runs.
    pub async fn follow(self, machine: StateMachineStore<CoordinatorMachine>) {
        let mut next_seq = 1;
        let mut ticks = tokio::time::interval(REFRESH);
        loop {
            ticks.tick().await;
            // Pages until caught up, so the counts keep up however fast events come.
            loop {
                match event_log::read::<LifecycleEvent>(
                    &machine.store().view(),
                    next_seq,
                    u64::MAX,
                    PAGE_EVENTS,
                ) {
                    Ok(events) => {
                        let full = events.len() == PAGE_EVENTS;
                        for (seq, event) in events {
                            self.count(&event);
                            next_seq = seq + 1;
                        }
                        if !full {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "reading lifecycle events for metrics");
                        break;
                    }
                }
            }
            let (in_flight, oldest) = machine.read(|machine| {
                let coordinator = machine.coordinator();
                (
                    coordinator.in_flight_count(),
                    coordinator.in_flight().next().map(|t| t.begun_at_ms),
                )
            });
            self.in_flight
                .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
            self.oldest_in_flight_age_ms.set(
                oldest
                    .map(|begun| now_ms().saturating_sub(begun))
                    .unwrap_or(0),
            );
        }
    }
}
