//! Test harness shared by the platform's integration tests: a private PostgreSQL server, a
//! Kafka-compatible broker, and service processes started on port 0 with fresh data directories.
//!
//! Servers are started once per test process and stopped by a reaper process when the test
//! process exits, however it exits; each test then takes what it needs fresh from them (a new
//! database, new topics).

pub mod bench;
pub mod commands;
pub mod gateway;
pub mod group;
pub mod kafka;
pub mod platform;
pub mod postgres;
pub mod process;
pub mod proxy;

use std::net::TcpListener;
use std::path::PathBuf;

pub(crate) use deploy::io_error;
/// Errors of the harness: those of launching (a server that would not start, a missing binary).
pub use deploy::{Error as HarnessError, Result};

/// A port on 127.0.0.1 that was free a moment ago. For servers that cannot bind port 0 and
/// report the port they got (PostgreSQL, the broker); a lost race shows as a start failure.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_error("binding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_error("reading a bound port"))?
        .port();
    Ok(port)
}

/// The directory for the cached tools of this project (the broker), outside any clone.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WALLET_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/wallet-platform")
}

/// Starts a detached reaper that waits for this test process to exit, however it exits, and then
/// runs `cleanup` (a shell script). This is how servers shared by a whole test process are torn
/// down: statics are never dropped, and a crashing test must not leave servers behind.
pub(crate) fn reap_after_this_process(cleanup: &str) -> Result<()> {
    let pid = std::process::id();
    let script = format!("tail --pid={pid} -f /dev/null; {cleanup}");
    let mut command = std::process::Command::new("setsid");
    command
        .arg("sh")
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    command.spawn().map_err(io_error("starting the reaper"))?;
    Ok(())
}

pub use deploy::process::http_get;
