//! A batch of simulation seeds: `SIM_SEEDS` (default 300) seeds from `SIM_FIRST_SEED`
//! (default 1). A failure names its seed and the command that replays it.

use reliability::simulation::{Config, run};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

#[test]
fn every_seed_keeps_the_invariants_and_reaches_every_outcome() {
    let first = env_number("SIM_FIRST_SEED", 1);
    let count = env_number("SIM_SEEDS", 300);
    let config = Config::default();
    let (mut committed, mut aborted, mut captured, mut faults) = (0, 0, 0, 0);
    for seed in first..first + count {
        match run(seed, &config) {
            Ok(report) => {
                committed += report.committed;
                aborted += report.aborted;
                captured += report.captured;
                faults += report.faults.values().sum::<u64>();
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    println!(
        "{count} seeds: {committed} committed, {aborted} aborted, {captured} holds captured, \
         {faults} faults injected"
    );
    // The workload must exercise both outcomes, captures and the faults, or the seeds prove
    // little.
    assert!(committed > 0 && aborted > 0 && captured > 0 && faults > 0);
}

#[test]
fn a_seed_replays_the_same_run() {
    let config = Config::default();
    let first = run(42, &config).unwrap();
    let again = run(42, &config).unwrap();
    assert_eq!(
        (
            first.events,
            first.messages,
            first.lost,
            first.committed,
            first.quiet_at_ms
        ),
        (
            again.events,
            again.messages,
            again.lost,
            again.committed,
            again.quiet_at_ms
        )
    );
    let other = run(43, &config).unwrap();
    assert_ne!(first.events, other.events);
}
