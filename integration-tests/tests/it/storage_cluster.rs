//! A storage shard of three real `auticuro` processes on loopback: transfers, leader failure,
//! gap-free events, catch-up through a snapshot, whole-shard restart.

use futures::StreamExt;
use integration_tests::commands::{command, create, ok, post, reserve, transfer};
use integration_tests::group::Group;
use proto::auticuro::v1 as pb;
use proto::common::v1::Amount;

/// Creates the funding account and `count` customer accounts, each funded with 1,000.
async fn open_accounts(shard: &Group, count: usize) -> Vec<String> {
    assert!(ok(&shard
        .execute(command("create-funding", create("sys:funding:USD", true)))
        .await
        .unwrap()));
    let mut accounts = Vec::new();
    for index in 0..count {
        let account = format!("user-{index}");
        assert!(ok(&shard
            .execute(command(format!("create-{index}"), create(&account, false)))
            .await
            .unwrap()));
        let fund = transfer("sys:funding:USD", &account, 1_000);
        assert!(ok(&shard
            .execute(command(format!("fund-{index}"), fund))
            .await
            .unwrap()));
        accounts.push(account);
    }
    accounts
}

async fn balance(shard: &Group, node_id: u64, account: &str) -> i128 {
    let mut client = shard.ledger(node_id).await.unwrap();
    let request = pb::GetAccountRequest {
        account_id: account.into(),
        consistency: pb::ReadConsistency::MinSeq as i32,
        min_seq: 0,
        wait_ms_max: 0,
    };
    let reply = client
        .get_account(request)
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    let pb::get_account_response::Reply::Read(read) = reply else {
        panic!("unexpected {reply:?}")
    };
    read.account
        .unwrap()
        .balance
        .unwrap()
        .minor_units
        .parse()
        .unwrap()
}

async fn read_all_events(shard: &Group, node_id: u64) -> Vec<pb::Event> {
    let mut client = shard.ledger(node_id).await.unwrap();
    let mut events = Vec::new();
    loop {
        let request = pb::ReadEventsRequest {
            from_seq: events.len() as u64 + 1,
            to_seq: 0,
            limit: 1_000,
        };
        let page = client.read_events(request).await.unwrap().into_inner();
        if page.events.is_empty() {
            return events;
        }
        events.extend(page.events);
    }
}

fn assert_gap_free(events: &[pb::Event]) {
    for (index, event) in events.iter().enumerate() {
        assert_eq!(
            event.seq,
            index as u64 + 1,
            "events must be consecutive from 1"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfers_survive_a_leader_kill_with_nothing_lost_or_applied_twice() {
    let shard = Group::storage(1, 3, &[]).await.unwrap();
    let accounts = open_accounts(&shard, 8).await;
    let first_leader = shard.leader().await.unwrap();
    let follower = shard.running_other_than(first_leader);

    // A live subscriber on a follower sees every event across the failover.
    let mut stream = shard
        .ledger(follower)
        .await
        .unwrap()
        .subscribe(pb::SubscribeRequest { from_seq: 1 })
        .await
        .unwrap()
        .into_inner();

    // Each client moves 1 from one account to the next, 40 times, retrying unknown outcomes
    // with the same request id. The leader is killed once a quarter of the transfers are
    // acknowledged, while every client is still sending.
    let shard = std::sync::Arc::new(tokio::sync::RwLock::new(shard));
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let quarter_done = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut clients = Vec::new();
    for client in 0..accounts.len() {
        let (shard, acknowledged, quarter_done) =
            (shard.clone(), acknowledged.clone(), quarter_done.clone());
        let from = accounts[client].clone();
        let to = accounts[(client + 1) % accounts.len()].clone();
        clients.push(tokio::spawn(async move {
            for step in 0..40 {
                let request = command(format!("pay-{client}-{step}"), transfer(&from, &to, 1));
                let result = shard.read().await.execute(request).await.unwrap();
                assert!(ok(&result), "{result:?}");
                if acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == 80 {
                    quarter_done.notify_one();
                }
            }
        }));
    }
    quarter_done.notified().await;
    shard.write().await.kill(first_leader).await.unwrap();
    let acknowledged_at_kill = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    assert!(
        acknowledged_at_kill < 8 * 40,
        "the leader died while transfers were in flight"
    );
    assert_eq!(
        acknowledged.load(std::sync::atomic::Ordering::SeqCst),
        8 * 40
    );

    let shard = shard.read().await;
    let new_leader = shard.leader().await.unwrap();
    assert_ne!(new_leader, first_leader);
    // A ring of equal transfers leaves every balance where it started: none lost, none doubled.
    for account in &accounts {
        assert_eq!(
            balance(&shard, new_leader, account).await,
            1_000,
            "{account}"
        );
    }
    // 1 funding account + 8 × (create, fund) + 320 transfers.
    let expected_seq = 1 + 8 * 2 + 320;
    let digests = shard.digests_at(expected_seq).await.unwrap();
    assert!(
        digests
            .iter()
            .all(|digest| digest.applied_seq == expected_seq)
    );
    assert!(
        digests
            .windows(2)
            .all(|pair| pair[0].digest == pair[1].digest)
    );

    let mut seen = Vec::new();
    while (seen.len() as u64) < expected_seq {
        seen.push(stream.next().await.unwrap().unwrap());
    }
    assert_gap_free(&seen);
    let transfers = seen
        .iter()
        .filter(|event| event.request_id.starts_with("pay-"))
        .count();
    assert_eq!(transfers, 320, "every transfer has exactly one event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_replica_catches_up_through_a_snapshot_after_compaction() {
    let args = [
        "--snapshot-after-logs",
        "20",
        "--logs-kept-after-snapshot",
        "0",
    ];
    let mut shard = Group::storage(2, 3, &args).await.unwrap();
    let accounts = open_accounts(&shard, 4).await;
    for step in 0..100 {
        let from = &accounts[step % 4];
        let to = &accounts[(step + 1) % 4];
        assert!(ok(&shard
            .execute(command(format!("t-{step}"), transfer(from, to, 3)))
            .await
            .unwrap()));
    }
    let leader = shard.leader().await.unwrap();
    let lost = shard.running_other_than(leader);
    shard.kill(lost).await.unwrap();
    let mut admin = shard.admin(leader).await.unwrap();
    admin
        .remove_node(proto::raft::v1::RemoveNodeRequest { node_id: lost })
        .await
        .unwrap();
    // The leader's log was compacted behind a snapshot, so a new replica must install it.
    admin
        .trigger_snapshot(proto::raft::v1::TriggerSnapshotRequest {})
        .await
        .unwrap();
    // Wait until the log behind the snapshot is really purged: only then must a new replica
    // catch up through the snapshot.
    let mut status = shard.status(leader).await.unwrap();
    for _ in 0..200 {
        if status.purged_index.is_some() && status.purged_index >= status.snapshot_index {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        status = shard.status(leader).await.unwrap();
    }
    assert!(status.snapshot_index.is_some());
    assert!(
        status.purged_index >= status.snapshot_index,
        "log compacted: {status:?}"
    );

    // A brand-new replica (a new node id: ids are never reused) joins with an empty disk.
    let address = shard.add_process(4).await.unwrap().address.clone();
    let node = proto::raft::v1::Node {
        node_id: 4,
        address,
    };
    admin
        .add_learner(proto::raft::v1::AddLearnerRequest {
            node: Some(node),
            wait_caught_up: true,
        })
        .await
        .unwrap();
    let voters: Vec<u64> = shard.running().map(|replica| replica.node_id).collect();
    admin
        .change_membership(proto::raft::v1::ChangeMembershipRequest {
            voter_ids: voters,
            retain_as_learners: false,
        })
        .await
        .unwrap();

    let expected_seq = 1 + 4 * 2 + 100;
    let digests = shard.digests_at(expected_seq).await.unwrap();
    // Raft's metrics report the installed snapshot a moment after the state is applied.
    let mut installed = shard.status(4).await.unwrap().snapshot_index;
    for _ in 0..100 {
        if installed.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        installed = shard.status(4).await.unwrap().snapshot_index;
    }
    assert!(installed.is_some(), "node 4 installed a snapshot");
    assert!(
        digests
            .windows(2)
            .all(|pair| pair[0].digest == pair[1].digest)
    );
    let events = read_all_events(&shard, 4).await;
    assert_eq!(events.len() as u64, expected_seq);
    assert_gap_free(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_shard_restart_keeps_every_balance_and_event() {
    let mut shard = Group::storage(3, 3, &[]).await.unwrap();
    let accounts = open_accounts(&shard, 3).await;
    assert!(ok(&shard
        .execute(command("move", transfer(&accounts[0], &accounts[1], 250)))
        .await
        .unwrap()));
    let before = shard.digests_at(1 + 3 * 2 + 1).await.unwrap();
    for node_id in 1..=3 {
        shard.kill(node_id).await.unwrap();
    }
    for node_id in 1..=3 {
        shard.restart(node_id).await.unwrap();
    }
    let leader = shard.leader().await.unwrap();
    assert_eq!(balance(&shard, leader, &accounts[0]).await, 750);
    assert_eq!(balance(&shard, leader, &accounts[1]).await, 1_250);
    let after = shard.digests_at(before[0].applied_seq).await.unwrap();
    assert!(after.iter().all(|digest| digest.digest == before[0].digest));
    // A retry of a command from before the restart is still recognised.
    let retry = shard
        .execute(command("move", transfer(&accounts[0], &accounts[1], 250)))
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(balance(&shard, leader, &accounts[0]).await, 750);
    assert_gap_free(&read_all_events(&shard, leader).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_rejected_with_a_typed_outcome_and_no_event() {
    let shard = Group::storage(4, 3, &[]).await.unwrap();
    let accounts = open_accounts(&shard, 2).await;
    let seq_before = shard.digests_at(5).await.unwrap()[0].applied_seq;
    let cases = [
        (
            transfer("bad id!", &accounts[1], 1),
            pb::Outcome::InvalidAccountId,
        ),
        (
            transfer(&accounts[0], &accounts[1], 0),
            pb::Outcome::InvalidAmount,
        ),
        (
            transfer(&accounts[0], &accounts[1], -3),
            pb::Outcome::InvalidAmount,
        ),
        (
            transfer(&accounts[0], &accounts[0], 3),
            pb::Outcome::SelfTransfer,
        ),
        (
            transfer(&accounts[0], "nobody", 3),
            pb::Outcome::AccountNotFound,
        ),
        (
            transfer(&accounts[0], &accounts[1], 5_000),
            pb::Outcome::InsufficientFunds,
        ),
    ];
    for (index, (kind, outcome)) in cases.into_iter().enumerate() {
        let result = shard
            .execute(command(format!("bad-{index}"), kind))
            .await
            .unwrap();
        assert_eq!(result.outcome, outcome as i32, "case {index}");
        assert_eq!(result.seq, 0);
    }
    let mut too_precise = command("bad-amount", transfer(&accounts[0], &accounts[1], 1));
    if let Some(pb::command::Kind::Transfer(transfer)) = &mut too_precise.kind {
        transfer.amount = Some(Amount {
            minor_units: "1.005".into(),
        });
    }
    assert_eq!(
        shard.execute(too_precise).await.unwrap().outcome,
        pb::Outcome::InvalidAmount as i32
    );
    let leader = shard.leader().await.unwrap();
    assert_eq!(shard.digest(leader).await.unwrap().applied_seq, seq_before);
    assert_eq!(balance(&shard, leader, &accounts[0]).await, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_export_prometheus_metrics_on_their_grpc_port() {
    let mut shard = Group::storage(5, 3, &[]).await.unwrap();
    let accounts = open_accounts(&shard, 2).await;
    let rejected = shard
        .execute(command(
            "too-much",
            transfer(&accounts[0], &accounts[1], 5_000),
        ))
        .await
        .unwrap();
    assert_eq!(rejected.outcome, pb::Outcome::InsufficientFunds as i32);
    let leader = shard.leader().await.unwrap();
    let address = shard.replica(leader).address.clone();
    let (status, body) = integration_tests::http_get(&address, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    for expected in [
        r#"auticuro_commands_total{kind="transfer",outcome="Ok"} 2"#,
        r#"auticuro_commands_total{kind="transfer",outcome="InsufficientFunds"} 1"#,
        "auticuro_raft_is_leader 1",
        "auticuro_raft_applied_seq 5",
        "auticuro_raft_entry_requests_count",
        "auticuro_raft_apply_seconds_count",
    ] {
        assert!(body.contains(expected), "missing {expected} in\n{body}");
    }
}

async fn leg_states<const N: usize>(shard: &Group, txn_ids: [&str; N]) -> [i32; N] {
    let mut states = [0; N];
    for (state, txn_id) in states.iter_mut().zip(txn_ids) {
        *state = shard.transaction_legs(txn_id).await.unwrap().state;
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_ids_expire_by_a_replicated_prune_command_configured_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("auticuro.toml");
    std::fs::write(
        &config,
        "dedup_retention_hours = 0\ndedup_prune_interval_seconds = 1\n",
    )
    .unwrap();
    let mut shard = Group::storage(6, 3, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    let accounts = open_accounts(&shard, 2).await;
    // A two-phase transaction, settled, and one still held: the prune takes only the settled.
    shard
        .execute_ok(
            "reserve-settled",
            reserve("t:settled", &accounts[0], &accounts[1], 5),
        )
        .await;
    shard.execute_ok("post-settled", post("t:settled")).await;
    shard
        .execute_ok(
            "reserve-held",
            reserve("t:held", &accounts[0], &accounts[1], 5),
        )
        .await;
    let pay = || command("pay-once", transfer(&accounts[0], &accounts[1], 10));
    let first = shard.execute(pay()).await.unwrap();
    assert!(ok(&first) && !first.duplicate);

    // Wait for a prune whose cutoff (its leader time) is past the payment's time; it is in
    // every replica's log.
    let leader = shard.leader().await.unwrap();
    let mut client = shard.ledger(leader).await.unwrap();
    let read = pb::ReadEventsRequest {
        from_seq: first.seq,
        to_seq: first.seq,
        limit: 1,
    };
    let paid_at = client.read_events(read).await.unwrap().into_inner().events[0].timestamp_ms;
    let mut events = client
        .subscribe(pb::SubscribeRequest {
            from_seq: first.seq + 1,
        })
        .await
        .unwrap()
        .into_inner();
    let prune = loop {
        let event = events.next().await.unwrap().unwrap();
        if event.request_id.starts_with("sys:prune-dedup:") && event.timestamp_ms > paid_at {
            break event;
        }
    };
    assert!(matches!(
        prune.command.unwrap().kind,
        Some(pb::command::Kind::PruneDedup(_))
    ));

    // With its record pruned, the same request id is a new command again.
    let again = shard.execute(pay()).await.unwrap();
    assert!(ok(&again) && !again.duplicate);
    assert!(again.seq > first.seq);
    assert_eq!(balance(&shard, leader, &accounts[1]).await, 1_025);

    // The settled legs are forgotten and the held ones kept, on disk as well: after a restart
    // of every replica, which loads its state from disk.
    let expected = [pb::LegState::Unspecified as i32, pb::LegState::Held as i32];
    assert_eq!(leg_states(&shard, ["t:settled", "t:held"]).await, expected);
    for node_id in 1..=3 {
        shard.kill(node_id).await.unwrap();
    }
    for node_id in 1..=3 {
        shard.restart(node_id).await.unwrap();
    }
    assert_eq!(leg_states(&shard, ["t:settled", "t:held"]).await, expected);
    let digests = shard.digests_at(again.seq).await.unwrap();
    assert!(
        digests
            .windows(2)
            .all(|pair| pair[0].digest == pair[1].digest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_are_linearizable_on_the_leader_and_bounded_by_min_seq_on_followers() {
    let shard = Group::storage(7, 3, &[]).await.unwrap();
    let accounts = open_accounts(&shard, 1).await;
    let leader = shard.leader().await.unwrap();
    let follower = shard.running_other_than(leader);
    let read = |consistency: pb::ReadConsistency, min_seq: u64| pb::GetAccountRequest {
        account_id: accounts[0].clone(),
        consistency: consistency as i32,
        min_seq,
        wait_ms_max: 200,
    };

    // A follower sends linearizable reads to the leader with a typed redirect.
    let mut on_follower = shard.ledger(follower).await.unwrap();
    let reply = on_follower
        .get_account(read(pb::ReadConsistency::Linearizable, 0))
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    let pb::get_account_response::Reply::Redirect(redirect) = reply else {
        panic!("expected a redirect, got {reply:?}")
    };
    assert_eq!(redirect.leader_node_id, Some(leader));
    assert_eq!(
        redirect.leader_address.as_deref(),
        Some(shard.address_of(leader))
    );

    // The leader answers it, with what it has applied.
    let mut on_leader = shard.ledger(leader).await.unwrap();
    let reply = on_leader
        .get_account(read(pb::ReadConsistency::Linearizable, 0))
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    let pb::get_account_response::Reply::Read(account_read) = reply else {
        panic!("expected a read, got {reply:?}")
    };
    assert_eq!(account_read.applied_seq, 3);
    assert_eq!(account_read.account.unwrap().version, 2);

    // A follower serves a min_seq read once it has applied that seq, and says so when it has not.
    let reply = on_follower
        .get_account(read(pb::ReadConsistency::MinSeq, 3))
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert!(
        matches!(reply, pb::get_account_response::Reply::Read(_)),
        "{reply:?}"
    );
    let reply = on_follower
        .get_account(read(pb::ReadConsistency::MinSeq, 99))
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    let pb::get_account_response::Reply::NotCaughtUp(lag) = reply else {
        panic!("expected NotCaughtUp, got {reply:?}")
    };
    assert_eq!((lag.applied_seq, lag.min_seq), (3, 99));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn execute_many_answers_each_command_in_order_and_each_stays_idempotent() {
    let shard = Group::storage(8, 3, &[]).await.unwrap();
    let accounts = open_accounts(&shard, 2).await;
    let leader = shard.leader().await.unwrap();
    let commands = vec![
        command("many-1", transfer(&accounts[0], &accounts[1], 10)),
        command("many-2", transfer("bad id!", &accounts[1], 10)),
        command("many-1", transfer(&accounts[0], &accounts[1], 10)),
        command("many-3", transfer(&accounts[1], &accounts[0], 5_000)),
    ];
    let mut client = shard.ledger(leader).await.unwrap();
    let responses = client
        .execute_many(pb::ExecuteManyRequest { commands })
        .await
        .unwrap()
        .into_inner()
        .responses;
    let results: Vec<(i32, bool)> = responses
        .into_iter()
        .map(|response| match response.reply {
            Some(pb::execute_response::Reply::Result(result)) => (result.outcome, result.duplicate),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // The two copies of many-1 race inside one call; exactly one applies, the other is its duplicate.
    assert_eq!(results[0].0, pb::Outcome::Ok as i32);
    assert_eq!(results[2].0, pb::Outcome::Ok as i32);
    assert!(
        results[0].1 ^ results[2].1,
        "exactly one of the two copies is the duplicate: {results:?}"
    );
    assert_eq!(results[1], (pb::Outcome::InvalidAccountId as i32, false));
    assert_eq!(results[3], (pb::Outcome::InsufficientFunds as i32, false));
    assert_eq!(balance(&shard, leader, &accounts[1]).await, 1_010);
    // A follower refuses with a redirect for every command.
    let follower = shard.running_other_than(leader);
    let mut on_follower = shard.ledger(follower).await.unwrap();
    let commands = vec![command("many-4", transfer(&accounts[0], &accounts[1], 1))];
    let responses = on_follower
        .execute_many(pb::ExecuteManyRequest { commands })
        .await
        .unwrap()
        .into_inner()
        .responses;
    assert!(matches!(
        responses[0].reply,
        Some(pb::execute_response::Reply::Redirect(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_through_one_client_each_get_their_own_result() {
    let shard = Group::storage(9, 3, &[]).await.unwrap();
    let accounts = open_accounts(&shard, 2).await;
    // The client sends whatever queues while its calls are in flight together in one
    // `ExecuteMany`; every caller must still get the answer to its own command.
    let sends = (1..=200).map(|index| {
        let (from, to) = if index % 2 == 0 { (0, 1) } else { (1, 0) };
        let request_id = format!("concurrent-{index}");
        // Small amounts (at most 700 each way in all), so only the oversized ones are refused.
        let amount = if index % 10 == 0 {
            100_000
        } else {
            index % 7 + 1
        };
        let request = command(
            &request_id,
            transfer(&accounts[from], &accounts[to], amount),
        );
        let shard = &shard;
        async move { (request_id, amount, shard.execute(request).await.unwrap()) }
    });
    let answers = futures::future::join_all(sends).await;
    let leader = shard.leader().await.unwrap();
    let events = read_all_events(&shard, leader).await;
    for (request_id, amount, result) in &answers {
        if *amount == 100_000 {
            // More than either account holds: refused, no event.
            assert_eq!(
                result.outcome,
                pb::Outcome::InsufficientFunds as i32,
                "{request_id}"
            );
            assert_eq!(result.seq, 0, "{request_id}");
            continue;
        }
        assert!(ok(result), "{request_id}: {result:?}");
        let event = &events[usize::try_from(result.seq).unwrap() - 1];
        assert_eq!(
            &event.request_id, request_id,
            "the seq answered is this command's event"
        );
    }
    // 1 funding account + 2 × (create, fund) + 180 accepted transfers.
    assert_eq!(events.len(), 1 + 2 * 2 + 180);
}
