//! bench-storage: single-shard transfers against one storage shard of three local `auticuro`
//! processes (fsync on): throughput and latency for uniform and skewed (hot-account) traffic,
//! latency at half the measured maximum, and the time from killing the leader to the next
//! successful write. Prints a table and JSON. Clients follow a leader change during a phase;
//! transfers that a replica redirected count as rejected, not as done.
//!
//! Run with a release build: `cargo run --release -p integration-tests --bin bench-storage`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use auticuro::client::ShardClient;
use clap::Parser;
use consensus::client::LeaderClient;
use futures::StreamExt;
use integration_tests::bench::{self, PhaseReport, Rng};
use integration_tests::commands::{command, create, transfer};
use integration_tests::group::Group;
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;
use serde::Serialize;

consensus::service_allocator!();

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
    /// Transfers per call: 1 sends each with `Execute`; more send them together with
    /// `ExecuteMany` (independent transfers, one round trip), as a gateway packing concurrent
    /// requests would. Latency is the call's, counted for each transfer in it.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Send the transfers through one shared `auticuro::client::ShardClient`, the client that
    /// coordinators and gateways use: it packs the commands that queue while its calls are in
    /// flight into one `ExecuteMany`.
    #[arg(long)]
    shard_client: bool,
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
struct Report {
    benchmark: &'static str,
    replicas: u32,
    transfers_per_call: usize,
    /// Whether the transfers went through one shared `ShardClient`.
    shard_client: bool,
    accounts: usize,
    phases: Vec<PhaseReport>,
    failover_ms: f64,
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

async fn open_accounts(shard: &Group, accounts: usize) -> anyhow::Result<()> {
    shard
        .execute(command(
            "create-sys:funding:USD",
            create("sys:funding:USD", true),
        ))
        .await?;
    let work = (0..accounts).map(|index| async move {
        let id = account(index);
        shard
            .execute(command(format!("create-{id}"), create(&id, false)))
            .await?;
        shard
            .execute(command(
                format!("fund-{index}"),
                transfer("sys:funding:USD", &id, 100_000_000),
            ))
            .await
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

/// How long the shard client may retry one transfer whose outcome it has not learned.
const SHARD_CLIENT_DEADLINE: Duration = Duration::from_secs(10);

/// How a benchmark client reaches the shard.
enum Client {
    /// Its own calls, on the connection of one of the `--connections` leader clients (each
    /// keeps its own connection to each replica); a redirect moves that leader client on.
    Calls(Arc<LeaderClient>),
    /// The platform's shard client, shared by every benchmark client.
    Shared(Arc<ShardClient>),
}

/// What became of the transfers of one call.
struct Sent {
    /// Executed but not accepted.
    refused: u64,
    /// Not executed: the replica was no longer the leader.
    redirected: u64,
}

fn accepted(result: &pb::CommandResult) -> bool {
    result.outcome == pb::Outcome::Ok as i32
}

impl Client {
    /// Sends the commands and says how many were not accepted.
    async fn send(&mut self, commands: Vec<pb::Command>) -> anyhow::Result<Sent> {
        match self {
            Client::Calls(leader) => {
                let channel = leader
                    .channel(&leader.target(0))
                    .map_err(anyhow::Error::msg)?;
                let (sent, redirect) =
                    send_calls(&mut LedgerClient::new(channel), commands).await?;
                if redirect.is_some() || sent.redirected > 0 {
                    bench::follow_redirect(leader, redirect).await;
                }
                Ok(sent)
            }
            Client::Shared(shard) => {
                let deadline = Instant::now() + SHARD_CLIENT_DEADLINE;
                let results = futures::future::join_all(
                    commands
                        .into_iter()
                        .map(|command| shard.execute(command, deadline)),
                )
                .await;
                let mut refused = 0;
                for result in results {
                    refused += u64::from(!accepted(&result?));
                }
                Ok(Sent {
                    refused,
                    redirected: 0,
                })
            }
        }
    }
}

/// Sends the commands in one call of the client's own (`Execute` for one, `ExecuteMany` for
/// several); says how many were not accepted, and the leader a redirect named.
async fn send_calls(
    client: &mut LedgerClient<tonic::transport::Channel>,
    mut commands: Vec<pb::Command>,
) -> anyhow::Result<(Sent, Option<String>)> {
    let replies = if commands.len() == 1 {
        let command = commands.pop();
        vec![
            client
                .execute(pb::ExecuteRequest { command })
                .await?
                .into_inner(),
        ]
    } else {
        client
            .execute_many(pb::ExecuteManyRequest { commands })
            .await?
            .into_inner()
            .responses
    };
    let mut sent = Sent {
        refused: 0,
        redirected: 0,
    };
    let mut leader = None;
    for reply in replies {
        match reply.reply {
            Some(pb::execute_response::Reply::Result(result)) if accepted(&result) => {}
            Some(pb::execute_response::Reply::Redirect(redirect)) => {
                sent.redirected += 1;
                leader = leader.or(redirect.leader_address);
            }
            _ => sent.refused += 1,
        }
    }
    Ok((sent, leader))
}

/// Runs closed-loop clients (or, with `rate`, an open loop at that many transfers per second
/// overall, latency measured from each transfer's scheduled start) for `args.seconds`.
async fn run_phase(
    name: &str,
    clients: Vec<Client>,
    args: &Args,
    traffic: Traffic,
    rate: Option<f64>,
) -> anyhow::Result<PhaseReport> {
    static NEXT_REQUEST: AtomicU64 = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let rejected = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let cpu = bench::MachineCpu::now();
    let mut tasks = Vec::new();
    for (index, mut client) in clients.into_iter().enumerate() {
        let accounts = args.accounts;
        let clients_total = args.clients;
        let rejected = rejected.clone();
        let batch = args.batch.max(1);
        let period = rate.map(|rate| Duration::from_secs_f64((args.clients * batch) as f64 / rate));
        tasks.push(tokio::spawn(async move {
            let mut histogram = bench::histogram();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1));
            // Open-loop clients start spread over one period, so the load is smooth, not bursts.
            let mut scheduled = Instant::now()
                + period
                    .map(|period| period.mul_f64(index as f64 / clients_total as f64))
                    .unwrap_or_default();
            while Instant::now() < deadline {
                let commands: Vec<pb::Command> = (0..batch)
                    .map(|_| {
                        let from = pick(&mut rng, traffic, accounts);
                        let mut to = pick(&mut rng, traffic, accounts);
                        if to == from {
                            to = (from + 1) % accounts;
                        }
                        let request_id =
                            format!("b-{}", NEXT_REQUEST.fetch_add(1, Ordering::Relaxed));
                        command(request_id, transfer(&account(from), &account(to), 1))
                    })
                    .collect();
                match period {
                    Some(_) => tokio::time::sleep_until(scheduled.into()).await,
                    None => scheduled = Instant::now(),
                }
                let sent = client.send(commands).await?;
                rejected.fetch_add(sent.refused + sent.redirected, Ordering::Relaxed);
                // Redirected transfers were not executed: they count as rejected, not as done.
                let executed = batch as u64 - sent.redirected;
                if executed > 0 {
                    bench::record(&mut histogram, scheduled.elapsed(), executed);
                }
                if let Some(period) = period {
                    scheduled += period;
                }
            }
            anyhow::Ok(histogram)
        }));
    }
    let mut histogram = bench::histogram();
    for task in tasks {
        histogram.add(task.await??)?;
    }
    Ok(PhaseReport::new(
        name,
        args.clients,
        started.elapsed(),
        cpu,
        &histogram,
        rejected.load(Ordering::Relaxed),
    ))
}

/// Kills the leader with SIGKILL and measures until the next write succeeds.
async fn measure_failover(shard: &mut Group) -> anyhow::Result<f64> {
    let leader = shard.leader().await?;
    shard.kill(leader).await?;
    let killed = Instant::now();
    for attempt in 0.. {
        let probe = command(
            format!("failover-{attempt}"),
            transfer(&account(1), &account(2), 1),
        );
        if shard.execute(probe).await?.outcome == pb::Outcome::Ok as i32 {
            break;
        }
    }
    Ok(killed.elapsed().as_secs_f64() * 1_000.0)
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
    let addresses: Vec<String> = shard.replicas.iter().map(|r| r.address.clone()).collect();
    let leaders: Vec<Arc<LeaderClient>> = (0..args.connections.max(1))
        .map(|_| {
            let client = LeaderClient::new("shard 1".into(), addresses.clone());
            client.remember_leader(Some(shard.replica(leader).address.clone()));
            Arc::new(client)
        })
        .collect();
    let shared = args
        .shard_client
        .then(|| Arc::new(ShardClient::new(1, addresses.clone())));
    let clients = || {
        (0..args.clients)
            .map(|i| match &shared {
                Some(shared) => Client::Shared(shared.clone()),
                None => Client::Calls(leaders[i % leaders.len()].clone()),
            })
            .collect()
    };

    let mut phases = Vec::new();
    eprintln!(
        "uniform, {} clients × {} transfers per call, {} s…",
        args.clients, args.batch, args.seconds
    );
    phases.push(run_phase("uniform, max", clients(), &args, Traffic::Uniform, None).await?);
    eprintln!("skewed (80% on 1% of accounts)…");
    phases.push(run_phase("skewed, max", clients(), &args, Traffic::Skewed, None).await?);
    let half = phases[0].operations_per_second / 2.0;
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

    bench::print_table("transfers", &phases);
    println!("leader killed → next successful write: {failover_ms:.0} ms");
    let report = Report {
        benchmark: "storage-single-shard",
        replicas: 3,
        transfers_per_call: args.batch,
        shard_client: args.shard_client,
        accounts: args.accounts,
        phases,
        failover_ms,
    };
    bench::emit_json(&report, args.json.as_deref())
}
