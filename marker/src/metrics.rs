//! Prometheus metrics of a coordinator replica: lifecycle steps counted as the replica applies
//! them (so every replica reports the same counts for the entries it applied since it started),
//! the in-flight set, and the driver's retries of unknown storage outcomes.

use std::time::Duration;

use consensus::{StateMachineStore, now_ms};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::machine::CoordinatorMachine;
use crate::saga::{AbortReason, Decision, Step};

/// How often the in-flight gauges are refreshed.
const REFRESH: Duration = Duration::from_secs(1);

/// The lifecycle steps a replica has applied, counted by its state machine.
#[derive(Clone)]
pub struct LifecycleCounts {
    pub(crate) submitted: Counter,
    /// By `decision` (commit, abort) and `reason` (for aborts).
    pub(crate) decided: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// The commits' series of `decided`, looked up once: counting one on the apply path then
    /// allocates no label set.
    committed: Counter,
}

impl Default for LifecycleCounts {
    fn default() -> LifecycleCounts {
        let decided: Family<_, Counter> = Family::default();
        let committed = decided
            .get_or_create(&vec![("decision", "commit"), ("reason", "")])
            .clone();
        LifecycleCounts {
            submitted: Counter::default(),
            decided,
            committed,
        }
    }
}

impl LifecycleCounts {
    pub fn count(&self, step: &Step) {
        match step {
            Step::Begun(_) => {
                self.submitted.inc();
            }
            Step::Decided {
                decision: Decision::Commit,
                ..
            } => {
                self.committed.inc();
            }
            Step::Decided {
                decision: Decision::Abort { reason, .. },
                ..
            } => {
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
            Step::Done { .. } => {}
        }
    }
}

#[derive(Clone, Default)]
pub struct CoordinatorMetrics {
    in_flight: Gauge,
    oldest_in_flight_age_ms: Gauge,
    /// Storage commands whose outcome was unknown and were sent again.
    pub retries: Counter,
}

impl CoordinatorMetrics {
    pub fn register(registry: &mut Registry, counts: LifecycleCounts) -> CoordinatorMetrics {
        let metrics = CoordinatorMetrics::default();
        registry.register(
            "transactions_submitted",
            "Transactions begun",
            counts.submitted,
        );
        registry.register(
            "transactions_decided",
            "Decisions, by decision and abort reason",
            counts.decided,
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

    /// Refreshes the in-flight gauges for as long as the replica runs.
    pub async fn follow(self, machine: StateMachineStore<CoordinatorMachine>) {
        let mut ticks = tokio::time::interval(REFRESH);
        loop {
            ticks.tick().await;
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
