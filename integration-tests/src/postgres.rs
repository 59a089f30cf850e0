//! A private PostgreSQL server per test process, from the installed server binaries (`initdb`,
//! `pg_ctl`), on a free 127.0.0.1 port with a throwaway data directory; a fresh database per test.

use std::path::PathBuf;
use std::sync::OnceLock;

use deploy::postgres::{self, ServerDir};
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

use crate::{HarnessError, Result, free_port, io_error, reap_after_this_process};

/// A running PostgreSQL server owned by this test process.
pub struct PostgresServer {
    port: u16,
    data_dir: PathBuf,
}

static SERVER: OnceLock<std::result::Result<PostgresServer, String>> = OnceLock::new();
static DATABASE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A database created for one test; dropped with the server at the end of the test process.
pub struct TestDatabase {
    pub url: String,
    pub name: String,
}

impl TestDatabase {
    pub async fn pool(&self) -> Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(8)
            .connect(&self.url)
            .await
            .map_err(|error| HarnessError::Setup(format!("connecting to {}: {error}", self.name)))
    }
}

impl PostgresServer {
    /// The server of this test process, started on first use.
    pub fn shared() -> Result<&'static PostgresServer> {
        SERVER
            .get_or_init(|| PostgresServer::start().map_err(|error| error.to_string()))
            .as_ref()
            .map_err(|message| HarnessError::Setup(message.clone()))
    }

    /// Starts a new server. It stops, and its directory is removed, when this process exits.
    pub fn start() -> Result<PostgresServer> {
        let data_dir = tempfile::Builder::new()
            .prefix("wallet-pg-")
            .tempdir()
            .map_err(io_error("creating the Postgres directory"))?
            .keep();
        let server = ServerDir { dir: &data_dir };
        server.init()?;
        reap_after_this_process(&format!(
            "{}; rm -rf '{}'",
            postgres::stop_command_line(&server.pg_data()),
            data_dir.display()
        ))?;
        let port = free_port()?;
        server.start(port)?;
        Ok(PostgresServer { port, data_dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn url(&self, database: &str) -> String {
        postgres::url(self.port, database)
    }

    /// Creates an empty database with a name no other test in this process uses.
    pub async fn fresh_database(&self) -> Result<TestDatabase> {
        let number = DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{number}");
        let setup = |error: sqlx::Error| HarnessError::Setup(format!("creating {name}: {error}"));
        let mut admin = PgConnection::connect(&self.url("postgres"))
            .await
            .map_err(setup)?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .map_err(|error| HarnessError::Setup(format!("creating {name}: {error}")))?;
        Ok(TestDatabase {
            url: self.url(&name),
            name,
        })
    }
}

/// A fresh database on the shared server of this test process.
pub async fn fresh_database() -> Result<TestDatabase> {
    PostgresServer::shared()?.fresh_database().await
}
