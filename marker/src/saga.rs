//! The pure core of a coordinator shard: the replicated record of every transaction it runs
//! and the three log commands that move it: `Begin`, `Decide` and `Done`.
//!
//! No I/O, no clock, no randomness. The decision is written once and never changes: a second
//! `Decide` returns the first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use auticuro::ledger::map::PartitionedMap;
use auticuro::ledger::{AccountId, Leg, Metadata, Outcome, TxnId, state};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The legs a transaction has on one storage shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLegs {
    pub shard_id: u32,
    pub legs: Vec<Leg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// A storage shard rejected a leg (the outcome says why).
    Rejected,
    /// Not every leg was held before `decide_by`.
    Deadline,
    /// An operator aborted it before a decision.
    Forced,
    /// A storage shard asked about a stale hold before any decision.
    ResolvedStale,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Commit,
    Abort {
        reason: AbortReason,
        outcome: Outcome,
        detail_account_id: Option<AccountId>,
    },
}

/// What a client submits; becomes a `Transaction` once begun.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTransaction {
    pub txn_id: TxnId,
    pub tenant_id: String,
    pub idempotency_key: String,
    pub legs: Vec<Leg>,
    pub metadata: Metadata,
    /// The hold the one debit leg captures, when it captures one.
    pub hold_id: Option<TxnId>,
    /// Storage shards in the order reservations go: shards with debit legs first.
    pub plan: Vec<ShardLegs>,
    /// How long reservations may take, from the leader time of `Begin`.
    pub reserve_timeout_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub txn_id: TxnId,
    pub tenant_id: String,
    pub idempotency_key: String,
    pub fingerprint: [u8; 32],
    pub legs: Vec<Leg>,
    pub metadata: Metadata,
    pub hold_id: Option<TxnId>,
    pub plan: Vec<ShardLegs>,
    pub begun_at_ms: i64,
    pub decide_by_ms: i64,
    pub decision: Option<Decision>,
    pub decided_at_ms: Option<i64>,
    /// Every shard has posted (or voided) its legs.
    pub done: bool,
    /// The event seq each storage shard gave the transaction's final command there.
    pub shard_seqs: BTreeMap<u32, u64>,
}

impl Transaction {
    pub fn is_single_shard(&self) -> bool {
        self.plan.len() == 1
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorCommand {
    Begin(Box<NewTransaction>),
    Decide {
        txn_id: TxnId,
        decision: Decision,
    },
    Done {
        txn_id: TxnId,
        shard_seqs: BTreeMap<u32, u64>,
    },
}

impl CoordinatorCommand {
    /// The transaction the command moves.
    pub fn txn_id(&self) -> &TxnId {
        match self {
            CoordinatorCommand::Begin(new) => &new.txn_id,
            CoordinatorCommand::Decide { txn_id, .. } | CoordinatorCommand::Done { txn_id, .. } => {
                txn_id
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinatorResponse {
    /// The record as it stands after the command (shared with the coordinator's map).
    Transaction(Arc<Transaction>),
    /// The idempotency key was used with another body.
    IdempotencyMismatch {
        txn_id: TxnId,
    },
    NotFound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LifecycleKind {
    Begun,
    Decided,
    Done,
}

/// One step of a transaction's life, as the core returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// What the event log keeps of the step.
    pub logged: LoggedEvent,
    /// The record after the step (shared with the coordinator's map).
    pub transaction: Arc<Transaction>,
}

/// A lifecycle step as the coordinator's event log keeps it, consecutive seq per coordinator
/// shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEvent {
    pub seq: u64,
    pub timestamp_ms: i64,
    pub step: Step,
}

/// What a step set: the whole record once begun, then only the decision and the shards' seqs,
/// so each transaction is written out in full once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Shared with the coordinator's map (encoded as the record itself).
    Begun(Arc<Transaction>),
    Decided {
        txn_id: TxnId,
        decision: Decision,
    },
    Done {
        txn_id: TxnId,
        decision: Decision,
        shard_seqs: BTreeMap<u32, u64>,
    },
}

impl Step {
    pub fn kind(&self) -> LifecycleKind {
        match self {
            Step::Begun(_) => LifecycleKind::Begun,
            Step::Decided { .. } => LifecycleKind::Decided,
            Step::Done { .. } => LifecycleKind::Done,
        }
    }

    pub fn txn_id(&self) -> &TxnId {
        match self {
            Step::Begun(transaction) => &transaction.txn_id,
            Step::Decided { txn_id, .. } | Step::Done { txn_id, .. } => txn_id,
        }
    }
}

/// The transaction id of a client's idempotency key: the same key always names the same
/// transaction, on any coordinator shard, before and after any topology change.
pub fn txn_id_for(tenant_id: &str, idempotency_key: &str) -> TxnId {
    let mut hasher = Sha256::new();
    hasher.update(tenant_id.as_bytes());
    hasher.update([0]);
    hasher.update(idempotency_key.as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest[..20]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    TxnId::parse(&format!("t:{hex}")).expect("a hex id is a valid transaction id")
}

/// What the idempotency check compares: the body of the request.
pub fn fingerprint(legs: &[Leg], metadata: &Metadata, hold_id: Option<&TxnId>) -> [u8; 32] {
    state::fingerprint(&(legs, metadata, hold_id))
}

/// Groups legs by storage shard, shards holding a debit first (their reservations can fail for
/// lack of funds, so they go before any credit is reserved), each group in leg order.
pub fn plan(legs: &[Leg], shard_of: impl Fn(&AccountId) -> u32) -> Vec<ShardLegs> {
    let mut groups: Vec<ShardLegs> = Vec::new();
    for leg in legs {
        let shard_id = shard_of(&leg.account_id);
        match groups.iter_mut().find(|group| group.shard_id == shard_id) {
            Some(group) => group.legs.push(leg.clone()),
            None => groups.push(ShardLegs {
                shard_id,
                legs: vec![leg.clone()],
            }),
        }
    }
    let has_debit = |group: &ShardLegs| group.legs.iter().any(|leg| leg.amount.0 < 0);
    groups.sort_by_key(|group| !has_debit(group));
    groups
}

#[derive(Debug, Default)]
pub struct Coordinator {
    /// Shared, so readers (the driver at every step, the service) take a reference count,
    /// not a copy.
    transactions: PartitionedMap<TxnId, Arc<Transaction>>,
    /// Not done yet, by begin time: what a new leader re-drives.
    in_flight: BTreeSet<(i64, TxnId)>,
    /// The done transactions held, which [`Coordinator::forget_done`] lets go.
    done_held: Vec<TxnId>,
    last_seq: u64,
}

/// The canonical (sorted) state, for snapshots and digests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorState {
    pub last_seq: u64,
    pub transactions: Vec<Transaction>,
}

impl Coordinator {
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The transaction's record, if held: every transaction is, unless it is done and
    /// [`Coordinator::forget_done`] let it go.
    pub fn transaction(&self, txn_id: &TxnId) -> Option<&Arc<Transaction>> {
        self.transactions.get(txn_id)
    }

    /// Lets go of every done transaction held, for a caller that keeps the records elsewhere
    /// (the replica, on disk) and hands one back ([`Coordinator::recall`]) before a command
    /// names it. Without that, nothing is ever forgotten.
    pub fn forget_done(&mut self) {
        for txn_id in self.done_held.drain(..) {
            self.transactions.remove(&txn_id);
        }
    }

    /// Holds a transaction's record again (one that [`Coordinator::forget_done`] let go).
    pub fn recall(&mut self, transaction: Transaction) {
        self.hold(Arc::new(transaction));
    }

    fn hold(&mut self, transaction: Arc<Transaction>) {
        let txn_id = transaction.txn_id.clone();
        if transaction.done {
            self.done_held.push(txn_id.clone());
        } else {
            self.in_flight
                .insert((transaction.begun_at_ms, txn_id.clone()));
        }
        self.transactions.insert(txn_id, transaction);
    }

    /// Transactions not done yet, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &Transaction> {
        self.in_flight
            .iter()
            .map(|(_, txn_id)| self.transactions[txn_id].as_ref())
    }

    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    pub fn apply(
        &mut self,
        command: &CoordinatorCommand,
        timestamp_ms: i64,
    ) -> (CoordinatorResponse, Option<LifecycleEvent>) {
        match command {
            CoordinatorCommand::Begin(new) => self.begin(new, timestamp_ms),
            CoordinatorCommand::Decide { txn_id, decision } => {
                self.decide(txn_id, decision, timestamp_ms)
            }
            CoordinatorCommand::Done { txn_id, shard_seqs } => {
                self.done(txn_id, shard_seqs, timestamp_ms)
            }
        }
    }

    fn begin(
        &mut self,
        new: &NewTransaction,
        timestamp_ms: i64,
    ) -> (CoordinatorResponse, Option<LifecycleEvent>) {
        let fingerprint = fingerprint(&new.legs, &new.metadata, new.hold_id.as_ref());
        if let Some(existing) = self.transactions.get(&new.txn_id) {
            if existing.fingerprint != fingerprint {
                return (
                    CoordinatorResponse::IdempotencyMismatch {
                        txn_id: new.txn_id.clone(),
                    },
                    None,
                );
            }
            return unchanged(existing);
        }
        let transaction = Arc::new(Transaction {
            txn_id: new.txn_id.clone(),
            tenant_id: new.tenant_id.clone(),
            idempotency_key: new.idempotency_key.clone(),
            fingerprint,
            legs: new.legs.clone(),
            metadata: new.metadata.clone(),
            hold_id: new.hold_id.clone(),
            plan: new.plan.clone(),
            begun_at_ms: timestamp_ms,
            decide_by_ms: timestamp_ms.saturating_add(new.reserve_timeout_ms),
            decision: None,
            decided_at_ms: None,
            done: false,
            shard_seqs: BTreeMap::new(),
        });
        self.record(transaction.clone(), Step::Begun(transaction), timestamp_ms)
    }

    fn decide(
        &mut self,
        txn_id: &TxnId,
        decision: &Decision,
        timestamp_ms: i64,
    ) -> (CoordinatorResponse, Option<LifecycleEvent>) {
        let Some(existing) = self.transactions.get(txn_id) else {
            return (CoordinatorResponse::NotFound, None);
        };
        // A single-shard transaction is its one batch, and only the batch's answer decides it:
        // an abort from outside (an operator, a stale-hold question) cannot stop a batch that
        // may already be applied.
        let from_batch = matches!(
            decision,
            Decision::Commit
                | Decision::Abort {
                    reason: AbortReason::Rejected,
                    ..
                }
        );
        if existing.decision.is_some() || (existing.is_single_shard() && !from_batch) {
            return unchanged(existing);
        }
        let mut transaction = Transaction::clone(existing);
        transaction.decision = Some(decision.clone());
        transaction.decided_at_ms = Some(timestamp_ms);
        let step = Step::Decided {
            txn_id: txn_id.clone(),
            decision: decision.clone(),
        };
        self.record(Arc::new(transaction), step, timestamp_ms)
    }

    fn done(
        &mut self,
        txn_id: &TxnId,
        shard_seqs: &BTreeMap<u32, u64>,
        timestamp_ms: i64,
    ) -> (CoordinatorResponse, Option<LifecycleEvent>) {
        let Some(existing) = self.transactions.get(txn_id) else {
            return (CoordinatorResponse::NotFound, None);
        };
        // Only a decided transaction can be done, and only once.
        let (Some(decision), false) = (&existing.decision, existing.done) else {
            return unchanged(existing);
        };
        let step = Step::Done {
            txn_id: txn_id.clone(),
            decision: decision.clone(),
            shard_seqs: shard_seqs.clone(),
        };
        let mut transaction = Transaction::clone(existing);
        transaction.done = true;
        transaction.shard_seqs = shard_seqs.clone();
        self.in_flight
            .remove(&(transaction.begun_at_ms, transaction.txn_id.clone()));
        self.record(Arc::new(transaction), step, timestamp_ms)
    }

    fn record(
        &mut self,
        transaction: Arc<Transaction>,
        step: Step,
        timestamp_ms: i64,
    ) -> (CoordinatorResponse, Option<LifecycleEvent>) {
        self.last_seq += 1;
        self.hold(transaction.clone());
        let event = LifecycleEvent {
            logged: LoggedEvent {
                seq: self.last_seq,
                timestamp_ms,
                step,
            },
            transaction: transaction.clone(),
        };
        (CoordinatorResponse::Transaction(transaction), Some(event))
    }

    pub fn export(&self) -> CoordinatorState {
        let mut transactions: Vec<Transaction> = self
            .transactions
            .values()
            .map(|transaction| Transaction::clone(transaction))
            .collect();
        transactions.sort_by(|a, b| a.txn_id.cmp(&b.txn_id));
        CoordinatorState {
            last_seq: self.last_seq,
            transactions,
        }
    }

    pub fn import(state: CoordinatorState) -> Coordinator {
        let mut coordinator = Coordinator {
            last_seq: state.last_seq,
            ..Coordinator::default()
        };
        for transaction in state.transactions {
            coordinator.recall(transaction);
        }
        coordinator
    }

    pub fn digest(&self) -> [u8; 32] {
        state::fingerprint(&self.export())
    }
}

/// The answer to a command that changes nothing: the transaction as it stands, and no event.
fn unchanged(existing: &Arc<Transaction>) -> (CoordinatorResponse, Option<LifecycleEvent>) {
    (CoordinatorResponse::Transaction(existing.clone()), None)
}

#[cfg(test)]
mod tests {
    use auticuro::ledger::{Amount, Currency};

    use super::*;

    fn leg(account: &str, amount: i128) -> Leg {
        Leg {
            account_id: AccountId::parse(account).unwrap(),
            amount: Amount(amount),
            currency: Currency::parse("USD").unwrap(),
        }
    }

    fn new_transaction(key: &str, legs: Vec<Leg>) -> NewTransaction {
        let plan = plan(&legs, |account| {
            if account.as_str().starts_with('a') {
                1
            } else {
                2
            }
        });
        NewTransaction {
            txn_id: txn_id_for("tenant", key),
            tenant_id: "tenant".into(),
            idempotency_key: key.into(),
            legs,
            metadata: Metadata::default(),
            hold_id: None,
            plan,
            reserve_timeout_ms: 1_000,
        }
    }

    fn begin(coordinator: &mut Coordinator, new: &NewTransaction, at: i64) -> CoordinatorResponse {
        coordinator
            .apply(&CoordinatorCommand::Begin(Box::new(new.clone())), at)
            .0
    }

    #[test]
    fn the_same_key_names_the_same_transaction_and_other_tenants_do_not_collide() {
        assert_eq!(txn_id_for("t1", "k"), txn_id_for("t1", "k"));
        assert_ne!(txn_id_for("t1", "k"), txn_id_for("t2", "k"));
        assert_ne!(txn_id_for("t1", "k1"), txn_id_for("t1", "k"));
    }

    #[test]
    fn plans_reserve_debit_shards_first() {
        let legs = vec![leg("bob", 10), leg("alice", -10)];
        let plan = plan(
            &legs,
            |account| if account.as_str() == "alice" { 7 } else { 3 },
        );
        assert_eq!(
            plan.iter().map(|group| group.shard_id).collect::<Vec<_>>(),
            vec![7, 3]
        );
    }

    #[test]
    fn begin_is_idempotent_and_refuses_another_body_under_the_same_key() {
        let mut coordinator = Coordinator::default();
        let new = new_transaction("k", vec![leg("alice", -5), leg("bob", 5)]);
        let CoordinatorResponse::Transaction(first) = begin(&mut coordinator, &new, 100) else {
            panic!()
        };
        assert_eq!(first.decide_by_ms, 1_100);
        let (again, event) =
            coordinator.apply(&CoordinatorCommand::Begin(Box::new(new.clone())), 200);
        assert_eq!(again, CoordinatorResponse::Transaction(first.clone()));
        assert!(
            event.is_none(),
            "a repeated begin is not a new lifecycle step"
        );
        let other_body = new_transaction("k", vec![leg("alice", -6), leg("bob", 6)]);
        assert_eq!(
            begin(&mut coordinator, &other_body, 300),
            CoordinatorResponse::IdempotencyMismatch {
                txn_id: new.txn_id.clone()
            }
        );
        assert_eq!(coordinator.in_flight_count(), 1);
    }

    #[test]
    fn the_first_decision_is_final() {
        let mut coordinator = Coordinator::default();
        let new = new_transaction("k", vec![leg("alice", -5), leg("bob", 5)]);
        begin(&mut coordinator, &new, 100);
        let commit = CoordinatorCommand::Decide {
            txn_id: new.txn_id.clone(),
            decision: Decision::Commit,
        };
        let (_, event) = coordinator.apply(&commit, 150);
        assert_eq!(event.unwrap().logged.step.kind(), LifecycleKind::Decided);
        let abort = Decision::Abort {
            reason: AbortReason::Forced,
            outcome: Outcome::Ok,
            detail_account_id: None,
        };
        let (response, event) = coordinator.apply(
            &CoordinatorCommand::Decide {
                txn_id: new.txn_id.clone(),
                decision: abort,
            },
            160,
        );
        assert!(event.is_none());
        let CoordinatorResponse::Transaction(transaction) = response else {
            panic!()
        };
        assert_eq!(transaction.decision, Some(Decision::Commit));
        assert_eq!(transaction.decided_at_ms, Some(150));
    }

    /// Found by the simulator (seed 1): a force-abort written while a single-shard batch was
    /// on its way let the batch move money under an abort decision.
    #[test]
    fn only_its_batch_decides_a_single_shard_transaction() {
        let mut coordinator = Coordinator::default();
        let new = new_transaction("single", vec![leg("alice", -5), leg("anna", 5)]);
        assert_eq!(new.plan.len(), 1);
        begin(&mut coordinator, &new, 100);
        let decide = |reason| CoordinatorCommand::Decide {
            txn_id: new.txn_id.clone(),
            decision: Decision::Abort {
                reason,
                outcome: Outcome::InsufficientFunds,
                detail_account_id: None,
            },
        };
        for reason in [
            AbortReason::Forced,
            AbortReason::ResolvedStale,
            AbortReason::Deadline,
        ] {
            let (response, event) = coordinator.apply(&decide(reason), 150);
            assert!(event.is_none(), "{reason:?}");
            let CoordinatorResponse::Transaction(transaction) = response else {
                panic!()
            };
            assert_eq!(transaction.decision, None, "{reason:?}");
        }
        let (_, event) = coordinator.apply(&decide(AbortReason::Rejected), 160);
        assert_eq!(event.unwrap().logged.step.kind(), LifecycleKind::Decided);
    }

    #[test]
    fn only_decided_transactions_become_done_and_leave_the_in_flight_set() {
        let mut coordinator = Coordinator::default();
        let new = new_transaction("k", vec![leg("alice", -5), leg("bob", 5)]);
        begin(&mut coordinator, &new, 100);
        let done = CoordinatorCommand::Done {
            txn_id: new.txn_id.clone(),
            shard_seqs: BTreeMap::from([(1, 9)]),
        };
        assert!(
            coordinator.apply(&done, 120).1.is_none(),
            "undecided transactions are not done"
        );
        coordinator.apply(
            &CoordinatorCommand::Decide {
                txn_id: new.txn_id.clone(),
                decision: Decision::Commit,
            },
            130,
        );
        let (_, event) = coordinator.apply(&done, 140);
        assert_eq!(event.unwrap().logged.step.kind(), LifecycleKind::Done);
        assert_eq!(coordinator.in_flight_count(), 0);
        assert_eq!(
            coordinator.transaction(&new.txn_id).unwrap().shard_seqs,
            BTreeMap::from([(1, 9)])
        );
        assert_eq!(coordinator.last_seq(), 3);
    }

    #[test]
    fn in_flight_transactions_survive_export_and_import_oldest_first() {
        let mut coordinator = Coordinator::default();
        let later = new_transaction("later", vec![leg("alice", -1), leg("bob", 1)]);
        let earlier = new_transaction("earlier", vec![leg("alice", -2), leg("bob", 2)]);
        begin(&mut coordinator, &later, 200);
        begin(&mut coordinator, &earlier, 100);
        let restored = Coordinator::import(coordinator.export());
        let order: Vec<_> = restored
            .in_flight()
            .map(|t| t.idempotency_key.clone())
            .collect();
        assert_eq!(order, vec!["earlier", "later"]);
        assert_eq!(restored.digest(), coordinator.digest());
    }

    #[test]
    fn unknown_transactions_cannot_be_decided_or_done() {
        let mut coordinator = Coordinator::default();
        let txn_id = txn_id_for("tenant", "nothing");
        let decide = CoordinatorCommand::Decide {
            txn_id: txn_id.clone(),
            decision: Decision::Commit,
        };
        assert_eq!(
            coordinator.apply(&decide, 1),
            (CoordinatorResponse::NotFound, None)
        );
        let done = CoordinatorCommand::Done {
            txn_id,
            shard_seqs: BTreeMap::new(),
        };
        assert_eq!(
            coordinator.apply(&done, 2),
            (CoordinatorResponse::NotFound, None)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Under any order of begin, decide and done messages for a few transactions, repeated
        /// at will: a decision never changes once made, done comes only after a decision and
        /// stays, the in-flight set is exactly the begun-not-done ones, and seqs are consecutive.
        #[test]
        fn decisions_are_final_and_the_in_flight_set_is_exact(
            steps in proptest::collection::vec((0usize..3, 0u8..4), 1..60)
        ) {
            let mut coordinator = Coordinator::default();
            let keys = ["k0", "k1", "k2"];
            let mut decided: BTreeMap<String, Decision> = BTreeMap::new();
            let mut done: BTreeSet<String> = BTreeSet::new();
            let mut last_seq = 0;
            for (at, (which, action)) in steps.into_iter().enumerate() {
                let new = new_transaction(keys[which], vec![leg("alice", -1), leg("bob", 1)]);
                let txn_id = new.txn_id.clone();
                let command = match action {
                    0 => CoordinatorCommand::Begin(Box::new(new)),
                    1 => CoordinatorCommand::Decide { txn_id, decision: Decision::Commit },
                    2 => CoordinatorCommand::Decide {
                        txn_id,
                        decision: Decision::Abort { reason: AbortReason::Forced, outcome: Outcome::Ok, detail_account_id: None },
                    },
                    _ => CoordinatorCommand::Done { txn_id, shard_seqs: BTreeMap::from([(1, at as u64)]) },
                };
                let (_, event) = coordinator.apply(&command, at as i64);
                if let Some(event) = event {
                    last_seq += 1;
                    proptest::prop_assert_eq!(event.logged.seq, last_seq);
                    // The logged step says exactly what the step set in the record.
                    let after = &event.transaction;
                    proptest::prop_assert_eq!(event.logged.step.txn_id(), &after.txn_id);
                    match &event.logged.step {
                        Step::Begun(whole) => proptest::prop_assert_eq!(whole, after),
                        Step::Decided { decision, .. } => {
                            proptest::prop_assert_eq!(Some(decision), after.decision.as_ref());
                            proptest::prop_assert_eq!(after.decided_at_ms, Some(at as i64));
                            proptest::prop_assert!(!after.done);
                        }
                        Step::Done { decision, shard_seqs, .. } => {
                            proptest::prop_assert_eq!(Some(decision), after.decision.as_ref());
                            proptest::prop_assert_eq!(shard_seqs, &after.shard_seqs);
                            proptest::prop_assert!(after.done);
                        }
                    }
                }
                for key in keys {
                    let Some(transaction) = coordinator.transaction(&txn_id_for("tenant", key)) else { continue };
                    if let Some(earlier) = decided.get(key) {
                        proptest::prop_assert_eq!(Some(earlier), transaction.decision.as_ref());
                    }
                    if let Some(decision) = &transaction.decision {
                        decided.insert(key.to_string(), decision.clone());
                    }
                    if done.contains(key) {
                        proptest::prop_assert!(transaction.done);
                    }
                    if transaction.done {
                        proptest::prop_assert!(transaction.decision.is_some());
                        done.insert(key.to_string());
                    }
                }
                let begun = keys.iter().filter(|key| coordinator.transaction(&txn_id_for("tenant", key)).is_some()).count();
                proptest::prop_assert_eq!(coordinator.in_flight_count(), begun - done.len());
                proptest::prop_assert_eq!(coordinator.last_seq(), last_seq);
            }
        }
    }
}
