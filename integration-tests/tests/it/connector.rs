//! The connector against a real storage shard and the real broker: every event lands in the
//! topic once, in order, across a connector that is killed and restarted mid-stream.

use std::time::Duration;

use integration_tests::commands::{command, create, transfer};
use integration_tests::group::Group;
use integration_tests::kafka::KafkaBroker;
use prost::Message as _;
use proto::auticuro::v1 as pb;
use query::connector::{Destination, ShardSource};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Every event in the partition, in offset order.
fn read_topic(broker: &KafkaBroker, topic: &str) -> Vec<pb::Event> {
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
            events.push(pb::Event::decode(message.unwrap().payload().unwrap()).unwrap());
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
    let source = ShardSource {
        shard_id: 21,
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

    let events = read_topic(broker, &topic);
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
