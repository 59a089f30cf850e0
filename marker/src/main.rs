//! `marker`: one replica of one coordinator shard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

consensus::service_allocator!();

#[derive(Parser, Debug)]
#[command(version, about = "One replica of a wallet coordinator shard")]
struct Args {
    /// The coordinator shard (Raft group) this replica belongs to.
    #[arg(long, env = "MARKER_COORDINATOR_SHARD_ID")]
    coordinator_shard_id: u32,
    /// This replica's node id; never reuse one for a different replica.
    #[arg(long, env = "MARKER_NODE_ID")]
    node_id: u64,
    /// Address for gRPC and `/metrics` (port 0 picks a free port; the ready line says which).
    #[arg(long, env = "MARKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, env = "MARKER_DATA_DIR")]
    data_dir: PathBuf,
    /// A storage shard and its replicas, `ID=ADDRESS,ADDRESS,…`; once per shard. Without
    /// any, the storage shards come from the topology.
    #[arg(long = "storage-shard", required_unless_present = "topology", value_parser = auticuro::client::parse_shard_spec)]
    storage_shards: Vec<(u32, Vec<String>)>,
    /// How long reservations may take before a transaction is aborted, in milliseconds.
    #[arg(long, env = "MARKER_RESERVE_TIMEOUT_MS", default_value_t = 10_000)]
    reserve_timeout_ms: u64,
    /// Replicas of the topology group, `ADDRESS,ADDRESS,…`: gives this shard its state
    /// (active, draining, removed) and epoch, and enables draining.
    #[arg(long, env = "MARKER_TOPOLOGY", value_delimiter = ',')]
    topology: Vec<String>,
    /// Failure tests only: abort at this protocol step (see `marker::crash`).
    #[arg(long, hide = true, requires = "crash_once_file")]
    crash_at: Option<String>,
    /// Failure tests only: the file that makes a crash point fire once per group.
    #[arg(long, hide = true)]
    crash_once_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    consensus::init_logging();
    let args = Args::parse();
    if let (Some(step), Some(file)) = (args.crash_at.clone(), args.crash_once_file.clone()) {
        marker::crash::arm(step, file);
    }
    let replica = marker::server::start(marker::server::CoordinatorOptions {
        coordinator_shard_id: args.coordinator_shard_id,
        node_id: args.node_id,
        listen: args.listen,
        data_dir: args.data_dir,
        storage_shards: args.storage_shards.into_iter().collect(),
        reserve_timeout: Duration::from_millis(args.reserve_timeout_ms),
        topology: args.topology,
    })
    .await?;
    replica.announce_and_serve().await
}
