//! Sharing the lanes of a sharded outbox fairly among the instances that run
//! it.
//!
//! Every instance that runs an outbox's lanes holds a shared advisory lock on
//! the outbox's membership key for as long as it runs them, on a connection
//! of its own; the number of sessions holding it is the number of live
//! instances (a killed instance's session, and its lock, end with it; a hung
//! one's when a standby fences it). With `q = lanes / instances` (rounded
//! down), an instance takes a free lane only while it holds fewer than
//! `ceil(lanes / instances)` and, while another instance holds fewer than
//! `q`, only while it holds fewer than `q` itself; it hands over, between two
//! batches, the lanes it holds beyond the ceiling, and beyond `q` while
//! another instance holds fewer than `q`. So every instance ends up with `q`
//! or `q + 1` lanes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::DatabaseConfig;
use crate::database::{self, within};
use crate::error::Error;

/// This instance's part in one outbox's lanes: how many there are, how many
/// instances run them, how many this one holds. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Share(Arc<Counts>);

#[derive(Debug)]
struct Counts {
    lanes: usize,
    members: AtomicUsize,
    held: AtomicUsize,
    /// Some instance holds fewer than `lanes / members`.
    starving: AtomicBool,
}

impl Share {
    /// One lane (an unsharded outbox): always this instance's to take.
    pub fn whole() -> Share {
        Share::of(1)
    }

    /// `lanes` lanes, with this instance counted as the only member until
    /// [`track_members`] says otherwise.
    pub fn of(lanes: usize) -> Share {
        Share(Arc::new(Counts {
            lanes,
            members: AtomicUsize::new(1),
            held: AtomicUsize::new(0),
            starving: AtomicBool::new(false),
        }))
    }

    /// The most lanes an instance should hold: `ceil(lanes / instances)`.
    pub fn fair(&self) -> usize {
        let members = self.0.members.load(Ordering::Relaxed).max(1);
        self.0.lanes.div_ceil(members)
    }

    /// The fewest lanes an instance should hold: `lanes / instances`.
    pub fn floor(&self) -> usize {
        let members = self.0.members.load(Ordering::Relaxed).max(1);
        self.0.lanes / members
    }

    /// The most lanes this instance may keep now: the ceiling, or the floor
    /// while another instance holds fewer than the floor.
    fn limit(&self) -> usize {
        if self.0.starving.load(Ordering::Relaxed) {
            self.floor()
        } else {
            self.fair()
        }
    }

    pub(crate) fn set_starving(&self, starving: bool) {
        self.0.starving.store(starving, Ordering::Relaxed);
    }

    /// How many lanes this instance holds.
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Relaxed)
    }

    /// How many instances run the outbox.
    pub fn members(&self) -> usize {
        self.0.members.load(Ordering::Relaxed)
    }

    pub(crate) fn set_members(&self, members: usize) {
        self.0.members.store(members, Ordering::Relaxed);
    }

    /// Whether a standby lane may try to take its lane.
    pub(crate) fn may_take(&self) -> bool {
        self.held() < self.limit()
    }

    pub(crate) fn took(&self) {
        self.0.held.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn dropped(&self) {
        self.0.held.fetch_sub(1, Ordering::SeqCst);
    }

    /// Claims one of the lanes this instance holds beyond its share, for the
    /// caller to hand over: true for exactly as many callers as there are
    /// such lanes. The claim already counts the lane as no longer held.
    pub(crate) fn claim_release(&self) -> bool {
        let limit = self.limit();
        self.0
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held > limit).then(|| held - 1)
            })
            .is_ok()
    }
}

/// How often the members are counted.
const COUNT_EVERY: Duration = Duration::from_secs(1);

/// Joins the outbox's members and keeps `share`'s count of them current
/// until `shutdown`. A lost connection is opened again; meanwhile the last
/// count stands.
pub async fn track_members(database: DatabaseConfig, share: Share, shutdown: CancellationToken) {
    let key = format!("outbox-relay:{}:members", database.schema());
    let mut reported = 0;
    while !shutdown.is_cancelled() {
        let result = async {
            let mut conn = database::connect(&database).await?;
            join(&mut conn, &database, &key).await?;
            loop {
                let members = count(&mut conn, &database, &key).await?;
                let floor = share.0.lanes / members.max(1);
                let at_floor = holding_at_least(&mut conn, &database, share.0.lanes, floor).await?;
                share.set_starving(at_floor < members);
                if members != reported {
                    info!(
                        instances = members,
                        lanes = share.0.lanes,
                        "{members} instance(s) share this outbox's {} lanes",
                        share.0.lanes
                    );
                    reported = members;
                }
                share.set_members(members);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok::<(), Error>(()),
                    _ = tokio::time::sleep(COUNT_EVERY) => {}
                }
            }
        }
        .await;
        if let Err(e) = result {
            debug!(error = %e, "counting the instances that share the outbox; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(COUNT_EVERY) => {}
            }
        }
    }
}

async fn join(conn: &mut PgConnection, database: &DatabaseConfig, key: &str) -> Result<(), Error> {
    within(
        database.call_timeout(),
        "joining the instances that share the outbox",
        sqlx::query("select pg_advisory_lock_shared(hashtextextended($1, 0))")
            .bind(key)
            .execute(conn),
    )
    .await
    .map(drop)
}

/// Sessions holding the membership lock (an advisory lock on a bigint key
/// shows in `pg_locks` as its high and low halves).
const MEMBERS: &str = "select count(*) from pg_locks k \
     where k.locktype = 'advisory' and k.mode = 'ShareLock' and k.granted and k.objsubid = 1 \
     and k.database = (select oid from pg_database where datname = current_database()) \
     and k.classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::oid \
     and k.objid = (hashtextextended($1, 0) & 4294967295)::oid";

/// Live instances holding at least `floor` lanes of this outbox's layout
/// (`lanes` lanes): a lane counts for the instance whose session holds its
/// lock.
const HOLDING_AT_LEAST: &str = "select count(*) from ( \
       select l.holder from relay_lease l where l.outbox = $1 and l.shards = $2 \
       and exists (select 1 from pg_locks k where k.pid = l.backend_pid \
         and k.locktype = 'advisory' and k.granted and k.objsubid = 1 \
         and k.database = (select oid from pg_database where datname = current_database()) \
         and k.classid = ((hashtextextended(l.name, 0) >> 32) & 4294967295)::oid \
         and k.objid = (hashtextextended(l.name, 0) & 4294967295)::oid) \
       group by l.holder having count(*) >= $3) held";

async fn holding_at_least(
    conn: &mut PgConnection,
    database: &DatabaseConfig,
    lanes: usize,
    floor: usize,
) -> Result<usize, Error> {
    let holders: i64 = within(
        database.call_timeout(),
        "counting the lanes each instance holds",
        sqlx::query_scalar(HOLDING_AT_LEAST)
            .bind(database.schema().as_str())
            .bind(i32::try_from(lanes).unwrap_or(i32::MAX))
            .bind(i64::try_from(floor).unwrap_or(i64::MAX))
            .fetch_one(conn),
    )
    .await?;
    Ok(usize::try_from(holders).unwrap_or(0))
}

async fn count(
    conn: &mut PgConnection,
    database: &DatabaseConfig,
    key: &str,
) -> Result<usize, Error> {
    let members: i64 = within(
        database.call_timeout(),
        "counting the instances that share the outbox",
        sqlx::query_scalar(MEMBERS).bind(key).fetch_one(conn),
    )
    .await?;
    Ok(usize::try_from(members).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_instance_takes_its_share_and_hands_over_the_rest() {
        let share = Share::of(8);
        // Alone, an instance takes every lane.
        for _ in 0..8 {
            assert!(share.may_take());
            share.took();
        }
        assert!(!share.may_take());
        assert!(!share.claim_release());
        // Two more join: its share is 3, so exactly 5 lanes are handed over.
        share.set_members(3);
        assert_eq!(share.fair(), 3);
        let released = (0..8).filter(|_| share.claim_release()).count();
        assert_eq!(released, 5);
        assert_eq!(share.held(), 3);
        assert!(!share.may_take());
        // One leaves: the share grows to 4 and one more lane may be taken.
        share.set_members(2);
        assert!(share.may_take());
        share.took();
        assert!(!share.may_take());
        share.dropped();
        assert_eq!(share.held(), 3);
    }

    #[test]
    fn an_instance_with_less_than_the_floor_gets_a_lane_from_the_others() {
        // 4 lanes, 3 instances: 2, 2 and 0 respects the ceiling (2), but the
        // third holds less than the floor (1): the others keep 1 each.
        let share = Share::of(4);
        share.set_members(3);
        share.took();
        share.took();
        assert!(!share.may_take());
        assert!(!share.claim_release());
        share.set_starving(true);
        assert!(share.claim_release());
        assert!(!share.claim_release(), "one lane is enough");
        assert_eq!(share.held(), 1);
        assert!(
            !share.may_take(),
            "the free lane is left to the starving one"
        );
        share.set_starving(false);
        assert!(share.may_take());
    }

    #[test]
    fn an_unsharded_outbox_is_never_handed_over() {
        let share = Share::whole();
        assert!(share.may_take());
        share.took();
        share.set_members(5);
        assert_eq!(share.fair(), 1);
        assert!(!share.claim_release());
    }
}
