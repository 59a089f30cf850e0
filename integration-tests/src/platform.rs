//! A whole platform for tests and benchmarks: storage shards and a coordinator shard of real
//! processes, funded accounts placed on chosen shards, payments through the coordinator, and a
//! check of the protocol's invariants over every shard.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::auticuro::v1 as ledger;
use proto::common::v1::Amount;
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_client::CoordinatorClient;

use crate::group::{Group, account_on};

/// The storage shard ids of a platform.
pub const SHARDS: [u32; 2] = [1, 2];

/// Two storage shards of three replicas and one coordinator shard of three replicas, all real
/// processes on loopback.
pub struct Platform {
    pub storage: Vec<Group>,
    pub coordinator: Group,
    /// More coordinator shards (ids 2, 3, …) and the topology group, when started with one.
    pub more_coordinators: Vec<Group>,
    pub topology: Option<Group>,
}

/// A submit for the test tenant that waits (up to 10 s) for the decision.
pub fn submit_request(key: &str, legs: Vec<ledger::Leg>) -> pb::SubmitRequest {
    pb::SubmitRequest {
        tenant_id: "tenant-a".into(),
        idempotency_key: key.into(),
        legs,
        metadata: BTreeMap::new(),
        wait: true,
        wait_ms_max: 10_000,
        wait_until_done: false,
        hold_id: String::new(),
    }
}

/// The same submit answered as soon as the transaction is begun.
pub fn submit_request_without_wait(key: &str, legs: Vec<ledger::Leg>) -> pb::SubmitRequest {
    pb::SubmitRequest {
        wait: false,
        wait_ms_max: 0,
        ..submit_request(key, legs)
    }
}

pub fn amount(value: i128) -> Option<Amount> {
    Some(Amount {
        minor_units: value.to_string(),
    })
}

pub fn leg(account: &str, value: i128) -> ledger::Leg {
    ledger::Leg {
        account_id: account.into(),
        amount: amount(value),
        currency: "USD".into(),
    }
}

pub fn minor(value: &Option<Amount>) -> i128 {
    value.as_ref().unwrap().minor_units.parse().unwrap()
}

impl Platform {
    /// Two storage shards and a coordinator shard of three replicas each, every replica reached
    /// through a `FaultProxy` (for partitions and delays).
    pub async fn start_behind_proxies() -> Platform {
        let (first, second) = tokio::join!(
            Group::storage_behind_proxies(1, 3),
            Group::storage_behind_proxies(2, 3)
        );
        let storage = vec![first.unwrap(), second.unwrap()];
        let coordinator = Group::coordinator_behind_proxies(1, 3, &[&storage[0], &storage[1]])
            .await
            .unwrap();
        Platform {
            storage,
            coordinator,
            more_coordinators: Vec::new(),
            topology: None,
        }
    }

    pub async fn start(extra_coordinator_args: &[&str]) -> Platform {
        let (first, second) = tokio::join!(Group::storage(1, 3, &[]), Group::storage(2, 3, &[]));
        let storage = vec![first.unwrap(), second.unwrap()];
        let coordinator =
            Group::coordinator(1, 3, &[&storage[0], &storage[1]], extra_coordinator_args)
                .await
                .unwrap();
        Platform {
            storage,
            coordinator,
            more_coordinators: Vec::new(),
            topology: None,
        }
    }

    /// A topology group, two storage shards that watch it, and `coordinators` coordinator
    /// shards (ids 1, 2, …) that take everything from it, all active at epoch 1.
    pub async fn start_with_topology(coordinators: u32) -> Platform {
        Platform::start_with_topology_and(coordinators, &[]).await
    }

    /// The same, with extra arguments for every coordinator replica.
    pub async fn start_with_topology_and(
        coordinators: u32,
        extra_coordinator_args: &[&str],
    ) -> Platform {
        let topology = Group::topology(3).await.unwrap();
        let watch = ["--topology".to_string(), topology.addresses()];
        let watch: Vec<&str> = watch.iter().map(String::as_str).collect();
        let (first, second) =
            tokio::join!(Group::storage(1, 3, &watch), Group::storage(2, 3, &watch));
        let storage = vec![first.unwrap(), second.unwrap()];
        let client = marker::topology::TopologyClient::new(
            topology
                .replicas
                .iter()
                .map(|r| r.address.clone())
                .collect(),
        );
        let address_list = |group: &Group| {
            group
                .replicas
                .iter()
                .map(|r| r.address.clone())
                .collect::<Vec<_>>()
        };
        let storage_shards: BTreeMap<u32, Vec<String>> = storage
            .iter()
            .map(|g| (g.shard_id, address_list(g)))
            .collect();
        client
            .update(|current| {
                current.storage_shards = storage_shards.clone();
                Ok(())
            })
            .await
            .unwrap();
        // Coordinators find the storage shards in the topology, then join it themselves.
        let mut groups = Vec::new();
        for id in 1..=coordinators {
            groups.push(
                Group::coordinator_under_topology(id, 3, &topology, extra_coordinator_args)
                    .await
                    .unwrap(),
            );
        }
        let entries: BTreeMap<u32, marker::topology::CoordinatorEntry> = groups
            .iter()
            .map(|g| {
                let entry = marker::topology::CoordinatorEntry {
                    state: marker::topology::CoordinatorState::Active,
                    epoch: 1,
                    replicas: address_list(g),
                };
                (g.shard_id, entry)
            })
            .collect();
        client
            .update(|current| {
                current.coordinators = entries.clone();
                Ok(())
            })
            .await
            .unwrap();
        let mut groups = groups.into_iter();
        let coordinator = groups.next().expect("at least one coordinator shard");
        Platform {
            storage,
            coordinator,
            more_coordinators: groups.collect(),
            topology: Some(topology),
        }
    }

    pub fn shard(&self, shard_id: u32) -> &Group {
        &self.storage[(shard_id - 1) as usize]
    }

    /// A funded customer account on `shard_id` (through that shard's own funding account).
    pub async fn open(&self, shard_id: u32, prefix: &str, funds: i128) -> String {
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

    pub async fn client(&self) -> CoordinatorClient<tonic::transport::Channel> {
        let leader = self.coordinator.leader().await.unwrap();
        CoordinatorClient::new(
            self.coordinator
                .channel(self.coordinator.address_of(leader))
                .await
                .unwrap(),
        )
    }

    /// Submits through the current coordinator leader, retrying (same key) across failovers.
    pub async fn pay(&self, key: &str, legs: Vec<ledger::Leg>) -> pb::Transaction {
        self.submit(submit_request(key, legs)).await
    }

    /// Submits `request` through the current coordinator leader until it is decided.
    pub async fn submit(&self, request: pb::SubmitRequest) -> pb::Transaction {
        let key = request.idempotency_key.clone();
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

    /// Every account of every storage shard, once the coordinator has settled everything in
    /// flight (a payment is acknowledged at its decision; its posts may still be under way).
    pub async fn balances(&self) -> BTreeMap<String, ledger::Account> {
        assert_eq!(
            self.in_flight_when_settled().await,
            0,
            "transactions left in flight"
        );
        let mut all = BTreeMap::new();
        for shard in &self.storage {
            all.extend(shard.accounts().await.unwrap());
        }
        all
    }

    /// Waits (bounded) until every coordinator shard's leader reports nothing in flight,
    /// following the leadership if a leader dies meanwhile; returns the last counts seen, summed.
    pub async fn in_flight_when_settled(&self) -> u64 {
        let mut in_flight = 0;
        for group in std::iter::once(&self.coordinator).chain(&self.more_coordinators) {
            in_flight += Self::group_in_flight_when_settled(group).await;
        }
        in_flight
    }

    async fn group_in_flight_when_settled(group: &Group) -> u64 {
        let mut in_flight = u64::MAX;
        for _ in 0..400 {
            if let Ok(leader) = group.leader().await {
                let address = &group.address_of(leader);
                let channel = group.channel(address).await.expect("a channel");
                let mut admin =
                    proto::marker::v1::coordinator_admin_client::CoordinatorAdminClient::new(
                        channel,
                    );
                let status =
                    consensus::client::admin_call(admin.status(pb::CoordinatorStatusRequest {}));
                if let Ok(status) = status.await {
                    in_flight = status.in_flight;
                    if in_flight == 0 {
                        return 0;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        in_flight
    }

    /// Waits until the coordinator has nothing in flight, then checks the protocol's invariants
    /// over every shard: zero sums per shard, nothing pending, and for every transaction the same
    /// final leg state on every shard it touched (never posted on one and voided on another).
    pub async fn check_invariants(&self, transactions: &[pb::Transaction]) {
        assert_eq!(
            self.in_flight_when_settled().await,
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
