//! Tail mode with `--retention`: published rows stay in the outbox for the
//! retention period, so progress cannot be read from the table. It lives
//! beside the slot, in `relay_slot`, written in the statement that checks
//! and renews the lease (so a fenced former owner records nothing):
//!
//! - the **resume point**, the last confirmed row as (commit position of its
//!   transaction, place in it): after a reconnect or a restart, rows up to it
//!   that the slot sends again are skipped;
//! - **published before**, a transaction id: every transaction older than it
//!   is published. The owner of a lane emits, once a second, a transactional
//!   logical decoding message carrying `pg_snapshot_xmin` of its snapshot
//!   (see [`super::stream::MARKER_PREFIX`]); every transaction older than
//!   that committed before the message, so once the stream confirmed every
//!   row received before the message, they are all published.
//!
//! Bulk removal takes only rows older than the retention *and* older than
//! published-before, so a relay that lags by more than the retention loses
//! nothing; the recovery of a lost or invalidated slot republishes only the
//! rows not known to be published (see [`crate::source::published!`]: a
//! slot's published-before covers the buckets of its lane). A transaction id is compared by
//! `age()`, which is right for ids within two billion transactions of the
//! current one and counts frozen ids as the oldest.

use super::*;

/// Checks and renews the lease and records progress, in one statement.
/// `$4`/`$5` the resume point (or null: unchanged), `$6` published-before (or
/// null: unchanged), `$8`/`$9` the copy's snapshot and last confirmed `seq`
/// (kept only when it got further than the copy recorded before), `$10`/`$11`
/// the lane's buckets.
const RECORD_PROGRESS: &str = "with lease as (update relay_lease set renewed_at = now() \
     where name = $1 and epoch = $2 returning 1), \
     progress as (update relay_slot set outbox = $3, \
       resume_lsn = coalesce($4::text::pg_lsn, resume_lsn), \
       resume_rows = coalesce($5, resume_rows), \
       published_before = greatest(published_before, $6::text::xid8), \
       published_before_at = case when $6::text is null then published_before_at else now() end, \
       copy_snapshot = case when $9 > coalesce(copy_through, $9 - 1) then $8::pg_snapshot else copy_snapshot end, \
       copy_through = greatest(copy_through, $9), bucket_from = $10, bucket_to = $11 \
     where slot_name = $7 and exists (select 1 from lease) returning 1) \
     select exists (select 1 from lease)";

/// The marker (see [`super::stream::MARKER_PREFIX`]).
const EMIT_MARKER: &str = "select pg_logical_emit_message(true, 'outbox-relay', \
     pg_snapshot_xmin(pg_current_snapshot())::text)";

/// How often the owner of a lane emits a marker.
pub(super) const MARKER_EVERY: Duration = Duration::from_secs(1);

/// How far an unfinished earlier copy of the slot got.
const COPIED_BEFORE: &str = "select copy_snapshot::text, copy_through from relay_slot \
     where slot_name = $1 and copy_through is not null";

/// The snapshot and last confirmed `seq` of an unfinished earlier copy.
pub(super) async fn copied_before(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    slot: &str,
) -> Result<Option<(String, i64)>, Error> {
    within(
        db.call_timeout(),
        "reading how far the last copy got",
        sqlx::query_as(COPIED_BEFORE)
            .bind(slot)
            .fetch_optional(conn),
    )
    .await
}

const RESUME_POINT: &str =
    "select resume_lsn::text, resume_rows from relay_slot where slot_name = $1";

/// Removes up to `$5` retained rows of the buckets `[$1, $2)`: older than the
/// retention (`$3` seconds) and published (their transaction older than
/// `$4`), oldest `seq` first. The scan stops at the lane's first row younger
/// than the retention, so a large retained table is not read every round.
const PURGE: &str = concat!(
    "with young as (select coalesce((select seq from outbox where ",
    crate::source::in_lane!("outbox", "$1", "$2"),
    " and created_at >= now() - make_interval(secs => $3) \
       order by seq limit 1), 9223372036854775807) as seq), \
     doomed as (select o.seq from outbox o, young \
       where o.seq < young.seq and ",
    crate::source::in_lane!("o", "$1", "$2"),
    " and o.created_at < now() - make_interval(secs => $3) \
       and age(o.xmin) > age(($4::bigint % 4294967296)::text::xid) \
       order by o.seq limit $5) \
     delete from outbox o using doomed d where o.seq = d.seq"
);

/// Rows removed per purge statement.
const PURGE_CHUNK: i64 = 5_000;

/// The resume point recorded for `slot`.
pub(super) async fn resume_point(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    slot: &str,
) -> Result<Option<(Lsn, u64)>, Error> {
    let point: Option<(Option<String>, Option<i64>)> = within(
        db.call_timeout(),
        "reading the slot's resume point",
        sqlx::query_as(RESUME_POINT).bind(slot).fetch_optional(conn),
    )
    .await?;
    Ok(match point {
        Some((Some(lsn), Some(rows))) => Lsn::parse(&lsn)
            .ok()
            .map(|lsn| (lsn, u64::try_from(rows).unwrap_or(0))),
        _ => None,
    })
}

/// What a confirm records with retention.
pub(super) struct Progress<'a> {
    pub(super) slot: &'a str,
    pub(super) resume: Option<(Lsn, u64)>,
    pub(super) published_before: Option<u64>,
    /// The copy's snapshot and its last confirmed `seq`.
    pub(super) copy: Option<(&'a str, i64)>,
    /// The buckets of the slot's lane.
    pub(super) buckets: std::ops::Range<i16>,
}

/// Moves rejected rows to the dead-letter table (published rows stay),
/// then records `progress`, checking and renewing the lease; fails with
/// [`Error::LeaseLost`], recording nothing, if the lease is gone.
pub(super) async fn record(
    leader: &mut Leader,
    db: &DatabaseConfig,
    confirm: &Confirm,
    transactions: &[i64],
    progress: &Progress<'_>,
) -> Result<(), Error> {
    let limit = db.call_timeout();
    if !confirm.dead_letters.is_empty() {
        let rejected = Confirm {
            published: Vec::new(),
            dead_letters: confirm.dead_letters.clone(),
        };
        apply_confirm(leader, &rejected, transactions, limit).await?;
    }
    let (conn, lease) = leader.parts()?;
    let sent = Instant::now();
    let held: bool = within(
        limit,
        "recording published rows",
        sqlx::query_scalar(RECORD_PROGRESS)
            .bind(lease.name())
            .bind(lease.epoch())
            .bind(db.schema().as_str())
            .bind(progress.resume.map(|(lsn, _)| lsn.to_string()))
            .bind(progress.resume.map(|(_, n)| n as i64))
            .bind(progress.published_before.map(|x| x.to_string()))
            .bind(progress.slot)
            .bind(progress.copy.map(|(snapshot, _)| snapshot))
            .bind(progress.copy.map(|(_, seq)| seq))
            .bind(progress.buckets.start)
            .bind(progress.buckets.end)
            .fetch_one(conn),
    )
    .await?;
    if !held {
        return Err(lease.lost());
    }
    lease.renewed(sent);
    Ok(())
}

/// Emits a marker on the leader connection.
pub(super) async fn emit_marker(leader: &mut Leader, db: &DatabaseConfig) -> Result<(), Error> {
    within(
        db.call_timeout(),
        "emitting a progress marker",
        sqlx::query(EMIT_MARKER).execute(leader.conn()?),
    )
    .await?;
    Ok(())
}

/// Removes the lane's published rows older than `retention`, in chunks, every
/// `every` until `stop`, on a connection of its own (off the path that reads
/// and confirms). Errors are logged and retried next round; removing
/// nothing is always safe.
pub(super) async fn purge_loop(
    db: DatabaseConfig,
    slot: String,
    lane: Lane,
    retention: Duration,
    stop: CancellationToken,
) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut conn: Option<PgConnection> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if conn.is_none() {
            match database::connect(&db).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    warn!(error = %e, "could not connect to remove retained rows; trying again later");
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match purge_round(c, &db, &slot, lane, retention, &stop).await {
            Ok(0) => {}
            Ok(removed) => info!(
                rows = removed,
                lane = %lane,
                retention = %humantime::format_duration(retention),
                "removed published rows older than the retention"
            ),
            Err(e) => {
                warn!(error = %e, "removing retained rows failed; trying again later");
                conn = None;
            }
        }
    }
}

/// One round: chunks until fewer than a chunk are left.
async fn purge_round(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    slot: &str,
    lane: Lane,
    retention: Duration,
    stop: &CancellationToken,
) -> Result<u64, Error> {
    let published: Option<(Option<i64>,)> = within(
        db.call_timeout(),
        "reading which rows are published",
        sqlx::query_as(
            "select published_before::text::bigint from relay_slot where slot_name = $1",
        )
        .bind(slot)
        .fetch_optional(&mut *conn),
    )
    .await?;
    let Some((Some(published_before),)) = published else {
        return Ok(0);
    };
    let mut removed = 0;
    while !stop.is_cancelled() {
        let done = within(
            db.call_timeout(),
            "removing retained rows",
            sqlx::query(PURGE)
                .bind(lane.buckets().start)
                .bind(lane.buckets().end)
                .bind(retention.as_secs_f64())
                .bind(published_before)
                .bind(PURGE_CHUNK)
                .execute(&mut *conn),
        )
        .await?
        .rows_affected();
        removed += done;
        if done < PURGE_CHUNK as u64 {
            break;
        }
    }
    Ok(removed)
}
