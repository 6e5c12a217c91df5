//! `outbox-relay replay`: the retained rows of a time window, or of one
//! aggregate, published again in order and marked, while the live relay
//! keeps publishing new rows.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::PgPool;
use support::*;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// The database's clock, as RFC 3339.
async fn now(pool: &PgPool) -> String {
    sqlx::query_scalar(
        "select to_char(clock_timestamp() at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Runs `replay` with `args` to its end; returns (exit code, stdout, stderr).
async fn replay(t: &Setup, args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(
        DEADLINE,
        relay_binary()
            .args([
                "replay",
                "--database-url",
                &t.url,
                "--brokers",
                &t.kafka.brokers(),
            ])
            .arg("--topic-template")
            .arg(format!("{}.{{aggregate_type}}", t.prefix))
            .args(args)
            .output(),
    )
    .await
    .expect("the replay ends")
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn replayed_mark(record: &Consumed) -> bool {
    record.headers.iter().any(|(k, _)| k == "replayed")
}

/// Within each key, the records carry consecutive versions in offset order
/// (a replay of a window starts anywhere in an aggregate's history).
fn assert_consecutive_per_key(records: &[Consumed]) {
    let mut by_key: HashMap<String, Vec<&Consumed>> = HashMap::new();
    for r in records {
        by_key.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    for (key, mut list) in by_key {
        list.sort_by_key(|r| (r.partition, r.offset));
        let versions: Vec<i64> = list.iter().map(|r| r.version()).collect();
        assert!(
            versions.windows(2).all(|w| w[1] == w[0] + 1),
            "aggregate {key}: replayed versions {versions:?} are not in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_window_and_one_aggregate_are_replayed_in_order_and_marked_while_the_relay_runs() {
    let t = Setup::tail(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    create_aggregates(pool, 5).await;
    let topic = t.topic("acct", 4).await;
    let replays = format!("{}.replays", t.prefix);
    kafka.create_topic(&replays, 3).await;
    let mut relay = t.relay(&["--retention", "1h"]);

    let mut everything = write(pool, 40, 5, 0.1).await;
    let since = now(pool).await;
    let window = write(pool, 80, 5, 0.1).await;
    let until = now(pool).await;
    everything.append(write(pool, 40, 5, 0.1).await);
    let mut all: Vec<Uuid> = everything.committed.clone();
    all.extend(&window.committed);
    consume_all_retained(pool, &kafka.brokers(), &[&topic], &all, DEADLINE).await;

    // A dry run counts and publishes nothing.
    let (code, stdout, stderr) =
        replay(&t, &["--since", &since, "--until", &until, "--dry-run"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("would replay {} rows", window.committed.len())),
        "{stdout}"
    );

    // The window, to a topic of its own, while writers keep writing and the
    // live relay keeps publishing.
    let writers = {
        let pool = pool.clone();
        tokio::spawn(async move { write(&pool, 150, 5, 0.0).await })
    };
    let (code, stdout, stderr) = replay(
        &t,
        &[
            "--since",
            &since,
            "--until",
            &until,
            "--topic-override",
            &replays,
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("replayed {} rows", window.committed.len())),
        "{stdout}"
    );
    let live = writers.await.unwrap();
    let records = consume_until(&kafka.brokers(), &[&replays], DEADLINE, |r| {
        r.len() >= window.committed.len()
    })
    .await;
    let ids: Vec<Uuid> = records.iter().map(Consumed::id).collect();
    let expected: HashSet<Uuid> = window.committed.iter().copied().collect();
    assert_eq!(ids.len(), expected.len(), "each row of the window once");
    assert_eq!(
        ids.iter().copied().collect::<HashSet<_>>(),
        expected,
        "exactly the rows of the window"
    );
    assert!(records.iter().all(replayed_mark), "every replay is marked");
    assert_consecutive_per_key(&records);
    let delivered = consume_ids(&kafka.brokers(), &[&topic], &live.committed, DEADLINE).await;
    assert_delivered(&delivered, &live);
    assert!(
        delivered.iter().all(|r| !replayed_mark(r)),
        "the live relay's records are not marked"
    );

    // One aggregate, every retained row of it, to its own topic.
    consume_all_retained(pool, &kafka.brokers(), &[&topic], &live.committed, DEADLINE).await;
    let a3: Vec<Uuid> =
        sqlx::query_scalar("select id from outbox where aggregate_id = 'a3' order by seq")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(!a3.is_empty());
    let (code, _, stderr) = replay(&t, &["--since", "1h", "--aggregate-id", "a3"]).await;
    assert_eq!(code, 0, "{stderr}");
    let records = consume_until(&kafka.brokers(), &[&topic], DEADLINE, |r| {
        r.iter().filter(|r| replayed_mark(r)).count() >= a3.len()
    })
    .await;
    let replayed: Vec<Consumed> = records.into_iter().filter(replayed_mark).collect();
    assert_eq!(
        replayed.iter().map(Consumed::id).collect::<Vec<_>>(),
        a3,
        "every row of a3, once, in order"
    );
    assert_consecutive_per_key(&replayed);
    relay.kill().await.unwrap();

    // Poll mode would take the retained rows for unpublished ones.
    let output = tokio::time::timeout(
        DEADLINE,
        relay_command_in("poll", &t.url, &kafka.brokers(), &t.prefix).output(),
    )
    .await
    .expect("the poll relay exits")
    .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or_default()
            .contains("holds published rows that tail mode kept with --retention"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_without_retained_rows_and_a_bad_window_are_one_clear_line() {
    let t = Setup::tail(Kafka::start()).await;
    let (code, _, stderr) = replay(&t, &["--since", "1h"]).await;
    assert_eq!(code, 1, "{stderr}");
    let line = stderr.lines().last().unwrap_or_default();
    assert!(
        line.contains("is known to be published") && line.contains("--retention"),
        "{stderr}"
    );
    let (code, _, stderr) = replay(&t, &["--since", "1h", "--until", "2h"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is not before --until"), "{stderr}");
    let (code, _, stderr) = replay(&t, &["--since", "last tuesday"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--since (OUTBOX_REPLAY_SINCE) \"last tuesday\" is neither"),
        "{stderr}"
    );
}
