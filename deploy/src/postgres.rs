//! A private PostgreSQL server from the installed server binaries (`initdb`, `pg_ctl`),
//! listening on 127.0.0.1 only, with trust authentication for the local `postgres` user.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, io_error};

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

/// A shell command line that stops the server at once (for cleanup scripts).
pub fn stop_command_line(pg_data: &Path) -> String {
    let as_server_user = if running_as_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    format!(
        "{as_server_user}{} --pgdata '{}' stop -m immediate",
        server_binary("pg_ctl").display(),
        pg_data.display()
    )
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
    Err(Error::Setup(format!(
        "{description} exited with {}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )))
}

/// A server's directory: `data/` (the cluster), the socket and `postgres.log`.
pub struct ServerDir<'a> {
    pub dir: &'a Path,
}

impl ServerDir<'_> {
    pub fn pg_data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Creates the database cluster unless it exists (the server user owns the directory).
    /// Its collation is `C` whatever the machine's locale: ids and keys compare byte by byte
    /// (for UTF-8 that is code point order), the same on every machine, and indexes on text
    /// are built and searched with `memcmp` rather than the C library's `strcoll`.
    pub fn init(&self) -> Result<()> {
        if self.pg_data().join("PG_VERSION").is_file() {
            return Ok(());
        }
        if !server_binary("initdb").is_file() {
            return Err(Error::Setup(
                "the PostgreSQL server binaries (initdb, pg_ctl) were not found: install the \
                 `postgresql` package, or give an existing database with DATABASE_URL"
                    .into(),
            ));
        }
        std::fs::create_dir_all(self.dir).map_err(io_error("creating the Postgres directory"))?;
        if running_as_root() {
            run(Command::new("chown").arg("postgres:postgres").arg(self.dir))?;
        }
        run(server_command("initdb")
            .arg("--pgdata")
            .arg(self.pg_data())
            .args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]))
    }

    /// Starts the server on `port` and waits until it accepts connections.
    pub fn start(&self, port: u16) -> Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='{}' \
             -c max_connections=400 -c shared_buffers=128MB",
            self.dir.display()
        );
        run(server_command("pg_ctl")
            .arg("--pgdata")
            .arg(self.pg_data())
            .arg("--log")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]))
    }

    /// Stops the server, letting it finish cleanly.
    pub fn stop(&self) -> Result<()> {
        run(server_command("pg_ctl")
            .arg("--pgdata")
            .arg(self.pg_data())
            .args(["-m", "fast", "stop"]))
    }
}

pub fn url(port: u16, database: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{database}")
}
