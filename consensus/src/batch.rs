//! Batching: what callers queue while earlier batches are in flight leaves together in the next
//! one, so under load batches grow by themselves and one round trip, fsync or statement serves
//! many requests. Group commit on a leader ([`crate::Proposer`]), shared calls in the storage
//! shard client and the gateway's grouped statements all run on [`run_batches`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// The most batches in flight at once; items queue meanwhile.
    pub in_flight_max: usize,
    /// The most items in one batch.
    pub items_max: usize,
    /// The most weight in one batch (by the `weight` given to [`run_batches`]); the item that
    /// reaches it is the batch's last.
    pub weight_max: usize,
    /// How long a batch waits for more items once the queue is empty.
    pub window: Duration,
    /// Waits `window` only while another batch is in flight (most likely its callers are
    /// sending their next items right now); otherwise every batch waits.
    pub window_only_when_busy: bool,
}

impl BatchLimits {
    /// Batches of what is queued when a slot frees, without waiting for more.
    pub fn unwindowed(in_flight_max: usize, items_max: usize) -> BatchLimits {
        BatchLimits {
            in_flight_max,
            items_max,
            weight_max: usize::MAX,
            window: Duration::ZERO,
            window_only_when_busy: true,
        }
    }
}

/// Where items wait for their batch: either kind of Tokio channel.
pub trait Queue<T>: Send {
    fn recv(&mut self) -> impl Future<Output = Option<T>> + Send;
    /// An item already queued; `None` when there is none (or the queue is closed).
    fn try_recv(&mut self) -> Option<T>;
}

impl<T: Send> Queue<T> for mpsc::Receiver<T> {
    fn recv(&mut self) -> impl Future<Output = Option<T>> + Send {
        mpsc::Receiver::recv(self)
    }

    fn try_recv(&mut self) -> Option<T> {
        mpsc::Receiver::try_recv(self).ok()
    }
}

impl<T: Send> Queue<T> for mpsc::UnboundedReceiver<T> {
    fn recv(&mut self) -> impl Future<Output = Option<T>> + Send {
        mpsc::UnboundedReceiver::recv(self)
    }

    fn try_recv(&mut self) -> Option<T> {
        mpsc::UnboundedReceiver::try_recv(self).ok()
    }
}

/// Takes the queued items in batches within `limits` and spawns `run` on each; ends when the
/// queue closes.
pub async fn run_batches<T, Q, F, Fut>(
    mut queue: Q,
    limits: BatchLimits,
    weight: impl Fn(&T) -> usize,
    mut run: F,
) where
    Q: Queue<T>,
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(limits.in_flight_max));
    while let Some(first) = queue.recv().await {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let busy = in_flight.available_permits() + 1 < limits.in_flight_max;
        let waits = busy || !limits.window_only_when_busy;
        let gathered_by = tokio::time::Instant::now() + limits.window;
        let mut batch_weight = weight(&first);
        let mut batch = vec![first];
        while batch.len() < limits.items_max && batch_weight < limits.weight_max {
            let next = match queue.try_recv() {
                Some(next) => next,
                None if waits => match tokio::time::timeout_at(gathered_by, queue.recv()).await {
                    Ok(Some(next)) => next,
                    Ok(None) | Err(_) => break,
                },
                None => break,
            };
            batch_weight += weight(&next);
            batch.push(next);
        }
        let running = run(batch);
        tokio::spawn(async move {
            running.await;
            drop(permit);
        });
    }
}

/// Requests answered in batches: [`Batcher::submit`] queues one and waits for its answer.
pub struct Batcher<T, R> {
    queue: mpsc::UnboundedSender<(T, oneshot::Sender<R>)>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the task that runs batches within `limits`: `run` answers each of its items, in
    /// order. Must be called in a Tokio runtime.
    pub fn start<F, Fut>(limits: BatchLimits, run: F) -> Batcher<T, R>
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run_batches(
            receiver,
            limits,
            |_| 0,
            move |batch: Vec<(T, oneshot::Sender<R>)>| {
                let (items, replies): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
                let answers = run(items);
                async move {
                    for (reply, answer) in replies.into_iter().zip(answers.await) {
                        let _ = reply.send(answer);
                    }
                }
            },
        ));
        Batcher { queue }
    }

    /// Queues `item` for the next batch and waits for its answer (`None`: the batcher is gone,
    /// or its batch ended without answering it).
    pub async fn submit(&self, item: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((item, reply)).ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn requests_queued_behind_a_batch_in_flight_leave_together_and_each_gets_its_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let limits = BatchLimits::unwindowed(1, 4);
        let batcher = Arc::new(Batcher::start(limits, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                items.into_iter().map(|item| item * 10).collect()
            }
        }));
        let first = tokio::spawn({
            let batcher = Arc::clone(&batcher);
            async move { batcher.submit(1).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest: Vec<_> = (2..=7)
            .map(|item| {
                let batcher = Arc::clone(&batcher);
                tokio::spawn(async move { batcher.submit(item).await })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Some(10));
        for (item, answer) in (2..=7).zip(rest) {
            assert_eq!(answer.await.unwrap(), Some(item * 10));
        }
        // One alone, then the six that queued behind it in batches of at most four.
        assert_eq!(*sizes.lock().unwrap(), [1, 4, 2]);
    }

    #[tokio::test]
    async fn a_batch_ends_at_its_weight_and_waits_its_window_for_more() {
        let (queue, receiver) = mpsc::unbounded_channel();
        let (batches, mut sizes) = mpsc::unbounded_channel();
        let limits = BatchLimits {
            in_flight_max: 1,
            items_max: 100,
            weight_max: 10,
            window: Duration::from_millis(500),
            window_only_when_busy: false,
        };
        tokio::spawn(run_batches(
            receiver,
            limits,
            |item: &usize| *item,
            move |batch: Vec<usize>| {
                let _ = batches.send(batch);
                async {}
            },
        ));
        // 4 + 4 + 4 reaches the weight: the third item is the batch's last.
        for item in [4, 4, 4, 1] {
            queue.send(item).unwrap();
        }
        assert_eq!(sizes.recv().await.unwrap(), [4, 4, 4]);
        // The next batch waits for the item sent within its window.
        tokio::time::sleep(Duration::from_millis(10)).await;
        queue.send(2).unwrap();
        assert_eq!(sizes.recv().await.unwrap(), [1, 2]);
    }
}
