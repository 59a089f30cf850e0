//! Stale holds: a shard never posts or voids on its own because time passed. On the leader, a
//! hold older than the staleness limit makes the shard ask its owner coordinator
//! (`Coordinator.Resolve`), which answers with its decision (deciding abort if it had none);
//! the shard then applies that decision with the same request id the coordinator itself would
//! use, so the two can never both apply it.

use std::collections::BTreeMap;
use std::time::Duration;

use consensus::{Proposer, Raft, StateMachineStore, now_ms};
use proto::marker::v1 as pb;
use proto::marker::v1::coordinator_client::CoordinatorClient;

use crate::client::channel;
use crate::ledger::{Command, Owner, TxnId};
use crate::machine::LedgerMachine;

/// How long one Resolve attempt may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Resolver {
    pub shard_id: u32,
    pub raft: Raft<LedgerMachine>,
    pub machine: StateMachineStore<LedgerMachine>,
    pub proposer: Proposer<LedgerMachine>,
    /// Every coordinator shard with its replica addresses.
    pub coordinators: BTreeMap<u32, Vec<String>>,
    pub stale_after: Duration,
}

impl Resolver {
    pub async fn run(self) {
        let mut ticks =
            tokio::time::interval((self.stale_after / 4).max(Duration::from_millis(250)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let metrics = self.raft.metrics().borrow().clone();
            if metrics.current_leader != Some(metrics.id) {
                continue;
            }
            let cutoff = now_ms()
                .saturating_sub(i64::try_from(self.stale_after.as_millis()).unwrap_or(i64::MAX));
            let stale = self
                .machine
                .read(|machine| machine.ledger().held_since(cutoff));
            for (txn_id, owner) in stale {
                if let Err(error) = self.resolve(&txn_id, owner).await {
                    tracing::warn!(%txn_id, %error, "a stale hold is not resolved yet; asking again later");
                }
            }
        }
    }

    async fn resolve(&self, txn_id: &TxnId, owner: Owner) -> Result<(), String> {
        let status = self.ask(txn_id, owner.coordinator_shard_id).await?;
        let commit = match status {
            pb::TransactionStatus::Committed => true,
            pb::TransactionStatus::Aborted => false,
            _ => return Ok(()),
        };
        self.proposer
            .propose(Command::settle(txn_id, owner, self.shard_id, commit))
            .await
            .map_err(|error| error.to_string())?;
        Ok(())
    }

    /// Asks the owner's replicas in turn, following redirects, for the decision.
    async fn ask(
        &self,
        txn_id: &TxnId,
        coordinator_shard_id: u32,
    ) -> Result<pb::TransactionStatus, String> {
        let addresses = self
            .coordinators
            .get(&coordinator_shard_id)
            .ok_or_else(|| format!("coordinator shard {coordinator_shard_id} is not configured"))?;
        let mut targets: Vec<String> = addresses.clone();
        let mut tried = 0;
        while let Some(address) = targets.get(tried).cloned() {
            tried += 1;
            let Ok(channel) = channel(&address) else {
                continue;
            };
            let mut request = tonic::Request::new(pb::ResolveRequest {
                txn_id: txn_id.to_string(),
                asking_shard_id: self.shard_id,
            });
            request.set_timeout(RESOLVE_TIMEOUT);
            match CoordinatorClient::new(channel)
                .resolve(request)
                .await
                .map(|reply| reply.into_inner().reply)
            {
                Ok(Some(pb::resolve_response::Reply::Decision(status))) => {
                    return pb::TransactionStatus::try_from(status)
                        .map_err(|error| error.to_string());
                }
                Ok(Some(pb::resolve_response::Reply::Redirect(redirect))) => {
                    if let Some(leader) = redirect.leader_address {
                        targets.insert(tried, leader);
                    }
                }
                _ => {}
            }
            if tried > addresses.len() * 2 {
                break;
            }
        }
        Err(format!(
            "no answer from coordinator shard {coordinator_shard_id}"
        ))
    }
}
