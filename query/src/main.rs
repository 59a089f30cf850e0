//! `query`: the read side's processes.
//!
//! - `query serve`: projects the storage shards' events into Postgres and answers the account
//!   query and hierarchy services (gRPC, with `/metrics` over HTTP/1.1) from the projections.
//! - `query rebuild`: replays every event into a fresh database, with progress, and exits once
//!   it has reached what the shards (or the topic) held when it started.
//! - `query connect`: publishes every shard's events to Kafka exactly once, in order.
//!
//! Events come straight from the shards (the embedded default) or, with `--kafka-brokers`,
//! from the `wallet.ledger.events` topic.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use proto::query::v1::account_query_server::AccountQueryServer;
use proto::query::v1::hierarchy_server::HierarchyServer;
use query::connector::ShardSource;
use query::metrics::ProjectionMetrics;
use query::projector::Source;

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
    },
    /// Replay every event from the shards into a fresh database, then exit. (To rebuild from
    /// Kafka instead, `serve` a fresh database with a new `--kafka-group`: it reads the topic
    /// from its start.)
    Rebuild {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Publish every shard's events to Kafka.
    Connect {
        #[command(flatten)]
        source: SourceArgs,
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
        } => serve(source, &database_url, listen).await,
        Command::Rebuild {
            source,
            database_url,
        } => rebuild(source, &database_url).await,
        Command::Connect { source } => connect(source).await,
    }
}

async fn serve(source: SourceArgs, database_url: &str, listen: SocketAddr) -> anyhow::Result<()> {
    let pool = query::store::connect(database_url)
        .await
        .context("connecting to the projection database")?;
    let source = source.source().await?;
    let metrics = ProjectionMetrics::default();
    tokio::spawn(query::projector::run(pool.clone(), source, metrics.clone()));
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
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}

async fn rebuild(source: SourceArgs, database_url: &str) -> anyhow::Result<()> {
    let pool = query::store::connect(database_url)
        .await
        .context("connecting to the projection database")?;
    let shards = source.shards().await?;
    anyhow::ensure!(
        !shards.is_empty(),
        "rebuild reads the shards: give --shard or --topology"
    );
    let mut heads = BTreeMap::new();
    for shard in &shards {
        heads.insert(shard.shard_id, query::connector::head_seq(shard).await);
    }
    let total: u64 = heads.values().sum();
    eprintln!("rebuilding {total} events of {} shards", heads.len());
    let started = Instant::now();
    let source = Source::Shards(shards);
    let metrics = ProjectionMetrics::default();
    let progress = tokio::spawn({
        let pool = pool.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let applied: u64 = query::store::applied_seqs(&pool)
                    .await
                    .map(|seqs| seqs.values().sum())
                    .unwrap_or(0);
                let width = 40;
                let filled = (applied * width)
                    .checked_div(total)
                    .unwrap_or(width)
                    .min(width);
                eprint!(
                    "\r[{}{}] {applied}/{total}",
                    "#".repeat(filled as usize),
                    " ".repeat((width - filled) as usize)
                );
                let _ = std::io::stderr().flush();
            }
        }
    });
    query::projector::project(&pool, &source, &metrics, Some(&heads)).await?;
    progress.abort();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "\rrebuilt {total} events in {seconds:.1} s ({:.0} events/s)",
        total as f64 / seconds.max(0.001)
    );
    Ok(())
}

async fn connect(source: SourceArgs) -> anyhow::Result<()> {
    let brokers = source
        .kafka_brokers
        .clone()
        .context("connect needs --kafka-brokers")?;
    let shards = source.shards().await?;
    anyhow::ensure!(
        !shards.is_empty(),
        "no storage shard: give --shard or --topology"
    );
    let partitions = query::connector::partition_count(&brokers, &source.kafka_topic)?;
    let mut tasks = tokio::task::JoinSet::new();
    for shard in shards {
        let destination = query::connector::Destination {
            brokers: brokers.clone(),
            topic: source.kafka_topic.clone(),
            partition: (shard.shard_id % partitions as u32) as i32,
        };
        tasks.spawn(query::connector::run(shard, destination));
    }
    println!("ready");
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}
