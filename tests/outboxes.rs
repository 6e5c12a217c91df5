//! Several outboxes in one process (`run --config`): two schemas of one
//! database and a second database, plus a schema not migrated yet. An
//! outbox whose database is down, or whose tables are missing, is reported
//! and tried again while the others publish.

mod support;

use std::time::Duration;

use outbox_relay::config::{DatabaseConfig, Identifier};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use support::testkit::{StopMode, TempPostgres};
use support::*;

const DEADLINE: Duration = Duration::from_secs(120);

/// A pool whose sessions find the tables of `schema` first.
async fn pool_in(url: &str, schema: &'static str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                sqlx::query(&format!("set search_path = {schema}"))
                    .execute(conn)
                    .await
                    .map(drop)
            })
        })
        .connect(url)
        .await
        .unwrap()
}

/// Runs `outbox-relay migrate` for `schema` of the database at `url`.
async fn migrate(url: &str, schema: &str) {
    let db = DatabaseConfig::from_url(
        url,
        Identifier::parse(schema, "--schema").unwrap(),
        "--database-url",
    )
    .unwrap();
    let publication =
        Identifier::parse(&format!("outbox_relay_{schema}"), "--publication").unwrap();
    outbox_relay::database::migrate(&db, &publication)
        .await
        .unwrap();
}

/// Every committed row of `written` arrives on `topic`, in order per
/// aggregate.
async fn assert_arrives(kafka: &Kafka, topic: &str, written: &Written) {
    let records = consume_ids(&kafka.brokers(), &[topic], &written.committed, DEADLINE).await;
    assert_delivered(&records, written);
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_process_relays_several_outboxes_and_a_failing_one_stops_none_of_the_others() {
    let t = Setup::new(Kafka::start()).await;
    let kafka = &t.kafka;
    // Outbox a: "public" of the first database (migrated by the setup).
    let a = t.pool.clone();
    create_aggregates(&a, 10).await;
    // Outbox b: schema "tenant_b" of the same database.
    sqlx::query("create schema tenant_b")
        .execute(&a)
        .await
        .unwrap();
    migrate(&t.url, "tenant_b").await;
    let b = pool_in(&t.url, "tenant_b").await;
    create_aggregates(&b, 10).await;
    // Outbox c: schema "tenant_c", whose tables do not exist yet.
    // Outbox d: a second database, in a cluster that is down at first.
    let mut other = TempPostgres::start().await.unwrap();
    let d_url = other.create_database("billing").await.unwrap();
    migrate(&d_url, "public").await;
    other.stop(StopMode::Fast);

    let topics: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|o| format!("{}-{o}.acct", t.prefix))
        .collect();
    for topic in &topics {
        kafka.create_topic(topic, 2).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        format!(
            r#"
brokers = "{brokers}"
metrics_address = "127.0.0.1:0"
batch_size = 50

[[outbox]]
database_url = "{a_url}"
topic_template = "{prefix}-a.{{aggregate_type}}"

[[outbox]]
database_url = "{a_url}"
schema = "tenant_b"
shards = 2
topic_template = "{prefix}-b.{{aggregate_type}}"

[[outbox]]
database_url = "{a_url}"
schema = "tenant_c"
topic_template = "{prefix}-c.{{aggregate_type}}"

[[outbox]]
database_url = "{d_url}"
mode = "tail"
slot = "relay_d"
publication = "outbox_relay_public"
topic_template = "{prefix}-d.{{aggregate_type}}"
"#,
            brokers = kafka.brokers(),
            a_url = t.url,
            prefix = t.prefix,
        ),
    )
    .unwrap();
    let mut cmd = relay_binary();
    cmd.arg("run")
        .arg("--config")
        .arg(&file)
        .env("OUTBOX_LOG", "info")
        .kill_on_drop(true);
    let (mut relay, log) = spawn_logged(cmd);

    // a and b publish while c has no tables and d's database is down.
    let written_a = write(&a, 40, 10, 0.1).await;
    let written_b = write(&b, 40, 10, 0.1).await;
    assert_arrives(kafka, &topics[0], &written_a).await;
    assert_arrives(kafka, &topics[1], &written_b).await;
    log.wait_for_line("\"tenant_c\".outbox does not exist", DEADLINE)
        .await;
    log.wait_for_line(
        "this outbox is tried again with backoff, the others go on",
        DEADLINE,
    )
    .await;

    // One endpoint for all: each outbox's metrics under its label, and
    // /readyz names the failing ones.
    let address = endpoint_address(&log, DEADLINE).await;
    let (status, text) = get(&address, "/metrics").await;
    assert_eq!(status, 200);
    let a_label = format!(
        "outbox=\"{}/public\"",
        t.url.split('@').nth(1).unwrap().split('?').next().unwrap()
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("outbox_relay_published_total{") && l.contains(&a_label)),
        "{a_label}\n{text}"
    );
    let (status, body) = get(&address, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("/tenant_c:"), "{body}");

    // c's tables appear: it starts publishing.
    migrate(&t.url, "tenant_c").await;
    let c = pool_in(&t.url, "tenant_c").await;
    create_aggregates(&c, 10).await;
    let written_c = write(&c, 40, 10, 0.1).await;
    assert_arrives(kafka, &topics[2], &written_c).await;

    // d's database comes up: it starts too, in tail mode.
    other.start_again().await.unwrap();
    let d = pool_in(&d_url, "public").await;
    create_aggregates(&d, 10).await;
    log.wait_for_line("streaming the outbox from the WAL", DEADLINE)
        .await;
    let written_d = write(&d, 40, 10, 0.1).await;
    assert_arrives(kafka, &topics[3], &written_d).await;
    // And a went on the whole time.
    let more_a = write(&a, 20, 10, 0.1).await;
    assert_arrives(kafka, &topics[0], &more_a).await;
    assert!(relay.try_wait().unwrap().is_none(), "{}", log.text());
    relay.kill().await.unwrap();
}

#[tokio::test]
async fn a_flag_beside_config_or_an_outbox_listed_twice_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "brokers = \"127.0.0.1:1\"\n\n[[outbox]]\ndatabase_url = \"postgres://u:hunter2@127.0.0.1:1/d\"\n\n[[outbox]]\ndatabase_url = \"postgres://u:hunter2@127.0.0.1:1/d\"\n",
    )
    .unwrap();
    // Exits 2 with exactly one line on stderr.
    let refused = |extra: &'static [&'static str]| {
        let mut cmd = relay_binary();
        cmd.arg("run").arg("--config").arg(&file).args(extra);
        async move {
            let output = cmd.output().await.unwrap();
            let stderr = String::from_utf8(output.stderr).unwrap();
            assert_eq!(output.status.code(), Some(2), "{stderr}");
            stderr.trim().to_owned()
        }
    };
    assert_eq!(
        refused(&["--batch-size", "5"]).await,
        "error: --batch-size given with --config: put every setting in the file (a top-level key applies to every outbox) or in its OUTBOX_* variable"
    );
    let stderr = refused(&[]).await;
    assert_eq!(
        stderr,
        "error: outbox 127.0.0.1:1/d/public is listed twice; list each database and schema once"
    );
    assert!(!stderr.contains("hunter2"));
}
