//! Where records go. There is one sink, Kafka; it enqueues records and
//! reports each one's fate, and never decides what is confirmed: that is the
//! relay's job.

pub mod kafka;

pub use kafka::{KafkaSink, Outcome};
