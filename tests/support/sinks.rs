//! One test's world for the NATS and RabbitMQ sinks: a database of its own,
//! the relay binary pointed at a broker with `--sink`, and readers that turn
//! what the broker holds into [`Consumed`] records, so the same checks
//! (ids, order per aggregate, duplicates) apply to every broker.

use super::*;

/// A database, a broker's flags and the relay's mode.
pub struct SinkWorld {
    pub url: String,
    pub pool: PgPool,
    pub prefix: String,
    pub mode: &'static str,
    pub slot: String,
    /// `--sink ... --sink-url ... --topic-template ...`
    pub sink_args: Vec<String>,
}

impl SinkWorld {
    /// A world in the binary's shared cluster; `sink_args(prefix)` gives the
    /// broker's flags for the world's name prefix.
    pub async fn new(mode: &'static str, sink_args: impl FnOnce(&str) -> Vec<String>) -> Self {
        let url = fresh_database().await;
        let pool = migrated_pool(&url).await;
        let prefix = topic_prefix();
        SinkWorld {
            url,
            pool,
            slot: format!("slot_{prefix}"),
            sink_args: sink_args(&prefix),
            prefix,
            mode,
        }
    }

    /// The relay command for this world.
    pub fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = relay_binary();
        cmd.args(["run", "--mode", self.mode, "--database-url", &self.url])
            .args(["--slot", &self.slot])
            .args(&self.sink_args)
            .args(extra)
            .env(
                "OUTBOX_LOG",
                std::env::var("OUTBOX_TEST_RELAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .kill_on_drop(true);
        cmd
    }

    /// Starts the relay; its log is collected.
    pub fn relay(&self, extra: &[&str]) -> (Child, RelayLog) {
        spawn_logged(self.command(extra))
    }
}

/// The NATS flags of a world: per-aggregate subjects under the prefix.
pub fn nats_args(url: &str) -> impl FnOnce(&str) -> Vec<String> {
    let url = url.to_owned();
    move |prefix| {
        vec![
            "--sink".into(),
            "nats".into(),
            "--sink-url".into(),
            url,
            "--topic-template".into(),
            format!("{prefix}.{{aggregate_type}}.{{aggregate_id}}"),
        ]
    }
}

/// Creates a file-backed stream taking every subject under `prefix`.
pub async fn nats_stream(url: &str, prefix: &str) -> String {
    let name = prefix.replace('.', "_");
    testkit::nats::create_stream(url, &name, &[format!("{prefix}.>")])
        .await
        .unwrap();
    name
}

/// One stored JetStream message as a record: the stream is the topic, its
/// sequence the offset, the `aggregate_id` header the key.
fn nats_record(stream: &str, message: async_nats::jetstream::message::StreamMessage) -> Consumed {
    let headers: Vec<(String, Vec<u8>)> = message
        .headers
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), v.as_str().as_bytes().to_vec()))
        })
        .collect();
    let key = headers
        .iter()
        .find(|(k, _)| k == "aggregate_id")
        .map(|(_, v)| String::from_utf8(v.clone()).unwrap());
    Consumed {
        topic: stream.to_owned(),
        partition: 0,
        offset: message.sequence as i64,
        key,
        value: Some(message.payload.to_vec()),
        headers,
    }
}

/// Reads `stream` from its first message, in stream order, until `done`
/// holds or `deadline` passes (then returns what it has).
pub async fn read_nats_until(
    url: &str,
    stream: &str,
    deadline: Duration,
    done: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let client = async_nats::connect(url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut handle = jetstream.get_stream(stream).await.unwrap();
    let until = Instant::now() + deadline;
    let mut out = Vec::new();
    let mut next = 1;
    while !done(&out) && Instant::now() < until {
        let last = match handle.info().await {
            Ok(info) => info.state.last_sequence,
            Err(_) => 0,
        };
        while next <= last {
            match handle.get_raw_message(next).await {
                Ok(message) => out.push(nats_record(stream, message)),
                Err(e) => eprintln!("reading {stream} #{next}: {e}"),
            }
            next += 1;
        }
        if !done(&out) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

/// Reads until every id in `expected` was seen, then waits for the outbox
/// to drain; returns what was read.
pub async fn read_nats_and_drain(
    pool: &PgPool,
    url: &str,
    stream: &str,
    expected: &[Uuid],
    deadline: Duration,
) -> Vec<Consumed> {
    let records = read_nats_until(url, stream, deadline, saw_all(expected)).await;
    wait_until_drained(pool, deadline).await;
    records
}

/// Whether the records read so far hold every id in `expected`.
fn saw_all(expected: &[Uuid]) -> impl Fn(&[Consumed]) -> bool {
    let expected: HashSet<Uuid> = expected.iter().copied().collect();
    move |records| {
        let seen: HashSet<Uuid> = records.iter().map(Consumed::id).collect();
        expected.is_subset(&seen)
    }
}

/// With more rows written, a relay that trusts only the CA in `ca` (not the
/// one that signed the broker's certificate) publishes nothing and warns in
/// a line containing `warning` that names the certificate or TLS; returns
/// that line.
pub async fn another_ca_publishes_nothing(
    t: &SinkWorld,
    ca: &std::path::Path,
    warning: &str,
    deadline: Duration,
) -> String {
    write(&t.pool, 10, 5, 0.0).await;
    let (mut relay, log) = t.relay(&["--sink-config", &format!("tls_ca_file={}", ca.display())]);
    let line = log.wait_for_line(warning, deadline).await;
    assert!(
        line.to_lowercase().contains("certificate") || line.to_lowercase().contains("tls"),
        "{line}"
    );
    relay.kill().await.unwrap();
    assert!(
        outbox_count(&t.pool).await > 0,
        "nothing may leave without a trusted server"
    );
    line
}

/// The RabbitMQ flags of a world: exchange `PREFIX.AGGREGATE_TYPE`.
pub fn rabbitmq_args(url: &str) -> impl FnOnce(&str) -> Vec<String> {
    let url = url.to_owned();
    move |prefix| {
        vec![
            "--sink".into(),
            "rabbitmq".into(),
            "--sink-url".into(),
            url,
            "--topic-template".into(),
            format!("{prefix}.{{aggregate_type}}"),
        ]
    }
}

/// A channel on the broker at `url`, for the test's own declarations.
pub async fn rabbitmq_channel(url: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Declares a durable topic exchange `exchange` and a durable queue bound to
/// it for every routing key; returns the queue's name.
pub async fn rabbitmq_queue(url: &str, exchange: &str) -> String {
    let queue = format!("{exchange}.all");
    testkit::rabbitmq::declare_topic_queue(url, exchange, &queue, false)
        .await
        .unwrap();
    queue
}

/// One delivery as a record: the queue is the topic, the delivery's place
/// in the queue the offset, the routing key the key, the AMQP headers the
/// headers.
pub fn rabbitmq_record(queue: &str, offset: i64, delivery: &lapin::message::Delivery) -> Consumed {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .map(|(name, value)| {
                    let bytes = match value {
                        lapin::types::AMQPValue::LongString(s) => s.as_bytes().to_vec(),
                        other => format!("{other:?}").into_bytes(),
                    };
                    (name.to_string(), bytes)
                })
                .collect()
        })
        .unwrap_or_default();
    Consumed {
        topic: queue.to_owned(),
        partition: 0,
        offset,
        key: Some(delivery.routing_key.to_string()),
        value: Some(delivery.data.clone()),
        headers,
    }
}

/// Takes messages off `queue` in order until `done` holds or `deadline`
/// passes. `taken` carries on from an earlier call (the broker removes what
/// it delivered).
pub async fn read_rabbitmq_until(
    url: &str,
    queue: &str,
    taken: &mut Vec<Consumed>,
    deadline: Duration,
    done: impl Fn(&[Consumed]) -> bool,
) {
    use lapin::options::BasicGetOptions;
    let (connection, channel) = rabbitmq_channel(url).await;
    let until = Instant::now() + deadline;
    while !done(taken) && Instant::now() < until {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        match got {
            Some(message) => {
                let offset = taken.len() as i64;
                taken.push(rabbitmq_record(queue, offset, &message.delivery));
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = connection.close(200, "read".into()).await;
}

/// Reads until every id in `expected` was seen, then waits for the outbox
/// to drain; returns what was read.
pub async fn read_rabbitmq_and_drain(
    pool: &PgPool,
    url: &str,
    queue: &str,
    expected: &[Uuid],
    deadline: Duration,
) -> Vec<Consumed> {
    let mut records = Vec::new();
    read_rabbitmq_until(url, queue, &mut records, deadline, saw_all(expected)).await;
    wait_until_drained(pool, deadline).await;
    records
}

/// The kill -9 loop under concurrent writers: four writers commit while
/// the relay (`--batch-size batch`) is started and SIGKILLed at random
/// moments, at least eight times; then one relay runs until `read` (given
/// the committed ids) has them all. Checks no loss, order per aggregate,
/// and duplicates within one batch per kill.
pub async fn kill_loop_against<F, Fut>(t: &SinkWorld, read: F)
where
    F: FnOnce(Vec<Uuid>) -> Fut,
    Fut: std::future::Future<Output = Vec<Consumed>>,
{
    let batch = 50;
    create_aggregates(&t.pool, 20).await;
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let pool = t.pool.clone();
            tokio::spawn(async move { write(&pool, 200, 20, 0.1).await })
        })
        .collect();
    let mut kills = 0;
    while kills < 8 || writers.iter().any(|w| !w.is_finished()) {
        let (mut relay, _log) = t.relay(&["--batch-size", &batch.to_string()]);
        let pause = rand::rng().random_range(150..700);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        relay.kill().await.unwrap(); // SIGKILL
        kills += 1;
    }
    let mut written = Written::default();
    for w in writers {
        written.append(w.await.unwrap());
    }
    let (mut relay, _log) = t.relay(&["--batch-size", &batch.to_string()]);
    let records = read(written.committed.clone()).await;
    relay.kill().await.unwrap();

    assert_delivered(&records, &written);
    let duplicates = assert_order(&records);
    assert!(
        duplicates <= kills * batch,
        "{duplicates} duplicates after {kills} kills exceed one batch ({batch}) per kill"
    );
}
