//! `query`: the read side's processes.
//!
//! - `query serve`: projects the storage shards' events into Postgres and answers the account
//!   query and hierarchy services (gRPC, with `/metrics` over HTTP/1.1) from the projections.
//! - `query rebuild`: replays every event (or those after the live database's last snapshot)
//!   into a fresh database, with progress, and exits once it has reached what the shards held
//!   when it started.
//! - `query snapshot`: takes a projection snapshot now (`serve` takes one periodically).
//! - `query connect`: publishes every shard's events to Kafka exactly once, in order.
//!
//! Events come straight from the shards (the embedded default) or, with `--kafka-brokers`,
//! from the `wallet.ledger.events` topic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use proto::query::v1::account_query_server::AccountQueryServer;
use proto::query::v1::hierarchy_server::HierarchyServer;
use query::connector::ShardSource;
use query::metrics::ProjectionMetrics;
use query::projector::Source;

consensus::service_allocator!();

#[derive(Parser)]
#[command(version, about = "The wallet platform's read side")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Project events into Postgres and serve the account query and hierarchy services.
    Serve {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// gRPC and `/metrics` [default: 127.0.0.1:0; the line `ready ADDRESS` says which].
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Take a projection snapshot (for faster rebuilds) this often; 0 never.
        #[arg(long, env = "QUERY_SNAPSHOT_EVERY_SECONDS", default_value_t = 600)]
        snapshot_every_seconds: u64,
    },
    /// Take a projection snapshot now (a rebuild can start from it).
    Snapshot {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Replay every event from the shards into a fresh database, then exit. (To rebuild from
    /// Kafka instead, `serve` a fresh database with a new `--kafka-group`: it reads the topic
    /// from its start.)
    Rebuild {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Start from the latest snapshot in this (live) database instead of from seq 1.
        #[arg(long)]
        from_snapshot: Option<String>,
    },
    /// Publish every storage shard's events and every coordinator shard's transaction events
    /// to Kafka.
    Connect {
        #[command(flatten)]
        source: SourceArgs,
        /// A coordinator shard and its replicas, `ID=ADDRESS,ADDRESS,…` (repeat for each); the
        /// topology's coordinators are added.
        #[arg(long = "coordinator-shard", value_parser = auticuro::client::parse_shard_spec)]
        coordinator_shards: Vec<(u32, Vec<String>)>,
        #[arg(long, default_value = query::MARKER_TOPIC)]
        marker_topic: String,
    },
}

#[derive(Args)]
struct SourceArgs {
    /// A storage shard and its replicas, `ID=ADDRESS,ADDRESS,…` (repeat for each).
    #[arg(long = "shard", value_parser = auticuro::client::parse_shard_spec)]
    shards: Vec<(u32, Vec<String>)>,
    /// Replicas of the topology group, `ADDRESS,ADDRESS,…`, to find the storage shards in.
    #[arg(long, env = "QUERY_TOPOLOGY", value_delimiter = ',')]
    topology: Vec<String>,
    /// Kafka bootstrap servers; without them events are read from the shards directly.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    #[arg(long, default_value = query::LEDGER_TOPIC)]
    kafka_topic: String,
    #[arg(long, default_value = "wallet-query-projector")]
    kafka_group: String,
}

impl SourceArgs {
    async fn shards(&self) -> anyhow::Result<Vec<ShardSource>> {
        let mut shards: BTreeMap<u32, Vec<String>> = self.shards.iter().cloned().collect();
        if !self.topology.is_empty() {
            let topology = marker::topology::TopologyClient::new(self.topology.clone())
                .get()
                .await
                .map_err(|error| anyhow::anyhow!("reading the topology: {error}"))?;
            shards.extend(topology.storage_shards);
        }
        Ok(shards
            .into_iter()
            .map(|(shard_id, replicas)| ShardSource { shard_id, replicas })
            .collect())
    }

    async fn source(&self) -> anyhow::Result<Source> {
        Ok(match &self.kafka_brokers {
            Some(brokers) => Source::Kafka {
                brokers: brokers.clone(),
                topic: self.kafka_topic.clone(),
                group: self.kafka_group.clone(),
            },
            None => {
                let shards = self.shards().await?;
                anyhow::ensure!(
                    !shards.is_empty(),
                    "no storage shard: give --shard, --topology or --kafka-brokers"
                );
                Source::Shards(shards)
            }
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    consensus::init_logging();
    match Cli::parse().command {
        Command::Serve {
            source,
            database_url,
            listen,
            snapshot_every_seconds,
        } => serve(source, &database_url, listen, snapshot_every_seconds).await,
        Command::Snapshot { database_url } => {
            let pool = query::store::connect(&database_url).await?;
            let offsets = query::snapshot::take(&pool).await?;
            println!("snapshot taken at {offsets:?}");
            Ok(())
        }
        Command::Rebuild {
            source,
            database_url,
            from_snapshot,
        } => rebuild(source, &database_url, from_snapshot.as_deref()).await,
        Command::Connect {
            source,
            coordinator_shards,
            marker_topic,
        } => connect(source, coordinator_shards, &marker_topic).await,
    }
}

async fn serve(
    source: SourceArgs,
    database_url: &str,
    listen: SocketAddr,
    snapshot_every_seconds: u64,
) -> anyhow::Result<()> {
    let pool = query::store::connect(database_url)
        .await
        .context("connecting to the projection database")?;
    let shards = source.shards().await?;
    let source = source.source().await?;
    let metrics = ProjectionMetrics::default();
    tokio::spawn(query::projector::run(pool.clone(), source, metrics.clone()));
    // The lag in events, sampled against the shards (when they are known).
    tokio::spawn({
        let (pool, metrics) = (pool.clone(), metrics.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Ok(applied) = query::store::applied_seqs(&pool).await else {
                    continue;
                };
                for shard in &shards {
                    let head = query::connector::head_seq(shard).await;
                    let done = applied.get(&shard.shard_id).copied().unwrap_or(0);
                    metrics.set_lag_events(shard.shard_id, head.saturating_sub(done));
                }
            }
        }
    });
    if snapshot_every_seconds > 0 {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(snapshot_every_seconds));
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(error) = query::snapshot::take(&pool).await {
                    tracing::error!(%error, "projection snapshot");
                }
            }
        });
    }
    let metrics_route = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = metrics.render();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    body,
                )
            }
        }),
    );
    let routes = tonic::service::Routes::from(metrics_route)
        .add_service(AccountQueryServer::new(
            query::service::AccountQueryService::new(pool.clone()),
        ))
        .add_service(HierarchyServer::new(
            query::hierarchy::HierarchyService::new(pool),
        ));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("ready {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(consensus::group::incoming(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn rebuild(
    source: SourceArgs,
    database_url: &str,
    from_snapshot: Option<&str>,
) -> anyhow::Result<()> {
    let pool = query::store::connect(database_url)
        .await
        .context("connecting to the projection database")?;
    // Restoring a snapshot checks that the database is empty in its own transaction.
    let start: BTreeMap<u32, u64> = match from_snapshot {
        Some(live) => {
            let live = query::store::connect(live)
                .await
                .context("connecting to the snapshot's database")?;
            let start = query::snapshot::restore(&live, &pool)
                .await?
                .context("that database has no snapshot")?;
            eprintln!("starting from the snapshot at {start:?}");
            start
        }
        None => {
            query::store::ensure_empty(&mut *pool.acquire().await?).await?;
            BTreeMap::new()
        }
    };
    let shards = source.shards().await?;
    anyhow::ensure!(
        !shards.is_empty(),
        "rebuild reads the shards: give --shard or --topology"
    );
    let mut heads = BTreeMap::new();
    for shard in &shards {
        heads.insert(shard.shard_id, query::connector::head_seq(shard).await);
    }
    let done_at_start: u64 = start.values().sum();
    let total: u64 = heads.values().sum::<u64>().saturating_sub(done_at_start);
    eprintln!("replaying {total} events of {} shards", heads.len());
    let started = Instant::now();
    let source = Source::Shards(shards);
    let metrics = ProjectionMetrics::default();
    let progress = tokio::spawn({
        let (metrics, shard_ids) = (metrics.clone(), heads.keys().copied().collect::<Vec<_>>());
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let applied: u64 = shard_ids
                    .iter()
                    .map(|id| {
                        metrics
                            .applied_seq_of(*id)
                            .max(start.get(id).copied().unwrap_or(0))
                    })
                    .sum();
                query::progress::draw("replaying", applied.saturating_sub(done_at_start), total);
            }
        }
    });
    let replayed = query::projector::project(&pool, &source, &metrics, Some(&heads)).await;
    progress.abort();
    if replayed.is_ok() {
        query::progress::draw("replaying", total, total);
    }
    replayed?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "replayed {total} events in {seconds:.2} s ({:.0} events/s, indexes included)",
        total as f64 / seconds.max(0.001),
    );
    Ok(())
}

async fn connect(
    source: SourceArgs,
    coordinator_shards: Vec<(u32, Vec<String>)>,
    marker_topic: &str,
) -> anyhow::Result<()> {
    use query::connector::{Destination, Log, LogSource};
    let brokers = source
        .kafka_brokers
        .clone()
        .context("connect needs --kafka-brokers")?;
    let mut coordinators: BTreeMap<u32, Vec<String>> = coordinator_shards.into_iter().collect();
    if !source.topology.is_empty() {
        let topology = marker::topology::TopologyClient::new(source.topology.clone())
            .get()
            .await
            .map_err(|error| anyhow::anyhow!("reading the topology: {error}"))?;
        for (id, entry) in topology.coordinators {
            coordinators.insert(id, entry.replicas);
        }
    }
    let mut logs: Vec<(LogSource, &str)> = source
        .shards()
        .await?
        .into_iter()
        .map(|shard| {
            let log = LogSource {
                log: Log::Ledger,
                group_id: shard.shard_id,
                replicas: shard.replicas,
            };
            (log, source.kafka_topic.as_str())
        })
        .collect();
    anyhow::ensure!(
        !logs.is_empty(),
        "no storage shard: give --shard or --topology"
    );
    logs.extend(coordinators.into_iter().map(|(group_id, replicas)| {
        let log = LogSource {
            log: Log::Coordinator,
            group_id,
            replicas,
        };
        (log, marker_topic)
    }));
    // One partition per group of each kind, for topics this creates.
    let storage_count = logs.iter().filter(|(l, _)| l.log == Log::Ledger).count();
    let coordinator_count = logs.len() - storage_count;
    for (topic, groups) in [
        (source.kafka_topic.as_str(), storage_count),
        (marker_topic, coordinator_count),
    ] {
        query::connector::ensure_topic(&brokers, topic, groups.max(1) as i32).await?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (log, topic) in logs {
        // One partition per group where the topic has enough of them.
        let partitions = query::connector::partition_count(&brokers, topic)?;
        let destination = Destination {
            brokers: brokers.clone(),
            topic: topic.to_string(),
            partition: (log.group_id % partitions as u32) as i32,
        };
        tasks.spawn(query::connector::run(log, destination));
    }
    // The readiness line names the brokers: the connector listens on nothing.
    println!("ready {brokers}");
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}
