//! `auticuro`: one replica of one storage shard.
//!
//! Settings come from flags, then environment variables, then an optional TOML config file
//! (`--config`, keys named like the flags with underscores), then defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

consensus::service_allocator!();

#[derive(Parser, Debug, Default, Deserialize)]
#[command(version, about = "One replica of a wallet storage shard")]
#[serde(deny_unknown_fields)]
struct Settings {
    /// A TOML file with any of the settings below.
    #[arg(long, env = "AUTICURO_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// The storage shard (Raft group) this replica belongs to.
    #[arg(long, env = "AUTICURO_SHARD_ID")]
    shard_id: Option<u32>,
    /// This replica's node id; never reuse one for a different replica.
    #[arg(long, env = "AUTICURO_NODE_ID")]
    node_id: Option<u64>,
    /// Address to listen on for gRPC and `/metrics` [default: 127.0.0.1:0, a free port; the
    /// readiness line `ready ADDRESS` says which].
    #[arg(long, env = "AUTICURO_LISTEN")]
    listen: Option<SocketAddr>,
    /// Where the replica keeps its RocksDB.
    #[arg(long, env = "AUTICURO_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Build a snapshot after this many log entries since the last one [default: 20000].
    #[arg(long, env = "AUTICURO_SNAPSHOT_AFTER_LOGS")]
    snapshot_after_logs: Option<u64>,
    /// Log entries kept behind a snapshot for slow followers [default: 1000].
    #[arg(long, env = "AUTICURO_LOGS_KEPT_AFTER_SNAPSHOT")]
    logs_kept_after_snapshot: Option<u64>,
    /// How long request ids and settled two-phase legs are remembered, in hours [default: 168].
    #[arg(long, env = "AUTICURO_DEDUP_RETENTION_HOURS")]
    dedup_retention_hours: Option<u64>,
    /// How often the leader proposes pruning of what has expired, in seconds: each prune takes
    /// what expired since the last one, so apply pauses for it in proportion [default: 60].
    #[arg(long, env = "AUTICURO_DEDUP_PRUNE_INTERVAL_SECONDS")]
    dedup_prune_interval_seconds: Option<u64>,
    /// A coordinator shard and its replicas, `ID=ADDRESS,ADDRESS,…` (repeat for each), asked
    /// about stale holds.
    #[arg(long = "coordinator-shard", value_parser = auticuro::client::parse_shard_spec)]
    #[serde(default, deserialize_with = "shard_specs")]
    coordinator_shards: Vec<(u32, Vec<String>)>,
    /// A hold older than this many seconds makes the shard ask its owner [default: 60].
    #[arg(long, env = "AUTICURO_STALE_HOLD_AFTER_SECONDS")]
    stale_hold_after_seconds: Option<u64>,
    /// Replicas of the topology group, `ADDRESS,ADDRESS,…`, watched to fence removed
    /// coordinators.
    #[arg(long, env = "AUTICURO_TOPOLOGY", value_delimiter = ',')]
    #[serde(default)]
    topology: Vec<String>,
}

/// Config files list coordinator shards as strings in the flag's `ID=ADDRESS,…` form.
fn shard_specs<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(u32, Vec<String>)>, D::Error> {
    let specs: Vec<String> = Vec::deserialize(deserializer)?;
    specs
        .iter()
        .map(|spec| auticuro::client::parse_shard_spec(spec).map_err(serde::de::Error::custom))
        .collect()
}

impl Settings {
    /// Flags and environment first, then the config file.
    fn merge(self, file: Settings) -> Settings {
        Settings {
            config: self.config,
            shard_id: self.shard_id.or(file.shard_id),
            node_id: self.node_id.or(file.node_id),
            listen: self.listen.or(file.listen),
            data_dir: self.data_dir.or(file.data_dir),
            snapshot_after_logs: self.snapshot_after_logs.or(file.snapshot_after_logs),
            logs_kept_after_snapshot: self
                .logs_kept_after_snapshot
                .or(file.logs_kept_after_snapshot),
            dedup_retention_hours: self.dedup_retention_hours.or(file.dedup_retention_hours),
            dedup_prune_interval_seconds: self
                .dedup_prune_interval_seconds
                .or(file.dedup_prune_interval_seconds),
            coordinator_shards: if self.coordinator_shards.is_empty() {
                file.coordinator_shards
            } else {
                self.coordinator_shards
            },
            stale_hold_after_seconds: self
                .stale_hold_after_seconds
                .or(file.stale_hold_after_seconds),
            topology: if self.topology.is_empty() {
                file.topology
            } else {
                self.topology
            },
        }
    }
}

fn load_settings() -> anyhow::Result<auticuro::server::ReplicaOptions> {
    let flags = Settings::parse();
    let file = match &flags.config {
        Some(path) => toml::from_str(&std::fs::read_to_string(path)?)
            .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?,
        None => Settings::default(),
    };
    let settings = flags.merge(file);
    let required =
        |name: &str| anyhow::anyhow!("{name} is required (flag, environment or config file)");
    Ok(auticuro::server::ReplicaOptions {
        shard_id: settings.shard_id.ok_or_else(|| required("shard_id"))?,
        node_id: settings.node_id.ok_or_else(|| required("node_id"))?,
        listen: settings
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        data_dir: settings.data_dir.ok_or_else(|| required("data_dir"))?,
        snapshot_after_logs: settings.snapshot_after_logs.unwrap_or(20_000),
        logs_kept_after_snapshot: settings.logs_kept_after_snapshot.unwrap_or(1_000),
        dedup_retention: Duration::from_secs(
            3_600 * settings.dedup_retention_hours.unwrap_or(7 * 24),
        ),
        dedup_prune_interval: Duration::from_secs(
            settings.dedup_prune_interval_seconds.unwrap_or(60).max(1),
        ),
        coordinator_shards: settings.coordinator_shards.into_iter().collect(),
        stale_hold_after: Duration::from_secs(
            settings.stale_hold_after_seconds.unwrap_or(60).max(1),
        ),
        topology: settings.topology,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    consensus::init_logging();
    let replica = auticuro::server::start(load_settings()?).await?;
    replica.announce_and_serve().await
}
