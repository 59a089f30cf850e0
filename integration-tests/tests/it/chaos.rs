//! Chaos on a real cluster: two storage shards and a coordinator shard of three replicas each,
//! every replica behind a proxy the test controls, under continuous payment load while a fault
//! schedule runs — `kill -9` of leaders and followers (then a restart), pauses (SIGSTOP, then
//! SIGCONT), partitions (the proxy cuts and refuses connections) and delays. One fault at a
//! time, so a majority of each group stays up. After healing, every payment whose outcome was
//! unknown is asked again with its key until decided; then no acknowledged payment may be
//! missing or applied twice, every shard must sum to zero with nothing pending, and the auditor
//! (`deploy::audit`) must pass: conservation, deposits minus withdrawals, every reservation live,
//! one outcome per transaction on every shard, no request applied twice, replicas equal.
//!
//! Runs for `CHAOS_SECONDS` (default 30, the short mode CI runs); set it higher for a soak.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integration_tests::platform::{Platform, leg, minor, submit_request};
use integration_tests::proxy::Fault;
use marker::topology::{CoordinatorEntry, CoordinatorState, Topology};
use proto::auticuro::v1 as ledger;
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_client::CoordinatorClient;

/// A payment as the client knows it: its key, legs and, once known, its decision.
struct Payment {
    key: String,
    legs: Vec<ledger::Leg>,
    decided: Option<pb::Transaction>,
}

/// Submits to one coordinator replica (the next one on each attempt), following a redirect to
/// the leader; the decision, or nothing when the outcome is unknown (an error, a timeout, still
/// pending).
async fn submit_once(
    addresses: &[String],
    attempt: usize,
    payment: &Payment,
) -> Option<pb::Transaction> {
    let mut address = addresses[attempt % addresses.len()].clone();
    for _ in 0..3 {
        let channel = auticuro::client::channel(&address).ok()?;
        let mut request = tonic::Request::new(submit_request(&payment.key, payment.legs.clone()));
        request.get_mut().wait_ms_max = 2_000;
        request.set_timeout(Duration::from_secs(3));
        let reply = CoordinatorClient::new(channel).submit(request).await.ok()?;
        match reply.into_inner().reply {
            Some(pb::submit_response::Reply::Transaction(transaction))
                if transaction.status != pb::TransactionStatus::Pending as i32 =>
            {
                return Some(transaction);
            }
            Some(pb::submit_response::Reply::Redirect(redirect)) => {
                address = redirect.leader_address?;
            }
            _ => return None,
        }
    }
    None
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_survive_kills_pauses_partitions_and_delays() {
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut platform = Platform::start_behind_proxies().await;
    let mut accounts = Vec::new();
    for (shard_id, name) in [
        (1, "chaos-a"),
        (1, "chaos-b"),
        (2, "chaos-c"),
        (2, "chaos-d"),
    ] {
        accounts.push(platform.open(shard_id, name, 1_000_000).await);
    }
    let initial: BTreeMap<String, i128> = platform
        .balances()
        .await
        .into_iter()
        .map(|(id, account)| (id, minor(&account.balance)))
        .collect();
    let addresses: Vec<String> = platform
        .coordinator
        .replicas
        .iter()
        .map(|r| r.address.clone())
        .collect();

    // Load: four clients, each paying between random accounts (across shards or not).
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..4u64 {
        let (stop, addresses, accounts) = (stop.clone(), addresses.clone(), accounts.clone());
        clients.spawn(async move {
            let mut state = client * 7919 + 17;
            let mut next = move |bound: usize| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % bound as u64) as usize
            };
            let mut payments = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let from = next(accounts.len());
                let to = (from + 1 + next(accounts.len() - 1)) % accounts.len();
                let amount = 1 + next(100) as i128;
                let mut payment = Payment {
                    key: format!("chaos-{client}-{n}"),
                    legs: vec![leg(&accounts[from], -amount), leg(&accounts[to], amount)],
                    decided: None,
                };
                payment.decided = submit_once(&addresses, n, &payment).await;
                payments.push(payment);
                n += 1;
            }
            payments
        });
    }

    // Faults, one at a time: each lasts 1.5 s, then 1.5 s of calm.
    let started = Instant::now();
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let mut round = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        round += 1;
        let group_index = round % 3;
        let group = match group_index {
            0 => &mut platform.coordinator,
            index => &mut platform.storage[index - 1],
        };
        // Alternate between the leader and a follower.
        let leader = group.leader().await.unwrap();
        let node_id = if round.is_multiple_of(2) {
            leader
        } else {
            group.running_other_than(leader)
        };
        let kind = ["kill", "pause", "partition", "delay"][(round / 3) % 4];
        *faults.entry(kind).or_default() += 1;
        match kind {
            "kill" => {
                group.kill(node_id).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                group.restart(node_id).await.unwrap();
            }
            "pause" => {
                let pid = group.replica(node_id).process.as_ref().unwrap().pid();
                signal(pid, "-STOP");
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                signal(pid, "-CONT");
            }
            fault => {
                let proxy = group.replica(node_id).proxy.as_ref().unwrap();
                proxy.set(if fault == "partition" {
                    Fault::Partition
                } else {
                    Fault::Delay(Duration::from_millis(40))
                });
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                proxy.set(Fault::None);
            }
        }
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut payments: Vec<Payment> = Vec::new();
    while let Some(done) = clients.join_next().await {
        payments.extend(done.unwrap());
    }
    let attempted = payments.len();
    let acknowledged = payments.iter().filter(|p| p.decided.is_some()).count();

    // Healed: every unknown outcome is asked again with the same key until it is decided.
    let recovery = Instant::now();
    for payment in payments.iter_mut().filter(|p| p.decided.is_none()) {
        for attempt in 0.. {
            payment.decided = submit_once(&addresses, attempt, payment).await;
            if payment.decided.is_some() {
                break;
            }
            assert!(attempt < 300, "{} never decided", payment.key);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let resolved_in = recovery.elapsed();

    // Each committed payment applied exactly once, nothing else moved.
    let mut expected = initial.clone();
    let mut committed = 0;
    let mut decided = Vec::new();
    for payment in &payments {
        let transaction = payment.decided.clone().unwrap();
        if transaction.status == pb::TransactionStatus::Committed as i32 {
            committed += 1;
            for leg in &payment.legs {
                *expected.get_mut(&leg.account_id).unwrap() += minor(&leg.amount);
            }
        }
        decided.push(transaction);
    }
    let balances: BTreeMap<String, i128> = platform
        .balances()
        .await
        .into_iter()
        .map(|(id, account)| (id, minor(&account.balance)))
        .collect();
    for account in &accounts {
        assert_eq!(balances[account], expected[account], "{account}");
    }
    platform.check_invariants(&decided).await;
    // The auditor, over the healed cluster: conservation, deposits minus withdrawals, every
    // reservation live, one outcome per transaction, no request applied twice, equal replicas.
    let topology = Topology {
        version: 0,
        storage_shards: platform
            .storage
            .iter()
            .map(|shard| {
                (
                    shard.shard_id,
                    shard.replicas.iter().map(|r| r.address.clone()).collect(),
                )
            })
            .collect(),
        coordinators: BTreeMap::from([(
            platform.coordinator.shard_id,
            CoordinatorEntry {
                state: CoordinatorState::Active,
                epoch: 1,
                replicas: addresses.clone(),
            },
        )]),
    };
    let checks = deploy::audit::audit_groups(&topology, None).await.unwrap();
    let failed: Vec<_> = checks.iter().filter(|check| !check.ok).collect();
    assert!(failed.is_empty(), "the audit failed: {failed:?}");
    println!(
        "chaos: {seconds} s, {attempted} payments attempted, {acknowledged} acknowledged under faults, \
         {} resolved after healing in {} ms, {committed} committed; faults injected: {faults:?}",
        attempted - acknowledged,
        resolved_in.as_millis()
    );
}
