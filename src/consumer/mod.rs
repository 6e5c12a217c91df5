//! The consuming half, as a runtime: exactly-once effects on top of the
//! broker's at-least-once delivery, without a loop to copy.
//!
//! The user gives a pool, a consumer group, topics and a [`Handler`]. For
//! each message the runtime opens a transaction, claims the message id in
//! the inbox ([`crate::inbox::claim`]), runs the handler in that same
//! transaction only if the claim is new, commits, and only then lets the
//! broker forget the message (Kafka: the offset is stored and committed).
//! A crash anywhere before the database commit rolls back the effects and
//! the claim together, and the redelivery applies them once; a crash after
//! it finds the claim and skips.
//!
//! - **Order.** Messages of one partition are handled one after another, in
//!   offset order; a transient error makes the partition wait (capped,
//!   jittered backoff) rather than skip ahead. Partitions are handled
//!   concurrently, at most [`ConsumerConfig::max_in_flight`] at once.
//! - **Batches.** When a partition has several messages ready, they share
//!   one transaction and one inbox statement (up to
//!   [`ConsumerConfig::max_batch`]); if any of them fails, the batch is
//!   rolled back and its messages are taken one at a time, so a failure is
//!   retried or dead-lettered alone.
//! - **Poison.** A [`HandlerError::permanent`], a message without a usable
//!   `id`, or a transient error that outlasts
//!   [`RetryPolicy::max_attempts`] moves the message to the
//!   `consumer_dead_letter` table in a transaction of its own; the partition
//!   moves on. `outbox-relay consumer-dead-letters retry` marks rows for a
//!   running consumer of the group to apply again (through the inbox: once).
//! - **Rebalances and stops.** Before partitions go (a rebalance, or the
//!   shutdown future resolving), the handler running on them finishes
//!   (bounded by [`ConsumerConfig::revoke_timeout`]; a handler waiting out a
//!   backoff is abandoned at once and rolled back), and the offsets of every
//!   committed message are committed to the broker.
//!
//! ```no_run
//! # #[cfg(feature = "kafka")]
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_relay::consumer::{self, ConsumerConfig, HandlerError, Message};
//! use sqlx::{Postgres, Transaction};
//!
//! struct Balances;
//!
//! impl consumer::Handler for Balances {
//!     async fn handle(
//!         &self,
//!         tx: &mut Transaction<'static, Postgres>,
//!         message: &Message,
//!     ) -> Result<(), HandlerError> {
//!         #[derive(serde::Deserialize)]
//!         struct Payment { account: String, amount: i64 }
//!         let payment: Payment = message.json()?; // not JSON: permanent
//!         sqlx::query("update balances set amount = amount + $2 where account = $1")
//!             .bind(&payment.account)
//!             .bind(payment.amount)
//!             .execute(&mut **tx)
//!             .await?; // a database error: transient, retried
//!         Ok(())
//!     }
//! }
//!
//! let config = ConsumerConfig::new("balances", ["payment.events"]);
//! let kafka = consumer::KafkaSettings::new("localhost:9092");
//! consumer::run_kafka(pool, config, kafka, Balances, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```

mod dead_letters;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
mod lanes;
#[cfg(feature = "nats")]
mod membership;
mod metrics;
#[cfg(feature = "nats")]
mod nats;
mod partition;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

pub use dead_letters::{ConsumerDeadLetter, DeadLetterSelection, list, purge, request_retry};
#[cfg(feature = "kafka")]
pub use kafka::{KafkaConsumer, KafkaSettings, run_kafka};
pub use metrics::ConsumerStats;
#[cfg(feature = "nats")]
pub use nats::{NatsConsumer, NatsSettings, run_nats};
#[cfg(feature = "rabbitmq")]
pub use rabbitmq::{RabbitMqConsumer, RabbitMqSettings, run_rabbitmq};

/// One message as the handler sees it, whatever the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The outbox id (the `id` header): the inbox deduplicates on it.
    pub id: Uuid,
    pub topic: String,
    /// The partition (-1 where the broker has none).
    pub partition: i32,
    /// The offset in the partition (the delivery's sequence where the
    /// broker has no offsets).
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The headers in delivery order (`event_type`, `aggregate_type`, the
    /// row's own headers).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub payload: Option<Vec<u8>>,
    /// Handler runs that failed for this message before this one (0 on the
    /// first try; a retried dead letter counts its earlier attempts).
    pub failed_attempts: u32,
}

impl Message {
    /// The value of the first header named `key`.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The `event_type` header as text.
    pub fn event_type(&self) -> Option<&str> {
        self.header(crate::message::HEADER_EVENT_TYPE)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The payload parsed as JSON; a payload that does not parse is a
    /// permanent error (retrying cannot fix it).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(self.payload.as_deref().unwrap_or_default()).map_err(|e| {
            HandlerError::permanent(format!("the payload is not the JSON expected: {e}"))
        })
    }
}

/// What a handler reports when it cannot apply a message.
#[derive(Debug)]
pub struct HandlerError {
    kind: ErrorKind,
    message: String,
}

/// How the runtime treats a handler error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth another try: the partition waits (backoff) and retries, up to
    /// [`RetryPolicy::max_attempts`], then dead-letters.
    Transient,
    /// Retrying cannot help: dead-lettered at once.
    Permanent,
    /// The database is unreachable: retried without counting an attempt,
    /// so an outage never dead-letters messages.
    Unavailable,
}

impl HandlerError {
    /// An error worth retrying (a lock timeout, a service briefly down).
    pub fn transient(error: impl fmt::Display) -> Self {
        HandlerError {
            kind: ErrorKind::Transient,
            message: error.to_string(),
        }
    }

    /// An error retrying cannot fix (a malformed message, a rule broken).
    pub fn permanent(error: impl fmt::Display) -> Self {
        HandlerError {
            kind: ErrorKind::Permanent,
            message: error.to_string(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

/// A database error from the handler's own statements: the connection lost
/// or the pool exhausted is [`ErrorKind::Unavailable`] (never counted),
/// anything else [`ErrorKind::Transient`] (a deadlock or a serialization
/// failure clears on retry; a constraint broken every time ends in the
/// dead-letter table after the attempts run out).
impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> Self {
        HandlerError {
            kind: if unavailable(&error) {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Transient
            },
            message: error.to_string(),
        }
    }
}

/// A payload that is not the JSON expected is permanent.
impl From<serde_json::Error> for HandlerError {
    fn from(error: serde_json::Error) -> Self {
        HandlerError::permanent(format!("the payload is not the JSON expected: {error}"))
    }
}

/// Whether a database error says the database cannot be reached (rather
/// than that a statement failed).
pub(crate) fn unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
    ) || matches!(error, sqlx::Error::Database(e)
        if e.code().is_some_and(|code| code.starts_with("08") || code.starts_with("57P")))
}

/// The user's code: applies one message inside the runtime's transaction.
///
/// The transaction already holds the message's inbox claim; the handler must
/// not commit or roll it back (the runtime does, after it returns). Return
/// [`HandlerError::transient`] to retry, [`HandlerError::permanent`] to
/// dead-letter; `?` on a database error retries it.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// How transient handler errors are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Handler runs before the message is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// The first backoff; each next one doubles, up to `max_backoff`, and
    /// is jittered down by up to half so that partitions do not retry in
    /// step.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based), jittered.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = doubled.min(self.max_backoff);
        let jitter = rand::random_range(0.5..=1.0);
        capped.mul_f64(jitter)
    }
}

/// What a consumer group reads and how; the broker's own settings are
/// separate ([`KafkaSettings`]).
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer group, and the inbox's deduplication namespace.
    pub group: String,
    pub topics: Vec<String>,
    /// Partitions handled at once (each holds one pool connection while it
    /// runs); default 8.
    pub max_in_flight: usize,
    /// Ready messages of one partition applied in one transaction; default
    /// 100 (1 turns batching off).
    pub max_batch: usize,
    /// Messages a partition may have fetched and waiting before it is
    /// paused at the broker (resumed at half); default 5,000. Bounds memory
    /// at about partitions × max_queued × message size.
    pub max_queued: usize,
    pub retry: RetryPolicy,
    /// How often the offsets of applied messages are committed to the
    /// broker; a crash loses at most this much progress (the inbox absorbs
    /// the redelivery). Default 1 s.
    pub commit_interval: Duration,
    /// How long a rebalance or a stop waits for a running handler before it
    /// abandons (rolls back) it; default 10 s.
    pub revoke_timeout: Duration,
    /// How often dead letters marked for retry are looked for; default 5 s.
    pub redrive_interval: Duration,
    /// Serve `/metrics` (OpenMetrics), `/healthz` and `/readyz` (the
    /// database answers) here; default none.
    pub metrics_address: Option<SocketAddr>,
}

impl ConsumerConfig {
    pub fn new(
        group: impl Into<String>,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ConsumerConfig {
            group: group.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            max_in_flight: 8,
            max_batch: 100,
            max_queued: 5000,
            retry: RetryPolicy::default(),
            commit_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(10),
            redrive_interval: Duration::from_secs(5),
            metrics_address: None,
        }
    }

    /// One clear line for a setting that cannot work.
    pub(crate) fn validate(&self) -> Result<(), ConsumerError> {
        let bad = |what: &str| Err(ConsumerError::Config(what.to_string()));
        if self.group.is_empty() {
            return bad("the consumer group is empty; name it (it is also the inbox's namespace)");
        }
        if self.topics.is_empty() || self.topics.iter().any(String::is_empty) {
            return bad("no topic to consume, or an empty topic name; give at least one topic");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight is 0: no partition could be handled; use 1 or more");
        }
        if self.max_batch == 0 {
            return bad("max_batch is 0; use 1 (no batching) or more");
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts is 0: the handler would never run; use 1 or more");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_is_cut_by_at_most_half() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        for (attempt, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            for _ in 0..200 {
                let wait = policy.backoff(attempt).as_millis() as u64;
                assert!(
                    (full / 2..=full).contains(&wait),
                    "attempt {attempt}: {wait} ms is not in [{}, {full}]",
                    full / 2
                );
            }
        }
    }

    #[test]
    fn settings_that_cannot_work_are_named() {
        let mut config = ConsumerConfig::new("g", ["t"]);
        assert!(config.validate().is_ok());
        config.max_in_flight = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("max_in_flight is 0")
        );
        let mut config = ConsumerConfig::new("", ["t"]);
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("group is empty")
        );
        config.group = "g".into();
        config.retry.max_attempts = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("max_attempts is 0")
        );
    }
}

/// Why the runtime stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("consumer configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Broker(String),
    #[error("consumer metrics endpoint {0}")]
    Metrics(String),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Handler(String),
}

/// Runs a member of a broker without partitions: the tables checked, the
/// background tasks started, `receive` until it ends or `shutdown` resolves
/// (then `receive` is told to stop, and awaited: it finishes the messages
/// in hand), the background tasks stopped.
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
pub(crate) async fn run_member<H: Handler, R>(
    applier: &std::sync::Arc<partition::Applier<H>>,
    config: &ConsumerConfig,
    shutdown: impl Future<Output = ()>,
    receive: impl FnOnce(tokio_util::sync::CancellationToken) -> R,
) -> Result<(), ConsumerError>
where
    R: Future<Output = Result<(), ConsumerError>>,
{
    check_tables(&applier.pool).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let background = start_background(applier, config, &stop).await?;
    let _stop_on_drop = stop.clone().drop_guard();
    let receiving = receive(stop.clone());
    tokio::pin!(receiving);
    let ended = tokio::select! {
        ended = &mut receiving => ended,
        () = shutdown => {
            stop.cancel();
            receiving.await
        }
    };
    stop.cancel();
    for task in background {
        let _ = task.await;
    }
    if ended.is_ok() {
        tracing::info!("consumer stopped");
    }
    ended
}

/// The tasks every member runs beside its broker's loop until `stop`:
/// `/metrics` and the probes when asked for, and the dead-letter redrive.
pub(crate) async fn start_background<H: Handler>(
    applier: &std::sync::Arc<partition::Applier<H>>,
    config: &ConsumerConfig,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ConsumerError> {
    let mut background = Vec::new();
    if let Some(address) = config.metrics_address {
        let listener = metrics::bind(address).await?;
        background.push(tokio::spawn(metrics::serve(
            listener,
            applier.stats.clone(),
            applier.pool.clone(),
            stop.clone(),
        )));
    }
    let applier = applier.clone();
    let every = config.redrive_interval;
    let redrive_stop = stop.clone();
    background.push(tokio::spawn(async move {
        dead_letters::redrive(&applier, every, redrive_stop).await
    }));
    Ok(background)
}

/// Refuses to start without the inbox and dead-letter tables (one line
/// with the fix); an unreachable database is only reported, since the
/// partitions wait for it anyway.
pub(crate) async fn check_tables(pool: &sqlx::PgPool) -> Result<(), ConsumerError> {
    for table in ["inbox", "consumer_dead_letter", "consumer_member"] {
        let exists = sqlx::query_scalar::<_, bool>("select to_regclass($1) is not null")
            .bind(table)
            .fetch_one(pool)
            .await;
        match exists {
            Ok(true) => {}
            Ok(false) => {
                return Err(ConsumerError::Setup(format!(
                    "the consumer's database has no table {table} on its search_path; run \
                     `outbox-relay migrate --database-url ...` against it (or \
                     outbox_relay::MIGRATOR.run(&pool)) before starting the consumer"
                )));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the consumer's tables now; \
                    the partitions wait for the database");
                return Ok(());
            }
        }
    }
    Ok(())
}
