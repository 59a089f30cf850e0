//! The Raft transport over gRPC: openraft messages travel as postcard payloads inside
//! `wallet.raft.v1.RaftPayload`, tagged with the group id so a misrouted message is refused.

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use proto::raft::v1::RaftPayload;
use proto::raft::v1::raft_transport_client::RaftTransportClient;
use proto::raft::v1::raft_transport_server::RaftTransport;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::{App, NodeId, Raft, TypeConfig, decode, encode};

/// Raft messages carry whole batches and snapshot chunks: allow large frames.
pub const MESSAGE_SIZE_MAX: usize = 64 * 1024 * 1024;

/// Creates connections to the other replicas of one group.
pub struct Network {
    group_id: u32,
}

impl Network {
    pub fn new(group_id: u32) -> Network {
        Network { group_id }
    }
}

pub struct Connection {
    group_id: u32,
    target: NodeId,
    client: Result<RaftTransportClient<Channel>, String>,
}

impl<A: App> RaftNetworkFactory<TypeConfig<A>> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        let client = Endpoint::from_shared(format!("http://{}", node.addr))
            .map(|endpoint| {
                let channel = endpoint.tcp_nodelay(true).connect_lazy();
                RaftTransportClient::new(channel)
                    .max_decoding_message_size(MESSAGE_SIZE_MAX)
                    .max_encoding_message_size(MESSAGE_SIZE_MAX)
            })
            .map_err(|error| format!("bad address {}: {error}", node.addr));
        Connection {
            group_id: self.group_id,
            target,
            client,
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: Kind,
        request: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = self.client.as_mut().map_err(|message| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(message.clone())))
        })?;
        let mut grpc_request = Request::new(RaftPayload {
            group_id: self.group_id,
            payload: encode(request),
        });
        grpc_request.set_timeout(option.hard_ttl());
        let reply = match kind {
            Kind::AppendEntries => client.append_entries(grpc_request).await,
            Kind::Vote => client.vote(grpc_request).await,
            Kind::InstallSnapshot => client.install_snapshot(grpc_request).await,
        };
        let payload = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode("raft response", &payload.into_inner().payload)
                .map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        result.map_err(|error| {
            RPCError::RemoteError(openraft::error::RemoteError::new(self.target, error))
        })
    }
}

#[derive(Clone, Copy)]
enum Kind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl<A: App> RaftNetwork<TypeConfig<A>> for Connection {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig<A>>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(Kind::AppendEntries, &request, &option).await
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig<A>>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Kind::InstallSnapshot, &request, &option).await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Kind::Vote, &request, &option).await
    }
}

/// The server side of the transport for one replica.
pub struct RaftTransportService<A: App> {
    group_id: u32,
    raft: Raft<A>,
}

impl<A: App> RaftTransportService<A> {
    pub fn new(group_id: u32, raft: Raft<A>) -> RaftTransportService<A> {
        RaftTransportService { group_id, raft }
    }

    fn open<T: DeserializeOwned>(&self, request: Request<RaftPayload>) -> Result<T, Status> {
        let message = request.into_inner();
        if message.group_id != self.group_id {
            return Err(Status::failed_precondition(format!(
                "this replica serves group {}, not {}",
                self.group_id, message.group_id
            )));
        }
        decode("raft request", &message.payload)
            .map_err(|error| Status::invalid_argument(error.to_string()))
    }

    fn reply<T: Serialize>(&self, result: T) -> Result<Response<RaftPayload>, Status> {
        Ok(Response::new(RaftPayload {
            group_id: self.group_id,
            payload: encode(&result),
        }))
    }
}

#[tonic::async_trait]
impl<A: App> RaftTransport for RaftTransportService<A> {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let request: AppendEntriesRequest<TypeConfig<A>> = self.open(request)?;
        self.reply(self.raft.append_entries(request).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let request: VoteRequest<NodeId> = self.open(request)?;
        self.reply(self.raft.vote(request).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let request: InstallSnapshotRequest<TypeConfig<A>> = self.open(request)?;
        self.reply(self.raft.install_snapshot(request).await)
    }
}
