//! The RabbitMQ sink end to end: the relay binary against a throwaway
//! Postgres and a real `rabbitmq-server` node of the test's own, with what
//! goes in compared to what the queue holds.

mod support;

use std::time::Duration;

use support::testkit::TempRabbitMq;
use support::*;

const DEADLINE: Duration = Duration::from_secs(120);

async fn rabbitmq() -> TempRabbitMq {
    TempRabbitMq::start().await.expect("start rabbitmq-server")
}

/// The kill -9 loop under concurrent writers, read back in queue order.
async fn kill_loop(server: &TempRabbitMq, mode: &'static str) {
    let t = SinkWorld::new(mode, rabbitmq_args(&server.url())).await;
    let queue = rabbitmq_queue(&server.url(), &format!("{}.acct", t.prefix)).await;
    let (pool, url) = (&t.pool, server.url());
    let queue = &queue;
    kill_loop_against(&t, |committed| async move {
        read_rabbitmq_and_drain(pool, &url, queue, &committed, DEADLINE).await
    })
    .await;
}

/// Both modes on one node: a RabbitMQ node takes seconds to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_a_loop_loses_nothing_and_keeps_order_in_both_modes() {
    let server = rabbitmq().await;
    kill_loop(&server, "poll").await;
    kill_loop(&server, "tail").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_then_restarted_broker_loses_nothing_and_readiness_follows() {
    let mut server = rabbitmq().await;
    let t = SinkWorld::new("poll", rabbitmq_args(&server.url())).await;
    let queue = rabbitmq_queue(&server.url(), &format!("{}.acct", t.prefix)).await;
    let pool = &t.pool;
    create_aggregates(pool, 20).await;
    let batch = 50;
    let (mut relay, log) = t.relay(&[
        "--batch-size",
        &batch.to_string(),
        "--sink-config",
        "confirm_timeout=2s",
    ]);
    let address = endpoint_address(&log, DEADLINE).await;
    let mut written = write(pool, 100, 20, 0.1).await;
    wait_until_drained(pool, DEADLINE).await;

    server.freeze();
    let during = write(pool, 100, 20, 0.1).await;
    wait_for("/readyz to say 503", DEADLINE, || async {
        let (status, body) = get(&address, "/readyz").await;
        status == 503 && body.contains("RabbitMQ")
    })
    .await;
    assert!(
        outbox_count(pool).await > 0,
        "rows left the outbox while the broker was frozen"
    );
    written.append(during);
    server.thaw();
    wait_for("/readyz to say 200 again", DEADLINE, || async {
        get(&address, "/readyz").await.0 == 200
    })
    .await;

    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move { write(&pool, 200, 20, 0.1).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill();
    server.start_again().await.expect("restart rabbitmq-server");
    written.append(writer.await.unwrap());

    let records =
        read_rabbitmq_and_drain(pool, &server.url(), &queue, &written.committed, DEADLINE).await;
    wait_for("/readyz to say 200 after the restart", DEADLINE, || async {
        get(&address, "/readyz").await.0 == 200
    })
    .await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mapping_and_poison_unroutable_missing_exchange_and_too_large() {
    let server = rabbitmq().await;
    let t = SinkWorld::new("poll", rabbitmq_args(&server.url())).await;
    let queue = rabbitmq_queue(&server.url(), &format!("{}.order", t.prefix)).await;
    // An exchange with no queue bound: what goes there is unroutable.
    let (connection, channel) = rabbitmq_channel(&server.url()).await;
    channel
        .exchange_declare(
            format!("{}.unbound", t.prefix).as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "declared".into()).await;

    let plain = Event::new("order", "o-1", "created", serde_json::json!({"n": 1})).with_header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let unroutable = Event::new("order", "o-2", "created", serde_json::json!({"n": 2}))
        .with_topic(format!("{}.unbound", t.prefix));
    let missing = Event::new("order", "o-3", "created", serde_json::json!({"n": 3}))
        .with_topic(format!("{}.missing", t.prefix));
    let too_large = Event::new(
        "order",
        "o-4",
        "created",
        serde_json::json!({"blob": "x".repeat(4096)}),
    );
    let after = Event::new("order", "o-5", "paid", serde_json::json!({"n": 5}));
    let mut tx = t.pool.begin().await.unwrap();
    outbox::insert_all(
        &mut tx,
        &[
            plain.clone(),
            unroutable.clone(),
            missing.clone(),
            too_large.clone(),
            after.clone(),
        ],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let (mut relay, _log) = t.relay(&["--sink-config", "max_message_size=1024"]);
    let records = read_rabbitmq_and_drain(
        &t.pool,
        &server.url(),
        &queue,
        &[plain.id, after.id],
        DEADLINE,
    )
    .await;
    relay.kill().await.unwrap();

    let ids: Vec<uuid::Uuid> = records.iter().map(Consumed::id).collect();
    assert_eq!(ids, [plain.id, after.id]);
    let first = &records[0];
    assert_eq!(first.key.as_deref(), Some("o-1"));
    let payload: serde_json::Value =
        serde_json::from_slice(first.value.as_deref().unwrap()).unwrap();
    assert_eq!(Some(&payload), plain.payload.as_ref());
    let header = |name: &str| {
        first
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };
    assert_eq!(header("event_type").as_deref(), Some("created"));
    assert_eq!(header("aggregate_type").as_deref(), Some("order"));
    assert_eq!(
        header("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );

    let dead: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("select id, error from dead_letter order by seq")
            .fetch_all(&t.pool)
            .await
            .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert_eq!(dead[0].0, unroutable.id);
    assert!(dead[0].1.contains("unroutable"), "{}", dead[0].1);
    assert_eq!(dead[1].0, missing.id);
    assert!(dead[1].1.contains("no exchange"), "{}", dead[1].1);
    assert_eq!(dead[2].0, too_large.id);
    assert!(dead[2].1.contains("max_message_size"), "{}", dead[2].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn properties_and_the_inbox_id_read_back_with_the_brokers_client() {
    let server = rabbitmq().await;
    let t = SinkWorld::new("poll", rabbitmq_args(&server.url())).await;
    let queue = rabbitmq_queue(&server.url(), &format!("{}.order", t.prefix)).await;
    let event = Event::new("order", "o-1", "created", serde_json::json!({"n": 1}));
    let mut tx = t.pool.begin().await.unwrap();
    outbox::insert_all(&mut tx, std::slice::from_ref(&event))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (mut relay, _log) = t.relay(&[]);
    let (connection, channel) = rabbitmq_channel(&server.url()).await;
    let until = std::time::Instant::now() + DEADLINE;
    let delivery = loop {
        let got = channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        if let Some(message) = got {
            break message.delivery;
        }
        assert!(
            std::time::Instant::now() < until,
            "the message never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    relay.kill().await.unwrap();
    let _ = connection.close(200, "read".into()).await;
    let properties = &delivery.properties;
    assert_eq!(
        outbox_relay::inbox::rabbitmq_message_id(properties).unwrap(),
        event.id
    );
    assert_eq!(properties.kind().as_ref().unwrap().as_str(), "created");
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(
        properties.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(delivery.exchange.as_str(), format!("{}.order", t.prefix));
    assert_eq!(delivery.routing_key.as_str(), "o-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_url_wrong_password_and_no_broker() {
    let url = fresh_database().await;
    let output = relay_binary()
        .args(["run", "--database-url", &url, "--sink", "rabbitmq"])
        .args(["--sink-url", "nats://relay:hunter2@rabbit"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("\"amqp\" or \"amqps\""), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let server = rabbitmq().await;
    let wrong = server.url().replace("guest:guest@", "guest:hunter2@");
    let t = SinkWorld::new("poll", rabbitmq_args(&wrong)).await;
    let (mut relay, log) = t.relay(&[]);
    let line = log
        .wait_for_line("cannot publish to RabbitMQ", DEADLINE)
        .await;
    assert!(line.contains("guest:***@"), "{line}");
    assert!(
        line.to_lowercase().contains("access")
            || line.contains("ACCESS_REFUSED")
            || line.contains("auth"),
        "{line}"
    );
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay keeps retrying"
    );
    relay.kill().await.unwrap();
    assert!(!log.text().contains("hunter2"), "{}", log.text());

    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = nobody.local_addr().unwrap().port();
    drop(nobody);
    let t = SinkWorld::new(
        "poll",
        rabbitmq_args(&format!("amqp://127.0.0.1:{closed}/%2f")),
    )
    .await;
    let (mut relay, log) = t.relay(&[]);
    let line = log
        .wait_for_line("cannot publish to RabbitMQ", DEADLINE)
        .await;
    assert!(line.contains("retrying with backoff"), "{line}");
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay keeps retrying"
    );
    relay.kill().await.unwrap();
}

/// `amqps://` with `tls_ca_file`: every row delivered through the node's TLS
/// listener; a relay that trusts another CA publishes nothing and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_the_servers_ca_delivers_and_another_ca_is_refused() {
    let (dir, other) = certificates_and_another_ca("outbox-relay rabbitmq test CA");
    let (server, tls_port) = TempRabbitMq::start_with_tls(
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
    )
    .await
    .expect("start rabbitmq-server with TLS");
    let tls_url = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let t = SinkWorld::new("poll", rabbitmq_args(&tls_url)).await;
    let queue = rabbitmq_queue(&server.url(), &format!("{}.acct", t.prefix)).await;
    create_aggregates(&t.pool, 5).await;
    let written = write(&t.pool, 50, 5, 0.0).await;
    let ca = dir.path().join("ca.pem");
    let (mut relay, log) = t.relay(&["--sink-config", &format!("tls_ca_file={}", ca.display())]);
    let records =
        read_rabbitmq_and_drain(&t.pool, &server.url(), &queue, &written.committed, DEADLINE).await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert!(!log.text().contains("guest:guest"), "{}", log.text());

    let line = another_ca_publishes_nothing(
        &t,
        &other.path().join("ca.pem"),
        "cannot publish to RabbitMQ",
        DEADLINE,
    )
    .await;
    assert!(line.contains("guest:***@"), "{line}");
}

/// `--format cloudevents-binary|cloudevents-structured`, read back by pika
/// and the CloudEvents Python SDK's RabbitMQ binding (`ce-` headers and the
/// `content_type` property, or one JSON event in the body).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_are_cloudevents_the_sdk_reads_in_both_modes() {
    let server = rabbitmq().await;
    for mode in ["cloudevents-binary", "cloudevents-structured"] {
        let t = SinkWorld::new("poll", rabbitmq_args(&server.url())).await;
        let queue = rabbitmq_queue(&server.url(), &format!("{}.acct", t.prefix)).await;
        let expected = insert_cloudevents_rows(&t.pool).await;
        let (mut relay, _log) = t.relay(&["--format", mode, "--cloudevents-source", CE_SOURCE]);
        wait_until_drained(&t.pool, DEADLINE).await;
        relay.kill().await.unwrap();
        let count = expected.len().to_string();
        let url = server.url();
        let events = read_cloudevents_with_python(&[
            "rabbitmq", "--url", &url, "--queue", &queue, "--count", &count,
        ])
        .await;
        assert_cloudevents(&events, &expected, mode);
        assert!(
            events.iter().any(|e| e["key"] == "tenant-1"),
            "{mode}: routing keys: {events:?}"
        );
    }
}
