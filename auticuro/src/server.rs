//! Starts one storage replica: RocksDB, openraft, and the gRPC services on one listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use consensus::{
    Network, Proposer, ProposerLimits, RaftAdminService, RaftMetrics, RaftTransportService, open_storage,
};
use proto::auticuro::v1::ledger_server::LedgerServer;
use proto::raft::v1::raft_admin_server::RaftAdminServer;
use proto::raft::v1::raft_transport_server::RaftTransportServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::ledger::{Command, CommandKind, RequestId};
use crate::machine::LedgerMachine;
use crate::service::LedgerService;

#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    pub shard_id: u32,
    pub node_id: u64,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot for slow followers before they are purged.
    pub logs_kept_after_snapshot: u64,
    /// How long request ids are remembered for idempotency (leader time).
    pub dedup_retention: Duration,
    /// How often the leader proposes pruning of expired request ids.
    pub dedup_prune_interval: Duration,
}

/// A started replica: the address it listens on, and a future that serves until shutdown.
pub struct Replica {
    pub address: SocketAddr,
    pub serve: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>,
}

pub async fn start(options: ReplicaOptions) -> anyhow::Result<Replica> {
    std::fs::create_dir_all(&options.data_dir)?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("auticuro");
    let raft_metrics = RaftMetrics::register(&mut registry);
    let commands = crate::service::register_metrics(&mut registry);
    let (log_store, machine) = open_storage::<LedgerMachine>(&options.data_dir.join("rocksdb"), &raft_metrics)?;
    let mut config = consensus::raft_config(&format!("storage-shard-{}", options.shard_id));
    config.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(options.snapshot_after_logs);
    config.max_in_snapshot_log_to_keep = options.logs_kept_after_snapshot;
    let config = Arc::new(config.validate()?);
    let raft = consensus::Raft::<LedgerMachine>::new(
        options.node_id,
        config,
        Network::new(options.shard_id),
        log_store,
        machine.clone(),
    )
    .await?;
    let proposer = Proposer::start(raft.clone(), ProposerLimits::default(), &raft_metrics);
    tokio::spawn(prune_dedup_while_leader(raft.clone(), proposer.clone(), options.dedup_retention, options.dedup_prune_interval));

    let listener = TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    let size_max = consensus::MESSAGE_SIZE_MAX;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<LedgerServer<LedgerService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let ledger =
        LedgerService { shard_id: options.shard_id, raft: raft.clone(), machine: machine.clone(), proposer, commands };
    let metrics_route =
        consensus::metrics::route(Arc::new(registry), raft_metrics, raft.clone(), machine.clone());
    let mut routes = tonic::service::Routes::from(metrics_route);
    routes = routes
        .add_service(health)
        .add_service(reflection)
        .add_service(LedgerServer::new(ledger))
        .add_service(
            RaftTransportServer::new(RaftTransportService::new(options.shard_id, raft.clone()))
                .max_decoding_message_size(size_max)
                .max_encoding_message_size(size_max),
        )
        .add_service(RaftAdminServer::new(RaftAdminService::new(options.shard_id, raft.clone(), machine)));
    // HTTP/1.1 as well, so Prometheus can scrape `/metrics` on the gRPC port.
    let router = tonic::transport::Server::builder().tcp_nodelay(true).accept_http1(true).add_routes(routes);
    let serve = async move {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown).await?;
        raft.shutdown().await.map_err(|error| anyhow::anyhow!("raft shutdown: {error}"))?;
        Ok(())
    };
    Ok(Replica { address, serve: Box::pin(serve) })
}

/// Idempotency records expire by a replicated command, never by a local timer on each replica:
/// the leader proposes `PruneDedup` with a cutoff from its own clock, and every replica applies
/// the same cutoff.
async fn prune_dedup_while_leader(
    raft: consensus::Raft<LedgerMachine>,
    proposer: Proposer<LedgerMachine>,
    retention: Duration,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.current_leader != Some(metrics.id) {
            continue;
        }
        let now_ms = consensus::now_ms();
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let Ok(request_id) = RequestId::parse(&format!("sys:prune-dedup:{now_ms}")) else { continue };
        let command = Command { request_id, kind: CommandKind::PruneDedup { older_than_ms: now_ms.saturating_sub(retention_ms) } };
        if let Err(error) = proposer.propose(command).await {
            tracing::warn!(%error, "pruning idempotency records failed; the next tick retries");
        }
    }
}
