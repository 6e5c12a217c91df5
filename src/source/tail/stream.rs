//! The WAL stream: outbox inserts decoded from `pgoutput`, the marks that say
//! which WAL position is safe to confirm once the rows before it are
//! confirmed, the skip of rows confirmed before a reconnect, and (with
//! retention) the markers that say which transactions are all published.

use super::*;

/// Which of the rows `$1` are still in the outbox, and how many of the
/// transactions `$2` this statement does not see yet (see
/// [`crate::source::unseen!`]): only when it sees them all does an absent
/// row mean a deleted one.
pub(super) const STILL_IN_OUTBOX: &str = concat!(
    "select array(select seq from outbox where seq = any($1)), ",
    crate::source::unseen!("$2")
);

/// The prefix of the logical decoding messages relays emit with retention:
/// the content is `pg_snapshot_xmin` of the emitting statement's snapshot,
/// so every transaction older than it committed (or aborted) before the
/// message did, and is published once the rows before the message are.
pub(super) const MARKER_PREFIX: &str = "outbox-relay";

pub(super) struct Stream {
    pub(super) client: ReplicationClient,
    pub(super) outbox: Option<OutboxColumns>,
    pub(super) in_transaction: bool,
    /// The id of the transaction being received.
    pub(super) xid: u32,
    /// The commit position of the transaction being received, and how many
    /// of its outbox rows came so far.
    pub(super) txn: (Lsn, u64),
    /// The ids of the transactions the rows of the current batch came from.
    pub(super) batch_xids: Vec<i64>,
    /// Where each row of the current batch is in the stream: its
    /// transaction's commit position and its place in that transaction.
    pub(super) batch_positions: Vec<(Lsn, u64)>,
    /// With retention (rows are kept, so their absence says nothing): the
    /// last row confirmed before this connection; rows up to it come again
    /// and are skipped.
    pub(super) resume: Option<(Lsn, u64)>,
    /// Markers received (see [`MARKER_PREFIX`]): once the rows received
    /// before one are confirmed, every transaction older than its id is
    /// published.
    pub(super) markers: VecDeque<(u64, u64)>,
    /// The newest such id whose rows are all confirmed.
    pub(super) published_before: Option<u64>,
    /// Rows taken from the stream since connecting (published or skipped).
    pub(super) received: u64,
    /// Of those, rows confirmed (a prefix).
    pub(super) confirmed: u64,
    /// WAL positions safe to confirm once `confirmed` reaches the count of
    /// rows received before them.
    pub(super) marks: VecDeque<(u64, Lsn)>,
    /// Just (re)connected: rows may come again that were confirmed before.
    pub(super) replaying: bool,
    pub(super) flushed: Lsn,
    /// The lease's end by this instance's clock: no position is confirmed
    /// to Postgres after it, not even an idle keepalive's.
    pub(super) lease_until: Instant,
}

impl Stream {
    /// Starts streaming from the slot's confirmed position. `None` on
    /// shutdown.
    pub(super) async fn connect(
        database: &DatabaseConfig,
        tail: &TailConfig,
        leader: &mut Leader,
        resume: Option<(Lsn, u64)>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Stream>, Error> {
        let since = Instant::now();
        loop {
            // Waiting out a slot that is still held renews the lease.
            leader.renew_if_due(database.call_timeout()).await?;
            // Bounded like every call to Postgres: a server that stopped
            // answering (frozen, partitioned) is an error retried with
            // backoff, not a relay that waits silently forever.
            let (client, started) = timed(database.call_timeout(), "starting replication", async {
                let mut client = ReplicationClient::connect(replication_config(database, tail))
                    .await
                    .map_err(|e| replication_error(database, tail, "connecting", e))?;
                let started = client.wait_started().await;
                Ok((client, started))
            })
            .await?;
            match started {
                Ok(()) => {
                    info!(
                        slot = tail.slot.as_str(),
                        "streaming the outbox from the WAL"
                    );
                    return Ok(Some(Stream {
                        client,
                        outbox: None,
                        in_transaction: false,
                        xid: 0,
                        txn: (Lsn::ZERO, 0),
                        batch_xids: Vec::new(),
                        batch_positions: Vec::new(),
                        resume,
                        markers: VecDeque::new(),
                        published_before: None,
                        received: 0,
                        confirmed: 0,
                        marks: VecDeque::new(),
                        replaying: true,
                        flushed: Lsn::ZERO,
                        // Set from the lease before every batch.
                        lease_until: Instant::now(),
                    }));
                }
                Err(e) if sqlstate(&e) == Some("55006") && since.elapsed() < SLOT_BUSY_GRACE => {
                    debug!(error = %e, "the replication slot is still held; retrying");
                }
                Err(e) => {
                    return Err(replication_error(database, tail, "starting replication", e));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Up to `max` outbox rows from the stream: waits for the first, then
    /// takes what is already buffered.
    pub(super) async fn next_batch(
        &mut self,
        max: usize,
        idle: Duration,
        leader: &mut Leader,
        database: &DatabaseConfig,
        tail: &TailConfig,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OutboxRow>, Error> {
        let idle_until = tokio::time::Instant::now() + idle;
        self.batch_xids.clear();
        self.batch_positions.clear();
        loop {
            let mut rows = Vec::new();
            while rows.len() < max {
                let event = if rows.is_empty() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Vec::new()),
                        event = self.client.recv() => event,
                        // A quiet stream is normal, but it is also what a
                        // dead connection looks like: the relay renews the
                        // lease on the leader connection after `idle`, so a
                        // partition ends in a reconnect, not a silent hang.
                        _ = tokio::time::sleep_until(idle_until) => return Ok(Vec::new()),
                    }
                } else {
                    // Unconstrained: tokio's cooperative budget would make
                    // `recv` report "nothing yet" after 128 events in one
                    // poll, ending every batch at 128 rows.
                    match tokio::task::unconstrained(self.client.recv()).now_or_never() {
                        Some(event) => event,
                        None => break,
                    }
                };
                let event = event
                    .map_err(|e| replication_error(database, tail, "streaming", e))?
                    .ok_or_else(|| Error::Replication {
                        target: Box::new(database.target().clone()),
                        doing: "streaming",
                        cause: "the server ended the stream".into(),
                        transient: true,
                    })?;
                self.handle(event, &mut rows, database)?;
            }
            if self.replaying {
                match self.resume {
                    Some(resume) => self.skip_resumed(&mut rows, resume),
                    None if tail.retention.is_some() => self.replaying = false,
                    None => self.skip_published(&mut rows, leader, database).await?,
                }
            }
            if !rows.is_empty() {
                return Ok(rows);
            }
        }
    }

    pub(super) fn handle(
        &mut self,
        event: ReplicationEvent,
        rows: &mut Vec<OutboxRow>,
        database: &DatabaseConfig,
    ) -> Result<(), Error> {
        match event {
            ReplicationEvent::Begin { xid, final_lsn, .. } => {
                self.in_transaction = true;
                self.xid = xid;
                self.txn = (final_lsn, 0);
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.mark(end_lsn);
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if !self.in_transaction {
                    self.mark(wal_end);
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                let undecodable = |cause: String| Error::Replication {
                    target: Box::new(database.target().clone()),
                    doing: "decoding an outbox insert",
                    cause,
                    transient: false,
                };
                match pgoutput::decode(&data).map_err(|e| undecodable(e.to_string()))? {
                    Message::Relation(relation) => {
                        if relation.namespace == database.schema().as_str()
                            && relation.name == "outbox"
                        {
                            self.outbox = Some(
                                OutboxColumns::new(&relation)
                                    .map_err(|e| undecodable(e.to_string()))?,
                            );
                        }
                    }
                    Message::Insert { relation, tuple } => {
                        let Some(columns) = &self.outbox else {
                            return Ok(());
                        };
                        if relation == columns.relation {
                            rows.push(
                                columns
                                    .row(&tuple)
                                    .map_err(|e| undecodable(e.to_string()))?,
                            );
                            self.received += 1;
                            self.txn.1 += 1;
                            self.batch_positions.push(self.txn);
                            let xid = i64::from(self.xid);
                            if self.batch_xids.last() != Some(&xid) {
                                self.batch_xids.push(xid);
                            }
                        }
                    }
                    Message::Other(_) => {}
                }
            }
            ReplicationEvent::Message {
                prefix, content, ..
            } if prefix == MARKER_PREFIX => {
                // A marker from another relay version or a stray caller is
                // ignored, never an error: it only brings progress forward.
                if let Some(xmin) = std::str::from_utf8(&content)
                    .ok()
                    .and_then(|c| c.trim().parse::<u64>().ok())
                {
                    self.markers.push_back((self.received, xmin));
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        if self.received == self.confirmed {
            self.advance();
        }
        Ok(())
    }

    /// Records a position that is safe once every row received so far is
    /// confirmed.
    pub(super) fn mark(&mut self, lsn: Lsn) {
        match self.marks.back_mut() {
            Some((count, last)) if *count == self.received => *last = (*last).max(lsn),
            _ => self.marks.push_back((self.received, lsn)),
        }
    }

    /// Confirms to Postgres the newest position whose rows are all confirmed.
    pub(super) fn advance(&mut self) {
        while let Some(&(count, xmin)) = self.markers.front() {
            if count > self.confirmed {
                break;
            }
            self.published_before = Some(self.published_before.unwrap_or(0).max(xmin));
            self.markers.pop_front();
        }
        // Self-fencing: once the lease ran out here, a standby may be
        // reading from this slot's position; confirm nothing.
        if Instant::now() >= self.lease_until {
            return;
        }
        let mut newest = None;
        while let Some(&(count, lsn)) = self.marks.front() {
            if count > self.confirmed {
                break;
            }
            newest = Some(lsn);
            self.marks.pop_front();
        }
        if let Some(lsn) = newest
            && lsn > self.flushed
        {
            self.flushed = lsn;
            self.client.update_applied_lsn(lsn);
        }
    }

    /// Drops the first `first` rows of the batch, confirmed before the
    /// reconnect, counting them as confirmed.
    fn skip_prefix(&mut self, rows: &mut Vec<OutboxRow>, first: usize) {
        if first > 0 {
            debug!(rows = first, "skipped rows confirmed before the reconnect");
            rows.drain(..first);
            self.batch_positions.drain(..first);
            self.confirmed += first as u64;
            self.advance();
        }
    }

    /// With retention: drops the rows at or before `resume`, the last row
    /// confirmed before this connection (positions only grow along the
    /// stream, so they form a prefix).
    pub(super) fn skip_resumed(&mut self, rows: &mut Vec<OutboxRow>, resume: (Lsn, u64)) {
        let first = self
            .batch_positions
            .iter()
            .position(|p| *p > resume)
            .unwrap_or(rows.len());
        self.skip_prefix(rows, first);
        if !rows.is_empty() {
            self.replaying = false;
            self.resume = None;
        }
    }

    /// After a reconnect the stream starts at the slot's confirmed position,
    /// which may be before rows the relay already confirmed (and deleted).
    /// Those form a prefix of what comes again; they are skipped.
    pub(super) async fn skip_published(
        &mut self,
        rows: &mut Vec<OutboxRow>,
        leader: &mut Leader,
        database: &DatabaseConfig,
    ) -> Result<(), Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let leader = leader.conn()?;
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let doing = "checking which replayed rows were published";
        // Bounded as a whole: a transaction that stays invisible (a
        // synchronous standby that does not answer) ends in a reconnect.
        let present: Vec<i64> = timed(database.call_timeout(), doing, async {
            let mut pause = Duration::from_millis(1);
            loop {
                let (present, unseen): (Vec<i64>, i64) = sqlx::query_as(STILL_IN_OUTBOX)
                    .bind(&seqs)
                    .bind(&self.batch_xids)
                    .fetch_one(&mut *leader)
                    .await
                    .map_err(Error::db(doing))?;
                if unseen == 0 {
                    return Ok(present);
                }
                debug!(
                    transactions = unseen,
                    "received rows whose transaction is not visible yet; waiting for it"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        })
        .await?;
        let first = rows
            .iter()
            .position(|r| present.contains(&r.seq))
            .unwrap_or(rows.len());
        self.skip_prefix(rows, first);
        if !rows.is_empty() {
            self.replaying = false;
        }
        Ok(())
    }
}
