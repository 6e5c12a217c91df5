//! `outbox-relay replay`: counts the retained rows of a window, then
//! republishes them through the relay loop, with progress on a terminal and
//! in the log.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cmd::cli::ReplayArgs;
use outbox_relay::error::Error;
use outbox_relay::relay;
use outbox_relay::source::ReplaySource;

/// How often progress is logged (a terminal sees it every second).
const LOG_EVERY: Duration = Duration::from_secs(10);

pub async fn run(args: &ReplayArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, filter) = args.to_config(chrono::Utc::now())?;
    let stop = shutdown.child_token();
    let mut source = ReplaySource::new(config.database.clone(), filter.clone(), stop.clone());
    let count = source.count().await?;
    let mut window = format!("created from {} to {}", filter.since, filter.until);
    if let Some(t) = &filter.aggregate_type {
        window += &format!(", aggregate type {t:?}");
    }
    if let Some(id) = &filter.aggregate_id {
        window += &format!(", aggregate id {id:?}");
    }
    let unpublished = match count.unpublished {
        0 => String::new(),
        n => format!(
            "; {n} rows of that window are not published yet and are left to the live relay"
        ),
    };
    if args.dry_run {
        println!(
            "would replay {} rows ({window}){unpublished}",
            count.published
        );
        return Ok(());
    }
    info!(
        rows = count.published,
        "replaying rows {window}{unpublished}"
    );
    let progress = source.progress();
    let total = count.published;
    let reporter = tokio::spawn({
        let stop = stop.clone();
        async move {
            let tty = std::io::stderr().is_terminal();
            let mut logged = Instant::now();
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let done = progress.load(Ordering::Relaxed);
                if tty {
                    eprint!("\rreplayed {done} of {total} rows");
                    let _ = std::io::stderr().flush();
                }
                if logged.elapsed() >= LOG_EVERY {
                    info!(replayed = done, of = total, "replaying");
                    logged = Instant::now();
                }
            }
            if tty {
                eprintln!();
            }
        }
    });
    let result = relay::replay(config, source, stop.clone()).await;
    stop.cancel();
    let _ = reporter.await;
    let stats = result?;
    if shutdown.is_cancelled() {
        return Err(Error::Setup(format!(
            "replay stopped by a signal after {} of {total} rows; run it again to replay the window (rows already replayed go again)",
            stats.published
        ))
        .into());
    }
    println!("replayed {} rows ({window})", stats.published);
    Ok(())
}
