//! `wallet.auticuro.v1.Ledger`: commands go through group commit on the leader; reads are
//! linearizable on the leader or `min_seq`-bounded on any replica; events stream from any replica.

use std::pin::Pin;
use std::time::Duration;

use consensus::{ProposeError, Proposer, Raft, StateMachineStore, event_log};
use futures::{Stream, StreamExt as _};
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_server::Ledger as LedgerRpc;
use proto::common::v1::Redirect;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::events::StoredEvent;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::ledger::{AccountId, Command, CommandKind, LegState, TxnId};
use crate::machine::LedgerMachine;

/// The longest a `min_seq` read waits for the replica to catch up.
pub const READ_WAIT_MAX: Duration = Duration::from_secs(5);
/// The most commands one `ExecuteMany` call carries.
pub const EXECUTE_MANY_COMMANDS_MAX: usize = 1_024;
/// The most events one `ReadEvents` call returns.
pub const READ_EVENTS_LIMIT_MAX: u32 = 10_000;

pub struct LedgerService {
    pub shard_id: u32,
    pub raft: Raft<LedgerMachine>,
    pub machine: StateMachineStore<LedgerMachine>,
    pub proposer: Proposer<LedgerMachine>,
    pub commands: CommandCounter,
}

/// Commands answered by this replica, by command kind and outcome.
pub type CommandCounter = Family<Vec<(&'static str, String)>, Counter>;

pub fn register_metrics(registry: &mut Registry) -> CommandCounter {
    let commands = CommandCounter::default();
    registry.register(
        "commands",
        "Ledger commands answered, by kind and outcome",
        commands.clone(),
    );
    commands
}

fn kind_label(command: &Command) -> &'static str {
    match command.kind {
        CommandKind::CreateAccount { .. } => "create_account",
        CommandKind::UpdateLimits { .. } => "update_limits",
        CommandKind::Freeze { .. } => "freeze",
        CommandKind::Unfreeze { .. } => "unfreeze",
        CommandKind::Close { .. } => "close",
        CommandKind::Transfer { .. } => "transfer",
        CommandKind::Batch { .. } => "batch",
        CommandKind::Reserve { .. } => "reserve",
        CommandKind::Post { .. } => "post",
        CommandKind::Void { .. } => "void",
        CommandKind::PlaceHold { .. } => "place_hold",
        CommandKind::VoidHold { .. } => "void_hold",
        CommandKind::PruneDedup { .. } => "prune_dedup",
        CommandKind::FenceCoordinator { .. } => "fence_coordinator",
    }
}

impl LedgerService {
    /// Validates, replicates and applies one command; a malformed one gets its typed outcome
    /// without reaching Raft.
    async fn execute_one(
        &self,
        command: Option<&pb::Command>,
    ) -> Result<pb::ExecuteResponse, Status> {
        let command = match convert::command(command) {
            Ok(command) => command,
            Err(invalid) => {
                self.count("invalid", invalid);
                let reply = pb::execute_response::Reply::Result(convert::rejection(invalid));
                return Ok(pb::ExecuteResponse { reply: Some(reply) });
            }
        };
        let kind = kind_label(&command);
        let reply = match self.proposer.propose(command).await {
            Ok(result) => {
                self.count(kind, result.outcome);
                pb::execute_response::Reply::Result(convert::command_result(&result))
            }
            Err(ProposeError::NotLeader {
                leader_id,
                leader_address,
            }) => pb::execute_response::Reply::Redirect(self.redirect(leader_id, leader_address)),
            Err(ProposeError::Overloaded) => {
                return Err(Status::resource_exhausted("overloaded, retry later"));
            }
            Err(ProposeError::Unavailable(message)) => return Err(Status::unavailable(message)),
        };
        Ok(pb::ExecuteResponse { reply: Some(reply) })
    }

    fn count(&self, kind: &'static str, outcome: crate::ledger::Outcome) {
        self.commands
            .get_or_create(&vec![
                ("kind", kind.to_owned()),
                ("outcome", format!("{outcome:?}")),
            ])
            .inc();
    }

    fn redirect(&self, leader_id: Option<u64>, leader_address: Option<String>) -> Redirect {
        consensus::redirect(self.shard_id, leader_id, leader_address)
    }

    fn current_redirect(&self) -> Redirect {
        consensus::leader_redirect(self.shard_id, &self.raft)
    }

    /// Waits (bounded) until this replica has applied `min_seq`; returns the applied seq.
    async fn wait_for_seq(&self, min_seq: u64, wait: Duration) -> Result<u64, u64> {
        let mut applied = self.machine.read(|machine| machine.subscribe_applied_seq());
        let reached = tokio::time::timeout(wait, applied.wait_for(|seq| *seq >= min_seq))
            .await
            .is_ok_and(|r| r.is_ok());
        let current = *applied.borrow();
        if reached { Ok(current) } else { Err(current) }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl LedgerRpc for LedgerService {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        Ok(Response::new(
            self.execute_one(request.get_ref().command.as_ref()).await?,
        ))
    }

    async fn execute_many(
        &self,
        request: Request<pb::ExecuteManyRequest>,
    ) -> Result<Response<pb::ExecuteManyResponse>, Status> {
        let commands = &request.get_ref().commands;
        if commands.len() > EXECUTE_MANY_COMMANDS_MAX {
            return Err(Status::invalid_argument(format!(
                "at most {EXECUTE_MANY_COMMANDS_MAX} commands per call"
            )));
        }
        // Proposed concurrently, so group commit packs them into as few Raft entries as it can.
        let results = futures::future::join_all(
            commands
                .iter()
                .map(|command| self.execute_one(Some(command))),
        )
        .await;
        let responses = results.into_iter().collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(pb::ExecuteManyResponse { responses }))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        use pb::get_account_response::Reply;
        let request = request.into_inner();
        let account_id = AccountId::parse(&request.account_id)
            .map_err(|_| Status::invalid_argument("invalid account id"))?;
        match pb::ReadConsistency::try_from(request.consistency)
            .unwrap_or(pb::ReadConsistency::Unspecified)
        {
            pb::ReadConsistency::MinSeq => {
                let wait = Duration::from_millis(u64::from(request.wait_ms_max)).min(READ_WAIT_MAX);
                if let Err(applied_seq) = self.wait_for_seq(request.min_seq, wait).await {
                    let not_caught_up = pb::NotCaughtUp {
                        applied_seq,
                        min_seq: request.min_seq,
                    };
                    return Ok(Response::new(pb::GetAccountResponse {
                        reply: Some(Reply::NotCaughtUp(not_caught_up)),
                    }));
                }
            }
            _ => {
                // Linearizable: confirm leadership with a quorum, then wait until applied.
                if let Err(error) = self.raft.ensure_linearizable().await {
                    return match error.forward_to_leader() {
                        Some(forward) => {
                            let redirect = self.redirect(
                                forward.leader_id,
                                forward.leader_node.clone().map(|node| node.addr),
                            );
                            Ok(Response::new(pb::GetAccountResponse {
                                reply: Some(Reply::Redirect(redirect)),
                            }))
                        }
                        None => Err(Status::unavailable(error.to_string())),
                    };
                }
            }
        }
        let (account, applied_seq) = self.machine.read(|machine| {
            (
                machine.ledger().account(&account_id).map(convert::account),
                machine.ledger().last_seq(),
            )
        });
        let read = pb::AccountRead {
            account,
            applied_seq,
        };
        Ok(Response::new(pb::GetAccountResponse {
            reply: Some(Reply::Read(read)),
        }))
    }

    async fn get_transaction_legs(
        &self,
        request: Request<pb::GetTransactionLegsRequest>,
    ) -> Result<Response<pb::GetTransactionLegsResponse>, Status> {
        let txn_id = TxnId::parse(&request.get_ref().txn_id)
            .map_err(|_| Status::invalid_argument("invalid txn id"))?;
        if self.raft.ensure_linearizable().await.is_err() {
            let redirect = self.current_redirect();
            let reply = pb::get_transaction_legs_response::Reply::Redirect(redirect);
            return Ok(Response::new(pb::GetTransactionLegsResponse {
                reply: Some(reply),
            }));
        }
        let record = self
            .machine
            .read_stored(|machine, view| machine.transaction(view, &txn_id))?;
        let legs = match record {
            None => pb::TransactionLegs {
                txn_id: txn_id.to_string(),
                ..Default::default()
            },
            Some(record) => pb::TransactionLegs {
                txn_id: txn_id.to_string(),
                owner: Some(pb::Owner {
                    coordinator_shard_id: record.owner.coordinator_shard_id,
                    epoch: record.owner.epoch,
                }),
                state: match record.state {
                    LegState::Held => pb::LegState::Held,
                    LegState::Posted => pb::LegState::Posted,
                    LegState::Voided => pb::LegState::Voided,
                    LegState::Tombstone => pb::LegState::Tombstone,
                } as i32,
                legs: record
                    .legs
                    .iter()
                    .map(|leg| pb::Leg {
                        account_id: leg.account_id.to_string(),
                        amount: Some(convert::pb_amount(leg.amount)),
                        currency: leg.currency.to_string(),
                    })
                    .collect(),
                reserved_at_ms: record.at_ms,
            },
        };
        let reply = pb::get_transaction_legs_response::Reply::Legs(legs);
        Ok(Response::new(pb::GetTransactionLegsResponse {
            reply: Some(reply),
        }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Served by `events::LedgerRoutes` without decoding; this is the same stream decoded.
        let from = request.into_inner().from_seq;
        let events = crate::events::stream(self.shard_id, &self.machine, from);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(events).map(|event| {
                event?
                    .decode()
                    .map_err(|error| Status::internal(error.to_string()))
            }),
        )))
    }

    async fn count_holds(
        &self,
        request: Request<pb::CountHoldsRequest>,
    ) -> Result<Response<pb::CountHoldsResponse>, Status> {
        use pb::count_holds_response::Reply;
        if self.raft.ensure_linearizable().await.is_err() {
            let reply = Reply::Redirect(self.current_redirect());
            return Ok(Response::new(pb::CountHoldsResponse { reply: Some(reply) }));
        }
        let coordinator_shard_id = request.into_inner().coordinator_shard_id;
        let held = self
            .machine
            .read(|machine| machine.ledger().holds_owned_by(coordinator_shard_id));
        Ok(Response::new(pb::CountHoldsResponse {
            reply: Some(Reply::Held(held as u64)),
        }))
    }

    async fn get_hold(
        &self,
        request: Request<pb::GetHoldRequest>,
    ) -> Result<Response<pb::GetHoldResponse>, Status> {
        use pb::get_hold_response::Reply;
        let hold_id = TxnId::parse(&request.get_ref().hold_id)
            .map_err(|_| Status::invalid_argument("invalid hold id"))?;
        if self.raft.ensure_linearizable().await.is_err() {
            let reply = Reply::Redirect(self.current_redirect());
            return Ok(Response::new(pb::GetHoldResponse { reply: Some(reply) }));
        }
        let (hold, applied_seq) = self.machine.read_stored(|machine, view| {
            (machine.hold(view, &hold_id), machine.ledger().last_seq())
        });
        let read = pb::HoldRead {
            hold: hold?.map(|hold| convert::hold(&hold_id, &hold)),
            applied_seq,
        };
        Ok(Response::new(pb::GetHoldResponse {
            reply: Some(Reply::Read(read)),
        }))
    }

    async fn read_events(
        &self,
        request: Request<pb::ReadEventsRequest>,
    ) -> Result<Response<pb::ReadEventsResponse>, Status> {
        let request = request.into_inner();
        let limit = if request.limit == 0 {
            READ_EVENTS_LIMIT_MAX
        } else {
            request.limit.min(READ_EVENTS_LIMIT_MAX)
        };
        let to = if request.to_seq == 0 {
            u64::MAX
        } else {
            request.to_seq
        };
        let applied_seq = self.machine.read(|machine| machine.ledger().last_seq());
        let events = event_log::read_stored(
            &self.machine.store().view(),
            request.from_seq.max(1),
            to.min(applied_seq),
            limit as usize,
        )?
        .into_iter()
        .map(|(_, stored)| {
            let shard_id = self.shard_id;
            StoredEvent { shard_id, stored }.decode()
        })
        .collect::<Result<_, _>>()
        .map_err(|error| Status::internal(error.to_string()))?;
        Ok(Response::new(pb::ReadEventsResponse {
            events,
            applied_seq,
        }))
    }
}
