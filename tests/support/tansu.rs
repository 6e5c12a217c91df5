//! A tansu broker of a test's own.

use super::*;

/// The tansu binary in `OUTBOX_TEST_TANSU`, for a test that runs a broker of
/// its own because it `needs` to (e.g. "kills and restarts a broker of its
/// own"). Unset: `None`, after saying on the test output that `test` does not
/// run and why.
pub fn tansu_binary(test: &str, needs: &str) -> Option<std::ffi::OsString> {
    let binary = std::env::var_os("OUTBOX_TEST_TANSU");
    if binary.is_none() {
        skip_notice(
            test,
            &format!("it {needs}; set OUTBOX_TEST_TANSU to a tansu binary (.ci/run does)"),
        );
    }
    binary
}

/// A tansu broker of the test's own, on memory storage, killed on drop.
pub struct Tansu {
    binary: std::ffi::OsString,
    port: u16,
    /// The address given to clients in metadata, if not the listener's.
    advertised: Option<String>,
    process: Option<std::process::Child>,
}

impl Tansu {
    /// Starts `binary` on a free port and waits until it accepts connections.
    pub async fn start(binary: std::ffi::OsString) -> Tansu {
        Tansu::start_advertising(binary, None).await
    }

    /// Starts `binary` on a free port, telling clients to connect to
    /// `advertised` (HOST:PORT, e.g. a TLS listener in front of it).
    pub async fn start_advertising(
        binary: std::ffi::OsString,
        advertised: Option<String>,
    ) -> Tansu {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut tansu = Tansu {
            binary,
            port,
            advertised,
            process: None,
        };
        tansu.restart().await;
        tansu
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) on its port: empty, as memory storage is.
    pub async fn restart(&mut self) {
        let url = format!("tcp://{}", self.brokers());
        let advertised = match &self.advertised {
            Some(address) => format!("tcp://{address}"),
            None => url.clone(),
        };
        self.process = Some(
            std::process::Command::new(&self.binary)
                .args(["broker", "--listener-url", &url])
                .args(["--advertised-listener-url", &advertised])
                .args(["--storage-engine", "memory://tansu/"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start tansu (OUTBOX_TEST_TANSU)"),
        );
        let brokers = self.brokers();
        wait_for("tansu to listen", Duration::from_secs(60), || {
            let brokers = brokers.clone();
            async move { tokio::net::TcpStream::connect(brokers).await.is_ok() }
        })
        .await;
    }

    /// SIGKILL: the broker loses its log, its topics and every producer id
    /// it handed out.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().unwrap();
            process.wait().unwrap();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
