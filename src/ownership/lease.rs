//! The lease: taking it, renewing it, and fencing a holder that stopped
//! renewing it.
//!
//! A holder is hung, for a standby, when both hold: its row in
//! `relay_lease` was last renewed more than a lease ago (by the database's
//! clock, so the instances' clocks do not matter), and the session that
//! renewed it still holds the advisory lock (so the row is not a leftover of
//! an instance that is gone, which frees the lock by itself).

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{DatabaseConfig, Lane};
use crate::database::{timed, within};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::ownership::{Candidate, Share};

/// What every session of the relay calls itself in `pg_stat_activity`,
/// followed by the instance's id.
const APPLICATION: &str = "outbox-relay";

/// One relay process, as its Postgres sessions name it: `HOST/PID/NONCE` in
/// their `application_name`, so an operator can tell instances apart and a
/// standby can end every session of a hung one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    id: String,
}

impl Instance {
    /// A new id for this process.
    pub fn generate() -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        // application_name keeps 63 printable ASCII bytes.
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect();
        let nonce = rand::random::<u32>() & 0x00ff_ffff;
        Instance {
            id: format!("{host}/{}/{nonce:06x}", std::process::id()),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The `application_name` of every session this instance opens.
    pub fn application_name(&self) -> String {
        format!("{APPLICATION} {}", self.id)
    }
}

/// A lease this instance holds.
#[derive(Debug)]
pub struct Lease {
    name: String,
    epoch: i64,
    ttl: Duration,
    /// When the lease ends by this instance's own clock: a lease after the
    /// last accepted renewal was *sent*, so it never outlives the one a
    /// standby sees.
    valid_until: Instant,
}

impl Lease {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Grows with every acquisition; a confirm carrying an older epoch is
    /// refused.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// Fails once the lease has run out on this instance's clock: its loop
    /// made no progress for a whole lease (hung, paused, or a call that never
    /// came back), so a standby may have taken over. Self-fencing.
    pub fn check(&self) -> Result<(), Error> {
        if Instant::now() < self.valid_until {
            return Ok(());
        }
        Err(Error::LeaseLost {
            name: self.name.clone(),
            cause: format!(
                "this instance's relay loop renewed nothing for over {} (--lease), so a standby may have taken over",
                humantime::format_duration(self.ttl)
            ),
        })
    }

    /// Records a renewal the database accepted, sent at `sent`.
    pub(crate) fn renewed(&mut self, sent: Instant) {
        self.valid_until = sent + self.ttl;
    }

    /// The error for a renewal the database refused: the epoch moved on.
    pub(crate) fn lost(&self) -> Error {
        Error::LeaseLost {
            name: self.name.clone(),
            cause: format!(
                "another instance took it over (epoch {} is no longer current)",
                self.epoch
            ),
        }
    }
}

/// The leader connection and the lease it holds. The connection is reachable
/// only while the lease is fresh, so a leader that stalled past its lease
/// reads and confirms nothing more.
pub struct Leader {
    conn: PgConnection,
    lease: Lease,
    /// Counts this lane as held while the leader lives.
    share: Share,
    counted: bool,
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.counted {
            self.share.dropped();
        }
    }
}

pub(crate) const RENEW: &str =
    "update relay_lease set renewed_at = now() where name = $1 and epoch = $2";

impl Leader {
    /// If this instance holds more lanes than its share, gives this one up
    /// (closing the connection frees its lock at once) and returns `None`;
    /// otherwise returns the leader. Call it between batches only, with
    /// nothing in flight.
    pub fn keep_or_hand_over(mut self) -> Option<Leader> {
        if !self.share.claim_release() {
            return Some(self);
        }
        // The claim already counted the lane as released.
        self.counted = false;
        info!(
            name = self.lease.name,
            held = self.share.held(),
            instances = self.share.members(),
            "handing the lane over: this instance held more than its share of the lanes"
        );
        None
    }

    /// The leader connection, if the lease is still fresh.
    pub fn conn(&mut self) -> Result<&mut PgConnection, Error> {
        self.lease.check()?;
        Ok(&mut self.conn)
    }

    /// The connection and the lease together, for a confirm that renews the
    /// lease in its own statement. Fails like [`Leader::conn`].
    pub(crate) fn parts(&mut self) -> Result<(&mut PgConnection, &mut Lease), Error> {
        self.lease.check()?;
        Ok((&mut self.conn, &mut self.lease))
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Renews the lease if a quarter of it passed since the last renewal,
    /// for a bounded wait inside a step (a slot still held by a session that
    /// is going away).
    pub async fn renew_if_due(&mut self, limit: Duration) -> Result<(), Error> {
        let renewed_ago = self.lease.ttl.saturating_sub(
            self.lease
                .valid_until
                .saturating_duration_since(Instant::now()),
        );
        if renewed_ago < self.lease.ttl / 4 {
            return self.lease.check();
        }
        self.renew(limit).await
    }

    /// Renews the lease within `limit`; fails with [`Error::LeaseLost`] if
    /// another instance took it over or it ran out here first.
    pub async fn renew(&mut self, limit: Duration) -> Result<(), Error> {
        let (conn, lease) = self.parts()?;
        let sent = Instant::now();
        let doing = "renewing the lease";
        let renewed = within(
            limit,
            doing,
            sqlx::query(RENEW)
                .bind(&lease.name)
                .bind(lease.epoch)
                .execute(conn),
        )
        .await?;
        if renewed.rows_affected() == 0 {
            return Err(lease.lost());
        }
        lease.renewed(sent);
        Ok(())
    }
}

const TRY_LOCK: &str = "select pg_try_advisory_lock(hashtextextended($1, 0))";

const HOLDER: &str = "select holder from relay_lease where name = $1";

const TAKE: &str = "insert into relay_lease as l (name, holder, epoch, backend_pid, outbox, shards) \
     values ($1, $2, 1, pg_backend_pid(), $3, $4) \
     on conflict (name) do update set holder = excluded.holder, epoch = l.epoch + 1, \
     backend_pid = excluded.backend_pid, acquired_at = now(), renewed_at = now(), \
     takeovers = l.takeovers + (l.holder <> excluded.holder)::int, \
     outbox = excluded.outbox, shards = excluded.shards \
     returning epoch";

/// Serializes taking leases of one outbox, so that two instances with
/// different `--shards` cannot both start.
const LAYOUT_LOCK: &str = "select pg_advisory_xact_lock(hashtextextended($1, 0))";

/// A live holder of a lease on the outbox `$1` with another `--shards` than
/// `$2`: its session still holds an advisory lock.
const OTHER_LAYOUT: &str = "select l.holder, l.shards from relay_lease l \
     where l.outbox = $1 and l.shards <> $2 \
     and exists (select 1 from pg_locks k where k.pid = l.backend_pid \
       and k.locktype = 'advisory' and k.granted \
       and k.database = (select oid from pg_database where datname = current_database())) \
     limit 1";

/// The holder of `$1` if its lease is older than `$2` seconds and the
/// session that renewed it still holds the advisory lock (an advisory lock
/// on a bigint key shows in `pg_locks` as its high and low halves).
const STALE_HOLDER: &str = "select l.holder, l.epoch, l.backend_pid, \
     extract(epoch from now() - l.renewed_at)::float8 \
     from relay_lease l where l.name = $1 and now() - l.renewed_at > make_interval(secs => $2) \
     and exists (select 1 from pg_locks k where k.pid = l.backend_pid \
       and k.locktype = 'advisory' and k.granted and k.objsubid = 1 \
       and k.database = (select oid from pg_database where datname = current_database()) \
       and k.classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::oid \
       and k.objid = (hashtextextended($1, 0) & 4294967295)::oid)";

/// Ends every session of a holder whose lease is still stale at this
/// instant: the one holding the lock, and the others it named itself in
/// (its walsender, its copy of the outbox). Returns how many it ended.
const FENCE: &str = "select count(*) filter (where pg_terminate_backend(a.pid)) \
     from pg_stat_activity a join relay_lease l on l.name = $1 \
     where l.epoch = $2 and now() - l.renewed_at > make_interval(secs => $3) \
     and a.pid <> pg_backend_pid() \
     and (a.pid = l.backend_pid or a.application_name = $4 || ' ' || l.holder)";

/// How often a standby asks for the lock and looks at the lease.
const STANDBY_INTERVAL: Duration = Duration::from_secs(1);

/// How soon a standby asks again after fencing: the ended sessions free the
/// lock within milliseconds.
const AFTER_FENCE: Duration = Duration::from_millis(100);

/// Waits, as a standby, until this instance holds the lease of `lane` on
/// `conn`, fencing a holder whose lease ran out. `None` on shutdown. Fails
/// if a live instance runs the outbox with another `--shards`.
pub async fn acquire(
    mut conn: PgConnection,
    lane: Lane,
    share: &Share,
    candidate: &Candidate,
    database: &DatabaseConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<Leader>, Error> {
    let limit = database.call_timeout();
    let name = lane.lease_name(database.schema());
    let instance = &candidate.instance;
    let ttl = candidate.lease.ttl();
    let mut standing_by = false;
    let mut cannot_fence: Option<String> = None;
    loop {
        // Beyond its share of the lanes, an instance leaves a free lane to
        // the others (it still fences a hung holder).
        let locked: bool = share.may_take()
            && within(
                limit,
                "taking the leader lock",
                sqlx::query_scalar(TRY_LOCK)
                    .bind(&name)
                    .fetch_one(&mut conn),
            )
            .await?;
        if locked {
            let sent = Instant::now();
            let taking = take(&mut conn, &name, lane, database, instance);
            let (previous, epoch) = timed(limit, "taking the lease", taking).await?;
            if let Some(previous) = previous.filter(|p| p != instance.id()) {
                metrics.took_over();
                info!(previous = %previous, epoch, "took the lease over from {previous}");
            }
            if lane == Lane::WHOLE {
                info!(database = %database.target(), instance = instance.id(), epoch, "active: this instance holds the relay lock");
            } else {
                info!(database = %database.target(), instance = instance.id(), epoch, lane = %lane, "active: this instance holds lane {lane}");
            }
            metrics.set_active(true);
            share.took();
            return Ok(Some(Leader {
                conn,
                lease: Lease {
                    name,
                    epoch,
                    ttl,
                    valid_until: sent + ttl,
                },
                share: share.clone(),
                counted: true,
            }));
        }
        if !standing_by {
            info!(database = %database.target(), instance = instance.id(), "standing by: another relay instance holds the lock for this outbox");
            standing_by = true;
        }
        let mut wait = STANDBY_INTERVAL;
        let stale = within(
            limit,
            "reading the lease",
            sqlx::query_as::<_, (String, i64, i32, f64)>(STALE_HOLDER)
                .bind(&name)
                .bind(ttl.as_secs_f64())
                .fetch_optional(&mut conn),
        )
        .await?;
        if let Some((holder, epoch, pid, age)) = stale {
            match fence(&mut conn, &name, epoch, ttl, limit).await {
                Ok(ended) => {
                    warn!(holder = %holder, pid, age_secs = age, sessions = ended,
                        "the active relay {holder} renewed its lease {age:.1}s ago (--lease {}): it is hung, paused or cut off; ended its Postgres sessions and taking over",
                        humantime::format_duration(ttl));
                    metrics.fenced();
                    cannot_fence = None;
                    wait = AFTER_FENCE;
                }
                Err(Fence::Denied(cause)) => {
                    if cannot_fence.as_deref() != Some(holder.as_str()) {
                        warn!(holder = %holder, pid,
                            "the active relay {holder} renewed its lease {age:.1}s ago and seems hung, but role \"{}\" may not end its session (pid {pid}): {cause}; run every relay instance as the same role, or grant pg_signal_backend to this one; until then this standby waits for Postgres to drop that session",
                            database.target().user);
                        cannot_fence = Some(holder);
                    }
                }
                Err(Fence::Failed(e)) => return Err(e),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Takes the lease on `conn`, which holds its lock: a new epoch fences every
/// earlier holder. Returns the previous holder and the new epoch.
async fn take(
    conn: &mut PgConnection,
    name: &str,
    lane: Lane,
    database: &DatabaseConfig,
    instance: &Instance,
) -> Result<(Option<String>, i64), Error> {
    let doing = "taking the lease";
    let outbox = database.schema().as_str();
    let shards = i32::from(lane.shards().get());
    let mut tx = conn.begin().await.map_err(Error::db(doing))?;
    sqlx::query(LAYOUT_LOCK)
        .bind(format!("outbox-relay:{outbox}:layout"))
        .execute(&mut *tx)
        .await
        .map_err(Error::db(doing))?;
    let other: Option<(String, i32)> = sqlx::query_as(OTHER_LAYOUT)
        .bind(outbox)
        .bind(shards)
        .fetch_optional(&mut *tx)
        .await
        .map_err(Error::db(doing))?;
    if let Some((holder, theirs)) = other {
        return Err(Error::Setup(format!(
            "relay instance {holder} runs the outbox in schema \"{outbox}\" at {} with --shards {theirs}, and this one was started with --shards {shards}: instances that split an outbox differently would publish one aggregate twice at once; give every instance the same --shards (to change it, stop them all, then start them with the new value)",
            database.target()
        )));
    }
    let previous: Option<String> = sqlx::query_scalar(HOLDER)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(Error::db(doing))?;
    let epoch: i64 = sqlx::query_scalar(TAKE)
        .bind(name)
        .bind(instance.id())
        .bind(outbox)
        .bind(shards)
        .fetch_one(&mut *tx)
        .await
        .map_err(Error::db(doing))?;
    tx.commit().await.map_err(Error::db(doing))?;
    Ok((previous, epoch))
}

enum Fence {
    /// The role may not end the holder's sessions.
    Denied(String),
    Failed(Error),
}

async fn fence(
    conn: &mut PgConnection,
    name: &str,
    epoch: i64,
    ttl: Duration,
    limit: Duration,
) -> Result<i64, Fence> {
    let doing = "fencing a hung relay";
    let ended = timed(limit, doing, async {
        Ok(sqlx::query_scalar::<_, i64>(FENCE)
            .bind(name)
            .bind(epoch)
            .bind(ttl.as_secs_f64())
            .bind(APPLICATION)
            .fetch_one(conn)
            .await)
    })
    .await
    .map_err(Fence::Failed)?;
    match ended {
        Ok(ended) => Ok(ended),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            Err(Fence::Denied(e.message().to_owned()))
        }
        Err(e) => Err(Fence::Failed(Error::db(doing)(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(valid_for: Duration, ran_out: bool) -> Lease {
        let now = Instant::now();
        Lease {
            name: "outbox-relay:public".into(),
            epoch: 3,
            ttl: valid_for,
            valid_until: if ran_out {
                now - valid_for
            } else {
                now + valid_for
            },
        }
    }

    #[test]
    fn a_lease_that_ran_out_here_refuses_to_act() {
        assert!(lease(Duration::from_secs(10), false).check().is_ok());
        let err = lease(Duration::from_secs(10), true).check().unwrap_err();
        assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
        assert!(err.is_transient(), "stepping down is not an exit");
        let text = err.to_string();
        assert!(text.contains("\"outbox-relay:public\""), "{text}");
        assert!(text.contains("over 10s (--lease)"), "{text}");
    }

    #[test]
    fn a_renewal_extends_the_lease_from_when_it_was_sent() {
        let mut l = lease(Duration::from_secs(10), true);
        let sent = Instant::now() - Duration::from_secs(4);
        l.renewed(sent);
        assert_eq!(l.valid_until(), sent + Duration::from_secs(10));
        assert!(l.check().is_ok());
        let lost = l.lost().to_string();
        assert!(lost.contains("epoch 3 is no longer current"), "{lost}");
    }

    #[test]
    fn every_session_names_the_instance_within_postgres_limits() {
        let a = Instance::generate();
        let b = Instance::generate();
        assert_ne!(a, b);
        let name = a.application_name();
        assert!(name.starts_with("outbox-relay "), "{name}");
        assert!(
            name.contains(&format!("/{}/", std::process::id())),
            "{name}"
        );
        // Postgres keeps 63 bytes of printable ASCII.
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.chars().all(|c| c.is_ascii_graphic() || c == ' '),
            "{name}"
        );
    }
}
