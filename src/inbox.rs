//! The consuming half: exactly-once effects on top of at-least-once delivery.
//!
//! A consumer opens a transaction, calls [`claim`] with its consumer group
//! and the record's message id, applies its effects in the same transaction
//! only if the claim is [`Claim::New`], commits, and only then commits the
//! Kafka offset. A redelivered record finds its id already recorded and is
//! skipped; a crash before the database commit rolls back both the effects
//! and the claim, so the redelivery applies them once. Two consumers racing
//! on the same id serialize on the inbox's primary key.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool, id_header: Option<&[u8]>) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_relay::inbox::{self, Claim};
//!
//! let id = inbox::message_id(id_header)?; // the record's `id` header
//! // with the `kafka` feature: inbox::kafka_message_id(&record)?
//! // `nats`: inbox::nats_message_id(message.headers.as_ref())?
//! // `rabbitmq`: inbox::rabbitmq_message_id(&delivery.properties)?
//! let mut tx = pool.begin().await?;
//! if inbox::claim(&mut tx, "billing", id).await? == Claim::New {
//!     sqlx::query("update balances set amount = amount + 10 where account = 'alice'")
//!         .execute(&mut *tx)
//!         .await?;
//! }
//! tx.commit().await?;
//! // now commit the record's offset
//! # Ok(()) }
//! ```
//!
//! The inbox grows by one row per message; [`purge`] removes rows older than
//! the longest redelivery window you expect (`outbox-relay inbox-purge`).

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

/// Whether a message is seen for the first time by this consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First delivery: apply the effects in this transaction.
    New,
    /// Already processed by this group: skip the effects.
    Duplicate,
}

/// A record that cannot be deduplicated because it has no usable id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageIdError {
    #[error(
        "the record has no \"id\" header (RabbitMQ: message_id); it was not written by outbox-relay"
    )]
    Missing,
    #[error("the record's \"id\" header is not a UUID: {0}")]
    Invalid(String),
}

/// The message id in the value of a record's `id` header (`None`: the
/// record has no such header), whatever the broker.
pub fn message_id(id_header: Option<&[u8]>) -> Result<Uuid, MessageIdError> {
    let value = id_header.ok_or(MessageIdError::Missing)?;
    let text = std::str::from_utf8(value).map_err(|e| MessageIdError::Invalid(e.to_string()))?;
    Uuid::parse_str(text).map_err(|e| MessageIdError::Invalid(e.to_string()))
}

/// The message id of a Kafka record published by the relay (its `id`
/// header).
#[cfg(feature = "kafka")]
pub fn kafka_message_id<M: rdkafka::Message>(record: &M) -> Result<Uuid, MessageIdError> {
    use rdkafka::message::Headers;

    use crate::message::HEADER_ID;
    let header = record
        .headers()
        .and_then(|headers| headers.iter().find(|h| h.key == HEADER_ID));
    message_id(header.and_then(|h| h.value))
}

/// The message id of a NATS message published by the relay: its `id`
/// header (the relay also sets `Nats-Msg-Id` to the same value, which
/// JetStream keeps for deduplication). Pass the message's `headers`.
#[cfg(feature = "nats")]
pub fn nats_message_id(headers: Option<&async_nats::HeaderMap>) -> Result<Uuid, MessageIdError> {
    use crate::message::HEADER_ID;
    let header = headers.and_then(|headers| headers.get(HEADER_ID));
    message_id(header.map(|value| value.as_str().as_bytes()))
}

/// The message id of a RabbitMQ message published by the relay: its
/// `message_id` property. Pass the delivery's `properties`.
#[cfg(feature = "rabbitmq")]
pub fn rabbitmq_message_id(properties: &lapin::BasicProperties) -> Result<Uuid, MessageIdError> {
    message_id(
        properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().as_bytes()),
    )
}

const CLAIM: &str =
    "insert into inbox (consumer_group, message_id) values ($1, $2) on conflict do nothing";

/// Records `(consumer_group, message_id)` in the caller's transaction and
/// says whether it is new. Must run in the same transaction as the effects.
pub async fn claim(
    conn: &mut PgConnection,
    consumer_group: &str,
    message_id: Uuid,
) -> Result<Claim, sqlx::Error> {
    let inserted = sqlx::query(CLAIM)
        .bind(consumer_group)
        .bind(message_id)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(if inserted == 1 {
        Claim::New
    } else {
        Claim::Duplicate
    })
}

/// Deletes inbox rows processed more than `older_than` ago; returns how many.
/// A message redelivered after its row was purged would be applied again, so
/// keep rows longer than any redelivery can take.
pub async fn purge(conn: &mut PgConnection, older_than: Duration) -> Result<u64, sqlx::Error> {
    let seconds = older_than.as_secs_f64();
    let deleted =
        sqlx::query("delete from inbox where processed_at < now() - make_interval(secs => $1)")
            .bind(seconds)
            .execute(conn)
            .await?
            .rows_affected();
    Ok(deleted)
}
