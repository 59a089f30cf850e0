//! The coordinator as a Raft application: applies `Begin`, `Decide` and `Done` through
//! `saga::Coordinator`, persists each changed transaction and its lifecycle event, counts the
//! steps, and wakes whoever waits for a transaction's next step once it is persisted.
//!
//! Memory holds the transactions in flight only: a done transaction's record is let go once
//! written, and read back from disk when a command or a reader names it again. The ids of
//! those in flight are filed apart, so a replica loads them without reading every record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use auticuro::ledger::TxnId;
use consensus::{App, AppView, Error, Writes, event_log};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};

use crate::metrics::LifecycleCounts;
use crate::saga::{
    Coordinator, CoordinatorCommand, CoordinatorResponse, CoordinatorState, Transaction,
};

/// The done transactions' records, each written once, when its transaction is done.
const TRANSACTIONS: &str = "coordinator_transactions";
/// The records of the transactions not done, rewritten at each step: what a replica loads,
/// however many done records `TRANSACTIONS` keeps. Its memtables are vectors, so the steps of
/// a transaction in flight cost appends, where the skiplist of `TRANSACTIONS` (a read family)
/// would take a random insert for each.
const IN_FLIGHT: &str = "coordinator_in_flight";

pub struct CoordinatorMachine {
    coordinator: Coordinator,
    applied_seq: watch::Sender<u64>,
    counts: LifecycleCounts,
    /// Who waits for a transaction's next lifecycle step ([`Self::next_step`]); behind a lock
    /// because waiters register through a shared reference, while `apply` has the machine to
    /// itself.
    waiting: Mutex<HashMap<TxnId, Vec<oneshot::Sender<Arc<Transaction>>>>>,
    /// Waiters whose transaction took a step in the entries being applied, with the record
    /// after the step, woken once those are persisted.
    woken: Vec<(oneshot::Sender<Arc<Transaction>>, Arc<Transaction>)>,
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

    /// The transaction's record: held while in flight, read from disk once done (`view`: the
    /// column families at the same moment, `StateMachineStore::read_stored`).
    pub fn transaction(
        &self,
        view: &AppView<'_>,
        txn_id: &TxnId,
    ) -> Result<Option<Arc<Transaction>>, Error> {
        if let Some(held) = self.coordinator.transaction(txn_id) {
            return Ok(Some(held.clone()));
        }
        let stored = view.get_decoded(TRANSACTIONS, txn_id.as_str().as_bytes(), "transaction")?;
        Ok(stored.map(Arc::new))
    }

    /// Resolves with the record after the transaction's next lifecycle step, once that step is
    /// persisted; fails when the state is replaced by a snapshot (read it again then). Only
    /// waiters of that transaction are woken, however many wait.
    pub fn next_step(&self, txn_id: &TxnId) -> oneshot::Receiver<Arc<Transaction>> {
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

    /// Files the record after a step: in flight until done, then with the done ones.
    fn write_transaction(transaction: &Transaction, writes: &mut Writes<'_>) {
        let key = transaction.txn_id.as_str().as_bytes();
        if transaction.done {
            writes.delete(IN_FLIGHT, key);
            writes.put_encoded(TRANSACTIONS, key, transaction);
        } else {
            writes.put_encoded(IN_FLIGHT, key, transaction);
        }
    }
}

impl App for CoordinatorMachine {
    type Request = CoordinatorCommand;
    type Response = CoordinatorResponse;

    const COLUMN_FAMILIES: &'static [&'static str] = &[TRANSACTIONS, IN_FLIGHT, event_log::EVENTS];

    /// Done transactions are read back when a command or a reader names them.
    const READ_FAMILIES: &'static [&'static str] = &[TRANSACTIONS];

    /// 2: a decision's and a `Done`'s lifecycle events keep only what the step set
    /// (`saga::Step`), not the whole record.
    /// 3: the transactions in flight are filed in `IN_FLIGHT`.
    /// 4: `IN_FLIGHT` keeps the records of the transactions in flight, `TRANSACTIONS` only the
    /// done ones.
    const STORAGE_FORMAT: u32 = 4;

    /// Reads the transactions in flight only.
    fn load(store: &AppView<'_>) -> Result<Self, Error> {
        let in_flight = store.decoded_rows(IN_FLIGHT, "transaction")?;
        let state = CoordinatorState {
            last_seq: event_log::last_seq(store)?,
            transactions: in_flight.into_iter().map(|(_, row)| row).collect(),
        };
        let (applied_seq, _) = watch::channel(state.last_seq);
        Ok(CoordinatorMachine {
            coordinator: Coordinator::import(state),
            applied_seq,
            counts: LifecycleCounts::default(),
            waiting: Mutex::default(),
            woken: Vec::new(),
        })
    }

    /// The stored record of a transaction the coordinator does not hold, which `apply` recalls.
    fn reads<'r>(
        &self,
        command: &'r CoordinatorCommand,
        read: &mut dyn FnMut(&'static str, &'r [u8]),
    ) {
        let txn_id = command.txn_id();
        if self.coordinator.transaction(txn_id).is_none() {
            read(TRANSACTIONS, txn_id.as_str().as_bytes());
        }
    }

    fn apply(
        &mut self,
        command: &CoordinatorCommand,
        timestamp_ms: i64,
        writes: &mut Writes<'_>,
    ) -> CoordinatorResponse {
        let txn_id = command.txn_id();
        if self.coordinator.transaction(txn_id).is_none()
            && let Some(stored) =
                writes.get_committed(TRANSACTIONS, txn_id.as_str().as_bytes(), "transaction")
        {
            self.coordinator.recall(stored);
        }
        let (response, event) = self.coordinator.apply(command, timestamp_ms);
        if let Some(event) = event {
            Self::write_transaction(&event.transaction, writes);
            event_log::append(writes, event.logged.seq, &event.logged);
            self.counts.count(&event.logged.step);
            let waiting = self.waiting.get_mut().expect("no poisoned lock");
            if let Some(senders) = waiting.remove(&event.transaction.txn_id) {
                let after = &event.transaction;
                self.woken
                    .extend(senders.into_iter().map(|sender| (sender, after.clone())));
            }
        }
        response
    }

    fn persisted(&mut self) {
        self.coordinator.forget_done();
        self.applied_seq.send_replace(self.coordinator.last_seq());
        for (sender, transaction) in self.woken.drain(..) {
            let _ = sender.send(transaction);
        }
    }

    /// Loads the coordinator from the installed rows; event subscribers keep their watch.
    fn installed(&mut self, view: &AppView<'_>) -> Result<(), Error> {
        self.coordinator = Self::load(view)?.coordinator;
        // Their transactions may have moved on: failing, they read the new state.
        self.waiting.get_mut().expect("no poisoned lock").clear();
        self.woken.clear();
        Ok(())
    }

    /// The coordinator's digest (which holds the transactions in flight between apply calls)
    /// and every record on disk.
    fn digest(&self, view: &AppView<'_>) -> Result<[u8; 32], Error> {
        let mut hasher = Sha256::new();
        hasher.update(self.coordinator.digest());
        view.hash_rows(TRANSACTIONS, |bytes| hasher.update(bytes))?;
        view.hash_rows(IN_FLIGHT, |bytes| hasher.update(bytes))?;
        Ok(hasher.finalize().into())
    }

    fn applied_seq(&self) -> u64 {
        self.coordinator.last_seq()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use auticuro::ledger::{AccountId, Amount, Currency, Leg, Metadata};
    use consensus::{Proposal, StateMachineStore, TypeConfig, open_state_machine};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use tokio::sync::oneshot::error::TryRecvError;

    use super::*;
    use crate::saga::{AbortReason, Decision, NewTransaction, plan, txn_id_for};

    /// The records of a family, in id order.
    fn records(view: &AppView<'_>, family: &str) -> Vec<Transaction> {
        let rows = view.decoded_rows(family, "transaction").unwrap();
        rows.into_iter().map(|(_, row)| row).collect()
    }

    type Machine = StateMachineStore<CoordinatorMachine>;

    fn open(dir: &tempfile::TempDir) -> Machine {
        open_state_machine(dir.path()).unwrap()
    }

    fn begin(key: &str) -> CoordinatorCommand {
        begin_moving(key, 5)
    }

    fn begin_moving(key: &str, amount: i128) -> CoordinatorCommand {
        let legs: Vec<Leg> = [("alice", -amount), ("bob", amount)]
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

    fn decide(key: &str, decision: Decision) -> CoordinatorCommand {
        CoordinatorCommand::Decide {
            txn_id: txn_id_for("tenant", key),
            decision,
        }
    }

    fn forced() -> Decision {
        Decision::Abort {
            reason: AbortReason::Forced,
            outcome: auticuro::ledger::Outcome::Ok,
            detail_account_id: None,
        }
    }

    fn done(key: &str) -> CoordinatorCommand {
        CoordinatorCommand::Done {
            txn_id: txn_id_for("tenant", key),
            shard_seqs: [(1, 3), (2, 4)].into(),
        }
    }

    /// The record as a reader sees it: held, or read from disk.
    fn read(machine: &Machine, key: &str) -> Option<Arc<Transaction>> {
        let txn_id = txn_id_for("tenant", key);
        machine
            .read_stored(|machine, view| machine.transaction(view, &txn_id))
            .unwrap()
    }

    fn held(machine: &Machine, key: &str) -> bool {
        let txn_id = txn_id_for("tenant", key);
        machine.read(|machine| machine.coordinator().transaction(&txn_id).is_some())
    }

    /// The records on disk, each in id order: the done ones and those in flight.
    fn stored(machine: &Machine) -> (Vec<Transaction>, Vec<Transaction>) {
        machine.read_stored(|_, view| (records(view, TRANSACTIONS), records(view, IN_FLIGHT)))
    }

    #[tokio::test]
    async fn done_transactions_live_on_disk_and_are_read_back_when_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
        let steps = vec![
            begin("a"),
            begin("b"),
            decide("a", Decision::Commit),
            done("a"),
        ];
        machine.apply([entry(1, steps)]).await.unwrap();
        // Once written, the done record leaves memory; readers find it on disk.
        assert!(!held(&machine, "a") && held(&machine, "b"));
        let a = read(&machine, "a").unwrap();
        assert!(a.done && a.decision == Some(Decision::Commit));
        assert_eq!(a.shard_seqs, [(1, 3), (2, 4)].into());
        assert!(read(&machine, "never").is_none());

        // Commands naming it find the record: a retry gets it back unchanged, another body is
        // a mismatch, a late abort changes nothing, and no step is taken.
        let last_seq = machine.read(|machine| machine.coordinator().last_seq());
        let retries = vec![
            begin("a"),
            begin_moving("a", 6),
            decide("a", forced()),
            done("a"),
        ];
        let answers = machine.apply([entry(2, retries)]).await.unwrap().remove(0);
        assert_eq!(answers[0], CoordinatorResponse::Transaction(a.clone()));
        assert_eq!(
            answers[1],
            CoordinatorResponse::IdempotencyMismatch {
                txn_id: a.txn_id.clone()
            }
        );
        assert_eq!(answers[2], CoordinatorResponse::Transaction(a.clone()));
        assert_eq!(answers[3], CoordinatorResponse::Transaction(a.clone()));
        assert_eq!(machine.read(|m| m.coordinator().last_seq()), last_seq);
        assert!(!held(&machine, "a"));

        // A waiter gets the record after its step, even once the step is done and let go.
        let mut waiter = machine.read(|machine| machine.next_step(&txn_id_for("tenant", "b")));
        let finish = vec![decide("b", forced()), done("b")];
        machine.apply([entry(3, finish)]).await.unwrap();
        assert_eq!(waiter.try_recv().unwrap().decision, Some(forced()));
        assert!(!held(&machine, "b") && read(&machine, "b").unwrap().done);

        // A replica that loads from disk, or installs a snapshot, has the same state and holds
        // only what is in flight.
        machine.apply([entry(4, vec![begin("c")])]).await.unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let (machine, other) = machine.reload_and_copy(dir.path(), other_dir.path()).await;
        assert!(held(&machine, "c") && !held(&machine, "a"));
        assert!(held(&other, "c") && !held(&other, "b"));
        assert_eq!(read(&other, "b"), read(&machine, "b"));
        assert_eq!(stored(&other), stored(&machine));
        let (done, in_flight) = stored(&machine);
        let ids = |records: &[Transaction]| -> Vec<String> {
            records.iter().map(|t| t.txn_id.to_string()).collect()
        };
        assert_eq!(ids(&in_flight), [txn_id_for("tenant", "c").to_string()]);
        let mut a_and_b = vec![a.txn_id.to_string(), txn_id_for("tenant", "b").to_string()];
        a_and_b.sort();
        assert_eq!(ids(&done), a_and_b);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Under any log of begin (two bodies per key), decide and done for a few transactions,
        /// in entries of a few commands each: a replica that lets done records go answers as a
        /// coordinator that holds everything, holds exactly what is in flight, stores every
        /// record (a done one with the done, the others as in flight), and reads each back as
        /// that coordinator holds it.
        #[test]
        fn a_replica_answers_as_a_coordinator_that_holds_every_transaction(
            entries in proptest::collection::vec(
                proptest::collection::vec((0usize..3, 0u8..5), 1..5),
                1..12,
            )
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut machine = open(&dir);
            let mut holding = Coordinator::default();
            let keys = ["k0", "k1", "k2"];
            for (index, steps) in entries.into_iter().enumerate() {
                let commands: Vec<CoordinatorCommand> = steps
                    .into_iter()
                    .map(|(which, action)| {
                        let key = keys[which];
                        match action {
                            0 => begin(key),
                            1 => begin_moving(key, 6),
                            2 => decide(key, Decision::Commit),
                            3 => decide(key, forced()),
                            _ => done(key),
                        }
                    })
                    .collect();
                let expected: Vec<CoordinatorResponse> = commands
                    .iter()
                    .map(|command| holding.apply(command, 100).0)
                    .collect();
                let answers = runtime
                    .block_on(machine.apply([entry(index as u64 + 1, commands)]))
                    .unwrap()
                    .remove(0);
                proptest::prop_assert_eq!(answers, expected);
                for key in keys {
                    let all = holding.transaction(&txn_id_for("tenant", key)).cloned();
                    let in_flight = all.as_ref().is_some_and(|t| !t.done);
                    proptest::prop_assert_eq!(held(&machine, key), in_flight);
                    proptest::prop_assert_eq!(read(&machine, key), all);
                }
                let (done, in_flight) = holding.export().transactions.into_iter().partition(|t| t.done);
                proptest::prop_assert_eq!(stored(&machine), (done, in_flight));
            }
            let digest = machine.digest().unwrap();
            drop(machine);
            proptest::prop_assert_eq!(open(&dir).digest().unwrap(), digest);
        }
    }

    #[tokio::test]
    async fn a_step_wakes_only_the_waiters_of_its_transaction_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
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
            let after = waiter.try_recv().unwrap();
            assert_eq!(after.decision, Some(Decision::Commit));
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
        let mut machine = open(&dir);
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
