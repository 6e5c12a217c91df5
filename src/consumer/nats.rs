//! The runtime on NATS JetStream.
//!
//! JetStream hands a pull consumer's messages to whichever client asks, and
//! redelivers an unacknowledged one only when its ack wait expires, after
//! newer messages went out: two members, or one member after another's
//! crash, would apply an aggregate's messages out of order. So one member
//! of a group receives at a time: the holder of the group's row in
//! `consumer_member` (a lease in Postgres, renewed every third of it). On
//! taking over, a member creates a durable consumer of its own, named
//! `GROUP-EPOCH`, that starts right after the ack floor of the previous
//! member's consumer (every message at or below it was applied), and
//! deletes the older ones: the previous member, if it still runs, can read
//! nothing more, and every message it left unacknowledged comes again, in
//! stream order, ahead of the newer ones. Those it did apply are skipped by
//! the inbox.
//!
//! Inside the member, messages are spread over lanes by their
//! `aggregate_id` header ([`super::lanes`]) and acknowledged once settled.
//! A message JetStream redelivers while a lane still holds it (a long retry
//! outlasting the ack wait) is not queued twice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::lanes::Lanes;
use super::membership::{Held, Membership};
use super::metrics::ConsumerStats;
use super::partition::{Applier, Delivery};
use super::{ConsumerConfig, ConsumerError, Handler, Message};
use crate::inbox;
use crate::message::HEADER_AGGREGATE_ID;

/// How to reach NATS: the server URL, the stream to read, and the client's
/// options (credentials, TLS).
#[derive(Clone)]
pub struct NatsSettings {
    url: String,
    stream: String,
    options: Arc<dyn Fn() -> async_nats::ConnectOptions + Send + Sync>,
    ack_wait: Duration,
    lease: Duration,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("stream", &self.stream)
            .field("ack_wait", &self.ack_wait)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl NatsSettings {
    /// The server (`nats://HOST:PORT`, several comma-separated) and the
    /// JetStream stream that holds the topics' subjects.
    pub fn new(url: impl Into<String>, stream: impl Into<String>) -> Self {
        NatsSettings {
            url: url.into(),
            stream: stream.into(),
            options: Arc::new(async_nats::ConnectOptions::new),
            ack_wait: Duration::from_secs(30),
            lease: Duration::from_secs(10),
        }
    }

    /// How to make the client's options (credentials, TLS, ...), called for
    /// every connection.
    pub fn connect_options(
        mut self,
        options: impl Fn() -> async_nats::ConnectOptions + Send + Sync + 'static,
    ) -> Self {
        self.options = Arc::new(options);
        self
    }

    /// How long JetStream waits for an acknowledgement before it delivers a
    /// message again; default 30 s.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// How long a member that stopped renewing the group's row (killed,
    /// frozen, cut off from Postgres) keeps it before another takes over;
    /// default 10 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

/// Runs a consumer group member on NATS JetStream until `shutdown`
/// resolves; see [`NatsConsumer`].
pub async fn run_nats<H: Handler>(
    pool: PgPool,
    config: ConsumerConfig,
    nats: NatsSettings,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConsumerError> {
    NatsConsumer::new(pool, config, nats, handler)?
        .run(shutdown)
        .await
}

/// A consumer group member on NATS JetStream.
pub struct NatsConsumer<H: Handler> {
    applier: Arc<Applier<H>>,
    config: ConsumerConfig,
    settings: NatsSettings,
}

/// Why a member stopped receiving.
enum Ended {
    Shutdown,
    /// Another member took the group over, or the consumer went away:
    /// wait to take it again.
    Stepped,
}

impl<H: Handler> NatsConsumer<H> {
    pub fn new(
        pool: PgPool,
        config: ConsumerConfig,
        settings: NatsSettings,
        handler: H,
    ) -> Result<Self, ConsumerError> {
        config.validate()?;
        let bad = |what: String| Err(ConsumerError::Config(what));
        if settings.url.trim().is_empty() {
            return bad("no NATS server; give nats://HOST:PORT".into());
        }
        if settings.stream.is_empty() || settings.stream.contains(['.', '*', '>', ' ']) {
            return bad(format!(
                "invalid JetStream stream name {:?}; name the stream that holds the topics' subjects",
                settings.stream
            ));
        }
        if config.topics.len() != 1 {
            return bad(format!(
                "a NATS consumer reads one subject filter, not {} topics; give one (wildcards \
                 match several subjects: orders.>)",
                config.topics.len()
            ));
        }
        if settings.lease < Duration::from_millis(300) {
            return bad("the NATS member lease is under 300 ms; use a second or more".into());
        }
        Ok(NatsConsumer {
            applier: Applier::new(pool, &config, handler),
            config,
            settings,
        })
    }

    pub fn stats(&self) -> ConsumerStats {
        self.applier.stats.clone()
    }

    /// Runs until `shutdown` resolves: waits to be the group's active member,
    /// receives, and, at the end, finishes the messages in hand,
    /// acknowledges them and hands the group over.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ConsumerError> {
        super::run_member(&self.applier, &self.config, shutdown, |stop| {
            self.members(stop)
        })
        .await
    }

    /// Waits for the group's row, receives while it holds it, again.
    async fn members(&self, stop: CancellationToken) -> Result<(), ConsumerError> {
        let client = match self.connect(&stop).await {
            Some(client) => client,
            None => return Ok(()),
        };
        let context = jetstream::new(client);
        let stream = match context.get_stream(&self.settings.stream).await {
            Ok(stream) => stream,
            Err(e) => {
                return Err(ConsumerError::Setup(format!(
                    "cannot open the JetStream stream {:?}: {e}; create it (nats stream add) \
                     with the topics' subjects, or fix the stream's name",
                    self.settings.stream
                )));
            }
        };
        let membership = Membership::new(
            self.applier.pool.clone(),
            &self.config.group,
            &self.settings.stream,
            self.settings.lease,
        );
        info!(
            group = %self.config.group, stream = %self.settings.stream,
            subjects = ?self.config.topics, "consumer started; waiting to be the group's active member"
        );
        loop {
            let Some(mut held) = self.acquire(&membership, &stop).await else {
                return Ok(());
            };
            info!(group = %self.config.group, epoch = held.epoch, "this member receives for the group");
            match self.receive(&stream, &membership, &mut held, &stop).await? {
                Ended::Shutdown => {
                    membership.release(&held).await;
                    return Ok(());
                }
                Ended::Stepped => {
                    info!(group = %self.config.group, "this member stopped receiving; it waits to take over again");
                }
            }
        }
    }

    /// Connects, retrying with backoff until the server answers or `stop`.
    async fn connect(&self, stop: &CancellationToken) -> Option<async_nats::Client> {
        let mut attempt = 0;
        loop {
            let options = (self.settings.options)().name("outbox-relay consumer");
            match options.connect(self.settings.url.as_str()).await {
                Ok(client) => return Some(client),
                Err(e) => {
                    attempt += 1;
                    warn!(error = %e, "cannot connect to NATS; retrying with backoff");
                    let wait = self
                        .config
                        .retry
                        .backoff(attempt)
                        .min(Duration::from_secs(5));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Waits until this member holds the group's row (None: `stop`).
    async fn acquire(&self, membership: &Membership, stop: &CancellationToken) -> Option<Held> {
        let every = (membership.lease / 4).max(Duration::from_millis(100));
        let mut warned = false;
        loop {
            match membership.try_acquire().await {
                Ok(Some(held)) => return Some(held),
                Ok(None) => {}
                Err(e) => {
                    if !warned {
                        warn!(error = %e, "cannot reach the database to take the group over; retrying");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return None,
            }
        }
    }

    /// Receives through a consumer of this epoch's own until `stop`, the
    /// row lost, or the consumer gone.
    async fn receive(
        &self,
        stream: &Stream,
        membership: &Membership,
        held: &mut Held,
        stop: &CancellationToken,
    ) -> Result<Ended, ConsumerError> {
        let base = consumer_base(&self.config.group);
        let consumer = match self.take_over(stream, &base, held.epoch).await {
            Ok(consumer) => consumer,
            Err(e) => {
                warn!(error = %e, "cannot set up this member's JetStream consumer; trying again");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => {}
                }
                return Ok(if stop.is_cancelled() {
                    Ended::Shutdown
                } else {
                    Ended::Stepped
                });
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => {
                warn!(error = %e, "cannot read from this member's JetStream consumer; trying again");
                return Ok(Ended::Stepped);
            }
        };
        let (lanes, mut settled) = Lanes::start(&self.applier, &self.config);
        let stats = &self.applier.stats;
        let subject = &self.config.topics[0];
        stats.set_partitions(1);
        // Per stream sequence, the latest delivery of each message in a lane.
        let mut in_hand: HashMap<i64, jetstream::Message> = HashMap::new();
        let mut renew = tokio::time::interval(membership.lease / 3);
        renew.tick().await;
        let mut check = tokio::time::interval(Duration::from_millis(200));
        let mut last_error = String::new();
        let ended = loop {
            tokio::select! {
                () = stop.cancelled() => break Ok(Ended::Shutdown),
                Some(sequence) = settled.recv() => {
                    if let Some(message) = in_hand.remove(&sequence) {
                        acknowledge(&message).await;
                    }
                }
                next = messages.next() => match next {
                    Some(Ok(message)) => {
                        let Ok(info) = message.info() else {
                            debug!("a message without JetStream metadata; skipped");
                            continue;
                        };
                        let sequence = info.stream_sequence as i64;
                        if in_hand.insert(sequence, message).is_none() {
                            let message = &in_hand[&sequence];
                            let (key, delivery) = delivery(message, sequence);
                            lanes.dispatch(&key, delivery);
                        }
                    }
                    Some(Err(e)) if e.kind() == pull::MessagesErrorKind::ConsumerDeleted => {
                        info!("this member's JetStream consumer was deleted (another member took over)");
                        break Ok(Ended::Stepped);
                    }
                    Some(Err(e)) => {
                        let error = e.to_string();
                        if error != last_error {
                            warn!(error = %error, "NATS");
                            last_error = error;
                        }
                    }
                    None => break Ok(Ended::Stepped),
                },
                _ = renew.tick() => match membership.renew(held).await {
                    Ok(true) => {
                        if let Ok(info) = consumer.get_info().await {
                            let lag = info.num_pending + info.num_ack_pending as u64;
                            stats.set_lag(subject, -1, lag as i64);
                        }
                    }
                    Ok(false) => {
                        info!(group = %self.config.group, "another member took the group over");
                        break Ok(Ended::Stepped);
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot renew this member's hold on the group");
                        if Instant::now() >= held.valid_until {
                            break Ok(Ended::Stepped);
                        }
                    }
                },
                _ = check.tick() => {
                    if let Err(e) = lanes.check() {
                        break Err(e);
                    }
                }
            }
        };
        let left = lanes.stop(self.config.revoke_timeout, &mut settled).await;
        stats.set_partitions(0);
        stats.forget_partition(subject, -1);
        for sequence in left {
            if let Some(message) = in_hand.remove(&sequence) {
                acknowledge(&message).await;
            }
        }
        ended
    }

    /// Creates this epoch's consumer, starting after the previous one's ack
    /// floor, and deletes the older ones.
    async fn take_over(
        &self,
        stream: &Stream,
        base: &str,
        epoch: i64,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, String> {
        let mut names = stream.consumer_names();
        let mut older = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| e.to_string())?;
            if let Some(other) = epoch_of(&name, base)
                && other < epoch
            {
                older.push((other, name));
            }
        }
        older.sort();
        let mut start = None;
        if let Some((_, latest)) = older.last() {
            match stream.consumer_info(latest).await {
                Ok(info) => start = Some(info.ack_floor.stream_sequence + 1),
                Err(e) => {
                    debug!(consumer = %latest, error = %e, "cannot read the previous consumer")
                }
            }
        }
        let deliver_policy = match start {
            Some(start_sequence) if start_sequence > 1 => {
                DeliverPolicy::ByStartSequence { start_sequence }
            }
            _ => DeliverPolicy::All,
        };
        let name = format!("{base}-{epoch}");
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!(
                    "outbox-relay consumer group {} (epoch {epoch})",
                    self.config.group
                )),
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.settings.ack_wait,
                max_deliver: -1,
                max_ack_pending: self.config.max_queued as i64,
                deliver_policy,
                filter_subject: self.config.topics[0].clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating the JetStream consumer {name}: {e}"))?;
        for (_, old) in older {
            if let Err(e) = stream.delete_consumer(&old).await {
                debug!(consumer = %old, error = %e, "cannot delete an older consumer");
            }
        }
        info!(consumer = %name, start = ?start, "reading through JetStream consumer");
        Ok(consumer)
    }
}

/// The name every consumer of `group` starts with: the group, with what a
/// JetStream consumer name cannot hold as `_`.
fn consumer_base(group: &str) -> String {
    group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The epoch in a consumer name `BASE-EPOCH`, if it is one of `base`'s.
fn epoch_of(name: &str, base: &str) -> Option<i64> {
    name.strip_prefix(base)?.strip_prefix('-')?.parse().ok()
}

async fn acknowledge(message: &jetstream::Message) {
    // A lost ack is a redelivery, which the inbox skips.
    if let Err(e) = message.ack().await {
        debug!(error = %e, "acknowledging a NATS message failed");
    }
}

/// A JetStream message as the runtime's, with the key of its lane.
fn delivery(message: &jetstream::Message, sequence: i64) -> (Vec<u8>, Delivery) {
    let headers: Vec<(String, Option<Vec<u8>>)> = message
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.to_string(), Some(value.as_str().as_bytes().to_vec())))
        })
        .collect();
    let aggregate = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(HEADER_AGGREGATE_ID))
        .map(|value| value.as_str().as_bytes().to_vec());
    let key = aggregate
        .clone()
        .unwrap_or_else(|| message.subject.as_bytes().to_vec());
    let (id, id_error) = match inbox::nats_message_id(message.headers.as_ref()) {
        Ok(id) => (id, None),
        Err(e) => (uuid::Uuid::nil(), Some(e.to_string())),
    };
    (
        key,
        Delivery {
            message: Message {
                id,
                topic: message.subject.to_string(),
                partition: -1,
                offset: sequence,
                key: aggregate,
                headers,
                payload: Some(message.payload.to_vec()),
                failed_attempts: 0,
            },
            id_error,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_carry_the_group_and_the_epoch() {
        let base = consumer_base("billing.v2 eu");
        assert_eq!(base, "billing_v2_eu");
        assert_eq!(epoch_of("billing_v2_eu-7", &base), Some(7));
        assert_eq!(epoch_of("billing_v2_eu-x", &base), None);
        assert_eq!(epoch_of("billing_v2_eu_other-3", &base), None);
        assert_eq!(epoch_of("billing_v2-3", &base), None);
    }
}
