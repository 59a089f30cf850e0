//! Starts one coordinator replica: the Raft group with the coordinator machine, the driver that
//! carries in-flight transactions, and the `Coordinator` and `CoordinatorAdmin` services.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use auticuro::client::StorageShards;
use consensus::{Group, GroupOptions};
use proto::marker::v1::coordinator_admin_server::CoordinatorAdminServer;
use proto::marker::v1::coordinator_server::CoordinatorServer;

use crate::driver::Driver;
use crate::machine::CoordinatorMachine;
use crate::metrics::CoordinatorMetrics;
use crate::service::CoordinatorService;
use crate::topology::{Placement, TopologyClient};

#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub coordinator_shard_id: u32,
    pub node_id: u64,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Every storage shard with its replica addresses; empty to take them from the topology.
    pub storage_shards: BTreeMap<u32, Vec<String>>,
    /// How long reservations may take before a transaction is aborted.
    pub reserve_timeout: Duration,
    /// Replicas of the topology group (none: always active, no draining).
    pub topology: Vec<String>,
}

pub async fn start(options: CoordinatorOptions) -> anyhow::Result<consensus::Replica> {
    let mut group = Group::<CoordinatorMachine>::start(&GroupOptions {
        kind: "marker",
        group_id: options.coordinator_shard_id,
        node_id: options.node_id,
        data_dir: options.data_dir.clone(),
        snapshot_after_logs: 20_000,
        logs_kept_after_snapshot: 1_000,
    })
    .await?;
    let (placement_sender, placement) = tokio::sync::watch::channel(Placement::default());
    let topology =
        (!options.topology.is_empty()).then(|| TopologyClient::new(options.topology.clone()));
    let storage_shards = match (&topology, options.storage_shards.is_empty()) {
        (_, false) => options.storage_shards.clone(),
        (Some(client), true) => storage_from_topology(client).await,
        (None, true) => {
            anyhow::bail!("storage shards come from --storage-shard flags or a topology")
        }
    };
    let storage = Arc::new(StorageShards::new(storage_shards));
    if let Some(client) = &topology {
        let id = options.coordinator_shard_id;
        let watched_storage = storage.clone();
        tokio::spawn(client.clone().watch(move |topology| {
            watched_storage.update_replicas(&topology.storage_shards);
            let entry = topology.coordinators.get(&id).cloned();
            placement_sender.send_replace(Placement {
                topology_version: topology.version,
                entry,
            });
        }));
    }
    let raft = group.raft.clone();
    let counts = group.machine.read(|machine| machine.counts().clone());
    let metrics = CoordinatorMetrics::register(&mut group.registry, counts);
    tokio::spawn(metrics.clone().follow(group.machine.clone()));
    let driver = Driver::new(
        options.coordinator_shard_id,
        placement,
        raft.clone(),
        group.machine.clone(),
        group.proposer.clone(),
        storage,
        metrics.retries.clone(),
    );
    tokio::spawn(driver.clone().resume_on_leadership());
    let service = CoordinatorService {
        coordinator_shard_id: options.coordinator_shard_id,
        driver,
        reserve_timeout: options.reserve_timeout,
        topology,
    };
    let routes = group
        .routes()
        .await?
        .add_service(CoordinatorServer::new(service.clone()))
        .add_service(CoordinatorAdminServer::new(service));
    consensus::serve(options.listen, routes, raft).await
}

/// Waits until the topology lists storage shards, and returns them.
async fn storage_from_topology(client: &TopologyClient) -> BTreeMap<u32, Vec<String>> {
    loop {
        match client.get().await {
            Ok(topology) if !topology.storage_shards.is_empty() => return topology.storage_shards,
            Ok(_) => tracing::warn!("the topology lists no storage shard yet; waiting"),
            Err(error) => tracing::warn!(%error, "the topology is not reachable yet; waiting"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
