//! Lanes (`run --shards N`, poll mode): several relay instances share the
//! shards of one outbox. Checked from Postgres (who holds which lane's lock)
//! and from Kafka (every committed row, in order per aggregate).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use sqlx::PgPool;
use support::*;
use tokio::process::Child;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(120);
/// Lanes in the poll-mode tests; tail mode's tests use fewer, as each lane
/// has a walsender and a slot.
const SHARDS: usize = 8;
const TAIL_SHARDS: usize = 4;
/// Enough aggregates that every lane gets some, and most buckets next to a
/// lane's edge do too.
const AGGREGATES: u32 = 400;
/// How long the lanes may take to spread evenly after an instance joins or
/// leaves: a standby lane asks for its lock every second, the instances are
/// counted every second, and an instance above its share hands a lane over
/// after the batch in flight (or within a quarter lease when idle).
const CONVERGED_WITHIN: Duration = Duration::from_secs(15);

/// The holders of the lanes' locks: for each lane's lease, the instances
/// (as `relay_lease.holder`, from the application name of each session that
/// holds the lane's advisory lock) and whether the session that renews the
/// lease is one of them.
async fn lane_holders(pool: &PgPool, shards: usize) -> HashMap<String, (Vec<String>, bool)> {
    let rows: Vec<(String, Vec<String>, bool)> = sqlx::query_as(
        "select l.name, \
           array(select substr(a.application_name, length('outbox-relay ') + 1) \
                 from pg_locks k join pg_stat_activity a on a.pid = k.pid \
                 where k.locktype = 'advisory' and k.granted and k.objsubid = 1 \
                 and k.database = (select oid from pg_database where datname = current_database()) \
                 and k.classid = ((hashtextextended(l.name, 0) >> 32) & 4294967295)::oid \
                 and k.objid = (hashtextextended(l.name, 0) & 4294967295)::oid), \
           exists (select 1 from pg_locks k where k.pid = l.backend_pid and k.locktype = 'advisory' \
                 and k.granted and k.objsubid = 1 \
                 and k.classid = ((hashtextextended(l.name, 0) >> 32) & 4294967295)::oid \
                 and k.objid = (hashtextextended(l.name, 0) & 4294967295)::oid) \
         from relay_lease l where l.name like 'outbox-relay:public/%-of-' || $1",
    )
    .bind(shards.to_string())
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(name, holders, renewer)| (name, (holders, renewer)))
        .collect()
}

/// Lanes held per instance, once every lane is held by exactly one instance
/// (the one whose session renews its lease); `None` while some lane is free.
async fn lanes_per_instance(pool: &PgPool, shards: usize) -> Option<HashMap<String, usize>> {
    let holders = lane_holders(pool, shards).await;
    if holders.len() != shards {
        return None;
    }
    let mut per_instance = HashMap::new();
    for (holders, renewer) in holders.values() {
        if holders.len() != 1 || !renewer {
            return None;
        }
        *per_instance.entry(holders[0].clone()).or_default() += 1;
    }
    Some(per_instance)
}

/// Waits until every lane is held and `instances` instances hold them evenly
/// (the counts differ by at most one); returns how long that took.
async fn wait_until_even(
    pool: &PgPool,
    shards: usize,
    instances: usize,
    within: Duration,
) -> Duration {
    let since = Instant::now();
    loop {
        if let Some(per_instance) = lanes_per_instance(pool, shards).await {
            let (least, most) = (
                per_instance.values().min().copied().unwrap_or(0),
                per_instance.values().max().copied().unwrap_or(0),
            );
            if per_instance.len() == instances && most - least <= 1 {
                return since.elapsed();
            }
        }
        assert!(
            since.elapsed() < within,
            "the lanes did not spread evenly over {instances} instances within {within:?}: {:?}",
            lane_holders(pool, shards).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples, until stopped, that no lane is ever held by two sessions. (Who
/// renews a lease is checked once the lanes settle: a new holder takes the
/// lock a moment before it writes the lease row.)
fn watch_lanes(pool: PgPool, shards: usize, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut samples = 0;
        while !stop.load(Ordering::Relaxed) {
            for (lane, (holders, _)) in lane_holders(&pool, shards).await {
                assert!(
                    holders.len() <= 1,
                    "lane {lane} has two owners: {holders:?}"
                );
            }
            samples += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        samples
    })
}

/// Writes business transactions until stopped.
fn keep_writing(pool: PgPool, stop: Arc<AtomicBool>) -> JoinHandle<Written> {
    tokio::spawn(async move {
        let mut written = Written::default();
        while !stop.load(Ordering::Relaxed) {
            written.append(write(&pool, 5, AGGREGATES, 0.1).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        written
    })
}

fn sharded(t: &Setup, shards: usize) -> (Child, RelayLog) {
    t.logged_relay(&["--shards", &shards.to_string(), "--batch-size", "20"])
}

/// Waits until every row committed in `written` arrived and the outbox
/// drained, checks that each relay still runs and stops it, and that every
/// committed row (and no rolled-back one) was delivered; returns what was
/// read.
async fn drain_and_stop(
    t: &Setup,
    topic: &str,
    written: &Written,
    relays: Vec<(&mut Child, &RelayLog)>,
) -> Vec<Consumed> {
    let records = consume_and_drain(
        &t.pool,
        &t.kafka.brokers(),
        &[topic],
        &written.committed,
        DEADLINE,
    )
    .await;
    for (relay, log) in relays {
        assert!(relay.try_wait().unwrap().is_none(), "{}", log.text());
        relay.kill().await.unwrap();
    }
    assert_delivered(&records, written);
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_three_instances_share_eight_lanes_through_kills() {
    three_instances_share_the_lanes_through_kills(Setup::new(Kafka::start()).await, SHARDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_three_instances_share_four_lanes_through_kills() {
    three_instances_share_the_lanes_through_kills(Setup::tail(Kafka::start()).await, TAIL_SHARDS)
        .await;
}

async fn three_instances_share_the_lanes_through_kills(t: Setup, shards: usize) {
    let pool = &t.pool;
    create_aggregates(pool, AGGREGATES).await;
    audit_confirms(pool, shards).await;
    let topic = t.topic("acct", 4).await;
    let mut relays: Vec<(Child, RelayLog)> = (0..3).map(|_| sharded(&t, shards)).collect();
    wait_until_even(pool, shards, 3, DEADLINE).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(pool.clone(), stop.clone());
    let watcher = watch_lanes(pool.clone(), shards, stop.clone());
    for _ in 0..5 {
        // A random moment: after a random number of further commits.
        let before = committed_events(pool).await;
        let more = rand::rng().random_range(20..120);
        wait_for("the writers to go on", DEADLINE, || async {
            committed_events(pool).await >= before + more
        })
        .await;
        let victim = rand::rng().random_range(0..relays.len());
        relays[victim].0.kill().await.unwrap();
        relays[victim] = sharded(&t, shards);
        // The dead instance's lanes are taken over and the newcomer gets
        // its share.
        wait_until_even(pool, shards, 3, DEADLINE).await;
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    let samples = watcher.await.unwrap();
    assert!(samples > 10, "the lanes were sampled {samples} times");

    let relays = relays.iter_mut().map(|(c, l)| (c, &*l)).collect();
    let records = drain_and_stop(&t, &topic, &written, relays).await;
    assert_order(&records);
    assert_eq!(confirmed_without_the_lane(pool).await, 0);

    // `status` shows each tail lane's slot lag (none in poll mode).
    let output = relay_binary()
        .args([
            "status",
            "--json",
            "--database-url",
            &t.url,
            "--slot",
            &t.slot,
        ])
        .output()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let lanes = json["lanes"].as_array().unwrap();
    assert_eq!(lanes.len(), shards, "{json}");
    for lane in lanes {
        assert_eq!(lane["slot_lag_bytes"].is_i64(), t.mode == "tail", "{json}");
        assert_eq!(lane["unpublished"], 0, "{json}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_a_frozen_instance_loses_its_lanes_and_confirms_nothing_of_them_after_resuming() {
    a_frozen_instance_loses_its_lanes(Setup::new(Kafka::start()).await, SHARDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_mode_a_frozen_instance_loses_its_lanes_and_confirms_nothing_of_them_after_resuming() {
    a_frozen_instance_loses_its_lanes(Setup::tail(Kafka::start()).await, TAIL_SHARDS).await;
}

async fn a_frozen_instance_loses_its_lanes(t: Setup, shards: usize) {
    let pool = &t.pool;
    create_aggregates(pool, AGGREGATES).await;
    audit_confirms(pool, shards).await;
    let topic = t.topic("acct", 4).await;
    let shards_arg = shards.to_string();
    let args = [
        "--shards",
        &shards_arg,
        "--batch-size",
        "20",
        "--lease",
        "3s",
    ];
    let (mut a, a_log) = t.logged_relay(&args);
    let (mut b, b_log) = t.logged_relay(&args);
    wait_until_even(pool, shards, 2, DEADLINE).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(pool.clone(), stop.clone());
    let before = committed_events(pool).await;
    wait_for("the writers to go on", DEADLINE, || async {
        committed_events(pool).await >= before + 50
    })
    .await;

    // Frozen, a keeps its sessions (its kernel answers for them) but renews
    // nothing: b fences it once its leases run out and takes every lane.
    let a_pid = Pid::from_raw(a.id().unwrap() as i32);
    kill(a_pid, Signal::SIGSTOP).unwrap();
    let frozen = Instant::now();
    wait_until_even(pool, shards, 1, DEADLINE).await;
    let took_over = frozen.elapsed();
    assert!(
        took_over < Duration::from_secs(15),
        "b took {took_over:?} to take the frozen instance's lanes"
    );
    let confirmed_frozen = confirmed_by(pool, a.id().unwrap()).await;

    // Resumed, a finds its sessions ended; it joins again and gets its share
    // back under new leases.
    kill(a_pid, Signal::SIGCONT).unwrap();
    wait_until_even(pool, shards, 2, DEADLINE).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    let records = drain_and_stop(
        &t,
        &topic,
        &written,
        vec![(&mut a, &a_log), (&mut b, &b_log)],
    )
    .await;
    assert_order(&records);
    // Every confirm, a's after it resumed included, was made by the session
    // holding the row's lane at that moment.
    assert_eq!(confirmed_without_the_lane(pool).await, 0);
    eprintln!(
        "b took the frozen instance's lanes after {took_over:?}; a had confirmed {confirmed_frozen} rows before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lanes_rebalance_when_an_instance_joins_and_when_one_leaves() {
    let t = Setup::new(Kafka::start()).await;
    let pool = &t.pool;
    create_aggregates(pool, AGGREGATES).await;
    let topic = t.topic("acct", 4).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(pool.clone(), stop.clone());

    let (mut a, a_log) = sharded(&t, SHARDS);
    wait_until_even(pool, SHARDS, 1, DEADLINE).await;
    let (mut b, b_log) = sharded(&t, SHARDS);
    let joined = wait_until_even(pool, SHARDS, 2, CONVERGED_WITHIN).await;
    let (mut c, c_log) = sharded(&t, SHARDS);
    let joined_third = wait_until_even(pool, SHARDS, 3, CONVERGED_WITHIN).await;

    // SIGTERM: b finishes its batches in flight, confirms them and exits;
    // its lanes go to a and c.
    kill(Pid::from_raw(b.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(DEADLINE, b.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{}", b_log.text());
    let left = wait_until_even(pool, SHARDS, 2, CONVERGED_WITHIN).await;

    // `status` lists every lane with its holder and its backlog.
    let holders: Vec<String> = lanes_per_instance(pool, SHARDS)
        .await
        .map(|per_instance| per_instance.into_keys().collect())
        .unwrap_or_default();
    let output = relay_binary()
        .args(["status", "--database-url", &t.url])
        .output()
        .await
        .unwrap();
    let status = String::from_utf8(output.stdout).unwrap();
    assert!(status.contains("\nlanes               8\n"), "{status}");
    for lane in 0..SHARDS {
        let line = status
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("lane {lane}/8 ")))
            .unwrap_or_else(|| panic!("lane {lane} is missing:\n{status}"));
        assert!(
            holders
                .iter()
                .any(|h| line.contains(&format!("{h} (epoch ")))
                && line.contains("connected")
                && line.contains("unpublished, oldest"),
            "{line}"
        );
    }
    // Each instance's /metrics: one lane_held per lane, 1 for the lanes it
    // holds, as many as outbox_relay_active says and Postgres shows.
    let per_instance = lanes_per_instance(pool, SHARDS).await.unwrap();
    for (relay, log) in [(&a, &a_log), (&c, &c_log)] {
        let address = endpoint_address(log, DEADLINE).await;
        let (_, text) = get(&address, "/metrics").await;
        let held: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("outbox_relay_lane_held{") && l.ends_with(" 1"))
            .collect();
        let instance = per_instance
            .keys()
            .find(|id| id.contains(&format!("/{}/", relay.id().unwrap())))
            .unwrap();
        assert_eq!(held.len(), per_instance[instance], "{text}");
        assert_eq!(
            value(&text, "outbox_relay_active"),
            Some(per_instance[instance] as f64),
            "{text}"
        );
    }
    let output = relay_binary()
        .args(["status", "--json", "--database-url", &t.url])
        .output()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["version"], 1, "{json}");
    assert_eq!(json["schema"], "public", "{json}");
    let lanes = json["lanes"].as_array().unwrap();
    assert_eq!(lanes.len(), SHARDS, "{json}");
    for (k, lane) in lanes.iter().enumerate() {
        assert_eq!(lane["lane"], format!("{k}/8"), "{json}");
        let holder = lane["leader"]["holder"].as_str().unwrap();
        assert!(holders.iter().any(|h| h == holder), "{json}");
        assert_eq!(lane["leader"]["connected"], true, "{json}");
        assert!(lane["unpublished"].as_i64().unwrap() >= 0, "{json}");
    }
    eprintln!(
        "evenly spread {joined:?} after the second instance joined, {joined_third:?} after the third, {left:?} after one left"
    );

    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    let records = drain_and_stop(
        &t,
        &topic,
        &written,
        vec![(&mut a, &a_log), (&mut c, &c_log)],
    )
    .await;
    // Lanes change hands between batches and SIGTERM confirms what was in
    // flight: nothing is published twice.
    assert_eq!(assert_order(&records), 0, "duplicates after hand-overs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_that_split_an_outbox_differently_never_run_together() {
    let t = Setup::new(Kafka::start()).await;
    let (mut whole, whole_log) = t.logged_relay(&[]);
    whole_log
        .wait_for_line("active: this instance holds the relay lock", DEADLINE)
        .await;
    refused(&t, "4", "1").await;

    // Once the unsharded instance is gone, a sharded one starts, and then an
    // unsharded one is refused in turn.
    whole.kill().await.unwrap();
    let (mut four, four_log) = t.logged_relay(&["--shards", "4"]);
    four_log
        .wait_for_line("active: this instance holds lane", DEADLINE)
        .await;
    refused(&t, "1", "4").await;
    refused(&t, "2", "4").await;
    assert!(four.try_wait().unwrap().is_none(), "{}", four_log.text());
    four.kill().await.unwrap();
}

/// A relay started with `--shards shards` exits with one line naming the
/// `running` instance's --shards and the fix.
async fn refused(t: &Setup, shards: &str, running: &str) {
    let mut cmd = t.relay_command();
    cmd.args(["--shards", shards]);
    let output = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!(
            "with --shards {running}, and this one was started with --shards {shards}"
        )) && last.contains("give every instance the same --shards"),
        "{stderr}"
    );
}

async fn committed_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar::<_, i64>("select coalesce(sum(version), 0)::bigint from agg")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// The plan a lane's read gets: each node's type and, for a scan, its
/// index, depth first.
fn plan_nodes(plan: &serde_json::Value, out: &mut Vec<String>) {
    let node = plan["Node Type"].as_str().unwrap_or_default();
    match plan["Index Name"].as_str() {
        Some(index) => out.push(format!("{node} using {index}")),
        None => out.push(node.to_owned()),
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        plan_nodes(child, out);
    }
}

/// A lane reads its backlog oldest first along the `seq` index, whatever the
/// outbox's statistics say. An outbox is analyzed while nearly empty, as it
/// mostly is; then a backlog builds up (a relay outage, a burst): the lane's
/// read must not become a sort of the whole table for every batch.
#[tokio::test]
async fn a_lane_reads_a_backlog_along_the_seq_index_even_when_analyzed_empty() {
    let url = fresh_database().await;
    let pool = migrated_pool(&url).await;
    sqlx::query("analyze outbox").execute(&pool).await.unwrap();
    sqlx::query(
        "insert into outbox (aggregate_type, aggregate_id, event_type, payload) \
         select 'order', 'order-' || (g % 1000), 'created', jsonb_build_object('n', g) \
         from generate_series(1, 100000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let shards = outbox_relay::config::Shards::new(4, "--shards").unwrap();
    let buckets = shards.lanes().nth(1).unwrap().buckets();
    let explain = format!(
        "explain (format json) {}",
        outbox_relay::source::poll::SELECT_LANE_BATCH
    );
    let plan: serde_json::Value = sqlx::query_scalar(&explain)
        .bind(1000_i64)
        .bind(buckets.start)
        .bind(buckets.end)
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut nodes = Vec::new();
    plan_nodes(&plan[0]["Plan"], &mut nodes);
    assert_eq!(
        nodes,
        ["Limit", "Index Scan using outbox_seq_idx"],
        "the lane's read: {plan:#}"
    );
}
