//! The connector: tails one Raft group's event log — a storage shard's ledger events or a
//! coordinator shard's transaction events — and publishes each event to its topic
//! (`wallet.ledger.events`, `wallet.marker.transactions`; key = group id, one partition per group
//! so its order is kept) with an idempotent producer. After a restart it reads the last seq
//! already in the partition for the group and resumes right after it: nothing skipped, nothing
//! published twice.

use std::time::Duration;

use auticuro::client::channel;
use futures::{Stream, StreamExt};
use prost::Message as _;
use prost::bytes::{Buf as _, Bytes};
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;
use proto::marker::v1 as marker;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// How far back from the end of a partition the connector looks for its group's last event.
const RESUME_SCAN_MESSAGES_MAX: i64 = 10_000;
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the topic holds an undecodable event at offset {offset}")]
    Corrupt { offset: i64 },
    #[error(
        "no event of group {group_id} in the last {RESUME_SCAN_MESSAGES_MAX} messages of its partition"
    )]
    ResumePointNotFound { group_id: u32 },
}

/// A storage shard and its replicas (events stream from any of them).
#[derive(Clone, Debug)]
pub struct ShardSource {
    pub shard_id: u32,
    pub replicas: Vec<String>,
}

/// Which event log a group keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Log {
    /// A storage shard's `wallet.auticuro.v1.Event`s.
    Ledger,
    /// A coordinator shard's `wallet.marker.v1.CoordinatorEvent`s.
    Coordinator,
}

impl Log {
    /// The group id and seq of an encoded event of this log.
    fn position(self, payload: &[u8]) -> Option<(u32, u64)> {
        match self {
            Log::Ledger => pb::Event::decode(payload)
                .ok()
                .map(|event| (event.shard_id, event.seq)),
            Log::Coordinator => marker::CoordinatorEvent::decode(payload)
                .ok()
                .map(|event| (event.coordinator_shard_id, event.seq)),
        }
    }
}

/// A group whose event log the connector publishes.
#[derive(Clone, Debug)]
pub struct LogSource {
    pub log: Log,
    pub group_id: u32,
    pub replicas: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Destination {
    pub brokers: String,
    pub topic: String,
    /// The partition this group's events go to.
    pub partition: i32,
}

/// The last seq of the group already in the partition (0 when there is none).
pub fn last_published_seq(
    destination: &Destination,
    log: Log,
    group_id: u32,
) -> Result<u64, ConnectorError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &destination.brokers)
        .set("group.id", format!("wallet-connector-resume-{group_id}"))
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
        let (group, seq) = log
            .position(message.payload().unwrap_or_default())
            .ok_or(ConnectorError::Corrupt { offset })?;
        if group == group_id {
            return Ok(seq);
        }
        end = offset;
    }
    if end == low {
        return Ok(0);
    }
    Err(ConnectorError::ResumePointNotFound { group_id })
}

/// An event as the connector publishes it: its seq and its encoding.
type Encoded = (u64, Bytes);

/// A live subscription to the group's log from `from_seq`, from the first replica that accepts
/// it (trying each in turn until one does).
async fn subscribe_encoded(
    source: &LogSource,
    from_seq: u64,
) -> std::pin::Pin<Box<dyn Stream<Item = Encoded> + Send>> {
    match source.log {
        Log::Ledger => {
            let shard = ShardSource {
                shard_id: source.group_id,
                replicas: source.replicas.clone(),
            };
            let stream = subscribe(&shard, from_seq).await;
            Box::pin(stream_items(stream).map(|event| (event.message.seq, event.encoded)))
        }
        Log::Coordinator => {
            let stream = from_any_replica(&source.replicas, |channel| {
                let request = marker::SubscribeRequest { from_seq };
                stream_received::<_, marker::CoordinatorEvent>(
                    channel,
                    COORDINATOR_SUBSCRIBE,
                    request,
                )
            })
            .await;
            Box::pin(stream_items(stream).map(|event| (event.message.seq, event.encoded)))
        }
    }
}

/// A message as it arrived, with the bytes it arrived in: published and stored as they are,
/// not encoded again.
pub struct Received<T> {
    pub message: T,
    pub encoded: Bytes,
}

// The methods' paths, as the generated clients spell them.
const LEDGER_SUBSCRIBE: &str = "/wallet.auticuro.v1.Ledger/Subscribe";
const COORDINATOR_SUBSCRIBE: &str = "/wallet.marker.v1.Coordinator/Subscribe";

/// Calls the server-streaming method at `path`, keeping each answer's bytes ([`Received`]).
async fn stream_received<Q, A>(
    channel: tonic::transport::Channel,
    path: &'static str,
    request: Q,
) -> Result<tonic::Streaming<Received<A>>, tonic::Status>
where
    Q: prost::Message + Send + Sync + 'static,
    A: prost::Message + Default + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let codec = KeepBytes::<Q, A>(std::marker::PhantomData);
    Ok(grpc
        .server_streaming(tonic::Request::new(request), path, codec)
        .await?
        .into_inner())
}

/// Encodes requests with prost; decodes answers into [`Received`].
struct KeepBytes<Q, A>(std::marker::PhantomData<(Q, A)>);

impl<Q, A> tonic::codec::Codec for KeepBytes<Q, A>
where
    Q: prost::Message + Send + 'static,
    A: prost::Message + Default + Send + 'static,
{
    type Encode = Q;
    type Decode = Received<A>;
    type Encoder = tonic_prost::ProstEncoder<Q>;
    type Decoder = KeepBytes<Q, A>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        KeepBytes(std::marker::PhantomData)
    }
}

impl<Q, A> tonic::codec::Decoder for KeepBytes<Q, A>
where
    A: prost::Message + Default,
{
    type Item = Received<A>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Received<A>>, tonic::Status> {
        let encoded = buf.copy_to_bytes(buf.remaining());
        let message = A::decode(encoded.clone())
            .map_err(|error| tonic::Status::internal(error.to_string()))?;
        Ok(Some(Received { message, encoded }))
    }
}

/// The first successful answer of `call`, trying each replica in turn until one gives one.
async fn from_any_replica<T, F, Fut>(replicas: &[String], mut call: F) -> T
where
    F: FnMut(tonic::transport::Channel) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut attempt = 0usize;
    loop {
        attempt += 1;
        let address = &replicas[attempt % replicas.len()];
        if let Ok(channel) = channel(address)
            && let Ok(answer) = call(channel).await
        {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The messages of a gRPC stream until it ends or fails.
fn stream_items<T: Send + 'static>(stream: tonic::Streaming<T>) -> impl Stream<Item = T> + Send {
    futures::stream::unfold(stream, |mut stream| async move {
        match stream.message().await {
            Ok(Some(item)) => Some((item, stream)),
            _ => None,
        }
    })
}

/// Publishes the group's events from where the partition ends, for as long as it runs. Returns
/// only on a Kafka error; a replica that goes away is replaced by the next one.
pub async fn run(source: LogSource, destination: Destination) -> Result<(), ConnectorError> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &destination.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let resume = {
        let (destination, log, group_id) = (destination.clone(), source.log, source.group_id);
        tokio::task::spawn_blocking(move || last_published_seq(&destination, log, group_id))
            .await
            .expect("the resume scan does not panic")?
    };
    let mut next = resume + 1;
    let key = source.group_id.to_string();
    loop {
        let mut stream = subscribe_encoded(&source, next).await;
        while let Some((seq, payload)) = stream.next().await {
            // Events arrive in order from `next`; anything else is a bug upstream.
            assert_eq!(
                seq, next,
                "group {} skipped from {next} to {seq}",
                source.group_id
            );
            let record = FutureRecord::to(&destination.topic)
                .partition(destination.partition)
                .key(&key)
                .payload(payload.as_ref());
            producer
                .send(record, KAFKA_TIMEOUT)
                .await
                .map_err(|(error, _)| error)?;
            next += 1;
        }
        tracing::warn!(group = source.group_id, "event stream ended; resubscribing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The shard's last event seq, as the first replica that answers knows it.
pub async fn head_seq(source: &ShardSource) -> u64 {
    let request = pb::ReadEventsRequest {
        from_seq: 1,
        to_seq: 1,
        limit: 1,
    };
    from_any_replica(&source.replicas, |channel| async move {
        LedgerClient::new(channel).read_events(request).await
    })
    .await
    .into_inner()
    .applied_seq
}

/// Creates the topic with `partitions` partitions unless it exists.
pub async fn ensure_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
) -> Result<(), ConnectorError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for result in admin.create_topics([&new], &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(ConnectorError::Kafka(rdkafka::error::KafkaError::AdminOp(
                    code,
                )));
            }
        }
    }
    Ok(())
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
pub async fn subscribe(
    source: &ShardSource,
    from_seq: u64,
) -> tonic::Streaming<Received<pb::Event>> {
    from_any_replica(&source.replicas, |channel| {
        let request = pb::SubscribeRequest { from_seq };
        stream_received(channel, LEDGER_SUBSCRIBE, request)
    })
    .await
}
