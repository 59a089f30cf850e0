//! bench-query: the read side's lag and rebuild speed. One storage shard of three local
//! `auticuro` processes takes transfers (with `--two-phase`, Reserve and Post pairs, the events of
//! coordinator transactions) at a steady rate (open loop, `ExecuteMany` calls every
//! 10 ms) while `query serve` projects them into Postgres straight from the shard; the
//! commit-to-visible lag of each event is the time from the write's acknowledgement to the
//! moment `projection_offsets` shows it applied. A call that is redirected or fails sends the rest
//! of the load to the leader the replicas then agree on (its commands count as rejected). Then
//! `query rebuild` replays everything into a fresh database, `--rebuilds` times. Prints a table
//! and JSON.
//!
//! Run with a release build (see README.md).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use integration_tests::bench::{self, PhaseReport, Rng};
use integration_tests::commands::{command, create, post, reserve, transfer};
use integration_tests::group::Group;
use proto::auticuro::v1 as pb;
use serde::Serialize;
use sqlx::Connection as _;

consensus::service_allocator!();

#[derive(Parser, Debug)]
#[command(
    about = "Commit-to-visible lag of the projection at a steady event rate, and rebuild speed"
)]
struct Args {
    /// Events (transfers) per second offered to the shard.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 1_000)]
    accounts: usize,
    /// Each payment is a Reserve and a Post on the shard (the events a coordinator's
    /// transaction leaves, each with transaction rows to project) instead of one transfer.
    #[arg(long)]
    two_phase: bool,
    /// Rebuilds to time, each into a fresh database (the report gives the median).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rebuilds: u32,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    offered_events_per_second: u64,
    two_phase: bool,
    lag: PhaseReport,
    /// The worst lag of the events committed in each second of the run, in milliseconds: shows
    /// whether a high p99 is steady or comes from a few stalls.
    lag_max_ms_per_second: Vec<f64>,
    rebuild_events: u64,
    /// Each rebuild's time, including process start, in the order they ran.
    rebuild_seconds: Vec<f64>,
    /// Of the median rebuild.
    rebuild_events_per_second: f64,
}

/// When each seq was acknowledged to its writer, and when the projection showed it.
#[derive(Default)]
struct Timeline {
    committed: BTreeMap<u64, Instant>,
    visible: BTreeMap<u64, Instant>,
    /// Commands that gave no event: refused, redirected (a new leader), or their call failed.
    eventless: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shard = Arc::new(Group::storage(1, 3, &[]).await?);
    let database = integration_tests::postgres::fresh_database().await?;
    let shard_arg = format!(
        "1={}",
        shard
            .replicas
            .iter()
            .map(|r| r.address.clone())
            .collect::<Vec<_>>()
            .join(",")
    );
    let binary = deploy::process::workspace_binary("query");
    let _service = integration_tests::process::spawn(
        &binary,
        &[
            "serve".into(),
            "--database-url".into(),
            database.url.clone(),
            "--shard".into(),
            shard_arg.clone(),
        ],
    )
    .await?;
    let pool = query::store::connect(&database.url).await?;

    eprintln!("creating {} accounts…", args.accounts);
    shard
        .execute(command("c-funding", create("sys:funding:USD", true)))
        .await?;
    let accounts: Vec<String> = (0..args.accounts).map(|n| format!("acct-{n}")).collect();
    for account in &accounts {
        shard
            .execute(command(format!("c-{account}"), create(account, false)))
            .await?;
        shard
            .execute(command(
                format!("f-{account}"),
                transfer("sys:funding:USD", account, 1_000_000),
            ))
            .await?;
    }
    let setup_head = query::connector::head_seq(&query::connector::ShardSource {
        shard_id: 1,
        replicas: shard.replicas.iter().map(|r| r.address.clone()).collect(),
    })
    .await;
    // The lag is measured at a steady rate: the projection first catches up with the set-up.
    let deadline = Instant::now() + Duration::from_secs(60);
    while query::store::applied_seqs(&pool)
        .await?
        .get(&1)
        .is_none_or(|applied| *applied < setup_head)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the projection did not catch up with the set-up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    eprintln!("offering {} events/s for {} s…", args.rate, args.seconds);
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let observer = tokio::spawn({
        let (pool, timeline) = (pool.clone(), timeline.clone());
        async move {
            let mut seen = setup_head;
            loop {
                let applied = query::store::applied_seqs(&pool)
                    .await
                    .map(|seqs| seqs.get(&1).copied().unwrap_or(0))
                    .unwrap_or(seen);
                if applied > seen {
                    let now = Instant::now();
                    let mut timeline = timeline.lock().unwrap();
                    for seq in seen + 1..=applied {
                        timeline.visible.insert(seq, now);
                    }
                    seen = applied;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let mut client = shard.ledger(shard.leader().await?).await?;
    // Set by a call that was redirected or failed: the leader may have changed.
    let leader_lost = Arc::new(AtomicBool::new(false));
    let per_tick = (args.rate / 100).max(1) as usize;
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut rng = Rng(7);
    let mut calls = tokio::task::JoinSet::new();
    let started = Instant::now();
    let cpu = bench::MachineCpu::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        ticks.tick().await;
        if leader_lost.swap(false, Ordering::Relaxed) {
            client = shard.ledger(shard.leader().await?).await?;
        }
        let mut commands: Vec<pb::Command> = Vec::with_capacity(per_tick);
        while commands.len() < per_tick {
            let from = rng.below(accounts.len());
            let to = (from + 1 + rng.below(accounts.len() - 1)) % accounts.len();
            let (from, to) = (&accounts[from], &accounts[to]);
            sent += 1;
            if args.two_phase {
                let txn_id = format!("t:{sent}");
                commands.push(command(format!("r-{sent}"), reserve(&txn_id, from, to, 1)));
                commands.push(command(format!("p-{sent}"), post(&txn_id)));
            } else {
                commands.push(command(format!("t-{sent}"), transfer(from, to, 1)));
            }
        }
        let (mut client, timeline, leader_lost) =
            (client.clone(), timeline.clone(), leader_lost.clone());
        calls.spawn(async move {
            let sent = commands.len() as u64;
            let reply = client
                .execute_many(pb::ExecuteManyRequest { commands })
                .await;
            let now = Instant::now();
            let mut timeline = timeline.lock().unwrap();
            let mut committed = 0;
            match reply {
                Ok(reply) => {
                    for response in &reply.get_ref().responses {
                        match &response.reply {
                            Some(pb::execute_response::Reply::Result(result)) if result.seq > 0 => {
                                timeline.committed.insert(result.seq, now);
                                committed += 1;
                            }
                            Some(pb::execute_response::Reply::Redirect(_)) => {
                                leader_lost.store(true, Ordering::Relaxed)
                            }
                            _ => {}
                        }
                    }
                }
                Err(_) => leader_lost.store(true, Ordering::Relaxed),
            }
            timeline.eventless += sent - committed;
        });
    }
    while calls.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    // Let the projection catch up with the last writes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = timeline.lock().unwrap().committed.keys().last().copied();
        let visible = timeline.lock().unwrap().visible.keys().last().copied();
        if last <= visible || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    observer.abort();
    let mut histogram = bench::histogram();
    let mut lag_max_ms_per_second = vec![0.0f64; args.seconds as usize + 1];
    let mut missing = 0;
    {
        let timeline = timeline.lock().unwrap();
        for (seq, committed) in &timeline.committed {
            match timeline.visible.get(seq) {
                Some(visible) => {
                    let lag = visible.saturating_duration_since(*committed);
                    bench::record(&mut histogram, lag, 1);
                    let second = committed.saturating_duration_since(started).as_secs() as usize;
                    let worst = &mut lag_max_ms_per_second[second.min(args.seconds as usize)];
                    *worst = worst.max(lag.as_secs_f64() * 1_000.0);
                }
                None => missing += 1,
            }
        }
    }
    let mut lag = PhaseReport::new("commit to visible", 1, elapsed, cpu, &histogram, 0);
    // Not in the histogram: no event of theirs was there to become visible.
    lag.rejected = timeline.lock().unwrap().eventless;
    anyhow::ensure!(missing == 0, "{missing} events never became visible");

    let mut rebuild_seconds = Vec::new();
    let mut rebuild_events = 0;
    for _ in 0..args.rebuilds {
        eprintln!("rebuilding into a fresh database…");
        let rebuilt = integration_tests::postgres::fresh_database().await?;
        // Each rebuild starts with the earlier writes on disk rather than competing with them.
        sqlx::query("CHECKPOINT")
            .execute(&mut sqlx::PgConnection::connect(&rebuilt.url).await?)
            .await?;
        let rebuild_started = Instant::now();
        let status = tokio::process::Command::new(&binary)
            .args([
                "rebuild",
                "--database-url",
                &rebuilt.url,
                "--shard",
                &shard_arg,
            ])
            .status()
            .await?;
        rebuild_seconds.push(rebuild_started.elapsed().as_secs_f64());
        anyhow::ensure!(status.success(), "query rebuild failed");
        rebuild_events = query::store::applied_seqs(&query::store::connect(&rebuilt.url).await?)
            .await?
            .values()
            .sum();
    }
    let mut sorted = rebuild_seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median_seconds = sorted[sorted.len() / 2];

    bench::print_table("events", std::slice::from_ref(&lag));
    println!(
        "worst lag per second (ms): {}",
        lag_max_ms_per_second
            .iter()
            .map(|ms| format!("{ms:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "rebuild: {rebuild_events} events in {} s (median {median_seconds:.2} s: {:.0} events/s, including process start)",
        rebuild_seconds
            .iter()
            .map(|seconds| format!("{seconds:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        rebuild_events as f64 / median_seconds
    );
    let report = Report {
        benchmark: "query",
        offered_events_per_second: args.rate,
        two_phase: args.two_phase,
        lag,
        lag_max_ms_per_second,
        rebuild_events,
        rebuild_seconds,
        rebuild_events_per_second: rebuild_events as f64 / median_seconds,
    };
    bench::emit_json(&report, args.json.as_deref())
}
