//! `walletctl`: the operator's tool. `walletctl up` runs a complete local cluster;
//! `walletctl status` shows a running one and `walletctl audit` checks it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "Runs, inspects and scales the wallet platform")]
struct Args {
    /// The cluster's directory: everything `up` keeps (replica data, Postgres, logs, the demo
    /// API key) and its `cluster.json`, which the other commands read.
    #[arg(long, global = true, default_value = ".wallet")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a complete local cluster until interrupted, restarting any process that dies
    /// (Ctrl-C stops every process).
    Up {
        #[arg(long, default_value_t = 2)]
        storage_shards: u32,
        #[arg(long, default_value_t = 2)]
        coordinator_shards: u32,
        /// Replicas per Raft group.
        #[arg(long, default_value_t = 3)]
        replicas: u64,
        /// Services listen on fixed ports from here, so a restart finds its peers again;
        /// 0 picks free ports (one run only).
        #[arg(long, default_value_t = 17100)]
        base_port: u16,
        /// Where the REST gateway listens.
        #[arg(long = "gateway-addr", default_value = "127.0.0.1:8080")]
        gateway_listen: SocketAddr,
        /// Use this database instead of a private Postgres server under the data directory.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// Kafka bootstrap servers: shard events go through Kafka to the projector (a
        /// connector process publishes them); without them the projector reads the shards.
        #[arg(long, env = "KAFKA_BROKERS")]
        kafka_brokers: Option<String>,
    },
    /// Every Raft group with its leader, replicas and applied seq, the coordinators' in-flight
    /// transactions and the projection of each storage shard.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Initialize the Raft groups of a platform started by something else than `up`
    /// (Kubernetes) and record its shards in the topology. Safe to run again.
    Bootstrap {
        /// Replicas of the topology group, `ADDRESS,ADDRESS,…` (node ids 1, 2, … in order).
        #[arg(long, value_delimiter = ',', required = true)]
        topology: Vec<String>,
        /// A storage shard and its replicas, `ID=ADDRESS,ADDRESS,…` (repeat for each).
        #[arg(long = "storage-shard", value_parser = auticuro::client::parse_shard_spec, required = true)]
        storage_shards: Vec<(u32, Vec<String>)>,
        /// A coordinator shard and its replicas, `ID=ADDRESS,ADDRESS,…` (repeat for each).
        #[arg(long = "coordinator-shard", value_parser = auticuro::client::parse_shard_spec, required = true)]
        coordinator_shards: Vec<(u32, Vec<String>)>,
    },
    /// Run benchmark programs (storage, coordinator, gateway, query; default all) and print
    /// one table of every phase and one JSON document. Build in release mode for real numbers.
    Bench {
        /// Workloads to run, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "storage,coordinator,gateway,query"
        )]
        workloads: Vec<String>,
        /// Arguments passed to every benchmark program (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A scenario against the running cluster: wallets in two currencies, deposits, payments
    /// across shards with fees, a refused overdraft, a hierarchy; then balances, roll-ups and a
    /// conservation check.
    Demo,
    /// Coordinator shards of the running cluster.
    Coordinator {
        #[command(subcommand)]
        command: CoordinatorCommand,
    },
    /// Storage shard membership: add a running replica, or remove one.
    Shard {
        #[command(subcommand)]
        command: ShardCommand,
    },
    /// API keys of the running cluster's gateway.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Rebuild the running cluster's projections from the shards' event logs, in place (the
    /// hierarchy stays); returns once they have caught up.
    Rebuild,
    /// Check a running cluster: conservation per currency on every shard and overall,
    /// balances versus deposits minus withdrawals, holds and reservations versus in-flight
    /// transactions, one outcome per transaction, replica digests, projections versus shard
    /// state. Exits 1 on any mismatch.
    Audit {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CoordinatorCommand {
    /// Start a new coordinator shard in the running `walletctl up` (supervised like the rest)
    /// and make it active: gateways start sending it new transactions.
    Add,
    /// Stop a drained coordinator shard's replicas in the running `walletctl up`.
    Remove {
        /// The coordinator shard id.
        #[arg(long)]
        id: u32,
    },
    /// Take a coordinator shard out of service: no new transactions, the ones it has finish,
    /// then it is removed from the topology. Returns once it is removed.
    Drain {
        /// The coordinator shard id.
        #[arg(long)]
        id: u32,
    },
}

/// Where the platform's topology group is: given, or read from `up`'s `cluster.json` in the
/// data directory.
#[derive(clap::Args, Debug)]
struct TopologyArgs {
    /// Replicas of the topology group, `ADDRESS,ADDRESS,…` (instead of `cluster.json`).
    #[arg(long, value_delimiter = ',')]
    topology: Vec<String>,
}

impl TopologyArgs {
    fn replicas(&self, data_dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
        if self.topology.is_empty() {
            Ok(deploy::cluster::running(data_dir)?.topology)
        } else {
            Ok(self.topology.clone())
        }
    }
}

#[derive(Subcommand, Debug)]
enum ShardCommand {
    /// Make a running replica process (empty data directory, a node id never used in the
    /// shard) a voter of the shard: it catches up first, then joins.
    AddReplica {
        #[command(flatten)]
        topology: TopologyArgs,
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        node_id: u64,
        /// The new replica's address.
        #[arg(long)]
        address: String,
    },
    /// Remove a voter from the shard (stop its process afterwards).
    RemoveReplica {
        #[command(flatten)]
        topology: TopologyArgs,
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        node_id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ApikeyCommand {
    /// Issue a key; prints it once (only its hash is stored).
    Create {
        #[arg(long)]
        tenant: String,
        /// Comma-separated: read, write, admin (the tenant's admin), operator (the platform's
        /// status; not implied by admin).
        #[arg(long, value_delimiter = ',', default_value = "read,write")]
        scopes: Vec<String>,
    },
    /// Revoke a key by its id (the part after `wk_` and before the next `_`).
    Revoke {
        #[arg(long)]
        key_id: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    // Absolute from here on: processes started in other directories (Postgres runs in its data
    // directory) are given paths inside it.
    args.data_dir = std::path::absolute(&args.data_dir)?;
    match args.command {
        Command::Up {
            storage_shards,
            coordinator_shards,
            replicas,
            base_port,
            gateway_listen,
            database_url,
            kafka_brokers,
        } => {
            anyhow::ensure!(
                storage_shards >= 1 && coordinator_shards >= 1,
                "at least one shard of each kind"
            );
            anyhow::ensure!((1..=9).contains(&replicas), "1 to 9 replicas per group");
            let cluster = deploy::cluster::up(deploy::cluster::Options {
                data_dir: args.data_dir.clone(),
                storage_shards,
                coordinator_shards,
                replicas,
                base_port,
                gateway_listen,
                database_url,
                kafka_brokers,
            })
            .await?;
            let info = &cluster.info;
            println!("gateway  {}", info.gateway_url);
            println!("api key  {}", info.api_key);
            println!("docs     {}/docs/", info.gateway_url);
            println!("console  {} (sign in with an API key)", info.console_url);
            println!("cluster  {}", args.data_dir.join("cluster.json").display());
            println!("logs     {}", args.data_dir.join("logs").display());
            println!(
                "try      {}",
                curl_example(&info.gateway_url, &info.api_key)
            );
            println!("ready {}", info.gateway_url.trim_start_matches("http://"));
            let mut cluster = cluster;
            tokio::select! {
                stopped = tokio::signal::ctrl_c() => stopped?,
                () = cluster.supervise() => {}
            }
            eprintln!("stopping");
            cluster.shutdown().await;
        }
        Command::Status { json } => {
            let cluster = deploy::cluster::running(&args.data_dir)?;
            let status = deploy::status::status(&cluster.topology, &cluster.database_url).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", deploy::status::render(&status));
            }
        }
        Command::Apikey { command } => match command {
            ApikeyCommand::Create { tenant, scopes } => {
                let cluster = deploy::cluster::running(&args.data_dir)?;
                let pool = access_gateway::store::connect(&cluster.database_url).await?;
                let scopes = access_gateway::auth::Scope::parse_all(&scopes)?;
                let key = access_gateway::store::create_key(&pool, &tenant, &scopes).await?;
                println!("{}", key.token);
            }
            ApikeyCommand::Revoke { key_id } => {
                let cluster = deploy::cluster::running(&args.data_dir)?;
                let pool = access_gateway::store::connect(&cluster.database_url).await?;
                anyhow::ensure!(
                    access_gateway::store::revoke_key(&pool, &key_id).await?,
                    "no live key {key_id:?}"
                );
                println!("revoked {key_id}");
            }
        },
        Command::Bootstrap {
            topology,
            storage_shards,
            coordinator_shards,
        } => {
            use deploy::cluster::{
                initialize_if_new, register_coordinator, register_storage_shards,
            };
            initialize_if_new(&topology).await?;
            let client = marker::topology::TopologyClient::new(topology.clone());
            for (_, replicas) in &storage_shards {
                initialize_if_new(replicas).await?;
            }
            register_storage_shards(&client, &storage_shards.into_iter().collect()).await?;
            for (coordinator_shard_id, replicas) in &coordinator_shards {
                initialize_if_new(replicas).await?;
                register_coordinator(&client, *coordinator_shard_id, replicas).await?;
            }
            println!("bootstrapped");
        }
        Command::Coordinator {
            command: CoordinatorCommand::Add,
        } => {
            let id = ask_up(&args.data_dir, deploy::cluster::ADD_COORDINATOR).await?;
            println!("coordinator shard {id} added");
        }
        Command::Coordinator {
            command: CoordinatorCommand::Remove { id },
        } => {
            let request = format!("{} {id}", deploy::cluster::REMOVE_COORDINATOR);
            ask_up(&args.data_dir, &request).await?;
            println!("coordinator shard {id} stopped");
        }
        Command::Coordinator {
            command: CoordinatorCommand::Drain { id },
        } => {
            let cluster = deploy::cluster::running(&args.data_dir)?;
            deploy::drain::drain(&cluster.topology, id).await?;
            println!("coordinator shard {id} drained and removed");
        }
        Command::Demo => {
            deploy::demo::run(&deploy::cluster::running(&args.data_dir)?).await?;
        }
        Command::Bench { workloads, args } => {
            let reports = deploy::bench::run(&workloads, &args).await?;
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
        Command::Shard { command } => match command {
            ShardCommand::AddReplica {
                topology,
                shard,
                node_id,
                address,
            } => {
                deploy::replicas::add(
                    &topology.replicas(&args.data_dir)?,
                    shard,
                    node_id,
                    &address,
                )
                .await?;
                println!("node {node_id} ({address}) is a voter of storage shard {shard}");
            }
            ShardCommand::RemoveReplica {
                topology,
                shard,
                node_id,
            } => {
                let address =
                    deploy::replicas::remove(&topology.replicas(&args.data_dir)?, shard, node_id)
                        .await?;
                println!("node {node_id} ({address}) removed from storage shard {shard}; stop it");
            }
        },
        Command::Rebuild => deploy::rebuild::in_place(&args.data_dir).await?,
        Command::Audit { json } => {
            let cluster = deploy::cluster::running(&args.data_dir)?;
            let checks = deploy::audit::audit(&cluster.topology, &cluster.database_url).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                let width = checks
                    .iter()
                    .map(|check| check.name.len())
                    .max()
                    .unwrap_or(0);
                for check in &checks {
                    let verdict = if check.ok { "ok  " } else { "FAIL" };
                    println!("{verdict} {:<width$}  {}", check.name, check.detail);
                }
            }
            if checks.iter().any(|check| !check.ok) {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// Sends one request to the running `walletctl up` on its control socket; returns what its
/// `ok` answer carries.
async fn ask_up(data_dir: &std::path::Path, request: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let socket = data_dir.join("control.sock");
    let mut connection = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|error| {
            anyhow::anyhow!("{}: {error} (is `walletctl up` running?)", socket.display())
        })?;
    connection
        .write_all(format!("{request}\n").as_bytes())
        .await?;
    let mut reply = String::new();
    BufReader::new(connection).read_line(&mut reply).await?;
    match reply.trim().split_once(' ') {
        Some(("ok", value)) => Ok(value.to_string()),
        _ => anyhow::bail!("{}", reply.trim()),
    }
}

/// A ready-to-paste request that creates a wallet.
fn curl_example(gateway_url: &str, api_key: &str) -> String {
    let body = r#"{"owner_id": "alice", "currency": "USD"}"#;
    format!(
        "curl -s -X POST {gateway_url}/v1/wallets -H 'Authorization: Bearer {api_key}' \
         -H 'Idempotency-Key: create-alice' -H 'content-type: application/json' -d '{body}'"
    )
}
