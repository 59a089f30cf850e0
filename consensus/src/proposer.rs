//! Group commit: the leader packs concurrent client requests into one Raft entry, so one fsync
//! and one replication round carry many commands.
//!
//! Requests queue in a bounded channel. The packer takes what is queued, waits at most
//! `window` for more while the entry is not full, and proposes the entry without waiting for the
//! previous one to commit (up to `entries_in_flight_max` at once). Under load, requests pile up
//! while entries are in flight, so entries grow by themselves.

use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot};

use prometheus_client::metrics::histogram::Histogram;

use crate::batch::{BatchLimits, run_batches};
use crate::{App, NodeId, Proposal, Raft, RaftMetrics};

#[derive(Clone, Copy, Debug)]
pub struct ProposerLimits {
    /// The most requests in one Raft entry.
    pub entry_requests_max: usize,
    /// How long the packer waits for more requests before proposing a partly full entry.
    pub window: Duration,
    /// The most entries proposed and not yet committed.
    pub entries_in_flight_max: usize,
    /// The most requests waiting to be packed; more are refused as overloaded.
    pub queue_max: usize,
}

impl Default for ProposerLimits {
    fn default() -> Self {
        ProposerLimits {
            entry_requests_max: 1024,
            window: Duration::from_micros(500),
            entries_in_flight_max: 32,
            queue_max: 65_536,
        }
    }
}

/// Why a request was not applied. None of these means the request failed: `Unavailable` and
/// `Overloaded` leave its outcome unknown, and a retry with the same request id is always safe.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader")]
    NotLeader {
        leader_id: Option<NodeId>,
        leader_address: Option<String>,
    },
    #[error("overloaded: too many requests queued")]
    Overloaded,
    #[error("unavailable: {0}")]
    Unavailable(String),
}

type Reply<A> = oneshot::Sender<Result<<A as App>::Response, ProposeError>>;

pub struct Proposer<A: App> {
    queue: mpsc::Sender<(A::Request, Reply<A>)>,
}

impl<A: App> Clone for Proposer<A> {
    fn clone(&self) -> Self {
        Proposer {
            queue: self.queue.clone(),
        }
    }
}

impl<A: App> Proposer<A> {
    pub fn start(raft: Raft<A>, limits: ProposerLimits, metrics: &RaftMetrics) -> Proposer<A> {
        let (queue, receiver) = mpsc::channel(limits.queue_max);
        tokio::spawn(pack(raft, limits, receiver, metrics.entry_requests.clone()));
        Proposer { queue }
    }

    /// Replicates and applies one request; returns the application's response.
    pub async fn propose(&self, request: A::Request) -> Result<A::Response, ProposeError> {
        let (reply, response) = oneshot::channel();
        self.queue
            .try_send((request, reply))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => ProposeError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    ProposeError::Unavailable("shutting down".into())
                }
            })?;
        response
            .await
            .map_err(|_| ProposeError::Unavailable("shutting down".into()))?
    }
}

async fn pack<A: App>(
    raft: Raft<A>,
    limits: ProposerLimits,
    queue: mpsc::Receiver<(A::Request, Reply<A>)>,
    entry_requests: Histogram,
) {
    let limits = BatchLimits {
        in_flight_max: limits.entries_in_flight_max,
        items_max: limits.entry_requests_max,
        weight_max: usize::MAX,
        window: limits.window,
        window_only_when_busy: false,
    };
    run_batches(
        queue,
        limits,
        |_| 0,
        |requests| {
            entry_requests.observe(requests.len() as f64);
            let raft = raft.clone();
            async move { commit(&raft, requests).await }
        },
    )
    .await;
}

async fn commit<A: App>(raft: &Raft<A>, requests: Vec<(A::Request, Reply<A>)>) {
    let (payload, replies): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
    let proposal = Proposal {
        timestamp_ms: now_ms(),
        requests: payload.into(),
    };
    match raft.client_write(proposal).await {
        Ok(written) => {
            for (reply, response) in replies.into_iter().zip(written.data) {
                let _ = reply.send(Ok(response));
            }
        }
        Err(error) => {
            let error = propose_error(error);
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

fn propose_error(
    error: RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>,
) -> ProposeError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ProposeError::NotLeader {
                leader_id: forward.leader_id,
                leader_address: forward.leader_node.map(|node| node.addr),
            }
        }
        other => ProposeError::Unavailable(other.to_string()),
    }
}

/// The leader's clock, stamped into each entry. The only place the Raft path reads a clock.
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}
