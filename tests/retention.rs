//! Tail mode with `--retention`: published rows stay for the retention and
//! are then removed in bulk; what is published is recorded beside the slot,
//! so kills, a dropped slot and an invalidated slot lose nothing and do not
//! republish what is known to be published.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;
use support::testkit::{StopMode, TempPostgres};
use support::*;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// Ids of the rows now known to be published.
async fn known_published(pool: &PgPool) -> HashSet<Uuid> {
    sqlx::query_scalar(&format!("select id from outbox o where {KNOWN_PUBLISHED}"))
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// `n` rows written two hours ago (by `created_at`) for the aggregates
/// `o1`..`o5` of type `old`, versions 1, 2, 3, ... per aggregate.
async fn write_old_rows(pool: &PgPool, n: i64) -> Vec<Uuid> {
    sqlx::query_scalar(
        "insert into outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at) \
         select gen_random_uuid(), 'old', 'o' || (g % 5), 'changed', \
           jsonb_build_object('version', (g / 5) + 1), now() - interval '2 hours' \
         from generate_series(0, $1 - 1) g order by g returning id",
    )
    .bind(n)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Records delivered more than once, by id.
fn duplicated(records: &[Consumed]) -> HashSet<Uuid> {
    let mut seen = HashSet::new();
    records
        .iter()
        .map(Consumed::id)
        .filter(|id| !seen.insert(*id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_writers_loses_nothing_and_removes_only_old_published_rows() {
    let t = Setup::tail(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let old_topic = t.topic("old", 2).await;
    let old = write_old_rows(pool, 200).await;
    let batch = 50;
    let args = ["--batch-size", "50", "--retention", "1h"];

    let writers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { write(&pool, 250, 20, 0.1).await })
        })
        .collect();
    let mut kills = 0;
    while kills < 5 || writers.iter().any(|w| !w.is_finished()) {
        let mut relay = t.relay(&args);
        let pause = rand::rng().random_range(300..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        relay.kill().await.unwrap(); // SIGKILL
        kills += 1;
    }
    let mut written = Written::default();
    for w in writers {
        written.append(w.await.unwrap());
    }

    let (mut relay, log) = t.logged_relay(&args);
    let mut expected = written.committed.clone();
    expected.extend(&old);
    let records = consume_all_retained(
        pool,
        &kafka.brokers(),
        &[&topic, &old_topic],
        &expected,
        DEADLINE,
    )
    .await;
    assert_delivered(&records, &written);
    let duplicates = assert_order(&records);
    assert_versions_match(pool, &records).await;
    // Each kill may leave one batch in flight; rows confirmed before a kill
    // are skipped when the slot sends them again.
    assert!(
        duplicates <= (kills + 1) * batch,
        "{duplicates} duplicates after {kills} kills"
    );

    // The rows written two hours ago are removed once published; the rows
    // just written are kept, every one of them.
    wait_for("the old rows to be removed", DEADLINE, || async {
        count(
            pool,
            "select count(*) from outbox where aggregate_type = 'old'",
        )
        .await
            == 0
    })
    .await;
    let committed = count(pool, "select coalesce(sum(version), 0)::bigint from agg").await;
    assert_eq!(
        count(
            pool,
            "select count(*) from outbox where aggregate_type = 'acct'"
        )
        .await,
        committed,
        "rows younger than the retention were removed"
    );
    // The gauges count the kept rows as retained, not as a backlog.
    let address = endpoint_address(&log, DEADLINE).await;
    wait_for("the retained and backlog gauges", DEADLINE, || async {
        metric(&address, "outbox_relay_retained_rows").await == committed as f64
            && metric(&address, "outbox_relay_backlog_rows").await == 0.0
    })
    .await;
    relay.kill().await.unwrap();
}

/// Ends the slot's walsender and drops the slot, under a relay that keeps
/// reconnecting.
async fn drop_slot(pool: &PgPool, slot: &str) {
    wait_for("the slot to be dropped", DEADLINE, || async {
        let _ = sqlx::query(
            "select pg_terminate_backend(active_pid) from pg_replication_slots \
             where slot_name = $1 and active_pid is not null",
        )
        .bind(slot)
        .execute(pool)
        .await;
        sqlx::query("select pg_drop_replication_slot($1)")
            .bind(slot)
            .execute(pool)
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_dropped_under_writers_loses_nothing_and_republishes_no_known_published_row() {
    let t = Setup::tail(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 10).await;
    let topic = t.topic("acct", 4).await;
    let (mut relay, log) = t.logged_relay(&["--retention", "1h", "--batch-size", "50"]);

    let writers: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { write(&pool, 400, 10, 0.1).await })
        })
        .collect();
    wait_for("some rows to be known published", DEADLINE, || async {
        known_published(pool).await.len() >= 200
    })
    .await;
    // What is known published now must not come again after the drop.
    let published = known_published(pool).await;
    drop_slot(pool, &t.slot).await;
    log.wait_for_line("the replication slot is gone", DEADLINE)
        .await;

    let mut written = Written::default();
    for w in writers {
        written.append(w.await.unwrap());
    }
    let records = consume_all_retained(
        pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
    assert_versions_match(pool, &records).await;
    let again: Vec<Uuid> = duplicated(&records)
        .intersection(&published)
        .copied()
        .collect();
    assert!(
        again.is_empty(),
        "{} of {} rows known published before the drop were published again",
        again.len(),
        published.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidated_slot_is_recovered_without_losing_or_repeating_published_rows() {
    let mut pg = TempPostgres::start().await.unwrap();
    pg.set("max_slot_wal_keep_size", "1MB");
    pg.stop(StopMode::Fast);
    pg.start_again().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url, Kafka::start(), "tail").await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 5).await;
    let topic = t.topic("acct", 2).await;
    let args = ["--retention", "1h"];
    let first = write(pool, 50, 5, 0.0).await;
    let mut relay = t.relay(&args);
    consume_all_retained(
        pool,
        &kafka.brokers(),
        &[&topic],
        &first.committed,
        DEADLINE,
    )
    .await;
    relay.kill().await.unwrap();

    // While no relay runs: outbox rows, then far more WAL than the slot may keep.
    let missed = write(pool, 100, 5, 0.0).await;
    sqlx::query("create table busy (id bigint, pad text)")
        .execute(pool)
        .await
        .unwrap();
    wait_for("Postgres to invalidate the slot", DEADLINE, || async {
        for statement in [
            "insert into busy select g, repeat('x', 200) from generate_series(1, 50000) g",
            "select pg_switch_wal()",
            "checkpoint",
        ] {
            sqlx::query(statement).execute(pool).await.unwrap();
        }
        sqlx::query_scalar::<_, Option<String>>(
            "select wal_status from pg_replication_slots where slot_name = $1",
        )
        .bind(&t.slot)
        .fetch_one(pool)
        .await
        .unwrap()
        .as_deref()
            == Some("lost")
    })
    .await;

    // With retention the relay knows what is published: it recovers on its
    // own and publishes the missed rows, and none of the first ones again.
    let (mut relay, log) = t.logged_relay(&args);
    log.wait_for_line("the replication slot was invalidated", DEADLINE)
        .await;
    let mut all = first.committed.clone();
    all.extend(&missed.committed);
    let records = consume_all_retained(pool, &kafka.brokers(), &[&topic], &all, DEADLINE).await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &missed);
    assert_order(&records);
    let first: HashSet<Uuid> = first.committed.iter().copied().collect();
    let again = duplicated(&records).intersection(&first).count();
    assert_eq!(
        again, 0,
        "rows published before the slot was lost came again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lanes_keep_published_rows_through_a_kill_and_each_lane_records_its_progress() {
    let t = Setup::tail(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let args = ["--shards", "2", "--retention", "1h", "--batch-size", "50"];
    let mut a = t.relay(&args);
    let mut b = t.relay(&args);
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { write(&pool, 200, 20, 0.1).await })
        })
        .collect();
    wait_for("some rows to be known published", DEADLINE, || async {
        known_published(pool).await.len() >= 100
    })
    .await;
    a.kill().await.unwrap(); // SIGKILL: b takes its lane
    let mut written = Written::default();
    for w in writers {
        written.append(w.await.unwrap());
    }
    let records = consume_all_retained(
        pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    b.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
    assert_versions_match(pool, &records).await;
    // Both lanes' slots recorded what they published (a lane whose rows
    // all came with its first copy has no resume point, only that), and
    // nothing was removed: every committed row is still there.
    let recorded = count(
        pool,
        "select count(*) from relay_slot where published_before is not null",
    )
    .await;
    assert_eq!(recorded, 2, "each lane's slot records what it published");
    let committed = count(pool, "select coalesce(sum(version), 0)::bigint from agg").await;
    assert_eq!(count(pool, "select count(*) from outbox").await, committed);
}
