//! Poll mode end to end: the relay binary against a throwaway Postgres and a
//! Kafka, with what goes in compared to what comes out.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use support::*;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_a_loop_loses_nothing_and_keeps_order() {
    let t = Setup::new(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let batch = 50;

    let writers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { write(&pool, 300, 20, 0.1).await })
        })
        .collect();
    let mut kills = 0;
    // At least ten starts, each killed at a random point, while writers run.
    while kills < 10 || writers.iter().any(|w| !w.is_finished()) {
        let mut relay = t.relay(&["--batch-size", &batch.to_string()]);
        let pause = rand::rng().random_range(100..700);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        relay.kill().await.unwrap(); // SIGKILL
        kills += 1;
    }
    let mut written = Written::default();
    for w in writers {
        let w = w.await.unwrap();
        written.append(w);
    }
    assert!(
        kills >= 10,
        "the relay was started and killed only {kills} times"
    );

    let mut relay = t.relay(&["--batch-size", &batch.to_string()]);
    let records = consume_and_drain(
        pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    relay.kill().await.unwrap();

    assert_delivered(&records, &written);
    let duplicates = assert_order(&records);
    assert!(
        duplicates <= kills * batch,
        "{duplicates} duplicates after {kills} kills exceed one batch ({batch}) per kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_that_commits_late_is_still_published() {
    let t = Setup::new(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    let topic = t.topic("skew", 2).await;
    let insert = "insert into outbox (id, aggregate_type, aggregate_id, event_type, payload) \
                  values ($1, 'skew', $2, 'e', '{}') returning seq";

    // The early transaction takes its seq first and commits last.
    let early_id = Uuid::new_v4();
    let mut early = pool.begin().await.unwrap();
    let early_seq: i64 = sqlx::query_scalar(insert)
        .bind(early_id)
        .bind("x")
        .fetch_one(&mut *early)
        .await
        .unwrap();
    let late_id = Uuid::new_v4();
    let late_seq: i64 = sqlx::query_scalar(insert)
        .bind(late_id)
        .bind("y")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(early_seq < late_seq);

    let mut relay = t.relay(&[]);
    let first = consume_ids(&kafka.brokers(), &[&topic], &[late_id], DEADLINE).await;
    assert!(
        first.iter().all(|r| r.id() != early_id),
        "an uncommitted row was published"
    );
    // The uncommitted row is invisible to the count.
    wait_until_drained(pool, DEADLINE).await;

    early.commit().await.unwrap();
    let all = consume_ids(&kafka.brokers(), &[&topic], &[late_id, early_id], DEADLINE).await;
    relay.kill().await.unwrap();
    let ids: HashSet<Uuid> = all.iter().map(Consumed::id).collect();
    assert!(
        ids.contains(&early_id),
        "the row that committed late was skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_present_before_the_first_start_are_published() {
    let t = Setup::new(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 10).await;
    let written = write(pool, 300, 10, 0.0).await;
    assert_eq!(outbox_count(pool).await as usize, written.committed.len());
    let topic = t.topic("acct", 3).await;
    let mut relay = t.relay(&[]);
    let records = consume_and_drain(
        pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    relay.kill().await.unwrap();

    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    assert_eq!(seen.len(), written.committed.len());
    assert_eq!(
        assert_order(&records),
        0,
        "an undisturbed relay published duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_follow_the_documented_mapping() {
    let t = Setup::new(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    let routed = t.topic("order", 2).await;
    let explicit = format!("{}-explicit", t.prefix);
    kafka.create_topic(&explicit, 1).await;

    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "insert into outbox (id, aggregate_type, aggregate_id, event_type, topic, payload, headers) values \
         ($1, 'order', 'o-1', 'order.created', null, '{\"b\": [1, 2], \"a\": \"x\"}', '{\"traceparent\": \"00-abc-01\", \"n\": 5, \"id\": \"spoof\"}'), \
         ($2, 'order', 'o-2', 'order.routed', $4, '{\"k\": true}', '{}'), \
         ($3, 'order', 'o-1', 'order.deleted', null, null, '{}')",
    )
    .bind(a)
    .bind(b)
    .bind(c)
    .bind(&explicit)
    .execute(pool)
    .await
    .unwrap();

    let mut relay = t.relay(&[]);
    let records = consume_and_drain(
        pool,
        &kafka.brokers(),
        &[&routed, &explicit],
        &[a, b, c],
        DEADLINE,
    )
    .await;
    relay.kill().await.unwrap();
    let find = |id: Uuid| records.iter().find(|r| r.id() == id).unwrap().clone();
    let header_text = |r: &Consumed| -> Vec<(String, String)> {
        r.headers
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).unwrap()))
            .collect()
    };

    let ra = find(a);
    assert_eq!(
        ra.topic, routed,
        "topic from the template {{aggregate_type}}"
    );
    assert_eq!(ra.key.as_deref(), Some("o-1"));
    // jsonb's own text form: keys sorted by length then bytes, one space after ':' and ','.
    assert_eq!(
        ra.value.as_deref(),
        Some(&br#"{"a": "x", "b": [1, 2]}"#[..])
    );
    let expected: Vec<(String, String)> = [
        ("id", a.to_string().as_str()),
        ("event_type", "order.created"),
        ("aggregate_type", "order"),
        ("n", "5"),
        ("traceparent", "00-abc-01"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(header_text(&ra), expected);

    let rb = find(b);
    assert_eq!(
        rb.topic, explicit,
        "the topic column overrides the template"
    );
    assert_eq!(rb.key.as_deref(), Some("o-2"));

    let rc = find(c);
    assert_eq!(rc.topic, routed);
    assert_eq!(
        rc.value.as_deref(),
        Some(&b"null"[..]),
        "a null payload is the JSON null by default"
    );
    assert_eq!(ra.partition, rc.partition, "one aggregate, one partition");
    assert!(ra.offset < rc.offset, "one aggregate's rows in seq order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_broker_errors_lose_nothing_and_keep_order() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let Some(kafka) = Kafka::mock_only(
        "injected_broker_errors_lose_nothing_and_keep_order",
        "it injects produce errors through rdkafka::mocking, which only the mock cluster supports; \
         tests/outage.rs takes the real broker down instead",
    ) else {
        return;
    };
    let t = Setup::new(kafka).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 15).await;
    let topic = t.topic("acct", 4).await;

    let mut relay = t.relay(&["--batch-size", "40"]);
    let mut written = write(pool, 100, 15, 0.1).await;
    // Retriable produce errors mid-stream, as a broker under leader
    // elections and ISR shrinkage returns them.
    kafka.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    let more = write(pool, 150, 15, 0.1).await;
    written.append(more);

    let records = consume_ids(&kafka.brokers(), &[&topic], &written.committed, DEADLINE).await;
    relay.kill().await.unwrap();
    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    assert!(
        written.committed.iter().all(|id| seen.contains(id)),
        "a committed row was lost"
    );
    assert!(written.rolled_back.iter().all(|id| !seen.contains(id)));
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_rows_in_flight_exits_zero_and_confirms_only_what_was_acked() {
    let Some(kafka) = Kafka::mock_only(
        "sigterm_with_rows_in_flight_exits_zero_and_confirms_only_what_was_acked",
        "it keeps acks in flight with the mock cluster's round-trip delay, which a real broker has no knob for; \
         tests/outage.rs sends SIGTERM while the real broker is stopped instead",
    ) else {
        return;
    };
    let t = Setup::new(kafka).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 10).await;
    let written = write(pool, 700, 10, 0.0).await;
    let total = written.committed.len() as i64;
    let topic = t.topic("acct", 3).await;
    // Slow acks, so a batch is in flight when SIGTERM arrives.
    for broker in 1..=3 {
        kafka
            .cluster()
            .broker_round_trip_time(broker, Duration::from_millis(300))
            .unwrap();
    }

    let mut relay = t.relay(&["--batch-size", "200"]);
    wait_for("the first batch to be confirmed", DEADLINE, || async {
        outbox_count(pool).await < total
    })
    .await;
    kill(Pid::from_raw(relay.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), relay.wait())
        .await
        .expect("relay exits")
        .unwrap();
    assert!(status.success(), "relay exited with {status} on SIGTERM");

    // Every row that left the outbox is in Kafka.
    let remaining: Vec<Uuid> = sqlx::query_scalar("select id from outbox")
        .fetch_all(pool)
        .await
        .unwrap();
    let remaining: HashSet<Uuid> = remaining.into_iter().collect();
    let confirmed: Vec<Uuid> = written
        .committed
        .iter()
        .copied()
        .filter(|id| !remaining.contains(id))
        .collect();
    assert!(
        !confirmed.is_empty() && !remaining.is_empty(),
        "SIGTERM should land mid-stream"
    );
    consume_ids(&kafka.brokers(), &[&topic], &confirmed, DEADLINE).await;

    // A restart publishes the rest; a graceful stop left nothing to repeat.
    for broker in 1..=3 {
        kafka
            .cluster()
            .broker_round_trip_time(broker, Duration::ZERO)
            .unwrap();
    }
    let mut relay = t.relay(&["--batch-size", "200"]);
    let records = consume_and_drain(
        pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    relay.kill().await.unwrap();
    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    assert!(
        written.committed.iter().all(|id| seen.contains(id)),
        "a row was lost across SIGTERM"
    );
    assert_eq!(
        assert_order(&records),
        0,
        "rows were published twice across a graceful stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_for_an_impossible_topic_is_dead_lettered_and_the_rest_flow() {
    let t = Setup::new(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    let topic = t.topic("order", 1).await;
    let insert = "insert into outbox (id, aggregate_type, aggregate_id, event_type, topic, payload) \
                  values ($1, 'order', 'o-1', 'e', $2, '{}')";
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut tx = pool.begin().await.unwrap();
    for (id, explicit) in ids.iter().zip([None, Some("bad topic!"), None]) {
        sqlx::query(insert)
            .bind(id)
            .bind(explicit)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let mut relay = t.relay(&[]);
    let records = consume_ids(&kafka.brokers(), &[&topic], &[ids[0], ids[2]], DEADLINE).await;
    relay.kill().await.unwrap();

    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    assert!(
        seen.contains(&ids[0]) && seen.contains(&ids[2]),
        "the rows around the bad one were not published"
    );
    let dead: Vec<(Uuid, String)> = sqlx::query_as("select id, error from dead_letter")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, ids[1]);
    assert!(
        dead[0].1.contains("invalid topic name \"bad topic!\""),
        "{}",
        dead[0].1
    );
}

/// `Event::with_partition_key` keys the record in both modes; events
/// without one are keyed by their aggregate id; an aggregate's events with
/// one key stay in order in its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_key_keys_the_record_in_both_modes() {
    use outbox_relay::outbox::{self, Event};
    for mode in ["poll", "tail"] {
        let t = Setup::on(fresh_database().await, Kafka::start(), mode).await;
        let topic = t.topic("acct", 4).await;
        // Started first in tail mode: the slot then streams the inserts.
        let mut relay = t.relay(&[]);
        let events: Vec<Event> = (0..60)
            .map(|i| {
                let event = Event::new(
                    "acct",
                    format!("a-{}", i % 6),
                    "changed",
                    serde_json::json!({"n": i}),
                );
                // a-0..a-3 by tenant (two aggregates per key), a-4, a-5 by themselves.
                if i % 6 < 4 {
                    event.with_partition_key(format!("tenant-{}", i % 6 % 2))
                } else {
                    event
                }
            })
            .collect();
        let mut conn = t.pool.acquire().await.unwrap();
        for chunk in events.chunks(7) {
            outbox::insert_all(&mut conn, chunk).await.unwrap();
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let records = consume_ids(&t.kafka.brokers(), &[&topic], &ids, DEADLINE).await;
        relay.kill().await.unwrap();
        let mut partition_of_key = std::collections::HashMap::new();
        for event in &events {
            let record = records
                .iter()
                .find(|r| r.id() == event.id)
                .unwrap_or_else(|| panic!("{mode}: event {} never arrived", event.id));
            let want = event.partition_key.as_ref().unwrap_or(&event.aggregate_id);
            assert_eq!(record.key.as_ref(), Some(want), "{mode}: the record key");
            let partition = *partition_of_key
                .entry(want.clone())
                .or_insert(record.partition);
            assert_eq!(
                record.partition, partition,
                "{mode}: one key, two partitions"
            );
            let aggregate = record
                .headers
                .iter()
                .find(|(k, _)| k == "aggregate_type")
                .map(|(_, v)| v.clone());
            assert_eq!(aggregate.as_deref(), Some(b"acct".as_slice()));
        }
        // Per aggregate, the payloads' n grow with the offsets.
        for aggregate in 0..6 {
            let mut seen: Vec<(i64, i64)> = records
                .iter()
                .filter_map(|r| {
                    let v: serde_json::Value = serde_json::from_slice(r.value.as_deref()?).ok()?;
                    let n = v["n"].as_i64()?;
                    (n % 6 == aggregate).then_some((r.offset, n))
                })
                .collect();
            seen.sort();
            seen.dedup_by_key(|(_, n)| *n);
            let ns: Vec<i64> = seen.iter().map(|(_, n)| *n).collect();
            let mut sorted = ns.clone();
            sorted.sort();
            assert_eq!(ns, sorted, "{mode}: aggregate a-{aggregate} out of order");
        }
    }
}
