//! A throwaway CA and server certificate for the TLS tests.

pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate for 127.0.0.1 signed by it, in `dir`.
pub fn make_certificates(dir: &std::path::Path, ca_name: &str) {
    let subject = format!("/CN={ca_name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", &subject,
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        ],
    );
}

/// For a test that a server is trusted through its CA only: a temp dir with
/// a CA named `ca_name` and the server's certificate, and another with an
/// unrelated CA (and a certificate of its own) that a client may wrongly
/// trust instead.
pub fn certificates_and_another_ca(ca_name: &str) -> (tempfile::TempDir, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path(), ca_name);
    let other = tempfile::tempdir().unwrap();
    make_certificates(other.path(), "another CA");
    (certs, other)
}
