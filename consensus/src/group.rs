//! Starting one replica of a group and serving it: what every kind of group does the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use proto::raft::v1::raft_admin_server::RaftAdminServer;
use proto::raft::v1::raft_transport_server::RaftTransportServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::{
    App, MESSAGE_SIZE_MAX, Network, NodeId, Proposer, ProposerLimits, Raft, RaftAdminService,
    RaftMetrics, RaftTransportService, StateMachineStore, open_storage,
};

#[derive(Clone, Debug)]
pub struct GroupOptions {
    /// `storage-shard`, `coordinator-shard`: names the Raft cluster and prefixes metrics.
    pub kind: &'static str,
    pub group_id: u32,
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot for slow followers before they are purged.
    pub logs_kept_after_snapshot: u64,
}

/// A running replica: its Raft handle, state machine, group-commit proposer and metrics.
pub struct Group<A: App> {
    pub group_id: u32,
    pub raft: Raft<A>,
    pub machine: StateMachineStore<A>,
    pub proposer: Proposer<A>,
    pub registry: Registry,
    pub metrics: RaftMetrics,
}

impl<A: App> Group<A> {
    pub async fn start(options: &GroupOptions) -> anyhow::Result<Group<A>> {
        std::fs::create_dir_all(&options.data_dir)?;
        let mut registry = Registry::with_prefix(options.kind.replace('-', "_"));
        let metrics = RaftMetrics::register(&mut registry);
        let (log_store, machine) =
            open_storage::<A>(&options.data_dir.join("rocksdb"), options.node_id, &metrics)?;
        let mut config = crate::raft_config(&format!("{}-{}", options.kind, options.group_id));
        config.snapshot_policy =
            openraft::SnapshotPolicy::LogsSinceLast(options.snapshot_after_logs);
        config.max_in_snapshot_log_to_keep = options.logs_kept_after_snapshot;
        // openraft purges only once this many entries can go; keep it below the snapshot
        // interval, or a small interval would never compact the log.
        config.purge_batch_size = (options.snapshot_after_logs / 2).clamp(1, 1_000);
        let config = Arc::new(config.validate()?);
        let network = Network::new(options.group_id);
        let raft =
            Raft::<A>::new(options.node_id, config, network, log_store, machine.clone()).await?;
        let proposer = Proposer::start(raft.clone(), ProposerLimits::default(), &metrics);
        Ok(Group {
            group_id: options.group_id,
            raft,
            machine,
            proposer,
            registry,
            metrics,
        })
    }

    /// The routes every replica serves: Raft transport and admin, health, reflection and
    /// `/metrics`. Applications add their own services to these.
    pub async fn routes(self) -> anyhow::Result<Routes> {
        let Group {
            group_id,
            raft,
            machine,
            registry,
            metrics,
            ..
        } = self;
        let metrics_route =
            crate::metrics::route(Arc::new(registry), metrics, raft.clone(), machine.clone());
        let (_, health) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        Ok(Routes::from(metrics_route)
            .add_service(health)
            .add_service(reflection)
            .add_service(
                RaftTransportServer::new(RaftTransportService::new(group_id, raft.clone()))
                    .max_decoding_message_size(MESSAGE_SIZE_MAX)
                    .max_encoding_message_size(MESSAGE_SIZE_MAX),
            )
            .add_service(RaftAdminServer::new(RaftAdminService::new(
                group_id, raft, machine,
            ))))
    }
}

/// A started replica: the address it listens on and the future that serves it until Ctrl-C.
pub struct Replica {
    pub address: SocketAddr,
    pub serve: std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>,
}

impl Replica {
    /// Prints the readiness line `ready ADDRESS` that launchers and tests wait for, then serves.
    pub async fn announce_and_serve(self) -> anyhow::Result<()> {
        println!("ready {}", self.address);
        self.serve.await
    }
}

/// Logs to standard error, filtered by `RUST_LOG` (warnings and errors by default).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Connections accepted on `listener`, with Nagle's algorithm off. The server builder's
/// `tcp_nodelay` does not reach a listener of our own, and without it small gRPC responses wait
/// for the peer's delayed ACK (tens of milliseconds per hop).
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Binds `listen` and returns the replica serving `routes` (gRPC, and HTTP/1.1 for `/metrics`)
/// until Ctrl-C, after which Raft shuts down.
pub async fn serve<A: App>(
    listen: SocketAddr,
    routes: Routes,
    raft: Raft<A>,
) -> anyhow::Result<Replica> {
    let listener = TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let router = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(routes);
    let incoming = incoming(listener);
    let serving = async move {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        raft.shutdown()
            .await
            .map_err(|error| anyhow::anyhow!("raft shutdown: {error}"))?;
        Ok(())
    };
    Ok(Replica {
        address,
        serve: Box::pin(serving),
    })
}
