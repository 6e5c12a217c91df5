//! The test harness: one throwaway Postgres per test binary (each test gets
//! its own database), a Kafka per test (librdkafka's mock cluster, or the
//! brokers in `OUTBOX_TEST_BROKERS`), the relay binary as a subprocess,
//! business writers, and a consumer that reads everything back.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
pub use outbox_relay::outbox::{self, Event};
pub use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command};
use uuid::Uuid;

mod certificates;
mod cloudevents;
/// The throwaway Postgres, shared with the binary's demo and bench.
#[path = "../../src/testkit/mod.rs"]
pub mod testkit;
use testkit::TempPostgres;
mod consume;
#[cfg(feature = "consumer")]
mod handler;
mod http;
mod kafka;
mod postgres;
mod python;
mod relay;
mod sinks;
mod tansu;
mod workload;

#[allow(unused_imports)]
pub use certificates::*;
#[allow(unused_imports)]
pub use cloudevents::*;
#[allow(unused_imports)]
pub use consume::*;
#[cfg(feature = "consumer")]
#[allow(unused_imports)]
pub use handler::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use kafka::*;
#[allow(unused_imports)]
pub use postgres::*;
#[allow(unused_imports)]
pub use python::*;
#[allow(unused_imports)]
pub use relay::*;
#[allow(unused_imports)]
pub use sinks::*;
#[allow(unused_imports)]
pub use tansu::*;
#[allow(unused_imports)]
pub use workload::*;

/// Waits for `cond` with a deadline, polling every 50 ms.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !cond().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `examples/NAME`, built by `cargo test` alongside the tests.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test --test ...` does not build examples; \
         run `cargo build --example {name}` first, or plain `cargo test`",
        path.display()
    );
    path
}

/// The example consumer's balances, or none while its table does not
/// exist yet.
pub async fn balances_if_any(pool: &PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("select account, amount from balances")
        .fetch_all(pool)
        .await
        .map(|rows| rows.into_iter().collect())
        .unwrap_or_default()
}
