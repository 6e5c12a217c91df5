//! The consumer runtime on NATS JetStream and RabbitMQ, against a throwaway
//! Postgres and real servers (Debian's nats-server and rabbitmq-server):
//! members of one group killed repeatedly while every message arrives two
//! or three times (each payment applied once, in order per account), and,
//! in process, poison dead-lettered, transient failures retried in order,
//! a retry from the dead-letter table applied once.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use outbox_relay::consumer::{
    self, ConsumerConfig, ConsumerError, ConsumerStats, DeadLetterSelection, NatsConsumer,
    NatsSettings, RabbitMqConsumer, RabbitMqSettings, RetryPolicy,
};
use rand::seq::SliceRandom;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use support::testkit::{TempNats, TempRabbitMq};
use support::*;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A broker with a destination the test publishes to (one per test: its
/// size does not matter).
#[allow(clippy::large_enum_variant)]
enum Bus {
    Nats {
        server: TempNats,
        stream: String,
        subject: String,
    },
    RabbitMq {
        server: TempRabbitMq,
        exchange: String,
        // Held so the publishing channel stays open.
        _connection: lapin::Connection,
        channel: lapin::Channel,
    },
}

impl Bus {
    async fn nats(prefix: &str) -> Bus {
        let server = TempNats::start().await.unwrap();
        let stream = nats_stream(&server.url(), prefix).await;
        Bus::Nats {
            server,
            stream,
            subject: format!("{prefix}.payments"),
        }
    }

    async fn rabbitmq(prefix: &str) -> Bus {
        let server = TempRabbitMq::start().await.unwrap();
        let (connection, channel) = rabbitmq_channel(&server.url()).await;
        let exchange = format!("{prefix}.payments");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Bus::RabbitMq {
            server,
            exchange,
            _connection: connection,
            channel,
        }
    }

    fn url(&self) -> String {
        match self {
            Bus::Nats { server, .. } => server.url(),
            Bus::RabbitMq { server, .. } => server.url(),
        }
    }

    /// The topic a consumer reads: the subject, or the exchange.
    fn topic(&self) -> &str {
        match self {
            Bus::Nats { subject, .. } => subject,
            Bus::RabbitMq { exchange, .. } => exchange,
        }
    }

    /// Publishes each message as the relay would (the `id` header or
    /// `message_id`, the key as `aggregate_id` or the routing key), copies
    /// included: nothing here drops a second copy.
    async fn publish(&self, messages: &[(Uuid, String, serde_json::Value)]) {
        match self {
            Bus::Nats {
                server, subject, ..
            } => {
                let client = async_nats::connect(server.url()).await.unwrap();
                let jetstream = async_nats::jetstream::new(client);
                for (id, key, payload) in messages {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("id", id.to_string().as_str());
                    headers.insert("aggregate_id", key.as_str());
                    headers.insert("event_type", "counted");
                    jetstream
                        .publish_with_headers(subject.clone(), headers, payload.to_string().into())
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                }
            }
            Bus::RabbitMq {
                exchange, channel, ..
            } => {
                for (id, key, payload) in messages {
                    let mut headers = FieldTable::default();
                    headers.insert(
                        "event_type".into(),
                        lapin::types::AMQPValue::LongString("counted".into()),
                    );
                    let properties = lapin::BasicProperties::default()
                        .with_message_id(ShortString::from(id.to_string()))
                        .with_delivery_mode(2)
                        .with_headers(headers);
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            key.as_str().into(),
                            BasicPublishOptions::default(),
                            payload.to_string().as_bytes(),
                            properties,
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                }
            }
        }
    }

    /// Declares `group`'s queue as the runtime does, so that what is
    /// published before the first member starts is kept (RabbitMQ drops
    /// messages no queue is bound for; a JetStream stream keeps them).
    async fn prepare(&self, group: &str) {
        if let Bus::RabbitMq {
            exchange, channel, ..
        } = self
        {
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-single-active-consumer".into(),
                lapin::types::AMQPValue::Boolean(true),
            );
            let durable = lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(group.into(), durable, arguments)
                .await
                .unwrap();
            channel
                .queue_bind(
                    group.into(),
                    exchange.as_str().into(),
                    "#".into(),
                    lapin::options::QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
    }

    /// The example consumer's flags for this broker.
    fn example_args(&self) -> Vec<String> {
        match self {
            Bus::Nats {
                stream, subject, ..
            } => vec![
                "--broker".into(),
                "nats".into(),
                "--brokers".into(),
                self.url(),
                "--stream".into(),
                stream.clone(),
                "--topic".into(),
                subject.clone(),
            ],
            Bus::RabbitMq { exchange, .. } => vec![
                "--broker".into(),
                "rabbitmq".into(),
                "--brokers".into(),
                self.url(),
                "--topic".into(),
                exchange.clone(),
            ],
        }
    }

    /// Starts a member of `config.group` in process; it stops when `stop`
    /// fires.
    fn start(
        &self,
        pool: &PgPool,
        config: ConsumerConfig,
        script: &Arc<Script>,
        stop: &CancellationToken,
    ) -> (
        ConsumerStats,
        tokio::task::JoinHandle<Result<(), ConsumerError>>,
    ) {
        let stop = stop.clone();
        let shutdown = async move { stop.cancelled().await };
        let handler = Effects(script.clone());
        match self {
            Bus::Nats { stream, .. } => {
                let settings = NatsSettings::new(self.url(), stream).lease(Duration::from_secs(2));
                let member = NatsConsumer::new(pool.clone(), config, settings, handler).unwrap();
                (member.stats(), tokio::spawn(member.run(shutdown)))
            }
            Bus::RabbitMq { .. } => {
                let settings = RabbitMqSettings::new(self.url());
                let member =
                    RabbitMqConsumer::new(pool.clone(), config, settings, handler).unwrap();
                (member.stats(), tokio::spawn(member.run(shutdown)))
            }
        }
    }
}

/// Members of one group (the example consumer) killed five times while
/// 1,200 payments arrive two or three times each: balances exact, each
/// payment applied once, an account's payments in the order of their first
/// copies, nothing dead-lettered.
async fn members_killed_repeatedly_apply_each_payment_once_in_order(bus: Bus) {
    let url = fresh_database().await;
    let group = format!("balances-{}", topic_prefix());
    let mut rng = rand::rng();
    let payments: Vec<(Uuid, String, i64)> = (0..1200)
        .map(|_| {
            (
                Uuid::new_v4(),
                format!("acct-{}", rng.random_range(1..=5)),
                rng.random_range(1..=100),
            )
        })
        .collect();
    let mut deliveries: Vec<&(Uuid, String, i64)> = Vec::new();
    for p in &payments {
        deliveries.extend(std::iter::repeat_n(p, rng.random_range(2..=3)));
    }
    deliveries.shuffle(&mut rng);
    bus.prepare(&group).await;

    let consumer = || {
        let mut cmd = Command::new(example_binary("inbox_consumer"));
        cmd.args(bus.example_args())
            .args(["--database-url", &url, "--group", &group])
            .args(["--max-in-flight", "3", "--work-ms", "2"])
            .kill_on_drop(true);
        cmd
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let mut members = vec![spawn_logged(consumer())];
    wait_for(
        "the first consumer to create its tables",
        Duration::from_secs(60),
        || async {
            sqlx::query_scalar::<_, bool>("select to_regclass('ledger') is not null")
                .fetch_one(&pool)
                .await
                .unwrap()
        },
    )
    .await;
    members.push(spawn_logged(consumer()));
    members.push(spawn_logged(consumer()));

    let chunks: Vec<Vec<(Uuid, String, serde_json::Value)>> = deliveries
        .chunks(100)
        .map(|chunk| {
            chunk
                .iter()
                .map(|(id, account, amount)| {
                    (
                        *id,
                        account.clone(),
                        json!({"account": account, "amount": amount}),
                    )
                })
                .collect()
        })
        .collect();
    let producing = async {
        for chunk in &chunks {
            bus.publish(chunk).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let killing = async {
        for round in 0..5 {
            let pause = rand::rng().random_range(400..1500);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            // On NATS, every other time the member holding the group's row
            // (the one receiving), once a live one holds it: the group is
            // taken over at least three times.
            let mut victim = rand::rng().random_range(0..members.len());
            if round % 2 == 0 && matches!(bus, Bus::Nats { .. }) {
                let live: Vec<Option<u32>> = members.iter().map(|(m, _)| m.id()).collect();
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                victim = loop {
                    let pid = holder_pid(&pool, &group).await;
                    if let Some(at) = live.iter().position(|id| pid.is_some() && *id == pid) {
                        break at;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no live member took the group over within 30 s"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
            }
            members[victim].0.kill().await.unwrap(); // SIGKILL, anywhere
            members[victim] = spawn_logged(consumer());
        }
    };
    tokio::join!(producing, killing);

    let mut expected: HashMap<String, i64> = HashMap::new();
    for (_, account, amount) in &payments {
        *expected.entry(account.clone()).or_default() += amount;
    }
    let mut seen = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while std::time::Instant::now() < deadline {
        seen = balances_if_any(&pool).await;
        if seen == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs: Vec<String> = members.iter().map(|(_, log)| log.text()).collect();
    for (member, _) in &mut members {
        member.kill().await.unwrap();
    }
    assert_eq!(
        seen,
        expected,
        "balances are not exact after 180 s; the last members logged:\n{}",
        logs.join("\n---\n")
    );
    let ledger: Vec<(Uuid, String)> =
        sqlx::query_as("select message_id, account from ledger order by seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        ledger.len(),
        payments.len(),
        "payments applied more than once"
    );
    let mut applied: HashMap<String, Vec<Uuid>> = HashMap::new();
    for (id, account) in ledger {
        applied.entry(account).or_default().push(id);
    }
    let mut first_copies = HashSet::new();
    let mut order: HashMap<String, Vec<Uuid>> = HashMap::new();
    for (id, account, _) in &deliveries {
        if first_copies.insert(*id) {
            order.entry(account.clone()).or_default().push(*id);
        }
    }
    for (account, ids) in &order {
        let got = &applied[account];
        if let Some(at) = (0..ids.len()).find(|&i| got.get(i) != ids.get(i)) {
            panic!(
                "payments of {account} were applied out of their order: the {at}th applied is \
                 {:?}, the {at}th published {}",
                got.get(at),
                ids[at]
            );
        }
    }
    assert_eq!(applied.len(), order.len(), "payments of unknown accounts");
    let dead: i64 = sqlx::query_scalar("select count(*) from consumer_dead_letter")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "well-formed payments were dead-lettered");
    if matches!(bus, Bus::Nats { .. }) {
        let epoch: i64 =
            sqlx::query_scalar("select epoch from consumer_member where consumer_group = $1")
                .bind(&group)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(
            epoch >= 4,
            "the group was taken over only {} times",
            epoch - 1
        );
    }
}

/// The pid of the member holding `group`'s row on NATS (`PID/NONCE`).
async fn holder_pid(pool: &PgPool, group: &str) -> Option<u32> {
    let holder: Option<String> =
        sqlx::query_scalar("select holder from consumer_member where consumer_group = $1")
            .bind(group)
            .fetch_optional(pool)
            .await
            .ok()
            .flatten();
    holder?.split('/').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_members_killed_repeatedly_apply_each_payment_once_in_order_per_account() {
    let bus = Bus::nats(&topic_prefix()).await;
    members_killed_repeatedly_apply_each_payment_once_in_order(bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_members_killed_repeatedly_apply_each_payment_once_in_order_per_account() {
    let bus = Bus::rabbitmq(&topic_prefix()).await;
    members_killed_repeatedly_apply_each_payment_once_in_order(bus).await;
}

/// Poison dead-lettered after one run, a transient failure retried as
/// configured then dead-lettered, one failing twice then applied, the rest
/// of its aggregate going on in order; a retry from the dead-letter table
/// applies both once, and a late copy is skipped.
async fn poison_and_transient_failures_follow_the_retry_policy(bus: Bus) {
    let url = fresh_database().await;
    let migrated = migrated_pool(&url).await;
    create_effects_table(&migrated).await;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    let sent: Vec<Sent> = (0..40)
        .map(|i| Sent {
            id: Uuid::new_v4(),
            key: format!("key-{}", i % 2),
            n: i,
        })
        .collect();
    let message = |s: &Sent| (s.id, s.key.clone(), json!({"key": s.key, "n": s.n}));
    let group = format!("checked-{}", topic_prefix());
    bus.prepare(&group).await;
    bus.publish(&sent.iter().map(message).collect::<Vec<_>>())
        .await;
    let script = Arc::new(Script::default());
    let (poison, flaky, twice) = (sent[5].id, sent[10].id, sent[14].id);
    script.poison.lock().unwrap().insert(poison);
    script.flaky.lock().unwrap().insert(flaky);
    script.fail_times.lock().unwrap().insert(twice, 2);
    let mut config = ConsumerConfig::new(&group, [bus.topic()]);
    config.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    };
    config.redrive_interval = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let (stats, task) = bus.start(&pool, config, &script, &stop);

    let dead_letters = || async {
        let mut conn = pool.acquire().await.unwrap();
        consumer::list(&mut conn, Some(&group), 1000).await.unwrap()
    };
    let effects = || async {
        sqlx::query_as::<_, (Uuid, String, i64)>(
            "select message_id, key, n from effects order by seq",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let healthy: Vec<Sent> = sent
        .iter()
        .filter(|s| s.id != poison && s.id != flaky)
        .cloned()
        .collect();
    wait_for(
        "the healthy messages and two dead letters",
        Duration::from_secs(60),
        || async { effects().await.len() >= healthy.len() && dead_letters().await.len() == 2 },
    )
    .await;
    assert_once_in_order(&effects().await, &healthy);
    {
        let calls = script.calls.lock().unwrap();
        assert_eq!(calls[&poison], 1, "a permanent error was retried");
        assert_eq!(
            calls[&flaky], 3,
            "a transient error was not retried as configured"
        );
        assert_eq!(
            calls[&twice], 3,
            "a message failing twice was not applied on its third run"
        );
    }
    assert_eq!(stats.dead_lettered(), 2);
    let dead = dead_letters().await;
    let row = dead
        .iter()
        .find(|d| d.message_id == Some(poison))
        .expect("the poison's dead letter");
    assert_eq!((row.topic.as_str(), row.partition), (bus.topic(), -1));
    assert_eq!(row.key.as_deref(), Some(b"key-1".as_slice()));
    assert_eq!(
        row.payload.as_deref(),
        Some(json!({"key": "key-1", "n": 5}).to_string().as_bytes())
    );
    assert_eq!(row.attempts, 1);
    assert!(row.error.contains("breaks a rule"), "{}", row.error);

    // Fixed: the operator retries both; the running member applies each once.
    script.accept.store(true, Ordering::SeqCst);
    let mut conn = pool.acquire().await.unwrap();
    let marked = consumer::request_retry(&mut conn, &group, DeadLetterSelection::All)
        .await
        .unwrap();
    assert_eq!(marked, 2);
    wait_for(
        "the retried dead letters to be applied",
        Duration::from_secs(60),
        || async { dead_letters().await.is_empty() },
    )
    .await;
    bus.publish(&[message(&sent[5])]).await;
    wait_for(
        "the late copy to be skipped",
        Duration::from_secs(60),
        || async { stats.duplicates() >= 1 },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let mut ids: Vec<Uuid> = effects().await.iter().map(|(id, _, _)| *id).collect();
    ids.sort_unstable();
    let mut expected: Vec<Uuid> = sent.iter().map(|s| s.id).collect();
    expected.sort_unstable();
    assert_eq!(
        ids, expected,
        "every message applied exactly once after the retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_poison_and_transient_failures_follow_the_retry_policy() {
    let bus = Bus::nats(&topic_prefix()).await;
    poison_and_transient_failures_follow_the_retry_policy(bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_poison_and_transient_failures_follow_the_retry_policy() {
    let bus = Bus::rabbitmq(&topic_prefix()).await;
    poison_and_transient_failures_follow_the_retry_policy(bus).await;
}
