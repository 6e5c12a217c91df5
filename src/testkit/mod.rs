//! Throwaway infrastructure for `outbox-relay demo`, `outbox-relay bench`
//! and the test suite, each started from the system's binaries in a temp
//! dir on free loopback ports: a Postgres cluster, a NATS server with
//! JetStream and a RabbitMQ node. The Kafka side is librdkafka's in-process
//! mock cluster (`rdkafka::mocking::MockCluster`), used directly.
//!
//! Not part of the library: the binary declares this module, and the test
//! harness includes the same files (`tests/support/mod.rs`), so a service
//! that depends on the crate never compiles it.
//!
//! Every server is the child of a supervisor thread of its own and gets
//! SIGKILL if that thread (or the whole process) dies, so a crashed test or
//! demo never leaves a server behind.

pub mod nats;
pub mod postgres;
pub mod rabbitmq;

// Not every user of the module needs all of them.
#[allow(unused_imports)]
pub use nats::TempNats;
#[allow(unused_imports)]
pub use postgres::{StopMode, TempPostgres};
#[allow(unused_imports)]
pub use rabbitmq::TempRabbitMq;

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use outbox_relay::error::Error;

/// What the owner of a [`Supervised`] server asks its supervisor thread.
enum Order {
    /// Deliver a signal and report back once it was sent.
    Signal(Signal, mpsc::Sender<()>),
    /// Deliver a signal, wait up to the grace period for the exit, then
    /// SIGKILL; the thread ends after the server exited.
    Stop(Signal, Duration),
}

/// A server process that is the child of a thread of its own: the
/// parent-death signal (SIGKILL) fires when the spawning thread exits, so
/// the thread lives exactly as long as the server. Only that thread reaps
/// the child, and it signals the child only while it has not reaped it, so a
/// signal never reaches a recycled pid. Dropping it kills the server.
struct Supervised {
    pid: Pid,
    orders: mpsc::Sender<Order>,
    supervisor: JoinHandle<()>,
}

impl Supervised {
    /// Starts `cmd` (`what` names it in errors and in the thread's name).
    fn spawn(what: &str, mut cmd: Command) -> Result<Self, Error> {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let (pid_tx, pid_rx) = mpsc::channel();
        let (orders, orders_rx) = mpsc::channel::<Order>();
        let supervisor = std::thread::Builder::new()
            .name(format!("temp-{what}"))
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
                let mut running = || matches!(child.try_wait(), Ok(None));
                loop {
                    match orders_rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(Order::Signal(signal, done)) => {
                            if running() {
                                let _ = kill(pid, signal);
                                if signal == Signal::SIGSTOP {
                                    wait_stopped(pid);
                                }
                            }
                            let _ = done.send(());
                        }
                        Ok(Order::Stop(signal, grace)) => {
                            if running() {
                                // A frozen server would never act on the signal.
                                let _ = kill(pid, Signal::SIGCONT);
                                let _ = kill(pid, signal);
                            }
                            let until = Instant::now() + grace;
                            while running() && Instant::now() < until {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if running() {
                                let _ = kill(pid, Signal::SIGKILL);
                            }
                            let _ = child.wait();
                            return;
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if !running() {
                                return;
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            if running() {
                                let _ = kill(pid, Signal::SIGKILL);
                            }
                            let _ = child.wait();
                            return;
                        }
                    }
                }
            })
            .map_err(|e| embedded(format!("cannot start a supervisor thread for {what}: {e}")))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| embedded(format!("the supervisor thread of {what} died")))?
            .map_err(|e| embedded(format!("cannot start {what}: {e}")))?;
        Ok(Supervised {
            pid,
            orders,
            supervisor,
        })
    }

    /// The server's OS pid.
    fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether the server exited (noticed within 100 ms).
    fn exited(&self) -> bool {
        self.supervisor.is_finished()
    }

    /// Sends `signal` if the server still runs; returns once it was sent.
    fn signal(&self, signal: Signal) {
        let (done, sent) = mpsc::channel();
        if self.orders.send(Order::Signal(signal, done)).is_ok() {
            let _ = sent.recv();
        }
    }

    /// Sends `signal`, SIGKILL after `grace`, and returns once the server
    /// exited.
    fn stop(self, signal: Signal, grace: Duration) {
        let _ = self.orders.send(Order::Stop(signal, grace));
        let _ = self.supervisor.join();
    }
}

/// Waits (up to 2 s) until every thread of `pid` is stopped, so that a
/// freeze is in force when it returns: a signal is delivered to each thread
/// when it next runs, which on a loaded machine can be later.
fn wait_stopped(pid: Pid) {
    let until = Instant::now() + Duration::from_secs(2);
    let threads = format!("/proc/{pid}/task");
    let stopped = |stat: &str| {
        // The state follows the command name in parentheses.
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with(['T', 't']))
    };
    while Instant::now() < until {
        let Ok(entries) = std::fs::read_dir(&threads) else {
            return;
        };
        let all = entries.flatten().all(|thread| {
            std::fs::read_to_string(thread.path().join("stat")).map_or(true, |stat| stopped(&stat))
        });
        if all {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn embedded(message: String) -> Error {
    Error::Embedded(message)
}

/// `N` distinct free loopback ports. All are bound until all are chosen, so
/// the kernel cannot hand out one twice.
fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| embedded(format!("no free loopback port: {e}")))?;
        *port = listener
            .local_addr()
            .map_err(|e| embedded(format!("no free loopback port: {e}")))?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// The first of `dirs` holding an executable `name`.
fn find_program(name: &str, dirs: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.into_iter().map(|dir| dir.join(name)).find(|path| {
        fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The directories of `PATH`, then `extra`.
fn path_then(extra: &[&str]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(extra.iter().map(PathBuf::from));
    dirs
}

/// The size of a log file, where the lines of the next start will begin.
fn log_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What a log file holds from byte `from` on (all of it if it shrank).
fn log_since(path: &Path, from: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(0);
    let from = if from <= bytes.len() { from } else { 0 };
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// The last `lines` non-empty lines of `text` on one line, for an error.
fn tail(text: &str, lines: usize) -> String {
    let last: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .rev()
        .take(lines)
        .collect();
    last.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// The first `lines` non-empty lines of `text` on one line, for an error.
fn head(text: &str, lines: usize) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(lines)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Whether something accepts TCP connections on the loopback `port`.
async fn accepts(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await,
        Ok(Ok(_))
    )
}
