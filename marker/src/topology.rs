//! The platform topology: storage shards with their replicas, and coordinator shards with their
//! state (`Active | Draining | Removed`) and epoch. One small Raft group holds it; every service
//! reads and watches it. Changes are compare-and-set on the version, so concurrent operators
//! never lose each other's updates.

use std::collections::BTreeMap;
use std::pin::Pin;

use consensus::{App, AppView, Error, ProposeError, Proposer, Writes};
use futures::Stream;
use proto::marker::v1 as pb;
use proto::marker::v1::topology_service_client::TopologyServiceClient;
use proto::marker::v1::topology_service_server::TopologyService;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

const TOPOLOGY: &str = "topology";
const CURRENT: &[u8] = b"current";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorState {
    Active,
    Draining,
    Removed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorEntry {
    pub state: CoordinatorState,
    /// Raised on every state change; storage shards fence a removed coordinator's epochs.
    pub epoch: u64,
    pub replicas: Vec<String>,
}

/// What a coordinator shard knows of itself from the topology.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The topology version this was read from (0 before the first one arrives).
    pub topology_version: u64,
    /// This shard's entry; none when run without a topology or not (yet) in it.
    pub entry: Option<CoordinatorEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub version: u64,
    pub storage_shards: BTreeMap<u32, Vec<String>>,
    pub coordinators: BTreeMap<u32, CoordinatorEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replace {
    pub expected_version: u64,
    pub topology: Topology,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplaceResult {
    Replaced(Topology),
    VersionConflict(u64),
}

fn read_topology(store: &AppView<'_>) -> Result<Topology, Error> {
    Ok(store
        .get_decoded(TOPOLOGY, CURRENT, "topology")?
        .unwrap_or_default())
}

/// The topology as a Raft application: a compare-and-set register.
pub struct TopologyMachine {
    current: watch::Sender<Topology>,
}

impl TopologyMachine {
    pub fn current(&self) -> Topology {
        self.current.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Topology> {
        self.current.subscribe()
    }
}

impl App for TopologyMachine {
    type Request = Replace;
    type Response = ReplaceResult;

    const COLUMN_FAMILIES: &'static [&'static str] = &[TOPOLOGY];

    fn load(store: &AppView<'_>) -> Result<Self, Error> {
        Ok(TopologyMachine {
            current: watch::channel(read_topology(store)?).0,
        })
    }

    fn apply(
        &mut self,
        request: &Replace,
        _timestamp_ms: i64,
        writes: &mut Writes<'_>,
    ) -> ReplaceResult {
        let version = self.current.borrow().version;
        if request.expected_version != version {
            return ReplaceResult::VersionConflict(version);
        }
        let topology = Topology {
            version: version + 1,
            ..request.topology.clone()
        };
        writes.put_encoded(TOPOLOGY, CURRENT, &topology);
        self.current.send_replace(topology.clone());
        ReplaceResult::Replaced(topology)
    }

    /// Reads the installed topology; watchers keep their watch.
    fn installed(&mut self, view: &AppView<'_>) -> Result<(), Error> {
        self.current.send_replace(read_topology(view)?);
        Ok(())
    }

    fn digest(&self, _: &AppView<'_>) -> Result<[u8; 32], Error> {
        Ok(auticuro::ledger::state::fingerprint(&self.current()))
    }

    fn applied_seq(&self) -> u64 {
        self.current.borrow().version
    }
}

// ---- Protobuf ----

pub fn state_message(state: CoordinatorState) -> pb::CoordinatorShardState {
    match state {
        CoordinatorState::Active => pb::CoordinatorShardState::Active,
        CoordinatorState::Draining => pb::CoordinatorShardState::Draining,
        CoordinatorState::Removed => pb::CoordinatorShardState::Removed,
    }
}

fn replicas_message(addresses: &[String]) -> Vec<pb::Replica> {
    addresses
        .iter()
        .enumerate()
        .map(|(index, address)| pb::Replica {
            node_id: index as u64 + 1,
            address: address.clone(),
        })
        .collect()
}

pub fn topology_message(topology: &Topology) -> pb::Topology {
    let shard_ids: Vec<u32> = topology.storage_shards.keys().copied().collect();
    let slot_owner = if shard_ids.is_empty() {
        Vec::new()
    } else {
        auticuro::routing::SlotTable::uniform(&shard_ids)
            .owners()
            .to_vec()
    };
    pb::Topology {
        version: topology.version,
        slot_owner,
        storage_shards: topology
            .storage_shards
            .iter()
            .map(|(shard_id, replicas)| pb::StorageShard {
                shard_id: *shard_id,
                replicas: replicas_message(replicas),
            })
            .collect(),
        coordinator_shards: topology
            .coordinators
            .iter()
            .map(|(id, entry)| pb::CoordinatorShard {
                coordinator_shard_id: *id,
                state: state_message(entry.state) as i32,
                epoch: entry.epoch,
                replicas: replicas_message(&entry.replicas),
            })
            .collect(),
    }
}

pub fn topology_from_message(message: &pb::Topology) -> Result<Topology, String> {
    let addresses = |replicas: &[pb::Replica]| {
        replicas
            .iter()
            .map(|replica| replica.address.clone())
            .collect::<Vec<_>>()
    };
    let mut coordinators = BTreeMap::new();
    for shard in &message.coordinator_shards {
        let state = match pb::CoordinatorShardState::try_from(shard.state) {
            Ok(pb::CoordinatorShardState::Active) => CoordinatorState::Active,
            Ok(pb::CoordinatorShardState::Draining) => CoordinatorState::Draining,
            Ok(pb::CoordinatorShardState::Removed) => CoordinatorState::Removed,
            _ => {
                return Err(format!(
                    "coordinator shard {} has no state",
                    shard.coordinator_shard_id
                ));
            }
        };
        coordinators.insert(
            shard.coordinator_shard_id,
            CoordinatorEntry {
                state,
                epoch: shard.epoch,
                replicas: addresses(&shard.replicas),
            },
        );
    }
    let storage_shards = message
        .storage_shards
        .iter()
        .map(|shard| (shard.shard_id, addresses(&shard.replicas)))
        .collect();
    Ok(Topology {
        version: message.version,
        storage_shards,
        coordinators,
    })
}

// ---- Service ----

pub struct TopologyServer {
    pub group_id: u32,
    pub machine: consensus::StateMachineStore<TopologyMachine>,
    pub proposer: Proposer<TopologyMachine>,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl TopologyService for TopologyServer {
    async fn get_topology(
        &self,
        _: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::Topology>, Status> {
        Ok(Response::new(topology_message(
            &self.machine.read(TopologyMachine::current),
        )))
    }

    type WatchTopologyStream = Boxed<pb::Topology>;

    async fn watch_topology(
        &self,
        request: Request<pb::WatchTopologyRequest>,
    ) -> Result<Response<Self::WatchTopologyStream>, Status> {
        let mut after = request.into_inner().after_version;
        let mut current = self.machine.read(TopologyMachine::subscribe);
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let topology = match current.wait_for(|topology| topology.version > after).await {
                    Ok(topology) => topology.clone(),
                    Err(_) => return,
                };
                after = topology.version;
                if sender.send(Ok(topology_message(&topology))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn update_topology(
        &self,
        request: Request<pb::UpdateTopologyRequest>,
    ) -> Result<Response<pb::UpdateTopologyResponse>, Status> {
        use pb::update_topology_response::Reply;
        let request = request.into_inner();
        let message = request
            .topology
            .ok_or_else(|| Status::invalid_argument("topology is required"))?;
        let topology = topology_from_message(&message).map_err(Status::invalid_argument)?;
        let reply = match self
            .proposer
            .propose(Replace {
                expected_version: request.expected_version,
                topology,
            })
            .await
        {
            Ok(ReplaceResult::Replaced(topology)) => Reply::Topology(topology_message(&topology)),
            Ok(ReplaceResult::VersionConflict(version)) => Reply::VersionConflict(version),
            Err(ProposeError::NotLeader {
                leader_id,
                leader_address,
            }) => Reply::Redirect(consensus::redirect(
                self.group_id,
                leader_id,
                leader_address,
            )),
            Err(error) => return Err(Status::unavailable(error.to_string())),
        };
        Ok(Response::new(pb::UpdateTopologyResponse {
            reply: Some(reply),
        }))
    }
}

// ---- Client ----

/// A client of the topology group: any replica serves reads; updates follow redirects.
#[derive(Clone)]
pub struct TopologyClient {
    replicas: Vec<String>,
}

impl TopologyClient {
    pub fn new(replicas: Vec<String>) -> TopologyClient {
        TopologyClient { replicas }
    }

    fn client(address: &str) -> Result<TopologyServiceClient<tonic::transport::Channel>, String> {
        auticuro::client::channel(address)
            .map(TopologyServiceClient::new)
            .map_err(|error| error.to_string())
    }

    pub async fn get(&self) -> Result<Topology, String> {
        let mut last_error = String::from("no replica");
        for address in &self.replicas {
            match Self::client(address)?
                .get_topology(pb::GetTopologyRequest {})
                .await
            {
                Ok(reply) => return topology_from_message(&reply.into_inner()),
                Err(status) => last_error = status.to_string(),
            }
        }
        Err(last_error)
    }

    /// Applies `change` to the current topology with compare-and-set, retrying on conflicts.
    pub async fn update(
        &self,
        change: impl Fn(&mut Topology) -> Result<(), String>,
    ) -> Result<Topology, String> {
        for _ in 0..50 {
            let mut topology = self.get().await?;
            let expected_version = topology.version;
            change(&mut topology)?;
            let mut target = self.replicas[0].clone();
            for _ in 0..(self.replicas.len() * 2) {
                let request = pb::UpdateTopologyRequest {
                    expected_version,
                    topology: Some(topology_message(&topology)),
                };
                match Self::client(&target)?
                    .update_topology(request)
                    .await
                    .map(|reply| reply.into_inner().reply)
                {
                    Ok(Some(pb::update_topology_response::Reply::Topology(done))) => {
                        return topology_from_message(&done);
                    }
                    Ok(Some(pb::update_topology_response::Reply::VersionConflict(_))) => break,
                    Ok(Some(pb::update_topology_response::Reply::Redirect(redirect))) => {
                        target = redirect
                            .leader_address
                            .unwrap_or_else(|| self.replicas[0].clone());
                    }
                    _ => {
                        let index = self.replicas.iter().position(|a| *a == target).unwrap_or(0);
                        target = self.replicas[(index + 1) % self.replicas.len()].clone();
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
        Err("the topology kept changing; gave up".into())
    }

    /// Moves a coordinator shard to `state`, raising its epoch.
    pub async fn set_coordinator_state(
        &self,
        coordinator_shard_id: u32,
        state: CoordinatorState,
    ) -> Result<Topology, String> {
        self.update(|topology| {
            let entry = topology
                .coordinators
                .get_mut(&coordinator_shard_id)
                .ok_or_else(|| {
                    format!("coordinator shard {coordinator_shard_id} is not in the topology")
                })?;
            if entry.state == state {
                return Ok(());
            }
            if entry.state == CoordinatorState::Removed {
                return Err(format!(
                    "coordinator shard {coordinator_shard_id} is removed"
                ));
            }
            entry.state = state;
            entry.epoch += 1;
            Ok(())
        })
        .await
    }

    /// Calls `on_change` with every new topology, for as long as the process runs; reconnects
    /// (to the next replica) whenever a stream ends.
    pub async fn watch(self, on_change: impl Fn(Topology) + Send + 'static) {
        let mut after = 0;
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            let address = &self.replicas[attempt % self.replicas.len()];
            if let Ok(mut client) = Self::client(address)
                && let Ok(reply) = client
                    .watch_topology(pb::WatchTopologyRequest {
                        after_version: after,
                    })
                    .await
            {
                let mut stream = reply.into_inner();
                while let Ok(Some(message)) = stream.message().await {
                    if let Ok(topology) = topology_from_message(&message) {
                        after = topology.version;
                        on_change(topology);
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}
