//! `outbox-relay`: publishes every committed row of a Postgres transactional
//! outbox to Kafka, at least once, in commit order per aggregate.
//!
//! A [`source`] reads committed outbox rows in the relay's order, the
//! [`sink`] publishes them as Kafka records, and the [`relay`] joins the two:
//! it owns the order of publication and confirms (deletes) only the
//! contiguous prefix of rows that Kafka acknowledged. [`outbox`] and
//! [`inbox`] are the two library halves a service and its consumers use.

pub mod bench;
pub mod cli;
pub mod config;
pub mod database;
pub mod dead_letter;
pub mod demo;
pub mod embedded;
pub mod error;
pub mod inbox;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod ownership;
pub mod relay;
pub mod sink;
pub mod source;

pub use config::RelayConfig;
pub use error::Error;

/// The migrations that create the outbox, inbox and dead-letter tables.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
