//! The demo's broker: the one `--sink` names, started for the demo (Kafka:
//! librdkafka's in-process mock cluster; NATS and RabbitMQ: a throwaway
//! server from the system's binaries) or the one given, with the
//! destination the demo publishes to and reads back through the crate's
//! consumer runtime (`runtime.rs`).

use rdkafka::mocking::MockCluster;

use outbox_relay::config::{KafkaConfig, NatsConfig, RabbitMqConfig, SinkConfig, SinkKind};
use outbox_relay::error::Error;

use super::runtime::Source;

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
                subjects: format!("{name}.>"),
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
        // The group's queue, as the consumer runtime declares it, and the
        // copier's: both exist before the relay's first publish.
        let declare = crate::testkit::rabbitmq::declare_topic_queue;
        declare(config.url.expose(), &exchange, &queue, true).await?;
        declare(
            config.url.expose(),
            &exchange,
            &format!("{queue}.copier"),
            false,
        )
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
                exchange,
                queue,
            },
            sink: SinkConfig::RabbitMq(config),
            _server: server,
        })
    }

    /// Where the demo's consumer reads.
    pub fn source(&self) -> Source {
        self.source.clone()
    }
}
