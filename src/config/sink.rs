//! Where the relay publishes: which broker, how to reach it, and the client
//! settings an operator passes through. Secrets (a password in a broker
//! URL, a token, secret librdkafka properties) never appear in `Debug`,
//! `Display` or an error.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

/// The kinds of broker the relay publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Kafka,
    Nats,
    RabbitMq,
}

impl SinkKind {
    /// The broker's name, for people.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Kafka => "Kafka",
            SinkKind::Nats => "NATS JetStream",
            SinkKind::RabbitMq => "RabbitMQ",
        }
    }
}

impl FromStr for SinkKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kafka" => Ok(SinkKind::Kafka),
            "nats" => Ok(SinkKind::Nats),
            "rabbitmq" => Ok(SinkKind::RabbitMq),
            other => Err(format!(
                "unknown sink \"{other}\"; use kafka, nats or rabbitmq"
            )),
        }
    }
}

impl fmt::Display for SinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Nats => "nats",
            SinkKind::RabbitMq => "rabbitmq",
        })
    }
}

/// Which broker the relay publishes to, and how to reach it.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    Kafka(KafkaConfig),
    Nats(NatsConfig),
    RabbitMq(RabbitMqConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> SinkKind {
        match self {
            SinkConfig::Kafka(_) => SinkKind::Kafka,
            SinkConfig::Nats(_) => SinkKind::Nats,
            SinkConfig::RabbitMq(_) => SinkKind::RabbitMq,
        }
    }

    /// Where it publishes, without secrets (for logs and `status`).
    pub fn endpoint(&self) -> String {
        match self {
            SinkConfig::Kafka(kafka) => kafka.brokers.clone(),
            SinkConfig::Nats(nats) => nats
                .servers
                .iter()
                .map(BrokerUrl::redacted)
                .collect::<Vec<_>>()
                .join(","),
            SinkConfig::RabbitMq(rabbitmq) => rabbitmq.url.redacted(),
        }
    }
}

impl From<KafkaConfig> for SinkConfig {
    fn from(kafka: KafkaConfig) -> Self {
        SinkConfig::Kafka(kafka)
    }
}

/// How to reach Kafka.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Extra librdkafka properties, applied after the relay's own (so they
    /// can override them).
    pub properties: Vec<(String, String)>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(k, v)| {
                if is_secret_property(k) {
                    (k.as_str(), "***")
                } else {
                    (k.as_str(), v.as_str())
                }
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &properties)
            .finish()
    }
}

/// Client properties whose values are secrets.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.contains("token")
        || key.contains("sasl.oauthbearer.config")
}

/// A broker URL. Its password is only ever handed to the client: `Debug`
/// and `Display` show `***` in its place.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl(url::Url);

impl BrokerUrl {
    /// Parses `text` as a URL with one of `schemes` and a host; `flag` and
    /// `example` go into the error, which never repeats the text (it may
    /// hold a password).
    pub fn parse(text: &str, schemes: &[&str], flag: &str, example: &str) -> Result<Self, Error> {
        let bad = |cause: &str| {
            Error::Config(format!(
                "{flag} is not a usable URL: {cause}; give it as {example}"
            ))
        };
        let url = url::Url::parse(text.trim()).map_err(|e| bad(&e.to_string()))?;
        if !schemes.contains(&url.scheme()) {
            return Err(bad(&format!(
                "the scheme is \"{}\", not {}",
                url.scheme(),
                schemes
                    .iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("it has no host"));
        }
        Ok(BrokerUrl(url))
    }

    /// The URL with its password, for the client only.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }

    /// The URL with `***` for its password.
    pub fn redacted(&self) -> String {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        shown.to_string()
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// How to reach NATS JetStream.
#[derive(Clone)]
pub struct NatsConfig {
    /// Servers of one cluster, tried in order (`nats://` or `tls://`).
    pub servers: Vec<BrokerUrl>,
    /// How long a publish may wait for its PubAck.
    pub ack_timeout: Duration,
    /// A `.creds` file (JWT and nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// A token, for servers that authenticate with one.
    pub token: Option<String>,
    /// Extra root certificates (PEM) for TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for mutual TLS.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Require TLS even with a `nats://` URL.
    pub require_tls: bool,
}

impl NatsConfig {
    pub const EXAMPLE: &'static str = "nats://HOST:4222 (tls://HOST:4222 for TLS; user:password@ before the host; several servers comma-separated)";
    pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

    /// `urls` is `--sink-url` (comma-separated servers); `options` are the
    /// `--sink-config` pairs.
    pub fn parse(urls: &str, options: &[(String, String)]) -> Result<Self, Error> {
        let servers = urls
            .split(',')
            .filter(|url| !url.trim().is_empty())
            .map(|url| {
                BrokerUrl::parse(
                    url,
                    &["nats", "tls"],
                    "--sink-url (OUTBOX_SINK_URL)",
                    Self::EXAMPLE,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(missing_url(SinkKind::Nats, Self::EXAMPLE));
        }
        let mut config = NatsConfig {
            servers,
            ack_timeout: Self::DEFAULT_ACK_TIMEOUT,
            credentials_file: None,
            token: None,
            tls_ca_file: None,
            tls_client: None,
            require_tls: false,
        };
        let (mut cert, mut key) = (None, None);
        for (name, value) in options {
            match name.as_str() {
                "ack_timeout" => config.ack_timeout = duration_option(name, value)?,
                "credentials_file" => config.credentials_file = Some(value.into()),
                "token" => config.token = Some(value.clone()),
                "tls_ca_file" => config.tls_ca_file = Some(value.into()),
                "tls_cert_file" => cert = Some(PathBuf::from(value)),
                "tls_key_file" => key = Some(PathBuf::from(value)),
                "require_tls" => config.require_tls = bool_option(name, value)?,
                other => {
                    return Err(unknown_option(
                        SinkKind::Nats,
                        other,
                        "ack_timeout, credentials_file, token, tls_ca_file, tls_cert_file, tls_key_file, require_tls",
                    ));
                }
            }
        }
        config.tls_client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "--sink-config has only one of tls_cert_file and tls_key_file; mutual TLS needs both, as PEM files".into(),
                ));
            }
        };
        Ok(config)
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("servers", &self.servers)
            .field("ack_timeout", &self.ack_timeout)
            .field("credentials_file", &self.credentials_file)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client", &self.tls_client)
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

/// How to reach RabbitMQ.
#[derive(Debug, Clone)]
pub struct RabbitMqConfig {
    /// `amqp://` or `amqps://`, with the virtual host as the path.
    pub url: BrokerUrl,
    /// How long a publish may wait for its publisher confirm.
    pub confirm_timeout: Duration,
    /// Messages larger than this are refused before they are sent
    /// (RabbitMQ closes the channel on one, failing every message in flight).
    pub max_message_size: usize,
    /// Extra root certificates (PEM) for `amqps://`.
    pub tls_ca_file: Option<PathBuf>,
}

impl RabbitMqConfig {
    pub const EXAMPLE: &'static str =
        "amqp://USER:PASSWORD@HOST:5672/VHOST (amqps:// for TLS; %2f for the default vhost \"/\")";
    pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
    /// RabbitMQ's own default `max_message_size` (128 MiB).
    pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

    pub fn parse(url: &str, options: &[(String, String)]) -> Result<Self, Error> {
        if url.trim().is_empty() {
            return Err(missing_url(SinkKind::RabbitMq, Self::EXAMPLE));
        }
        let mut config = RabbitMqConfig {
            url: BrokerUrl::parse(
                url,
                &["amqp", "amqps"],
                "--sink-url (OUTBOX_SINK_URL)",
                Self::EXAMPLE,
            )?,
            confirm_timeout: Self::DEFAULT_CONFIRM_TIMEOUT,
            max_message_size: Self::DEFAULT_MAX_MESSAGE_SIZE,
            tls_ca_file: None,
        };
        for (name, value) in options {
            match name.as_str() {
                "confirm_timeout" => config.confirm_timeout = duration_option(name, value)?,
                "max_message_size" => {
                    config.max_message_size = value.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        Error::Config(format!(
                            "--sink-config max_message_size={value:?} is not a positive number of bytes; give the server's max_message_size, e.g. 134217728"
                        ))
                    })?
                }
                "tls_ca_file" => config.tls_ca_file = Some(value.into()),
                other => {
                    return Err(unknown_option(
                        SinkKind::RabbitMq,
                        other,
                        "confirm_timeout, max_message_size, tls_ca_file",
                    ));
                }
            }
        }
        Ok(config)
    }
}

fn missing_url(kind: SinkKind, example: &str) -> Error {
    Error::Config(format!(
        "--sink-url (OUTBOX_SINK_URL) is missing or empty; --sink {kind} needs the {} server as {example}",
        kind.name()
    ))
}

fn unknown_option(kind: SinkKind, name: &str, known: &str) -> Error {
    Error::Config(format!(
        "--sink-config key {name:?} is not a {} setting; use one of {known}",
        kind.name()
    ))
}

fn duration_option(name: &str, value: &str) -> Result<Duration, Error> {
    humantime::parse_duration(value.trim())
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            Error::Config(format!(
                "--sink-config {name}={value:?} is not a duration; give e.g. {name}=10s"
            ))
        })
}

fn bool_option(name: &str, value: &str) -> Result<bool, Error> {
    match value.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::Config(format!(
            "--sink-config {name}={value:?} is not true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_password_is_never_shown() {
        let url = BrokerUrl::parse(
            "amqp://relay:s3cret@rabbit:5672/%2f",
            &["amqp"],
            "--sink-url",
            "amqp://HOST",
        )
        .unwrap();
        assert_eq!(url.redacted(), "amqp://relay:***@rabbit:5672/%2f");
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        assert!(url.expose().contains("s3cret"));
        let err = BrokerUrl::parse(
            "http://relay:s3cret@rabbit",
            &["amqp"],
            "--sink-url",
            "amqp://HOST",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"http\"") && !err.contains("s3cret"), "{err}");
    }

    #[test]
    fn nats_settings_are_checked() {
        let opts = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let config = NatsConfig::parse(
            "nats://a:4222,tls://u:pw@b:4222",
            &opts(&[("ack_timeout", "3s"), ("token", "t0k")]),
        )
        .unwrap();
        assert_eq!(config.servers.len(), 2);
        assert_eq!(config.ack_timeout, Duration::from_secs(3));
        assert!(!format!("{config:?}").contains("t0k"));
        assert!(!format!("{config:?}").contains("pw"));
        for (urls, pairs, says) in [
            ("", vec![], "missing"),
            ("http://a", vec![], "scheme"),
            ("nats://a", vec![("ack_timeout", "soon")], "duration"),
            ("nats://a", vec![("acks", "all")], "not a NATS"),
            ("nats://a", vec![("tls_cert_file", "c.pem")], "both"),
        ] {
            let err = NatsConfig::parse(urls, &opts(&pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn rabbitmq_settings_are_checked() {
        let config = RabbitMqConfig::parse(
            "amqps://u:p@h/v",
            &[("max_message_size".into(), "1024".into())],
        )
        .unwrap();
        assert_eq!(config.max_message_size, 1024);
        let err = RabbitMqConfig::parse("nats://h", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"amqp\" or \"amqps\""), "{err}");
        let err = RabbitMqConfig::parse("amqp://h", &[("max_message_size".into(), "0".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("positive"), "{err}");
    }
}
