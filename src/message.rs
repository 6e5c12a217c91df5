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

use crate::config::{NullPayload, TopicTemplate};
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
