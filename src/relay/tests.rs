//! The loop's rules on in-memory fakes, on a paused tokio clock: the ack
//! prefix, each `--on-poison` policy, transient failures and backoff,
//! readiness, the shutdown deadline and the lease. Each test states a rule
//! and fails when the loop breaks it.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fakes::{FakeSink, FakeSource, Plan, row, seq_of};
use super::{Relay, RunStats};
use crate::config::{
    DatabaseConfig, Identifier, KafkaConfig, LeaseConfig, PoisonPolicy, RelayConfig,
};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::outbox::OutboxRow;

const MS: Duration = Duration::from_millis(1);

fn config(on_poison: PoisonPolicy, batch_size: usize) -> RelayConfig {
    let schema = Identifier::parse("public", "--schema").unwrap();
    let database =
        DatabaseConfig::from_url("postgres://relay:pw@db:5432/app", schema, "--database-url")
            .unwrap();
    let kafka = KafkaConfig {
        brokers: "kafka:9092".into(),
        properties: Vec::new(),
    };
    let mut config = RelayConfig::new(database, kafka);
    config.on_poison = on_poison;
    config.batch_size = std::num::NonZeroUsize::new(batch_size).unwrap();
    config.metrics_address = None;
    config
}

/// Rows 1..=n over aggregates a, b, c in turn.
fn rows(n: i64) -> Vec<OutboxRow> {
    (1..=n)
        .map(|seq| row(seq, ["a", "b", "c"][(seq as usize - 1) % 3]))
        .collect()
}

struct Running {
    shutdown: CancellationToken,
    handle: JoinHandle<Result<RunStats, Error>>,
    metrics: Metrics,
}

fn start(config: RelayConfig, source: &FakeSource, sink: &FakeSink) -> Running {
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let relay = Relay::new(config, source.clone(), sink.clone(), metrics.clone());
    let handle = tokio::spawn(relay.run(shutdown.clone()));
    Running {
        shutdown,
        handle,
        metrics,
    }
}

impl Running {
    async fn stop(self) -> Result<RunStats, Error> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(600), self.handle)
            .await
            .expect("the relay stops")
            .unwrap()
    }
}

/// Waits on the paused clock, which advances whenever every task waits.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(MS).await;
    }
}

fn seqs(rows: &[OutboxRow]) -> Vec<i64> {
    rows.iter().map(|r| r.seq).collect()
}

#[tokio::test(start_paused = true)]
async fn acks_out_of_order_confirm_only_the_acknowledged_prefix() {
    let source = FakeSource::with_rows(rows(6));
    // Later rows are acknowledged first; row 3 fails once.
    let sink = FakeSink::scripted(|m, attempt| match (seq_of(m), attempt) {
        (3, 1) => Plan::Fail(20 * MS),
        (seq, _) => Plan::Ack(MS * (70 - 10 * seq as u32)),
    });
    let relay = start(config(PoisonPolicy::DeadLetter, 6), &source, &sink);
    until("the outbox to drain", || source.table().rows.is_empty()).await;
    let stats = relay.stop().await.unwrap();

    let table = source.table();
    assert_eq!(
        table.confirms[0].published,
        [1, 2],
        "only the prefix before the failure"
    );
    let confirmed: Vec<i64> = table
        .confirms
        .iter()
        .flat_map(|c| c.published.clone())
        .collect();
    assert_eq!(
        confirmed,
        [1, 2, 3, 4, 5, 6],
        "each row confirmed once, in order"
    );
    assert_eq!(stats.published, 6);
    // Rows 4..6 were in flight when row 3 failed: sent again, nothing else.
    assert_eq!(sink.sent(), [1, 2, 3, 4, 5, 6, 3, 4, 5, 6]);
}

#[tokio::test(start_paused = true)]
async fn dead_letter_moves_a_rejected_row_aside_and_keeps_going() {
    let source = FakeSource::with_rows(rows(4));
    let sink = FakeSink::scripted(|m, _| match seq_of(m) {
        2 => Plan::Reject,
        _ => Plan::Ack(MS),
    });
    let relay = start(config(PoisonPolicy::DeadLetter, 10), &source, &sink);
    until("the outbox to drain", || source.table().rows.is_empty()).await;
    let stats = relay.stop().await.unwrap();

    let table = source.table();
    assert_eq!(table.confirms[0].published, [1, 3, 4]);
    assert_eq!(
        table.confirms[0].dead_letters,
        [(2, "too large".to_owned())]
    );
    assert_eq!((stats.published, stats.dead_lettered), (3, 1));
    assert_eq!(sink.sent(), [1, 2, 3, 4], "a rejection is not retried");
}

#[tokio::test(start_paused = true)]
async fn block_aggregate_parks_the_aggregates_later_rows_unsent() {
    // a:1, b:2, a:3, b:4, a:5; a's first row is refused before sending.
    let table_rows = vec![
        row(1, "a"),
        row(2, "b"),
        row(3, "a"),
        row(4, "b"),
        row(5, "a"),
    ];
    let source = FakeSource::with_rows(table_rows);
    let sink = FakeSink::scripted(|m, _| match seq_of(m) {
        1 => Plan::Refuse,
        _ => Plan::Ack(MS),
    });
    let relay = start(config(PoisonPolicy::BlockAggregate, 10), &source, &sink);
    until("the outbox to drain", || source.table().rows.is_empty()).await;
    // A row of the blocked aggregate written later is parked too.
    source.table().rows.push(row(6, "a"));
    until("the new row to be parked", || {
        source.table().rows.is_empty()
    })
    .await;
    relay.stop().await.unwrap();

    let table = source.table();
    let dead: Vec<i64> = table.dead_letters.iter().map(|(r, _)| r.seq).collect();
    assert_eq!(dead, [1, 3, 5, 6]);
    assert_eq!(table.dead_letters[0].1, "invalid topic");
    assert!(
        table.dead_letters[1..]
            .iter()
            .all(|(_, e)| e.starts_with("parked: aggregate acct/a"))
    );
    assert_eq!(
        sink.sent(),
        [1, 2, 4],
        "no later row of the blocked aggregate is sent"
    );
}

#[tokio::test(start_paused = true)]
async fn halt_confirms_what_came_before_and_stops_with_the_row_in_place() {
    let source = FakeSource::with_rows(rows(4));
    let sink = FakeSink::scripted(|m, _| match seq_of(m) {
        3 => Plan::Reject,
        _ => Plan::Ack(MS),
    });
    let relay = start(config(PoisonPolicy::Halt, 10), &source, &sink);
    let result = relay.handle.await.unwrap();

    let err = result.expect_err("halt ends the relay");
    assert!(matches!(err, Error::Poison(_)), "{err}");
    assert!(err.to_string().contains("row seq 3"), "{err}");
    let table = source.table();
    assert_eq!(table.confirms.len(), 1);
    assert_eq!(table.confirms[0].published, [1, 2]);
    assert!(table.confirms[0].dead_letters.is_empty());
    assert_eq!(
        seqs(&table.rows),
        [3, 4],
        "the poison row and what follows stay"
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_exponentially_and_readiness_says_so() {
    let source = FakeSource::with_rows(rows(2));
    let sink = FakeSink::scripted(|m, attempt| match (seq_of(m), attempt) {
        (1, 1..=5) => Plan::Fail(MS),
        _ => Plan::Ack(MS),
    });
    let relay = start(config(PoisonPolicy::DeadLetter, 10), &source, &sink);
    until("the third attempt", || {
        sink.sent().iter().filter(|&&s| s == 1).count() >= 3
    })
    .await;
    let unready = relay
        .metrics
        .unready()
        .expect("not ready while Kafka fails");
    assert!(
        unready.contains("publishing to Kafka: broker down"),
        "{unready}"
    );
    until("the outbox to drain", || source.table().rows.is_empty()).await;
    assert_eq!(
        relay.metrics.unready(),
        None,
        "ready again once a batch is confirmed"
    );
    relay.stop().await.unwrap();

    let attempts: Vec<Instant> = sink
        .log()
        .sent
        .iter()
        .filter(|(seq, _)| *seq == 1)
        .map(|(_, at)| *at)
        .collect();
    assert_eq!(
        attempts.len(),
        6,
        "five failures, then success; nothing dropped"
    );
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= 100 * MS, "the first retry waits: {gaps:?}");
    for pair in gaps.windows(2) {
        assert!(
            pair[1] >= pair[0],
            "backoff never shrinks while failing: {gaps:?}"
        );
    }
    assert!(
        gaps[4] >= 4 * gaps[0].min(200 * MS),
        "backoff grows: {gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_not_handed_over_is_overtaken_by_nothing_after_it() {
    let source = FakeSource::with_rows(rows(4));
    let sink = FakeSink::scripted(|m, attempt| match (seq_of(m), attempt) {
        (2, 1) => Plan::NotSent,
        _ => Plan::Ack(MS),
    });
    let relay = start(config(PoisonPolicy::DeadLetter, 10), &source, &sink);
    until("the outbox to drain", || source.table().rows.is_empty()).await;
    relay.stop().await.unwrap();
    // Rows 3 and 4 were not sent behind the row that was not handed over.
    assert_eq!(sink.sent(), [1, 2, 2, 3, 4]);
    assert_eq!(source.table().confirms[0].published, [1]);
}

#[tokio::test(start_paused = true)]
async fn a_failing_read_is_retried_and_loses_nothing() {
    let source = FakeSource::with_rows(rows(3));
    source.table().failing_reads = 3;
    let sink = FakeSink::scripted(|_, _| Plan::Ack(MS));
    let relay = start(config(PoisonPolicy::DeadLetter, 10), &source, &sink);
    until("the outbox to drain", || source.table().rows.is_empty()).await;
    assert_eq!(relay.metrics.unready(), None);
    relay.stop().await.unwrap();
    assert_eq!(sink.sent(), [1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_in_flight_acks_up_to_the_deadline() {
    let source = FakeSource::with_rows(rows(3));
    let sink = FakeSink::scripted(|m, _| match seq_of(m) {
        2 => Plan::Hang,
        _ => Plan::Ack(MS),
    });
    let mut config = config(PoisonPolicy::DeadLetter, 10);
    config.shutdown_timeout = Duration::from_secs(5);
    let relay = start(config, &source, &sink);
    until("the batch to be in flight", || sink.sent().len() == 3).await;
    let stopping = Instant::now();
    let stats = relay.stop().await.unwrap();

    let waited = stopping.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "stopped after {waited:?}, not at the 5 s deadline"
    );
    assert_eq!(stats.published, 1);
    let table = source.table();
    assert_eq!(
        table.confirms.last().unwrap().published,
        [1],
        "the prefix before the hung ack"
    );
    assert_eq!(seqs(&table.rows), [2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_graceful_stop_confirms_acks_that_arrive_before_the_deadline() {
    let source = FakeSource::with_rows(rows(3));
    let sink = FakeSink::scripted(|_, _| Plan::Ack(Duration::from_secs(2)));
    let relay = start(config(PoisonPolicy::DeadLetter, 10), &source, &sink);
    until("the batch to be in flight", || sink.sent().len() == 3).await;
    let stats = relay.stop().await.unwrap();
    assert_eq!(stats.published, 3, "nothing in flight is left to repeat");
    assert!(source.table().rows.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_idle_leader_renews_its_lease_every_quarter_lease() {
    let source = FakeSource::default();
    let sink = FakeSink::scripted(|_, _| Plan::Ack(MS));
    let mut config = config(PoisonPolicy::DeadLetter, 10);
    config.lease = LeaseConfig::new(Duration::from_secs(8), "--lease").unwrap();
    let relay = start(config, &source, &sink);
    tokio::time::sleep(Duration::from_secs(20)).await;
    relay.stop().await.unwrap();
    let renewals = source.table().renewals;
    assert!(
        (9..=11).contains(&renewals),
        "{renewals} renewals in 20 s of idling (every 2 s)"
    );
}

#[tokio::test(start_paused = true)]
async fn waiting_for_acks_renews_within_the_sinks_bound_and_no_longer() {
    let mut config = config(PoisonPolicy::DeadLetter, 10);
    config.lease = LeaseConfig::new(Duration::from_secs(4), "--lease").unwrap();

    // A slow broker: the ack comes after 20 s, within the sink's 30 s.
    let source = FakeSource::with_rows(rows(1));
    let sink = FakeSink::scripted(|_, _| Plan::Ack(Duration::from_secs(20)));
    let relay = start(config.clone(), &source, &sink);
    until("the row to be confirmed", || source.table().rows.is_empty()).await;
    relay.stop().await.unwrap();
    assert!(
        source.table().renewals >= 19,
        "{} renewals while waiting 20 s for an ack",
        source.table().renewals
    );

    // A stuck sink: no answer ever, though it promised one within 5 s. The
    // loop renews for that long (plus one interval), then lets the lease go.
    let source = FakeSource::with_rows(rows(1));
    let sink = FakeSink::scripted(|_, _| Plan::Hang).with_delivery_timeout(Duration::from_secs(5));
    let relay = start(config, &source, &sink);
    until("the row to be sent", || sink.sent().len() == 1).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let renewals = source.table().renewals;
    assert!(
        (5..=6).contains(&renewals),
        "{renewals} renewals for a 5 s bound at 1 s each"
    );
    relay.shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_lease_lost_while_waiting_for_acks_confirms_nothing_of_that_batch() {
    let source = FakeSource::with_rows(rows(2));
    let sink = FakeSink::scripted(|_, attempt| match attempt {
        1 => Plan::Ack(Duration::from_secs(10)),
        _ => Plan::Ack(MS),
    });
    let relay = start(config(PoisonPolicy::DeadLetter, 10), &source, &sink);
    until("the batch to be in flight", || sink.sent().len() == 2).await;
    source.table().lose_lease = true;
    // The next batch (the same rows, read again) is confirmed normally.
    until("the outbox to drain", || source.table().rows.is_empty()).await;
    relay.stop().await.unwrap();
    let table = source.table();
    assert_eq!(
        table.confirms.len(),
        1,
        "the batch in flight when the lease went is not confirmed"
    );
    assert_eq!(sink.sent(), [1, 2, 1, 2]);
}

#[test]
fn latency_quantiles_fall_in_the_bucket_that_holds_them() {
    let mut histogram = super::LatencyHistogram::default();
    assert_eq!(histogram.quantile(0.5), None);
    for ms in 1..=100 {
        histogram.record(ms as f64 / 1e3);
    }
    assert_eq!(histogram.count(), 100);
    // Buckets grow by a fifth: the bound is at most 20 % above the value.
    let p50 = histogram.quantile(0.5).unwrap();
    assert!((0.050..=0.060).contains(&p50), "{p50}");
    let p99 = histogram.quantile(0.99).unwrap();
    assert!((0.099..=0.119).contains(&p99), "{p99}");
    // Beyond the last bound: the last bucket.
    histogram.record(1e6);
    assert!(histogram.quantile(1.0).unwrap() > 40.0);
}
