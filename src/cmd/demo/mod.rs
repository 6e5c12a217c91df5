//! `outbox-relay demo`: the whole pipeline on embedded defaults. A throwaway
//! Postgres and a broker (`--sink`: librdkafka's in-process mock cluster,
//! or a throwaway NATS or RabbitMQ server; or the ones given),
//! concurrent business transactions across many aggregates (some rolled
//! back), the relay publishing them, and a consumer applying them through
//! the inbox (on Kafka, the crate's consumer runtime) while a third of the
//! messages are delivered twice. It then checks what the product promises
//! and prints a short summary.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cmd::cli::DemoArgs;
use crate::testkit::TempPostgres;
use outbox_relay::config::{
    DatabaseConfig, Identifier, Mode, RelayConfig, SinkKind, SlotName, TailConfig, TopicTemplate,
};
use outbox_relay::database;
use outbox_relay::error::Error;
use outbox_relay::outbox::{self, Event};
use outbox_relay::relay::{self, RunStats};

mod broker;
mod runtime;
use broker::DemoBroker;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub mode: Mode,
    pub database_url: Option<String>,
    pub sink: SinkKind,
    /// Kafka's bootstrap servers, or the NATS or RabbitMQ URL.
    pub brokers: Option<String>,
    pub writers: u32,
    pub transactions: u32,
    pub aggregates: u32,
}

impl From<&DemoArgs> for DemoOptions {
    fn from(args: &DemoArgs) -> Self {
        DemoOptions {
            mode: args.mode,
            database_url: args.database_url.clone(),
            sink: args.sink,
            brokers: args.brokers.clone().or_else(|| args.sink_url.clone()),
            writers: args.writers,
            transactions: args.transactions,
            aggregates: args.aggregates,
        }
    }
}

/// What the demo saw; [`DemoSummary::passed`] says whether every check held.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub mode: String,
    pub postgres: String,
    pub broker: String,
    /// Who acknowledged, and what that means.
    pub acknowledged_by: String,
    pub writers: u32,
    pub transactions_committed: u64,
    pub transactions_rolled_back: u64,
    pub rows_written: u64,
    pub rows_rolled_back: u64,
    pub relay: RunStats,
    pub deliveries: u64,
    pub unique_consumed: u64,
    pub duplicates_absorbed: u64,
    pub missing: u64,
    pub rolled_back_published: u64,
    pub order_violations: u64,
    pub aggregates_checked: u64,
    pub effects_applied: i64,
    pub left_in_outbox: i64,
    pub elapsed: Duration,
}

impl DemoSummary {
    /// Nothing lost, nothing from a rolled-back transaction, order kept per
    /// aggregate, every effect applied exactly once.
    pub fn passed(&self) -> bool {
        self.missing == 0
            && self.rolled_back_published == 0
            && self.order_violations == 0
            && self.unique_consumed == self.rows_written
            && self.effects_applied == self.rows_written as i64
            && self.left_in_outbox == 0
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(f, "outbox-relay demo ({} mode)", self.mode)?;
        writeln!(f, "  postgres    {}", self.postgres)?;
        writeln!(f, "  broker      {}", self.broker)?;
        writeln!(
            f,
            "  written     {} rows in {} transactions by {} concurrent writers; {} transactions ({} rows) rolled back",
            self.rows_written,
            self.transactions_committed,
            self.writers,
            self.transactions_rolled_back,
            self.rows_rolled_back
        )?;
        writeln!(
            f,
            "  published   {} rows acknowledged by {}, {} dead letters, {} left in the outbox",
            self.relay.published,
            self.acknowledged_by,
            self.relay.dead_lettered,
            self.left_in_outbox
        )?;
        writeln!(
            f,
            "  consumed    {} deliveries, {} unique; {} duplicates absorbed by the inbox; {} effects applied",
            self.deliveries, self.unique_consumed, self.duplicates_absorbed, self.effects_applied
        )?;
        writeln!(
            f,
            "  checked     {} missing, {} rolled-back rows published, {} order violations across {} aggregates",
            self.missing,
            self.rolled_back_published,
            self.order_violations,
            self.aggregates_checked
        )?;
        let busy = self.relay.busy.as_secs_f64().max(1e-9);
        let ms = |q: f64| {
            self.relay
                .ack_latency
                .quantile(q)
                .map_or("-".to_string(), |s| format!("{:.1} ms", s * 1e3))
        };
        writeln!(
            f,
            "  relay       {} rows in {:.2} s of publishing work: {:.0} rows/s; insert to broker ack p50 {}, p99 {}",
            self.relay.published,
            busy,
            self.relay.published as f64 / busy,
            ms(0.5),
            ms(0.99)
        )?;
        writeln!(
            f,
            "  elapsed     {:.2} s end to end, {:.0} rows/s written, relayed and applied at the demo's own pace (its writers' small transactions)",
            secs,
            self.rows_written as f64 / secs
        )?;
        write!(
            f,
            "  result      {}",
            if self.passed() {
                "PASS: every committed row delivered, in commit order per aggregate, effects exactly once"
            } else {
                "FAIL: see the counts above"
            }
        )
    }
}

/// Runs the demo; infrastructure it started is gone when this returns.
pub async fn run(options: &DemoOptions, shutdown: CancellationToken) -> Result<DemoSummary, Error> {
    let mut summary = DemoSummary {
        mode: options.mode.to_string(),
        writers: options.writers,
        ..DemoSummary::default()
    };
    let schema_name = format!("outbox_demo_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let schema = Identifier::parse(&schema_name, "demo schema")?;

    let _temp_pg;
    let url = match &options.database_url {
        Some(url) => url.clone(),
        None => {
            let pg = TempPostgres::start().await?;
            let url = pg.create_database("demo").await?;
            _temp_pg = pg;
            url
        }
    };
    let db = DatabaseConfig::from_url(&url, schema, "--database-url (OUTBOX_DATABASE_URL)")?;
    summary.postgres = match &options.database_url {
        Some(_) => format!("{} (schema {schema_name}, dropped afterwards)", db.target()),
        None => format!("throwaway cluster at {}, wal_level=logical", db.target()),
    };

    let broker = DemoBroker::start(options.sink, options.brokers.as_deref(), &schema_name).await?;
    summary.broker = broker.description.clone();
    summary.acknowledged_by = broker.acknowledgement.to_owned();

    // Its own slot and publication, so a demo beside a real outbox touches
    // nothing of it.
    let tail = TailConfig {
        slot: SlotName::parse(&schema_name, "demo slot")?,
        publication: Identifier::parse(&schema_name, "demo publication")?,
        recreate_invalid_slot: false,
        lane: outbox_relay::config::Lane::WHOLE,
        retention: None,
    };
    database::migrate(&db, &tail.publication).await?;
    let pool = PgPoolOptions::new()
        .max_connections(options.writers + 2)
        .connect_with(db.connect_options().clone())
        .await
        .map_err(Error::db_error("opening the demo pool"))?;
    sqlx::query(
        "create table demo_aggregate (id text primary key, version bigint not null default 0)",
    )
    .execute(&pool)
    .await
    .map_err(Error::db_error("creating the demo tables"))?;
    sqlx::query("create table demo_effect (aggregate text primary key, version bigint not null, events bigint not null)")
        .execute(&pool)
        .await
        .map_err(Error::db_error("creating the demo tables"))?;
    sqlx::query(
        "insert into demo_aggregate (id) select 'acct-' || g from generate_series(1, $1) g",
    )
    .bind(options.aggregates as i64)
    .execute(&pool)
    .await
    .map_err(Error::db_error("creating the demo aggregates"))?;

    let mut config = RelayConfig::new(db.clone(), broker.sink.clone());
    config.mode = options.mode;
    config.tail = tail.clone();
    config.metrics_address = None;
    config.topic_template = TopicTemplate::parse(&broker.template, "demo topic template")?;
    let relay_stop = shutdown.child_token();
    let relay_task = tokio::spawn(relay::run(config, relay_stop.clone()));

    let started = Instant::now();
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let consumer_task = tokio::spawn(runtime::consume(
        pool.clone(),
        schema_name.clone(),
        broker.source(),
        target.clone(),
        shutdown.clone(),
    ));

    let mut writers = Vec::new();
    for _ in 0..options.writers {
        writers.push(tokio::spawn(write(
            pool.clone(),
            options.transactions,
            options.aggregates,
        )));
    }
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for writer in writers {
        let report = writer
            .await
            .map_err(|e| Error::Embedded(format!("a demo writer panicked: {e}")))??;
        summary.transactions_committed += report.transactions_committed;
        summary.transactions_rolled_back += report.transactions_rolled_back;
        committed.extend(report.committed);
        rolled_back.extend(report.rolled_back);
    }
    summary.rows_written = committed.len() as u64;
    summary.rows_rolled_back = rolled_back.len() as u64;
    target.store(summary.rows_written, Ordering::SeqCst);

    // The consumer returns when it saw every committed row, or on a stall.
    let seen = consumer_task
        .await
        .map_err(|e| Error::Embedded(format!("the demo consumer panicked: {e}")))??;
    summary.elapsed = started.elapsed();
    relay_stop.cancel();
    summary.relay = relay_task
        .await
        .map_err(|e| Error::Embedded(format!("the relay panicked: {e}")))??;

    summary.deliveries = seen.deliveries;
    summary.duplicates_absorbed = seen.duplicates;
    summary.unique_consumed = seen.ids.len() as u64;
    summary.order_violations = seen.order_violations;
    summary.aggregates_checked = seen.last_version.len() as u64;
    summary.missing = committed.difference(&seen.ids).count() as u64;
    summary.rolled_back_published = rolled_back.intersection(&seen.ids).count() as u64;
    summary.effects_applied =
        sqlx::query_scalar("select coalesce(sum(events), 0)::bigint from demo_effect")
            .fetch_one(&pool)
            .await
            .map_err(Error::db_error("reading the demo effects"))?;
    summary.left_in_outbox = sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(&pool)
        .await
        .map_err(Error::db_error("counting the outbox"))?;

    if options.database_url.is_some() {
        drop_slot_and_publication(&pool, &tail).await?;
        sqlx::query(&format!(
            "drop schema {} cascade",
            Identifier::parse(&schema_name, "demo schema")?.quoted()
        ))
        .execute(&pool)
        .await
        .map_err(Error::db_error("dropping the demo schema"))?;
    }
    pool.close().await;
    Ok(summary)
}

/// Removes the demo's replication slot (once its session has gone) and
/// publication from a database the demo does not own.
async fn drop_slot_and_publication(pool: &PgPool, tail: &TailConfig) -> Result<(), Error> {
    let doing = "dropping the demo's replication slot";
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let active: Option<bool> =
            sqlx::query_scalar("select active from pg_replication_slots where slot_name = $1")
                .bind(tail.slot.as_str())
                .fetch_optional(pool)
                .await
                .map_err(Error::db_error(doing))?;
        match active {
            None => break,
            Some(false) => {
                sqlx::query("select pg_drop_replication_slot($1)")
                    .bind(tail.slot.as_str())
                    .execute(pool)
                    .await
                    .map_err(Error::db_error(doing))?;
                break;
            }
            Some(true) if Instant::now() > until => {
                return Err(Error::Setup(format!(
                    "the demo's replication slot \"{}\" is still in use; drop it with: select pg_drop_replication_slot('{}')",
                    tail.slot, tail.slot
                )));
            }
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    sqlx::query(&format!(
        "drop publication if exists {}",
        tail.publication.quoted()
    ))
    .execute(pool)
    .await
    .map_err(Error::db_error("dropping the demo's publication"))?;
    Ok(())
}

struct WriterReport {
    transactions_committed: u64,
    transactions_rolled_back: u64,
    committed: Vec<Uuid>,
    rolled_back: Vec<Uuid>,
}

/// One writer: business transactions that bump an aggregate's version and
/// insert its events into the outbox in the same transaction; one in ten
/// rolls back.
async fn write(pool: PgPool, transactions: u32, aggregates: u32) -> Result<WriterReport, Error> {
    let mut report = WriterReport {
        transactions_committed: 0,
        transactions_rolled_back: 0,
        committed: Vec::new(),
        rolled_back: Vec::new(),
    };
    let doing = "running a demo business transaction";
    for _ in 0..transactions {
        let (aggregate, events, roll_back, amount) = {
            let mut rng = rand::rng();
            (
                format!("acct-{}", rng.random_range(1..=aggregates)),
                rng.random_range(1..=3i64),
                rng.random_bool(0.1),
                rng.random_range(1..=100i64),
            )
        };
        let mut tx = pool.begin().await.map_err(Error::db_error(doing))?;
        // Locks the aggregate row: its events commit in version order.
        let version: i64 = sqlx::query_scalar(
            "update demo_aggregate set version = version + $2 where id = $1 returning version",
        )
        .bind(&aggregate)
        .bind(events)
        .fetch_one(&mut *tx)
        .await
        .map_err(Error::db_error(doing))?;
        let batch: Vec<Event> = (0..events)
            .map(|i| {
                let v = version - events + 1 + i;
                Event::new(
                    "account",
                    &aggregate,
                    "deposited",
                    json!({"account": aggregate, "version": v, "amount": amount}),
                )
            })
            .collect();
        outbox::insert_all(&mut tx, &batch)
            .await
            .map_err(Error::db_error(doing))?;
        let ids = batch.iter().map(|e| e.id);
        if roll_back {
            tx.rollback().await.map_err(Error::db_error(doing))?;
            report.transactions_rolled_back += 1;
            report.rolled_back.extend(ids);
        } else {
            tx.commit().await.map_err(Error::db_error(doing))?;
            report.transactions_committed += 1;
            report.committed.extend(ids);
        }
    }
    Ok(report)
}

#[derive(Default)]
struct Seen {
    deliveries: u64,
    duplicates: u64,
    ids: HashSet<Uuid>,
    last_version: HashMap<String, i64>,
    order_violations: u64,
}
