//! The consumer runtime (`outbox_relay::consumer`) in process, against a
//! throwaway Postgres and Kafka: a rebalance in the middle of a handler,
//! poison messages dead-lettered and retried, transient failures retried in
//! order, and settings refused with one line.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outbox_relay::consumer::{
    self, ConsumerConfig, ConsumerError, ConsumerStats, DeadLetterSelection, KafkaConsumer,
    KafkaSettings, RetryPolicy,
};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use support::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Produces `count` messages spread over `keys` keys, in order, each its
/// own producer batch (tansu: README, "Compatibility notes").
async fn produce(brokers: &str, topic: &str, keys: usize, count: usize, from: i64) -> Vec<Sent> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..count {
        let message = Sent {
            id: Uuid::new_v4(),
            key: format!("key-{}", i % keys),
            n: from + i as i64,
        };
        send(&producer, topic, &message).await;
        sent.push(message);
    }
    sent
}

async fn send(producer: &FutureProducer, topic: &str, message: &Sent) {
    let id = message.id.to_string();
    let payload = json!({"key": message.key, "n": message.n}).to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "id",
            value: Some(&id),
        })
        .insert(Header {
            key: "event_type",
            value: Some("counted"),
        });
    producer
        .send(
            FutureRecord::to(topic)
                .key(&message.key)
                .payload(&payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

struct World {
    url: String,
    pool: PgPool,
    kafka: Kafka,
    topic: String,
}

/// Connections in a world's pool unless a test says otherwise.
const POOL_CONNECTIONS: u32 = 8;

impl World {
    async fn new(partitions: i32) -> World {
        World::with_pool(partitions, POOL_CONNECTIONS).await
    }

    /// A world whose consumers share a pool of `connections`.
    async fn with_pool(partitions: i32, connections: u32) -> World {
        World::on(Kafka::start(), partitions, connections).await
    }

    /// A world on `kafka`.
    async fn on(kafka: Kafka, partitions: i32, connections: u32) -> World {
        let url = fresh_database().await;
        let migrated = migrated_pool(&url).await;
        create_effects_table(&migrated).await;
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect(&url)
            .await
            .unwrap();
        let topic = format!("{}.counted", topic_prefix());
        kafka.create_topic(&topic, partitions).await;
        World {
            url,
            pool,
            kafka,
            topic,
        }
    }

    /// A group name of this test's own: a broker shared by test runs keeps
    /// groups (and their members) across them.
    fn group(&self, name: &str) -> String {
        format!("{name}-{}", self.topic)
    }

    fn config(&self, group: &str) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(self.group(group), [&self.topic]);
        config.retry = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
        };
        config.redrive_interval = Duration::from_millis(200);
        config
    }

    fn kafka_settings(&self) -> KafkaSettings {
        KafkaSettings::new(self.kafka.brokers())
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
    }

    /// [`World::config`], serving `/metrics` and the probes on a free local
    /// address, returned as HOST:PORT.
    fn probed_config(&self, group: &str) -> (ConsumerConfig, String) {
        let mut config = self.config(group);
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = metrics.local_addr().unwrap();
        drop(metrics);
        config.metrics_address = Some(address);
        (config, address.to_string())
    }

    /// Starts a member of `config.group`; stops when `stop` fires.
    fn start(
        &self,
        config: ConsumerConfig,
        script: &Arc<Script>,
        stop: &CancellationToken,
    ) -> (
        ConsumerStats,
        tokio::task::JoinHandle<Result<(), ConsumerError>>,
    ) {
        let consumer = KafkaConsumer::new(
            self.pool.clone(),
            config,
            self.kafka_settings(),
            Effects(script.clone()),
        )
        .unwrap();
        let stats = consumer.stats();
        let stop = stop.clone();
        let task = tokio::spawn(consumer.run(async move { stop.cancelled().await }));
        (stats, task)
    }

    /// Applied messages in the order applied: (id, key, n).
    async fn effects(&self) -> Vec<(Uuid, String, i64)> {
        sqlx::query_as("select message_id, key, n from effects order by seq")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    async fn effect_count(&self) -> i64 {
        sqlx::query_scalar("select count(*) from effects")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn dead_letters(&self, group: &str) -> Vec<consumer::ConsumerDeadLetter> {
        let mut conn = self.pool.acquire().await.unwrap();
        consumer::list(&mut conn, Some(&self.group(group)), 1000)
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_joining_mid_handler_gets_no_message_applied_twice_or_lost() {
    let w = World::new(4).await;
    let mut sent = produce(&w.kafka.brokers(), &w.topic, 8, 200, 0).await;
    let script = Arc::new(Script::default());
    let held = sent[37].id;
    *script.hold.lock().unwrap() = Some(held);
    let stop = CancellationToken::new();
    let mut config = w.config("joiners");
    config.revoke_timeout = Duration::from_secs(60);

    let (first, first_task) = w.start(config.clone(), &script, &stop);
    tokio::time::timeout(Duration::from_secs(60), script.entered.notified())
        .await
        .expect("the first member to reach the held message");
    // A second member joins while the first is inside the handler: the
    // group rebalances, and the first must finish (or abandon) it before
    // its partitions go.
    let (second, second_task) = w.start(config, &script, &stop);
    wait_for(
        "the first member to start giving partitions up",
        Duration::from_secs(60),
        || async { first.revocations() >= 1 },
    )
    .await;
    script.release.notify_one();
    wait_for(
        "the second member to be assigned partitions",
        Duration::from_secs(60),
        || async { second.partitions() > 0 },
    )
    .await;
    // More messages once both members hold partitions.
    sent.extend(produce(&w.kafka.brokers(), &w.topic, 8, 200, 200).await);
    wait_for(
        "every message to be applied",
        Duration::from_secs(120),
        || async { w.effect_count().await >= sent.len() as i64 },
    )
    .await;
    // Settled: nothing further is redelivered and applied.
    wait_for(
        "both members to report every message",
        Duration::from_secs(30),
        || async { first.applied() + second.applied() >= sent.len() as u64 },
    )
    .await;
    stop.cancel();
    first_task.await.unwrap().unwrap();
    second_task.await.unwrap().unwrap();

    assert_once_in_order(&w.effects().await, &sent);
    assert_eq!(
        script.calls.lock().unwrap()[&held],
        1,
        "the message in hand at the rebalance was run again"
    );
    assert!(second.applied() > 0, "the joining member applied nothing");
    // The offsets of what was applied are committed before the partitions
    // go, so nothing comes again; unless the broker refused a commit, as
    // the mock cluster does now and then while the group rebalances under
    // load (counted, and the inbox skipped what came again).
    if first.commit_failures() + second.commit_failures() == 0 {
        assert_eq!(
            first.duplicates() + second.duplicates(),
            0,
            "applied messages were delivered again though every offset commit was accepted"
        );
    }
}

/// An offset commit the broker refuses is counted, and the messages it
/// covered come again to the next member, whose inbox skips every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_commits_are_counted_and_what_they_covered_is_skipped_when_it_comes_again() {
    let Some(kafka) = Kafka::mock_only(
        "refused_commits_are_counted_and_what_they_covered_is_skipped_when_it_comes_again",
        "it makes the broker refuse offset commits",
    ) else {
        return;
    };
    let w = World::on(kafka, 1, POOL_CONNECTIONS).await;
    let sent = produce(&w.kafka.brokers(), &w.topic, 4, 40, 0).await;
    // More refusals than the first member can use up, one a second even
    // on a slow machine: its periodic commits and the one when it stops
    // are all refused.
    w.kafka.cluster().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 64],
    );
    let script = Arc::new(Script::default());
    let config = w.config("refused");

    let stop = CancellationToken::new();
    let (first, task) = w.start(config.clone(), &script, &stop);
    wait_for(
        "every message applied and a commit refused",
        Duration::from_secs(60),
        || async { first.applied() == sent.len() as u64 && first.commit_failures() >= 1 },
    )
    .await;
    stop_member(&stop, task).await;

    let stop = CancellationToken::new();
    let (second, task) = w.start(config, &script, &stop);
    wait_for(
        "every message to come again to the next member",
        Duration::from_secs(60),
        || async { second.duplicates() == sent.len() as u64 },
    )
    .await;
    stop_member(&stop, task).await;

    assert_eq!(second.applied(), 0, "a message was applied twice");
    assert_once_in_order(&w.effects().await, &sent);
    assert!(
        first.commit_failures() >= 2,
        "the refused commit when the member stopped was not counted"
    );
    let metrics = first.render();
    assert!(
        metrics.contains("outbox_consumer_commit_failures_total{"),
        "/metrics has no commit failures: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_is_dead_lettered_the_partition_goes_on_and_a_retry_applies_it_once() {
    let w = World::new(1).await;
    let sent = produce(&w.kafka.brokers(), &w.topic, 1, 20, 0).await;
    let script = Arc::new(Script::default());
    let (poison, flaky) = (sent[5].id, sent[10].id);
    script.poison.lock().unwrap().insert(poison);
    script.flaky.lock().unwrap().insert(flaky);
    let stop = CancellationToken::new();
    let (stats, task) = w.start(w.config("poisoned"), &script, &stop);

    let healthy: Vec<Sent> = sent
        .iter()
        .filter(|s| s.id != poison && s.id != flaky)
        .cloned()
        .collect();
    wait_for(
        "the healthy messages and two dead letters",
        Duration::from_secs(60),
        || async {
            w.effect_count().await >= healthy.len() as i64
                && w.dead_letters("poisoned").await.len() == 2
        },
    )
    .await;
    assert_once_in_order(&w.effects().await, &healthy);
    {
        let calls = script.calls.lock().unwrap();
        assert_eq!(calls[&poison], 1, "a permanent error was retried");
        assert_eq!(
            calls[&flaky], 3,
            "a transient error was not retried as configured"
        );
    }
    assert_eq!(stats.dead_lettered(), 2);

    let dead = w.dead_letters("poisoned").await;
    let by_id: HashMap<Uuid, &consumer::ConsumerDeadLetter> = dead
        .iter()
        .map(|d| (d.message_id.expect("a message id"), d))
        .collect();
    let row = by_id[&poison];
    assert_eq!(
        (row.topic.as_str(), row.partition, row.offset),
        (w.topic.as_str(), 0, 5)
    );
    assert_eq!(row.key.as_deref(), Some(b"key-0".as_slice()));
    assert_eq!(
        row.payload.as_deref(),
        Some(json!({"key": "key-0", "n": 5}).to_string().as_bytes())
    );
    assert_eq!(
        row.headers,
        json!([{"key": "id", "value": poison.to_string()}, {"key": "event_type", "value": "counted"}])
    );
    assert_eq!(row.attempts, 1);
    assert!(row.error.contains("breaks a rule"), "{}", row.error);
    let row = by_id[&flaky];
    assert_eq!((row.offset, row.attempts), (10, 3));
    assert!(row.error.contains("a dependency is down"), "{}", row.error);

    // Fixed: the operator retries both; the running consumer applies each once.
    script.accept.store(true, Ordering::SeqCst);
    let mut conn = w.pool.acquire().await.unwrap();
    let marked = consumer::request_retry(&mut conn, &w.group("poisoned"), DeadLetterSelection::All)
        .await
        .unwrap();
    assert_eq!(marked, 2);
    wait_for(
        "the retried dead letters to be applied",
        Duration::from_secs(60),
        || async { w.dead_letters("poisoned").await.is_empty() },
    )
    .await;
    // A late copy of a retried message is skipped by the inbox.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", w.kafka.brokers())
        .create()
        .unwrap();
    send(&producer, &w.topic, &sent[5]).await;
    wait_for(
        "the late copy to be skipped",
        Duration::from_secs(60),
        || async { stats.duplicates() >= 1 },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let effects = w.effects().await;
    let mut ids: Vec<Uuid> = effects.iter().map(|(id, _, _)| *id).collect();
    ids.sort_unstable();
    let mut expected: Vec<Uuid> = sent.iter().map(|s| s.id).collect();
    expected.sort_unstable();
    assert_eq!(
        ids, expected,
        "every message applied exactly once after the retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_failing_transiently_then_succeeding_applies_the_message_once_in_order() {
    let w = World::new(2).await;
    let sent = produce(&w.kafka.brokers(), &w.topic, 2, 60, 0).await;
    let script = Arc::new(Script::default());
    let flaky = sent[14].id;
    script.fail_times.lock().unwrap().insert(flaky, 4);
    let stop = CancellationToken::new();
    let (mut config, address) = w.probed_config("patient");
    let group = config.group.clone();
    config.retry.max_attempts = 5;
    let (stats, task) = w.start(config, &script, &stop);
    wait_for(
        "every message to be applied",
        Duration::from_secs(60),
        || async { w.effect_count().await >= sent.len() as i64 },
    )
    .await;

    assert_once_in_order(&w.effects().await, &sent);
    assert_eq!(script.calls.lock().unwrap()[&flaky], 5);
    assert_eq!(stats.handler_errors(), 4);
    assert!(w.dead_letters("patient").await.is_empty());
    let (status, body) = get(&address, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        value(
            &body,
            &format!("outbox_consumer_applied_total{{group=\"{group}\"}}")
        ),
        Some(sent.len() as f64),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            &format!("outbox_consumer_handler_errors_total{{group=\"{group}\"}}")
        ),
        Some(4.0),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            &format!("outbox_consumer_partitions_assigned{{group=\"{group}\"}}")
        ),
        Some(2.0),
        "{body}"
    );
    // Lag per partition, from librdkafka's statistics (every 5 s): nothing
    // left once the offsets of the applied messages are committed.
    let lag = |body: &str, partition: i32| {
        value(
            body,
            &format!(
                "outbox_consumer_lag_messages{{group=\"{group}\",topic=\"{}\",partition=\"{partition}\"}}",
                w.topic
            ),
        )
    };
    wait_for(
        "lag 0 on both partitions",
        Duration::from_secs(30),
        || async {
            let (_, body) = get(&address, "/metrics").await;
            lag(&body, 0) == Some(0.0) && lag(&body, 1) == Some(0.0)
        },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// The probes beside `/metrics`: `/healthz` while the process runs, and
/// `/readyz` following the consumer's database: 503 with the reason while
/// it takes no connections, 200 again once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_the_consumers_database() {
    let w = World::new(1).await;
    let script = Arc::new(Script::default());
    let stop = CancellationToken::new();
    let (config, address) = w.probed_config("probed");
    let (_, task) = w.start(config, &script, &stop);
    wait_for("/readyz 200", Duration::from_secs(30), || async {
        try_get(&address, "/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
    })
    .await;
    assert_eq!(get(&address, "/healthz").await, (200, "ok\n".to_string()));

    // The database refuses connections and drops the consumer's sessions.
    let database: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&w.pool)
        .await
        .unwrap();
    let (server, _) = w.url.rsplit_once('/').unwrap();
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    let refuse = format!("alter database \"{database}\" allow_connections false");
    sqlx::query(&refuse).execute(&mut admin).await.unwrap();
    sqlx::query("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1")
        .bind(&database)
        .execute(&mut admin)
        .await
        .unwrap();
    wait_for("/readyz 503", Duration::from_secs(30), || async {
        let (status, body) = get(&address, "/readyz").await;
        status == 503 && body.starts_with("not ready: the consumer's database")
    })
    .await;
    assert_eq!(get(&address, "/healthz").await.0, 200);

    let allow = format!("alter database \"{database}\" allow_connections true");
    sqlx::query(&allow).execute(&mut admin).await.unwrap();
    wait_for("/readyz 200 again", Duration::from_secs(30), || async {
        get(&address, "/readyz").await.0 == 200
    })
    .await;
    stop_member(&stop, task).await;
}

/// Fires `stop` and waits (a minute at most) for the member to end cleanly.
async fn stop_member(
    stop: &CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ConsumerError>>,
) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the consumer to stop")
        .unwrap()
        .unwrap();
}

/// `/readyz` asks the database on a session of its own: a handler holding
/// the pool's every connection (slow, not failing) leaves the consumer
/// ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_does_not_wait_for_a_connection_a_handler_holds() {
    let w = World::with_pool(1, 1).await;
    let sent = produce(&w.kafka.brokers(), &w.topic, 1, 1, 0).await;
    let script = Arc::new(Script::default());
    *script.hold.lock().unwrap() = Some(sent[0].id);
    let stop = CancellationToken::new();
    let (config, address) = w.probed_config("held");
    let (_, task) = w.start(config, &script, &stop);
    tokio::time::timeout(Duration::from_secs(60), script.entered.notified())
        .await
        .expect("the handler to start");
    // The handler's transaction holds the pool's only connection.
    assert_eq!(w.pool.num_idle(), 0);
    assert_eq!(get(&address, "/readyz").await, (200, "ready\n".to_string()));
    script.release.notify_one();
    wait_for(
        "the held message to be applied",
        Duration::from_secs(30),
        || async { w.effect_count().await == 1 },
    )
    .await;
    stop_member(&stop, task).await;
    assert_once_in_order(&w.effects().await, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_panics_stops_the_consumer_and_the_next_one_misses_nothing() {
    let w = World::new(1).await;
    let sent = produce(&w.kafka.brokers(), &w.topic, 1, 30, 0).await;
    let script = Arc::new(Script::default());
    *script.panic_on.lock().unwrap() = Some(sent[12].id);
    let stop = CancellationToken::new();
    let (_, task) = w.start(w.config("panicky"), &script, &stop);
    let error = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the consumer to stop")
        .unwrap()
        .expect_err("a panicking handler stopped the consumer")
        .to_string();
    assert!(error.contains("panicked on partition"), "{error}");
    // Nothing after the panicking message was applied around it.
    let applied = w.effects().await;
    assert!(
        applied.iter().all(|(_, _, n)| *n < 12),
        "messages after the panic were applied: {applied:?}"
    );
    // Fixed and started again: the rest, once, in order.
    *script.panic_on.lock().unwrap() = None;
    let (_, task) = w.start(w.config("panicky"), &script, &stop);
    wait_for(
        "every message to be applied",
        Duration::from_secs(60),
        || async { w.effect_count().await >= sent.len() as i64 },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_once_in_order(&w.effects().await, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_are_refused_with_one_line() {
    let url = fresh_database().await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let script = Arc::new(Script::default());
    let config = ConsumerConfig::new("g", ["t"]);
    let refused = |result: Result<KafkaConsumer<Effects>, ConsumerError>| match result {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let error = refused(KafkaConsumer::new(
        pool.clone(),
        config.clone(),
        KafkaSettings::new("localhost:9092").set("enable.auto.commit", "true"),
        Effects(script.clone()),
    ));
    assert!(
        error.contains("enable.auto.commit") && error.contains("remove it"),
        "{error}"
    );
    let mut no_topics = config.clone();
    no_topics.topics.clear();
    let error = refused(KafkaConsumer::new(
        pool.clone(),
        no_topics,
        KafkaSettings::new("localhost:9092"),
        Effects(script.clone()),
    ));
    assert!(error.contains("no topic"), "{error}");
    // No migrations ran in this database: the runtime says what to run.
    let consumer = KafkaConsumer::new(
        pool,
        config,
        KafkaSettings::new("localhost:9092"),
        Effects(script),
    )
    .unwrap();
    let error = consumer.run(async {}).await.unwrap_err().to_string();
    assert!(
        error.contains("no table inbox") && error.contains("outbox-relay migrate"),
        "{error}"
    );
    assert_eq!(error.lines().count(), 1, "{error}");
}

/// Runs `outbox-relay consumer-dead-letters ARGS`: (exit code, stdout, stderr).
async fn dead_letters_command(args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        relay_binary()
            .arg("consumer-dead-letters")
            .args(args)
            .output(),
    )
    .await
    .expect("the command exits")
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_dead_letters_command_lists_marks_and_purges_one_group() {
    let url = fresh_database().await;
    let pool = migrated_pool(&url).await;
    let id = Uuid::new_v4();
    for (group, offset) in [("billing", 3_i64), ("billing", 9), ("shipping", 4)] {
        sqlx::query(
            r#"insert into consumer_dead_letter
                   (consumer_group, topic, partition, "offset", message_id, key, headers, payload,
                    error, attempts)
               values ($1, 'orders', 2, $2, $3, 'order-7', '[{"key": "id", "value": "x"}]',
                       '{"total": 12}', 'the order is unknown', 5)"#,
        )
        .bind(group)
        .bind(offset)
        .bind(if offset == 3 { Some(id) } else { None })
        .execute(&pool)
        .await
        .unwrap();
    }
    let row_id = |offset: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                r#"select id from consumer_dead_letter where "offset" = $1"#,
            )
            .bind(offset)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let db = ["--database-url", url.as_str()];

    let (code, out, err) =
        dead_letters_command(&[&["list", "--group", "billing", "--json"][..], &db[..]].concat())
            .await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0]["group"], "billing");
    assert_eq!(rows[0]["message_id"], id.to_string());
    assert_eq!(
        (
            rows[0]["topic"].as_str(),
            rows[0]["partition"].as_i64(),
            rows[0]["offset"].as_i64()
        ),
        (Some("orders"), Some(2), Some(3))
    );
    assert_eq!(rows[0]["key"], "order-7");
    assert_eq!(rows[0]["payload"], "{\"total\": 12}");
    assert_eq!(rows[0]["headers"], json!([{"key": "id", "value": "x"}]));
    assert_eq!(rows[0]["error"], "the order is unknown");

    let first = row_id(3).await.to_string();
    let (code, out, err) = dead_letters_command(
        &[
            &["retry", "--group", "billing", "--id", &first][..],
            &db[..],
        ]
        .concat(),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("marked 1 "), "{out}");
    let marked: Vec<i64> = sqlx::query_scalar(
        r#"select "offset" from consumer_dead_letter where retry_requested_at is not null"#,
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(marked, vec![3]);

    // Neither --id nor --all: one line naming what is missing, exit 2.
    let (code, _, err) =
        dead_letters_command(&[&["purge", "--group", "billing"][..], &db[..]].concat()).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs --id N or --all"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let (code, out, err) =
        dead_letters_command(&[&["purge", "--group", "billing", "--all"][..], &db[..]].concat())
            .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted 2 "), "{out}");
    let left: Vec<String> = sqlx::query_scalar("select consumer_group from consumer_dead_letter")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        left,
        vec!["shipping".to_string()],
        "another group's rows were touched"
    );

    // A database without the table: one line with the fix.
    let bare = fresh_database().await;
    let (code, _, err) = dead_letters_command(&["list", "--database-url", &bare]).await;
    assert_ne!(code, 0);
    assert!(err.contains("outbox-relay migrate"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
