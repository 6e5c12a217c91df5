//! Replay: the retained rows of an outbox (tail mode with `--retention`)
//! read again, in `seq` order, for `outbox-relay replay`. Only rows known to
//! be published are replayed (see [`crate::source::published!`]): a row the
//! live relay has not published yet is its to publish first. Each row carries a `replayed`
//! header and, when asked, another topic.
//!
//! It holds no lease and confirms nothing in the database: it runs beside
//! the live relay, whose progress it never touches. Its own progress lives
//! in memory; a replay that stops part way is started again.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseConfig, ReplayFilter};
use crate::database::{self, within};
use crate::error::Error;
use crate::outbox::OutboxRow;
use crate::source::{Aggregate, Confirm, Source};

/// The header every replayed record carries: when the replay started (RFC
/// 3339), so that consumers can tell a replay from a first delivery.
pub const HEADER_REPLAYED: &str = "replayed";

/// Whether any slot recorded what it published (retention was on).
const ANY_PUBLISHED: &str =
    "select exists (select 1 from relay_slot where published_before is not null)";

/// The filter's published rows after `seq` `$1`.
const SELECT_REPLAY_BATCH: &str = concat!(
    "select seq, id, aggregate_type, aggregate_id, event_type, topic, \
     payload::text as payload, headers, created_at, partition_key from outbox \
     where seq > $1 and created_at >= $2 and created_at < $3 \
     and ($4::text is null or aggregate_type = $4) and ($5::text is null or aggregate_id = $5) \
     and ",
    crate::source::published!("outbox"),
    " order by seq limit $6"
);

/// How many of the filter's rows are published, and how many are not yet.
const COUNT: &str = concat!(
    "select count(*) filter (where p), count(*) filter (where not p) from \
     (select ",
    crate::source::published!("outbox"),
    " as p from outbox \
     where created_at >= $1 and created_at < $2 \
     and ($3::text is null or aggregate_type = $3) and ($4::text is null or aggregate_id = $4)) t"
);

/// The rows a replay covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayCount {
    /// Published rows in the window: what the replay republishes.
    pub published: i64,
    /// Rows in the window the live relay has not published yet.
    pub unpublished: i64,
}

/// Reads the rows to replay, one batch after another.
pub struct ReplaySource {
    database: DatabaseConfig,
    filter: ReplayFilter,
    conn: Option<PgConnection>,
    /// Checked that some row is known to be published.
    checked: bool,
    /// The last `seq` confirmed, and the `seq`s of the batch in flight.
    after_seq: i64,
    batch_seqs: Vec<i64>,
    /// The `replayed` header's value.
    started: String,
    /// Rows the sink confirmed so far.
    replayed: Arc<AtomicU64>,
    /// Cancelled once every row was read and confirmed.
    done: CancellationToken,
}

impl ReplaySource {
    pub fn new(database: DatabaseConfig, filter: ReplayFilter, done: CancellationToken) -> Self {
        ReplaySource {
            database,
            filter,
            conn: None,
            checked: false,
            after_seq: i64::MIN,
            batch_seqs: Vec::new(),
            started: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            replayed: Arc::default(),
            done,
        }
    }

    /// Rows the sink confirmed so far, readable while the replay runs.
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.replayed.clone()
    }

    async fn conn(&mut self) -> Result<&mut PgConnection, Error> {
        if self.conn.is_none() {
            let mut conn = database::connect(&self.database).await?;
            database::check_schema(&mut conn, &self.database).await?;
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or(Error::NotConnected {
            doing: "reading rows to replay",
        })
    }

    /// Fails with one line when no slot recorded what it published: there
    /// is nothing retained to replay.
    async fn check_retained(&mut self) -> Result<(), Error> {
        if self.checked {
            return Ok(());
        }
        let limit = self.database.call_timeout();
        let conn = self.conn().await?;
        let any: bool = within(
            limit,
            "reading which rows are published",
            sqlx::query_scalar(ANY_PUBLISHED).fetch_one(conn),
        )
        .await?;
        if !any {
            return Err(Error::Setup(format!(
                "no row of the outbox in schema \"{}\" at {} is known to be published: replay republishes the rows tail mode keeps with --retention; run the relay with --mode tail --retention DURATION, and replay once it has published",
                self.database.schema(),
                self.database.target()
            )));
        }
        self.checked = true;
        Ok(())
    }

    /// How many rows the filter covers, published and not yet.
    pub async fn count(&mut self) -> Result<ReplayCount, Error> {
        self.check_retained().await?;
        let limit = self.database.call_timeout();
        let f = self.filter.clone();
        let conn = self.conn().await?;
        let (published, unpublished): (i64, i64) = within(
            limit,
            "counting rows to replay",
            sqlx::query_as(COUNT)
                .bind(f.since)
                .bind(f.until)
                .bind(f.aggregate_type)
                .bind(f.aggregate_id)
                .fetch_one(conn),
        )
        .await?;
        Ok(ReplayCount {
            published,
            unpublished,
        })
    }

    fn mark(&self, mut row: OutboxRow) -> OutboxRow {
        row.headers.0.insert(
            HEADER_REPLAYED.to_owned(),
            Value::String(self.started.clone()),
        );
        if let Some(topic) = &self.filter.topic_override {
            row.topic = Some(topic.clone());
        }
        row
    }
}

impl Source for ReplaySource {
    async fn next_batch(
        &mut self,
        max: usize,
        _idle: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OutboxRow>, Error> {
        if shutdown.is_cancelled() {
            return Ok(Vec::new());
        }
        let checked = self.check_retained().await;
        self.reset(checked)?;
        let limit = self.database.call_timeout();
        let after = self.after_seq;
        let f = self.filter.clone();
        let rows = async {
            let conn = self.conn().await?;
            within(
                limit,
                "reading rows to replay",
                sqlx::query_as::<_, OutboxRow>(SELECT_REPLAY_BATCH)
                    .bind(after)
                    .bind(f.since)
                    .bind(f.until)
                    .bind(f.aggregate_type)
                    .bind(f.aggregate_id)
                    .bind(i64::try_from(max).unwrap_or(i64::MAX))
                    .fetch_all(conn),
            )
            .await
        }
        .await;
        let rows = self.reset(rows)?;
        if rows.is_empty() {
            // The relay confirms a batch before it asks for the next: every
            // row was published.
            self.done.cancel();
            return Ok(Vec::new());
        }
        self.batch_seqs = rows.iter().map(|r| r.seq).collect();
        Ok(rows.into_iter().map(|r| self.mark(r)).collect())
    }

    async fn renew(&mut self) -> Result<(), Error> {
        Ok(())
    }

    async fn blocked_aggregates(
        &mut self,
        _rows: &[OutboxRow],
    ) -> Result<HashSet<Aggregate>, Error> {
        Ok(HashSet::new())
    }

    async fn confirm(&mut self, confirm: &Confirm) -> Result<(), Error> {
        let n = confirm.len();
        if let Some(&seq) = n.checked_sub(1).and_then(|i| self.batch_seqs.get(i)) {
            self.after_seq = seq;
        }
        self.replayed
            .fetch_add(confirm.published.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl ReplaySource {
    /// Drops the connection after an error, so the next batch reconnects.
    fn reset<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

/// A time for `--since`/`--until`: RFC 3339, or a duration meaning that long
/// before `now` (e.g. `2h`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text.trim()) {
        return Some(at.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text.trim()).ok()?;
    Some(now - chrono::Duration::from_std(ago).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_time("2026-12-01T08:30:00+01:00", now).unwrap(),
            DateTime::parse_from_rfc3339("2026-12-01T07:30:00Z").unwrap()
        );
        assert_eq!(
            parse_time("90m", now).unwrap(),
            DateTime::parse_from_rfc3339("2026-12-02T10:30:00Z").unwrap()
        );
        assert_eq!(parse_time("yesterday", now), None);
    }
}
