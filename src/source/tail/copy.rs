//! The initial copy: the rows a new slot's exported snapshot sees (committed
//! before the slot, e.g. left by poll mode) are published first, in `seq`
//! order; `relay_slot.copied_at` records that the copy finished.

use super::*;

/// The lane's rows (every bucket for the whole outbox) after `$1`.
pub(super) const SELECT_COPY_BATCH: &str = "select seq, id, aggregate_type, aggregate_id, event_type, topic, \
     payload::text as payload, headers, created_at from outbox \
     where seq > $1 and bucket >= $3 and bucket < $4 order by seq limit $2";

pub(super) const SLOT_COPY_DONE: &str =
    "update relay_slot set copied_at = now() where slot_name = $1";

/// The initial copy: a repeatable-read transaction on the slot's exported
/// snapshot, read in `seq` order after the last confirmed row.
pub(super) struct Copy {
    pub(super) snapshot: PgConnection,
    pub(super) after_seq: i64,
    pub(super) batch_last_seqs: Vec<i64>,
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
