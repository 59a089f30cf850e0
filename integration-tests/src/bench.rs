//! What the benchmark programs share: a deterministic generator, latency histograms, a
//! closed-loop driver, and one report format (a table for people, JSON for machines).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// A small deterministic generator (xorshift64*), so runs are comparable.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
}

/// Microsecond latencies, up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Records `count` operations that all took `latency` (one call carrying several operations).
pub fn record(histogram: &mut Histogram<u64>, latency: Duration, count: u64) {
    let micros = latency.as_micros().clamp(1, 60_000_000) as u64;
    histogram
        .record_n(micros, count)
        .expect("the value is within the histogram's bounds");
}

#[derive(Serialize)]
pub struct PhaseReport {
    pub phase: String,
    pub clients: usize,
    pub seconds: f64,
    pub operations: u64,
    pub rejected: u64,
    pub operations_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl PhaseReport {
    /// Summarizes a phase: `histogram` holds every operation's latency, `rejected` of them failed.
    pub fn new(
        phase: &str,
        clients: usize,
        elapsed: Duration,
        histogram: &Histogram<u64>,
        rejected: u64,
    ) -> PhaseReport {
        let seconds = elapsed.as_secs_f64();
        let operations = histogram.len().saturating_sub(rejected);
        let millis = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1_000.0;
        PhaseReport {
            phase: phase.to_string(),
            clients,
            seconds,
            operations,
            rejected,
            operations_per_second: operations as f64 / seconds,
            p50_ms: millis(0.5),
            p99_ms: millis(0.99),
            p999_ms: millis(0.999),
        }
    }
}

/// Prints the phases as a table under `unit` (what one operation is).
pub fn print_table(unit: &str, phases: &[PhaseReport]) {
    println!(
        "{:<24} {:>8} {:>14} {:>10} {:>9} {:>9} {:>9}",
        "phase",
        "clients",
        format!("{unit}/s"),
        "rejected",
        "p50 ms",
        "p99 ms",
        "p999 ms"
    );
    for phase in phases {
        println!(
            "{:<24} {:>8} {:>14.0} {:>10} {:>9.2} {:>9.2} {:>9.2}",
            phase.phase,
            phase.clients,
            phase.operations_per_second,
            phase.rejected,
            phase.p50_ms,
            phase.p99_ms,
            phase.p999_ms
        );
    }
}

/// Prints the report as JSON and writes it to `path` when given.
pub fn emit_json<T: Serialize>(report: &T, path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    println!("{json}");
    if let Some(path) = path {
        std::fs::write(path, &json)?;
    }
    Ok(())
}

/// Runs `clients` closed-loop clients for `seconds`, each sending its next operation when the
/// last one answered; `operation` gets the client's index and random generator back and says
/// whether it succeeded.
pub async fn closed_loop<F, Fut>(
    name: &str,
    clients: usize,
    seconds: u64,
    operation: F,
) -> anyhow::Result<PhaseReport>
where
    F: Fn(usize, Rng) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<(bool, Rng)>> + Send,
{
    let operation = Arc::new(operation);
    let rejected = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (operation, rejected) = (Arc::clone(&operation), Arc::clone(&rejected));
        tasks.push(tokio::spawn(async move {
            let mut histogram = histogram();
            let mut rng = Rng(client as u64 * 7919 + 1);
            while Instant::now() < end {
                let sent = Instant::now();
                let (succeeded, next) = operation(client, rng).await?;
                rng = next;
                if !succeeded {
                    rejected.fetch_add(1, Ordering::Relaxed);
                }
                record(&mut histogram, sent.elapsed(), 1);
            }
            anyhow::Ok(histogram)
        }));
    }
    let mut histogram: Histogram<u64> = histogram();
    for task in tasks {
        histogram.add(task.await??)?;
    }
    Ok(PhaseReport::new(
        name,
        clients,
        started.elapsed(),
        &histogram,
        rejected.load(Ordering::Relaxed),
    ))
}
