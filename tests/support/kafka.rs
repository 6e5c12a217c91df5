//! Kafka for one test: a mock cluster, or the brokers in `OUTBOX_TEST_BROKERS`.

use super::*;

/// Properties every Kafka client of the harness adds (a test binary whose
/// broker speaks only TLS sets them once, before its first client).
static CLIENT_PROPERTIES: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Makes every harness client (admin, readers) use `properties`.
pub fn set_client_properties(properties: &[(&str, &str)]) {
    let properties = properties
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(
        CLIENT_PROPERTIES.set(properties).is_ok(),
        "client properties are set once per test binary"
    );
}

/// A Kafka client configuration for `brokers`, with the binary's properties.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in CLIENT_PROPERTIES.get().into_iter().flatten() {
        config.set(key, value);
    }
    config
}

/// A Kafka for one test.
pub enum Kafka {
    Mock(MockCluster<'static, DefaultProducerContext>),
    /// The brokers in `OUTBOX_TEST_BROKERS`, and the broker process from
    /// `OUTBOX_TEST_BROKER_PID` if given (outage tests pause it).
    External {
        brokers: String,
        process: Option<Pid>,
    },
}

/// `OUTBOX_TEST_BROKERS`, if set and not empty.
pub fn external_brokers() -> Option<String> {
    std::env::var("OUTBOX_TEST_BROKERS")
        .ok()
        .filter(|brokers| !brokers.is_empty())
}

/// Says on the test output, uncaptured, that `test` does not run and why.
/// Written to the stderr file descriptor directly because the test harness
/// captures `eprintln!`.
pub fn skip_notice(test: &str, why: &str) {
    use std::io::Write;
    let against = external_brokers()
        .map(|brokers| format!(" against OUTBOX_TEST_BROKERS={brokers}"))
        .unwrap_or_default();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}{against}: {why}");
}

impl Kafka {
    /// The brokers in `OUTBOX_TEST_BROKERS`, else a new 3-broker mock cluster.
    pub fn start() -> Kafka {
        match external_brokers() {
            Some(brokers) => Kafka::External {
                brokers,
                process: std::env::var("OUTBOX_TEST_BROKER_PID").ok().map(|pid| {
                    Pid::from_raw(pid.parse().expect("OUTBOX_TEST_BROKER_PID is a pid"))
                }),
            },
            None => Kafka::mock(),
        }
    }

    /// A new 3-broker mock cluster.
    pub fn mock() -> Kafka {
        Kafka::Mock(MockCluster::new(3).expect("start the mock cluster"))
    }

    /// The mock cluster, for a test that needs what only it can do (request
    /// error injection, slowed round trips). Under `OUTBOX_TEST_BROKERS` the
    /// test does not run: `None`, after saying so and `why` on the test output.
    pub fn mock_only(test: &str, why: &str) -> Option<Kafka> {
        if external_brokers().is_some() {
            skip_notice(test, why);
            return None;
        }
        Some(Kafka::mock())
    }

    /// A Kafka whose brokers the test can take down and bring back: a mock
    /// cluster, or the external broker if `OUTBOX_TEST_BROKER_PID` names its
    /// process. `None`, after saying why, for an external broker without one.
    pub fn stoppable(test: &str) -> Option<Kafka> {
        match Kafka::start() {
            Kafka::External { process: None, .. } => {
                skip_notice(
                    test,
                    "an outage test stops and resumes the broker process; set OUTBOX_TEST_BROKER_PID to its pid",
                );
                None
            }
            kafka => Some(kafka),
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Kafka::Mock(mock) => mock.bootstrap_servers(),
            Kafka::External { brokers, .. } => brokers.clone(),
        }
    }

    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        match self {
            Kafka::Mock(mock) => mock,
            Kafka::External { .. } => panic!("this test needs the mock cluster"),
        }
    }

    /// Takes every broker down: the mock's brokers refuse connections; the
    /// external broker process is stopped with SIGSTOP, so its connections
    /// stay open and go silent, as with a hung broker or a network partition.
    pub fn stop_brokers(&self) {
        match self {
            Kafka::Mock(mock) => mock.broker_down(-1).unwrap(),
            Kafka::External { process, .. } => {
                kill(process.expect("a stoppable Kafka"), Signal::SIGSTOP).unwrap()
            }
        }
    }

    /// Brings every broker back.
    pub fn resume_brokers(&self) {
        match self {
            Kafka::Mock(mock) => mock.broker_up(-1).unwrap(),
            Kafka::External { process, .. } => {
                kill(process.expect("a stoppable Kafka"), Signal::SIGCONT).unwrap()
            }
        }
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
            Kafka::Mock(mock) => mock.create_topic(topic, partitions, 3).unwrap(),
            Kafka::External { brokers, .. } => {
                let admin: AdminClient<DefaultClientContext> =
                    client_config(brokers).create().unwrap();
                let topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                let results = admin
                    .create_topics([&topic], &AdminOptions::new())
                    .await
                    .unwrap();
                for result in results {
                    if let Err((name, code)) = result {
                        assert_eq!(
                            code,
                            rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                            "create topic {name}"
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Kafka {
    /// A test that fails mid-outage must not leave the shared broker stopped.
    fn drop(&mut self) {
        if let Kafka::External {
            process: Some(pid), ..
        } = self
        {
            let _ = kill(*pid, Signal::SIGCONT);
        }
    }
}

/// A unique prefix for one test's topics.
pub fn topic_prefix() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..10])
}
