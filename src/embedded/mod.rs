//! Throwaway infrastructure for `outbox-relay demo` and the test suite: a
//! Postgres cluster started from the system's binaries in a temp dir. The
//! Kafka side is librdkafka's in-process mock cluster
//! (`rdkafka::mocking::MockCluster`), used directly.

pub mod postgres;

pub use postgres::{StopMode, TempPostgres};
