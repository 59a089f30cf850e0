//! Fencing removed coordinators: the storage leader watches the topology and, for every
//! coordinator shard marked `Removed` at epoch E, proposes `FenceCoordinator { below_epoch: E + 1 }`
//! once, so that shard's late messages change nothing on this storage shard.

use std::collections::BTreeMap;
use std::time::Duration;

use consensus::{Proposer, Raft, StateMachineStore};
use proto::marker::v1 as pb;
use proto::marker::v1::topology_service_client::TopologyServiceClient;
use tokio::sync::watch;

use crate::ledger::{Command, CommandKind, RequestId};
use crate::machine::LedgerMachine;

/// How often the leader compares the fences it has with the removed coordinators it knows of.
const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Removed coordinator shards and the epoch they were removed at, from the latest topology.
type Removed = BTreeMap<u32, u64>;

fn removed(topology: &pb::Topology) -> Removed {
    topology
        .coordinator_shards
        .iter()
        .filter(|shard| shard.state == pb::CoordinatorShardState::Removed as i32)
        .map(|shard| (shard.coordinator_shard_id, shard.epoch))
        .collect()
}

/// Follows the topology from its replicas, reconnecting whenever a stream ends.
async fn watch_removed(replicas: Vec<String>, sender: watch::Sender<Removed>) {
    let mut attempt = 0usize;
    let mut after = 0;
    loop {
        attempt += 1;
        let address = &replicas[attempt % replicas.len()];
        if let Ok(channel) = crate::client::channel(address)
            && let Ok(reply) = TopologyServiceClient::new(channel)
                .watch_topology(pb::WatchTopologyRequest {
                    after_version: after,
                })
                .await
        {
            let mut stream = reply.into_inner();
            while let Ok(Some(topology)) = stream.message().await {
                after = topology.version;
                sender.send_replace(removed(&topology));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn fence_removed_coordinators(
    raft: Raft<LedgerMachine>,
    machine: StateMachineStore<LedgerMachine>,
    proposer: Proposer<LedgerMachine>,
    topology_replicas: Vec<String>,
) {
    let (sender, receiver) = watch::channel(Removed::new());
    tokio::spawn(watch_removed(topology_replicas, sender));
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    loop {
        ticks.tick().await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.current_leader != Some(metrics.id) {
            continue;
        }
        let fences: BTreeMap<u32, u64> = machine
            .read(|machine| machine.ledger().fences())
            .into_iter()
            .collect();
        let wanted: Vec<(u32, u64)> = receiver
            .borrow()
            .iter()
            .map(|(id, epoch)| (*id, epoch + 1))
            .collect();
        for (coordinator_shard_id, below_epoch) in wanted {
            if fences
                .get(&coordinator_shard_id)
                .is_some_and(|fence| *fence >= below_epoch)
            {
                continue;
            }
            let Ok(request_id) =
                RequestId::parse(&format!("sys:fence:{coordinator_shard_id}:{below_epoch}"))
            else {
                continue;
            };
            let command = Command {
                request_id,
                kind: CommandKind::FenceCoordinator {
                    coordinator_shard_id,
                    below_epoch,
                },
            };
            if let Err(error) = proposer.propose(command).await {
                tracing::warn!(%error, coordinator_shard_id, "fencing a removed coordinator failed; retrying");
            }
        }
    }
}
