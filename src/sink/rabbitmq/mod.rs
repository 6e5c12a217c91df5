//! Publishing to RabbitMQ with publisher confirms: an ack means the broker
//! took responsibility for the message (persistent delivery, so durable
//! queues keep it across a restart); a nack, a `mandatory` return or no
//! confirm in time means it is not confirmed.
//!
//! Mapping (README, "RabbitMQ"): the exchange is the message's topic (the
//! row's `topic`, else the template); the routing key is the aggregate id,
//! so a consistent-hash exchange keeps one aggregate on one queue; the body
//! is the value (empty for a tombstone); `message_id` is the outbox id,
//! `type` the event type, `delivery_mode` 2 (persistent), `content_type`
//! `application/json`; the message's headers become AMQP headers (long
//! strings).
//!
//! Order: one connection, one channel in confirm mode, messages published
//! in order, and RabbitMQ routes a channel's messages in the order they
//! arrive, so one queue holds an aggregate's messages in order. The client
//! never recovers a lost connection by itself: a closed channel fails
//! everything in flight and the relay replaces the client and resends from
//! the first unconfirmed row.
//!
//! Permanent rejections: a message no queue is bound for (returned under
//! `mandatory`), an exchange that does not exist (checked passively on a
//! channel of its own before the first publish to it, because a publish to
//! a missing exchange closes the channel and fails every message in
//! flight), a message over `max_message_size` (refused before sending, for
//! the same reason), and names or values AMQP cannot carry.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::RabbitMqConfig;
use crate::error::Error;
use crate::message::{HEADER_CONTENT_TYPE, HEADER_EVENT_TYPE, HEADER_ID};
use crate::sink::{LastAck, Message, Outcome, Sent, Sink, until_reachable};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// AMQP short strings (exchange, routing key, `type`, header names) hold
/// at most 255 bytes.
const SHORT_STRING_MAX: usize = 255;

/// A connection with its channel in confirm mode.
struct Link {
    connection: Connection,
    channel: Channel,
    /// Exchanges a passive declare found; checked once per connection.
    exchanges: SyncMutex<HashSet<String>>,
}

impl Link {
    fn is_up(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// The RabbitMQ publisher. Connects on first use.
pub struct RabbitMqSink {
    config: RabbitMqConfig,
    link: Mutex<Option<Arc<Link>>>,
    last_ack: Arc<LastAck>,
}

impl RabbitMqSink {
    /// Checks nothing remote; the connection is made when first needed.
    pub fn new(config: &RabbitMqConfig) -> Result<Self, Error> {
        Ok(RabbitMqSink {
            config: config.clone(),
            link: Mutex::new(None),
            last_ack: Arc::new(LastAck::new()),
        })
    }

    /// The connection, made now if there is none. `renew`: replace a
    /// dropped one (only while nothing is in flight: a message sent after a
    /// lost one must not reach a queue first).
    async fn link(&self, renew: bool) -> Result<Arc<Link>, String> {
        let mut link = self.link.lock().await;
        if let Some(current) = &*link {
            if current.is_up() {
                return Ok(current.clone());
            }
            if !renew {
                return Err("the connection to RabbitMQ was lost".into());
            }
        }
        let fresh = Arc::new(connect(&self.config).await?);
        *link = Some(fresh.clone());
        Ok(fresh)
    }
}

async fn connect(config: &RabbitMqConfig) -> Result<Link, String> {
    let properties = ConnectionProperties::default().with_connection_name("outbox-relay".into());
    let tls = match &config.tls_ca_file {
        Some(path) => OwnedTLSConfig {
            identity: None,
            cert_chain: Some(std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "cannot read the CA file {}: {e}; fix --sink-config tls_ca_file",
                    path.display()
                )
            })?),
        },
        None => OwnedTLSConfig::default(),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let connecting = Connection::connect_with_config(config.url.expose(), properties, tls, runtime);
    let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| describe(&e))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| describe(&e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| describe(&e))?;
    debug!(url = %config.url, "connected to RabbitMQ");
    Ok(Link {
        connection,
        channel,
        exchanges: SyncMutex::new(HashSet::new()),
    })
}

/// lapin's error, with the broker's reply text when it sent one (a refused
/// login says ACCESS_REFUSED there). Never holds the URL.
fn describe(error: &lapin::Error) -> String {
    error.to_string()
}

/// Whether the broker answered "not found" (a missing exchange).
fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
}

/// Why `name` cannot be an exchange name, if it cannot: RabbitMQ takes up
/// to 255 bytes of letters, digits, `-`, `_`, `.` and `:`; the empty name
/// is the default exchange, which the relay does not publish to.
fn invalid_exchange(name: &str) -> Option<String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    (name.is_empty() || name.len() > SHORT_STRING_MAX || !name.chars().all(legal)).then(|| {
        format!(
            "invalid exchange name {name:?}: RabbitMQ exchange names are 1 to 255 characters of a-z, A-Z, 0-9, '-', '_', '.' and ':'"
        )
    })
}

/// The message's AMQP properties (module doc), or why AMQP cannot carry it.
pub fn properties(message: &Message) -> Result<BasicProperties, String> {
    let header = |name: &str| {
        message
            .headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .unwrap_or_default()
    };
    let event_type = header(HEADER_EVENT_TYPE);
    if event_type.len() > SHORT_STRING_MAX {
        return Err(format!(
            "event type {event_type:?} is longer than 255 bytes, the most an AMQP `type` holds"
        ));
    }
    let mut headers = FieldTable::default();
    let mut content_type = "application/json".to_owned();
    for (name, value) in &message.headers {
        // The content type travels in its property (CloudEvents).
        if name == HEADER_CONTENT_TYPE {
            content_type = String::from_utf8_lossy(value).into_owned();
            continue;
        }
        if name.len() > SHORT_STRING_MAX {
            return Err(format!(
                "header name {name:?} is longer than 255 bytes, the most an AMQP header name holds"
            ));
        }
        headers.insert(
            ShortString::from(name.as_str()),
            AMQPValue::LongString(LongString::from(value.clone())),
        );
    }
    Ok(BasicProperties::default()
        .with_message_id(ShortString::from(header(HEADER_ID)))
        .with_type(ShortString::from(event_type))
        .with_delivery_mode(2)
        .with_content_type(ShortString::from(content_type))
        .with_headers(headers))
}

/// Resolves to a message's outcome once the broker confirms it.
pub type RabbitMqAck = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A publish whose frames are queued: written already, or still being
/// written.
enum Written {
    Ready(lapin::PublisherConfirm),
    Pending(Pin<Box<dyn Future<Output = lapin::Result<lapin::PublisherConfirm>> + Send>>),
}

async fn outcome(
    written: Written,
    timeout: Duration,
    deadline: tokio::time::Instant,
    exchange: String,
    routing_key: String,
    last_ack: Arc<LastAck>,
) -> Outcome {
    // The relay polls a batch's confirms one after another: the deadline
    // is taken when the message was sent, not when this is first polled.
    let confirmed = async {
        let confirm = match written {
            Written::Ready(confirm) => confirm,
            Written::Pending(publishing) => publishing.await?,
        };
        confirm.await
    };
    match tokio::time::timeout_at(deadline, confirmed).await {
        Ok(Ok(Confirmation::Ack(None))) => {
            last_ack.record();
            Outcome::Acked
        }
        Ok(Ok(Confirmation::Ack(Some(returned)))) => Outcome::Rejected(format!(
            "unroutable: exchange {exchange:?} has no queue bound for routing key {routing_key:?} ({} {}); bind a queue or change --topic-template",
            returned.reply_code, returned.reply_text
        )),
        Ok(Ok(Confirmation::Nack(_))) => {
            Outcome::Failed("the broker refused the message (nack)".into())
        }
        Ok(Ok(Confirmation::NotRequested)) => {
            Outcome::Failed("the channel was not in confirm mode".into())
        }
        Ok(Err(e)) => Outcome::Failed(describe(&e)),
        Err(_) => Outcome::Failed(format!("no publisher confirm within {timeout:?}")),
    }
}

impl RabbitMqSink {
    /// Whether `exchange` exists, asked once per connection on a channel
    /// of its own (a "not found" closes the channel it is asked on).
    async fn check_exchange(&self, link: &Link, exchange: &str) -> Result<(), Sent<RabbitMqAck>> {
        if link
            .exchanges
            .lock()
            .is_ok_and(|known| known.contains(exchange))
        {
            return Ok(());
        }
        let probe = link
            .connection
            .create_channel()
            .await
            .map_err(|e| Sent::NotSent(describe(&e)))?;
        let declared = probe
            .exchange_declare(
                ShortString::from(exchange),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(()) => {
                let _ = probe.close(200, "checked".into()).await;
                if let Ok(mut known) = link.exchanges.lock() {
                    known.insert(exchange.to_owned());
                }
                Ok(())
            }
            Err(e) if is_not_found(&e) => Err(Sent::Refused(format!(
                "no exchange {exchange:?} in the virtual host; declare it (with its queues and bindings) or change --topic-template"
            ))),
            Err(e) => Err(Sent::NotSent(describe(&e))),
        }
    }
}

impl Sink for RabbitMqSink {
    type Ack = RabbitMqAck;

    fn name(&self) -> &'static str {
        "RabbitMQ"
    }

    /// Connects and opens a channel in confirm mode, retrying with capped
    /// backoff and saying once why it cannot.
    async fn wait_until_reachable(&self, shutdown: &CancellationToken) -> bool {
        let url = self.config.url.redacted();
        let probe = || async { self.link(true).await.map(|_| ()) };
        until_reachable(shutdown, "RabbitMQ", &url, probe, |cause| {
            format!(
                "cannot publish to RabbitMQ at {url}: {cause}; retrying with backoff until it answers; check --sink-url (OUTBOX_SINK_URL): host, port, user, password and virtual host, and that the broker is up"
            )
        })
        .await
    }

    async fn send(&self, message: &Message) -> Sent<RabbitMqAck> {
        if let Some(problem) = invalid_exchange(&message.topic) {
            return Sent::Refused(problem);
        }
        if message.key.len() > SHORT_STRING_MAX {
            return Sent::Refused(format!(
                "routing key {:?} (the partition key, else the aggregate id) is longer than 255 bytes, the most an AMQP routing key holds",
                message.key
            ));
        }
        let body = message.value.as_deref().unwrap_or_default();
        if body.len() > self.config.max_message_size {
            return Sent::Refused(format!(
                "the message is {} bytes, over RabbitMQ's max_message_size of {} (--sink-config max_message_size)",
                body.len(),
                self.config.max_message_size
            ));
        }
        let properties = match properties(message) {
            Ok(properties) => properties,
            Err(problem) => return Sent::Refused(problem),
        };
        let link = match self.link(false).await {
            Ok(link) => link,
            Err(cause) => return Sent::NotSent(format!("cannot connect to RabbitMQ: {cause}")),
        };
        if let Err(sent) = self.check_exchange(&link, &message.topic).await {
            return sent;
        }
        let channel = link.channel.clone();
        let exchange = ShortString::from(message.topic.as_str());
        let routing_key = ShortString::from(message.key.as_str());
        let body = body.to_vec();
        let publishing = async move {
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            channel
                .basic_publish(exchange, routing_key, options, &body, properties)
                .await
        };
        // The first poll queues the message's frames on the channel (and
        // takes its delivery tag) before it waits for the write: polling
        // it here, in send order, keeps the order without waiting for each
        // write in turn. A broker that stopped reading holds the write; the
        // ack's deadline bounds it like the confirm.
        let deadline = tokio::time::Instant::now() + self.config.confirm_timeout;
        let mut publishing = Box::pin(publishing);
        match futures::poll!(publishing.as_mut()) {
            std::task::Poll::Ready(Err(e)) => Sent::NotSent(describe(&e)),
            queued => {
                let written: Written = match queued {
                    std::task::Poll::Ready(Ok(confirm)) => Written::Ready(confirm),
                    _ => Written::Pending(publishing),
                };
                Sent::Enqueued(Box::pin(outcome(
                    written,
                    self.config.confirm_timeout,
                    deadline,
                    message.topic.clone(),
                    message.key.clone(),
                    self.last_ack.clone(),
                )))
            }
        }
    }

    /// A closed connection or channel never comes back (no automatic
    /// recovery), and one without a confirm for a whole confirm timeout may
    /// sit on a broker that stopped answering: both are replaced.
    fn is_broken(&self) -> bool {
        match self.link.try_lock().as_deref() {
            Ok(Some(link)) => !link.is_up() || self.last_ack.age() >= self.config.confirm_timeout,
            _ => false,
        }
    }

    fn replace(&mut self) -> Result<(), Error> {
        debug!("replacing the RabbitMQ connection");
        self.link = Mutex::new(None);
        self.last_ack = Arc::new(LastAck::new());
        Ok(())
    }

    /// The confirm timeout, for the write and for the confirm.
    fn delivery_timeout(&self) -> Duration {
        self.config.confirm_timeout * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_names_follow_rabbitmqs_rule() {
        for ok in ["orders.events", "a", "x-y_z:1", &"x".repeat(255)] {
            assert_eq!(invalid_exchange(ok), None, "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(256)] {
            assert!(invalid_exchange(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn properties_carry_the_id_the_type_and_the_headers() {
        let message = Message {
            topic: "orders.events".into(),
            key: "o-1".into(),
            aggregate_id: "o-1".into(),
            value: Some(b"{}".to_vec()),
            headers: vec![
                ("id".into(), b"0b7c".to_vec()),
                ("event_type".into(), b"created".to_vec()),
                ("traceparent".into(), b"00-ab".to_vec()),
            ],
        };
        let props = properties(&message).unwrap();
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "0b7c");
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "created");
        assert_eq!(*props.delivery_mode(), Some(2));
        let headers = props.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("traceparent"),
            Some(&AMQPValue::LongString(LongString::from(b"00-ab".to_vec())))
        );
        let mut long = message;
        long.headers[1].1 = vec![b'x'; 256];
        assert!(properties(&long).unwrap_err().contains("255"));
    }
}
