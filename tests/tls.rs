//! TLS to Postgres, honoured by every connection the relay makes: a
//! throwaway cluster with a certificate from a throwaway CA, the relay in
//! tail mode with `sslmode=verify-full&sslrootcert=...`, and Postgres' own
//! `pg_stat_ssl` saying which connections are encrypted.

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

    // Both the SQL connection and the replication connection use TLS.
    let encrypted = "select count(*) filter (where s.ssl), count(*) filter (where not s.ssl), \
                     count(*) filter (where s.ssl and a.backend_type = 'walsender') \
                     from pg_stat_activity a join pg_stat_ssl s using (pid) \
                     where a.application_name like 'outbox-relay %'";
    let (with_tls, without, walsenders): (i64, i64, i64) =
        sqlx::query_as(encrypted).fetch_one(&t.pool).await.unwrap();
    relay.kill().await.unwrap();
    assert_eq!(without, 0, "a relay connection is not encrypted");
    assert!(with_tls >= 2, "only {with_tls} relay connections");
    assert_eq!(walsenders, 1, "the replication connection is not encrypted");

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
