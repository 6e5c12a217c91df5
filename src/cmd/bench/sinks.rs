//! Drains to NATS JetStream and RabbitMQ, each beside a plain publisher of
//! the same client with the relay's settings and the same window of
//! messages in flight (the relay's batch), on the same records: the sink's
//! ceiling, measured in the same run against the same throwaway server.

use super::*;

use outbox_relay::config::{NatsConfig, RabbitMqConfig, SinkKind};

use crate::testkit::rabbitmq::QueueType;

/// One mode's drain to one broker.
#[derive(Debug, Clone, Serialize)]
pub struct SinkDrain {
    pub sink: String,
    pub mode: String,
    pub rows: u64,
    pub rows_per_sec: f64,
    /// The plain publisher's rate for (up to 200,000 of) the same records.
    pub publisher_rows_per_sec: f64,
    pub ratio_to_publisher: f64,
    pub relay_cpu_seconds_per_1k_rows: f64,
    pub relay_peak_rss_mb: f64,
    /// RabbitMQ: the destination queues' type.
    pub queue_type: Option<String>,
}

/// The drain's target against the plain publisher, and in rows per second.
const SINK_RATIO_TARGET: f64 = 0.7;
const SINK_RATE_TARGET: f64 = 20_000.0;

/// A throwaway server of one broker, for the whole bench.
enum Server {
    Nats(crate::testkit::TempNats),
    RabbitMq(crate::testkit::TempRabbitMq),
}

impl Server {
    async fn start(kind: SinkKind) -> Result<Self, Error> {
        Ok(match kind {
            SinkKind::Nats => Server::Nats(crate::testkit::TempNats::start().await?),
            _ => Server::RabbitMq(crate::testkit::TempRabbitMq::start().await?),
        })
    }

    fn url(&self) -> String {
        match self {
            Server::Nats(server) => server.url(),
            Server::RabbitMq(server) => server.url(),
        }
    }

    /// Makes `prefix` a destination: a stream for `PREFIX.>` (NATS), or a
    /// durable topic exchange `PREFIX.bench` with a durable queue of
    /// `queue_type` bound for every key (RabbitMQ). Returns the relay's
    /// topic template for it.
    async fn destination(&self, prefix: &str, queue_type: QueueType) -> Result<String, Error> {
        match self {
            Server::Nats(server) => {
                let name = prefix.replace(['.', '-'], "_");
                crate::testkit::nats::create_stream(&server.url(), &name, &[format!("{prefix}.>")])
                    .await?;
                Ok(format!("{prefix}.{{aggregate_type}}.{{aggregate_id}}"))
            }
            Server::RabbitMq(server) => {
                let exchange = format!("{prefix}.bench");
                crate::testkit::rabbitmq::declare_topic_queue_of(
                    queue_type,
                    &server.url(),
                    &exchange,
                    &exchange,
                    false,
                )
                .await?;
                Ok(format!("{prefix}.{{aggregate_type}}"))
            }
        }
    }

    /// Empties what [`Server::destination`] made for `prefix` once a
    /// measure is done (RabbitMQ), so that each one starts on empty
    /// queues, as a relay's destination with consumers stays: a quorum
    /// queue keeps its messages in memory and slows as it fills with
    /// messages nobody reads. A RabbitMQ stream (which cannot be purged)
    /// and a JetStream file stream append at the same cost however long
    /// they are, and are left as they are.
    fn empty(&self, prefix: &str, queue_type: QueueType) -> Result<(), Error> {
        match self {
            Server::Nats(_) => Ok(()),
            Server::RabbitMq(_) if queue_type == QueueType::Stream => Ok(()),
            Server::RabbitMq(server) => server
                .ctl(&["purge_queue", &format!("{prefix}.bench")])
                .map(drop),
        }
    }
}

/// For each broker in `options.sinks` other than Kafka, and each mode: the
/// plain publisher, then the relay's drain of the same backlog.
pub(super) async fn sinks(
    pg: &TempPostgres,
    kafka: &BenchKafka,
    options: &BenchOptions,
    run_id: &str,
    shutdown: &CancellationToken,
) -> Result<Vec<SinkDrain>, Error> {
    let mut runs = Vec::new();
    for &kind in options.sinks.iter().filter(|k| **k != SinkKind::Kafka) {
        let server = Server::start(kind).await?;
        for &mode in &options.modes {
            if shutdown.is_cancelled() {
                return Ok(runs);
            }
            let name = format!("bench_{kind}_{mode}");
            let mut bench = ModeBench::prepare_as(pg, kafka, options, mode, &name, run_id).await?;
            let prefix = format!("b{run_id}-{kind}-{mode}");
            let template = server.destination(&prefix, options.rabbitmq_queue).await?;
            bench.sink_args = Some(vec![
                "--sink".into(),
                kind.to_string(),
                "--sink-url".into(),
                server.url(),
                "--topic-template".into(),
                template,
            ]);
            runs.push(drain(&bench, &server, kind, &prefix, shutdown).await?);
            bench.pool.close().await;
        }
    }
    Ok(runs)
}

async fn drain(
    bench: &ModeBench<'_>,
    server: &Server,
    kind: SinkKind,
    prefix: &str,
    shutdown: &CancellationToken,
) -> Result<SinkDrain, Error> {
    let options = bench.options;
    if bench.mode == Mode::Tail {
        let mut relay = bench.start_relay("setup")?;
        bench.wait_for_slot(&mut relay).await?;
        relay.stop().await?;
    }
    bench.insert(backlog(options, options.rows)).await?;

    // The plain publisher sends the same records to a destination of its
    // own, so that deduplication by id never favours either.
    let plain = format!("{prefix}-plain");
    let plain_template = server.destination(&plain, options.rabbitmq_queue).await?;
    let records = records(bench, &plain_template).await?;
    let publisher_rate = match server {
        Server::Nats(_) => {
            let config = NatsConfig::parse(&server.url(), &[])?;
            publish_nats(&config, &records, options.batch_size as usize).await?
        }
        Server::RabbitMq(_) => {
            let config = RabbitMqConfig::parse(&server.url(), &[])?;
            publish_rabbitmq(&config, &records, options.batch_size as usize).await?
        }
    };
    drop(records);
    server.empty(&plain, options.rabbitmq_queue)?;

    let mut relay = bench.start_relay("run")?;
    let started = Instant::now();
    bench.wait_until_drained(&mut relay, shutdown).await?;
    let seconds = started.elapsed().as_secs_f64();
    let usage = relay.usage()?;
    relay.stop().await?;
    server.empty(prefix, options.rabbitmq_queue)?;
    let rows_per_sec = options.rows as f64 / seconds;
    Ok(SinkDrain {
        sink: kind.to_string(),
        mode: bench.mode.to_string(),
        rows: options.rows,
        rows_per_sec,
        publisher_rows_per_sec: publisher_rate,
        ratio_to_publisher: rows_per_sec / publisher_rate,
        relay_cpu_seconds_per_1k_rows: usage.cpu_seconds / options.rows as f64 * 1000.0,
        relay_peak_rss_mb: usage.peak_rss_mb,
        queue_type: (kind == SinkKind::RabbitMq).then(|| options.rabbitmq_queue.to_string()),
    })
}

/// Up to 200,000 of the backlog's rows as the relay maps them, to `template`.
async fn records(bench: &ModeBench<'_>, template: &str) -> Result<Vec<message::Message>, Error> {
    let limit = i64::try_from(bench.options.rows.min(PRODUCER_SAMPLE)).unwrap_or(i64::MAX);
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "select seq, id, aggregate_type, aggregate_id, event_type, topic, \
         payload::text as payload, headers, created_at, partition_key from outbox order by seq limit $1",
    )
    .bind(limit)
    .fetch_all(&bench.pool)
    .await
    .map_err(Error::db_error("reading the backlog"))?;
    let template = TopicTemplate::parse(template, "bench template")?;
    Ok(rows
        .iter()
        .map(|row| message::from_row(row, &template, NullPayload::JsonNull))
        .collect())
}

/// JetStream publishes of `records`, `window` in flight at a time (the
/// relay's batch), with the relay's headers; returns records per second.
async fn publish_nats(
    config: &NatsConfig,
    records: &[message::Message],
    window: usize,
) -> Result<f64, Error> {
    let fail = |e: String| bench(format!("the plain NATS publisher failed: {e}"));
    let client = async_nats::connect(config.servers[0].expose())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let jetstream = async_nats::jetstream::ContextBuilder::new()
        .timeout(config.ack_timeout)
        .max_ack_inflight(window.max(1))
        .build(client);
    let started = Instant::now();
    for chunk in records.chunks(window.max(1)) {
        let mut acks = Vec::with_capacity(chunk.len());
        for record in chunk {
            let headers = outbox_relay::sink::nats::nats_headers(record).map_err(fail)?;
            let ack = jetstream
                .publish_with_headers(
                    record.topic.clone(),
                    headers,
                    record.value.clone().unwrap_or_default().into(),
                )
                .await
                .map_err(|e| fail(e.to_string()))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| fail(e.to_string()))?;
        }
    }
    Ok(records.len() as f64 / started.elapsed().as_secs_f64())
}

/// Confirmed, persistent, mandatory publishes of `records`, `window` in
/// flight at a time, with the relay's properties; returns records per second.
async fn publish_rabbitmq(
    config: &RabbitMqConfig,
    records: &[message::Message],
    window: usize,
) -> Result<f64, Error> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let fail = |e: String| bench(format!("the plain RabbitMQ publisher failed: {e}"));
    let connection =
        lapin::Connection::connect(config.url.expose(), lapin::ConnectionProperties::default())
            .await
            .map_err(|e| fail(e.to_string()))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| fail(e.to_string()))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let started = Instant::now();
    for chunk in records.chunks(window.max(1)) {
        // join_all polls each publish once, in order, before any waits:
        // the frames are queued in order and written together, as the
        // relay's sink does.
        let properties = chunk
            .iter()
            .map(outbox_relay::sink::rabbitmq::properties)
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        let publishes = chunk.iter().zip(properties).map(|(record, properties)| {
            let channel = &channel;
            async move {
                let confirm = channel
                    .basic_publish(
                        record.topic.as_str().into(),
                        record.key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        record.value.as_deref().unwrap_or_default(),
                        properties,
                    )
                    .await?;
                confirm.await
            }
        });
        for confirmed in futures::future::join_all(publishes).await {
            match confirmed.map_err(|e| fail(e.to_string()))? {
                lapin::Confirmation::Ack(None) => {}
                other => return Err(fail(format!("a record was not confirmed: {other:?}"))),
            }
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(records.len() as f64 / started.elapsed().as_secs_f64())
}

pub(super) fn describe(report: &BenchReport, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if report.sinks.is_empty() {
        return Ok(());
    }
    writeln!(f)?;
    writeln!(
        f,
        "drains to NATS JetStream and RabbitMQ (throwaway servers), beside a plain publisher of the same client (same settings, a batch in flight):"
    )?;
    for s in &report.sinks {
        writeln!(
            f,
            "  {:<8} {:<4} {:>8} rows {:>9.0} rows/s {:>5.2} x publisher ({:.0}/s)  relay CPU {:.4} s/1k rows  peak RSS {:.1} MB{}",
            s.sink,
            s.mode,
            s.rows,
            s.rows_per_sec,
            s.ratio_to_publisher,
            s.publisher_rows_per_sec,
            s.relay_cpu_seconds_per_1k_rows,
            s.relay_peak_rss_mb,
            s.queue_type
                .as_ref()
                .map(|kind| format!("  ({kind} queue)"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

pub(super) fn targets(report: &BenchReport, out: &mut BTreeMap<String, bool>) {
    for s in &report.sinks {
        out.insert(
            format!(
                "{} {} drain >= {SINK_RATIO_TARGET} x its plain publisher and >= {SINK_RATE_TARGET} rows/s",
                s.sink, s.mode
            ),
            s.ratio_to_publisher >= SINK_RATIO_TARGET && s.rows_per_sec >= SINK_RATE_TARGET,
        );
        out.insert(
            format!(
                "{} {} relay peak RSS < {RSS_TARGET_MB} MB on {} rows",
                s.sink, s.mode, s.rows
            ),
            s.relay_peak_rss_mb < RSS_TARGET_MB,
        );
    }
}
