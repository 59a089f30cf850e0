//! `walletctl shard add-replica | remove-replica`: changes a storage shard's membership through
//! its leader and keeps the topology's replica list (which gateways and coordinators follow)
//! in step. The new replica's process must already run (with an empty data directory and a node
//! id never used in the shard); a removed replica's process should be stopped afterwards.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ::marker::topology::TopologyClient;
use auticuro::client::channel;
use proto::raft::v1 as raft;
use proto::raft::v1::raft_admin_client::RaftAdminClient;

use crate::{Error, Result};

/// How long a membership change may take (adding a replica includes its catching up).
const CHANGE_WAIT: Duration = Duration::from_secs(120);

async fn admin(address: &str) -> Result<RaftAdminClient<tonic::transport::Channel>> {
    Ok(RaftAdminClient::new(
        channel(address).map_err(|error| Error::Setup(error.to_string()))?,
    ))
}

/// The leader's address and its status, as the first replica that knows it says.
async fn leader(replicas: &[String]) -> Result<(String, raft::StatusResponse)> {
    let deadline = Instant::now() + CHANGE_WAIT;
    loop {
        for address in replicas {
            let Ok(status) = consensus::client::raft_status(address).await else {
                continue;
            };
            let Some(leader) = status.leader_address else {
                continue;
            };
            if let Ok(status) = consensus::client::raft_status(&leader).await
                && status.state == raft::ServerState::Leader as i32
            {
                return Ok((leader, status));
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Setup("no leader found".into()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn changed(reply: raft::MembershipResponse) -> Result<raft::Membership> {
    match reply.reply {
        Some(raft::membership_response::Reply::Membership(membership)) => Ok(membership),
        other => Err(Error::Setup(format!(
            "the leader moved: {other:?}; try again"
        ))),
    }
}

async fn shard_replicas(client: &TopologyClient, shard_id: u32) -> Result<Vec<String>> {
    client
        .get()
        .await
        .map_err(Error::Setup)?
        .storage_shards
        .get(&shard_id)
        .cloned()
        .ok_or_else(|| Error::Setup(format!("no storage shard {shard_id}")))
}

/// Adds the running process at `address` as voter `node_id` of storage shard `shard_id`.
pub async fn add(topology: &[String], shard_id: u32, node_id: u64, address: &str) -> Result<()> {
    let client = TopologyClient::new(topology.to_vec());
    let replicas = shard_replicas(&client, shard_id).await?;
    let (leader_address, status) = leader(&replicas).await?;
    let voters: BTreeSet<u64> = status
        .membership
        .map(|m| m.voters.iter().map(|node| node.node_id).collect())
        .unwrap_or_default();
    if voters.contains(&node_id) {
        return Err(Error::Setup(format!("node {node_id} is a voter already")));
    }
    let mut leader = admin(&leader_address).await?;
    let node = raft::Node {
        node_id,
        address: address.to_string(),
    };
    let request = raft::AddLearnerRequest {
        node: Some(node),
        wait_caught_up: true,
    };
    let learned = leader.add_learner(request).await;
    changed(
        learned
            .map_err(|status| Error::Setup(format!("adding: {status}")))?
            .into_inner(),
    )?;
    let mut voter_ids: Vec<u64> = voters.into_iter().collect();
    voter_ids.push(node_id);
    let request = raft::ChangeMembershipRequest {
        voter_ids,
        retain_as_learners: false,
    };
    let promoted = leader.change_membership(request).await;
    changed(
        promoted
            .map_err(|status| Error::Setup(format!("promoting: {status}")))?
            .into_inner(),
    )?;
    client
        .update(|current| {
            let list = current.storage_shards.entry(shard_id).or_default();
            if !list.iter().any(|a| a == address) {
                list.push(address.to_string());
            }
            Ok(())
        })
        .await
        .map_err(Error::Setup)?;
    Ok(())
}

/// Removes voter `node_id` from storage shard `shard_id`; returns its address.
pub async fn remove(topology: &[String], shard_id: u32, node_id: u64) -> Result<String> {
    let client = TopologyClient::new(topology.to_vec());
    let replicas = shard_replicas(&client, shard_id).await?;
    let (leader_address, status) = leader(&replicas).await?;
    let address = status
        .membership
        .and_then(|m| m.voters.into_iter().find(|node| node.node_id == node_id))
        .map(|node| node.address)
        .ok_or_else(|| Error::Setup(format!("node {node_id} is not a voter")))?;
    let removed = admin(&leader_address)
        .await?
        .remove_node(raft::RemoveNodeRequest { node_id })
        .await;
    changed(
        removed
            .map_err(|status| Error::Setup(format!("removing: {status}")))?
            .into_inner(),
    )?;
    client
        .update(|current| {
            if let Some(list) = current.storage_shards.get_mut(&shard_id) {
                list.retain(|a| *a != address);
            }
            Ok(())
        })
        .await
        .map_err(Error::Setup)?;
    Ok(address)
}
