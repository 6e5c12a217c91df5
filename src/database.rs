//! Connecting to the outbox's database, with failures turned into errors a
//! user can act on, and the schema check and migrations. Every connection
//! has `search_path` set to the configured schema (see [`DatabaseConfig`]).

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::config::DatabaseConfig;
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

/// Fails with [`Error::SchemaMissing`] unless the outbox tables exist in the
/// configured schema.
pub async fn check_schema(conn: &mut PgConnection, db: &DatabaseConfig) -> Result<(), Error> {
    for table in ["outbox", "dead_letter"] {
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
    Ok(())
}

/// Creates the schema if needed and applies the embedded migrations. Running
/// it again is a no-op; concurrent runs serialize on the migrator's lock.
pub async fn migrate(db: &DatabaseConfig) -> Result<(), Error> {
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
    conn.close().await.ok();
    Ok(())
}

/// The outbox's backlog, as `outbox-relay status` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub target: crate::config::DatabaseTarget,
    pub unpublished: i64,
    pub oldest_age: Option<Duration>,
    pub dead_letters: i64,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "database            {}", self.target)?;
        writeln!(f, "unpublished rows    {}", self.unpublished)?;
        match self.oldest_age {
            Some(age) => writeln!(f, "oldest unpublished  {:.1}s ago", age.as_secs_f64())?,
            None => writeln!(f, "oldest unpublished  -")?,
        }
        write!(f, "dead letters        {}", self.dead_letters)
    }
}

/// Reads the backlog figures.
pub async fn status(db: &DatabaseConfig) -> Result<Status, Error> {
    let mut conn = connect(db).await?;
    check_schema(&mut conn, db).await?;
    let (unpublished, oldest_secs, dead_letters): (i64, Option<f64>, i64) = sqlx::query_as(
        "select (select count(*) from outbox), \
                (select extract(epoch from now() - min(created_at))::float8 from outbox), \
                (select count(*) from dead_letter)",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(Error::db("reading the backlog"))?;
    conn.close().await.ok();
    Ok(Status {
        target: db.target().clone(),
        unpublished,
        oldest_age: oldest_secs.map(|s| Duration::from_secs_f64(s.max(0.0))),
        dead_letters,
    })
}
