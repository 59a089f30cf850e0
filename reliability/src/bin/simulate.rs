//! `simulate`: runs seeds of the deterministic simulation and prints what they did; a failing
//! seed prints the broken invariant, the last events and the command that replays it.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Parser;
use reliability::simulation::{Config, Report, run};

#[derive(Parser)]
#[command(about = "Deterministic simulation of the storage and coordinator protocols")]
struct Args {
    /// Run this one seed (with --trace, print every event).
    #[arg(long, conflicts_with_all = ["seeds", "first_seed"])]
    seed: Option<u64>,
    /// How many seeds to run.
    #[arg(long, default_value_t = 300)]
    seeds: u64,
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Print every event of the run.
    #[arg(long)]
    trace: bool,
    /// Payments each of the 4 clients makes.
    #[arg(long, default_value_t = Config::default().payments_per_client)]
    payments_per_client: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = Config {
        trace: args.trace,
        payments_per_client: args.payments_per_client,
        ..Config::default()
    };
    let seeds = match args.seed {
        Some(seed) => seed..seed + 1,
        None => args.first_seed..args.first_seed + args.seeds,
    };
    let mut totals = Report::default();
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut runs = 0u64;
    for seed in seeds {
        match run(seed, &config) {
            Ok(report) => {
                runs += 1;
                totals.payments += report.payments;
                totals.committed += report.committed;
                totals.aborted += report.aborted;
                totals.holds += report.holds;
                totals.captured += report.captured;
                totals.messages += report.messages;
                totals.lost += report.lost;
                totals.duplicated += report.duplicated;
                totals.events += report.events;
                totals.quiet_at_ms = totals.quiet_at_ms.max(report.quiet_at_ms);
                for (kind, count) in report.faults {
                    *faults.entry(kind).or_default() += count;
                }
            }
            Err(failure) => {
                eprintln!("{failure}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("seeds passed        {runs}");
    println!(
        "payments            {} ({} committed, {} aborted)",
        totals.payments, totals.committed, totals.aborted
    );
    println!(
        "holds               {} ({} captured)",
        totals.holds, totals.captured
    );
    println!(
        "messages            {} ({} lost, {} duplicated)",
        totals.messages, totals.lost, totals.duplicated
    );
    println!("events              {}", totals.events);
    println!("latest quiet at     {} ms (virtual)", totals.quiet_at_ms);
    for (kind, count) in faults {
        println!("fault {kind:<22} {count}");
    }
    ExitCode::SUCCESS
}
