//! The consumer runtime's counters, readable in code and, when
//! [`super::ConsumerConfig::metrics_address`] is set, served at `/metrics`
//! beside the probes: `/healthz` (the process answers) and `/readyz` (200
//! while the consumer's database answers a query within two seconds, on a
//! session of the probe's own, else 503 with the reason: without it nothing
//! can be applied).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::http::header;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::ConsumerError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

/// What one consumer has done since it started. Cloning is cheap.
#[derive(Clone)]
pub struct ConsumerStats {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    applied: Counter,
    duplicates: Counter,
    handler_errors: Counter,
    dead_lettered: Counter,
    revocations: Counter,
    commit_failures: Counter,
    lag: Family<PartitionLabels, Gauge>,
    partitions: Gauge,
}

impl ConsumerStats {
    pub(crate) fn new(group: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "outbox_consumer",
            [("group".into(), group.to_string().into())].into_iter(),
        );
        let applied = Counter::default();
        let duplicates = Counter::default();
        let handler_errors = Counter::default();
        let dead_lettered = Counter::default();
        let revocations = Counter::default();
        let commit_failures = Counter::default();
        let lag = Family::<PartitionLabels, Gauge>::default();
        let partitions = Gauge::default();
        registry.register(
            "applied",
            "Messages whose handler committed (each message once)",
            applied.clone(),
        );
        registry.register(
            "duplicates_skipped",
            "Deliveries skipped because the inbox already held their id",
            duplicates.clone(),
        );
        registry.register(
            "handler_errors",
            "Handler runs that returned an error (each retry counts)",
            handler_errors.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages moved to consumer_dead_letter",
            dead_lettered.clone(),
        );
        registry.register(
            "revocations",
            "Rebalances that took partitions from this consumer",
            revocations.clone(),
        );
        registry.register(
            "commit_failures",
            "Offset commits the broker refused (as during a rebalance): the messages they covered are delivered again, and the inbox skips them",
            commit_failures.clone(),
        );
        registry.register(
            "lag_messages",
            "Messages in the partition after the last committed offset, per assigned partition (NATS: the subject's pending and unacknowledged messages, RabbitMQ: the queue's ready ones, partition -1)",
            lag.clone(),
        );
        registry.register(
            "partitions_assigned",
            "Partitions this consumer holds (NATS, RabbitMQ: 1 while this member receives for the group)",
            partitions.clone(),
        );
        ConsumerStats {
            inner: Arc::new(Inner {
                registry,
                applied,
                duplicates,
                handler_errors,
                dead_lettered,
                revocations,
                commit_failures,
                lag,
                partitions,
            }),
        }
    }

    /// Messages applied (handler committed).
    pub fn applied(&self) -> u64 {
        self.inner.applied.get()
    }

    /// Deliveries skipped as already applied.
    pub fn duplicates(&self) -> u64 {
        self.inner.duplicates.get()
    }

    /// Handler runs that failed.
    pub fn handler_errors(&self) -> u64 {
        self.inner.handler_errors.get()
    }

    /// Messages dead-lettered.
    pub fn dead_lettered(&self) -> u64 {
        self.inner.dead_lettered.get()
    }

    /// Partitions this consumer holds now.
    pub fn partitions(&self) -> u64 {
        self.inner.partitions.get().max(0) as u64
    }

    /// Rebalances that took partitions from this consumer (counted when
    /// they start).
    pub fn revocations(&self) -> u64 {
        self.inner.revocations.get()
    }

    /// Offset commits the broker refused (Kafka).
    pub fn commit_failures(&self) -> u64 {
        self.inner.commit_failures.get()
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }

    pub(crate) fn settled(&self, applied: u64, duplicates: usize) {
        self.inner.applied.inc_by(applied);
        self.inner.duplicates.inc_by(duplicates as u64);
    }

    pub(crate) fn handler_failed(&self) {
        self.inner.handler_errors.inc();
    }

    pub(crate) fn dead_lettered_one(&self) {
        self.inner.dead_lettered.inc();
    }

    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn commit_failed(&self) {
        self.inner.commit_failures.inc();
    }

    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn revoking(&self) {
        self.inner.revocations.inc();
    }

    pub(crate) fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.inner
            .lag
            .get_or_create(&PartitionLabels {
                topic: topic.to_string(),
                partition,
            })
            .set(lag);
    }

    pub(crate) fn forget_partition(&self, topic: &str, partition: i32) {
        self.inner.lag.remove(&PartitionLabels {
            topic: topic.to_string(),
            partition,
        });
    }

    pub(crate) fn set_partitions(&self, count: usize) {
        self.inner.partitions.set(count as i64);
    }
}

/// Binds the metrics address; one line when it cannot.
pub(crate) async fn bind(address: SocketAddr) -> Result<TcpListener, ConsumerError> {
    TcpListener::bind(address).await.map_err(|e| {
        ConsumerError::Metrics(format!(
            "{address}: cannot listen: {e}; choose a free address"
        ))
    })
}

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `/metrics`, `/healthz` and `/readyz` until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    stats: ConsumerStats,
    pool: PgPool,
    stop: CancellationToken,
) {
    if let Ok(address) = listener.local_addr() {
        info!(address = %address, "consumer metrics listening");
    }
    let probe = Arc::new(Probe {
        options: pool.connect_options(),
        session: Mutex::new(None),
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let stats = stats.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        stats.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(move || ready(probe.clone())));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = served {
        debug!(error = %e, "the consumer metrics endpoint stopped");
    }
}

/// `/readyz`'s session with the consumer's database, apart from the pool:
/// handlers may hold every pooled connection while the database is fine,
/// and a probe that waited for one of them would report an outage.
struct Probe {
    options: Arc<PgConnectOptions>,
    /// Connected when first asked, and again after a failure.
    session: Mutex<Option<PgConnection>>,
}

/// 200 while the database answers, else 503 and why.
async fn ready(probe: Arc<Probe>) -> (StatusCode, String) {
    let mut session = probe.session.lock().await;
    let answer = tokio::time::timeout(READY_TIMEOUT, async {
        let conn = match session.as_mut() {
            Some(conn) => conn,
            None => session.insert(PgConnection::connect_with(&probe.options).await?),
        };
        sqlx::query_scalar::<_, i32>("select 1")
            .fetch_one(conn)
            .await
    })
    .await;
    if !matches!(answer, Ok(Ok(_))) {
        // Broken, or left mid-query by the timeout: the next probe connects anew.
        *session = None;
    }
    match answer {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the consumer's database does not answer: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the consumer's database did not answer within {READY_TIMEOUT:?}\n"),
        ),
    }
}
