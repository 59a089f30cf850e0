//! bench-storage: single-shard transfers against one storage shard of three local `auticuro`
//! processes (fsync on): throughput and latency for uniform and skewed (hot-account) traffic,
//! latency at half the measured maximum, and the time from killing the leader to the next
//! successful write. Prints a table and JSON.
//!
//! Run with a release build: `cargo run --release -p integration-tests --bin bench-storage`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use integration_tests::group::Group;
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;
use proto::common::v1::Amount;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Single-shard transfer benchmark against a local 3-replica storage shard")]
struct Args {
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Customer accounts transfers pick from.
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Where to write the JSON report (it is printed as well).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug)]
enum Traffic {
    Uniform,
    /// 80% of transfers touch the hottest 1% of accounts.
    Skewed,
}

#[derive(Serialize)]
struct PhaseReport {
    phase: String,
    clients: usize,
    seconds: f64,
    transfers: u64,
    rejected: u64,
    transfers_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    replicas: u32,
    accounts: usize,
    phases: Vec<PhaseReport>,
    failover_ms: f64,
}

/// A small deterministic generator, so runs are comparable (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

fn pick(rng: &mut Rng, traffic: Traffic, accounts: usize) -> usize {
    let hot = (accounts / 100).max(2);
    match traffic {
        Traffic::Skewed if rng.below(10) < 8 => rng.below(hot),
        _ => rng.below(accounts),
    }
}

fn account(index: usize) -> String {
    format!("bench-{index}")
}

fn transfer(request_id: String, from: usize, to: usize) -> pb::Command {
    pb::Command {
        request_id,
        kind: Some(pb::command::Kind::Transfer(pb::Transfer {
            from_account_id: account(from),
            to_account_id: account(to),
            amount: Some(Amount {
                minor_units: "1".into(),
            }),
            currency: "USD".into(),
            metadata: Default::default(),
        })),
    }
}

fn create(account_id: String, no_lower_limit: bool) -> pb::Command {
    pb::Command {
        request_id: format!("create-{account_id}"),
        kind: Some(pb::command::Kind::CreateAccount(pb::CreateAccount {
            account_id,
            currency: "USD".into(),
            scale: 2,
            no_lower_limit,
            ..Default::default()
        })),
    }
}

async fn open_accounts(shard: &Group, accounts: usize) -> anyhow::Result<()> {
    shard
        .execute(create("sys:funding:USD".into(), true))
        .await?;
    let shard_ref = &shard;
    let work = (0..accounts).map(|index| async move {
        shard_ref.execute(create(account(index), false)).await?;
        let mut fund = transfer(format!("fund-{index}"), 0, index);
        if let Some(pb::command::Kind::Transfer(transfer)) = &mut fund.kind {
            transfer.from_account_id = "sys:funding:USD".into();
            transfer.amount = Some(Amount {
                minor_units: "100000000".into(),
            });
        }
        shard_ref.execute(fund).await
    });
    let results: Vec<_> = futures::stream::iter(work)
        .buffer_unordered(64)
        .collect()
        .await;
    for result in results {
        result?;
    }
    Ok(())
}

/// Runs `clients` closed-loop clients (or, with `rate`, an open loop at that many transfers per
/// second, latency measured from each transfer's scheduled start) for `seconds`.
async fn run_phase(
    name: &str,
    clients: Vec<LedgerClient<tonic::transport::Channel>>,
    args: &Args,
    traffic: Traffic,
    rate: Option<f64>,
) -> anyhow::Result<PhaseReport> {
    static NEXT_REQUEST: AtomicU64 = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let rejected = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (index, mut client) in clients.into_iter().enumerate() {
        let accounts = args.accounts;
        let rejected = rejected.clone();
        let period = rate.map(|rate| Duration::from_secs_f64(args.clients as f64 / rate));
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("valid precision");
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1));
            let mut scheduled = Instant::now();
            while Instant::now() < deadline {
                let from = pick(&mut rng, traffic, accounts);
                let mut to = pick(&mut rng, traffic, accounts);
                if to == from {
                    to = (from + 1) % accounts;
                }
                let request_id = format!("b-{}", NEXT_REQUEST.fetch_add(1, Ordering::Relaxed));
                if period.is_some() {
                    tokio::time::sleep_until(scheduled.into()).await;
                } else {
                    scheduled = Instant::now();
                }
                let reply = client
                    .execute(pb::ExecuteRequest {
                        command: Some(transfer(request_id, from, to)),
                    })
                    .await?;
                match reply.into_inner().reply {
                    Some(pb::execute_response::Reply::Result(result))
                        if result.outcome == pb::Outcome::Ok as i32 => {}
                    _ => {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                histogram.record(scheduled.elapsed().as_micros() as u64)?;
                if let Some(period) = period {
                    scheduled += period;
                }
            }
            anyhow::Ok(histogram)
        }));
    }
    let mut histogram = Histogram::<u64>::new(3)?;
    for task in tasks {
        histogram.add(task.await??)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rejected = rejected.load(Ordering::Relaxed);
    let transfers = histogram.len() - rejected;
    let millis = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1_000.0;
    Ok(PhaseReport {
        phase: name.to_string(),
        clients: args.clients,
        seconds,
        transfers,
        rejected,
        transfers_per_second: transfers as f64 / seconds,
        p50_ms: millis(0.5),
        p99_ms: millis(0.99),
        p999_ms: millis(0.999),
    })
}

/// Kills the leader with SIGKILL while writing, and measures until the next write succeeds.
async fn measure_failover(shard: &mut Group) -> anyhow::Result<f64> {
    let leader = shard.leader().await?;
    shard.kill(leader).await?;
    let killed = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = shard
            .execute(transfer(format!("failover-{attempt}"), 1, 2))
            .await?;
        if result.outcome == pb::Outcome::Ok as i32 {
            return Ok(killed.elapsed().as_secs_f64() * 1_000.0);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    eprintln!(
        "starting a 3-replica shard and opening {} accounts…",
        args.accounts
    );
    let mut shard = Group::storage(1, 3, &[]).await?;
    open_accounts(&shard, args.accounts).await?;
    let leader = shard.leader().await?;
    let leader_address = shard.replica(leader).address.clone();
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(auticuro::client::channel(&leader_address)?);
    }
    let clients = || {
        (0..args.clients)
            .map(|i| LedgerClient::new(channels[i % channels.len()].clone()))
            .collect()
    };

    let mut phases = Vec::new();
    eprintln!("uniform, {} clients, {} s…", args.clients, args.seconds);
    phases.push(run_phase("uniform, max", clients(), &args, Traffic::Uniform, None).await?);
    eprintln!("skewed (80% on 1% of accounts)…");
    phases.push(run_phase("skewed, max", clients(), &args, Traffic::Skewed, None).await?);
    let half = phases[0].transfers_per_second / 2.0;
    eprintln!("uniform at half load ({half:.0}/s)…");
    phases.push(
        run_phase(
            "uniform, half load",
            clients(),
            &args,
            Traffic::Uniform,
            Some(half),
        )
        .await?,
    );
    eprintln!("killing the leader…");
    let failover_ms = measure_failover(&mut shard).await?;

    println!(
        "{:<22} {:>8} {:>12} {:>10} {:>9} {:>9} {:>9}",
        "phase", "clients", "transfers/s", "rejected", "p50 ms", "p99 ms", "p999 ms"
    );
    for phase in &phases {
        println!(
            "{:<22} {:>8} {:>12.0} {:>10} {:>9.2} {:>9.2} {:>9.2}",
            phase.phase,
            phase.clients,
            phase.transfers_per_second,
            phase.rejected,
            phase.p50_ms,
            phase.p99_ms,
            phase.p999_ms
        );
    }
    println!("leader killed → next successful write: {failover_ms:.0} ms");
    let report = Report {
        benchmark: "storage-single-shard",
        replicas: 3,
        accounts: args.accounts,
        phases,
        failover_ms,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json)?;
    }
    Ok(())
}
