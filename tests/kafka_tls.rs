//! Kafka over TLS, configured only through the `--kafka-config` passthrough
//! (flag and `OUTBOX_KAFKA_CONFIG`): a real broker process (tansu) reached
//! only through a TLS listener with a certificate from a throwaway CA. tansu
//! 0.6 has no TLS listener of its own, so the test terminates TLS in front of
//! it and has tansu advertise that listener: every client, the relay's
//! producer included, must speak TLS and verify the certificate to get any
//! record through. Needs `OUTBOX_TEST_TANSU` (a tansu binary; `.ci/run` sets
//! it); without it the test says so and does not run.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const DEADLINE: Duration = Duration::from_secs(90);

/// Accepts TLS with the certificate in `certs` and forwards the plain bytes
/// to `upstream`. Counts the handshakes that succeeded.
fn serve_tls(listener: TcpListener, certs: &Path, upstream: String) -> Arc<AtomicUsize> {
    let chain = CertificateDer::pem_file_iter(certs.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (acceptor, upstream, counted) =
                (acceptor.clone(), upstream.clone(), counted.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate (or speaks plain
                // Kafka) ends here: the connection is closed.
                let Ok(mut client) = acceptor.accept(client).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut broker) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
            });
        }
    });
    handshakes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_publishes_over_tls_configured_through_the_passthrough() {
    let test = "the_relay_publishes_over_tls_configured_through_the_passthrough";
    let Some(binary) = tansu_binary(test, "runs a tansu broker of its own behind a TLS listener")
    else {
        return;
    };
    let (certs, other) = certificates_and_another_ca("outbox-relay Kafka test CA");
    let ca = certs.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let other_ca = other.path().join("ca.pem");
    let other_ca = other_ca.to_str().unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let brokers = listener.local_addr().unwrap().to_string();
    let tansu = Tansu::start_advertising(binary, Some(brokers.clone())).await;
    let handshakes = serve_tls(listener, certs.path(), tansu.brokers());
    // The harness's own admin client and readers verify the same CA.
    set_client_properties(&[("security.protocol", "ssl"), ("ssl.ca.location", ca)]);

    let t = Setup::new(Kafka::External {
        brokers: brokers.clone(),
        process: None,
    })
    .await;
    let pool = &t.pool;
    create_aggregates(pool, 10).await;
    let topic = t.topic("acct", 3).await;
    let written = write(pool, 60, 10, 0.0).await;

    // A CA that did not sign the broker's certificate: nothing is published,
    // the relay keeps retrying and says why.
    let (mut refused, refused_log) = t.logged_relay(&[
        "--kafka-config",
        "security.protocol=ssl",
        "--kafka-config",
        &format!("ssl.ca.location={other_ca}"),
    ]);
    let line = refused_log
        .wait_for_line("certificate verify failed", DEADLINE)
        .await;
    assert!(
        line.contains("cannot reach Kafka brokers") && line.contains("--kafka-config"),
        "the certificate failure is not in the relay's one warning line: {line}"
    );
    assert!(
        refused.try_wait().unwrap().is_none(),
        "the relay exited on a certificate it could not verify: {line}"
    );
    assert_eq!(
        outbox_count(pool).await,
        written.committed.len() as i64,
        "rows left the outbox although no broker connection was verified"
    );
    refused.kill().await.unwrap();
    let before = handshakes.load(Ordering::SeqCst);

    // The right CA, through the environment form.
    let mut cmd = t.relay_command();
    cmd.env(
        "OUTBOX_KAFKA_CONFIG",
        format!("security.protocol=ssl,ssl.ca.location={ca}"),
    );
    let (mut relay, _log) = spawn_logged(cmd);
    let records = consume_and_drain(pool, &brokers, &[&topic], &written.committed, DEADLINE).await;
    relay.kill().await.unwrap();
    assert!(
        handshakes.load(Ordering::SeqCst) > before,
        "no TLS handshake completed after the relay with the right CA started"
    );
    assert_delivered(&records, &written);
    assert_order(&records);
}
