//! What the benchmark programs share: a deterministic generator, latency histograms, a
//! closed-loop driver, and one report format (a table for people, JSON for machines).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// How long a benchmark client waits after a redirect that named no leader (an election).
const REDIRECT_PAUSE: Duration = Duration::from_millis(10);

/// Follows a redirect of a benchmark client's own call: to the leader it names, or, when it
/// names none (an election), after `REDIRECT_PAUSE`.
pub async fn follow_redirect(leader: &consensus::client::LeaderClient, address: Option<String>) {
    match address {
        Some(address) => leader.remember_leader(Some(address)),
        None => tokio::time::sleep(REDIRECT_PAUSE).await,
    }
}

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
    /// `cpu_us_per_operation` by program (the processes' command name: `auticuro`, `marker`,
    /// `postgres`, the benchmark itself, the kernel's threads…), those that ran during the phase,
    /// the busiest first; what is left of the machine's is interrupts and processes that ended.
    pub cpu_us_per_operation_by_program: Vec<(String, f64)>,
}

/// The machine's CPU time so far, from the first line of `/proc/stat` (zeros where there is
/// none), and every process's, in clock ticks.
#[derive(Clone, Debug, Default)]
pub struct MachineCpu {
    busy: u64,
    steal: u64,
    total: u64,
    /// By process id: the command name and the CPU time it has taken.
    processes: HashMap<u32, (String, u64)>,
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
            processes: processes_cpu(),
        }
    }

    /// CPU seconds per program since `start`, the busiest first: a process's time since
    /// `start`, or all of it for one started since.
    fn by_program_since(&self, start: &MachineCpu) -> Vec<(String, f64)> {
        let mut seconds: HashMap<&str, u64> = HashMap::new();
        for (pid, (name, ticks)) in &self.processes {
            let before = match start.processes.get(pid) {
                Some((same, before)) if same == name => *before,
                _ => 0,
            };
            *seconds.entry(name).or_default() += ticks.saturating_sub(before);
        }
        let mut programs: Vec<(String, f64)> = seconds
            .into_iter()
            .filter(|(_, ticks)| *ticks > 0)
            .map(|(name, ticks)| (name.to_string(), ticks as f64 / Self::TICKS_PER_SECOND))
            .collect();
        programs.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        programs
    }
}

/// Every process's command name and user plus system time (`/proc/<pid>/stat`), by process id;
/// processes that end while they are read are left out.
fn processes_cpu() -> HashMap<u32, (String, u64)> {
    let mut processes = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return processes;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: the name may hold spaces and parentheses, so it ends at
        // the last `)`; the parent is the 2nd field after it, user and system time the 12th and
        // 13th.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let number = |index: usize| {
            fields
                .get(index)
                .and_then(|field| field.parse::<u64>().ok())
        };
        // The kernel's threads (`kthreadd`, pid 2, and its children) under one name, not one
        // per worker (`kworker/1:1H-kblockd`…).
        let name = if pid == 2 || number(1) == Some(2) {
            "kernel threads".to_string()
        } else {
            stat[open + 1..close].to_string()
        };
        if let (Some(user), Some(system)) = (number(11), number(12)) {
            processes.insert(pid, (name, user + system));
        }
    }
    processes
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
        let per_operation = |seconds: f64| seconds * 1e6 / operations.max(1) as f64;
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
            cpu_us_per_operation: per_operation(busy_seconds),
            steal_percent: end.steal.saturating_sub(cpu.steal) as f64 * 100.0 / total,
            cpu_us_per_operation_by_program: end
                .by_program_since(&cpu)
                .into_iter()
                .map(|(name, seconds)| (name, per_operation(seconds)))
                .collect(),
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
    for phase in phases {
        let programs: Vec<String> = phase
            .cpu_us_per_operation_by_program
            .iter()
            .take(8)
            .map(|(name, us)| format!("{name} {us:.0}"))
            .collect();
        println!(
            "CPU µs/op by program, {}: {}",
            phase.phase,
            programs.join(", ")
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
            "busy {}, steal {}, total {}",
            cpu.busy,
            cpu.steal,
            cpu.total
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
        // The spinning was this process's: it is counted under this program's name.
        let name = std::fs::read_to_string("/proc/self/comm").unwrap();
        let ours = phase
            .cpu_us_per_operation_by_program
            .iter()
            .find(|(program, _)| program == name.trim_end())
            .map(|(_, us)| *us);
        assert!(ours.is_some_and(|us| us >= 5_000.0), "{phase:?}");
        // Counted once (a thread's time is in its process's), so within the machine's.
        assert!(
            ours.is_some_and(|us| us <= phase.cpu_us_per_operation + 5_000.0),
            "{phase:?}"
        );
    }
}
