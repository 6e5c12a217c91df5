//! Rows the broker rejects for good, under each `--on-poison` policy, and the
//! operator's `dead-letters` commands. The poison here is a record larger
//! than the producer's `message.max.bytes` (1 MB by default), refused as
//! MSG_SIZE_TOO_LARGE on any broker.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_relay::outbox::{self, Event};
use serde_json::json;
use sqlx::PgPool;
use support::*;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

/// Inserts one event per entry, in order; `big` ones carry a 2 MB payload.
async fn insert(pool: &PgPool, rows: &[(&str, bool)]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (n, (aggregate, big)) in rows.iter().enumerate() {
        let payload = if *big {
            json!({"n": n, "pad": "x".repeat(2_000_000)})
        } else {
            json!({"n": n})
        };
        let event = Event::new("poison", *aggregate, "e", payload);
        ids.push(event.id);
        let mut conn = pool.acquire().await.unwrap();
        outbox::insert(&mut conn, &event).await.unwrap();
    }
    ids
}

async fn dead_letters(pool: &PgPool) -> Vec<(Uuid, String)> {
    sqlx::query_as("select id, error from dead_letter order by seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Runs an `outbox-relay` command to completion; returns (code, stdout+stderr).
async fn cli(args: &[&str]) -> (i32, String) {
    let out = relay_binary().args(args).output().await.unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_moves_the_poison_aside_and_keeps_going() {
    let t = Setup::new(Kafka::start()).await;
    let topic = t.topic("poison", 2).await;
    let ids = insert(
        &t.pool,
        &[("x", false), ("x", true), ("x", false), ("y", false)],
    )
    .await;
    let mut relay = t.relay(&[]);
    let good = [ids[0], ids[2], ids[3]];
    let records = consume_and_drain(&t.pool, &t.kafka.brokers(), &[&topic], &good, DEADLINE).await;
    relay.kill().await.unwrap();
    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    assert!(
        good.iter().all(|id| seen.contains(id)),
        "a good row is missing"
    );
    assert!(!seen.contains(&ids[1]), "the rejected row was published");
    let dead = dead_letters(&t.pool).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, ids[1]);
    assert!(dead[0].1.contains("too large"), "{}", dead[0].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn block_aggregate_parks_the_rest_of_the_aggregate_and_a_retry_replays_it_in_order() {
    let t = Setup::new(Kafka::start()).await;
    let topic = t.topic("poison", 2).await;
    let brokers = t.kafka.brokers();
    let ids = insert(
        &t.pool,
        &[
            ("x", false),
            ("y", false),
            ("x", true),
            ("y", false),
            ("x", false),
            ("y", false),
            ("x", false),
        ],
    )
    .await;
    let (x, y) = ([ids[0], ids[2], ids[4], ids[6]], [ids[1], ids[3], ids[5]]);
    let mut relay = t.relay(&["--on-poison", "block-aggregate"]);
    wait_until_drained(&t.pool, DEADLINE).await;
    // A later row of the blocked aggregate is parked too; the other flows.
    let later = insert(&t.pool, &[("x", false), ("y", false)]).await;
    let flowing: Vec<Uuid> = y.iter().copied().chain([ids[0], later[1]]).collect();
    let records = consume_and_drain(&t.pool, &brokers, &[&topic], &flowing, DEADLINE).await;
    relay.kill().await.unwrap();
    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    for id in [x[1], x[2], x[3], later[0]] {
        assert!(
            !seen.contains(&id),
            "a row of the blocked aggregate was published"
        );
    }
    let dead = dead_letters(&t.pool).await;
    let dead_ids: Vec<Uuid> = dead.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        dead_ids,
        vec![x[1], x[2], x[3], later[0]],
        "parked out of order"
    );
    assert!(dead[0].1.contains("too large"), "{}", dead[0].1);
    assert!(
        dead[1..]
            .iter()
            .all(|(_, e)| e.starts_with("parked: aggregate poison/x"))
    );

    // The operator sees them, then replays the aggregate with a limit that
    // admits the big row: all of it arrives, after x's first row, in order.
    let (code, listed) = cli(&["dead-letters", "list", "--database-url", &t.url]).await;
    assert_eq!(code, 0, "{listed}");
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(listed.contains(&x[1].to_string()), "{listed}");
    let (code, out) = cli(&[
        "dead-letters",
        "retry",
        "--database-url",
        &t.url,
        "--id",
        &x[1].to_string(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("moved 4 rows back into the outbox"), "{out}");
    let mut relay = t.relay(&[
        "--on-poison",
        "block-aggregate",
        "--kafka-config",
        "message.max.bytes=4000000",
    ]);
    let all: Vec<Uuid> = x.iter().chain(&later).copied().collect();
    let records = consume_ids(&brokers, &[&topic], &all, DEADLINE).await;
    relay.kill().await.unwrap();
    let x_order: Vec<Uuid> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("x"))
        .map(Consumed::id)
        .collect();
    assert_eq!(
        x_order,
        vec![x[0], x[1], x[2], x[3], later[0]],
        "aggregate x left its order"
    );
    assert!(dead_letters(&t.pool).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn halt_stops_at_the_poison_with_one_line_and_keeps_it() {
    let t = Setup::new(Kafka::start()).await;
    let topic = t.topic("poison", 2).await;
    let ids = insert(&t.pool, &[("x", false), ("x", true), ("x", false)]).await;
    let output = tokio::time::timeout(
        DEADLINE,
        t.relay_command().args(["--on-poison", "halt"]).output(),
    )
    .await
    .expect("the relay exits")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: the broker rejected row seq ")
            && last.contains(&ids[1].to_string())
            && last.contains("--on-poison halt stopped the relay with the row still in the outbox"),
        "{stderr}"
    );
    let records = consume_ids(&t.kafka.brokers(), &[&topic], &[ids[0]], DEADLINE).await;
    assert_eq!(
        records.iter().map(Consumed::id).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    let left: Vec<Uuid> = sqlx::query_scalar("select id from outbox order by seq")
        .fetch_all(&t.pool)
        .await
        .unwrap();
    assert_eq!(
        left,
        vec![ids[1], ids[2]],
        "halt must keep the poison and what follows"
    );

    // Purge needs a selection; with one, it deletes.
    let (code, out) = cli(&["dead-letters", "purge", "--database-url", &t.url]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("dead-letters purge needs --id UUID or --all or --older-than AGE"),
        "{out}"
    );
}
