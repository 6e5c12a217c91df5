//! A throwaway RabbitMQ node: the system's `rabbitmq-server` (Debian's
//! package, 3.10) as a node of its own (`outbox-relay-PID-N@localhost`), its
//! AMQP and distribution ports free loopback ports, and its config, Erlang
//! cookie, database (mnesia) and logs in a temp dir. No plugins. The guest
//! user (password guest) may connect, as it may over loopback by default.
//! Ready means the node logged "Server startup complete", the end of the
//! boot that `rabbitmqctl await_startup` waits for, and accepts TCP
//! connections; watching the log spares a second VM for the command line
//! tool, which takes about 2 s to boot.
//!
//! Several nodes run side by side, in one process or many. They share the
//! host's `epmd` (the Erlang port mapper on port 4369), which the first node
//! starts as a daemon and which outlives them; it listens on loopback only
//! if a node of this module started it.
//!
//! A node can be killed, stopped, frozen and started again on the same ports
//! and database, so durable exchanges and queues, policies and persistent
//! messages survive a restart. Dropping it kills the node and removes the
//! directory.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use outbox_relay::error::Error;

use super::{
    Supervised, accepts, embedded, find_program, free_ports, head, log_len, log_since, path_then,
    tail,
};

/// How long a start may take: about 7 s on an idle machine with two cores,
/// several times that with other nodes and a build competing for them.
const START_DEADLINE: Duration = Duration::from_secs(120);

/// How long a graceful stop may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Tells the nodes of one process apart (the pid tells processes apart).
static NODES: AtomicUsize = AtomicUsize::new(0);

/// A running (or stopped) throwaway RabbitMQ node.
pub struct TempRabbitMq {
    dir: tempfile::TempDir,
    scripts: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    settings: Vec<(String, String)>,
    server: Option<Supervised>,
}

impl TempRabbitMq {
    /// Creates and starts a node with the default configuration.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with_config(&[]).await
    }

    /// Creates and starts a node with `settings` (`rabbitmq.conf` keys and
    /// values, e.g. `("max_message_size", "1048576")`) over the defaults.
    pub async fn start_with_config(settings: &[(&str, &str)]) -> Result<Self, Error> {
        let scripts = find_scripts()?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-rabbitmq-")
            .tempdir()
            .map_err(|e| embedded(format!("cannot create a temp dir for RabbitMQ: {e}")))?;
        write_cookie(dir.path())?;
        let enabled_plugins = dir.path().join("enabled_plugins");
        fs::write(&enabled_plugins, "[].\n")
            .map_err(|e| embedded(format!("cannot write {}: {e}", enabled_plugins.display())))?;
        let [port, dist_port] = free_ports()?;
        let node = format!(
            "outbox-relay-{}-{}@localhost",
            std::process::id(),
            NODES.fetch_add(1, Ordering::Relaxed)
        );
        let mut rabbit = TempRabbitMq {
            dir,
            scripts,
            node,
            port,
            dist_port,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            server: None,
        };
        rabbit.start_again().await?;
        Ok(rabbit)
    }

    /// Creates and starts a node that also takes AMQP over TLS (`amqps://`)
    /// on a port of its own, with `cert` and `key` (PEM) as its identity;
    /// clients need no certificate. Returns the node and that port.
    pub async fn start_with_tls(cert: &Path, key: &Path) -> Result<(Self, u16), Error> {
        let [tls_port] = free_ports()?;
        let (tls_port_text, cert, key) = (
            tls_port.to_string(),
            cert.display().to_string(),
            key.display().to_string(),
        );
        let node = Self::start_with_config(&[
            ("listeners.ssl.default", tls_port_text.as_str()),
            ("ssl_options.certfile", cert.as_str()),
            ("ssl_options.keyfile", key.as_str()),
            ("ssl_options.verify", "verify_none"),
            ("ssl_options.fail_if_no_peer_cert", "false"),
        ])
        .await?;
        Ok((node, tls_port))
    }

    /// The loopback port of AMQP.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang node name, `NAME@localhost`, as `rabbitmqctl -n` takes it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`: the default vhost as guest.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The OS pid of the Erlang VM (`beam.smp`), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.pid().as_raw() as u32)
    }

    /// Sets a `rabbitmq.conf` key for the next start, over the defaults.
    /// Settings of the running node change with [`TempRabbitMq::ctl`]
    /// instead, e.g. `eval 'application:set_env(rabbit, max_message_size,
    /// 1024).'`, which channels opened afterwards obey.
    pub fn set(&mut self, key: &str, value: &str) {
        self.settings.push((key.to_owned(), value.to_owned()));
    }

    /// Whether the node is running (as far as this handle knows: a node that
    /// died by itself counts until the next start or stop).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Kills the Erlang VM (SIGKILL) and waits until it is gone: a crash.
    /// Persistent messages that reached the disk survive it.
    pub fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop(Signal::SIGKILL, Duration::ZERO);
        }
    }

    /// Stops the node gracefully and waits until it exited; SIGKILL if that
    /// takes longer than 60 s. SIGTERM to the VM does what `rabbitmqctl
    /// stop` does (close connections, flush the message stores), without
    /// booting a second VM for the command line tool.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop(Signal::SIGTERM, STOP_GRACE);
        }
    }

    /// Stops the Erlang VM (SIGSTOP) without closing a connection: to its
    /// clients it looks like a hung host or a network partition. The kernel
    /// still completes TCP handshakes, but nothing answers.
    pub fn freeze(&self) {
        if let Some(server) = &self.server {
            server.signal(Signal::SIGSTOP);
        }
    }

    /// Resumes a frozen node.
    pub fn thaw(&self) {
        if let Some(server) = &self.server {
            server.signal(Signal::SIGCONT);
        }
    }

    /// Starts the node (again) on the same ports and database, and waits
    /// until it is ready. Does nothing if it runs.
    pub async fn start_again(&mut self) -> Result<(), Error> {
        if self.server.is_some() {
            return Ok(());
        }
        self.write_config()?;
        // Only lines written from here on tell about this start.
        let from = log_len(&self.log_path());
        let stdout_from = log_len(&self.stdout_path());
        self.server = Some(self.spawn()?);
        if let Err(e) = self.wait_ready(from, stdout_from).await {
            self.kill();
            return Err(e);
        }
        Ok(())
    }

    /// Runs `rabbitmqctl -n NODE ARGS…` against this node and returns what
    /// it printed. Blocks for a second or two: the tool boots a VM of its
    /// own. Pass `--quiet` (or `-q`) first to leave out its banners.
    pub fn ctl(&self, args: &[&str]) -> Result<String, Error> {
        let mut cmd = Command::new(self.scripts.join("rabbitmqctl"));
        self.environment(&mut cmd);
        let output = cmd
            .args(["-n", &self.node])
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| embedded(format!("cannot run rabbitmqctl: {e}")))?;
        if !output.status.success() {
            // The cause comes first; usage or diagnostics follow it.
            let stderr = String::from_utf8_lossy(&output.stderr);
            let cause = if stderr.trim().is_empty() {
                tail(&String::from_utf8_lossy(&output.stdout), 3)
            } else {
                head(&strip_colours(&stderr), 2)
            };
            return Err(embedded(format!(
                "rabbitmqctl {} failed on node {} ({}): {cause}",
                args.join(" "),
                self.node,
                output.status,
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The environment of the server and of `rabbitmqctl`: everything of
    /// this node in the temp dir, nothing from `/etc/rabbitmq` or the
    /// caller's `RABBITMQ_*` variables.
    fn environment(&self, cmd: &mut Command) {
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RABBITMQ_") {
                cmd.env_remove(name);
            }
        }
        let dir = self.dir.path();
        cmd
            // The Erlang cookie is $HOME/.erlang.cookie, for both.
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_USE_LONGNAME", "false")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_LOGS", self.log_path())
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            // Neither exists: no advanced config, no env file.
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            // The script then execs the VM instead of running it in the
            // background, so the VM is the supervised child: the
            // parent-death signal and SIGKILL reach it. -noinput keeps it
            // from reading a shell from stdin, as the background mode does.
            .env("RABBITMQ_ALLOW_INPUT", "true")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -kernel inet_dist_use_interface {127,0,0,1}",
            )
            // rabbitmqctl listens for distribution on one of 11 fixed ports
            // by default (35672-35682), too few for parallel tests: port 0
            // lets the kernel choose.
            .env("RABBITMQ_CTL_DIST_PORT_MIN", "0")
            .env("RABBITMQ_CTL_DIST_PORT_MAX", "0")
            // Read only by an epmd that a node starts; one started earlier
            // keeps its addresses.
            .env("ERL_EPMD_ADDRESS", "127.0.0.1");
    }

    fn write_config(&self) -> Result<(), Error> {
        let mut config = String::from(
            "# Written at every start of the throwaway node.\n\
             # The log goes to the file only; stdout is for the boot banner.\n\
             log.console = false\n\
             # Publishers are blocked below the free disk limit (50 MB by\n\
             # default); a nearly full disk is not what a test is about.\n\
             disk_free_limit.absolute = 1MB\n",
        );
        for (key, value) in &self.settings {
            config.push_str(&format!("{key} = {value}\n"));
        }
        let path = self.dir.path().join("rabbitmq.conf");
        fs::write(&path, config)
            .map_err(|e| embedded(format!("cannot write {}: {e}", path.display())))
    }

    fn spawn(&self) -> Result<Supervised, Error> {
        let stdout = File::options()
            .create(true)
            .append(true)
            .open(self.stdout_path())
            .map_err(|e| embedded(format!("cannot open the RabbitMQ stdout log: {e}")))?;
        let stderr = stdout
            .try_clone()
            .map_err(|e| embedded(format!("cannot open the RabbitMQ stdout log: {e}")))?;
        let mut cmd = Command::new(self.scripts.join("rabbitmq-server"));
        self.environment(&mut cmd);
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        Supervised::spawn("rabbitmq-server", cmd)
    }

    async fn wait_ready(&self, from: u64, stdout_from: u64) -> Result<(), Error> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if log_since(&self.log_path(), from).contains("Server startup complete")
                && accepts(self.port).await
            {
                return Ok(());
            }
            let exited = self.server.as_ref().is_none_or(Supervised::exited);
            if exited || Instant::now() > deadline {
                let why = if exited {
                    "it exited"
                } else {
                    "it was not ready within 120 s"
                };
                // A bad config or a node name in use stops it before the log
                // file is open; then only its output tells.
                let output = log_since(&self.stdout_path(), stdout_from);
                let log = log_since(&self.log_path(), from);
                let cause = boot_errors(&output)
                    .or_else(|| boot_errors(&log))
                    .unwrap_or_else(|| format!("its log ends: {}", tail(&log, 3)));
                return Err(embedded(format!(
                    "the throwaway RabbitMQ node {} did not start ({why}): {cause}",
                    self.node,
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("rabbit.log")
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("stdout.log")
    }

    /// The node's log so far, across restarts.
    pub fn log(&self) -> String {
        log_since(&self.log_path(), 0)
    }
}

impl Drop for TempRabbitMq {
    fn drop(&mut self) {
        // The directory goes with it, so a graceful stop would be wasted.
        self.kill();
    }
}

/// What a failed boot logged as errors, without timestamps: the first few
/// (the cause, e.g. an unknown setting) and the verdict ("Error during
/// startup: …"); the many lines between are crash reports.
fn boot_errors(text: &str) -> Option<String> {
    let errors: Vec<&str> = text
        .lines()
        .filter_map(|line| line.split_once(" [error] "))
        .filter_map(|(_, rest)| rest.split_once("> "))
        .map(|(_, message)| message.trim())
        .filter(|message| !message.is_empty() && !message.starts_with('='))
        .collect();
    let mut shown: Vec<&str> = errors.iter().take(3).copied().collect();
    if let Some(verdict) = errors
        .iter()
        .find(|m| m.starts_with("Error during startup"))
        && !shown.contains(verdict)
    {
        shown.push(verdict);
    }
    (!shown.is_empty()).then(|| shown.join(" | "))
}

/// `text` without the terminal colour codes rabbitmqctl puts in its usage.
fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters m
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The directory of RabbitMQ's own scripts (`rabbitmq-server`, `rabbitmqctl`,
/// with `rabbitmq-env` beside them): `OUTBOX_RABBITMQ_SCRIPTS`, else
/// Debian's `/usr/lib/rabbitmq/bin`, else where a `rabbitmq-server` on `PATH`
/// really lives. Debian's `/usr/sbin` wrappers will not do: as root they
/// switch to the `rabbitmq` user, whose home (and so Erlang cookie) is not
/// this node's.
fn find_scripts() -> Result<PathBuf, Error> {
    let install = "install it (Debian: apt-get install rabbitmq-server) or set OUTBOX_RABBITMQ_SCRIPTS to the directory with rabbitmq-server and rabbitmq-env";
    let is_scripts = |dir: &Path| {
        find_program("rabbitmq-server", [dir.to_path_buf()]).is_some()
            && dir.join("rabbitmq-env").exists()
    };
    if let Some(dir) = std::env::var_os("OUTBOX_RABBITMQ_SCRIPTS") {
        let dir = PathBuf::from(dir);
        if is_scripts(&dir) {
            return Ok(dir);
        }
        return Err(embedded(format!(
            "OUTBOX_RABBITMQ_SCRIPTS={} has no rabbitmq-server with rabbitmq-env beside it; {install}",
            dir.display()
        )));
    }
    let debian = PathBuf::from("/usr/lib/rabbitmq/bin");
    if is_scripts(&debian) {
        return Ok(debian);
    }
    path_then(&[])
        .into_iter()
        .filter_map(|dir| fs::canonicalize(dir.join("rabbitmq-server")).ok())
        .filter_map(|script| script.parent().map(Path::to_path_buf))
        .find(|dir| is_scripts(dir))
        .ok_or_else(|| embedded(format!("RabbitMQ's scripts not found; {install}")))
}

/// A random Erlang cookie in `$HOME/.erlang.cookie` of the node, before
/// either the node or `rabbitmqctl` would make one up.
fn write_cookie(home: &Path) -> Result<(), Error> {
    let mut random = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(|e| {
            embedded(format!(
                "cannot read /dev/urandom for an Erlang cookie: {e}"
            ))
        })?;
    let cookie: String = random.iter().map(|b| format!("{b:02X}")).collect();
    let path = home.join(".erlang.cookie");
    fs::write(&path, cookie)
        .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o400)))
        .map_err(|e| embedded(format!("cannot write {}: {e}", path.display())))
}

/// A queue's type, RabbitMQ's `x-queue-type`: what a persistent message
/// costs the broker before it confirms it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// The default type: one node's message store.
    Classic,
    /// A Raft log (replicated where there are several nodes), which RabbitMQ
    /// recommends for data that must not be lost.
    Quorum,
    /// An append-only log that consumers read by offset.
    Stream,
}

impl QueueType {
    const ALL: [QueueType; 3] = [QueueType::Classic, QueueType::Quorum, QueueType::Stream];

    /// Its `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        QueueType::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                format!("unknown RabbitMQ queue type {s:?}; use classic, quorum or stream")
            })
    }
}

/// Declares, on the broker at `url`, a durable topic exchange and a durable
/// classic queue bound to it for every routing key: a destination the relay
/// can publish to and a reader can drain. `single_active`: the queue is a
/// consumer group's, declared as the consumer runtime does
/// (`x-single-active-consumer`).
pub async fn declare_topic_queue(
    url: &str,
    exchange: &str,
    queue: &str,
    single_active: bool,
) -> Result<(), Error> {
    declare_topic_queue_of(QueueType::Classic, url, exchange, queue, single_active).await
}

/// [`declare_topic_queue`] with a queue of the given type.
pub async fn declare_topic_queue_of(
    queue_type: QueueType,
    url: &str,
    exchange: &str,
    queue: &str,
    single_active: bool,
) -> Result<(), Error> {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let fail = |e: lapin::Error| {
        embedded(format!(
            "declaring exchange {exchange} and queue {queue} failed: {e}"
        ))
    };
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .map_err(fail)?;
    let channel = connection.create_channel().await.map_err(fail)?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(fail)?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut arguments = FieldTable::default();
    if queue_type != QueueType::Classic {
        arguments.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString(queue_type.as_str().into()),
        );
    }
    if single_active {
        arguments.insert(
            "x-single-active-consumer".into(),
            lapin::types::AMQPValue::Boolean(true),
        );
    }
    channel
        .queue_declare(queue.into(), durable, arguments)
        .await
        .map_err(fail)?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail)?;
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}
