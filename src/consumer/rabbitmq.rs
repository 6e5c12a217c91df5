//! The runtime on RabbitMQ.
//!
//! The group is a durable queue (named after the group unless given),
//! declared by the runtime with `x-single-active-consumer`, and bound to
//! each topic (an exchange) with the binding key `#`. RabbitMQ then
//! delivers to one member at a time; when that member's channel closes
//! (a stop, a kill, a lost connection), the messages it left unacknowledged
//! go back to the head of the queue in their order and the next member
//! receives them first: an aggregate's messages are applied in order across
//! members, and those already applied are skipped by the inbox.
//!
//! Inside the member, messages are spread over lanes by their routing key
//! (the aggregate id; [`super::lanes`]) and acknowledged once settled. The
//! channel's prefetch (`max_queued`, at most 65,535) bounds what is in hand.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::lanes::Lanes;
use super::metrics::ConsumerStats;
use super::partition::{Applier, Delivery};
use super::{ConsumerConfig, ConsumerError, Handler, Message};
use crate::inbox;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach RabbitMQ and which queue is the group's.
#[derive(Debug, Clone)]
pub struct RabbitMqSettings {
    url: String,
    queue: Option<String>,
    binding_key: String,
    arguments: FieldTable,
}

impl RabbitMqSettings {
    /// The broker (`amqp://USER:PASSWORD@HOST:PORT/VHOST`, or `amqps://`).
    pub fn new(url: impl Into<String>) -> Self {
        RabbitMqSettings {
            url: url.into(),
            queue: None,
            binding_key: "#".into(),
            arguments: FieldTable::default(),
        }
    }

    /// The group's queue; default: the group's name.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// The key the queue is bound to each topic exchange with; default `#`
    /// (every message of a topic exchange).
    pub fn binding_key(mut self, key: impl Into<String>) -> Self {
        self.binding_key = key.into();
        self
    }

    /// One more argument the queue is declared with, e.g.
    /// `x-queue-type` = `quorum` (`x-single-active-consumer` is always set).
    pub fn queue_argument(mut self, key: &str, value: impl Into<AMQPValue>) -> Self {
        self.arguments.insert(key.into(), value.into());
        self
    }
}

/// Runs a consumer group member on RabbitMQ until `shutdown` resolves; see
/// [`RabbitMqConsumer`].
pub async fn run_rabbitmq<H: Handler>(
    pool: PgPool,
    config: ConsumerConfig,
    rabbitmq: RabbitMqSettings,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConsumerError> {
    RabbitMqConsumer::new(pool, config, rabbitmq, handler)?
        .run(shutdown)
        .await
}

/// A consumer group member on RabbitMQ.
pub struct RabbitMqConsumer<H: Handler> {
    applier: Arc<Applier<H>>,
    config: ConsumerConfig,
    settings: RabbitMqSettings,
    queue: String,
}

/// Why a member stopped receiving on one connection.
enum Ended {
    Shutdown,
    /// The channel or the connection closed: connect again.
    Lost,
}

impl<H: Handler> RabbitMqConsumer<H> {
    pub fn new(
        pool: PgPool,
        config: ConsumerConfig,
        settings: RabbitMqSettings,
        handler: H,
    ) -> Result<Self, ConsumerError> {
        config.validate()?;
        if settings.url.trim().is_empty() {
            return Err(ConsumerError::Config(
                "no RabbitMQ URL; give amqp://USER:PASSWORD@HOST:PORT/VHOST".into(),
            ));
        }
        let queue = settings
            .queue
            .clone()
            .unwrap_or_else(|| config.group.clone());
        if queue.len() > 255 || queue.starts_with("amq.") {
            return Err(ConsumerError::Config(format!(
                "invalid RabbitMQ queue name {queue:?}: at most 255 bytes, not starting with \"amq.\"; \
                 name the queue (RabbitMqSettings::queue) or the group differently"
            )));
        }
        Ok(RabbitMqConsumer {
            applier: Applier::new(pool, &config, handler),
            config,
            settings,
            queue,
        })
    }

    pub fn stats(&self) -> ConsumerStats {
        self.applier.stats.clone()
    }

    /// Runs until `shutdown` resolves, then finishes the messages in hand,
    /// acknowledges them and closes the connection (the next member takes
    /// over).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ConsumerError> {
        super::run_member(&self.applier, &self.config, shutdown, |stop| {
            self.connections(stop)
        })
        .await
    }

    async fn connections(&self, stop: CancellationToken) -> Result<(), ConsumerError> {
        info!(
            group = %self.config.group, queue = %self.queue, exchanges = ?self.config.topics,
            "consumer started"
        );
        let mut attempt = 0;
        while !stop.is_cancelled() {
            let connection = match self.connect().await {
                Ok(connection) => connection,
                Err(Setup::Refused(error)) => return Err(ConsumerError::Setup(error)),
                Err(Setup::Unreachable(error)) => {
                    attempt += 1;
                    warn!(error = %error, "cannot consume from RabbitMQ; retrying with backoff");
                    let wait = self
                        .config
                        .retry
                        .backoff(attempt)
                        .min(Duration::from_secs(5));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => {}
                    }
                    continue;
                }
            };
            attempt = 0;
            let (connection, channel, consumer) = connection;
            let ended = self.receive(&channel, consumer, &stop).await;
            let _ = connection.close(200, "consumer stopped".into()).await;
            match ended? {
                Ended::Shutdown => return Ok(()),
                Ended::Lost => info!("the RabbitMQ channel closed; connecting again"),
            }
        }
        Ok(())
    }

    /// Connects, declares and binds the queue, and starts consuming.
    async fn connect(&self) -> Result<(Connection, lapin::Channel, lapin::Consumer), Setup> {
        let unreachable = |e: lapin::Error| Setup::Unreachable(e.to_string());
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("outbox-relay consumer {}", self.config.group).into());
        let connecting = Connection::connect(&self.settings.url, properties);
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| Setup::Unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(unreachable)?;
        let channel = connection.create_channel().await.map_err(unreachable)?;
        let prefetch = self.config.max_queued.clamp(1, u16::MAX as usize) as u16;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(unreachable)?;
        let mut arguments = self.settings.arguments.clone();
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(self.queue.as_str().into(), durable, arguments)
            .await
            .map_err(|e| match code(&e) {
                Some(406) => Setup::Refused(format!(
                    "RabbitMQ queue {:?} exists with other arguments ({e}); the consumer runtime \
                     declares it durable with x-single-active-consumer=true (one member receives \
                     at a time, which keeps each aggregate's order): delete the queue, or name \
                     another one (RabbitMqSettings::queue)",
                    self.queue
                )),
                _ => Setup::Unreachable(e.to_string()),
            })?;
        for exchange in &self.config.topics {
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    exchange.as_str().into(),
                    self.settings.binding_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| match code(&e) {
                    Some(404) => Setup::Refused(format!(
                        "RabbitMQ exchange {exchange:?} does not exist ({e}); declare it (the \
                         relay publishes to it) or fix the topic's name"
                    )),
                    _ => Setup::Unreachable(e.to_string()),
                })?;
        }
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                format!("outbox-relay {}", std::process::id()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unreachable)?;
        debug!(queue = %self.queue, "consuming from RabbitMQ");
        Ok((connection, channel, consumer))
    }

    /// Receives on one channel until `stop` or the channel closes.
    async fn receive(
        &self,
        channel: &lapin::Channel,
        mut consumer: lapin::Consumer,
        stop: &CancellationToken,
    ) -> Result<Ended, ConsumerError> {
        let (lanes, mut settled) = Lanes::start(&self.applier, &self.config);
        let stats = &self.applier.stats;
        // Consuming: the broker delivers once this member is the queue's
        // single active consumer.
        stats.set_partitions(1);
        let mut lag = tokio::time::interval(Duration::from_secs(5));
        let mut in_hand: HashMap<i64, lapin::Acker> = HashMap::new();
        let mut check = tokio::time::interval(Duration::from_millis(200));
        let ended = loop {
            tokio::select! {
                () = stop.cancelled() => break Ok(Ended::Shutdown),
                Some(tag) = settled.recv() => {
                    if let Some(acker) = in_hand.remove(&tag) {
                        acknowledge(&acker).await;
                    }
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let tag = delivery.delivery_tag as i64;
                        let (key, message) = self.delivery(&delivery, tag);
                        in_hand.insert(tag, delivery.acker);
                        lanes.dispatch(&key, message);
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "RabbitMQ");
                        break Ok(Ended::Lost);
                    }
                    None => break Ok(Ended::Lost),
                },
                _ = lag.tick() => {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    if let Ok(queue) = channel
                        .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
                        .await
                    {
                        stats.set_lag(&self.queue, -1, i64::from(queue.message_count()));
                    }
                }
                _ = check.tick() => {
                    if let Err(e) = lanes.check() {
                        break Err(e);
                    }
                }
            }
        };
        let left = lanes.stop(self.config.revoke_timeout, &mut settled).await;
        stats.set_partitions(0);
        stats.forget_partition(&self.queue, -1);
        for tag in left {
            if let Some(acker) = in_hand.remove(&tag) {
                acknowledge(&acker).await;
            }
        }
        ended
    }

    /// A RabbitMQ delivery as the runtime's message, with the key of its
    /// lane (the routing key).
    fn delivery(&self, delivery: &lapin::message::Delivery, tag: i64) -> (Vec<u8>, Delivery) {
        let headers: Vec<(String, Option<Vec<u8>>)> = delivery
            .properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(name, value)| (name.to_string(), header_value(value)))
                    .collect()
            })
            .unwrap_or_default();
        let key = delivery.routing_key.as_str().as_bytes().to_vec();
        let (id, id_error) = match inbox::rabbitmq_message_id(&delivery.properties) {
            Ok(id) => (id, None),
            Err(e) => (uuid::Uuid::nil(), Some(e.to_string())),
        };
        (
            key.clone(),
            Delivery {
                message: Message {
                    id,
                    topic: delivery.exchange.to_string(),
                    partition: -1,
                    offset: tag,
                    key: Some(key),
                    headers,
                    payload: Some(delivery.data.clone()),
                    failed_attempts: 0,
                },
                id_error,
            },
        )
    }
}

/// Why a connection could not be used.
enum Setup {
    /// Worth another try.
    Unreachable(String),
    /// The broker refused the setup; retrying cannot fix it.
    Refused(String),
}

/// The AMQP reply code of a channel or connection error.
fn code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// An AMQP header value as bytes: strings as they are, other values as
/// their text.
fn header_value(value: &AMQPValue) -> Option<Vec<u8>> {
    match value {
        AMQPValue::LongString(text) => Some(text.as_bytes().to_vec()),
        AMQPValue::ShortString(text) => Some(text.as_str().as_bytes().to_vec()),
        AMQPValue::ByteArray(bytes) => Some(bytes.as_slice().to_vec()),
        AMQPValue::Void => None,
        other => Some(format!("{other:?}").into_bytes()),
    }
}

async fn acknowledge(acker: &lapin::Acker) {
    // A lost ack is a redelivery (the channel closed), which the inbox skips.
    if let Err(e) = acker.ack(BasicAckOptions::default()).await {
        debug!(error = %e, "acknowledging a RabbitMQ message failed");
    }
}
