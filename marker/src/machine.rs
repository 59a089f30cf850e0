//! The coordinator as a Raft application: applies `Begin`, `Decide` and `Done` through
//! `saga::Coordinator`, persists each changed transaction and its lifecycle event, counts the
//! steps, and wakes whoever waits for a transaction's next step once it is persisted.

use std::collections::HashMap;
use std::sync::Mutex;

use auticuro::ledger::TxnId;
use consensus::{App, AppView, Error, Writes, decode, encode, event_log};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::metrics::LifecycleCounts;
use crate::saga::{
    Coordinator, CoordinatorCommand, CoordinatorResponse, CoordinatorState, LifecycleEvent,
    Transaction,
};

const TRANSACTIONS: &str = "coordinator_transactions";

#[derive(Serialize, Deserialize)]
pub struct CoordinatorSnapshot {
    pub state: CoordinatorState,
    pub events: Vec<LifecycleEvent>,
}

impl CoordinatorSnapshot {
    /// Reads a snapshot sent by the leader (bytes from the network).
    pub fn decode(bytes: &[u8]) -> Result<CoordinatorSnapshot, Error> {
        decode("coordinator snapshot", bytes)
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

pub struct CoordinatorMachine {
    coordinator: Coordinator,
    applied_seq: watch::Sender<u64>,
    counts: LifecycleCounts,
    /// Who waits for a transaction's next lifecycle step ([`Self::next_step`]); behind a lock
    /// because waiters register through a shared reference, while `apply` has the machine to
    /// itself.
    waiting: Mutex<HashMap<TxnId, Vec<oneshot::Sender<()>>>>,
    /// Waiters whose transaction took a step in the entries being applied, woken once those
    /// are persisted.
    woken: Vec<oneshot::Sender<()>>,
}

impl CoordinatorMachine {
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Watches the last applied (and persisted) lifecycle seq.
    pub fn subscribe_applied_seq(&self) -> watch::Receiver<u64> {
        self.applied_seq.subscribe()
    }

    /// The lifecycle steps this replica has applied since it started.
    pub fn counts(&self) -> &LifecycleCounts {
        &self.counts
    }

    /// Resolves once the transaction's next lifecycle step is persisted (or the state is
    /// replaced by a snapshot). Only waiters of that transaction are woken, however many wait.
    pub fn next_step(&self, txn_id: &TxnId) -> oneshot::Receiver<()> {
        let (sender, receiver) = oneshot::channel();
        self.waiting
            .lock()
            .expect("no poisoned lock")
            .entry(txn_id.clone())
            .or_default()
            .push(sender);
        receiver
    }

    /// Forgets the transaction's waiters that stopped waiting.
    pub fn forget_abandoned(&self, txn_id: &TxnId) {
        let mut waiting = self.waiting.lock().expect("no poisoned lock");
        if let Some(senders) = waiting.get_mut(txn_id) {
            senders.retain(|sender| !sender.is_closed());
            if senders.is_empty() {
                waiting.remove(txn_id);
            }
        }
    }

    fn write_transaction(transaction: &Transaction, writes: &mut Writes<'_>) {
        writes.put_encoded(
            TRANSACTIONS,
            transaction.txn_id.as_str().as_bytes(),
            transaction,
        );
    }
}

impl App for CoordinatorMachine {
    type Request = CoordinatorCommand;
    type Response = CoordinatorResponse;

    const COLUMN_FAMILIES: &'static [&'static str] = &[TRANSACTIONS, event_log::EVENTS];

    fn load(store: &AppView<'_>) -> Result<Self, Error> {
        let state = read_state(store)?;
        let (applied_seq, _) = watch::channel(state.last_seq);
        Ok(CoordinatorMachine {
            coordinator: Coordinator::import(state),
            applied_seq,
            counts: LifecycleCounts::default(),
            waiting: Mutex::default(),
            woken: Vec::new(),
        })
    }

    fn apply(
        &mut self,
        command: &CoordinatorCommand,
        timestamp_ms: i64,
        writes: &mut Writes<'_>,
    ) -> CoordinatorResponse {
        let (response, event) = self.coordinator.apply(command, timestamp_ms);
        if let Some(event) = event {
            Self::write_transaction(&event.transaction, writes);
            event_log::append(writes, event.seq, &event);
            self.counts.count(&event);
            let waiting = self.waiting.get_mut().expect("no poisoned lock");
            if let Some(senders) = waiting.remove(&event.transaction.txn_id) {
                self.woken.extend(senders);
            }
        }
        response
    }

    fn persisted(&mut self) {
        self.applied_seq.send_replace(self.coordinator.last_seq());
        for sender in self.woken.drain(..) {
            let _ = sender.send(());
        }
    }

    fn snapshot(view: &AppView<'_>) -> Result<Vec<u8>, Error> {
        let events = event_log::read(view, 1, u64::MAX, usize::MAX)?
            .into_iter()
            .map(|(_, event)| event)
            .collect();
        Ok(CoordinatorSnapshot {
            state: read_state(view)?,
            events,
        }
        .encode())
    }

    fn install(&mut self, snapshot: &[u8], writes: &mut Writes<'_>) -> Result<(), Error> {
        let snapshot = CoordinatorSnapshot::decode(snapshot)?;
        for transaction in &snapshot.state.transactions {
            Self::write_transaction(transaction, writes);
        }
        for event in &snapshot.events {
            event_log::append(writes, event.seq, event);
        }
        self.coordinator = Coordinator::import(snapshot.state);
        let waiting = self.waiting.get_mut().expect("no poisoned lock");
        self.woken
            .extend(waiting.drain().flat_map(|(_, senders)| senders));
        Ok(())
    }

    fn digest(&self, _: &AppView<'_>) -> Result<[u8; 32], Error> {
        Ok(self.coordinator.digest())
    }

    fn applied_seq(&self) -> u64 {
        self.coordinator.last_seq()
    }
}

/// The coordinator state persisted in the column families.
fn read_state(store: &AppView<'_>) -> Result<CoordinatorState, Error> {
    let transactions = store
        .scan_from(TRANSACTIONS, &[], usize::MAX)?
        .iter()
        .map(|(_, value)| decode("transaction", value))
        .collect::<Result<_, Error>>()?;
    Ok(CoordinatorState {
        last_seq: event_log::last_seq(store)?,
        transactions,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use auticuro::ledger::{AccountId, Amount, Currency, Leg, Metadata};
    use consensus::{Proposal, RaftMetrics, TypeConfig, open_storage};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use prometheus_client::registry::Registry;
    use tokio::sync::oneshot::error::TryRecvError;

    use super::*;
    use crate::saga::{Decision, NewTransaction, plan, txn_id_for};

    fn begin(key: &str) -> CoordinatorCommand {
        let legs: Vec<Leg> = [("alice", -5), ("bob", 5)]
            .into_iter()
            .map(|(account, amount)| Leg {
                account_id: AccountId::parse(account).unwrap(),
                amount: Amount(amount),
                currency: Currency::parse("USD").unwrap(),
            })
            .collect();
        CoordinatorCommand::Begin(Box::new(NewTransaction {
            txn_id: txn_id_for("tenant", key),
            tenant_id: "tenant".into(),
            idempotency_key: key.into(),
            plan: plan(&legs, |account| u32::from(account.as_str() == "bob") + 1),
            legs,
            metadata: Metadata::default(),
            hold_id: None,
            reserve_timeout_ms: 1_000,
        }))
    }

    fn entry(
        index: u64,
        commands: Vec<CoordinatorCommand>,
    ) -> Entry<TypeConfig<CoordinatorMachine>> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                timestamp_ms: 100,
                requests: Arc::from(commands),
            }),
        }
    }

    #[tokio::test]
    async fn a_step_wakes_only_the_waiters_of_its_transaction_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = RaftMetrics::register(&mut Registry::default());
        let (_, mut machine) = open_storage::<CoordinatorMachine>(dir.path(), 1, &metrics).unwrap();
        machine
            .apply([entry(1, vec![begin("a"), begin("b")])])
            .await
            .unwrap();
        let (a, b) = (txn_id_for("tenant", "a"), txn_id_for("tenant", "b"));
        let mut a_waiters = [
            machine.read(|machine| machine.next_step(&a)),
            machine.read(|machine| machine.next_step(&a)),
        ];
        let mut b_waiter = machine.read(|machine| machine.next_step(&b));

        let decide = CoordinatorCommand::Decide {
            txn_id: a.clone(),
            decision: Decision::Commit,
        };
        machine
            .apply([entry(2, vec![decide.clone()])])
            .await
            .unwrap();
        for waiter in &mut a_waiters {
            assert_eq!(waiter.try_recv(), Ok(()));
        }
        assert_eq!(b_waiter.try_recv(), Err(TryRecvError::Empty));

        // A command that changes nothing is no step: it wakes no one and counts nothing.
        let mut a_again = machine.read(|machine| machine.next_step(&a));
        machine.apply([entry(3, vec![decide])]).await.unwrap();
        assert_eq!(a_again.try_recv(), Err(TryRecvError::Empty));

        let counts = machine.read(|machine| machine.counts().clone());
        assert_eq!(counts.submitted.get(), 2);
        let committed = vec![("decision", "commit"), ("reason", "")];
        assert_eq!(counts.decided.get_or_create(&committed).get(), 1);
    }

    #[tokio::test]
    async fn waiters_that_stopped_waiting_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = RaftMetrics::register(&mut Registry::default());
        let (_, mut machine) = open_storage::<CoordinatorMachine>(dir.path(), 1, &metrics).unwrap();
        machine.apply([entry(1, vec![begin("a")])]).await.unwrap();
        let a = txn_id_for("tenant", "a");
        let abandoned = machine.read(|machine| machine.next_step(&a));
        let mut waiting = machine.read(|machine| machine.next_step(&a));
        drop(abandoned);
        machine.read(|machine| machine.forget_abandoned(&a));
        let kept = machine.read(|machine| machine.waiting.lock().unwrap()[&a].len());
        assert_eq!(kept, 1);
        assert_eq!(waiting.try_recv(), Err(TryRecvError::Empty));
    }
}
