//! bench-coordinator: cross-shard transfers through one coordinator shard of three `marker`
//! processes over two storage shards of three `auticuro` processes each (fsync on). Every
//! transfer debits an account on one shard and credits one on the other, so each runs the full
//! reservation saga. Prints throughput and p50/p99/p999 latency as a table and JSON. A leader
//! change moves the clients to the new leader; the submits it redirected count as rejected.
//!
//! Run with a release build: `cargo run --release -p integration-tests --bin bench-coordinator`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use consensus::client::LeaderClient;
use integration_tests::bench::{self, PhaseReport};
use integration_tests::platform::{Platform, leg};
use marker::client::CoordinatorClient;
use proto::marker::v1 as pb;
use serde::Serialize;

consensus::service_allocator!();

#[derive(Parser, Debug)]
#[command(about = "Cross-shard transfer benchmark through one coordinator shard")]
struct Args {
    /// Concurrent clients, each waiting for its transfer's decision before the next.
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Each client waits until its transfer is done (posted on both shards), as the gateway's
    /// payments do, instead of only for the decision.
    #[arg(long)]
    until_done: bool,
    /// Submit through one shared `marker::client::CoordinatorClient`, the client the gateway
    /// uses: it packs the submits that queue while its calls are being sent into one
    /// `SubmitMany`. Without it, every client makes its own `Submit` call.
    #[arg(long)]
    client: bool,
    /// Accounts per storage shard.
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    storage_shards: usize,
    replicas: u32,
    phases: Vec<PhaseReport>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    eprintln!("starting 2 storage shards and 1 coordinator shard (3 replicas each)…");
    let platform = Platform::start(&[]).await;
    let mut accounts: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for index in 0..args.accounts {
        for (slot, shard_id) in [1u32, 2].into_iter().enumerate() {
            accounts[slot].push(
                platform
                    .open(shard_id, &format!("bench{index}"), 1_000_000_000)
                    .await,
            );
        }
    }
    let accounts = Arc::new(accounts);
    let replicas: Vec<String> = platform
        .coordinator
        .addresses()
        .split(',')
        .map(String::from)
        .collect();
    // The clients' own calls go to the replica believed to lead; a redirect moves them on.
    let leader = Arc::new(LeaderClient::new(
        "coordinator shard 1".into(),
        replicas.clone(),
    ));
    let first_leader = platform.coordinator.leader().await?;
    leader.remember_leader(Some(
        platform.coordinator.address_of(first_leader).to_string(),
    ));
    let shared = args
        .client
        .then(|| Arc::new(CoordinatorClient::new(1, replicas)));
    eprintln!("{} clients for {} s…", args.clients, args.seconds);
    static NEXT_KEY: AtomicU64 = AtomicU64::new(0);
    let until_done = args.until_done;
    let phase = bench::closed_loop(
        match (until_done, args.client) {
            (false, false) => "cross-shard, max",
            (true, false) => "cross-shard, until done",
            (false, true) => "cross-shard, max, shared client",
            (true, true) => "cross-shard, until done, shared client",
        },
        args.clients,
        args.seconds,
        move |_, mut rng| {
            let leader = leader.clone();
            let shared = shared.clone();
            let accounts = accounts.clone();
            async move {
                let from_shard = rng.below(2);
                let from = &accounts[from_shard][rng.below(accounts[from_shard].len())];
                let to = &accounts[1 - from_shard][rng.below(accounts[1 - from_shard].len())];
                let request = pb::SubmitRequest {
                    tenant_id: "bench".into(),
                    idempotency_key: format!("k-{}", NEXT_KEY.fetch_add(1, Ordering::Relaxed)),
                    legs: vec![leg(from, -1), leg(to, 1)],
                    metadata: BTreeMap::new(),
                    wait: true,
                    wait_ms_max: 30_000,
                    wait_until_done: until_done,
                    hold_id: String::new(),
                };
                let reply = match shared {
                    Some(shared) => {
                        let deadline = Instant::now() + Duration::from_secs(60);
                        Some(shared.submit(request, deadline).await?)
                    }
                    None => {
                        let target = leader.target(0);
                        let channel = leader.channel(&target).map_err(anyhow::Error::msg)?;
                        let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
                        let reply = client.submit(request).await?.into_inner().reply;
                        if let Some(pb::submit_response::Reply::Redirect(redirect)) = &reply {
                            // Not done, so counted as rejected.
                            let address = redirect.leader_address.clone();
                            bench::follow_redirect(&leader, address).await;
                        }
                        reply
                    }
                };
                let committed = matches!(reply, Some(pb::submit_response::Reply::Transaction(t)) if t.status == pb::TransactionStatus::Committed as i32);
                Ok((committed, rng))
            }
        },
    )
    .await?;
    let phases = vec![phase];
    bench::print_table("transfers", &phases);
    bench::emit_json(
        &Report {
            benchmark: "coordinator-cross-shard",
            storage_shards: 2,
            replicas: 3,
            phases,
        },
        args.json.as_deref(),
    )
}
