//! The demo's consumer: the crate's consumer runtime (on the demo's
//! broker) with a handler that applies the demo's effects, while a copier
//! delivers a third of the messages again (as a relay restarting around its
//! acks would), so the inbox has duplicates to absorb.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outbox_relay::consumer::{
    self, ConsumerConfig, ConsumerError, ConsumerStats, HandlerError, KafkaSettings, Message,
    NatsSettings, RabbitMqSettings,
};
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

/// Where the demo's consumer reads.
#[derive(Clone)]
pub enum Source {
    Kafka {
        brokers: String,
        topic: String,
    },
    Nats {
        url: String,
        stream: String,
        subjects: String,
    },
    /// The group's queue (`x-single-active-consumer`) and `QUEUE.copier`,
    /// both bound to `exchange`.
    RabbitMq {
        url: String,
        exchange: String,
        queue: String,
    },
}

/// The demo's member of its consumer group, on its broker.
enum Member {
    Kafka(consumer::KafkaConsumer<DemoEffects>),
    Nats(consumer::NatsConsumer<DemoEffects>),
    RabbitMq(consumer::RabbitMqConsumer<DemoEffects>),
}

impl Member {
    fn new(pool: PgPool, group: &str, source: &Source) -> Result<Self, ConsumerError> {
        let config = |topic: &str| {
            let mut config = ConsumerConfig::new(group, [topic]);
            config.max_in_flight = 4;
            config
        };
        Ok(match source {
            Source::Kafka { brokers, topic } => Member::Kafka(consumer::KafkaConsumer::new(
                pool,
                config(topic),
                KafkaSettings::new(brokers),
                DemoEffects,
            )?),
            Source::Nats {
                url,
                stream,
                subjects,
            } => Member::Nats(consumer::NatsConsumer::new(
                pool,
                config(subjects),
                NatsSettings::new(url, stream),
                DemoEffects,
            )?),
            Source::RabbitMq {
                url,
                exchange,
                queue,
            } => Member::RabbitMq(consumer::RabbitMqConsumer::new(
                pool,
                config(exchange),
                RabbitMqSettings::new(url).queue(queue),
                DemoEffects,
            )?),
        })
    }

    fn stats(&self) -> ConsumerStats {
        match self {
            Member::Kafka(member) => member.stats(),
            Member::Nats(member) => member.stats(),
            Member::RabbitMq(member) => member.stats(),
        }
    }

    async fn run(self, until: impl std::future::Future<Output = ()>) -> Result<(), ConsumerError> {
        match self {
            Member::Kafka(member) => member.run(until).await,
            Member::Nats(member) => member.run(until).await,
            Member::RabbitMq(member) => member.run(until).await,
        }
    }
}

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

/// Consumes `source` through the runtime until `target` messages were
/// applied, or nothing new was applied for a minute.
pub async fn consume(
    pool: PgPool,
    group: String,
    source: Source,
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
        source.clone(),
        format!("{group}-copier"),
        copies.clone(),
        stop.clone(),
    ));
    let runtime =
        Member::new(pool.clone(), &group, &source).map_err(|e| Error::Embedded(e.to_string()))?;
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

/// Reads the demo's messages on a subscription of its own and delivers a
/// third of them again, unchanged but for a `demo_copy` header, until
/// `stop`.
async fn copy_a_third(source: Source, group: String, copies: Arc<Copies>, stop: CancellationToken) {
    let copied = match source {
        Source::Kafka { brokers, topic } => copy_kafka(brokers, topic, group, &copies, &stop).await,
        Source::Nats { url, stream, .. } => copy_nats(url, stream, &copies, &stop).await,
        Source::RabbitMq { url, queue, .. } => {
            copy_rabbitmq(url, format!("{queue}.copier"), &copies, &stop).await
        }
    };
    if let Err(e) = copied {
        tracing::warn!(error = %e, "the demo's copier stopped; no more messages are delivered twice");
    }
}

/// Whether to copy this original (a third of them).
fn pick(copies: &Copies) -> bool {
    copies.read.fetch_add(1, Ordering::SeqCst);
    rand::rng().random_range(0..3) == 0
}

async fn copy_kafka(
    brokers: String,
    topic: String,
    group: String,
    copies: &Copies,
    stop: &CancellationToken,
) -> Result<(), String> {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| e.to_string())?;
    let writer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        // One copy at a time: none waits for a batch to fill.
        .set("linger.ms", "0")
        .create()
        .map_err(|e| e.to_string())?;
    reader.subscribe(&[&topic]).map_err(|e| e.to_string())?;
    loop {
        let record = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            record = reader.recv() => record,
        };
        let Ok(record) = record else { continue };
        let headers = record.headers().map(|h| h.detach());
        if headers
            .as_ref()
            .is_some_and(|h| h.iter().any(|header| header.key == COPY))
            || !pick(copies)
        {
            continue;
        }
        let headers = headers.unwrap_or_else(OwnedHeaders::new).insert(Header {
            key: COPY,
            value: Some("1"),
        });
        let key = record.key().unwrap_or_default();
        let payload = record.payload().unwrap_or_default();
        // Into the original's own partition, after it: a copy keyed alike
        // but placed by another partitioner could overtake the original.
        let copy = FutureRecord::to(&topic)
            .partition(record.partition())
            .key(key)
            .payload(payload)
            .headers(headers);
        if writer.send(copy, Duration::from_secs(5)).await.is_ok() {
            copies.sent.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// NATS: an ephemeral consumer of the stream; copies go without
/// `Nats-Msg-Id`, which JetStream would drop as duplicates.
async fn copy_nats(
    url: String,
    stream: String,
    copies: &Copies,
    stop: &CancellationToken,
) -> Result<(), String> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures::StreamExt;
    let client = async_nats::connect(url.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let jetstream = async_nats::jetstream::new(client);
    let reader = jetstream
        .get_stream(&stream)
        .await
        .map_err(|e| e.to_string())?
        .create_consumer(pull::Config {
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = reader.messages().await.map_err(|e| e.to_string())?;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            message = messages.next() => message,
        };
        let Some(Ok(message)) = message else { continue };
        let original = message
            .headers
            .as_ref()
            .is_none_or(|headers| headers.get(COPY).is_none());
        if !original || !pick(copies) {
            continue;
        }
        let mut headers = async_nats::HeaderMap::new();
        for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
            if !name.to_string().eq_ignore_ascii_case("Nats-Msg-Id") {
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        headers.insert(COPY, "1");
        let sent = jetstream
            .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
            .await;
        if let Ok(ack) = sent
            && ack.await.is_ok()
        {
            copies.sent.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// RabbitMQ: reads the copier's own queue and publishes copies to the
/// exchange the original came through.
async fn copy_rabbitmq(
    url: String,
    queue: String,
    copies: &Copies,
    stop: &CancellationToken,
) -> Result<(), String> {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let reader = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let writer = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    writer
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut deliveries = reader
        .basic_consume(
            queue.as_str().into(),
            "demo-copier".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            delivery = deliveries.next() => delivery,
        };
        let Some(Ok(delivery)) = delivery else {
            continue;
        };
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        if headers.inner().contains_key(COPY) || !pick(copies) {
            continue;
        }
        headers.insert(COPY.into(), AMQPValue::LongString("1".into()));
        let properties = delivery.properties.clone().with_headers(headers);
        let sent = writer
            .basic_publish(
                delivery.exchange.clone(),
                delivery.routing_key.clone(),
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await;
        if let Ok(confirm) = sent
            && confirm.await.is_ok()
        {
            copies.sent.fetch_add(1, Ordering::SeqCst);
        }
    }
}
