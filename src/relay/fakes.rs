//! In-memory stand-ins for a source and a sink, for the relay loop's unit
//! tests. The source behaves like poll mode (every batch from the head of
//! the table, no cursor); the sink does to each message what the test's
//! script says, after a delay on tokio's clock, so paused-clock tests run in
//! milliseconds and the same way every time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::outbox::OutboxRow;
use crate::sink::{Message, Outcome, Sent, Sink};
use crate::source::{Aggregate, Confirm, Source};

/// An outbox row of aggregate `("acct", aggregate)`.
pub fn row(seq: i64, aggregate: &str) -> OutboxRow {
    OutboxRow {
        seq,
        id: uuid::Uuid::from_u128(seq as u128),
        aggregate_type: "acct".into(),
        aggregate_id: aggregate.into(),
        event_type: "changed".into(),
        topic: None,
        payload: Some(format!("{{\"seq\": {seq}}}")),
        headers: sqlx::types::Json(serde_json::Map::new()),
        created_at: chrono::Utc::now(),
        partition_key: None,
    }
}

/// The seq a message was made from (its payload says).
pub fn seq_of(message: &Message) -> i64 {
    let value = message.value.as_deref().expect("a payload");
    let json: serde_json::Value = serde_json::from_slice(value).expect("JSON");
    json["seq"].as_i64().expect("a seq")
}

fn transient(doing: &'static str) -> Error {
    Error::NotConnected { doing }
}

/// What the fake source holds and records; shared with the test.
#[derive(Default)]
pub struct Table {
    /// The outbox, in seq order.
    pub rows: Vec<OutboxRow>,
    /// Rows moved to the dead-letter table, with their error.
    pub dead_letters: Vec<(OutboxRow, String)>,
    /// Every confirm, in order.
    pub confirms: Vec<Confirm>,
    pub renewals: usize,
    /// Reads that fail transiently before one succeeds.
    pub failing_reads: usize,
    /// Set to make the next renewal fail with a lost lease.
    pub lose_lease: bool,
}

#[derive(Clone, Default)]
pub struct FakeSource {
    table: Arc<Mutex<Table>>,
}

impl FakeSource {
    pub fn with_rows(rows: Vec<OutboxRow>) -> Self {
        let source = FakeSource::default();
        source.table().rows = rows;
        source
    }

    pub fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap()
    }
}

impl Source for FakeSource {
    async fn next_batch(
        &mut self,
        max: usize,
        idle: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OutboxRow>, Error> {
        if shutdown.is_cancelled() {
            return Ok(Vec::new());
        }
        {
            let mut table = self.table();
            if table.failing_reads > 0 {
                table.failing_reads -= 1;
                return Err(transient("reading outbox rows"));
            }
            if !table.rows.is_empty() {
                return Ok(table.rows.iter().take(max).cloned().collect());
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(idle) => {}
        }
        Ok(Vec::new())
    }

    async fn blocked_aggregates(
        &mut self,
        rows: &[OutboxRow],
    ) -> Result<HashSet<Aggregate>, Error> {
        let table = self.table();
        let dead: HashSet<Aggregate> = table
            .dead_letters
            .iter()
            .map(|(r, _)| (r.aggregate_type.clone(), r.aggregate_id.clone()))
            .collect();
        Ok(rows
            .iter()
            .map(|r| (r.aggregate_type.clone(), r.aggregate_id.clone()))
            .filter(|a| dead.contains(a))
            .collect())
    }

    async fn renew(&mut self) -> Result<(), Error> {
        let mut table = self.table();
        if std::mem::take(&mut table.lose_lease) {
            return Err(Error::LeaseLost {
                name: "fake".into(),
                cause: "taken over".into(),
            });
        }
        table.renewals += 1;
        Ok(())
    }

    async fn confirm(&mut self, confirm: &Confirm) -> Result<(), Error> {
        let mut table = self.table();
        table.renewals += 1;
        table.confirms.push(confirm.clone());
        let published: HashSet<i64> = confirm.published.iter().copied().collect();
        table.rows.retain(|r| !published.contains(&r.seq));
        for (seq, error) in &confirm.dead_letters {
            let at = table.rows.iter().position(|r| r.seq == *seq);
            let moved = table
                .rows
                .remove(at.expect("a dead letter comes from the table"));
            table.dead_letters.push((moved, error.clone()));
        }
        Ok(())
    }
}

/// What the fake sink does with one message.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Acknowledged after this long.
    Ack(Duration),
    /// Failed, transiently, after this long.
    Fail(Duration),
    /// Rejected by the broker for good.
    Reject,
    /// Refused for good before reaching the broker.
    Refuse,
    /// Not handed to the broker this time.
    NotSent,
    /// Never resolves.
    Hang,
}

type Script = Box<dyn FnMut(&Message, usize) -> Plan + Send>;

/// What the fake sink was asked to do; shared with the test.
pub struct Log {
    /// Every message sent, with the tokio time it was sent at.
    pub sent: Vec<(i64, tokio::time::Instant)>,
    pub replaced: usize,
    script: Script,
}

#[derive(Clone)]
pub struct FakeSink {
    log: Arc<Mutex<Log>>,
    delivery_timeout: Duration,
}

impl FakeSink {
    /// A sink that does `script(message, attempt)` with each message, where
    /// `attempt` counts sends of the same seq from 1.
    pub fn scripted(script: impl FnMut(&Message, usize) -> Plan + Send + 'static) -> Self {
        FakeSink {
            log: Arc::new(Mutex::new(Log {
                sent: Vec::new(),
                replaced: 0,
                script: Box::new(script),
            })),
            delivery_timeout: Duration::from_secs(30),
        }
    }

    pub fn with_delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    pub fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }

    /// Seqs in the order they were sent.
    pub fn sent(&self) -> Vec<i64> {
        self.log().sent.iter().map(|(seq, _)| *seq).collect()
    }
}

impl Sink for FakeSink {
    type Ack = BoxFuture<'static, Outcome>;

    fn name(&self) -> &'static str {
        "Kafka"
    }

    async fn send(&self, message: &Message) -> Sent<Self::Ack> {
        let seq = seq_of(message);
        let plan = {
            let mut log = self.log();
            log.sent.push((seq, tokio::time::Instant::now()));
            let attempt = log.sent.iter().filter(|(s, _)| *s == seq).count();
            (log.script)(message, attempt)
        };
        let after = |delay: Duration, outcome: Outcome| {
            Sent::Enqueued(tokio::time::sleep(delay).map(move |()| outcome).boxed())
        };
        match plan {
            Plan::Ack(delay) => after(delay, Outcome::Acked),
            Plan::Fail(delay) => after(delay, Outcome::Failed("broker down".into())),
            Plan::Reject => after(Duration::ZERO, Outcome::Rejected("too large".into())),
            Plan::Refuse => Sent::Refused("invalid topic".into()),
            Plan::NotSent => Sent::NotSent("local queue error".into()),
            Plan::Hang => Sent::Enqueued(futures::future::pending().boxed()),
        }
    }

    async fn wait_until_reachable(&self, _shutdown: &CancellationToken) -> bool {
        true
    }

    fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }

    fn is_broken(&self) -> bool {
        false
    }

    fn replace(&mut self) -> Result<(), Error> {
        self.log().replaced += 1;
        Ok(())
    }
}
