//! Leadership is a lease that only progress renews, in both modes.
//!
//! - A leader frozen with SIGSTOP (a hung process, a long pause), or whose
//!   relay loop is parked inside the process while its connections stay
//!   healthy, is fenced by the standby, which publishes every row written
//!   after the hang within the documented bound (15 s with the default
//!   `--lease 10s`). Resumed, the old leader steps down and confirms nothing:
//!   a trigger records which instance ran every delete from the outbox, and
//!   in tail mode the slot stays with the new leader's walsender. No row is
//!   lost, and first deliveries keep per-aggregate order.
//! - A broker outage longer than the lease is not a hang: the leader keeps
//!   its lease (same epoch), the standby never becomes active, readiness
//!   says why, and everything arrives once the brokers are back.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::PgPool;
use support::*;
use tokio::process::Child;

const DEADLINE: Duration = Duration::from_secs(120);
const ACTIVE: &str = "active: this instance holds the relay lock";
const STANDING_BY: &str = "standing by";
/// The README's bound with the default `--lease 10s`: a standby publishes
/// again within this long of the leader hanging.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

/// Against a real broker every test here shares its one process, which the
/// outage tests freeze: they run alone (write), the others together (read).
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The lease's epoch: it grows with every acquisition.
async fn epoch(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select epoch from relay_lease")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn pid(child: &Child) -> u32 {
    child.id().expect("the relay is running")
}

fn signal(child: &Child, signal: Signal) {
    kill(Pid::from_raw(pid(child) as i32), signal).unwrap();
}

/// How the active relay hangs.
#[derive(Clone, Copy)]
enum Hang {
    /// SIGSTOP: the whole process freezes; its kernel still keeps its TCP
    /// connections open.
    Freeze,
    /// The test hook parks the relay loop between batches while the
    /// process, its connections and its endpoints go on.
    ParkLoop,
}

async fn a_hung_leader_is_fenced_and_replaced(mode: &'static str, hang: Hang) {
    let _broker = BROKER.read().await;
    let t = Setup::on(fresh_database().await, Kafka::start(), mode).await;
    let pool = &t.pool;
    audit_confirms(pool, 1).await;
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let dir = tempfile::tempdir().unwrap();
    let park = dir.path().join("park");

    let mut cmd = t.relay_command();
    cmd.env("OUTBOX_TEST_PARK_FILE", &park);
    let (mut first, first_log) = spawn_logged(cmd);
    first_log.wait_for_line(ACTIVE, DEADLINE).await;
    let (mut second, second_log) = t.logged_relay(&[]);
    second_log.wait_for_line(STANDING_BY, DEADLINE).await;

    let mut written = write(pool, 100, 20, 0.1).await;
    wait_until_drained(pool, DEADLINE).await;

    let hung = match hang {
        Hang::Freeze => {
            signal(&first, Signal::SIGSTOP);
            Instant::now()
        }
        Hang::ParkLoop => {
            std::fs::write(&park, b"").unwrap();
            first_log.wait_for_line("relay loop parked", DEADLINE).await;
            Instant::now()
        }
    };
    let after = write(pool, 600, 20, 0.1).await;
    wait_until_drained(pool, DEADLINE).await;
    let took = hung.elapsed();
    eprintln!("{mode}: the rows written after the hang were published {took:?} after it");
    assert!(
        took < TAKEOVER_BOUND,
        "the rows written after the hang were published {took:?} after it; the bound is {TAKEOVER_BOUND:?}:\n{}",
        second_log.text()
    );
    second_log
        .wait_for_line("ended its Postgres sessions", Duration::from_secs(1))
        .await;
    second_log
        .wait_for_line(ACTIVE, Duration::from_secs(1))
        .await;
    written.append(after);
    let confirmed_before_resuming = confirmed_by(pool, pid(&first)).await;
    assert!(
        confirmed_before_resuming > 0,
        "the first leader confirmed nothing before it hung"
    );

    // The old leader comes back: it must step down, not confirm.
    match hang {
        Hang::Freeze => signal(&first, Signal::SIGCONT),
        Hang::ParkLoop => std::fs::remove_file(&park).unwrap(),
    }
    first_log.wait_for_line("lost the lease", DEADLINE).await;
    let later = write(pool, 100, 20, 0.1).await;
    written.append(later);
    let records = consume_and_drain(
        pool,
        &t.kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;

    assert_eq!(
        confirmed_by(pool, pid(&first)).await,
        confirmed_before_resuming,
        "the old leader confirmed rows after it resumed:\n{}",
        first_log.text()
    );
    assert!(confirmed_by(pool, pid(&second)).await > 0);
    if mode == "tail" {
        let holders: Vec<String> = sqlx::query_scalar(
            "select a.application_name from pg_replication_slots s join pg_stat_activity a on a.pid = s.active_pid where s.slot_name = $1",
        )
        .bind(&t.slot)
        .fetch_all(pool)
        .await
        .unwrap();
        let second_id = format!("/{}/", pid(&second));
        assert!(
            holders.len() == 1 && holders[0].contains(&second_id),
            "the slot is held by {holders:?}, not by the new leader (pid {})",
            pid(&second)
        );
        let old_walsenders: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where backend_type = 'walsender' and application_name like '%/' || $1 || '/%'",
        )
        .bind(pid(&first).to_string())
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(
            old_walsenders, 0,
            "the old leader streams from the WAL again"
        );
    }
    for (child, log) in [(&mut first, &first_log), (&mut second, &second_log)] {
        assert!(
            child.try_wait().unwrap().is_none(),
            "a relay exited:\n{}",
            log.text()
        );
    }
    // `status` names the new leader, whose lease is fresh.
    let active = second_log.wait_for_line(ACTIVE, Duration::ZERO).await;
    let instance = active
        .split("instance=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the active line names the instance")
        .trim_matches('"');
    let status = relay_binary()
        .args(["status", "--database-url", &t.url])
        .output()
        .await
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!(
            "leader              {instance} (epoch 2, connected)"
        )),
        "{status}"
    );
    assert!(status.contains("takeovers           1"), "{status}");
    let address = endpoint_address(&second_log, DEADLINE).await;
    let metrics = get(&address, "/metrics").await.1;
    assert_eq!(
        value(&metrics, "outbox_relay_takeovers_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "outbox_relay_fenced_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "outbox_relay_active"),
        Some(1.0),
        "{metrics}"
    );
    first.kill().await.unwrap();
    second.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_a_frozen_leader_is_fenced_and_replaced() {
    a_hung_leader_is_fenced_and_replaced("poll", Hang::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_a_frozen_leader_is_fenced_and_replaced() {
    a_hung_leader_is_fenced_and_replaced("tail", Hang::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_a_leader_whose_loop_is_stuck_is_fenced_and_replaced() {
    a_hung_leader_is_fenced_and_replaced("poll", Hang::ParkLoop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_a_leader_whose_loop_is_stuck_is_fenced_and_replaced() {
    a_hung_leader_is_fenced_and_replaced("tail", Hang::ParkLoop).await;
}

/// A leader retrying through a broker outage is at work, not hung.
async fn a_broker_outage_longer_than_the_lease_moves_no_leadership(mode: &'static str, test: &str) {
    let Some(kafka) = Kafka::stoppable(test) else {
        return;
    };
    let _broker = BROKER.write().await;
    let t = Setup::on(fresh_database().await, kafka, mode).await;
    let pool = &t.pool;
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let lease = Duration::from_secs(3);
    // Records fail within 4 s, or 6 s more when a request was in flight to
    // a broker that went silent, so the outage spans several failed
    // attempts, each followed by a backoff, as well as several leases.
    let flags = [
        "--lease",
        "3s",
        "--kafka-config",
        "message.timeout.ms=4000,socket.timeout.ms=6000",
    ];
    let (mut first, first_log) = t.logged_relay(&flags);
    first_log.wait_for_line(ACTIVE, DEADLINE).await;
    let (mut second, second_log) = t.logged_relay(&flags);
    second_log.wait_for_line(STANDING_BY, DEADLINE).await;
    let address = endpoint_address(&first_log, DEADLINE).await;

    let mut written = write(pool, 100, 20, 0.1).await;
    wait_until_drained(pool, DEADLINE).await;
    let epoch_before = epoch(pool).await;

    t.kafka.stop_brokers();
    let stopped = Instant::now();
    let during = write(pool, 100, 20, 0.1).await;
    written.append(during);
    wait_for("/readyz to say that Kafka is failing", DEADLINE, || async {
        let (status, body) = get(&address, "/readyz").await;
        status == 503 && body.contains("publishing to Kafka")
    })
    .await;
    wait_for(
        "the outage to outlast four leases and three failed attempts",
        DEADLINE,
        || async {
            assert_eq!(
                epoch(pool).await,
                epoch_before,
                "leadership moved during the outage"
            );
            let failures = value(
                &get(&address, "/metrics").await.1,
                "outbox_relay_failures_total",
            );
            stopped.elapsed() > lease * 4 && failures.is_some_and(|f| f >= 3.0)
        },
    )
    .await;
    assert!(
        outbox_count(pool).await > 0,
        "rows left the outbox while every broker was down"
    );
    assert_eq!(
        epoch(pool).await,
        epoch_before,
        "leadership moved during the outage"
    );
    t.kafka.resume_brokers();

    let records = consume_and_drain(
        pool,
        &t.kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    assert_eq!(
        epoch(pool).await,
        epoch_before,
        "leadership moved during the outage"
    );
    assert!(
        !second_log.text().contains(ACTIVE),
        "the standby took over from a leader that was only waiting for Kafka:\n{}",
        second_log.text()
    );
    assert!(
        !first_log.text().contains("lost the lease"),
        "the leader stepped down during the outage:\n{}",
        first_log.text()
    );
    first.kill().await.unwrap();
    second.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_a_broker_outage_longer_than_the_lease_moves_no_leadership() {
    a_broker_outage_longer_than_the_lease_moves_no_leadership(
        "poll",
        "poll_mode_a_broker_outage_longer_than_the_lease_moves_no_leadership",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_a_broker_outage_longer_than_the_lease_moves_no_leadership() {
    a_broker_outage_longer_than_the_lease_moves_no_leadership(
        "tail",
        "tail_mode_a_broker_outage_longer_than_the_lease_moves_no_leadership",
    )
    .await;
}

/// `--lease` below the minimum is refused before anything connects.
#[tokio::test]
async fn a_lease_too_short_is_one_line_and_exit_2() {
    let out = relay_binary()
        .args([
            "run",
            "--database-url",
            "postgres://app:secret@127.0.0.1:1/app",
            "--brokers",
            "127.0.0.1:1",
            "--lease",
            "500ms",
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--lease (OUTBOX_LEASE) 500ms is too short"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
}

/// Fencing ends another session, which Postgres allows only to a member of
/// its role, a holder of pg_signal_backend, or a superuser. Relays running
/// as two unrelated roles cannot fence each other: the standby says so and
/// why, publishes nothing while the leader is frozen, and once the leader
/// resumes it steps down by itself and the outbox drains with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_that_may_not_fence_says_why_and_waits() {
    let _broker = BROKER.read().await;
    let url = fresh_database().await;
    let t = Setup::on(url.clone(), Kafka::start(), "poll").await;
    let pool = &t.pool;
    create_aggregates(pool, 20).await;
    let topic = t.topic("acct", 4).await;
    let suffix = t.prefix.replace('-', "_");
    let mut urls = Vec::new();
    for name in ["a", "b"] {
        let role = format!("relay_{name}_{suffix}");
        for statement in [
            format!("create role {role} login password 'pw'"),
            format!("grant all on all tables in schema public to {role}"),
        ] {
            sqlx::query(&statement).execute(pool).await.unwrap();
        }
        let parsed = url::Url::parse(&url).unwrap();
        let mut as_role = parsed.clone();
        as_role.set_username(&role).unwrap();
        as_role.set_password(Some("pw")).unwrap();
        urls.push(as_role.to_string());
    }
    let relay_as = |url: &str| {
        let mut cmd = relay_command_in("poll", url, &t.kafka.brokers(), &t.prefix);
        cmd.args(["--lease", "3s"]);
        spawn_logged(cmd)
    };
    let (mut first, first_log) = relay_as(&urls[0]);
    first_log.wait_for_line(ACTIVE, DEADLINE).await;
    let (mut second, second_log) = relay_as(&urls[1]);
    second_log.wait_for_line(STANDING_BY, DEADLINE).await;

    let mut written = write(pool, 50, 20, 0.1).await;
    wait_until_drained(pool, DEADLINE).await;
    signal(&first, Signal::SIGSTOP);
    let after = write(pool, 50, 20, 0.1).await;
    written.append(after);
    let line = second_log
        .wait_for_line("may not end its session", DEADLINE)
        .await;
    assert!(line.contains("pg_signal_backend"), "{line}");
    assert!(
        outbox_count(pool).await > 0,
        "rows were published while the only relay allowed to was frozen"
    );
    assert!(!second_log.text().contains(ACTIVE), "{}", second_log.text());

    signal(&first, Signal::SIGCONT);
    first_log.wait_for_line("lost the lease", DEADLINE).await;
    let records = consume_and_drain(
        pool,
        &t.kafka.brokers(),
        &[&topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    first.kill().await.unwrap();
    second.kill().await.unwrap();
    assert_delivered(&records, &written);
    assert_order(&records);
}
