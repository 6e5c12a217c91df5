//! The writing half: a service builds an [`Event`] and inserts it with
//! [`insert`] inside its own business transaction, so the event commits or
//! rolls back with the business change. The relay publishes it after commit.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
//! use outbox_relay::outbox::{self, Event};
//! use serde_json::json;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("update accounts set balance = balance - 10 where id = 'alice'")
//!     .execute(&mut *tx)
//!     .await?;
//! let event = Event::new("account", "alice", "debited", json!({"amount": 10}))
//!     .with_header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
//! outbox::insert(&mut tx, &event).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! The connection's `search_path` decides which schema's `outbox` is used,
//! as for the service's own tables.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgConnection;
use uuid::Uuid;

/// One event to publish. Maps to one outbox row and one Kafka record.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The message id: the dedup key end to end (Kafka header `id`).
    pub id: Uuid,
    /// Routes to a topic through the relay's template; Kafka header `aggregate_type`.
    pub aggregate_type: String,
    /// The Kafka record key: one aggregate, one partition, in order.
    pub aggregate_id: String,
    /// Kafka header `event_type`.
    pub event_type: String,
    /// An explicit topic, overriding the template.
    pub topic: Option<String>,
    /// The record value, as JSON; `None` stores SQL null.
    pub payload: Option<Value>,
    /// Extra Kafka headers (trace context, correlation id, ...).
    pub headers: Map<String, Value>,
    /// The record key (Kafka) and routing key (RabbitMQ) instead of
    /// `aggregate_id` (README, "Partition key"); `None`: `aggregate_id`.
    pub partition_key: Option<String>,
}

impl Event {
    /// An event with a fresh random id, no explicit topic and no extra headers.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: Value,
    ) -> Self {
        Event {
            id: Uuid::new_v4(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            topic: None,
            payload: Some(payload),
            headers: Map::new(),
            partition_key: None,
        }
    }

    /// Uses `id` as the message id instead of a random one.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Publishes to `topic` instead of the relay's template.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Keys the record by `key` instead of the aggregate id: every event
    /// with the same key goes to the same Kafka partition. Per-aggregate
    /// order reaches consumers only if all of an aggregate's events carry the
    /// same key (README, "Partition key").
    pub fn with_partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Adds a Kafka header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), Value::String(value.into()));
        self
    }
}

const INSERT: &str = "insert into outbox (id, aggregate_type, aggregate_id, event_type, topic, payload, headers) \
     select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[])";

/// With partition keys: only used when an event has one, so that a service
/// writing none works against a schema migrated before the column existed.
const INSERT_KEYED: &str = "insert into outbox (id, aggregate_type, aggregate_id, event_type, topic, payload, headers, partition_key) \
     select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[], $8::text[])";

/// Inserts one event through the caller's connection or transaction.
pub async fn insert(conn: &mut PgConnection, event: &Event) -> Result<(), sqlx::Error> {
    insert_all(conn, std::slice::from_ref(event)).await
}

/// Inserts several events in one statement, in slice order (their `seq`
/// follows the slice, so one aggregate's events keep this order).
pub async fn insert_all(conn: &mut PgConnection, events: &[Event]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let aggregate_types: Vec<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
    let aggregate_ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
    let event_types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let topics: Vec<Option<&str>> = events.iter().map(|e| e.topic.as_deref()).collect();
    let payloads: Vec<Option<&Value>> = events.iter().map(|e| e.payload.as_ref()).collect();
    #[cfg(feature = "trace-context")]
    let context = crate::trace_context::current();
    let headers: Vec<Value> = events
        .iter()
        .map(|e| {
            #[allow(unused_mut)]
            let mut headers = e.headers.clone();
            // The service's current span, unless the event names its own.
            #[cfg(feature = "trace-context")]
            if let Some((traceparent, tracestate)) = &context
                && !headers.contains_key(crate::trace_context::TRACEPARENT)
            {
                headers.insert(
                    crate::trace_context::TRACEPARENT.into(),
                    Value::String(traceparent.clone()),
                );
                if let Some(tracestate) = tracestate {
                    headers.insert(
                        crate::trace_context::TRACESTATE.into(),
                        Value::String(tracestate.clone()),
                    );
                }
            }
            Value::Object(headers)
        })
        .collect();
    let keyed = events.iter().any(|e| e.partition_key.is_some());
    let query = sqlx::query(if keyed { INSERT_KEYED } else { INSERT })
        .bind(ids)
        .bind(aggregate_types)
        .bind(aggregate_ids)
        .bind(event_types)
        .bind(topics)
        .bind(payloads)
        .bind(headers);
    let query = if keyed {
        let keys: Vec<Option<&str>> = events.iter().map(|e| e.partition_key.as_deref()).collect();
        query.bind(keys)
    } else {
        query
    };
    query.execute(conn).await?;
    Ok(())
}

/// A committed outbox row as the relay reads it. `payload` stays the JSON
/// text Postgres returned, so it is published without being re-encoded.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OutboxRow {
    /// The relay's order within one aggregate (see README, "Ordering").
    pub seq: i64,
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub topic: Option<String>,
    pub payload: Option<String>,
    pub headers: sqlx::types::Json<Map<String, Value>>,
    pub created_at: DateTime<Utc>,
    /// The record key when set, instead of `aggregate_id`.
    pub partition_key: Option<String>,
}
