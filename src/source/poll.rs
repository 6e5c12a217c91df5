//! Poll mode: read committed rows with SQL, oldest `seq` first, and delete
//! them once the relay confirms them.
//!
//! Nothing is ever skipped because the source keeps no cursor: every batch
//! is read from the head of the table as it is now, and a row leaves the
//! table only when confirmed. A row whose transaction took its `seq` early
//! but committed late (the commit-skew trap of `where seq > last`) is simply
//! at the head of a later batch. Order: within a batch rows are in `seq`
//! order; a row only becomes visible at commit, so across batches rows come
//! in commit order. See the README's "Ordering" for the exact claim.
//!
//! The connection that reads and deletes holds the lease (see
//! [`crate::ownership`]); standby instances wait for it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::{DatabaseConfig, Lane};
use crate::database::within;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::OutboxRow;
use crate::ownership::{Candidate, Leader, Share};
use crate::source::{
    Aggregate, Confirm, Source, apply_confirm, blocked_aggregates, drop_leader,
    hand_over_beyond_share, in_lane, leader_connection,
};

const SELECT_BATCH: &str = "select seq, id, aggregate_type, aggregate_id, event_type, topic, \
     payload::text as payload, headers, created_at, partition_key from outbox order by seq limit $1";

/// One lane's rows: those of its buckets (`[$2, $3)`), oldest `seq` first,
/// at most `$1`. Public for the test of its plan.
pub const SELECT_LANE_BATCH: &str = concat!(
    "select seq, id, aggregate_type, aggregate_id, event_type, topic, \
     payload::text as payload, headers, created_at, partition_key from outbox \
     where ",
    in_lane!("outbox", "$2", "$3"),
    " order by seq limit $1"
);

/// Reads the outbox table with SQL.
pub struct PollSource {
    database: DatabaseConfig,
    lane: Lane,
    share: Share,
    candidate: Candidate,
    metrics: Metrics,
    leader: Option<Leader>,
    max_interval: Duration,
    /// The next pause between polls of an idle outbox; kept across batches
    /// so that returning to renew the lease does not restart the backoff.
    pause: Duration,
}

impl PollSource {
    /// The first pause after an empty read.
    const FIRST_PAUSE: Duration = Duration::from_millis(1);

    /// A source of `lane`'s rows that connects on first use. `max_interval`
    /// is the longest wait between two polls of an idle outbox.
    pub fn new(
        database: DatabaseConfig,
        lane: Lane,
        share: Share,
        candidate: Candidate,
        max_interval: Duration,
        metrics: Metrics,
    ) -> Self {
        PollSource {
            database,
            lane,
            share,
            candidate,
            metrics,
            leader: None,
            max_interval,
            pause: Self::FIRST_PAUSE,
        }
    }

    /// The leader, holding the lease; waits as a standby while another
    /// instance holds it. `None` on shutdown.
    async fn leader(&mut self, shutdown: &CancellationToken) -> Result<Option<&mut Leader>, Error> {
        if self.leader.is_none() {
            let leader = leader_connection(
                &self.database,
                self.lane,
                &self.share,
                &self.candidate,
                &self.metrics,
                shutdown,
            )
            .await?;
            match leader {
                Some(leader) => self.leader = Some(leader),
                None => return Ok(None),
            }
        }
        Ok(self.leader.as_mut())
    }

    /// Any error drops the leader connection (and with it the lock and the
    /// lease) so the next call starts clean.
    fn forget_on_error<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        result.map_err(|e| drop_leader(&mut self.leader, &self.metrics, e))
    }
}

impl Source for PollSource {
    async fn next_batch(
        &mut self,
        max: usize,
        idle: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OutboxRow>, Error> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let mut idle_until = None;
        hand_over_beyond_share(&mut self.leader, &self.metrics);
        loop {
            if shutdown.is_cancelled() {
                return Ok(Vec::new());
            }
            let limit_time = self.database.call_timeout();
            let lane = self.lane;
            let leader = match self.leader(shutdown).await {
                Ok(Some(leader)) => leader,
                Ok(None) => return Ok(Vec::new()),
                Err(e) => return self.forget_on_error(Err(e)),
            };
            // Counted from the first read as the active instance.
            let idle_until = *idle_until.get_or_insert_with(|| Instant::now() + idle);
            let conn = match leader.conn() {
                Ok(conn) => conn,
                Err(e) => return self.forget_on_error(Err(e)),
            };
            let query = if lane == Lane::WHOLE {
                sqlx::query_as::<_, OutboxRow>(SELECT_BATCH).bind(limit)
            } else {
                let buckets = lane.buckets();
                sqlx::query_as::<_, OutboxRow>(SELECT_LANE_BATCH)
                    .bind(limit)
                    .bind(buckets.start)
                    .bind(buckets.end)
            };
            let rows = within(limit_time, "reading outbox rows", query.fetch_all(conn)).await;
            let rows = self.forget_on_error(rows)?;
            self.metrics.database_ok();
            if !rows.is_empty() {
                self.pause = Self::FIRST_PAUSE;
                return Ok(rows);
            }
            let now = Instant::now();
            if now >= idle_until {
                return Ok(Vec::new());
            }
            // Idle: back off from 1 ms up to `max_interval`, so a burst after
            // a quiet spell is seen quickly and an idle outbox costs a few
            // index lookups per second.
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Vec::new()),
                _ = tokio::time::sleep(self.pause.min(idle_until - now)) => {}
            }
            self.pause = (self.pause * 2).min(self.max_interval);
        }
    }

    async fn blocked_aggregates(
        &mut self,
        rows: &[OutboxRow],
    ) -> Result<HashSet<Aggregate>, Error> {
        let result =
            blocked_aggregates(self.leader.as_mut(), rows, self.database.call_timeout()).await;
        self.forget_on_error(result)
    }

    async fn renew(&mut self) -> Result<(), Error> {
        let Some(leader) = self.leader.as_mut() else {
            return Ok(());
        };
        let result = leader.renew(self.database.call_timeout()).await;
        self.forget_on_error(result)
    }

    async fn confirm(&mut self, confirm: &Confirm) -> Result<(), Error> {
        let Some(leader) = self.leader.as_mut() else {
            if confirm.is_empty() {
                return Ok(());
            }
            return Err(Error::NotConnected {
                doing: "confirming published rows",
            });
        };
        let result = apply_confirm(leader, confirm, &[], self.database.call_timeout()).await;
        if result.is_ok() {
            debug!(
                published = confirm.published.len(),
                dead_letters = confirm.dead_letters.len(),
                "batch confirmed"
            );
        }
        self.forget_on_error(result)
    }
}
