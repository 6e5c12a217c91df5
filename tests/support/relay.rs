//! The relay binary as a subprocess, its log, and one test's world (`Setup`).

use super::*;

/// The relay binary, with its metrics endpoint on a port of its own (tests
/// run many relays at once).
pub fn relay_binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    cmd.env("OUTBOX_METRICS_ADDRESS", "127.0.0.1:0");
    cmd
}

/// Runs the binary with `args` to completion (within a minute) and returns
/// (exit code, stderr).
pub async fn run(args: &[&str]) -> (i32, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        relay_binary().args(args).env("OUTBOX_LOG", "info").output(),
    )
    .await
    .expect("the relay exits")
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// The relay binary with `run` arguments for this database and Kafka, in
/// poll mode.
pub fn relay_command(url: &str, brokers: &str, prefix: &str) -> Command {
    relay_command_in("poll", url, brokers, prefix)
}

/// The relay binary with `run` arguments, in `mode`.
pub fn relay_command_in(mode: &str, url: &str, brokers: &str, prefix: &str) -> Command {
    let mut cmd = relay_binary();
    cmd.args([
        "run",
        "--mode",
        mode,
        "--database-url",
        url,
        "--brokers",
        brokers,
    ])
    .arg("--topic-template")
    .arg(format!("{prefix}.{{aggregate_type}}"))
    // OUTBOX_TEST_RELAY_LOG=debug shows the relays' per-batch lines.
    .env(
        "OUTBOX_LOG",
        std::env::var("OUTBOX_TEST_RELAY_LOG").unwrap_or_else(|_| "info".into()),
    )
    .kill_on_drop(true);
    cmd
}

/// Starts the relay binary in poll mode.
pub fn spawn_relay(url: &str, brokers: &str, prefix: &str, extra: &[&str]) -> Child {
    spawn_relay_in("poll", url, brokers, prefix, extra)
}

/// Starts the relay binary in `mode`.
pub fn spawn_relay_in(mode: &str, url: &str, brokers: &str, prefix: &str, extra: &[&str]) -> Child {
    // OUTBOX_TEST_RELAY_LOGS=1 shows the relays' logs when a test fails.
    let stderr = match std::env::var_os("OUTBOX_TEST_RELAY_LOGS") {
        Some(_) => std::process::Stdio::inherit(),
        None => std::process::Stdio::null(),
    };
    relay_command_in(mode, url, brokers, prefix)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the relay binary")
}

/// One test's world: its own database (migrated), Kafka and topic prefix,
/// and the mode its relays run in.
pub struct Setup {
    pub url: String,
    pub pool: PgPool,
    pub kafka: Kafka,
    pub prefix: String,
    pub mode: &'static str,
    /// Tail mode's slot: slots are per cluster, so each test has its own.
    pub slot: String,
}

impl Setup {
    /// A poll-mode world in the binary's shared cluster.
    pub async fn new(kafka: Kafka) -> Setup {
        Setup::on(fresh_database().await, kafka, "poll").await
    }

    /// A tail-mode world in the binary's shared cluster.
    pub async fn tail(kafka: Kafka) -> Setup {
        Setup::on(fresh_database().await, kafka, "tail").await
    }

    /// A world on the database at `url` (e.g. in a cluster of the test's own).
    pub async fn on(url: String, kafka: Kafka, mode: &'static str) -> Setup {
        let pool = migrated_pool(&url).await;
        let prefix = topic_prefix();
        Setup {
            url,
            pool,
            kafka,
            slot: format!("slot_{prefix}"),
            prefix,
            mode,
        }
    }

    /// Creates the topic the default test template routes `aggregate_type` to.
    pub async fn topic(&self, aggregate_type: &str, partitions: i32) -> String {
        let topic = format!("{}.{aggregate_type}", self.prefix);
        self.kafka.create_topic(&topic, partitions).await;
        topic
    }

    /// Starts the relay binary for this setup.
    pub fn relay(&self, extra: &[&str]) -> Child {
        let mut args = vec!["--slot", self.slot.as_str()];
        args.extend_from_slice(extra);
        spawn_relay_in(
            self.mode,
            &self.url,
            &self.kafka.brokers(),
            &self.prefix,
            &args,
        )
    }

    /// The relay command for this setup, to run to completion.
    pub fn relay_command(&self) -> Command {
        let mut cmd = relay_command_in(self.mode, &self.url, &self.kafka.brokers(), &self.prefix);
        cmd.args(["--slot", &self.slot]);
        cmd
    }
}

/// The relay's stderr, collected line by line as it arrives.
#[derive(Clone, Default)]
pub struct RelayLog {
    lines: std::sync::Arc<Mutex<Vec<String>>>,
}

impl RelayLog {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits, with a deadline, for a line containing `needle`; returns it.
    pub async fn wait_for_line(&self, needle: &str, deadline: Duration) -> String {
        let until = Instant::now() + deadline;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for the relay to log {needle:?}; it logged:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayLog {
    /// A failing test shows what the relay said, which is most of the
    /// diagnosis when a fault test times out.
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(lines) = self.lines.lock()
        {
            eprintln!(
                "--- relay log ---\n{}\n--- end of relay log ---",
                lines.join("\n")
            );
        }
    }
}

/// Starts a relay command and collects its log.
pub fn spawn_logged(mut cmd: Command) -> (Child, RelayLog) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the relay binary");
    let log = RelayLog::default();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    (child, log)
}

impl Setup {
    /// Starts the relay binary for this setup and collects its log.
    pub fn logged_relay(&self, extra: &[&str]) -> (Child, RelayLog) {
        let mut cmd = self.relay_command();
        cmd.args(extra);
        spawn_logged(cmd)
    }
}
