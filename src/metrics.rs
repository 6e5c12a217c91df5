//! What an operator scrapes and probes: Prometheus metrics at `/metrics`,
//! liveness at `/healthz`, readiness at `/readyz`, on `--metrics-address`
//! (loopback by default).
//!
//! Counters move only when the relay confirms a batch, so
//! `outbox_relay_published_total` counts rows the broker acknowledged and the
//! outbox forgot. The backlog gauges (rows waiting, the oldest one's age, the
//! slot's lag) are read from Postgres every few seconds by a separate
//! connection, so a relay that is stuck still shows its lag growing.
//! `/readyz` answers 503, with the reason, while the relay is failing to
//! reach Postgres or the broker; a database failure ends with the next working
//! read of the outbox, a broker failure with the next confirmed batch.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::{DatabaseConfig, SlotName};
use crate::database;
use crate::error::Error;

/// What a failure is about, so that a working read of the outbox can clear
/// a database failure while the relay has nothing to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Database,
    /// The sink's broker (Kafka, NATS, RabbitMQ).
    Broker,
}

/// The relay's metrics and health, shared by the loop, the sources and the
/// HTTP endpoints. Cloning is cheap.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
    /// Whether the lane this handle reports for is held (see
    /// [`Metrics::for_lane`]); shared by its clones.
    held: Arc<std::sync::atomic::AtomicBool>,
    /// The lane's own metrics, for a lane of a sharded outbox.
    lane: Option<Arc<LaneHandles>>,
}

struct Inner {
    handles: Handles,
    /// Every lane's metrics, shared by all outboxes of the exposition.
    lanes: LaneFamilies,
    /// The outbox's label, when the exposition has several.
    outbox: Option<String>,
    /// Why the relay is not ready, and which dependency is at fault;
    /// `None` when it is ready.
    unready: Mutex<Option<(Dependency, String)>>,
}

/// The metrics of one outbox.
struct Handles {
    published: Counter,
    dead_lettered: Counter,
    batches: Counter,
    failures: Counter,
    active: Gauge,
    backlog_rows: Gauge,
    retained_rows: Gauge,
    oldest_unpublished_seconds: Gauge<f64, AtomicU64>,
    slot_lag_bytes: Gauge,
    ack_latency: Histogram,
    takeovers: Counter,
    fenced: Counter,
    lease_age_seconds: Gauge<f64, AtomicU64>,
}

/// The same metrics as families, one member per outbox (`outbox="NAME"`).
struct Families {
    published: Family<OutboxLabel, Counter>,
    dead_lettered: Family<OutboxLabel, Counter>,
    batches: Family<OutboxLabel, Counter>,
    failures: Family<OutboxLabel, Counter>,
    active: Family<OutboxLabel, Gauge>,
    backlog_rows: Family<OutboxLabel, Gauge>,
    retained_rows: Family<OutboxLabel, Gauge>,
    oldest_unpublished_seconds: Family<OutboxLabel, Gauge<f64, AtomicU64>>,
    slot_lag_bytes: Family<OutboxLabel, Gauge>,
    ack_latency: Family<OutboxLabel, Histogram, fn() -> Histogram>,
    takeovers: Family<OutboxLabel, Counter>,
    fenced: Family<OutboxLabel, Counter>,
    lease_age_seconds: Family<OutboxLabel, Gauge<f64, AtomicU64>>,
}

type OutboxLabel = Vec<(&'static str, String)>;

/// Per-lane metrics of sharded outboxes, labelled `lane="K/N"` (and
/// `outbox` when there are several).
#[derive(Clone, Default)]
struct LaneFamilies {
    held: Family<OutboxLabel, Gauge>,
    published: Family<OutboxLabel, Counter>,
}

impl LaneFamilies {
    fn register(registry: &mut Registry) -> Self {
        let families = LaneFamilies::default();
        registry.register(
            "lane_held",
            "1 while this instance holds the lane (run --shards), 0 while it stands by for it",
            families.held.clone(),
        );
        registry.register(
            "lane_published",
            "Rows of the lane acknowledged and confirmed by this instance",
            families.published.clone(),
        );
        families
    }
}

struct LaneHandles {
    held: Gauge,
    published: Counter,
}

impl Families {
    fn handles(&self, name: &str) -> Handles {
        let label: OutboxLabel = vec![("outbox", name.to_owned())];
        Handles {
            published: self.published.get_or_create(&label).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&label).clone(),
            batches: self.batches.get_or_create(&label).clone(),
            failures: self.failures.get_or_create(&label).clone(),
            active: self.active.get_or_create(&label).clone(),
            backlog_rows: self.backlog_rows.get_or_create(&label).clone(),
            retained_rows: self.retained_rows.get_or_create(&label).clone(),
            oldest_unpublished_seconds: self
                .oldest_unpublished_seconds
                .get_or_create(&label)
                .clone(),
            slot_lag_bytes: self.slot_lag_bytes.get_or_create(&label).clone(),
            ack_latency: self.ack_latency.get_or_create(&label).clone(),
            takeovers: self.takeovers.get_or_create(&label).clone(),
            fenced: self.fenced.get_or_create(&label).clone(),
            lease_age_seconds: self.lease_age_seconds.get_or_create(&label).clone(),
        }
    }
}

fn new_ack_histogram() -> Histogram {
    Histogram::new(ACK_LATENCY_BUCKETS.iter().copied())
}

/// Registers every metric of `$m` (a [`Handles`] or a [`Families`]).
macro_rules! register_all {
    ($registry:expr, $m:expr) => {{
        let (r, m) = (&mut *$registry, &$m);
        r.register(
            "published",
            "Rows acknowledged by the broker and confirmed",
            m.published.clone(),
        );
        r.register(
            "dead_lettered",
            "Rows moved to the dead-letter table (rejected for good, or parked behind such a row)",
            m.dead_lettered.clone(),
        );
        r.register("batches", "Batches confirmed", m.batches.clone());
        r.register(
            "failures",
            "Failed attempts to read, publish or confirm (each is retried)",
            m.failures.clone(),
        );
        r.register(
            "active",
            "Lanes this instance holds: 1 while it holds the relay lock of an unsharded outbox, 0 while it stands by",
            m.active.clone(),
        );
        r.register(
            "backlog_rows",
            "Rows in the outbox not known to be published",
            m.backlog_rows.clone(),
        );
        r.register(
            "retained_rows",
            "Published rows tail mode keeps with --retention, for replay",
            m.retained_rows.clone(),
        );
        r.register(
            "oldest_unpublished_seconds",
            "Age of the oldest row not known to be published (0 when none)",
            m.oldest_unpublished_seconds.clone(),
        );
        r.register(
            "slot_lag_bytes",
            "WAL bytes the tail-mode slot holds back (-1 without a slot)",
            m.slot_lag_bytes.clone(),
        );
        r.register(
            "takeovers",
            "Times this instance took the lease over from another instance (after a crash, a lost session or a fence)",
            m.takeovers.clone(),
        );
        r.register(
            "fenced",
            "Times this instance ended the sessions of an active instance whose lease had run out (hung, paused or cut off)",
            m.fenced.clone(),
        );
        r.register(
            "lease_age_seconds",
            "Seconds since the active instance (whichever it is) last renewed its lease; above --lease means it is hung and no standby took over (-1: no lease yet)",
            m.lease_age_seconds.clone(),
        );
        r.register(
            "ack_latency_seconds",
            "Seconds from a row's created_at (by default its transaction's start, on the database's clock) to the broker's acknowledgement",
            m.ack_latency.clone(),
        );
    }};
}

/// What `/metrics` and `/readyz` serve: one registry holding the metrics of
/// every outbox the process relays, each outbox's under an `outbox` label
/// when there are several. Cloning is cheap.
#[derive(Clone)]
pub struct Exposition {
    registry: Arc<Registry>,
    /// Each outbox's metrics, with its label when the process runs several.
    outboxes: Arc<Vec<(Option<String>, Metrics)>>,
}

impl Exposition {
    /// One outbox, unlabelled: the metrics as a single-outbox relay has
    /// always shown them.
    pub fn single() -> (Exposition, Metrics) {
        let mut registry = Registry::with_prefix("outbox_relay");
        let metrics = Metrics::register(&mut registry);
        let exposition = Exposition {
            registry: Arc::new(registry),
            outboxes: Arc::new(vec![(None, metrics.clone())]),
        };
        (exposition, metrics)
    }

    /// Several outboxes, each under the label `outbox="NAME"`.
    pub fn labelled(names: &[String]) -> (Exposition, Vec<Metrics>) {
        let mut registry = Registry::with_prefix("outbox_relay");
        let families = Families {
            published: Family::default(),
            dead_lettered: Family::default(),
            batches: Family::default(),
            failures: Family::default(),
            active: Family::default(),
            backlog_rows: Family::default(),
            retained_rows: Family::default(),
            oldest_unpublished_seconds: Family::default(),
            slot_lag_bytes: Family::default(),
            ack_latency: Family::new_with_constructor(new_ack_histogram),
            takeovers: Family::default(),
            fenced: Family::default(),
            lease_age_seconds: Family::default(),
        };
        register_all!(&mut registry, families);
        let lanes = LaneFamilies::register(&mut registry);
        let metrics: Vec<Metrics> = names
            .iter()
            .map(|name| {
                Metrics::from_handles(families.handles(name), lanes.clone(), Some(name.clone()))
            })
            .collect();
        let exposition = Exposition {
            registry: Arc::new(registry),
            outboxes: Arc::new(
                names
                    .iter()
                    .cloned()
                    .map(Some)
                    .zip(metrics.iter().cloned())
                    .collect(),
            ),
        };
        (exposition, metrics)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Why the process is not ready: every failing outbox, one line each,
    /// named when there are several. `None` when all are ready.
    pub fn unready(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .outboxes
            .iter()
            .filter_map(|(name, metrics)| {
                let reason = metrics.unready()?;
                Some(match name {
                    Some(name) => format!("outbox {name}: {reason}"),
                    None => reason,
                })
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics of their own, in a registry nothing serves (tests, tools).
    pub fn new() -> Self {
        Exposition::single().1
    }

    /// One outbox's metrics, registered in `registry`.
    /// One outbox's metrics, registered in `registry` without labels.
    fn register(registry: &mut Registry) -> Self {
        let lanes = LaneFamilies::register(registry);
        let handles = Handles {
            published: Counter::default(),
            dead_lettered: Counter::default(),
            batches: Counter::default(),
            failures: Counter::default(),
            active: Gauge::default(),
            backlog_rows: Gauge::default(),
            retained_rows: Gauge::default(),
            oldest_unpublished_seconds: Gauge::default(),
            slot_lag_bytes: Gauge::default(),
            ack_latency: new_ack_histogram(),
            takeovers: Counter::default(),
            fenced: Counter::default(),
            lease_age_seconds: Gauge::default(),
        };
        register_all!(registry, handles);
        Metrics::from_handles(handles, lanes, None)
    }

    fn from_handles(handles: Handles, lanes: LaneFamilies, outbox: Option<String>) -> Self {
        Metrics {
            inner: Arc::new(Inner {
                handles,
                lanes,
                outbox,
                unready: Mutex::new(None),
            }),
            held: Arc::default(),
            lane: None,
        }
    }

    /// A batch was confirmed.
    pub fn confirmed(&self, published: usize, dead_lettered: usize) {
        if let Some(lane) = &self.lane {
            lane.published.inc_by(published as u64);
        }
        self.inner.handles.batches.inc();
        self.inner.handles.published.inc_by(published as u64);
        self.inner
            .handles
            .dead_lettered
            .inc_by(dead_lettered as u64);
    }

    /// The broker acknowledged a row `seconds` after its `created_at`.
    pub fn acked(&self, seconds: f64) {
        self.inner.handles.ack_latency.observe(seconds.max(0.0));
    }

    /// The same metrics, for `lane`: its `set_active` counts in
    /// `outbox_relay_active` independently of the other lanes', and it has
    /// `outbox_relay_lane_held` and `outbox_relay_lane_published_total` of
    /// its own.
    pub fn for_lane(&self, lane: impl std::fmt::Display) -> Metrics {
        let mut label: OutboxLabel = Vec::new();
        if let Some(outbox) = &self.inner.outbox {
            label.push(("outbox", outbox.clone()));
        }
        label.push(("lane", lane.to_string()));
        let lanes = &self.inner.lanes;
        Metrics {
            inner: self.inner.clone(),
            held: Arc::default(),
            lane: Some(Arc::new(LaneHandles {
                held: lanes.held.get_or_create(&label).clone(),
                published: lanes.published.get_or_create(&label).clone(),
            })),
        }
    }

    /// Whether this handle's lane is held by this instance.
    pub fn set_active(&self, active: bool) {
        if let Some(lane) = &self.lane {
            lane.held.set(i64::from(active));
        }
        if self.held.swap(active, std::sync::atomic::Ordering::Relaxed) != active {
            if active {
                self.inner.handles.active.inc();
            } else {
                self.inner.handles.active.dec();
            }
        }
    }

    /// This instance took the lease over from another one.
    pub fn took_over(&self) {
        self.inner.handles.takeovers.inc();
    }

    /// This instance fenced an active instance whose lease ran out.
    pub fn fenced(&self) {
        self.inner.handles.fenced.inc();
    }

    /// The relay is failing on `dependency`, for `reason`.
    pub fn failing(&self, dependency: Dependency, reason: String) {
        self.inner.handles.failures.inc();
        if let Ok(mut unready) = self.inner.unready.lock() {
            *unready = Some((dependency, reason));
        }
    }

    /// The relay works again end to end.
    pub fn recovered(&self) {
        if let Ok(mut unready) = self.inner.unready.lock() {
            *unready = None;
        }
    }

    /// The source just read the outbox: a database failure is over, even if
    /// there is nothing to publish yet.
    pub fn database_ok(&self) {
        if let Ok(mut unready) = self.inner.unready.lock()
            && matches!(*unready, Some((Dependency::Database, _)))
        {
            *unready = None;
        }
    }

    fn set_backlog(&self, status: &database::Status) {
        self.inner.handles.backlog_rows.set(status.unpublished);
        self.inner.handles.retained_rows.set(status.retained);
        self.inner
            .handles
            .oldest_unpublished_seconds
            .set(status.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
        let lag = status.slot.as_ref().and_then(|s| s.lag_bytes).unwrap_or(-1);
        self.inner.handles.slot_lag_bytes.set(lag);
        let lease_age = status
            .leader
            .as_ref()
            .map_or(-1.0, |l| l.lease_age.as_secs_f64());
        self.inner.handles.lease_age_seconds.set(lease_age);
    }

    pub(crate) fn unready(&self) -> Option<String> {
        self.inner
            .unready
            .lock()
            .ok()
            .and_then(|u| u.as_ref().map(|(_, reason)| reason.clone()))
    }
}

/// Bucket bounds of `ack_latency_seconds`: fine below 100 ms, where a
/// healthy relay is, coarse up to the minutes of an outage.
const ACK_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

/// Binds the metrics address; a failure is one line naming the flag.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|e| {
        Error::Config(format!(
            "--metrics-address (OUTBOX_METRICS_ADDRESS) {address}: cannot listen: {e}; choose a free address, or `off`"
        ))
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(listener: TcpListener, exposition: Exposition, shutdown: CancellationToken) {
    if let Ok(address) = listener.local_addr() {
        info!(address = %address, "metrics and health endpoints listening");
    }
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(exposition);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        debug!(error = %e, "the metrics endpoint stopped");
    }
}

async fn render(State(exposition): State<Exposition>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        exposition.render(),
    )
}

async fn ready(State(exposition): State<Exposition>) -> (StatusCode, String) {
    match exposition.unready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

/// Reads the backlog gauges from Postgres every `every` until `shutdown`;
/// a failed read leaves the last values.
pub async fn sample_backlog(
    metrics: Metrics,
    database: DatabaseConfig,
    slot: SlotName,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let started = std::time::Instant::now();
        match database::status(&database, &slot).await {
            Ok(status) => metrics.set_backlog(&status),
            Err(e) => debug!(error = %e, "could not read the backlog for the metrics"),
        }
        // Counting reads the whole outbox, which with --retention holds the
        // retained rows too: the samples take at most a twentieth of the
        // time, so that watching never competes with publishing.
        let pause = every.max(started.elapsed() * 20);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_outboxes_render_under_their_labels() {
        let (exposition, metrics) =
            Exposition::labelled(&["h:5432/shop/public".into(), "h:5432/shop/b".into()]);
        metrics[0].confirmed(4, 0);
        metrics[1].confirmed(2, 0);
        metrics[1].failing(Dependency::Database, "down".into());
        let text = exposition.render();
        assert!(
            text.contains("outbox_relay_published_total{outbox=\"h:5432/shop/public\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_published_total{outbox=\"h:5432/shop/b\"} 2\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE outbox_relay_published counter")
                .count(),
            1,
            "{text}"
        );
        assert_eq!(
            exposition.unready().as_deref(),
            Some("outbox h:5432/shop/b: down")
        );
    }

    #[test]
    fn counters_render_in_the_text_format() {
        let (exposition, m) = Exposition::single();
        m.confirmed(7, 1);
        m.confirmed(3, 0);
        m.set_active(true);
        m.failing(Dependency::Database, "down".into());
        assert_eq!(m.unready().as_deref(), Some("down"));
        m.database_ok();
        assert_eq!(m.unready(), None);
        m.failing(Dependency::Broker, "down".into());
        m.database_ok();
        assert_eq!(
            m.unready().as_deref(),
            Some("down"),
            "a read does not clear the broker"
        );
        let text = exposition.render();
        assert!(text.contains("outbox_relay_published_total 10\n"), "{text}");
        assert!(
            text.contains("outbox_relay_dead_lettered_total 1\n"),
            "{text}"
        );
        assert!(text.contains("outbox_relay_batches_total 2\n"), "{text}");
        assert!(text.contains("outbox_relay_active 1\n"), "{text}");
        assert!(text.contains("outbox_relay_failures_total 2\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
