//! The Python checkers in `tests/python/`: clients that are not ours read
//! what the brokers hold.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use super::*;

/// Runs `tests/python/SCRIPT` with `args` under `OUTBOX_TEST_PYTHON` (else
/// `python3`), for at most two minutes; `needs` names what the script
/// imports, for the message when Python cannot be run.
pub async fn run_python_check(script: &str, args: &[&OsStr], needs: &str) -> Output {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let python = std::env::var("OUTBOX_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(&python)
            .arg(&path)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{script} did not finish within 120 s"))
    .unwrap_or_else(|e| panic!("cannot run {python}: {e}; install Python 3 with {needs}"))
}
