//! Publishing to NATS JetStream: each message is one JetStream publish,
//! acknowledged (a PubAck) once the stream that takes its subject stored it.
//!
//! Mapping (README, "NATS JetStream"): the subject is the message's topic
//! (the row's `topic`, else the template, where `{aggregate_id}` is one
//! subject token); the payload is the value (empty for a tombstone);
//! `Nats-Msg-Id` is the outbox id, so JetStream drops a message sent again
//! inside the stream's duplicate window; the message's headers, plus
//! `aggregate_id`, become NATS headers.
//!
//! Order: one connection, messages written in order, and a stream stores a
//! connection's messages in the order they arrive. The client never
//! reconnects on its own (a reconnected client would write the messages
//! queued behind a lost one on the new connection, before the lost one is
//! sent again): a dropped connection fails everything in flight, and the
//! relay replaces the client and resends from the first unconfirmed row.
//! Two connections resending the same messages cannot reorder them either:
//! the stream keeps the first copy of each id, and the first copies of two
//! in-order streams are in order.
//!
//! Permanent rejections: a subject no stream takes (checked with the
//! JetStream API, since "no responders" also answers while JetStream is
//! starting), a message over the server's `max_payload` or the stream's
//! maximum message size, a subject or a header NATS cannot carry.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, PublishAckFuture, PublishError, PublishErrorKind,
};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectOptions};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::NatsConfig;
use crate::error::Error;
use crate::sink::{LastAck, Message, Outcome, Sent, Sink, until_reachable};

/// The header that carries the outbox id for JetStream's deduplication.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The header that carries the row's `aggregate_id` (Kafka's record key).
pub const AGGREGATE_ID_HEADER: &str = crate::message::HEADER_AGGREGATE_ID;

/// How long connecting to one server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes in flight at once; the relay's batch is the real bound.
const MAX_ACKS_IN_FLIGHT: usize = 100_000;

/// A connection and its JetStream context.
struct Connection {
    client: Client,
    jetstream: jetstream::Context,
}

impl Connection {
    fn is_up(&self) -> bool {
        matches!(
            self.client.connection_state(),
            async_nats::connection::State::Connected | async_nats::connection::State::Pending
        )
    }
}

/// The sink's connection. Once one was made, no other is made until the
/// relay calls [`Sink::replace`]: a message sent after a lost one must not
/// reach the stream first.
enum Link {
    /// None yet: the next send connects.
    Fresh,
    Up(Arc<Connection>),
}

/// The NATS JetStream publisher. Connects on first use.
pub struct NatsSink {
    config: NatsConfig,
    link: Mutex<Link>,
    last_ack: Arc<LastAck>,
}

impl NatsSink {
    /// Checks nothing remote; the connection is made when first needed.
    pub fn new(config: &NatsConfig) -> Result<Self, Error> {
        Ok(NatsSink {
            config: config.clone(),
            link: Mutex::new(Link::Fresh),
            last_ack: Arc::new(LastAck::new()),
        })
    }

    /// The connection, made now if there is none. `renew`: replace a
    /// dropped one (only while nothing is in flight).
    async fn connection(&self, renew: bool) -> Result<Arc<Connection>, String> {
        let mut link = self.link.lock().await;
        if let Link::Up(connection) = &*link {
            if connection.is_up() {
                return Ok(connection.clone());
            }
            if !renew {
                return Err("the connection to NATS was lost".into());
            }
        }
        let connection = Arc::new(connect(&self.config).await?);
        *link = Link::Up(connection.clone());
        Ok(connection)
    }
}

/// Connects to the first server that answers, with a client that never
/// reconnects (see the module's note on order).
async fn connect(config: &NatsConfig) -> Result<Connection, String> {
    // async-nats takes rustls' process-wide provider, which rustls cannot
    // choose by itself when more than one is compiled in. Already
    // installed (by the application, or an earlier connection): kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut causes = Vec::new();
    for server in &config.servers {
        let mut options = ConnectOptions::new()
            .name("outbox-relay")
            .connection_timeout(CONNECT_TIMEOUT)
            .request_timeout(Some(config.ack_timeout))
            // The first connection is the only one: attempt 2 is refused.
            .max_reconnects(1)
            .require_tls(config.require_tls || server.scheme() == "tls");
        if let Some(path) = &config.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                format!(
                    "cannot read the NATS credentials file {}: {e}; fix --sink-config credentials_file",
                    path.display()
                )
            })?;
        }
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &config.tls_ca_file {
            options = options.add_root_certificates(path.clone());
        }
        if let Some((cert, key)) = &config.tls_client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        match options.connect(server.expose()).await {
            Ok(client) => {
                let jetstream = jetstream::ContextBuilder::new()
                    .timeout(config.ack_timeout)
                    .ack_timeout(config.ack_timeout)
                    .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
                    .build(client.clone());
                debug!(server = %server, "connected to NATS");
                return Ok(Connection { client, jetstream });
            }
            // The client's errors name the server by address only.
            Err(e) => causes.push(format!("{server}: {e}")),
        }
    }
    Err(causes.join("; "))
}

/// The message's headers as NATS carries them (module doc: `Nats-Msg-Id`,
/// `aggregate_id`, then the message's own), or why it cannot.
pub fn nats_headers(message: &Message) -> Result<HeaderMap, String> {
    let id = message
        .headers
        .iter()
        .find(|(name, _)| name == crate::message::HEADER_ID)
        .map(|(_, id)| String::from_utf8_lossy(id))
        .unwrap_or_default();
    let id = id.as_ref();
    let mut headers = HeaderMap::new();
    let value = |text: &str| text.parse::<HeaderValue>().ok();
    headers.insert(MSG_ID_HEADER, value(id).unwrap_or_default());
    match value(&message.aggregate_id) {
        Some(key) => headers.insert(AGGREGATE_ID_HEADER, key),
        None => {
            return Err(format!(
                "aggregate id {:?} has a line break, which a NATS header cannot carry",
                message.aggregate_id
            ));
        }
    }
    for (name, bytes) in &message.headers {
        let header: HeaderName = name.parse().map_err(|_| {
            format!(
                "header name {name:?} is not a NATS header name (printable ASCII without ':' or spaces)"
            )
        })?;
        let text = String::from_utf8_lossy(bytes);
        let header_value = value(&text).ok_or_else(|| {
            format!(
                "header {name:?} has a line break in its value, which a NATS header cannot carry"
            )
        })?;
        headers.append(header, header_value);
    }
    Ok(headers)
}

/// Why `subject` cannot be published to, if it cannot: NATS subjects are
/// dot-separated non-empty tokens without whitespace, and a publish may not
/// name the wildcards `*` and `>`.
fn invalid_subject(subject: &str) -> Option<String> {
    let bad_token = |token: &str| {
        token.is_empty()
            || token == "*"
            || token == ">"
            || token.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    subject.split('.').any(bad_token).then(|| {
        format!(
            "invalid subject {subject:?}: NATS subjects are dot-separated non-empty tokens without spaces, and a publish cannot use the wildcards '*' or '>'"
        )
    })
}

/// Whether the account has JetStream: asks the JetStream API for the
/// account's information (the reply is not parsed beyond an error, so any
/// server version will do).
async fn jetstream_enabled(client: &Client) -> Result<(), String> {
    let not_enabled = |cause: String| {
        format!(
            "the server answers but JetStream does not ({cause}); start nats-server with -js (or jetstream {{}} in its config) and check the account's JetStream limits"
        )
    };
    let reply = client
        .request("$JS.API.INFO", "".into())
        .await
        .map_err(|e| not_enabled(e.to_string()))?;
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
    match body.get("error") {
        Some(error) => Err(not_enabled(error.to_string())),
        None => Ok(()),
    }
}

/// Resolves to a message's outcome once JetStream answers.
pub type NatsAck = Pin<Box<dyn Future<Output = Outcome> + Send>>;

async fn outcome(
    ack: PublishAckFuture,
    deadline: tokio::time::Instant,
    connection: Arc<Connection>,
    subject: async_nats::Subject,
    last_ack: Arc<LastAck>,
) -> Outcome {
    // The client's own timeout starts when the future is first polled,
    // and the relay polls a batch's acks one after another: the deadline
    // is taken when the message was sent.
    let answer = match tokio::time::timeout_at(deadline, ack.into_future()).await {
        Ok(answer) => answer,
        Err(_) => return Outcome::Failed("no PubAck within the ack timeout".into()),
    };
    match answer {
        Ok(_) => {
            last_ack.record();
            Outcome::Acked
        }
        Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
            // "No responders" also answers while JetStream starts up: only
            // the API saying that no stream takes the subject is final.
            match connection
                .jetstream
                .stream_by_subject(subject.to_string())
                .await
            {
                Err(lookup) if lookup.kind() == GetStreamByNameErrorKind::NotFound => {
                    Outcome::Rejected(format!(
                        "no JetStream stream takes subject {subject:?}; add the subject to a stream (nats stream add/edit) or change --topic-template"
                    ))
                }
                _ => Outcome::Failed(format!(
                    "no JetStream stream answered for subject {subject:?}"
                )),
            }
        }
        Err(e) => classify(&e),
    }
}

/// JetStream's answers no retry can change are rejections.
fn classify(error: &PublishError) -> Outcome {
    let code = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code);
    match (error.kind(), code) {
        (PublishErrorKind::MaxPayloadExceeded, _)
        | (
            _,
            Some(
                ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
            ),
        ) => Outcome::Rejected(error.to_string()),
        _ => Outcome::Failed(error.to_string()),
    }
}

impl Sink for NatsSink {
    type Ack = NatsAck;

    fn name(&self) -> &'static str {
        "NATS JetStream"
    }

    /// Connects, and asks JetStream for the account's limits, retrying with
    /// capped backoff and saying once why it cannot.
    async fn wait_until_reachable(&self, shutdown: &CancellationToken) -> bool {
        let servers = self
            .config
            .servers
            .iter()
            .map(|s| s.redacted())
            .collect::<Vec<_>>()
            .join(",");
        let probe = || async {
            let connection = self.connection(true).await?;
            jetstream_enabled(&connection.client).await
        };
        until_reachable(shutdown, "NATS JetStream", &servers, probe, |cause| {
            format!(
                "cannot publish to NATS JetStream at {servers}: {cause}; retrying with backoff until it answers; check --sink-url (OUTBOX_SINK_URL), that the server is up, and the credentials and TLS settings"
            )
        })
        .await
    }

    async fn send(&self, message: &Message) -> Sent<NatsAck> {
        if let Some(problem) = invalid_subject(&message.topic) {
            return Sent::Refused(problem);
        }
        let headers = match nats_headers(message) {
            Ok(headers) => headers,
            Err(problem) => return Sent::Refused(problem),
        };
        let connection = match self.connection(false).await {
            Ok(connection) => connection,
            Err(cause) => return Sent::NotSent(format!("cannot connect to NATS: {cause}")),
        };
        let payload = message.value.clone().unwrap_or_default();
        // Bytes-backed: the clone kept for the ack is a reference count.
        let subject = async_nats::Subject::from(message.topic.as_str());
        match connection
            .jetstream
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
        {
            Ok(ack) => Sent::Enqueued(Box::pin(outcome(
                ack,
                tokio::time::Instant::now() + self.config.ack_timeout,
                connection,
                subject,
                self.last_ack.clone(),
            ))),
            Err(e) => match classify(&e) {
                Outcome::Rejected(reason) => Sent::Refused(reason),
                _ => Sent::NotSent(e.to_string()),
            },
        }
    }

    /// A client whose connection dropped never comes back (it does not
    /// reconnect), and one without a PubAck for a whole ack timeout may sit
    /// on a connection the server no longer reads: both are replaced.
    fn is_broken(&self) -> bool {
        match self.link.try_lock().as_deref() {
            Ok(Link::Up(connection)) => {
                !connection.is_up() || self.last_ack.age() >= self.config.ack_timeout
            }
            _ => false,
        }
    }

    fn replace(&mut self) -> Result<(), Error> {
        debug!("replacing the NATS connection");
        self.link = Mutex::new(Link::Fresh);
        self.last_ack = Arc::new(LastAck::new());
        Ok(())
    }

    /// The ack timeout, plus connecting.
    fn delivery_timeout(&self) -> Duration {
        self.config.ack_timeout + CONNECT_TIMEOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_nats_rules() {
        for ok in ["orders.events", "orders.o-1", "a", "orders.%2E"] {
            assert_eq!(invalid_subject(ok), None, "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "tab\tx"] {
            assert!(invalid_subject(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn headers_carry_the_id_the_aggregate_and_the_rows_pairs() {
        let message = Message {
            topic: "orders.events".into(),
            // A partition key does not change the aggregate_id header.
            key: "k-9".into(),
            aggregate_id: "o-1".into(),
            value: Some(b"{}".to_vec()),
            headers: vec![
                ("id".into(), b"0b7c".to_vec()),
                ("event_type".into(), b"created".to_vec()),
                ("traceparent".into(), b"00-ab".to_vec()),
            ],
        };
        let headers = nats_headers(&message).unwrap();
        assert_eq!(headers.get(MSG_ID_HEADER).unwrap().as_str(), "0b7c");
        assert_eq!(headers.get(AGGREGATE_ID_HEADER).unwrap().as_str(), "o-1");
        assert_eq!(headers.get("id").unwrap().as_str(), "0b7c");
        assert_eq!(headers.get("traceparent").unwrap().as_str(), "00-ab");

        let mut bad = message.clone();
        bad.headers.push(("a:b".into(), b"x".to_vec()));
        assert!(nats_headers(&bad).unwrap_err().contains("header name"));
        let mut bad = message;
        bad.headers.push(("note".into(), b"two\nlines".to_vec()));
        assert!(nats_headers(&bad).unwrap_err().contains("line break"));
    }
}
