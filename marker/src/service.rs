//! `wallet.marker.v1.Coordinator` and `CoordinatorAdmin`: submit, read and watch transactions,
//! answer stale-hold questions, and the operator's view of in-flight work.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use auticuro::convert;
use auticuro::ledger::{Outcome, TxnId, state::check_transaction_legs};
use consensus::{ProposeError, event_log, now_ms};
use futures::Stream;
use proto::common::v1::{ConsistencyToken, Redirect, ShardSeq};
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_admin_server::CoordinatorAdmin;
use proto::marker::v1::coordinator_server::Coordinator as CoordinatorRpc;
use tonic::{Request, Response, Status};

use crate::driver::Driver;
use crate::saga::{
    self, AbortReason, CoordinatorCommand, CoordinatorResponse, Decision, LifecycleKind,
    LoggedEvent, NewTransaction, Step, Transaction,
};
use crate::topology::{CoordinatorState, TopologyClient, state_message};

/// The longest a submit waits for the decision.
pub const SUBMIT_WAIT_MAX: Duration = Duration::from_secs(30);
/// The most submits in one `SubmitMany` call.
pub const SUBMIT_MANY_REQUESTS_MAX: usize = 1_024;
pub const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 128;
pub const TENANT_ID_LENGTH_MAX: usize = 64;
pub const LIST_IN_FLIGHT_LIMIT_MAX: u32 = 1_000;

#[derive(Clone)]
pub struct CoordinatorService {
    pub coordinator_shard_id: u32,
    pub driver: Arc<Driver>,
    /// How long reservations may take before the transaction is aborted.
    pub reserve_timeout: Duration,
    /// The topology group, when this shard runs under one.
    pub topology: Option<TopologyClient>,
}

/// How often a draining shard checks whether it has finished its work.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(200);

pub fn transaction_message(
    coordinator_shard_id: u32,
    transaction: &Transaction,
) -> pb::Transaction {
    pb::Transaction {
        idempotency_key: transaction.idempotency_key.clone(),
        tenant_id: transaction.tenant_id.clone(),
        legs: transaction.legs.iter().map(convert::pb_leg).collect(),
        metadata: convert::pb_metadata(&transaction.metadata),
        hold_id: convert::pb_optional_id(&transaction.hold_id),
        done: transaction.done,
        begun_at_ms: transaction.begun_at_ms,
        decided_at_ms: transaction.decided_at_ms.unwrap_or(0),
        ..progress_message(
            coordinator_shard_id,
            &transaction.txn_id,
            transaction.decision.as_ref(),
            &transaction.shard_seqs,
        )
    }
}

/// A lifecycle event's transaction: the whole record once begun; afterwards the id and only
/// what the step set (the contract's `CoordinatorEvent`).
fn logged_message(coordinator_shard_id: u32, event: &LoggedEvent) -> pb::Transaction {
    match &event.step {
        Step::Begun(transaction) => transaction_message(coordinator_shard_id, transaction),
        Step::Decided { txn_id, decision } => pb::Transaction {
            decided_at_ms: event.timestamp_ms,
            ..progress_message(
                coordinator_shard_id,
                txn_id,
                Some(decision),
                &BTreeMap::new(),
            )
        },
        Step::Done {
            txn_id,
            decision,
            shard_seqs,
        } => pb::Transaction {
            done: true,
            ..progress_message(coordinator_shard_id, txn_id, Some(decision), shard_seqs)
        },
    }
}

/// The id, the status that `decision` gives and the consistency token of `shard_seqs`; every
/// other field empty.
fn progress_message(
    coordinator_shard_id: u32,
    txn_id: &TxnId,
    decision: Option<&Decision>,
    shard_seqs: &BTreeMap<u32, u64>,
) -> pb::Transaction {
    let (status, abort_reason, outcome, detail) = match decision {
        None => (
            pb::TransactionStatus::Pending,
            pb::AbortReason::Unspecified,
            Outcome::Ok,
            None,
        ),
        Some(Decision::Commit) => (
            pb::TransactionStatus::Committed,
            pb::AbortReason::Unspecified,
            Outcome::Ok,
            None,
        ),
        Some(Decision::Abort {
            reason,
            outcome,
            detail_account_id,
        }) => {
            let reason = match reason {
                AbortReason::Rejected => pb::AbortReason::Rejected,
                AbortReason::Deadline => pb::AbortReason::Deadline,
                AbortReason::Forced => pb::AbortReason::Forced,
                AbortReason::ResolvedStale => pb::AbortReason::ResolvedStale,
            };
            (
                pb::TransactionStatus::Aborted,
                reason,
                *outcome,
                detail_account_id.as_ref(),
            )
        }
    };
    pb::Transaction {
        txn_id: txn_id.to_string(),
        status: status as i32,
        abort_reason: abort_reason as i32,
        outcome: convert::outcome(outcome) as i32,
        detail_account_id: detail.map(ToString::to_string).unwrap_or_default(),
        coordinator_shard_id,
        consistency_token: Some(ConsistencyToken {
            shard_seqs: shard_seqs
                .iter()
                .map(|(shard_id, seq)| ShardSeq {
                    shard_id: *shard_id,
                    seq: *seq,
                })
                .collect(),
        }),
        ..pb::Transaction::default()
    }
}

fn status_change(transaction: &pb::Transaction, timestamp_ms: i64) -> pb::TransactionStatusChange {
    pb::TransactionStatusChange {
        txn_id: transaction.txn_id.clone(),
        status: transaction.status,
        abort_reason: transaction.abort_reason,
        done: transaction.done,
        timestamp_ms,
    }
}

impl CoordinatorService {
    fn redirect(&self, leader_id: Option<u64>, leader_address: Option<String>) -> Redirect {
        consensus::redirect(self.coordinator_shard_id, leader_id, leader_address)
    }

    fn current_redirect(&self) -> Redirect {
        consensus::leader_redirect(self.coordinator_shard_id, &self.driver.raft)
    }

    fn message(&self, transaction: &Transaction) -> pb::Transaction {
        transaction_message(self.coordinator_shard_id, transaction)
    }

    /// The transaction's current record.
    fn transaction(&self, txn_id: &TxnId) -> Result<Option<Arc<Transaction>>, Status> {
        Ok(self.driver.transaction(txn_id)?)
    }

    /// Waits (bounded) until the transaction is decided, or done when `until_done`; returns its
    /// latest state.
    async fn wait_for(
        &self,
        txn_id: &TxnId,
        until_done: bool,
        wait: Duration,
    ) -> Result<Option<Arc<Transaction>>, Status> {
        let reached = |t: &Transaction| t.decision.is_some() && (t.done || !until_done);
        let waited = tokio::time::timeout(wait, async {
            loop {
                // Looked at and waited for under one read of the machine, so no step can come
                // in between unseen.
                let (current, next_step) = self.driver.machine.read_stored(|machine, view| {
                    let current = machine.transaction(view, txn_id)?;
                    let next_step = (!current.as_deref().is_some_and(reached))
                        .then(|| machine.next_step(txn_id));
                    Ok::<_, consensus::Error>((current, next_step))
                })?;
                let Some(next_step) = next_step else {
                    return Ok::<_, Status>(current);
                };
                // After the step, unless the state was replaced meanwhile: then read it again.
                if let Ok(after) = next_step.await
                    && reached(&after)
                {
                    return Ok(Some(after));
                }
            }
        })
        .await;
        match waited {
            Ok(reached) => reached,
            Err(_) => {
                self.driver
                    .machine
                    .read(|machine| machine.forget_abandoned(txn_id));
                self.transaction(txn_id)
            }
        }
    }

    /// Leadership confirmed with a quorum, or where to go instead.
    async fn ensure_leader(&self) -> Result<(), Redirect> {
        self.driver
            .raft
            .ensure_linearizable()
            .await
            .map(|_| ())
            .map_err(|_| self.current_redirect())
    }

    /// Decides abort unless a decision exists (which then stands), and drives the transaction
    /// to its end; `None` when the transaction was never begun here.
    async fn decide_abort(
        &self,
        txn_id: &TxnId,
        reason: AbortReason,
    ) -> Result<Option<Arc<Transaction>>, ProposeError> {
        let decision = Decision::Abort {
            reason,
            outcome: Outcome::Ok,
            detail_account_id: None,
        };
        let command = CoordinatorCommand::Decide {
            txn_id: txn_id.clone(),
            decision,
        };
        match self.driver.proposer.propose(command).await? {
            CoordinatorResponse::Transaction(transaction) => {
                self.driver.ensure_driving(txn_id);
                Ok(Some(transaction))
            }
            _ => Ok(None),
        }
    }

    /// This shard's state: from the topology, or always active without one.
    fn state(&self) -> CoordinatorState {
        match (
            &self.topology,
            self.driver.placement.borrow().entry.as_ref(),
        ) {
            (None, _) => CoordinatorState::Active,
            (Some(_), Some(entry)) => entry.state,
            // Not in the topology (yet): take no new work.
            (Some(_), None) => CoordinatorState::Removed,
        }
    }

    /// Once nothing is in flight here and no storage shard holds a leg of this shard, marks it
    /// removed in the topology.
    async fn finish_drain(self, topology: TopologyClient) {
        loop {
            tokio::time::sleep(DRAIN_CHECK_INTERVAL).await;
            let in_flight = self
                .driver
                .machine
                .read(|machine| machine.coordinator().in_flight_count());
            if in_flight > 0 || self.state() != CoordinatorState::Draining {
                continue;
            }
            let mut holds = 0;
            for shard in self.driver.storage.shards() {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                holds += shard
                    .count_holds(self.coordinator_shard_id, deadline)
                    .await
                    .unwrap_or(u64::MAX)
                    .min(1);
            }
            if holds > 0 {
                continue;
            }
            match topology
                .set_coordinator_state(self.coordinator_shard_id, CoordinatorState::Removed)
                .await
            {
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(%error, "marking the drained shard removed failed; retrying")
                }
            }
        }
    }

    fn parse_txn_id(text: &str) -> Result<TxnId, Status> {
        TxnId::parse(text).map_err(|_| Status::invalid_argument("invalid txn id"))
    }
}

fn valid_key(text: &str, length_max: usize) -> bool {
    !text.is_empty() && text.len() <= length_max && text.chars().all(|c| c.is_ascii_graphic())
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl CoordinatorService {
    /// One submit, as `Submit` answers it and as each of `SubmitMany`'s requests is answered.
    async fn submit_one(&self, request: pb::SubmitRequest) -> Result<pb::SubmitResponse, Status> {
        use pb::submit_response::Reply;
        let invalid = |outcome: Outcome| {
            Ok(pb::SubmitResponse {
                reply: Some(Reply::Invalid(convert::outcome(outcome) as i32)),
            })
        };
        if !valid_key(&request.tenant_id, TENANT_ID_LENGTH_MAX)
            || !valid_key(&request.idempotency_key, IDEMPOTENCY_KEY_LENGTH_MAX)
        {
            return invalid(Outcome::InvalidRequestId);
        }
        let legs = match convert::legs(&request.legs) {
            Ok(legs) => legs,
            Err(outcome) => return invalid(outcome),
        };
        let metadata = match convert::metadata(&request.metadata) {
            Ok(metadata) => metadata,
            Err(outcome) => return invalid(outcome),
        };
        if let Err(rejection) = check_transaction_legs(&legs) {
            return invalid(rejection.outcome);
        }
        let hold_id = match convert::optional_txn_id(&request.hold_id) {
            Ok(hold_id) => hold_id,
            Err(outcome) => return invalid(outcome),
        };
        // A capture has one debit: the leg that draws from the hold.
        if hold_id.is_some() && legs.iter().filter(|leg| leg.amount.0 < 0).count() != 1 {
            return invalid(Outcome::HoldMismatch);
        }
        if self.state() != CoordinatorState::Active {
            // Draining or removed: new work goes to an active shard. Transactions begun here
            // before still finish here; a retry of one is answered below from the log.
            let begun = self.transaction(&saga::txn_id_for(
                &request.tenant_id,
                &request.idempotency_key,
            ))?;
            if let Some(transaction) = begun {
                return Ok(pb::SubmitResponse {
                    reply: Some(Reply::Transaction(self.message(&transaction))),
                });
            }
            let version = self.driver.placement.borrow().topology_version;
            let reply = Reply::NotAccepting(pb::TopologyVersion { version });
            return Ok(pb::SubmitResponse { reply: Some(reply) });
        }
        let storage = &self.driver.storage;
        let new = NewTransaction {
            txn_id: saga::txn_id_for(&request.tenant_id, &request.idempotency_key),
            tenant_id: request.tenant_id,
            idempotency_key: request.idempotency_key,
            plan: saga::plan(&legs, |account| storage.shard_of(account)),
            legs,
            metadata,
            hold_id,
            reserve_timeout_ms: i64::try_from(self.reserve_timeout.as_millis()).unwrap_or(i64::MAX),
        };
        let txn_id = new.txn_id.clone();
        let transaction = match self
            .driver
            .proposer
            .propose(CoordinatorCommand::Begin(Box::new(new)))
            .await
        {
            Ok(CoordinatorResponse::Transaction(transaction)) => transaction,
            Ok(CoordinatorResponse::IdempotencyMismatch { txn_id }) => {
                let reply = Reply::IdempotencyMismatch(pb::IdempotencyMismatch {
                    txn_id: txn_id.to_string(),
                });
                return Ok(pb::SubmitResponse { reply: Some(reply) });
            }
            Ok(CoordinatorResponse::NotFound) => {
                return Err(Status::internal("begin found nothing"));
            }
            Err(ProposeError::NotLeader {
                leader_id,
                leader_address,
            }) => {
                let reply = Reply::Redirect(self.redirect(leader_id, leader_address));
                return Ok(pb::SubmitResponse { reply: Some(reply) });
            }
            Err(error) => return Err(Status::unavailable(error.to_string())),
        };
        crate::crash::point("after-begin");
        if !transaction.done {
            self.driver.ensure_driving(&txn_id);
        }
        let settled =
            transaction.decision.is_some() && (transaction.done || !request.wait_until_done);
        let transaction = if request.wait && !settled {
            let wait = Duration::from_millis(u64::from(request.wait_ms_max)).min(SUBMIT_WAIT_MAX);
            self.wait_for(&txn_id, request.wait_until_done, wait)
                .await?
                .unwrap_or(transaction)
        } else {
            transaction
        };
        Ok(pb::SubmitResponse {
            reply: Some(Reply::Transaction(self.message(&transaction))),
        })
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        self.submit_one(request.into_inner())
            .await
            .map(Response::new)
    }

    type SubmitManyStream = Boxed<pb::SubmitManyReply>;

    async fn submit_many(
        &self,
        request: Request<pb::SubmitManyRequest>,
    ) -> Result<Response<Self::SubmitManyStream>, Status> {
        use pb::submit_many_reply::Result as Answer;
        let requests = request.into_inner().requests;
        if requests.len() > SUBMIT_MANY_REQUESTS_MAX {
            return Err(Status::invalid_argument(format!(
                "at most {SUBMIT_MANY_REQUESTS_MAX} requests per call"
            )));
        }
        // Every submit runs at once; the stream gives each answer as it comes. One copy of
        // the service serves them all.
        let service = Arc::new(self.clone());
        let answers: futures::stream::FuturesUnordered<_> = requests
            .into_iter()
            .enumerate()
            .map(|(index, request)| {
                let service = service.clone();
                async move {
                    let result = match service.submit_one(request).await {
                        Ok(response) => Answer::Response(response),
                        Err(status) => Answer::Unknown(status.message().to_string()),
                    };
                    Ok(pb::SubmitManyReply {
                        index: index as u32,
                        result: Some(result),
                    })
                }
            })
            .collect();
        Ok(Response::new(Box::pin(answers)))
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::GetTransactionResponse>, Status> {
        use pb::get_transaction_response::Reply;
        let txn_id = Self::parse_txn_id(&request.get_ref().txn_id)?;
        if let Err(redirect) = self.ensure_leader().await {
            return Ok(Response::new(pb::GetTransactionResponse {
                reply: Some(Reply::Redirect(redirect)),
            }));
        }
        let reply = match self.transaction(&txn_id)? {
            Some(transaction) => Reply::Transaction(self.message(&transaction)),
            None => Reply::NotFound(true),
        };
        Ok(Response::new(pb::GetTransactionResponse {
            reply: Some(reply),
        }))
    }

    type WatchTransactionStream = Boxed<pb::TransactionStatusChange>;

    async fn watch_transaction(
        &self,
        request: Request<pb::WatchTransactionRequest>,
    ) -> Result<Response<Self::WatchTransactionStream>, Status> {
        let txn_id = Self::parse_txn_id(&request.get_ref().txn_id)?;
        let (current, from, applied) = self.driver.machine.read_stored(|machine, view| {
            (
                machine.transaction(view, &txn_id),
                machine.coordinator().last_seq() + 1,
                machine.subscribe_applied_seq(),
            )
        });
        let current = current?.ok_or_else(|| Status::not_found("no such transaction"))?;
        let shard_id = self.coordinator_shard_id;
        let first = self.message(&current);
        let finished = current.done;
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let mut events = event_log::stream(
            self.driver.machine.store(),
            applied,
            from,
            move |event: LoggedEvent| event,
        );
        tokio::spawn(async move {
            if sender
                .send(Ok(status_change(&first, now_ms())))
                .await
                .is_err()
                || finished
            {
                return;
            }
            while let Some(event) = events.recv().await {
                let event = match event {
                    Ok(event) => event,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                if event.step.txn_id() != &txn_id {
                    continue;
                }
                let message = logged_message(shard_id, &event);
                if sender
                    .send(Ok(status_change(&message, event.timestamp_ms)))
                    .await
                    .is_err()
                    || event.step.kind() == LifecycleKind::Done
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        use pb::resolve_response::Reply;
        let txn_id = Self::parse_txn_id(&request.get_ref().txn_id)?;
        // With no decision yet, the answer is to decide abort: a stale hold never waits forever.
        let status = match self.decide_abort(&txn_id, AbortReason::ResolvedStale).await {
            Ok(Some(transaction)) => self.message(&transaction).status,
            // Never begun here: nothing can ever commit it, so it is aborted.
            Ok(_) => pb::TransactionStatus::Aborted as i32,
            Err(ProposeError::NotLeader {
                leader_id,
                leader_address,
            }) => {
                let reply = Reply::Redirect(self.redirect(leader_id, leader_address));
                return Ok(Response::new(pb::ResolveResponse { reply: Some(reply) }));
            }
            Err(error) => return Err(Status::unavailable(error.to_string())),
        };
        let status =
            pb::TransactionStatus::try_from(status).unwrap_or(pb::TransactionStatus::Aborted);
        Ok(Response::new(pb::ResolveResponse {
            reply: Some(Reply::Decision(status as i32)),
        }))
    }

    type SubscribeStream = Boxed<pb::CoordinatorEvent>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let applied = self
            .driver
            .machine
            .read(|machine| machine.subscribe_applied_seq());
        let shard_id = self.coordinator_shard_id;
        let receiver = event_log::stream(
            self.driver.machine.store(),
            applied,
            request.into_inner().from_seq,
            move |event: LoggedEvent| pb::CoordinatorEvent {
                coordinator_shard_id: shard_id,
                seq: event.seq,
                timestamp_ms: event.timestamp_ms,
                kind: match event.step.kind() {
                    LifecycleKind::Begun => pb::LifecycleKind::Begun,
                    LifecycleKind::Decided => pb::LifecycleKind::Decided,
                    LifecycleKind::Done => pb::LifecycleKind::Done,
                } as i32,
                transaction: Some(logged_message(shard_id, &event)),
            },
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

#[tonic::async_trait]
impl CoordinatorAdmin for CoordinatorService {
    async fn status(
        &self,
        _: Request<pb::CoordinatorStatusRequest>,
    ) -> Result<Response<pb::CoordinatorStatusResponse>, Status> {
        let (in_flight, oldest, applied_seq) = self.driver.machine.read(|machine| {
            let coordinator = machine.coordinator();
            (
                coordinator.in_flight_count(),
                coordinator.in_flight().next().map(|t| t.begun_at_ms),
                coordinator.last_seq(),
            )
        });
        Ok(Response::new(pb::CoordinatorStatusResponse {
            coordinator_shard_id: self.coordinator_shard_id,
            state: state_message(self.state()) as i32,
            in_flight: in_flight as u64,
            oldest_in_flight_age_ms: oldest
                .map(|begun| now_ms().saturating_sub(begun))
                .unwrap_or(0),
            applied_seq,
        }))
    }

    async fn list_in_flight(
        &self,
        request: Request<pb::ListInFlightRequest>,
    ) -> Result<Response<pb::ListInFlightResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => LIST_IN_FLIGHT_LIMIT_MAX,
            limit => limit.min(LIST_IN_FLIGHT_LIMIT_MAX),
        } as usize;
        let now = now_ms();
        let transactions = self.driver.machine.read(|machine| {
            machine
                .coordinator()
                .in_flight()
                .take(limit)
                .map(|transaction| pb::InFlightTransaction {
                    transaction: Some(self.message(transaction)),
                    age_ms: now.saturating_sub(transaction.begun_at_ms),
                    attempts: 0,
                })
                .collect()
        });
        Ok(Response::new(pb::ListInFlightResponse { transactions }))
    }

    async fn retry(
        &self,
        request: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        use pb::admin_response::Reply;
        let txn_id = Self::parse_txn_id(&request.get_ref().txn_id)?;
        if let Err(redirect) = self.ensure_leader().await {
            return Ok(Response::new(pb::AdminResponse {
                reply: Some(Reply::Redirect(redirect)),
            }));
        }
        let reply = match self.transaction(&txn_id)? {
            Some(transaction) => {
                self.driver.ensure_driving(&txn_id);
                Reply::Transaction(self.message(&transaction))
            }
            None => Reply::NotFound(true),
        };
        Ok(Response::new(pb::AdminResponse { reply: Some(reply) }))
    }

    async fn force_abort(
        &self,
        request: Request<pb::ForceAbortRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        use pb::admin_response::Reply;
        let txn_id = Self::parse_txn_id(&request.get_ref().txn_id)?;
        let reply = match self.decide_abort(&txn_id, AbortReason::Forced).await {
            Ok(Some(transaction)) => {
                match transaction.decision {
                    Some(Decision::Abort {
                        reason: AbortReason::Forced,
                        ..
                    }) => Reply::Transaction(self.message(&transaction)),
                    // Only its batch's answer decides a single-shard transaction.
                    None => Reply::SingleShard(true),
                    // Decided before the operator asked: a decision never changes.
                    _ => Reply::AlreadyDecided(self.message(&transaction).status),
                }
            }
            Ok(_) => Reply::NotFound(true),
            Err(ProposeError::NotLeader {
                leader_id,
                leader_address,
            }) => Reply::Redirect(self.redirect(leader_id, leader_address)),
            Err(error) => return Err(Status::unavailable(error.to_string())),
        };
        Ok(Response::new(pb::AdminResponse { reply: Some(reply) }))
    }

    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let Some(topology) = self.topology.clone() else {
            return Err(Status::failed_precondition(
                "this coordinator shard runs without a topology",
            ));
        };
        // The state as the topology has it after this call (the local watch may lag behind).
        let state = match self.state() {
            CoordinatorState::Active => topology
                .set_coordinator_state(self.coordinator_shard_id, CoordinatorState::Draining)
                .await
                .map_err(Status::unavailable)?
                .coordinators
                .get(&self.coordinator_shard_id)
                .map_or(CoordinatorState::Removed, |entry| entry.state),
            other => other,
        };
        if state != CoordinatorState::Removed {
            tokio::spawn(self.clone().finish_drain(topology));
        }
        let in_flight = self
            .driver
            .machine
            .read(|machine| machine.coordinator().in_flight_count()) as u64;
        Ok(Response::new(pb::DrainResponse {
            state: state_message(state) as i32,
            in_flight,
        }))
    }
}
