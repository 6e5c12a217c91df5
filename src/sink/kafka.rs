//! Publishing to Kafka with the idempotent producer (`acks=all`,
//! `enable.idempotence`) and `enable.gapless.guarantee`: within a partition,
//! if one record fails, every later record of that partition fails too, so
//! retrying from the first failure never reorders an aggregate. Keys are
//! partitioned with `murmur2_random`, the Java client's default, so records
//! land where a Java producer would put them.
//!
//! [`KafkaSink::send`] only enqueues; the returned [`Pending`] resolves to the
//! record's [`Outcome`] once the broker acknowledged it or it failed for good.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::KafkaConfig;
use crate::error::Error;
use crate::record::Record;

/// The producer settings the relay's guarantees rest on. `--kafka-config`
/// properties are applied after these and may override them.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("enable.gapless.guarantee", "true"),
    ("partitioner", "murmur2_random"),
    ("linger.ms", "5"),
    ("message.timeout.ms", "30000"),
    ("queue.buffering.max.messages", "200000"),
    ("client.id", "outbox-relay"),
];

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written to all in-sync replicas.
    Acked,
    /// The broker will never take this record (too large, invalid topic,
    /// not authorized); retrying cannot help.
    Rejected(String),
    /// Not written this time (broker down, timeout); retry later.
    Failed(String),
}

/// A record that was enqueued, or refused before it was.
pub enum Pending {
    Enqueued(DeliveryFuture),
    Done(Outcome),
}

impl Pending {
    /// Waits for the record's outcome.
    pub async fn outcome(self) -> Outcome {
        match self {
            Pending::Done(outcome) => outcome,
            Pending::Enqueued(future) => match future.await {
                Ok(Ok(_)) => Outcome::Acked,
                Ok(Err((err, _))) => classify(&err),
                Err(_) => Outcome::Failed(
                    "the producer was closed before the record was acknowledged".into(),
                ),
            },
        }
    }
}

/// Forwards librdkafka's own log lines to `tracing` at debug level: the relay
/// logs state changes itself, once each, instead of one line per retry.
#[derive(Clone, Default)]
pub struct SinkContext;

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        debug!(?level, facility = fac, "librdkafka: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        debug!(%error, "librdkafka error: {reason}");
    }
}

/// The Kafka producer.
pub struct KafkaSink {
    producer: FutureProducer<SinkContext>,
    brokers: String,
}

impl KafkaSink {
    /// Creates the producer; connecting happens in the background.
    pub fn new(config: &KafkaConfig) -> Result<Self, Error> {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &config.brokers);
        for (key, value) in PRODUCER_DEFAULTS {
            client.set(*key, *value);
        }
        for (key, value) in &config.properties {
            client.set(key, value);
        }
        client.set_log_level(RDKafkaLogLevel::Debug);
        let producer = client.create_with_context(SinkContext).map_err(|e| {
            Error::Config(format!(
                "the Kafka producer settings are invalid: {e}; check --brokers and --kafka-config"
            ))
        })?;
        Ok(KafkaSink {
            producer,
            brokers: config.brokers.clone(),
        })
    }

    /// Waits until the brokers answer a metadata request, retrying with
    /// capped backoff and saying so once. Returns false if `shutdown` fired first.
    pub async fn wait_until_reachable(&self, shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(500);
        let mut warned = false;
        loop {
            let producer = self.producer.clone();
            let probe = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(5))
                    .map(|m| m.brokers().len())
            })
            .await;
            match probe {
                Ok(Ok(brokers)) if brokers > 0 => {
                    if warned {
                        info!(brokers = %self.brokers, "Kafka is reachable again");
                    } else {
                        debug!(brokers = %self.brokers, "Kafka is reachable");
                    }
                    return true;
                }
                other => {
                    let cause = match other {
                        Ok(Ok(_)) => "no brokers in the metadata".to_owned(),
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                    };
                    if !warned {
                        warn!(
                            brokers = %self.brokers,
                            "cannot reach Kafka brokers at {}: {cause}; retrying with backoff until they answer; check --brokers (OUTBOX_BROKERS) and that the brokers are up",
                            self.brokers
                        );
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Enqueues `record`. Waits while the producer's queue is full, so a slow
    /// broker slows the relay down instead of growing memory.
    pub async fn send(&self, record: &Record) -> Pending {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut future = FutureRecord::to(&record.topic)
            .key(record.key.as_bytes())
            .headers(headers);
        if let Some(value) = &record.value {
            future = future.payload(value.as_slice());
        }
        loop {
            match self.producer.send_result(future) {
                Ok(delivery) => return Pending::Enqueued(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    future = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((err, _)) => return Pending::Done(classify(&err)),
            }
        }
    }

    /// Whether the producer hit a fatal error (e.g. a gap under the gapless
    /// guarantee) and must be replaced before sending more.
    pub fn is_fatal(&self) -> bool {
        self.producer.client().fatal_error().is_some()
    }

    /// Waits up to `timeout` for everything enqueued to be acknowledged or fail.
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }
}

/// Errors no retry can fix go to the dead-letter table; everything else is
/// retried.
fn classify(err: &KafkaError) -> Outcome {
    use RDKafkaErrorCode::*;
    let code = match err {
        KafkaError::MessageProduction(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    match code {
        Some(
            MessageSizeTooLarge
            | InvalidMessageSize
            | InvalidTopic
            | TopicAuthorizationFailed
            | UnknownTopic
            | InvalidRecord
            | MessageBatchTooLarge
            | InvalidMessage
            | PolicyViolation,
        ) => Outcome::Rejected(err.to_string()),
        _ => Outcome::Failed(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_rejections() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(classify(&too_large), Outcome::Rejected(_)));
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(matches!(classify(&timeout), Outcome::Failed(_)));
    }
}
