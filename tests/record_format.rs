//! The record format, checked by a Kafka client that is not ours: the relay
//! publishes a spread of outbox rows (unicode, nested and null payloads,
//! non-string, reserved and unicode header values, an explicit topic), and
//! `tests/python/check_records.py` reads every partition back with Python's
//! confluent-kafka and compares each record's topic, partition (the Java
//! client's murmur2), key, value and headers with the rows, by the README's
//! mapping rule implemented there a second time.
//!
//! Needs `python3` with confluent-kafka (`OUTBOX_TEST_PYTHON` names another
//! interpreter); `.ci/run` installs it.

mod support;

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

/// Runs the checker over `rows`; returns its output.
async fn check_records(brokers: &str, template: &str, rows: &Value) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.json");
    std::fs::write(&path, serde_json::to_vec(rows).unwrap()).unwrap();
    let args = [
        "--brokers".as_ref(),
        brokers.as_ref(),
        "--template".as_ref(),
        template.as_ref(),
        "--rows".as_ref(),
        path.as_os_str(),
    ];
    let output = run_python_check("check_records.py", &args, "confluent-kafka").await;
    assert_ne!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn describe(output: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_client_reads_the_documented_record_format() {
    let t = Setup::new(Kafka::start()).await;
    let (pool, kafka) = (&t.pool, &t.kafka);
    t.topic("order", 3).await;
    t.topic("kunde", 2).await;
    let explicit = format!("{}-explicit", t.prefix);
    kafka.create_topic(&explicit, 1).await;

    let insert = "insert into outbox (id, aggregate_type, aggregate_id, event_type, topic, payload, headers, partition_key) \
                  values ($1, $2, $3, $4, $5, $6, $7, $8)";
    let mut tx = pool.begin().await.unwrap();
    for i in 0..90i64 {
        let (aggregate_type, aggregate_id) = match i % 3 {
            0 | 1 => ("order", format!("order-{}", i % 7)),
            _ => ("kunde", format!("kunde-ß{}-✓", i % 4)),
        };
        let topic = (i % 10 == 9).then(|| explicit.clone());
        // Four of the order aggregates are keyed by a tenant (two share
        // each key); the others, and every kunde, by their aggregate id.
        let partition_key =
            (aggregate_type == "order" && i % 7 < 4).then(|| format!("tenant-{}", i % 7 % 2));
        let payload = (i % 11 != 5).then(|| {
            json!({
                "n": i,
                "text": "grüße, 世界 \"quoted\" \\ back",
                "nested": {"list": [1, 2.5, null, true], "empty": {}},
                "big": 12345678901234i64,
            })
        });
        let headers = match i % 4 {
            0 => json!({}),
            1 => {
                json!({"traceparent": format!("00-{}-b7ad6b7169203331-01", Uuid::new_v4().simple()), "schema-version": 3})
            }
            2 => {
                json!({"id": "spoofed", "event_type": "spoofed", "aggregate_type": "spoofed", "ok": true, "none": null})
            }
            _ => {
                json!({"réponse": "kanal-ü", "list": [1, "x"], "correlation_id": Uuid::new_v4().to_string(), "Zeta": "upper first"})
            }
        };
        sqlx::query(insert)
            .bind(Uuid::new_v4())
            .bind(aggregate_type)
            .bind(&aggregate_id)
            .bind(format!("{aggregate_type}.changed.{}", i % 2))
            .bind(topic)
            .bind(payload)
            .bind(headers)
            .bind(partition_key)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // The rows as the checker gets them: payload as Postgres prints the jsonb.
    let rows: Value = sqlx::query_scalar(
        "select coalesce(json_agg(json_build_object('seq', seq, 'id', id, 'aggregate_type', aggregate_type, \
         'aggregate_id', aggregate_id, 'event_type', event_type, 'topic', topic, 'payload', payload::text, \
         'headers', headers, 'partition_key', partition_key) order by seq), '[]')::jsonb from outbox",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 90);

    let mut relay = t.relay(&[]);
    wait_until_drained(pool, DEADLINE).await;
    relay.kill().await.unwrap();
    let dead: Vec<(String, String)> =
        sqlx::query_as("select coalesce(topic, aggregate_type), error from dead_letter")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(dead.is_empty(), "rows were dead-lettered: {dead:?}");

    let template = format!("{}.{{aggregate_type}}", t.prefix);
    let output = check_records(&kafka.brokers(), &template, &rows).await;
    assert!(
        output.status.success(),
        "the records differ from the rows:\n{}",
        describe(&output)
    );

    // The checker is not vacuous: the same records against rows with one
    // header value, one payload and one key changed are three mismatches.
    let mut tampered = rows.clone();
    let list = tampered.as_array_mut().unwrap();
    let header_row = list
        .iter()
        .position(|r| r["headers"].get("traceparent").is_some())
        .unwrap();
    list[header_row]["headers"]["traceparent"] = json!("00-other-01");
    list[0]["payload"] = json!(r#"{"n": 0}"#);
    list[2]["aggregate_id"] = json!("kunde-other");
    let ids: Vec<String> = [header_row, 0, 2]
        .iter()
        .map(|&i| list[i]["id"].as_str().unwrap().to_owned())
        .collect();
    let output = check_records(&kafka.brokers(), &template, &tampered).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    for id in &ids {
        assert!(
            stdout.contains(&format!("MISMATCH {id}:")),
            "the change to row {id} went unnoticed:\n{}",
            describe(&output)
        );
    }
}
