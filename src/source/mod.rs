//! Where committed outbox rows come from. A source hands the relay batches of
//! rows in the order they must be published, and later applies what the
//! relay confirms: rows Kafka acknowledged, and rows rejected for good that
//! move to the dead-letter table. It never confirms anything on its own.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::outbox::OutboxRow;

pub mod poll;

pub use poll::PollSource;

/// What the relay confirms after a batch: a prefix of it, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Confirm {
    /// `seq` of rows Kafka acknowledged.
    pub published: Vec<i64>,
    /// `seq` and error of rows the broker rejected for good.
    pub dead_letters: Vec<(i64, String)>,
}

impl Confirm {
    pub fn is_empty(&self) -> bool {
        self.published.is_empty() && self.dead_letters.is_empty()
    }
}

/// A reader of committed outbox rows.
pub trait Source {
    /// Waits for committed rows and returns up to `max` of them in publication
    /// order. Returns an empty batch only when `shutdown` fired.
    fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, Error>> + Send;

    /// Makes the confirmed rows' progress durable (delete, move to dead
    /// letters, or flush a position). Rows not confirmed are read again.
    fn confirm(&mut self, confirm: &Confirm) -> impl Future<Output = Result<(), Error>> + Send;
}
