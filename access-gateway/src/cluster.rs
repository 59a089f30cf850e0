//! The gateway's view of the platform, read from the shared topology and kept current by
//! watching it: the storage shards (and the slot table routing accounts to them) and the
//! coordinator shards with their states.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use auticuro::client::{ShardClient, StorageShards};
use auticuro::ledger::AccountId;
use marker::client::CoordinatorClient;
use marker::topology::{CoordinatorState, Topology, TopologyClient};

use crate::problem::ApiError;

struct Coordinator {
    state: CoordinatorState,
    client: Arc<CoordinatorClient>,
}

#[derive(Default)]
pub struct Cluster {
    /// The topology group's replicas.
    topology_replicas: Vec<String>,
    storage: RwLock<Option<Arc<StorageShards>>>,
    coordinators: RwLock<BTreeMap<u32, Coordinator>>,
}

impl Cluster {
    /// Follows the topology from `topology_replicas` in the background (retrying until they
    /// answer); `ready` says when it has arrived.
    pub fn follow(topology_replicas: Vec<String>) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster {
            topology_replicas: topology_replicas.clone(),
            ..Cluster::default()
        });
        let client = TopologyClient::new(topology_replicas);
        let watched = Arc::clone(&cluster);
        tokio::spawn(client.watch(move |topology| watched.apply(&topology)));
        cluster
    }

    fn apply(&self, topology: &Topology) {
        if topology.storage_shards.is_empty() {
            return;
        }
        {
            let mut storage = self.storage.write().expect("no poisoned lock");
            match storage.as_ref() {
                Some(shards) => shards.update_replicas(&topology.storage_shards),
                None => {
                    *storage = Some(Arc::new(StorageShards::new(
                        topology.storage_shards.clone(),
                    )))
                }
            }
        }
        let mut coordinators = self.coordinators.write().expect("no poisoned lock");
        for (id, entry) in &topology.coordinators {
            if entry.replicas.is_empty() {
                continue;
            }
            match coordinators.get_mut(id) {
                Some(known) => {
                    known.state = entry.state;
                    if known.client.replicas() != entry.replicas {
                        known.client.set_replicas(entry.replicas.clone());
                    }
                }
                None => {
                    coordinators.insert(
                        *id,
                        Coordinator {
                            state: entry.state,
                            client: Arc::new(CoordinatorClient::new(*id, entry.replicas.clone())),
                        },
                    );
                }
            }
        }
    }

    pub fn topology_replicas(&self) -> &[String] {
        &self.topology_replicas
    }

    /// Whether the topology has arrived with storage shards and an active coordinator.
    pub fn ready(&self) -> bool {
        self.storage.read().expect("no poisoned lock").is_some()
            && self
                .coordinators
                .read()
                .expect("no poisoned lock")
                .values()
                .any(|coordinator| coordinator.state == CoordinatorState::Active)
    }

    pub fn storage(&self) -> Result<Arc<StorageShards>, ApiError> {
        self.storage
            .read()
            .expect("no poisoned lock")
            .clone()
            .ok_or_else(|| ApiError::Unavailable("no topology yet".into()))
    }

    /// The storage shard of an account and its id.
    pub fn shard_of(&self, account_id: &AccountId) -> Result<(u32, ShardHandle), ApiError> {
        let storage = self.storage()?;
        let shard_id = storage.shard_of(account_id);
        Ok((shard_id, ShardHandle { storage, shard_id }))
    }

    /// The active coordinator shard a new transaction with this key goes to: chosen by a hash
    /// of the key, so concurrent duplicates meet on one shard.
    pub fn coordinator_for_new(&self, txn_id: &str) -> Result<u32, ApiError> {
        let coordinators = self.coordinators.read().expect("no poisoned lock");
        let active: Vec<u32> = coordinators
            .iter()
            .filter(|(_, coordinator)| coordinator.state == CoordinatorState::Active)
            .map(|(id, _)| *id)
            .collect();
        if active.is_empty() {
            return Err(ApiError::Unavailable("no active coordinator shard".into()));
        }
        let hash = txn_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
        });
        Ok(active[(hash % active.len() as u64) as usize])
    }

    /// Every coordinator shard that is not removed, by id.
    pub fn serving_coordinators(&self) -> Vec<(u32, Arc<CoordinatorClient>)> {
        self.coordinators
            .read()
            .expect("no poisoned lock")
            .iter()
            .filter(|(_, coordinator)| coordinator.state != CoordinatorState::Removed)
            .map(|(id, coordinator)| (*id, Arc::clone(&coordinator.client)))
            .collect()
    }

    pub fn coordinator(
        &self,
        coordinator_shard_id: u32,
    ) -> Result<Arc<CoordinatorClient>, ApiError> {
        self.coordinators
            .read()
            .expect("no poisoned lock")
            .get(&coordinator_shard_id)
            .map(|coordinator| Arc::clone(&coordinator.client))
            .ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "coordinator shard {coordinator_shard_id} is not in the topology"
                ))
            })
    }
}

/// One storage shard's client, kept alive with the shard set it came from.
pub struct ShardHandle {
    storage: Arc<StorageShards>,
    shard_id: u32,
}

impl std::ops::Deref for ShardHandle {
    type Target = ShardClient;

    fn deref(&self) -> &ShardClient {
        self.storage
            .shard(self.shard_id)
            .expect("the shard id came from this shard set")
    }
}
