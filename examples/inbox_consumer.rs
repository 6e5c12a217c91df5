//! A complete consumer with exactly-once effects, to copy.
//!
//! ```text
//! cargo run --example inbox_consumer -- --brokers localhost:9092 \
//!     --database-url postgres://... --topic payment.events --group balances
//! ```
//!
//! It applies payment messages `{"account": "...", "amount": 12}` to
//! `balances(account, amount)`. For each record: one database transaction
//! records the message id in the inbox and, only if it is new, updates the
//! balance; the Kafka offset is committed after that transaction commits.
//! Killed anywhere and restarted, it re-reads from the last committed offset
//! and the inbox skips what was already applied, so balances are exact even
//! when every message arrives two or three times.
//!
//! It logs each partition assignment and revocation to stderr, so the group's
//! members show which of them holds which partition.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use outbox_relay::inbox::{self, Claim};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, TopicPartitionList};
use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

#[derive(Parser)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "OUTBOX_BROKERS")]
    brokers: String,
    /// The consumer's own database (gets `balances` and the inbox table).
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, default_value = "payment.events")]
    topic: String,
    /// Consumer group; also the inbox's dedup namespace.
    #[arg(long, default_value = "balances")]
    group: String,
    /// Exit 0 after this many seconds without a new message (0: never).
    #[arg(long, default_value_t = 0)]
    idle_exit_secs: u64,
    /// Extra librdkafka consumer property KEY=VALUE (repeatable), e.g. SASL settings.
    #[arg(long = "kafka-config")]
    kafka_config: Vec<String>,
}

#[derive(Deserialize)]
struct Payment {
    account: String,
    amount: i64,
}

/// Reports the group's rebalances; librdkafka does the assigning.
struct LogRebalances;

impl ClientContext for LogRebalances {}

impl ConsumerContext for LogRebalances {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => eprintln!("assigned: {}", describe(partitions)),
            Rebalance::Revoke(partitions) => eprintln!("revoked: {}", describe(partitions)),
            Rebalance::Error(e) => eprintln!("rebalance: {e}"),
        }
    }
}

fn describe(partitions: &TopicPartitionList) -> String {
    let names: Vec<String> = partitions
        .elements()
        .iter()
        .map(|p| format!("{}[{}]", p.topic(), p.partition()))
        .collect();
    if names.is_empty() {
        "no partitions".into()
    } else {
        names.join(", ")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.database_url)
        .await
        .context("connecting to --database-url")?;
    // The crate's migrations create the inbox table.
    outbox_relay::MIGRATOR
        .run(&pool)
        .await
        .context("creating the inbox table")?;
    sqlx::query(
        "create table if not exists balances (account text primary key, amount bigint not null)",
    )
    .execute(&pool)
    .await?;

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for entry in &args.kafka_config {
        let (key, value) = entry
            .split_once('=')
            .context("--kafka-config takes KEY=VALUE")?;
        config.set(key, value);
    }
    let consumer: StreamConsumer<LogRebalances> = config
        .create_with_context(LogRebalances)
        .context("creating the Kafka consumer")?;
    consumer.subscribe(&[&args.topic]).context("subscribing")?;

    let idle = (args.idle_exit_secs > 0).then(|| Duration::from_secs(args.idle_exit_secs));
    loop {
        let message = match idle {
            Some(idle) => match tokio::time::timeout(idle, consumer.recv()).await {
                Ok(message) => message,
                Err(_) => {
                    println!("no new message for {}s; exiting", idle.as_secs());
                    return Ok(());
                }
            },
            None => consumer.recv().await,
        };
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                eprintln!("kafka: {e}");
                continue;
            }
        };
        if let Err(e) = apply(&pool, &args.group, &message).await {
            // A message that can never apply is reported and skipped;
            // a database error ends the process so the message is retried.
            match e.downcast_ref::<sqlx::Error>() {
                Some(_) => return Err(e),
                None => eprintln!("skipping record at offset {}: {e:#}", message.offset()),
            }
        }
        // Only after the database commit: a crash before this line means
        // redelivery, which the inbox absorbs. So does a failed commit, which
        // is reported and not fatal: Kafka refuses commits from a member
        // caught in a rebalance (REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION,
        // UNKNOWN_MEMBER_ID), and librdkafka rejoins by itself.
        if let Err(e) = consumer.commit_message(&message, CommitMode::Sync) {
            eprintln!(
                "committing offset {} of partition {}: {e}",
                message.offset() + 1,
                message.partition()
            );
        }
    }
}

async fn apply(pool: &PgPool, group: &str, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
    let id = inbox::kafka_message_id(message)?;
    let payment: Payment = serde_json::from_slice(message.payload().unwrap_or_default())
        .context("payload is not {\"account\": text, \"amount\": integer}")?;
    let mut tx = pool.begin().await?;
    if inbox::claim(&mut tx, group, id).await? == Claim::New {
        sqlx::query(
            "insert into balances (account, amount) values ($1, $2) \
             on conflict (account) do update set amount = balances.amount + excluded.amount",
        )
        .bind(&payment.account)
        .bind(payment.amount)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
