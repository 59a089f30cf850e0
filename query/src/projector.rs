//! The projector: reads events (from Kafka with a consumer group, or straight from the storage
//! shards in the embedded default), checks each shard's continuity, and writes Postgres in
//! batches, each one SQL transaction that also records the applied seq per shard. While a batch
//! is written, the next one takes the events that arrive and builds their rows. Kafka offsets
//! are committed only after the batch is, and never past an event held back by a gap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use prost::bytes::Bytes;
use proto::auticuro::v1 as pb;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::connector::{Received, ShardSource, subscribe};
use crate::cursor::{Cursor, Offer};
use crate::metrics::ProjectionMetrics;
use crate::store::{self, Prepared, StoreError};

/// Events written in one SQL transaction at most.
pub const BATCH_EVENTS_MAX: usize = 2_000;
/// The same in a bulk load, where no reader waits for a batch: the server spends less per row
/// in fewer, larger `COPY`s.
const BULK_BATCH_EVENTS_MAX: usize = 10_000;
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// A live batch that takes this long to write is logged.
const SLOW_BATCH: Duration = Duration::from_millis(50);

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
    event: Received<pb::Event>,
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
///
/// With `until` (a rebuild into an empty database, which either finishes or is started over) it
/// loads in bulk ([`store::BulkLoad`]).
pub async fn project(
    pool: &PgPool,
    source: &Source,
    metrics: &ProjectionMetrics,
    until: Option<&BTreeMap<u32, u64>>,
) -> Result<(), ProjectorError> {
    let applied = store::applied_seqs(pool).await?;
    let mut intake = Intake {
        until,
        applied: &applied,
        cursors: BTreeMap::new(),
        seen: BTreeMap::new(),
        metrics,
    };
    if intake.reached() {
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
    let bulk = until.is_some();
    let batch_max = if bulk {
        BULK_BATCH_EVENTS_MAX
    } else {
        BATCH_EVENTS_MAX
    };
    let mut load = match bulk {
        true => Some(store::BulkLoad::open(pool).await?),
        false => None,
    };
    let mut upcoming: Option<Gathered> = None;
    loop {
        let gathered = match upcoming.take() {
            Some(gathered) => gathered,
            None => {
                let Some(first) = receiver.recv().await else {
                    return Err(ProjectorError::SourceEnded);
                };
                let mut batch = Prepared::default();
                intake.offer(first, &mut batch)?;
                while batch.len() < batch_max {
                    let Ok(incoming) = receiver.try_recv() else {
                        break;
                    };
                    intake.offer(incoming, &mut batch)?;
                }
                intake.close(batch)
            }
        };
        let writing_since = tokio::time::Instant::now();
        let mut writing = tokio::spawn({
            let pool = pool.clone();
            let mut load = load.take();
            async move {
                let events = match &mut load {
                    Some(load) => load.write(gathered.prepared).await?,
                    None => store::write(&pool, gathered.prepared).await?,
                };
                Ok::<_, StoreError>((events, load))
            }
        });
        // The next batch takes the events that arrive while this one is written, and is
        // prepared meanwhile.
        let mut next = Prepared::default();
        let mut received = false;
        let mut open = true;
        let mut failed = None;
        let written = loop {
            tokio::select! {
                biased;
                written = &mut writing => break written,
                incoming = receiver.recv(),
                    if open && failed.is_none() && !gathered.last
                        && next.len() < batch_max =>
                {
                    match incoming {
                        Some(incoming) => {
                            received = true;
                            failed = intake.offer(incoming, &mut next).err();
                        }
                        None => open = false,
                    }
                }
            }
        };
        let (events, returned) = written.expect("the batch writer never panics")?;
        load = returned;
        let took = writing_since.elapsed();
        if let Some(error) = failed {
            return Err(error.into());
        }
        if !events.is_empty() {
            metrics.applied(&events, took);
            if !bulk && took >= SLOW_BATCH {
                // With the time, to set beside the logs of the shards and of Postgres.
                tracing::warn!(
                    events = events.len(),
                    ms = took.as_millis() as u64,
                    "a batch took long to write"
                );
            }
        }
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
            if let Some(load) = load {
                load.finish(pool).await?;
            }
            return Ok(());
        }
        upcoming = received.then(|| intake.close(next));
    }
}

/// What the projector has taken in: a cursor per shard (only the next seq passes) and the Kafka
/// offsets read.
struct Intake<'a> {
    until: Option<&'a BTreeMap<u32, u64>>,
    /// The applied seqs in Postgres when projecting started.
    applied: &'a BTreeMap<u32, u64>,
    cursors: BTreeMap<u32, Cursor<Incoming>>,
    seen: BTreeMap<i32, i64>,
    metrics: &'a ProjectionMetrics,
}

impl Intake<'_> {
    /// Whether every shard in `until` has been taken in up to its seq.
    fn reached(&self) -> bool {
        self.until.is_some_and(|until| {
            until.iter().all(|(shard, seq)| {
                let done = self.cursors.get(shard).map_or(
                    self.applied.get(shard).copied().unwrap_or(0),
                    Cursor::applied,
                );
                done >= *seq
            })
        })
    }

    /// Passes `incoming` through its shard's cursor; whatever is next in seq order joins `batch`.
    fn offer(&mut self, incoming: Incoming, batch: &mut Prepared) -> Result<(), StoreError> {
        if let Some((partition, offset)) = incoming.position {
            self.seen.insert(partition, offset);
        }
        let shard_id = incoming.event.message.shard_id;
        let seq = incoming.event.message.seq;
        let applied = self.applied.get(&shard_id).copied().unwrap_or(0);
        let cursor = self
            .cursors
            .entry(shard_id)
            .or_insert_with(|| Cursor::new(applied));
        match cursor.offer(seq, incoming) {
            Offer::Ready(ready) => {
                for (_, incoming) in ready {
                    batch.push(incoming.event)?;
                }
            }
            Offer::Held | Offer::Replay => {}
            Offer::Dropped => {
                self.metrics.dropped.inc();
            }
        }
        Ok(())
    }

    /// Ends a batch: reports the gaps, and notes the offsets to commit once it is written (never
    /// past an event held back by a gap).
    fn close(&mut self, batch: Prepared) -> Gathered {
        let mut any_gap = false;
        for (shard_id, cursor) in &self.cursors {
            let gap = cursor.gap();
            any_gap |= gap.is_some();
            self.metrics.set_gap(*shard_id, gap, cursor.applied());
        }
        Gathered {
            prepared: batch,
            offsets: (!any_gap).then(|| self.seen.clone()),
            last: self.reached(),
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
            next = event.message.seq + 1;
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
        let encoded = Bytes::copy_from_slice(message.payload().unwrap_or_default());
        let Ok(event) = pb::Event::decode(encoded.clone()) else {
            tracing::error!(
                partition = message.partition(),
                offset = message.offset(),
                "undecodable message skipped"
            );
            metrics.alarms.inc();
            continue;
        };
        let incoming = Incoming {
            event: Received {
                message: event,
                encoded,
            },
            position: Some((message.partition(), message.offset())),
        };
        if sender.send(incoming).await.is_err() {
            return;
        }
    }
}
