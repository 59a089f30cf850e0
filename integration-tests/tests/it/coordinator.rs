//! Cross-shard transfers through a coordinator shard of three `marker` processes over two
//! storage shards of three `auticuro` processes each, with the protocol's invariants checked at
//! the end of every test.

use std::collections::BTreeMap;
use std::time::Duration;

use integration_tests::platform::{
    Platform, leg, minor, submit_request, submit_request_without_wait,
};
use proto::auticuro::v1 as ledger;
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_client::CoordinatorClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_shard_payments_commit_or_abort_atomically() {
    let platform = Platform::start(&[]).await;
    let alice = platform.open(1, "alice", 1_000).await;
    let bob = platform.open(2, "bob", 0).await;
    let carol = platform.open(1, "carol", 0).await;

    // Committed across shards: money leaves shard 1 and arrives on shard 2.
    let paid = platform
        .pay("pay-1", vec![leg(&alice, -300), leg(&bob, 300)])
        .await;
    assert_eq!(paid.status, pb::TransactionStatus::Committed as i32);
    // Single shard: the fast path.
    let local = platform
        .pay("pay-2", vec![leg(&alice, -100), leg(&carol, 100)])
        .await;
    assert_eq!(local.status, pb::TransactionStatus::Committed as i32);
    // Aborted: not enough funds on the debit shard; nothing is held or moved anywhere.
    let refused = platform
        .pay("pay-3", vec![leg(&alice, -5_000), leg(&bob, 5_000)])
        .await;
    assert_eq!(refused.status, pb::TransactionStatus::Aborted as i32);
    assert_eq!(refused.abort_reason, pb::AbortReason::Rejected as i32);
    assert_eq!(refused.outcome, ledger::Outcome::InsufficientFunds as i32);
    assert_eq!(refused.detail_account_id, alice);

    let balances = platform.balances().await;
    assert_eq!(minor(&balances[&alice].balance), 600);
    assert_eq!(minor(&balances[&bob].balance), 300);
    assert_eq!(minor(&balances[&carol].balance), 100);
    platform.check_invariants(&[paid, local, refused]).await;

    // Every coordinator replica counts the same decisions from its replicated log.
    let expected = [
        "marker_transactions_submitted_total 3",
        r#"marker_transactions_decided_total{decision="commit",reason=""} 2"#,
        r#"marker_transactions_decided_total{decision="abort",reason="rejected"} 1"#,
        "marker_in_flight 0",
    ];
    for replica in &platform.coordinator.replicas {
        let mut body = String::new();
        for _ in 0..100 {
            body = integration_tests::http_get(&replica.address, "/metrics")
                .await
                .unwrap()
                .1;
            if expected.iter().all(|line| body.contains(line)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for line in expected {
            assert!(
                body.contains(line),
                "node {} lacks {line}:\n{body}",
                replica.node_id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_names_one_transaction_and_a_changed_body_is_refused() {
    let platform = Platform::start(&[]).await;
    let alice = platform.open(1, "alice", 1_000).await;
    let bob = platform.open(2, "bob", 0).await;
    let first = platform
        .pay("same-key", vec![leg(&alice, -10), leg(&bob, 10)])
        .await;
    let again = platform
        .pay("same-key", vec![leg(&alice, -10), leg(&bob, 10)])
        .await;
    assert_eq!(first.txn_id, again.txn_id);
    let mut client = platform.client().await;
    let changed = submit_request_without_wait("same-key", vec![leg(&alice, -11), leg(&bob, 11)]);
    let reply = client
        .submit(changed)
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert!(
        matches!(reply, pb::submit_response::Reply::IdempotencyMismatch(ref m) if m.txn_id == first.txn_id),
        "{reply:?}"
    );
    let unbalanced = submit_request_without_wait("bad", vec![leg(&alice, -11), leg(&bob, 10)]);
    let reply = client
        .submit(unbalanced)
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(
        reply,
        pb::submit_response::Reply::Invalid(ledger::Outcome::NotZeroSum as i32)
    );
    assert_eq!(minor(&platform.balances().await[&bob].balance), 10);
    platform.check_invariants(&[first]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_leader_killed_under_load_leaves_every_transaction_decided_and_settled() {
    let mut platform = Platform::start(&[]).await;
    let alice = platform.open(1, "alice", 100_000).await;
    let bob = platform.open(2, "bob", 100_000).await;
    let first_leader = platform.coordinator.leader().await.unwrap();

    let platform_ref = &platform;
    let payments = (0..40).map(|n| {
        let (from, to) = if n % 2 == 0 {
            (&alice, &bob)
        } else {
            (&bob, &alice)
        };
        let legs = vec![leg(from, -(n + 1)), leg(to, n + 1)];
        async move { platform_ref.pay(&format!("load-{n}"), legs).await }
    });
    let first_half: Vec<_> = futures::future::join_all(payments.clone().take(20)).await;
    // Kill the leader while the second half is being submitted.
    let second_half = tokio::spawn({
        let requests: Vec<(String, Vec<ledger::Leg>)> = (20..40)
            .map(|n: i128| {
                let (from, to) = if n % 2 == 0 {
                    (alice.clone(), bob.clone())
                } else {
                    (bob.clone(), alice.clone())
                };
                (
                    format!("load-{n}"),
                    vec![leg(&from, -(n + 1)), leg(&to, n + 1)],
                )
            })
            .collect();
        let addresses: Vec<String> = platform
            .coordinator
            .replicas
            .iter()
            .map(|r| r.address.clone())
            .collect();
        async move {
            let mut decided = Vec::new();
            for (key, legs) in requests {
                let request = submit_request(&key, legs);
                'retry: for attempt in 0.. {
                    let address = &addresses[attempt % addresses.len()];
                    let Ok(channel) = auticuro::client::channel(address) else {
                        continue;
                    };
                    if let Ok(reply) = CoordinatorClient::new(channel)
                        .submit(request.clone())
                        .await
                        && let Some(pb::submit_response::Reply::Transaction(transaction)) =
                            reply.into_inner().reply
                        && transaction.status != pb::TransactionStatus::Pending as i32
                    {
                        decided.push(transaction);
                        break 'retry;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    assert!(attempt < 2_000, "no decision for {key}");
                }
            }
            decided
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    platform.coordinator.kill(first_leader).await.unwrap();
    let second_half = second_half.await.unwrap();
    let new_leader = platform.coordinator.leader().await.unwrap();
    assert_ne!(new_leader, first_leader);

    let all: Vec<pb::Transaction> = first_half.into_iter().chain(second_half).collect();
    assert_eq!(all.len(), 40);
    assert!(
        all.iter()
            .all(|t| t.status == pb::TransactionStatus::Committed as i32),
        "funds suffice for every payment"
    );
    // Each payment applied exactly once: alice sent the even ones and received the odd ones.
    let sent: i128 = (0..40).filter(|n| n % 2 == 0).map(|n| n + 1).sum();
    let received: i128 = (0..40).filter(|n| n % 2 == 1).map(|n| n + 1).sum();
    let balances = platform.balances().await;
    assert_eq!(minor(&balances[&alice].balance), 100_000 - sent + received);
    assert_eq!(minor(&balances[&bob].balance), 100_000 + sent - received);
    platform.check_invariants(&all).await;
}

/// The coordinator replica driving a cross-shard payment dies at one protocol step; the replica
/// that takes over finishes it. Each step runs on a fresh platform.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_crash_at_any_step_still_ends_in_the_decided_outcome() {
    let steps = [
        "after-begin",
        "after-reserve-1",
        "after-reserve-2",
        "after-decide",
        "between-posts",
        "before-done",
    ];
    for step in steps {
        let dir = tempfile::tempdir().unwrap();
        let once = dir.path().join("crashed");
        let platform = Platform::start(&[
            "--crash-at",
            step,
            "--crash-once-file",
            once.to_str().unwrap(),
        ])
        .await;
        let alice = platform.open(1, "alice", 1_000).await;
        let bob = platform.open(2, "bob", 0).await;
        let paid = platform
            .pay("crash-pay", vec![leg(&alice, -250), leg(&bob, 250)])
            .await;
        assert_eq!(
            paid.status,
            pb::TransactionStatus::Committed as i32,
            "{step}"
        );
        // Waits until nothing is in flight, so steps after the decision have happened too.
        platform.check_invariants(std::slice::from_ref(&paid)).await;
        assert!(once.exists(), "{step}: the crash point was never reached");
        let balances = platform.balances().await;
        assert_eq!(
            (
                minor(&balances[&alice].balance),
                minor(&balances[&bob].balance)
            ),
            (750, 250),
            "{step}"
        );
    }
}

/// A payment whose debit fails aborts, and the crash after that decision does not change it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_after_an_abort_decision_still_voids_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let once = dir.path().join("crashed");
    let platform = Platform::start(&[
        "--crash-at",
        "after-decide",
        "--crash-once-file",
        once.to_str().unwrap(),
    ])
    .await;
    let alice = platform.open(1, "alice", 100).await;
    let bob = platform.open(2, "bob", 0).await;
    // Credit first in the body: the plan still reserves the debit shard first.
    let refused = platform
        .pay("too-much", vec![leg(&bob, 500), leg(&alice, -500)])
        .await;
    assert_eq!(refused.status, pb::TransactionStatus::Aborted as i32);
    platform
        .check_invariants(std::slice::from_ref(&refused))
        .await;
    assert!(once.exists());
    let legs = platform
        .shard(2)
        .transaction_legs(&refused.txn_id)
        .await
        .unwrap();
    assert_eq!(
        legs.state,
        ledger::LegState::Tombstone as i32,
        "the never-reserved credit shard holds a tombstone"
    );
}

fn admin(
    address: &str,
) -> pb::coordinator_admin_client::CoordinatorAdminClient<tonic::transport::Channel> {
    pb::coordinator_admin_client::CoordinatorAdminClient::new(
        auticuro::client::channel(address).unwrap(),
    )
}

async fn leader_address(platform: &Platform) -> String {
    let leader = platform.coordinator.leader().await.unwrap();
    platform.coordinator.address_of(leader).to_string()
}

async fn stop_shard(platform: &mut Platform, shard_id: u32) {
    for node_id in 1..=3 {
        platform.storage[(shard_id - 1) as usize]
            .kill(node_id)
            .await
            .unwrap();
    }
}

async fn restart_shard(platform: &mut Platform, shard_id: u32) {
    for node_id in 1..=3 {
        platform.storage[(shard_id - 1) as usize]
            .restart(node_id)
            .await
            .unwrap();
    }
}

/// With the credit shard down, a payment waits in flight; the operator sees it and aborts it;
/// the debit shard's hold is released and the credit shard is voided when it returns. Watching
/// the transaction shows each status change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_force_aborts_a_payment_stuck_on_an_unavailable_shard() {
    let mut platform = Platform::start(&["--reserve-timeout-ms", "60000"]).await;
    let alice = platform.open(1, "alice", 1_000).await;
    let bob = platform.open(2, "bob", 0).await;
    let dave = platform.open(2, "dave", 500).await;
    let done_before = platform
        .pay("before", vec![leg(&alice, -1), leg(&bob, 1)])
        .await;
    assert_eq!(platform.in_flight_when_settled().await, 0);
    stop_shard(&mut platform, 2).await;

    let address = leader_address(&platform).await;
    let mut client = CoordinatorClient::new(auticuro::client::channel(&address).unwrap());
    let request = submit_request_without_wait("stuck", vec![leg(&alice, -100), leg(&bob, 100)]);
    let Some(pb::submit_response::Reply::Transaction(stuck)) =
        client.submit(request).await.unwrap().into_inner().reply
    else {
        panic!()
    };
    assert_eq!(stuck.status, pb::TransactionStatus::Pending as i32);
    let mut watch = client
        .watch_transaction(pb::WatchTransactionRequest {
            txn_id: stuck.txn_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    let mut admin = admin(&address);
    let listed = admin
        .list_in_flight(pb::ListInFlightRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner()
        .transactions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].transaction.as_ref().unwrap().txn_id, stuck.txn_id);
    // The debit shard holds alice's 100 meanwhile (the submit answered before the driver
    // reserved, so give the reserve time to land).
    let mut held = 0;
    for _ in 0..100 {
        held = minor(&platform.shard(1).accounts().await.unwrap()[&alice].pending_out);
        if held != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(held, 100);

    let reply = admin
        .force_abort(pb::ForceAbortRequest {
            txn_id: stuck.txn_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    let pb::admin_response::Reply::Transaction(aborted) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(
        (aborted.status, aborted.abort_reason),
        (
            pb::TransactionStatus::Aborted as i32,
            pb::AbortReason::Forced as i32
        )
    );
    // A single-shard payment is one batch that may already be applied when the operator
    // asks: it cannot be aborted from outside, and commits once its shard is back.
    let single = submit_request_without_wait("single", vec![leg(&dave, -50), leg(&bob, 50)]);
    let Some(pb::submit_response::Reply::Transaction(single)) =
        client.submit(single).await.unwrap().into_inner().reply
    else {
        panic!()
    };
    let reply = admin
        .force_abort(pb::ForceAbortRequest {
            txn_id: single.txn_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(reply, pb::admin_response::Reply::SingleShard(true));
    // A decision never changes: forcing the abort of a committed payment is refused.
    let reply = admin
        .force_abort(pb::ForceAbortRequest {
            txn_id: done_before.txn_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(
        reply,
        pb::admin_response::Reply::AlreadyDecided(pb::TransactionStatus::Committed as i32)
    );

    restart_shard(&mut platform, 2).await;
    let single = platform
        .submit(submit_request_without_wait(
            "single",
            vec![leg(&dave, -50), leg(&bob, 50)],
        ))
        .await;
    assert_eq!(single.status, pb::TransactionStatus::Committed as i32);
    platform
        .check_invariants(&[done_before, aborted.clone(), single])
        .await;
    assert_eq!(minor(&platform.balances().await[&dave].balance), 450);
    // The void reached shard 2 either before the retried reserve (a tombstone) or after it.
    let legs = platform
        .shard(2)
        .transaction_legs(&stuck.txn_id)
        .await
        .unwrap();
    assert!(
        [
            ledger::LegState::Tombstone as i32,
            ledger::LegState::Voided as i32
        ]
        .contains(&legs.state),
        "{legs:?}"
    );
    let mut seen = Vec::new();
    while let Some(change) = futures::StreamExt::next(&mut watch).await {
        let change = change.unwrap();
        seen.push((change.status, change.done));
    }
    assert_eq!(
        seen.first(),
        Some(&(pb::TransactionStatus::Pending as i32, false))
    );
    assert_eq!(
        seen.last(),
        Some(&(pb::TransactionStatus::Aborted as i32, true))
    );
    // A shard asking about a transaction this coordinator never began learns it is aborted.
    let reply = client
        .resolve(pb::ResolveRequest {
            txn_id: "t:never-begun".into(),
            asking_shard_id: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(
        reply,
        pb::resolve_response::Reply::Decision(pb::TransactionStatus::Aborted as i32)
    );
}

/// A storage shard goes down after the commit decision; posts resume when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn posts_resume_when_an_unavailable_shard_returns_after_the_commit_decision() {
    let dir = tempfile::tempdir().unwrap();
    let once = dir.path().join("crashed");
    let mut platform = Platform::start(&[
        "--crash-at",
        "after-decide",
        "--crash-once-file",
        once.to_str().unwrap(),
    ])
    .await;
    let alice = platform.open(1, "alice", 1_000).await;
    let bob = platform.open(2, "bob", 0).await;
    let address = leader_address(&platform).await;
    let mut client = CoordinatorClient::new(auticuro::client::channel(&address).unwrap());
    let request = submit_request_without_wait("late-post", vec![leg(&alice, -300), leg(&bob, 300)]);
    client.submit(request).await.unwrap();
    // The coordinator leader dies right after deciding; take the credit shard down before the
    // next leader posts.
    for _ in 0..200 {
        if once.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(once.exists());
    stop_shard(&mut platform, 2).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    restart_shard(&mut platform, 2).await;
    let paid = platform
        .pay("late-post", vec![leg(&alice, -300), leg(&bob, 300)])
        .await;
    assert_eq!(paid.status, pb::TransactionStatus::Committed as i32);
    platform.check_invariants(std::slice::from_ref(&paid)).await;
    let balances = platform.balances().await;
    assert_eq!(
        (
            minor(&balances[&alice].balance),
            minor(&balances[&bob].balance)
        ),
        (700, 300)
    );
}

/// A hold whose owner never decides anything goes stale; the shard asks the owner coordinator,
/// learns the transaction is aborted, and voids it. Configured by a rolling restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storage_shard_resolves_a_stale_hold_with_its_owner_coordinator() {
    let mut platform = Platform::start(&[]).await;
    let alice = platform.open(1, "alice", 1_000).await;
    let coordinators: Vec<String> = platform
        .coordinator
        .replicas
        .iter()
        .map(|r| r.address.clone())
        .collect();
    let spec = format!("1={}", coordinators.join(","));
    platform.storage[0]
        .rolling_restart_with(&[
            "--coordinator-shard",
            &spec,
            "--stale-hold-after-seconds",
            "1",
        ])
        .await
        .unwrap();

    // A reserve the coordinator never began (as if sent by a coordinator that then lost it).
    let orphan = ledger::Command {
        request_id: "orphan-reserve".into(),
        kind: Some(ledger::command::Kind::Reserve(ledger::Reserve {
            txn_id: "t:orphan".into(),
            owner: Some(ledger::Owner {
                coordinator_shard_id: 1,
                epoch: 1,
            }),
            legs: vec![leg(&alice, -50)],
            metadata: BTreeMap::new(),
            ..Default::default()
        })),
    };
    assert_eq!(
        platform.shard(1).execute(orphan).await.unwrap().outcome,
        ledger::Outcome::Ok as i32
    );
    let mut state = ledger::LegState::Held as i32;
    for _ in 0..100 {
        state = platform
            .shard(1)
            .transaction_legs("t:orphan")
            .await
            .unwrap()
            .state;
        if state != ledger::LegState::Held as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, ledger::LegState::Voided as i32);
    let accounts = platform.shard(1).accounts().await.unwrap();
    assert_eq!(minor(&accounts[&alice].pending_out), 0);
    assert_eq!(minor(&accounts[&alice].balance), 1_000);
}

/// Submits to a coordinator shard's leader; `None` when it answers with anything but a decided
/// transaction or a refusal to take new work.
async fn submit_to(
    group: &integration_tests::group::Group,
    request: &pb::SubmitRequest,
) -> Option<pb::submit_response::Reply> {
    let leader = group.leader().await.ok()?;
    let address = group.address_of(leader).to_string();
    let mut client = CoordinatorClient::new(auticuro::client::channel(&address).ok()?);
    match client
        .submit(request.clone())
        .await
        .ok()?
        .into_inner()
        .reply?
    {
        pb::submit_response::Reply::Transaction(t)
            if t.status == pb::TransactionStatus::Pending as i32 =>
        {
            None
        }
        reply => Some(reply),
    }
}

/// Draining a coordinator shard while payments flow: new payments move to the active shard,
/// nothing fails or applies twice, the drained shard is removed once it owns no work, its old
/// keys still find their transactions, and storage shards fence it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_coordinator_under_load_moves_new_work_and_fences_it_once_removed() {
    let platform = Platform::start_with_topology(2).await;
    let alice = platform.open(1, "alice", 100_000).await;
    let bob = platform.open(2, "bob", 100_000).await;
    let coordinators = [&platform.coordinator, &platform.more_coordinators[0]];
    let acknowledged = std::sync::atomic::AtomicUsize::new(0);
    let drained = tokio::sync::Notify::new();

    let client = |c: usize| {
        let (alice, bob, acknowledged, drained) = (&alice, &bob, &acknowledged, &drained);
        async move {
            let mut decided = Vec::new();
            for i in 0..15i128 {
                let (from, to) = if (c as i128 + i) % 2 == 0 {
                    (alice, bob)
                } else {
                    (bob, alice)
                };
                let request = submit_request(
                    &format!("drain-{c}-{i}"),
                    vec![leg(from, -(i + 1)), leg(to, i + 1)],
                );
                let mut target = 0;
                let transaction = loop {
                    match submit_to(coordinators[target], &request).await {
                        Some(pb::submit_response::Reply::Transaction(t)) => break t,
                        Some(pb::submit_response::Reply::NotAccepting(_)) => target = 1,
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                if acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == 12 {
                    drained.notify_one();
                }
                decided.push((request.idempotency_key.clone(), transaction));
            }
            decided
        }
    };
    let drain = async {
        drained.notified().await;
        let leader = platform.coordinator.leader().await.unwrap();
        let address = platform.coordinator.address_of(leader).to_string();
        let mut admin = pb::coordinator_admin_client::CoordinatorAdminClient::new(
            auticuro::client::channel(&address).unwrap(),
        );
        admin.drain(pb::DrainRequest {}).await.unwrap().into_inner()
    };
    let (results, drain_reply) = tokio::join!(futures::future::join_all((0..4).map(client)), drain);
    assert_ne!(drain_reply.state, pb::CoordinatorShardState::Active as i32);
    let all: Vec<(String, pb::Transaction)> = results.into_iter().flatten().collect();
    assert_eq!(all.len(), 60);
    assert!(
        all.iter()
            .all(|(_, t)| t.status == pb::TransactionStatus::Committed as i32)
    );
    let on_second = all
        .iter()
        .filter(|(_, t)| t.coordinator_shard_id == 2)
        .count();
    assert!(
        on_second > 0,
        "new work moved to the active coordinator shard"
    );

    // The drained shard ends removed, with nothing in flight.
    let topology = marker::topology::TopologyClient::new(
        platform
            .topology
            .as_ref()
            .unwrap()
            .replicas
            .iter()
            .map(|r| r.address.clone())
            .collect(),
    );
    let mut state = None;
    for _ in 0..200 {
        state = topology
            .get()
            .await
            .unwrap()
            .coordinators
            .get(&1)
            .map(|entry| entry.state);
        if state == Some(marker::topology::CoordinatorState::Removed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, Some(marker::topology::CoordinatorState::Removed));

    // A retry of a key begun on the drained shard finds the same transaction there.
    let (key, first) = all
        .iter()
        .find(|(_, t)| t.coordinator_shard_id == 1)
        .expect("some payments ran on shard 1");
    let retry = submit_request(key, first.legs.clone());
    let Some(pb::submit_response::Reply::Transaction(again)) =
        submit_to(&platform.coordinator, &retry).await
    else {
        panic!("the old key was not found")
    };
    assert_eq!(
        (again.txn_id.as_str(), again.status),
        (
            first.txn_id.as_str(),
            pb::TransactionStatus::Committed as i32
        )
    );

    // Storage shards fence the removed coordinator: its late messages change nothing.
    let late = ledger::Command {
        request_id: "late-reserve".into(),
        kind: Some(ledger::command::Kind::Reserve(ledger::Reserve {
            txn_id: "t:late".into(),
            owner: Some(ledger::Owner {
                coordinator_shard_id: 1,
                epoch: 3,
            }),
            legs: vec![leg(&alice, -1)],
            metadata: BTreeMap::new(),
            ..Default::default()
        })),
    };
    let mut outcome = 0;
    for attempt in 0..100 {
        let mut command = late.clone();
        command.request_id = format!("late-reserve-{attempt}");
        outcome = platform.shard(1).execute(command).await.unwrap().outcome;
        if outcome == ledger::Outcome::CoordinatorFenced as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(outcome, ledger::Outcome::CoordinatorFenced as i32);

    // Exactly once: every payment moved its amount once between alice and bob.
    let transactions: Vec<pb::Transaction> = all.iter().map(|(_, t)| t.clone()).collect();
    let mut expected_alice: i128 = 100_000;
    for t in &transactions {
        for l in &t.legs {
            if l.account_id == alice {
                expected_alice += minor(&l.amount);
            }
        }
    }
    // The fenced late reserve may have been accepted before the fence; void it to settle.
    let void = ledger::Command {
        request_id: "void-late".into(),
        kind: Some(ledger::command::Kind::Void(ledger::Void {
            txn_id: "t:late".into(),
            owner: Some(ledger::Owner {
                coordinator_shard_id: 1,
                epoch: 5,
            }),
        })),
    };
    platform.shard(1).execute(void).await.unwrap();
    assert_eq!(
        minor(&platform.balances().await[&alice].balance),
        expected_alice
    );
    platform.check_invariants(&transactions).await;
}

/// With the credit shard down past the reservation deadline, the payment aborts by itself; the
/// debit shard's hold is released, and the credit shard is voided when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_aborts_at_its_deadline_when_a_shard_stays_unavailable() {
    let mut platform = Platform::start(&["--reserve-timeout-ms", "1500"]).await;
    let alice = platform.open(1, "alice", 1_000).await;
    let bob = platform.open(2, "bob", 0).await;
    stop_shard(&mut platform, 2).await;
    let late = platform
        .pay("deadline", vec![leg(&alice, -100), leg(&bob, 100)])
        .await;
    assert_eq!(
        (late.status, late.abort_reason),
        (
            pb::TransactionStatus::Aborted as i32,
            pb::AbortReason::Deadline as i32
        )
    );
    // The void on the debit shard does not wait for the unavailable credit shard.
    let mut alice_now = platform.shard(1).accounts().await.unwrap()[&alice].clone();
    for _ in 0..100 {
        if minor(&alice_now.pending_out) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        alice_now = platform.shard(1).accounts().await.unwrap()[&alice].clone();
    }
    assert_eq!(
        (minor(&alice_now.balance), minor(&alice_now.pending_out)),
        (1_000, 0),
        "the debit hold is released"
    );
    restart_shard(&mut platform, 2).await;
    platform.check_invariants(std::slice::from_ref(&late)).await;
}

/// Concurrent submits through `marker::client::CoordinatorClient` share `SubmitMany` calls.
/// Sent first to a follower, they follow its redirects to the leader; each gets its own answer;
/// a key sent again gives its transaction back, and a changed body under it a mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_share_calls_through_the_coordinator_client() {
    use pb::submit_response::Reply;
    use std::sync::Arc;
    use std::time::Instant;

    let platform = Platform::start(&[]).await;
    let alice = platform.open(1, "alice", 1_000).await;
    let bob = platform.open(2, "bob", 0).await;
    // Knowing no leader, the client asks the second replica first: a follower here.
    let leader = platform.coordinator.leader().await.unwrap();
    let (leaders, followers): (Vec<_>, Vec<_>) = platform
        .coordinator
        .replicas
        .iter()
        .partition(|replica| replica.node_id == leader);
    let replicas = [leaders[0], followers[0], followers[1]]
        .map(|replica| replica.address.clone())
        .to_vec();
    let client = Arc::new(marker::client::CoordinatorClient::new(1, replicas));
    let deadline = Instant::now() + Duration::from_secs(30);
    let pay = |key: String, amount: i128| {
        submit_request(&key, vec![leg(&alice, -amount), leg(&bob, amount)])
    };
    let submits = (0..40).map(|i| {
        let (client, request) = (client.clone(), pay(format!("shared-{i}"), 10));
        async move { client.submit(request, deadline).await.unwrap() }
    });
    let mut transactions = Vec::new();
    for reply in futures::future::join_all(submits).await {
        match reply {
            Reply::Transaction(transaction) => {
                assert_eq!(transaction.status, pb::TransactionStatus::Committed as i32);
                transactions.push(transaction);
            }
            other => panic!("{other:?}"),
        }
    }
    let again = client
        .submit(pay("shared-7".into(), 10), deadline)
        .await
        .unwrap();
    assert!(
        matches!(again, Reply::Transaction(ref t) if t.txn_id == transactions[7].txn_id),
        "{again:?}"
    );
    let changed = client
        .submit(pay("shared-8".into(), 11), deadline)
        .await
        .unwrap();
    assert!(
        matches!(changed, Reply::IdempotencyMismatch(ref m) if m.txn_id == transactions[8].txn_id),
        "{changed:?}"
    );

    let balances = platform.balances().await;
    assert_eq!(minor(&balances[&alice].balance), 600);
    assert_eq!(minor(&balances[&bob].balance), 400);
    platform.check_invariants(&transactions).await;
}

/// `SubmitMany` answers each submit as soon as it settles, whatever its place in the call, and
/// refuses a call of more submits than it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_many_answers_each_submit_as_it_settles() {
    use pb::submit_many_reply::Result as Answered;
    use pb::submit_response::Reply;

    let platform = Platform::start(&[]).await;
    let alice = platform.open(1, "alice", 1_000).await;
    let bob = platform.open(2, "bob", 0).await;
    let mut client = platform.client().await;
    // The first waits for its decision; the second is refused at once, so it comes first.
    let requests = vec![
        submit_request("many-paid", vec![leg(&alice, -300), leg(&bob, 300)]),
        submit_request("many-unbalanced", vec![leg(&alice, -5), leg(&bob, 4)]),
    ];
    let mut answers = client
        .submit_many(pb::SubmitManyRequest { requests })
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.index, 1);
    assert!(
        matches!(
            first.result,
            Some(Answered::Response(pb::SubmitResponse {
                reply: Some(Reply::Invalid(_))
            }))
        ),
        "{first:?}"
    );
    let second = answers.message().await.unwrap().unwrap();
    assert_eq!(second.index, 0);
    let Some(Answered::Response(pb::SubmitResponse {
        reply: Some(Reply::Transaction(paid)),
    })) = second.result
    else {
        panic!("{second:?}");
    };
    assert_eq!(paid.status, pb::TransactionStatus::Committed as i32);
    assert!(answers.message().await.unwrap().is_none());

    let too_many = vec![
        submit_request("many-over", vec![leg(&alice, -1), leg(&bob, 1)]);
        marker::service::SUBMIT_MANY_REQUESTS_MAX + 1
    ];
    let refused = client
        .submit_many(pb::SubmitManyRequest { requests: too_many })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let balances = platform.balances().await;
    assert_eq!(minor(&balances[&alice].balance), 700);
    assert_eq!(minor(&balances[&bob].balance), 300);
    platform.check_invariants(&[paid]).await;
}
