//! TLS to Postgres, honoured by every connection the relay makes: a
//! throwaway cluster with a certificate from a throwaway CA, the relay in
//! tail mode with `sslmode=verify-full&sslrootcert=...`, and Postgres' own
//! connection log saying which connections are encrypted.

mod support;

use std::time::Duration;

use nix::unistd::{Uid, User, chown};
use support::testkit::{StopMode, TempPostgres};
use support::*;

const DEADLINE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_is_encrypted_and_verified_with_sslmode_verify_full() {
    let mut pg = TempPostgres::start().await.unwrap();
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path(), "outbox-relay test CA");
    // The server's key and certificate live in its data directory, owned
    // by the server's user, the key readable by it alone.
    let data = pg.data_dir();
    for file in ["server.pem", "server.key"] {
        std::fs::copy(certs.path().join(file), data.join(file)).unwrap();
        if Uid::effective().is_root() {
            let owner = User::from_name("postgres").unwrap().unwrap();
            chown(&data.join(file), Some(owner.uid), Some(owner.gid)).unwrap();
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    pg.stop(StopMode::Fast);
    pg.set("ssl", "on");
    pg.set("ssl_cert_file", "server.pem");
    pg.set("ssl_key_file", "server.key");
    pg.set("log_connections", "on");
    pg.start_again().await.unwrap();

    let plain = pg.create_database("shop").await.unwrap();
    let ca = certs.path().join("ca.pem");
    let url = format!("{plain}?sslmode=verify-full&sslrootcert={}", ca.display());
    let t = Setup::on(url, Kafka::start(), "tail").await;
    let topic = t.topic("acct", 2).await;
    create_aggregates(&t.pool, 5).await;
    let mut relay = t.relay(&[]);
    let written = write(&t.pool, 20, 5, 0.0).await;
    let records = consume_ids(&t.kafka.brokers(), &[&topic], &written.committed, DEADLINE).await;
    assert_delivered(&records, &written);

    relay.kill().await.unwrap();

    // Every session the relay opened, SQL and replication alike, as the
    // server logged it when it was authorized: all of them over TLS. (A
    // snapshot of pg_stat_ssl would miss sessions that came and went.)
    let log = pg.log();
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("connection authorized:") && l.contains("application_name=outbox-relay")
        })
        .collect();
    let plain_text: Vec<&&str> = sessions
        .iter()
        .filter(|l| !l.contains("SSL enabled"))
        .collect();
    assert!(
        plain_text.is_empty(),
        "relay sessions without TLS: {plain_text:#?}"
    );
    let replication = sessions
        .iter()
        .filter(|l| l.contains("replication connection authorized:"))
        .count();
    assert!(
        replication >= 1,
        "no replication session logged: {sessions:#?}"
    );
    assert!(
        sessions.len() > replication,
        "no SQL session logged: {sessions:#?}"
    );

    // A server certificate from another CA is refused, with one line.
    let other = tempfile::tempdir().unwrap();
    make_certificates(other.path(), "another CA");
    let wrong = format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        other.path().join("ca.pem").display()
    );
    let output = relay_command_in("tail", &wrong, &t.kafka.brokers(), &t.prefix)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: cannot connect to Postgres at 127.0.0.1:") && last.contains("TLS"),
        "{stderr}"
    );
    assert!(!stderr.contains(pg.password()), "{stderr}");
}
