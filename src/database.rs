//! Connecting to the outbox's database, with failures turned into errors a
//! user can act on, and the schema check and migrations. Every connection
//! has `search_path` set to the configured schema (see [`DatabaseConfig`]).

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::config::{DatabaseConfig, Identifier, SlotName};
use crate::error::Error;

/// How long one connection attempt may take before it counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one connection, classifying failures (unreachable, login refused,
/// database missing).
pub async fn connect(db: &DatabaseConfig) -> Result<PgConnection, Error> {
    let target = Box::new(db.target().clone());
    let attempt = PgConnection::connect_with(db.connect_options());
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(classify_connect_error(db, err)),
        Err(_) => Err(Error::DatabaseUnreachable {
            target,
            cause: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

fn classify_connect_error(db: &DatabaseConfig, err: sqlx::Error) -> Error {
    let target = Box::new(db.target().clone());
    if let sqlx::Error::Database(db_err) = &err {
        match db_err.code().as_deref() {
            Some("28P01") | Some("28000") => {
                return Error::DatabaseAuth {
                    user: target.user.clone(),
                    target,
                    cause: db_err.message().to_owned(),
                };
            }
            Some("3D000") => {
                return Error::DatabaseMissing {
                    database: target.database.clone(),
                    target,
                };
            }
            _ => {}
        }
    }
    let cause = match err {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Tls(tls) => format!("TLS failed: {tls}"),
        sqlx::Error::Database(db_err) => db_err.message().to_owned(),
        other => other.to_string(),
    };
    Error::DatabaseUnreachable { target, cause }
}

/// Runs one call to Postgres, giving up after `limit` (the configured call
/// timeout)
/// with a transient error. The caller drops the connection on any error, so
/// a call abandoned mid-way never leaves it half-read.
pub(crate) async fn timed<T>(
    limit: Duration,
    doing: &'static str,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(Error::Database {
            doing,
            source: sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from Postgres within {}; the connection is dropped and opened again",
                    humantime::format_duration(limit)
                ),
            )),
        }),
    }
}

/// One sqlx call within `limit` (the configured call timeout), its error
/// wrapped with what was being done.
pub(crate) async fn within<T>(
    limit: Duration,
    doing: &'static str,
    call: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, Error> {
    timed(limit, doing, async { call.await.map_err(Error::db(doing)) }).await
}

/// Fails with [`Error::SchemaMissing`] unless the outbox tables exist in the
/// configured schema.
pub async fn check_schema(conn: &mut PgConnection, db: &DatabaseConfig) -> Result<(), Error> {
    for table in ["outbox", "dead_letter", "relay_lease"] {
        let qualified = format!("{}.{table}", db.schema().quoted());
        let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
            .bind(&qualified)
            .fetch_one(&mut *conn)
            .await
            .map_err(Error::db("checking the outbox tables"))?;
        if !exists {
            return Err(Error::SchemaMissing {
                target: Box::new(db.target().clone()),
                database: db.target().database.clone(),
                table: qualified,
            });
        }
    }
    // The newest migration the relay needs (0009) added outbox.partition_key.
    let outbox = format!("{}.outbox", db.schema().quoted());
    let current: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_attribute where attrelid = to_regclass($1) \
         and attname = 'partition_key' and not attisdropped)",
    )
    .bind(&outbox)
    .fetch_one(&mut *conn)
    .await
    .map_err(Error::db("checking the outbox tables"))?;
    if !current {
        return Err(Error::Setup(format!(
            "the outbox tables in schema \"{}\" of database \"{}\" at {} are older than this relay ({outbox} has no column partition_key); run `outbox-relay migrate` with the same --database-url and --schema",
            db.schema(),
            db.target().database,
            db.target()
        )));
    }
    Ok(())
}

/// Creates the schema if needed, applies the embedded migrations, and
/// creates tail mode's publication (inserts into this schema's outbox only)
/// unless it exists. Running it again is a no-op; concurrent runs serialize
/// on the migrator's lock.
pub async fn migrate(db: &DatabaseConfig, publication: &Identifier) -> Result<(), Error> {
    let mut conn = connect(db).await?;
    let create = format!("create schema if not exists {}", db.schema().quoted());
    sqlx::query(&create)
        .execute(&mut conn)
        .await
        .map_err(Error::db("creating the schema"))?;
    crate::MIGRATOR
        .run(&mut conn)
        .await
        .map_err(Error::Migrate)?;
    create_publication(&mut conn, db, publication).await?;
    conn.close().await.ok();
    Ok(())
}

const PUBLICATION_STATE: &str = "select exists (select 1 from pg_publication where pubname = $1), \
     exists (select 1 from pg_publication_tables where pubname = $1 and schemaname = $2 and tablename = 'outbox')";

/// Whether the publication exists, and whether it publishes this schema's
/// outbox.
pub(crate) async fn publication_state(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    publication: &Identifier,
) -> Result<(bool, bool), Error> {
    sqlx::query_as(PUBLICATION_STATE)
        .bind(publication.as_str())
        .bind(db.schema().as_str())
        .fetch_one(conn)
        .await
        .map_err(Error::db("reading the publication"))
}

/// The statement that creates tail mode's publication, also shown to users
/// who must run it themselves.
pub fn create_publication_sql(db: &DatabaseConfig, publication: &Identifier) -> String {
    format!(
        "create publication {} for table {}.outbox with (publish = 'insert')",
        publication.quoted(),
        db.schema().quoted()
    )
}

/// A lane's publication: the outbox's inserts in the lane's buckets only
/// (a row filter, Postgres 15 and later).
pub fn create_lane_publication_sql(
    db: &DatabaseConfig,
    tail: &crate::config::TailConfig,
) -> String {
    let buckets = tail.lane.buckets();
    format!(
        "create publication {} for table {}.outbox where (bucket >= {} and bucket < {}) with (publish = 'insert')",
        tail.publication.quoted(),
        db.schema().quoted(),
        buckets.start,
        buckets.end
    )
}

/// Creates a lane's publication unless it exists (a relay started with
/// `--shards` in tail mode does this for each lane it takes).
pub(crate) async fn ensure_lane_publication(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    tail: &crate::config::TailConfig,
) -> Result<(), Error> {
    let sql = create_lane_publication_sql(db, tail);
    create_publication_with(conn, db, &tail.publication, &sql).await
}

async fn create_publication(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    publication: &Identifier,
) -> Result<(), Error> {
    let sql = create_publication_sql(db, publication);
    create_publication_with(conn, db, publication, &sql).await
}

async fn create_publication_with(
    conn: &mut PgConnection,
    db: &DatabaseConfig,
    publication: &Identifier,
    sql: &str,
) -> Result<(), Error> {
    match publication_state(conn, db, publication).await? {
        (true, true) => Ok(()),
        (true, false) => Err(Error::Setup(format!(
            "publication \"{publication}\" already exists in database \"{}\" and does not publish {}.outbox; give this schema its own --publication (OUTBOX_PUBLICATION), or add the table with: alter publication {} add table {}.outbox",
            db.target().database,
            db.schema().quoted(),
            publication.quoted(),
            db.schema().quoted(),
        ))),
        (false, _) => {
            sqlx::query(sql).execute(&mut *conn).await.map_err(|e| {
                let cause = match &e {
                    sqlx::Error::Database(d) => d.message().to_owned(),
                    other => other.to_string(),
                };
                Error::Setup(format!(
                    "creating publication \"{publication}\" for tail mode failed: {cause}; run migrate as the outbox table's owner with CREATE on the database, or have an administrator run: {sql}"
                ))
            })?;
            Ok(())
        }
    }
}

/// The outbox's backlog, as `outbox-relay status` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub target: crate::config::DatabaseTarget,
    pub schema: String,
    /// Rows not known to be published (with retention, the outbox also
    /// holds published rows: those are `retained`).
    pub unpublished: i64,
    pub oldest_age: Option<Duration>,
    /// Published rows tail mode keeps with `--retention`.
    pub retained: i64,
    pub dead_letters: i64,
    /// Tail mode's slot, if it exists.
    pub slot: Option<SlotStatus>,
    /// The active instance, if one ever took the lease (unsharded).
    pub leader: Option<LeaderStatus>,
    /// With `--shards N` (the layout of the most recently renewed lease):
    /// every lane, its holder and its backlog.
    pub lanes: Vec<LaneStatus>,
}

/// One lane of a sharded outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneStatus {
    /// `K/N`.
    pub lane: String,
    /// Its lease, if an instance ever took it.
    pub leader: Option<LeaderStatus>,
    pub unpublished: i64,
    pub oldest_age: Option<Duration>,
    /// WAL bytes the lane's slot holds back, if it exists (tail mode).
    pub slot_lag_bytes: Option<i64>,
}

/// The outbox's lease as `relay_lease` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderStatus {
    /// The instance holding (or last holding) the lease: `HOST/PID/NONCE`.
    pub holder: String,
    pub epoch: i64,
    /// Since the holder last renewed it; above the lease means it is hung
    /// (or gone) and no standby took over yet.
    pub lease_age: Duration,
    /// Whether the holder's leader session still holds the lock.
    pub connected: bool,
    /// How many times leadership passed from one instance to another.
    pub takeovers: i64,
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    pub name: String,
    /// WAL bytes between the server's current position and the slot's
    /// confirmed position: what the slot holds back.
    pub lag_bytes: Option<i64>,
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (invalidated).
    pub wal_status: Option<String>,
}

impl Status {
    /// `status --json`: a stable schema for scripts (`version` grows only
    /// when a field changes meaning or goes away; new fields may appear).
    /// Durations are seconds; what is unknown or absent is `null`.
    /// What goes over the limits given: one phrase each, naming the flag.
    pub fn exceeded(
        &self,
        max_lag: Option<Duration>,
        max_dead_letters: Option<i64>,
    ) -> Vec<String> {
        let mut exceeded = Vec::new();
        if let (Some(limit), Some(age)) = (max_lag, self.oldest_age)
            && age > limit
        {
            exceeded.push(format!(
                "the oldest unpublished row is {:.1} s old, over --max-lag {}",
                age.as_secs_f64(),
                humantime::format_duration(limit)
            ));
        }
        if let Some(limit) = max_dead_letters
            && self.dead_letters > limit
        {
            exceeded.push(format!(
                "{} dead letters, over --max-dead-letters {limit}",
                self.dead_letters
            ));
        }
        exceeded
    }

    /// The status as JSON (README, "status --json"); `exceeded` lists the
    /// thresholds gone over.
    pub fn to_json(&self, exceeded: &[String]) -> serde_json::Value {
        use serde_json::json;
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let leader = |l: &LeaderStatus| {
            json!({
                "holder": l.holder,
                "epoch": l.epoch,
                "lease_age_seconds": l.lease_age.as_secs_f64(),
                "connected": l.connected,
                "takeovers": l.takeovers,
            })
        };
        json!({
            "version": 1,
            "database": self.target.to_string(),
            "schema": self.schema,
            "unpublished": self.unpublished,
            "oldest_unpublished_seconds": secs(self.oldest_age),
            "retained": self.retained,
            "dead_letters": self.dead_letters,
            "slot": self.slot.as_ref().map(|s| json!({
                "name": s.name,
                "lag_bytes": s.lag_bytes,
                "active": s.active,
                "wal_status": s.wal_status,
            })),
            "leader": self.leader.as_ref().map(leader),
            "lanes": self.lanes.iter().map(|lane| json!({
                "lane": lane.lane,
                "leader": lane.leader.as_ref().map(leader),
                "unpublished": lane.unpublished,
                "oldest_unpublished_seconds": secs(lane.oldest_age),
                "slot_lag_bytes": lane.slot_lag_bytes,
            })).collect::<Vec<_>>(),
            "exceeded": exceeded,
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "database            {}", self.target)?;
        writeln!(f, "unpublished rows    {}", self.unpublished)?;
        match self.oldest_age {
            Some(age) => writeln!(f, "oldest unpublished  {:.1}s ago", age.as_secs_f64())?,
            None => writeln!(f, "oldest unpublished  -")?,
        }
        if self.retained > 0 {
            writeln!(
                f,
                "retained rows       {} (published, kept by --retention)",
                self.retained
            )?;
        }
        write!(f, "dead letters        {}", self.dead_letters)?;
        match &self.slot {
            None => write!(
                f,
                "\nreplication slot    none (poll mode, or tail mode not started yet)"
            )?,
            Some(slot) => {
                let lag = slot
                    .lag_bytes
                    .map_or_else(|| "-".to_owned(), |b| format!("{b} bytes"));
                write!(
                    f,
                    "\nreplication slot    {} ({}, wal {})\nslot lag            {lag}",
                    slot.name,
                    if slot.active { "active" } else { "inactive" },
                    slot.wal_status.as_deref().unwrap_or("-"),
                )?;
            }
        }
        if !self.lanes.is_empty() {
            write!(f, "\nlanes               {}", self.lanes.len())?;
            for lane in &self.lanes {
                let oldest = lane.oldest_age.map_or_else(
                    || "-".to_owned(),
                    |a| format!("{:.1}s ago", a.as_secs_f64()),
                );
                write!(f, "\n  lane {:<14}", lane.lane)?;
                match &lane.leader {
                    None => write!(f, "no holder yet")?,
                    Some(leader) => write!(
                        f,
                        "{} (epoch {}, {}, renewed {:.1}s ago)",
                        leader.holder,
                        leader.epoch,
                        if leader.connected {
                            "connected"
                        } else {
                            "gone"
                        },
                        leader.lease_age.as_secs_f64()
                    )?,
                }
                write!(f, ", {} unpublished, oldest {oldest}", lane.unpublished)?;
                if let Some(lag) = lane.slot_lag_bytes {
                    write!(f, ", slot lag {lag} bytes")?;
                }
            }
            return Ok(());
        }
        match &self.leader {
            None => write!(f, "\nleader              none yet"),
            Some(leader) => write!(
                f,
                "\nleader              {} (epoch {}, {})\nlease renewed       {:.1}s ago\ntakeovers           {}",
                leader.holder,
                leader.epoch,
                if leader.connected {
                    "connected"
                } else {
                    "gone: the next instance to start or stand by takes over"
                },
                leader.lease_age.as_secs_f64(),
                leader.takeovers,
            ),
        }
    }
}

const SLOT_STATUS: &str = "select slot_name::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, active, wal_status \
     from pg_replication_slots where slot_name = $1";

/// A common table `published(b, a)`: for each bucket some slot's lane
/// covers, the age of the newest published-before among them. A row is
/// known published when its transaction is older (see
/// [`crate::source::published!`]); a hash join on the bucket is much
/// cheaper than that condition's subquery per row over a retained table.
macro_rules! published_by_bucket {
    () => {
        "published as (select b, min(age((s.published_before::text::bigint % 4294967296)::text::xid)) as a \
         from relay_slot s, generate_series(s.bucket_from, s.bucket_to - 1) as b \
         where s.published_before is not null group by b)"
    };
}

/// Every lane of the layout whose lease was renewed last, if it is sharded:
/// its lease and its backlog.
const LANES_STATUS: &str = concat!(
    "with ",
    published_by_bucket!(),
    ", layout as (select shards as n from relay_lease where outbox = $1 \
       order by renewed_at desc limit 1), \
     lanes as (select k, n from layout, generate_series(0, n - 1) as k where n > 1), \
     backlog as (select bucket::int * (select n from layout) / 1024 as k, count(*) as rows, \
       extract(epoch from now() - min(created_at))::float8 as age from outbox \
       left join published p on p.b = outbox.bucket \
       where not coalesce(age(outbox.xmin) > p.a, false) group by 1) \
     select l.k, l.n, r.holder, r.epoch, extract(epoch from now() - r.renewed_at)::float8, \
       exists (select 1 from pg_stat_activity a where a.pid = r.backend_pid), r.takeovers, \
       coalesce(b.rows, 0), b.age, (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint \
     from lanes l \
     left join relay_lease r on r.name = $2 || '/' || l.k || '-of-' || l.n \
     left join pg_replication_slots s on s.slot_name = $3 || '_' || l.k || '_of_' || l.n \
     left join backlog b on b.k = l.k order by l.k"
);

/// The backlog (rows not known to be published), the rows kept for replay
/// (published, with `--retention`), and the dead letters.
const TOTALS_STATUS: &str = concat!(
    "with ",
    published_by_bucket!(),
    ", o as (select created_at, coalesce(age(outbox.xmin) > p.a, false) as published \
       from outbox left join published p on p.b = outbox.bucket) \
     select count(*) filter (where not published), \
       extract(epoch from now() - min(created_at) filter (where not published))::float8, \
       count(*) filter (where published), \
       (select count(*) from dead_letter) from o"
);

type LaneRow = (
    i32,
    i32,
    Option<String>,
    Option<i64>,
    Option<f64>,
    bool,
    Option<i64>,
    i64,
    Option<f64>,
    Option<i64>,
);

const LEADER_STATUS: &str = "select holder, epoch, extract(epoch from now() - renewed_at)::float8, \
     exists (select 1 from pg_stat_activity a where a.pid = l.backend_pid), takeovers \
     from relay_lease l where name = $1";

/// Reads the backlog figures, the lag of `slot` if it exists, and the lease.
pub async fn status(db: &DatabaseConfig, slot: &SlotName) -> Result<Status, Error> {
    let slot_name = slot.as_str().to_owned();
    let mut conn = connect(db).await?;
    check_schema(&mut conn, db).await?;
    let (unpublished, oldest_secs, retained, dead_letters): (i64, Option<f64>, i64, i64) =
        sqlx::query_as(TOTALS_STATUS)
            .fetch_one(&mut conn)
            .await
            .map_err(Error::db("reading the backlog"))?;
    let slot = sqlx::query_as::<_, (String, Option<i64>, bool, Option<String>)>(SLOT_STATUS)
        .bind(slot.as_str())
        .fetch_optional(&mut conn)
        .await
        .map_err(Error::db("reading the replication slot"))?
        .map(|(name, lag_bytes, active, wal_status)| SlotStatus {
            name,
            lag_bytes,
            active,
            wal_status,
        });
    let leader = sqlx::query_as::<_, (String, i64, f64, bool, i64)>(LEADER_STATUS)
        .bind(format!("outbox-relay:{}", db.schema()))
        .fetch_optional(&mut conn)
        .await
        .map_err(Error::db("reading the lease"))?
        .map(|(holder, epoch, age, connected, takeovers)| LeaderStatus {
            holder,
            epoch,
            lease_age: Duration::from_secs_f64(age.max(0.0)),
            connected,
            takeovers,
        });
    let lanes = sqlx::query_as::<_, LaneRow>(LANES_STATUS)
        .bind(db.schema().as_str())
        .bind(format!("outbox-relay:{}", db.schema()))
        .bind(&slot_name)
        .fetch_all(&mut conn)
        .await
        .map_err(Error::db("reading the lanes"))?
        .into_iter()
        .map(
            |(k, n, holder, epoch, age, connected, takeovers, unpublished, oldest, slot_lag)| {
                LaneStatus {
                    lane: format!("{k}/{n}"),
                    leader: holder.map(|holder| LeaderStatus {
                        holder,
                        epoch: epoch.unwrap_or_default(),
                        lease_age: Duration::from_secs_f64(age.unwrap_or_default().max(0.0)),
                        connected,
                        takeovers: takeovers.unwrap_or_default(),
                    }),
                    unpublished,
                    oldest_age: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
                    slot_lag_bytes: slot_lag,
                }
            },
        )
        .collect();
    conn.close().await.ok();
    Ok(Status {
        target: db.target().clone(),
        schema: db.schema().as_str().to_owned(),
        unpublished,
        oldest_age: oldest_secs.map(|s| Duration::from_secs_f64(s.max(0.0))),
        retained,
        dead_letters,
        slot,
        leader,
        lanes,
    })
}
