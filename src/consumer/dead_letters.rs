//! The consumer side's dead letters (`consumer_dead_letter`): written by the
//! runtime, listed, marked for retry and purged by the operator, and applied
//! again by a running consumer of the group.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::partition::Applier;
use super::{Handler, Message};
use crate::inbox::{self, Claim};

/// One dead letter, as `list` shows it (payload and headers included).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ConsumerDeadLetter {
    pub id: i64,
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub message_id: Option<Uuid>,
    pub key: Option<Vec<u8>>,
    pub headers: Value,
    pub payload: Option<Vec<u8>>,
    pub error: String,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
    pub retry_requested_at: Option<DateTime<Utc>>,
}

impl fmt::Display for ConsumerDeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}[{}]@{} id {} failed {} attempts {}{}: {}",
            self.id,
            self.consumer_group,
            self.topic,
            self.partition,
            self.offset,
            self.message_id
                .map_or_else(|| "none".to_string(), |id| id.to_string()),
            self.failed_at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.attempts,
            if self.retry_requested_at.is_some() {
                " (retry requested)"
            } else {
                ""
            },
            self.error
        )
    }
}

impl ConsumerDeadLetter {
    /// The row as one JSON object: key and payload as text when they are
    /// UTF-8, else as hex under `key_hex` / `payload_hex`.
    pub fn to_json(&self) -> Value {
        let mut value = json!({
            "id": self.id,
            "group": self.consumer_group,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "message_id": self.message_id,
            "headers": self.headers,
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": self.failed_at,
            "retry_requested_at": self.retry_requested_at,
        });
        for (name, bytes) in [("key", &self.key), ("payload", &self.payload)] {
            let Some(bytes) = bytes else { continue };
            match std::str::from_utf8(bytes) {
                Ok(text) => value[name] = Value::String(text.to_string()),
                Err(_) => value[format!("{name}_hex")] = Value::String(hex(bytes)),
            }
        }
        value
    }
}

/// Which dead letters a retry or purge takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterSelection {
    /// Every row of the group.
    All,
    /// The row with this id (the first column of `list`).
    Id(i64),
    /// Rows that failed longer ago than this (purge only).
    OlderThan(Duration),
}

/// Runs `statement` (an update or delete of `consumer_dead_letter` ending
/// in `where`) on the rows of `group` that `selection` takes; returns how
/// many.
async fn on_selected(
    conn: &mut PgConnection,
    statement: &str,
    group: &str,
    selection: DeadLetterSelection,
) -> Result<u64, sqlx::Error> {
    let (id, age) = match selection {
        DeadLetterSelection::All => (None, None),
        DeadLetterSelection::Id(id) => (Some(id), None),
        DeadLetterSelection::OlderThan(age) => (None, Some(age.as_secs_f64())),
    };
    let affected = sqlx::query(&format!(
        "{statement} consumer_group = $1 and ($2::bigint is null or id = $2) \
         and ($3::float8 is null or failed_at < now() - make_interval(secs => $3))"
    ))
    .bind(group)
    .bind(id)
    .bind(age)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(affected)
}

/// The group's dead letters (every group's with `None`), oldest first.
pub async fn list(
    conn: &mut PgConnection,
    group: Option<&str>,
    limit: i64,
) -> Result<Vec<ConsumerDeadLetter>, sqlx::Error> {
    sqlx::query_as(
        r#"select id, consumer_group, topic, partition, "offset", message_id, key, headers,
                  payload, error, attempts, failed_at, retry_requested_at
             from consumer_dead_letter
            where $1::text is null or consumer_group = $1
            order by id limit $2"#,
    )
    .bind(group)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Marks the selected dead letters of `group` for a running consumer of the
/// group to apply again; returns how many. A row whose message was applied
/// meanwhile (a redelivered copy) is found in the inbox and removed.
pub async fn request_retry(
    conn: &mut PgConnection,
    group: &str,
    selection: DeadLetterSelection,
) -> Result<u64, sqlx::Error> {
    let mark = "update consumer_dead_letter set retry_requested_at = now() where";
    on_selected(conn, mark, group, selection).await
}

/// Deletes the selected dead letters of `group` for good; returns how many.
pub async fn purge(
    conn: &mut PgConnection,
    group: &str,
    selection: DeadLetterSelection,
) -> Result<u64, sqlx::Error> {
    on_selected(
        conn,
        "delete from consumer_dead_letter where",
        group,
        selection,
    )
    .await
}

/// Headers as stored: `[{"key": k, "value": text}]`, `{"key": k, "hex": ..}`
/// for a value that is not UTF-8, `{"key": k}` for a null one.
fn headers_json(headers: &[(String, Option<Vec<u8>>)]) -> Value {
    Value::Array(
        headers
            .iter()
            .map(|(key, value)| match value {
                None => json!({ "key": key }),
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => json!({ "key": key, "value": text }),
                    Err(_) => json!({ "key": key, "hex": hex(bytes) }),
                },
            })
            .collect(),
    )
}

fn headers_from_json(headers: &Value) -> Vec<(String, Option<Vec<u8>>)> {
    let Some(entries) = headers.as_array() else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let key = entry.get("key")?.as_str()?.to_string();
            let value = match (entry.get("value"), entry.get("hex")) {
                (Some(Value::String(text)), _) => Some(text.as_bytes().to_vec()),
                (_, Some(Value::String(hex))) => unhex(hex),
                _ => None,
            };
            Some((key, value))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Writes one dead letter in a transaction of its own. A message already
/// dead-lettered by this group (a redelivered copy) adds no row.
pub(crate) async fn insert(
    pool: &PgPool,
    group: &str,
    message: &Message,
    id: Option<Uuid>,
    error: &str,
    attempts: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"insert into consumer_dead_letter
               (consumer_group, topic, partition, "offset", message_id, key, headers, payload,
                error, attempts)
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           on conflict (consumer_group, message_id) do nothing"#,
    )
    .bind(group)
    .bind(&message.topic)
    .bind(message.partition)
    .bind(message.offset)
    .bind(id)
    .bind(&message.key)
    .bind(headers_json(&message.headers))
    .bind(&message.payload)
    .bind(error)
    .bind(attempts.min(i32::MAX as u32) as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// Applies the group's dead letters marked for retry, every `every`, until
/// `stop`. Each row in a transaction of its own, locked so that two
/// consumers of the group never take the same row: claimed in the inbox,
/// handled, deleted. A row that fails again stays, unmarked, with the new
/// error and one more attempt.
pub(crate) async fn redrive<H: Handler>(
    applier: &Applier<H>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        loop {
            match redrive_one(applier).await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(group = %applier.group, error = %e, "cannot retry dead letters now");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One marked row, if any; true when there was one.
async fn redrive_one<H: Handler>(applier: &Applier<H>) -> Result<bool, sqlx::Error> {
    let mut tx = applier.pool.begin().await?;
    let row: Option<ConsumerDeadLetter> = sqlx::query_as(
        r#"select id, consumer_group, topic, partition, "offset", message_id, key, headers,
                  payload, error, attempts, failed_at, retry_requested_at
             from consumer_dead_letter
            where consumer_group = $1 and retry_requested_at is not null
            order by id limit 1
              for update skip locked"#,
    )
    .bind(&applier.group)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let Some(id) = row.message_id else {
        // Without an id the inbox cannot keep it to once: it stays, with
        // the reason, until purged.
        sqlx::query(
            "update consumer_dead_letter set retry_requested_at = null, \
             error = 'cannot retry: the message has no usable id; ' || error where id = $1",
        )
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(true);
    };
    let message = Message {
        id,
        topic: row.topic.clone(),
        partition: row.partition,
        offset: row.offset,
        key: row.key.clone(),
        headers: headers_from_json(&row.headers),
        payload: row.payload.clone(),
        failed_attempts: row.attempts.max(0) as u32,
    };
    // The handler runs in a transaction of its own, as for a delivery; the
    // row stays locked by `tx` meanwhile. A crash after `attempt` commits
    // leaves the row marked: the next try finds the claim and removes it.
    let outcome = async {
        let mut attempt = applier.pool.begin().await?;
        if inbox::claim(&mut attempt, &applier.group, id).await? == Claim::Duplicate {
            return Ok(false);
        }
        super::partition::traced(
            &applier.group,
            &message,
            applier.handler.handle(&mut attempt, &message),
        )
        .await?;
        attempt.commit().await?;
        Ok::<_, super::HandlerError>(true)
    }
    .await;
    match outcome {
        Ok(applied) => {
            sqlx::query("delete from consumer_dead_letter where id = $1")
                .bind(row.id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            if applied {
                applier.stats.settled(1, 0);
            }
            info!(
                group = %applier.group, dead_letter = row.id, id = %id, applied,
                "retried a dead letter{}",
                if applied { "" } else { ": it was already applied" }
            );
        }
        Err(error) => {
            applier.stats.handler_failed();
            sqlx::query(
                "update consumer_dead_letter set retry_requested_at = null, error = $2, \
                 attempts = attempts + 1, failed_at = now() where id = $1",
            )
            .bind(row.id)
            .bind(error.to_string())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            warn!(
                group = %applier.group, dead_letter = row.id, id = %id, error = %error,
                "a retried dead letter failed again; it stays in consumer_dead_letter"
            );
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_their_stored_form() {
        let headers = vec![
            ("id".to_string(), Some(b"7".to_vec())),
            ("raw".to_string(), Some(vec![0xff, 0x00, 0x10])),
            ("empty".to_string(), None),
        ];
        let stored = headers_json(&headers);
        assert_eq!(
            stored,
            json!([
                {"key": "id", "value": "7"},
                {"key": "raw", "hex": "ff0010"},
                {"key": "empty"},
            ])
        );
        assert_eq!(headers_from_json(&stored), headers);
    }
}
