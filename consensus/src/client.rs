//! A client of one Raft group: finds the leader, follows typed redirects, and retries an unknown
//! outcome (timeout, unreachable replica, overload) until a definite answer or the deadline.
//! Callers make every request idempotent (a request id, a transaction id), so a retry can never
//! apply anything twice.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use proto::raft::v1 as raft;
use proto::raft::v1::raft_admin_client::RaftAdminClient;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::batch::{BatchLimits, run_batches};

/// How long one attempt may take before it counts as unknown and is retried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause after an attempt that reached no leader, before the next one.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The outcome could not be learned before the deadline: the request may or may not have applied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("outcome unknown after retrying until the deadline: {last_error}")]
pub struct Unknown {
    pub last_error: String,
}

/// A lazily connecting channel with the platform's timeouts.
pub fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// How long an admin call to one replica may take before the replica counts as not answering,
/// so that a call left without an answer cannot stall a loop that polls the replicas.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The Raft status of the replica at `address`, or why it gave none within [`ADMIN_TIMEOUT`].
pub async fn raft_status(address: &str) -> Result<raft::StatusResponse, String> {
    raft_status_over(channel(address).map_err(|error| error.to_string())?).await
}

/// [`raft_status`] over a channel the caller keeps.
pub async fn raft_status_over(channel: Channel) -> Result<raft::StatusResponse, String> {
    admin_call(RaftAdminClient::new(channel).status(raft::StatusRequest {})).await
}

/// The answer of one admin call, or why there was none within [`ADMIN_TIMEOUT`].
pub async fn admin_call<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(ADMIN_TIMEOUT, call).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => Err(status.to_string()),
        Err(_) => Err(format!("no answer within {ADMIN_TIMEOUT:?}")),
    }
}

/// What one call to a replica gave.
pub enum Answer<T> {
    Done(T),
    /// Not the leader; the leader's address when the replica knows it.
    Redirect(Option<String>),
    Empty,
}

/// The replicas of one group, a channel to each, and the replica believed to lead.
pub struct LeaderClient {
    /// Names the group in errors ("shard 3", "coordinator shard 1").
    name: String,
    replicas: Mutex<Vec<String>>,
    channels: Mutex<HashMap<String, Channel>>,
    leader: Mutex<Option<String>>,
}

impl LeaderClient {
    pub fn new(name: String, replicas: Vec<String>) -> LeaderClient {
        assert!(!replicas.is_empty(), "a group has at least one replica");
        LeaderClient {
            name,
            replicas: Mutex::new(replicas),
            channels: Mutex::default(),
            leader: Mutex::default(),
        }
    }

    pub fn replicas(&self) -> Vec<String> {
        self.replicas.lock().expect("no poisoned lock").clone()
    }

    /// Replaces the replica addresses (after a membership change).
    pub fn set_replicas(&self, replicas: Vec<String>) {
        assert!(!replicas.is_empty(), "a group has at least one replica");
        *self.replicas.lock().expect("no poisoned lock") = replicas;
        self.remember_leader(None);
    }

    /// One shared channel per replica address.
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().expect("no poisoned lock");
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = channel(address).map_err(|error| error.to_string())?;
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// The replica believed to lead, or one of them in turn when none is known.
    pub fn target(&self, attempt: usize) -> String {
        self.leader
            .lock()
            .expect("no poisoned lock")
            .clone()
            .unwrap_or_else(|| {
                let replicas = self.replicas.lock().expect("no poisoned lock");
                replicas[attempt % replicas.len()].clone()
            })
    }

    /// Records the replica believed to lead (`None`: ask the replicas in turn), for callers
    /// that make their own calls on [`LeaderClient::target`] and read redirects themselves.
    pub fn remember_leader(&self, address: Option<String>) {
        *self.leader.lock().expect("no poisoned lock") = address;
    }

    /// Calls the leader (following redirects) until `call` gives an answer or `deadline`
    /// passes; a transport error or an unknown leader leads to the next replica after a pause.
    pub async fn on_leader<T, F, Fut>(&self, deadline: Instant, mut call: F) -> Result<T, Unknown>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<Answer<T>, tonic::Status>>,
    {
        let mut attempt = 0usize;
        let mut last_error = String::from("no attempt made");
        while Instant::now() < deadline {
            attempt += 1;
            let address = self.target(attempt);
            let channel = match self.channel(&address) {
                Ok(channel) => channel,
                Err(error) => {
                    last_error = error;
                    self.remember_leader(None);
                    continue;
                }
            };
            let timeout = ATTEMPT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            match call(channel, timeout).await {
                Ok(Answer::Done(answer)) => {
                    self.remember_leader(Some(address));
                    return Ok(answer);
                }
                Ok(Answer::Redirect(Some(leader))) => {
                    last_error = format!("redirected by {address}");
                    self.remember_leader(Some(leader));
                    continue;
                }
                Ok(Answer::Redirect(None)) => last_error = format!("{address} knows no leader"),
                Ok(Answer::Empty) => last_error = format!("empty reply from {address}"),
                Err(status) => last_error = format!("{address}: {status}"),
            }
            self.remember_leader(None);
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(Unknown {
            last_error: format!("{}: {last_error}", self.name),
        })
    }
}

/// A request waiting for its shared call, and where its caller waits for the answer.
pub struct Queued<T, R> {
    pub request: T,
    deadline: Instant,
    reply: oneshot::Sender<Result<R, Unknown>>,
}

impl<T, R> Queued<T, R> {
    pub fn answer(self, answer: Result<R, Unknown>) {
        let _ = self.reply.send(answer);
    }

    /// Answers that the outcome is unknown: the caller sends the request again.
    pub fn unknown(self, last_error: &str) {
        self.answer(Err(Unknown {
            last_error: last_error.to_string(),
        }));
    }
}

/// One call for many requests to the group, made until the deadline (the soonest of theirs):
/// it answers every request it is given.
pub type CallMany<T, R> =
    fn(Arc<LeaderClient>, Vec<Queued<T, R>>, Instant) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// How requests share calls: at most 2 calls in flight to the group, each of up to 256
/// requests and 1 MiB of them (well under the 4 MiB message limit; every service that takes
/// many requests in one call takes at least 256). With another call in flight, a call waits up
/// to 300 µs for more: the call that freed its slot most likely answered callers who are
/// sending their next requests right now.
const SHARED_CALLS: BatchLimits = BatchLimits {
    in_flight_max: 2,
    items_max: 256,
    weight_max: 1 << 20,
    window: Duration::from_micros(300),
    window_only_when_busy: true,
};

/// Requests to a group's leader that share calls: what callers queue while calls are in
/// flight leaves together in the next one (within `SHARED_CALLS`), so a busy client pays one
/// round trip for many requests. Every request must be idempotent: one whose outcome is
/// unknown is sent again until its deadline.
pub struct SharedCalls<T, R> {
    pub group: Arc<LeaderClient>,
    /// A request's encoded size.
    weight: fn(&T) -> usize,
    call: CallMany<T, R>,
    /// The queue, started by the first request.
    queue: OnceLock<mpsc::UnboundedSender<Queued<T, R>>>,
}

impl<T: Clone + Send + 'static, R: Send + 'static> SharedCalls<T, R> {
    pub fn new(
        group: LeaderClient,
        weight: fn(&T) -> usize,
        call: CallMany<T, R>,
    ) -> SharedCalls<T, R> {
        SharedCalls {
            group: Arc::new(group),
            weight,
            call,
            queue: OnceLock::new(),
        }
    }

    /// Sends `request` in a shared call, and again after each unknown outcome, until
    /// `deadline`.
    pub async fn send(&self, request: T, deadline: Instant) -> Result<R, Unknown> {
        let queue = self.queue.get_or_init(|| {
            let (queue, requests) = mpsc::unbounded_channel();
            let (group, call, weight) = (self.group.clone(), self.call, self.weight);
            tokio::spawn(run_batches(
                requests,
                SHARED_CALLS,
                move |queued: &Queued<T, R>| weight(&queued.request),
                move |batch: Vec<Queued<T, R>>| {
                    let now = Instant::now();
                    let (live, expired): (Vec<_>, Vec<_>) =
                        batch.into_iter().partition(|queued| queued.deadline > now);
                    for queued in expired {
                        queued.unknown("the deadline passed while queued");
                    }
                    let group = group.clone();
                    async move {
                        if let Some(deadline) = live.iter().map(|queued| queued.deadline).min() {
                            call(group, live, deadline).await;
                        }
                    }
                },
            ));
            queue
        });
        let mut last_error = String::from("no attempt made");
        while Instant::now() < deadline {
            let (reply, answer) = oneshot::channel();
            let queued = Queued {
                request: request.clone(),
                deadline,
                reply,
            };
            if queue.send(queued).is_err() {
                break;
            }
            // Answered by the deadline even when the calls ahead of this one take longer: the
            // request may still be sent later, which its idempotency makes harmless.
            match tokio::time::timeout_at(deadline.into(), answer).await {
                Ok(Ok(Ok(result))) => return Ok(result),
                Ok(Ok(Err(unknown))) => last_error = unknown.last_error,
                Ok(Err(_)) => last_error = "the client was dropped".into(),
                Err(_) => last_error = "no answer by the deadline".into(),
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(Unknown { last_error })
    }
}
