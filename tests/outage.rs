//! Broker down and back, end to end. On the mock cluster every broker refuses
//! connections; a real broker process (`OUTBOX_TEST_BROKER_PID`) is stopped
//! with SIGSTOP and resumed with SIGCONT, so its connections stay open and go
//! silent, like a hung broker or a network partition. SIGSTOP rather than
//! kill and restart because a broker that keeps its log in memory (the CI's)
//! would come back without the topics and records these tests read back.
//!
//! The tests in this file pause the same external broker, so they take turns;
//! cargo runs test binaries one at a time, so no other suite sees the outage.

mod support;

use std::collections::HashSet;
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
    all.committed.extend(more.committed);
    all.rolled_back.extend(more.rolled_back);
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
    wait_for(
        "the outbox to drain before the outage",
        DEADLINE,
        || async { outbox_count(pool).await == 0 },
    )
    .await;

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
    let records = consume_ids(&kafka.brokers(), &[&topic], &written.committed, DEADLINE).await;
    wait_for("the outbox to drain after the outage", DEADLINE, || async {
        outbox_count(pool).await == 0
    })
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
    wait_for(
        "the outbox to drain before the outage",
        DEADLINE,
        || async { outbox_count(pool).await == 0 },
    )
    .await;

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
    let records = consume_ids(&kafka.brokers(), &[&topic], &written.committed, DEADLINE).await;
    wait_for("the outbox to drain after the outage", DEADLINE, || async {
        outbox_count(pool).await == 0
    })
    .await;
    relay.kill().await.unwrap();

    assert_delivered(&records, &written);
    let duplicates = assert_order(&records);
    assert!(
        duplicates <= batch,
        "{duplicates} duplicates exceed the one batch ({batch}) in flight at SIGTERM"
    );
}
