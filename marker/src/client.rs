//! A client of one coordinator shard for the services that submit transactions (the gateway,
//! tools): follows the leader and retries unknown outcomes with the same idempotency key, which
//! the coordinator turns into the same transaction id, so a retry never begins a second one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus::client::{Answer, LeaderClient, SharedCalls, Unknown};
use prost::Message;
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_admin_client::CoordinatorAdminClient;
use proto::marker::v1::coordinator_client::CoordinatorClient as GrpcClient;
use proto::marker::v1::submit_response::Reply;
use tonic::transport::Channel;

type Queued = consensus::client::Queued<pb::SubmitRequest, Reply>;

pub struct CoordinatorClient {
    /// Submits share `SubmitMany` calls (the coordinator takes up to
    /// `service::SUBMIT_MANY_REQUESTS_MAX` in one). A call's slot frees once the leader has
    /// taken it: the answers come on its stream after that.
    submits: SharedCalls<pb::SubmitRequest, Reply>,
}

impl CoordinatorClient {
    pub fn new(coordinator_shard_id: u32, replicas: Vec<String>) -> CoordinatorClient {
        let group = LeaderClient::new(
            format!("coordinator shard {coordinator_shard_id}"),
            replicas,
        );
        CoordinatorClient {
            submits: SharedCalls::new(
                group,
                pb::SubmitRequest::encoded_len,
                |group, call, deadline| Box::pin(submit_many(group, call, deadline)),
            ),
        }
    }

    fn group(&self) -> &LeaderClient {
        &self.submits.group
    }

    pub fn replicas(&self) -> Vec<String> {
        self.group().replicas()
    }

    pub fn set_replicas(&self, replicas: Vec<String>) {
        self.group().set_replicas(replicas);
    }

    /// Submits on the leader, again (same key: the same transaction) after each unknown
    /// outcome until `deadline`; every other answer is returned as it came. Concurrent
    /// submits share `SubmitMany` calls, so a busy client pays one call for many.
    pub async fn submit(
        &self,
        request: pb::SubmitRequest,
        deadline: Instant,
    ) -> Result<Reply, Unknown> {
        self.submits.send(request, deadline).await
    }

    /// The transaction as the leader knows it; `None` when it does not exist on this shard.
    pub async fn get(
        &self,
        txn_id: &str,
        deadline: Instant,
    ) -> Result<Option<pb::Transaction>, Unknown> {
        self.group()
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
        self.group()
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
        self.group()
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
        let address = self.group().target(0);
        let channel: Channel = self
            .group()
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

/// One `SubmitMany` call to the leader (following redirects until `deadline`), whose answers
/// are read as they come, after the call's slot is freed. A submit answered with a redirect
/// (a new leader), or left unanswered when the stream ends, is answered unknown: its caller
/// sends it again, to the leader the redirect named.
async fn submit_many(group: Arc<LeaderClient>, call: Vec<Queued>, deadline: Instant) {
    let requests: Vec<pb::SubmitRequest> =
        call.iter().map(|queued| queued.request.clone()).collect();
    // The coordinator may wait for decisions: allow for the longest on top of the attempt.
    let wait = Duration::from_millis(u64::from(
        requests
            .iter()
            .map(|request| request.wait_ms_max)
            .max()
            .unwrap_or(0),
    ));
    let request = pb::SubmitManyRequest { requests };
    let opened = group
        .on_leader(deadline, |channel, timeout| {
            let mut client = GrpcClient::new(channel);
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(timeout + wait);
            async move {
                Ok(Answer::Done(
                    client.submit_many(request).await?.into_inner(),
                ))
            }
        })
        .await;
    let mut answers = match opened {
        Ok(answers) => answers,
        Err(unknown) => {
            call.into_iter()
                .for_each(|queued| queued.unknown(&unknown.last_error));
            return;
        }
    };
    tokio::spawn(async move {
        let mut waiting: Vec<Option<Queued>> = call.into_iter().map(Some).collect();
        let last_error = loop {
            let answer = match answers.message().await {
                Ok(Some(answer)) => answer,
                Ok(None) => break "the coordinator ended the call without answering".to_string(),
                Err(status) => break status.to_string(),
            };
            let Some(queued) = waiting
                .get_mut(answer.index as usize)
                .and_then(Option::take)
            else {
                continue;
            };
            use pb::submit_many_reply::Result as Answered;
            match answer.result {
                Some(Answered::Response(pb::SubmitResponse {
                    reply: Some(Reply::Redirect(redirect)),
                })) => {
                    group.remember_leader(redirect.leader_address);
                    queued.unknown("redirected to the leader");
                }
                Some(Answered::Response(pb::SubmitResponse { reply: Some(reply) })) => {
                    queued.answer(Ok(reply))
                }
                Some(Answered::Unknown(error)) => queued.unknown(&error),
                Some(Answered::Response(pb::SubmitResponse { reply: None })) | None => {
                    queued.unknown("an empty answer")
                }
            }
        };
        for queued in waiting.into_iter().flatten() {
            queued.unknown(&last_error);
        }
    });
}
