//! Throwaway infrastructure for `outbox-relay demo`, `outbox-relay bench`
//! and the test suite: a Postgres cluster started from the system's binaries
//! in a temp dir. The Kafka side is librdkafka's in-process mock cluster
//! (`rdkafka::mocking::MockCluster`), used directly.
//!
//! Not part of the library: the binary declares this module, and the test
//! harness includes the same files (`tests/support/mod.rs`), so a service
//! that depends on the crate never compiles it.

pub mod postgres;

// Not every user of the module needs both.
#[allow(unused_imports)]
pub use postgres::{StopMode, TempPostgres};
