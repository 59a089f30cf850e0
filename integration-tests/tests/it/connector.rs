//! The connector against real storage and coordinator shards and the real broker: every event
//! lands in the topic once, in order, across a connector that is killed and restarted
//! mid-stream.

use std::time::Duration;

use integration_tests::commands::{command, create, transfer};
use integration_tests::group::Group;
use integration_tests::kafka::KafkaBroker;
use proto::auticuro::v1 as pb;
use query::connector::{Destination, Log, LogSource};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Every event in the partition, in offset order.
fn read_topic<M: prost::Message + Default>(broker: &KafkaBroker, topic: &str) -> Vec<M> {
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", format!("{topic}.check"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut events = Vec::new();
    while (events.len() as i64) < high {
        if let Some(message) = consumer.poll(Duration::from_secs(10)) {
            events.push(M::decode(message.unwrap().payload().unwrap()).unwrap());
        }
    }
    events
}

async fn wait_for_topic_length(broker: &KafkaBroker, topic: &str, length: i64) {
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", format!("{topic}.watch"))
        .create()
        .unwrap();
    for _ in 0..300 {
        let (_, high) = consumer
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .unwrap();
        if high >= length {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the topic never reached {length} messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_is_published_once_in_order_across_a_connector_restart() {
    let broker = KafkaBroker::shared().unwrap();
    let topic = broker.fresh_topic("wallet.ledger.events", 1).await.unwrap();
    let shard = Group::storage(21, 3, &[]).await.unwrap();
    let source = LogSource {
        log: Log::Ledger,
        group_id: 21,
        replicas: shard.replicas.iter().map(|r| r.address.clone()).collect(),
    };
    let destination = Destination {
        brokers: broker.bootstrap_servers().to_string(),
        topic: topic.clone(),
        partition: 0,
    };

    shard
        .execute(command("c-funding", create("sys:funding:USD", true)))
        .await
        .unwrap();
    shard
        .execute(command("c-alice", create("alice", false)))
        .await
        .unwrap();
    let connector = tokio::spawn(query::connector::run(source.clone(), destination.clone()));
    // Transfers keep coming while the connector is killed and restarted.
    let shard = std::sync::Arc::new(shard);
    let writer = tokio::spawn({
        let shard = shard.clone();
        async move {
            for n in 0..60 {
                shard
                    .execute(command(
                        format!("fund-{n}"),
                        transfer("sys:funding:USD", "alice", 1),
                    ))
                    .await
                    .unwrap();
            }
        }
    });
    wait_for_topic_length(broker, &topic, 10).await;
    connector.abort();
    let _ = connector.await;
    let restarted = tokio::spawn(query::connector::run(source, destination));
    writer.await.unwrap();
    wait_for_topic_length(broker, &topic, 62).await;
    restarted.abort();

    let events: Vec<pb::Event> = read_topic(broker, &topic);
    let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
    assert_eq!(
        seqs,
        (1..=62).collect::<Vec<u64>>(),
        "each seq exactly once, in order"
    );
    assert!(events.iter().all(|event| event.shard_id == 21));
    let last = events.last().unwrap();
    assert_eq!(last.request_id, "fund-59");
    assert_eq!(
        last.accounts
            .iter()
            .find(|a| a.account_id == "alice")
            .unwrap()
            .balance
            .as_ref()
            .unwrap()
            .minor_units,
        "60"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_coordinator_event_is_published_once_in_order_across_a_connector_restart() {
    use integration_tests::platform::{Platform, leg};
    use proto::marker::v1 as marker;
    use proto::marker::v1::{LifecycleKind, TransactionStatus};
    let broker = KafkaBroker::shared().unwrap();
    let topic = broker
        .fresh_topic("wallet.marker.transactions", 1)
        .await
        .unwrap();
    let platform = std::sync::Arc::new(Platform::start(&[]).await);
    let alice = platform.open(1, "alice", 1_000).await;
    let bob = platform.open(2, "bob", 0).await;
    let source = LogSource {
        log: Log::Coordinator,
        group_id: 1,
        replicas: platform
            .coordinator
            .replicas
            .iter()
            .map(|r| r.address.clone())
            .collect(),
    };
    let destination = Destination {
        brokers: broker.bootstrap_servers().to_string(),
        topic: topic.clone(),
        partition: 0,
    };
    let connector = tokio::spawn(query::connector::run(source.clone(), destination.clone()));
    let payments = tokio::spawn({
        let platform = platform.clone();
        async move {
            for n in 0..12 {
                platform
                    .pay(&format!("c-{n}"), vec![leg(&alice, -1), leg(&bob, 1)])
                    .await;
            }
        }
    });
    wait_for_topic_length(broker, &topic, 6).await;
    connector.abort();
    let _ = connector.await;
    let restarted = tokio::spawn(query::connector::run(source, destination));
    payments.await.unwrap();
    // Each payment is begun, decided and done: at least three events.
    wait_for_topic_length(broker, &topic, 36).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    restarted.abort();

    let events: Vec<marker::CoordinatorEvent> = read_topic(broker, &topic);
    let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<u64>>(),
        "each seq exactly once, in order"
    );
    assert!(events.iter().all(|event| event.coordinator_shard_id == 1));
    // Begun events carry the whole transaction, later ones its id and what the step set.
    let ids = |kind: LifecycleKind, status: TransactionStatus| {
        events
            .iter()
            .filter(|event| event.kind == kind as i32)
            .filter_map(|event| event.transaction.as_ref())
            .filter(|t| t.status == status as i32)
            .map(|t| (t.txn_id.as_str(), t.done))
            .collect::<std::collections::BTreeMap<&str, bool>>()
    };
    let begun = ids(LifecycleKind::Begun, TransactionStatus::Pending);
    let keys: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|event| event.transaction.as_ref())
        .map(|t| t.idempotency_key.as_str())
        .filter(|key| !key.is_empty())
        .collect();
    assert_eq!(
        (begun.len(), keys.len()),
        (12, 12),
        "every payment begun once"
    );
    let decided = ids(LifecycleKind::Decided, TransactionStatus::Committed);
    let done = ids(LifecycleKind::Done, TransactionStatus::Committed);
    assert!(begun.keys().eq(decided.keys()), "each decided commit");
    assert!(begun.keys().eq(done.keys()), "each done");
    assert!(done.values().all(|done| *done) && decided.values().all(|done| !done));
    assert!(
        events
            .iter()
            .filter(|event| event.kind != LifecycleKind::Begun as i32)
            .filter_map(|event| event.transaction.as_ref())
            .all(|t| t.legs.is_empty() && t.idempotency_key.is_empty() && t.begun_at_ms == 0),
        "a decision or a done carries only what it set"
    );
}
