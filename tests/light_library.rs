//! The light library: a service that only writes outbox rows and claims
//! inbox ids depends on outbox-relay with `default-features = false`
//! (`examples/light-service`). Its dependency tree has no broker client,
//! HTTP server, CLI parser or replication client, and it works: against a
//! throwaway Postgres it migrates, inserts an event in a transaction and
//! claims the event's id twice (new, then duplicate).

mod support;

use std::path::PathBuf;

use support::*;
use tokio::process::Command;

const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/light-service/Cargo.toml"
);

/// Crates a service must not compile to write events and claim ids.
const HEAVY: &[&str] = &[
    "rdkafka",
    "rdkafka-sys",
    "async-nats",
    "lapin",
    "axum",
    "clap",
    "pgwire-replication",
    "prometheus-client",
    "tracing-subscriber",
];

fn cargo() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    // Its own target dir: the suite's is locked while the suite runs.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    cmd.env("CARGO_TARGET_DIR", target.join("light-service"));
    cmd
}

#[tokio::test]
async fn a_service_uses_the_light_library_without_broker_or_server_crates() {
    let tree = cargo()
        .args(["tree", "--locked", "-e", "normal", "--prefix", "none"])
        .args(["--manifest-path", MANIFEST])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&tree.stderr);
    assert!(tree.status.success(), "cargo tree failed: {stderr}");
    let tree = String::from_utf8(tree.stdout).unwrap();
    assert!(
        tree.lines().any(|l| l.starts_with("outbox-relay v")),
        "{tree}"
    );
    for heavy in HEAVY {
        let found: Vec<&str> = tree
            .lines()
            .filter(|l| l.starts_with(&format!("{heavy} v")))
            .collect();
        assert!(
            found.is_empty(),
            "the light library pulls in {found:?}:\n{tree}"
        );
    }

    let url = fresh_database().await;
    let run = cargo()
        .args([
            "run",
            "--locked",
            "--quiet",
            "--manifest-path",
            MANIFEST,
            "--",
        ])
        .arg(&url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let inserted = stdout
        .lines()
        .find_map(|l| l.strip_prefix("inserted "))
        .expect("the service says which event it inserted");
    assert!(stdout.contains("claim new\nclaim duplicate\n"), "{stdout}");

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (id, aggregate): (String, String) =
        sqlx::query_as("select id::text, aggregate_id from outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((id.as_str(), aggregate.as_str()), (inserted, "o-1"));
    let claimed: i64 = sqlx::query_scalar("select count(*) from inbox where message_id::text = $1")
        .bind(inserted)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(claimed, 1);
}
