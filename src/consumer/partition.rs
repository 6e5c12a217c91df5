//! Applying one partition's messages, whatever the broker: the inbox claim
//! and the handler in one transaction, batches, retries and dead letters.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::dead_letters;
use super::metrics::ConsumerStats;
use super::{ErrorKind, Handler, HandlerError, Message, RetryPolicy};
use crate::inbox::{self, Claim};

/// A message as delivered, before the handler sees it.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub message: Message,
    /// Why the message has no usable id (it is dead-lettered unseen).
    pub id_error: Option<String>,
}

/// The longest wait between tries while the database is unreachable.
const UNAVAILABLE_BACKOFF: Duration = Duration::from_secs(5);

const CLAIM_ALL: &str = "insert into inbox (consumer_group, message_id) \
     select $1, unnest($2::uuid[]) on conflict do nothing returning message_id";

/// Applies messages for one consumer group; shared by every partition.
pub(crate) struct Applier<H> {
    pub pool: PgPool,
    pub group: String,
    pub handler: Arc<H>,
    pub retry: RetryPolicy,
    pub stats: ConsumerStats,
}

/// Why a batch failed.
enum Failure {
    /// The handler failed on the message at this index of the batch.
    At(usize, HandlerError),
    /// The runtime's own statements failed (begin, claim, commit).
    Database(sqlx::Error),
}

/// What became of one message.
enum Outcome {
    Applied,
    Duplicate,
}

impl<H: Handler> Applier<H> {
    /// The applier of `config.group`, with its own statistics.
    pub fn new(pool: PgPool, config: &super::ConsumerConfig, handler: H) -> Arc<Self> {
        Arc::new(Applier {
            pool,
            group: config.group.clone(),
            handler: Arc::new(handler),
            retry: config.retry,
            stats: ConsumerStats::new(&config.group),
        })
    }

    /// Applies `batch` (messages of one partition, in offset order) and
    /// returns how many of them, from the front, are settled: applied,
    /// skipped as already applied, or dead-lettered. Fewer than all only when
    /// `stop` fired; the rest must be delivered again.
    ///
    /// Messages go together, in one transaction, as long as they succeed.
    /// When one fails, the batch is rolled back, the messages before it are
    /// applied together again, and it goes on alone with that failure
    /// counted as its first attempt.
    pub async fn apply(&self, batch: &mut [Delivery], stop: &CancellationToken) -> usize {
        let mut done = 0;
        // At most this many together next (shrunk to just before a failure).
        let mut cap = batch.len();
        // The failure already seen for the message at this index.
        let mut known: Option<(usize, HandlerError)> = None;
        let mut alone = false;
        while done < batch.len() {
            if stop.is_cancelled() {
                return done;
            }
            let failed_here = known.as_ref().is_some_and(|(at, _)| *at == done);
            let together = if failed_here || alone {
                1
            } else {
                batch[done..]
                    .iter()
                    .take(cap)
                    .take_while(|d| d.id_error.is_none())
                    .count()
            };
            alone = false;
            if together > 1 {
                match self.apply_together(&batch[done..done + together]).await {
                    Ok(()) => {
                        done += together;
                        cap = batch.len();
                    }
                    Err(Failure::At(at, error)) => {
                        debug!(
                            group = %self.group, messages = together, error = %error,
                            "a message failed in a batch; the batch is applied up to it"
                        );
                        known = Some((done + at, error));
                        cap = at;
                    }
                    // The database: one at a time, with its retries.
                    Err(Failure::Database(error)) => {
                        debug!(group = %self.group, error = %error, "a batch failed; one at a time");
                        alone = true;
                    }
                }
                continue;
            }
            let failure = match known.take() {
                Some((at, error)) if at == done => Some(error),
                other => {
                    known = other;
                    None
                }
            };
            if !self.apply_one(&mut batch[done], failure, stop).await {
                return done;
            }
            done += 1;
            cap = batch.len();
        }
        done
    }

    /// Every message of `batch` in one transaction: one inbox statement,
    /// the handler for the new ones, in order.
    async fn apply_together(&self, batch: &[Delivery]) -> Result<(), Failure> {
        let mut ids: Vec<Uuid> = batch.iter().map(|d| d.message.id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut tx = self.pool.begin().await.map_err(Failure::Database)?;
        let mut new: HashSet<Uuid> = sqlx::query_scalar(CLAIM_ALL)
            .bind(&self.group)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(Failure::Database)?
            .into_iter()
            .collect();
        let mut applied: u64 = 0;
        for (at, delivery) in batch.iter().enumerate() {
            // The first copy of an id in the batch applies; later ones and
            // ids already in the inbox are duplicates.
            if new.remove(&delivery.message.id) {
                traced(
                    &self.group,
                    &delivery.message,
                    self.handler.handle(&mut tx, &delivery.message),
                )
                .await
                .map_err(|e| Failure::At(at, e))?;
                applied += 1;
            }
        }
        tx.commit().await.map_err(Failure::Database)?;
        self.stats.settled(applied, batch.len() - applied as usize);
        Ok(())
    }

    /// One message with its retries, `failure` being the outcome of a first
    /// attempt already made; false when `stop` fired first (the message is
    /// left unsettled).
    async fn apply_one(
        &self,
        delivery: &mut Delivery,
        mut failure: Option<HandlerError>,
        stop: &CancellationToken,
    ) -> bool {
        if let Some(error) = delivery.id_error.clone() {
            return self.dead_letter(delivery, &error, 0, stop).await;
        }
        let mut unreachable_for = 0;
        loop {
            let attempt = match failure.take() {
                Some(error) => Err(error),
                None => self.try_once(&delivery.message).await,
            };
            let error = match attempt {
                Ok(Outcome::Applied) => {
                    self.stats.settled(1, 0);
                    return true;
                }
                Ok(Outcome::Duplicate) => {
                    self.stats.settled(0, 1);
                    return true;
                }
                Err(error) => error,
            };
            let message = &mut delivery.message;
            let wait = match error.kind() {
                ErrorKind::Unavailable => {
                    unreachable_for += 1;
                    warn!(
                        group = %self.group, topic = %message.topic, partition = message.partition,
                        offset = message.offset, error = %error,
                        "the database is unreachable; the partition waits and tries again"
                    );
                    self.retry.backoff(unreachable_for).min(UNAVAILABLE_BACKOFF)
                }
                ErrorKind::Permanent => {
                    self.stats.handler_failed();
                    message.failed_attempts += 1;
                    let attempts = message.failed_attempts;
                    return self
                        .dead_letter(delivery, &error.to_string(), attempts, stop)
                        .await;
                }
                ErrorKind::Transient => {
                    self.stats.handler_failed();
                    unreachable_for = 0;
                    message.failed_attempts += 1;
                    if message.failed_attempts >= self.retry.max_attempts {
                        let attempts = message.failed_attempts;
                        let error = format!("{error} (after {attempts} attempts)");
                        return self.dead_letter(delivery, &error, attempts, stop).await;
                    }
                    let wait = self.retry.backoff(message.failed_attempts);
                    debug!(
                        group = %self.group, topic = %message.topic, partition = message.partition,
                        offset = message.offset, attempt = message.failed_attempts, error = %error,
                        wait_ms = wait.as_millis() as u64, "the handler failed; retrying"
                    );
                    wait
                }
            };
            if !pause(wait, stop).await {
                return false;
            }
        }
    }

    /// Claim, handler, commit: once.
    async fn try_once(&self, message: &Message) -> Result<Outcome, HandlerError> {
        let mut tx = self.pool.begin().await?;
        if inbox::claim(&mut tx, &self.group, message.id).await? == Claim::Duplicate {
            tx.commit().await?;
            return Ok(Outcome::Duplicate);
        }
        // Dropping `tx` on an error rolls the claim back with the effects.
        traced(&self.group, message, self.handler.handle(&mut tx, message)).await?;
        tx.commit().await?;
        Ok(Outcome::Applied)
    }

    /// Moves `delivery` to the dead-letter table, retrying while the
    /// database is unreachable; false when `stop` fired first.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        error: &str,
        attempts: u32,
        stop: &CancellationToken,
    ) -> bool {
        let message = &delivery.message;
        let id = delivery.id_error.is_none().then_some(message.id);
        let mut tries = 0;
        loop {
            match dead_letters::insert(&self.pool, &self.group, message, id, error, attempts).await
            {
                Ok(()) => {
                    self.stats.dead_lettered_one();
                    warn!(
                        group = %self.group, topic = %message.topic, partition = message.partition,
                        offset = message.offset, id = ?id, attempts, error,
                        "dead-lettered a message; its partition moves on \
                         (outbox-relay consumer-dead-letters list)"
                    );
                    return true;
                }
                Err(e) => {
                    tries += 1;
                    warn!(
                        group = %self.group, topic = %message.topic, partition = message.partition,
                        offset = message.offset, error = %e,
                        "cannot write a dead letter; the partition waits and tries again"
                    );
                    if !pause(self.retry.backoff(tries).min(UNAVAILABLE_BACKOFF), stop).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// Applies one queue of messages (a Kafka partition, a lane of a broker
/// without partitions) in order: the messages ready at once go as one batch,
/// while holding a permit of `gate` (when there is one). `settled` hears of
/// each batch's settled prefix. Ends when `stop` fires or the queue closes,
/// or after a batch left unsettled (`stop` fired in it): the rest must be
/// delivered again.
pub(crate) async fn apply_queue<H: Handler>(
    applier: Arc<Applier<H>>,
    mut queue: mpsc::UnboundedReceiver<Delivery>,
    queued: Arc<AtomicUsize>,
    stop: CancellationToken,
    gate: Option<Arc<Semaphore>>,
    max_batch: usize,
    mut settled: impl FnMut(&[Delivery]) + Send + 'static,
) {
    loop {
        let first = tokio::select! {
            first = queue.recv() => first,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        queued.fetch_sub(batch.len(), Ordering::SeqCst);
        let _permit = match &gate {
            None => None,
            Some(gate) => tokio::select! {
                permit = gate.acquire() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            },
        };
        let done = applier.apply(&mut batch, &stop).await;
        if done > 0 {
            settled(&batch[..done]);
        }
        if done < batch.len() {
            return;
        }
    }
}

/// The handler's run, in a consumer span continuing the message's trace
/// (feature `trace-context`).
pub(crate) async fn traced<T>(
    group: &str,
    message: &Message,
    handling: impl std::future::Future<Output = Result<T, HandlerError>>,
) -> Result<T, HandlerError> {
    #[cfg(feature = "trace-context")]
    {
        crate::trace_context::in_consumer_span(group, message, handling).await
    }
    #[cfg(not(feature = "trace-context"))]
    {
        let _ = (group, message);
        handling.await
    }
}

/// Waits `wait`, or less when `stop` fires (then false).
async fn pause(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stop.cancelled() => false,
    }
}
