//! The replication connection: its settings from the database URL, and its
//! errors turned into ones a user can act on.

use super::*;
use crate::config;

/// The SQLSTATE in a server error's text, which the replication client
/// renders as `message (SQLSTATE xxxxx)`.
pub(super) fn sqlstate(err: &PgWireError) -> Option<&str> {
    let PgWireError::Server(text) = err else {
        return None;
    };
    let at = text.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    text.get(at..at + 5)
}

/// Turns a replication client error into one a user can act on.
pub(super) fn replication_error(
    db: &DatabaseConfig,
    tail: &TailConfig,
    doing: &'static str,
    err: PgWireError,
) -> Error {
    let target = Box::new(db.target().clone());
    let text = crate::config::redact(&err.to_string(), db.password());
    match sqlstate(&err) {
        Some("55006") => return slot_in_use(db, tail, None),
        Some("28P01" | "28000") => {
            return Error::DatabaseAuth {
                user: target.user.clone(),
                target,
                cause: text,
            };
        }
        Some("42704") if text.contains("publication") => {
            return Error::Setup(format!(
                "publication \"{}\" does not exist in database \"{}\" at {target}; run `outbox-relay migrate` with the same --database-url, --schema and --publication",
                tail.publication, target.database
            ));
        }
        Some("55000") if text.contains("invalidated") || text.contains("no longer get changes") => {
            return slot_invalidated(db, tail);
        }
        _ => {}
    }
    if let PgWireError::Auth(cause) = &err {
        return Error::DatabaseAuth {
            user: target.user.clone(),
            target,
            cause: crate::config::redact(cause, db.password()),
        };
    }
    // 42710, a slot that already exists when this instance creates it:
    // another instance took the lane over while this one was slow and made
    // the slot; the next attempt finds it, under whoever holds the lane.
    let transient = err.is_transient()
        || sqlstate(&err).is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "42710"
        });
    Error::Replication {
        target,
        doing,
        cause: text,
        transient,
    }
}

/// The replication connection's settings, from the same URL as the SQL
/// connections.
pub(super) fn replication_config(db: &DatabaseConfig, tail: &TailConfig) -> ReplicationConfig {
    let target = db.target();
    let settings = db.tls();
    // `allow` (plain first, TLS if refused) has no counterpart: prefer TLS.
    let mode = match settings.mode {
        config::SslMode::Disable => SslMode::Disable,
        config::SslMode::Allow | config::SslMode::Prefer => SslMode::Prefer,
        config::SslMode::Require => SslMode::Require,
        config::SslMode::VerifyCa => SslMode::VerifyCa,
        config::SslMode::VerifyFull => SslMode::VerifyFull,
    };
    let mut tls = TlsConfig {
        mode,
        ca_pem_path: settings.root_cert.clone(),
        ..TlsConfig::default()
    };
    if let (Some(cert), Some(key)) = (&settings.cert, &settings.key) {
        tls = tls.with_client_cert(cert.clone(), key.clone());
    }
    // verify-full to an IP address checks the certificate's IP SAN, as libpq
    // does; the client wants the address named as the name to verify.
    if mode == SslMode::VerifyFull && target.host.parse::<std::net::IpAddr>().is_ok() {
        tls = tls.with_sni_hostname(target.host.clone());
    }
    ReplicationConfig::new(
        target.host.clone(),
        target.user.clone(),
        db.password(),
        target.database.clone(),
        tail.slot.as_str(),
        tail.publication.as_str(),
    )
    .with_port(target.port)
    .with_tls(tls)
    .with_start_lsn(Lsn::ZERO)
    // Confirmed positions reach Postgres within a second.
    .with_status_interval(Duration::from_secs(1))
    .with_wakeup_interval(Duration::from_secs(5))
    .with_buffer_size(4096)
    .with_options("-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3")
    .with_application_name(db.application_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn sqlstate_is_read_from_server_errors() {
        let err = PgWireError::Server(
            "replication slot \"s\" is active for PID 42 (SQLSTATE 55006)".into(),
        );
        assert_eq!(sqlstate(&err), Some("55006"));
        assert_eq!(sqlstate(&PgWireError::Protocol("x".into())), None);
    }
}
