//! High availability, in both modes: two relays on one outbox, one active
//! and one standing by; the active one is killed (`kill -9`) while writers
//! run, the standby takes over within seconds, and nothing is lost or
//! reordered.

mod support;

use std::time::{Duration, Instant};

use support::testkit::TempPostgres;
use support::*;

const DEADLINE: Duration = Duration::from_secs(120);
const ACTIVE: &str = "active: this instance holds the relay lock";

async fn a_standby_takes_over_when_the_active_relay_dies(mode: &'static str) {
    let t = Setup::on(fresh_database().await, Kafka::start(), mode).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;

    let (mut first, first_log) = t.logged_relay(&[]);
    first_log.wait_for_line(ACTIVE, DEADLINE).await;
    let (mut second, second_log) = t.logged_relay(&[]);
    second_log.wait_for_line("standing by", DEADLINE).await;

    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move { write(&pool, 400, 20, 0.1).await })
    };
    let committed_events = || async {
        sqlx::query_scalar::<_, i64>("select coalesce(sum(version), 0)::bigint from agg")
            .fetch_one(pool)
            .await
            .unwrap_or(0)
    };
    wait_for("writers to commit before the kill", DEADLINE, || async {
        committed_events().await > 200
    })
    .await;
    assert!(
        !second_log.text().contains(ACTIVE),
        "the standby became active while the leader ran:\n{}",
        second_log.text()
    );

    first.kill().await.unwrap();
    let killed = Instant::now();
    second_log
        .wait_for_line(ACTIVE, Duration::from_secs(30))
        .await;
    let failover = killed.elapsed();
    // The lock goes with the dead session at once; the standby asks for it
    // every second (tail mode may also wait out the old walsender).
    assert!(
        failover < Duration::from_secs(15),
        "the standby took {failover:?} to take over"
    );

    let written = writer.await.unwrap();
    let records = consume_and_drain(
        pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    assert!(
        second.try_wait().unwrap().is_none(),
        "the new leader exited:\n{}",
        second_log.text()
    );
    second.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_standby_takes_over_from_a_killed_leader() {
    a_standby_takes_over_when_the_active_relay_dies("poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_standby_takes_over_from_a_killed_leader() {
    a_standby_takes_over_when_the_active_relay_dies("tail").await;
}

/// A failover of Postgres itself: a replica that was in sync is promoted
/// under the same URL (here: a base backup started in the dead primary's
/// place). It has the outbox's rows but not the relay's replication slot,
/// as after any real failover. The running relay reconnects; in tail mode
/// it finds its slot gone, creates it again and republishes the rows still
/// in the outbox. Every committed row arrives, in order per aggregate.
async fn a_promoted_replica_under_the_same_url_loses_nothing(mode: &'static str) {
    let mut pg = TempPostgres::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url, Kafka::start(), mode).await;
    let kafka = &t.kafka;
    create_aggregates(&t.pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let (mut relay, log) = t.logged_relay(&["--batch-size", "20"]);

    let mut written = write(&t.pool, 100, 20, 0.1).await;
    consume_and_drain(
        &t.pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    // Rows the relay may not have published yet when the primary dies.
    let in_flight = write(&t.pool, 100, 20, 0.1).await;
    written.append(in_flight);
    t.pool.close().await;
    pg.fail_over_to_copy().await.unwrap();

    let pool = migrated_pool(&t.url).await;
    let after = write(&pool, 100, 20, 0.1).await;
    written.append(after);
    let records = consume_and_drain(
        &pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay exited on the failover:\n{}",
        log.text()
    );
    if mode == "tail" {
        log.wait_for_line("the replication slot is gone", Duration::from_secs(1))
            .await;
    }
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_follows_a_replica_promoted_under_the_same_url() {
    a_promoted_replica_under_the_same_url_loses_nothing("poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_recreates_its_slot_on_a_replica_promoted_under_the_same_url() {
    a_promoted_replica_under_the_same_url_loses_nothing("tail").await;
}
