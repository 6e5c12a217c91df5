//! Bad input: one line on stderr naming the thing, the cause and the fix;
//! the documented exit code; no panic; never the password.

mod support;

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

fn assert_one_line(stderr: &str, starts_with: &str, secret: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(
        lines[0].starts_with(starts_with),
        "unexpected message:\n{}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains(secret), "the password leaked:\n{stderr}");
}

#[tokio::test]
async fn unreachable_database() {
    let (code, stderr) = run(&[
        "run",
        "--database-url",
        "postgres://app:hunter2@127.0.0.1:1/shop",
        "--brokers",
        "127.0.0.1:9",
    ])
    .await;
    assert_eq!(code, 1);
    assert_one_line(
        &stderr,
        "error: cannot connect to Postgres at 127.0.0.1:1/shop: Connection refused (os error 111); check --database-url (OUTBOX_DATABASE_URL) and that the server is running",
        "hunter2",
    );
}

#[tokio::test]
async fn wrong_password() {
    let url = fresh_database().await;
    let wrong = url.replace(":outbox-relay-temp@", ":hunter2@");
    assert_ne!(url, wrong);
    let (code, stderr) = run(&["run", "--database-url", &wrong, "--brokers", "127.0.0.1:9"]).await;
    assert_eq!(code, 1);
    assert_one_line(&stderr, "error: Postgres at 127.0.0.1:", "hunter2");
    assert!(
        stderr.contains("rejected the login for user \"postgres\": password authentication failed for user \"postgres\"; check the user and password in --database-url (OUTBOX_DATABASE_URL)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn tables_missing() {
    let url = fresh_database().await;
    let (code, stderr) = run(&["run", "--database-url", &url, "--brokers", "127.0.0.1:9"]).await;
    assert_eq!(code, 1);
    assert_one_line(
        &stderr,
        "error: table \"public\".outbox does not exist in database",
        "outbox-relay-temp",
    );
    assert!(
        stderr
            .contains("run `outbox-relay migrate` with the same --database-url and --schema first"),
        "{stderr}"
    );
}

#[tokio::test]
async fn malformed_database_url() {
    for url in [
        "localhost:5432/shop",
        "postgres://app:hunter2@db:notaport/shop",
        "mysql://app:hunter2@db/shop",
    ] {
        let (code, stderr) = run(&["run", "--database-url", url, "--brokers", "127.0.0.1:9"]).await;
        assert_eq!(code, 2, "{url}");
        assert_one_line(
            &stderr,
            "error: --database-url (OUTBOX_DATABASE_URL) is not a valid Postgres URL: ",
            "hunter2",
        );
        assert!(
            stderr.contains("expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn unknown_mode() {
    let (code, stderr) = run(&[
        "run",
        "--mode",
        "fast",
        "--database-url",
        "postgres://a:hunter2@h/d",
        "--brokers",
        "b:1",
    ])
    .await;
    assert_eq!(code, 2);
    assert_one_line(
        &stderr,
        "error: invalid value 'fast' for '--mode <MODE>': unknown mode \"fast\"; use poll or tail",
        "hunter2",
    );
}

#[tokio::test]
async fn identifier_injection_is_a_validation_error() {
    let (code, stderr) = run(&[
        "migrate",
        "--database-url",
        "postgres://a:hunter2@h/d",
        "--schema",
        "x\"; drop table outbox; --",
    ])
    .await;
    assert_eq!(code, 2);
    assert_one_line(
        &stderr,
        "error: --schema (OUTBOX_SCHEMA) \"x\\\"; drop table outbox; --\" is not a valid Postgres name",
        "hunter2",
    );
}

#[tokio::test]
async fn slot_and_publication_injection_is_a_validation_error() {
    let (code, stderr) = run(&[
        "run",
        "--mode",
        "tail",
        "--database-url",
        "postgres://a:hunter2@h/d",
        "--brokers",
        "b:9092",
        "--slot",
        "s; DROP_REPLICATION_SLOT x",
    ])
    .await;
    assert_eq!(code, 2);
    assert_one_line(
        &stderr,
        "error: --slot (OUTBOX_SLOT) \"s; DROP_REPLICATION_SLOT x\" is not a valid replication slot name: use 1 to 63 lowercase letters, digits or underscores",
        "hunter2",
    );
    let (code, stderr) = run(&[
        "migrate",
        "--database-url",
        "postgres://a:hunter2@h/d",
        "--publication",
        "p' ; drop publication q",
    ])
    .await;
    assert_eq!(code, 2);
    assert_one_line(
        &stderr,
        "error: --publication (OUTBOX_PUBLICATION) \"p' ; drop publication q\" is not a valid Postgres name",
        "hunter2",
    );
}

#[tokio::test]
async fn a_bad_metrics_address_is_one_line() {
    let (code, stderr) = run(&[
        "run",
        "--database-url",
        "postgres://a:hunter2@h/d",
        "--brokers",
        "b:9092",
        "--metrics-address",
        "localhost",
    ])
    .await;
    assert_eq!(code, 2);
    assert_one_line(
        &stderr,
        "error: --metrics-address (OUTBOX_METRICS_ADDRESS) \"localhost\" is not an IP:PORT; use e.g. 127.0.0.1:9879, 0.0.0.0:9879 or off",
        "hunter2",
    );
}

#[tokio::test]
async fn a_poll_interval_of_zero_is_one_line() {
    let (code, stderr) = run(&[
        "run",
        "--database-url",
        "postgres://a:hunter2@h/d",
        "--brokers",
        "b:9092",
        "--poll-interval",
        "0s",
    ])
    .await;
    assert_eq!(code, 2);
    assert_one_line(
        &stderr,
        "error: --poll-interval (OUTBOX_POLL_INTERVAL) 0s would make an idle relay query Postgres without pause; give at least 1ms, e.g. 100ms",
        "hunter2",
    );
}

#[tokio::test]
async fn shards_out_of_range_or_a_lane_slot_name_too_long_are_one_line() {
    let run_with = |extra: Vec<&'static str>| async move {
        let mut args = vec![
            "run",
            "--database-url",
            "postgres://a:hunter2@h/d",
            "--brokers",
            "b:9092",
        ];
        args.extend(extra);
        run(&args).await
    };
    let (code, stderr) = run_with(vec!["--shards", "0"]).await;
    assert_eq!(code, 2);
    assert_one_line(
        &stderr,
        "error: --shards (OUTBOX_SHARDS) 0 is out of range: an outbox splits into 1 to 1024 lanes; give e.g. 4",
        "hunter2",
    );
    // Each lane has a slot of its own, named after --slot.
    let long = "s".repeat(60);
    let long: &'static str = Box::leak(long.into_boxed_str());
    let (code, stderr) = run_with(vec!["--shards", "4", "--mode", "tail", "--slot", long]).await;
    assert_eq!(code, 2);
    assert_one_line(
        &stderr,
        &format!(
            "error: --slot (OUTBOX_SLOT) \"{long}\" is too long for --shards 4: each lane's is named {long}_K_of_N, at most 63 characters; give a shorter --slot (OUTBOX_SLOT)"
        ),
        "hunter2",
    );
}

#[tokio::test]
async fn unreachable_broker_is_retried_and_said_once() {
    let url = fresh_database().await;
    migrated_pool(&url).await;
    let mut relay = relay_binary()
        .args(["run", "--database-url", &url, "--brokers", "127.0.0.1:9"])
        .env("OUTBOX_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(relay.stderr.take().unwrap()).lines();
    let wanted = "cannot reach Kafka brokers at 127.0.0.1:9";
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(wanted) {
                return line;
            }
        }
        panic!("stderr closed before the broker warning");
    })
    .await
    .expect("the relay says the broker is unreachable");
    assert!(
        found.contains("retrying with backoff")
            && found.contains("check --brokers (OUTBOX_BROKERS)"),
        "{found}"
    );
    assert!(!found.contains("outbox-relay-temp"), "{found}");
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay gave up instead of retrying"
    );

    kill(Pid::from_raw(relay.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), relay.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "SIGTERM while waiting for Kafka should exit 0, got {status}"
    );
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_and_status_reads_the_backlog() {
    let url = fresh_database().await;
    for _ in 0..2 {
        let output = relay_binary()
            .args(["migrate", "--database-url", &url])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, outbox_relay::MIGRATOR.migrations.len());
    let publications: i64 = sqlx::query_scalar(
        "select count(*) from pg_publication_tables where pubname = 'outbox_relay' and tablename = 'outbox'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(publications, 1, "migrate did not create the publication");
    // A service's own insert naming only the documented columns works.
    sqlx::query("insert into outbox (id, aggregate_type, aggregate_id, event_type, topic, payload) values (gen_random_uuid(), 'order', 'o-1', 'created', null, '{}')")
        .execute(&pool)
        .await
        .unwrap();
    let output = relay_binary()
        .args(["status", "--database-url", &url])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success());
    assert!(stdout.contains("unpublished rows    1"), "{stdout}");
    assert!(stdout.contains("dead letters        0"), "{stdout}");
    assert!(stdout.contains("replication slot    none"), "{stdout}");
    assert!(stdout.contains("leader              none yet"), "{stdout}");
    assert!(!stdout.contains("outbox-relay-temp"), "{stdout}");
    let output = relay_binary()
        .args(["status", "--json", "--database-url", &url])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["version"], 1, "{json}");
    assert_eq!(json["unpublished"], 1, "{json}");
    assert_eq!(json["dead_letters"], 0, "{json}");
    assert!(
        json["oldest_unpublished_seconds"].as_f64().unwrap() >= 0.0,
        "{json}"
    );
    assert!(json["slot"].is_null() && json["leader"].is_null(), "{json}");
    assert_eq!(json["lanes"], serde_json::json!([]), "{json}");
    assert!(!json.to_string().contains(":postgres@"), "{json}");
}

#[tokio::test]
async fn migrate_keeps_postgres_notices_out_of_the_log_unless_asked() {
    let url = fresh_database().await;
    // The second run finds everything there: Postgres answers each
    // `if not exists` with a notice.
    for _ in 0..2 {
        let (code, stderr) = run(&[
            "migrate",
            "--database-url",
            &url,
            "--publication",
            "p_notice",
        ])
        .await;
        assert_eq!(code, 0, "{stderr}");
        assert!(
            !stderr.contains("already exists"),
            "a server notice reached the log:\n{stderr}"
        );
    }
    // Asked for by name, they are there (so the check above can see them).
    let output = relay_binary()
        .args(["migrate", "--database-url", &url])
        .env("OUTBOX_LOG", "info,sqlx::postgres::notice=info")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("already exists"), "{stderr}");
}

#[tokio::test]
async fn the_demo_names_the_relays_own_rate_and_latency_apart_from_the_end_to_end_pace() {
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        relay_binary()
            .args(["demo", "--transactions", "100"])
            .output(),
    )
    .await
    .expect("the demo ends")
    .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
            .to_string()
    };
    let published: u64 = line("published")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let relay = line("relay");
    // "relay       N rows in S s of publishing work: R rows/s; insert to
    // broker ack p50 X ms, p99 Y ms"
    let words: Vec<&str> = relay.split_whitespace().collect();
    assert_eq!(words[1].parse::<u64>().unwrap(), published, "{relay}");
    let busy: f64 = words[4].parse().unwrap();
    let rate: f64 = words[9].parse().unwrap();
    assert!(busy > 0.0, "{relay}");
    let expected = published as f64 / busy;
    assert!(
        (rate - expected).abs() <= expected * 0.05 + 1.0,
        "the rate is not the rows over the publishing work: {relay}"
    );
    assert!(
        relay.contains("insert to broker ack p50 ") && relay.contains(" ms, p99 "),
        "{relay}"
    );
    assert!(
        line("elapsed").contains("at the demo's own pace"),
        "{stdout}"
    );
    assert!(line("result").contains("PASS"), "{stdout}");
}

#[tokio::test]
async fn status_exits_3_when_the_lag_or_the_dead_letters_go_over_the_limits_given() {
    let url = fresh_database().await;
    let pool = migrated_pool(&url).await;
    // Two rows written two minutes ago and never published; one dead letter.
    sqlx::query(
        "insert into outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at) \
         select gen_random_uuid(), 'order', 'o-' || n, 'created', '{}', now() - interval '2 minutes' \
         from generate_series(1, 2) as n",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into dead_letter (seq, id, aggregate_type, aggregate_id, event_type, created_at, error) \
         values (1, gen_random_uuid(), 'order', 'o-0', 'created', now(), 'too large')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let status = |extra: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let output = relay_binary()
                .args(["status", "--database-url", &url])
                .args(extra)
                .env("OUTBOX_LOG", "warn")
                .output()
                .await
                .unwrap();
            (
                output.status.code().unwrap(),
                String::from_utf8(output.stdout).unwrap(),
                String::from_utf8(output.stderr).unwrap(),
            )
        }
    };
    // Within the limits: 0.
    let (code, _, stderr) = status(&["--max-lag", "10m", "--max-dead-letters", "1"]).await;
    assert_eq!(code, 0, "{stderr}");
    // Over each: 3, the status still printed, one line naming the flag.
    let (code, stdout, stderr) = status(&["--max-lag", "30s"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stdout.contains("unpublished rows    2"), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("status: the oldest unpublished row is 1")
            && stderr.contains("over --max-lag 30s"),
        "{stderr}"
    );
    let (code, _, stderr) = status(&["--max-dead-letters", "0"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(
        stderr.trim(),
        "status: 1 dead letters, over --max-dead-letters 0"
    );
    // JSON: the same verdict in `exceeded`, and the exit code.
    let (code, stdout, _) =
        status(&["--json", "--max-lag", "30s", "--max-dead-letters", "0"]).await;
    assert_eq!(code, 3);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["exceeded"].as_array().unwrap().len(), 2, "{json}");
    let (code, stdout, _) = status(&["--json"]).await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["exceeded"], serde_json::json!([]), "{json}");
    // A limit that is not a duration: one line, exit 2.
    let (code, _, stderr) = status(&["--max-lag", "soon"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn a_schema_older_than_the_relay_is_one_line_naming_migrate() {
    let url = fresh_database().await;
    let pool = migrated_pool(&url).await;
    // As if the last migration had not run.
    sqlx::query("alter table outbox drop column partition_key")
        .execute(&pool)
        .await
        .unwrap();
    let (code, stderr) = run(&["status", "--database-url", &url]).await;
    assert_eq!(code, 1, "{stderr}");
    assert_one_line(
        &stderr,
        "error: the outbox tables in schema \"public\"",
        "postgres:",
    );
    assert!(
        stderr.contains("has no column partition_key); run `outbox-relay migrate`"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_cloudevents_source_that_cannot_be_one_is_one_line_and_exit_2() {
    let base = [
        "run",
        "--database-url",
        "postgres://app:hunter2@127.0.0.1:1/shop",
        "--brokers",
        "127.0.0.1:9",
    ];
    let (code, stderr) = run(&[
        &base[..],
        &[
            "--format",
            "cloudevents-binary",
            "--cloudevents-source",
            "not a uri",
        ],
    ]
    .concat())
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert_one_line(
        &stderr,
        "error: --cloudevents-source (OUTBOX_CLOUDEVENTS_SOURCE) \"not a uri\" is not a URI reference",
        "hunter2",
    );
    let (code, stderr) = run(&[&base[..], &["--cloudevents-source", "/billing"]].concat()).await;
    assert_eq!(code, 2, "{stderr}");
    assert_one_line(
        &stderr,
        "error: --cloudevents-source (OUTBOX_CLOUDEVENTS_SOURCE) is given but --format is plain",
        "hunter2",
    );
}
