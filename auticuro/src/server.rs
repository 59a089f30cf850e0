//! Starts one storage replica: the Raft group with the ledger machine, the `Ledger` service and
//! the leader's schedule of idempotency pruning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use consensus::{Group, GroupOptions, Proposer};

use crate::events::LedgerRoutes;
use crate::ledger::{Command, CommandKind, RequestId};
use crate::machine::LedgerMachine;
use crate::resolver::Resolver;
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
    /// Coordinator shards with their replica addresses, for resolving stale holds.
    pub coordinator_shards: std::collections::BTreeMap<u32, Vec<String>>,
    /// A hold older than this makes the shard ask its owner coordinator for the decision.
    pub stale_hold_after: Duration,
    /// Replicas of the topology group, watched to fence removed coordinators (none: no fencing).
    pub topology: Vec<String>,
}

pub async fn start(options: ReplicaOptions) -> anyhow::Result<consensus::Replica> {
    let mut group = Group::<LedgerMachine>::start(&GroupOptions {
        kind: "auticuro",
        group_id: options.shard_id,
        node_id: options.node_id,
        data_dir: options.data_dir.clone(),
        snapshot_after_logs: options.snapshot_after_logs,
        logs_kept_after_snapshot: options.logs_kept_after_snapshot,
    })
    .await?;
    let commands = crate::service::register_metrics(&mut group.registry);
    let (raft, machine, proposer) = (
        group.raft.clone(),
        group.machine.clone(),
        group.proposer.clone(),
    );
    tokio::spawn(prune_dedup_while_leader(
        raft.clone(),
        proposer.clone(),
        options.dedup_retention,
        options.dedup_prune_interval,
    ));
    let resolver = Resolver {
        shard_id: options.shard_id,
        raft: raft.clone(),
        machine: machine.clone(),
        proposer: proposer.clone(),
        coordinators: options.coordinator_shards.clone(),
        stale_after: options.stale_hold_after,
    };
    tokio::spawn(resolver.run());
    if !options.topology.is_empty() {
        let fencing = crate::fencer::fence_removed_coordinators(
            raft.clone(),
            machine.clone(),
            proposer.clone(),
            options.topology.clone(),
        );
        tokio::spawn(fencing);
    }
    let ledger = LedgerService {
        shard_id: options.shard_id,
        raft: raft.clone(),
        machine,
        proposer,
        commands,
    };
    let routes = group.routes().await?.add_service(LedgerRoutes::new(ledger));
    consensus::serve(options.listen, routes, raft).await
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
        let Ok(request_id) = RequestId::parse(&format!("sys:prune-dedup:{now_ms}")) else {
            continue;
        };
        let command = Command {
            request_id,
            kind: CommandKind::PruneDedup {
                older_than_ms: now_ms.saturating_sub(retention_ms),
            },
        };
        if let Err(error) = proposer.propose(command).await {
            tracing::warn!(%error, "pruning idempotency records failed; the next tick retries");
        }
    }
}
