//! The NATS JetStream sink end to end: the relay binary against a throwaway
//! Postgres and a real `nats-server` (with JetStream) of the test's own,
//! with what goes in compared to what the stream holds.

mod support;

use std::time::Duration;

use support::testkit::TempNats;
use support::*;

const DEADLINE: Duration = Duration::from_secs(90);

async fn nats() -> TempNats {
    TempNats::start().await.expect("start nats-server")
}

/// The kill -9 loop under concurrent writers, read back in stream order.
async fn kill_loop(mode: &'static str) {
    let server = nats().await;
    let t = SinkWorld::new(mode, nats_args(&server.url())).await;
    let stream = nats_stream(&server.url(), &t.prefix).await;
    let (pool, url) = (&t.pool, server.url());
    let stream = &stream;
    kill_loop_against(&t, |committed| async move {
        read_nats_and_drain(pool, &url, stream, &committed, DEADLINE).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_kill_9_in_a_loop_loses_nothing_and_keeps_order() {
    kill_loop("poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_kill_9_in_a_loop_loses_nothing_and_keeps_order() {
    kill_loop("tail").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_then_restarted_server_loses_nothing_and_readiness_follows() {
    let mut server = nats().await;
    let t = SinkWorld::new("poll", nats_args(&server.url())).await;
    let stream = nats_stream(&server.url(), &t.prefix).await;
    let pool = &t.pool;
    create_aggregates(pool, 20).await;
    let batch = 50;
    let (mut relay, log) = t.relay(&[
        "--batch-size",
        &batch.to_string(),
        "--sink-config",
        "ack_timeout=2s",
    ]);
    let address = endpoint_address(&log, DEADLINE).await;
    let mut written = write(pool, 100, 20, 0.1).await;
    wait_until_drained(pool, DEADLINE).await;

    // Frozen: the process holds its sockets and answers nothing.
    server.freeze();
    let during = write(pool, 100, 20, 0.1).await;
    wait_for("/readyz to say 503", DEADLINE, || async {
        let (status, body) = get(&address, "/readyz").await;
        status == 503 && body.contains("NATS")
    })
    .await;
    let left = outbox_count(pool).await;
    assert!(left > 0, "rows left the outbox while the server was frozen");
    written.append(during);
    server.thaw();
    wait_for("/readyz to say 200 again", DEADLINE, || async {
        get(&address, "/readyz").await.0 == 200
    })
    .await;

    // Killed and started again on the same store, under load.
    let writer = {
        let pool = pool.clone();
        tokio::spawn(async move { write(&pool, 200, 20, 0.1).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.start_again().await.expect("restart nats-server");
    written.append(writer.await.unwrap());

    let records =
        read_nats_and_drain(pool, &server.url(), &stream, &written.committed, DEADLINE).await;
    wait_for("/readyz to say 200 after the restart", DEADLINE, || async {
        get(&address, "/readyz").await.0 == 200
    })
    .await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}

/// Every stored message of `stream`, in order, as JetStream holds it.
async fn stored(
    url: &str,
    stream: &str,
    count: usize,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let client = async_nats::connect(url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut handle = jetstream.get_stream(stream).await.unwrap();
    wait_for("the stream to hold every message", DEADLINE, || {
        let mut handle = handle.clone();
        async move { handle.info().await.unwrap().state.messages as usize >= count }
    })
    .await;
    let last = handle.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        out.push(handle.get_raw_message(seq).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_follow_the_documented_mapping() {
    let server = nats().await;
    let t = SinkWorld::new("poll", nats_args(&server.url())).await;
    let stream = nats_stream(&server.url(), &t.prefix).await;
    let plain = Event::new("order", "o-1", "created", serde_json::json!({"n": 1}))
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("id", "not the id");
    let dotted = Event::new("order", "eu.o 2*", "paid", serde_json::json!({"n": 2}));
    let routed = Event::new("order", "o-3", "shipped", serde_json::json!({"n": 3}))
        .with_topic(format!("{}.explicit", t.prefix));
    let mut tx = t.pool.begin().await.unwrap();
    outbox::insert_all(&mut tx, &[plain.clone(), dotted.clone(), routed.clone()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (mut relay, _log) = t.relay(&[]);
    let messages = stored(&server.url(), &stream, 3).await;
    relay.kill().await.unwrap();

    assert_eq!(messages.len(), 3);
    let subjects: Vec<String> = messages.iter().map(|m| m.subject.to_string()).collect();
    assert_eq!(
        subjects,
        [
            format!("{}.order.o-1", t.prefix),
            format!("{}.order.eu%2Eo%202%2A", t.prefix),
            format!("{}.explicit", t.prefix),
        ]
    );
    for (message, event) in messages.iter().zip([&plain, &dotted, &routed]) {
        let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        let id = event.id.to_string();
        assert_eq!(header("Nats-Msg-Id").as_deref(), Some(id.as_str()));
        assert_eq!(header("id").as_deref(), Some(id.as_str()));
        assert_eq!(
            header("event_type").as_deref(),
            Some(event.event_type.as_str())
        );
        assert_eq!(header("aggregate_type").as_deref(), Some("order"));
        assert_eq!(
            header("aggregate_id").as_deref(),
            Some(event.aggregate_id.as_str())
        );
        let payload: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(Some(&payload), event.payload.as_ref());
        // The inbox finds the id where the relay put it.
        assert_eq!(
            outbox_relay::inbox::nats_message_id(Some(&message.headers)).unwrap(),
            event.id
        );
    }
    assert_eq!(
        messages[0].headers.get("traceparent").map(|v| v.as_str()),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_stream_and_too_large_are_dead_lettered_and_the_rest_flow() {
    let server = nats().await;
    let t = SinkWorld::new("poll", nats_args(&server.url())).await;
    let stream = nats_stream(&server.url(), &t.prefix).await;
    let before = Event::new("order", "o-1", "created", serde_json::json!({"n": 1}));
    let no_stream = Event::new("order", "o-2", "created", serde_json::json!({"n": 2}))
        .with_topic(format!("elsewhere.{}", t.prefix));
    // nats-server's default max_payload is 1 MB.
    let too_large = Event::new(
        "order",
        "o-3",
        "created",
        serde_json::json!({"blob": "x".repeat(2 * 1024 * 1024)}),
    );
    let after = Event::new("order", "o-4", "created", serde_json::json!({"n": 4}));
    let mut tx = t.pool.begin().await.unwrap();
    outbox::insert_all(
        &mut tx,
        &[
            before.clone(),
            no_stream.clone(),
            too_large.clone(),
            after.clone(),
        ],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let (mut relay, _log) = t.relay(&[]);
    let messages = stored(&server.url(), &stream, 2).await;
    wait_until_drained(&t.pool, DEADLINE).await;
    relay.kill().await.unwrap();

    let ids: Vec<String> = messages
        .iter()
        .map(|m| m.headers.get("id").unwrap().as_str().to_owned())
        .collect();
    assert_eq!(ids, [before.id.to_string(), after.id.to_string()]);
    let dead: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("select id, error from dead_letter order by seq")
            .fetch_all(&t.pool)
            .await
            .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, no_stream.id);
    assert!(
        dead[0].1.contains("no JetStream stream takes subject"),
        "{}",
        dead[0].1
    );
    assert_eq!(dead[1].0, too_large.id);
    assert!(dead[1].1.contains("payload"), "{}", dead[1].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_urls_are_one_line_and_exit_2() {
    let url = fresh_database().await;
    for (sink_url, says) in [
        ("http://relay:hunter2@nats:4222", "the scheme is \"http\""),
        ("", "--sink-url (OUTBOX_SINK_URL) is missing or empty"),
        ("nats://relay:hunter2@", "host"),
    ] {
        let (code, stderr) = run(&[
            "run",
            "--database-url",
            &url,
            "--sink",
            "nats",
            "--sink-url",
            sink_url,
        ])
        .await;
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    let (code, stderr) = run(&[
        "run",
        "--database-url",
        &url,
        "--sink",
        "nats",
        "--brokers",
        "k:9092",
    ])
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--brokers and --kafka-config"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_or_no_server_is_said_once_and_retried() {
    let server = TempNats::start_with_auth("relay", "right-secret")
        .await
        .expect("start nats-server");
    let port = server.port();
    let wrong = format!("nats://relay:hunter2@127.0.0.1:{port}");
    let t = SinkWorld::new("poll", nats_args(&wrong)).await;
    let (mut relay, log) = t.relay(&[]);
    let line = log
        .wait_for_line("cannot publish to NATS JetStream", DEADLINE)
        .await;
    assert!(line.contains("authorization"), "{line}");
    assert!(line.contains("relay:***@"), "{line}");
    let address = endpoint_address(&log, DEADLINE).await;
    let (status, body) = get(&address, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay keeps retrying"
    );
    relay.kill().await.unwrap();
    assert!(!log.text().contains("hunter2"), "{}", log.text());

    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = nobody.local_addr().unwrap().port();
    drop(nobody);
    let t = SinkWorld::new("poll", nats_args(&format!("nats://127.0.0.1:{closed}"))).await;
    let (mut relay, log) = t.relay(&[]);
    let line = log
        .wait_for_line("cannot publish to NATS JetStream", DEADLINE)
        .await;
    assert!(line.contains("retrying with backoff"), "{line}");
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay keeps retrying"
    );
    relay.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_the_servers_ca_delivers_and_another_ca_is_refused() {
    let (dir, other) = certificates_and_another_ca("outbox-relay nats test CA");
    let server = TempNats::start_with_tls(
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
    )
    .await
    .expect("start nats-server with TLS");
    let url = format!("tls://127.0.0.1:{}", server.port());
    let ca = dir.path().join("ca.pem");
    // This process's own TLS client, as the relay does.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let t = SinkWorld::new("poll", nats_args(&url)).await;
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.clone())
        .require_tls(true)
        .connect(url.as_str())
        .await
        .unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let stream = jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: t.prefix.replace('.', "_"),
            subjects: vec![format!("{}.>", t.prefix)],
            ..Default::default()
        })
        .await
        .unwrap();
    create_aggregates(&t.pool, 5).await;
    let written = write(&t.pool, 50, 5, 0.0).await;
    let (mut relay, log) = t.relay(&["--sink-config", &format!("tls_ca_file={}", ca.display())]);
    wait_until_drained(&t.pool, DEADLINE).await;
    relay.kill().await.unwrap();
    let stored = stream.get_info().await.unwrap().state.messages;
    assert_eq!(stored as usize, written.committed.len(), "{}", log.text());

    another_ca_publishes_nothing(
        &t,
        &other.path().join("ca.pem"),
        "cannot publish to NATS JetStream",
        DEADLINE,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lanes_publish_through_a_connection_each_and_keep_order() {
    let server = nats().await;
    let t = SinkWorld::new("poll", nats_args(&server.url())).await;
    let stream = nats_stream(&server.url(), &t.prefix).await;
    create_aggregates(&t.pool, 20).await;
    let (mut relay, log) = t.relay(&["--shards", "3", "--batch-size", "50"]);
    let written = write(&t.pool, 300, 20, 0.1).await;
    let records = read_nats_and_drain(
        &t.pool,
        &server.url(),
        &stream,
        &written.committed,
        DEADLINE,
    )
    .await;
    relay.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_eq!(assert_order(&records), 0, "no duplicates without a fault");
    assert!(!log.text().contains("ERROR"), "{}", log.text());
}

/// `--format cloudevents-binary|cloudevents-structured` on NATS: `ce-`
/// headers and `content-type` (binary), or one JSON event with content type
/// `application/cloudevents+json` (structured), read from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_are_cloudevents_in_both_modes() {
    let server = nats().await;
    for mode in ["cloudevents-binary", "cloudevents-structured"] {
        let t = SinkWorld::new("poll", nats_args(&server.url())).await;
        let stream = nats_stream(&server.url(), &t.prefix).await;
        let expected = insert_cloudevents_rows(&t.pool).await;
        let (mut relay, _log) = t.relay(&["--format", mode, "--cloudevents-source", CE_SOURCE]);
        wait_until_drained(&t.pool, DEADLINE).await;
        relay.kill().await.unwrap();
        let records = read_nats_until(&server.url(), &stream, DEADLINE, |r| {
            r.len() >= expected.len()
        })
        .await;
        let events: Vec<serde_json::Value> = records
            .iter()
            .map(|record| {
                let header = |name: &str| {
                    record
                        .headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(name))
                        .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                };
                let value: serde_json::Value =
                    serde_json::from_slice(record.value.as_deref().unwrap_or(b"null")).unwrap();
                let (attributes, data) = if mode == "cloudevents-binary" {
                    let mut attributes: serde_json::Map<String, serde_json::Value> = record
                        .headers
                        .iter()
                        .filter_map(|(k, v)| {
                            let name = k.strip_prefix("ce-")?;
                            Some((
                                name.to_owned(),
                                String::from_utf8(v.clone()).unwrap().into(),
                            ))
                        })
                        .collect();
                    if let Some(content_type) = header("content-type") {
                        attributes.insert("datacontenttype".into(), content_type.into());
                    }
                    (serde_json::Value::Object(attributes), value)
                } else {
                    assert_eq!(
                        header("content-type").as_deref(),
                        Some("application/cloudevents+json; charset=UTF-8")
                    );
                    let mut event = value;
                    let data = event
                        .as_object_mut()
                        .unwrap()
                        .remove("data")
                        .unwrap_or_default();
                    (event, data)
                };
                serde_json::json!({
                    "id_header": header("id"),
                    "attributes": attributes,
                    "data": data,
                })
            })
            .collect();
        assert_cloudevents(&events, &expected, mode);
    }
}
