//! `outbox-relay replay`: the relay loop over a [`ReplaySource`], so that a
//! replay has the live relay's guarantees (order per aggregate within the
//! replay, the idempotent producer, retries with backoff, a contiguous
//! acknowledged prefix) and none of its progress.

use super::*;
use crate::source::ReplaySource;

/// Republishes the rows `source` reads until every one was acknowledged, or
/// `stop` fires (the source fires it itself once done). A row the broker
/// rejects for good ends the replay with an error naming it: the original
/// was published, and a replay is an operator's action, so it is reported,
/// never dead-lettered.
pub async fn replay(
    mut config: RelayConfig,
    source: ReplaySource,
    stop: CancellationToken,
) -> Result<RunStats, Error> {
    config.on_poison = PoisonPolicy::Halt;
    let sink = config.sink.clone();
    match &sink {
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(kafka) => {
            let sink = crate::sink::KafkaSink::new(kafka)?;
            Relay::new(config, source, sink, Metrics::new())
                .run(stop)
                .await
        }
        #[cfg(feature = "nats")]
        SinkConfig::Nats(nats) => {
            let sink = crate::sink::NatsSink::new(nats)?;
            Relay::new(config, source, sink, Metrics::new())
                .run(stop)
                .await
        }
        #[cfg(feature = "rabbitmq")]
        SinkConfig::RabbitMq(rabbitmq) => {
            let sink = crate::sink::RabbitMqSink::new(rabbitmq)?;
            Relay::new(config, source, sink, Metrics::new())
                .run(stop)
                .await
        }
        #[allow(unreachable_patterns)]
        other => Err(crate::sink::not_built(other.kind())),
    }
}
