use std::time::Duration;

use integration_tests::kafka::KafkaBroker;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);

fn consumer(broker: &KafkaBroker, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = broker
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

async fn receive(consumer: &StreamConsumer) -> (String, String) {
    let message = tokio::time::timeout(RECEIVE_TIMEOUT, consumer.recv())
        .await
        .unwrap()
        .unwrap();
    let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
    let payload = String::from_utf8(message.payload().unwrap().to_vec()).unwrap();
    consumer.commit_message(&message, CommitMode::Sync).unwrap();
    (key, payload)
}

#[tokio::test]
async fn produced_events_are_consumed_by_a_group_that_resumes_after_its_committed_offset() {
    let broker = KafkaBroker::shared().unwrap();
    let topic = broker.fresh_topic("smoke", 1).await.unwrap();
    let producer: FutureProducer = broker
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    for seq in 1..=4 {
        let payload = format!("event-{seq}");
        let record = FutureRecord::to(&topic).key("shard-1").payload(&payload);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }

    let group = format!("{topic}.projector");
    {
        let first = consumer(broker, &group, &topic);
        assert_eq!(receive(&first).await, ("shard-1".into(), "event-1".into()));
        assert_eq!(receive(&first).await, ("shard-1".into(), "event-2".into()));
    }
    // A new consumer of the same group starts right after the last committed offset.
    let second = consumer(broker, &group, &topic);
    assert_eq!(receive(&second).await.1, "event-3");
    assert_eq!(receive(&second).await.1, "event-4");
}
