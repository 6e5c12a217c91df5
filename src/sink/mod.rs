//! Where messages go. A sink publishes each [`Message`] the relay hands it,
//! in the order handed, and reports every message's fate as an [`Outcome`].
//! It never decides what is confirmed: the relay walks the outcomes in
//! order and confirms only a contiguous prefix.
//!
//! A new broker is one folder here with a type that implements [`Sink`].
//! What it must promise, because the relay's guarantees rest on it:
//!
//! - **Order within a key.** Messages with the same key are stored in the
//!   order they were sent, and when one fails, every later message with that
//!   key sent before the failure was reported fails too, so resending from
//!   the first failure never lands a later event before an earlier one
//!   (Kafka: the idempotent producer with `enable.gapless.guarantee`).
//! - **Acknowledged means durable.** [`Outcome::Acked`] only once the broker
//!   took responsibility for the message (Kafka: `acks=all`). The relay then
//!   deletes the row.
//! - **Rejected means never.** [`Outcome::Rejected`] only for a message no
//!   retry can deliver (too large, an impossible destination, not
//!   authorized); it goes to `--on-poison`. Everything else is
//!   [`Outcome::Failed`] and is sent again. A message refused before it
//!   reached the broker is [`Sent::Refused`], known at once, so that under
//!   `block-aggregate` the aggregate's later messages are never sent; one
//!   not handed over for a transient reason is [`Sent::NotSent`], and the
//!   relay sends nothing after it, which could overtake it.
//! - **Bounded waiting.** Every sent message resolves within
//!   [`Sink::delivery_timeout`]; the relay renews its lease while it waits
//!   that long and no longer.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::SinkKind;
use crate::error::Error;
pub use crate::message::Message;

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;

#[cfg(feature = "kafka")]
pub use kafka::KafkaSink;
#[cfg(feature = "nats")]
pub use nats::NatsSink;
#[cfg(feature = "rabbitmq")]
pub use rabbitmq::RabbitMqSink;

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker took responsibility for it (Kafka: written to all in-sync
    /// replicas).
    Acked,
    /// The broker will never take this message (too large, invalid topic,
    /// not authorized); retrying cannot help.
    Rejected(String),
    /// Not written this time (broker down, timeout); retry later.
    Failed(String),
}

/// A message handed to a sink.
pub enum Sent<A> {
    /// On its way; the future resolves to its outcome.
    Enqueued(A),
    /// Refused for good before it reached the broker, with the reason.
    Refused(String),
    /// Not handed to the broker this time (a transient local error). The
    /// relay sends nothing more of the batch: a later message with the same
    /// key must not overtake this one.
    NotSent(String),
}

impl<A: Future<Output = Outcome>> Sent<A> {
    /// Whether the message was refused for good without asking the broker.
    pub fn refused(&self) -> bool {
        matches!(self, Sent::Refused(_))
    }

    /// Waits for the message's outcome.
    pub async fn outcome(self) -> Outcome {
        match self {
            Sent::Enqueued(ack) => ack.await,
            Sent::Refused(reason) => Outcome::Rejected(reason),
            Sent::NotSent(reason) => Outcome::Failed(reason),
        }
    }
}

/// A broker client the relay publishes through.
pub trait Sink: Send {
    /// Resolves to a sent message's outcome.
    type Ack: Future<Output = Outcome> + Send;

    /// The broker's name, for logs and `/readyz`.
    fn name(&self) -> &'static str;

    /// Hands `message` to the broker after every message sent before it.
    /// Waits while the client's own queue is full (backpressure), never
    /// for the broker's answer.
    fn send(&self, message: &Message) -> impl Future<Output = Sent<Self::Ack>> + Send;

    /// Waits until the broker answers, saying once why it does not; false
    /// if `shutdown` fired first.
    fn wait_until_reachable(
        &self,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = bool> + Send;

    /// The longest a sent message may take to resolve.
    fn delivery_timeout(&self) -> Duration;

    /// Asked after a message failed: whether this client is broken (a fatal
    /// error, or wedged) and must be replaced before sending more.
    fn is_broken(&self) -> bool;

    /// Replaces the client with a new one (new connections, a new producer
    /// identity). The relay resends from the first unconfirmed message.
    fn replace(&mut self) -> Result<(), Error>;
}

/// Runs `probe` until it succeeds, with capped exponential backoff (0.5 s
/// doubling to 30 s), for [`Sink::wait_until_reachable`]. The first failure
/// is logged once, as `warning(cause)` says it, and a later success says
/// the broker is back. False if `shutdown` fired first.
pub(crate) async fn until_reachable<F, Fut>(
    shutdown: &CancellationToken,
    broker: &str,
    endpoint: &str,
    mut probe: F,
    warning: impl Fn(&str) -> String,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut delay = Duration::from_millis(500);
    let mut warned = false;
    loop {
        match probe().await {
            Ok(()) => {
                if warned {
                    tracing::info!(endpoint, "{broker} is reachable again");
                } else {
                    tracing::debug!(endpoint, "{broker} is reachable");
                }
                return true;
            }
            Err(cause) if !warned => {
                tracing::warn!(endpoint, "{}", warning(&cause));
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The error for a sink this build does not include.
#[allow(dead_code)]
pub(crate) fn not_built(kind: SinkKind) -> Error {
    Error::Config(format!(
        "this build of outbox-relay has no {} sink; build it with the \"{kind}\" feature (cargo build --features {kind})",
        kind.name()
    ))
}

/// When a producer last had a record acknowledged, or was created.
pub(crate) struct LastAck {
    created: Instant,
    /// Milliseconds after `created`.
    at: AtomicU64,
}

impl LastAck {
    pub(crate) fn new() -> Self {
        LastAck {
            created: Instant::now(),
            at: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self) {
        let now = self.created.elapsed().as_millis() as u64;
        self.at.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn age(&self) -> Duration {
        let at = Duration::from_millis(self.at.load(Ordering::Relaxed));
        self.created.elapsed().saturating_sub(at)
    }
}
