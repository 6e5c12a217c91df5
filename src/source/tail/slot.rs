//! The replication slot: tail mode's prerequisites, creating a slot with
//! an exported snapshot (whose rows the initial copy publishes first), and
//! waiting out a slot still held by a session that is going away.

use super::*;

/// A new slot: its copy has not finished, and its stream has no resume
/// point yet (published-before stays: it is a fact about transactions, not
/// about the slot).
pub(super) const SLOT_STARTED: &str = "insert into relay_slot (slot_name, outbox, bucket_from, bucket_to) \
     values ($1, $2, $3, $4) \
     on conflict (slot_name) do update set created_at = now(), copied_at = null, \
     outbox = excluded.outbox, bucket_from = excluded.bucket_from, bucket_to = excluded.bucket_to, \
     resume_lsn = null, resume_rows = null";

pub(super) const DROP_SLOT: &str = "select pg_drop_replication_slot($1)";

/// How long a slot held by a vanished session (a relay that was just killed)
/// may stay busy before that counts as another process using it.
pub(super) const SLOT_BUSY_GRACE: Duration = Duration::from_secs(10);

impl TailSource {
    /// Creates the slot (dropping the old one first when `replace`), imports
    /// its snapshot and starts the copy.
    pub(super) async fn create_slot(
        &mut self,
        replace: bool,
        shutdown: &CancellationToken,
    ) -> Result<bool, Error> {
        let leader = self.leader.as_mut().ok_or_else(no_leader)?;
        let slot = self.tail.slot.as_str();
        // Forget the old copy first: a crash from here on starts over.
        within(
            self.database.call_timeout(),
            "recording the replication slot",
            sqlx::query(SLOT_STARTED)
                .bind(slot)
                .bind(self.database.schema().as_str())
                .bind(self.tail.lane.buckets().start)
                .bind(self.tail.lane.buckets().end)
                .execute(leader.conn()?),
        )
        .await?;
        if replace {
            wait_until_slot_free(leader, &self.database, &self.tail, shutdown).await?;
            within(
                self.database.call_timeout(),
                "dropping the old replication slot",
                sqlx::query(DROP_SLOT).bind(slot).execute(leader.conn()?),
            )
            .await?;
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
            within(
                self.database.call_timeout(),
                "importing the replication slot's snapshot",
                sqlx::query(&statement).execute(&mut copy),
            )
            .await
            .map_err(|e| snapshot_gone(e, target))?;
        }
        drop(session);
        let snapshot_text: String = within(
            self.database.call_timeout(),
            "importing the replication slot's snapshot",
            sqlx::query_scalar("select pg_current_snapshot()::text").fetch_one(&mut copy),
        )
        .await?;
        let before = retention::copied_before(leader.conn()?, &self.database, slot).await?;
        let after_seq = Copy::first_unpublished(&mut copy, &self.database, self.tail.lane).await?;
        info!(slot, consistent_point = %consistent_point, "created the replication slot; publishing the rows already in the outbox and not known to be published first");
        self.phase = Phase::Copy(Copy {
            snapshot: copy,
            after_seq,
            batch_last_seqs: Vec::new(),
            snapshot_text,
            before,
        });
        Ok(true)
    }
}

/// An exported snapshot can be imported only while the session that
/// exported it lives. Postgres says "invalid snapshot identifier" (22023)
/// once that session has ended: another instance fenced this one while it
/// was frozen between the two steps, or the connection dropped. That is a
/// lost session, not a fault: the next attempt finds the lane gone, or
/// starts the copy over with a new slot (its first copy never finished).
fn snapshot_gone(error: Error, target: &crate::target::DatabaseTarget) -> Error {
    match &error {
        Error::Database {
            source: sqlx::Error::Database(db),
            ..
        } if db.code().as_deref() == Some(INVALID_SNAPSHOT) => Error::Replication {
            target: Box::new(target.clone()),
            doing: "importing the replication slot's snapshot",
            cause: format!(
                "the session that created the slot ended before its snapshot was imported (fenced by another instance, or its connection was lost): {}",
                db.message()
            ),
            transient: true,
        },
        _ => error,
    }
}

/// Postgres' SQLSTATE for an unknown snapshot in `set transaction snapshot`
/// (invalid_parameter_value).
const INVALID_SNAPSHOT: &str = "22023";

/// What `wal_level`, the role and the publication must be for tail mode.
pub(crate) async fn check_prerequisites(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    tail: &TailConfig,
) -> Result<(), Error> {
    let target = db.target();
    let (wal_level, can_replicate): (String, bool) = within(
        db.call_timeout(),
        "checking tail mode's prerequisites",
        sqlx::query_as(
            "select current_setting('wal_level'), \
                (select rolreplication or rolsuper from pg_roles where rolname = current_user)",
        )
        .fetch_one(&mut *conn),
    )
    .await?;
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
    let state = timed(
        db.call_timeout(),
        "reading the publication",
        database::publication_state(conn, db, publication),
    )
    .await?;
    match state {
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
pub(super) async fn wait_until_slot_free(
    leader: &mut Leader,
    db: &DatabaseConfig,
    tail: &TailConfig,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let since = Instant::now();
    loop {
        leader.renew_if_due(db.call_timeout()).await?;
        let active: Option<(bool, Option<i32>)> = within(
            db.call_timeout(),
            "reading the replication slot",
            sqlx::query_as(
                "select active, active_pid from pg_replication_slots where slot_name = $1",
            )
            .bind(tail.slot.as_str())
            .fetch_optional(leader.conn()?),
        )
        .await?;
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

pub(super) fn slot_in_use(db: &DatabaseConfig, tail: &TailConfig, pid: Option<i32>) -> Error {
    let by = pid.map_or_else(String::new, |pid| format!(" (pid {pid})"));
    Error::Setup(format!(
        "replication slot \"{}\" on {} is in use by another process{by}; stop that consumer, or give this relay its own --slot (OUTBOX_SLOT)",
        tail.slot,
        db.target()
    ))
}

pub(super) fn slot_invalidated(db: &DatabaseConfig, tail: &TailConfig) -> Error {
    Error::Setup(format!(
        "replication slot \"{}\" on {} was invalidated: Postgres removed WAL it still needed (max_slot_wal_keep_size); the unpublished rows are still in the outbox: restart with --recreate-invalid-slot (OUTBOX_RECREATE_INVALID_SLOT=true) to create a new slot and publish them again (duplicates possible, nothing lost)",
        tail.slot,
        db.target()
    ))
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::config::{DatabaseConfig, Identifier};

    /// A server error with a SQLSTATE, as sqlx hands it over.
    #[derive(Debug)]
    struct ServerError(&'static str, &'static str);

    impl std::fmt::Display for ServerError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.1)
        }
    }

    impl std::error::Error for ServerError {}

    impl sqlx::error::DatabaseError for ServerError {
        fn message(&self) -> &str {
            self.1
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn importing(code: &'static str, message: &'static str) -> Error {
        Error::db_error("importing the replication slot's snapshot")(sqlx::Error::Database(
            Box::new(ServerError(code, message)),
        ))
    }

    /// Postgres 15 answers `set transaction snapshot` for a snapshot whose
    /// exporting session has ended with `22023 invalid snapshot identifier`.
    #[test]
    fn a_snapshot_whose_exporter_ended_is_a_lost_session_not_a_fault() {
        let db = DatabaseConfig::from_url(
            "postgres://relay:secret@db:5432/shop",
            Identifier::parse("public", "--schema").unwrap(),
            "--database-url",
        )
        .unwrap();
        let gone = snapshot_gone(
            importing(
                "22023",
                "invalid snapshot identifier: \"0000002A-0000003B-1\"",
            ),
            db.target(),
        );
        assert!(gone.is_transient(), "{gone}");
        let text = gone.to_string();
        assert!(
            text.contains("ended before its snapshot was imported"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");

        // Anything else keeps its own classification.
        let other = snapshot_gone(importing("42501", "permission denied"), db.target());
        assert!(!other.is_transient(), "{other}");
    }
}
