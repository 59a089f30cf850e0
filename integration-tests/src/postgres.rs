//! A private PostgreSQL server per test process, from the installed server binaries (`initdb`,
//! `pg_ctl`), on a free 127.0.0.1 port with a throwaway data directory; a fresh database per test.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
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
        let pg_data = data_dir.join("data");
        hand_over_to_server_user(&data_dir)?;
        run(server_command("initdb")
            .arg("--pgdata")
            .arg(&pg_data)
            .args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]))?;
        let dir = data_dir.display();
        let as_server_user = if running_as_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        reap_after_this_process(&format!(
            "{as_server_user}{} --pgdata '{}' stop -m immediate; rm -rf '{dir}'",
            server_binary("pg_ctl").display(),
            pg_data.display()
        ))?;
        let port = free_port()?;
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='{dir}' \
             -c max_connections=400 -c shared_buffers=128MB"
        );
        // `-w` waits until the server accepts connections.
        run(server_command("pg_ctl")
            .arg("--pgdata")
            .arg(&pg_data)
            .arg("--log")
            .arg(data_dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]))?;
        Ok(PostgresServer { port, data_dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
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

/// The PostgreSQL server binaries: on PATH, else Debian's versioned directory.
pub fn server_binary(name: &str) -> PathBuf {
    if let Some(found) = which(name) {
        return found;
    }
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join(name))
        .filter(|path| path.exists())
        .max();
    debian.unwrap_or_else(|| PathBuf::from(name))
}

/// PostgreSQL refuses to run as root. When this process is root (as on CI machines), the server
/// runs as the `postgres` system user that Debian's server package creates.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|meta| meta.uid() == 0)
        .unwrap_or(false)
}

fn server_command(name: &str) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(server_binary(name));
        return command;
    }
    Command::new(server_binary(name))
}

fn hand_over_to_server_user(dir: &std::path::Path) -> Result<()> {
    if !running_as_root() {
        return Ok(());
    }
    run(Command::new("chown").arg("postgres:postgres").arg(dir))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn run(command: &mut Command) -> Result<()> {
    let description = format!("{command:?}");
    let output = command.output().map_err(io_error(description.clone()))?;
    if output.status.success() {
        return Ok(());
    }
    Err(HarnessError::Setup(format!(
        "{description} exited with {}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )))
}
