//! The loop that joins a source to the sink, and the only place that decides
//! what is confirmed.
//!
//! One batch at a time: read up to `batch_size` committed rows, enqueue them
//! all in order, then walk their outcomes in the same order. The confirmed
//! set is the longest prefix in which every row was acknowledged or rejected
//! for good (rejects go to the dead-letter table); the first row that failed
//! transiently ends the prefix, and it and everything after it stay in the
//! outbox to be read again. So progress only ever covers a contiguous
//! acknowledged prefix, in-flight records are bounded by the batch size, and
//! duplicates after a failure are bounded by one batch.

use std::collections::HashSet;
use std::pin::pin;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Mode, PoisonPolicy, RelayConfig};
use crate::database;
use crate::error::Error;
use crate::metrics::{self, Dependency, Metrics};
use crate::outbox::OutboxRow;
use crate::record;
use crate::sink::kafka::{KafkaSink, Outcome, Pending};
use crate::source::{Aggregate, Confirm, PollSource, Source, TailSource, timed};

/// What a relay did before it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// Rows acknowledged by Kafka and confirmed.
    pub published: u64,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: u64,
}

/// Runs the relay until `shutdown` fires, then stops reading, waits (up to
/// the configured shutdown timeout) for in-flight acks, confirms them, and
/// returns. Errors a retry cannot fix (bad credentials, missing tables) end
/// it early; transient ones are retried with backoff.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<RunStats, Error> {
    let metrics = Metrics::new();
    if !check_database(&config, &metrics, &shutdown).await? {
        return Ok(RunStats::default());
    }
    let sink = KafkaSink::new(&config.kafka)?;
    // The endpoints and the backlog sampler live exactly as long as the loop.
    let endpoints = shutdown.child_token();
    let _stop_endpoints = endpoints.clone().drop_guard();
    if let Some(address) = config.metrics_address {
        let listener = metrics::bind(address).await?;
        tokio::spawn(metrics::serve(listener, metrics.clone(), endpoints.clone()));
        tokio::spawn(metrics::sample_backlog(
            metrics.clone(),
            config.database.clone(),
            config.tail.slot.clone(),
            BACKLOG_SAMPLE_INTERVAL,
            endpoints.clone(),
        ));
    }
    info!(mode = %config.mode, database = %config.database.target(), brokers = %config.kafka.brokers, "relay starting");
    match config.mode {
        Mode::Poll => {
            let source = PollSource::new(
                config.database.clone(),
                config.poll_interval,
                metrics.clone(),
            );
            Relay::new(config, source, sink, metrics)
                .run(shutdown)
                .await
        }
        Mode::Tail => {
            let source = TailSource::new(
                config.database.clone(),
                config.tail.clone(),
                metrics.clone(),
            );
            Relay::new(config, source, sink, metrics)
                .run(shutdown)
                .await
        }
    }
}

/// The startup checks. They fail fast, with one clear line, on what waiting
/// cannot fix: a database that cannot be reached at all, a refused login,
/// missing tables, tail mode's prerequisites. A database that answered and
/// then went away during the checks (a restart, a failover) is waited for
/// with backoff, as it is once the relay runs. Returns false if `shutdown`
/// fired while waiting.
async fn check_database(
    config: &RelayConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<bool, Error> {
    let mut first = Some(database::connect(&config.database).await?);
    let mut health = Health::new(metrics.clone());
    while !shutdown.is_cancelled() {
        let checked = match first.take() {
            Some(mut conn) => startup_checks(&mut conn, config).await,
            None => connect_and_check(config).await,
        };
        match checked {
            Ok(()) => {
                health.ok();
                return Ok(true);
            }
            Err(e) if e.is_transient() => {
                health.failed("checking the database", &e.to_string());
                health.wait(shutdown).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

async fn connect_and_check(config: &RelayConfig) -> Result<(), Error> {
    let mut conn = database::connect(&config.database).await?;
    startup_checks(&mut conn, config).await
}

async fn startup_checks(conn: &mut sqlx::PgConnection, config: &RelayConfig) -> Result<(), Error> {
    let checks = async {
        database::check_schema(conn, &config.database).await?;
        if config.mode == Mode::Tail {
            crate::source::tail::check_prerequisites(conn, &config.database, &config.tail).await?;
        }
        Ok(())
    };
    timed(
        config.database.call_timeout(),
        "checking the database",
        checks,
    )
    .await
}

/// How often the backlog gauges are read from Postgres.
const BACKLOG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

struct Relay<S> {
    config: RelayConfig,
    source: S,
    sink: KafkaSink,
    stats: RunStats,
    metrics: Metrics,
}

impl<S: Source> Relay<S> {
    fn new(config: RelayConfig, source: S, sink: KafkaSink, metrics: Metrics) -> Self {
        Relay {
            config,
            source,
            sink,
            stats: RunStats::default(),
            metrics,
        }
    }

    async fn run(mut self, shutdown: CancellationToken) -> Result<RunStats, Error> {
        self.metrics.failing(
            Dependency::Kafka,
            "waiting for the Kafka brokers to answer".into(),
        );
        if !self.sink.wait_until_reachable(&shutdown).await {
            return Ok(self.stats);
        }
        self.metrics.recovered();
        let mut health = Health::new(self.metrics.clone());
        let mut report = Report::new();
        while !shutdown.is_cancelled() {
            let reading = Instant::now();
            let rows = match self
                .source
                .next_batch(self.config.batch_size, &shutdown)
                .await
            {
                Ok(rows) if rows.is_empty() => break,
                Ok(rows) => rows,
                Err(e) if e.is_transient() => {
                    health.failed("reading the outbox", &e.to_string());
                    health.wait(&shutdown).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let blocked = match self.config.on_poison {
                PoisonPolicy::BlockAggregate => match self.source.blocked_aggregates(&rows).await {
                    Ok(blocked) => blocked,
                    Err(e) if e.is_transient() => {
                        health.failed("reading the outbox", &e.to_string());
                        health.wait(&shutdown).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                _ => HashSet::new(),
            };
            let publishing = Instant::now();
            let Published {
                confirm,
                failure,
                halt,
            } = self.publish(&rows, blocked, &shutdown).await;
            let confirming = Instant::now();
            match self.source.confirm(&confirm).await {
                Ok(()) => {
                    debug!(
                        rows = rows.len(),
                        confirmed = confirm.len(),
                        read_ms = (publishing - reading).as_secs_f64() * 1e3,
                        publish_ms = (confirming - publishing).as_secs_f64() * 1e3,
                        confirm_ms = confirming.elapsed().as_secs_f64() * 1e3,
                        "batch"
                    );
                    self.stats.published += confirm.published.len() as u64;
                    self.stats.dead_lettered += confirm.dead_letters.len() as u64;
                    self.metrics
                        .confirmed(confirm.published.len(), confirm.dead_letters.len());
                    report.add(confirm.published.len());
                    for (seq, error) in &confirm.dead_letters {
                        warn!(seq, error = %error, "moved a row to the dead-letter table");
                    }
                    if let Some(halt) = halt {
                        return Err(halt);
                    }
                }
                Err(e) if e.is_transient() => {
                    health.failed("confirming published rows", &e.to_string());
                    health.wait(&shutdown).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
            match failure {
                None => health.ok(),
                Some(cause) => {
                    health.failed("publishing to Kafka", &cause);
                    if self.sink.is_fatal() {
                        debug!("replacing the Kafka producer after a fatal error");
                        self.sink = KafkaSink::new(&self.config.kafka)?;
                    }
                    health.wait(&shutdown).await;
                }
            }
        }
        info!(
            published = self.stats.published,
            dead_lettered = self.stats.dead_lettered,
            "relay stopped"
        );
        Ok(self.stats)
    }

    /// Publishes `rows` in order and returns the prefix to confirm, the
    /// first transient failure if there was one, and, under `--on-poison
    /// halt`, the error that stops the relay. Rows of a `blocked` aggregate
    /// (and, under `block-aggregate`, of one whose row was just rejected)
    /// are not sent but parked in the dead-letter table, in order.
    async fn publish(
        &self,
        rows: &[OutboxRow],
        mut blocked: HashSet<Aggregate>,
        shutdown: &CancellationToken,
    ) -> Published {
        let policy = self.config.on_poison;
        let mut pending = Vec::with_capacity(rows.len());
        let block = policy == PoisonPolicy::BlockAggregate;
        for row in rows {
            // Only `block-aggregate` looks rows up by aggregate; the others
            // skip building the key.
            if block && blocked.contains(&(row.aggregate_type.clone(), row.aggregate_id.clone())) {
                pending.push(None);
                continue;
            }
            let record =
                record::from_row(row, &self.config.topic_template, self.config.null_payload);
            let sent = self.sink.send(&record).await;
            if block && sent.rejected_at_once() {
                blocked.insert((row.aggregate_type.clone(), row.aggregate_id.clone()));
            }
            pending.push(Some(sent));
        }
        // After shutdown fires, in-flight acks get `shutdown_timeout` more.
        let timeout = self.config.shutdown_timeout;
        let mut deadline = pin!(async {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
        });
        let mut out = Published::default();
        for (row, pending) in rows.iter().zip(pending) {
            let Some(pending) = pending else {
                if out.failure.is_none() && out.halt.is_none() {
                    out.confirm.dead_letters.push((row.seq, parked(row)));
                }
                continue;
            };
            let outcome = tokio::select! {
                outcome = Pending::outcome(pending) => outcome,
                _ = &mut deadline => {
                    out.failure.get_or_insert_with(|| "in-flight records were not acknowledged within the shutdown timeout".into());
                    break;
                }
            };
            if out.failure.is_some() || out.halt.is_some() {
                continue;
            }
            match outcome {
                Outcome::Acked => {
                    let age = chrono::Utc::now() - row.created_at;
                    self.metrics.acked(age.as_seconds_f64());
                    out.confirm.published.push(row.seq);
                }
                Outcome::Rejected(error) if policy == PoisonPolicy::Halt => {
                    out.halt = Some(Error::Poison(format!(
                        "the broker rejected row seq {} (id {}, aggregate {}/{}) for good: {error}; --on-poison halt stopped the relay with the row still in the outbox: fix the cause and restart, or restart with --on-poison dead-letter to move it aside",
                        row.seq, row.id, row.aggregate_type, row.aggregate_id
                    )));
                }
                Outcome::Rejected(error) => out.confirm.dead_letters.push((row.seq, error)),
                Outcome::Failed(error) => out.failure = Some(error),
            }
        }
        out
    }
}

/// What publishing one batch came to.
#[derive(Default)]
struct Published {
    confirm: Confirm,
    failure: Option<String>,
    halt: Option<Error>,
}

/// The dead-letter error of a row parked behind its aggregate's rejected row.
fn parked(row: &OutboxRow) -> String {
    format!(
        "parked: aggregate {}/{} has an earlier row in the dead-letter table (--on-poison block-aggregate); replay them in order with `outbox-relay dead-letters retry`",
        row.aggregate_type, row.aggregate_id
    )
}

/// Logs one line when a dependency starts failing and one when it recovers,
/// not one per retry, paces retries with capped exponential backoff, and
/// tells `/readyz`.
struct Health {
    failing: Option<&'static str>,
    attempts: u32,
    metrics: Metrics,
}

impl Health {
    const MAX_DELAY: Duration = Duration::from_secs(30);

    fn new(metrics: Metrics) -> Self {
        Health {
            failing: None,
            attempts: 0,
            metrics,
        }
    }

    fn failed(&mut self, doing: &'static str, cause: &str) {
        let dependency = match doing {
            "publishing to Kafka" => Dependency::Kafka,
            _ => Dependency::Database,
        };
        self.metrics
            .failing(dependency, format!("failing {doing}: {cause}"));
        if self.failing != Some(doing) {
            warn!(
                cause,
                "failed {doing}: {cause}; retrying with backoff, nothing is lost"
            );
        } else {
            debug!(cause, attempts = self.attempts, "still failing {doing}");
        }
        self.failing = Some(doing);
        self.attempts += 1;
    }

    fn ok(&mut self) {
        if let Some(doing) = self.failing.take() {
            self.metrics.recovered();
            info!(attempts = self.attempts, "recovered: {doing} works again");
        }
        self.attempts = 0;
    }

    async fn wait(&self, shutdown: &CancellationToken) {
        let exp = self.attempts.saturating_sub(1).min(10);
        let base = Duration::from_millis(200) * 2u32.pow(exp);
        let base = base.min(Self::MAX_DELAY);
        // Jitter in [50%, 100%] so restarted instances do not retry in step.
        let jitter = rand::random_range(0.5..=1.0);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(base.mul_f64(jitter)) => {}
        }
    }
}

/// A progress line every ten seconds while rows flow.
struct Report {
    since: Instant,
    rows: usize,
}

impl Report {
    fn new() -> Self {
        Report {
            since: Instant::now(),
            rows: 0,
        }
    }

    fn add(&mut self, rows: usize) {
        self.rows += rows;
        let elapsed = self.since.elapsed();
        if elapsed >= Duration::from_secs(10) {
            if self.rows > 0 {
                let rate = self.rows as f64 / elapsed.as_secs_f64();
                info!(
                    rows = self.rows,
                    rows_per_sec = rate.round() as u64,
                    "published"
                );
            }
            self.rows = 0;
            self.since = Instant::now();
        }
    }
}
