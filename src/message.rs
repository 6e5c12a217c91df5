//! How an outbox row becomes the message every sink publishes: the data
//! contract of SPEC section 2, in one place, the same for every broker.
//! Each sink maps a [`Message`] onto its own record (see `sink/`).
//!
//! - topic: the row's `topic` if not null, else the template rendered with
//!   the row's `aggregate_type` and `event_type`;
//! - key: `partition_key` if not null, else `aggregate_id` (a sink keeps one
//!   key in order: Kafka's partitioner keeps one key in one partition);
//! - value: `payload` as JSON text bytes; a null payload is the bytes `null`,
//!   or no value (a tombstone) when configured;
//! - headers: `id` (UUID text), `event_type`, `aggregate_type`, then every
//!   pair of the `headers` object in ascending key order. String
//!   values are sent as their UTF-8 bytes, other JSON values as their JSON
//!   text. A pair named like one of the three fixed headers is dropped, so
//!   the message id is never ambiguous.

use crate::config::{CloudEventsMode, Format, NullPayload, SinkKind, TopicTemplate};
use crate::outbox::OutboxRow;

/// Header names the relay always sets.
pub const HEADER_ID: &str = "id";
pub const HEADER_EVENT_TYPE: &str = "event_type";
pub const HEADER_AGGREGATE_TYPE: &str = "aggregate_type";
/// The header that carries the row's `aggregate_id` where the broker has no
/// record key (NATS).
pub const HEADER_AGGREGATE_ID: &str = "aggregate_id";

/// A message ready to publish, whatever the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    /// The record key: the row's `partition_key`, else its `aggregate_id`.
    pub key: String,
    /// The row's `aggregate_id` (NATS carries it in a header).
    pub aggregate_id: String,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The message for `row` under the given routing rules.
pub fn from_row(row: &OutboxRow, template: &TopicTemplate, null_payload: NullPayload) -> Message {
    let topic = match &row.topic {
        Some(topic) => topic.clone(),
        None => template.render(&row.aggregate_type, &row.event_type, &row.aggregate_id),
    };
    let value = match (&row.payload, null_payload) {
        (Some(json), _) => Some(json.as_bytes().to_vec()),
        (None, NullPayload::JsonNull) => Some(b"null".to_vec()),
        (None, NullPayload::Tombstone) => None,
    };
    let mut headers = Vec::with_capacity(3 + row.headers.len());
    headers.push((HEADER_ID.to_owned(), row.id.to_string().into_bytes()));
    headers.push((
        HEADER_EVENT_TYPE.to_owned(),
        row.event_type.clone().into_bytes(),
    ));
    headers.push((
        HEADER_AGGREGATE_TYPE.to_owned(),
        row.aggregate_type.clone().into_bytes(),
    ));
    for (name, value) in row.headers.iter() {
        if matches!(
            name.as_str(),
            HEADER_ID | HEADER_EVENT_TYPE | HEADER_AGGREGATE_TYPE
        ) {
            continue;
        }
        let bytes = match value {
            serde_json::Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        headers.push((name.clone(), bytes));
    }
    Message {
        topic,
        key: row
            .partition_key
            .clone()
            .unwrap_or_else(|| row.aggregate_id.clone()),
        aggregate_id: row.aggregate_id.clone(),
        value,
        headers,
    }
}

/// The content type of a structured CloudEvent.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json; charset=UTF-8";

/// The header that carries a message's content type where the broker has
/// no property for it (Kafka, NATS); the RabbitMQ sink moves it to the
/// `content_type` property.
pub const HEADER_CONTENT_TYPE: &str = "content-type";

/// Turns `message` (made by [`from_row`] from `row`) into `format`, by the
/// protocol binding of `broker` (README, "CloudEvents").
pub fn apply_format(message: &mut Message, row: &OutboxRow, format: &Format, broker: SinkKind) {
    let Format::CloudEvents { mode, source } = format else {
        return;
    };
    let mut attributes = vec![
        ("specversion", "1.0".to_owned()),
        ("id", row.id.to_string()),
        ("source", source.clone()),
        ("type", row.event_type.clone()),
        ("subject", row.aggregate_id.clone()),
        (
            "time",
            row.created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
    ];
    // The distributed tracing extension: the row's own trace context.
    for name in ["traceparent", "tracestate"] {
        if let Some(serde_json::Value::String(value)) = row.headers.get(name) {
            attributes.push((name, value.clone()));
        }
    }
    match mode {
        CloudEventsMode::Binary => {
            let prefix = match broker {
                SinkKind::Kafka => "ce_",
                SinkKind::Nats | SinkKind::RabbitMq => "ce-",
            };
            for (name, value) in attributes {
                message
                    .headers
                    .push((format!("{prefix}{name}"), value.into_bytes()));
            }
            if message.value.is_some() {
                message
                    .headers
                    .push((HEADER_CONTENT_TYPE.to_owned(), b"application/json".to_vec()));
            }
        }
        CloudEventsMode::Structured => {
            // The payload is embedded as Postgres printed it: JSON text,
            // never re-encoded.
            let mut event = String::from("{");
            for (name, value) in &attributes {
                event.push_str(&format!("{}:{},", json_string(name), json_string(value)));
            }
            match &row.payload {
                Some(data) => {
                    event.push_str("\"datacontenttype\":\"application/json\",\"data\":");
                    event.push_str(data);
                }
                None => {
                    event.pop(); // the last comma
                }
            }
            event.push('}');
            message.value = Some(event.into_bytes());
            message.headers.push((
                HEADER_CONTENT_TYPE.to_owned(),
                CLOUDEVENTS_JSON.as_bytes().to_vec(),
            ));
        }
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(topic: Option<&str>, payload: Option<&str>) -> OutboxRow {
        OutboxRow {
            seq: 7,
            id: uuid::Uuid::nil(),
            aggregate_type: "order".into(),
            aggregate_id: "o-1".into(),
            event_type: "created".into(),
            topic: topic.map(str::to_owned),
            payload: payload.map(str::to_owned),
            headers: sqlx::types::Json(
                json!({"traceparent": "tp", "version": 2, "id": "spoof"})
                    .as_object()
                    .cloned()
                    .unwrap(),
            ),
            created_at: chrono::Utc::now(),
            partition_key: None,
        }
    }

    #[test]
    fn cloudevents_follow_each_brokers_binding_byte_for_byte() {
        let mut r = row(None, Some(r#"{"a": 1}"#));
        r.created_at = "2026-12-01T10:20:30.123456Z".parse().unwrap();
        let template = TopicTemplate::parse("{aggregate_type}", "t").unwrap();
        let binary = Format::CloudEvents {
            mode: CloudEventsMode::Binary,
            source: "/billing".into(),
        };
        let structured = Format::CloudEvents {
            mode: CloudEventsMode::Structured,
            source: "/billing".into(),
        };
        let made = |format: &Format, kind: SinkKind, row: &OutboxRow| {
            let mut m = from_row(row, &template, NullPayload::JsonNull);
            apply_format(&mut m, row, format, kind);
            m
        };
        let text = |m: &Message| -> Vec<(String, String)> {
            m.headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).unwrap()))
                .collect()
        };
        let m = made(&binary, SinkKind::Kafka, &r);
        assert_eq!(m.value.as_deref(), Some(br#"{"a": 1}"#.as_slice()));
        let headers = text(&m);
        let ce: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(k, _)| k.starts_with("ce_") || k == "content-type")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            ce,
            [
                ("ce_specversion", "1.0"),
                ("ce_id", "00000000-0000-0000-0000-000000000000"),
                ("ce_source", "/billing"),
                ("ce_type", "created"),
                ("ce_subject", "o-1"),
                ("ce_time", "2026-12-01T10:20:30.123456Z"),
                ("ce_traceparent", "tp"),
                ("content-type", "application/json"),
            ]
        );
        // The plain headers stay: the inbox reads `id`.
        assert_eq!(
            headers[0],
            ("id".into(), "00000000-0000-0000-0000-000000000000".into())
        );
        for (kind, prefix) in [(SinkKind::Nats, "ce-"), (SinkKind::RabbitMq, "ce-")] {
            let headers = text(&made(&binary, kind, &r));
            assert!(
                headers.contains(&(format!("{prefix}type"), "created".into())),
                "{headers:?}"
            );
        }

        let m = made(&structured, SinkKind::Kafka, &r);
        assert_eq!(
            String::from_utf8(m.value.clone().unwrap()).unwrap(),
            r#"{"specversion":"1.0","id":"00000000-0000-0000-0000-000000000000","source":"/billing","type":"created","subject":"o-1","time":"2026-12-01T10:20:30.123456Z","traceparent":"tp","datacontenttype":"application/json","data":{"a": 1}}"#
        );
        assert!(text(&m).contains(&("content-type".into(), CLOUDEVENTS_JSON.into())));
        // A null payload: no data member.
        let null = row(None, None);
        let m = made(&structured, SinkKind::Kafka, &null);
        let event: serde_json::Value = serde_json::from_slice(&m.value.unwrap()).unwrap();
        assert!(
            event.get("data").is_none() && event.get("datacontenttype").is_none(),
            "{event}"
        );
        // Plain is untouched.
        assert_eq!(
            made(&Format::Plain, SinkKind::Kafka, &r),
            from_row(&r, &template, NullPayload::JsonNull)
        );
    }

    #[test]
    fn the_partition_key_keys_the_record_and_the_aggregate_stays() {
        let mut keyed = row(None, Some("{}"));
        keyed.partition_key = Some("tenant-3".into());
        let template = TopicTemplate::parse("{aggregate_type}", "t").unwrap();
        let m = from_row(&keyed, &template, NullPayload::JsonNull);
        assert_eq!(
            (m.key.as_str(), m.aggregate_id.as_str()),
            ("tenant-3", "o-1")
        );
        let m = from_row(&row(None, Some("{}")), &template, NullPayload::JsonNull);
        assert_eq!((m.key.as_str(), m.aggregate_id.as_str()), ("o-1", "o-1"));
    }

    #[test]
    fn maps_row_to_record() {
        let r = from_row(
            &row(None, Some(r#"{"a": 1}"#)),
            &TopicTemplate::default(),
            NullPayload::JsonNull,
        );
        assert_eq!(r.topic, "order.events");
        assert_eq!(r.key, "o-1");
        assert_eq!(r.value.as_deref(), Some(&br#"{"a": 1}"#[..]));
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "event_type",
                "aggregate_type",
                "traceparent",
                "version"
            ]
        );
        assert_eq!(r.headers[0].1, b"00000000-0000-0000-0000-000000000000");
        assert_eq!(r.headers[3].1, b"tp");
        assert_eq!(r.headers[4].1, b"2");
    }

    #[test]
    fn explicit_topic_and_null_payload() {
        let r = from_row(
            &row(Some("custom"), None),
            &TopicTemplate::default(),
            NullPayload::JsonNull,
        );
        assert_eq!(r.topic, "custom");
        assert_eq!(r.value.as_deref(), Some(&b"null"[..]));
        let r = from_row(
            &row(None, None),
            &TopicTemplate::default(),
            NullPayload::Tombstone,
        );
        assert_eq!(r.value, None);
    }
}
