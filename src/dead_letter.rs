//! The operator's side of the dead-letter table: see what the broker
//! rejected for good (and what `--on-poison block-aggregate` parked behind
//! it), replay rows into the outbox, or purge them.
//!
//! A replay moves rows back into the outbox with their original `seq`, in one
//! transaction, and always takes every dead-lettered row of the chosen
//! aggregates together, so an aggregate's parked rows are published in their
//! order, and the aggregate is unblocked only when none of its rows is left
//! in the table.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::Error;

/// One dead-lettered row, without its payload.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeadLetter {
    pub seq: i64,
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub topic: Option<String>,
    pub error: String,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
}

impl fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}/{} {} failed {} attempts {}: {}",
            self.seq,
            self.id,
            self.aggregate_type,
            self.aggregate_id,
            self.event_type,
            self.failed_at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.attempts,
            self.error
        )
    }
}

/// Which rows a replay or purge takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every row.
    All,
    /// The row with this id; a replay also takes the rest of its aggregate.
    Id(Uuid),
    /// Rows that failed longer ago than this (purge only).
    OlderThan(Duration),
}

const LIST: &str = "select seq, id, aggregate_type, aggregate_id, event_type, topic, error, attempts, failed_at \
     from dead_letter order by seq limit $1";

const RETRY: &str = "with chosen as ( \
         select aggregate_type, aggregate_id from dead_letter where $1::uuid is null or id = $1 \
     ), moved as ( \
         delete from dead_letter d using (select distinct * from chosen) c \
         where d.aggregate_type = c.aggregate_type and d.aggregate_id = c.aggregate_id \
         returning d.* \
     ) \
     insert into outbox (seq, id, aggregate_type, aggregate_id, event_type, topic, payload, headers, created_at, partition_key) \
     overriding system value \
     select seq, id, aggregate_type, aggregate_id, event_type, topic, payload, headers, created_at, partition_key \
     from moved order by seq";

const PURGE: &str = "delete from dead_letter where ($1::uuid is null or id = $1) \
     and ($2::float8 is null or failed_at < now() - make_interval(secs => $2))";

/// The oldest `limit` dead-lettered rows, in `seq` order.
pub async fn list(conn: &mut PgConnection, limit: i64) -> Result<Vec<DeadLetter>, Error> {
    sqlx::query_as(LIST)
        .bind(limit)
        .fetch_all(conn)
        .await
        .map_err(Error::db("listing dead letters"))
}

/// Moves the selected rows (and the rest of their aggregates) back into the
/// outbox; returns how many. `OlderThan` is not a replay selection.
pub async fn retry(conn: &mut PgConnection, selection: Selection) -> Result<u64, Error> {
    let id = match selection {
        Selection::All => None,
        Selection::Id(id) => Some(id),
        Selection::OlderThan(_) => {
            return Err(Error::Config(
                "dead-letters retry takes --id UUID or --all, not --older-than".into(),
            ));
        }
    };
    let done = sqlx::query(RETRY)
        .bind(id)
        .execute(conn)
        .await
        .map_err(Error::db("moving dead letters back into the outbox"))?;
    Ok(done.rows_affected())
}

/// Deletes the selected rows for good; returns how many.
pub async fn purge(conn: &mut PgConnection, selection: Selection) -> Result<u64, Error> {
    let (id, older_than) = match selection {
        Selection::All => (None, None),
        Selection::Id(id) => (Some(id), None),
        Selection::OlderThan(age) => (None, Some(age.as_secs_f64())),
    };
    let done = sqlx::query(PURGE)
        .bind(id)
        .bind(older_than)
        .execute(conn)
        .await
        .map_err(Error::db("purging dead letters"))?;
    Ok(done.rows_affected())
}
