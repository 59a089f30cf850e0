//! A client of one coordinator shard for the services that submit transactions (the gateway,
//! tools): follows the leader and retries unknown outcomes with the same idempotency key, which
//! the coordinator turns into the same transaction id, so a retry never begins a second one.

use std::time::Instant;

use consensus::client::{Answer, LeaderClient, Unknown};
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_admin_client::CoordinatorAdminClient;
use proto::marker::v1::coordinator_client::CoordinatorClient as GrpcClient;
use tonic::transport::Channel;

pub struct CoordinatorClient {
    group: LeaderClient,
}

impl CoordinatorClient {
    pub fn new(coordinator_shard_id: u32, replicas: Vec<String>) -> CoordinatorClient {
        CoordinatorClient {
            group: LeaderClient::new(
                format!("coordinator shard {coordinator_shard_id}"),
                replicas,
            ),
        }
    }

    pub fn replicas(&self) -> Vec<String> {
        self.group.replicas()
    }

    pub fn set_replicas(&self, replicas: Vec<String>) {
        self.group.set_replicas(replicas);
    }

    /// Submits on the leader; every answer other than a redirect is returned as it came.
    pub async fn submit(
        &self,
        request: pb::SubmitRequest,
        deadline: Instant,
    ) -> Result<pb::submit_response::Reply, Unknown> {
        self.group
            .on_leader(deadline, |channel, timeout| {
                let mut client = GrpcClient::new(channel);
                let mut request = tonic::Request::new(request.clone());
                // The coordinator may wait for the decision: allow for it on top of the attempt.
                request.set_timeout(
                    timeout
                        + std::time::Duration::from_millis(u64::from(
                            request.get_ref().wait_ms_max,
                        )),
                );
                async move {
                    use pb::submit_response::Reply;
                    Ok(match client.submit(request).await?.into_inner().reply {
                        Some(Reply::Redirect(redirect)) => {
                            Answer::Redirect(redirect.leader_address)
                        }
                        Some(reply) => Answer::Done(reply),
                        None => Answer::Empty,
                    })
                }
            })
            .await
    }

    /// The transaction as the leader knows it; `None` when it does not exist on this shard.
    pub async fn get(
        &self,
        txn_id: &str,
        deadline: Instant,
    ) -> Result<Option<pb::Transaction>, Unknown> {
        self.group
            .on_leader(deadline, |channel, timeout| {
                let mut client = GrpcClient::new(channel);
                let mut request = tonic::Request::new(pb::GetTransactionRequest {
                    txn_id: txn_id.to_string(),
                });
                request.set_timeout(timeout);
                async move {
                    use pb::get_transaction_response::Reply;
                    Ok(
                        match client.get_transaction(request).await?.into_inner().reply {
                            Some(Reply::Transaction(transaction)) => {
                                Answer::Done(Some(transaction))
                            }
                            Some(Reply::NotFound(_)) => Answer::Done(None),
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

    /// Transactions in flight on this shard, oldest first, as the replica believed to lead
    /// knows them.
    pub async fn list_in_flight(
        &self,
        limit: u32,
        deadline: Instant,
    ) -> Result<Vec<pb::InFlightTransaction>, Unknown> {
        self.group
            .on_leader(deadline, |channel, timeout| {
                let mut client = CoordinatorAdminClient::new(channel);
                let mut request = tonic::Request::new(pb::ListInFlightRequest { limit });
                request.set_timeout(timeout);
                async move {
                    let listed = client.list_in_flight(request).await?.into_inner();
                    Ok(Answer::Done(listed.transactions))
                }
            })
            .await
    }

    /// Drives a transaction again now (`force_abort: false`), or decides abort if it is not
    /// decided yet (`force_abort: true`), on the leader.
    pub async fn intervene(
        &self,
        txn_id: &str,
        force_abort: bool,
        deadline: Instant,
    ) -> Result<pb::admin_response::Reply, Unknown> {
        self.group
            .on_leader(deadline, |channel, timeout| {
                let mut client = CoordinatorAdminClient::new(channel);
                let txn_id = txn_id.to_string();
                async move {
                    let answer = if force_abort {
                        let mut request = tonic::Request::new(pb::ForceAbortRequest { txn_id });
                        request.set_timeout(timeout);
                        client.force_abort(request).await?
                    } else {
                        let mut request = tonic::Request::new(pb::RetryRequest { txn_id });
                        request.set_timeout(timeout);
                        client.retry(request).await?
                    };
                    use pb::admin_response::Reply;
                    Ok(match answer.into_inner().reply {
                        Some(Reply::Redirect(redirect)) => {
                            Answer::Redirect(redirect.leader_address)
                        }
                        Some(reply) => Answer::Done(reply),
                        None => Answer::Empty,
                    })
                }
            })
            .await
    }

    /// The status changes of one transaction, from its current status until it is done, read
    /// from the replica believed to lead.
    pub async fn watch(
        &self,
        txn_id: &str,
    ) -> Result<tonic::Streaming<pb::TransactionStatusChange>, tonic::Status> {
        let address = self.group.target(0);
        let channel: Channel = self
            .group
            .channel(&address)
            .map_err(tonic::Status::unavailable)?;
        let reply = GrpcClient::new(channel)
            .watch_transaction(pb::WatchTransactionRequest {
                txn_id: txn_id.to_string(),
            })
            .await?;
        Ok(reply.into_inner())
    }
}
