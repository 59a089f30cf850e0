//! A client of one storage shard: finds the leader, follows typed redirects, and retries an
//! unknown outcome (timeout, unreachable replica, overload) with the same request id until a
//! definite answer or the deadline. Because every command is idempotent by its request id, a
//! retry can never apply a command twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;
use tonic::transport::{Channel, Endpoint};

/// How long one attempt may take before it counts as unknown and is retried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause after an attempt that reached no leader, before the next one.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The outcome could not be learned before the deadline: the command may or may not have applied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("outcome unknown after retrying until the deadline: {last_error}")]
pub struct Unknown {
    pub last_error: String,
}

pub struct ShardClient {
    shard_id: u32,
    replicas: Mutex<Vec<String>>,
    channels: Mutex<HashMap<String, Channel>>,
    leader: Mutex<Option<String>>,
}

/// A lazily connecting channel with the platform's timeouts.
pub fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

impl ShardClient {
    pub fn new(shard_id: u32, replicas: Vec<String>) -> ShardClient {
        assert!(!replicas.is_empty(), "a shard has at least one replica");
        ShardClient {
            shard_id,
            replicas: Mutex::new(replicas),
            channels: Mutex::default(),
            leader: Mutex::default(),
        }
    }

    pub fn replicas(&self) -> Vec<String> {
        self.replicas.lock().expect("no poisoned lock").clone()
    }

    /// Replaces the replica addresses (after a membership change).
    pub fn set_replicas(&self, replicas: Vec<String>) {
        assert!(!replicas.is_empty(), "a shard has at least one replica");
        *self.replicas.lock().expect("no poisoned lock") = replicas;
        self.remember_leader(None);
    }

    /// One shared channel per replica address.
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().expect("no poisoned lock");
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = channel(address).map_err(|error| error.to_string())?;
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// A client of the replica believed to lead, or of any replica when none is known.
    pub fn ledger(&self, attempt: usize) -> Result<(String, LedgerClient<Channel>), String> {
        let address = self
            .leader
            .lock()
            .expect("no poisoned lock")
            .clone()
            .unwrap_or_else(|| {
                let replicas = self.replicas.lock().expect("no poisoned lock");
                replicas[attempt % replicas.len()].clone()
            });
        Ok((address.clone(), LedgerClient::new(self.channel(&address)?)))
    }

    fn remember_leader(&self, address: Option<String>) {
        *self.leader.lock().expect("no poisoned lock") = address;
    }

    /// Calls the leader (following redirects) until `call` gives an answer or `deadline`
    /// passes; a transport error or an unknown leader leads to the next replica after a pause.
    async fn on_leader<T, F, Fut>(&self, deadline: Instant, mut call: F) -> Result<T, Unknown>
    where
        F: FnMut(LedgerClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Answer<T>, tonic::Status>>,
    {
        let mut attempt = 0usize;
        let mut last_error = String::from("no attempt made");
        while Instant::now() < deadline {
            attempt += 1;
            let (address, client) = match self.ledger(attempt) {
                Ok(found) => found,
                Err(error) => {
                    last_error = error;
                    self.remember_leader(None);
                    continue;
                }
            };
            let timeout = ATTEMPT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            match call(client, timeout).await {
                Ok(Answer::Done(answer)) => {
                    self.remember_leader(Some(address));
                    return Ok(answer);
                }
                Ok(Answer::Redirect(Some(leader))) => {
                    last_error = format!("redirected by {address}");
                    self.remember_leader(Some(leader));
                    continue;
                }
                Ok(Answer::Redirect(None)) => last_error = format!("{address} knows no leader"),
                Ok(Answer::Empty) => last_error = format!("empty reply from {address}"),
                Err(status) => last_error = format!("{address}: {status}"),
            }
            self.remember_leader(None);
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(Unknown {
            last_error: format!("shard {}: {last_error}", self.shard_id),
        })
    }

    /// Executes a command, retrying unknown outcomes with the same request id until `deadline`.
    pub async fn execute(
        &self,
        command: pb::Command,
        deadline: Instant,
    ) -> Result<pb::CommandResult, Unknown> {
        self.on_leader(deadline, |mut client, timeout| {
            let mut request = tonic::Request::new(pb::ExecuteRequest {
                command: Some(command.clone()),
            });
            request.set_timeout(timeout);
            async move {
                Ok(match client.execute(request).await?.into_inner().reply {
                    Some(pb::execute_response::Reply::Result(result)) => Answer::Done(result),
                    Some(pb::execute_response::Reply::Redirect(redirect)) => {
                        Answer::Redirect(redirect.leader_address)
                    }
                    None => Answer::Empty,
                })
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
        self.on_leader(deadline, |mut client, timeout| {
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

/// What one call to a replica gave.
enum Answer<T> {
    Done(T),
    /// Not the leader; the leader's address when the replica knows it.
    Redirect(Option<String>),
    Empty,
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
