//! `--format cloudevents-binary|cloudevents-structured` on Kafka, read back
//! by clients that are not ours: Python's confluent-kafka and the
//! CloudEvents Python SDK's Kafka binding, which detects the content mode
//! and parses the event. Every row once, every attribute by the README's
//! mapping, the payload as the event's data, the trace context as the
//! distributed tracing extension, the relay's `id` header kept. (NATS and
//! RabbitMQ: their suites.)

mod support;

use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_records_are_cloudevents_the_sdk_reads_in_both_modes() {
    for mode in ["cloudevents-binary", "cloudevents-structured"] {
        let t = Setup::new(Kafka::start()).await;
        let topic = t.topic("acct", 2).await;
        let expected = insert_cloudevents_rows(&t.pool).await;
        let mut relay = t.relay(&["--format", mode, "--cloudevents-source", CE_SOURCE]);
        wait_until_drained(&t.pool, DEADLINE).await;
        relay.kill().await.unwrap();
        let dead: i64 = sqlx::query_scalar("select count(*) from dead_letter")
            .fetch_one(&t.pool)
            .await
            .unwrap();
        assert_eq!(dead, 0, "{mode}: rows were dead-lettered");
        let count = expected.len().to_string();
        let brokers = t.kafka.brokers();
        let events = read_cloudevents_with_python(&[
            "kafka",
            "--brokers",
            &brokers,
            "--topic",
            &topic,
            "--count",
            &count,
        ])
        .await;
        assert_cloudevents(&events, &expected, mode);
        // The record key is still the partition key, else the aggregate id.
        let keyed = events.iter().filter(|e| e["key"] == "tenant-1").count();
        assert_eq!(keyed, 1, "{mode}: {events:?}");
    }
}
