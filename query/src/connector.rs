//! The connector: tails one storage shard's event stream and publishes each event to the
//! `wallet.ledger.events` topic (key = shard id, one partition per shard so its order is kept),
//! with an idempotent producer. After a restart it reads the last seq already in the topic for
//! the shard and resumes right after it: nothing skipped, nothing published twice.

use std::time::Duration;

use auticuro::client::channel;
use prost::Message as _;
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// How far back from the end of a partition the connector looks for its shard's last event.
const RESUME_SCAN_MESSAGES_MAX: i64 = 10_000;
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the topic holds an undecodable event at offset {offset}")]
    Corrupt { offset: i64 },
    #[error(
        "no event of shard {shard_id} in the last {RESUME_SCAN_MESSAGES_MAX} messages of its partition"
    )]
    ResumePointNotFound { shard_id: u32 },
}

#[derive(Clone, Debug)]
pub struct ShardSource {
    pub shard_id: u32,
    /// The shard's replicas; events stream from any of them.
    pub replicas: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Destination {
    pub brokers: String,
    pub topic: String,
    /// The partition this shard's events go to (one partition per shard keeps its order).
    pub partition: i32,
}

/// The last seq of `shard_id` already in the partition (0 when there is none).
pub fn last_published_seq(destination: &Destination, shard_id: u32) -> Result<u64, ConnectorError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &destination.brokers)
        .set("group.id", format!("wallet-connector-resume-{shard_id}"))
        .set("enable.auto.commit", "false")
        .create()?;
    let (low, high) =
        consumer.fetch_watermarks(&destination.topic, destination.partition, KAFKA_TIMEOUT)?;
    let mut end = high;
    while end > low && high - end < RESUME_SCAN_MESSAGES_MAX {
        let offset = end - 1;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(
            &destination.topic,
            destination.partition,
            Offset::Offset(offset),
        )?;
        consumer.assign(&assignment)?;
        let message = loop {
            match consumer.poll(KAFKA_TIMEOUT) {
                Some(message) => break message?,
                None => continue,
            }
        };
        let event = pb::Event::decode(message.payload().unwrap_or_default())
            .map_err(|_| ConnectorError::Corrupt { offset })?;
        if event.shard_id == shard_id {
            return Ok(event.seq);
        }
        end = offset;
    }
    if end == low {
        return Ok(0);
    }
    Err(ConnectorError::ResumePointNotFound { shard_id })
}

/// Publishes the shard's events from where the topic ends, for as long as it runs. Returns only
/// on a Kafka error; a replica that goes away is replaced by the next one.
pub async fn run(source: ShardSource, destination: Destination) -> Result<(), ConnectorError> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &destination.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let resume = {
        let (destination, shard_id) = (destination.clone(), source.shard_id);
        tokio::task::spawn_blocking(move || last_published_seq(&destination, shard_id))
            .await
            .expect("the resume scan does not panic")?
    };
    let mut next = resume + 1;
    let key = source.shard_id.to_string();
    loop {
        let mut stream = subscribe(&source, next).await;
        while let Ok(Some(event)) = stream.message().await {
            // Events arrive in order from `next`; anything else is a bug upstream.
            assert_eq!(
                event.seq, next,
                "shard {} skipped from {next} to {}",
                source.shard_id, event.seq
            );
            let payload = event.encode_to_vec();
            let record = FutureRecord::to(&destination.topic)
                .partition(destination.partition)
                .key(&key)
                .payload(&payload);
            producer
                .send(record, KAFKA_TIMEOUT)
                .await
                .map_err(|(error, _)| error)?;
            next += 1;
        }
        tracing::warn!(shard = source.shard_id, "event stream ended; resubscribing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The shard's last event seq, as the first replica that answers knows it.
pub async fn head_seq(source: &ShardSource) -> u64 {
    let mut attempt = 0usize;
    loop {
        attempt += 1;
        let address = &source.replicas[attempt % source.replicas.len()];
        if let Ok(channel) = channel(address)
            && let Ok(response) = LedgerClient::new(channel)
                .read_events(pb::ReadEventsRequest {
                    from_seq: 1,
                    to_seq: 1,
                    limit: 1,
                })
                .await
        {
            return response.into_inner().applied_seq;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many partitions the topic has.
pub fn partition_count(brokers: &str, topic: &str) -> Result<usize, ConnectorError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT)?;
    Ok(metadata
        .topics()
        .first()
        .map_or(0, |topic| topic.partitions().len())
        .max(1))
}

/// A live subscription to the shard's events from `from_seq`, from the first replica that
/// accepts it (trying each in turn until one does).
pub async fn subscribe(source: &ShardSource, from_seq: u64) -> tonic::Streaming<pb::Event> {
    let mut attempt = 0usize;
    loop {
        attempt += 1;
        let address = &source.replicas[attempt % source.replicas.len()];
        if let Ok(channel) = channel(address)
            && let Ok(stream) = LedgerClient::new(channel)
                .subscribe(pb::SubscribeRequest { from_seq })
                .await
        {
            return stream.into_inner();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
