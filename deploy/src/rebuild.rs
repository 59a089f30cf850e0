//! `walletctl rebuild`: rebuilds a running local cluster's projections in place. The projected
//! tables are emptied (the hierarchy stays) and the query process is killed; `walletctl up`'s
//! supervisor restarts it, and it replays every shard's events from seq 1. Returns once the
//! projection has reached the shards' heads as they were when the rebuild began.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The longest a rebuild may take before the command gives up waiting (the replay goes on).
const REBUILD_WAIT: Duration = Duration::from_secs(600);

pub async fn in_place(data_dir: &Path) -> Result<()> {
    let cluster = crate::cluster::running(data_dir)?;
    if cluster.processes.iter().any(|p| p.role == "connector") {
        return Err(Error::Setup(
            "this cluster projects from Kafka: rebuild into a fresh database with `query rebuild` \
             and point the query service at it"
                .into(),
        ));
    }
    let query_process = cluster
        .processes
        .iter()
        .find(|p| p.role == "query")
        .ok_or_else(|| Error::Setup("cluster.json lists no query process".into()))?;
    let sql =
        |error: query::store::StoreError| Error::Setup(format!("the query database: {error}"));
    let pool = query::store::connect(&cluster.database_url)
        .await
        .map_err(sql)?;
    let topology = ::marker::topology::TopologyClient::new(cluster.topology.clone())
        .get()
        .await
        .map_err(|error| Error::Setup(format!("reading the topology: {error}")))?;
    let mut heads = BTreeMap::new();
    for (shard_id, replicas) in topology.storage_shards {
        let source = query::connector::ShardSource { shard_id, replicas };
        heads.insert(shard_id, query::connector::head_seq(&source).await);
    }
    let total: u64 = heads.values().sum();
    query::snapshot::reset(&pool).await.map_err(sql)?;
    // SAFETY: kill(2) with a pid from cluster.json; the worst case is signalling nothing.
    if unsafe { libc::kill(query_process.pid as libc::pid_t, libc::SIGKILL) } != 0 {
        return Err(Error::Setup(format!(
            "stopping the query process {}: {}",
            query_process.pid,
            std::io::Error::last_os_error()
        )));
    }
    eprintln!("replaying {total} events of {} shards", heads.len());
    let started = Instant::now();
    loop {
        let applied = query::store::applied_seqs(&pool).await.unwrap_or_default();
        let done: u64 = heads
            .keys()
            .map(|shard| applied.get(shard).copied().unwrap_or(0))
            .sum();
        query::progress::draw("replaying", done, total);
        let caught_up = heads
            .iter()
            .all(|(shard, head)| applied.get(shard).copied().unwrap_or(0) >= *head);
        if caught_up {
            eprintln!(
                "\rrebuilt {total} events in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > REBUILD_WAIT {
            return Err(Error::Setup(
                "the projection did not catch up in time (is `walletctl up` running?)".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
