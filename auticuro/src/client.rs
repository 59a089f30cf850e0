//! A client of the storage shards: one [`ShardClient`] per shard (leader-following, retrying
//! unknown outcomes with the same request id, see [`consensus::client`]) and the slot table
//! that routes accounts to shards.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use consensus::batch::{BatchLimits, run_batches};
use consensus::client::{Answer, LeaderClient};
pub use consensus::client::{Unknown, channel};
use prost::Message;
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;
use tokio::sync::{mpsc, oneshot};

/// How long a `min_seq` read waits for the replica to catch up before answering `NotCaughtUp`.
pub const READ_WAIT_MS_MAX: u32 = 2_000;

/// The most `ExecuteMany` calls one client has in flight to its shard; commands that arrive
/// meanwhile queue and leave together in the next call.
const CALLS_IN_FLIGHT_MAX: usize = 2;
/// The most commands in one `ExecuteMany` call (the shard accepts up to
/// `service::EXECUTE_MANY_COMMANDS_MAX`).
const CALL_COMMANDS_MAX: usize = 256;
/// The most encoded command bytes in one call, well under the 4 MiB message limit.
const CALL_BYTES_MAX: usize = 1 << 20;
/// How long a call waits for more commands when another call is in flight.
const GATHER_WINDOW: Duration = Duration::from_micros(300);
/// The pause before resending commands whose call found no leader.
const RESEND_PAUSE: Duration = Duration::from_millis(20);

/// Where a queued command's caller waits for its result.
type Reply = oneshot::Sender<Result<pb::CommandResult, Unknown>>;

/// A command waiting for its `ExecuteMany` call.
struct Queued {
    command: pb::Command,
    deadline: Instant,
    reply: Reply,
}

pub struct ShardClient {
    group: Arc<LeaderClient>,
    /// The queue of commands to execute, started by the first `execute`.
    commands: OnceLock<mpsc::UnboundedSender<Queued>>,
}

impl ShardClient {
    pub fn new(shard_id: u32, replicas: Vec<String>) -> ShardClient {
        ShardClient {
            group: Arc::new(LeaderClient::new(format!("shard {shard_id}"), replicas)),
            commands: OnceLock::new(),
        }
    }

    pub fn replicas(&self) -> Vec<String> {
        self.group.replicas()
    }

    /// Replaces the replica addresses (after a membership change).
    pub fn set_replicas(&self, replicas: Vec<String>) {
        self.group.set_replicas(replicas);
    }

    /// The shared channel to one replica.
    pub fn channel(&self, address: &str) -> Result<tonic::transport::Channel, String> {
        self.group.channel(address)
    }

    /// Executes a command, retrying unknown outcomes with the same request id until `deadline`.
    /// Concurrent commands share calls: whatever queues while calls are in flight leaves in one
    /// `ExecuteMany`, so a busy client pays one round trip for many commands.
    pub async fn execute(
        &self,
        command: pb::Command,
        deadline: Instant,
    ) -> Result<pb::CommandResult, Unknown> {
        let queue = self.commands.get_or_init(|| {
            let (queue, commands) = mpsc::unbounded_channel();
            tokio::spawn(send_calls(self.group.clone(), commands));
            queue
        });
        let mut last_error = String::from("no attempt made");
        while Instant::now() < deadline {
            let (reply, answer) = oneshot::channel();
            let queued = Queued {
                command: command.clone(),
                deadline,
                reply,
            };
            if queue.send(queued).is_err() {
                break;
            }
            // Answered by the deadline even when the calls ahead of this one take longer: the
            // command may still be sent later, which its request id makes harmless.
            match tokio::time::timeout_at(deadline.into(), answer).await {
                Ok(Ok(Ok(result))) => return Ok(result),
                Ok(Ok(Err(unknown))) => last_error = unknown.last_error,
                Ok(Err(_)) => last_error = "the client was dropped".into(),
                Err(_) => last_error = "no answer by the deadline".into(),
            }
            tokio::time::sleep(RESEND_PAUSE).await;
        }
        Err(Unknown { last_error })
    }

    /// Reads an account on the leader: linearizable when `min_seq` is `None`, else once the
    /// leader has applied `min_seq` (bounded by `wait_ms_max`, then `NotCaughtUp`).
    pub async fn get_account(
        &self,
        account_id: &str,
        min_seq: Option<u64>,
        deadline: Instant,
    ) -> Result<pb::get_account_response::Reply, Unknown> {
        let consistency = match min_seq {
            Some(_) => pb::ReadConsistency::MinSeq,
            None => pb::ReadConsistency::Linearizable,
        };
        let request = pb::GetAccountRequest {
            account_id: account_id.to_string(),
            consistency: consistency as i32,
            min_seq: min_seq.unwrap_or(0),
            wait_ms_max: READ_WAIT_MS_MAX,
        };
        self.group
            .on_leader(deadline, |channel, timeout| {
                let mut client = LedgerClient::new(channel);
                let mut request = tonic::Request::new(request.clone());
                request.set_timeout(
                    timeout + std::time::Duration::from_millis(READ_WAIT_MS_MAX.into()),
                );
                async move {
                    use pb::get_account_response::Reply;
                    Ok(
                        match client.get_account(request).await?.into_inner().reply {
                            Some(Reply::Redirect(redirect)) => {
                                Answer::Redirect(redirect.leader_address)
                            }
                            Some(reply) => Answer::Done(reply),
                            None => Answer::Empty,
                        },
                    )
                }
            })
            .await
    }

    /// An authorization hold, read linearizably on the leader.
    pub async fn get_hold(
        &self,
        hold_id: &str,
        deadline: Instant,
    ) -> Result<Option<pb::Hold>, Unknown> {
        self.group
            .on_leader(deadline, |channel, timeout| {
                let mut client = LedgerClient::new(channel);
                let mut request = tonic::Request::new(pb::GetHoldRequest {
                    hold_id: hold_id.to_string(),
                });
                request.set_timeout(timeout);
                async move {
                    Ok(match client.get_hold(request).await?.into_inner().reply {
                        Some(pb::get_hold_response::Reply::Read(read)) => Answer::Done(read.hold),
                        Some(pb::get_hold_response::Reply::Redirect(redirect)) => {
                            Answer::Redirect(redirect.leader_address)
                        }
                        None => Answer::Empty,
                    })
                }
            })
            .await
    }

    /// A coordinator transaction's legs here and their state (`LEG_STATE_UNSPECIFIED` when the
    /// shard has never seen it), read on the leader.
    pub async fn transaction_legs(
        &self,
        txn_id: &str,
        deadline: Instant,
    ) -> Result<pb::TransactionLegs, Unknown> {
        self.group
            .on_leader(deadline, |channel, timeout| {
                let mut client = LedgerClient::new(channel);
                let mut request = tonic::Request::new(pb::GetTransactionLegsRequest {
                    txn_id: txn_id.to_string(),
                });
                request.set_timeout(timeout);
                async move {
                    use pb::get_transaction_legs_response::Reply;
                    Ok(
                        match client
                            .get_transaction_legs(request)
                            .await?
                            .into_inner()
                            .reply
                        {
                            Some(Reply::Legs(legs)) => Answer::Done(legs),
                            Some(Reply::Redirect(redirect)) => {
                                Answer::Redirect(redirect.leader_address)
                            }
                            None => Answer::Empty,
                        },
                    )
                }
            })
            .await
    }

    /// How many transactions of a coordinator still hold legs on this shard (asked of the
    /// leader, following redirects, until `deadline`).
    pub async fn count_holds(
        &self,
        coordinator_shard_id: u32,
        deadline: Instant,
    ) -> Result<u64, Unknown> {
        self.group
            .on_leader(deadline, |channel, timeout| {
                let mut client = LedgerClient::new(channel);
                let mut request = tonic::Request::new(pb::CountHoldsRequest {
                    coordinator_shard_id,
                });
                request.set_timeout(timeout);
                async move {
                    Ok(
                        match client.count_holds(request).await?.into_inner().reply {
                            Some(pb::count_holds_response::Reply::Held(held)) => Answer::Done(held),
                            Some(pb::count_holds_response::Reply::Redirect(redirect)) => {
                                Answer::Redirect(redirect.leader_address)
                            }
                            None => Answer::Empty,
                        },
                    )
                }
            })
            .await
    }
}

/// Takes the queued commands in calls of up to `CALL_COMMANDS_MAX`, at most
/// `CALLS_IN_FLIGHT_MAX` at once; ends when the client is dropped. With another call in flight,
/// a call waits `GATHER_WINDOW` for more: the call that freed its slot most likely answered
/// callers who are sending their next commands right now.
async fn send_calls(group: Arc<LeaderClient>, commands: mpsc::UnboundedReceiver<Queued>) {
    let limits = BatchLimits {
        in_flight_max: CALLS_IN_FLIGHT_MAX,
        items_max: CALL_COMMANDS_MAX,
        weight_max: CALL_BYTES_MAX,
        window: GATHER_WINDOW,
        window_only_when_busy: true,
    };
    let weight = |queued: &Queued| queued.command.encoded_len();
    run_batches(commands, limits, weight, |call| {
        let group = group.clone();
        async move { execute_many(&group, call).await }
    })
    .await;
}

/// One `ExecuteMany` call, following redirects until the soonest deadline among its commands;
/// answers every command (an unknown outcome sends it back to its caller's retry loop).
async fn execute_many(group: &LeaderClient, call: Vec<Queued>) {
    let now = Instant::now();
    let (call, expired): (Vec<Queued>, Vec<Queued>) =
        call.into_iter().partition(|queued| queued.deadline > now);
    let expired = expired.into_iter().map(|queued| queued.reply).collect();
    answer_all(expired, "the deadline passed while queued");
    let Some(deadline) = call.iter().map(|queued| queued.deadline).min() else {
        return;
    };
    let (commands, replies): (Vec<_>, Vec<_>) = call
        .into_iter()
        .map(|queued| (queued.command, queued.reply))
        .unzip();
    let request = pb::ExecuteManyRequest { commands };
    let results = group
        .on_leader(deadline, |channel, timeout| {
            let mut client = LedgerClient::new(channel);
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(timeout);
            async move {
                let mut results = Vec::new();
                for response in client.execute_many(request).await?.into_inner().responses {
                    match response.reply {
                        Some(pb::execute_response::Reply::Result(result)) => results.push(result),
                        // Not the leader (any more): the whole call goes again, which is safe
                        // for the commands that were applied (same request ids).
                        Some(pb::execute_response::Reply::Redirect(redirect)) => {
                            return Ok(Answer::Redirect(redirect.leader_address));
                        }
                        None => return Ok(Answer::Empty),
                    }
                }
                Ok(Answer::Done(results))
            }
        })
        .await;
    match results {
        Ok(results) if results.len() == replies.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Ok(results) => {
            let last_error = format!("{} results for {} commands", results.len(), replies.len());
            answer_all(replies, &last_error)
        }
        Err(unknown) => answer_all(replies, &unknown.last_error),
    }
}

fn answer_all(replies: Vec<Reply>, last_error: &str) {
    for reply in replies {
        let _ = reply.send(Err(Unknown {
            last_error: last_error.to_string(),
        }));
    }
}

/// Every storage shard and the slot table that routes accounts to them.
pub struct StorageShards {
    slots: crate::routing::SlotTable,
    shards: std::collections::BTreeMap<u32, ShardClient>,
}

impl StorageShards {
    /// Shards with their replica addresses; slots dealt evenly over them.
    pub fn new(shards: std::collections::BTreeMap<u32, Vec<String>>) -> StorageShards {
        let ids: Vec<u32> = shards.keys().copied().collect();
        let slots = crate::routing::SlotTable::uniform(&ids);
        let shards = shards
            .into_iter()
            .map(|(id, replicas)| (id, ShardClient::new(id, replicas)))
            .collect();
        StorageShards { slots, shards }
    }

    /// Follows replica changes of known shards (a replaced or added replica). The set of shards
    /// and the slot table stay as they were: moving slots between shards is not supported.
    pub fn update_replicas(&self, shards: &std::collections::BTreeMap<u32, Vec<String>>) {
        for (shard_id, replicas) in shards {
            if let Some(client) = self.shards.get(shard_id)
                && !replicas.is_empty()
                && client.replicas() != *replicas
            {
                client.set_replicas(replicas.clone());
            }
        }
    }

    pub fn shard_of(&self, account_id: &crate::ledger::AccountId) -> u32 {
        self.slots.shard_of(account_id)
    }

    pub fn shard(&self, shard_id: u32) -> Option<&ShardClient> {
        self.shards.get(&shard_id)
    }

    pub fn shards(&self) -> impl Iterator<Item = &ShardClient> {
        self.shards.values()
    }
}

/// Parses `ID=ADDRESS,ADDRESS,…` (one storage shard and its replicas), as flags give them.
pub fn parse_shard_spec(spec: &str) -> Result<(u32, Vec<String>), String> {
    let (id, addresses) = spec
        .split_once('=')
        .ok_or_else(|| format!("expected ID=ADDRESS,…, got {spec:?}"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("bad shard id in {spec:?}"))?;
    let addresses: Vec<String> = addresses
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() {
        return Err(format!("no replica address in {spec:?}"));
    }
    Ok((id, addresses))
}
