//! A Kafka-compatible broker (Tansu) per test process on a free 127.0.0.1 port, with in-memory
//! storage; topics are created explicitly by the tests that use them.
//!
//! The broker binary is installed by `scripts/install-broker.sh` into the cache directory
//! outside the clone; `TANSU_BIN` overrides where it is looked for.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use crate::{HarnessError, Result, cache_dir, free_port, io_error, reap_after_this_process};

/// How long a starting broker may take to accept connections.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct KafkaBroker {
    bootstrap: String,
}

static BROKER: OnceLock<std::result::Result<KafkaBroker, String>> = OnceLock::new();
static TOPIC_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The broker binary: `TANSU_BIN`, else where the install script puts it.
pub fn broker_binary() -> PathBuf {
    match std::env::var_os("TANSU_BIN") {
        Some(path) => PathBuf::from(path),
        None => cache_dir().join("tansu-0.6.0/bin/tansu"),
    }
}

impl KafkaBroker {
    /// The broker of this test process, started on first use.
    pub fn shared() -> Result<&'static KafkaBroker> {
        BROKER
            .get_or_init(|| KafkaBroker::start().map_err(|error| error.to_string()))
            .as_ref()
            .map_err(|message| HarnessError::Setup(message.clone()))
    }

    /// Starts a new broker; it is killed when this process exits.
    pub fn start() -> Result<KafkaBroker> {
        let binary = broker_binary();
        if !binary.is_file() {
            return Err(HarnessError::Setup(format!(
                "no broker at {}: run scripts/install-broker.sh (or set TANSU_BIN)",
                binary.display()
            )));
        }
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log_dir = tempfile::Builder::new()
            .prefix("wallet-broker-")
            .tempdir()
            .map_err(io_error("creating the broker directory"))?
            .keep();
        let log = std::fs::File::create(log_dir.join("broker.log"))
            .map_err(io_error("creating the broker log"))?;
        let child = Command::new(&binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(io_error("sharing the broker log"))?,
            )
            .stderr(log)
            .spawn()
            .map_err(io_error(format!("starting {}", binary.display())))?;
        reap_after_this_process(&format!(
            "kill -9 {}; rm -rf '{}'",
            child.id(),
            log_dir.display()
        ))?;
        let bootstrap = format!("127.0.0.1:{port}");
        wait_until_accepting(&bootstrap)?;
        Ok(KafkaBroker { bootstrap })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// A client configuration pointing at this broker.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }

    /// Creates a topic whose name no other test in this process uses; returns the name.
    pub async fn fresh_topic(&self, prefix: &str, partitions: i32) -> Result<String> {
        let number = TOPIC_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}.{}.{number}", std::process::id());
        self.create_topic(&name, partitions).await?;
        Ok(name)
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(|error| HarnessError::Setup(format!("admin client: {error}")))?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics([&topic], &AdminOptions::new())
            .await
            .map_err(|error| HarnessError::Setup(format!("creating topic {name}: {error}")))?;
        for result in results {
            result.map_err(|(topic, code)| {
                HarnessError::Setup(format!("creating topic {topic}: {code}"))
            })?;
        }
        Ok(())
    }
}

/// Polls a TCP connect until the broker listens. The broker prints no readiness line, and a
/// connect is the cheapest honest readiness check; each failed attempt backs off briefly.
fn wait_until_accepting(address: &str) -> Result<()> {
    let deadline = Instant::now() + BROKER_START_TIMEOUT;
    let mut backoff = Duration::from_millis(10);
    loop {
        if std::net::TcpStream::connect(address).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Setup(format!(
                "the broker at {address} never listened"
            )));
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}
