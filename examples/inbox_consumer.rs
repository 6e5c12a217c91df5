//! A consumer with exactly-once effects, on the crate's consumer runtime.
//!
//! ```text
//! cargo run --example inbox_consumer -- --brokers localhost:9092 \
//!     --database-url postgres://... --topic payment.events --group balances
//! cargo run --example inbox_consumer -- --broker nats --brokers nats://localhost:4222 \
//!     --stream PAYMENTS --database-url postgres://... --topic 'payment.>' --group balances
//! cargo run --example inbox_consumer -- --broker rabbitmq --brokers amqp://localhost:5672 \
//!     --database-url postgres://... --topic payment.events --group balances
//! ```
//!
//! It applies payment messages `{"account": "...", "amount": 12}` to
//! `balances(account, amount)` and records each applied payment in
//! `ledger`, in the order applied. The runtime claims each message id in the
//! inbox in the handler's transaction and lets the broker forget the
//! message (Kafka: commits the offset; NATS, RabbitMQ: acknowledges) only
//! after that transaction: killed anywhere and restarted, balances are exact
//! even when every message arrives two or three times. A payload that is
//! not a payment is dead-lettered (`outbox-relay consumer-dead-letters list`).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use outbox_relay::consumer::{
    self, ConsumerConfig, HandlerError, KafkaSettings, Message, NatsSettings, RabbitMqSettings,
};
use serde::Deserialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Postgres, Transaction};

#[derive(Clone, Copy, clap::ValueEnum)]
enum Broker {
    Kafka,
    Nats,
    Rabbitmq,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "kafka")]
    broker: Broker,
    /// Kafka bootstrap servers, the NATS server URL or the RabbitMQ URL.
    #[arg(long, env = "OUTBOX_BROKERS")]
    brokers: String,
    /// NATS: the JetStream stream holding the topic's subjects.
    #[arg(long, default_value = "")]
    stream: String,
    /// The consumer's own database (gets `balances`, `ledger` and the inbox).
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, default_value = "payment.events")]
    topic: String,
    /// Consumer group; also the inbox's dedup namespace.
    #[arg(long, default_value = "balances")]
    group: String,
    /// Partitions (Kafka) or lanes of aggregates (NATS, RabbitMQ) applied at once.
    #[arg(long, default_value_t = 4)]
    max_in_flight: usize,
    /// Milliseconds each payment's handler takes (work in the transaction).
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
    /// Exit 0 after this many seconds without a new message (0: never).
    #[arg(long, default_value_t = 0)]
    idle_exit_secs: u64,
    /// Extra librdkafka consumer property KEY=VALUE (repeatable), e.g. SASL settings.
    #[arg(long = "kafka-config")]
    kafka_config: Vec<String>,
}

/// The effects of one payment, taking `work` each.
struct Balances {
    work: Duration,
}

impl consumer::Handler for Balances {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Message,
    ) -> Result<(), HandlerError> {
        #[derive(Deserialize)]
        struct Payment {
            account: String,
            amount: i64,
        }
        let payment: Payment = message.json()?;
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        sqlx::query(
            "insert into balances (account, amount) values ($1, $2) \
             on conflict (account) do update set amount = balances.amount + excluded.amount",
        )
        .bind(&payment.account)
        .bind(payment.amount)
        .execute(&mut **tx)
        .await?;
        sqlx::query("insert into ledger (message_id, account, amount) values ($1, $2, $3)")
            .bind(message.id)
            .bind(&payment.account)
            .bind(payment.amount)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let pool = PgPoolOptions::new()
        .max_connections(args.max_in_flight as u32 + 1)
        .connect(&args.database_url)
        .await
        .context("connecting to --database-url")?;
    // The crate's migrations create the inbox and dead-letter tables.
    outbox_relay::MIGRATOR
        .run(&pool)
        .await
        .context("creating the inbox table")?;
    sqlx::query(
        "create table if not exists balances (account text primary key, amount bigint not null)",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "create table if not exists ledger (seq bigint generated always as identity, \
         message_id uuid not null, account text not null, amount bigint not null)",
    )
    .execute(&pool)
    .await?;

    let balances = Balances {
        work: Duration::from_millis(args.work_ms),
    };
    let mut config = ConsumerConfig::new(&args.group, [&args.topic]);
    config.max_in_flight = args.max_in_flight;
    let consumer = match args.broker {
        Broker::Kafka => {
            let mut kafka = KafkaSettings::new(&args.brokers);
            for entry in &args.kafka_config {
                let (key, value) = entry
                    .split_once('=')
                    .context("--kafka-config takes KEY=VALUE")?;
                kafka = kafka.set(key, value);
            }
            Member::Kafka(consumer::KafkaConsumer::new(pool, config, kafka, balances)?)
        }
        Broker::Nats => {
            // A short lease: a killed member is replaced within seconds.
            let nats = NatsSettings::new(&args.brokers, &args.stream).lease(Duration::from_secs(2));
            Member::Nats(consumer::NatsConsumer::new(pool, config, nats, balances)?)
        }
        Broker::Rabbitmq => {
            let rabbitmq = RabbitMqSettings::new(&args.brokers);
            Member::RabbitMq(consumer::RabbitMqConsumer::new(
                pool, config, rabbitmq, balances,
            )?)
        }
    };
    let stats = match &consumer {
        Member::Kafka(c) => c.stats(),
        Member::Nats(c) => c.stats(),
        Member::RabbitMq(c) => c.stats(),
    };
    let idle = (args.idle_exit_secs > 0).then(|| Duration::from_secs(args.idle_exit_secs));
    let shutdown = async move {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = async {
            match signal(SignalKind::terminate()) {
                Ok(mut terminate) => {
                    terminate.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        let idle = async {
            let Some(idle) = idle else {
                return std::future::pending().await;
            };
            let mut seen = (u64::MAX, std::time::Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = stats.applied() + stats.duplicates() + stats.dead_lettered();
                if now != seen.0 {
                    seen = (now, std::time::Instant::now());
                } else if seen.1.elapsed() >= idle {
                    println!("no new message for {}s; exiting", idle.as_secs());
                    return;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
            () = idle => {}
        }
    };
    match consumer {
        Member::Kafka(c) => c.run(shutdown).await?,
        Member::Nats(c) => c.run(shutdown).await?,
        Member::RabbitMq(c) => c.run(shutdown).await?,
    }
    Ok(())
}

enum Member {
    Kafka(consumer::KafkaConsumer<Balances>),
    Nats(consumer::NatsConsumer<Balances>),
    RabbitMq(consumer::RabbitMqConsumer<Balances>),
}
