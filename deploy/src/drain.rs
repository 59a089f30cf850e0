//! `walletctl coordinator drain`: takes a coordinator shard out of service without failing a
//! payment. The shard stops taking new transactions (gateways send them to the active shards),
//! finishes the ones it has, and once nothing of it is held on any storage shard it marks
//! itself removed in the topology; storage shards then fence its epoch.

use std::io::Write as _;
use std::time::{Duration, Instant};

use ::marker::topology::{CoordinatorState, TopologyClient};
use auticuro::client::channel;
use proto::marker::v1 as marker;
use proto::marker::v1::coordinator_admin_client::CoordinatorAdminClient;

use crate::{Error, Result};

/// The longest the command waits for the shard's transactions to finish.
const DRAIN_WAIT: Duration = Duration::from_secs(300);

pub async fn drain(topology_replicas: &[String], coordinator_shard_id: u32) -> Result<()> {
    let client = TopologyClient::new(topology_replicas.to_vec());
    let topology = client.get().await.map_err(Error::Setup)?;
    let entry = topology
        .coordinators
        .get(&coordinator_shard_id)
        .ok_or_else(|| Error::Setup(format!("no coordinator shard {coordinator_shard_id}")))?;
    let others_active = topology
        .coordinators
        .iter()
        .any(|(id, e)| *id != coordinator_shard_id && e.state == CoordinatorState::Active);
    if !others_active {
        return Err(Error::Setup(
            "no other active coordinator shard would take new transactions".into(),
        ));
    }
    let mut asked = false;
    for address in &entry.replicas {
        let Ok(channel) = channel(address) else {
            continue;
        };
        if CoordinatorAdminClient::new(channel)
            .drain(marker::DrainRequest {})
            .await
            .is_ok()
        {
            asked = true;
            break;
        }
    }
    if !asked {
        return Err(Error::Setup(format!(
            "no replica of coordinator shard {coordinator_shard_id} answered"
        )));
    }
    let started = Instant::now();
    loop {
        let state = client
            .get()
            .await
            .map_err(Error::Setup)?
            .coordinators
            .get(&coordinator_shard_id)
            .map(|entry| entry.state);
        if state == Some(CoordinatorState::Removed) {
            eprintln!();
            return Ok(());
        }
        let in_flight = ::marker::status::in_flight(&entry.replicas).await;
        eprint!(
            "\rdraining coordinator shard {coordinator_shard_id}: {} in flight   ",
            in_flight.map_or_else(|| "?".to_string(), |n| n.to_string())
        );
        let _ = std::io::stderr().flush();
        if started.elapsed() > DRAIN_WAIT {
            return Err(Error::Setup(format!(
                "coordinator shard {coordinator_shard_id} is still draining"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
