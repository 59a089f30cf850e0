//! A storage shard of real `auticuro` processes on loopback, and a client that follows leader
//! redirects and retries with the same request id (so a retry is always safe).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use proto::auticuro::v1 as pb;
use auticuro::client::ShardClient;
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
    pub address: String,
    pub data_dir: PathBuf,
    pub process: Option<ServiceProcess>,
    _dir: tempfile::TempDir,
}

pub struct StorageShard {
    pub shard_id: u32,
    pub replicas: Vec<Replica>,
    extra_args: Vec<String>,
    client: Option<ShardClient>,
}

fn setup_error(what: &str) -> impl FnOnce(tonic::Status) -> HarnessError + '_ {
    move |status| HarnessError::Setup(format!("{what}: {status}"))
}


async fn spawn_replica(shard_id: u32, node_id: u64, listen: &str, data_dir: &std::path::Path, extra: &[String]) -> Result<ServiceProcess> {
    let mut args = vec![
        "--shard-id".to_string(),
        shard_id.to_string(),
        "--node-id".into(),
        node_id.to_string(),
        "--listen".into(),
        listen.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ];
    args.extend_from_slice(extra);
    ServiceProcess::spawn(&workspace_binary("auticuro"), &args).await
}

impl StorageShard {
    /// Starts `size` replicas with node ids 1..=size and initializes the group.
    pub async fn start(shard_id: u32, size: u64, extra_args: &[&str]) -> Result<StorageShard> {
        let extra_args: Vec<String> = extra_args.iter().map(|arg| arg.to_string()).collect();
        let mut shard = StorageShard { shard_id, replicas: Vec::new(), extra_args, client: None };
        for node_id in 1..=size {
            shard.add_process(node_id).await?;
        }
        let members = shard
            .replicas
            .iter()
            .map(|replica| raft::Node { node_id: replica.node_id, address: replica.address.clone() })
            .collect();
        shard
            .admin(1)
            .await?
            .initialize(raft::InitializeRequest { members })
            .await
            .map_err(setup_error("initialize"))?;
        shard.leader().await?;
        Ok(shard)
    }

    /// Starts a new replica process with an empty data directory (not yet a member).
    pub async fn add_process(&mut self, node_id: u64) -> Result<&Replica> {
        let dir = fresh_data_dir("wallet-auticuro-")?;
        let data_dir = dir.path().join("replica");
        let process = spawn_replica(self.shard_id, node_id, "127.0.0.1:0", &data_dir, &self.extra_args).await?;
        let address = process.address().to_string();
        self.replicas.push(Replica { node_id, address, data_dir, process: Some(process), _dir: dir });
        self.refresh_client();
        Ok(self.replicas.last().expect("just pushed"))
    }

    pub fn replica(&mut self, node_id: u64) -> &mut Replica {
        self.replicas.iter_mut().find(|replica| replica.node_id == node_id).expect("a replica of this shard")
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
        let shard_id = self.shard_id;
        let extra = self.extra_args.clone();
        let replica = self.replica(node_id);
        let process = spawn_replica(shard_id, node_id, &replica.address, &replica.data_dir, &extra).await?;
        replica.process = Some(process);
        self.refresh_client();
        Ok(())
    }

    pub fn running(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|replica| replica.process.is_some())
    }

    /// Points the shard client at the running replicas.
    fn refresh_client(&mut self) {
        let running: Vec<String> = self.running().map(|replica| replica.address.clone()).collect();
        if running.is_empty() {
            return;
        }
        match &self.client {
            Some(client) => client.set_replicas(running),
            None => self.client = Some(ShardClient::new(self.shard_id, running)),
        }
    }

    fn client(&self) -> &ShardClient {
        self.client.as_ref().expect("a started shard has a client")
    }

    /// One shared (lazily connecting) channel per address.
    pub async fn channel(&self, address: &str) -> Result<Channel> {
        self.client().channel(address).map_err(HarnessError::Setup)
    }

    fn address(&self, node_id: u64) -> &str {
        &self.replicas.iter().find(|replica| replica.node_id == node_id).expect("a replica").address
    }

    pub async fn admin(&self, node_id: u64) -> Result<RaftAdminClient<Channel>> {
        Ok(RaftAdminClient::new(self.channel(self.address(node_id)).await?))
    }

    pub async fn ledger(&self, node_id: u64) -> Result<LedgerClient<Channel>> {
        Ok(LedgerClient::new(self.channel(self.address(node_id)).await?))
    }

    /// Waits until the running replicas agree on one leader among them; returns its node id.
    pub async fn leader(&self) -> Result<u64> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let mut seen = Vec::new();
            for replica in self.running() {
                if let Ok(status) = self.status(replica.node_id).await {
                    seen.push(status.leader_node_id);
                }
            }
            let running: Vec<u64> = self.running().map(|replica| replica.node_id).collect();
            if let Some(Some(leader)) = seen.first()
                && seen.len() == running.len()
                && seen.iter().all(|candidate| *candidate == Some(*leader))
                && running.contains(leader)
            {
                return Ok(*leader);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!("no agreed leader: {seen:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(&self, node_id: u64) -> Result<raft::StatusResponse> {
        let mut admin = self.admin(node_id).await?;
        Ok(admin.status(raft::StatusRequest {}).await.map_err(setup_error("status"))?.into_inner())
    }

    pub async fn digest(&self, node_id: u64) -> Result<raft::DigestResponse> {
        let mut admin = self.admin(node_id).await?;
        Ok(admin.digest(raft::DigestRequest {}).await.map_err(setup_error("digest"))?.into_inner())
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
                return Err(HarnessError::Setup(format!("replicas did not reach seq {seq}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Executes a command on the leader, following redirects and retrying unknown outcomes
    /// (transport errors, unavailability) with the same request id until there is an answer.
    pub async fn execute(&self, command: pb::Command) -> Result<pb::CommandResult> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        self.client().execute(command, deadline).await.map_err(|unknown| HarnessError::Setup(unknown.to_string()))
    }
}
