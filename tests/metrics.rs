//! `/metrics`, `/healthz` and `/readyz` on a running relay: the counters
//! match what was published and dead-lettered, the backlog gauge shows rows
//! piling up while Kafka is down, and readiness says so. Uses the mock
//! cluster on purpose: it takes every broker down and back on request.

mod support;

use std::time::Duration;

use outbox_relay::outbox::{self, Event};
use serde_json::json;
use support::*;

const DEADLINE: Duration = Duration::from_secs(90);

async fn insert_events(pool: &sqlx::PgPool, n: usize, pad: usize) {
    let events: Vec<Event> = (0..n)
        .map(|i| Event::new("m", format!("k{i}"), "e", json!({"pad": "x".repeat(pad)})))
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    outbox::insert_all(&mut conn, &events).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_readiness_follow_what_the_relay_does() {
    let t = Setup::new(Kafka::mock()).await;
    t.topic("m", 3).await;
    let (mut relay, log) = t.logged_relay(&["--kafka-config", "message.timeout.ms=2000"]);
    let address = endpoint_address(&log, DEADLINE).await;

    let (status, body) = get(&address, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    insert_events(&t.pool, 20, 10).await;
    wait_until_drained(&t.pool, DEADLINE).await;
    assert_eq!(metric(&address, "outbox_relay_published_total").await, 20.0);
    // Every acknowledged row's latency is observed once.
    assert_eq!(
        metric(&address, "outbox_relay_ack_latency_seconds_count").await,
        20.0
    );
    assert_eq!(metric(&address, "outbox_relay_active").await, 1.0);
    assert_eq!(get(&address, "/readyz").await.0, 200);

    // Kafka goes away: rows pile up, the gauge shows them, readiness drops.
    for broker in 1..=3 {
        t.kafka.cluster().broker_down(broker).unwrap();
    }
    insert_events(&t.pool, 10, 10).await;
    wait_for("/readyz to report the failure", DEADLINE, || async {
        let (status, body) = get(&address, "/readyz").await;
        status == 503 && body.contains("publishing to Kafka")
    })
    .await;
    wait_for(
        "the backlog gauge to show the waiting rows",
        DEADLINE,
        || async { metric(&address, "outbox_relay_backlog_rows").await >= 10.0 },
    )
    .await;
    assert!(metric(&address, "outbox_relay_failures_total").await >= 1.0);

    // And comes back: everything goes out, readiness returns.
    for broker in 1..=3 {
        t.kafka.cluster().broker_up(broker).unwrap();
    }
    wait_until_drained(&t.pool, DEADLINE).await;
    assert_eq!(metric(&address, "outbox_relay_published_total").await, 30.0);
    assert_eq!(get(&address, "/readyz").await.0, 200);

    // A row the broker can never take is counted.
    insert_events(&t.pool, 1, 2_000_000).await;
    wait_for("the dead-letter counter", DEADLINE, || async {
        metric(&address, "outbox_relay_dead_lettered_total").await == 1.0
    })
    .await;
    relay.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_returns_after_a_database_outage_with_nothing_to_publish() {
    let mut pg = support::testkit::TempPostgres::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let t = Setup::on(url, Kafka::mock(), "poll").await;
    let (mut relay, log) = t.logged_relay(&[]);
    let address = endpoint_address(&log, DEADLINE).await;
    wait_for("the relay to be ready", DEADLINE, || async {
        get(&address, "/readyz").await.0 == 200
    })
    .await;

    pg.stop(support::testkit::StopMode::Fast);
    wait_for("/readyz to report the database", DEADLINE, || async {
        let (status, body) = get(&address, "/readyz").await;
        status == 503 && body.contains("reading the outbox")
    })
    .await;
    pg.start_again().await.unwrap();
    // The outbox stays empty: readiness must come back from reading alone.
    wait_for("/readyz to recover", DEADLINE, || async {
        get(&address, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(outbox_count(&t.pool).await, 0);
    relay.kill().await.unwrap();
}

/// A standby is ready: with `maxUnavailable: 0` a rolling update waits for
/// the new pod's readiness, and a new pod is a standby until the old one
/// hands over (deploy/kubernetes). Only the active one counts as active.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_is_ready_and_only_the_active_relay_counts_as_active() {
    let t = Setup::new(Kafka::mock()).await;
    t.topic("m", 1).await;
    let (mut first, first_log) = t.logged_relay(&[]);
    let first_address = endpoint_address(&first_log, DEADLINE).await;
    wait_for("the first relay to be active", DEADLINE, || async {
        metric(&first_address, "outbox_relay_active").await == 1.0
    })
    .await;
    let (mut second, second_log) = t.logged_relay(&[]);
    let second_address = endpoint_address(&second_log, DEADLINE).await;
    insert_events(&t.pool, 5, 10).await;
    wait_until_drained(&t.pool, DEADLINE).await;
    // A standby is ready once the broker answered it, which may come after
    // the active one drained the outbox; it must come, and stay a standby.
    wait_for("the standby to be ready", DEADLINE, || async {
        get(&second_address, "/readyz").await == (200, "ready\n".to_string())
    })
    .await;
    assert_eq!(metric(&second_address, "outbox_relay_active").await, 0.0);
    assert_eq!(get(&second_address, "/healthz").await.0, 200);
    assert_eq!(
        get(&first_address, "/readyz").await.0,
        200,
        "the active one"
    );
    first.kill().await.unwrap();
    second.kill().await.unwrap();
}
