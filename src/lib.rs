//! `outbox-relay`: publishes every committed row of a Postgres transactional
//! outbox to a broker (Kafka, NATS JetStream or RabbitMQ), at least once, in commit order per aggregate.
//!
//! A [`source`] reads committed outbox rows in the relay's order, a
//! [`sink`] publishes them, and the [`relay`] joins the two: it owns the
//! order of publication and confirms (deletes) only the contiguous prefix of
//! rows the sink reported durable. [`ownership`] keeps one instance active
//! per outbox. [`outbox`] and [`inbox`] are the two library halves a service
//! and its consumers use.
//!
//! Features: with `default-features = false` the crate is the light library
//! a service needs ([`outbox`], [`inbox`], [`MIGRATOR`]) and compiles no
//! broker client, HTTP server or replication client. `relay` adds the
//! sources, the loop, leadership and the metrics endpoints, and needs at
//! least one sink: `kafka` (with [`inbox::kafka_message_id`]), `nats`,
//! `rabbitmq` (each also brings its inbox helper alone); `consumer` the
//! exactly-once consumer runtime ([`consumer`], with one broker feature or more); `cli` the binary (with its demo
//! and bench, and their throwaway Postgres, which is not part of the
//! library). The default is all of them.

#[cfg(all(
    feature = "relay",
    not(any(feature = "kafka", feature = "nats", feature = "rabbitmq"))
))]
compile_error!(
    "the relay needs a sink to publish to: enable the \"kafka\", \"nats\" or \"rabbitmq\" feature as well"
);

#[cfg(all(
    feature = "consumer",
    not(any(feature = "kafka", feature = "nats", feature = "rabbitmq"))
))]
compile_error!(
    "the consumer runtime needs a broker to consume from: enable the \"kafka\", \"nats\" or \"rabbitmq\" feature as well"
);

pub mod config;
#[cfg(feature = "consumer")]
pub mod consumer;
pub mod error;
pub mod inbox;
pub mod message;
pub mod outbox;
pub mod target;
#[cfg(feature = "trace-context")]
pub mod trace_context;

#[cfg(feature = "relay")]
pub mod database;
#[cfg(feature = "relay")]
pub mod dead_letter;
#[cfg(feature = "relay")]
pub mod metrics;
#[cfg(feature = "relay")]
pub mod ownership;
#[cfg(feature = "relay")]
pub mod relay;
#[cfg(feature = "relay")]
pub mod sink;
#[cfg(feature = "relay")]
pub mod source;

pub use config::RelayConfig;
pub use error::Error;

/// The migrations that create the outbox, inbox and dead-letter tables.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
