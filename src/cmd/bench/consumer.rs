//! The consumer runtime's rate: messages through `consumer::run_kafka` with
//! a handler that does nothing, beside a plain consumer of the same client
//! that reads the same messages and commits offsets without a database.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use outbox_relay::consumer::{self, ConsumerConfig, HandlerError, KafkaSettings, Message};
use outbox_relay::error::Error;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use super::{BenchKafka, BenchOptions, BenchReport, bench};
use crate::testkit::TempPostgres;

/// The runtime's target, in messages per second on this machine.
const CONSUMER_RATE_TARGET: f64 = 20_000.0;

/// How long either consumer may take to read everything.
const DEADLINE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerRun {
    pub messages: u64,
    pub partitions: i32,
    pub max_in_flight: usize,
    pub max_batch: usize,
    pub messages_per_sec: f64,
    /// The plain consumer's rate over the same messages.
    pub plain_messages_per_sec: f64,
    pub ratio_to_plain: f64,
}

/// A handler that applies nothing: what is measured is the runtime (inbox
/// claim, transaction, offsets).
struct Nothing;

impl consumer::Handler for Nothing {
    async fn handle(
        &self,
        _tx: &mut Transaction<'static, Postgres>,
        _message: &Message,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

pub(super) async fn consumer(
    pg: &TempPostgres,
    kafka: &BenchKafka,
    options: &BenchOptions,
    run_id: &str,
    shutdown: &CancellationToken,
) -> Result<Option<ConsumerRun>, Error> {
    let messages = options.consumer_messages;
    if messages == 0 || shutdown.is_cancelled() {
        return Ok(None);
    }
    let partitions = options.partitions;
    let topic = format!("bench_{run_id}.consumed");
    kafka.create_topic(&topic, partitions).await?;
    produce(&kafka.brokers(), &topic, messages)?;

    let plain = plain_consumer(
        &kafka.brokers(),
        &topic,
        &format!("plain_{run_id}"),
        messages,
    )?;

    let url = pg.create_database(&format!("consumer_{run_id}")).await?;
    let max_in_flight = partitions.max(1) as usize;
    let pool = PgPoolOptions::new()
        .max_connections(max_in_flight as u32 + 1)
        .connect(&url)
        .await
        .map_err(|e| bench(format!("connecting to the consumer's database: {e}")))?;
    outbox_relay::MIGRATOR
        .run(&pool)
        .await
        .map_err(|e| bench(format!("migrating the consumer's database: {e}")))?;
    let mut config = ConsumerConfig::new(format!("runtime_{run_id}"), [&topic]);
    config.max_in_flight = max_in_flight;
    let max_batch = config.max_batch;
    let runtime =
        consumer::KafkaConsumer::new(pool, config, KafkaSettings::new(kafka.brokers()), Nothing)
            .map_err(|e| bench(e.to_string()))?;
    let stats = runtime.stats();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(runtime.run(async move { stopped.cancelled().await }));
    // From the first message applied to the last, as for the plain one:
    // joining the group is not the runtime's rate.
    let deadline = Instant::now() + DEADLINE;
    let mut first = None;
    loop {
        let settled = stats.applied() + stats.duplicates();
        if settled > 0 && first.is_none() {
            first = Some((Instant::now(), settled));
        }
        if settled >= messages || Instant::now() > deadline || shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = Instant::now();
    stop.cancel();
    let _ = task.await;
    let settled = stats.applied() + stats.duplicates();
    if settled < messages {
        return Err(bench(format!(
            "the consumer runtime applied {settled} of {messages} messages within {}s",
            DEADLINE.as_secs()
        )));
    }
    let (start, before) = first.unwrap_or((end, 0));
    let rate = (messages - before) as f64 / end.duration_since(start).as_secs_f64().max(1e-3);
    Ok(Some(ConsumerRun {
        messages,
        partitions,
        max_in_flight,
        max_batch,
        messages_per_sec: rate,
        plain_messages_per_sec: plain,
        ratio_to_plain: rate / plain,
    }))
}

/// `count` small messages with an `id` header, spread over the partitions
/// by key.
fn produce(brokers: &str, topic: &str, count: u64) -> Result<(), Error> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .map_err(|e| bench(format!("creating the bench producer: {e}")))?;
    for i in 0..count {
        let id = uuid::Uuid::new_v4().to_string();
        let key = format!("aggregate-{}", i % 1000);
        let payload = format!("{{\"n\":{i}}}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "id",
            value: Some(&id),
        });
        let mut record = BaseRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) => {
                    if !matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ) {
                        return Err(bench(format!("producing bench messages: {e}")));
                    }
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| bench(format!("flushing bench messages: {e}")))
}

/// Reads `count` messages in group `group` and commits offsets every
/// second; the rate from the first message to the last.
fn plain_consumer(brokers: &str, topic: &str, group: &str, count: u64) -> Result<f64, Error> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| bench(format!("creating the plain consumer: {e}")))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| bench(format!("subscribing the plain consumer: {e}")))?;
    let deadline = Instant::now() + DEADLINE;
    let mut read = 0;
    let mut first = None;
    let mut last_commit = Instant::now();
    while read < count {
        if Instant::now() > deadline {
            return Err(bench(format!(
                "the plain consumer read {read} of {count} messages within {}s",
                DEADLINE.as_secs()
            )));
        }
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            read += 1;
        }
        if last_commit.elapsed() >= Duration::from_secs(1) {
            let _ = consumer.commit_consumer_state(CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    let start = first.unwrap_or_else(Instant::now);
    Ok((count - 1) as f64 / start.elapsed().as_secs_f64().max(1e-3))
}

pub(super) fn describe(report: &BenchReport, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let Some(c) = &report.consumer else {
        return Ok(());
    };
    writeln!(f)?;
    writeln!(
        f,
        "consumer runtime ({} messages, {} partitions, max_in_flight {}, max_batch {}, a handler that does nothing), beside a plain consumer committing offsets without a database:",
        c.messages, c.partitions, c.max_in_flight, c.max_batch
    )?;
    writeln!(
        f,
        "  runtime {:>9.0} msg/s   plain {:>9.0} msg/s   {:.2} x plain",
        c.messages_per_sec, c.plain_messages_per_sec, c.ratio_to_plain
    )
}

pub(super) fn targets(report: &BenchReport, out: &mut BTreeMap<String, bool>) {
    if let Some(c) = &report.consumer {
        out.insert(
            format!("consumer runtime >= {CONSUMER_RATE_TARGET} messages/s"),
            c.messages_per_sec >= CONSUMER_RATE_TARGET,
        );
    }
}
