//! The validated configuration the library runs on. `cli.rs` turns flags and
//! environment variables into these types once; nothing here knows about
//! clap. Every check happens before anything connects, and every failure is
//! one line naming the flag, the cause and the fix. Secrets (the password in
//! the database URL, secret Kafka properties) never appear in `Debug` or in
//! an error.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::error::Error;
pub use crate::target::DatabaseTarget;

mod sink;
pub use sink::{
    BrokerUrl, KafkaConfig, NatsConfig, RabbitMqConfig, SinkConfig, SinkKind, is_secret_property,
};

/// Which way the relay reads the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Claim committed rows with SQL in batches, publish, then delete them.
    Poll,
    /// Stream the outbox's INSERTs from the WAL (logical replication).
    Tail,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "poll" => Ok(Mode::Poll),
            "tail" => Ok(Mode::Tail),
            other => Err(format!("unknown mode \"{other}\"; use poll or tail")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Poll => "poll",
            Mode::Tail => "tail",
        })
    }
}

/// How to reach the outbox's database, and in which schema its tables live.
#[derive(Clone)]
pub struct DatabaseConfig {
    options: PgConnectOptions,
    target: DatabaseTarget,
    schema: Identifier,
    /// Kept for the replication connection, which is not made by sqlx.
    #[cfg_attr(not(feature = "relay"), allow(dead_code))]
    password: String,
    tls: TlsSettings,
    /// How long the relay waits for Postgres to answer one call.
    call_timeout: Duration,
    /// What the relay's sessions call themselves in `pg_stat_activity`.
    application_name: String,
}

/// The URL's `sslmode`, as libpq reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    /// TLS if the server offers it (libpq's default).
    #[default]
    Prefer,
    Require,
    /// TLS, and the server's certificate signed by `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host in the URL.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode \"{other}\" is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// The URL's `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, as libpq
/// reads them; the replication connection honours them as sqlx does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("target", &self.target)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl DatabaseConfig {
    /// Parses a `postgres://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=..` URL.
    /// `flag` names where the URL came from, for the error message.
    pub fn from_url(url: &str, schema: Identifier, flag: &str) -> Result<Self, Error> {
        let fix = "expected postgres://USER:PASSWORD@HOST:PORT/DATABASE";
        let parsed = url::Url::parse(url).map_err(|e| {
            Error::Config(format!("{flag} is not a valid Postgres URL: {e}; {fix}"))
        })?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(Error::Config(format!(
                "{flag} is not a valid Postgres URL: scheme \"{}\" is not postgres; {fix}",
                parsed.scheme()
            )));
        }
        let password = parsed.password().unwrap_or_default().to_owned();
        let password = percent_encoding::percent_decode_str(&password)
            .decode_utf8()
            .map(|p| p.into_owned())
            .unwrap_or(password);
        let mut tls = TlsSettings::default();
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "sslmode" => {
                    tls.mode = value.parse().map_err(|cause| {
                        Error::Config(format!("{flag}: {cause}; {fix}?sslmode=verify-full"))
                    })?
                }
                "sslrootcert" => tls.root_cert = Some(PathBuf::from(value.as_ref())),
                "sslcert" => tls.cert = Some(PathBuf::from(value.as_ref())),
                "sslkey" => tls.key = Some(PathBuf::from(value.as_ref())),
                _ => {}
            }
        }
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            let cause = redact(&e.to_string(), &password);
            Error::Config(format!(
                "{flag} is not a valid Postgres URL: {cause}; {fix}"
            ))
        })?;
        let user = options.get_username().to_owned();
        let target = DatabaseTarget {
            host: options.get_host().to_owned(),
            port: options.get_port(),
            database: options.get_database().unwrap_or(&user).to_owned(),
            user,
        };
        // Server-side keepalives: if the relay's host vanishes (a network
        // partition, not a crash), Postgres drops the session within about
        // 25 s instead of the OS default of two hours, and with it the
        // leader lock, so a standby can take over.
        let options = options
            .options([
                ("search_path", schema.quoted()),
                ("tcp_keepalives_idle", "10".into()),
                ("tcp_keepalives_interval", "5".into()),
                ("tcp_keepalives_count", "3".into()),
            ])
            .application_name(Self::DEFAULT_APPLICATION_NAME);
        Ok(DatabaseConfig {
            options,
            target,
            schema,
            password,
            tls,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
            application_name: Self::DEFAULT_APPLICATION_NAME.to_owned(),
        })
    }

    /// The `application_name` of sessions before a relay names its instance.
    pub const DEFAULT_APPLICATION_NAME: &str = "outbox-relay";

    /// Names every session after `name` in `pg_stat_activity` (a relay
    /// instance's id, so a standby can end the sessions of a hung one).
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.options = self.options.application_name(name);
        self.application_name = name.to_owned();
        self
    }

    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// The default of [`DatabaseConfig::call_timeout`].
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

    /// How long the relay waits for an answer to one call (a batch read, a
    /// confirm) before it drops the connection and reconnects: a server
    /// that stopped answering, or a connection that died without a word.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The shortest [`DatabaseConfig::call_timeout`]: any less and no
    /// query over a network can be waited for.
    pub const MIN_CALL_TIMEOUT: Duration = Duration::from_secs(1);

    /// Sets the call timeout; `flag` names where it came from, for the
    /// error when it is below [`DatabaseConfig::MIN_CALL_TIMEOUT`].
    pub fn with_call_timeout(mut self, timeout: Duration, flag: &str) -> Result<Self, Error> {
        if timeout < Self::MIN_CALL_TIMEOUT {
            return Err(Error::Config(format!(
                "{flag} {} is too short to wait for any query; give at least 1s, e.g. 30s",
                humantime::format_duration(timeout)
            )));
        }
        self.call_timeout = timeout;
        Ok(self)
    }

    /// Connection options, with `search_path` set to the configured schema so
    /// every statement names tables unqualified.
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.options
    }

    pub fn target(&self) -> &DatabaseTarget {
        &self.target
    }

    pub fn schema(&self) -> &Identifier {
        &self.schema
    }

    /// The password from the URL, for connections sqlx does not make.
    #[cfg_attr(not(feature = "relay"), allow(dead_code))]
    pub(crate) fn password(&self) -> &str {
        &self.password
    }

    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }
}

/// Replaces every occurrence of `secret` (raw or percent-encoded) with `***`.
pub fn redact(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_owned();
    }
    let decoded = url::form_urlencoded::parse(format!("x={secret}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let mut out = text.replace(secret, "***");
    if !decoded.is_empty() {
        out = out.replace(&decoded, "***");
    }
    out
}

/// A Postgres identifier from configuration (schema, slot, publication).
/// Only letters, digits and `_`, starting with a letter or `_`, at most 63
/// bytes; always used quoted, so it is case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier(String);

impl Identifier {
    /// Validates `value`; `flag` names where it came from, for the error.
    pub fn parse(value: &str, flag: &str) -> Result<Self, Error> {
        let mut chars = value.chars();
        let valid_start = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let valid_rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_start || !valid_rest || value.len() > 63 {
            return Err(Error::Config(format!(
                "{flag} {value:?} is not a valid Postgres name: use 1 to 63 letters, digits or underscores, starting with a letter or underscore"
            )));
        }
        Ok(Identifier(value.to_owned()))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted for SQL (validation guarantees no `"` inside).
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A logical replication slot's name: Postgres allows only lowercase
/// letters, digits and `_`, at most 63 bytes. Validated, it is safe in a
/// replication command, where it cannot be bound as a parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotName(String);

impl SlotName {
    /// Validates `value`; `flag` names where it came from, for the error.
    pub fn parse(value: &str, flag: &str) -> Result<Self, Error> {
        let valid = !value.is_empty()
            && value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(Error::Config(format!(
                "{flag} {value:?} is not a valid replication slot name: use 1 to 63 lowercase letters, digits or underscores"
            )));
        }
        Ok(SlotName(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Tail mode's replication slot and publication, and what to do with a slot
/// Postgres invalidated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailConfig {
    pub slot: SlotName,
    pub publication: Identifier,
    /// Drop an invalidated slot, create a new one and publish again every
    /// row still in the outbox (duplicates possible, nothing lost).
    pub recreate_invalid_slot: bool,
    /// The lane this slot and publication read ([`TailConfig::for_lane`]).
    pub lane: Lane,
    /// Keep published rows this long instead of deleting each once
    /// published (`--retention`); `None` deletes them.
    pub retention: Option<std::time::Duration>,
}

impl TailConfig {
    pub const DEFAULT_SLOT: &str = "outbox_relay";
    pub const DEFAULT_PUBLICATION: &str = "outbox_relay";

    /// The slot and publication of `lane`: `SLOT_K_of_N` and
    /// `PUBLICATION_K_of_N`, the publication filtered to the lane's buckets.
    /// The whole outbox keeps the names as given.
    pub fn for_lane(&self, lane: Lane) -> Result<TailConfig, Error> {
        if lane == Lane::WHOLE {
            return Ok(self.clone());
        }
        let suffix = format!("_{}_of_{}", lane.index(), lane.shards().get());
        let too_long = |flag: &str, name: &str| {
            Error::Config(format!(
                "{flag} {name:?} is too long for --shards {}: each lane's is named {name}_K_of_N, at most 63 characters; give a shorter {flag}",
                lane.shards().get()
            ))
        };
        let slot = format!("{}{suffix}", self.slot.as_str());
        let publication = format!("{}{suffix}", self.publication.as_str());
        if slot.len() > 63 {
            return Err(too_long("--slot (OUTBOX_SLOT)", self.slot.as_str()));
        }
        if publication.len() > 63 {
            return Err(too_long(
                "--publication (OUTBOX_PUBLICATION)",
                self.publication.as_str(),
            ));
        }
        Ok(TailConfig {
            slot: SlotName(slot),
            publication: Identifier(publication),
            recreate_invalid_slot: self.recreate_invalid_slot,
            lane,
            retention: self.retention,
        })
    }
}

impl Default for TailConfig {
    fn default() -> Self {
        TailConfig {
            slot: SlotName(Self::DEFAULT_SLOT.into()),
            publication: Identifier(Self::DEFAULT_PUBLICATION.into()),
            recreate_invalid_slot: false,
            lane: Lane::WHOLE,
            retention: None,
        }
    }
}

/// Which retained rows `outbox-relay replay` republishes, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayFilter {
    /// Rows created at or after this.
    pub since: chrono::DateTime<chrono::Utc>,
    /// Rows created before this.
    pub until: chrono::DateTime<chrono::Utc>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    /// Every replayed row goes to this topic instead of its own.
    pub topic_override: Option<String>,
}

/// Turns a row's `aggregate_type` (and `event_type`) into a topic name when
/// the row's `topic` column is null. Placeholders: `{aggregate_type}`,
/// `{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    AggregateType,
    EventType,
    /// The aggregate id as one subject token (see [`subject_token`]).
    AggregateId,
}

impl TopicTemplate {
    pub const DEFAULT: &'static str = "{aggregate_type}.events";

    /// Parses a template; `flag` names where it came from, for the error.
    pub fn parse(template: &str, flag: &str) -> Result<Self, Error> {
        let bad = |cause: String| {
            Error::Config(format!(
                "{flag} {template:?} is not a valid topic template: {cause}; use text with the placeholders {{aggregate_type}} and {{event_type}}, e.g. {:?}",
                Self::DEFAULT
            ))
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Text(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| bad("a '{' is not closed".into()))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "aggregate_type" => TemplatePart::AggregateType,
                "event_type" => TemplatePart::EventType,
                "aggregate_id" => TemplatePart::AggregateId,
                other => return Err(bad(format!("unknown placeholder {{{other}}}"))),
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(bad("a '}' has no matching '{'".into()));
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Text(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err(bad("it is empty".into()));
        }
        Ok(TopicTemplate { parts })
    }

    /// The topic (subject, exchange) for a row with these fields.
    pub fn render(&self, aggregate_type: &str, event_type: &str, aggregate_id: &str) -> String {
        let mut out = String::with_capacity(32);
        for part in &self.parts {
            match part {
                TemplatePart::Text(text) => out.push_str(text),
                TemplatePart::AggregateType => out.push_str(aggregate_type),
                TemplatePart::EventType => out.push_str(event_type),
                TemplatePart::AggregateId => subject_token(aggregate_id, &mut out),
            }
        }
        out
    }
}

/// Appends `id` as one NATS subject token that no other id shares: ASCII
/// letters, digits, `_` and `-` as they are, every other byte as `%XX`
/// (upper-case hex), so `.`, spaces, `*` and `>` never split or widen a
/// subject. An empty id becomes `%`, which no encoded id can be.
fn subject_token(id: &str, out: &mut String) {
    if id.is_empty() {
        out.push('%');
        return;
    }
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

impl Default for TopicTemplate {
    fn default() -> Self {
        // The default template is a constant known to parse.
        Self::parse(Self::DEFAULT, "default").unwrap_or(TopicTemplate {
            parts: vec![TemplatePart::AggregateType],
        })
    }
}

/// How a row travels (README, "CloudEvents"): the plain mapping, or a
/// CloudEvent in the broker's protocol binding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Format {
    /// The record mapping of the README (the default).
    #[default]
    Plain,
    CloudEvents {
        mode: CloudEventsMode,
        /// The events' `source` attribute.
        source: String,
    },
}

/// Where a CloudEvent's attributes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudEventsMode {
    /// In headers (`ce_` on Kafka, `ce-` on NATS and RabbitMQ); the value
    /// is the payload.
    Binary,
    /// The whole event as one JSON object in the value
    /// (`application/cloudevents+json`).
    Structured,
}

impl Format {
    /// A CloudEvents format; `source` must be a non-empty URI reference
    /// (no spaces or control characters).
    pub fn cloudevents(mode: CloudEventsMode, source: &str, flag: &str) -> Result<Self, Error> {
        if source.is_empty() || source.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::Config(format!(
                "{flag} {source:?} is not a URI reference (empty, or with spaces or control characters); give e.g. /billing/outbox or https://billing.example.com"
            )));
        }
        Ok(Format::CloudEvents {
            mode,
            source: source.to_owned(),
        })
    }
}

/// What a row whose `payload` is SQL null becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NullPayload {
    /// A record whose value is the four bytes `null` (the default).
    #[default]
    JsonNull,
    /// A record with no value: a tombstone for compacted topics.
    Tombstone,
}

/// What the relay does with a row the broker rejects for good (too large,
/// invalid topic, not authorized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoisonPolicy {
    /// Move it to the dead-letter table and keep going; the aggregate's later
    /// rows are published (its consumers see a gap).
    #[default]
    DeadLetter,
    /// Move it to the dead-letter table and park the aggregate's later rows
    /// there too, in order, until an operator retries them.
    BlockAggregate,
    /// Confirm what came before it and stop the relay with an error.
    Halt,
}

impl fmt::Display for PoisonPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoisonPolicy::DeadLetter => "dead-letter",
            PoisonPolicy::BlockAggregate => "block-aggregate",
            PoisonPolicy::Halt => "halt",
        })
    }
}

/// How many lanes an outbox is split into (`--shards`). Every row falls in
/// one of [`Shards::BUCKETS`] virtual buckets by a stable hash of its
/// aggregate id (the `bucket` column); a lane is a contiguous range of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shards(u16);

impl Shards {
    pub const ONE: Shards = Shards(1);
    /// The number of virtual buckets (the `bucket` column's range).
    pub const BUCKETS: u16 = 1024;

    /// `flag` names where the value came from, for the error message.
    pub fn new(shards: u32, flag: &str) -> Result<Self, Error> {
        match u16::try_from(shards) {
            Ok(n) if (1..=Self::BUCKETS).contains(&n) => Ok(Shards(n)),
            _ => Err(Error::Config(format!(
                "{flag} {shards} is out of range: an outbox splits into 1 to {} lanes; give e.g. 4",
                Self::BUCKETS
            ))),
        }
    }

    pub fn get(&self) -> u16 {
        self.0
    }

    /// Every lane, in order.
    pub fn lanes(self) -> impl Iterator<Item = Lane> {
        (0..self.0).map(move |index| Lane {
            index,
            shards: self,
        })
    }
}

impl Default for Shards {
    fn default() -> Self {
        Self::ONE
    }
}

/// One shard of an outbox: what one relay loop reads, publishes and
/// confirms, under a lease of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    index: u16,
    shards: Shards,
}

impl Lane {
    /// The whole outbox, unsharded.
    pub const WHOLE: Lane = Lane {
        index: 0,
        shards: Shards::ONE,
    };

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn shards(&self) -> Shards {
        self.shards
    }

    /// The lane's buckets: `first..end`.
    pub fn buckets(&self) -> std::ops::Range<i16> {
        let (n, k) = (u32::from(self.shards.0), u32::from(self.index));
        let at = |k: u32| (k * u32::from(Shards::BUCKETS) / n) as i16;
        at(k)..at(k + 1)
    }

    /// The name of the lane's lease (and advisory lock) for the outbox in
    /// `schema`. Unsharded, it is the outbox's own.
    pub fn lease_name(&self, schema: &Identifier) -> String {
        if self.shards == Shards::ONE {
            format!("outbox-relay:{schema}")
        } else {
            format!("outbox-relay:{schema}/{}-of-{}", self.index, self.shards.0)
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.shards.0)
    }
}

/// The longest pause between two polls of an idle outbox (a notification
/// from a writer ends it early).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollInterval(Duration);

impl PollInterval {
    pub const DEFAULT: PollInterval = PollInterval(Duration::from_millis(100));
    /// Below this an idle relay would query Postgres in a busy loop.
    pub const MIN: Duration = Duration::from_millis(1);

    /// `flag` names where the value came from, for the error message.
    pub fn new(interval: Duration, flag: &str) -> Result<Self, Error> {
        if interval < Self::MIN {
            return Err(Error::Config(format!(
                "{flag} {} would make an idle relay query Postgres without pause; give at least {}, e.g. 100ms",
                humantime::format_duration(interval),
                humantime::format_duration(Self::MIN)
            )));
        }
        Ok(PollInterval(interval))
    }

    pub fn get(&self) -> Duration {
        self.0
    }
}

impl Default for PollInterval {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How long leadership lasts without progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    ttl: Duration,
}

impl LeaseConfig {
    /// A standby publishes again within about 15 s of the leader hanging.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
    /// Below this, ordinary pauses (a checkpoint, a busy host) look like hangs.
    pub const MIN_TTL: Duration = Duration::from_secs(2);

    /// `flag` names where the value came from, for the error message.
    pub fn new(ttl: Duration, flag: &str) -> Result<Self, Error> {
        if ttl < Self::MIN_TTL {
            return Err(Error::Config(format!(
                "{flag} {} is too short: a slow query or a busy host would look like a hung leader and cause needless takeovers; give at least {}, e.g. 10s",
                humantime::format_duration(ttl),
                humantime::format_duration(Self::MIN_TTL)
            )));
        }
        Ok(LeaseConfig { ttl })
    }

    /// How long the active instance keeps leadership without renewing it.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often a leader with nothing to confirm renews: four times a
    /// lease, so one slow renewal does not cost it.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 4
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Self::DEFAULT_TTL,
        }
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub mode: Mode,
    pub database: DatabaseConfig,
    /// The broker and how to reach it.
    pub sink: SinkConfig,
    /// Slot and publication (tail mode only).
    pub tail: TailConfig,
    pub topic_template: TopicTemplate,
    pub null_payload: NullPayload,
    /// Plain records or CloudEvents.
    pub format: Format,
    pub on_poison: PoisonPolicy,
    /// Rows read, published and confirmed together; also the bound on
    /// records in flight.
    pub batch_size: std::num::NonZeroUsize,
    /// Longest wait between two polls of an idle outbox.
    pub poll_interval: PollInterval,
    /// Lanes the outbox is split into; each has its own loop and lease.
    pub shards: Shards,
    /// How long a stopping relay waits for in-flight acks.
    pub shutdown_timeout: Duration,
    /// Leadership among instances on one outbox.
    pub lease: LeaseConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` listen; `None`: nowhere.
    pub metrics_address: Option<std::net::SocketAddr>,
}

impl RelayConfig {
    /// Loopback: metrics are for a local agent or a sidecar unless the
    /// operator opens them up.
    pub const DEFAULT_METRICS_ADDRESS: std::net::SocketAddr = std::net::SocketAddr::V4(
        std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9879),
    );

    /// A configuration with the documented defaults.
    pub fn new(database: DatabaseConfig, sink: impl Into<SinkConfig>) -> Self {
        RelayConfig {
            mode: Mode::Poll,
            database,
            sink: sink.into(),
            tail: TailConfig::default(),
            topic_template: TopicTemplate::default(),
            null_payload: NullPayload::JsonNull,
            format: Format::Plain,
            on_poison: PoisonPolicy::default(),
            batch_size: std::num::NonZeroUsize::new(1000).expect("1000 is not zero"),
            poll_interval: PollInterval::DEFAULT,
            shards: Shards::ONE,
            shutdown_timeout: Duration::from_secs(10),
            lease: LeaseConfig::default(),
            metrics_address: Some(Self::DEFAULT_METRICS_ADDRESS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_cover_every_bucket_once() {
        for n in [1, 2, 3, 7, 8, 1000, 1024] {
            let shards = Shards::new(n, "--shards").unwrap();
            let mut next = 0;
            for lane in shards.lanes() {
                let buckets = lane.buckets();
                assert_eq!(buckets.start, next, "lane {lane}");
                assert!(buckets.end > buckets.start, "lane {lane} is empty");
                next = buckets.end;
            }
            assert_eq!(next, Shards::BUCKETS as i16, "{n} shards");
        }
        for n in [0, 1025] {
            let err = Shards::new(n, "--shards (OUTBOX_SHARDS)").unwrap_err();
            assert!(err.to_string().contains("1 to 1024 lanes"), "{err}");
        }
        let schema = Identifier::parse("shop", "--schema").unwrap();
        assert_eq!(Lane::WHOLE.lease_name(&schema), "outbox-relay:shop");
        let third = Shards::new(4, "--shards").unwrap().lanes().nth(2).unwrap();
        assert_eq!(third.lease_name(&schema), "outbox-relay:shop/2-of-4");
        assert_eq!(third.buckets(), 512..768);
    }

    #[test]
    fn template_renders_placeholders() {
        let t = TopicTemplate::parse("app.{aggregate_type}.{event_type}", "--t").unwrap();
        assert_eq!(t.render("order", "created", "o-1"), "app.order.created");
        let t = TopicTemplate::parse("{aggregate_type}.{aggregate_id}", "--t").unwrap();
        assert_eq!(t.render("order", "c", "o-1_A"), "order.o-1_A");
        assert_eq!(
            t.render("order", "c", "a.b c*>%"),
            "order.a%2Eb%20c%2A%3E%25"
        );
        assert_eq!(t.render("order", "c", "é"), "order.%C3%A9");
        assert_eq!(t.render("order", "c", ""), "order.%");
        assert_eq!(
            TopicTemplate::default().render("order", "x", "o-1"),
            "order.events"
        );
    }

    #[test]
    fn template_rejects_unknown_placeholder() {
        let err = TopicTemplate::parse("{aggregate}.events", "--topic-template")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown placeholder {aggregate}"), "{err}");
        assert!(TopicTemplate::parse("{aggregate_type", "--t").is_err());
        assert!(TopicTemplate::parse("a}b", "--t").is_err());
    }

    #[test]
    fn identifiers_are_validated_and_quoted() {
        assert_eq!(
            Identifier::parse("my_schema", "--schema").unwrap().quoted(),
            "\"my_schema\""
        );
        for bad in [
            "",
            "1abc",
            "a-b",
            "x\"; drop table outbox; --",
            &"a".repeat(64),
        ] {
            let err = Identifier::parse(bad, "--schema").unwrap_err().to_string();
            assert!(err.starts_with("--schema "), "{err}");
        }
    }

    #[test]
    fn slot_names_follow_postgres_rules() {
        assert_eq!(
            SlotName::parse("outbox_relay_2", "--slot")
                .unwrap()
                .as_str(),
            "outbox_relay_2"
        );
        for bad in ["", "Upper", "a-b", "x; drop", &"a".repeat(64)] {
            let err = SlotName::parse(bad, "--slot").unwrap_err().to_string();
            assert!(
                err.starts_with("--slot ") && err.contains("lowercase"),
                "{err}"
            );
        }
    }

    #[test]
    fn tls_settings_come_from_the_url() {
        let schema = Identifier::parse("public", "--schema").unwrap();
        let db = DatabaseConfig::from_url(
            "postgres://u:p%40ss@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            schema.clone(),
            "--database-url",
        )
        .unwrap();
        assert_eq!(db.tls().mode, SslMode::VerifyFull);
        assert_eq!(db.tls().root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(db.password(), "p@ss");
        let plain =
            DatabaseConfig::from_url("postgres://u:p@h/db", schema.clone(), "--database-url");
        assert_eq!(
            plain.unwrap().tls().mode,
            SslMode::Prefer,
            "libpq's default"
        );
    }

    #[test]
    fn an_unknown_sslmode_is_an_error_not_a_silent_default() {
        let schema = Identifier::parse("public", "--schema").unwrap();
        let err = DatabaseConfig::from_url(
            "postgres://u:s3cr3t@h/db?sslmode=verify_full",
            schema,
            "--database-url",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("--database-url: sslmode \"verify_full\" is not one of"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn a_call_timeout_below_a_second_is_refused() {
        let schema = Identifier::parse("public", "--schema").unwrap();
        let db = DatabaseConfig::from_url("postgres://u:p@h/db", schema, "--database-url").unwrap();
        let err = db
            .clone()
            .with_call_timeout(Duration::from_millis(500), "--database-timeout")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("--database-timeout 500ms is too short"),
            "{err}"
        );
        let db = db
            .with_call_timeout(Duration::from_secs(5), "--database-timeout")
            .unwrap();
        assert_eq!(db.call_timeout(), Duration::from_secs(5));
    }

    #[test]
    fn database_url_errors_never_show_the_password() {
        let schema = Identifier::parse("public", "--schema").unwrap();
        let err = DatabaseConfig::from_url(
            "postgres://u:s3cr3t@host:notaport/db",
            schema.clone(),
            "--database-url",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("--database-url is not a valid Postgres URL"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
        let ok =
            DatabaseConfig::from_url("postgres://u:s3cr3t@host:5433/db", schema, "--database-url")
                .unwrap();
        assert_eq!(ok.target().to_string(), "host:5433/db");
        assert!(!format!("{ok:?}").contains("s3cr3t"));
    }

    #[test]
    fn secret_kafka_properties_are_redacted_in_debug() {
        let k = KafkaConfig {
            brokers: "b:9092".into(),
            properties: vec![("sasl.password".into(), "hunter2".into())],
        };
        assert!(!format!("{k:?}").contains("hunter2"));
    }
}
