//! Service processes for tests (see `deploy::process`): started on port 0 with a fresh data
//! directory and a log file per process, kept after the run for diagnosis.

use std::path::{Path, PathBuf};

pub use deploy::process::workspace_binary;

use crate::{Result, io_error};

/// A running service process. Dropping it kills the process.
pub type ServiceProcess = deploy::process::ServiceProcess;

/// Where service logs go: one directory per test process, kept after the run for diagnosis.
fn log_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir()
        .join("wallet-test-logs")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).map_err(io_error("creating the log directory"))?;
    Ok(dir)
}

static LOG_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Starts `program` and waits (bounded) for its readiness line; standard error goes to a log
/// file in this test process's log directory, named in every error about the process.
pub async fn spawn(program: &Path, args: &[String]) -> Result<ServiceProcess> {
    let name = program
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let number = LOG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log_path = log_dir()?.join(format!("{name}-{number}.log"));
    ServiceProcess::spawn(program, args, &log_path).await
}

/// A fresh data directory for one service process, removed when dropped.
pub fn fresh_data_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(io_error("creating a data dir"))
}
