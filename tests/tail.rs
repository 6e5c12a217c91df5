//! Tail mode end to end: the relay binary streaming from the WAL of a
//! throwaway Postgres into a Kafka, with what goes in compared to what comes
//! out, and the replication slot's position read from Postgres itself.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use sqlx::{Connection, PgPool};
use support::testkit::{StopMode, TempPostgres};
use support::*;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// WAL bytes between the server's position and the slot's confirmed one.
async fn slot_lag(pool: &PgPool, slot: &str) -> Option<i64> {
    sqlx::query_scalar(
        "select (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint from pg_replication_slots where slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await
    .unwrap()
    .flatten()
}

/// Runs a relay command to completion; returns (exit code, stderr).
async fn run_to_exit(mut cmd: tokio::process::Command) -> (i32, String) {
    let output = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("the relay exits")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// The last line of the relay's stderr, which carries the error.
fn last_line(stderr: &str) -> &str {
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.lines().last().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_and_a_postgres_restart_lose_nothing_and_keep_order() {
    let mut pg = TempPostgres::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url, Kafka::start(), "tail").await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let batch = 50;

    let writers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { write_through_faults(&pool, 250, 20, 0.1).await })
        })
        .collect();
    let mut kills = 0;
    let mut restarted = false;
    // At least ten starts, each killed at a random point, while writers run.
    while kills < 10 || writers.iter().any(|w| !w.is_finished()) {
        let mut relay = t.relay(&["--batch-size", &batch.to_string()]);
        let pause = rand::rng().random_range(200..900);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if kills == 2 && !restarted {
            // Postgres goes away under the relay and the writers, and back.
            pg.stop(StopMode::Fast);
            pg.start_again().await.unwrap();
            restarted = true;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        relay.kill().await.unwrap(); // SIGKILL
        kills += 1;
    }
    let mut written = Written::default();
    let mut uncertain = 0;
    for w in writers {
        let (w, u) = w.await.unwrap();
        written.append(w);
        uncertain += u;
    }
    assert!(
        restarted,
        "the writers finished before Postgres was restarted"
    );

    let mut relay = t.relay(&["--batch-size", &batch.to_string()]);
    // Every committed event bumped its aggregate's version: their sum counts
    // the rows committed, including those whose commit outcome the writers
    // never learned.
    let (records, expected) =
        consume_everything_committed(pool, &kafka.brokers(), &topic, &written, DEADLINE).await;
    relay.kill().await.unwrap();

    assert_delivered(&records, &written);
    let duplicates = assert_order(&records);
    assert_versions_match(pool, &records).await;
    let unique = records
        .iter()
        .map(Consumed::id)
        .collect::<HashSet<_>>()
        .len();
    assert_eq!(
        unique as i64, expected,
        "{uncertain} commits had an unknown outcome"
    );
    // A killed relay may have had one batch in flight, and a replayed
    // transaction is skipped only up to the rows it confirmed.
    assert!(
        duplicates <= (kills + 1) * batch * 2,
        "{duplicates} duplicates after {kills} kills and a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_outbox_on_a_busy_database_does_not_hold_wal() {
    let t = Setup::tail(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    let topic = t.topic("ping", 1).await;
    let mut relay = t.relay(&[]);
    // One row through, so the relay is streaming.
    let id = Uuid::new_v4();
    sqlx::query("insert into outbox (id, aggregate_type, aggregate_id, event_type, payload) values ($1, 'ping', 'p', 'e', '{}')")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    consume_ids(&kafka.brokers(), &[&topic], &[id], DEADLINE).await;

    // A slot nobody reads, as the control: it holds all the WAL written.
    sqlx::query("select pg_create_logical_replication_slot('unread', 'pgoutput')")
        .execute(pool)
        .await
        .unwrap();
    // The rest of the database is busy: about 64 MB of WAL, no outbox rows.
    sqlx::query("create table busy (id bigint, pad text)")
        .execute(pool)
        .await
        .unwrap();
    for _ in 0..8 {
        sqlx::query(
            "insert into busy select g, repeat('x', 200) from generate_series(1, 200000) g",
        )
        .execute(pool)
        .await
        .unwrap();
    }
    let written = slot_lag(pool, "unread").await.unwrap();
    assert!(
        written > 48 << 20,
        "the load wrote only {written} bytes of WAL"
    );

    let bound = 4 << 20;
    let last = Arc::new(AtomicU64::new(u64::MAX));
    wait_for(
        "the relay's slot to catch up",
        Duration::from_secs(30),
        || {
            let (pool, last, slot) = (pool.clone(), last.clone(), t.slot.clone());
            async move {
                let lag = slot_lag(&pool, &slot).await.unwrap_or(i64::MAX);
                last.store(lag as u64, Ordering::Relaxed);
                lag < bound
            }
        },
    )
    .await;
    let last = last.load(Ordering::Relaxed);
    relay.kill().await.unwrap();
    sqlx::query("select pg_drop_replication_slot('unread')")
        .execute(pool)
        .await
        .unwrap();
    eprintln!("WAL written {written} bytes; the relay's slot lags {last} bytes (bound {bound})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_row_transaction_streams_in_bounded_memory() {
    const ROWS: u64 = 1_000_000;
    const AGGREGATES: u64 = 100;
    const RSS_BOUND_KB: u64 = 150 * 1024;
    let t = Setup::tail(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    let topic = t.topic("big", 4).await;
    let mut relay = t.relay(&[]);
    wait_for("the slot", DEADLINE, || async {
        slot_lag(pool, &t.slot).await.is_some()
    })
    .await;

    // Sample the relay's resident memory for the whole run.
    let pid = relay.id().unwrap();
    let peak_kb = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak_kb = peak_kb.clone();
        tokio::spawn(async move {
            let path = format!("/proc/{pid}/status");
            while let Ok(status) = tokio::fs::read_to_string(&path).await {
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                    .unwrap_or(0);
                peak_kb.fetch_max(rss, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    sqlx::query(
        "insert into outbox (aggregate_type, aggregate_id, event_type, payload) \
         select 'big', 'k' || (g % $2), 'e', jsonb_build_object('n', g, 'pad', repeat('x', 100)) \
         from generate_series(1, $1) g",
    )
    .bind(ROWS as i64)
    .bind(AGGREGATES as i64)
    .execute(pool)
    .await
    .unwrap();

    // Every n once, and per key in increasing n (their commit order).
    let brokers = kafka.brokers();
    let (seen, complete) = tokio::task::spawn_blocking(move || {
        let mut seen = vec![false; ROWS as usize + 1];
        let mut unique = 0u64;
        let mut last: HashMap<Vec<u8>, u64> = HashMap::new();
        let complete = consume_each(
            &brokers,
            &topic,
            Duration::from_secs(600),
            |_, key, value| {
                let value: serde_json::Value = serde_json::from_slice(value.unwrap()).unwrap();
                let n = value["n"].as_u64().unwrap();
                let key = key.unwrap().to_vec();
                let previous = last.insert(key.clone(), n).unwrap_or(0);
                assert!(
                    n > previous,
                    "key {}: n {n} after {previous}",
                    String::from_utf8_lossy(&key)
                );
                if !std::mem::replace(&mut seen[n as usize], true) {
                    unique += 1;
                }
                unique == ROWS
            },
        );
        (unique, complete)
    })
    .await
    .unwrap();
    wait_until_drained(pool, DEADLINE).await;
    relay.kill().await.unwrap();
    sampler.await.unwrap();

    assert!(complete, "only {seen} of {ROWS} rows arrived");
    let peak = peak_kb.load(Ordering::Relaxed);
    eprintln!(
        "relay peak RSS {} MB for {ROWS} rows in one transaction",
        peak / 1024
    );
    assert!(peak > 0, "the relay's memory was never sampled");
    assert!(
        peak < RSS_BOUND_KB,
        "relay peak RSS {peak} kB exceeds {RSS_BOUND_KB} kB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_transactions_and_rolled_back_savepoints_are_never_published() {
    let t = Setup::tail(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    let topic = t.topic("sp", 2).await;
    let mut relay = t.relay(&[]);
    let insert = "insert into outbox (id, aggregate_type, aggregate_id, event_type, payload) \
                  values ($1, 'sp', 'a', 'e', '{}')";
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for _ in 0..20 {
        let (a, b, c, d) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(insert).bind(a).execute(&mut *tx).await.unwrap();
        sqlx::query("savepoint s").execute(&mut *tx).await.unwrap();
        sqlx::query(insert).bind(b).execute(&mut *tx).await.unwrap();
        sqlx::query("rollback to savepoint s")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(insert).bind(c).execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        let mut aborted = pool.begin().await.unwrap();
        sqlx::query(insert)
            .bind(d)
            .execute(&mut *aborted)
            .await
            .unwrap();
        aborted.rollback().await.unwrap();
        kept.extend([a, c]);
        dropped.extend([b, d]);
    }
    // A last committed row: once it is out, everything before it is too.
    let last = Uuid::new_v4();
    sqlx::query(insert).bind(last).execute(pool).await.unwrap();
    kept.push(last);
    let records = consume_and_drain(pool, &kafka.brokers(), &[&topic], &kept, DEADLINE).await;
    relay.kill().await.unwrap();
    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    assert!(
        kept.iter().all(|id| seen.contains(id)),
        "a committed row is missing"
    );
    let leaked: Vec<_> = dropped.iter().filter(|id| seen.contains(id)).collect();
    assert!(
        leaked.is_empty(),
        "rolled-back rows were published: {leaked:?}"
    );
    let order: Vec<Uuid> = records.iter().map(Consumed::id).collect();
    assert_eq!(order, kept, "one aggregate's rows left commit order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_present_before_the_slot_are_published_even_if_the_copy_is_killed() {
    let t = Setup::tail(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 10).await;
    let before = write(pool, 1500, 10, 0.0).await;
    let topic = t.topic("acct", 3).await;
    let initial = outbox_count(pool).await;

    // Killed in the middle of the first copy.
    let mut relay = t.relay(&["--batch-size", "20"]);
    wait_for("the copy to start publishing", DEADLINE, || async {
        outbox_count(pool).await < initial
    })
    .await;
    relay.kill().await.unwrap();
    let copied: Option<bool> =
        sqlx::query_scalar("select copied_at is not null from relay_slot where slot_name = $1")
            .bind(&t.slot)
            .fetch_optional(pool)
            .await
            .unwrap();
    assert_eq!(copied, Some(false), "the copy finished before the kill");
    // Rows committed while no relay runs.
    let during = write(pool, 200, 10, 0.0).await;

    let mut relay = t.relay(&[]);
    let mut written = before;
    written.committed.extend(during.committed);
    let records = consume_ids(&kafka.brokers(), &[&topic], &written.committed, DEADLINE).await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    let duplicates = assert_order(&records);
    assert!(
        duplicates <= 20,
        "{duplicates} duplicates after one kill of a 20-row batch"
    );

    // Undisturbed, a fresh slot's copy publishes each row exactly once.
    let t = Setup::tail(Kafka::start()).await;
    create_aggregates(&t.pool, 10).await;
    let written = write(&t.pool, 300, 10, 0.0).await;
    let topic = t.topic("acct", 3).await;
    let mut relay = t.relay(&[]);
    let records = consume_ids(&t.kafka.brokers(), &[&topic], &written.committed, DEADLINE).await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_eq!(
        assert_order(&records),
        0,
        "an undisturbed copy published duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_level_below_logical_is_one_clear_line() {
    let mut pg = TempPostgres::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url, Kafka::start(), "tail").await;
    t.pool.close().await;
    pg.stop(StopMode::Fast);
    pg.set("wal_level", "replica");
    pg.start_again().await.unwrap();
    let (code, stderr) = run_to_exit(t.relay_command()).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        last_line(&stderr).contains(&format!(
            "wal_level is \"replica\" on 127.0.0.1:{}/shop; tail mode needs \"logical\": set wal_level=logical and restart Postgres, or use --mode poll",
            pg.port()
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_without_replication_and_a_missing_publication_are_clear_lines() {
    let t = Setup::tail(Kafka::start()).await;
    let pool = &t.pool;
    sqlx::query("create role app login password 's3cret-app' noreplication nosuperuser")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("grant all on all tables in schema public to app")
        .execute(pool)
        .await
        .unwrap();
    let app_url = t
        .url
        .replacen("postgres:outbox-relay-temp@", "app:s3cret-app@", 1);
    assert_ne!(app_url, t.url, "the harness URL changed shape");
    let (code, stderr) = run_to_exit(relay_command_in(
        "tail",
        &app_url,
        &t.kafka.brokers(),
        &t.prefix,
    ))
    .await;
    assert_eq!(code, 1, "{stderr}");
    let line = last_line(&stderr);
    assert!(
        line.contains("role \"app\" on ") && line.contains("lacks the REPLICATION attribute tail mode needs: run ALTER ROLE \"app\" REPLICATION as a superuser, or use --mode poll"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cret-app"),
        "the password leaked:\n{stderr}"
    );

    sqlx::query("drop publication outbox_relay")
        .execute(pool)
        .await
        .unwrap();
    let (code, stderr) = run_to_exit(t.relay_command()).await;
    assert_eq!(code, 1, "{stderr}");
    let line = last_line(&stderr);
    assert!(
        line.contains("publication \"outbox_relay\" does not exist in database")
            && line.contains("run `outbox-relay migrate` with the same --database-url, --schema and --publication"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_held_by_another_process_is_one_clear_line() {
    let t = Setup::tail(Kafka::start()).await;
    let pool = &t.pool;
    sqlx::query("select pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&t.slot)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("insert into relay_slot (slot_name, copied_at) values ($1, now())")
        .bind(&t.slot)
        .execute(pool)
        .await
        .unwrap();
    // Another consumer holds the slot.
    let bindir = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .find(|p| p.join("pg_recvlogical").exists())
        .expect("pg_recvlogical from the Postgres binaries");
    let mut other = tokio::process::Command::new(bindir.join("pg_recvlogical"))
        .args([
            "--dbname",
            &t.url,
            "--slot",
            &t.slot,
            "--start",
            "-f",
            "/dev/null",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=outbox_relay",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the other consumer to hold the slot", DEADLINE, || async {
        sqlx::query_scalar::<_, bool>(
            "select active from pg_replication_slots where slot_name = $1",
        )
        .bind(&t.slot)
        .fetch_one(pool)
        .await
        .unwrap()
    })
    .await;
    let (code, stderr) = run_to_exit(t.relay_command()).await;
    other.kill().await.unwrap();
    assert_eq!(code, 1, "{stderr}");
    let line = last_line(&stderr);
    assert!(
        line.contains(&format!("replication slot \"{}\" on ", t.slot))
            && line.contains("is in use by another process")
            && line
                .ends_with("stop that consumer, or give this relay its own --slot (OUTBOX_SLOT)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidated_slot_is_a_clear_line_and_recreating_it_loses_nothing() {
    let mut pg = TempPostgres::start().await.unwrap();
    pg.set("max_slot_wal_keep_size", "1MB");
    pg.stop(StopMode::Fast);
    pg.start_again().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url, Kafka::start(), "tail").await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 5).await;
    let topic = t.topic("acct", 2).await;
    let first = write(pool, 50, 5, 0.0).await;
    let mut relay = t.relay(&[]);
    consume_ids(&kafka.brokers(), &[&topic], &first.committed, DEADLINE).await;
    wait_until_drained(pool, DEADLINE).await;
    relay.kill().await.unwrap();

    // While no relay runs: outbox rows, then far more WAL than the slot may keep.
    let missed = write(pool, 100, 5, 0.0).await;
    sqlx::query("create table busy (id bigint, pad text)")
        .execute(pool)
        .await
        .unwrap();
    wait_for("Postgres to invalidate the slot", DEADLINE, || async {
        sqlx::query("insert into busy select g, repeat('x', 200) from generate_series(1, 50000) g")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("select pg_switch_wal()")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("checkpoint").execute(pool).await.unwrap();
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

    let (code, stderr) = run_to_exit(t.relay_command()).await;
    assert_eq!(code, 1, "{stderr}");
    let line = last_line(&stderr);
    assert!(
        line.contains(&format!("replication slot \"{}\" on ", t.slot))
            && line.contains("was invalidated")
            && line.contains("restart with --recreate-invalid-slot"),
        "{stderr}"
    );

    let mut relay = t.relay(&["--recreate-invalid-slot"]);
    let records = consume_ids(&kafka.brokers(), &[&topic], &missed.committed, DEADLINE).await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &missed);
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_slot_never_moves_past_rows_kafka_has_not_acknowledged() {
    // The mock cluster: every broker goes down on request.
    let t = Setup::tail(Kafka::mock()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 5).await;
    let topic = t.topic("acct", 2).await;
    let (mut relay, log) = t.logged_relay(&["--kafka-config", "message.timeout.ms=2000"]);
    log.wait_for_line("streaming the outbox from the WAL", DEADLINE)
        .await;

    for broker in 1..=3 {
        kafka.cluster().broker_down(broker).unwrap();
    }
    // The first transaction's commit ends before `after_first`: a slot
    // confirmed at or past it would have skipped that transaction. (Other
    // WAL, from other tests, may be confirmed up to it legitimately.)
    let mut written = write(pool, 1, 5, 0.0).await;
    let after_first: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    written
        .committed
        .extend(write(pool, 29, 5, 0.0).await.committed);
    // The records fail only after the message timeout, by which time the
    // relay has reported its position to Postgres at least once more.
    log.wait_for_line("failed publishing to Kafka", DEADLINE)
        .await;
    let past: bool = sqlx::query_scalar(
        "select confirmed_flush_lsn >= $1::pg_lsn from pg_replication_slots where slot_name = $2",
    )
    .bind(&after_first)
    .bind(&t.slot)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        !past,
        "the slot was confirmed past rows Kafka never acknowledged"
    );

    // Killed in that state and started again with Kafka back: all arrive.
    relay.kill().await.unwrap();
    for broker in 1..=3 {
        kafka.cluster().broker_up(broker).unwrap();
    }
    let mut relay = t.relay(&[]);
    let records = consume_ids(&kafka.brokers(), &[&topic], &written.committed, DEADLINE).await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}

/// Postgres sends a transaction to a replication client once its commit
/// record is flushed, a moment before other sessions can see its rows; under
/// synchronous replication the committing session waits for a standby in
/// between, for as long as the standby takes. Here the standby never answers,
/// so the rows of the test's blocked transactions reach the relay while no
/// query can see them, until the test cancels the commit's wait (the
/// transaction stays committed). The relay must neither take them for rows
/// it already published (right after connecting it skips replayed rows that
/// are gone from the table), nor confirm them with a delete that finds
/// nothing and leaves them in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_sent_before_their_commit_is_visible_are_published_and_confirmed() {
    let mut pg = TempPostgres::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    // Every session of this database commits without waiting for the
    // standby, except the blocked writer's.
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("alter database shop set synchronous_commit = local")
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    pg.set("synchronous_standby_names", "nobody");
    pg.stop(StopMode::Fast);
    pg.start_again().await.unwrap();

    let t = Setup::on(url.clone(), Kafka::mock(), "tail").await;
    let pool = &t.pool;
    create_aggregates(pool, 5).await;
    let topic = t.topic("acct", 2).await;
    let mut cmd = t.relay_command();
    cmd.env("OUTBOX_LOG", "info,outbox_relay::source=debug");
    let (mut relay, log) = support::spawn_logged(cmd);
    log.wait_for_line("streaming the outbox from the WAL", DEADLINE)
        .await;

    // Right after connecting, the relay checks which rows it already
    // published; then, streaming, it deletes what Kafka acknowledged.
    let mut written = Written::default();
    for waiting in [
        "received rows whose transaction is not visible yet",
        "confirmed rows whose transaction is not visible yet",
    ] {
        let writer = blocked_commit(&url);
        let pid = committing_pid(pool).await;
        log.wait_for_line(waiting, DEADLINE).await;
        let cancelled: bool = sqlx::query_scalar("select pg_cancel_backend($1)")
            .bind(pid)
            .fetch_one(pool)
            .await
            .unwrap();
        assert!(cancelled);
        written.append(writer.await.unwrap());
        let records =
            consume_ids(&t.kafka.brokers(), &[&topic], &written.committed, DEADLINE).await;
        assert_delivered(&records, &written);
        assert_order(&records);
        wait_until_drained(pool, DEADLINE).await;
    }
    relay.kill().await.unwrap();
}

/// Writes one business transaction whose commit waits for the synchronous
/// standby, on a connection of its own; returns when the wait is cancelled.
fn blocked_commit(url: &str) -> tokio::task::JoinHandle<Written> {
    let url = url.to_string();
    tokio::spawn(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("set synchronous_commit = on")
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .connect(&url)
            .await
            .unwrap();
        write(&pool, 1, 5, 0.0).await
    })
}

/// The backend whose commit waits for the synchronous standby.
async fn committing_pid(pool: &PgPool) -> i32 {
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        let pid: Option<i32> =
            sqlx::query_scalar("select pid from pg_stat_activity where wait_event = 'SyncRep'")
                .fetch_optional(pool)
                .await
                .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for a commit waiting for the standby"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
