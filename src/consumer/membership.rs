//! One active member per consumer group on a broker whose consumers cannot
//! keep one aggregate on one member (NATS JetStream): the member holding the
//! group's row in `consumer_member` receives; the others wait, and take
//! over once the holder stops renewing it for a lease (by the database's
//! clock).

use std::time::{Duration, Instant};

use sqlx::PgPool;

/// Takes the row when it is free, stale, or already this member's; the
/// epoch grows by one with every take.
const ACQUIRE: &str = "insert into consumer_member as m \
         (consumer_group, source, holder, epoch, renewed_at) \
     values ($1, $2, $3, 1, now()) \
     on conflict (consumer_group, source) do update \
         set holder = excluded.holder, epoch = m.epoch + 1, renewed_at = now() \
         where m.holder = excluded.holder \
            or m.renewed_at < now() - make_interval(secs => $4) \
     returning epoch";

const RENEW: &str = "update consumer_member set renewed_at = now() \
     where consumer_group = $1 and source = $2 and holder = $3 and epoch = $4";

/// Hands the row over at once: the next member need not wait a lease.
const RELEASE: &str = "update consumer_member set renewed_at = '-infinity' \
     where consumer_group = $1 and source = $2 and holder = $3 and epoch = $4";

/// This process as a candidate for one group's row.
pub(crate) struct Membership {
    pool: PgPool,
    group: String,
    source: String,
    holder: String,
    pub lease: Duration,
}

/// The row, held.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    pub epoch: i64,
    /// When the row may be taken from this member, by its own clock (a
    /// lease after the last accepted renewal was sent).
    pub valid_until: Instant,
}

impl Membership {
    pub fn new(pool: PgPool, group: &str, source: &str, lease: Duration) -> Self {
        Membership {
            pool,
            group: group.to_owned(),
            source: source.to_owned(),
            holder: format!("{}/{:08x}", std::process::id(), rand::random::<u32>()),
            lease,
        }
    }

    /// Takes the row if it is free or stale.
    pub async fn try_acquire(&self) -> Result<Option<Held>, sqlx::Error> {
        let sent = Instant::now();
        let epoch: Option<i64> = sqlx::query_scalar(ACQUIRE)
            .bind(&self.group)
            .bind(&self.source)
            .bind(&self.holder)
            .bind(self.lease.as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
        Ok(epoch.map(|epoch| Held {
            epoch,
            valid_until: sent + self.lease,
        }))
    }

    /// Renews `held`; false when another member took the row.
    pub async fn renew(&self, held: &mut Held) -> Result<bool, sqlx::Error> {
        let sent = Instant::now();
        let renewed = self.run(RENEW, held.epoch).await?;
        if renewed {
            held.valid_until = sent + self.lease;
        }
        Ok(renewed)
    }

    /// Gives the row up (after a clean stop), so that a waiting member takes
    /// over at once.
    pub async fn release(&self, held: &Held) {
        if let Err(e) = self.run(RELEASE, held.epoch).await {
            tracing::debug!(error = %e, "cannot release the group's row; it expires by itself");
        }
    }

    async fn run(&self, statement: &str, epoch: i64) -> Result<bool, sqlx::Error> {
        let changed = sqlx::query(statement)
            .bind(&self.group)
            .bind(&self.source)
            .bind(&self.holder)
            .bind(epoch)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(changed == 1)
    }
}
