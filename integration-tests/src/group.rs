//! A Raft group of real service processes on loopback (a storage shard of `auticuro`
//! replicas, or a coordinator shard of `marker` replicas): start, kill, restart, add replicas,
//! find the leader, compare digests; for storage shards, a client that follows leader redirects
//! and retries with the same request id (so a retry is always safe).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use auticuro::client::ShardClient;
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;
use proto::raft::v1 as raft;
use proto::raft::v1::raft_admin_client::RaftAdminClient;
use tonic::transport::Channel;

use crate::process::{ServiceProcess, fresh_data_dir, workspace_binary};
use crate::{HarnessError, Result};

/// How long a cluster operation (an election, a catch-up) may take before the test fails.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Replica {
    pub node_id: u64,
    /// The address everyone uses: the process's own, or its proxy's.
    pub address: String,
    /// Where the process listens (its address on every restart).
    listen: String,
    /// The proxy in front of it, in groups started behind proxies.
    pub proxy: Option<crate::proxy::FaultProxy>,
    pub data_dir: PathBuf,
    pub process: Option<ServiceProcess>,
    _dir: tempfile::TempDir,
}

pub struct Group {
    pub shard_id: u32,
    pub replicas: Vec<Replica>,
    binary: &'static str,
    /// What every replica of the group is started with besides node id, address and data dir.
    group_args: Vec<String>,
    /// Storage shards only: the ledger client.
    client: Option<ShardClient>,
    /// Whether each replica is reached through a `FaultProxy`.
    proxied: bool,
}

fn setup_error(what: &str) -> impl FnOnce(tonic::Status) -> HarnessError + '_ {
    move |status| HarnessError::Setup(format!("{what}: {status}"))
}

async fn spawn_replica(
    binary: &str,
    group_args: &[String],
    node_id: u64,
    listen: &str,
    data_dir: &std::path::Path,
) -> Result<ServiceProcess> {
    let mut args = vec![
        "--node-id".to_string(),
        node_id.to_string(),
        "--listen".into(),
        listen.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ];
    args.extend_from_slice(group_args);
    crate::process::spawn(&workspace_binary(binary), &args).await
}

impl Group {
    /// A storage shard of `size` `auticuro` replicas (node ids 1..=size), initialized.
    pub async fn storage(shard_id: u32, size: u64, extra_args: &[&str]) -> Result<Group> {
        let mut group_args = vec!["--shard-id".to_string(), shard_id.to_string()];
        group_args.extend(extra_args.iter().map(|arg| arg.to_string()));
        Group::start("auticuro", shard_id, size, group_args).await
    }

    /// A storage shard whose replicas are reached (by peers and clients) through proxies the
    /// test controls.
    pub async fn storage_behind_proxies(shard_id: u32, size: u64) -> Result<Group> {
        let group_args = vec!["--shard-id".to_string(), shard_id.to_string()];
        Group::start_with("auticuro", shard_id, size, group_args, true).await
    }

    /// A coordinator shard of `size` `marker` replicas over the given storage shards.
    pub async fn coordinator(
        coordinator_shard_id: u32,
        size: u64,
        storage: &[&Group],
        extra_args: &[&str],
    ) -> Result<Group> {
        let group_args = Group::coordinator_args(coordinator_shard_id, storage, extra_args);
        Group::start("marker", coordinator_shard_id, size, group_args).await
    }

    /// A coordinator shard reached (by peers and clients) through proxies the test controls.
    pub async fn coordinator_behind_proxies(
        coordinator_shard_id: u32,
        size: u64,
        storage: &[&Group],
    ) -> Result<Group> {
        let group_args = Group::coordinator_args(coordinator_shard_id, storage, &[]);
        Group::start_with("marker", coordinator_shard_id, size, group_args, true).await
    }

    fn coordinator_args(
        coordinator_shard_id: u32,
        storage: &[&Group],
        extra_args: &[&str],
    ) -> Vec<String> {
        let mut group_args = vec![
            "--coordinator-shard-id".to_string(),
            coordinator_shard_id.to_string(),
        ];
        for shard in storage {
            let addresses: Vec<&str> = shard
                .replicas
                .iter()
                .map(|replica| replica.address.as_str())
                .collect();
            group_args.push("--storage-shard".into());
            group_args.push(format!("{}={}", shard.shard_id, addresses.join(",")));
        }
        group_args.extend(extra_args.iter().map(|arg| arg.to_string()));
        group_args
    }

    /// A coordinator shard that takes the storage shards (and its own state) from the topology.
    pub async fn coordinator_under_topology(
        coordinator_shard_id: u32,
        size: u64,
        topology: &Group,
        extra_args: &[&str],
    ) -> Result<Group> {
        let mut group_args = vec![
            "--coordinator-shard-id".to_string(),
            coordinator_shard_id.to_string(),
            "--topology".into(),
            topology.addresses(),
        ];
        group_args.extend(extra_args.iter().map(|arg| arg.to_string()));
        Group::start("marker", coordinator_shard_id, size, group_args).await
    }

    /// The topology group: `size` `marker-topology` replicas, initialized (empty topology).
    pub async fn topology(size: u64) -> Result<Group> {
        Group::start("marker-topology", 0, size, Vec::new()).await
    }

    /// The addresses of every replica, comma-separated, as flags take them.
    pub fn addresses(&self) -> String {
        self.replicas
            .iter()
            .map(|replica| replica.address.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn start(
        binary: &'static str,
        shard_id: u32,
        size: u64,
        group_args: Vec<String>,
    ) -> Result<Group> {
        Group::start_with(binary, shard_id, size, group_args, false).await
    }

    async fn start_with(
        binary: &'static str,
        shard_id: u32,
        size: u64,
        group_args: Vec<String>,
        proxied: bool,
    ) -> Result<Group> {
        let mut shard = Group {
            shard_id,
            replicas: Vec::new(),
            binary,
            group_args,
            client: None,
            proxied,
        };
        for node_id in 1..=size {
            shard.add_process(node_id).await?;
        }
        let addresses: Vec<String> = shard.replicas.iter().map(|r| r.address.clone()).collect();
        deploy::cluster::initialize_if_new(&addresses).await?;
        Ok(shard)
    }

    /// Starts a new replica process with an empty data directory (not yet a member).
    pub async fn add_process(&mut self, node_id: u64) -> Result<&Replica> {
        let dir = fresh_data_dir(&format!("wallet-{}-", self.binary))?;
        let data_dir = dir.path().join("replica");
        let process = spawn_replica(
            self.binary,
            &self.group_args,
            node_id,
            "127.0.0.1:0",
            &data_dir,
        )
        .await?;
        let listen = process.address().to_string();
        let proxy = match self.proxied {
            true => Some(crate::proxy::FaultProxy::start(listen.clone()).await?),
            false => None,
        };
        let address = proxy
            .as_ref()
            .map_or_else(|| listen.clone(), |proxy| proxy.address.clone());
        self.replicas.push(Replica {
            node_id,
            address,
            listen,
            proxy,
            data_dir,
            process: Some(process),
            _dir: dir,
        });
        self.refresh_client();
        Ok(self.replicas.last().expect("just pushed"))
    }

    pub fn replica(&mut self, node_id: u64) -> &mut Replica {
        self.replicas
            .iter_mut()
            .find(|replica| replica.node_id == node_id)
            .expect("a replica of this shard")
    }

    /// `kill -9` of one replica.
    pub async fn kill(&mut self, node_id: u64) -> Result<()> {
        if let Some(mut process) = self.replica(node_id).process.take() {
            process.kill().await?;
        }
        self.refresh_client();
        Ok(())
    }

    /// Restarts a killed replica on its old address and data directory.
    pub async fn restart(&mut self, node_id: u64) -> Result<()> {
        let (binary, group_args) = (self.binary, self.group_args.clone());
        let replica = self.replica(node_id);
        let process = spawn_replica(
            binary,
            &group_args,
            node_id,
            &replica.listen,
            &replica.data_dir,
        )
        .await?;
        replica.process = Some(process);
        self.refresh_client();
        Ok(())
    }

    /// Adds arguments for every replica and restarts them one at a time (a rolling restart:
    /// the group keeps a leader throughout).
    pub async fn rolling_restart_with(&mut self, extra_args: &[&str]) -> Result<()> {
        self.group_args
            .extend(extra_args.iter().map(|arg| arg.to_string()));
        let node_ids: Vec<u64> = self.running().map(|replica| replica.node_id).collect();
        for node_id in node_ids {
            self.kill(node_id).await?;
            self.restart(node_id).await?;
            self.leader().await?;
        }
        Ok(())
    }

    /// A running replica other than `node_id` (a follower, when `node_id` leads).
    pub fn running_other_than(&self, node_id: u64) -> u64 {
        self.running()
            .map(|replica| replica.node_id)
            .find(|id| *id != node_id)
            .expect("another running replica")
    }

    pub fn running(&self) -> impl Iterator<Item = &Replica> {
        self.replicas
            .iter()
            .filter(|replica| replica.process.is_some())
    }

    /// Points the shard client at the running replicas.
    fn refresh_client(&mut self) {
        let running: Vec<String> = self
            .running()
            .map(|replica| replica.address.clone())
            .collect();
        if running.is_empty() || self.binary != "auticuro" {
            return;
        }
        match &self.client {
            Some(client) => client.set_replicas(running),
            None => self.client = Some(ShardClient::new(self.shard_id, running)),
        }
    }

    fn client(&self) -> &ShardClient {
        self.client
            .as_ref()
            .expect("a storage shard with a running replica has a client")
    }

    /// A lazily connecting channel to one address.
    pub async fn channel(&self, address: &str) -> Result<Channel> {
        match &self.client {
            Some(client) => client.channel(address).map_err(HarnessError::Setup),
            None => auticuro::client::channel(address)
                .map_err(|error| HarnessError::Setup(error.to_string())),
        }
    }

    /// The address of one replica of the group.
    pub fn address_of(&self, node_id: u64) -> &str {
        &self
            .replicas
            .iter()
            .find(|replica| replica.node_id == node_id)
            .expect("a replica")
            .address
    }

    pub async fn admin(&self, node_id: u64) -> Result<RaftAdminClient<Channel>> {
        Ok(RaftAdminClient::new(
            self.channel(self.address_of(node_id)).await?,
        ))
    }

    pub async fn ledger(&self, node_id: u64) -> Result<LedgerClient<Channel>> {
        Ok(LedgerClient::new(
            self.channel(self.address_of(node_id)).await?,
        ))
    }

    /// Waits until the running replicas agree on one leader among them; returns its node id.
    /// Waits until the replicas that answer (a majority at least; crashed ones do not answer)
    /// agree on one leader that answers too; returns its node id.
    pub async fn leader(&self) -> Result<u64> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let mut answered = Vec::new();
            for replica in self.running() {
                if let Ok(status) = self.status(replica.node_id).await {
                    answered.push((replica.node_id, status.leader_node_id));
                }
            }
            let majority = self.running().count() / 2 + 1;
            if let Some((_, Some(leader))) = answered.first()
                && answered.len() >= majority
                && answered.iter().all(|(_, seen)| *seen == Some(*leader))
                && answered.iter().any(|(node_id, _)| node_id == leader)
            {
                return Ok(*leader);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "no agreed leader: {answered:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(&self, node_id: u64) -> Result<raft::StatusResponse> {
        let channel = self.channel(self.address_of(node_id)).await?;
        consensus::client::raft_status_over(channel)
            .await
            .map_err(|error| HarnessError::Setup(format!("status: {error}")))
    }

    pub async fn digest(&self, node_id: u64) -> Result<raft::DigestResponse> {
        let mut admin = self.admin(node_id).await?;
        consensus::client::admin_call(admin.digest(raft::DigestRequest {}))
            .await
            .map_err(|error| HarnessError::Setup(format!("digest: {error}")))
    }

    /// Waits until every running replica has applied `seq`; returns their digests.
    pub async fn digests_at(&self, seq: u64) -> Result<Vec<raft::DigestResponse>> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let mut digests = Vec::new();
            for replica in self.running() {
                digests.push(self.digest(replica.node_id).await?);
            }
            if digests.iter().all(|digest| digest.applied_seq >= seq) {
                return Ok(digests);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "replicas did not reach seq {seq}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Executes a command on the leader, following redirects and retrying unknown outcomes
    /// (transport errors, unavailability) with the same request id until there is an answer.
    pub async fn execute(&self, command: pb::Command) -> Result<pb::CommandResult> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        self.client()
            .execute(command, deadline)
            .await
            .map_err(|unknown| HarnessError::Setup(unknown.to_string()))
    }

    /// Executes a command that must be accepted; panics with the result otherwise.
    pub async fn execute_ok(&self, request_id: impl Into<String>, kind: pb::command::Kind) {
        let result = self
            .execute(crate::commands::command(request_id, kind))
            .await
            .unwrap();
        assert!(crate::commands::ok(&result), "{result:?}");
    }
}

/// An account id starting with `prefix` that the slot table over `shard_ids` places on `shard_id`.
pub fn account_on(shard_id: u32, prefix: &str, shard_ids: &[u32]) -> String {
    let table = auticuro::routing::SlotTable::uniform(shard_ids);
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|id| {
            table.shard_of(&auticuro::ledger::AccountId::parse(id).expect("a valid id")) == shard_id
        })
        .expect("some id lands on every shard")
}

impl Group {
    /// Every account of a storage shard as its event log leaves it (the last state each event
    /// reported), read from the leader.
    pub async fn accounts(&self) -> Result<std::collections::BTreeMap<String, pb::Account>> {
        let leader = self.leader().await?;
        let mut client = self.ledger(leader).await?;
        let mut accounts = std::collections::BTreeMap::new();
        let mut from_seq = 1;
        loop {
            let request = pb::ReadEventsRequest {
                from_seq,
                to_seq: 0,
                limit: 1_000,
            };
            let page = client
                .read_events(request)
                .await
                .map_err(setup_error("read events"))?
                .into_inner();
            let Some(last) = page.events.last() else {
                return Ok(accounts);
            };
            from_seq = last.seq + 1;
            for event in page.events {
                for account in event.accounts {
                    accounts.insert(account.account_id.clone(), account);
                }
            }
        }
    }

    /// The two-phase state of a transaction on this storage shard (linearizable, on the leader;
    /// asked again when leadership moved between finding the leader and asking it).
    pub async fn transaction_legs(&self, txn_id: &str) -> Result<pb::TransactionLegs> {
        self.client()
            .transaction_legs(txn_id, Instant::now() + CLUSTER_TIMEOUT)
            .await
            .map_err(|unknown| HarnessError::Setup(format!("legs: {unknown}")))
    }
}
