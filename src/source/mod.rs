//! Where committed outbox rows come from. A source hands the relay batches of
//! rows in the order they must be published, and later applies what the
//! relay confirms: rows Kafka acknowledged, and rows rejected for good that
//! move to the dead-letter table. It never confirms anything on its own.
//!
//! Both sources elect one active relay per schema the same way: a session
//! advisory lock held on the connection that deletes confirmed rows, so
//! losing that connection loses the lock at the same moment, and a poll and
//! a tail relay never run on one outbox together.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::DatabaseConfig;
use crate::database;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::OutboxRow;

pub mod pgoutput;
pub mod poll;
pub mod tail;

pub use poll::PollSource;
pub use tail::TailSource;

/// An aggregate: `(aggregate_type, aggregate_id)`.
pub type Aggregate = (String, String);

/// What the relay confirms after a batch: a prefix of it, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Confirm {
    /// `seq` of rows Kafka acknowledged.
    pub published: Vec<i64>,
    /// `seq` and error of rows the broker rejected for good.
    pub dead_letters: Vec<(i64, String)>,
}

impl Confirm {
    pub fn is_empty(&self) -> bool {
        self.published.is_empty() && self.dead_letters.is_empty()
    }

    /// How many rows this confirms.
    pub fn len(&self) -> usize {
        self.published.len() + self.dead_letters.len()
    }
}

/// A reader of committed outbox rows.
pub trait Source {
    /// Waits for committed rows and returns up to `max` of them in publication
    /// order. Returns an empty batch only when `shutdown` fired.
    fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, Error>> + Send;

    /// The aggregates among `rows` that have a row in the dead-letter table
    /// (for `--on-poison block-aggregate`).
    fn blocked_aggregates(
        &mut self,
        rows: &[OutboxRow],
    ) -> impl Future<Output = Result<HashSet<Aggregate>, Error>> + Send;

    /// Makes the confirmed rows' progress durable (delete, move to dead
    /// letters, or flush a position). Rows not confirmed are read again.
    fn confirm(&mut self, confirm: &Confirm) -> impl Future<Output = Result<(), Error>> + Send;
}

const TRY_LOCK: &str = "select pg_try_advisory_lock(hashtextextended($1, 0))";

const DELETE_PUBLISHED: &str = "delete from outbox where seq = any($1)";

const MOVE_TO_DEAD_LETTER: &str = "with moved as (delete from outbox where seq = any($1) returning *) \
     insert into dead_letter (seq, id, aggregate_type, aggregate_id, event_type, topic, payload, headers, created_at, error) \
     select m.seq, m.id, m.aggregate_type, m.aggregate_id, m.event_type, m.topic, m.payload, m.headers, m.created_at, e.error \
     from moved m join unnest($1::bigint[], $2::text[]) as e(seq, error) on e.seq = m.seq \
     on conflict (id) do update set error = excluded.error, attempts = dead_letter.attempts + 1, failed_at = now()";

/// Runs one call to Postgres, giving up after `limit` (the configured call
/// timeout)
/// with a transient error. The caller drops the connection on any error, so
/// a call abandoned mid-way never leaves it half-read.
pub(crate) async fn timed<T>(
    limit: Duration,
    doing: &'static str,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(Error::Database {
            doing,
            source: sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from Postgres within {}; the connection is dropped and opened again",
                    humantime::format_duration(limit)
                ),
            )),
        }),
    }
}

/// Opens a connection and waits, as a standby, until it holds the leader
/// lock for this schema. `None` on shutdown.
pub(crate) async fn leader_connection(
    database: &DatabaseConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<PgConnection>, Error> {
    metrics.set_active(false);
    let mut conn = database::connect(database).await?;
    database::check_schema(&mut conn, database).await?;
    let lock = format!("outbox-relay:{}", database.schema());
    let mut standing_by = false;
    loop {
        let locked: bool = timed(database.call_timeout(), "taking the leader lock", async {
            sqlx::query_scalar(TRY_LOCK)
                .bind(&lock)
                .fetch_one(&mut conn)
                .await
                .map_err(Error::db("taking the leader lock"))
        })
        .await?;
        if locked {
            info!(database = %database.target(), "active: this instance holds the relay lock");
            metrics.set_active(true);
            return Ok(Some(conn));
        }
        if !standing_by {
            info!(database = %database.target(), "standing by: another relay instance holds the lock for this outbox");
            standing_by = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

const BLOCKED_AGGREGATES: &str = "select distinct d.aggregate_type, d.aggregate_id from dead_letter d \
     join unnest($1::text[], $2::text[]) as b(aggregate_type, aggregate_id) \
     on d.aggregate_type = b.aggregate_type and d.aggregate_id = b.aggregate_id";

/// Which of the rows' aggregates have a row in the dead-letter table,
/// within the call timeout `limit`.
pub(crate) async fn blocked_aggregates(
    conn: Option<&mut PgConnection>,
    rows: &[OutboxRow],
    limit: Duration,
) -> Result<HashSet<Aggregate>, Error> {
    timed(
        limit,
        "reading blocked aggregates",
        read_blocked_aggregates(conn, rows),
    )
    .await
}

async fn read_blocked_aggregates(
    conn: Option<&mut PgConnection>,
    rows: &[OutboxRow],
) -> Result<HashSet<Aggregate>, Error> {
    let Some(conn) = conn else {
        return Err(Error::Database {
            doing: "reading blocked aggregates",
            source: sqlx::Error::PoolClosed,
        });
    };
    let (types, ids): (Vec<&str>, Vec<&str>) = rows
        .iter()
        .map(|r| (r.aggregate_type.as_str(), r.aggregate_id.as_str()))
        .unzip();
    let blocked: Vec<Aggregate> = sqlx::query_as(BLOCKED_AGGREGATES)
        .bind(types)
        .bind(ids)
        .fetch_all(conn)
        .await
        .map_err(Error::db("reading blocked aggregates"))?;
    Ok(blocked.into_iter().collect())
}

/// Deletes the published rows and moves the rejected ones to the dead-letter
/// table, in one transaction, within the call timeout `limit`.
pub(crate) async fn apply_confirm(
    conn: &mut PgConnection,
    confirm: &Confirm,
    limit: Duration,
) -> Result<(), Error> {
    timed(
        limit,
        "confirming published rows",
        confirm_in_transaction(conn, confirm),
    )
    .await
}

async fn confirm_in_transaction(conn: &mut PgConnection, confirm: &Confirm) -> Result<(), Error> {
    let doing = "confirming published rows";
    let mut tx = conn.begin().await.map_err(Error::db(doing))?;
    if !confirm.published.is_empty() {
        sqlx::query(DELETE_PUBLISHED)
            .bind(&confirm.published)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(doing))?;
    }
    if !confirm.dead_letters.is_empty() {
        let (seqs, errors): (Vec<i64>, Vec<&str>) = confirm
            .dead_letters
            .iter()
            .map(|(seq, error)| (*seq, error.as_str()))
            .unzip();
        sqlx::query(MOVE_TO_DEAD_LETTER)
            .bind(seqs)
            .bind(errors)
            .execute(&mut *tx)
            .await
            .map_err(Error::db("moving rejected rows to the dead-letter table"))?;
    }
    tx.commit().await.map_err(Error::db(doing))
}
