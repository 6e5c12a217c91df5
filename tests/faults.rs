//! Database faults and secrets, in both modes: Postgres restarted (fast and
//! immediate) under a running relay and running writers, and a password that
//! never shows in anything the binary prints, on any failure path.

mod support;

use std::time::Duration;

use sqlx::Connection;
use support::testkit::{StopMode, TempPostgres};
use support::*;

const DEADLINE: Duration = Duration::from_secs(120);

/// Writers run while Postgres is stopped fast, then immediately (a crash),
/// and started again each time; the relay keeps running throughout.
async fn postgres_restarts_lose_nothing(mode: &'static str) {
    let mut pg = TempPostgres::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url, Kafka::start(), mode).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let (mut relay, log) = t.logged_relay(&["--batch-size", "50"]);
    // A database that cannot be reached at the very first connection is a
    // deployment error (exit 1); the restarts below are under a running relay.
    log.wait_for_line("relay starting", DEADLINE).await;

    let writers: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { write_through_faults(&pool, 300, 20, 0.1).await })
        })
        .collect();
    let committed_events = || async {
        sqlx::query_scalar::<_, i64>("select coalesce(sum(version), 0)::bigint from agg")
            .fetch_one(pool)
            .await
            .unwrap_or(0)
    };
    for stop in [StopMode::Fast, StopMode::Immediate] {
        // Let more events commit, then take Postgres away under everyone.
        let before = committed_events().await;
        wait_for("writers to commit before the restart", DEADLINE, || async {
            committed_events().await > before + 50
        })
        .await;
        pg.stop(stop);
        pg.start_again().await.unwrap();
    }
    let mut written = Written::default();
    for w in writers {
        let (w, _) = w.await.unwrap();
        written.append(w);
    }
    let (records, _) =
        consume_everything_committed(pool, &kafka.brokers(), &topic, &written, DEADLINE).await;
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay exited on a Postgres restart"
    );
    log.wait_for_line("recovered", Duration::from_secs(1)).await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
    assert_versions_match(pool, &records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_survives_postgres_restarts_under_writers() {
    postgres_restarts_lose_nothing("poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_survives_postgres_restarts_under_writers() {
    postgres_restarts_lose_nothing("tail").await;
}

/// Postgres restarts while a tail relay is still checking it at start, after
/// its first connection succeeded (a rolling restart or a failover as the
/// relay is deployed). The relay waits for Postgres, as it does once running,
/// then publishes everything; it does not exit. The check is held at a known
/// point by a lock on the catalog that tail mode's publication check reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_during_the_startup_checks_is_waited_for() {
    let mut pg = TempPostgres::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url.clone(), Kafka::start(), "tail").await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 10).await;
    let topic = t.topic("acct", 4).await;
    let written = write(pool, 100, 10, 0.0).await;

    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("begin").execute(&mut holder).await.unwrap();
    sqlx::query("lock table pg_catalog.pg_publication in access exclusive mode")
        .execute(&mut holder)
        .await
        .unwrap();
    let (mut relay, log) = t.logged_relay(&[]);
    wait_for("the relay's startup check to wait", DEADLINE, || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_stat_activity \
             where datname = current_database() and wait_event_type = 'Lock' \
             and query like '%pg_publication%'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
            == 1
    })
    .await;
    pg.stop(StopMode::Fast);
    pg.start_again().await.unwrap();
    drop(holder);

    tokio::select! {
        status = relay.wait() => panic!(
            "the relay exited ({status:?}) when Postgres restarted during its startup checks; it logged:\n{}",
            log.text()
        ),
        _ = log.wait_for_line("relay starting", DEADLINE) => {}
    }
    let failed = log
        .wait_for_line("failed checking the database", Duration::from_secs(1))
        .await;
    assert!(
        failed.contains("retrying with backoff"),
        "the relay named the failure but not what it does about it: {failed}"
    );
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
    assert_order(&records);
}

/// Postgres stops answering without closing a connection (every server
/// process stopped, as on a hung host or behind a network partition) under
/// a running relay. The relay notices within its --database-timeout and
/// says so, instead of waiting forever on a dead connection; once Postgres
/// answers again it publishes everything, in order.
async fn a_postgres_that_stops_answering_is_noticed(mode: &'static str) {
    let pg = TempPostgres::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url, Kafka::start(), mode).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 10).await;
    let topic = t.topic("acct", 4).await;
    let (mut relay, log) = t.logged_relay(&["--database-timeout", "2s"]);
    let before = write(pool, 50, 10, 0.0).await;
    consume_and_drain(
        pool,
        &kafka.brokers(),
        &[&topic],
        &before.committed,
        DEADLINE,
    )
    .await;

    pg.freeze();
    let noticed = log
        .wait_for_line("no answer from Postgres within 2s", Duration::from_secs(30))
        .await;
    pg.thaw();
    assert!(
        noticed.contains("retrying with backoff"),
        "the relay named the hang but not what it does about it: {noticed}"
    );
    let after = write(pool, 50, 10, 0.0).await;
    let mut written = before;
    written.committed.extend(after.committed);
    let records = consume_and_drain(
        pool,
        &kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay exited while Postgres did not answer"
    );
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_notices_a_postgres_that_stops_answering() {
    a_postgres_that_stops_answering_is_noticed("poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_notices_a_postgres_that_stops_answering() {
    a_postgres_that_stops_answering_is_noticed("tail").await;
}

/// Runs the binary to completion with debug logging; returns (code, all output).
async fn output_of(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        relay_binary()
            .args(args)
            .env("OUTBOX_LOG", "debug")
            .envs(env.iter().copied())
            .output(),
    )
    .await
    .expect("the binary exits")
    .unwrap();
    let mut all = String::from_utf8_lossy(&output.stdout).into_owned();
    all.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_in_the_url_never_appears_in_any_output() {
    const SECRET: &str = "pw-5ecret-Zq9";
    let t = Setup::tail(Kafka::start()).await;
    sqlx::query(&format!(
        "create role app login password '{SECRET}' noreplication"
    ))
    .execute(&t.pool)
    .await
    .unwrap();
    sqlx::query("grant all on all tables in schema public to app")
        .execute(&t.pool)
        .await
        .unwrap();
    let app_url = t
        .url
        .replacen("postgres:outbox-relay-temp@", &format!("app:{SECRET}@"), 1);
    let wrong_password = t.url.replacen("outbox-relay-temp", SECRET, 1);
    let missing_db = format!("{}_missing", app_url);
    let fresh = fresh_database().await.replacen(
        "postgres:outbox-relay-temp@",
        &format!("postgres:{SECRET}@"),
        1,
    );
    let brokers = t.kafka.brokers();

    let mut failures = 0;
    for (what, args) in [
        (
            "unreachable database",
            vec![
                "run",
                "--database-url",
                "postgres://app:pw-5ecret-Zq9@127.0.0.1:1/shop",
                "--brokers",
                &brokers,
            ],
        ),
        (
            "malformed URL",
            vec![
                "run",
                "--database-url",
                "postgres://app:pw-5ecret-Zq9@host:notaport/shop",
                "--brokers",
                &brokers,
            ],
        ),
        (
            "wrong password",
            vec![
                "run",
                "--database-url",
                &wrong_password,
                "--brokers",
                &brokers,
            ],
        ),
        (
            "missing database",
            vec!["status", "--database-url", &missing_db],
        ),
        (
            "tables missing",
            vec!["run", "--database-url", &fresh, "--brokers", &brokers],
        ),
        (
            "no REPLICATION attribute",
            vec![
                "run",
                "--mode",
                "tail",
                "--database-url",
                &app_url,
                "--brokers",
                &brokers,
            ],
        ),
        (
            "migrate without the right to create a publication",
            vec![
                "migrate",
                "--database-url",
                &app_url,
                "--publication",
                "other_pub",
            ],
        ),
    ] {
        let (code, output) = output_of(&args, &[]).await;
        assert_ne!(code, 0, "{what}: expected a failure, got:\n{output}");
        assert!(
            !output.contains(SECRET),
            "{what}: the password leaked:\n{output}"
        );
        assert!(!output.contains("panicked"), "{what}:\n{output}");
        failures += 1;
    }
    assert_eq!(failures, 7);

    // Given through the environment, it is not echoed by --help either.
    let (_, help) = output_of(&["run", "--help"], &[("OUTBOX_DATABASE_URL", &app_url)]).await;
    assert!(help.contains("--database-url"), "{help}");
    assert!(
        !help.contains(SECRET),
        "--help showed the password:\n{help}"
    );

    // A running relay's debug log, reading the outbox with that password,
    // while it retries a broker it cannot reach with a SASL secret.
    let sasl = format!(
        "security.protocol=SASL_PLAINTEXT,sasl.mechanisms=PLAIN,sasl.username=u,sasl.password={SECRET}"
    );
    let mut cmd = relay_binary();
    cmd.args([
        "run",
        "--database-url",
        &app_url,
        "--brokers",
        "127.0.0.1:9",
    ])
    .env("OUTBOX_KAFKA_CONFIG", &sasl)
    .env("OUTBOX_LOG", "debug")
    .kill_on_drop(true);
    let (mut relay, log) = spawn_logged(cmd);
    log.wait_for_line("cannot reach Kafka brokers", DEADLINE)
        .await;
    relay.kill().await.unwrap();
    let all = log.text();
    assert!(
        !all.contains(SECRET),
        "a running relay logged a password:\n{all}"
    );
}
