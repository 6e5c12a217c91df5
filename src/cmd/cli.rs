//! Command-line flags (every one also an environment variable) and their
//! translation into the validated [`outbox_relay::config`] types. This is the only
//! module that knows about clap.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use outbox_relay::config::{
    CloudEventsMode, DatabaseConfig, Format, Identifier, KafkaConfig, LeaseConfig, Mode,
    NatsConfig, NullPayload, PoisonPolicy, PollInterval, RabbitMqConfig, RelayConfig, ReplayFilter,
    Shards, SinkConfig, SinkKind, SlotName, TailConfig, TopicTemplate,
};
use outbox_relay::error::Error;

use crate::testkit::rabbitmq::QueueType;

/// Publishes a Postgres transactional outbox to Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "OUTBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update the outbox, inbox and dead-letter tables, and tail mode's publication.
    Migrate(MigrateArgs),
    /// Publish committed outbox rows to Kafka until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Show the backlog: unpublished rows, the oldest one's age, dead letters, slot lag.
    Status(StatusArgs),
    /// Delete inbox rows older than a retention period.
    InboxPurge(InboxPurgeArgs),
    /// Inspect, replay or purge rows the broker rejected for good.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Inspect, retry or purge messages a consumer runtime's handler could not apply.
    #[command(subcommand)]
    ConsumerDeadLetters(ConsumerDeadLettersCommand),
    /// Publish retained rows again (tail mode with --retention), in order per aggregate, marked with a `replayed` header, beside the live relay.
    Replay(ReplayArgs),
    /// Run the whole pipeline on a throwaway Postgres and an in-process Kafka.
    Demo(DemoArgs),
    /// Measure both modes' drain rate, CPU, memory and live latency beside the limits of Postgres and Kafka.
    Bench(BenchArgs),
}

/// Where the outbox lives.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Postgres URL: postgres://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=...
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Schema holding the outbox tables.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public")]
    pub schema: String,
}

impl DatabaseArgs {
    pub fn to_config(&self) -> Result<DatabaseConfig, Error> {
        let schema = Identifier::parse(&self.schema, "--schema (OUTBOX_SCHEMA)")?;
        let url = self.database_url.as_deref().ok_or_else(|| {
            Error::Config(
                "--database-url (OUTBOX_DATABASE_URL) is missing; give the Postgres URL, postgres://USER:PASSWORD@HOST:PORT/DATABASE".into(),
            )
        })?;
        DatabaseConfig::from_url(url, schema, "--database-url (OUTBOX_DATABASE_URL)")
    }
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Publication to create for tail mode (inserts into this schema's outbox only).
    #[arg(long, env = "OUTBOX_PUBLICATION", default_value = TailConfig::DEFAULT_PUBLICATION)]
    pub publication: String,
}

impl MigrateArgs {
    pub fn publication(&self) -> Result<Identifier, Error> {
        Identifier::parse(&self.publication, "--publication (OUTBOX_PUBLICATION)")
    }
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Tail mode's replication slot, whose lag is shown.
    #[arg(long, env = "OUTBOX_SLOT", default_value = TailConfig::DEFAULT_SLOT)]
    pub slot: String,

    /// Print the status as one JSON object (a stable schema, see README).
    #[arg(long)]
    pub json: bool,

    /// Exit 3 when the oldest unpublished row is older than this (e.g.
    /// 30s), for cron jobs and probes.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_lag: Option<std::time::Duration>,

    /// Exit 3 when the dead-letter table holds more rows than this.
    #[arg(long)]
    pub max_dead_letters: Option<i64>,
}

impl StatusArgs {
    pub fn slot(&self) -> Result<SlotName, Error> {
        SlotName::parse(&self.slot, "--slot (OUTBOX_SLOT)")
    }
}

/// Tail mode's replication slot and publication.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Logical replication slot tail mode reads (created if missing).
    #[arg(long, env = "OUTBOX_SLOT", default_value = TailConfig::DEFAULT_SLOT)]
    pub slot: String,

    /// Publication tail mode subscribes to (created by `migrate`).
    #[arg(long, env = "OUTBOX_PUBLICATION", default_value = TailConfig::DEFAULT_PUBLICATION)]
    pub publication: String,

    /// If Postgres invalidated the slot, create a new one and publish every row still in the outbox again.
    #[arg(long, env = "OUTBOX_RECREATE_INVALID_SLOT")]
    pub recreate_invalid_slot: bool,

    /// Tail mode: keep published rows this long (e.g. 7d), then remove them in bulk, instead of deleting each once published; `replay` republishes them.
    #[arg(long, env = "OUTBOX_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
}

impl TailArgs {
    pub fn to_config(&self) -> Result<TailConfig, Error> {
        Ok(TailConfig {
            slot: SlotName::parse(&self.slot, "--slot (OUTBOX_SLOT)")?,
            publication: Identifier::parse(
                &self.publication,
                "--publication (OUTBOX_PUBLICATION)",
            )?,
            recreate_invalid_slot: self.recreate_invalid_slot,
            lane: outbox_relay::config::Lane::WHOLE,
            retention: match self.retention {
                Some(d) if d < Duration::from_secs(1) => {
                    return Err(Error::Config(format!(
                        "--retention (OUTBOX_RETENTION) is {}; give at least 1s, e.g. 7d",
                        humantime::format_duration(d)
                    )));
                }
                retention => retention,
            },
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Export a span per published batch, linked to each row's trace context, to this OTLP/HTTP collector (base URL, e.g. http://otel-collector:4318); OTEL_EXPORTER_OTLP_* are honoured as well.
    #[arg(long, env = "OUTBOX_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Several outboxes from a TOML file: its top-level keys are these flags by their long names and apply to every outbox, each [[outbox]] table adds its own (see README, "Several outboxes in one process").
    #[arg(long, env = "OUTBOX_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// How to read the outbox: poll (SQL batches) or tail (logical replication).
    #[arg(long, env = "OUTBOX_MODE", default_value = "poll", value_parser = parse_mode)]
    pub mode: Mode,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub sink: SinkArgs,

    #[command(flatten)]
    pub tail: TailArgs,

    /// Topic for rows whose `topic` column is null; placeholders {aggregate_type}, {event_type}.
    #[arg(long, env = "OUTBOX_TOPIC_TEMPLATE", default_value = TopicTemplate::DEFAULT)]
    pub topic_template: String,

    /// What a null payload becomes: the JSON value null, or a tombstone (no value).
    #[arg(long, env = "OUTBOX_NULL_PAYLOAD", value_enum, default_value_t = NullPayloadArg::JsonNull)]
    pub null_payload: NullPayloadArg,

    #[command(flatten)]
    pub format: FormatArgs,

    /// A row the broker rejects for good: dead-letter (and go on), block-aggregate (park its later rows too), or halt.
    #[arg(long, env = "OUTBOX_ON_POISON", value_enum, default_value_t = PoisonArg::DeadLetter)]
    pub on_poison: PoisonArg,

    /// Rows read, published and confirmed together (also the in-flight bound).
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Longest pause between polls of an idle outbox (e.g. 100ms, 1s).
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Lanes to split the outbox into by a hash of aggregate_id (poll mode); each is read, published and confirmed by its own loop under its own lease, so instances share them.
    #[arg(long, env = "OUTBOX_SHARDS", default_value_t = 1)]
    pub shards: u32,

    /// Address for /metrics, /healthz and /readyz (HOST:PORT), or `off`.
    #[arg(long, env = "OUTBOX_METRICS_ADDRESS", default_value = "127.0.0.1:9879")]
    pub metrics_address: String,

    /// How long one call to Postgres may go unanswered before the connection is dropped and opened again.
    #[arg(long, env = "OUTBOX_DATABASE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub database_timeout: Duration,

    /// How long SIGTERM waits for in-flight acks before exiting.
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// How long the active instance stays active without its relay loop making progress; a standby takes over a leader hung for longer (min 2s).
    #[arg(long, env = "OUTBOX_LEASE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    /// The broker to publish to: kafka, nats (JetStream) or rabbitmq.
    #[arg(long, env = "OUTBOX_SINK", default_value = "kafka", value_parser = parse_sink)]
    pub sink: SinkKind,

    /// The NATS servers (nats://HOST:4222[,...]) or the RabbitMQ broker (amqp://USER:PASS@HOST:5672/VHOST), for --sink nats|rabbitmq.
    #[arg(long, env = "OUTBOX_SINK_URL", hide_env_values = true)]
    pub sink_url: Option<String>,

    /// Extra NATS or RabbitMQ client setting KEY=VALUE (repeatable; env: comma-separated).
    #[arg(
        long = "sink-config",
        env = "OUTBOX_SINK_CONFIG",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub sink_config: Vec<String>,

    #[command(flatten)]
    pub kafka: KafkaArgs,
}

impl SinkArgs {
    /// Validates the broker settings; an error never echoes a value that
    /// may be a secret.
    pub fn to_config(&self) -> Result<SinkConfig, Error> {
        let kafka_given = self.kafka.brokers.is_some() || !self.kafka.properties.is_empty();
        let other_given = self.sink_url.is_some() || !self.sink_config.is_empty();
        match self.sink {
            SinkKind::Kafka if other_given => Err(Error::Config(
                "--sink-url and --sink-config (OUTBOX_SINK_URL, OUTBOX_SINK_CONFIG) are for --sink nats or rabbitmq; Kafka takes --brokers and --kafka-config, or set --sink".into(),
            )),
            SinkKind::Kafka => Ok(SinkConfig::Kafka(self.kafka.to_config()?)),
            kind if kafka_given => Err(Error::Config(format!(
                "--brokers and --kafka-config (OUTBOX_BROKERS, OUTBOX_KAFKA_CONFIG) are for --sink kafka; --sink {kind} takes --sink-url and --sink-config"
            ))),
            kind => {
                let options = key_values(&self.sink_config, "--sink-config (OUTBOX_SINK_CONFIG)", "a client setting", "ack_timeout=5s")?;
                let url = self.sink_url.as_deref().unwrap_or_default();
                Ok(match kind {
                    SinkKind::Nats => SinkConfig::Nats(NatsConfig::parse(url, &options)?),
                    _ => SinkConfig::RabbitMq(RabbitMqConfig::parse(url, &options)?),
                })
            }
        }
    }
}

/// `KEY=VALUE` entries as pairs; an error names the entry by its place, never
/// its value (which may be a secret).
fn key_values(
    entries: &[String],
    flag: &str,
    what: &str,
    example: &str,
) -> Result<Vec<(String, String)>, Error> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| match entry.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.to_owned()))
            }
            _ => Err(Error::Config(format!(
                "{flag} entry {} is not KEY=VALUE; write each {what} as KEY=VALUE, e.g. {example}",
                i + 1
            ))),
        })
        .collect()
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "OUTBOX_BROKERS")]
    pub brokers: Option<String>,

    /// Extra librdkafka producer property KEY=VALUE (repeatable; env: comma-separated).
    #[arg(
        long = "kafka-config",
        env = "OUTBOX_KAFKA_CONFIG",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub properties: Vec<String>,
}

impl KafkaArgs {
    /// Validates the properties; an error never echoes a value, which may be a secret.
    pub fn to_config(&self) -> Result<KafkaConfig, Error> {
        let properties = key_values(
            &self.properties,
            "--kafka-config (OUTBOX_KAFKA_CONFIG)",
            "librdkafka property",
            "security.protocol=SSL",
        )?;
        let brokers = self.brokers.as_deref().unwrap_or_default();
        if brokers.trim().is_empty() {
            return Err(Error::Config(
                "--brokers (OUTBOX_BROKERS) is missing or empty; give the Kafka bootstrap servers as HOST:PORT[,HOST:PORT]".into(),
            ));
        }
        Ok(KafkaConfig {
            brokers: brokers.to_owned(),
            properties,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoisonArg {
    DeadLetter,
    BlockAggregate,
    Halt,
}

/// How rows travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Plain,
    CloudeventsBinary,
    CloudeventsStructured,
}

#[derive(Debug, Clone, Args)]
pub struct FormatArgs {
    /// How rows travel: plain (the README's record mapping), or as CloudEvents in the broker's binding: cloudevents-binary (attributes in headers) or cloudevents-structured (one JSON event in the value).
    #[arg(long, env = "OUTBOX_FORMAT", value_enum, default_value_t = FormatArg::Plain)]
    pub format: FormatArg,

    /// The CloudEvents `source` attribute (a URI reference); default /outbox-relay/DATABASE/SCHEMA.
    #[arg(long, env = "OUTBOX_CLOUDEVENTS_SOURCE")]
    pub cloudevents_source: Option<String>,
}

impl FormatArgs {
    pub fn to_format(&self, database: &DatabaseConfig) -> Result<Format, Error> {
        let mode = match self.format {
            FormatArg::Plain => {
                if self.cloudevents_source.is_some() {
                    return Err(Error::Config(
                        "--cloudevents-source (OUTBOX_CLOUDEVENTS_SOURCE) is given but --format is plain; add --format cloudevents-binary or cloudevents-structured, or drop the source".into(),
                    ));
                }
                return Ok(Format::Plain);
            }
            FormatArg::CloudeventsBinary => CloudEventsMode::Binary,
            FormatArg::CloudeventsStructured => CloudEventsMode::Structured,
        };
        let source = self.cloudevents_source.clone().unwrap_or_else(|| {
            format!(
                "/outbox-relay/{}/{}",
                database.target().database,
                database.schema()
            )
        });
        Format::cloudevents(
            mode,
            &source,
            "--cloudevents-source (OUTBOX_CLOUDEVENTS_SOURCE)",
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NullPayloadArg {
    JsonNull,
    Tombstone,
}

impl From<NullPayloadArg> for NullPayload {
    fn from(arg: NullPayloadArg) -> Self {
        match arg {
            NullPayloadArg::JsonNull => NullPayload::JsonNull,
            NullPayloadArg::Tombstone => NullPayload::Tombstone,
        }
    }
}

impl RunArgs {
    /// Validates everything before anything connects.
    pub fn to_config(&self) -> Result<RelayConfig, Error> {
        let database = self.database.to_config()?.with_call_timeout(
            self.database_timeout,
            "--database-timeout (OUTBOX_DATABASE_TIMEOUT)",
        )?;
        let mut config = RelayConfig::new(database, self.sink.to_config()?);
        config.mode = self.mode;
        config.tail = self.tail.to_config()?;
        if config.tail.retention.is_some() && self.mode == Mode::Poll {
            return Err(Error::Config(
                "--retention (OUTBOX_RETENTION) needs --mode tail: poll mode's progress is the table itself, it removes each row once published; use --mode tail to keep published rows".into(),
            ));
        }
        config.topic_template = TopicTemplate::parse(
            &self.topic_template,
            "--topic-template (OUTBOX_TOPIC_TEMPLATE)",
        )?;
        config.null_payload = self.null_payload.into();
        config.format = self.format.to_format(&config.database)?;
        config.on_poison = match self.on_poison {
            PoisonArg::DeadLetter => PoisonPolicy::DeadLetter,
            PoisonArg::BlockAggregate => PoisonPolicy::BlockAggregate,
            PoisonArg::Halt => PoisonPolicy::Halt,
        };
        config.batch_size =
            std::num::NonZeroUsize::new(self.batch_size as usize).ok_or_else(|| {
                Error::Config(
                    "--batch-size (OUTBOX_BATCH_SIZE) is 0; give at least 1, e.g. 1000".into(),
                )
            })?;
        config.poll_interval =
            PollInterval::new(self.poll_interval, "--poll-interval (OUTBOX_POLL_INTERVAL)")?;
        config.shutdown_timeout = self.shutdown_timeout;
        config.lease = LeaseConfig::new(self.lease, "--lease (OUTBOX_LEASE)")?;
        config.shards = Shards::new(self.shards, "--shards (OUTBOX_SHARDS)")?;
        // Every lane's slot and publication name must fit.
        for lane in config.shards.lanes() {
            config.tail.for_lane(lane)?;
        }
        config.metrics_address = match self.metrics_address.trim() {
            "off" => None,
            address => Some(address.parse().map_err(|_| {
                Error::Config(format!(
                    "--metrics-address (OUTBOX_METRICS_ADDRESS) {address:?} is not an IP:PORT; use e.g. 127.0.0.1:9879, 0.0.0.0:9879 or off"
                ))
            })?),
        };
        Ok(config)
    }
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub sink: SinkArgs,

    /// Replay rows created at or after this: RFC 3339 (2026-12-01T00:00:00Z) or a duration ago (2h, 7d).
    #[arg(long, env = "OUTBOX_REPLAY_SINCE")]
    pub since: String,

    /// Replay rows created before this (same forms as --since); default: now.
    #[arg(long, env = "OUTBOX_REPLAY_UNTIL")]
    pub until: Option<String>,

    /// Only rows of this aggregate type.
    #[arg(long, env = "OUTBOX_REPLAY_AGGREGATE_TYPE")]
    pub aggregate_type: Option<String>,

    /// Only rows of this aggregate id.
    #[arg(long, env = "OUTBOX_REPLAY_AGGREGATE_ID")]
    pub aggregate_id: Option<String>,

    /// Send every replayed row to this topic instead of its own.
    #[arg(long, env = "OUTBOX_REPLAY_TOPIC_OVERRIDE")]
    pub topic_override: Option<String>,

    /// Count the rows a replay would publish, and publish nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Topic for rows whose `topic` column is null, as for `run`.
    #[arg(long, env = "OUTBOX_TOPIC_TEMPLATE", default_value = TopicTemplate::DEFAULT)]
    pub topic_template: String,

    /// What a null payload becomes, as for `run`.
    #[arg(long, env = "OUTBOX_NULL_PAYLOAD", value_enum, default_value_t = NullPayloadArg::JsonNull)]
    pub null_payload: NullPayloadArg,

    #[command(flatten)]
    pub format: FormatArgs,

    /// Rows read and published together (also the in-flight bound).
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
}

impl ReplayArgs {
    /// Validates everything before anything connects.
    pub fn to_config(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(RelayConfig, ReplayFilter), Error> {
        let time = |text: &str, flag: &str| {
            outbox_relay::source::replay::parse_time(text, now).ok_or_else(|| {
                Error::Config(format!(
                    "{flag} {text:?} is neither an RFC 3339 time nor a duration; give e.g. 2026-12-01T00:00:00Z or 2h (that long ago)"
                ))
            })
        };
        let since = time(&self.since, "--since (OUTBOX_REPLAY_SINCE)")?;
        let until = match &self.until {
            Some(until) => time(until, "--until (OUTBOX_REPLAY_UNTIL)")?,
            None => now,
        };
        if since >= until {
            return Err(Error::Config(format!(
                "--since ({since}) is not before --until ({until}); give a window that ends after it starts"
            )));
        }
        let non_empty = |value: &Option<String>, flag: &str| match value {
            Some(v) if v.trim().is_empty() => Err(Error::Config(format!(
                "{flag} is empty; give a value or leave the flag out"
            ))),
            v => Ok(v.clone()),
        };
        let filter = ReplayFilter {
            since,
            until,
            aggregate_type: non_empty(&self.aggregate_type, "--aggregate-type")?,
            aggregate_id: non_empty(&self.aggregate_id, "--aggregate-id")?,
            topic_override: non_empty(&self.topic_override, "--topic-override")?,
        };
        let mut config = RelayConfig::new(self.database.to_config()?, self.sink.to_config()?);
        config.topic_template = TopicTemplate::parse(
            &self.topic_template,
            "--topic-template (OUTBOX_TOPIC_TEMPLATE)",
        )?;
        config.null_payload = self.null_payload.into();
        config.format = self.format.to_format(&config.database)?;
        config.batch_size =
            std::num::NonZeroUsize::new(self.batch_size as usize).unwrap_or(config.batch_size);
        config.metrics_address = None;
        Ok((config, filter))
    }
}

#[derive(Debug, Clone, Args)]
pub struct InboxPurgeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Delete rows processed longer ago than this (e.g. 7d, 12h).
    #[arg(long, env = "OUTBOX_INBOX_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub older_than: Duration,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Print the dead-lettered rows, oldest first, with their errors.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Move rows back into the outbox to be published again (with the rest of their aggregates, in order).
    Retry {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        which: Which,
    },
    /// Delete rows for good.
    Purge {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        which: Which,
        /// Only rows that failed longer ago than this (e.g. 30d).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["id", "all"])]
        older_than: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsumerDeadLettersCommand {
    /// Print the consumer dead letters, oldest first, with their errors.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Only this consumer group's.
        #[arg(long)]
        group: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// One JSON object per line, with key, headers and payload.
        #[arg(long)]
        json: bool,
    },
    /// Mark rows for a running consumer of the group to apply again through its handler (once, through the inbox).
    Retry {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(long)]
        group: String,
        #[command(flatten)]
        which: ConsumerWhich,
    },
    /// Delete rows for good.
    Purge {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(long)]
        group: String,
        #[command(flatten)]
        which: ConsumerWhich,
        /// Only rows that failed longer ago than this (e.g. 30d).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["id", "all"])]
        older_than: Option<Duration>,
    },
}

/// Which consumer dead letters a command takes.
#[derive(Debug, Clone, Args)]
pub struct ConsumerWhich {
    /// The row with this id (the first column of `list`).
    #[arg(long)]
    pub id: Option<i64>,
    /// Every row of the group.
    #[arg(long, conflicts_with = "id")]
    pub all: bool,
}

impl ConsumerWhich {
    /// The selection; `command` names the command for the error.
    pub fn selection(
        &self,
        older_than: Option<Duration>,
        command: &str,
    ) -> Result<outbox_relay::consumer::DeadLetterSelection, Error> {
        use outbox_relay::consumer::DeadLetterSelection;
        let list = "outbox-relay consumer-dead-letters list";
        Ok(
            match choose(self.id, self.all, older_than, command, "N", list)? {
                Choice::Id(id) => DeadLetterSelection::Id(id),
                Choice::All => DeadLetterSelection::All,
                Choice::OlderThan(age) => DeadLetterSelection::OlderThan(age),
            },
        )
    }
}

/// What `--id`, `--all` and `--older-than` chose.
enum Choice<T> {
    Id(T),
    All,
    OlderThan(Duration),
}

/// The rows `--id`, `--all` or `--older-than` take; none of them is one
/// line naming `command`, the id's form and the command (`list`) that shows
/// ids.
fn choose<T>(
    id: Option<T>,
    all: bool,
    older_than: Option<Duration>,
    command: &str,
    id_form: &str,
    list: &str,
) -> Result<Choice<T>, Error> {
    match (id, all, older_than) {
        (Some(id), _, _) => Ok(Choice::Id(id)),
        (None, true, _) => Ok(Choice::All),
        (None, false, Some(age)) => Ok(Choice::OlderThan(age)),
        (None, false, None) => Err(Error::Config(format!(
            "{command} needs --id {id_form} or --all{}; see `{list}` for ids",
            if command.ends_with("purge") {
                " or --older-than AGE"
            } else {
                ""
            }
        ))),
    }
}

/// Which dead-lettered rows a command takes.
#[derive(Debug, Clone, Args)]
pub struct Which {
    /// The row with this id.
    #[arg(long)]
    pub id: Option<uuid::Uuid>,
    /// Every row.
    #[arg(long, conflicts_with = "id")]
    pub all: bool,
}

impl Which {
    /// The selection; `command` names the command for the error.
    pub fn selection(
        &self,
        older_than: Option<Duration>,
        command: &str,
    ) -> Result<outbox_relay::dead_letter::Selection, Error> {
        use outbox_relay::dead_letter::Selection;
        let list = "outbox-relay dead-letters list";
        Ok(
            match choose(self.id, self.all, older_than, command, "UUID", list)? {
                Choice::Id(id) => Selection::Id(id),
                Choice::All => Selection::All,
                Choice::OlderThan(age) => Selection::OlderThan(age),
            },
        )
    }
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Which way the relay reads the outbox.
    #[arg(long, env = "OUTBOX_MODE", default_value = "poll", value_parser = parse_mode)]
    pub mode: Mode,

    /// The broker: kafka (in-process mock cluster), nats or rabbitmq (a throwaway server from the system's nats-server or rabbitmq-server).
    #[arg(long, env = "OUTBOX_SINK", default_value = "kafka", value_parser = parse_sink)]
    pub sink: SinkKind,

    /// Use this NATS or RabbitMQ server instead of a throwaway one (URL as for run).
    #[arg(long, env = "OUTBOX_SINK_URL", hide_env_values = true)]
    pub sink_url: Option<String>,

    /// Use this Postgres instead of a throwaway one (tables go in a fresh schema, dropped after).
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Use these Kafka brokers instead of the in-process mock cluster.
    #[arg(long, env = "OUTBOX_BROKERS")]
    pub brokers: Option<String>,

    /// Concurrent writer connections.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub writers: u32,

    /// Business transactions per writer.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub transactions: u32,

    /// Distinct aggregates the writers touch.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub aggregates: u32,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Brokers to drain to (comma-separated): kafka runs the modes below; nats and rabbitmq drain to a throwaway server beside a plain publisher of their client.
    #[arg(long = "sink", value_delimiter = ',', value_parser = parse_sink, default_values = ["kafka"])]
    pub sinks: Vec<SinkKind>,

    /// The type of the RabbitMQ drains' destination queue (classic, quorum or stream).
    #[arg(long, default_value = "quorum", value_parser = parse_queue_type)]
    pub rabbitmq_queue: QueueType,

    /// Modes to measure, in order.
    #[arg(long = "mode", value_parser = parse_mode, default_values = ["poll", "tail"])]
    pub modes: Vec<Mode>,

    /// Backlog rows each mode drains.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1000..=10_000_000))]
    pub rows: u64,

    /// Distinct aggregates (Kafka keys) the rows spread over.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub aggregates: u32,

    /// Approximate JSON payload size per row, in bytes.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u64).range(80..=100_000))]
    pub payload_bytes: u64,

    /// Live phase: rows per second the writers commit (one row per transaction).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,

    /// Live phase length (e.g. 30s); 0s skips it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub live: Duration,

    /// A real Kafka broker to use instead of the in-process mock cluster (HOST:PORT).
    #[arg(long, env = "OUTBOX_BROKERS")]
    pub brokers: Option<String>,

    /// Partitions of each bench topic.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub partitions: i32,

    /// The relay's --batch-size.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// The relay's --shards (lanes in one instance).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: u16,

    /// Keep the relay's logs in this directory (with OUTBOX_LOG=debug: one line per batch).
    #[arg(long)]
    pub relay_log_dir: Option<std::path::PathBuf>,

    /// Also write the figures to this file as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,

    /// Also drain with these lane counts in one instance (poll, --shards), e.g. 1,2,4,8, against the mock cluster with a slow round trip.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub lanes: Vec<u16>,

    /// Backlog rows for each lanes drain (timed from the relay's start, so enough rows that start-up does not dominate).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1000..=10_000_000))]
    pub lanes_rows: u64,

    /// The mock brokers' round trip during the lanes drains (a remote broker).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub lanes_rtt: Duration,

    /// The relay's --batch-size during the lanes drains.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub lanes_batch_size: u32,

    /// Backlog sizes for tail drains deleting and keeping (--retention) published rows, each beside pg_recvlogical (e.g. 200000,1000000); none by default.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1000..=10_000_000))]
    pub retention_rows: Vec<u64>,

    /// Relay starts per mode to time from process start to the first row confirmed (0 skips them).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub startup_runs: u32,

    /// Messages through the consumer runtime (a handler that does nothing, --partitions partitions) beside a plain consumer; 0 skips it.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub consumer_messages: u64,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

fn parse_sink(s: &str) -> Result<SinkKind, String> {
    s.parse()
}

fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    s.parse()
}

/// A clap error as one line: its first lines name the flag and the cause;
/// the usage and the hints are left out.
pub fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("tip:"))
        .collect();
    message.join(" ")
}
