//! `wallet.raft.v1.RaftAdmin`: initialization, membership changes, status and state digests of
//! one replica, the same for every kind of group.

use std::collections::{BTreeMap, BTreeSet};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use proto::common::v1::Redirect;
use proto::raft::v1 as pb;
use proto::raft::v1::raft_admin_server::RaftAdmin;
use tonic::{Request, Response, Status};

use crate::{App, NodeId, Raft, StateMachineStore};

pub struct RaftAdminService<A: App> {
    group_id: u32,
    raft: Raft<A>,
    machine: StateMachineStore<A>,
}

impl<A: App> RaftAdminService<A> {
    pub fn new(group_id: u32, raft: Raft<A>, machine: StateMachineStore<A>) -> RaftAdminService<A> {
        RaftAdminService {
            group_id,
            raft,
            machine,
        }
    }

    fn membership(&self, log_index: u64) -> pb::Membership {
        let metrics = self.raft.metrics().borrow().clone();
        let config = metrics.membership_config.membership();
        let voter_ids: BTreeSet<NodeId> = config.voter_ids().collect();
        let node = |(id, node): (&NodeId, &BasicNode)| pb::Node {
            node_id: *id,
            address: node.addr.clone(),
        };
        pb::Membership {
            log_index,
            voters: config
                .nodes()
                .filter(|(id, _)| voter_ids.contains(id))
                .map(node)
                .collect(),
            learners: config
                .nodes()
                .filter(|(id, _)| !voter_ids.contains(id))
                .map(node)
                .collect(),
        }
    }

    fn membership_reply(
        &self,
        result: Result<u64, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let reply = match result {
            Ok(log_index) => pb::membership_response::Reply::Membership(self.membership(log_index)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                pb::membership_response::Reply::Redirect(redirect(
                    self.group_id,
                    forward.leader_id,
                    forward.leader_node.map(|node| node.addr),
                ))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => {
                return Err(Status::failed_precondition(error.to_string()));
            }
            Err(error) => return Err(Status::unavailable(error.to_string())),
        };
        Ok(Response::new(pb::MembershipResponse { reply: Some(reply) }))
    }
}

fn server_state(state: ServerState) -> pb::ServerState {
    match state {
        ServerState::Leader => pb::ServerState::Leader,
        ServerState::Follower => pb::ServerState::Follower,
        ServerState::Candidate => pb::ServerState::Candidate,
        ServerState::Learner => pb::ServerState::Learner,
        ServerState::Shutdown => pb::ServerState::Shutdown,
    }
}

#[tonic::async_trait]
impl<A: App> RaftAdmin for RaftAdminService<A> {
    async fn initialize(
        &self,
        request: Request<pb::InitializeRequest>,
    ) -> Result<Response<pb::InitializeResponse>, Status> {
        let members: BTreeMap<NodeId, BasicNode> = request
            .into_inner()
            .members
            .into_iter()
            .map(|node| (node.node_id, BasicNode { addr: node.address }))
            .collect();
        if members.is_empty() {
            return Err(Status::invalid_argument(
                "a group needs at least one member",
            ));
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(Response::new(pb::InitializeResponse {})),
            // Initializing twice is refused by openraft; the group is initialized all the same.
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {
                Ok(Response::new(pb::InitializeResponse {}))
            }
            Err(error) => Err(Status::failed_precondition(error.to_string())),
        }
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let request = request.into_inner();
        let node = request
            .node
            .ok_or_else(|| Status::invalid_argument("node is required"))?;
        let result = self
            .raft
            .add_learner(
                node.node_id,
                BasicNode { addr: node.address },
                request.wait_caught_up,
            )
            .await
            .map(|written| written.log_id.index);
        self.membership_reply(result)
    }

    async fn change_membership(
        &self,
        request: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let request = request.into_inner();
        let voters: BTreeSet<NodeId> = request.voter_ids.into_iter().collect();
        if voters.is_empty() {
            return Err(Status::invalid_argument("a group needs at least one voter"));
        }
        let result = self
            .raft
            .change_membership(voters, request.retain_as_learners)
            .await
            .map(|written| written.log_id.index);
        self.membership_reply(result)
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let node_id = request.into_inner().node_id;
        let metrics = self.raft.metrics().borrow().clone();
        let config = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = config.voter_ids().filter(|id| *id != node_id).collect();
        if voters.is_empty() {
            return Err(Status::failed_precondition("cannot remove the last voter"));
        }
        // Dropping the node from the voters without keeping it as a learner removes it entirely.
        let result = self
            .raft
            .change_membership(voters, false)
            .await
            .map(|written| written.log_id.index);
        self.membership_reply(result)
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader_address = metrics.current_leader.and_then(|leader| {
            metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|node| node.addr.clone())
        });
        let membership = self.membership(
            metrics
                .membership_config
                .log_id()
                .map(|id| id.index)
                .unwrap_or(0),
        );
        Ok(Response::new(pb::StatusResponse {
            group_id: self.group_id,
            node_id: metrics.id,
            state: server_state(metrics.state) as i32,
            term: metrics.current_term,
            leader_node_id: metrics.current_leader,
            leader_address,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            applied_index: metrics.last_applied.map(|id| id.index).unwrap_or(0),
            snapshot_index: metrics.snapshot.map(|id| id.index),
            purged_index: metrics.purged.map(|id| id.index),
            membership: Some(membership),
            applied_seq: self.machine.read(|app| app.applied_seq()),
        }))
    }

    async fn digest(
        &self,
        _: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let applied_index = self.machine.last_applied().map(|id| id.index).unwrap_or(0);
        let (applied_seq, digest) = self.machine.digest()?;
        Ok(Response::new(pb::DigestResponse {
            applied_index,
            applied_seq,
            digest: digest.to_vec(),
        }))
    }

    async fn trigger_snapshot(
        &self,
        _: Request<pb::TriggerSnapshotRequest>,
    ) -> Result<Response<pb::TriggerSnapshotResponse>, Status> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|error| Status::unavailable(error.to_string()))?;
        let target = self.machine.last_applied().map(|id| id.index);
        // Wait (bounded) for the snapshot to cover what was applied when asked.
        let snapshot = self
            .raft
            .wait(Some(std::time::Duration::from_secs(30)))
            .metrics(
                |metrics| metrics.snapshot.map(|id| id.index) >= target,
                "snapshot built",
            )
            .await
            .map_err(|error| Status::deadline_exceeded(error.to_string()))?
            .snapshot;
        Ok(Response::new(pb::TriggerSnapshotResponse {
            snapshot_index: snapshot.map(|id| id.index),
        }))
    }
}

/// Where a request for group `group_id` should go instead of this replica.
pub fn redirect(
    group_id: u32,
    leader_node_id: Option<NodeId>,
    leader_address: Option<String>,
) -> Redirect {
    Redirect {
        group_id,
        leader_node_id,
        leader_address,
        wrong_shard: false,
    }
}

/// The leader this replica currently believes in, as a redirect.
pub fn leader_redirect<A: App>(group_id: u32, raft: &Raft<A>) -> Redirect {
    let metrics = raft.metrics().borrow().clone();
    let address = metrics.current_leader.and_then(|id| {
        metrics
            .membership_config
            .membership()
            .get_node(&id)
            .map(|node| node.addr.clone())
    });
    redirect(group_id, metrics.current_leader, address)
}
