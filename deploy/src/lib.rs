//! Running the platform: starting service processes and waiting for their readiness line,
//! a private PostgreSQL server from the installed binaries, Raft groups of replica processes,
//! a complete local cluster (`walletctl up`), and the operator's commands on a running one
//! (`status`, `audit`, `rebuild`).
//! The test harness starts its processes with the same code.

pub mod audit;
pub mod bench;
pub mod cluster;
pub mod demo;
pub mod drain;
pub mod postgres;
pub mod process;
pub mod rebuild;
pub mod replicas;
pub mod status;

/// Errors of launching: a process that would not start, a command that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} failed: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Turns an I/O error into an [`Error`] that says what was being done.
pub fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
