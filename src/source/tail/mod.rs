//! Tail mode: stream the outbox's INSERTs from the WAL over logical
//! replication (`pgoutput` v1, `START_REPLICATION`), and confirm a WAL
//! position back to Postgres only when every outbox row committed before it
//! was confirmed by the relay.
//!
//! Contract, and why it holds:
//! - **Only committed rows, in commit order.** Protocol v1 sends a
//!   transaction after it commits, whole, in commit order; aborted
//!   transactions and rolled-back savepoints are never sent.
//! - **Progress over a contiguous prefix.** Each Commit (and each keepalive
//!   between transactions) is a position that becomes safe to confirm once
//!   every row received before it is confirmed. Rows a batch did not confirm
//!   are read again by reconnecting from the slot, so nothing is skipped.
//! - **Bounded WAL.** With nothing outstanding, a keepalive's position is
//!   confirmed at once, so an idle outbox on a busy database does not pin WAL.
//! - **Bounded memory.** The replication client's channel is bounded and the
//!   relay takes one batch at a time: a large transaction or backlog waits in
//!   Postgres (which spills big transactions to disk), not here.
//! - **The outbox stays small, and is the record of what is unpublished.**
//!   Confirmed rows are deleted, as in poll mode. So after a reconnect, rows
//!   that come again but are no longer in the table were already published
//!   and are skipped; and a slot that was lost or invalidated can be replaced
//!   by publishing whatever the table still holds.
//! - **Or, with `--retention`, the outbox keeps published rows** for that
//!   long and removes them in bulk; what is published is then recorded
//!   beside the slot (see [`retention`]), and a replaced slot republishes
//!   only rows of transactions not known to be published.
//! - **Nothing missed at the mode boundary.** A new slot is created with an
//!   exported snapshot; the rows that snapshot sees (committed before the
//!   slot) are published first, in `seq` order, then the stream takes over.
//!   `relay_slot.copied_at` records that this copy finished: a slot whose
//!   copy never finished is dropped and created again on the next start.

mod copy;
mod pgoutput;
mod replication;
mod retention;
mod slot;
mod stream;

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures::FutureExt;
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig,
};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{DatabaseConfig, Lane, TailConfig};
use crate::database::{self, timed, within};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::OutboxRow;
use crate::ownership::{Candidate, Leader, Share};
use crate::source::{
    Aggregate, Confirm, Source, apply_confirm, blocked_aggregates, drop_leader,
    hand_over_beyond_share, leader_connection,
};
use pgoutput::{Message, OutboxColumns};

use copy::Copy;
use replication::{replication_config, replication_error, sqlstate};
pub(crate) use slot::check_prerequisites;
use slot::{SLOT_BUSY_GRACE, slot_in_use, slot_invalidated};
use stream::Stream;

const SLOT_INFO: &str = "select plugin::text, database::text, wal_status \
     from pg_replication_slots where slot_name = $1 and slot_type = 'logical'";

const SLOT_COPIED: &str = "select copied_at is not null from relay_slot where slot_name = $1";

/// Reads the outbox from the WAL.
pub struct TailSource {
    database: DatabaseConfig,
    /// The slot and publication of this source's lane.
    tail: TailConfig,
    share: Share,
    candidate: Candidate,
    metrics: Metrics,
    /// Holds the lease; reads the slot's state, deletes confirmed rows.
    leader: Option<Leader>,
    phase: Phase,
    /// Rows in the batch the relay is publishing.
    handed: usize,
    /// With retention: when this owner last emitted a progress marker.
    marker_at: Option<Instant>,
    /// With retention: published-before as last recorded.
    recorded_published_before: Option<u64>,
    /// With retention: removes the lane's old published rows while this
    /// instance owns the lane.
    purge: Option<Purge>,
}

/// The background removal of retained rows; stops when dropped.
struct Purge {
    stop: CancellationToken,
}

impl Drop for Purge {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

enum Phase {
    /// Not reading: the next batch checks the slot and connects.
    Idle,
    /// Publishing the rows a new slot's snapshot saw.
    Copy(Copy),
    Stream(Box<Stream>),
}

impl TailSource {
    /// A source of the lane `tail.lane` (see [`TailConfig::for_lane`]).
    pub fn new(
        database: DatabaseConfig,
        tail: TailConfig,
        share: Share,
        candidate: Candidate,
        metrics: Metrics,
    ) -> Self {
        TailSource {
            database,
            tail,
            share,
            candidate,
            metrics,
            leader: None,
            phase: Phase::Idle,
            handed: 0,
            marker_at: None,
            recorded_published_before: None,
            purge: None,
        }
    }

    /// Drops every connection after an error, so the next batch starts clean
    /// from the slot's confirmed position.
    fn reset<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        result.map_err(|e| {
            self.phase = Phase::Idle;
            drop_leader(&mut self.leader, &self.metrics, e)
        })
    }

    /// From `Idle`: checks the prerequisites and the slot, then starts the
    /// initial copy or the stream. `false` on shutdown.
    async fn establish(&mut self, shutdown: &CancellationToken) -> Result<bool, Error> {
        if self.leader.is_none() {
            let leader = leader_connection(
                &self.database,
                self.tail.lane,
                &self.share,
                &self.candidate,
                &self.metrics,
                shutdown,
            )
            .await?;
            match leader {
                Some(leader) => self.leader = Some(leader),
                None => return Ok(false),
            }
        }
        if let (Some(retention), None) = (self.tail.retention, &self.purge) {
            let stop = CancellationToken::new();
            tokio::spawn(retention::purge_loop(
                self.database.clone(),
                self.tail.slot.as_str().to_owned(),
                self.tail.lane,
                retention,
                stop.clone(),
            ));
            self.purge = Some(Purge { stop });
        }
        let conn = leader_conn(&mut self.leader)?;
        if self.tail.lane != Lane::WHOLE {
            let ensured = database::ensure_lane_publication(conn, &self.database, &self.tail);
            timed(
                self.database.call_timeout(),
                "creating the lane's publication",
                ensured,
            )
            .await?;
        }
        check_prerequisites(conn, &self.database, &self.tail).await?;
        let slot_name = self.tail.slot.as_str();
        let slot: Option<(String, Option<String>, Option<String>)> = within(
            self.database.call_timeout(),
            "reading the replication slot",
            sqlx::query_as(SLOT_INFO)
                .bind(slot_name)
                .fetch_optional(&mut *conn),
        )
        .await?;
        let copied: Option<bool> = within(
            self.database.call_timeout(),
            "reading the replication slot's state",
            sqlx::query_scalar(SLOT_COPIED)
                .bind(slot_name)
                .fetch_optional(&mut *conn),
        )
        .await?;
        let target = self.database.target();
        let exists = match slot {
            None => {
                if copied == Some(true) {
                    warn!(
                        slot = slot_name,
                        "the replication slot is gone (dropped, or lost in a failover); creating it again and publishing every row still in the outbox, so nothing is lost (duplicates possible)"
                    );
                }
                false
            }
            Some((plugin, database, wal_status)) => {
                if database.as_deref() != Some(target.database.as_str()) {
                    return Err(Error::Setup(format!(
                        "replication slot \"{slot_name}\" on {target} belongs to database \"{}\"; give this relay its own --slot (OUTBOX_SLOT)",
                        database.unwrap_or_default()
                    )));
                }
                if plugin != "pgoutput" {
                    return Err(Error::Setup(format!(
                        "replication slot \"{slot_name}\" on {target} uses plugin \"{plugin}\", tail mode needs \"pgoutput\"; give this relay its own --slot (OUTBOX_SLOT) or drop that slot"
                    )));
                }
                if wal_status.as_deref() == Some("lost") {
                    if self.tail.retention.is_some() {
                        warn!(
                            slot = slot_name,
                            "the replication slot was invalidated; with --retention the relay knows which rows are published: creating it again and publishing the rows not known to be (duplicates possible, nothing lost)"
                        );
                    } else if !self.tail.recreate_invalid_slot {
                        return Err(slot_invalidated(&self.database, &self.tail));
                    } else {
                        warn!(
                            slot = slot_name,
                            "the replication slot was invalidated; --recreate-invalid-slot given: creating it again and publishing every row still in the outbox (duplicates possible, nothing lost)"
                        );
                    }
                    self.phase = Phase::Idle;
                    return self.create_slot(true, shutdown).await;
                }
                true
            }
        };
        if exists && copied == Some(true) {
            let leader = self.leader.as_mut().ok_or_else(no_leader)?;
            let resume = match self.tail.retention {
                Some(_) => {
                    retention::resume_point(leader.conn()?, &self.database, slot_name).await?
                }
                None => None,
            };
            let stream =
                Stream::connect(&self.database, &self.tail, leader, resume, shutdown).await?;
            self.phase = match stream {
                Some(stream) => Phase::Stream(Box::new(stream)),
                None => return Ok(false),
            };
            return Ok(true);
        }
        if exists {
            info!(
                slot = slot_name,
                "the replication slot's first copy never finished; starting over with a new slot"
            );
        }
        self.create_slot(exists, shutdown).await
    }
}

impl Source for TailSource {
    async fn next_batch(
        &mut self,
        max: usize,
        idle: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OutboxRow>, Error> {
        self.handed = 0;
        // A lane handed over takes its replication connection with it, so
        // that the next holder can read the slot.
        if hand_over_beyond_share(&mut self.leader, &self.metrics) {
            self.phase = Phase::Idle;
        }
        if self.leader.is_none() {
            self.purge = None;
        }
        loop {
            if shutdown.is_cancelled() {
                return Ok(Vec::new());
            }
            let rows = match &mut self.phase {
                Phase::Idle => {
                    let established = self.establish(shutdown).await;
                    match self.reset(established)? {
                        true => {
                            self.metrics.database_ok();
                            continue;
                        }
                        false => return Ok(Vec::new()),
                    }
                }
                Phase::Copy(_) => {
                    let batch = self.next_copy_batch(max).await;
                    match self.reset(batch)? {
                        Some(rows) => rows,
                        None => continue,
                    }
                }
                Phase::Stream(stream) => {
                    let Some(leader) = self.leader.as_mut() else {
                        self.phase = Phase::Idle;
                        continue;
                    };
                    stream.lease_until = leader.lease().valid_until();
                    let batch = stream
                        .next_batch(max, idle, leader, &self.database, &self.tail, shutdown)
                        .await;
                    self.reset(batch)?
                }
            };
            self.handed = rows.len();
            return Ok(rows);
        }
    }

    async fn blocked_aggregates(
        &mut self,
        rows: &[OutboxRow],
    ) -> Result<HashSet<Aggregate>, Error> {
        let result =
            blocked_aggregates(self.leader.as_mut(), rows, self.database.call_timeout()).await;
        self.reset(result)
    }

    async fn renew(&mut self) -> Result<(), Error> {
        if self.leader.is_none() {
            return Ok(());
        }
        let renewed = match self.tail.retention {
            Some(_) => self.record_retained(&Confirm::default(), 0).await,
            None => match self.leader.as_mut() {
                Some(leader) => leader.renew(self.database.call_timeout()).await,
                None => Ok(()),
            },
        };
        self.reset(renewed)?;
        let lease_until = self.leader.as_ref().map(|l| l.lease().valid_until());
        if let (Phase::Stream(stream), Some(lease_until)) = (&mut self.phase, lease_until) {
            stream.lease_until = lease_until;
        }
        Ok(())
    }

    async fn confirm(&mut self, confirm: &Confirm) -> Result<(), Error> {
        let handed = std::mem::take(&mut self.handed);
        let Some(leader) = self.leader.as_mut() else {
            self.phase = Phase::Idle;
            if confirm.is_empty() {
                return Ok(());
            }
            return Err(Error::NotConnected {
                doing: "confirming published rows",
            });
        };
        let applied = match self.tail.retention {
            Some(_) => self.record_retained(confirm, confirm.len()).await,
            None => {
                let transactions = match &self.phase {
                    Phase::Stream(stream) => stream.batch_xids.as_slice(),
                    _ => &[],
                };
                apply_confirm(leader, confirm, transactions, self.database.call_timeout()).await
            }
        };
        self.reset(applied)?;
        let lease_until = self
            .leader
            .as_ref()
            .ok_or_else(no_leader)?
            .lease()
            .valid_until();
        let n = confirm.len();
        match &mut self.phase {
            Phase::Copy(copy) => {
                if let Some(&seq) = n.checked_sub(1).and_then(|i| copy.batch_last_seqs.get(i)) {
                    copy.after_seq = seq;
                }
            }
            Phase::Stream(stream) => {
                stream.lease_until = lease_until;
                stream.confirmed += n as u64;
                if n < handed {
                    // Read the rest again from the slot's confirmed position.
                    debug!(
                        confirmed = n,
                        handed, "batch partly confirmed; reconnecting to read the rest again"
                    );
                    stream.advance();
                    self.phase = Phase::Idle;
                } else {
                    stream.advance();
                }
            }
            Phase::Idle => {}
        }
        Ok(())
    }
}

impl TailSource {
    /// With retention: moves `confirm`'s rejected rows to the dead-letter
    /// table and records the first `n` rows of the batch as published, with
    /// published-before when it moved, checking and renewing the lease; then
    /// emits a progress marker when one is due.
    async fn record_retained(&mut self, confirm: &Confirm, n: usize) -> Result<(), Error> {
        let leader = self.leader.as_mut().ok_or_else(no_leader)?;
        let last = n.checked_sub(1);
        let (transactions, resume, published_before, copy) = match &self.phase {
            Phase::Stream(stream) => (
                stream.batch_xids.as_slice(),
                last.and_then(|i| stream.batch_positions.get(i)).copied(),
                stream
                    .published_before
                    .filter(|p| Some(*p) > self.recorded_published_before),
                None,
            ),
            Phase::Copy(copy) => (
                &[][..],
                None,
                None,
                last.and_then(|i| copy.batch_last_seqs.get(i))
                    .map(|seq| (copy.snapshot_text.as_str(), *seq)),
            ),
            Phase::Idle => (&[][..], None, None, None),
        };
        let progress = retention::Progress {
            slot: self.tail.slot.as_str(),
            resume,
            published_before,
            copy,
            buckets: self.tail.lane.buckets(),
        };
        retention::record(leader, &self.database, confirm, transactions, &progress).await?;
        if published_before.is_some() {
            self.recorded_published_before = published_before;
        }
        if self
            .marker_at
            .is_none_or(|at| at.elapsed() >= retention::MARKER_EVERY)
        {
            retention::emit_marker(leader, &self.database).await?;
            self.marker_at = Some(Instant::now());
        }
        Ok(())
    }
}

/// The leader connection, if this source holds the lease.
fn leader_conn(leader: &mut Option<Leader>) -> Result<&mut PgConnection, Error> {
    leader.as_mut().ok_or_else(no_leader)?.conn()
}

fn no_leader() -> Error {
    Error::NotConnected {
        doing: "using the leader connection",
    }
}
