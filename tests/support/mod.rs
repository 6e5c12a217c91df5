//! The test harness: one throwaway Postgres per test binary (each test gets
//! its own database), a Kafka per test (librdkafka's mock cluster, or the
//! brokers in `OUTBOX_TEST_BROKERS`), the relay binary as a subprocess,
//! business writers, and a consumer that reads everything back.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use outbox_relay::embedded::TempPostgres;
use outbox_relay::outbox::{self, Event};
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command};
use uuid::Uuid;

mod http;
#[allow(unused_imports)]
pub use http::*;

static SHARED_PG: tokio::sync::OnceCell<(u16, String)> = tokio::sync::OnceCell::const_new();
static HELD: Mutex<Option<TempPostgres>> = Mutex::new(None);

extern "C" fn stop_shared_pg() {
    if let Ok(mut held) = HELD.lock() {
        held.take();
    }
}

/// Properties every Kafka client of the harness adds (a test binary whose
/// broker speaks only TLS sets them once, before its first client).
static CLIENT_PROPERTIES: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Makes every harness client (admin, readers) use `properties`.
pub fn set_client_properties(properties: &[(&str, &str)]) {
    let properties = properties
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(
        CLIENT_PROPERTIES.set(properties).is_ok(),
        "client properties are set once per test binary"
    );
}

/// A Kafka client configuration for `brokers`, with the binary's properties.
fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in CLIENT_PROPERTIES.get().into_iter().flatten() {
        config.set(key, value);
    }
    config
}

/// A fresh database in the binary's shared throwaway cluster; returns its URL.
pub async fn fresh_database() -> String {
    let (_, template) = SHARED_PG
        .get_or_init(|| async {
            let pg = TempPostgres::start()
                .await
                .expect("start the throwaway Postgres");
            let port = pg.port();
            let template = pg.url("{db}");
            *HELD.lock().unwrap() = Some(pg);
            // SAFETY: registering a plain extern "C" fn; it only drops the cluster.
            unsafe { libc::atexit(stop_shared_pg) };
            (port, template)
        })
        .await;
    let name = format!("t_{}", Uuid::new_v4().simple());
    let admin = template.replace("{db}", "postgres");
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("create database {name}"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    template.replace("{db}", &name)
}

/// Runs `outbox-relay migrate` through the library and returns a pool.
pub async fn migrated_pool(url: &str) -> PgPool {
    let db = outbox_relay::config::DatabaseConfig::from_url(
        url,
        outbox_relay::config::Identifier::parse("public", "--schema").unwrap(),
        "--database-url",
    )
    .unwrap();
    let publication =
        outbox_relay::config::Identifier::parse("outbox_relay", "--publication").unwrap();
    outbox_relay::database::migrate(&db, &publication)
        .await
        .unwrap();
    PgPoolOptions::new()
        .max_connections(10)
        .connect(url)
        .await
        .unwrap()
}

/// A Kafka for one test.
pub enum Kafka {
    Mock(MockCluster<'static, DefaultProducerContext>),
    /// The brokers in `OUTBOX_TEST_BROKERS`, and the broker process from
    /// `OUTBOX_TEST_BROKER_PID` if given (outage tests pause it).
    External {
        brokers: String,
        process: Option<Pid>,
    },
}

/// `OUTBOX_TEST_BROKERS`, if set and not empty.
fn external_brokers() -> Option<String> {
    std::env::var("OUTBOX_TEST_BROKERS")
        .ok()
        .filter(|brokers| !brokers.is_empty())
}

/// Says on the test output, uncaptured, that `test` does not run and why.
/// Written to the stderr file descriptor directly because the test harness
/// captures `eprintln!`.
pub fn skip_notice(test: &str, why: &str) {
    use std::io::Write;
    let against = external_brokers()
        .map(|brokers| format!(" against OUTBOX_TEST_BROKERS={brokers}"))
        .unwrap_or_default();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}{against}: {why}");
}

impl Kafka {
    /// The brokers in `OUTBOX_TEST_BROKERS`, else a new 3-broker mock cluster.
    pub fn start() -> Kafka {
        match external_brokers() {
            Some(brokers) => Kafka::External {
                brokers,
                process: std::env::var("OUTBOX_TEST_BROKER_PID").ok().map(|pid| {
                    Pid::from_raw(pid.parse().expect("OUTBOX_TEST_BROKER_PID is a pid"))
                }),
            },
            None => Kafka::mock(),
        }
    }

    /// A new 3-broker mock cluster.
    pub fn mock() -> Kafka {
        Kafka::Mock(MockCluster::new(3).expect("start the mock cluster"))
    }

    /// The mock cluster, for a test that needs what only it can do (request
    /// error injection, slowed round trips). Under `OUTBOX_TEST_BROKERS` the
    /// test does not run: `None`, after saying so and `why` on the test output.
    pub fn mock_only(test: &str, why: &str) -> Option<Kafka> {
        if external_brokers().is_some() {
            skip_notice(test, why);
            return None;
        }
        Some(Kafka::mock())
    }

    /// A Kafka whose brokers the test can take down and bring back: a mock
    /// cluster, or the external broker if `OUTBOX_TEST_BROKER_PID` names its
    /// process. `None`, after saying why, for an external broker without one.
    pub fn stoppable(test: &str) -> Option<Kafka> {
        match Kafka::start() {
            Kafka::External { process: None, .. } => {
                skip_notice(
                    test,
                    "an outage test stops and resumes the broker process; set OUTBOX_TEST_BROKER_PID to its pid",
                );
                None
            }
            kafka => Some(kafka),
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Kafka::Mock(mock) => mock.bootstrap_servers(),
            Kafka::External { brokers, .. } => brokers.clone(),
        }
    }

    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        match self {
            Kafka::Mock(mock) => mock,
            Kafka::External { .. } => panic!("this test needs the mock cluster"),
        }
    }

    /// Takes every broker down: the mock's brokers refuse connections; the
    /// external broker process is stopped with SIGSTOP, so its connections
    /// stay open and go silent, as with a hung broker or a network partition.
    pub fn stop_brokers(&self) {
        match self {
            Kafka::Mock(mock) => mock.broker_down(-1).unwrap(),
            Kafka::External { process, .. } => {
                kill(process.expect("a stoppable Kafka"), Signal::SIGSTOP).unwrap()
            }
        }
    }

    /// Brings every broker back.
    pub fn resume_brokers(&self) {
        match self {
            Kafka::Mock(mock) => mock.broker_up(-1).unwrap(),
            Kafka::External { process, .. } => {
                kill(process.expect("a stoppable Kafka"), Signal::SIGCONT).unwrap()
            }
        }
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
            Kafka::Mock(mock) => mock.create_topic(topic, partitions, 3).unwrap(),
            Kafka::External { brokers, .. } => {
                let admin: AdminClient<DefaultClientContext> =
                    client_config(brokers).create().unwrap();
                let topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                let results = admin
                    .create_topics([&topic], &AdminOptions::new())
                    .await
                    .unwrap();
                for result in results {
                    if let Err((name, code)) = result {
                        assert_eq!(
                            code,
                            rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                            "create topic {name}"
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Kafka {
    /// A test that fails mid-outage must not leave the shared broker stopped.
    fn drop(&mut self) {
        if let Kafka::External {
            process: Some(pid), ..
        } = self
        {
            let _ = kill(*pid, Signal::SIGCONT);
        }
    }
}

/// A unique prefix for one test's topics.
pub fn topic_prefix() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// The relay binary, with its metrics endpoint on a port of its own (tests
/// run many relays at once).
pub fn relay_binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    cmd.env("OUTBOX_METRICS_ADDRESS", "127.0.0.1:0");
    cmd
}

/// The relay binary with `run` arguments for this database and Kafka, in
/// poll mode.
pub fn relay_command(url: &str, brokers: &str, prefix: &str) -> Command {
    relay_command_in("poll", url, brokers, prefix)
}

/// The relay binary with `run` arguments, in `mode`.
pub fn relay_command_in(mode: &str, url: &str, brokers: &str, prefix: &str) -> Command {
    let mut cmd = relay_binary();
    cmd.args([
        "run",
        "--mode",
        mode,
        "--database-url",
        url,
        "--brokers",
        brokers,
    ])
    .arg("--topic-template")
    .arg(format!("{prefix}.{{aggregate_type}}"))
    .env("OUTBOX_LOG", "info")
    .kill_on_drop(true);
    cmd
}

/// Starts the relay binary in poll mode.
pub fn spawn_relay(url: &str, brokers: &str, prefix: &str, extra: &[&str]) -> Child {
    spawn_relay_in("poll", url, brokers, prefix, extra)
}

/// Starts the relay binary in `mode`.
pub fn spawn_relay_in(mode: &str, url: &str, brokers: &str, prefix: &str, extra: &[&str]) -> Child {
    // OUTBOX_TEST_RELAY_LOGS=1 shows the relays' logs when a test fails.
    let stderr = match std::env::var_os("OUTBOX_TEST_RELAY_LOGS") {
        Some(_) => std::process::Stdio::inherit(),
        None => std::process::Stdio::null(),
    };
    relay_command_in(mode, url, brokers, prefix)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the relay binary")
}

/// Ids written by business transactions.
#[derive(Debug, Default)]
pub struct Written {
    pub committed: Vec<Uuid>,
    pub rolled_back: Vec<Uuid>,
}

/// Creates `agg` with `aggregates` rows. Writers lock an aggregate's row and
/// bump its version, so its events' versions follow commit order.
pub async fn create_aggregates(pool: &PgPool, aggregates: u32) {
    sqlx::query("create table agg (id text primary key, version bigint not null default 0)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("insert into agg (id) select 'a' || g from generate_series(1, $1) g")
        .bind(aggregates as i64)
        .execute(pool)
        .await
        .unwrap();
}

/// One business transaction, not yet ended: it bumps a random aggregate's
/// version by 1 to 3 and inserts that many events carrying the versions.
/// Also says whether to roll it back (with probability `rollback_rate`).
async fn business_transaction(
    pool: &PgPool,
    aggregates: u32,
    rollback_rate: f64,
) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, Vec<Event>, bool), sqlx::Error> {
    let (aggregate, n, roll_back) = {
        let mut rng = rand::rng();
        (
            format!("a{}", rng.random_range(1..=aggregates)),
            rng.random_range(1..=3i64),
            rng.random_bool(rollback_rate),
        )
    };
    let mut tx = pool.begin().await?;
    let version: i64 =
        sqlx::query_scalar("update agg set version = version + $2 where id = $1 returning version")
            .bind(&aggregate)
            .bind(n)
            .fetch_one(&mut *tx)
            .await?;
    let events: Vec<Event> = (0..n)
        .map(|i| {
            Event::new(
                "acct",
                &aggregate,
                "changed",
                json!({"version": version - n + 1 + i}),
            )
        })
        .collect();
    outbox::insert_all(&mut tx, &events).await?;
    Ok((tx, events, roll_back))
}

/// `transactions` business transactions of 1 to 3 events for one random
/// aggregate each; roughly `rollback_rate` of them roll back.
pub async fn write(
    pool: &PgPool,
    transactions: u32,
    aggregates: u32,
    rollback_rate: f64,
) -> Written {
    let mut written = Written::default();
    for _ in 0..transactions {
        let (tx, events, roll_back) = business_transaction(pool, aggregates, rollback_rate)
            .await
            .unwrap();
        let ids = events.iter().map(|e| e.id);
        if roll_back {
            tx.rollback().await.unwrap();
            written.rolled_back.extend(ids);
        } else {
            tx.commit().await.unwrap();
            written.committed.extend(ids);
        }
    }
    written
}

/// Like [`write`], but keeps going through database outages (a Postgres
/// restart): a transaction that failed before its commit was sent is
/// retried; one whose commit failed has an unknown outcome and is counted
/// in `uncertain` (its rows are in neither list). `agg.version` tells the
/// truth afterwards, see [`assert_versions_match`].
pub async fn write_through_faults(
    pool: &PgPool,
    transactions: u32,
    aggregates: u32,
    rollback_rate: f64,
) -> (Written, usize) {
    let mut written = Written::default();
    let mut uncertain = 0;
    let mut done = 0;
    while done < transactions {
        let (tx, events, roll_back) =
            match business_transaction(pool, aggregates, rollback_rate).await {
                Ok(ok) => ok,
                Err(_) => {
                    // The database is down: try again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
        let ids = events.iter().map(|e| e.id);
        if roll_back {
            let _ = tx.rollback().await;
            written.rolled_back.extend(ids);
        } else {
            match tx.commit().await {
                Ok(()) => written.committed.extend(ids),
                Err(_) => uncertain += 1,
            }
        }
        done += 1;
    }
    (written, uncertain)
}

/// After writers that may not know every commit's outcome: waits for the
/// outbox to drain, then reads `topic` until it holds as many distinct ids
/// as events were committed (the sum of the aggregates' versions) and every
/// id known to be committed. Returns the records and that count.
pub async fn consume_everything_committed(
    pool: &PgPool,
    brokers: &str,
    topic: &str,
    written: &Written,
    deadline: Duration,
) -> (Vec<Consumed>, i64) {
    wait_for("the outbox to drain", deadline, || async {
        sqlx::query_scalar::<_, i64>("select count(*) from outbox")
            .fetch_one(pool)
            .await
            .is_ok_and(|n| n == 0)
    })
    .await;
    let expected: i64 = sqlx::query_scalar("select coalesce(sum(version), 0)::bigint from agg")
        .fetch_one(pool)
        .await
        .unwrap();
    let committed: HashSet<Uuid> = written.committed.iter().copied().collect();
    let records = consume_until(brokers, &[topic], deadline, |r| {
        let seen: HashSet<Uuid> = r.iter().map(Consumed::id).collect();
        seen.len() as i64 >= expected && committed.is_subset(&seen)
    })
    .await;
    (records, expected)
}

/// Every aggregate's delivered versions reach the version its row holds:
/// with [`assert_order`] (1, 2, 3, ... in order) nothing committed is
/// missing, even for transactions whose commit outcome the writer never
/// learned.
pub async fn assert_versions_match(pool: &PgPool, records: &[Consumed]) {
    let mut delivered: HashMap<String, i64> = HashMap::new();
    for r in records {
        let v = delivered.entry(r.key.clone().unwrap()).or_default();
        *v = (*v).max(r.version());
    }
    let rows: Vec<(String, i64)> = sqlx::query_as("select id, version from agg where version > 0")
        .fetch_all(pool)
        .await
        .unwrap();
    for (id, version) in rows {
        assert_eq!(
            delivered.get(&id).copied().unwrap_or(0),
            version,
            "aggregate {id}: committed up to version {version}, delivered up to another"
        );
    }
}

/// Reads `topic` from the beginning, handing each record's key, value and
/// headers to `each` without keeping it, until `each` returns true or
/// `deadline` passes. Returns whether `each` said it was done.
pub fn consume_each(
    brokers: &str,
    topic: &str,
    deadline: Duration,
    mut each: impl FnMut(i32, Option<&[u8]>, Option<&[u8]>) -> bool,
) -> bool {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", format!("reader-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..metadata.topics()[0].partitions().len() as i32 {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if each(m.partition(), m.key(), m.payload()) => return true,
            Some(Ok(_)) => {}
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    false
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Consumed {
    pub fn id(&self) -> Uuid {
        let (_, value) = self
            .headers
            .iter()
            .find(|(k, _)| k == "id")
            .expect("record has an id header");
        Uuid::parse_str(std::str::from_utf8(value).unwrap()).unwrap()
    }

    pub fn version(&self) -> i64 {
        let value: serde_json::Value =
            serde_json::from_slice(self.value.as_deref().unwrap()).unwrap();
        value["version"].as_i64().unwrap()
    }
}

/// Reads `topics` from the beginning until `done` holds for what was read,
/// or `deadline` passes (then returns what it has).
pub async fn consume_until(
    brokers: &str,
    topics: &[&str],
    deadline: Duration,
    done: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", format!("reader-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let partitions = metadata.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "topic {topic} has no partitions");
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&assignment).unwrap();
    let until = Instant::now() + deadline;
    let mut out = Vec::new();
    tokio::task::block_in_place(|| {
        while !done(&out) && Instant::now() < until {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => {}
            }
        }
    });
    out
}

/// Reads until every id in `expected` was seen.
pub async fn consume_ids(
    brokers: &str,
    topics: &[&str],
    expected: &[Uuid],
    deadline: Duration,
) -> Vec<Consumed> {
    let expected: HashSet<Uuid> = expected.iter().copied().collect();
    consume_until(brokers, topics, deadline, |records| {
        let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
        expected.is_subset(&seen)
    })
    .await
}

/// Reads until every id in `expected` was seen, then waits for the outbox
/// to drain (every published row confirmed); returns what was read.
pub async fn consume_and_drain(
    pool: &PgPool,
    brokers: &str,
    topics: &[&str],
    expected: &[Uuid],
    deadline: Duration,
) -> Vec<Consumed> {
    let records = consume_ids(brokers, topics, expected, deadline).await;
    wait_for("the outbox to drain", deadline, || async {
        outbox_count(pool).await == 0
    })
    .await;
    records
}

/// Per-aggregate order: every aggregate lives in one partition, and its
/// first deliveries carry versions 1, 2, 3, ... in offset order. Returns the
/// number of duplicate deliveries.
pub fn assert_order(records: &[Consumed]) -> usize {
    let mut by_key: HashMap<String, Vec<&Consumed>> = HashMap::new();
    for r in records {
        by_key.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    let mut duplicates = 0;
    for (key, mut list) in by_key {
        let partitions: HashSet<(String, i32)> = list
            .iter()
            .map(|r| (r.topic.clone(), r.partition))
            .collect();
        assert_eq!(
            partitions.len(),
            1,
            "aggregate {key} is spread over {partitions:?}"
        );
        list.sort_by_key(|r| r.offset);
        let mut seen = HashSet::new();
        let mut expected = 1;
        for r in list {
            if !seen.insert(r.id()) {
                duplicates += 1;
                continue;
            }
            assert_eq!(
                r.version(),
                expected,
                "aggregate {key}: version {} arrived where {expected} was due",
                r.version()
            );
            expected += 1;
        }
    }
    duplicates
}

/// Rows still in the outbox.
pub async fn outbox_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits for `cond` with a deadline, polling every 50 ms.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !cond().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's world: its own database (migrated), Kafka and topic prefix,
/// and the mode its relays run in.
pub struct Setup {
    pub url: String,
    pub pool: PgPool,
    pub kafka: Kafka,
    pub prefix: String,
    pub mode: &'static str,
    /// Tail mode's slot: slots are per cluster, so each test has its own.
    pub slot: String,
}

impl Setup {
    /// A poll-mode world in the binary's shared cluster.
    pub async fn new(kafka: Kafka) -> Setup {
        Setup::on(fresh_database().await, kafka, "poll").await
    }

    /// A tail-mode world in the binary's shared cluster.
    pub async fn tail(kafka: Kafka) -> Setup {
        Setup::on(fresh_database().await, kafka, "tail").await
    }

    /// A world on the database at `url` (e.g. in a cluster of the test's own).
    pub async fn on(url: String, kafka: Kafka, mode: &'static str) -> Setup {
        let pool = migrated_pool(&url).await;
        let prefix = topic_prefix();
        Setup {
            url,
            pool,
            kafka,
            slot: format!("slot_{prefix}"),
            prefix,
            mode,
        }
    }

    /// Creates the topic the default test template routes `aggregate_type` to.
    pub async fn topic(&self, aggregate_type: &str, partitions: i32) -> String {
        let topic = format!("{}.{aggregate_type}", self.prefix);
        self.kafka.create_topic(&topic, partitions).await;
        topic
    }

    /// Starts the relay binary for this setup.
    pub fn relay(&self, extra: &[&str]) -> Child {
        let mut args = vec!["--slot", self.slot.as_str()];
        args.extend_from_slice(extra);
        spawn_relay_in(
            self.mode,
            &self.url,
            &self.kafka.brokers(),
            &self.prefix,
            &args,
        )
    }

    /// The relay command for this setup, to run to completion.
    pub fn relay_command(&self) -> Command {
        let mut cmd = relay_command_in(self.mode, &self.url, &self.kafka.brokers(), &self.prefix);
        cmd.args(["--slot", &self.slot]);
        cmd
    }
}

/// Every committed id was delivered and no rolled-back one was.
pub fn assert_delivered(records: &[Consumed], written: &Written) {
    let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
    let missing = written
        .committed
        .iter()
        .filter(|id| !seen.contains(id))
        .count();
    assert_eq!(missing, 0, "{missing} committed rows never reached Kafka");
    let leaked = written
        .rolled_back
        .iter()
        .filter(|id| seen.contains(id))
        .count();
    assert_eq!(
        leaked, 0,
        "{leaked} rows of rolled-back transactions were published"
    );
}

/// The relay's stderr, collected line by line as it arrives.
#[derive(Clone, Default)]
pub struct RelayLog {
    lines: std::sync::Arc<Mutex<Vec<String>>>,
}

impl RelayLog {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits, with a deadline, for a line containing `needle`; returns it.
    pub async fn wait_for_line(&self, needle: &str, deadline: Duration) -> String {
        let until = Instant::now() + deadline;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for the relay to log {needle:?}; it logged:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayLog {
    /// A failing test shows what the relay said, which is most of the
    /// diagnosis when a fault test times out.
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(lines) = self.lines.lock()
        {
            eprintln!(
                "--- relay log ---\n{}\n--- end of relay log ---",
                lines.join("\n")
            );
        }
    }
}

/// Starts a relay command and collects its log.
pub fn spawn_logged(mut cmd: Command) -> (Child, RelayLog) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the relay binary");
    let log = RelayLog::default();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    (child, log)
}

impl Setup {
    /// Starts the relay binary for this setup and collects its log.
    pub fn logged_relay(&self, extra: &[&str]) -> (Child, RelayLog) {
        let mut cmd = self.relay_command();
        cmd.args(extra);
        spawn_logged(cmd)
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate for 127.0.0.1 signed by it, in `dir`.
pub fn make_certificates(dir: &std::path::Path, ca_name: &str) {
    let subject = format!("/CN={ca_name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", &subject,
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        ],
    );
}

/// The tansu binary in `OUTBOX_TEST_TANSU`, for a test that runs a broker of
/// its own because it `needs` to (e.g. "kills and restarts a broker of its
/// own"). Unset: `None`, after saying on the test output that `test` does not
/// run and why.
pub fn tansu_binary(test: &str, needs: &str) -> Option<std::ffi::OsString> {
    let binary = std::env::var_os("OUTBOX_TEST_TANSU");
    if binary.is_none() {
        skip_notice(
            test,
            &format!("it {needs}; set OUTBOX_TEST_TANSU to a tansu binary (.ci/run does)"),
        );
    }
    binary
}

/// A tansu broker of the test's own, on memory storage, killed on drop.
pub struct Tansu {
    binary: std::ffi::OsString,
    port: u16,
    /// The address given to clients in metadata, if not the listener's.
    advertised: Option<String>,
    process: Option<std::process::Child>,
}

impl Tansu {
    /// Starts `binary` on a free port and waits until it accepts connections.
    pub async fn start(binary: std::ffi::OsString) -> Tansu {
        Tansu::start_advertising(binary, None).await
    }

    /// Starts `binary` on a free port, telling clients to connect to
    /// `advertised` (HOST:PORT, e.g. a TLS listener in front of it).
    pub async fn start_advertising(
        binary: std::ffi::OsString,
        advertised: Option<String>,
    ) -> Tansu {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut tansu = Tansu {
            binary,
            port,
            advertised,
            process: None,
        };
        tansu.restart().await;
        tansu
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) on its port: empty, as memory storage is.
    pub async fn restart(&mut self) {
        let url = format!("tcp://{}", self.brokers());
        let advertised = match &self.advertised {
            Some(address) => format!("tcp://{address}"),
            None => url.clone(),
        };
        self.process = Some(
            std::process::Command::new(&self.binary)
                .args(["broker", "--listener-url", &url])
                .args(["--advertised-listener-url", &advertised])
                .args(["--storage-engine", "memory://tansu/"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start tansu (OUTBOX_TEST_TANSU)"),
        );
        let brokers = self.brokers();
        wait_for("tansu to listen", Duration::from_secs(60), || {
            let brokers = brokers.clone();
            async move { tokio::net::TcpStream::connect(brokers).await.is_ok() }
        })
        .await;
    }

    /// SIGKILL: the broker loses its log, its topics and every producer id
    /// it handed out.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().unwrap();
            process.wait().unwrap();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
