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
//! - **Nothing missed at the mode boundary.** A new slot is created with an
//!   exported snapshot; the rows that snapshot sees (committed before the
//!   slot) are published first, in `seq` order, then the stream takes over.
//!   `relay_slot.copied_at` records that this copy finished: a slot whose
//!   copy never finished is dropped and created again on the next start.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures::FutureExt;
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig,
};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{DatabaseConfig, TailConfig};
use crate::database::{self, timed};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::OutboxRow;
use crate::ownership::{Candidate, Leader};
use crate::source::pgoutput::{self, Message, OutboxColumns};
use crate::source::{
    Aggregate, Confirm, Source, apply_confirm, blocked_aggregates, drop_leader, leader_connection,
};

const SELECT_COPY_BATCH: &str = "select seq, id, aggregate_type, aggregate_id, event_type, topic, \
     payload::text as payload, headers, created_at from outbox where seq > $1 order by seq limit $2";

const STILL_IN_OUTBOX: &str = "select seq from outbox where seq = any($1)";

const SLOT_INFO: &str = "select plugin::text, database::text, wal_status \
     from pg_replication_slots where slot_name = $1 and slot_type = 'logical'";

const SLOT_COPIED: &str = "select copied_at is not null from relay_slot where slot_name = $1";

const SLOT_STARTED: &str = "insert into relay_slot (slot_name) values ($1) \
     on conflict (slot_name) do update set created_at = now(), copied_at = null";

const SLOT_COPY_DONE: &str = "update relay_slot set copied_at = now() where slot_name = $1";

const DROP_SLOT: &str = "select pg_drop_replication_slot($1)";

/// How long a slot held by a vanished session (a relay that was just killed)
/// may stay busy before that counts as another process using it.
const SLOT_BUSY_GRACE: Duration = Duration::from_secs(10);

/// Reads the outbox from the WAL.
pub struct TailSource {
    database: DatabaseConfig,
    tail: TailConfig,
    candidate: Candidate,
    metrics: Metrics,
    /// Holds the lease; reads the slot's state, deletes confirmed rows.
    leader: Option<Leader>,
    phase: Phase,
    /// Rows in the batch the relay is publishing.
    handed: usize,
}

enum Phase {
    /// Not reading: the next batch checks the slot and connects.
    Idle,
    /// Publishing the rows a new slot's snapshot saw.
    Copy(Copy),
    Stream(Box<Stream>),
}

/// The initial copy: a repeatable-read transaction on the slot's exported
/// snapshot, read in `seq` order after the last confirmed row.
struct Copy {
    snapshot: PgConnection,
    after_seq: i64,
    batch_last_seqs: Vec<i64>,
}

struct Stream {
    client: ReplicationClient,
    outbox: Option<OutboxColumns>,
    in_transaction: bool,
    /// Rows taken from the stream since connecting (published or skipped).
    received: u64,
    /// Of those, rows confirmed (a prefix).
    confirmed: u64,
    /// WAL positions safe to confirm once `confirmed` reaches the count of
    /// rows received before them.
    marks: VecDeque<(u64, Lsn)>,
    /// Just (re)connected: rows may come again that were confirmed before.
    replaying: bool,
    flushed: Lsn,
    /// The lease's end by this instance's clock: no position is confirmed
    /// to Postgres after it, not even an idle keepalive's.
    lease_until: Instant,
}

impl TailSource {
    pub fn new(
        database: DatabaseConfig,
        tail: TailConfig,
        candidate: Candidate,
        metrics: Metrics,
    ) -> Self {
        TailSource {
            database,
            tail,
            candidate,
            metrics,
            leader: None,
            phase: Phase::Idle,
            handed: 0,
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
            let leader =
                leader_connection(&self.database, &self.candidate, &self.metrics, shutdown).await?;
            match leader {
                Some(leader) => self.leader = Some(leader),
                None => return Ok(false),
            }
        }
        let conn = leader_conn(&mut self.leader)?;
        check_prerequisites(conn, &self.database, &self.tail).await?;
        let slot_name = self.tail.slot.as_str();
        let slot: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(SLOT_INFO)
            .bind(slot_name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(Error::db("reading the replication slot"))?;
        let copied: Option<bool> = sqlx::query_scalar(SLOT_COPIED)
            .bind(slot_name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(Error::db("reading the replication slot's state"))?;
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
                    if !self.tail.recreate_invalid_slot {
                        return Err(slot_invalidated(&self.database, &self.tail));
                    }
                    warn!(
                        slot = slot_name,
                        "the replication slot was invalidated; --recreate-invalid-slot given: creating it again and publishing every row still in the outbox (duplicates possible, nothing lost)"
                    );
                    self.phase = Phase::Idle;
                    return self.create_slot(true, shutdown).await;
                }
                true
            }
        };
        if exists && copied == Some(true) {
            let leader = self.leader.as_mut().ok_or_else(no_leader)?;
            let stream = Stream::connect(&self.database, &self.tail, leader, shutdown).await?;
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

    /// Creates the slot (dropping the old one first when `replace`), imports
    /// its snapshot and starts the copy.
    async fn create_slot(
        &mut self,
        replace: bool,
        shutdown: &CancellationToken,
    ) -> Result<bool, Error> {
        let leader = self.leader.as_mut().ok_or_else(no_leader)?;
        let slot = self.tail.slot.as_str();
        // Forget the old copy first: a crash from here on starts over.
        sqlx::query(SLOT_STARTED)
            .bind(slot)
            .execute(leader.conn()?)
            .await
            .map_err(Error::db("recording the replication slot"))?;
        if replace {
            wait_until_slot_free(leader, &self.database, &self.tail, shutdown).await?;
            sqlx::query(DROP_SLOT)
                .bind(slot)
                .execute(leader.conn()?)
                .await
                .map_err(Error::db("dropping the old replication slot"))?;
        }
        let target = self.database.target();
        let mut session =
            ReplicationClient::connect_gated(replication_config(&self.database, &self.tail))
                .await
                .map_err(|e| replication_error(&self.database, &self.tail, "connecting", e))?;
        let rows = session
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT"
            ))
            .await
            .map_err(|e| {
                replication_error(
                    &self.database,
                    &self.tail,
                    "creating the replication slot",
                    e,
                )
            })?;
        let field = |i: usize| {
            rows.first()
                .and_then(|row| row.get(i))
                .and_then(|v| v.as_ref())
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let (consistent_point, snapshot) = (field(1), field(2));
        if snapshot.is_empty() || !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(Error::Replication {
                target: Box::new(target.clone()),
                doing: "creating the replication slot",
                cause: format!("unexpected snapshot name {snapshot:?}"),
                transient: false,
            });
        }
        // Import the snapshot while the session that exported it is still
        // open; after that the copy no longer needs the session.
        let mut copy = database::connect(&self.database).await?;
        for statement in [
            "begin isolation level repeatable read, read only".to_owned(),
            format!("set transaction snapshot '{snapshot}'"),
        ] {
            sqlx::query(&statement)
                .execute(&mut copy)
                .await
                .map_err(Error::db("importing the replication slot's snapshot"))?;
        }
        drop(session);
        info!(slot, consistent_point = %consistent_point, "created the replication slot; publishing the rows already in the outbox first");
        self.phase = Phase::Copy(Copy {
            snapshot: copy,
            after_seq: i64::MIN,
            batch_last_seqs: Vec::new(),
        });
        Ok(true)
    }

    async fn next_copy_batch(&mut self, max: usize) -> Result<Option<Vec<OutboxRow>>, Error> {
        let Phase::Copy(copy) = &mut self.phase else {
            return Ok(None);
        };
        let doing = "copying the rows already in the outbox";
        let rows = timed(self.database.call_timeout(), doing, async {
            sqlx::query_as::<_, OutboxRow>(SELECT_COPY_BATCH)
                .bind(copy.after_seq)
                .bind(i64::try_from(max).unwrap_or(i64::MAX))
                .fetch_all(&mut copy.snapshot)
                .await
                .map_err(Error::db(doing))
        })
        .await?;
        if !rows.is_empty() {
            copy.batch_last_seqs = rows.iter().map(|r| r.seq).collect();
            return Ok(Some(rows));
        }
        sqlx::query("commit")
            .execute(&mut copy.snapshot)
            .await
            .map_err(Error::db("ending the copy"))?;
        let conn = leader_conn(&mut self.leader)?;
        sqlx::query(SLOT_COPY_DONE)
            .bind(self.tail.slot.as_str())
            .execute(conn)
            .await
            .map_err(Error::db("recording the finished copy"))?;
        info!(
            slot = self.tail.slot.as_str(),
            "published the rows that were in the outbox before the slot; streaming from the WAL"
        );
        self.phase = Phase::Idle;
        Ok(None)
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
        let Some(leader) = self.leader.as_mut() else {
            return Ok(());
        };
        let renewed = leader.renew(self.database.call_timeout()).await;
        let lease_until = leader.lease().valid_until();
        self.reset(renewed)?;
        if let Phase::Stream(stream) = &mut self.phase {
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
        let applied = apply_confirm(leader, confirm, self.database.call_timeout()).await;
        let lease_until = leader.lease().valid_until();
        self.reset(applied)?;
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

impl Stream {
    /// Starts streaming from the slot's confirmed position. `None` on
    /// shutdown.
    async fn connect(
        database: &DatabaseConfig,
        tail: &TailConfig,
        leader: &mut Leader,
        shutdown: &CancellationToken,
    ) -> Result<Option<Stream>, Error> {
        let since = Instant::now();
        loop {
            // Waiting out a slot that is still held renews the lease.
            leader.renew_if_due(database.call_timeout()).await?;
            let mut client = ReplicationClient::connect(replication_config(database, tail))
                .await
                .map_err(|e| replication_error(database, tail, "connecting", e))?;
            match client.wait_started().await {
                Ok(()) => {
                    info!(
                        slot = tail.slot.as_str(),
                        "streaming the outbox from the WAL"
                    );
                    return Ok(Some(Stream {
                        client,
                        outbox: None,
                        in_transaction: false,
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
    async fn next_batch(
        &mut self,
        max: usize,
        idle: Duration,
        leader: &mut Leader,
        database: &DatabaseConfig,
        tail: &TailConfig,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OutboxRow>, Error> {
        let idle_until = tokio::time::Instant::now() + idle;
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
                self.skip_published(&mut rows, leader, database).await?;
            }
            if !rows.is_empty() {
                return Ok(rows);
            }
        }
    }

    fn handle(
        &mut self,
        event: ReplicationEvent,
        rows: &mut Vec<OutboxRow>,
        database: &DatabaseConfig,
    ) -> Result<(), Error> {
        match event {
            ReplicationEvent::Begin { .. } => self.in_transaction = true,
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
                        }
                    }
                    Message::Other(_) => {}
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
    fn mark(&mut self, lsn: Lsn) {
        match self.marks.back_mut() {
            Some((count, last)) if *count == self.received => *last = (*last).max(lsn),
            _ => self.marks.push_back((self.received, lsn)),
        }
    }

    /// Confirms to Postgres the newest position whose rows are all confirmed.
    fn advance(&mut self) {
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

    /// After a reconnect the stream starts at the slot's confirmed position,
    /// which may be before rows the relay already confirmed (and deleted).
    /// Those form a prefix of what comes again; they are skipped.
    async fn skip_published(
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
        let present: Vec<i64> = timed(database.call_timeout(), doing, async {
            sqlx::query_scalar(STILL_IN_OUTBOX)
                .bind(&seqs)
                .fetch_all(leader)
                .await
                .map_err(Error::db(doing))
        })
        .await?;
        let first = rows
            .iter()
            .position(|r| present.contains(&r.seq))
            .unwrap_or(rows.len());
        if first > 0 {
            debug!(rows = first, "skipped rows confirmed before the reconnect");
            rows.drain(..first);
            self.confirmed += first as u64;
            self.advance();
        }
        if !rows.is_empty() {
            self.replaying = false;
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

/// What `wal_level`, the role and the publication must be for tail mode.
pub(crate) async fn check_prerequisites(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    tail: &TailConfig,
) -> Result<(), Error> {
    let target = db.target();
    let (wal_level, can_replicate): (String, bool) = sqlx::query_as(
        "select current_setting('wal_level'), \
                (select rolreplication or rolsuper from pg_roles where rolname = current_user)",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(Error::db("checking tail mode's prerequisites"))?;
    if wal_level != "logical" {
        return Err(Error::Setup(format!(
            "wal_level is \"{wal_level}\" on {target}; tail mode needs \"logical\": set wal_level=logical and restart Postgres, or use --mode poll"
        )));
    }
    if !can_replicate {
        return Err(Error::Setup(format!(
            "role \"{}\" on {target} lacks the REPLICATION attribute tail mode needs: run ALTER ROLE \"{}\" REPLICATION as a superuser, or use --mode poll",
            target.user, target.user
        )));
    }
    let publication = &tail.publication;
    match database::publication_state(conn, db, publication).await? {
        (true, true) => Ok(()),
        (false, _) => Err(Error::Setup(format!(
            "publication \"{publication}\" does not exist in database \"{}\" at {target}; run `outbox-relay migrate` with the same --database-url, --schema and --publication, or have an administrator run: {}",
            target.database,
            database::create_publication_sql(db, publication)
        ))),
        (true, false) => Err(Error::Setup(format!(
            "publication \"{publication}\" in database \"{}\" at {target} does not publish {}.outbox; run: alter publication {} add table {}.outbox, or give this relay its own --publication",
            target.database,
            db.schema().quoted(),
            publication.quoted(),
            db.schema().quoted()
        ))),
    }
}

/// Before dropping a slot: waits out a session that is just going away,
/// then fails if another process really holds it.
async fn wait_until_slot_free(
    leader: &mut Leader,
    db: &DatabaseConfig,
    tail: &TailConfig,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let since = Instant::now();
    loop {
        leader.renew_if_due(db.call_timeout()).await?;
        let active: Option<(bool, Option<i32>)> = sqlx::query_as(
            "select active, active_pid from pg_replication_slots where slot_name = $1",
        )
        .bind(tail.slot.as_str())
        .fetch_optional(leader.conn()?)
        .await
        .map_err(Error::db("reading the replication slot"))?;
        match active {
            Some((true, pid)) if since.elapsed() >= SLOT_BUSY_GRACE => {
                return Err(slot_in_use(db, tail, pid));
            }
            Some((true, _)) => {}
            _ => return Ok(()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

fn slot_in_use(db: &DatabaseConfig, tail: &TailConfig, pid: Option<i32>) -> Error {
    let by = pid.map_or_else(String::new, |pid| format!(" (pid {pid})"));
    Error::Setup(format!(
        "replication slot \"{}\" on {} is in use by another process{by}; stop that consumer, or give this relay its own --slot (OUTBOX_SLOT)",
        tail.slot,
        db.target()
    ))
}

fn slot_invalidated(db: &DatabaseConfig, tail: &TailConfig) -> Error {
    Error::Setup(format!(
        "replication slot \"{}\" on {} was invalidated: Postgres removed WAL it still needed (max_slot_wal_keep_size); the unpublished rows are still in the outbox: restart with --recreate-invalid-slot (OUTBOX_RECREATE_INVALID_SLOT=true) to create a new slot and publish them again (duplicates possible, nothing lost)",
        tail.slot,
        db.target()
    ))
}

/// The SQLSTATE in a server error's text, which the replication client
/// renders as `message (SQLSTATE xxxxx)`.
fn sqlstate(err: &PgWireError) -> Option<&str> {
    let PgWireError::Server(text) = err else {
        return None;
    };
    let at = text.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    text.get(at..at + 5)
}

/// Turns a replication client error into one a user can act on.
fn replication_error(
    db: &DatabaseConfig,
    tail: &TailConfig,
    doing: &'static str,
    err: PgWireError,
) -> Error {
    let target = Box::new(db.target().clone());
    let text = crate::config::redact(&err.to_string(), db.password());
    match sqlstate(&err) {
        Some("55006") => return slot_in_use(db, tail, None),
        Some("28P01" | "28000") => {
            return Error::DatabaseAuth {
                user: target.user.clone(),
                target,
                cause: text,
            };
        }
        Some("42704") if text.contains("publication") => {
            return Error::Setup(format!(
                "publication \"{}\" does not exist in database \"{}\" at {target}; run `outbox-relay migrate` with the same --database-url, --schema and --publication",
                tail.publication, target.database
            ));
        }
        Some("55000") if text.contains("invalidated") || text.contains("no longer get changes") => {
            return slot_invalidated(db, tail);
        }
        _ => {}
    }
    if let PgWireError::Auth(cause) = &err {
        return Error::DatabaseAuth {
            user: target.user.clone(),
            target,
            cause: crate::config::redact(cause, db.password()),
        };
    }
    let transient = err.is_transient()
        || sqlstate(&err).is_some_and(|code| code.starts_with("08") || code.starts_with("57P"));
    Error::Replication {
        target,
        doing,
        cause: text,
        transient,
    }
}

/// The replication connection's settings, from the same URL as the SQL
/// connections.
fn replication_config(db: &DatabaseConfig, tail: &TailConfig) -> ReplicationConfig {
    let target = db.target();
    let settings = db.tls();
    let mode = match settings.mode.as_str() {
        "disable" => SslMode::Disable,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        _ => SslMode::Prefer,
    };
    let mut tls = TlsConfig {
        mode,
        ca_pem_path: settings.root_cert.clone(),
        ..TlsConfig::default()
    };
    if let (Some(cert), Some(key)) = (&settings.cert, &settings.key) {
        tls = tls.with_client_cert(cert.clone(), key.clone());
    }
    // verify-full to an IP address checks the certificate's IP SAN, as libpq
    // does; the client wants the address named as the name to verify.
    if mode == SslMode::VerifyFull && target.host.parse::<std::net::IpAddr>().is_ok() {
        tls = tls.with_sni_hostname(target.host.clone());
    }
    ReplicationConfig::new(
        target.host.clone(),
        target.user.clone(),
        db.password(),
        target.database.clone(),
        tail.slot.as_str(),
        tail.publication.as_str(),
    )
    .with_port(target.port)
    .with_tls(tls)
    .with_start_lsn(Lsn::ZERO)
    // Confirmed positions reach Postgres within a second.
    .with_status_interval(Duration::from_secs(1))
    .with_wakeup_interval(Duration::from_secs(5))
    .with_buffer_size(4096)
    .with_options("-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3")
    .with_application_name(db.application_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_is_read_from_server_errors() {
        let err = PgWireError::Server(
            "replication slot \"s\" is active for PID 42 (SQLSTATE 55006)".into(),
        );
        assert_eq!(sqlstate(&err), Some("55006"));
        assert_eq!(sqlstate(&PgWireError::Protocol("x".into())), None);
    }
}
