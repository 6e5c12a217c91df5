//! Where committed outbox rows come from. A source hands the relay batches of
//! rows in the order they must be published, and later applies what the
//! relay confirms: rows Kafka acknowledged, and rows rejected for good that
//! move to the dead-letter table. It never confirms anything on its own.
//!
//! Both sources elect one active relay per schema the same way (see
//! [`crate::ownership`]): a lease whose advisory lock is held on the
//! connection that deletes confirmed rows, so losing that connection loses
//! the lock at the same moment, and a poll and a tail relay never run on one
//! outbox together. Every confirm checks the lease's epoch and renews it in
//! the same statement.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseConfig, Lane};
use crate::database::{self, timed};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::OutboxRow;
use crate::ownership::{self, Candidate, Leader, Share, lease::RENEW};

pub mod poll;
pub mod replay;
pub mod tail;

pub use poll::PollSource;
pub use replay::ReplaySource;
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
    /// order. Returns an empty batch when none came within `idle` of
    /// waiting as the active instance (the relay then renews its lease), or
    /// when `shutdown` fired. Standing by does not count as waiting.
    fn next_batch(
        &mut self,
        max: usize,
        idle: Duration,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, Error>> + Send;

    /// Renews the lease of an active source (a no-op while standing by). The
    /// relay calls it whenever it waits, so that only a loop that makes
    /// progress keeps the lease.
    fn renew(&mut self) -> impl Future<Output = Result<(), Error>> + Send;

    /// The aggregates among `rows` that have a row in the dead-letter table
    /// (for `--on-poison block-aggregate`).
    fn blocked_aggregates(
        &mut self,
        rows: &[OutboxRow],
    ) -> impl Future<Output = Result<HashSet<Aggregate>, Error>> + Send;

    /// Makes the confirmed rows' progress durable (delete, move to dead
    /// letters, or flush a position) and renews the lease, only if this
    /// instance still holds it. Rows not confirmed are read again.
    fn confirm(&mut self, confirm: &Confirm) -> impl Future<Output = Result<(), Error>> + Send;
}

/// A subquery: how many of the transactions in the `bigint[]` parameter
/// `$xids` (32-bit ids, as a logical replication stream gives them) the
/// statement's snapshot does not see.
///
/// A transaction is sent to a logical replication client once its commit
/// record is flushed, which is a moment before it becomes visible to other
/// sessions (longer under synchronous replication, where the committing
/// session waits for a standby in between). Rows read from the WAL may
/// therefore be invisible for a short while: a statement that looks them up
/// or deletes them must see their transaction first, or it would take them
/// for already deleted, or delete nothing. Once a committed transaction is
/// visible to one snapshot it is visible to every later one.
///
/// The snapshot is taken once per statement, not once per id; each id is
/// widened to 64 bits against its `xmax` (an id is within 2^31 of it), then
/// checked with `pg_visible_in_snapshot`.
macro_rules! unseen {
    ($xids:literal) => {
        concat!(
            "(select count(*) from unnest(",
            $xids,
            "::bigint[]) as t(xid), \
             (select snap, pg_snapshot_xmax(snap)::text::bigint as xmax \
              from (select pg_current_snapshot() as snap) c) s \
             where not pg_visible_in_snapshot((s.xmax - (s.xmax % 4294967296 - t.xid + 6442450944) % 4294967296 \
             + 2147483648)::text::xid8, s.snap))"
        )
    };
}
pub(crate) use unseen;

/// A condition: the outbox row `$row` (a table alias) is in the lane of the
/// buckets `[$from, $to)`.
///
/// Wrapped in `coalesce(.., false)` (the same rows: `bucket` is never null)
/// so that the planner, which cannot estimate that expression, takes half
/// the rows to match, and reads a lane oldest first along the `seq` index.
/// Written plainly, a range on `bucket` without statistics (an outbox
/// analyzed while nearly empty, as an outbox mostly is, then a backlog)
/// is estimated at 0.5% of the rows, and the planner sorts the whole table
/// instead: here 36 ms against 1 ms per 1,000-row read of a 175,000-row
/// backlog, growing with the backlog.
macro_rules! in_lane {
    ($row:literal, $from:literal, $to:literal) => {
        concat!(
            "coalesce(",
            $row,
            ".bucket >= ",
            $from,
            " and ",
            $row,
            ".bucket < ",
            $to,
            ", false)"
        )
    };
}
pub(crate) use in_lane;

/// A condition: the outbox row `$row` (a table alias) is known to be
/// published, with tail mode's `--retention`: a slot whose lane covers the
/// row's bucket recorded a published-before newer than the row's
/// transaction (see `source/tail/retention.rs`). A slot that recorded
/// nothing says nothing, so without retention no row is.
macro_rules! published {
    ($row:literal) => {
        concat!(
            "exists (select 1 from relay_slot s where s.published_before is not null \
             and s.bucket_from <= ",
            $row,
            ".bucket and ",
            $row,
            ".bucket < s.bucket_to and age(",
            $row,
            ".xmin) > age((s.published_before::text::bigint % 4294967296)::text::xid))"
        )
    };
}
pub(crate) use published;

/// Deletes published rows if the lease's epoch is still current, renewing
/// it, in one statement; says whether the lease held, and how many of the
/// transactions `$4` the statement did not see (see [`unseen!`]).
const DELETE_PUBLISHED: &str = concat!(
    "with lease as (update relay_lease set renewed_at = now() \
     where name = $2 and epoch = $3 returning 1), \
     deleted as (delete from outbox where seq = any($1) and exists (select 1 from lease) returning 1) \
     select exists (select 1 from lease), ",
    unseen!("$4")
);

/// How many of the transactions `$1` this statement does not see.
const UNSEEN: &str = concat!("select ", unseen!("$1"));

const MOVE_TO_DEAD_LETTER: &str = "with moved as (delete from outbox where seq = any($1) returning *) \
     insert into dead_letter (seq, id, aggregate_type, aggregate_id, event_type, topic, payload, headers, created_at, partition_key, error) \
     select m.seq, m.id, m.aggregate_type, m.aggregate_id, m.event_type, m.topic, m.payload, m.headers, m.created_at, m.partition_key, e.error \
     from moved m join unnest($1::bigint[], $2::text[]) as e(seq, error) on e.seq = m.seq \
     on conflict (id) do update set error = excluded.error, attempts = dead_letter.attempts + 1, failed_at = now()";

/// Opens a connection and waits, as a standby, until it holds the lease on
/// `lane` of this schema's outbox. `None` on shutdown.
pub(crate) async fn leader_connection(
    database: &DatabaseConfig,
    lane: Lane,
    share: &Share,
    candidate: &Candidate,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<Leader>, Error> {
    metrics.set_active(false);
    let mut conn = database::connect(database).await?;
    timed(
        database.call_timeout(),
        "checking the outbox tables",
        database::check_schema(&mut conn, database),
    )
    .await?;
    ownership::acquire(conn, lane, share, candidate, database, metrics, shutdown).await
}

/// Between batches, when nothing is in flight: gives up the lane `leader`
/// holds if this instance holds more lanes than its share (see
/// [`crate::ownership::share`]). Returns whether it did.
pub(crate) fn hand_over_beyond_share(leader: &mut Option<Leader>, metrics: &Metrics) -> bool {
    let Some(held) = leader.take() else {
        return false;
    };
    *leader = held.keep_or_hand_over();
    if leader.is_none() {
        metrics.set_active(false);
    }
    leader.is_none()
}

/// Drops the leader connection (and with it the lock and the lease) after
/// `error`, so the next call starts clean. A transient error after the lease
/// ran out on this instance's clock is most likely its consequence (a
/// standby ended this instance's sessions), so the returned error says that
/// instead; an error no retry can fix is returned as it is.
pub(crate) fn drop_leader(leader: &mut Option<Leader>, metrics: &Metrics, error: Error) -> Error {
    let lapsed = leader.take().and_then(|l| l.lease().check().err());
    metrics.set_active(false);
    match lapsed {
        Some(lost) if error.is_transient() && !matches!(error, Error::LeaseLost { .. }) => {
            tracing::debug!(error = %error, "failed after the lease ran out");
            lost
        }
        _ => error,
    }
}

const BLOCKED_AGGREGATES: &str = "select distinct d.aggregate_type, d.aggregate_id from dead_letter d \
     join unnest($1::text[], $2::text[]) as b(aggregate_type, aggregate_id) \
     on d.aggregate_type = b.aggregate_type and d.aggregate_id = b.aggregate_id";

/// Which of the rows' aggregates have a row in the dead-letter table,
/// within the call timeout `limit`.
pub(crate) async fn blocked_aggregates(
    leader: Option<&mut Leader>,
    rows: &[OutboxRow],
    limit: Duration,
) -> Result<HashSet<Aggregate>, Error> {
    timed(
        limit,
        "reading blocked aggregates",
        read_blocked_aggregates(leader, rows),
    )
    .await
}

async fn read_blocked_aggregates(
    leader: Option<&mut Leader>,
    rows: &[OutboxRow],
) -> Result<HashSet<Aggregate>, Error> {
    let Some(leader) = leader else {
        return Err(Error::NotConnected {
            doing: "reading blocked aggregates",
        });
    };
    let conn = leader.conn()?;
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
/// table, atomically with a check of the lease's epoch that also renews it,
/// within the call timeout `limit`. An empty confirm only renews the lease.
/// Fails with [`Error::LeaseLost`], confirming nothing, if the lease ran out
/// here or another instance took it over.
///
/// `transactions` are the ids of the transactions the rows were read from
/// when they came from the WAL (empty when they were read with a query):
/// until every one of them is visible, the confirm is applied again, so that
/// no row is left behind because it was not visible yet (see [`unseen!`]).
pub(crate) async fn apply_confirm(
    leader: &mut Leader,
    confirm: &Confirm,
    transactions: &[i64],
    limit: Duration,
) -> Result<(), Error> {
    if confirm.is_empty() {
        return leader.renew(limit).await;
    }
    let (conn, lease) = leader.parts()?;
    let sent = std::time::Instant::now();
    let held = timed(limit, "confirming published rows", async {
        let mut pause = Duration::from_millis(1);
        loop {
            let (held, unseen) = if confirm.dead_letters.is_empty() {
                delete_published(conn, &confirm.published, transactions, lease).await?
            } else {
                confirm_in_transaction(conn, confirm, transactions, lease).await?
            };
            if !held || unseen == 0 {
                return Ok(held);
            }
            tracing::debug!(
                transactions = unseen,
                "confirmed rows whose transaction is not visible yet; waiting for it"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    })
    .await?;
    if !held {
        return Err(lease.lost());
    }
    lease.renewed(sent);
    Ok(())
}

/// The common case in one round trip: only published rows.
async fn delete_published(
    conn: &mut PgConnection,
    published: &[i64],
    transactions: &[i64],
    lease: &ownership::Lease,
) -> Result<(bool, i64), Error> {
    sqlx::query_as(DELETE_PUBLISHED)
        .bind(published)
        .bind(lease.name())
        .bind(lease.epoch())
        .bind(transactions)
        .fetch_one(conn)
        .await
        .map_err(Error::db("confirming published rows"))
}

/// With rows to move to the dead-letter table: one transaction, applied only
/// once every transaction in `transactions` is visible (a statement sees
/// what committed before it started).
async fn confirm_in_transaction(
    conn: &mut PgConnection,
    confirm: &Confirm,
    transactions: &[i64],
    lease: &ownership::Lease,
) -> Result<(bool, i64), Error> {
    let doing = "confirming published rows";
    let mut tx = conn.begin().await.map_err(Error::db(doing))?;
    let unseen: i64 = sqlx::query_scalar(UNSEEN)
        .bind(transactions)
        .fetch_one(&mut *tx)
        .await
        .map_err(Error::db(doing))?;
    if unseen > 0 {
        return Ok((true, unseen));
    }
    let renewed = sqlx::query(RENEW)
        .bind(lease.name())
        .bind(lease.epoch())
        .execute(&mut *tx)
        .await
        .map_err(Error::db(doing))?;
    if renewed.rows_affected() == 0 {
        // Dropping the transaction rolls it back.
        return Ok((false, 0));
    }
    if !confirm.published.is_empty() {
        sqlx::query("delete from outbox where seq = any($1)")
            .bind(&confirm.published)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(doing))?;
    }
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
    tx.commit().await.map_err(Error::db(doing))?;
    Ok((true, 0))
}
