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
//!
//! The loop is also what keeps this instance the active one: it renews the
//! lease (see [`crate::ownership`]) with every confirm, after every idle
//! wait, and while it waits for acks or backs off, but only while each wait
//! is within its own bound (the sink's delivery timeout, the backoff). A
//! loop that stops making progress stops renewing, and a standby takes over.

use std::collections::HashSet;
use std::pin::pin;
use std::time::Duration;

// tokio's clock, so that the loop's unit tests can pause it.
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Lane, Mode, PoisonPolicy, RelayConfig, Shards, SinkConfig};
use crate::database::{self, timed};
use crate::error::Error;
use crate::message;
use crate::metrics::{self, Dependency, Exposition, Metrics};
use crate::outbox::OutboxRow;
use crate::ownership::{Candidate, Instance, Share, track_members};
use crate::sink::{Outcome, Sent, Sink};
use crate::source::{Aggregate, Confirm, PollSource, Source, TailSource};

mod replay;
pub use replay::replay;

/// What a relay did before it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// Rows acknowledged by the broker and confirmed.
    pub published: u64,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: u64,
    /// Time spent on batches that published rows, from reading them to
    /// confirming them: `published / busy` is the relay's own rate, apart
    /// from the time it waited for rows to be written.
    pub busy: Duration,
    /// How long after its `created_at` each row was acknowledged.
    pub ack_latency: LatencyHistogram,
}

impl std::ops::AddAssign for RunStats {
    fn add_assign(&mut self, other: RunStats) {
        self.published += other.published;
        self.dead_lettered += other.dead_lettered;
        self.busy += other.busy;
        for (mine, theirs) in self
            .ack_latency
            .counts
            .iter_mut()
            .zip(other.ack_latency.counts)
        {
            *mine += theirs;
        }
    }
}

/// Latencies in buckets that grow by a fifth from 0.5 ms (the last one
/// takes everything longer): quantiles within a fifth, in fixed memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u64; LATENCY_BUCKETS],
}

const LATENCY_BUCKETS: usize = 64;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: [0; LATENCY_BUCKETS],
        }
    }
}

impl LatencyHistogram {
    fn bound(bucket: usize) -> f64 {
        0.0005 * 1.2f64.powi(bucket as i32)
    }

    pub fn record(&mut self, seconds: f64) {
        let bucket = (0..LATENCY_BUCKETS - 1)
            .find(|&b| seconds <= Self::bound(b))
            .unwrap_or(LATENCY_BUCKETS - 1);
        self.counts[bucket] += 1;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), in
    /// seconds; none when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::bound(bucket));
            }
        }
        Some(Self::bound(LATENCY_BUCKETS - 1))
    }
}

/// Runs the relay until `shutdown` fires, then stops reading, waits (up to
/// the configured shutdown timeout) for in-flight acks, confirms them, and
/// returns. Errors a retry cannot fix (bad credentials, missing tables) end
/// it early; transient ones are retried with backoff.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<RunStats, Error> {
    let (exposition, metrics) = Exposition::single();
    let candidate = Candidate {
        instance: Instance::generate(),
        lease: config.lease,
    };
    run_outbox(config, candidate, metrics, Some(exposition), &shutdown).await
}

/// Runs several outboxes in one process (`run --config`), each as [`run`]
/// runs one, with its own leases, lanes, slot and producers, until
/// `shutdown`. One endpoint serves them all, each outbox's metrics under the
/// label `outbox="HOST:PORT/DATABASE/SCHEMA"`. An outbox that fails, even
/// with an error no retry can fix (a database that refuses the login, tables
/// missing), is reported and tried again with backoff while the others go
/// on.
pub async fn run_all(
    configs: Vec<RelayConfig>,
    shutdown: CancellationToken,
) -> Result<RunStats, Error> {
    let names: Vec<String> = configs
        .iter()
        .map(|c| format!("{}/{}", c.database.target(), c.database.schema()))
        .collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(Error::Config(format!(
                "outbox {name} is listed twice; list each database and schema once"
            )));
        }
    }
    let (exposition, metrics) = Exposition::labelled(&names);
    let endpoints = shutdown.child_token();
    let _stop_endpoints = endpoints.clone().drop_guard();
    if let Some(address) = configs.first().and_then(|c| c.metrics_address) {
        let listener = metrics::bind(address).await?;
        tokio::spawn(metrics::serve(listener, exposition, endpoints.clone()));
    }
    let instance = Instance::generate();
    let mut outboxes = tokio::task::JoinSet::new();
    for ((config, metrics), name) in configs.into_iter().zip(metrics).zip(&names) {
        let candidate = Candidate {
            instance: instance.clone(),
            lease: config.lease,
        };
        let span = tracing::info_span!("outbox", outbox = %name);
        outboxes.spawn(tracing::Instrument::instrument(
            supervise(config, candidate, metrics, shutdown.clone()),
            span,
        ));
    }
    let mut total = RunStats::default();
    while let Some(joined) = outboxes.join_next().await {
        total += joined.map_err(|e| Error::Setup(format!("an outbox's loop panicked: {e}")))?;
    }
    Ok(total)
}

/// Runs one outbox of several until `shutdown`, starting it again after any
/// failure, with backoff (1 s doubling to 30 s). A failure is logged when it
/// first happens or changes, not on every retry.
async fn supervise(
    config: RelayConfig,
    candidate: Candidate,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> RunStats {
    let mut delay = Duration::from_secs(1);
    let mut last: Option<String> = None;
    loop {
        let ran = run_outbox(
            config.clone(),
            candidate.clone(),
            metrics.clone(),
            None,
            &shutdown,
        )
        .await;
        match ran {
            Ok(stats) => return stats,
            Err(_) if shutdown.is_cancelled() => return RunStats::default(),
            Err(e) => {
                let text = e.to_string();
                if last.as_deref() != Some(text.as_str()) {
                    warn!("{text}; this outbox is tried again with backoff, the others go on");
                } else {
                    debug!(error = %text, "this outbox still fails");
                }
                metrics.failing(Dependency::Database, text.clone());
                last = Some(text);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return RunStats::default(),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// One outbox: the start-up checks, then the loop (one per lane when
/// sharded). Serves the endpoints from `exposition` when given (a process
/// with one outbox); samples the backlog gauges whenever metrics are on.
async fn run_outbox(
    mut config: RelayConfig,
    candidate: Candidate,
    metrics: Metrics,
    exposition: Option<Exposition>,
    shutdown: &CancellationToken,
) -> Result<RunStats, Error> {
    config.database = config
        .database
        .with_application_name(&candidate.instance.application_name());
    if !check_database(&config, &metrics, shutdown).await? {
        return Ok(RunStats::default());
    }
    // The endpoints and the backlog sampler live exactly as long as the loop.
    let endpoints = shutdown.child_token();
    let _stop_endpoints = endpoints.clone().drop_guard();
    if let Some(address) = config.metrics_address {
        if let Some(exposition) = exposition {
            let listener = metrics::bind(address).await?;
            tokio::spawn(metrics::serve(listener, exposition, endpoints.clone()));
        }
        tokio::spawn(metrics::sample_backlog(
            metrics.clone(),
            config.database.clone(),
            config.tail.slot.clone(),
            BACKLOG_SAMPLE_INTERVAL,
            endpoints.clone(),
        ));
    }
    info!(mode = %config.mode, database = %config.database.target(), sink = %config.sink.kind(), brokers = %config.sink.endpoint(), instance = candidate.instance.id(), "relay starting");
    let sink = config.sink.clone();
    match &sink {
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(kafka) => {
            let make = || crate::sink::KafkaSink::new(kafka);
            run_loops(config, candidate, metrics, shutdown, make).await
        }
        #[cfg(feature = "nats")]
        SinkConfig::Nats(nats) => {
            let make = || crate::sink::NatsSink::new(nats);
            run_loops(config, candidate, metrics, shutdown, make).await
        }
        #[cfg(feature = "rabbitmq")]
        SinkConfig::RabbitMq(rabbitmq) => {
            let make = || crate::sink::RabbitMqSink::new(rabbitmq);
            run_loops(config, candidate, metrics, shutdown, make).await
        }
        #[allow(unreachable_patterns)]
        other => Err(crate::sink::not_built(other.kind())),
    }
}

/// The outbox's loop, or one per lane when sharded, each publishing
/// through a sink of its own made by `make`.
async fn run_loops<K: Sink + 'static>(
    config: RelayConfig,
    candidate: Candidate,
    metrics: Metrics,
    shutdown: &CancellationToken,
    make: impl Fn() -> Result<K, Error>,
) -> Result<RunStats, Error> {
    if config.shards == Shards::ONE {
        lane_loop(
            &config,
            Lane::WHOLE,
            Share::whole(),
            candidate,
            metrics,
            make()?,
        )?
        .run(shutdown.clone())
        .await
    } else {
        run_lanes(config, candidate, metrics, shutdown.clone(), make).await
    }
}

/// The relay loop of one lane (or of the whole outbox), over the source of
/// the configured mode.
fn lane_loop<K: Sink>(
    config: &RelayConfig,
    lane: Lane,
    share: Share,
    candidate: Candidate,
    metrics: Metrics,
    sink: K,
) -> Result<LaneLoop<K>, Error> {
    Ok(match config.mode {
        Mode::Poll => {
            let source = PollSource::new(
                config.database.clone(),
                lane,
                share,
                candidate,
                config.poll_interval.get(),
                metrics.clone(),
            );
            LaneLoop::Poll(Relay::new(config.clone(), source, sink, metrics))
        }
        Mode::Tail => {
            let source = TailSource::new(
                config.database.clone(),
                config.tail.for_lane(lane)?,
                share,
                candidate,
                metrics.clone(),
            );
            LaneLoop::Tail(Relay::new(config.clone(), source, sink, metrics))
        }
    })
}

/// A relay loop over either source.
enum LaneLoop<K> {
    Poll(Relay<PollSource, K>),
    Tail(Relay<TailSource, K>),
}

impl<K: Sink> LaneLoop<K> {
    async fn run(self, shutdown: CancellationToken) -> Result<RunStats, Error> {
        match self {
            LaneLoop::Poll(relay) => relay.run(shutdown).await,
            LaneLoop::Tail(relay) => relay.run(shutdown).await,
        }
    }
}

/// Runs one loop per lane of a sharded outbox, each with its own source
/// (connection, lease) and producer, so every lane has a batch in flight of
/// its own. A lane held by another instance waits as a standby. An error no
/// retry can fix in one lane stops them all.
async fn run_lanes<K: Sink + 'static>(
    config: RelayConfig,
    candidate: Candidate,
    metrics: Metrics,
    shutdown: CancellationToken,
    make: impl Fn() -> Result<K, Error>,
) -> Result<RunStats, Error> {
    let lanes_stop = shutdown.child_token();
    // However this returns, the membership ends with it.
    let _leave = lanes_stop.clone().drop_guard();
    let share = Share::of(usize::from(config.shards.get()));
    tokio::spawn(tracing::Instrument::in_current_span(track_members(
        config.database.clone(),
        share.clone(),
        lanes_stop.clone(),
    )));
    let mut loops = tokio::task::JoinSet::new();
    for lane in config.shards.lanes() {
        let sink = make()?;
        let relay = lane_loop(
            &config,
            lane,
            share.clone(),
            candidate.clone(),
            metrics.for_lane(lane),
            sink,
        )?;
        let span = tracing::info_span!("lane", lane = %lane);
        loops.spawn(tracing::Instrument::instrument(
            relay.run(lanes_stop.clone()),
            span,
        ));
    }
    let mut total = RunStats::default();
    let mut failed = None;
    while let Some(joined) = loops.join_next().await {
        match joined {
            Ok(Ok(stats)) => total += stats,
            Ok(Err(e)) => {
                lanes_stop.cancel();
                failed.get_or_insert(e);
            }
            Err(panicked) => {
                lanes_stop.cancel();
                failed.get_or_insert(Error::Setup(format!("a lane's loop panicked: {panicked}")));
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(total),
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
                health.failed(
                    Dependency::Database,
                    "checking the database",
                    &e.to_string(),
                );
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
        match config.mode {
            Mode::Tail => {
                crate::source::tail::check_prerequisites(conn, &config.database, &config.tail)
                    .await?
            }
            Mode::Poll => refuse_retained_rows(conn, config).await?,
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

/// Whether the outbox holds a row tail mode kept with `--retention`
/// (known to be published, see [`crate::source::published!`]).
const HOLDS_RETAINED_ROWS: &str = concat!(
    "select exists (select 1 from outbox where ",
    crate::source::published!("outbox"),
    ")"
);

/// Poll mode takes every row in the outbox for unpublished: it refuses an
/// outbox that holds published rows kept by tail mode's retention.
async fn refuse_retained_rows(
    conn: &mut sqlx::PgConnection,
    config: &RelayConfig,
) -> Result<(), Error> {
    let retained: bool = sqlx::query_scalar(HOLDS_RETAINED_ROWS)
        .fetch_one(conn)
        .await
        .map_err(Error::db("checking the outbox for retained rows"))?;
    if retained {
        return Err(Error::Setup(format!(
            "the outbox in schema \"{}\" at {} holds published rows that tail mode kept with --retention; poll mode would publish them again: run --mode tail, or first remove them (run tail mode with --retention 1s until they are gone)",
            config.database.schema(),
            config.database.target()
        )));
    }
    Ok(())
}

/// How often the backlog gauges are read from Postgres.
const BACKLOG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

struct Relay<S, K> {
    config: RelayConfig,
    source: S,
    sink: K,
    stats: RunStats,
    metrics: Metrics,
}

impl<S: Source, K: Sink> Relay<S, K> {
    fn new(config: RelayConfig, source: S, sink: K, metrics: Metrics) -> Self {
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
            Dependency::Broker,
            format!("waiting for {} to answer", self.sink.name()),
        );
        if !self.sink.wait_until_reachable(&shutdown).await {
            return Ok(self.stats);
        }
        self.metrics.recovered();
        let mut health = Health::new(self.metrics.clone());
        let mut report = Report::new();
        let idle = self.config.lease.renew_every();
        while !shutdown.is_cancelled() {
            park_while_asked().await;
            let reading = Instant::now();
            let rows = match self
                .source
                .next_batch(self.config.batch_size.get(), idle, &shutdown)
                .await
            {
                Ok(rows) if rows.is_empty() => {
                    // Nothing came: an idle leader renews its lease.
                    if !shutdown.is_cancelled()
                        && let Err(e) = self.source.renew().await
                    {
                        self.setback(&mut health, "renewing the lease", e, &shutdown)
                            .await?;
                    }
                    continue;
                }
                Ok(rows) => rows,
                Err(e) => {
                    self.setback(&mut health, "reading the outbox", e, &shutdown)
                        .await?;
                    continue;
                }
            };
            let blocked = match self.config.on_poison {
                PoisonPolicy::BlockAggregate => match self.source.blocked_aggregates(&rows).await {
                    Ok(blocked) => blocked,
                    Err(e) => {
                        self.setback(&mut health, "reading the outbox", e, &shutdown)
                            .await?;
                        continue;
                    }
                },
                _ => HashSet::new(),
            };
            let publishing = Instant::now();
            #[cfg(feature = "trace-context")]
            let mut span = crate::trace_context::BatchSpan::start(
                self.config.database.schema().as_str(),
                &rows,
            );
            let Published {
                confirm,
                failure,
                halt,
                lease,
            } = self.publish(&rows, blocked, &shutdown).await;
            if let Some(e) = lease {
                self.setback(&mut health, "renewing the lease", e, &shutdown)
                    .await?;
                continue;
            }
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
                    #[cfg(feature = "trace-context")]
                    span.confirmed(confirm.published.len(), confirm.dead_letters.len());
                    self.stats.published += confirm.published.len() as u64;
                    self.stats.dead_lettered += confirm.dead_letters.len() as u64;
                    if !confirm.published.is_empty() {
                        self.stats.busy += reading.elapsed();
                    }
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
                Err(e) => {
                    self.setback(&mut health, "confirming published rows", e, &shutdown)
                        .await?;
                    continue;
                }
            }
            match failure {
                None => health.ok(),
                Some(cause) => {
                    #[cfg(feature = "trace-context")]
                    span.failed(&cause);
                    let doing = format!("publishing to {}", self.sink.name());
                    health.failed(Dependency::Broker, &doing, &cause);
                    if self.sink.is_broken() {
                        self.sink.replace()?;
                    }
                    self.back_off(&health, &shutdown).await;
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

    /// Handles an error from the source: a lost lease steps down (the next
    /// batch waits as a standby), a transient failure is reported and waited
    /// out with backoff, anything else ends the relay.
    async fn setback(
        &mut self,
        health: &mut Health,
        doing: &'static str,
        error: Error,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        match error {
            Error::LeaseLost { .. } => {
                self.step_down(&error);
                Ok(())
            }
            e if e.is_transient() => {
                health.failed(Dependency::Database, doing, &e.to_string());
                self.back_off(health, shutdown).await;
                Ok(())
            }
            e => Err(e),
        }
    }

    fn step_down(&self, lost: &Error) {
        warn!("{lost}");
        self.metrics.set_active(false);
    }

    /// Waits out the backoff, renewing the lease meanwhile: backing off from
    /// a failing broker is the loop at work, not a hang, and a standby could
    /// do no better.
    async fn back_off(&mut self, health: &Health, shutdown: &CancellationToken) {
        let until = Instant::now() + health.delay();
        let every = self.config.lease.renew_every();
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep((until - now).min(every)) => {}
            }
            if Instant::now() < until
                && let Err(e) = self.source.renew().await
            {
                // The next step meets a database failure again and reports
                // it; a lost lease is said now.
                if matches!(e, Error::LeaseLost { .. }) {
                    self.step_down(&e);
                }
                return;
            }
        }
    }

    /// Publishes `rows` in order and returns the prefix to confirm, the
    /// first transient failure if there was one, and, under `--on-poison
    /// halt`, the error that stops the relay. Rows of a `blocked` aggregate
    /// (and, under `block-aggregate`, of one whose row was just rejected)
    /// are not sent but parked in the dead-letter table, in order.
    ///
    /// While it waits for acks it renews the lease, for as long as the sink
    /// itself may keep a record waiting ([`Sink::delivery_timeout`]): a
    /// broker outage makes the records fail within that bound, so a longer
    /// wait means a stuck loop.
    async fn publish(
        &mut self,
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
            let mut message =
                message::from_row(row, &self.config.topic_template, self.config.null_payload);
            message::apply_format(
                &mut message,
                row,
                &self.config.format,
                self.config.sink.kind(),
            );
            let sent = self.sink.send(&message).await;
            if block && sent.refused() {
                blocked.insert((row.aggregate_type.clone(), row.aggregate_id.clone()));
            }
            let not_sent = matches!(sent, Sent::NotSent(_));
            pending.push(Some(sent));
            // Nothing after it may overtake it: the rest of the batch is
            // left unsent, unconfirmed, and read again.
            if not_sent {
                break;
            }
        }
        // After shutdown fires, in-flight acks get `shutdown_timeout` more.
        let timeout = self.config.shutdown_timeout;
        let mut deadline = pin!(async {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
        });
        let renew_every = self.config.lease.renew_every();
        // `None`: the sink never gives up on a record (a timeout of 0).
        let renew_until = Instant::now().checked_add(self.sink.delivery_timeout() + renew_every);
        // One timer for the whole batch, polled only while an ack is not in.
        let mut renewal = pin!(tokio::time::sleep_until(Instant::now() + renew_every));
        let mut out = Published::default();
        for (row, pending) in rows.iter().zip(pending) {
            let Some(pending) = pending else {
                if out.failure.is_none() && out.halt.is_none() {
                    out.confirm.dead_letters.push((row.seq, parked(row)));
                }
                continue;
            };
            let mut delivery = pin!(pending.outcome());
            let outcome = loop {
                tokio::select! {
                    biased;
                    outcome = &mut delivery => break Some(outcome),
                    _ = &mut deadline => {
                        out.failure.get_or_insert_with(|| "in-flight records were not acknowledged within the shutdown timeout".into());
                        break None;
                    }
                    _ = &mut renewal, if renew_until.is_none_or(|until| Instant::now() < until) => {
                        renewal.as_mut().reset(Instant::now() + renew_every);
                        if let Err(e) = self.source.renew().await {
                            out.lease = Some(e);
                            break None;
                        }
                    }
                }
            };
            let Some(outcome) = outcome else {
                break;
            };
            if out.failure.is_some() || out.halt.is_some() {
                continue;
            }
            match outcome {
                Outcome::Acked => {
                    let age = (chrono::Utc::now() - row.created_at).as_seconds_f64();
                    self.metrics.acked(age);
                    self.stats.ack_latency.record(age.max(0.0));
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
    /// Renewing the lease failed while waiting for acks; nothing of this
    /// batch is confirmed.
    lease: Option<Error>,
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
    failing: Option<String>,
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

    /// `dependency` is failing while the relay is `doing` something.
    fn failed(&mut self, dependency: Dependency, doing: &str, cause: &str) {
        self.metrics
            .failing(dependency, format!("failing {doing}: {cause}"));
        if self.failing.as_deref() != Some(doing) {
            warn!(
                cause,
                "failed {doing}: {cause}; retrying with backoff, nothing is lost"
            );
        } else {
            debug!(cause, attempts = self.attempts, "still failing {doing}");
        }
        self.failing = Some(doing.to_owned());
        self.attempts += 1;
    }

    fn ok(&mut self) {
        if let Some(doing) = self.failing.take() {
            self.metrics.recovered();
            info!(attempts = self.attempts, "recovered: {doing} works again");
        }
        self.attempts = 0;
    }

    /// The next pause: capped exponential backoff with jitter in [50%,
    /// 100%], so restarted instances do not retry in step.
    fn delay(&self) -> Duration {
        let exp = self.attempts.saturating_sub(1).min(10);
        let base = Duration::from_millis(200) * 2u32.pow(exp);
        let base = base.min(Self::MAX_DELAY);
        base.mul_f64(rand::random_range(0.5..=1.0))
    }

    async fn wait(&self, shutdown: &CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(self.delay()) => {}
        }
    }
}

/// A test hook, compiled into debug builds only: while the file named by
/// `OUTBOX_TEST_PARK_FILE` exists, the loop stays parked between batches, as
/// a deadlocked loop would, while the process, its connections and its
/// endpoints stay up.
#[cfg(debug_assertions)]
async fn park_while_asked() {
    let Some(path) = std::env::var_os("OUTBOX_TEST_PARK_FILE") else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    if !path.exists() {
        return;
    }
    warn!("relay loop parked (OUTBOX_TEST_PARK_FILE exists)");
    while path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!("relay loop released (OUTBOX_TEST_PARK_FILE removed)");
}

#[cfg(not(debug_assertions))]
async fn park_while_asked() {}

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

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod tests;
