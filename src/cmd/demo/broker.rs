//! The demo's broker: the one `--sink` names, started for the demo (Kafka:
//! librdkafka's in-process mock cluster; NATS and RabbitMQ: a throwaway
//! server from the system's binaries) or the one given, with the
//! destination the demo publishes to, and, for NATS and RabbitMQ, the
//! consumer side that reads it back one message at a time and acknowledges
//! only after the inbox transaction committed (Kafka's consumer is the
//! crate's consumer runtime: `runtime.rs`).

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use uuid::Uuid;

use outbox_relay::config::{KafkaConfig, NatsConfig, RabbitMqConfig, SinkConfig, SinkKind};
use outbox_relay::error::Error;
use outbox_relay::inbox;

/// A broker the demo publishes to, kept alive as long as the demo runs.
pub struct DemoBroker {
    pub sink: SinkConfig,
    /// The relay's topic template.
    pub template: String,
    /// What the summary says about it.
    pub description: String,
    /// What its acknowledgement is.
    pub acknowledgement: &'static str,
    /// Where the consumer reads.
    source: Source,
    _server: Server,
}

enum Server {
    Given,
    Kafka(#[allow(dead_code)] MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    #[cfg(feature = "nats")]
    Nats(#[allow(dead_code)] crate::testkit::TempNats),
    #[cfg(feature = "rabbitmq")]
    RabbitMq(#[allow(dead_code)] crate::testkit::TempRabbitMq),
}

enum Source {
    Kafka {
        brokers: String,
        topic: String,
    },
    #[cfg(feature = "nats")]
    Nats {
        url: String,
        stream: String,
    },
    #[cfg(feature = "rabbitmq")]
    RabbitMq {
        url: String,
        queue: String,
    },
}

fn broker_error(doing: &str) -> impl Fn(String) -> Error + '_ {
    move |cause| Error::Embedded(format!("{doing} failed: {cause}"))
}

impl DemoBroker {
    /// Sets up `kind` for a demo whose names start with `name`: the
    /// server given in `url` (Kafka: bootstrap servers), or one of its own.
    pub async fn start(kind: SinkKind, url: Option<&str>, name: &str) -> Result<Self, Error> {
        match kind {
            SinkKind::Kafka => Self::kafka(url, name),
            #[cfg(feature = "nats")]
            SinkKind::Nats => Self::nats(url, name).await,
            #[cfg(feature = "rabbitmq")]
            SinkKind::RabbitMq => Self::rabbitmq(url, name).await,
            #[allow(unreachable_patterns)]
            other => Err(Error::Config(format!(
                "this build has no {} sink; build with --features {other}",
                other.name()
            ))),
        }
    }

    fn kafka(brokers: Option<&str>, name: &str) -> Result<Self, Error> {
        let topic = format!("{name}.account");
        let (brokers, server, description) = match brokers {
            Some(brokers) => (
                brokers.to_owned(),
                Server::Given,
                format!("{brokers}, topic {topic}"),
            ),
            None => {
                let mock =
                    MockCluster::new(3).map_err(Error::kafka("starting the mock cluster"))?;
                mock.create_topic(&topic, 4, 3)
                    .map_err(Error::kafka("creating the demo topic"))?;
                let brokers = mock.bootstrap_servers();
                let description = format!(
                    "Kafka: in-process mock cluster (3 brokers) at {brokers}, topic {topic} (4 partitions)"
                );
                (brokers, Server::Kafka(mock), description)
            }
        };
        Ok(DemoBroker {
            sink: SinkConfig::Kafka(KafkaConfig {
                brokers: brokers.clone(),
                properties: Vec::new(),
            }),
            template: format!("{name}.{{aggregate_type}}"),
            description,
            acknowledgement: "Kafka (acks=all, idempotent)",
            source: Source::Kafka { brokers, topic },
            _server: server,
        })
    }

    #[cfg(feature = "nats")]
    async fn nats(url: Option<&str>, name: &str) -> Result<Self, Error> {
        let (url, server) = match url {
            Some(url) => (url.to_owned(), Server::Given),
            None => {
                let server = crate::testkit::TempNats::start().await?;
                (server.url(), Server::Nats(server))
            }
        };
        let config = NatsConfig::parse(&url, &[])?;
        let stream = name.to_owned();
        crate::testkit::nats::create_stream(
            config.servers[0].expose(),
            &stream,
            &[format!("{name}.>")],
        )
        .await?;
        let description = match server {
            Server::Given => format!("NATS JetStream at {}, stream {stream}", config.servers[0]),
            _ => format!(
                "NATS JetStream: throwaway nats-server at {url}, stream {stream} (subjects {name}.account.AGGREGATE_ID)"
            ),
        };
        Ok(DemoBroker {
            template: format!("{name}.{{aggregate_type}}.{{aggregate_id}}"),
            description,
            acknowledgement: "JetStream (PubAck, Nats-Msg-Id deduplication)",
            source: Source::Nats {
                url: config.servers[0].expose().to_owned(),
                stream,
            },
            sink: SinkConfig::Nats(config),
            _server: server,
        })
    }

    #[cfg(feature = "rabbitmq")]
    async fn rabbitmq(url: Option<&str>, name: &str) -> Result<Self, Error> {
        let (url, server) = match url {
            Some(url) => (url.to_owned(), Server::Given),
            None => {
                let server = crate::testkit::TempRabbitMq::start().await?;
                (server.url(), Server::RabbitMq(server))
            }
        };
        let config = RabbitMqConfig::parse(&url, &[])?;
        let exchange = format!("{name}.account");
        let queue = name.to_owned();
        crate::testkit::rabbitmq::declare_topic_queue(config.url.expose(), &exchange, &queue)
            .await?;
        let description = match server {
            Server::Given => format!(
                "RabbitMQ at {}, exchange {exchange}, queue {queue}",
                config.url
            ),
            _ => format!(
                "RabbitMQ: throwaway rabbitmq-server at {}, topic exchange {exchange}, queue {queue}",
                config.url
            ),
        };
        Ok(DemoBroker {
            template: format!("{name}.{{aggregate_type}}"),
            description,
            acknowledgement: "RabbitMQ (publisher confirms, persistent, mandatory)",
            source: Source::RabbitMq {
                url: config.url.expose().to_owned(),
                queue,
            },
            sink: SinkConfig::RabbitMq(config),
            _server: server,
        })
    }

    /// Kafka's bootstrap servers and the demo's topic, when the demo runs
    /// on Kafka (its consumer is the crate's consumer runtime).
    pub fn kafka_source(&self) -> Option<(String, String)> {
        match &self.source {
            Source::Kafka { brokers, topic } => Some((brokers.clone(), topic.clone())),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// A consumer of the demo's destination (NATS, RabbitMQ), in group
    /// `group`.
    pub async fn feed(&self, group: &str) -> Result<Feed, Error> {
        match &self.source {
            Source::Kafka { .. } => Err(Error::Embedded(
                "the Kafka demo consumes through the consumer runtime, not a feed".into(),
            )),
            #[cfg(feature = "nats")]
            Source::Nats { url, stream } => {
                use async_nats::jetstream::consumer::pull;
                let fail = broker_error("creating the demo's NATS consumer");
                let client = async_nats::connect(url.as_str())
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let stream = async_nats::jetstream::new(client)
                    .get_stream(stream)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let consumer = stream
                    .create_consumer(pull::Config {
                        durable_name: Some(group.to_owned()),
                        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                        // One in flight: the next message waits for the
                        // previous one's ack, so order is the stream's.
                        max_ack_pending: 1,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let messages = consumer.messages().await.map_err(|e| fail(e.to_string()))?;
                Ok(Feed::Nats(messages))
            }
            #[cfg(feature = "rabbitmq")]
            Source::RabbitMq { url, queue } => {
                use lapin::options::{BasicConsumeOptions, BasicQosOptions};
                let fail = broker_error("creating the demo's RabbitMQ consumer");
                let connection =
                    lapin::Connection::connect(url, lapin::ConnectionProperties::default())
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                // One unacknowledged message at a time keeps queue order.
                channel
                    .basic_qos(1, BasicQosOptions::default())
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let consumer = channel
                    .basic_consume(
                        queue.as_str().into(),
                        group.into(),
                        BasicConsumeOptions::default(),
                        lapin::types::FieldTable::default(),
                    )
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                Ok(Feed::RabbitMq(connection, consumer))
            }
        }
    }
}

/// A message read by the demo's consumer.
pub struct Received {
    pub id: Uuid,
    pub payload: Vec<u8>,
    ack: Ack,
}

enum Ack {
    #[cfg(feature = "nats")]
    Nats(Box<async_nats::jetstream::Message>),
    #[cfg(feature = "rabbitmq")]
    RabbitMq(lapin::Acker),
}

/// The consumer side of the demo's broker.
pub enum Feed {
    #[cfg(feature = "nats")]
    Nats(async_nats::jetstream::consumer::pull::Stream),
    #[cfg(feature = "rabbitmq")]
    /// The connection is held so that the consumer's channel stays open.
    RabbitMq(#[allow(dead_code)] lapin::Connection, lapin::Consumer),
}

impl Feed {
    /// The next message; `None` when nothing arrived for `stall`. A read
    /// error is logged and skipped (the broker delivers the message again).
    pub async fn next(&mut self, stall: Duration) -> Result<Option<Received>, Error> {
        loop {
            let Ok(next) = tokio::time::timeout(stall, self.recv()).await else {
                return Ok(None);
            };
            match next {
                Ok(received) => return Ok(Some(received)),
                Err(cause) => tracing::debug!(%cause, "demo consumer error"),
            }
        }
    }

    async fn recv(&mut self) -> Result<Received, String> {
        match self {
            #[cfg(feature = "nats")]
            Feed::Nats(messages) => {
                use futures::StreamExt;
                let message = messages
                    .next()
                    .await
                    .ok_or("the NATS consumer ended")?
                    .map_err(|e| e.to_string())?;
                let id =
                    inbox::nats_message_id(message.headers.as_ref()).map_err(|e| e.to_string())?;
                Ok(Received {
                    id,
                    payload: message.payload.to_vec(),
                    ack: Ack::Nats(Box::new(message)),
                })
            }
            #[cfg(feature = "rabbitmq")]
            Feed::RabbitMq(_, consumer) => {
                use futures::StreamExt;
                let delivery = consumer
                    .next()
                    .await
                    .ok_or("the RabbitMQ consumer ended")?
                    .map_err(|e| e.to_string())?;
                let id =
                    inbox::rabbitmq_message_id(&delivery.properties).map_err(|e| e.to_string())?;
                Ok(Received {
                    id,
                    payload: delivery.data,
                    ack: Ack::RabbitMq(delivery.acker),
                })
            }
        }
    }

    /// Acknowledges `received` (commits its offset) after its effects
    /// committed.
    pub async fn ack(&self, received: Received) -> Result<(), Error> {
        let fail = broker_error("acknowledging a demo message");
        match (self, received.ack) {
            #[cfg(feature = "nats")]
            (_, Ack::Nats(message)) => message.ack().await.map_err(|e| fail(e.to_string())),
            #[cfg(feature = "rabbitmq")]
            (_, Ack::RabbitMq(acker)) => acker
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(|e| fail(e.to_string())),
            #[allow(unreachable_patterns)]
            _ => Err(fail("a message acknowledged on another feed".into())),
        }
    }
}
