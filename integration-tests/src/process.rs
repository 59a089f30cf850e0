//! Service processes for tests: started on port 0 with a fresh data directory, ready when the
//! service prints its readiness line, killed when the handle is dropped.
//!
//! Every service binary of the platform prints exactly one line `ready <address>` on standard
//! output once it listens; the address is the one it actually bound (tests pass port 0).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{HarnessError, Result, io_error};

/// The readiness line prefix every service prints.
pub const READY_PREFIX: &str = "ready ";

/// How long a service may take to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A binary of this workspace, built with the same profile as the running executable: next to
/// it for a program (`target/<profile>/NAME`), one level up for a test (`target/<profile>/deps/`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let dir = exe.parent().expect("an executable lives in a directory");
    let beside = dir.join(name);
    if beside.is_file() || dir.file_name().is_none_or(|dir| dir != "deps") {
        return beside;
    }
    dir.parent().expect("deps has a parent").join(name)
}

/// A running service process. Dropping it kills the process.
pub struct ServiceProcess {
    child: Child,
    address: String,
    pid: u32,
}

/// Where service logs go: one directory per test process, kept after the run for diagnosis.
fn log_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir()
        .join("wallet-test-logs")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).map_err(io_error("creating the log directory"))?;
    Ok(dir)
}

static LOG_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl ServiceProcess {
    /// Starts `program` and waits (bounded) for its readiness line. Standard error goes to a
    /// log file (see `log_path`), named in every error about the process.
    pub async fn spawn(program: &Path, args: &[String]) -> Result<ServiceProcess> {
        let name = program
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let number = LOG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_path = log_dir()?.join(format!("{name}-{number}.log"));
        let log = std::fs::File::create(&log_path).map_err(io_error("creating a service log"))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(io_error(format!("starting {}", program.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| HarnessError::Setup("no pid".into()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = async {
            while let Some(line) = lines
                .next_line()
                .await
                .map_err(io_error("reading stdout"))?
            {
                if let Some(address) = line.strip_prefix(READY_PREFIX) {
                    return Ok(address.trim().to_string());
                }
            }
            Err(HarnessError::Setup(format!(
                "{} exited before it was ready (log: {})",
                program.display(),
                log_path.display()
            )))
        };
        let address = tokio::time::timeout(READY_TIMEOUT, ready)
            .await
            .map_err(|_| {
                HarnessError::Setup(format!(
                    "{} was not ready in time (log: {})",
                    program.display(),
                    log_path.display()
                ))
            })??;
        // Keep draining standard output so the service never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ServiceProcess {
            child,
            address,
            pid,
        })
    }

    /// The address the service reported in its readiness line.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `kill -9`: the process gets no chance to clean up.
    pub async fn kill(&mut self) -> Result<()> {
        self.child
            .kill()
            .await
            .map_err(io_error("killing a service"))
    }
}

/// A fresh data directory for one service process, removed when dropped.
pub fn fresh_data_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(io_error("creating a data dir"))
}
