//! A throwaway Postgres cluster: `initdb` into a temp dir, a free loopback
//! port, `wal_level=logical`, password authentication over TCP. As root the
//! server runs as the `postgres` user. The server is a child of a dedicated
//! supervisor thread and gets SIGKILL if that thread (or the whole process)
//! dies, so a crashed test or demo never leaves a server behind.
//!
//! It can be stopped fast, immediately or with SIGKILL and started again on
//! the same data and port, which is what the fault tests need.

use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User, chown};
use sqlx::{Connection, PgConnection};

use outbox_relay::error::Error;

/// How to stop the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: abort transactions, checkpoint, exit.
    Fast,
    /// SIGQUIT: exit without a checkpoint; crash recovery on next start.
    Immediate,
    /// SIGKILL of the postmaster.
    Kill,
}

/// The superuser's password in every throwaway cluster.
const PASSWORD: &str = "outbox-relay-temp";

struct Server {
    pid: Pid,
    stop: mpsc::Sender<Signal>,
    supervisor: JoinHandle<()>,
}

/// A running (or stopped) throwaway cluster. Dropping it stops the server
/// and removes the directory.
pub struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    owner: Option<User>,
    server: Option<Server>,
    settings: Vec<String>,
}

impl TempPostgres {
    /// Creates and starts a cluster. Takes a few seconds (`initdb`).
    pub async fn start() -> Result<Self, Error> {
        let bin = find_bindir()?;
        let owner = if Uid::effective().is_root() {
            let user = User::from_name("postgres").ok().flatten().ok_or_else(|| {
                Error::Embedded(
                    "running as root, the throwaway Postgres must run as user \"postgres\", which does not exist; install the postgresql package (it creates the user) or run as another user".into(),
                )
            })?;
            Some(user)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pg-")
            .tempdir()
            .map_err(|e| embedded(format!("cannot create a temp dir: {e}")))?;
        if let Some(user) = &owner {
            chown(dir.path(), Some(user.uid), Some(user.gid))
                .map_err(|e| embedded(format!("cannot hand the temp dir to user postgres: {e}")))?;
        }
        let pwfile = dir.path().join("pwfile");
        fs::write(&pwfile, PASSWORD)
            .map_err(|e| embedded(format!("cannot write {}: {e}", pwfile.display())))?;
        if let Some(user) = &owner {
            chown(&pwfile, Some(user.uid), Some(user.gid))
                .map_err(|e| embedded(format!("chown pwfile: {e}")))?;
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            .current_dir(dir.path())
            .stdin(Stdio::null());
        if let Some(user) = &owner {
            initdb.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let output = tokio::task::spawn_blocking(move || initdb.output())
            .await
            .map_err(|e| embedded(format!("initdb: {e}")))?
            .map_err(|e| embedded(format!("cannot run initdb: {e}")))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(embedded(format!("initdb failed: {}", stderr.trim())));
        }
        let port = free_port()?;
        let mut pg = TempPostgres {
            dir,
            bin,
            port,
            owner,
            server: None,
            settings: Vec::new(),
        };
        pg.start_again().await?;
        Ok(pg)
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The directory of the server binaries it runs (`pg_recvlogical` too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The superuser's password.
    pub fn password(&self) -> &'static str {
        PASSWORD
    }

    /// Creates a database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, Error> {
        let mut conn = PgConnection::connect(&self.url("postgres"))
            .await
            .map_err(|e| embedded(format!("cannot connect to the throwaway Postgres: {e}")))?;
        sqlx::query(&format!(
            "create database \"{}\"",
            name.replace('"', "\"\"")
        ))
        .execute(&mut conn)
        .await
        .map_err(Error::db_error("creating a database"))?;
        conn.close().await.ok();
        Ok(self.url(name))
    }

    /// Sets a server setting for the next start, over the defaults (e.g.
    /// `wal_level`, `max_slot_wal_keep_size`).
    pub fn set(&mut self, name: &str, value: &str) {
        self.settings.push(format!("{name}={value}"));
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Stops the server and waits until it exited.
    pub fn stop(&mut self, mode: StopMode) {
        // A frozen server would never act on the signal.
        self.thaw();
        if let Some(server) = self.server.take() {
            let signal = match mode {
                StopMode::Fast => Signal::SIGINT,
                StopMode::Immediate => Signal::SIGQUIT,
                StopMode::Kill => Signal::SIGKILL,
            };
            let _ = server.stop.send(signal);
            let _ = server.supervisor.join();
        }
    }

    /// A failover to a replica that was in sync: takes a base backup of the
    /// running server (`pg_basebackup`, WAL included), kills the server,
    /// and starts the copy in its place, on the same port, so clients
    /// reconnect to the same URL. Like a promoted replica, the copy has the
    /// data but none of the replication slots.
    pub async fn fail_over_to_copy(&mut self) -> Result<(), Error> {
        let copy = self.dir.path().join("copy");
        let mut backup = Command::new(self.bin.join("pg_basebackup"));
        backup
            .arg("-D")
            .arg(&copy)
            .args([
                "-X",
                "stream",
                "--checkpoint=fast",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "--no-sync",
            ])
            .args(["-p", &self.port.to_string()])
            .env("PGPASSWORD", PASSWORD)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        if let Some(user) = &self.owner {
            backup.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let output = tokio::task::spawn_blocking(move || backup.output())
            .await
            .map_err(|e| embedded(format!("pg_basebackup: {e}")))?
            .map_err(|e| embedded(format!("cannot run pg_basebackup: {e}")))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(embedded(format!("pg_basebackup failed: {}", stderr.trim())));
        }
        self.stop(StopMode::Kill);
        let old = self.dir.path().join("data.old");
        fs::rename(self.data_dir(), &old)
            .and_then(|()| fs::rename(&copy, self.data_dir()))
            .map_err(|e| embedded(format!("cannot put the copy in place: {e}")))?;
        self.start_again().await
    }

    /// Stops every process of the server (SIGSTOP) without closing a
    /// connection: to its clients it looks like a hung host or a network
    /// partition. [`TempPostgres::thaw`] resumes them.
    pub fn freeze(&self) {
        self.signal_all(Signal::SIGSTOP);
    }

    /// Resumes a frozen server.
    pub fn thaw(&self) {
        self.signal_all(Signal::SIGCONT);
    }

    /// Sends `signal` to the postmaster and each of its children.
    fn signal_all(&self, signal: Signal) {
        for pid in self.processes() {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// CPU seconds the server used so far: the postmaster and its live
    /// children, and the children that exited (which the postmaster reaped).
    pub fn cpu_seconds(&self) -> f64 {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let postmaster = self.server.as_ref().map(|s| s.pid.as_raw());
        let ticks: u64 = self
            .processes()
            .into_iter()
            .map(|pid| {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // utime, stime, cutime, cstime: fields 14 to 17 (proc(5)).
                let fields: Vec<u64> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| {
                        rest.split_whitespace()
                            .skip(11)
                            .take(4)
                            .map(|f| f.parse().unwrap_or(0))
                            .collect()
                    })
                    .unwrap_or_default();
                let own = if Some(pid) == postmaster { 4 } else { 2 };
                fields.iter().take(own).sum::<u64>()
            })
            .sum();
        ticks as f64 / hz
    }

    /// The postmaster and each of its children.
    fn processes(&self) -> Vec<i32> {
        let Some(server) = &self.server else {
            return Vec::new();
        };
        let postmaster = server.pid.as_raw();
        let children = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
                let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
                // The parent pid is the second field after the parenthesised name.
                let ppid: i32 = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                (ppid == postmaster).then_some(pid)
            });
        let mut pids: Vec<i32> = children.collect();
        pids.push(postmaster);
        pids
    }

    /// Starts the server (again) on the same data and port, and waits until
    /// it accepts connections.
    pub async fn start_again(&mut self) -> Result<(), Error> {
        if self.server.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let server = self.spawn()?;
            let pid = server.pid;
            self.server = Some(server);
            match self.wait_ready(deadline).await {
                Ok(()) => return Ok(()),
                // After a SIGKILL the old backends may still hold shared
                // memory for a moment; the new postmaster then exits. Retry.
                Err(e) if kill(pid, None).is_err() && Instant::now() < deadline => {
                    self.stop(StopMode::Immediate);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = e;
                }
                Err(e) => {
                    self.stop(StopMode::Immediate);
                    return Err(e);
                }
            }
        }
    }

    fn spawn(&self) -> Result<Server, Error> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| embedded(format!("cannot open the server log: {e}")))?;
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "wal_level=logical"])
            .args(["-c", "max_wal_senders=20"])
            .args(["-c", "max_replication_slots=20"])
            .args(["-c", "max_connections=200"])
            // Durable against a crash of Postgres itself (which the fault
            // tests do), not of the machine: nothing here outlives the run.
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(user) = &self.owner {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let (pid_tx, pid_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<Signal>();
        // The server must be the child of a thread that lives as long as it
        // does: the parent-death signal fires when the spawning thread exits.
        let supervisor = std::thread::Builder::new()
            .name("temp-postgres".into())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = pid_tx.send(Err(e));
                        return;
                    }
                };
                let pid = Pid::from_raw(child.id() as i32);
                let _ = pid_tx.send(Ok(pid));
                loop {
                    match stop_rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(signal) => {
                            let _ = kill(pid, signal);
                            let _ = child.wait();
                            return;
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if let Ok(Some(_)) = child.try_wait() {
                                return;
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            let _ = kill(pid, Signal::SIGQUIT);
                            let _ = child.wait();
                            return;
                        }
                    }
                }
            })
            .map_err(|e| embedded(format!("cannot start a supervisor thread: {e}")))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| embedded("the supervisor thread died".into()))?
            .map_err(|e| embedded(format!("cannot start postgres: {e}")))?;
        Ok(Server {
            pid,
            stop: stop_tx,
            supervisor,
        })
    }

    async fn wait_ready(&self, deadline: Instant) -> Result<(), Error> {
        let url = self.url("postgres");
        loop {
            if let Ok(conn) = PgConnection::connect(&url).await {
                conn.close().await.ok();
                return Ok(());
            }
            let exited = self
                .server
                .as_ref()
                .is_none_or(|s| s.supervisor.is_finished());
            if exited || Instant::now() > deadline {
                let log = fs::read_to_string(self.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(embedded(format!(
                    "the throwaway Postgres did not start: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop(StopMode::Immediate);
    }
}

fn embedded(message: String) -> Error {
    Error::Embedded(message)
}

/// The directory with `initdb` and `postgres`: `OUTBOX_PG_BINDIR`, else the
/// newest `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("OUTBOX_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
        return Err(embedded(format!(
            "OUTBOX_PG_BINDIR={} has no initdb; point it at the directory with the Postgres server binaries",
            dir.display()
        )));
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            Path::new(&bin)
                .join("initdb")
                .exists()
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        embedded(
            "no Postgres server binaries found in /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql) or set OUTBOX_PG_BINDIR".into(),
        )
    })
}

fn free_port() -> Result<u16, Error> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| embedded(format!("no free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| embedded(format!("no free port: {e}")))
}
