//! Carries transactions to their outcome on the storage shards. Runs on the coordinator leader
//! only; every step is idempotent (deterministic request ids), so a new leader simply re-drives
//! everything in flight from the log, and a resend after a timeout is always safe.
//!
//! Single shard: one atomic batch, request id = txn id. Several shards: reserve on every shard
//! (debit shards first) until all are held or one definitely fails or the deadline passes; the
//! decision goes into the log once; then post everywhere (retried until it succeeds) or void
//! everywhere (even shards never reached, which leaves tombstones); then `Done`.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auticuro::client::{StorageShards, Unknown};
use auticuro::convert::{pb_amount, pb_owner};
use auticuro::ledger::{Leg, Outcome, Owner, TxnId};
use consensus::{ProposeError, Proposer, Raft, StateMachineStore, now_ms};
use prometheus_client::metrics::counter::Counter;
use proto::auticuro::v1 as pb;

use crate::crash;
use crate::machine::CoordinatorMachine;
use crate::saga::{AbortReason, CoordinatorCommand, CoordinatorResponse, Decision, Transaction};
use crate::topology::Placement;

/// How long one round of a must-succeed step (post, void) retries before starting over.
const ROUND: Duration = Duration::from_secs(5);

pub struct Driver {
    pub coordinator_shard_id: u32,
    /// This coordinator shard's place in the topology (no entry when run without one).
    pub placement: tokio::sync::watch::Receiver<Placement>,
    pub raft: Raft<CoordinatorMachine>,
    pub machine: StateMachineStore<CoordinatorMachine>,
    pub proposer: Proposer<CoordinatorMachine>,
    pub storage: Arc<StorageShards>,
    driving: Mutex<HashSet<TxnId>>,
    retries: Counter,
}

/// Why driving stopped before the transaction was done.
enum Stop {
    /// This node is no longer the leader; the new leader re-drives.
    NotLeader,
    Unavailable(String),
}

impl From<ProposeError> for Stop {
    fn from(error: ProposeError) -> Stop {
        match error {
            ProposeError::NotLeader { .. } => Stop::NotLeader,
            other => Stop::Unavailable(other.to_string()),
        }
    }
}

fn leg_message(leg: &Leg) -> pb::Leg {
    pb::Leg {
        account_id: leg.account_id.to_string(),
        amount: Some(pb_amount(leg.amount)),
        currency: leg.currency.to_string(),
    }
}

fn outcome_of(result: &pb::CommandResult) -> Outcome {
    Outcome::from_number(result.outcome).unwrap_or(Outcome::InvalidRequestId)
}

impl Driver {
    pub fn new(
        coordinator_shard_id: u32,
        placement: tokio::sync::watch::Receiver<Placement>,
        raft: Raft<CoordinatorMachine>,
        machine: StateMachineStore<CoordinatorMachine>,
        proposer: Proposer<CoordinatorMachine>,
        storage: Arc<StorageShards>,
        retries: Counter,
    ) -> Arc<Driver> {
        Arc::new(Driver {
            coordinator_shard_id,
            placement,
            raft,
            machine,
            proposer,
            storage,
            driving: Mutex::default(),
            retries,
        })
    }

    /// This coordinator as the owner of its reservations, at its current topology epoch.
    pub fn owner(&self) -> Owner {
        let epoch = self
            .placement
            .borrow()
            .entry
            .as_ref()
            .map(|entry| entry.epoch)
            .unwrap_or(1);
        Owner {
            coordinator_shard_id: self.coordinator_shard_id,
            epoch,
        }
    }

    /// Starts driving a transaction unless it is already being driven (or done).
    pub fn ensure_driving(self: &Arc<Self>, txn_id: &TxnId) {
        if !self
            .driving
            .lock()
            .expect("no poisoned lock")
            .insert(txn_id.clone())
        {
            return;
        }
        let driver = self.clone();
        let txn_id = txn_id.clone();
        tokio::spawn(async move {
            if let Err(Stop::Unavailable(error)) = driver.drive(&txn_id).await {
                tracing::warn!(%txn_id, %error, "stopped driving; retry or the next leader resumes it");
            }
            driver
                .driving
                .lock()
                .expect("no poisoned lock")
                .remove(&txn_id);
        });
    }

    /// Re-drives everything in flight whenever this node becomes the leader.
    pub async fn resume_on_leadership(self: Arc<Self>) {
        let mut metrics = self.raft.metrics();
        let mut was_leader = false;
        loop {
            let is_leader = {
                let current = metrics.borrow_and_update();
                current.current_leader == Some(current.id)
            };
            if is_leader && !was_leader {
                let in_flight: Vec<TxnId> = self.machine.read(|machine| {
                    machine
                        .coordinator()
                        .in_flight()
                        .map(|t| t.txn_id.clone())
                        .collect()
                });
                for txn_id in in_flight {
                    self.ensure_driving(&txn_id);
                }
            }
            was_leader = is_leader;
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    fn transaction(&self, txn_id: &TxnId) -> Option<Transaction> {
        self.machine
            .read(|machine| machine.coordinator().transaction(txn_id).cloned())
    }

    async fn propose(&self, command: CoordinatorCommand) -> Result<Option<Transaction>, Stop> {
        match self.proposer.propose(command).await? {
            CoordinatorResponse::Transaction(transaction) => Ok(Some(*transaction)),
            _ => Ok(None),
        }
    }

    async fn drive(&self, txn_id: &TxnId) -> Result<(), Stop> {
        loop {
            let Some(transaction) = self.transaction(txn_id) else {
                return Ok(());
            };
            if transaction.done {
                return Ok(());
            }
            match &transaction.decision {
                None if transaction.is_single_shard() => self.run_batch(&transaction).await?,
                None => {
                    let decision = self.reserve_all(&transaction).await;
                    self.propose(CoordinatorCommand::Decide {
                        txn_id: txn_id.clone(),
                        decision,
                    })
                    .await?;
                    crash::point("after-decide");
                }
                Some(decision) => {
                    let shard_seqs = self.settle(&transaction, decision).await;
                    crash::point("before-done");
                    self.propose(CoordinatorCommand::Done {
                        txn_id: txn_id.clone(),
                        shard_seqs,
                    })
                    .await?;
                }
            }
        }
    }

    /// The single-shard fast path: one atomic batch whose request id is the transaction id, so a
    /// resend returns the stored outcome. Retried until the outcome is known.
    async fn run_batch(&self, transaction: &Transaction) -> Result<(), Stop> {
        let group = &transaction.plan[0];
        let result = self
            .until_known(group.shard_id, self.batch_command(transaction))
            .await;
        let outcome = outcome_of(&result);
        let decision = if outcome.is_ok() {
            Decision::Commit
        } else {
            let detail_account_id =
                auticuro::ledger::AccountId::parse(&result.detail_account_id).ok();
            Decision::Abort {
                reason: AbortReason::Rejected,
                outcome,
                detail_account_id,
            }
        };
        let txn_id = transaction.txn_id.clone();
        self.propose(CoordinatorCommand::Decide {
            txn_id: txn_id.clone(),
            decision,
        })
        .await?;
        let shard_seqs = if result.seq > 0 {
            BTreeMap::from([(group.shard_id, result.seq)])
        } else {
            BTreeMap::new()
        };
        self.propose(CoordinatorCommand::Done { txn_id, shard_seqs })
            .await?;
        Ok(())
    }

    /// The fast path's one atomic batch: its request id is the transaction id.
    fn batch_command(&self, transaction: &Transaction) -> pb::Command {
        pb::Command {
            request_id: transaction.txn_id.to_string(),
            kind: Some(pb::command::Kind::Batch(pb::Batch {
                legs: transaction.plan[0].legs.iter().map(leg_message).collect(),
                txn_id: transaction.txn_id.to_string(),
                metadata: auticuro::convert::pb_metadata(&transaction.metadata),
                hold_id: auticuro::convert::pb_optional_id(&transaction.hold_id),
            })),
        }
    }

    /// Reserves on every shard in plan order; returns the decision this warrants.
    async fn reserve_all(&self, transaction: &Transaction) -> Decision {
        for (position, group) in transaction.plan.iter().enumerate() {
            // A captured hold is drawn from by the debit, on the debit's shard.
            let hold_id = match &transaction.hold_id {
                Some(hold_id) if group.legs.iter().any(|leg| leg.amount.0 < 0) => {
                    hold_id.to_string()
                }
                _ => String::new(),
            };
            let command = pb::Command {
                request_id: format!("{}/reserve/{}", transaction.txn_id, group.shard_id),
                kind: Some(pb::command::Kind::Reserve(pb::Reserve {
                    txn_id: transaction.txn_id.to_string(),
                    owner: Some(pb_owner(&self.owner())),
                    legs: group.legs.iter().map(leg_message).collect(),
                    // What the transaction means travels with each shard's part of it (the
                    // read side builds activity feeds from it).
                    metadata: auticuro::convert::pb_metadata(&transaction.metadata),
                    hold_id,
                })),
            };
            let remaining_ms = transaction.decide_by_ms.saturating_sub(now_ms()).max(0) as u64;
            let deadline = Instant::now() + Duration::from_millis(remaining_ms);
            match self.execute(group.shard_id, command, deadline).await {
                Ok(result) if outcome_of(&result).is_ok() => {
                    crash::point(&format!("after-reserve-{}", position + 1));
                    continue;
                }
                Ok(result) => {
                    let detail_account_id =
                        auticuro::ledger::AccountId::parse(&result.detail_account_id).ok();
                    return Decision::Abort {
                        reason: AbortReason::Rejected,
                        outcome: outcome_of(&result),
                        detail_account_id,
                    };
                }
                // Unknown until the deadline: the reserve may or may not hold; the void that
                // follows the abort releases it either way (or tombstones a late one).
                Err(_) => {
                    return Decision::Abort {
                        reason: AbortReason::Deadline,
                        outcome: Outcome::Ok,
                        detail_account_id: None,
                    };
                }
            }
        }
        Decision::Commit
    }

    /// Posts (commit) or voids (abort) on every shard of the plan, all shards at once, each
    /// retried until it succeeds; returns the seq each shard gave it. A single-shard transaction
    /// has no reservation: its batch is sent again, and the shard returns the stored outcome and
    /// seq of the first one.
    async fn settle(&self, transaction: &Transaction, decision: &Decision) -> BTreeMap<u32, u64> {
        if transaction.is_single_shard() {
            let group = &transaction.plan[0];
            let result = self
                .until_known(group.shard_id, self.batch_command(transaction))
                .await;
            return if result.seq > 0 {
                BTreeMap::from([(group.shard_id, result.seq)])
            } else {
                BTreeMap::new()
            };
        }
        let owner = Some(pb_owner(&self.owner()));
        let txn_id = transaction.txn_id.to_string();
        let (step, kind) = match decision {
            Decision::Commit => (
                "post",
                pb::command::Kind::Post(pb::Post {
                    txn_id: txn_id.clone(),
                    owner,
                }),
            ),
            Decision::Abort { .. } => (
                "void",
                pb::command::Kind::Void(pb::Void {
                    txn_id: txn_id.clone(),
                    owner,
                }),
            ),
        };
        let settling = transaction.plan.iter().map(|group| {
            let command = pb::Command {
                request_id: format!("{txn_id}/{step}/{}", group.shard_id),
                kind: Some(kind.clone()),
            };
            async move {
                (
                    group.shard_id,
                    self.until_known(group.shard_id, command).await,
                )
            }
        });
        let mut shard_seqs = BTreeMap::new();
        let mut settled = settling.collect::<futures::stream::FuturesUnordered<_>>();
        while let Some((shard_id, result)) = futures::StreamExt::next(&mut settled).await {
            // One shard settled, the others possibly not yet.
            crash::point("between-posts");
            if !outcome_of(&result).is_ok() {
                // A post or void of our own reservation cannot fail; this is a protocol bug.
                tracing::error!(%txn_id, shard = shard_id, outcome = result.outcome, "{step} was rejected");
            }
            if result.seq > 0 {
                shard_seqs.insert(shard_id, result.seq);
            }
        }
        shard_seqs
    }

    async fn execute(
        &self,
        shard_id: u32,
        command: pb::Command,
        deadline: Instant,
    ) -> Result<pb::CommandResult, Unknown> {
        match self.storage.shard(shard_id) {
            Some(client) => client.execute(command, deadline).await,
            None => Err(Unknown {
                last_error: format!("no storage shard {shard_id} in the topology"),
            }),
        }
    }

    /// Retries (same request id) until the shard gives a definite answer.
    async fn until_known(&self, shard_id: u32, command: pb::Command) -> pb::CommandResult {
        loop {
            match self
                .execute(shard_id, command.clone(), Instant::now() + ROUND)
                .await
            {
                Ok(result) => return result,
                Err(unknown) => {
                    self.retries.inc();
                    let request_id = &command.request_id;
                    tracing::warn!(shard = shard_id, error = %unknown, %request_id, "still unknown; retrying");
                }
            }
        }
    }
}
