//! `marker-topology`: one replica of the topology group, the versioned register of storage
//! shards and coordinator shards (with their state and epoch) that every service watches.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use consensus::{Group, GroupOptions};
use marker::topology::{TopologyMachine, TopologyServer};
use proto::marker::v1::topology_service_server::TopologyServiceServer;

#[derive(Parser, Debug)]
#[command(version, about = "One replica of the wallet platform's topology group")]
struct Args {
    /// This replica's node id; never reuse one for a different replica.
    #[arg(long, env = "TOPOLOGY_NODE_ID")]
    node_id: u64,
    #[arg(long, env = "TOPOLOGY_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, env = "TOPOLOGY_DATA_DIR")]
    data_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    consensus::init_logging();
    let args = Args::parse();
    let group = Group::<TopologyMachine>::start(&GroupOptions {
        kind: "topology",
        group_id: 0,
        node_id: args.node_id,
        data_dir: args.data_dir,
        snapshot_after_logs: 1_000,
        logs_kept_after_snapshot: 100,
    })
    .await?;
    let server = TopologyServer {
        group_id: 0,
        machine: group.machine.clone(),
        proposer: group.proposer.clone(),
    };
    let raft = group.raft.clone();
    let routes = group
        .routes()
        .await?
        .add_service(TopologyServiceServer::new(server));
    consensus::serve(args.listen, routes, raft)
        .await?
        .announce_and_serve()
        .await
}
