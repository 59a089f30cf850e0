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

#[derive(Debug, Serialize)]
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
    /// The whole machine's CPU time (every process, the load generator's too) per operation.
    pub cpu_us_per_operation: f64,
    /// The share of the machine's CPU time the hypervisor gave to other guests during the
    /// phase: runs with much of it are not comparable with runs without.
    pub steal_percent: f64,
}

/// The machine's CPU time so far, from the first line of `/proc/stat` (zeros where there is
/// none), in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    busy: u64,
    steal: u64,
    total: u64,
}

impl MachineCpu {
    /// Clock ticks per second (`USER_HZ`), the unit of `/proc/stat` on every Linux port.
    const TICKS_PER_SECOND: f64 = 100.0;

    pub fn now() -> MachineCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|field| field.parse().unwrap_or(0))
            .collect();
        let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
            return MachineCpu::default();
        };
        MachineCpu {
            busy: user + nice + system + irq + softirq,
            steal,
            total: user + nice + system + idle + iowait + irq + softirq + steal,
        }
    }
}

impl PhaseReport {
    /// Summarizes a phase that began when the machine's CPU stood at `cpu`: `histogram` holds
    /// every operation's latency, `rejected` of them failed.
    pub fn new(
        phase: &str,
        clients: usize,
        elapsed: Duration,
        cpu: MachineCpu,
        histogram: &Histogram<u64>,
        rejected: u64,
    ) -> PhaseReport {
        let seconds = elapsed.as_secs_f64();
        let operations = histogram.len().saturating_sub(rejected);
        let millis = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1_000.0;
        let end = MachineCpu::now();
        let busy_seconds = end.busy.saturating_sub(cpu.busy) as f64 / MachineCpu::TICKS_PER_SECOND;
        let total = end.total.saturating_sub(cpu.total).max(1) as f64;
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
            cpu_us_per_operation: busy_seconds * 1e6 / operations.max(1) as f64,
            steal_percent: end.steal.saturating_sub(cpu.steal) as f64 * 100.0 / total,
        }
    }
}

/// Prints the phases as a table under `unit` (what one operation is).
pub fn print_table(unit: &str, phases: &[PhaseReport]) {
    println!(
        "{:<24} {:>8} {:>14} {:>10} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "phase",
        "clients",
        format!("{unit}/s"),
        "rejected",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "CPU µs/op",
        "steal %"
    );
    for phase in phases {
        println!(
            "{:<24} {:>8} {:>14.0} {:>10} {:>9.2} {:>9.2} {:>9.2} {:>10.0} {:>7.1}",
            phase.phase,
            phase.clients,
            phase.operations_per_second,
            phase.rejected,
            phase.p50_ms,
            phase.p99_ms,
            phase.p999_ms,
            phase.cpu_us_per_operation,
            phase.steal_percent
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
    let cpu = MachineCpu::now();
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
        cpu,
        &histogram,
        rejected.load(Ordering::Relaxed),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_reports_the_machine_cpu_it_took_per_operation() {
        let cpu = MachineCpu::now();
        assert!(
            cpu.total > 0 && cpu.busy + cpu.steal <= cpu.total,
            "{cpu:?}"
        );
        let started = Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let mut latencies = histogram();
        record(&mut latencies, started.elapsed(), 10);
        let phase = PhaseReport::new("spin", 1, started.elapsed(), cpu, &latencies, 0);
        // 300 ms of one busy thread over 10 operations: about 30 ms each, less whatever the
        // hypervisor gave to other guests meanwhile.
        assert!(phase.cpu_us_per_operation >= 5_000.0, "{phase:?}");
        assert!((0.0..=100.0).contains(&phase.steal_percent), "{phase:?}");
    }
}
