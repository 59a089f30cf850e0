//! A complete local cluster under one directory: a topology group, storage shards and
//! coordinator shards (each a Raft group of replica processes), a PostgreSQL server (unless
//! a database URL is given), the query service (projections in the same database, fed straight
//! from the shards, or through Kafka and the connector when brokers are given) and the access
//! gateway, with an API key for a demo tenant.
//!
//! With fixed ports (`base_port` > 0) the cluster can be stopped and started again on the same
//! directory: every replica recovers from its own disk. With `base_port` 0 every service takes
//! a free port, for one run only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use marker::topology::{CoordinatorEntry, CoordinatorState, TopologyClient};
use proto::raft::v1 as raft;
use proto::raft::v1::raft_admin_client::RaftAdminClient;

use crate::postgres::{self, ServerDir};
use crate::process::{ServiceProcess, workspace_binary};
use crate::{Error, Result, io_error};

/// The tenant whose API key `up` prints.
pub const DEMO_TENANT: &str = "demo";
const GROUP_READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Options {
    pub data_dir: PathBuf,
    pub storage_shards: u32,
    pub coordinator_shards: u32,
    /// Replicas per Raft group.
    pub replicas: u64,
    /// Ports are `base_port + offset`, fixed per service; 0 picks free ports.
    pub base_port: u16,
    pub gateway_listen: SocketAddr,
    /// An existing database; without one, a private server runs under the data directory.
    pub database_url: Option<String>,
    /// Kafka bootstrap servers: events then flow shard → connector → Kafka → projector;
    /// without them the projector reads the shards directly.
    pub kafka_brokers: Option<String>,
}

/// One process of the cluster, as `cluster.json` lists it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    /// `topology`, `storage`, `coordinator`, `connector`, `query` or `gateway`.
    pub role: String,
    pub shard_id: Option<u32>,
    pub node_id: Option<u64>,
    pub address: String,
    pub pid: u32,
}

/// What `<data dir>/cluster.json` holds once the cluster is ready.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ClusterInfo {
    pub gateway_url: String,
    /// The operator console (served by the gateway).
    #[serde(default)]
    pub console_url: String,
    pub api_key: String,
    pub database_url: String,
    pub topology: Vec<String>,
    pub processes: Vec<ProcessInfo>,
}

/// A process of the cluster and how to start it again.
struct Supervised {
    process: ServiceProcess,
    /// What `cluster.json` says of it.
    info: ProcessInfo,
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// The last start (or failed attempt): a process that keeps dying is restarted at most
    /// once per [`RESTART_INTERVAL_MIN`].
    started: Instant,
}

/// A running cluster; dropping it stops every process it started.
pub struct LocalCluster {
    pub info: ClusterInfo,
    processes: Vec<Supervised>,
    postgres: Option<PathBuf>,
    options: Options,
    /// `<data dir>/control.sock`: `walletctl` asks the running `up` to change the cluster.
    control: tokio::net::UnixListener,
}

/// The request `walletctl coordinator add` sends on the control socket.
pub const ADD_COORDINATOR: &str = "add-coordinator";
/// The request `walletctl coordinator remove ID` sends on the control socket (with the id).
pub const REMOVE_COORDINATOR: &str = "remove-coordinator";

/// How often the supervisor looks for processes that died.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(500);
const RESTART_INTERVAL_MIN: Duration = Duration::from_secs(5);

impl LocalCluster {
    /// Restarts, for as long as it runs, every process that dies (on the address it had, with
    /// its data directory, so it recovers from its own disk), and keeps `cluster.json` current.
    /// Between checks it answers requests on the control socket.
    pub async fn supervise(&mut self) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(SUPERVISE_INTERVAL) => {}
                accepted = self.control.accept() => {
                    if let Ok((connection, _)) = accepted {
                        self.answer(connection).await;
                    }
                }
            }
            let mut restarted = false;
            for supervised in &mut self.processes {
                let status = match supervised.process.try_wait() {
                    Ok(Some(status)) => status,
                    Ok(None) => continue,
                    Err(error) => {
                        eprintln!("{}: {error}", supervised.name);
                        continue;
                    }
                };
                if supervised.started.elapsed() < RESTART_INTERVAL_MIN {
                    continue;
                }
                eprintln!("{} exited ({status}); restarting it", supervised.name);
                let address = supervised.process.address().to_string();
                let args = same_address(&supervised.args, &address);
                supervised.started = Instant::now();
                match ServiceProcess::spawn(&supervised.program, &args, &supervised.log).await {
                    Ok(process) => {
                        supervised.info.pid = process.pid();
                        supervised.process = process;
                        restarted = true;
                        eprintln!("{} restarted", supervised.name);
                    }
                    Err(error) => eprintln!("restarting {}: {error}", supervised.name),
                }
            }
            if restarted && let Err(error) = self.save() {
                eprintln!("{error}");
            }
        }
    }

    /// Writes `cluster.json` with the processes as they are now.
    fn save(&mut self) -> Result<()> {
        self.info.processes = self.processes.iter().map(|s| s.info.clone()).collect();
        write_cluster_json(&self.options.data_dir, &self.info)
    }

    /// One control request: a line naming what to do, answered by one line.
    async fn answer(&mut self, connection: tokio::net::UnixStream) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (reader, mut writer) = connection.into_split();
        let mut line = String::new();
        if BufReader::new(reader).read_line(&mut line).await.is_err() {
            return;
        }
        let request: Vec<&str> = line.split_whitespace().collect();
        let result = match request[..] {
            [ADD_COORDINATOR] => self.add_coordinator().await,
            [REMOVE_COORDINATOR, id] => match id.parse() {
                Ok(id) => self.remove_coordinator(id).await.map(|()| id),
                Err(_) => Err(Error::Setup(format!("bad coordinator shard id {id:?}"))),
            },
            _ => Err(Error::Setup(format!("unknown request {:?}", line.trim()))),
        };
        let reply = match result {
            Ok(id) => format!("ok {id}\n"),
            Err(error) => format!("error {error}\n"),
        };
        let _ = writer.write_all(reply.as_bytes()).await;
    }

    /// Starts a new coordinator shard (its replicas supervised like every other process) and
    /// makes it active in the topology; returns its id.
    pub async fn add_coordinator(&mut self) -> Result<u32> {
        let client = TopologyClient::new(self.info.topology.clone());
        let topology = client.get().await.map_err(Error::Setup)?;
        let id = topology.coordinators.keys().max().copied().unwrap_or(0) + 1;
        let mut launcher = Launcher {
            options: self.options.clone(),
            processes: Vec::new(),
        };
        start_coordinator(&mut launcher, &client, &self.info.topology, id).await?;
        self.processes.append(&mut launcher.processes);
        self.save()?;
        eprintln!("coordinator shard {id} added");
        Ok(id)
    }

    /// Stops a drained coordinator shard's replicas for good (the topology says it is removed,
    /// so nothing routes to it and storage shards fence it).
    pub async fn remove_coordinator(&mut self, id: u32) -> Result<()> {
        let topology = TopologyClient::new(self.info.topology.clone())
            .get()
            .await
            .map_err(Error::Setup)?;
        match topology.coordinators.get(&id).map(|entry| entry.state) {
            Some(CoordinatorState::Removed) => {}
            Some(_) => {
                return Err(Error::Setup(format!(
                    "coordinator shard {id} is not drained: run `walletctl coordinator drain --id {id}` first"
                )));
            }
            None => return Err(Error::Setup(format!("no coordinator shard {id}"))),
        }
        let (mut stopping, keeping) = std::mem::take(&mut self.processes)
            .into_iter()
            .partition(|s| s.info.role == "coordinator" && s.info.shard_id == Some(id));
        self.processes = keeping;
        for supervised in &mut stopping {
            supervised.process.kill().await?;
        }
        self.save()?;
        eprintln!("coordinator shard {id} removed");
        Ok(())
    }

    /// Stops every process and waits until each has exited (so their ports are free again),
    /// then stops Postgres.
    pub async fn shutdown(mut self) {
        for supervised in &mut self.processes {
            if let Err(error) = supervised.process.kill().await {
                eprintln!("stopping a process: {error}");
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.processes.clear();
        if let Some(dir) = &self.postgres
            && let Err(error) = (ServerDir { dir }).stop()
        {
            eprintln!("stopping Postgres: {error}");
        }
    }
}

struct Launcher {
    options: Options,
    processes: Vec<Supervised>,
}

/// Who a process is in the cluster.
struct Role {
    role: &'static str,
    shard_id: Option<u32>,
    node_id: Option<u64>,
}

impl Launcher {
    fn port(&self, offset: u16) -> u16 {
        match self.options.base_port {
            0 => 0,
            base => base + offset,
        }
    }

    async fn spawn(
        &mut self,
        binary: &str,
        name: &str,
        role: Role,
        args: Vec<String>,
    ) -> Result<String> {
        let logs = self.options.data_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io_error("creating the log directory"))?;
        let log = logs.join(format!("{name}.log"));
        let program = workspace_binary(binary);
        let process = ServiceProcess::spawn(&program, &args, &log).await?;
        let address = process.address().to_string();
        let info = ProcessInfo {
            role: role.role.to_string(),
            shard_id: role.shard_id,
            node_id: role.node_id,
            address: address.clone(),
            pid: process.pid(),
        };
        self.processes.push(Supervised {
            process,
            info,
            name: name.to_string(),
            program,
            args,
            log,
            started: Instant::now(),
        });
        Ok(address)
    }

    /// Starts one Raft group's replicas and initializes it when it is new.
    async fn group(
        &mut self,
        binary: &str,
        role: (&'static str, Option<u32>),
        first_port: u16,
        group_args: &[String],
    ) -> Result<Vec<String>> {
        let name = match role.1 {
            Some(shard_id) => format!("{}-{shard_id}", role.0),
            None => role.0.to_string(),
        };
        let mut addresses = Vec::new();
        let mut new = false;
        for node_id in 1..=self.options.replicas {
            let data_dir = self
                .options
                .data_dir
                .join(&name)
                .join(format!("node-{node_id}"));
            new |= !data_dir.exists();
            let listen = format!("127.0.0.1:{}", self.port(first_port + node_id as u16 - 1));
            let mut args = vec![
                "--node-id".into(),
                node_id.to_string(),
                "--listen".into(),
                listen,
                "--data-dir".into(),
                data_dir.display().to_string(),
            ];
            args.extend_from_slice(group_args);
            let process_role = Role {
                role: role.0,
                shard_id: role.1,
                node_id: Some(node_id),
            };
            let process_name = format!("{name}-node-{node_id}");
            addresses.push(
                self.spawn(binary, &process_name, process_role, args)
                    .await?,
            );
        }
        if new {
            initialize(&addresses).await?;
        }
        wait_for_leader(&addresses[0]).await?;
        Ok(addresses)
    }
}

/// Records the storage shards and their replicas in the topology.
pub async fn register_storage_shards(
    client: &TopologyClient,
    storage: &BTreeMap<u32, Vec<String>>,
) -> Result<()> {
    client
        .update(|current| {
            current.storage_shards.extend(storage.clone());
            Ok(())
        })
        .await
        .map(drop)
        .map_err(Error::Setup)
}

/// Records a coordinator shard in the topology: active at epoch 1 when new; otherwise only its
/// replicas change.
pub async fn register_coordinator(
    client: &TopologyClient,
    coordinator_shard_id: u32,
    replicas: &[String],
) -> Result<()> {
    client
        .update(|current| {
            let entry = current
                .coordinators
                .entry(coordinator_shard_id)
                .or_insert_with(|| CoordinatorEntry {
                    state: CoordinatorState::Active,
                    epoch: 1,
                    replicas: replicas.to_vec(),
                });
            entry.replicas = replicas.to_vec();
            Ok(())
        })
        .await
        .map(drop)
        .map_err(Error::Setup)
}

/// Initializes a Raft group (node ids 1, 2, … in the order of `addresses`) unless it has a
/// membership already, then waits for its leader. For groups started by something else than
/// `up` (Kubernetes).
pub async fn initialize_if_new(addresses: &[String]) -> Result<()> {
    let first = &addresses[0];
    let deadline = Instant::now() + GROUP_READY_TIMEOUT;
    let status = loop {
        match consensus::client::raft_status(first).await {
            Ok(status) => break status,
            Err(error) if Instant::now() > deadline => {
                return Err(Error::Setup(format!("{first} does not answer: {error}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let has_members = status
        .membership
        .is_some_and(|membership| !membership.voters.is_empty());
    if !has_members {
        initialize(addresses).await?;
    }
    wait_for_leader(first).await
}

async fn admin(address: &str) -> Result<RaftAdminClient<tonic::transport::Channel>> {
    let channel =
        consensus::client::channel(address).map_err(|error| Error::Setup(error.to_string()))?;
    Ok(RaftAdminClient::new(channel))
}

async fn initialize(addresses: &[String]) -> Result<()> {
    let members = addresses
        .iter()
        .enumerate()
        .map(|(index, address)| raft::Node {
            node_id: index as u64 + 1,
            address: address.clone(),
        })
        .collect();
    admin(&addresses[0])
        .await?
        .initialize(raft::InitializeRequest { members })
        .await
        .map_err(|status| Error::Setup(format!("initializing {}: {status}", addresses[0])))?;
    Ok(())
}

async fn wait_for_leader(address: &str) -> Result<()> {
    let deadline = Instant::now() + GROUP_READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(status) = consensus::client::raft_status(address).await
            && status.leader_node_id.is_some()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Setup(format!("no leader seen from {address}")))
}

/// Waits until the gateway's `/readyz` says it can serve (it has read the topology).
async fn wait_until_ready(gateway: &str) -> Result<()> {
    let deadline = Instant::now() + GROUP_READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok((200, _)) = crate::process::http_get(gateway, "/readyz").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Setup(format!(
        "the gateway at {gateway} never became ready"
    )))
}

/// Port offsets from `base_port`: topology 0–9, storage shard s at 10·s, coordinator shard c
/// at 500 + 10·c, the query service at 900, Postgres at 999.
const STORAGE_PORTS: u16 = 10;
const COORDINATOR_PORTS: u16 = 500;
const QUERY_PORT: u16 = 900;
const POSTGRES_PORT: u16 = 999;

async fn start_postgres(options: &Options) -> Result<(PathBuf, String)> {
    let dir = options.data_dir.join("postgres");
    let server = ServerDir { dir: &dir };
    server.init()?;
    let port = match options.base_port {
        0 => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(io_error("finding a free port"))?;
            listener
                .local_addr()
                .map_err(io_error("finding a free port"))?
                .port()
        }
        base => base + POSTGRES_PORT,
    };
    server.start(port)?;
    let admin_url = postgres::url(port, "postgres");
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .map_err(|error| Error::Setup(format!("connecting to Postgres: {error}")))?;
    let exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = 'wallet'")
        .fetch_optional(&mut connection)
        .await
        .map_err(|error| Error::Setup(format!("Postgres: {error}")))?
        .is_some();
    if !exists {
        sqlx::query("CREATE DATABASE wallet")
            .execute(&mut connection)
            .await
            .map_err(|error| Error::Setup(format!("creating the database: {error}")))?;
    }
    Ok((dir, postgres::url(port, "wallet")))
}

/// The demo tenant's key: issued once and kept in `<data dir>/api-key` (only its hash is in
/// Postgres, so it cannot be shown again otherwise).
async fn demo_key(data_dir: &Path, database_url: &str) -> Result<String> {
    let path = data_dir.join("api-key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        return Ok(key.trim().to_string());
    }
    let pool = access_gateway::store::connect(database_url)
        .await
        .map_err(|error| Error::Setup(format!("gateway database: {error}")))?;
    let scopes = [
        access_gateway::auth::Scope::Read,
        access_gateway::auth::Scope::Write,
    ];
    let key = access_gateway::store::create_key(&pool, DEMO_TENANT, &scopes)
        .await
        .map_err(|error| Error::Setup(format!("creating the demo key: {error}")))?;
    write_private(&path, &key.token)?;
    Ok(key.token)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("writing the API key file"))?;
    file.write_all(text.as_bytes())
        .map_err(io_error("writing the API key file"))
}

/// Starts (or restarts) the whole cluster and returns once the gateway is ready.
pub async fn up(options: Options) -> Result<LocalCluster> {
    std::fs::create_dir_all(&options.data_dir).map_err(io_error("creating the data directory"))?;
    let (postgres, database_url) = match &options.database_url {
        Some(url) => (None, url.clone()),
        None => {
            let (dir, url) = start_postgres(&options).await?;
            (Some(dir), url)
        }
    };
    let mut launcher = Launcher {
        options: options.clone(),
        processes: Vec::new(),
    };
    let topology = launcher
        .group("marker-topology", ("topology", None), 0, &[])
        .await?;
    let watch = vec!["--topology".to_string(), topology.join(",")];
    let mut storage = BTreeMap::new();
    for shard_id in 1..=options.storage_shards {
        let mut args = vec!["--shard-id".to_string(), shard_id.to_string()];
        args.extend_from_slice(&watch);
        let ports = STORAGE_PORTS * shard_id as u16;
        let role = ("storage", Some(shard_id));
        storage.insert(
            shard_id,
            launcher.group("auticuro", role, ports, &args).await?,
        );
    }
    let client = TopologyClient::new(topology.clone());
    register_storage_shards(&client, &storage).await?;
    // The configured coordinator shards, and any added to this cluster since (still in use).
    let mut coordinators: std::collections::BTreeSet<u32> =
        (1..=options.coordinator_shards).collect();
    let known = client.get().await.map_err(Error::Setup)?.coordinators;
    coordinators.extend(
        known
            .iter()
            .filter(|(_, entry)| entry.state != CoordinatorState::Removed)
            .map(|(id, _)| *id),
    );
    for coordinator_shard_id in coordinators {
        start_coordinator(&mut launcher, &client, &topology, coordinator_shard_id).await?;
    }
    let api_key = demo_key(&options.data_dir, &database_url).await?;
    // The read side: the projector reads the shards' event streams directly into Postgres,
    // or, with Kafka, the topics the connector fills.
    let mut query_args = vec![
        "serve".into(),
        "--database-url".into(),
        database_url.clone(),
        "--listen".into(),
        format!("127.0.0.1:{}", launcher.port(QUERY_PORT)),
        "--topology".into(),
        topology.join(","),
    ];
    if let Some(brokers) = &options.kafka_brokers {
        let role = Role {
            role: "connector",
            shard_id: None,
            node_id: None,
        };
        let args = vec![
            "connect".into(),
            "--kafka-brokers".into(),
            brokers.clone(),
            "--topology".into(),
            topology.join(","),
        ];
        launcher.spawn("query", "connector", role, args).await?;
        query_args.extend(["--kafka-brokers".into(), brokers.clone()]);
    }
    let query = launcher
        .spawn(
            "query",
            "query",
            Role {
                role: "query",
                shard_id: None,
                node_id: None,
            },
            query_args,
        )
        .await?;
    let gateway = launcher
        .spawn(
            "access-gateway",
            "gateway",
            Role {
                role: "gateway",
                shard_id: None,
                node_id: None,
            },
            vec![
                "--database-url".into(),
                database_url.clone(),
                "serve".into(),
                "--listen".into(),
                options.gateway_listen.to_string(),
                "--topology".into(),
                topology.join(","),
                "--query".into(),
                query,
            ],
        )
        .await?;
    wait_until_ready(&gateway).await?;
    let info = ClusterInfo {
        gateway_url: format!("http://{gateway}"),
        console_url: format!("http://{gateway}/console/"),
        api_key,
        database_url,
        topology,
        processes: launcher.processes.iter().map(|s| s.info.clone()).collect(),
    };
    write_cluster_json(&options.data_dir, &info)?;
    let socket = options.data_dir.join("control.sock");
    let _ = std::fs::remove_file(&socket);
    let control =
        tokio::net::UnixListener::bind(&socket).map_err(io_error("opening the control socket"))?;
    Ok(LocalCluster {
        info,
        processes: launcher.processes,
        postgres,
        options,
        control,
    })
}

/// Starts coordinator shard `id`'s replicas and records it in the topology (active at epoch 1
/// when new).
async fn start_coordinator(
    launcher: &mut Launcher,
    client: &TopologyClient,
    topology: &[String],
    id: u32,
) -> Result<()> {
    let args = [
        "--coordinator-shard-id".to_string(),
        id.to_string(),
        "--topology".to_string(),
        topology.join(","),
    ];
    let ports = COORDINATOR_PORTS + 10 * id as u16;
    let replicas = launcher
        .group("marker", ("coordinator", Some(id)), ports, &args)
        .await?;
    register_coordinator(client, id, &replicas).await
}

/// The cluster `up` runs on `data_dir`, as its `cluster.json` describes it.
pub fn running(data_dir: &Path) -> Result<ClusterInfo> {
    let path = data_dir.join("cluster.json");
    let text =
        std::fs::read_to_string(&path).map_err(io_error(format!("reading {}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|error| Error::Setup(format!("{}: {error}", path.display())))
}

fn write_cluster_json(data_dir: &Path, info: &ClusterInfo) -> Result<()> {
    let json = serde_json::to_string_pretty(info).expect("cluster info serializes");
    std::fs::write(data_dir.join("cluster.json"), json).map_err(io_error("writing cluster.json"))
}

/// `args` with the `--listen` value replaced by `address`: a restarted process takes the
/// address its predecessor had (even one picked from port 0), where its peers look for it.
fn same_address(args: &[String], address: &str) -> Vec<String> {
    let mut args = args.to_vec();
    if let Some(position) = args.iter().position(|arg| arg == "--listen")
        && position + 1 < args.len()
    {
        args[position + 1] = address.to_string();
    }
    args
}
