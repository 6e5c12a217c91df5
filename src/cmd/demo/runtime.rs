//! The demo's consumer on Kafka: the crate's consumer runtime with a
//! handler that applies the demo's effects, while a copier delivers a third
//! of the records again (as a relay restarting around its acks would), so
//! the inbox has duplicates to absorb.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outbox_relay::consumer::{self, ConsumerConfig, HandlerError, KafkaSettings, Message};
use outbox_relay::error::Error;
use rand::Rng;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Seen;

/// The header that marks a copy, so that the copier never copies it again.
const COPY: &str = "demo_copy";

/// The demo's effects: one row per aggregate with its last version and how
/// many events were applied; a version that is not the last plus one is an
/// order violation, recorded in the same transaction.
struct DemoEffects;

impl consumer::Handler for DemoEffects {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
    ) -> Result<(), HandlerError> {
        let payload: serde_json::Value = message.json()?;
        let account = payload["account"].as_str().unwrap_or_default();
        let version = payload["version"].as_i64().unwrap_or_default();
        let last: Option<i64> =
            sqlx::query_scalar("select version from demo_effect where aggregate = $1 for update")
                .bind(account)
                .fetch_optional(&mut **tx)
                .await?;
        // Versions of one aggregate are contiguous (rollbacks undo their
        // bump), so in commit order each new one is the last plus one.
        if version != last.unwrap_or(0) + 1 {
            sqlx::query("insert into demo_order_violation (aggregate, version) values ($1, $2)")
                .bind(account)
                .bind(version)
                .execute(&mut **tx)
                .await?;
        }
        sqlx::query(
            "insert into demo_effect (aggregate, version, events) values ($1, $2, 1) \
             on conflict (aggregate) do update set version = greatest(demo_effect.version, excluded.version), \
             events = demo_effect.events + 1",
        )
        .bind(account)
        .bind(version)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Consumes `topic` through the runtime until `target` messages were
/// applied, or nothing new was applied for a minute.
pub async fn consume(
    pool: PgPool,
    group: String,
    brokers: String,
    topic: String,
    target: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> Result<Seen, Error> {
    sqlx::query(
        "create table demo_order_violation (aggregate text not null, version bigint not null)",
    )
    .execute(&pool)
    .await
    .map_err(Error::db_error("creating the demo tables"))?;
    let stop = shutdown.child_token();
    let copies = Arc::new(Copies::default());
    let copier = tokio::spawn(copy_a_third(
        brokers.clone(),
        topic.clone(),
        format!("{group}-copier"),
        copies.clone(),
        stop.clone(),
    ));
    let mut config = ConsumerConfig::new(&group, [&topic]);
    config.max_in_flight = 4;
    let runtime = consumer::KafkaConsumer::new(
        pool.clone(),
        config,
        KafkaSettings::new(&brokers),
        DemoEffects,
    )
    .map_err(|e| Error::Embedded(e.to_string()))?;
    let stats = runtime.stats();
    let watched = stats.clone();
    let done = stop.clone();
    let until = async move {
        let stall = Duration::from_secs(60);
        let mut progress = (0, Instant::now());
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            // Done when every row is applied and every copy made of them
            // has come back and been skipped.
            let applied = watched.applied();
            let target = target.load(Ordering::SeqCst);
            if applied >= target
                && copies.read.load(Ordering::SeqCst) >= target
                && watched.duplicates() >= copies.sent.load(Ordering::SeqCst)
            {
                return;
            }
            if applied != progress.0 {
                progress = (applied, Instant::now());
            } else if progress.1.elapsed() >= stall {
                return;
            }
        }
    };
    let ran = runtime.run(until).await;
    stop.cancel();
    let _ = copier.await;
    ran.map_err(|e| Error::Embedded(format!("the demo consumer: {e}")))?;

    let doing = "reading what the demo consumer applied";
    let ids: HashSet<Uuid> =
        sqlx::query_scalar::<_, Uuid>("select message_id from inbox where consumer_group = $1")
            .bind(&group)
            .fetch_all(&pool)
            .await
            .map_err(Error::db_error(doing))?
            .into_iter()
            .collect();
    let violations: i64 = sqlx::query_scalar("select count(*) from demo_order_violation")
        .fetch_one(&pool)
        .await
        .map_err(Error::db_error(doing))?;
    let aggregates: Vec<(String, i64)> =
        sqlx::query_as("select aggregate, version from demo_effect")
            .fetch_all(&pool)
            .await
            .map_err(Error::db_error(doing))?;
    Ok(Seen {
        deliveries: stats.applied() + stats.duplicates(),
        duplicates: stats.duplicates(),
        ids,
        last_version: aggregates.into_iter().collect(),
        order_violations: violations as u64,
    })
}

/// What the copier has done.
#[derive(Default)]
struct Copies {
    /// Originals read.
    read: AtomicU64,
    /// Copies the broker acknowledged.
    sent: AtomicU64,
}

/// Reads `topic` in a group of its own and produces a third of its records
/// again, unchanged but for a `demo_copy` header, until `stop`.
async fn copy_a_third(
    brokers: String,
    topic: String,
    group: String,
    copies: Arc<Copies>,
    stop: CancellationToken,
) {
    let reader: Result<StreamConsumer, _> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .create();
    let writer: Result<FutureProducer, _> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        // One copy at a time: none waits for a batch to fill.
        .set("linger.ms", "0")
        .create();
    let (Ok(reader), Ok(writer)) = (reader, writer) else {
        tracing::warn!("the demo's copier could not start; no message is delivered twice");
        return;
    };
    if reader.subscribe(&[&topic]).is_err() {
        return;
    }
    loop {
        let record = tokio::select! {
            _ = stop.cancelled() => return,
            record = reader.recv() => record,
        };
        let Ok(record) = record else { continue };
        let headers = record.headers().map(|h| h.detach());
        if headers
            .as_ref()
            .is_some_and(|h| h.iter().any(|header| header.key == COPY))
        {
            continue;
        }
        copies.read.fetch_add(1, Ordering::SeqCst);
        if rand::rng().random_range(0..3) != 0 {
            continue;
        }
        let headers = headers.unwrap_or_else(OwnedHeaders::new).insert(Header {
            key: COPY,
            value: Some("1"),
        });
        let key = record.key().unwrap_or_default();
        let payload = record.payload().unwrap_or_default();
        let copy = FutureRecord::to(&topic)
            .key(key)
            .payload(payload)
            .headers(headers);
        if writer.send(copy, Duration::from_secs(5)).await.is_ok() {
            copies.sent.fetch_add(1, Ordering::SeqCst);
        }
    }
}
