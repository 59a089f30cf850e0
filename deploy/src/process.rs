//! Service processes: started with their arguments, ready when they print their readiness line,
//! standard error into a log file, killed when the handle is dropped.
//!
//! Every service binary of the platform prints exactly one line `ready <address>` on standard
//! output once it listens; the address is the one it actually bound (callers may pass port 0).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{Error, Result, io_error};

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

impl ServiceProcess {
    /// Starts `program` with standard error appended to `log_path` and waits (bounded) for its
    /// readiness line.
    pub async fn spawn(program: &Path, args: &[String], log_path: &Path) -> Result<ServiceProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io_error("opening a service log"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        // A launcher that dies without cleaning up (kill -9, a panicking test) must not leave
        // its services running: the kernel kills them when their parent dies.
        // SAFETY: the closure only makes one async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(io_error(format!("starting {}", program.display())))?;
        let pid = child.id().ok_or_else(|| Error::Setup("no pid".into()))?;
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
            Err(Error::Setup(format!(
                "{} exited before it was ready (log: {})",
                program.display(),
                log_path.display()
            )))
        };
        let address = tokio::time::timeout(READY_TIMEOUT, ready)
            .await
            .map_err(|_| {
                Error::Setup(format!(
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

    /// The exit status when the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.child
            .try_wait()
            .map_err(io_error("checking on a service"))
    }

    /// Waits until the process exits by itself.
    pub async fn wait(&mut self) -> Result<std::process::ExitStatus> {
        self.child
            .wait()
            .await
            .map_err(io_error("waiting for a service"))
    }

    /// `kill -9`: the process gets no chance to clean up.
    pub async fn kill(&mut self) -> Result<()> {
        self.child
            .kill()
            .await
            .map_err(io_error("killing a service"))
    }
}

/// A plain HTTP/1.1 GET on loopback (for `/metrics` and health pages); returns status and body.
pub async fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(io_error("connecting"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(io_error("sending a request"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(io_error("reading a response"))?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| Error::Setup(format!("not an HTTP response: {text:.200}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
