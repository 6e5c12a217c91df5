//! The `outbox-relay` binary: parses the command line, sets up logging and
//! the shutdown signal, and calls the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};
mod cmd;
// Shared with the test harness, which uses more of it than the binary.
#[allow(dead_code)]
mod testkit;

use cmd::cli::{Cli, Command, ConsumerDeadLettersCommand, DeadLettersCommand, LogFormat};
use cmd::{bench, demo};
use outbox_relay::{Error, database, dead_letter, inbox, relay};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (cli, matches)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            eprintln!("{}; see `outbox-relay --help`", cmd::cli::one_line(&e));
            return ExitCode::from(2);
        }
    };
    if let Some(run) = matches.subcommand_matches("run")
        && let Err(e) = cmd::config_file::only_config_given(run)
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        // The plain producer's settings draw librdkafka's warning that the
        // gapless guarantee is experimental; the relay's own log has it.
        Command::Bench(_) => "warn,librdkafka=error",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    // Made outside the async runtime: the exporter's HTTP client blocks.
    let exporting = match &cli.command {
        Command::Run(args) => match cmd::otlp::start(args.otlp_endpoint.as_deref()) {
            Ok(exporting) => exporting,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let ended = runtime.block_on(dispatch(cli.command));
    drop(runtime);
    if let Some(exporting) = exporting {
        exporting.shutdown();
    }
    match ended {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Exceeded>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = match e.downcast_ref::<Error>() {
                Some(Error::Config(_)) => 2,
                _ => 1,
            };
            ExitCode::from(code)
        }
    }
}

/// A threshold `status` was given is exceeded (exit 3).
#[derive(Debug)]
struct Exceeded(String);

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status: {}", self.0)
    }
}

impl std::error::Error for Exceeded {}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => {
            let db = args.database.to_config()?;
            let publication = args.publication()?;
            database::migrate(&db, &publication).await?;
            println!(
                "migrated {} (schema {}, publication {publication})",
                db.target(),
                db.schema()
            );
        }
        Command::Run(args) => match &args.config {
            Some(path) => {
                let configs = cmd::config_file::load(path)?;
                relay::run_all(configs, shutdown_on_signal()).await?;
            }
            None => {
                let config = args.to_config()?;
                relay::run(config, shutdown_on_signal()).await?;
            }
        },
        Command::Status(args) => {
            let db = args.database.to_config()?;
            let status = database::status(&db, &args.slot()?).await?;
            let exceeded = status.exceeded(args.max_lag, args.max_dead_letters);
            if args.json {
                println!("{}", status.to_json(&exceeded));
            } else {
                println!("{status}");
            }
            if !exceeded.is_empty() {
                return Err(Exceeded(exceeded.join("; ")).into());
            }
        }
        Command::InboxPurge(args) => {
            let db = args.database.to_config()?;
            let mut conn = database::connect(&db).await?;
            let deleted = inbox::purge(&mut conn, args.older_than)
                .await
                .map_err(Error::db_error("purging the inbox"))?;
            println!(
                "deleted {deleted} inbox rows older than {}",
                humantime::format_duration(args.older_than)
            );
        }
        Command::DeadLetters(command) => dead_letters(command).await?,
        Command::ConsumerDeadLetters(command) => consumer_dead_letters(command).await?,
        Command::Replay(args) => cmd::replay::run(&args, shutdown_on_signal()).await?,
        Command::Bench(args) => {
            let options = bench::BenchOptions {
                relay_binary: std::env::current_exe().map_err(|e| {
                    anyhow::anyhow!("cannot find this binary to run the relay from: {e}")
                })?,
                modes: args.modes.clone(),
                rows: args.rows,
                aggregates: args.aggregates,
                payload_bytes: args.payload_bytes as usize,
                rate: args.rate,
                live: args.live,
                brokers: args.brokers.clone(),
                partitions: args.partitions,
                batch_size: args.batch_size,
                shards: args.shards,
                relay_log_dir: args.relay_log_dir.clone(),
                lanes: args.lanes.clone(),
                lanes_rows: args.lanes_rows,
                lanes_rtt: args.lanes_rtt,
                lanes_batch_size: args.lanes_batch_size,
                retention_rows: args.retention_rows.clone(),
                startup_runs: args.startup_runs,
                consumer_messages: args.consumer_messages,
                rabbitmq_queue: args.rabbitmq_queue,
                sinks: args.sinks.clone(),
            };
            let report = bench::run(&options, shutdown_on_signal()).await?;
            println!("{report}");
            if let Some(path) = &args.json {
                let json = serde_json::to_string_pretty(&report)?;
                std::fs::write(path, json + "\n").map_err(|e| {
                    anyhow::anyhow!("--json {}: cannot write the figures: {e}", path.display())
                })?;
            }
        }
        Command::Demo(args) => {
            let shutdown = shutdown_on_signal();
            let summary = demo::run(&demo::DemoOptions::from(&args), shutdown).await?;
            println!("{summary}");
            if !summary.passed() {
                anyhow::bail!("the demo's checks failed (see above)");
            }
        }
    }
    Ok(())
}

async fn dead_letters(command: DeadLettersCommand) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List { database, limit } => {
            let db = database.to_config()?;
            let mut conn = database::connect(&db).await?;
            database::check_schema(&mut conn, &db).await?;
            let rows = dead_letter::list(&mut conn, limit).await?;
            if rows.is_empty() {
                println!("no dead letters");
            }
            for row in rows {
                println!("{row}");
            }
        }
        DeadLettersCommand::Retry { database, which } => {
            let selection = which.selection(None, "dead-letters retry")?;
            let db = database.to_config()?;
            let mut conn = database::connect(&db).await?;
            database::check_schema(&mut conn, &db).await?;
            let moved = dead_letter::retry(&mut conn, selection).await?;
            println!("moved {moved} rows back into the outbox");
        }
        DeadLettersCommand::Purge {
            database,
            which,
            older_than,
        } => {
            let selection = which.selection(older_than, "dead-letters purge")?;
            let db = database.to_config()?;
            let mut conn = database::connect(&db).await?;
            database::check_schema(&mut conn, &db).await?;
            let deleted = dead_letter::purge(&mut conn, selection).await?;
            println!("deleted {deleted} dead letters");
        }
    }
    Ok(())
}

async fn consumer_dead_letters(command: ConsumerDeadLettersCommand) -> anyhow::Result<()> {
    use outbox_relay::consumer;
    // The table is in the consumer's database, created by the same
    // migrations as the inbox.
    let check = |e: sqlx::Error| match e.as_database_error().and_then(|e| e.code()) {
        Some(code) if code == "42P01" => anyhow::anyhow!(
            "the table consumer_dead_letter does not exist in this database and schema; \
             run `outbox-relay migrate` against the consumer's database"
        ),
        _ => anyhow::anyhow!("reading consumer_dead_letter: {e}"),
    };
    match command {
        ConsumerDeadLettersCommand::List {
            database,
            group,
            limit,
            json,
        } => {
            let db = database.to_config()?;
            let mut conn = database::connect(&db).await?;
            let rows = consumer::list(&mut conn, group.as_deref(), limit)
                .await
                .map_err(check)?;
            if rows.is_empty() && !json {
                println!("no consumer dead letters");
            }
            for row in rows {
                if json {
                    println!("{}", row.to_json());
                } else {
                    println!("{row}");
                }
            }
        }
        ConsumerDeadLettersCommand::Retry {
            database,
            group,
            which,
        } => {
            let selection = which.selection(None, "consumer-dead-letters retry")?;
            let db = database.to_config()?;
            let mut conn = database::connect(&db).await?;
            let marked = consumer::request_retry(&mut conn, &group, selection)
                .await
                .map_err(check)?;
            println!(
                "marked {marked} dead letters of group {group} for retry; a running consumer of the group applies them"
            );
        }
        ConsumerDeadLettersCommand::Purge {
            database,
            group,
            which,
            older_than,
        } => {
            let selection = which.selection(older_than, "consumer-dead-letters purge")?;
            let db = database.to_config()?;
            let mut conn = database::connect(&db).await?;
            let deleted = consumer::purge(&mut conn, &group, selection)
                .await
                .map_err(check)?;
            println!("deleted {deleted} consumer dead letters of group {group}");
        }
    }
    Ok(())
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_env("OUTBOX_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    // The replication client logs its own end as an error; the relay
    // reports the same failure once, with the fix, so it is quiet unless
    // asked for by name.
    let asked = std::env::var("OUTBOX_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .is_ok_and(|v| v.contains("pgwire_replication"));
    let filter = if asked {
        filter
    } else {
        // A constant, valid directive: parse cannot fail.
        filter.add_directive("pgwire_replication=off".parse().expect("a valid directive"))
    };
    // Postgres's notices (`schema "public" already exists, skipping` from
    // idempotent DDL) are the server talking to itself: kept out of the log
    // unless asked for by name (OUTBOX_LOG=info,sqlx::postgres::notice=info).
    let notices_asked = std::env::var("OUTBOX_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .is_ok_and(|v| v.contains("sqlx::postgres::notice"));
    let filter = if notices_asked {
        filter
    } else {
        filter.add_directive(
            "sqlx::postgres::notice=warn"
                .parse()
                .expect("a valid directive"),
        )
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, not in files and collectors.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A token cancelled by the first SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested: finishing in-flight records");
        cancel.cancel();
    });
    token
}
