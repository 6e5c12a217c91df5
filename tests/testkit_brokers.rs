//! The throwaway NATS and RabbitMQ servers of the testkit: each starts,
//! answers its protocol, and behaves as the fault tests will assume when it
//! is killed, stopped, frozen and started again. NATS is driven with its
//! text protocol and RabbitMQ with its protocol header and `rabbitmqctl`,
//! so the checks need no client library.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::testkit::rabbitmq::{QueueType, declare_topic_queue_of};
use support::testkit::{TempNats, TempRabbitMq};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a healthy server may take to answer one request.
const ANSWER: Duration = Duration::from_secs(5);

/// How long a frozen server is given to (wrongly) answer.
const SILENCE: Duration = Duration::from_secs(1);

/// A client of the NATS text protocol, enough for JetStream's JSON API.
struct Nats {
    conn: BufReader<TcpStream>,
    inbox: u32,
}

impl Nats {
    /// Connects and logs in; the server's `-ERR` line if it refuses.
    async fn connect(port: u16, login: Option<(&str, &str)>) -> Result<Self, String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let mut nats = Nats {
            conn: BufReader::new(stream),
            inbox: 0,
        };
        let info = nats.line().await?;
        assert!(info.starts_with("INFO "), "{info}");
        let mut connect = serde_json::json!({ "verbose": false, "pedantic": false });
        if let Some((user, pass)) = login {
            connect["user"] = user.into();
            connect["pass"] = pass.into();
        }
        nats.send(&format!("CONNECT {connect}\r\nPING\r\n")).await?;
        nats.pong().await?;
        Ok(nats)
    }

    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.conn
            .get_mut()
            .write_all(text.as_bytes())
            .await
            .map_err(|e| e.to_string())
    }

    async fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.conn.read_line(&mut line).await {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Waits for PONG; an `-ERR` line is the error.
    async fn pong(&mut self) -> Result<(), String> {
        loop {
            let line = self.line().await?;
            match line.as_str() {
                "PONG" => return Ok(()),
                "PING" => self.send("PONG\r\n").await?,
                "+OK" => {}
                _ => return Err(line),
            }
        }
    }

    /// Publishes `payload` to `subject` and returns the JSON reply.
    async fn request(&mut self, subject: &str, payload: &str) -> Result<Value, String> {
        self.inbox += 1;
        let inbox = format!("_INBOX.test.{}", self.inbox);
        self.send(&format!(
            "SUB {inbox} {sid}\r\nPUB {subject} {inbox} {len}\r\n{payload}\r\n",
            sid = self.inbox,
            len = payload.len()
        ))
        .await?;
        loop {
            let line = self.line().await?;
            if line == "PING" {
                self.send("PONG\r\n").await?;
                continue;
            }
            let Some(header) = line.strip_prefix("MSG ") else {
                return Err(line);
            };
            let len: usize = header
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad MSG line: {line}"))?;
            let mut body = vec![0; len + 2];
            self.conn
                .read_exact(&mut body)
                .await
                .map_err(|e| e.to_string())?;
            return serde_json::from_slice(&body[..len]).map_err(|e| e.to_string());
        }
    }
}

/// How many messages JetStream holds in the stream ORDERS.
async fn orders_in_stream(port: u16) -> u64 {
    let mut nats = Nats::connect(port, None).await.expect("connect");
    let info = nats
        .request("$JS.API.STREAM.INFO.ORDERS", "")
        .await
        .expect("stream info");
    info["state"]["messages"]
        .as_u64()
        .unwrap_or_else(|| panic!("no message count in {info}"))
}

/// Whether the server answers PING within `within`.
async fn nats_answers(port: u16, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, Nats::connect(port, None)).await,
        Ok(Ok(_))
    )
}

async fn accepts_tcp(port: u16) -> bool {
    matches!(
        tokio::time::timeout(ANSWER, TcpStream::connect(("127.0.0.1", port))).await,
        Ok(Ok(_))
    )
}

#[tokio::test]
async fn nats_keeps_its_stream_across_a_kill_and_a_stop_and_is_silent_while_frozen() {
    let started = Instant::now();
    let mut nats = TempNats::start().await.expect("start nats-server");
    eprintln!("nats-server ready in {:?}", started.elapsed());
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));

    let mut client = Nats::connect(port, None).await.expect("connect");
    let account = client.request("$JS.API.INFO", "").await.expect("info");
    assert!(
        account.get("error").is_none(),
        "JetStream is off: {account}"
    );
    let created = client
        .request(
            "$JS.API.STREAM.CREATE.ORDERS",
            r#"{"name":"ORDERS","subjects":["orders.>"],"storage":"file"}"#,
        )
        .await
        .expect("create stream");
    assert!(created.get("error").is_none(), "{created}");
    let ack = client.request("orders.1", "{}").await.expect("publish");
    assert_eq!(ack["seq"], 1, "{ack}");
    drop(client);

    nats.kill();
    assert!(!accepts_tcp(port).await, "killed, yet it accepts");
    let restarted = Instant::now();
    nats.start_again().await.expect("start after kill");
    eprintln!("nats-server ready again in {:?}", restarted.elapsed());
    assert_eq!(orders_in_stream(port).await, 1, "lost by the kill");

    nats.freeze();
    assert!(
        accepts_tcp(port).await,
        "the kernel completes the handshake"
    );
    assert!(!nats_answers(port, SILENCE).await, "frozen, yet it answers");
    nats.thaw();
    assert!(nats_answers(port, ANSWER).await, "thawed, yet silent");

    nats.stop();
    assert!(!accepts_tcp(port).await, "stopped, yet it accepts");
    nats.start_again().await.expect("start after stop");
    assert_eq!(orders_in_stream(port).await, 1, "lost by the stop");
    assert_eq!(nats.log().matches("Server is ready").count(), 3);
}

#[tokio::test]
async fn nats_lets_in_only_the_user_with_the_password() {
    let nats = TempNats::start_with_auth("relay", "p@ss word")
        .await
        .expect("start nats-server");
    let port = nats.port();
    assert_eq!(nats.credentials(), Some(("relay", "p@ss word")));
    assert_eq!(
        nats.url_with_credentials(),
        format!("nats://relay:p%40ss%20word@127.0.0.1:{port}")
    );
    let refused = |login| async move {
        match Nats::connect(port, login).await {
            Ok(_) => panic!("let in with {login:?}"),
            Err(e) => e,
        }
    };
    assert!(
        refused(Some(("relay", "wrong")))
            .await
            .contains("Authorization Violation")
    );
    assert!(refused(None).await.contains("Authorization Violation"));
    Nats::connect(port, Some(("relay", "p@ss word")))
        .await
        .expect("the right password");
}

/// Whether an AMQP server answers the protocol header with a method frame
/// (Connection.Start) within `within`.
async fn amqp_greets(port: u16, within: Duration) -> bool {
    let greeting = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
        let mut frame_type = [0u8; 1];
        stream.read_exact(&mut frame_type).await.ok()?;
        Some(frame_type[0])
    };
    matches!(tokio::time::timeout(within, greeting).await, Ok(Some(1)))
}

#[tokio::test]
async fn rabbitmq_keeps_its_database_across_a_kill_and_a_stop_and_is_silent_while_frozen() {
    let started = Instant::now();
    let mut rabbit = TempRabbitMq::start().await.expect("start rabbitmq-server");
    eprintln!("RabbitMQ node ready in {:?}", started.elapsed());
    let port = rabbit.port();
    assert_eq!(
        rabbit.url(),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    );
    assert!(amqp_greets(port, ANSWER).await);
    rabbit
        .ctl(&["set_policy", "short", "^short\\.", r#"{"max-length":1}"#])
        .expect("set a policy");

    rabbit.kill();
    assert!(!accepts_tcp(port).await, "killed, yet it accepts");
    let restarted = Instant::now();
    rabbit.start_again().await.expect("start after kill");
    eprintln!("RabbitMQ node ready again in {:?}", restarted.elapsed());
    assert!(amqp_greets(port, ANSWER).await);
    let policies = rabbit.ctl(&["-q", "list_policies"]).expect("list policies");
    assert!(policies.contains("short"), "lost by the kill: {policies}");

    rabbit.freeze();
    assert!(
        accepts_tcp(port).await,
        "the kernel completes the handshake"
    );
    assert!(!amqp_greets(port, SILENCE).await, "frozen, yet it answers");
    rabbit.thaw();
    assert!(amqp_greets(port, ANSWER).await, "thawed, yet silent");

    rabbit.stop();
    assert!(!accepts_tcp(port).await, "stopped, yet it accepts");
    rabbit.start_again().await.expect("start after stop");
    assert!(amqp_greets(port, ANSWER).await);
    assert_eq!(rabbit.log().matches("Server startup complete").count(), 3);
}

#[tokio::test]
async fn two_rabbitmq_nodes_run_side_by_side() {
    let started = Instant::now();
    let (first, second) = tokio::join!(
        TempRabbitMq::start(),
        TempRabbitMq::start_with_config(&[("max_message_size", "1048576")])
    );
    let (first, second) = (first.expect("first node"), second.expect("second node"));
    eprintln!("two RabbitMQ nodes ready in {:?}", started.elapsed());
    assert_ne!(first.node(), second.node());
    assert_ne!(first.port(), second.port());
    for rabbit in [&first, &second] {
        assert!(amqp_greets(rabbit.port(), ANSWER).await);
        let node = rabbit.ctl(&["-q", "eval", "node()."]).expect("eval");
        assert_eq!(node.trim().trim_matches('\''), rabbit.node());
    }
    let limit = |rabbit: &TempRabbitMq| {
        rabbit
            .ctl(&[
                "-q",
                "eval",
                "application:get_env(rabbit, max_message_size).",
            ])
            .expect("eval")
    };
    assert_eq!(limit(&second).trim(), "{ok,1048576}");
    eprintln!("default max_message_size: {}", limit(&first).trim());

    // Destinations of each queue type (the bench's --rabbitmq-queue).
    for kind in [QueueType::Classic, QueueType::Quorum, QueueType::Stream] {
        let name = format!("typed.{kind}");
        declare_topic_queue_of(kind, &first.url(), &name, &name, false)
            .await
            .expect("declare");
    }
    let queues = first
        .ctl(&["-q", "list_queues", "name", "type"])
        .expect("list queues");
    for kind in ["classic", "quorum", "stream"] {
        assert!(
            queues.lines().any(|line| line
                .split_whitespace()
                .eq([format!("typed.{kind}").as_str(), kind])),
            "no {kind} queue: {queues}"
        );
    }
}
