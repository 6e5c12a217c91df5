//! The deployment files agree with the binary: the Kubernetes manifest
//! (`deploy/kubernetes/outbox-relay.yaml`) and `docker-compose.yml` give the
//! relay settings it accepts (each relay's environment is run against a
//! database that is not there: it must get as far as connecting, exit 1,
//! not refuse a setting, exit 2), probes on the paths it serves, on the port
//! it listens on. Their schemas are checked in CI (`.ci/run`:
//! kubernetes-validate, `docker-compose config`).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The `KEY: value` lines of the block that starts with the line `header`
/// (at any indentation), up to the first line indented no deeper.
fn block(text: &str, header: &str) -> Vec<(String, String)> {
    let mut lines = text.lines().skip_while(|l| l.trim() != header);
    let Some(first) = lines.next() else {
        return Vec::new();
    };
    let depth = first.len() - first.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > depth)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// `${NAME:-default}` as compose expands it with NAME unset.
fn expand(value: &str) -> String {
    match value
        .strip_prefix("${")
        .and_then(|v| v.strip_suffix('}'))
        .and_then(|v| v.split_once(":-"))
    {
        Some((_, default)) => default.to_owned(),
        None => value.to_owned(),
    }
}

/// Runs `outbox-relay run` with only `env` (and the database at a closed
/// port), and says how it ended.
async fn run_with(env: &[(String, String)]) -> (i32, String) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut cmd = relay_binary();
    cmd.env_clear()
        .args(["run"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(
            "OUTBOX_DATABASE_URL",
            format!("postgres://app:secret@127.0.0.1:{port}/app"),
        )
        // The file's metrics port is checked apart; tests share the host.
        .env("OUTBOX_METRICS_ADDRESS", "127.0.0.1:0")
        .stdout(Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the relay gives up on a closed port")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_kubernetes_manifest_runs_a_relay_the_binary_accepts_and_probes_what_it_serves() {
    let manifest = read("deploy/kubernetes/outbox-relay.yaml");
    let config = block(&manifest, "data:");
    assert!(
        config.iter().any(|(k, _)| k == "OUTBOX_MODE"),
        "no ConfigMap data found in the manifest"
    );
    let (code, stderr) = run_with(&config).await;
    assert_eq!(
        code, 1,
        "the manifest's settings were refused or the relay did not stop at the database:\n{stderr}"
    );
    assert!(stderr.contains("cannot connect to Postgres"), "{stderr}");
    assert!(!stderr.contains("secret"), "the password leaked:\n{stderr}");

    // The probes and the scrape hit the port the relay listens on.
    let metrics = &config
        .iter()
        .find(|(k, _)| k == "OUTBOX_METRICS_ADDRESS")
        .expect("OUTBOX_METRICS_ADDRESS in the ConfigMap")
        .1;
    let port = metrics.rsplit_once(':').unwrap().1;
    assert!(
        metrics.starts_with("0.0.0.0:"),
        "a pod's probes cannot reach loopback: {metrics}"
    );
    assert!(
        manifest.contains(&format!("containerPort: {port}")),
        "the container port is not the metrics port {port}"
    );
    for (probe, path) in [
        ("readinessProbe:", "/readyz"),
        ("livenessProbe:", "/healthz"),
    ] {
        let probe = block(&manifest, probe);
        assert!(
            probe.contains(&("path".into(), path.into()))
                && probe.contains(&("port".into(), "metrics".into())),
            "{probe:?} does not probe {path} on the metrics port"
        );
    }
    assert!(manifest.contains("- name: metrics"));
    let endpoints = block(&manifest, "podMetricsEndpoints:");
    assert!(
        endpoints.contains(&("- port".into(), "metrics".into()))
            && endpoints.contains(&("path".into(), "/metrics".into())),
        "the PodMonitor does not scrape /metrics on the metrics port: {endpoints:?}"
    );
    // Standbys: two replicas at least, and rolling updates that start a new
    // pod before stopping an old one.
    let replicas: u32 = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("replicas: "))
        .expect("replicas")
        .parse()
        .unwrap();
    assert!(replicas >= 2, "replicas {replicas}");
    assert!(manifest.contains("maxUnavailable: 0"));
    // The secret the comment tells the reader to create is the one used.
    assert!(manifest.contains("kubectl create secret generic outbox-relay"));
    assert_eq!(manifest.matches("key: database-url").count(), 2);
}

#[tokio::test]
async fn every_relay_in_docker_compose_runs_with_settings_the_binary_accepts() {
    let compose = read("docker-compose.yml");
    let relays: Vec<&str> = compose
        .lines()
        .filter(|l| l.starts_with("  relay") && l.ends_with(':'))
        .map(|l| l.trim().trim_end_matches(':'))
        .collect();
    assert_eq!(relays, ["relay", "relay-nats", "relay-rabbitmq"]);
    for relay in relays {
        let service: String = compose
            .lines()
            .skip_while(|l| l.trim_end() != format!("  {relay}:"))
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .collect::<Vec<_>>()
            .join("\n");
        let env: Vec<(String, String)> = block(&service, "environment:")
            .into_iter()
            .map(|(k, v)| (k, expand(&v)))
            .collect();
        assert!(
            env.iter().any(|(k, _)| k == "OUTBOX_DATABASE_URL"),
            "{relay}: no environment found"
        );
        assert!(
            env.contains(&("OUTBOX_METRICS_ADDRESS".into(), "0.0.0.0:9879".into()))
                && service.contains("\"9879:9879\""),
            "{relay}: the metrics port is not published"
        );
        let (code, stderr) = run_with(&env).await;
        assert_eq!(
            code, 1,
            "{relay}: its settings were refused or it did not stop at the database:\n{stderr}"
        );
        assert!(
            stderr.contains("cannot connect to Postgres"),
            "{relay}: {stderr}"
        );
    }
}
