//! A client of the storage shards: one [`ShardClient`] per shard (leader-following, retrying
//! unknown outcomes with the same request id, see [`consensus::client`]) and the slot table
//! that routes accounts to shards.

use std::time::{Duration, Instant};

use consensus::client::{Answer, LeaderClient, SharedCalls};
pub use consensus::client::{Unknown, channel};
use prost::Message;
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;

/// How long a `min_seq` read waits for the replica to catch up before answering `NotCaughtUp`.
pub const READ_WAIT_MS_MAX: u32 = 2_000;

type Queued = consensus::client::Queued<pb::Command, pb::CommandResult>;

pub struct ShardClient {
    /// Commands share `ExecuteMany` calls (the shard takes up to
    /// `service::EXECUTE_MANY_COMMANDS_MAX` in one).
    calls: SharedCalls<pb::Command, pb::CommandResult>,
}

impl ShardClient {
    pub fn new(shard_id: u32, replicas: Vec<String>) -> ShardClient {
        let group = LeaderClient::new(format!("shard {shard_id}"), replicas);
        ShardClient {
            calls: SharedCalls::new(group, pb::Command::encoded_len, |group, call, deadline| {
                Box::pin(async move { execute_many(&group, call, deadline).await })
            }),
        }
    }

    fn group(&self) -> &LeaderClient {
        &self.calls.group
    }

    pub fn replicas(&self) -> Vec<String> {
        self.group().replicas()
    }

    /// Replaces the replica addresses (after a membership change).
    pub fn set_replicas(&self, replicas: Vec<String>) {
        self.group().set_replicas(replicas);
    }

    /// The shared channel to one replica.
    pub fn channel(&self, address: &str) -> Result<tonic::transport::Channel, String> {
        self.group().channel(address)
    }

    /// Executes a command, retrying unknown outcomes with the same request id until `deadline`.
    /// Concurrent commands share calls: whatever queues while calls are in flight leaves in one
    /// `ExecuteMany`, so a busy client pays one round trip for many commands.
    pub async fn execute(
        &self,
        command: pb::Command,
        deadline: Instant,
    ) -> Result<pb::CommandResult, Unknown> {
        self.calls.send(command, deadline).await
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
        self.group()
            .on_leader(deadline, |channel, timeout| {
                let mut client = LedgerClient::new(channel);
                let mut request = tonic::Request::new(request.clone());
                request.set_timeout(timeout + Duration::from_millis(READ_WAIT_MS_MAX.into()));
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
        self.group()
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
        self.group()
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
        self.group()
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

/// One `ExecuteMany` call, following redirects until `deadline`; answers every command (an
/// unknown outcome sends it back to its caller's retry loop).
async fn execute_many(group: &LeaderClient, call: Vec<Queued>, deadline: Instant) {
    let commands = call.iter().map(|queued| queued.request.clone()).collect();
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
        Ok(results) if results.len() == call.len() => {
            for (queued, result) in call.into_iter().zip(results) {
                queued.answer(Ok(result));
            }
        }
        Ok(results) => {
            let last_error = format!("{} results for {} commands", results.len(), call.len());
            call.into_iter()
                .for_each(|queued| queued.unknown(&last_error));
        }
        Err(unknown) => call
            .into_iter()
            .for_each(|queued| queued.unknown(&unknown.last_error)),
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
