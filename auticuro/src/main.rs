//! `auticuro`: one replica of one storage shard.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "One replica of a wallet storage shard")]
struct Args {
    /// The storage shard (Raft group) this replica belongs to.
    #[arg(long, env = "AUTICURO_SHARD_ID")]
    shard_id: u32,
    /// This replica's node id; never reuse one for a different replica.
    #[arg(long, env = "AUTICURO_NODE_ID")]
    node_id: u64,
    /// Address to listen on for gRPC (port 0 picks a free port; the ready line says which).
    #[arg(long, env = "AUTICURO_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where the replica keeps its RocksDB.
    #[arg(long, env = "AUTICURO_DATA_DIR")]
    data_dir: PathBuf,
    /// Build a snapshot after this many log entries since the last one.
    #[arg(long, env = "AUTICURO_SNAPSHOT_AFTER_LOGS", default_value_t = 20_000)]
    snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot for slow followers.
    #[arg(long, env = "AUTICURO_LOGS_KEPT_AFTER_SNAPSHOT", default_value_t = 1_000)]
    logs_kept_after_snapshot: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let replica = auticuro::server::start(auticuro::server::ReplicaOptions {
        shard_id: args.shard_id,
        node_id: args.node_id,
        listen: args.listen,
        data_dir: args.data_dir,
        snapshot_after_logs: args.snapshot_after_logs,
        logs_kept_after_snapshot: args.logs_kept_after_snapshot,
    })
    .await?;
    // The readiness line the launcher and the test harness wait for.
    println!("ready {}", replica.address);
    replica.serve.await
}
