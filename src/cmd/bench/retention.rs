//! Tail mode with and without `--retention` over the same backlog sizes,
//! each beside `pg_recvlogical` on its own WAL, timed to the relay's last
//! confirm and (against a real broker) to the newest records read back by a
//! consumer, with what the database spent per row (CPU of every server
//! process, WAL written); and the relay's start-up time, from process start
//! to the first row confirmed.

use super::*;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Drains of one backlog size, deleting and keeping published rows.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionDrain {
    pub rows: u64,
    /// `--retention` on (published rows kept) or off (each deleted).
    pub retention: bool,
    pub pg_recvlogical_rows_per_sec: f64,
    /// From the relay's start until it confirmed the last row (acknowledged
    /// by the broker).
    pub rows_per_sec: f64,
    pub ratio_to_pg_recvlogical: f64,
    /// With `--brokers`: from the relay's start until a consumer started
    /// after its last confirm had read back the newest record of every
    /// partition (then, untimed, every row is checked to be there).
    pub read_back_rows_per_sec: Option<f64>,
    pub read_back_ratio_to_pg_recvlogical: Option<f64>,
    /// CPU of every Postgres process during the drain, per 1,000 rows.
    pub database_cpu_ms_per_1k_rows: f64,
    /// WAL written during the drain (the relay's confirms, deletes, markers).
    pub wal_bytes_per_row: f64,
    pub relay_cpu_seconds_per_1k_rows: f64,
}

/// From process start until the relay confirmed a row waiting for it.
#[derive(Debug, Clone, Serialize)]
pub struct Startup {
    pub mode: String,
    pub runs_ms: Vec<f64>,
    pub median_ms: f64,
}

/// With retention, the drain's target against `pg_recvlogical`.
pub(super) const RETENTION_TARGET: f64 = 0.95;
/// Process start to the first row confirmed.
pub(super) const STARTUP_TARGET_MS: f64 = 300.0;

/// For each size in `options.retention_rows`: a tail drain deleting
/// published rows, then one keeping them, each in a database of its own.
pub(super) async fn retention(
    pg: &TempPostgres,
    kafka: &BenchKafka,
    options: &BenchOptions,
    run_id: &str,
    shutdown: &CancellationToken,
) -> Result<Vec<RetentionDrain>, Error> {
    let mut runs = Vec::new();
    for &rows in &options.retention_rows {
        for keep in [false, true] {
            if shutdown.is_cancelled() {
                return Ok(runs);
            }
            let name = format!(
                "bench_retention_{rows}_{}",
                if keep { "kept" } else { "deleted" }
            );
            let mut bench =
                ModeBench::prepare_as(pg, kafka, options, Mode::Tail, &name, run_id).await?;
            if keep {
                bench.relay_args.extend(["--retention".into(), "1d".into()]);
            }
            runs.push(bench.retention_drain(rows, keep, shutdown).await?);
        }
    }
    Ok(runs)
}

impl ModeBench<'_> {
    /// Creates the relay's slot and `pg_recvlogical`'s, writes `rows`,
    /// times `pg_recvlogical` over them, then the relay.
    async fn retention_drain(
        self,
        rows: u64,
        keep: bool,
        shutdown: &CancellationToken,
    ) -> Result<RetentionDrain, Error> {
        let recvlogical_slot = "bench_pg_recvlogical";
        let mut relay = self.start_relay("setup")?;
        self.wait_for_slot(&mut relay).await?;
        relay.stop().await?;
        sqlx::query("select pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(recvlogical_slot)
            .execute(&self.pool)
            .await
            .map_err(Error::db_error("creating pg_recvlogical's slot"))?;
        self.insert(backlog(self.options, rows)).await?;
        let end_lsn = self.wal_lsn().await?;
        let recvlogical = self
            .pg_recvlogical(recvlogical_slot, &end_lsn, rows)
            .await?;
        sqlx::query("select pg_drop_replication_slot($1)")
            .bind(recvlogical_slot)
            .execute(&self.pool)
            .await
            .map_err(Error::db_error("dropping pg_recvlogical's slot"))?;

        let wal_before = self.wal_lsn().await?;
        let cpu_before = self.pg.cpu_seconds();
        // Connected before the relay starts, to read back once it is done.
        let newest_reader = match self.kafka {
            BenchKafka::External(brokers) => Some(newest_reader(brokers, &self.topic)?),
            BenchKafka::Mock(_) => None,
        };
        let mut relay = self.start_relay("run")?;
        let started = Instant::now();
        while relay.published_total().await < rows {
            relay.check_running()?;
            if shutdown.is_cancelled() {
                return Err(bench("interrupted".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let database_cpu = self.pg.cpu_seconds() - cpu_before;
        let newest_read = match newest_reader {
            None => None,
            Some(reader) => {
                let (topic, partitions) = (self.topic.clone(), self.options.partitions);
                let batch = i64::from(self.options.batch_size);
                let reader = tokio::task::spawn_blocking(move || {
                    read_newest(reader, &topic, partitions, batch)
                })
                .await
                .map_err(|e| bench(format!("the read-back task failed: {e}")))?
                .map_err(|e| relay.failed(&format!("confirmed every row, but {e}")))?;
                let seconds = started.elapsed().as_secs_f64();
                // Closing a consumer takes a while: not part of the read.
                tokio::task::spawn_blocking(move || drop(reader));
                Some(seconds)
            }
        };
        let wal: f64 = sqlx::query_scalar("select (pg_current_wal_lsn() - $1::pg_lsn)::float8")
            .bind(&wal_before)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db_error("reading the WAL position"))?;
        let usage = relay.usage()?;
        if let BenchKafka::External(brokers) = self.kafka {
            // Untimed: every row is on the broker.
            let consumer = live_consumer(brokers, &self.topic, self.options.partitions)?;
            let arrived =
                tokio::time::timeout(Duration::from_secs(120), every_row_arrives(consumer, rows));
            if !matches!(arrived.await, Ok(true)) {
                return Err(relay.failed("confirmed every row, but a consumer reading the topic from its start did not find them all within 120 s"));
            }
        }
        relay.stop().await?;
        self.pool.close().await;
        let rows_per_sec = rows as f64 / seconds;
        let read_back_rows_per_sec = newest_read.map(|s| rows as f64 / s);
        Ok(RetentionDrain {
            rows,
            retention: keep,
            pg_recvlogical_rows_per_sec: recvlogical,
            rows_per_sec,
            ratio_to_pg_recvlogical: rows_per_sec / recvlogical,
            read_back_rows_per_sec,
            read_back_ratio_to_pg_recvlogical: read_back_rows_per_sec.map(|r| r / recvlogical),
            database_cpu_ms_per_1k_rows: database_cpu * 1e3 / rows as f64 * 1000.0,
            wal_bytes_per_row: wal / rows as f64,
            relay_cpu_seconds_per_1k_rows: usage.cpu_seconds / rows as f64 * 1000.0,
        })
    }

    async fn wal_lsn(&self) -> Result<String, Error> {
        sqlx::query_scalar("select pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db_error("reading the WAL position"))
    }
}

/// The high watermark that the last fetch from `partition` reported, as
/// librdkafka keeps it (`rdkafka` wraps only the `ListOffsets` query).
fn fetched_high_watermark(
    consumer: &NewestReader,
    topic: &std::ffi::CStr,
    partition: i32,
) -> Option<i64> {
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives, the topic
    // is NUL-terminated, and librdkafka writes only the two out-parameters.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// Reads the consumer's topic until every backlog row `k` in `0..rows`
/// arrived; false if the consumer failed first.
async fn every_row_arrives(consumer: StreamConsumer, rows: u64) -> bool {
    let mut seen = vec![false; rows as usize];
    let mut count = 0;
    while count < rows {
        let Ok(message) = consumer.recv().await else {
            return false;
        };
        let Some(k) = message.payload().and_then(backlog_k) else {
            continue;
        };
        if let Some(slot) = seen.get_mut(k as usize)
            && !std::mem::replace(slot, true)
        {
            count += 1;
        }
    }
    true
}

/// The read-back consumer's context: reaching the end of a partition is
/// what it reads for, not an error to log.
struct EndsExpected;

impl ClientContext for EndsExpected {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for EndsExpected {}

type NewestReader = BaseConsumer<EndsExpected>;

/// A consumer for [`read_newest`], connected to the brokers already.
fn newest_reader(brokers: &str, topic: &str) -> Result<NewestReader, Error> {
    let consumer: NewestReader = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-bench-newest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.error.backoff.ms", "5")
        // The first fetch is only for the high watermark.
        .set("max.partition.fetch.bytes", "16384")
        .create_with_context(EndsExpected)
        .map_err(Error::kafka("creating the read-back consumer"))?;
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(Error::kafka("connecting the read-back consumer"))?;
    Ok(consumer)
}

/// Reads back, with a consumer that starts now, the newest record of every
/// partition of `topic`: the end of each partition comes from the high
/// watermark of a first fetch (tansu 0.6 answers `ListOffsets` for the
/// latest offset wrongly, its fetches carry the right one); the consumer
/// then reads from `batch` records before it (no stored batch holds more
/// than the relay has in flight, so the newest starts there or after: tansu
/// skips the rest of a batch that a fetch starts inside) to the end.
fn read_newest(
    consumer: NewestReader,
    topic: &str,
    partitions: i32,
    batch: i64,
) -> Result<NewestReader, String> {
    let assign = |offsets: &BTreeMap<i32, i64>| {
        let mut list = TopicPartitionList::new();
        for (&partition, &offset) in offsets {
            list.add_partition_offset(topic, partition, Offset::Offset(offset))
                .map_err(|e| format!("cannot assign {topic}: {e}"))?;
        }
        consumer
            .assign(&list)
            .map_err(|e| format!("cannot assign {topic}: {e}"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let poll = || {
        if Instant::now() > deadline {
            return Err(format!(
                "the newest records of {topic} were not read back within 60 s"
            ));
        }
        Ok(consumer.poll(Duration::from_millis(100)))
    };

    // The high watermark of each partition, from a fetch at its start.
    let topic_c = std::ffi::CString::new(topic).map_err(|e| format!("topic {topic:?}: {e}"))?;
    assign(&(0..partitions).map(|p| (p, 0)).collect())?;
    let mut ends = BTreeMap::new();
    while ends.len() < partitions as usize {
        let partition = match poll()? {
            None => continue,
            Some(Ok(m)) => m.partition(),
            Some(Err(KafkaError::PartitionEOF(partition))) => partition,
            Some(Err(e)) => return Err(format!("reading {topic} failed: {e}")),
        };
        if let Some(high) = fetched_high_watermark(&consumer, &topic_c, partition) {
            ends.entry(partition).or_insert(high);
        }
    }
    ends.retain(|_, high| *high > 0);

    // From a stored batch before the end, to the newest record.
    assign(
        &ends
            .iter()
            .map(|(&p, &high)| (p, (high - 1 - batch).max(0)))
            .collect(),
    )?;
    let mut newest_read = 0;
    while newest_read < ends.len() {
        if let Some(Ok(m)) = poll()?
            && m.offset() + 1 == ends[&m.partition()]
        {
            newest_read += 1;
        }
    }
    Ok(consumer)
}

/// The `k` of a backlog row's payload. Postgres prints `jsonb` keys shortest
/// first, so the text starts with `{"k": `: read the number there without
/// parsing the whole payload, else parse it.
fn backlog_k(payload: &[u8]) -> Option<u64> {
    if let Some(rest) = payload.strip_prefix(b"{\"k\": ") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if let Some(k) = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse().ok())
        {
            return Some(k);
        }
    }
    serde_json::from_slice::<Value>(payload)
        .ok()?
        .get("k")?
        .as_u64()
}

/// `options.startup_runs` starts per mode, each with one row waiting (tail
/// mode's slot already made, as after any first start).
pub(super) async fn startup(
    pg: &TempPostgres,
    kafka: &BenchKafka,
    options: &BenchOptions,
    run_id: &str,
    shutdown: &CancellationToken,
) -> Result<Vec<Startup>, Error> {
    let mut out = Vec::new();
    for mode in [Mode::Poll, Mode::Tail] {
        let name = format!("bench_startup_{mode}");
        let bench = ModeBench::prepare_as(pg, kafka, options, mode, &name, run_id).await?;
        if mode == Mode::Tail {
            let mut relay = bench.start_relay("setup")?;
            bench.wait_for_slot(&mut relay).await?;
            relay.stop().await?;
        }
        let mut runs_ms = Vec::new();
        for run in 0..options.startup_runs {
            if shutdown.is_cancelled() {
                return Ok(out);
            }
            bench.insert(backlog(options, 1)).await?;
            let started = Instant::now();
            let mut relay = bench.start_relay(&format!("startup-{run}"))?;
            while relay.published_total().await < 1 {
                relay.check_running()?;
                if started.elapsed() > Duration::from_secs(60) {
                    return Err(relay.failed("confirmed nothing within 60 s of its start"));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            runs_ms.push(started.elapsed().as_secs_f64() * 1e3);
            relay.stop().await?;
        }
        bench.pool.close().await;
        let mut sorted = runs_ms.clone();
        sorted.sort_by(f64::total_cmp);
        out.push(Startup {
            mode: mode.to_string(),
            median_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
            runs_ms,
        });
    }
    Ok(out)
}

/// The retention drains and start-ups, as printed.
pub(super) fn describe(report: &BenchReport, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if !report.retention.is_empty() {
        writeln!(f)?;
        writeln!(
            f,
            "tail drains deleting and keeping (--retention) published rows, from the relay's start to its last confirm (and, with --brokers, to the newest record of every partition read back by a consumer started then; every row then checked on the broker, untimed), beside pg_recvlogical on the same WAL:"
        )?;
        for r in &report.retention {
            let read_back = match (
                r.read_back_rows_per_sec,
                r.read_back_ratio_to_pg_recvlogical,
            ) {
                (Some(rate), Some(ratio)) => format!("; read back {rate:.0} rows/s, {ratio:.2} x"),
                _ => String::new(),
            };
            writeln!(
                f,
                "  {:>8} rows {:<9} {:>9.0} rows/s {:>5.2} x pg_recvlogical ({:.0}/s{read_back})  database CPU {:.1} ms/1k rows  WAL {:.0} B/row  relay CPU {:.4} s/1k rows",
                r.rows,
                if r.retention { "kept" } else { "deleted" },
                r.rows_per_sec,
                r.ratio_to_pg_recvlogical,
                r.pg_recvlogical_rows_per_sec,
                r.database_cpu_ms_per_1k_rows,
                r.wal_bytes_per_row,
                r.relay_cpu_seconds_per_1k_rows
            )?;
        }
    }
    if !report.startup.is_empty() {
        writeln!(f)?;
        writeln!(
            f,
            "start-up, process start to the first row confirmed (a row waiting, database and broker up):"
        )?;
        for s in &report.startup {
            let runs: Vec<String> = s.runs_ms.iter().map(|ms| format!("{ms:.0}")).collect();
            writeln!(
                f,
                "  {:<5} median {:.0} ms (runs: {} ms)",
                s.mode,
                s.median_ms,
                runs.join(", ")
            )?;
        }
    }
    Ok(())
}

/// The targets of these measurements.
pub(super) fn targets(report: &BenchReport, out: &mut BTreeMap<String, bool>) {
    for r in report.retention.iter().filter(|r| r.retention) {
        out.insert(
            format!(
                "tail drain of {} rows with --retention, to the last {}, >= {RETENTION_TARGET} x pg_recvlogical",
                r.rows,
                if r.read_back_ratio_to_pg_recvlogical.is_some() {
                    "record read back"
                } else {
                    "confirm"
                }
            ),
            r.read_back_ratio_to_pg_recvlogical
                .unwrap_or(r.ratio_to_pg_recvlogical)
                >= RETENTION_TARGET,
        );
    }
    for s in &report.startup {
        out.insert(
            format!(
                "{} start-up to first row confirmed < {STARTUP_TARGET_MS} ms (median)",
                s.mode
            ),
            s.median_ms < STARTUP_TARGET_MS,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_rows_k_is_read_from_postgres_text_or_any_json() {
        assert_eq!(
            backlog_k(br#"{"k": 42, "pad": "xx", "currency": "EUR"}"#),
            Some(42)
        );
        assert_eq!(backlog_k(br#"{"pad": "xx", "k": 7}"#), Some(7));
        assert_eq!(backlog_k(b"not json"), None);
    }
}
