//! The initial copy: the rows a new slot's exported snapshot sees (committed
//! before the slot, e.g. left by poll mode) are published first, in `seq`
//! order; `relay_slot.copied_at` records that the copy finished. Rows of
//! transactions known to be published (older than published-before, see
//! [`super::retention`]) are left out: a replaced slot of an outbox that
//! keeps published rows republishes only what may not have been.

use super::*;

/// The lane's rows (every bucket for the whole outbox) after `$1`, not
/// known to be published (see [`crate::source::published!`]), and not
/// published by an earlier copy (`seq` up to `$5` and seen by the snapshot
/// `$6`; a transaction id is widened to 64 bits against that snapshot's
/// `xmax`).
pub(super) const SELECT_COPY_BATCH: &str = concat!(
    "select seq, id, aggregate_type, aggregate_id, event_type, topic, \
     payload::text as payload, headers, created_at, partition_key from outbox, \
     (select pg_snapshot_xmax($6::text::pg_snapshot)::text::bigint as xmax) x \
     where seq > $1 and ",
    crate::source::in_lane!("outbox", "$3", "$4"),
    " and ($5::bigint is null or seq > $5 or not pg_visible_in_snapshot( \
       (x.xmax - (x.xmax % 4294967296 - xmin::text::bigint + 6442450944) % 4294967296 + 2147483648)::text::xid8, \
       $6::text::pg_snapshot)) \
     and not ",
    crate::source::published!("outbox"),
    " order by seq limit $2"
);

pub(super) const SLOT_COPY_DONE: &str = "update relay_slot set copied_at = now(), \
     copy_snapshot = null, copy_through = null where slot_name = $1";

/// Where the copy starts: before the lane's first row not known to be
/// published. One scan, so the copy's keyset reads do not skip the
/// published rows again and again.
const FIRST_UNPUBLISHED: &str = concat!(
    "select coalesce(min(seq) - 1, 9223372036854775806) from outbox where ",
    crate::source::in_lane!("outbox", "$1", "$2"),
    " and not ",
    crate::source::published!("outbox")
);

/// The initial copy: a repeatable-read transaction on the slot's exported
/// snapshot, read in `seq` order after the last confirmed row.
pub(super) struct Copy {
    pub(super) snapshot: PgConnection,
    pub(super) after_seq: i64,
    pub(super) batch_last_seqs: Vec<i64>,
    /// This copy's snapshot, recorded with its progress (with retention).
    pub(super) snapshot_text: String,
    /// The snapshot and last confirmed `seq` of an unfinished earlier copy.
    pub(super) before: Option<(String, i64)>,
}

impl Copy {
    /// The `seq` the copy starts after.
    pub(super) async fn first_unpublished(
        snapshot: &mut PgConnection,
        db: &DatabaseConfig,
        lane: Lane,
    ) -> Result<i64, Error> {
        within(
            db.call_timeout(),
            "finding the first row not known to be published",
            sqlx::query_scalar(FIRST_UNPUBLISHED)
                .bind(lane.buckets().start)
                .bind(lane.buckets().end)
                .fetch_one(snapshot),
        )
        .await
    }
}

impl TailSource {
    pub(super) async fn next_copy_batch(
        &mut self,
        max: usize,
    ) -> Result<Option<Vec<OutboxRow>>, Error> {
        let Phase::Copy(copy) = &mut self.phase else {
            return Ok(None);
        };
        let doing = "copying the rows already in the outbox";
        let rows = within(
            self.database.call_timeout(),
            doing,
            sqlx::query_as::<_, OutboxRow>(SELECT_COPY_BATCH)
                .bind(copy.after_seq)
                .bind(i64::try_from(max).unwrap_or(i64::MAX))
                .bind(self.tail.lane.buckets().start)
                .bind(self.tail.lane.buckets().end)
                .bind(copy.before.as_ref().map(|(_, seq)| *seq))
                .bind(copy.before.as_ref().map(|(snapshot, _)| snapshot.as_str()))
                .fetch_all(&mut copy.snapshot),
        )
        .await?;
        if !rows.is_empty() {
            copy.batch_last_seqs = rows.iter().map(|r| r.seq).collect();
            return Ok(Some(rows));
        }
        within(
            self.database.call_timeout(),
            "ending the copy",
            sqlx::query("commit").execute(&mut copy.snapshot),
        )
        .await?;
        let conn = leader_conn(&mut self.leader)?;
        within(
            self.database.call_timeout(),
            "recording the finished copy",
            sqlx::query(SLOT_COPY_DONE)
                .bind(self.tail.slot.as_str())
                .execute(conn),
        )
        .await?;
        info!(
            slot = self.tail.slot.as_str(),
            "published the rows that were in the outbox before the slot; streaming from the WAL"
        );
        self.phase = Phase::Idle;
        Ok(None)
    }
}
