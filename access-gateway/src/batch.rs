//! Group writes: what concurrent requests queue while earlier statements are in flight leaves
//! together in the next one, so a busy gateway pays one round trip, one commit and one fsync
//! for many requests instead of one each.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

type Queued<T, R> = (T, oneshot::Sender<R>);

pub struct Batcher<T, R> {
    queue: mpsc::UnboundedSender<Queued<T, R>>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the task that runs batches: `run` gets up to `items_max` items and answers each,
    /// in order; at most `in_flight_max` batches run at once. Must be called in a Tokio runtime.
    pub fn start<F, Fut>(in_flight_max: usize, items_max: usize, run: F) -> Batcher<T, R>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run_batches(receiver, in_flight_max, items_max, run));
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

async fn run_batches<T, R, F, Fut>(
    mut queue: mpsc::UnboundedReceiver<Queued<T, R>>,
    in_flight_max: usize,
    items_max: usize,
    run: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(in_flight_max));
    while let Some(first) = queue.recv().await {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // Everything that queued while the permit was awaited goes along.
        let mut batch = vec![first];
        while batch.len() < items_max {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
        let answers = run(items);
        tokio::spawn(async move {
            for (reply, answer) in replies.into_iter().zip(answers.await) {
                let _ = reply.send(answer);
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn requests_queued_behind_a_batch_in_flight_leave_together_and_each_gets_its_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let batcher = Arc::new(Batcher::start(1, 4, move |items: Vec<u32>| {
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
}
