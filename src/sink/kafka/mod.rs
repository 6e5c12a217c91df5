//! Publishing to Kafka with the idempotent producer (`acks=all`,
//! `enable.idempotence`) and `enable.gapless.guarantee`: within a partition,
//! if one record fails, every later record of that partition fails too, so
//! retrying from the first failure never reorders an aggregate. Keys are
//! partitioned with `murmur2_random`, the Java client's default, so records
//! land where a Java producer would put them.
//!
//! [`KafkaSink::send`] only enqueues; the returned [`KafkaAck`] resolves to
//! the record's [`Outcome`] once the broker acknowledged it (`acks=all`) or
//! it failed. Rejections ([`Outcome::Rejected`]) are the errors no retry can
//! fix: too large, an invalid or unknown topic, not authorized.
//!
//! A producer that has had nothing acknowledged for a whole message timeout
//! and keeps failing counts as wedged and is replaced like one that hit a
//! fatal error ([`KafkaSink::is_fatal`]): some idempotence states only a new
//! producer id clears.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::KafkaConfig;
use crate::error::Error;
use crate::sink::{LastAck, Message, Outcome, Sent, Sink, until_reachable};

/// The producer settings the relay's guarantees rest on. `--kafka-config`
/// properties are applied after these and may override them.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("enable.gapless.guarantee", "true"),
    ("partitioner", "murmur2_random"),
    // The relay enqueues a whole batch at once and then waits for its acks,
    // so lingering only delays the last records of every batch.
    ("linger.ms", "1"),
    ("message.timeout.ms", "30000"),
    ("queue.buffering.max.messages", "200000"),
    ("client.id", "outbox-relay"),
];

/// The librdkafka properties the relay's producer is created with for
/// `config`, in the order they are applied: the brokers, the settings its
/// guarantees rest on, then the operator's `--kafka-config` (which may
/// override them). A benchmark or a tool that wants a producer configured as
/// the relay's starts from these.
pub fn producer_properties(config: &KafkaConfig) -> Vec<(String, String)> {
    let mut properties = vec![("bootstrap.servers".to_string(), config.brokers.clone())];
    properties.extend(
        PRODUCER_DEFAULTS
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string())),
    );
    properties.extend(config.properties.iter().cloned());
    properties
}

/// The relay's producer settings for `config`.
fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in producer_properties(config) {
        client.set(key, value);
    }
    client
}

/// The message's headers, in order, as librdkafka takes them.
fn kafka_headers(record: &Message) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// Resolves to a record's outcome once librdkafka reports it.
pub struct KafkaAck {
    delivery: DeliveryFuture,
    last_ack: Arc<LastAck>,
}

impl Future for KafkaAck {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let outcome = match Pin::new(&mut self.delivery).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(Ok(_))) => {
                self.last_ack.record();
                Outcome::Acked
            }
            Poll::Ready(Ok(Err((err, _)))) => classify(&err),
            Poll::Ready(Err(_)) => {
                Outcome::Failed("the producer was closed before the record was acknowledged".into())
            }
        };
        Poll::Ready(outcome)
    }
}

/// Forwards librdkafka's own log lines to `tracing` at debug level: the relay
/// logs state changes itself, once each, instead of one line per retry. Keeps
/// the client's last connection error, which says why brokers cannot be
/// reached (refused, TLS certificate, SASL login) where a failed request only
/// says that they cannot.
#[derive(Default)]
pub struct SinkContext {
    last_error: Arc<Mutex<Option<String>>>,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        debug!(?level, facility = fac, "librdkafka: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        debug!(%error, "librdkafka error: {reason}");
        // "All brokers are down" follows each broker's own error and would
        // hide its cause.
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown)
            && let Ok(mut last) = self.last_error.lock()
        {
            *last = Some(reason.to_owned());
        }
    }
}

/// The Kafka producer.
pub struct KafkaSink {
    producer: FutureProducer<SinkContext>,
    /// Kept to build a replacement producer.
    config: KafkaConfig,
    brokers: String,
    last_ack: Arc<LastAck>,
    /// The producer's `message.timeout.ms`: how long it keeps trying to
    /// deliver a record before failing it.
    message_timeout: Duration,
    /// The producer's `socket.timeout.ms`.
    socket_timeout: Duration,
    /// The client's last connection error (see [`SinkContext`]).
    last_error: Arc<Mutex<Option<String>>>,
}

impl KafkaSink {
    /// Creates the producer; connecting happens in the background.
    pub fn new(config: &KafkaConfig) -> Result<Self, Error> {
        let mut client = producer_config(config);
        client.set_log_level(RDKafkaLogLevel::Debug);
        let context = SinkContext::default();
        let last_error = context.last_error.clone();
        let producer = client.create_with_context(context).map_err(|e| {
            Error::Config(format!(
                "the Kafka producer settings are invalid: {e}; check --brokers and --kafka-config"
            ))
        })?;
        Ok(KafkaSink {
            producer,
            config: config.clone(),
            brokers: config.brokers.clone(),
            last_ack: Arc::new(LastAck::new()),
            message_timeout: message_timeout(config),
            socket_timeout: socket_timeout(config),
            last_error,
        })
    }

    /// Waits up to `timeout` for everything enqueued to be acknowledged or fail.
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }
}

impl Sink for KafkaSink {
    type Ack = KafkaAck;

    fn name(&self) -> &'static str {
        "Kafka"
    }

    /// Waits until the brokers answer a metadata request, retrying with
    /// capped backoff and saying so once. Returns false if `shutdown` fired first.
    async fn wait_until_reachable(&self, shutdown: &CancellationToken) -> bool {
        let probe = || async {
            let producer = self.producer.clone();
            let probe = tokio::task::spawn_blocking(move || {
                let brokers = producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(5))
                    .map(|m| m.brokers().len())?;
                // The idempotent producer asks for its producer id when the
                // client starts, before any broker connection is up, and
                // then only every 500 ms or on a metadata response. A second
                // metadata request, now that a broker is up, has it ask at
                // once: the first record is not held back half a second.
                let _ = producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(5));
                Ok::<_, rdkafka::error::KafkaError>(brokers)
            })
            .await;
            let mut cause = match probe {
                Ok(Ok(brokers)) if brokers > 0 => return Ok(()),
                Ok(Ok(_)) => "no brokers in the metadata".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            let last = self.last_error.lock().ok().and_then(|last| last.clone());
            if let Some(last) = last {
                cause = format!("{cause} ({last})");
            }
            Err(cause)
        };
        until_reachable(shutdown, "Kafka", &self.brokers, probe, |cause| {
            format!(
                "cannot reach Kafka brokers at {}: {cause}; retrying with backoff until they answer; check --brokers (OUTBOX_BROKERS), that the brokers are up, and any TLS or SASL settings in --kafka-config",
                self.brokers
            )
        })
        .await
    }

    /// Enqueues `record`. Waits while the producer's queue is full, so a slow
    /// broker slows the relay down instead of growing memory. A record for a
    /// topic no broker may have is refused without asking one.
    async fn send(&self, record: &Message) -> Sent<KafkaAck> {
        if let Some(problem) = invalid_topic(&record.topic) {
            return Sent::Refused(problem);
        }
        let mut future = FutureRecord::to(&record.topic)
            .key(record.key.as_bytes())
            .headers(kafka_headers(record));
        if let Some(value) = &record.value {
            future = future.payload(value.as_slice());
        }
        loop {
            match self.producer.send_result(future) {
                Ok(delivery) => {
                    return Sent::Enqueued(KafkaAck {
                        delivery,
                        last_ack: self.last_ack.clone(),
                    });
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    future = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((err, _)) => {
                    return match classify(&err) {
                        Outcome::Rejected(reason) => Sent::Refused(reason),
                        Outcome::Failed(reason) => Sent::NotSent(reason),
                        Outcome::Acked => Sent::NotSent(err.to_string()),
                    };
                }
            }
        }
    }

    /// Whether this producer must be replaced before sending more, asked
    /// after a record failed. Either librdkafka raised a fatal error (e.g. a
    /// gap under the gapless guarantee), or nothing was acknowledged for a
    /// whole message timeout: the producer may be wedged in a state only a
    /// new producer id clears. A broker that lost its producer state (one
    /// restarted on memory storage) answers every produce with
    /// UNKNOWN_PRODUCER_ID, and librdkafka's answer, bumping the epoch
    /// itself and retrying, loops forever where Kafka would accept the new
    /// epoch. Replacing costs a connection and an InitProducerId; the relay
    /// resends from the first unconfirmed row either way.
    fn is_broken(&self) -> bool {
        self.producer.client().fatal_error().is_some()
            || self.last_ack.age() >= self.message_timeout
    }

    fn replace(&mut self) -> Result<(), Error> {
        debug!("replacing the Kafka producer");
        *self = KafkaSink::new(&self.config)?;
        Ok(())
    }

    /// The longest a record may take to be acknowledged or failed: the
    /// producer's `message.timeout.ms`, plus `socket.timeout.ms` for a
    /// request already in flight, which the idempotent producer lets finish
    /// (or time out) before it fails the record: a broker that keeps the
    /// connection open and goes silent holds records that long.
    fn delivery_timeout(&self) -> Duration {
        self.message_timeout.saturating_add(self.socket_timeout)
    }
}

/// Why `topic` cannot be a Kafka topic, if it cannot: Kafka's own rule, 1 to
/// 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`. Checked here rather
/// than left to the broker because not every broker says so: tansu 0.6
/// answers a produce to `bad topic!` like one to a missing topic, and the
/// record would be retried forever instead of dead-lettered.
fn invalid_topic(topic: &str) -> Option<String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.chars().all(legal);
    (!valid).then(|| {
        format!(
            "invalid topic name {topic:?}: Kafka topic names are 1 to 249 characters of \
             a-z, A-Z, 0-9, '.', '_' and '-', and not \".\" or \"..\""
        )
    })
}

/// The effective `message.timeout.ms` (alias `delivery.timeout.ms`): the
/// last one given wins, as in librdkafka; 0 means records never time out.
fn message_timeout(config: &KafkaConfig) -> Duration {
    // librdkafka's default is 300 s; the relay's own default applies first.
    property_ms(config, &["message.timeout.ms", "delivery.timeout.ms"])
        .map(|ms| match ms {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        })
        .unwrap_or(Duration::from_secs(300))
}

/// `socket.timeout.ms`: how long a request already sent may go unanswered.
fn socket_timeout(config: &KafkaConfig) -> Duration {
    property_ms(config, &["socket.timeout.ms"])
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(60)) // librdkafka's default
}

/// The last value of any of `keys` in the relay's defaults, then the
/// operator's properties, as milliseconds.
fn property_ms(config: &KafkaConfig, keys: &[&str]) -> Option<u64> {
    let defaults = PRODUCER_DEFAULTS.iter().map(|(k, v)| (*k, *v));
    let given = config
        .properties
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()));
    defaults
        .chain(given)
        .filter(|(key, _)| keys.contains(key))
        .filter_map(|(_, value)| value.parse::<u64>().ok())
        .next_back()
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
    fn the_message_timeout_is_the_last_one_given() {
        let config = |properties: &[(&str, &str)]| KafkaConfig {
            brokers: "b:1".into(),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(message_timeout(&config(&[])), Duration::from_secs(30));
        assert_eq!(
            message_timeout(&config(&[("delivery.timeout.ms", "5000")])),
            Duration::from_secs(5)
        );
        assert_eq!(
            message_timeout(&config(&[
                ("message.timeout.ms", "7000"),
                ("linger.ms", "1")
            ])),
            Duration::from_secs(7)
        );
        assert_eq!(
            message_timeout(&config(&[("message.timeout.ms", "0")])),
            Duration::MAX
        );
    }

    #[test]
    fn a_producer_without_acks_for_a_message_timeout_is_replaced() {
        let mut sink = KafkaSink::new(&KafkaConfig {
            brokers: "127.0.0.1:9".into(),
            properties: vec![("message.timeout.ms".into(), "100000".into())],
        })
        .unwrap();
        assert!(!sink.is_broken(), "a new producer is not wedged");
        sink.message_timeout = Duration::ZERO;
        assert!(sink.is_broken(), "no ack within the message timeout");
        sink.message_timeout = Duration::from_secs(60);
        sink.last_ack.record();
        assert!(!sink.is_broken(), "an ack resets the clock");
    }

    #[test]
    fn topic_names_follow_kafkas_rule() {
        for ok in ["orders.events", "a", "A-b_c.9", &"x".repeat(249)] {
            assert_eq!(invalid_topic(ok), None, "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "bad topic!",
            "ünïcode",
            "a/b",
            &"x".repeat(250),
        ] {
            assert!(invalid_topic(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn permanent_errors_are_rejections() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(classify(&too_large), Outcome::Rejected(_)));
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(matches!(classify(&timeout), Outcome::Failed(_)));
    }
}
