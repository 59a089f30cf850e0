//! The projector: reads events (from Kafka with a consumer group, or straight from the storage
//! shards in the embedded default), checks each shard's continuity, and writes Postgres in
//! batches, each one SQL transaction that also records the applied seq per shard. Kafka offsets
//! are committed only after the batch is, and never past an event held back by a gap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use proto::auticuro::v1 as pb;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::connector::{ShardSource, subscribe};
use crate::cursor::{Cursor, Offer};
use crate::metrics::ProjectionMetrics;
use crate::store::{self, StoreError};

/// Events written in one SQL transaction at most.
pub const BATCH_EVENTS_MAX: usize = 2_000;
const RETRY_PAUSE: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub enum Source {
    /// Straight from the storage shards' event streams: a local cluster needs only Postgres.
    Shards(Vec<ShardSource>),
    /// The `wallet.ledger.events` topic, read with a consumer group.
    Kafka {
        brokers: String,
        topic: String,
        group: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the event source ended")]
    SourceEnded,
}

/// Where an event was read from Kafka, for committing offsets.
type Position = Option<(i32, i64)>;

struct Incoming {
    event: pb::Event,
    position: Position,
}

/// Projects for as long as it runs; after an error (Postgres away, another writer moved a
/// shard) it starts over from the applied seqs in Postgres.
pub async fn run(pool: PgPool, source: Source, metrics: ProjectionMetrics) {
    loop {
        if let Err(error) = project(&pool, &source, &metrics, None).await {
            tracing::error!(%error, "projection stopped; starting over");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Projects until every shard in `until` has reached its seq (forever with `None`).
pub async fn project(
    pool: &PgPool,
    source: &Source,
    metrics: &ProjectionMetrics,
    until: Option<&BTreeMap<u32, u64>>,
) -> Result<(), ProjectorError> {
    let applied = store::applied_seqs(pool).await?;
    let reached = |cursors: &BTreeMap<u32, Cursor<Incoming>>| {
        until.is_some_and(|until| {
            until.iter().all(|(shard, seq)| {
                let done = cursors
                    .get(shard)
                    .map_or(applied.get(shard).copied().unwrap_or(0), Cursor::applied);
                done >= *seq
            })
        })
    };
    let mut cursors: BTreeMap<u32, Cursor<Incoming>> = BTreeMap::new();
    if reached(&cursors) {
        return Ok(());
    }
    let (sender, mut receiver) = mpsc::channel::<Incoming>(BATCH_EVENTS_MAX * 2);
    let mut feeders = JoinSet::new();
    let consumer = match source {
        Source::Shards(shards) => {
            for shard in shards {
                let from = applied.get(&shard.shard_id).copied().unwrap_or(0) + 1;
                feeders.spawn(feed_from_shard(shard.clone(), from, sender.clone()));
            }
            None
        }
        Source::Kafka {
            brokers,
            topic,
            group,
        } => {
            let consumer: StreamConsumer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .create()?;
            consumer.subscribe(&[topic])?;
            let consumer = Arc::new(consumer);
            feeders.spawn(feed_from_kafka(
                consumer.clone(),
                sender.clone(),
                metrics.clone(),
            ));
            Some(consumer)
        }
    };
    drop(sender);
    let mut seen: BTreeMap<i32, i64> = BTreeMap::new();
    let mut gather = |first: Option<Incoming>, receiver: &mut mpsc::Receiver<Incoming>| {
        let mut batch: Vec<pb::Event> = Vec::new();
        let mut offer = |incoming: Incoming, batch: &mut Vec<pb::Event>| {
            if let Some((partition, offset)) = incoming.position {
                seen.insert(partition, offset);
            }
            let shard_id = incoming.event.shard_id;
            let seq = incoming.event.seq;
            let cursor = cursors
                .entry(shard_id)
                .or_insert_with(|| Cursor::new(applied.get(&shard_id).copied().unwrap_or(0)));
            match cursor.offer(seq, incoming) {
                Offer::Ready(ready) => batch.extend(ready.into_iter().map(|(_, i)| i.event)),
                Offer::Held | Offer::Replay => {}
                Offer::Dropped => {
                    metrics.dropped.inc();
                }
            }
        };
        let mut received = first.is_some();
        if let Some(first) = first {
            offer(first, &mut batch);
        }
        while batch.len() < BATCH_EVENTS_MAX {
            match receiver.try_recv() {
                Ok(incoming) => {
                    received = true;
                    offer(incoming, &mut batch);
                }
                Err(_) => break,
            }
        }
        if !received {
            return Ok(None);
        }
        let mut any_gap = false;
        for (shard_id, cursor) in &cursors {
            let gap = cursor.gap();
            any_gap |= gap.is_some();
            metrics.set_gap(*shard_id, gap, cursor.applied());
        }
        Ok::<_, StoreError>(Some(Gathered {
            prepared: store::prepare(batch)?,
            // Offsets are committed once the batch is, and never past an event held back by a gap.
            offsets: (!any_gap).then(|| seen.clone()),
            last: reached(&cursors),
        }))
    };
    let mut upcoming: Option<Gathered> = None;
    loop {
        let gathered = match upcoming.take() {
            Some(gathered) => gathered,
            None => {
                let Some(first) = receiver.recv().await else {
                    return Err(ProjectorError::SourceEnded);
                };
                gather(Some(first), &mut receiver)?.expect("an event was received")
            }
        };
        let writing = tokio::spawn({
            let pool = pool.clone();
            async move { store::write(&pool, gathered.prepared).await }
        });
        // The events already waiting are prepared while the batch is written.
        let next = if gathered.last {
            Ok(None)
        } else {
            gather(None, &mut receiver)
        };
        let events = writing.await.expect("the batch writer never panics")?;
        upcoming = next?;
        metrics.applied(&events);
        if let Some(consumer) = &consumer
            && let Some(offsets) = gathered.offsets.filter(|seen| !seen.is_empty())
        {
            let Source::Kafka { topic, .. } = source else {
                unreachable!("a consumer exists only for a Kafka source")
            };
            let mut list = TopicPartitionList::new();
            for (partition, offset) in &offsets {
                list.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))?;
            }
            consumer.commit(&list, CommitMode::Async)?;
        }
        if gathered.last {
            return Ok(());
        }
    }
}

/// A batch read from the source and prepared for writing.
struct Gathered {
    prepared: store::Prepared,
    /// The Kafka offsets to commit once it is written.
    offsets: Option<BTreeMap<i32, i64>>,
    /// Whether it reaches every shard's `until`.
    last: bool,
}

/// Follows one shard's event stream from `from`, across replicas, for as long as the receiver
/// is there.
async fn feed_from_shard(source: ShardSource, mut next: u64, sender: mpsc::Sender<Incoming>) {
    loop {
        let mut stream = subscribe(&source, next).await;
        while let Ok(Some(event)) = stream.message().await {
            next = event.seq + 1;
            let incoming = Incoming {
                event,
                position: None,
            };
            if sender.send(incoming).await.is_err() {
                return;
            }
        }
        tracing::warn!(shard = source.shard_id, "event stream ended; resubscribing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn feed_from_kafka(
    consumer: Arc<StreamConsumer>,
    sender: mpsc::Sender<Incoming>,
    metrics: ProjectionMetrics,
) {
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "kafka consumer");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        let Ok(event) = pb::Event::decode(message.payload().unwrap_or_default()) else {
            tracing::error!(
                partition = message.partition(),
                offset = message.offset(),
                "undecodable message skipped"
            );
            metrics.alarms.inc();
            continue;
        };
        let incoming = Incoming {
            event,
            position: Some((message.partition(), message.offset())),
        };
        if sender.send(incoming).await.is_err() {
            return;
        }
    }
}
