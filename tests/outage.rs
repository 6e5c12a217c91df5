//! Broker down and back, end to end. On the mock cluster every broker refuses
//! connections; a real broker process (`OUTBOX_TEST_BROKER_PID`) is stopped
//! with SIGSTOP and resumed with SIGCONT, so its connections stay open and go
//! silent, like a hung broker or a network partition. SIGSTOP rather than
//! kill and restart because a broker that keeps its log in memory (the CI's)
//! would come back without the topics and records these tests read back.
//! The one kill-and-restart test runs a tansu of its own
//! (`OUTBOX_TEST_TANSU`) and checks only what the relay still held.
//!
//! The tests in this file pause the same external broker, so they take turns;
//! cargo runs test binaries one at a time, so no other suite sees the outage.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::*;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

static OUTAGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Ids still in the outbox.
async fn outbox_ids(pool: &sqlx::PgPool) -> HashSet<Uuid> {
    sqlx::query_scalar::<_, Uuid>("select id from outbox")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn extend(all: &mut Written, more: Written) {
    all.append(more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_loses_nothing_and_keeps_order() {
    let Some(kafka) = Kafka::stoppable("a_broker_outage_loses_nothing_and_keeps_order") else {
        return;
    };
    let _turn = OUTAGE.lock().await;
    let t = Setup::new(kafka).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let batch = 50;
    // Short librdkafka timeouts, so the records in flight when the broker
    // stops fail during the outage and the relay's retry path runs, instead
    // of their acks merely arriving late.
    let (mut relay, log) = t.logged_relay(&[
        "--batch-size",
        &batch.to_string(),
        "--kafka-config",
        "message.timeout.ms=3000",
        "--kafka-config",
        "request.timeout.ms=3000",
    ]);

    let mut written = write(pool, 100, 20, 0.1).await;
    wait_until_drained(pool, DEADLINE).await;

    kafka.stop_brokers();
    let during = write(pool, 100, 20, 0.1).await;
    log.wait_for_line("failed publishing to Kafka", DEADLINE)
        .await;
    // Nothing can be acknowledged now, so nothing written now may leave.
    let remaining = outbox_ids(pool).await;
    let confirmed = during
        .committed
        .iter()
        .filter(|id| !remaining.contains(id))
        .count();
    assert_eq!(
        confirmed, 0,
        "{confirmed} rows left the outbox while the broker was down"
    );
    extend(&mut written, during);
    kafka.resume_brokers();

    extend(&mut written, write(pool, 100, 20, 0.1).await);
    let records = consume_and_drain(
        pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    log.wait_for_line("recovered: publishing to Kafka works again", DEADLINE)
        .await;
    relay.kill().await.unwrap();

    assert_delivered(&records, &written);
    let duplicates = assert_order(&records);
    assert!(
        duplicates <= batch,
        "{duplicates} duplicates after one outage exceed the one batch ({batch}) that can be in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_an_outage_exits_zero_and_confirms_nothing_unacked() {
    let Some(kafka) =
        Kafka::stoppable("sigterm_during_an_outage_exits_zero_and_confirms_nothing_unacked")
    else {
        return;
    };
    let _turn = OUTAGE.lock().await;
    let t = Setup::new(kafka).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 10).await;
    let topic = t.topic("acct", 3).await;
    let batch = 100;
    let shutdown_timeout = Duration::from_secs(2);
    let relay_args = [
        "--batch-size",
        &batch.to_string(),
        "--shutdown-timeout",
        "2s",
    ];
    let mut relay = t.relay(&relay_args);

    let mut written = write(pool, 50, 10, 0.0).await;
    wait_until_drained(pool, DEADLINE).await;

    // The relay polls every 100 ms at most, so while these hundreds of
    // transactions commit it reads a batch, which stays in flight: the
    // default message timeout (30 s) outlasts the test's outage.
    kafka.stop_brokers();
    let during = write(pool, 300, 10, 0.0).await;
    let signalled = Instant::now();
    kill(Pid::from_raw(relay.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(shutdown_timeout + Duration::from_secs(20), relay.wait())
        .await
        .expect("the relay exits after its shutdown timeout although acks never come")
        .unwrap();
    let took = signalled.elapsed();
    assert!(status.success(), "relay exited with {status} on SIGTERM");
    assert!(
        took >= shutdown_timeout - Duration::from_millis(200),
        "the relay exited after {took:?}, without waiting for its in-flight batch"
    );

    let remaining = outbox_ids(pool).await;
    let confirmed = during
        .committed
        .iter()
        .filter(|id| !remaining.contains(id))
        .count();
    assert_eq!(
        confirmed, 0,
        "{confirmed} rows were confirmed without an ack while the broker was down"
    );
    extend(&mut written, during);

    kafka.resume_brokers();
    let mut relay = t.relay(&relay_args);
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
        duplicates <= batch,
        "{duplicates} duplicates exceed the one batch ({batch}) in flight at SIGTERM"
    );
}

/// Per aggregate: one partition, and first deliveries in offset order carry
/// consecutive versions (from wherever the topic's records begin). Returns
/// the number of duplicate deliveries.
fn assert_consecutive_versions(records: &[Consumed]) -> usize {
    let mut by_key: HashMap<String, Vec<&Consumed>> = HashMap::new();
    for r in records {
        by_key.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    let mut duplicates = 0;
    for (key, mut list) in by_key {
        let partitions: HashSet<i32> = list.iter().map(|r| r.partition).collect();
        assert_eq!(
            partitions.len(),
            1,
            "aggregate {key} is spread over {partitions:?}"
        );
        list.sort_by_key(|r| r.offset);
        let mut seen = HashSet::new();
        let mut previous: Option<i64> = None;
        for r in list {
            if !seen.insert(r.id()) {
                duplicates += 1;
                continue;
            }
            if let Some(previous) = previous {
                assert_eq!(
                    r.version(),
                    previous + 1,
                    "aggregate {key}: version {} arrived after {previous}",
                    r.version()
                );
            }
            previous = Some(r.version());
        }
    }
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_that_restarts_empty_gets_every_row_not_yet_confirmed() {
    let test = "a_broker_that_restarts_empty_gets_every_row_not_yet_confirmed";
    let Some(binary) = tansu_binary(test, "kills and restarts a broker of its own") else {
        return;
    };
    let mut tansu = Tansu::start(binary).await;
    let t = Setup::new(Kafka::External {
        brokers: tansu.brokers(),
        process: None,
    })
    .await;
    let pool = &t.pool;
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 3).await;
    let batch = 50;
    // A short message timeout, so the test does not wait 30 s for the
    // relay to notice that its producer is getting nowhere.
    let (mut relay, log) = t.logged_relay(&[
        "--batch-size",
        &batch.to_string(),
        "--kafka-config",
        "message.timeout.ms=5000",
    ]);
    write(pool, 100, 20, 0.1).await;
    wait_until_drained(pool, DEADLINE).await;

    // Records confirmed so far die with the broker's memory; the relay
    // still holds everything written from now on.
    tansu.kill();
    let mut written = write(pool, 100, 20, 0.1).await;
    log.wait_for_line("failed publishing to Kafka", DEADLINE)
        .await;
    // The relay must not see the new broker before its topic exists: an
    // empty broker answers that the topic is unknown.
    let relay_pid = Pid::from_raw(relay.id().unwrap() as i32);
    kill(relay_pid, Signal::SIGSTOP).unwrap();
    tansu.restart().await;
    t.kafka.create_topic(&topic, 3).await;
    kill(relay_pid, Signal::SIGCONT).unwrap();

    extend(&mut written, write(pool, 100, 20, 0.1).await);
    let records = consume_ids(&tansu.brokers(), &[&topic], &written.committed, DEADLINE).await;
    wait_until_drained(pool, DEADLINE).await;
    relay.kill().await.unwrap();

    assert_delivered(&records, &written);
    let duplicates = assert_consecutive_versions(&records);
    assert!(
        duplicates <= batch,
        "{duplicates} duplicates exceed the one batch ({batch}) in flight at the restart"
    );
}
