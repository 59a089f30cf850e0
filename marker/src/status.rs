//! The status of a running platform, asked of every Raft group listed in the topology (the
//! topology group, storage shards, coordinator shards not removed): leader, members, applied
//! seq, the coordinators' in-flight transactions and, when given, how far the read side has
//! projected each storage shard. Every replica is asked at once, so the replicas that give no
//! answer cost the report one timeout (`consensus::client::ADMIN_TIMEOUT`) in all. `walletctl
//! status` prints it; the gateway serves it to the operator console.

use std::collections::BTreeMap;

use auticuro::client::channel;
use consensus::client::admin_call;
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_admin_client::CoordinatorAdminClient;
use proto::raft::v1 as raft;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ReplicaStatus {
    pub address: String,
    pub reachable: bool,
    pub node_id: Option<u64>,
    /// `leader`, `follower`, `candidate`, `learner` or `unknown`.
    pub state: String,
    pub applied_seq: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Projection {
    pub applied_seq: u64,
    /// Events the shard's leader has that the projection has not applied.
    pub lag_events: u64,
}

#[derive(Debug, Serialize)]
pub struct GroupStatus {
    /// `topology`, `storage` or `coordinator`.
    pub kind: &'static str,
    pub group_id: u32,
    pub leader_node_id: Option<u64>,
    pub term: Option<u64>,
    /// The leader's applied seq (the highest any replica reports when there is no leader).
    pub applied_seq: u64,
    pub replicas: Vec<ReplicaStatus>,
    /// Coordinator shards: transactions begun and not yet done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    /// Storage shards: how far the read side has projected the shard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projection: Option<Projection>,
}

#[derive(Debug, Serialize)]
pub struct PlatformStatus {
    pub groups: Vec<GroupStatus>,
}

fn state_name(state: i32) -> &'static str {
    match raft::ServerState::try_from(state) {
        Ok(raft::ServerState::Leader) => "leader",
        Ok(raft::ServerState::Follower) => "follower",
        Ok(raft::ServerState::Candidate) => "candidate",
        Ok(raft::ServerState::Learner) => "learner",
        _ => "unknown",
    }
}

async fn replica_status(address: &str) -> (ReplicaStatus, Option<raft::StatusResponse>) {
    let answer = consensus::client::raft_status(address).await.ok();
    let status = ReplicaStatus {
        address: address.to_string(),
        reachable: answer.is_some(),
        node_id: answer.as_ref().map(|s| s.node_id),
        state: answer
            .as_ref()
            .map_or("unknown", |s| state_name(s.state))
            .to_string(),
        applied_seq: answer.as_ref().map(|s| s.applied_seq),
    };
    (status, answer)
}

async fn group_status(kind: &'static str, group_id: u32, addresses: &[String]) -> GroupStatus {
    let mut replicas = Vec::new();
    let mut answers = Vec::new();
    let asked = futures::future::join_all(addresses.iter().map(|a| replica_status(a))).await;
    for (status, answer) in asked {
        replicas.push(status);
        answers.extend(answer);
    }
    let leader = answers
        .iter()
        .find(|s| s.state == raft::ServerState::Leader as i32);
    GroupStatus {
        kind,
        group_id,
        leader_node_id: leader.map(|s| s.node_id),
        term: answers.iter().map(|s| s.term).max(),
        applied_seq: leader.map_or_else(
            || answers.iter().map(|s| s.applied_seq).max().unwrap_or(0),
            |s| s.applied_seq,
        ),
        replicas,
        in_flight: None,
        projection: None,
    }
}

/// Transactions in flight on a coordinator shard, the most any replica reports.
pub async fn in_flight(addresses: &[String]) -> Option<u64> {
    let asked = addresses.iter().map(|address| async move {
        let mut admin = CoordinatorAdminClient::new(channel(address).ok()?);
        let status = admin_call(admin.status(pb::CoordinatorStatusRequest {})).await;
        status.ok().map(|status| status.in_flight)
    });
    futures::future::join_all(asked)
        .await
        .into_iter()
        .flatten()
        .max()
}

/// The status of the platform behind `topology_replicas`; `projected` is the read side's applied
/// seq of each storage shard, when known.
pub async fn status(
    topology_replicas: &[String],
    projected: Option<&BTreeMap<u32, u64>>,
) -> Result<PlatformStatus, String> {
    let topology = crate::topology::TopologyClient::new(topology_replicas.to_vec())
        .get()
        .await
        .map_err(|error| format!("reading the topology: {error}"))?;
    let storage = topology
        .storage_shards
        .iter()
        .map(|(shard_id, replicas)| async move {
            let mut group = group_status("storage", *shard_id, replicas).await;
            group.projection = projected.map(|seqs| {
                let applied_seq = seqs.get(shard_id).copied().unwrap_or(0);
                Projection {
                    applied_seq,
                    lag_events: group.applied_seq.saturating_sub(applied_seq),
                }
            });
            group
        });
    let coordinators = topology
        .coordinators
        .iter()
        .filter(|(_, entry)| entry.state != crate::topology::CoordinatorState::Removed)
        .map(|(coordinator_id, entry)| async move {
            let (mut group, in_flight) = tokio::join!(
                group_status("coordinator", *coordinator_id, &entry.replicas),
                in_flight(&entry.replicas)
            );
            group.in_flight = in_flight;
            group
        });
    let (topology_group, storage, coordinators) = tokio::join!(
        group_status("topology", 0, topology_replicas),
        futures::future::join_all(storage),
        futures::future::join_all(coordinators)
    );
    let mut groups = vec![topology_group];
    groups.extend(storage);
    groups.extend(coordinators);
    Ok(PlatformStatus { groups })
}
