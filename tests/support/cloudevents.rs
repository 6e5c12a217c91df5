//! CloudEvents checks shared by the brokers' suites: rows that exercise
//! every attribute, and the comparison of what a reader parsed with them.

use serde_json::{Value, json};

use super::*;

/// The `--cloudevents-source` the suites give.
pub const CE_SOURCE: &str = "/billing/outbox";

/// What one row must become.
pub struct ExpectedEvent {
    pub id: Uuid,
    pub event_type: String,
    pub aggregate_id: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub payload: Option<Value>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Inserts twelve rows of aggregate type `acct`: four aggregates, unicode
/// payloads, one null payload, trace context on some, a partition key on
/// one; returns what each must become.
pub async fn insert_cloudevents_rows(pool: &PgPool) -> Vec<ExpectedEvent> {
    let mut expected = Vec::new();
    for i in 0..12 {
        let id = Uuid::new_v4();
        let aggregate_id = format!("a-{}", i % 4);
        let payload =
            (i != 5).then(|| json!({"n": i, "text": "grüße \"quoted\"", "list": [1, null]}));
        let traceparent =
            (i % 3 == 0).then(|| format!("00-{}-b7ad6b7169203331-01", Uuid::new_v4().simple()));
        let tracestate = (i % 6 == 0).then(|| "vendor=opaque".to_string());
        let mut headers = serde_json::Map::new();
        if let Some(tp) = &traceparent {
            headers.insert("traceparent".into(), tp.clone().into());
        }
        if let Some(ts) = &tracestate {
            headers.insert("tracestate".into(), ts.clone().into());
        }
        let created_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "insert into outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, partition_key) \
             values ($1, 'acct', $2, $3, $4, $5, $6) returning created_at",
        )
        .bind(id)
        .bind(&aggregate_id)
        .bind(format!("com.example.acct.changed.v{}", i % 2))
        .bind(&payload)
        .bind(Value::Object(headers))
        .bind((i == 7).then_some("tenant-1"))
        .fetch_one(pool)
        .await
        .unwrap();
        expected.push(ExpectedEvent {
            id,
            event_type: format!("com.example.acct.changed.v{}", i % 2),
            aggregate_id,
            created_at,
            payload,
            traceparent,
            tracestate,
        });
    }
    expected
}

/// Compares parsed events (`{"id_header", "attributes", "data"}` each) with
/// the rows: every row once, every attribute by the README's mapping.
pub fn assert_cloudevents(events: &[Value], expected: &[ExpectedEvent], what: &str) {
    assert_eq!(
        events.len(),
        expected.len(),
        "{what}: events read: {events:?}"
    );
    for want in expected {
        let id = want.id.to_string();
        let event = events
            .iter()
            .find(|e| e["attributes"]["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{what}: no event with id {id} in {events:?}"));
        let attributes = &event["attributes"];
        let text = |name: &str| attributes[name].as_str().map(str::to_owned);
        assert_eq!(
            text("specversion").as_deref(),
            Some("1.0"),
            "{what}: {event}"
        );
        assert_eq!(
            text("source").as_deref(),
            Some(CE_SOURCE),
            "{what}: {event}"
        );
        assert_eq!(
            text("type"),
            Some(want.event_type.clone()),
            "{what}: {event}"
        );
        assert_eq!(
            text("subject"),
            Some(want.aggregate_id.clone()),
            "{what}: {event}"
        );
        let time = chrono::DateTime::parse_from_rfc3339(&text("time").unwrap_or_default())
            .unwrap_or_else(|e| panic!("{what}: time is not RFC 3339 ({e}): {event}"));
        assert_eq!(time, want.created_at, "{what}: time: {event}");
        assert_eq!(text("traceparent"), want.traceparent, "{what}: {event}");
        assert_eq!(text("tracestate"), want.tracestate, "{what}: {event}");
        match &want.payload {
            Some(payload) => {
                assert_eq!(&event["data"], payload, "{what}: data: {event}");
                assert_eq!(
                    text("datacontenttype").as_deref(),
                    Some("application/json"),
                    "{what}: {event}"
                );
            }
            None => assert!(
                event["data"].is_null(),
                "{what}: data of a null payload: {event}"
            ),
        }
        // The relay's own `id` stays beside the event: the inbox reads it.
        assert_eq!(event["id_header"], id.as_str(), "{what}: {event}");
    }
}

/// Runs `tests/python/check_cloudevents.py` with `args`: the CloudEvents
/// Python SDK's bindings parse what the broker holds.
pub async fn read_cloudevents_with_python(args: &[&str]) -> Vec<Value> {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let output = run_python_check(
        "check_cloudevents.py",
        &args,
        "confluent-kafka, pika and cloudevents",
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "check_cloudevents.py failed ({}): {stderr}; it needs confluent-kafka, pika and cloudevents (pip install)",
        output.status
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}
