//! The coordinator as a Raft application: applies `Begin`, `Decide` and `Done` through
//! `saga::Coordinator`, persists each changed transaction and its lifecycle event.

use consensus::{App, AppView, Error, Writes, decode, encode, event_log};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

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
}

impl CoordinatorMachine {
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Watches the last applied (and persisted) lifecycle seq.
    pub fn subscribe_applied_seq(&self) -> watch::Receiver<u64> {
        self.applied_seq.subscribe()
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
        }
        response
    }

    fn persisted(&mut self) {
        self.applied_seq.send_replace(self.coordinator.last_seq());
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
        Ok(())
    }

    fn digest(&self) -> [u8; 32] {
        self.coordinator.digest()
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
