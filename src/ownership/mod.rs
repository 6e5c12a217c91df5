//! Who may read and confirm an outbox.
//!
//! Several relay instances may run against one outbox; exactly one is
//! active. Leadership is a [`Lease`] held in Postgres: the active instance
//! holds an advisory lock on its leader connection (so a crash or a lost
//! session frees it at once) and renews a row in `relay_lease` from its relay
//! loop, never from a task of its own, so only progress renews it. A standby
//! that finds the row older than the lease while its session still holds the
//! lock treats the leader as hung, ends that instance's Postgres sessions
//! (`pg_terminate_backend`) and takes over with a new epoch.
//!
//! Why a resumed leader confirms nothing: every confirm runs on the leader
//! connection (gone once fenced) and checks the epoch in the same statement,
//! and an instance whose lease ran out on its own clock refuses to touch the
//! connection at all ([`Leader::conn`]).
//!
//! A sharded outbox (`--shards N`) has one lease per lane, each taken and
//! fenced as above, and [`share`] spreads the lanes evenly over the live
//! instances.

pub(crate) mod lease;
pub mod share;

pub use lease::{Instance, Leader, Lease, acquire};
pub use share::{Share, track_members};

use crate::config::LeaseConfig;

/// What an instance contends for leadership with: who it is, and how long
/// a lease lasts.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub instance: Instance,
    pub lease: LeaseConfig,
}
