//! Cross-shard transfers through a coordinator shard of three `marker` processes over two
//! storage shards of three `auticuro` processes each, with the protocol's invariants checked at
//! the end of every test.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use integration_tests::group::{Group, account_on};
use proto::auticuro::v1 as ledger;
use proto::common::v1::Amount;
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_client::CoordinatorClient;

const SHARDS: [u32; 2] = [1, 2];

struct Platform {
    storage: Vec<Group>,
    coordinator: Group,
}

fn amount(value: i128) -> Option<Amount> {
    Some(Amount {
        minor_units: value.to_string(),
    })
}

fn leg(account: &str, value: i128) -> ledger::Leg {
    ledger::Leg {
        account_id: account.into(),
        amount: amount(value),
        currency: "USD".into(),
    }
}

fn minor(value: &Option<Amount>) -> i128 {
    value.as_ref().unwrap().minor_units.parse().unwrap()
}

impl Platform {
    async fn start(extra_coordinator_args: &[&str]) -> Platform {
        let (first, second) = tokio::join!(Group::storage(1, 3, &[]), Group::storage(2, 3, &[]));
        let storage = vec![first.unwrap(), second.unwrap()];
        let coordinator =
            Group::coordinator(1, 3, &[&storage[0], &storage[1]], extra_coordinator_args)
                .await
                .unwrap();
        Platform {
            storage,
            coordinator,
        }
    }

    fn shard(&self, shard_id: u32) -> &Group {
        &self.storage[(shard_id - 1) as usize]
    }

    /// A funded customer account on `shard_id` (through that shard's own funding account).
    async fn open(&self, shard_id: u32, prefix: &str, funds: i128) -> String {
        let shard = self.shard(shard_id);
        let funding = format!("sys:funding:{shard_id}");
        let create = |id: &str, unbounded: bool| ledger::Command {
            request_id: format!("create-{id}"),
            kind: Some(ledger::command::Kind::CreateAccount(
                ledger::CreateAccount {
                    account_id: id.into(),
                    currency: "USD".into(),
                    scale: 2,
                    no_lower_limit: unbounded,
                    ..Default::default()
                },
            )),
        };
        shard.execute(create(&funding, true)).await.unwrap();
        let account = account_on(shard_id, prefix, &SHARDS);
        let created = shard.execute(create(&account, false)).await.unwrap();
        assert_eq!(created.outcome, ledger::Outcome::Ok as i32, "{created:?}");
        if funds > 0 {
            let fund = ledger::Command {
                request_id: format!("fund-{account}"),
                kind: Some(ledger::command::Kind::Batch(ledger::Batch {
                    legs: vec![leg(&funding, -funds), leg(&account, funds)],
                    ..Default::default()
                })),
            };
            assert_eq!(
                shard.execute(fund).await.unwrap().outcome,
                ledger::Outcome::Ok as i32
            );
        }
        account
    }

    async fn client(&self) -> CoordinatorClient<tonic::transport::Channel> {
        let leader = self.coordinator.leader().await.unwrap();
        CoordinatorClient::new(
            self.coordinator
                .channel(
                    &self
                        .coordinator
                        .replicas
                        .iter()
                        .find(|r| r.node_id == leader)
                        .unwrap()
                        .address,
                )
                .await
                .unwrap(),
        )
    }

    /// Submits through the current coordinator leader, retrying (same key) across failovers.
    async fn pay(&self, key: &str, legs: Vec<ledger::Leg>) -> pb::Transaction {
        let request = pb::SubmitRequest {
            tenant_id: "tenant-a".into(),
            idempotency_key: key.into(),
            legs,
            metadata: HashMap::new(),
            wait: true,
            wait_ms_max: 10_000,
        };
        for _ in 0..200 {
            let mut client = self.client().await;
            if let Ok(reply) = client.submit(request.clone()).await
                && let Some(pb::submit_response::Reply::Transaction(transaction)) =
                    reply.into_inner().reply
                && transaction.status != pb::TransactionStatus::Pending as i32
            {
                return transaction;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no decision for {key}");
    }

    async fn balances(&self) -> BTreeMap<String, ledger::Account> {
        let mut all = BTreeMap::new();
        for shard in &self.storage {
            all.extend(shard.accounts().await.unwrap());
        }
        all
    }

    /// Waits until the coordinator has nothing in flight, then checks the protocol's invariants
    /// over every shard: zero sums per shard, nothing pending, and for every transaction the same
    /// final leg state on every shard it touched (never posted on one and voided on another).
    async fn check_invariants(&self, transactions: &[pb::Transaction]) {
        let leader = self.coordinator.leader().await.unwrap();
        let address = self
            .coordinator
            .replicas
            .iter()
            .find(|r| r.node_id == leader)
            .unwrap()
            .address
            .clone();
        let mut admin = proto::marker::v1::coordinator_admin_client::CoordinatorAdminClient::new(
            self.coordinator.channel(&address).await.unwrap(),
        );
        for _ in 0..400 {
            if admin
                .status(pb::CoordinatorStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .in_flight
                == 0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            admin
                .status(pb::CoordinatorStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .in_flight,
            0,
            "transactions left in flight"
        );
        for shard in &self.storage {
            let accounts = shard.accounts().await.unwrap();
            let sum: i128 = accounts
                .values()
                .map(|account| minor(&account.balance))
                .sum();
            assert_eq!(sum, 0, "shard {} does not sum to zero", shard.shard_id);
            for account in accounts.values() {
                assert_eq!(
                    (minor(&account.pending_out), minor(&account.pending_in)),
                    (0, 0),
                    "hold left on {}",
                    account.account_id
                );
            }
        }
        for transaction in transactions {
            let mut states = Vec::new();
            for shard in &self.storage {
                let legs = shard.transaction_legs(&transaction.txn_id).await.unwrap();
                if legs.state != ledger::LegState::Unspecified as i32 {
                    states.push(legs.state);
                }
            }
            let committed = transaction.status == pb::TransactionStatus::Committed as i32;
            let single_shard = states.is_empty();
            if committed && !single_shard {
                assert!(
                    states.iter().all(|s| *s == ledger::LegState::Posted as i32),
                    "{}: {states:?}",
                    transaction.txn_id
                );
            }
            if !committed {
                assert!(
                    states.iter().all(|s| *s == ledger::LegState::Voided as i32
                        || *s == ledger::LegState::Tombstone as i32),
                    "{}: {states:?}",
                    transaction.txn_id
                );
            }
        }
    }
}

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
    let changed = pb::SubmitRequest {
        tenant_id: "tenant-a".into(),
        idempotency_key: "same-key".into(),
        legs: vec![leg(&alice, -11), leg(&bob, 11)],
        ..Default::default()
    };
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
    let unbalanced = pb::SubmitRequest {
        tenant_id: "tenant-a".into(),
        idempotency_key: "bad".into(),
        legs: vec![leg(&alice, -11), leg(&bob, 10)],
        ..Default::default()
    };
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
                let request = pb::SubmitRequest {
                    tenant_id: "tenant-a".into(),
                    idempotency_key: key.clone(),
                    legs,
                    metadata: HashMap::new(),
                    wait: true,
                    wait_ms_max: 10_000,
                };
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
