//! `outbox-relay bench`: how fast each mode publishes, measured beside the
//! limits of the parts it sits between, in the same run on the same rows.
//!
//! For each mode, on a throwaway Postgres and a Kafka cluster (the
//! in-process mock cluster, or `--brokers`):
//! - **limits**: Postgres' insert rate for the backlog's rows (batched
//!   inserts on two connections); `pg_recvlogical`'s decode rate for the
//!   WAL those inserts wrote (tail mode's ceiling: the same `pgoutput`
//!   decoding with nothing done per row); a plain librdkafka producer's rate
//!   for the same records with the relay's producer settings (the sink's
//!   ceiling);
//! - **drain**: the relay, a separate process started from this binary,
//!   publishing the whole backlog: from its start until the outbox is empty
//!   (every row acknowledged and confirmed), with its CPU time and peak RSS
//!   read from `/proc`;
//! - **live**: writers committing single-row transactions at a fixed rate
//!   while the relay runs; the latency of each row is from just before its
//!   COMMIT to its arrival at a consumer in this process (so it includes the
//!   consumer's fetch: an upper bound on commit-to-ack).
//!
//! The machine is shared and noisy, so every speed is printed with its ratio
//! to a limit measured in the same run. Nothing here is a test: targets are
//! reported, not asserted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::testkit::TempPostgres;
use outbox_relay::config::{
    DatabaseConfig, Identifier, KafkaConfig, Mode, NullPayload, Shards, TailConfig, TopicTemplate,
};
use outbox_relay::database;
use outbox_relay::error::Error;
use outbox_relay::message;
use outbox_relay::outbox::{self, Event, OutboxRow};
use outbox_relay::sink::kafka::producer_properties;

mod consumer;
mod retention;
mod sinks;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `outbox-relay` binary the relay runs from (this one).
    pub relay_binary: PathBuf,
    pub modes: Vec<Mode>,
    /// Backlog rows for the drain.
    pub rows: u64,
    pub aggregates: u32,
    /// Approximate JSON payload size per row.
    pub payload_bytes: usize,
    /// Live phase: rows per second, for this long (0 skips it).
    pub rate: u32,
    pub live: Duration,
    /// A real broker instead of the mock cluster.
    pub brokers: Option<String>,
    pub partitions: i32,
    /// The relay's `--batch-size`.
    pub batch_size: u32,
    /// The relay's `--shards`.
    pub shards: u16,
    /// Keep the relay's logs here instead of a temp dir removed afterwards.
    pub relay_log_dir: Option<PathBuf>,
    /// Lane counts to drain with in one instance (poll mode, `--shards`),
    /// with the mock brokers' round trip set to `lanes_rtt`; empty skips it.
    pub lanes: Vec<u16>,
    pub lanes_rows: u64,
    pub lanes_rtt: Duration,
    pub lanes_batch_size: u32,
    /// Backlog sizes for tail drains deleting and keeping published rows;
    /// empty skips them.
    pub retention_rows: Vec<u64>,
    /// Relay starts per mode to time; 0 skips them.
    pub startup_runs: u32,
    /// Brokers to drain to; Kafka's runs are the modes above, the others'
    /// are drains beside a plain publisher of their client.
    pub sinks: Vec<outbox_relay::config::SinkKind>,
    /// Messages through the consumer runtime beside a plain consumer; 0
    /// skips it.
    pub consumer_messages: u64,
    /// The type of the RabbitMQ drains' destination queues.
    pub rabbitmq_queue: crate::testkit::rabbitmq::QueueType,
}

/// The figures of one run, as printed and as written with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub kafka: String,
    pub rows: u64,
    pub aggregates: u32,
    pub payload_bytes: usize,
    pub batch_size: u32,
    /// The relay's `--shards`.
    pub shards: u16,
    pub modes: Vec<ModeReport>,
    pub lanes: Option<LanesReport>,
    pub retention: Vec<retention::RetentionDrain>,
    pub startup: Vec<retention::Startup>,
    pub sinks: Vec<sinks::SinkDrain>,
    pub consumer: Option<consumer::ConsumerRun>,
}

/// Drains of one backlog with 1, 2, 4, ... lanes in one instance, against a
/// broker with a long round trip (a remote one).
#[derive(Debug, Clone, Serialize)]
pub struct LanesReport {
    pub round_trip_ms: f64,
    pub rows: u64,
    pub batch_size: u32,
    pub runs: Vec<LaneDrain>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LaneDrain {
    pub lanes: u16,
    pub seconds: f64,
    pub rows_per_sec: f64,
    pub relay_cpu_seconds_per_1k_rows: f64,
    pub relay_peak_rss_mb: f64,
    /// Drain rate over the first run's (the fewest lanes).
    pub ratio_to_first: f64,
}

/// Where the figures were measured.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub postgres: String,
    pub outbox_relay: String,
    pub measured_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub mode: String,
    pub limits: Limits,
    pub drain: Drain,
    pub live: Option<Live>,
}

/// The ceilings, measured on this mode's rows.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Postgres inserting the backlog.
    pub insert_rows_per_sec: f64,
    /// `pg_recvlogical` decoding the backlog's WAL (tail mode only).
    pub pg_recvlogical_rows_per_sec: Option<f64>,
    /// A plain producer sending the backlog's records.
    pub producer_records_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_sec: f64,
    pub relay_cpu_seconds_per_1k_rows: f64,
    pub relay_peak_rss_mb: f64,
    /// Drain rate over this mode's reference limit.
    pub ratio: f64,
    /// Which limit `ratio` is against.
    pub ratio_to: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Live {
    pub target_rows_per_sec: u32,
    pub achieved_rows_per_sec: f64,
    pub rows: u64,
    /// Commit to Kafka's ack, from the relay's histogram (interpolated
    /// within its buckets).
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    /// The upper bound of the highest bucket any row fell in.
    pub ack_max_ms_at_most: f64,
    pub acks_counted: u64,
    /// Commit to arrival at a consumer in the bench process.
    pub consumer_p50_ms: f64,
    pub consumer_p99_ms: f64,
    pub consumer_max_ms: f64,
    /// Rows the consumer never received that a second consumer found on
    /// the broker (the consumer figures leave them out).
    pub missed_by_consumer: u64,
}

/// The drain targets, as ratios to the limits.
const POLL_TARGET: f64 = 0.5;
const TAIL_TARGET: f64 = 0.8;
const P99_TARGET_MS: f64 = 50.0;
const RSS_TARGET_MB: f64 = 100.0;
/// With a remote broker's round trip, four lanes over one.
const LANES_TARGET: f64 = 3.0;

/// At most this many records go to the plain producer: enough for a steady
/// rate without holding a million-row backlog in this process's memory.
const PRODUCER_SAMPLE: u64 = 200_000;

/// Runs every mode in `options` and returns the figures.
pub async fn run(
    options: &BenchOptions,
    shutdown: CancellationToken,
) -> Result<BenchReport, Error> {
    let pg = TempPostgres::start().await?;
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let kafka = BenchKafka::start(options.brokers.as_deref())?;
    let mut report = BenchReport {
        machine: Machine::describe(&pg).await?,
        kafka: kafka.describe(options.partitions),
        rows: options.rows,
        aggregates: options.aggregates,
        payload_bytes: options.payload_bytes,
        batch_size: options.batch_size,
        shards: options.shards,
        modes: Vec::new(),
        lanes: None,
        retention: Vec::new(),
        startup: Vec::new(),
        sinks: Vec::new(),
        consumer: None,
    };
    let kafka_modes = options
        .sinks
        .contains(&outbox_relay::config::SinkKind::Kafka);

    for &mode in options.modes.iter().filter(|_| kafka_modes) {
        if shutdown.is_cancelled() {
            break;
        }
        let bench = ModeBench::prepare(&pg, &kafka, options, mode, run_id).await?;
        report.modes.push(bench.run(&shutdown).await?);
    }
    if !options.lanes.is_empty() && !shutdown.is_cancelled() {
        report.lanes = Some(lanes(&pg, &kafka, options, run_id, &shutdown).await?);
    }
    if options.startup_runs > 0 && !shutdown.is_cancelled() {
        report.startup = retention::startup(&pg, &kafka, options, run_id, &shutdown).await?;
    }
    report.retention = retention::retention(&pg, &kafka, options, run_id, &shutdown).await?;
    report.sinks = sinks::sinks(&pg, &kafka, options, run_id, &shutdown).await?;
    report.consumer = consumer::consumer(&pg, &kafka, options, run_id, &shutdown).await?;
    Ok(report)
}

/// Drains the same backlog once per lane count in `options.lanes`, each in a
/// database of its own, with the mock brokers answering after
/// `options.lanes_rtt`.
async fn lanes(
    pg: &TempPostgres,
    kafka: &BenchKafka,
    options: &BenchOptions,
    run_id: &str,
    shutdown: &CancellationToken,
) -> Result<LanesReport, Error> {
    let BenchKafka::Mock(mock) = kafka else {
        return Err(bench(
            "--lanes needs the mock cluster, whose round trip it sets; drop --brokers".into(),
        ));
    };
    for broker in 1..=3 {
        mock.broker_round_trip_time(broker, options.lanes_rtt)
            .map_err(Error::kafka("setting the mock brokers' round trip"))?;
    }
    let mut runs: Vec<LaneDrain> = Vec::new();
    for &lanes in &options.lanes {
        if shutdown.is_cancelled() {
            break;
        }
        let name = format!("bench_lanes_{lanes}");
        let mut bench =
            ModeBench::prepare_as(pg, kafka, options, Mode::Poll, &name, run_id).await?;
        bench.relay_args = vec![
            "--shards".into(),
            lanes.to_string(),
            "--batch-size".into(),
            options.lanes_batch_size.to_string(),
        ];
        bench.insert(backlog(options, options.lanes_rows)).await?;
        let mut relay = bench.start_relay("run")?;
        let started = Instant::now();
        bench.wait_until_drained(&mut relay, shutdown).await?;
        let seconds = started.elapsed().as_secs_f64();
        let usage = relay.usage()?;
        relay.stop().await?;
        bench.pool.close().await;
        let rows_per_sec = options.lanes_rows as f64 / seconds;
        let first = runs.first().map_or(rows_per_sec, |r| r.rows_per_sec);
        runs.push(LaneDrain {
            lanes,
            seconds,
            rows_per_sec,
            relay_cpu_seconds_per_1k_rows: usage.cpu_seconds / options.lanes_rows as f64 * 1000.0,
            relay_peak_rss_mb: usage.peak_rss_mb,
            ratio_to_first: rows_per_sec / first,
        });
    }
    Ok(LanesReport {
        round_trip_ms: options.lanes_rtt.as_secs_f64() * 1e3,
        rows: options.lanes_rows,
        batch_size: options.lanes_batch_size,
        runs,
    })
}

/// The broker: the in-process mock cluster, or a real one.
enum BenchKafka {
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    External(String),
}

impl BenchKafka {
    fn start(brokers: Option<&str>) -> Result<Self, Error> {
        match brokers {
            Some(brokers) => Ok(BenchKafka::External(brokers.to_owned())),
            None => Ok(BenchKafka::Mock(
                MockCluster::new(3).map_err(Error::kafka("starting the mock cluster"))?,
            )),
        }
    }

    fn brokers(&self) -> String {
        match self {
            BenchKafka::Mock(mock) => mock.bootstrap_servers(),
            BenchKafka::External(brokers) => brokers.clone(),
        }
    }

    fn describe(&self, partitions: i32) -> String {
        match self {
            BenchKafka::Mock(_) => format!(
                "librdkafka mock cluster, 3 brokers, in the bench process; {partitions} partitions, replication 3"
            ),
            BenchKafka::External(brokers) => {
                format!("{brokers}; {partitions} partitions, replication 1")
            }
        }
    }

    async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), Error> {
        match self {
            BenchKafka::Mock(mock) => mock
                .create_topic(topic, partitions, 3)
                .map_err(Error::kafka("creating a bench topic")),
            BenchKafka::External(brokers) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .create()
                    .map_err(Error::kafka("creating an admin client"))?;
                let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                let results = admin
                    .create_topics([&new], &AdminOptions::new())
                    .await
                    .map_err(Error::kafka("creating a bench topic"))?;
                for result in results {
                    if let Err((name, code)) = result {
                        return Err(bench(format!(
                            "cannot create topic {name} on {brokers}: {code}"
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

/// One mode's database, topics and relay settings.
struct ModeBench<'a> {
    /// The relay's arguments besides mode, brokers, topic and endpoints.
    relay_args: Vec<String>,
    /// The broker's flags when it is not the bench's Kafka (`--sink ...`,
    /// `--sink-url`, `--topic-template`).
    sink_args: Option<Vec<String>>,
    pg: &'a TempPostgres,
    kafka: &'a BenchKafka,
    options: &'a BenchOptions,
    mode: Mode,
    url: String,
    db: DatabaseConfig,
    pool: PgPool,
    tail: TailConfig,
    /// Where the relay publishes the backlog.
    topic: String,
    /// Where the relay's logs go: `--relay-log-dir`, else a temp dir.
    log_dir: PathBuf,
    _temp_dir: Option<tempfile::TempDir>,
}

impl<'a> ModeBench<'a> {
    async fn prepare(
        pg: &'a TempPostgres,
        kafka: &'a BenchKafka,
        options: &'a BenchOptions,
        mode: Mode,
        run_id: &str,
    ) -> Result<ModeBench<'a>, Error> {
        Self::prepare_as(pg, kafka, options, mode, &format!("bench_{mode}"), run_id).await
    }

    /// A database and topic named after `name`.
    async fn prepare_as(
        pg: &'a TempPostgres,
        kafka: &'a BenchKafka,
        options: &'a BenchOptions,
        mode: Mode,
        name: &str,
        run_id: &str,
    ) -> Result<ModeBench<'a>, Error> {
        let url = pg.create_database(name).await?;
        let schema = Identifier::parse("public", "bench schema")?;
        let db = DatabaseConfig::from_url(&url, schema, "bench database")?;
        // Slots are per cluster: each database's relay has its own.
        let tail = TailConfig {
            slot: outbox_relay::config::SlotName::parse(name, "bench slot")?,
            ..TailConfig::default()
        };
        database::migrate(&db, &tail.publication).await?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(db.connect_options().clone())
            .await
            .map_err(Error::db_error("opening the bench pool"))?;
        let topic = format!("bench-{run_id}-{name}");
        kafka.create_topic(&topic, options.partitions).await?;
        let (log_dir, _temp_dir) = match &options.relay_log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| bench(format!("--relay-log-dir {}: {e}", dir.display())))?;
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("outbox-relay-bench-")
                    .tempdir()
                    .map_err(|e| bench(format!("cannot create a temp dir: {e}")))?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let mut relay_args = vec!["--batch-size".into(), options.batch_size.to_string()];
        if options.shards > 1 {
            relay_args.extend(["--shards".into(), options.shards.to_string()]);
        }
        Ok(ModeBench {
            relay_args,
            sink_args: None,
            pg,
            kafka,
            options,
            mode,
            url,
            db,
            pool,
            tail,
            topic,
            log_dir,
            _temp_dir,
        })
    }

    async fn run(self, shutdown: &CancellationToken) -> Result<ModeReport, Error> {
        let options = self.options;
        // Tail mode reads the backlog from the WAL, so its slot must exist
        // before the rows are written: a first start creates it (and copies
        // the empty table), then stops. pg_recvlogical's slot starts at the
        // same point.
        let recvlogical_slot = "bench_pg_recvlogical";
        if self.mode == Mode::Tail {
            let mut relay = self.start_relay("setup")?;
            self.wait_for_slot(&mut relay).await?;
            relay.stop().await?;
            sqlx::query("select pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(recvlogical_slot)
                .execute(&self.pool)
                .await
                .map_err(Error::db_error("creating pg_recvlogical's slot"))?;
        }

        let events = backlog(options, options.rows);
        let insert_rate = self.insert(events).await?;
        let end_lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db_error("reading the WAL position"))?;

        let recvlogical_rate = if self.mode == Mode::Tail {
            let rate = self
                .pg_recvlogical(recvlogical_slot, &end_lsn, options.rows)
                .await?;
            sqlx::query("select pg_drop_replication_slot($1)")
                .bind(recvlogical_slot)
                .execute(&self.pool)
                .await
                .map_err(Error::db_error("dropping pg_recvlogical's slot"))?;
            Some(rate)
        } else {
            None
        };
        let producer_rate = self.plain_producer().await?;

        let mut relay = self.start_relay("run")?;
        let started = Instant::now();
        self.wait_until_drained(&mut relay, shutdown).await?;
        let seconds = started.elapsed().as_secs_f64();
        let usage = relay.usage()?;
        let rows_per_sec = options.rows as f64 / seconds;
        let (reference, ratio_to) = match recvlogical_rate {
            Some(rate) => (rate, "pg_recvlogical"),
            None => (insert_rate, "insert"),
        };
        let drain = Drain {
            rows: options.rows,
            seconds,
            rows_per_sec,
            relay_cpu_seconds_per_1k_rows: usage.cpu_seconds / options.rows as f64 * 1000.0,
            relay_peak_rss_mb: usage.peak_rss_mb,
            ratio: rows_per_sec / reference,
            ratio_to: ratio_to.into(),
        };

        let live = if options.live.is_zero() || options.rate == 0 || shutdown.is_cancelled() {
            None
        } else {
            Some(self.live(&mut relay, shutdown).await?)
        };
        relay.stop().await?;
        self.pool.close().await;
        Ok(ModeReport {
            mode: self.mode.to_string(),
            limits: Limits {
                insert_rows_per_sec: insert_rate,
                pg_recvlogical_rows_per_sec: recvlogical_rate,
                producer_records_per_sec: producer_rate,
            },
            drain,
            live,
        })
    }

    /// Inserts the backlog on two connections, 1,000 rows per transaction,
    /// and returns rows per second. Each connection takes whole aggregates,
    /// so every aggregate's rows are in order.
    async fn insert(&self, events: Vec<Event>) -> Result<f64, Error> {
        const WRITERS: usize = 2;
        const CHUNK: usize = 1000;
        let rows = events.len();
        let mut shares: Vec<Vec<Event>> = (0..WRITERS).map(|_| Vec::new()).collect();
        for event in events {
            let share = aggregate_number(&event.aggregate_id) % WRITERS;
            shares[share].push(event);
        }
        let started = Instant::now();
        let mut writers = Vec::new();
        for share in shares {
            let pool = self.pool.clone();
            writers.push(tokio::spawn(async move {
                let mut conn = pool
                    .acquire()
                    .await
                    .map_err(Error::db_error("inserting rows"))?;
                for chunk in share.chunks(CHUNK) {
                    let mut tx = conn
                        .begin()
                        .await
                        .map_err(Error::db_error("inserting rows"))?;
                    outbox::insert_all(&mut tx, chunk)
                        .await
                        .map_err(Error::db_error("inserting rows"))?;
                    tx.commit()
                        .await
                        .map_err(Error::db_error("inserting rows"))?;
                }
                Ok::<_, Error>(())
            }));
        }
        for writer in writers {
            writer
                .await
                .map_err(|e| bench(format!("an insert task failed: {e}")))??;
        }
        Ok(rows as f64 / started.elapsed().as_secs_f64())
    }

    /// Runs `pg_recvlogical` over the WAL from its slot to `end_lsn`,
    /// decoding with `pgoutput` for the relay's publication into /dev/null,
    /// and returns the backlog's rows per second.
    async fn pg_recvlogical(&self, slot: &str, end_lsn: &str, rows: u64) -> Result<f64, Error> {
        let binary = self.pg.bin_dir().join("pg_recvlogical");
        let publication = format!("publication_names={}", self.tail.publication.as_str());
        let started = Instant::now();
        let output = Command::new(&binary)
            .args(["-h", "127.0.0.1", "-U", "postgres", "--no-loop", "--start"])
            .args(["-p", &self.pg.port().to_string()])
            .args(["-d", &self.db.target().database])
            .args(["-S", slot, "-E", end_lsn, "-f", "/dev/null"])
            .args(["-o", "proto_version=1", "-o", &publication])
            .env("PGPASSWORD", self.pg.password())
            .stdin(Stdio::null())
            .output();
        let output = tokio::time::timeout(Duration::from_secs(600), output)
            .await
            .map_err(|_| {
                bench(
                    "pg_recvlogical did not reach the end of the backlog within 10 minutes".into(),
                )
            })?
            .map_err(|e| bench(format!("cannot run {}: {e}", binary.display())))?;
        let elapsed = started.elapsed().as_secs_f64();
        if !output.status.success() {
            return Err(bench(format!(
                "pg_recvlogical failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(rows as f64 / elapsed)
    }

    /// Sends the backlog's records (up to [`PRODUCER_SAMPLE`]) with a plain
    /// producer configured as the relay's, to a topic of its own, and returns
    /// records per second from the first send to the last ack.
    async fn plain_producer(&self) -> Result<f64, Error> {
        let limit = i64::try_from(self.options.rows.min(PRODUCER_SAMPLE)).unwrap_or(i64::MAX);
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "select seq, id, aggregate_type, aggregate_id, event_type, topic, \
             payload::text as payload, headers, created_at, partition_key from outbox order by seq limit $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::db_error("reading the backlog"))?;
        let topic = format!("{}-producer", self.topic);
        self.kafka
            .create_topic(&topic, self.options.partitions)
            .await?;
        let template = TopicTemplate::parse(&topic, "bench topic")?;
        let records: Vec<message::Message> = rows
            .iter()
            .map(|row| message::from_row(row, &template, NullPayload::JsonNull))
            .collect();
        let config = KafkaConfig {
            brokers: self.kafka.brokers(),
            properties: Vec::new(),
        };
        tokio::task::spawn_blocking(move || produce_all(&config, &records))
            .await
            .map_err(|e| bench(format!("the plain producer task failed: {e}")))?
    }

    /// Starts the relay binary on this mode's database; its log goes to a
    /// file named after `phase`.
    fn start_relay(&self, phase: &str) -> Result<RelayProcess, Error> {
        let log_path = self
            .log_dir
            .join(format!("relay-{}-{phase}.log", self.topic));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| bench(format!("cannot create {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| bench(format!("cannot open {}: {e}", log_path.display())))?;
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| bench(format!("no free port for the relay's metrics: {e}")))?;
        let sink_args = match &self.sink_args {
            Some(args) => args.clone(),
            None => vec![
                "--brokers".into(),
                self.kafka.brokers(),
                "--topic-template".into(),
                self.topic.clone(),
            ],
        };
        let child = Command::new(&self.options.relay_binary)
            .arg("run")
            .args(["--mode", &self.mode.to_string()])
            .args(&sink_args)
            .args(&self.relay_args)
            .args(["--metrics-address", &format!("127.0.0.1:{metrics_port}")])
            .args(["--slot", self.tail.slot.as_str()])
            .args(["--publication", self.tail.publication.as_str()])
            // In the environment, not the arguments: `ps` shows arguments.
            .env("OUTBOX_DATABASE_URL", &self.url)
            .env("OUTBOX_SCHEMA", "public")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                bench(format!(
                    "cannot start the relay {}: {e}",
                    self.options.relay_binary.display()
                ))
            })?;
        Ok(RelayProcess {
            child,
            log_path,
            metrics_port,
        })
    }

    /// Waits until the relay's slot exists and its first copy finished.
    /// Waits until the relay's slot (each lane's, with `--shards`) exists
    /// and its first copy finished.
    async fn wait_for_slot(&self, relay: &mut RelayProcess) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let shards = Shards::new(u32::from(self.options.shards), "--shards")?;
        let slots: Vec<String> = shards
            .lanes()
            .map(|lane| Ok(self.tail.for_lane(lane)?.slot.as_str().to_owned()))
            .collect::<Result<_, Error>>()?;
        loop {
            let ready: i64 = sqlx::query_scalar(
                "select count(*) from relay_slot where slot_name = any($1) and copied_at is not null",
            )
            .bind(&slots)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db_error("reading the relay's slot"))?;
            if ready == slots.len() as i64 {
                return Ok(());
            }
            relay.check_running()?;
            if Instant::now() > deadline {
                return Err(relay.failed("did not create its replication slot within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the outbox is empty: every row acknowledged and confirmed.
    async fn wait_until_drained(
        &self,
        relay: &mut RelayProcess,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let mut conn = PgConnection::connect_with(self.db.connect_options())
            .await
            .map_err(Error::db_error("watching the outbox"))?;
        loop {
            let left: Option<i64> =
                sqlx::query_scalar("select seq from outbox order by seq limit 1")
                    .fetch_optional(&mut conn)
                    .await
                    .map_err(Error::db_error("watching the outbox"))?;
            if left.is_none() {
                return Ok(());
            }
            relay.check_running()?;
            if shutdown.is_cancelled() {
                return Err(bench("interrupted".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writers commit one row per transaction at `rate`: one second of
    /// warm-up (until every row of it arrived), then `live`. Latency is read
    /// two ways: from the relay's `ack_latency_seconds` histogram over the
    /// measured window (commit to Kafka's ack, at the buckets' resolution),
    /// and per row at a consumer in this process (commit to arrival, which
    /// adds the broker's and the consumer's fetch).
    async fn live(
        &self,
        relay: &mut RelayProcess,
        shutdown: &CancellationToken,
    ) -> Result<Live, Error> {
        let rate = u64::from(self.options.rate);
        let warmup = rate;
        let total = warmup + rate * self.options.live.as_secs().max(1);
        let topic = format!("{}-live", self.topic);
        self.kafka
            .create_topic(&topic, self.options.partitions)
            .await?;
        let consumer = live_consumer(&self.kafka.brokers(), &topic, self.options.partitions)?;
        // Nanoseconds after `origin`, taken just before each row's COMMIT.
        let committed: Arc<Vec<AtomicU64>> =
            Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        let origin = Instant::now();
        // Which side lost sight of a row: one still in the outbox was never
        // confirmed; with an empty outbox the broker acknowledged every row.
        // With an empty outbox, a second consumer reads the whole topic
        // again: whether the broker holds the rows the first one missed.
        // Rows the consumer never received but that are on the broker are
        // counted, not fatal: tansu 0.6 can skip records in a fetch while
        // several producers write one partition ("Compatibility notes").
        let missing = async |relay: &RelayProcess, m: Missing, in_outbox: i64| {
            let reread = if in_outbox == 0 {
                let brokers = self.kafka.brokers();
                let partitions = self.options.partitions;
                let topic = topic.clone();
                let absent = m.absent.clone();
                match tokio::task::spawn_blocking(move || {
                    reread(&brokers, &topic, partitions, &absent)
                })
                .await
                {
                    Ok(Ok(found)) if found.len() == m.absent.len() => {
                        tracing::warn!(
                            rows = found.len(),
                            "the bench's consumer never received these live rows, but a new consumer found each on the broker: {found:?}"
                        );
                        return Ok((m.arrived, m.absent.len() as u64));
                    }
                    Ok(Ok(found)) => format!(
                        "; read again from the start by a new consumer, {} of the {} missing rows are on the broker ({found:?})",
                        found.len(),
                        m.absent.len()
                    ),
                    Ok(Err(e)) => format!("; reading the topic again failed: {e}"),
                    Err(e) => format!("; reading the topic again failed: {e}"),
                }
            } else {
                String::new()
            };
            Err(relay.failed(&format!(
                "published {} of {} live rows within the deadline ({in_outbox} rows still in the outbox; missing k = {:?}){reread}",
                m.received,
                m.total,
                &m.absent[..m.absent.len().min(20)]
            )))
        };
        let in_outbox = || async {
            sqlx::query_scalar::<_, i64>("select count(*) from outbox")
                .fetch_one(&self.pool)
                .await
                .unwrap_or(-1)
        };

        let writers = self.write_live(&topic, &committed, origin, 0..warmup, shutdown);
        let mut missed_by_consumer = 0;
        if let Err(m) =
            receive_timed(&consumer, &committed, origin, 0..warmup, rate, shutdown).await
        {
            missed_by_consumer += missing(relay, m, in_outbox().await).await?.1;
        }
        join_writers(writers).await?;
        // The relay records an ack before it confirms the row, and a row can
        // reach the consumer before the relay has seen its ack: read the
        // histogram once every row written so far is confirmed.
        self.wait_until_drained(relay, shutdown).await?;
        let before = relay.ack_histogram().await?;

        let writers = self.write_live(&topic, &committed, origin, warmup..total, shutdown);
        let arrivals =
            match receive_timed(&consumer, &committed, origin, warmup..total, rate, shutdown).await
            {
                Ok(arrivals) => arrivals,
                Err(m) => {
                    let (arrivals, missed) = missing(relay, m, in_outbox().await).await?;
                    missed_by_consumer += missed;
                    arrivals
                }
            };
        join_writers(writers).await?;
        self.wait_until_drained(relay, shutdown).await?;
        let after = relay.ack_histogram().await?;
        let acks = after.since(&before);

        let ms = |ns: u64| ns as f64 / 1e6;
        let span =
            Duration::from_nanos(arrivals.span.1.saturating_sub(arrivals.span.0)).as_secs_f64();
        Ok(Live {
            target_rows_per_sec: self.options.rate,
            achieved_rows_per_sec: arrivals.values.len().saturating_sub(1) as f64 / span.max(1e-9),
            rows: arrivals.values.len() as u64,
            ack_p50_ms: acks.quantile(0.50) * 1e3,
            ack_p99_ms: acks.quantile(0.99) * 1e3,
            ack_max_ms_at_most: acks.max_bound() * 1e3,
            acks_counted: acks.count(),
            consumer_p50_ms: ms(percentile(&arrivals.values, 0.50)),
            consumer_p99_ms: ms(percentile(&arrivals.values, 0.99)),
            consumer_max_ms: ms(arrivals.values.last().copied().unwrap_or(0)),
            missed_by_consumer,
        })
    }

    /// Four writers commit rows `range` (one per transaction) on schedule:
    /// row `k` is due `k / rate` seconds after `origin`.
    fn write_live(
        &self,
        topic: &str,
        committed: &Arc<Vec<AtomicU64>>,
        origin: Instant,
        range: std::ops::Range<u64>,
        shutdown: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<Result<(), Error>>> {
        const WRITERS: u64 = 4;
        let rate = f64::from(self.options.rate);
        let pad = "x".repeat(self.options.payload_bytes.saturating_sub(60));
        (0..WRITERS)
            .map(|w| {
                let pool = self.pool.clone();
                let committed = committed.clone();
                let topic = topic.to_owned();
                let aggregates = u64::from(self.options.aggregates.max(1));
                let pad = pad.clone();
                let stop = shutdown.clone();
                let mut k = range.start + w;
                let end = range.end;
                tokio::spawn(async move {
                    let doing = "writing live rows";
                    let mut conn = pool.acquire().await.map_err(Error::db_error(doing))?;
                    while k < end && !stop.is_cancelled() {
                        let due = origin + Duration::from_secs_f64(k as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        let event = Event::new(
                            "bench",
                            format!("agg-{}", k % aggregates),
                            "BenchEvent",
                            json!({"k": k, "pad": pad}),
                        )
                        .with_topic(topic.clone());
                        // One statement in its own transaction: one round
                        // trip, so the writers leave the CPU to what is
                        // measured. The time is taken before it is sent.
                        committed[k as usize]
                            .store(origin.elapsed().as_nanos() as u64, Ordering::Release);
                        outbox::insert(&mut conn, &event)
                            .await
                            .map_err(Error::db_error(doing))?;
                        k += WRITERS;
                    }
                    Ok(())
                })
            })
            .collect()
    }
}

async fn join_writers(
    writers: Vec<tokio::task::JoinHandle<Result<(), Error>>>,
) -> Result<(), Error> {
    for writer in writers {
        writer
            .await
            .map_err(|e| bench(format!("a live writer failed: {e}")))??;
    }
    Ok(())
}

/// Arrival latencies at a consumer, in nanoseconds, sorted.
struct Latencies {
    values: Vec<u64>,
    /// Nanoseconds after the origin of the first and last timed send.
    span: (u64, u64),
}

/// Not every record arrived before the deadline.
struct Missing {
    received: u64,
    total: u64,
    /// The records that did not arrive.
    absent: Vec<u64>,
    /// The latencies of those that did.
    arrived: Latencies,
}

/// Reads until every record `k` in `range` arrived once (other records and
/// duplicates are ignored), or the deadline: a minute after the last one is
/// due at `rate`. `sent[k]` is when record `k` was committed.
async fn receive_timed(
    consumer: &StreamConsumer,
    sent: &[AtomicU64],
    origin: Instant,
    range: std::ops::Range<u64>,
    rate: u64,
    shutdown: &CancellationToken,
) -> Result<Latencies, Missing> {
    let total = range.end - range.start;
    let mut seen = vec![false; total as usize];
    let mut values = Vec::with_capacity(total as usize);
    let mut received = 0u64;
    let deadline =
        origin + Duration::from_secs_f64(range.end as f64 / rate as f64) + Duration::from_secs(60);
    while received < total {
        let message = tokio::select! {
            message = consumer.recv() => message,
            _ = tokio::time::sleep_until(deadline.into()) => break,
            _ = shutdown.cancelled() => break,
        };
        let arrived = origin.elapsed().as_nanos() as u64;
        let Some(k) = message
            .ok()
            .and_then(|m| {
                m.payload()
                    .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            })
            .and_then(|v| v.get("k").and_then(Value::as_u64))
            .filter(|k| range.contains(k))
        else {
            continue;
        };
        if std::mem::replace(&mut seen[(k - range.start) as usize], true) {
            continue;
        }
        received += 1;
        values.push(arrived.saturating_sub(sent[k as usize].load(Ordering::Acquire)));
    }
    values.sort_unstable();
    let first = sent[range.start as usize].load(Ordering::Acquire);
    let last = sent[range.end as usize - 1].load(Ordering::Acquire);
    let arrived = Latencies {
        values,
        span: (first, last),
    };
    if received < total {
        let absent = (range.start..range.end)
            .filter(|k| !seen[(k - range.start) as usize])
            .collect();
        return Err(Missing {
            received,
            total,
            absent,
            arrived,
        });
    }
    Ok(arrived)
}

/// Cumulative bucket counts of a Prometheus histogram: (upper bound in
/// seconds, observations at or below it), ascending, `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram(Vec<(f64, u64)>);

impl Histogram {
    /// The `name` histogram in a Prometheus text exposition.
    fn parse(text: &str, name: &str) -> Histogram {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let (le, rest) = rest.split_once('"')?;
                let count = rest.trim_start_matches('}').split_whitespace().next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.parse().ok()?))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram(buckets)
    }

    /// The observations made since `earlier`.
    fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram(
            self.0
                .iter()
                .map(|&(le, n)| {
                    let before = earlier.0.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
                    (le, n.saturating_sub(before))
                })
                .collect(),
        )
    }

    fn count(&self) -> u64 {
        self.0.last().map_or(0, |b| b.1)
    }

    /// The `q` quantile, interpolated linearly within its bucket as
    /// Prometheus' `histogram_quantile` does.
    fn quantile(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let rank = q * total as f64;
        let mut lower = (0.0, 0u64);
        for &(le, n) in &self.0 {
            if n as f64 >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let within = (n - lower.1) as f64;
                let fraction = if within > 0.0 {
                    (rank - lower.1 as f64) / within
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * fraction;
            }
            lower = (le, n);
        }
        lower.0
    }

    /// The upper bound of the highest bucket with an observation.
    fn max_bound(&self) -> f64 {
        let mut previous = 0;
        let mut bound = 0.0;
        for &(le, n) in &self.0 {
            if n > previous {
                bound = le;
            }
            previous = n;
        }
        bound
    }
}

/// The backlog: `rows` events over `aggregates` aggregates, payloads of
/// about `payload_bytes`.
fn backlog(options: &BenchOptions, rows: u64) -> Vec<Event> {
    let pad = "x".repeat(options.payload_bytes.saturating_sub(60));
    let aggregates = u64::from(options.aggregates.max(1));
    (0..rows)
        .map(|k| {
            Event::new(
                "bench",
                format!("agg-{}", k % aggregates),
                "BenchEvent",
                json!({"k": k, "amount_cents": k % 10_000, "currency": "EUR", "pad": pad}),
            )
        })
        .collect()
}

/// The number in `agg-N`.
fn aggregate_number(aggregate_id: &str) -> usize {
    aggregate_id
        .strip_prefix("agg-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The value at quantile `q` of sorted `values` (nearest rank).
fn percentile(values: &[u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Counts a plain producer's acknowledgements.
#[derive(Default)]
struct Acks {
    acked: AtomicU64,
    failed: AtomicU64,
}

struct AckContext(Arc<Acks>);

impl ClientContext for AckContext {
    /// Quiet: librdkafka warns that the gapless guarantee is experimental;
    /// failures are counted by [`AckContext::delivery`].
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, _: &str, _: &str) {}
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The message's headers, in order.
fn headers(record: &message::Message) -> rdkafka::message::OwnedHeaders {
    let mut headers = rdkafka::message::OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        headers = headers.insert(rdkafka::message::Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// Produces every record with the relay's producer settings and a delivery
/// callback (no per-record future), waits for all acks, returns records/s.
fn produce_all(config: &KafkaConfig, records: &[message::Message]) -> Result<f64, Error> {
    let acks = Arc::new(Acks::default());
    let mut client = rdkafka::ClientConfig::new();
    for (key, value) in producer_properties(config) {
        client.set(key, value);
    }
    let producer: ThreadedProducer<AckContext> = client
        .create_with_context(AckContext(acks.clone()))
        .map_err(Error::kafka("creating the plain producer"))?;
    let started = Instant::now();
    for record in records {
        let mut base = BaseRecord::to(&record.topic)
            .key(record.key.as_bytes())
            .headers(headers(record));
        if let Some(value) = &record.value {
            base = base.payload(value.as_slice());
        }
        loop {
            match producer.send(base) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    base = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(Error::kafka("producing with the plain producer")(e)),
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(Error::kafka("flushing the plain producer"))?;
    let elapsed = started.elapsed().as_secs_f64();
    let failed = acks.failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(bench(format!(
            "the plain producer had {failed} of {} records fail",
            records.len()
        )));
    }
    Ok(records.len() as f64 / elapsed)
}

/// A consumer that reads every partition of `topic` from the start, fetching
/// with little delay.
fn live_consumer(brokers: &str, topic: &str, partitions: i32) -> Result<StreamConsumer, Error> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-bench")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.error.backoff.ms", "5")
        .create()
        .map_err(Error::kafka("creating the live consumer"))?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(Error::kafka("assigning the live topic"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(Error::kafka("assigning the live topic"))?;
    Ok(consumer)
}

/// Reads every partition of `topic` from the start up to its high
/// watermark with a fresh consumer; returns, for each record `k` in
/// `wanted` found there, its partition and offset.
fn reread(
    brokers: &str,
    topic: &str,
    partitions: i32,
    wanted: &[u64],
) -> Result<Vec<(u64, i32, i64)>, Error> {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-bench-reread")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(Error::kafka("creating the re-reading consumer"))?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for partition in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(Error::kafka("reading the live topic's watermarks"))?;
        ends.insert(partition, high);
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(Error::kafka("assigning the live topic"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(Error::kafka("assigning the live topic"))?;
    let mut found = Vec::new();
    let mut done: std::collections::BTreeSet<i32> = ends
        .iter()
        .filter(|(_, high)| **high == 0)
        .map(|(partition, _)| *partition)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.len() < ends.len() && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let Ok(m) = message else { continue };
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition());
        }
        let k = m
            .payload()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            .and_then(|v| v.get("k").and_then(Value::as_u64));
        if let Some(k) = k.filter(|k| wanted.contains(k)) {
            found.push((k, m.partition(), m.offset()));
        }
    }
    Ok(found)
}

/// The relay under measurement.
struct RelayProcess {
    child: Child,
    log_path: PathBuf,
    metrics_port: u16,
}

/// CPU and memory the relay used so far.
struct Usage {
    cpu_seconds: f64,
    peak_rss_mb: f64,
}

impl RelayProcess {
    fn pid(&self) -> Result<i32, Error> {
        self.child
            .id()
            .map(|id| id as i32)
            .ok_or_else(|| bench("the relay has already exited".into()))
    }

    /// User plus system CPU time and the peak resident set, from `/proc`.
    fn usage(&self) -> Result<Usage, Error> {
        let pid = self.pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|e| bench(format!("cannot read the relay's /proc/{pid}/stat: {e}")))?;
        // Fields after the command name, which is in parentheses: state is
        // field 3, utime 14, stime 15 (proc(5)).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| bench(format!("cannot read the relay's /proc/{pid}/status: {e}")))?;
        let peak_kb = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Ok(Usage {
            cpu_seconds: (ticks(11) + ticks(12)) as f64 / hz,
            peak_rss_mb: peak_kb / 1024.0,
        })
    }

    /// The relay's `/metrics` text.
    async fn metrics_text(&self) -> Result<String, Error> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let scrape = async {
            let mut stream =
                tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await?;
            let mut body = String::new();
            stream.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        tokio::time::timeout(Duration::from_secs(10), scrape)
            .await
            .map_err(|_| bench("the relay's /metrics did not answer within 10 s".into()))?
            .map_err(|e| bench(format!("cannot read the relay's /metrics: {e}")))
    }

    /// The relay's `ack_latency_seconds` histogram, from its `/metrics`.
    async fn ack_histogram(&self) -> Result<Histogram, Error> {
        let body = self.metrics_text().await?;
        let histogram = Histogram::parse(&body, "outbox_relay_ack_latency_seconds");
        if histogram.0.is_empty() {
            return Err(bench(
                "the relay's /metrics has no outbox_relay_ack_latency_seconds".into(),
            ));
        }
        Ok(histogram)
    }

    /// Rows the relay confirmed so far (`outbox_relay_published_total`); 0
    /// before its endpoint answers.
    async fn published_total(&self) -> u64 {
        let Ok(body) = self.metrics_text().await else {
            return 0;
        };
        body.lines()
            .find_map(|line| line.strip_prefix("outbox_relay_published_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    fn check_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failed(&format!("exited ({status})"))),
            Err(e) => Err(bench(format!("cannot watch the relay: {e}"))),
        }
    }

    /// An error naming what went wrong, with the end of the relay's log.
    fn failed(&self, what: &str) -> Error {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bench(format!(
            "the relay {what}; its last log lines: {}",
            tail.join(" | ")
        ))
    }

    /// SIGTERM, and wait for it to finish its in-flight records.
    async fn stop(&mut self) -> Result<(), Error> {
        if let Ok(pid) = self.pid() {
            kill(Pid::from_raw(pid), Signal::SIGTERM).ok();
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(self.failed(&format!("exited with {status} when stopped"))),
            Ok(Err(e)) => Err(bench(format!("cannot wait for the relay: {e}"))),
            Err(_) => {
                self.child.kill().await.ok();
                Err(self.failed("did not stop within 30 s of SIGTERM"))
            }
        }
    }
}

impl Machine {
    async fn describe(pg: &TempPostgres) -> Result<Self, Error> {
        let mut conn = PgConnection::connect(&pg.url("postgres"))
            .await
            .map_err(Error::db_error("connecting to the bench Postgres"))?;
        let postgres: String = sqlx::query_scalar("show server_version")
            .fetch_one(&mut conn)
            .await
            .map_err(Error::db_error("reading the Postgres version"))?;
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Ok(Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            postgres,
            outbox_relay: env!("CARGO_PKG_VERSION").into(),
            measured_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        })
    }
}

fn bench(message: String) -> Error {
    Error::Bench(message)
}

/// Whether each mode met its targets, by name.
pub fn targets(report: &BenchReport) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    if let Some(lanes) = &report.lanes {
        let rate = |n: u16| {
            lanes
                .runs
                .iter()
                .find(|r| r.lanes == n)
                .map(|r| r.rows_per_sec)
        };
        if let (Some(one), Some(four)) = (rate(1), rate(4)) {
            out.insert(
                format!("4 lanes drain >= {LANES_TARGET} x 1 lane"),
                four >= LANES_TARGET * one,
            );
        }
    }
    for mode in &report.modes {
        let target = if mode.mode == "tail" {
            TAIL_TARGET
        } else {
            POLL_TARGET
        };
        out.insert(
            format!("{} drain >= {target} x {}", mode.mode, mode.drain.ratio_to),
            mode.drain.ratio >= target,
        );
        out.insert(
            format!("{} relay peak RSS < {RSS_TARGET_MB} MB", mode.mode),
            mode.drain.relay_peak_rss_mb < RSS_TARGET_MB,
        );
        if let Some(live) = &mode.live {
            out.insert(
                format!("{} live p99 commit-to-ack < {P99_TARGET_MS} ms", mode.mode),
                live.ack_p99_ms < P99_TARGET_MS,
            );
        }
    }
    retention::targets(report, &mut out);
    sinks::targets(report, &mut out);
    consumer::targets(report, &mut out);
    out
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "outbox-relay {} bench, {}: {} rows (~{}-byte payloads, {} aggregates), --batch-size {}{}",
            m.outbox_relay,
            m.measured_at,
            self.rows,
            self.payload_bytes,
            self.aggregates,
            self.batch_size,
            if self.shards > 1 {
                format!(", --shards {}", self.shards)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "machine: {} CPUs ({}), Linux {}, Postgres {} (throwaway, fsync=off)",
            m.cpus, m.cpu_model, m.kernel, m.postgres
        )?;
        writeln!(f, "kafka:   {}", self.kafka)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<5} {:>12} {:>22} {:>11} {:>9} {:>9} {:>9} {:>9} {:>12}",
            "mode",
            "drain rows/s",
            "ratio to limit",
            "CPU s/1k",
            "peak RSS",
            "ack p50",
            "ack p99",
            "ack max",
            "consumer p99"
        )?;
        for mode in &self.modes {
            let d = &mode.drain;
            let (p50, p99, max, consumer) = match &mode.live {
                Some(l) => (
                    format!("{:.1} ms", l.ack_p50_ms),
                    format!("{:.1} ms", l.ack_p99_ms),
                    format!("<= {:.0} ms", l.ack_max_ms_at_most),
                    format!("{:.1} ms", l.consumer_p99_ms),
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            writeln!(
                f,
                "{:<5} {:>12.0} {:>22} {:>11.4} {:>6.1} MB {:>9} {:>9} {:>9} {:>12}",
                mode.mode,
                d.rows_per_sec,
                format!("{:.2} x {}", d.ratio, d.ratio_to),
                d.relay_cpu_seconds_per_1k_rows,
                d.relay_peak_rss_mb,
                p50,
                p99,
                max,
                consumer
            )?;
        }
        writeln!(f)?;
        writeln!(f, "limits, same run, same rows:")?;
        for mode in &self.modes {
            let l = &mode.limits;
            write!(
                f,
                "  {:<5} insert {:.0} rows/s; plain producer {:.0} records/s",
                mode.mode, l.insert_rows_per_sec, l.producer_records_per_sec
            )?;
            if let Some(rate) = l.pg_recvlogical_rows_per_sec {
                write!(f, "; pg_recvlogical {rate:.0} rows/s")?;
            }
            writeln!(f)?;
        }
        for mode in &self.modes {
            if let Some(l) = &mode.live {
                writeln!(
                    f,
                    "  {:<5} live: {} rows at {:.0} rows/s (target {}), one per transaction; ack: the relay's ack_latency_seconds histogram ({} acks), consumer: just before COMMIT to arrival here (p50 {:.1} ms, max {:.0} ms)",
                    mode.mode,
                    l.rows,
                    l.achieved_rows_per_sec,
                    l.target_rows_per_sec,
                    l.acks_counted,
                    l.consumer_p50_ms,
                    l.consumer_max_ms
                )?;
                if l.missed_by_consumer > 0 {
                    writeln!(
                        f,
                        "  {:<5} live: {} rows never reached the consumer here but were found on the broker by a second consumer (left out of the consumer figures)",
                        mode.mode, l.missed_by_consumer
                    )?;
                }
            }
        }

        if let Some(lanes) = &self.lanes {
            writeln!(f)?;
            writeln!(
                f,
                "lanes in one instance (poll, --shards N), mock brokers answering after {:.0} ms, {} rows, --batch-size {}:",
                lanes.round_trip_ms, lanes.rows, lanes.batch_size
            )?;
            for run in &lanes.runs {
                writeln!(
                    f,
                    "  {:>3} lane(s) {:>9.0} rows/s {:>6.2} x the first  CPU {:.4} s/1k rows  peak RSS {:.1} MB",
                    run.lanes,
                    run.rows_per_sec,
                    run.ratio_to_first,
                    run.relay_cpu_seconds_per_1k_rows,
                    run.relay_peak_rss_mb
                )?;
            }
        }
        retention::describe(self, f)?;
        sinks::describe(self, f)?;
        consumer::describe(self, f)?;
        writeln!(f)?;
        writeln!(f, "targets:")?;
        for (target, met) in targets(self) {
            writeln!(f, "  {} {target}", if met { "met   " } else { "MISSED" })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), 50);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&values, 1.0), 100);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let text = "# TYPE outbox_relay_ack_latency_seconds histogram\n\
            outbox_relay_ack_latency_seconds_sum 1.0\n\
            outbox_relay_ack_latency_seconds_count 200\n\
            outbox_relay_ack_latency_seconds_bucket{le=\"0.01\"} 100\n\
            outbox_relay_ack_latency_seconds_bucket{le=\"0.02\"} 190\n\
            outbox_relay_ack_latency_seconds_bucket{le=\"0.05\"} 200\n\
            outbox_relay_ack_latency_seconds_bucket{le=\"+Inf\"} 200\n";
        let before = "outbox_relay_ack_latency_seconds_bucket{le=\"0.01\"} 50\n\
            outbox_relay_ack_latency_seconds_bucket{le=\"0.02\"} 50\n\
            outbox_relay_ack_latency_seconds_bucket{le=\"0.05\"} 50\n\
            outbox_relay_ack_latency_seconds_bucket{le=\"+Inf\"} 50\n";
        let name = "outbox_relay_ack_latency_seconds";
        let all = Histogram::parse(text, name);
        assert_eq!(all.count(), 200);
        assert!((all.quantile(0.5) - 0.01).abs() < 1e-9);
        // Rank 198 lies 8/10 of the way through the (0.02, 0.05] bucket.
        assert!((all.quantile(0.99) - 0.044).abs() < 1e-9);
        assert_eq!(all.max_bound(), 0.05);
        let window = all.since(&Histogram::parse(before, name));
        assert_eq!(window.count(), 150);
        // Without the 50 earlier ones the first bucket holds 50, the second
        // 90: rank 75 is 25/90 of the way through the second.
        assert!((window.quantile(0.5) - (0.01 + 0.01 * 25.0 / 90.0)).abs() < 1e-9);
        assert_eq!(Histogram::default().quantile(0.99), 0.0);
    }

    #[test]
    fn backlog_rows_have_the_asked_size_and_spread() {
        let options = BenchOptions {
            relay_binary: PathBuf::new(),
            modes: vec![Mode::Poll],
            rows: 2000,
            aggregates: 1000,
            payload_bytes: 150,
            rate: 0,
            live: Duration::ZERO,
            brokers: None,
            partitions: 6,
            batch_size: 1000,
            shards: 1,
            relay_log_dir: None,
            lanes: Vec::new(),
            lanes_rows: 0,
            lanes_rtt: Duration::ZERO,
            retention_rows: Vec::new(),
            startup_runs: 0,
            consumer_messages: 0,
            rabbitmq_queue: crate::testkit::rabbitmq::QueueType::Quorum,
            sinks: vec![outbox_relay::config::SinkKind::Kafka],
            lanes_batch_size: 100,
        };
        let events = backlog(&options, options.rows);
        assert_eq!(events.len(), 2000);
        let sizes: Vec<usize> = events
            .iter()
            .map(|e| e.payload.as_ref().map_or(0, |p| p.to_string().len()))
            .collect();
        assert!(sizes.iter().all(|&s| (130..=170).contains(&s)), "{sizes:?}");
        let aggregates: std::collections::HashSet<&str> =
            events.iter().map(|e| e.aggregate_id.as_str()).collect();
        assert_eq!(aggregates.len(), 1000);
        assert_eq!(aggregate_number("agg-417"), 417);
    }
}
