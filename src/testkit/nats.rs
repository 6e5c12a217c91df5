//! A throwaway NATS server with JetStream: the system's `nats-server`
//! (Debian's package, 2.9) on a free loopback port, its JetStream store and
//! its log in a temp dir, optionally requiring a user and password. Ready
//! means it accepts TCP connections and logged "Server is ready", which it
//! does only after JetStream recovered its streams.
//!
//! It can be killed, stopped, frozen and started again on the same port and
//! store, so streams and their messages survive a restart. Dropping it kills
//! the server and removes the directory.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use outbox_relay::error::Error;

use super::{Supervised, accepts, embedded, find_program, free_ports, log_len, log_since, tail};

/// How long a start may take: it is ready within milliseconds when idle.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// How long SIGTERM may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running (or stopped) throwaway NATS server.
pub struct TempNats {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    credentials: Option<(String, String)>,
    /// More `nats-server` flags (e.g. TLS).
    extra: Vec<String>,
    server: Option<Supervised>,
}

impl TempNats {
    /// Starts a server that lets anyone in.
    pub async fn start() -> Result<Self, Error> {
        Self::launch(None, Vec::new()).await
    }

    /// Starts a server that takes only TLS clients, with the certificate
    /// and key (PEM) given.
    pub async fn start_with_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self, Error> {
        let extra = vec![
            "--tls".to_owned(),
            "--tlscert".to_owned(),
            cert.display().to_string(),
            "--tlskey".to_owned(),
            key.display().to_string(),
        ];
        Self::launch(None, extra).await
    }

    /// Starts a server that requires `user` and `password` of every client.
    /// The user must not be empty: the server takes an empty user as no
    /// authentication at all.
    pub async fn start_with_auth(user: &str, password: &str) -> Result<Self, Error> {
        if user.is_empty() {
            return Err(embedded(
                "TempNats::start_with_auth got an empty user, which nats-server takes as no authentication at all; pass a user name".into(),
            ));
        }
        Self::launch(Some((user.to_owned(), password.to_owned())), Vec::new()).await
    }

    async fn launch(
        credentials: Option<(String, String)>,
        extra: Vec<String>,
    ) -> Result<Self, Error> {
        let bin = find_program("nats-server", super::path_then(&["/usr/sbin", "/usr/bin"]))
            .ok_or_else(|| {
                embedded(
                    "nats-server not found on PATH, in /usr/sbin or /usr/bin; install it (Debian: apt-get install nats-server)".into(),
                )
            })?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-nats-")
            .tempdir()
            .map_err(|e| embedded(format!("cannot create a temp dir for NATS: {e}")))?;
        let [port] = free_ports()?;
        let mut nats = TempNats {
            dir,
            bin,
            port,
            credentials,
            extra,
            server: None,
        };
        nats.start_again().await?;
        Ok(nats)
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`, without credentials.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL with the user and password in it (percent-encoded), or
    /// [`TempNats::url`] if the server requires none.
    pub fn url_with_credentials(&self) -> String {
        match &self.credentials {
            Some((user, password)) => format!(
                "nats://{}:{}@127.0.0.1:{}",
                utf8_percent_encode(user, NON_ALPHANUMERIC),
                utf8_percent_encode(password, NON_ALPHANUMERIC),
                self.port
            ),
            None => self.url(),
        }
    }

    /// The user and password the server requires, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// The JetStream store directory, kept across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The OS pid of the server, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.pid().as_raw() as u32)
    }

    /// Whether the server is running (as far as this handle knows: a server
    /// that died by itself counts until the next start or stop).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Kills the server (SIGKILL) and waits until it is gone: a crash.
    pub fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop(Signal::SIGKILL, Duration::ZERO);
        }
    }

    /// Stops the server (SIGTERM: it closes client connections and flushes
    /// JetStream) and waits until it exited; SIGKILL if it takes longer than
    /// 10 s.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop(Signal::SIGTERM, STOP_GRACE);
        }
    }

    /// Stops the server process (SIGSTOP) without closing a connection: to
    /// its clients it looks like a hung host or a network partition. The
    /// kernel still completes TCP handshakes, but nothing answers.
    pub fn freeze(&self) {
        if let Some(server) = &self.server {
            server.signal(Signal::SIGSTOP);
        }
    }

    /// Resumes a frozen server.
    pub fn thaw(&self) {
        if let Some(server) = &self.server {
            server.signal(Signal::SIGCONT);
        }
    }

    /// Starts the server (again) on the same port and JetStream store, and
    /// waits until it is ready. Does nothing if it runs.
    pub async fn start_again(&mut self) -> Result<(), Error> {
        if self.server.is_some() {
            return Ok(());
        }
        // Only lines written from here on tell about this start.
        let from = log_len(&self.log_path());
        self.server = Some(self.spawn()?);
        if let Err(e) = self.wait_ready(from).await {
            self.kill();
            return Err(e);
        }
        Ok(())
    }

    fn spawn(&self) -> Result<Supervised, Error> {
        // Its own log goes to the file (-l); whatever it prints before
        // opening it, such as a bad flag, goes there too.
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| embedded(format!("cannot open the NATS log: {e}")))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--jetstream")
            .arg("--store_dir")
            .arg(self.store_dir())
            .args(["--addr", "127.0.0.1"])
            .args(["--port", &self.port.to_string()])
            .arg("--log")
            .arg(self.log_path());
        if let Some((user, password)) = &self.credentials {
            cmd.args(["--user", user, "--pass", password]);
        }
        cmd.args(&self.extra);
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        Supervised::spawn("nats-server", cmd)
    }

    async fn wait_ready(&self, from: u64) -> Result<(), Error> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if log_since(&self.log_path(), from).contains("Server is ready")
                && accepts(self.port).await
            {
                return Ok(());
            }
            let exited = self.server.as_ref().is_none_or(Supervised::exited);
            if exited || Instant::now() > deadline {
                let why = if exited {
                    "it exited"
                } else {
                    "it was not ready within 30 s"
                };
                return Err(embedded(format!(
                    "the throwaway nats-server on port {} did not start ({why}); its log ends: {}",
                    self.port,
                    tail(&log_since(&self.log_path(), from), 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The server's log so far, across restarts.
    pub fn log(&self) -> String {
        log_since(&self.log_path(), 0)
    }
}

impl Drop for TempNats {
    fn drop(&mut self) {
        // The directory goes with it, so there is nothing to flush.
        self.kill();
    }
}

/// Creates, on the server at `url`, a JetStream stream `name` (file
/// storage, the server's defaults otherwise) taking `subjects`.
pub async fn create_stream(url: &str, name: &str, subjects: &[String]) -> Result<(), Error> {
    let fail = |e: String| embedded(format!("creating the JetStream stream {name} failed: {e}"));
    let client = async_nats::connect(url)
        .await
        .map_err(|e| fail(e.to_string()))?;
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.to_owned(),
            subjects: subjects.to_vec(),
            ..Default::default()
        })
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(())
}
