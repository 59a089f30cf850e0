//! Carries transactions to their outcome on the storage shards: runs `protocol::Drive` against
//! the real shards and the Raft log. Runs on the coordinator leader only; every step is
//! idempotent (deterministic request ids), so a new leader simply re-drives everything in
//! flight from the log, and a resend after a timeout is always safe.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auticuro::client::{StorageShards, Unknown};
use auticuro::convert::pb_command;
use auticuro::ledger::{Outcome, Owner, TxnId};
use consensus::{ProposeError, Proposer, Raft, StateMachineStore, now_ms};
use prometheus_client::metrics::counter::Counter;
use proto::auticuro::v1 as pb;

use crate::crash;
use crate::machine::CoordinatorMachine;
use crate::protocol::{Answer, Drive, Step};
use crate::saga::{CoordinatorCommand, CoordinatorResponse, Transaction};
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

fn answer_of(result: &pb::CommandResult) -> Answer {
    Answer {
        outcome: Outcome::from_number(result.outcome).unwrap_or(Outcome::InvalidRequestId),
        seq: result.seq,
        detail_account_id: auticuro::ledger::AccountId::parse(&result.detail_account_id).ok(),
    }
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

    /// The transaction's current record, shared (no copy) while it is in flight.
    pub(crate) fn transaction(
        &self,
        txn_id: &TxnId,
    ) -> Result<Option<Arc<Transaction>>, consensus::Error> {
        self.machine
            .read_stored(|machine, view| machine.transaction(view, txn_id))
    }

    async fn drive(&self, txn_id: &TxnId) -> Result<(), Stop> {
        let mut drive = Drive::default();
        loop {
            let transaction = self
                .transaction(txn_id)
                .map_err(|error| Stop::Unavailable(error.to_string()))?;
            let Some(transaction) = transaction else {
                return Ok(());
            };
            let cross_shard = !transaction.is_single_shard();
            match drive.next(&transaction, self.owner()) {
                Step::Finished => return Ok(()),
                Step::Execute {
                    shard_id,
                    command,
                    deadline_ms,
                } => {
                    let command = pb_command(&command);
                    let answer = match deadline_ms {
                        None => Some(self.until_known(shard_id, command).await),
                        Some(deadline_ms) => {
                            let remaining_ms = deadline_ms.saturating_sub(now_ms()).max(0) as u64;
                            let deadline = Instant::now() + Duration::from_millis(remaining_ms);
                            self.execute(shard_id, command, deadline).await.ok()
                        }
                    };
                    match answer.as_ref().map(answer_of) {
                        Some(answer) => {
                            drive.answered(&transaction, shard_id, &answer);
                            if cross_shard && answer.outcome.is_ok() {
                                crash::point(format_args!("after-reserve-{}", drive.reserved()));
                            }
                        }
                        None => drive.expired(),
                    }
                }
                Step::Settle(commands) => {
                    let settling = commands.into_iter().map(|(shard_id, command)| async move {
                        let request_id = command.request_id.to_string();
                        let result = self.until_known(shard_id, pb_command(&command)).await;
                        (shard_id, request_id, answer_of(&result))
                    });
                    let mut settled = settling.collect::<futures::stream::FuturesUnordered<_>>();
                    while let Some((shard_id, request_id, answer)) =
                        futures::StreamExt::next(&mut settled).await
                    {
                        if cross_shard {
                            // One shard settled, the others possibly not yet.
                            crash::point("between-posts");
                            if !answer.outcome.is_ok() {
                                // Posting or voiding our own reservation cannot be refused:
                                // a protocol bug.
                                tracing::error!(%request_id, shard = shard_id, outcome = ?answer.outcome, "settling was refused");
                            }
                        }
                        drive.settled(shard_id, &answer);
                    }
                }
                Step::Propose(commands) => {
                    let decides = commands
                        .iter()
                        .any(|command| matches!(command, CoordinatorCommand::Decide { .. }));
                    if cross_shard && !decides {
                        crash::point("before-done");
                    }
                    // Queued in order, so they are written in order unless a proposal fails
                    // (then the loop proposes what is still missing).
                    let proposed = commands
                        .into_iter()
                        .map(|command| self.proposer.propose(command));
                    let written = futures::future::try_join_all(proposed).await?;
                    if cross_shard && decides {
                        crash::point("after-decide");
                    }
                    let done = |response: &CoordinatorResponse| matches!(response, CoordinatorResponse::Transaction(t) if t.done);
                    if written.iter().any(done) {
                        return Ok(());
                    }
                }
            }
        }
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
