//! Brokers without partitions (NATS JetStream, RabbitMQ): one member of the
//! group receives the messages in the broker's order and spreads them over
//! `max_in_flight` lanes by their key (the aggregate id), so that one
//! aggregate's messages are applied one after another, in order, while
//! different aggregates go concurrently. A lane reports the messages it
//! settled; the driver then acknowledges them at the broker.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::partition::{Applier, Delivery, apply_queue};
use super::{ConsumerConfig, ConsumerError, Handler};

/// The lanes of one member while it receives messages.
pub(crate) struct Lanes {
    queues: Vec<mpsc::UnboundedSender<Delivery>>,
    tasks: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Lanes {
    /// Starts `config.max_in_flight` lanes; the receiver hears the
    /// `offset` (the broker's delivery token) of every settled message.
    pub fn start<H: Handler>(
        applier: &Arc<Applier<H>>,
        config: &ConsumerConfig,
    ) -> (Self, mpsc::UnboundedReceiver<i64>) {
        let (settled, tokens) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..config.max_in_flight {
            let (queue, receiver) = mpsc::unbounded_channel();
            let settled = settled.clone();
            tasks.push(tokio::spawn(apply_queue(
                applier.clone(),
                receiver,
                Arc::new(AtomicUsize::new(0)),
                stop.clone(),
                None,
                config.max_batch,
                move |done: &[Delivery]| {
                    for delivery in done {
                        let _ = settled.send(delivery.message.offset);
                    }
                },
            )));
            queues.push(queue);
        }
        (
            Lanes {
                queues,
                tasks,
                stop,
            },
            tokens,
        )
    }

    /// Queues `delivery` on the lane of `key`.
    pub fn dispatch(&self, key: &[u8], delivery: Delivery) {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let lane = (hasher.finish() % self.queues.len() as u64) as usize;
        // A lane that ended (stopped) drops it: the broker delivers it again.
        let _ = self.queues[lane].send(delivery);
    }

    /// An error when a lane ended without being stopped: its handler
    /// panicked, and its aggregates cannot go on in order.
    pub fn check(&self) -> Result<(), ConsumerError> {
        if self.stop.is_cancelled() || !self.tasks.iter().any(JoinHandle::is_finished) {
            return Ok(());
        }
        let error = "the handler panicked; the consumer stopped, and the messages not applied \
                     will be delivered again"
            .to_string();
        tracing::error!("{error}");
        Err(ConsumerError::Handler(error))
    }

    /// Stops every lane after the message in hand and waits for them (up to
    /// `timeout`, then abandons what still runs: rolled back, delivered
    /// again); returns the tokens settled meanwhile, still to acknowledge.
    pub async fn stop(
        self,
        timeout: Duration,
        settled: &mut mpsc::UnboundedReceiver<i64>,
    ) -> Vec<i64> {
        self.stop.cancel();
        drop(self.queues);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut abandoned = 0;
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
                abandoned += 1;
            }
        }
        if abandoned > 0 {
            warn!(
                lanes = abandoned,
                timeout_ms = timeout.as_millis() as u64,
                "handlers still running at the stop were abandoned; \
                 their messages are rolled back and delivered again"
            );
        }
        let mut left = Vec::new();
        while let Ok(token) = settled.try_recv() {
            left.push(token);
        }
        left
    }
}
