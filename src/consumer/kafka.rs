//! The runtime on Kafka: one thread polls librdkafka and serves the group's
//! rebalances; each assigned partition has a task that applies its messages
//! in order; offsets are committed only for messages whose transaction
//! committed.
//!
//! The poll thread hands each message to its partition's queue. A queue
//! that grows past `max_queued` pauses the partition at the broker (the
//! fetch position stays at the next message), and resumes it once drained
//! to half, so a partition waiting out a retry never holds the others up
//! nor fills memory. (A resumed partition waits a while for its next fetch;
//! the bound is large enough that the half left hides it.)
//! When partitions are revoked, the poll thread (inside librdkafka's
//! rebalance callback) stops their tasks after the message in hand, waits
//! for them, and commits their offsets synchronously before the group moves
//! them.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metrics::ConsumerStats;
use super::partition::{Applier, Delivery, apply_queue};
use super::{ConsumerConfig, ConsumerError, Handler, Message};
use crate::inbox;

/// How to reach Kafka: bootstrap servers and librdkafka consumer
/// properties (SASL, TLS, `session.timeout.ms`, ...).
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    brokers: String,
    properties: Vec<(String, String)>,
}

/// Properties the runtime sets itself: committing is its job.
const OWN_PROPERTIES: [&str; 4] = [
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "bootstrap.servers",
];

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            properties: Vec::new(),
        }
    }

    /// One librdkafka consumer property; later values win.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    fn client_config(&self, config: &ConsumerConfig) -> Result<ClientConfig, ConsumerError> {
        if self.brokers.trim().is_empty() {
            return Err(ConsumerError::Config(
                "no Kafka bootstrap servers; give HOST:PORT[,HOST:PORT...]".into(),
            ));
        }
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Incremental rebalances: a member joining or leaving moves only
            // the partitions that change hands, and their offsets are
            // committed while the group is stable (an eager rebalance
            // revokes everything, and brokers may refuse the commit then).
            .set("partition.assignment.strategy", "cooperative-sticky");
        if config.metrics_address.is_some() {
            // The lag gauges come from librdkafka's statistics.
            client.set("statistics.interval.ms", "5000");
        }
        for (key, value) in &self.properties {
            if OWN_PROPERTIES.contains(&key.as_str()) {
                return Err(ConsumerError::Config(format!(
                    "Kafka property {key} is set by the consumer runtime (offsets are committed \
                     only after the database commit); remove it"
                )));
            }
            client.set(key, value);
        }
        Ok(client)
    }
}

/// Runs a consumer group member on Kafka until `shutdown` resolves, then
/// finishes the messages in hand, commits their offsets and leaves the group.
pub async fn run_kafka<H: Handler>(
    pool: PgPool,
    config: ConsumerConfig,
    kafka: KafkaSettings,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConsumerError> {
    KafkaConsumer::new(pool, config, kafka, handler)?
        .run(shutdown)
        .await
}

/// A consumer group member on Kafka, for callers that want its
/// [`ConsumerStats`] while it runs.
pub struct KafkaConsumer<H: Handler> {
    consumer: BaseConsumer<Rebalancer<H>>,
    shared: Arc<Shared<H>>,
}

impl<H: Handler> KafkaConsumer<H> {
    /// Checks the settings and creates the Kafka client (it connects when
    /// run).
    pub fn new(
        pool: PgPool,
        config: ConsumerConfig,
        kafka: KafkaSettings,
        handler: H,
    ) -> Result<Self, ConsumerError> {
        config.validate()?;
        let client = kafka.client_config(&config)?;
        let shared = Arc::new(Shared {
            applier: Applier::new(pool, &config, handler),
            gate: Arc::new(Semaphore::new(config.max_in_flight)),
            partitions: Mutex::new(HashMap::new()),
            done: Arc::new(Mutex::new(HashMap::new())),
            assigned: Mutex::new(HashSet::new()),
            paused: AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::try_current().map_err(|_| {
                ConsumerError::Config(
                    "the consumer runtime must be created inside a Tokio runtime".into(),
                )
            })?,
            config,
        });
        let consumer: BaseConsumer<Rebalancer<H>> = client
            .create_with_context(Rebalancer {
                shared: shared.clone(),
            })
            .map_err(|e| ConsumerError::Config(format!("the Kafka consumer settings: {e}")))?;
        let topics: Vec<&str> = shared.config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| ConsumerError::Broker(format!("subscribing to {topics:?}: {e}")))?;
        Ok(KafkaConsumer { consumer, shared })
    }

    pub fn stats(&self) -> ConsumerStats {
        self.shared.applier.stats.clone()
    }

    /// Runs until `shutdown` resolves (see [`run_kafka`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ConsumerError> {
        super::check_tables(&self.shared.applier.pool).await?;
        let stop = CancellationToken::new();
        let background =
            super::start_background(&self.shared.applier, &self.shared.config, &stop).await?;
        info!(
            group = %self.shared.config.group,
            topics = ?self.shared.config.topics,
            max_in_flight = self.shared.config.max_in_flight,
            "consumer started"
        );
        let poll_stop = stop.clone();
        let KafkaConsumer {
            consumer, shared, ..
        } = self;
        // The thread reports its end on a channel rather than being joined,
        // so that a runtime shutting down never waits on it; dropping this
        // future stops it too.
        let (finished, mut poll_ended) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("outbox-consumer".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    poll(consumer, shared, poll_stop)
                }));
                let _ = finished.send(match outcome {
                    Ok(ended) => ended,
                    Err(_) => Err(ConsumerError::Broker(
                        "the Kafka poll thread panicked".into(),
                    )),
                });
            })
            .map_err(|e| ConsumerError::Broker(format!("starting the poll thread: {e}")))?;
        let _stop_on_drop = stop.clone().drop_guard();
        let ended = tokio::select! {
            () = shutdown => None,
            ended = &mut poll_ended => Some(ended),
        };
        stop.cancel();
        let ended = match ended {
            Some(ended) => ended,
            None => poll_ended.await,
        }
        .unwrap_or_else(|_| Err(ConsumerError::Broker("the Kafka poll thread ended".into())));
        for task in background {
            let _ = task.await;
        }
        if ended.is_ok() {
            info!("consumer stopped");
        }
        ended
    }
}

/// What the poll thread, the rebalance callback and the partition tasks
/// share.
struct Shared<H: Handler> {
    applier: Arc<Applier<H>>,
    config: ConsumerConfig,
    /// One permit per partition being applied (`max_in_flight`).
    gate: Arc<Semaphore>,
    partitions: Mutex<HashMap<(String, i32), Worker>>,
    /// Per partition, the offset after the last settled message, not yet
    /// committed.
    done: Arc<Mutex<HashMap<(String, i32), i64>>>,
    /// The partitions the group gave this member.
    assigned: Mutex<HashSet<(String, i32)>>,
    /// How many partitions are paused: the poll loop looks for drained
    /// ones only when some are.
    paused: AtomicUsize,
    runtime: tokio::runtime::Handle,
}

/// One partition's task and its queue.
struct Worker {
    queue: mpsc::UnboundedSender<Delivery>,
    queued: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    paused: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-written.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<H: Handler> Shared<H> {
    /// Messages a partition may have queued before it is paused.
    fn queue_bound(&self) -> usize {
        self.config.max_queued.max(2 * self.config.max_batch)
    }

    fn dispatch(&self, consumer: &BaseConsumer<Rebalancer<H>>, record: &BorrowedMessage<'_>) {
        let delivery = delivery(record);
        let key = (delivery.message.topic.clone(), delivery.message.partition);
        let mut partitions = lock(&self.partitions);
        let worker = partitions
            .entry(key.clone())
            .or_insert_with(|| self.start_worker(key.clone()));
        let queued = worker.queued.fetch_add(1, Ordering::SeqCst) + 1;
        if worker.queue.send(delivery).is_err() {
            // The task ended (stopped); the message is redelivered to
            // whoever holds the partition next.
            return;
        }
        if queued >= self.queue_bound() && !worker.paused {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&key.0, key.1);
            match consumer.pause(&tpl) {
                Ok(()) => {
                    worker.paused = true;
                    self.paused.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => debug!(topic = %key.0, partition = key.1, error = %e, "cannot pause"),
            }
        }
    }

    fn start_worker(&self, key: (String, i32)) -> Worker {
        let (queue, receiver) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let done = self.done.clone();
        let task = self.runtime.spawn(apply_queue(
            self.applier.clone(),
            receiver,
            queued.clone(),
            stop.clone(),
            Some(self.gate.clone()),
            self.config.max_batch,
            move |settled: &[Delivery]| {
                if let Some(last) = settled.last() {
                    lock(&done).insert(key.clone(), last.message.offset + 1);
                }
            },
        ));
        Worker {
            queue,
            queued,
            stop,
            task,
            paused: false,
        }
    }

    /// A partition whose task ended without being stopped (its handler
    /// panicked).
    fn panicked(&self) -> Option<(String, i32)> {
        lock(&self.partitions)
            .iter()
            .find(|(_, worker)| worker.task.is_finished())
            .map(|(key, _)| key.clone())
    }

    /// Resumes paused partitions whose queues drained to half their bound.
    fn resume_drained(&self, consumer: &BaseConsumer<Rebalancer<H>>) {
        if self.paused.load(Ordering::SeqCst) == 0 {
            return;
        }
        let bound = self.queue_bound();
        for ((topic, partition), worker) in lock(&self.partitions).iter_mut() {
            if worker.paused && worker.queued.load(Ordering::SeqCst) <= bound / 2 {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, *partition);
                if consumer.resume(&tpl).is_ok() {
                    worker.paused = false;
                    self.paused.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Commits the offsets of settled messages of `only` (every partition
    /// with `None`).
    fn commit(
        &self,
        consumer: &BaseConsumer<Rebalancer<H>>,
        only: Option<&[(String, i32)]>,
        mode: CommitMode,
    ) {
        let offsets: Vec<((String, i32), i64)> = {
            let mut done = lock(&self.done);
            match only {
                None => done.drain().collect(),
                Some(keys) => keys
                    .iter()
                    .filter_map(|key| done.remove(key).map(|offset| (key.clone(), offset)))
                    .collect(),
            }
        };
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &offsets {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            // Not lost: the messages are redelivered and the inbox skips
            // them. Kafka refuses commits from a member caught in a
            // rebalance; the next owner starts from the last good commit.
            debug!(error = %e, offsets = offsets.len(), "committing offsets failed");
            self.applier.stats.commit_failed();
            // Tried again with the next commit (a revoke's, at the latest),
            // unless newer offsets are there already.
            let mut done = lock(&self.done);
            for (key, offset) in offsets {
                done.entry(key).or_insert(offset);
            }
        }
    }

    /// Stops the tasks of `keys` after the message in hand, waits for them
    /// (up to `revoke_timeout`, then abandons what runs: rolled back and
    /// delivered again), and commits what they settled.
    fn stop_partitions(
        &self,
        consumer: &BaseConsumer<Rebalancer<H>>,
        keys: &[(String, i32)],
        commit: bool,
    ) {
        let workers: Vec<((String, i32), Worker)> = {
            let mut partitions = lock(&self.partitions);
            keys.iter()
                .filter_map(|key| partitions.remove(key).map(|w| (key.clone(), w)))
                .collect()
        };
        for (_, worker) in &workers {
            worker.stop.cancel();
            if worker.paused {
                self.paused.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let timeout = self.config.revoke_timeout;
        let abandoned = self.runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut abandoned = 0;
            for (_, worker) in workers {
                let task = worker.task;
                tokio::pin!(task);
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    task.abort();
                    let _ = task.await;
                    abandoned += 1;
                }
            }
            abandoned
        });
        if abandoned > 0 {
            warn!(
                partitions = abandoned,
                timeout_ms = timeout.as_millis() as u64,
                "handlers still running when their partitions went were abandoned; \
                 their messages are rolled back and delivered again"
            );
        }
        for (topic, partition) in keys {
            self.applier.stats.forget_partition(topic, *partition);
        }
        if commit {
            self.commit(consumer, Some(keys), CommitMode::Sync);
        }
        // The partitions are gone: what could not be committed is
        // redelivered to their next owner, and the inbox skips it.
        let mut done = lock(&self.done);
        for key in keys {
            done.remove(key);
        }
    }
}

/// A Kafka record as the runtime's message.
fn delivery(record: &BorrowedMessage<'_>) -> Delivery {
    let headers: Vec<(String, Option<Vec<u8>>)> = record
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    let (id, id_error) = match inbox::kafka_message_id(record) {
        Ok(id) => (id, None),
        Err(e) => (uuid::Uuid::nil(), Some(e.to_string())),
    };
    Delivery {
        message: Message {
            id,
            topic: record.topic().to_string(),
            partition: record.partition(),
            offset: record.offset(),
            key: record.key().map(<[u8]>::to_vec),
            headers,
            payload: record.payload().map(<[u8]>::to_vec),
            failed_attempts: 0,
        },
        id_error,
    }
}

/// The poll thread: messages to their partitions, paused partitions
/// resumed, offsets committed every `commit_interval`; at `stop`, every
/// partition stopped and committed, then the group left.
fn poll<H: Handler>(
    consumer: BaseConsumer<Rebalancer<H>>,
    shared: Arc<Shared<H>>,
    stop: CancellationToken,
) -> Result<(), ConsumerError> {
    let mut last_commit = Instant::now();
    let mut last_error = String::new();
    let mut ended = Ok(());
    while !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(record)) => shared.dispatch(&consumer, &record),
            Some(Err(e)) => {
                let error = e.to_string();
                if error != last_error {
                    warn!(error = %error, "Kafka");
                    last_error = error;
                }
            }
            None => {}
        }
        shared.resume_drained(&consumer);
        // A partition task ends only when told to, unless the handler
        // panicked: its partition cannot go on in order, so the consumer
        // stops (committing only what was applied) and the messages are
        // delivered again to whoever runs next.
        if let Some((topic, partition)) = shared.panicked() {
            let error = format!(
                "the handler panicked on partition {topic}[{partition}]; the consumer stopped, \
                 and the partition's messages from the first one not applied will be delivered again"
            );
            tracing::error!("{error}");
            ended = Err(ConsumerError::Handler(error));
            break;
        }
        if last_commit.elapsed() >= shared.config.commit_interval {
            shared.commit(&consumer, None, CommitMode::Sync);
            last_commit = Instant::now();
        }
    }
    let keys: Vec<(String, i32)> = lock(&shared.partitions).keys().cloned().collect();
    shared.stop_partitions(&consumer, &keys, true);
    shared.commit(&consumer, None, CommitMode::Sync);
    consumer.unsubscribe();
    // Dropping the consumer leaves the group (librdkafka's close).
    drop(consumer);
    ended
}

/// Serves the group's rebalances on the poll thread.
struct Rebalancer<H: Handler> {
    shared: Arc<Shared<H>>,
}

impl<H: Handler> ClientContext for Rebalancer<H> {
    fn stats(&self, statistics: Statistics) {
        let assigned = lock(&self.shared.assigned);
        for (topic, partitions) in &statistics.topics {
            for (partition, p) in &partitions.partitions {
                if !assigned.contains(&(topic.clone(), *partition)) || p.hi_offset < 0 {
                    continue;
                }
                // Nothing committed yet: every message the partition holds.
                let lag = if p.committed_offset >= 0 {
                    p.hi_offset - p.committed_offset
                } else {
                    p.hi_offset - p.lo_offset.max(0)
                };
                self.shared
                    .applier
                    .stats
                    .set_lag(topic, *partition, lag.max(0));
            }
        }
    }
}

impl<H: Handler> ConsumerContext for Rebalancer<H> {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => debug!(offsets = ?offsets.to_topic_map(), "offsets committed"),
            Err(e) => {
                debug!(error = %e, offsets = ?offsets.to_topic_map(), "committing offsets failed")
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let keys: Vec<(String, i32)> = revoked
                .elements()
                .iter()
                .map(|p| (p.topic().to_string(), p.partition()))
                .collect();
            // A lost assignment (the session expired) cannot commit: the
            // partitions may already be someone else's.
            let lost = consumer.assignment_lost();
            self.shared.applier.stats.revoking();
            info!(partitions = %describe(&keys), lost, "partitions revoked");
            {
                let mut assigned = lock(&self.shared.assigned);
                for key in &keys {
                    assigned.remove(key);
                }
            }
            self.shared.stop_partitions(consumer, &keys, !lost);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let keys: Vec<(String, i32)> = assigned
                    .elements()
                    .iter()
                    .map(|p| (p.topic().to_string(), p.partition()))
                    .collect();
                info!(partitions = %describe(&keys), "partitions assigned");
                lock(&self.shared.assigned).extend(keys);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
        }
        let held = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.shared.applier.stats.set_partitions(held);
    }
}

fn describe(keys: &[(String, i32)]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    keys.iter()
        .map(|(topic, partition)| format!("{topic}[{partition}]"))
        .collect::<Vec<_>>()
        .join(", ")
}
