//! `run --config relay.toml`: several outboxes in one process.
//!
//! The file's keys are `run`'s flags by their long names (`database_url` or
//! `database-url`): a key at the top applies to every outbox, a key in an
//! `[[outbox]]` table to that outbox and wins over the top. What neither
//! gives comes from the `OUTBOX_*` variables, then the flags' defaults. Each
//! outbox is then validated exactly as `run`'s flags are, so the file
//! accepts nothing the flags would not.
//!
//! ```toml
//! brokers = "kafka-1:9092,kafka-2:9092"
//! metrics_address = "0.0.0.0:9879"
//!
//! [[outbox]]
//! database_url = "postgres://relay@db-a:5432/shop"
//! schema = "tenant_a"
//! shards = 4
//!
//! [[outbox]]
//! database_url = "postgres://relay@db-b:5432/billing"
//! mode = "tail"
//! kafka_config = ["compression.type=zstd"]
//! ```

use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, Parser};
use outbox_relay::{Error, RelayConfig};
use toml::Value;

use super::cli::{Cli, RunArgs, one_line};

/// One outbox's flags, parsed as `run`'s are; a later value of a flag wins
/// over an earlier one, so an outbox's own keys override the top's.
#[derive(Debug, Parser)]
#[command(name = "outbox", no_binary_name = true, args_override_self = true)]
struct OutboxArgs {
    #[command(flatten)]
    run: RunArgs,
}

/// Keys that are about the process, not an outbox.
const PROCESS_KEYS: &[&str] = &["metrics-address"];

/// With `--config`, every setting of `run` comes from the file (or from an
/// `OUTBOX_*` variable): a flag on the command line as well would leave it
/// unclear which wins.
pub fn only_config_given(run: &ArgMatches) -> Result<(), Error> {
    if run.get_one::<std::path::PathBuf>("config").is_none() {
        return Ok(());
    }
    let command = Cli::command();
    let run_command = command.find_subcommand("run");
    let given: Vec<String> = run
        .ids()
        .filter(|id| {
            id.as_str() != "config"
                && run.value_source(id.as_str()) == Some(ValueSource::CommandLine)
        })
        .map(|id| {
            let long = run_command
                .and_then(|c| c.get_arguments().find(|a| a.get_id() == id))
                .and_then(|a| a.get_long())
                .unwrap_or(id.as_str());
            format!("--{long}")
        })
        .collect();
    if given.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{} given with --config: put every setting in the file (a top-level key applies to every outbox) or in its OUTBOX_* variable",
        given.join(", ")
    )))
}

/// Reads and validates every outbox of the file at `path`.
pub fn load(path: &Path) -> Result<Vec<RelayConfig>, Error> {
    let at = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("--config {at}: cannot read it: {e}")))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        Error::Config(format!(
            "--config {at}: not valid TOML: {}",
            e.message().trim()
        ))
    })?;
    let mut defaults = Vec::new();
    let mut outboxes = None;
    for (key, value) in &table {
        if key == "outbox" {
            outboxes = Some(value);
            continue;
        }
        defaults
            .extend(flag(key, value).map_err(|e| Error::Config(format!("--config {at}: {e}")))?);
    }
    let Some(Value::Array(outboxes)) = outboxes else {
        return Err(Error::Config(format!(
            "--config {at} lists no outbox; add one [[outbox]] table per outbox, each with at least database_url"
        )));
    };
    let mut configs = Vec::with_capacity(outboxes.len());
    for (i, outbox) in outboxes.iter().enumerate() {
        let n = i + 1;
        let fail = |e: String| Error::Config(format!("--config {at}: outbox {n}: {e}"));
        let Value::Table(outbox) = outbox else {
            return Err(fail(
                "is not a table; write it as [[outbox]] followed by its keys".into(),
            ));
        };
        let mut argv = defaults.clone();
        for (key, value) in outbox {
            if PROCESS_KEYS.contains(&key.replace('_', "-").as_str()) {
                return Err(fail(format!(
                    "{key} is for the whole process; set it at the top of the file"
                )));
            }
            argv.extend(flag(key, value).map_err(fail)?);
        }
        let args = OutboxArgs::try_parse_from(&argv)
            .map_err(|e| fail(one_line(&e).trim_start_matches("error: ").to_owned()))?;
        configs.push(args.run.to_config().map_err(|e| fail(e.to_string()))?);
    }
    Ok(configs)
}

/// A key and its value as command-line arguments.
fn flag(key: &str, value: &Value) -> Result<Vec<String>, String> {
    let long = format!("--{}", key.replace('_', "-"));
    if long == "--config" {
        return Err("config cannot name another file".into());
    }
    let scalar = |value: &Value| match value {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(n) => Ok(n.to_string()),
        Value::Float(x) => Ok(x.to_string()),
        _ => Err(format!(
            "{key} must be a string, a number, true or a list of strings"
        )),
    };
    Ok(match value {
        Value::Boolean(true) => vec![long],
        Value::Boolean(false) => Vec::new(),
        Value::Array(items) => items
            .iter()
            .map(|item| scalar(item).map(|v| format!("{long}={v}")))
            .collect::<Result<_, _>>()?,
        value => vec![format!("{long}={}", scalar(value)?)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn an_outbox_takes_the_top_keys_and_overrides_them() {
        let file = write(
            r#"
            brokers = "k:9092"
            batch_size = 50
            kafka_config = ["linger.ms=5"]

            [[outbox]]
            database_url = "postgres://u:p@db-a/shop"
            schema = "tenant_a"
            shards = 4

            [[outbox]]
            database-url = "postgres://u:p@db-b/billing"
            batch_size = 200
            kafka_config = ["compression.type=zstd"]
            "#,
        );
        let configs = load(file.path()).unwrap();
        assert_eq!(configs.len(), 2);
        assert_eq!(configs[0].database.schema().as_str(), "tenant_a");
        assert_eq!(configs[0].shards.get(), 4);
        assert_eq!(configs[0].batch_size.get(), 50);
        let outbox_relay::config::SinkConfig::Kafka(kafka) = &configs[0].sink else {
            panic!("the default sink is Kafka")
        };
        assert_eq!(kafka.brokers, "k:9092");
        assert_eq!(configs[1].database.schema().as_str(), "public");
        assert_eq!(configs[1].batch_size.get(), 200);
        assert_eq!(configs[1].database.target().database, "billing");
        let outbox_relay::config::SinkConfig::Kafka(kafka) = &configs[1].sink else {
            panic!("the default sink is Kafka")
        };
        let properties: Vec<&str> = kafka.properties.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(properties, ["linger.ms", "compression.type"]);
    }

    #[test]
    fn mistakes_are_one_line_naming_the_file_and_the_outbox() {
        let cases = [
            (
                "brokers = \"k:9092\"",
                "lists no outbox; add one [[outbox]] table",
            ),
            (
                "[[outbox]]\ndatabase_url = \"postgres://u:p@h/d\"\nbrokers = \"k:9092\"\nshards = 0",
                "outbox 1: --shards (OUTBOX_SHARDS) 0 is out of range",
            ),
            (
                "[[outbox]]\ndatabase_url = \"postgres://u:p@h/d\"\nbrokers = \"k:9092\"\nbatch_sise = 5",
                "outbox 1: unexpected argument '--batch-sise",
            ),
            (
                "[[outbox]]\ndatabase_url = \"postgres://u:p@h/d\"\nbrokers = \"k:9092\"\nmetrics_address = \"off\"",
                "outbox 1: metrics_address is for the whole process",
            ),
            ("[[outbox\n", "not valid TOML"),
        ];
        for (text, expected) in cases {
            let file = write(text);
            let err = load(file.path()).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.starts_with("--config "), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(!err.contains("u:p@"), "the password leaked: {err}");
        }
    }
}
