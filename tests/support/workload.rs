//! Business writers: transactions that bump an aggregate's version and insert its events.

use super::*;

/// Ids written by business transactions.
#[derive(Debug, Default)]
pub struct Written {
    pub committed: Vec<Uuid>,
    pub rolled_back: Vec<Uuid>,
}

impl Written {
    /// Adds what `more` wrote.
    pub fn append(&mut self, more: Written) {
        self.committed.extend(more.committed);
        self.rolled_back.extend(more.rolled_back);
    }
}

/// Creates `agg` with `aggregates` rows. Writers lock an aggregate's row and
/// bump its version, so its events' versions follow commit order.
pub async fn create_aggregates(pool: &PgPool, aggregates: u32) {
    sqlx::query("create table agg (id text primary key, version bigint not null default 0)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("insert into agg (id) select 'a' || g from generate_series(1, $1) g")
        .bind(aggregates as i64)
        .execute(pool)
        .await
        .unwrap();
}

/// One business transaction, not yet ended: it bumps a random aggregate's
/// version by 1 to 3 and inserts that many events carrying the versions.
/// Also says whether to roll it back (with probability `rollback_rate`).
pub async fn business_transaction(
    pool: &PgPool,
    aggregates: u32,
    rollback_rate: f64,
) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, Vec<Event>, bool), sqlx::Error> {
    let (aggregate, n, roll_back) = {
        let mut rng = rand::rng();
        (
            format!("a{}", rng.random_range(1..=aggregates)),
            rng.random_range(1..=3i64),
            rng.random_bool(rollback_rate),
        )
    };
    let mut tx = pool.begin().await?;
    let version: i64 =
        sqlx::query_scalar("update agg set version = version + $2 where id = $1 returning version")
            .bind(&aggregate)
            .bind(n)
            .fetch_one(&mut *tx)
            .await?;
    let events: Vec<Event> = (0..n)
        .map(|i| {
            Event::new(
                "acct",
                &aggregate,
                "changed",
                json!({"version": version - n + 1 + i}),
            )
        })
        .collect();
    outbox::insert_all(&mut tx, &events).await?;
    Ok((tx, events, roll_back))
}

/// `transactions` business transactions of 1 to 3 events for one random
/// aggregate each; roughly `rollback_rate` of them roll back.
pub async fn write(
    pool: &PgPool,
    transactions: u32,
    aggregates: u32,
    rollback_rate: f64,
) -> Written {
    let mut written = Written::default();
    for _ in 0..transactions {
        let (tx, events, roll_back) = business_transaction(pool, aggregates, rollback_rate)
            .await
            .unwrap();
        let ids = events.iter().map(|e| e.id);
        if roll_back {
            tx.rollback().await.unwrap();
            written.rolled_back.extend(ids);
        } else {
            tx.commit().await.unwrap();
            written.committed.extend(ids);
        }
    }
    written
}

/// Like [`write`], but keeps going through database outages (a Postgres
/// restart): a transaction that failed before its commit was sent is
/// retried; one whose commit failed has an unknown outcome and is counted
/// in `uncertain` (its rows are in neither list). `agg.version` tells the
/// truth afterwards, see [`assert_versions_match`].
pub async fn write_through_faults(
    pool: &PgPool,
    transactions: u32,
    aggregates: u32,
    rollback_rate: f64,
) -> (Written, usize) {
    let mut written = Written::default();
    let mut uncertain = 0;
    let mut done = 0;
    while done < transactions {
        let (tx, events, roll_back) =
            match business_transaction(pool, aggregates, rollback_rate).await {
                Ok(ok) => ok,
                Err(_) => {
                    // The database is down: try again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
        let ids = events.iter().map(|e| e.id);
        if roll_back {
            let _ = tx.rollback().await;
            written.rolled_back.extend(ids);
        } else {
            match tx.commit().await {
                Ok(()) => written.committed.extend(ids),
                Err(_) => uncertain += 1,
            }
        }
        done += 1;
    }
    (written, uncertain)
}
