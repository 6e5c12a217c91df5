//! The library's error type. Every variant a user can see renders as one line
//! that names the thing, the cause and the fix, and never contains a secret:
//! database URLs are carried as [`crate::config::DatabaseTarget`], which has no
//! password in it.

use crate::target::DatabaseTarget;

/// What went wrong, and whether trying again can help (see [`Error::is_transient`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or environment variable has a value the relay cannot use.
    #[error("{0}")]
    Config(String),

    /// Postgres could not be reached at all.
    #[error(
        "cannot connect to Postgres at {target}: {cause}; check --database-url (OUTBOX_DATABASE_URL) and that the server is running and accepts TCP connections"
    )]
    DatabaseUnreachable {
        target: Box<DatabaseTarget>,
        cause: String,
    },

    /// Postgres answered but refused the login.
    #[error(
        "Postgres at {target} rejected the login for user \"{user}\": {cause}; check the user and password in --database-url (OUTBOX_DATABASE_URL)"
    )]
    DatabaseAuth {
        target: Box<DatabaseTarget>,
        user: String,
        cause: String,
    },

    /// The database named in the URL does not exist.
    #[error(
        "database \"{database}\" does not exist at {target}; create it or fix the database name in --database-url (OUTBOX_DATABASE_URL)"
    )]
    DatabaseMissing {
        target: Box<DatabaseTarget>,
        database: String,
    },

    /// The outbox tables are not there: `migrate` was never run.
    #[error(
        "table {table} does not exist in database \"{database}\" at {target}; run `outbox-relay migrate` with the same --database-url and --schema first"
    )]
    SchemaMissing {
        target: Box<DatabaseTarget>,
        database: String,
        table: String,
    },

    /// A query failed on an established connection.
    #[error("Postgres query failed while {doing}: {source}")]
    Database {
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },

    /// The connection a call needs is gone (dropped after an earlier
    /// failure); the relay opens a new one.
    #[error("no connection to Postgres while {doing}; the relay connects again")]
    NotConnected { doing: &'static str },

    /// Applying the migrations failed.
    #[error("migration failed: {0}; fix the cause and run `outbox-relay migrate` again")]
    Migrate(#[source] sqlx::migrate::MigrateError),

    /// The Kafka client could not be created or used.
    #[cfg(feature = "kafka")]
    #[error("Kafka {doing} failed: {source}")]
    Kafka {
        doing: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },

    /// The database is not set up for what was asked (tail mode's
    /// prerequisites, a replication slot that cannot be used); the message
    /// says how to fix it.
    #[error("{0}")]
    Setup(String),

    /// The replication connection failed or sent what cannot be read.
    #[error("logical replication from {target} failed while {doing}: {cause}")]
    Replication {
        target: Box<DatabaseTarget>,
        doing: &'static str,
        cause: String,
        transient: bool,
    },

    /// This instance is no longer the active one for an outbox: a standby
    /// took the lease over, or the lease ran out before the loop renewed it.
    /// It steps down; its unconfirmed rows stay in the outbox.
    #[error(
        "lost the lease \"{name}\": {cause}; stepping down to standby, rows not confirmed stay in the outbox for the active instance"
    )]
    LeaseLost { name: String, cause: String },

    /// `--on-poison halt` stopped the relay at a row the broker rejected.
    #[error("{0}")]
    Poison(String),

    /// A throwaway Postgres (demo, tests) could not be started.
    #[error("{0}")]
    Embedded(String),

    /// `outbox-relay bench` could not measure something.
    #[error("bench: {0}")]
    Bench(String),
}

impl Error {
    /// Whether the same operation may succeed later (a restart, a network
    /// blip), so the relay should back off and retry rather than exit.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::DatabaseUnreachable { .. }
            | Error::NotConnected { .. }
            | Error::LeaseLost { .. } => true,
            #[cfg(feature = "kafka")]
            Error::Kafka { .. } => true,
            Error::Database { source, .. } => is_transient_sqlx(source),
            Error::Replication { transient, .. } => *transient,
            _ => false,
        }
    }

    #[cfg_attr(not(feature = "relay"), allow(dead_code))]
    pub(crate) fn db(doing: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        Self::db_error(doing)
    }

    #[cfg(feature = "kafka")]
    pub fn kafka(doing: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
        move |source| Error::Kafka { doing, source }
    }

    /// Wraps a query error with what the caller was doing.
    pub fn db_error(doing: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Database { doing, source }
    }
}

/// Connection-level failures and server shutdowns are transient; a query the
/// server rejects for its content (syntax, missing table) is not.
pub(crate) fn is_transient_sqlx(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 57P0x: admin/crash shutdown, cannot
            // connect now; 40001/40P01: serialization failure, deadlock.
            code.starts_with("08")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01"
                || code == "55P03"
        }),
        _ => false,
    }
}
