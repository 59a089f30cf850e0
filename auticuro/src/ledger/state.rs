//! The ledger state machine: `(state, command, leader timestamp) → (state', outcome, event?)`.
//!
//! Pure and deterministic: no I/O, no clock, no randomness, and no iteration over hash maps
//! whose order could leak into an outcome, an event or a digest.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::account::{Account, AccountState, within_limits};
use super::command::{Command, CommandKind, Leg, Limits};
use super::map::PartitionedMap;
use super::outcome::{Outcome, Rejection};
use super::types::{AccountId, Amount, Currency, Metadata, Owner, RequestId, SCALE_MAX, TxnId};

/// The most legs one batch or one reservation may carry.
pub const BATCH_LEGS_MAX: usize = 64;
/// The largest magnitude of any amount or limit, in minor units (10^30). Far above any real
/// balance, and small enough that sums of many of them never overflow `i128`.
pub const AMOUNT_ABS_MAX: i128 = 1_000_000_000_000_000_000_000_000_000_000;

/// The state of one transaction's legs on this shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LegState {
    Held,
    Posted,
    Voided,
    /// Voided before any reserve arrived: a late reserve of this transaction is rejected.
    Tombstone,
}

/// A two-phase transaction as this shard knows it: its legs here, their state and its owner.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TxnRecord {
    pub owner: Owner,
    pub state: LegState,
    pub legs: Vec<Leg>,
    /// The hold its one debit leg draws from, when it captures one.
    pub hold_id: Option<TxnId>,
    /// Leader time of the reserve (or of the tombstone).
    pub at_ms: i64,
    /// The seq of the event that settled it (posted, voided, tombstoned), 0 while held: the
    /// answer to a resend of that post or void.
    pub settled_seq: u64,
    /// The reserve that held it (none for a tombstone): its idempotency record, kept here
    /// instead of among the others.
    pub reserved_by: Option<Reserved>,
}

/// What a two-phase record keeps of the reserve that held it, to answer a resend of that
/// request as its idempotency record would ([`Ledger::apply`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Reserved {
    pub request_id: RequestId,
    pub fingerprint: [u8; 32],
    pub seq: u64,
}

/// Where a hold stands. `Captured` and `Voided` are final.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HoldState {
    Open,
    /// A transaction's reservation draws from it; its post captures, its void reopens.
    Capturing(TxnId),
    Captured {
        txn_id: TxnId,
        amount: Amount,
    },
    Voided,
}

/// An authorization on one account: `amount` sits in the account's `pending_out` while the
/// hold is open or being captured.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HoldRecord {
    pub account_id: AccountId,
    pub currency: Currency,
    pub amount: Amount,
    pub state: HoldState,
    /// Leader time of the authorization.
    pub at_ms: i64,
}

impl HoldRecord {
    /// Whether its amount is still in the account's `pending_out`.
    pub fn is_pending(&self) -> bool {
        matches!(self.state, HoldState::Open | HoldState::Capturing(_))
    }
}

/// What the shard remembers of a request id: the payload's fingerprint and the outcome.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DedupRecord {
    pub fingerprint: [u8; 32],
    pub outcome: Outcome,
    pub detail_account_id: Option<AccountId>,
    /// The event seq when accepted, 0 when rejected.
    pub seq: u64,
    pub at_ms: i64,
}

/// The event of an accepted command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub timestamp_ms: i64,
    pub command: Command,
    /// Every touched account, after the command, in the order the command names them.
    pub accounts: Vec<Account>,
}

/// Everything one command changed, for the storage adapter to persist.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub transactions: Vec<(TxnId, TxnRecord)>,
    pub holds: Vec<(TxnId, HoldRecord)>,
    pub dedup_inserted: Option<(RequestId, DedupRecord)>,
    /// What a prune forgot, each list sorted.
    pub pruned: Pruned,
}

/// The records one `PruneDedup` forgets: idempotency records stamped before its cutoff, and
/// settled two-phase legs reserved before it. (Authorization holds stay: clients read them.)
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// The idempotency records the ledger held, by stamp (`at_ms`), oldest first. A storage
    /// adapter that evicted some ([`Ledger::forget_dedup`]) forgets those itself.
    pub dedup: Vec<(i64, RequestId)>,
    /// The settled two-phase records the ledger held, by reserve time, oldest first. A storage
    /// adapter that evicted some ([`Ledger::forget_settled`]) forgets those itself.
    pub transactions: Vec<(i64, TxnId)>,
}

/// The result of `Ledger::apply`.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    /// The stored outcome of an earlier command with the same request id and payload.
    pub duplicate: bool,
    pub seq: u64,
    pub detail_account_id: Option<AccountId>,
    /// Present exactly when a new command was accepted.
    pub event: Option<Event>,
    pub changes: Changes,
}

/// What an accepted command did, before it gets its seq.
#[derive(Default)]
struct Effect {
    accounts: Vec<Account>,
    transactions: Vec<(TxnId, TxnRecord)>,
    holds: Vec<(TxnId, HoldRecord)>,
    pruned: Pruned,
}

impl Effect {
    fn accounts(accounts: Vec<Account>) -> Effect {
        Effect {
            accounts,
            ..Effect::default()
        }
    }
}

/// The whole replicated state of one storage shard, in a canonical (sorted) form: what snapshots
/// carry and what the digest covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    pub last_seq: u64,
    pub accounts: Vec<Account>,
    pub transactions: Vec<(TxnId, TxnRecord)>,
    pub holds: Vec<(TxnId, HoldRecord)>,
    pub dedup: Vec<(RequestId, DedupRecord)>,
    pub fences: Vec<(u32, u64)>,
}

#[derive(Debug, Default)]
pub struct Ledger {
    accounts: PartitionedMap<AccountId, Account>,
    /// Two-phase records: every one, unless a storage adapter keeps them on disk, evicts the
    /// settled ones ([`Ledger::forget_settled`]) and hands one back before a command that names
    /// its transaction ([`Ledger::recall_transaction`]).
    transactions: PartitionedMap<TxnId, TxnRecord>,
    /// Authorization holds: every one, unless a storage adapter keeps them on disk, evicts the
    /// settled ones ([`Ledger::forget_settled`]) and hands one back before a command that names
    /// it ([`Ledger::recall_hold`]).
    holds: PartitionedMap<TxnId, HoldRecord>,
    /// The settled (captured or voided) holds in `holds`, for [`Ledger::forget_settled`]. Not
    /// part of the state.
    settled_holds: Vec<TxnId>,
    /// Idempotency records: every one, unless a storage adapter keeps them on disk, evicts them
    /// from here ([`Ledger::forget_dedup`]) and hands an older one back before a command that
    /// reuses its id ([`Ledger::recall_dedup`]).
    dedup: PartitionedMap<RequestId, DedupRecord>,
    /// Scale of every currency seen on this shard; fixed by its first account.
    scales: BTreeMap<Currency, u8>,
    /// Per coordinator shard, the lowest epoch still allowed to send two-phase messages.
    fences: BTreeMap<u32, u64>,
    last_seq: u64,
    /// Records' keys by age, so a prune and the search for stale holds look at only what they
    /// take (a scan of every record would stall every replica's apply at once).
    by_age: ByAge,
}

/// Keys by the `at_ms` of their record, oldest first. Not part of the state: [`Ledger::import`]
/// rebuilds it from the records.
#[derive(Debug, Default)]
struct ByAge {
    /// Every idempotency record held. Leader time never goes back, so new ones arrive in order.
    dedup: VecDeque<(i64, RequestId)>,
    /// Two-phase legs still held, by reserve time.
    held: BTreeSet<(i64, TxnId)>,
    /// Two-phase legs settled (posted, voided, tombstone), by reserve time (not the order they
    /// settle in).
    settled: BTreeSet<(i64, TxnId)>,
}

impl ByAge {
    fn record_dedup(&mut self, at_ms: i64, request_id: RequestId) {
        if self.dedup.back().is_none_or(|(last, _)| *last <= at_ms) {
            self.dedup.push_back((at_ms, request_id));
        } else {
            let position = self.dedup.partition_point(|(earlier, _)| *earlier <= at_ms);
            self.dedup.insert(position, (at_ms, request_id));
        }
    }

    /// Files a two-phase record under its state (a record keeps its `at_ms` as it settles).
    fn record_transaction(&mut self, txn_id: &TxnId, record: &TxnRecord) {
        let key = (record.at_ms, txn_id.clone());
        if record.state == LegState::Held {
            self.held.insert(key);
        } else {
            self.held.remove(&key);
            self.settled.insert(key);
        }
    }

    fn older_than(&self, cutoff_ms: i64) -> Pruned {
        Pruned {
            dedup: older_than(&self.dedup, cutoff_ms),
            transactions: older_than(&self.settled, cutoff_ms),
        }
    }

    fn forget_older_than(&mut self, cutoff_ms: i64) {
        while self
            .dedup
            .front()
            .is_some_and(|(at_ms, _)| *at_ms < cutoff_ms)
        {
            self.dedup.pop_front();
        }
        while self
            .settled
            .first()
            .is_some_and(|(at_ms, _)| *at_ms < cutoff_ms)
        {
            self.settled.pop_first();
        }
    }
}

/// The entries of `by_age` (oldest first) older than the cutoff, oldest first.
fn older_than<'a, K: Clone + 'a>(
    by_age: impl IntoIterator<Item = &'a (i64, K)>,
    cutoff_ms: i64,
) -> Vec<(i64, K)> {
    by_age
        .into_iter()
        .take_while(|(at_ms, _)| *at_ms < cutoff_ms)
        .cloned()
        .collect()
}

/// SHA-256 of a value's canonical (postcard) encoding, fed to the hash as it is encoded: a
/// payload's fingerprint (a command's is of everything but its request id), a state's digest.
pub fn fingerprint<T: Serialize + ?Sized>(value: &T) -> [u8; 32] {
    let mut hasher = HashWriter(Sha256::new());
    postcard::to_io(value, &mut hasher).expect("in-memory encoding cannot fail");
    hasher.0.finalize().into()
}

/// Hands what postcard writes straight to the hash, with no buffer of the encoding.
struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn account(&self, id: &AccountId) -> Option<&Account> {
        self.accounts.get(id)
    }

    pub fn transaction(&self, id: &TxnId) -> Option<&TxnRecord> {
        self.transactions.get(id)
    }

    pub fn hold(&self, id: &TxnId) -> Option<&HoldRecord> {
        self.holds.get(id)
    }

    /// Transactions whose legs are still held since before `cutoff_ms` (leader time), by id:
    /// the stale holds to ask their owner coordinators about.
    pub fn held_since(&self, cutoff_ms: i64) -> Vec<(TxnId, Owner)> {
        let mut held: Vec<(TxnId, Owner)> = older_than(&self.by_age.held, cutoff_ms)
            .into_iter()
            .map(|(_, txn_id)| {
                let owner = self.transactions[&txn_id].owner;
                (txn_id, owner)
            })
            .collect();
        held.sort_by(|(a, _), (b, _)| a.cmp(b));
        held
    }

    /// The idempotency record of a request id, if the ledger holds it.
    pub fn dedup_record(&self, id: &RequestId) -> Option<&DedupRecord> {
        self.dedup.get(id)
    }

    /// Holds again a record that [`Ledger::forget_dedup`] evicted, before a command with its
    /// request id is applied; the command then sees the record as if it had never left.
    pub fn recall_dedup(&mut self, request_id: RequestId, record: DedupRecord) {
        self.by_age.record_dedup(record.at_ms, request_id.clone());
        self.dedup.insert(request_id, record);
    }

    /// Evicts every idempotency record, once a storage adapter has them on disk: its memory is
    /// then what the commands between two evictions need, not the whole retention.
    pub fn forget_dedup(&mut self) {
        self.dedup.clear();
        self.by_age.dedup.clear();
    }

    /// Hands the ledger back the record of a two-phase transaction that it evicted
    /// ([`Ledger::forget_settled`]), before a command that names the transaction is applied.
    pub fn recall_transaction(&mut self, txn_id: TxnId, record: TxnRecord) {
        self.by_age.record_transaction(&txn_id, &record);
        self.transactions.insert(txn_id, record);
    }

    /// Hands the ledger back a hold that it evicted ([`Ledger::forget_settled`]), before a
    /// command that names the hold is applied.
    pub fn recall_hold(&mut self, hold_id: TxnId, record: HoldRecord) {
        self.file_hold(hold_id, record);
    }

    fn file_hold(&mut self, hold_id: TxnId, record: HoldRecord) {
        if !record.is_pending() {
            self.settled_holds.push(hold_id.clone());
        }
        self.holds.insert(hold_id, record);
    }

    /// Evicts every settled two-phase record (posted, voided, tombstone) and every settled hold
    /// (captured, voided), once a storage adapter has them on disk. Held legs and pending holds
    /// stay: stale holds, drains and captures look for them.
    pub fn forget_settled(&mut self) {
        for (_, txn_id) in std::mem::take(&mut self.by_age.settled) {
            self.transactions.remove(&txn_id);
        }
        for hold_id in std::mem::take(&mut self.settled_holds) {
            self.holds.remove(&hold_id);
        }
    }

    /// Applies one command at the leader's timestamp. Never fails: rejections are outcomes.
    pub fn apply(&mut self, command: &Command, timestamp_ms: i64) -> Applied {
        if command.kind.is_settle() {
            return self.settle(command, timestamp_ms);
        }
        if let Some(record) = self.idempotency_record(command) {
            let outcome = if record.fingerprint == fingerprint(&command.kind) {
                record.outcome
            } else {
                Outcome::DuplicateWithDifferentPayload
            };
            let same = outcome == record.outcome;
            return Applied {
                outcome,
                duplicate: same,
                seq: if same { record.seq } else { 0 },
                detail_account_id: if same { record.detail_account_id } else { None },
                event: None,
                changes: Changes::default(),
            };
        }
        let (record, event, changes) = match self.execute(command, timestamp_ms) {
            Ok(effect) => self.commit(command, effect, timestamp_ms),
            Err(rejection) => (
                DedupRecord {
                    fingerprint: [0; 32],
                    outcome: rejection.outcome,
                    detail_account_id: rejection.account_id,
                    seq: 0,
                    at_ms: timestamp_ms,
                },
                None,
                Changes::default(),
            ),
        };
        // An accepted reserve's two-phase record keeps its idempotency record.
        let keeps_own = !(matches!(command.kind, CommandKind::Reserve { .. }) && event.is_some());
        let dedup_inserted = keeps_own.then(|| {
            let record = DedupRecord {
                fingerprint: fingerprint(&command.kind),
                ..record.clone()
            };
            self.dedup
                .insert(command.request_id.clone(), record.clone());
            self.by_age
                .record_dedup(record.at_ms, command.request_id.clone());
            (command.request_id.clone(), record)
        });
        Applied {
            outcome: record.outcome,
            duplicate: false,
            seq: record.seq,
            detail_account_id: record.detail_account_id,
            event,
            changes: Changes {
                dedup_inserted,
                ..changes
            },
        }
    }

    /// The idempotency record of the command's request id: its own, or, for a reserve that held
    /// its transaction, the one its two-phase record keeps.
    fn idempotency_record(&self, command: &Command) -> Option<DedupRecord> {
        if let Some(record) = self.dedup.get(&command.request_id) {
            return Some(record.clone());
        }
        let CommandKind::Reserve { txn_id, .. } = &command.kind else {
            return None;
        };
        let record = self.transactions.get(txn_id)?;
        let reserved = record
            .reserved_by
            .as_ref()
            .filter(|reserved| reserved.request_id == command.request_id)?;
        Some(DedupRecord {
            fingerprint: reserved.fingerprint,
            outcome: Outcome::Ok,
            detail_account_id: None,
            seq: reserved.seq,
            at_ms: record.at_ms,
        })
    }

    /// Applies a post or a void. They are idempotent by their transaction rather than by request
    /// id: the two-phase record answers a resend of a settle it holds (whatever its request id)
    /// with the seq that settled it, so they keep no idempotency record.
    fn settle(&mut self, command: &Command, timestamp_ms: i64) -> Applied {
        let answered = |outcome, duplicate, seq, detail_account_id| Applied {
            outcome,
            duplicate,
            seq,
            detail_account_id,
            event: None,
            changes: Changes::default(),
        };
        if let Some(seq) = self.settled_by(&command.kind) {
            return answered(Outcome::Ok, true, seq, None);
        }
        match self.execute(command, timestamp_ms) {
            Ok(effect) => {
                let (record, event, changes) = self.commit(command, effect, timestamp_ms);
                Applied {
                    event,
                    changes,
                    ..answered(Outcome::Ok, false, record.seq, None)
                }
            }
            Err(rejection) => answered(rejection.outcome, false, 0, rejection.account_id),
        }
    }

    /// The seq that settled the transaction the way `kind` (a post or a void of its owner)
    /// would, if it is settled so.
    fn settled_by(&self, kind: &CommandKind) -> Option<u64> {
        let (txn_id, owner, posts) = match kind {
            CommandKind::Post { txn_id, owner } => (txn_id, owner, true),
            CommandKind::Void { txn_id, owner } => (txn_id, owner, false),
            _ => return None,
        };
        let record = self.transactions.get(txn_id)?;
        let settled = match record.state {
            LegState::Held => false,
            LegState::Posted => posts,
            LegState::Voided | LegState::Tombstone => !posts,
        };
        (settled && record.owner.coordinator_shard_id == owner.coordinator_shard_id)
            .then_some(record.settled_seq)
    }

    fn commit(
        &mut self,
        command: &Command,
        effect: Effect,
        timestamp_ms: i64,
    ) -> (DedupRecord, Option<Event>, Changes) {
        self.last_seq += 1;
        for account in &effect.accounts {
            self.scales
                .entry(account.currency.clone())
                .or_insert(account.scale);
            self.accounts.insert(account.id.clone(), account.clone());
        }
        for (txn_id, record) in &effect.transactions {
            self.by_age.record_transaction(txn_id, record);
            self.transactions.insert(txn_id.clone(), record.clone());
        }
        for (hold_id, record) in &effect.holds {
            self.file_hold(hold_id.clone(), record.clone());
        }
        match command.kind {
            CommandKind::FenceCoordinator {
                coordinator_shard_id,
                below_epoch,
            } => {
                let fence = self.fences.entry(coordinator_shard_id).or_default();
                // Fences only ever rise.
                *fence = (*fence).max(below_epoch);
            }
            CommandKind::PruneDedup { older_than_ms } => {
                for (_, request_id) in &effect.pruned.dedup {
                    self.dedup.remove(request_id);
                }
                for (_, txn_id) in &effect.pruned.transactions {
                    self.transactions.remove(txn_id);
                }
                self.by_age.forget_older_than(older_than_ms);
            }
            _ => {}
        }
        let record = DedupRecord {
            fingerprint: [0; 32],
            outcome: Outcome::Ok,
            detail_account_id: None,
            seq: self.last_seq,
            at_ms: timestamp_ms,
        };
        let event = Event {
            seq: self.last_seq,
            timestamp_ms,
            command: command.clone(),
            accounts: effect.accounts,
        };
        let changes = Changes {
            transactions: effect.transactions,
            holds: effect.holds,
            dedup_inserted: None,
            pruned: effect.pruned,
        };
        (record, Some(event), changes)
    }

    fn execute(&self, command: &Command, timestamp_ms: i64) -> Result<Effect, Rejection> {
        let kind = &command.kind;
        if let CommandKind::Reserve { owner, .. }
        | CommandKind::Post { owner, .. }
        | CommandKind::Void { owner, .. } = kind
        {
            self.check_fence(*owner)?;
        }
        match kind {
            CommandKind::CreateAccount {
                account_id,
                currency,
                scale,
                limits,
                metadata,
            } => self.create_account(account_id, currency, *scale, limits, metadata),
            CommandKind::UpdateLimits { account_id, limits } => {
                self.update_limits(account_id, limits)
            }
            CommandKind::Freeze { account_id } => {
                self.switch_state(account_id, AccountState::Active, AccountState::Frozen)
            }
            CommandKind::Unfreeze { account_id } => {
                self.switch_state(account_id, AccountState::Frozen, AccountState::Active)
            }
            CommandKind::Close { account_id } => self.close(account_id),
            CommandKind::Transfer {
                from,
                to,
                amount,
                currency,
                metadata: _,
            } => self.transfer(from, to, *amount, currency),
            CommandKind::Batch {
                legs,
                txn_id,
                hold_id,
                ..
            } => match hold_id {
                None => self.batch(legs),
                Some(hold_id) => self.capture_batch(legs, txn_id.as_ref(), hold_id),
            },
            CommandKind::Reserve {
                txn_id,
                owner,
                legs,
                hold_id,
                ..
            } => self.reserve(
                command,
                txn_id,
                *owner,
                legs,
                hold_id.as_ref(),
                timestamp_ms,
            ),
            CommandKind::PlaceHold {
                hold_id,
                account_id,
                amount,
                currency,
                metadata: _,
            } => self.place_hold(hold_id, account_id, *amount, currency, timestamp_ms),
            CommandKind::VoidHold { hold_id } => self.void_hold(hold_id),
            CommandKind::Post { txn_id, owner } => self.post(txn_id, *owner),
            CommandKind::Void { txn_id, owner } => self.void(txn_id, *owner, timestamp_ms),
            CommandKind::PruneDedup { older_than_ms } => Ok(Effect {
                pruned: self.by_age.older_than(*older_than_ms),
                ..Effect::default()
            }),
            CommandKind::FenceCoordinator { .. } => Ok(Effect::accounts(Vec::new())),
        }
    }

    fn create_account(
        &self,
        account_id: &AccountId,
        currency: &Currency,
        scale: u8,
        limits: &Limits,
        metadata: &Metadata,
    ) -> Result<Effect, Rejection> {
        if account_id.is_clearing() {
            return Err(Rejection::on(Outcome::InvalidAccountId, account_id));
        }
        if self.accounts.contains_key(account_id) {
            return Err(Rejection::on(Outcome::AccountAlreadyExists, account_id));
        }
        let known_scale = self.scales.get(currency).copied();
        if scale > SCALE_MAX || known_scale.is_some_and(|known| known != scale) {
            return Err(Rejection::on(Outcome::InvalidCurrency, account_id));
        }
        if !valid_limits(limits) || !within_limits(limits, Amount::ZERO, Amount::ZERO, Amount::ZERO)
        {
            return Err(Rejection::on(Outcome::InvalidLimits, account_id));
        }
        let new_account = |id: AccountId, limits: Limits, metadata: Metadata| Account {
            id,
            currency: currency.clone(),
            scale,
            state: AccountState::Active,
            balance: Amount::ZERO,
            pending_out: Amount::ZERO,
            pending_in: Amount::ZERO,
            limits,
            version: 1,
            metadata,
        };
        let mut accounts = vec![new_account(account_id.clone(), *limits, metadata.clone())];
        // The first account of a currency brings the shard's clearing account for it.
        if known_scale.is_none() {
            let clearing = AccountId::clearing(currency);
            accounts.push(new_account(
                clearing,
                Limits::UNBOUNDED,
                Metadata::default(),
            ));
        }
        Ok(Effect::accounts(accounts))
    }

    fn update_limits(&self, account_id: &AccountId, limits: &Limits) -> Result<Effect, Rejection> {
        let mut account = self.open_account(account_id)?.clone();
        let fits = within_limits(
            limits,
            account.balance,
            account.pending_out,
            account.pending_in,
        );
        if !valid_limits(limits) || !fits {
            return Err(Rejection::on(Outcome::InvalidLimits, account_id));
        }
        account.limits = *limits;
        account.version += 1;
        Ok(Effect::accounts(vec![account]))
    }

    /// Freezes or unfreezes an open account: from `from` to `to`, or nothing if it is not in
    /// `from` (already there), which is accepted all the same.
    fn switch_state(
        &self,
        account_id: &AccountId,
        from: AccountState,
        to: AccountState,
    ) -> Result<Effect, Rejection> {
        let mut account = self.open_account(account_id)?.clone();
        if account.state == from {
            account.state = to;
            account.version += 1;
        }
        Ok(Effect::accounts(vec![account]))
    }

    fn close(&self, account_id: &AccountId) -> Result<Effect, Rejection> {
        let mut account = self.open_account(account_id)?.clone();
        let empty = account.balance == Amount::ZERO
            && account.pending_out == Amount::ZERO
            && account.pending_in == Amount::ZERO;
        if !empty {
            return Err(Rejection::on(Outcome::AccountNotEmpty, account_id));
        }
        account.state = AccountState::Closed;
        account.version += 1;
        Ok(Effect::accounts(vec![account]))
    }

    fn transfer(
        &self,
        from: &AccountId,
        to: &AccountId,
        amount: Amount,
        currency: &Currency,
    ) -> Result<Effect, Rejection> {
        if !amount.is_positive() || amount.0 > AMOUNT_ABS_MAX {
            return Err(Rejection::new(Outcome::InvalidAmount));
        }
        if from == to {
            return Err(Rejection::on(Outcome::SelfTransfer, from));
        }
        let legs = [
            Leg {
                account_id: from.clone(),
                amount: Amount(-amount.0),
                currency: currency.clone(),
            },
            Leg {
                account_id: to.clone(),
                amount,
                currency: currency.clone(),
            },
        ];
        self.batch(&legs)
    }

    fn batch(&self, legs: &[Leg]) -> Result<Effect, Rejection> {
        check_legs(legs)?;
        check_zero_sum(legs)?;
        let mut accounts = self.movable_accounts(legs)?;
        for (account, leg) in accounts.iter_mut().zip(legs) {
            account.move_balance(leg.amount)?;
        }
        Ok(Effect::accounts(accounts))
    }

    /// A batch whose one debit leg captures an open hold: that account's hold leaves
    /// `pending_out` and the captured amount its balance; the other legs move as in a batch.
    fn capture_batch(
        &self,
        legs: &[Leg],
        txn_id: Option<&TxnId>,
        hold_id: &TxnId,
    ) -> Result<Effect, Rejection> {
        check_legs(legs)?;
        check_zero_sum(legs)?;
        let (debit, hold) = self.capturable_hold(hold_id, legs)?;
        let mut accounts = self.movable_accounts(legs)?;
        for (index, (account, leg)) in accounts.iter_mut().zip(legs).enumerate() {
            if index == debit {
                account.capture(hold.amount, Amount(-leg.amount.0));
            } else {
                account.move_balance(leg.amount)?;
            }
        }
        let captured = HoldRecord {
            state: HoldState::Captured {
                // A fast-path batch without a transaction id captures on its own behalf.
                txn_id: txn_id.unwrap_or(hold_id).clone(),
                amount: Amount(-legs[debit].amount.0),
            },
            ..hold.clone()
        };
        Ok(Effect {
            accounts,
            holds: vec![(hold_id.clone(), captured)],
            ..Effect::default()
        })
    }

    /// An existing hold that is open (neither being captured, captured nor voided).
    fn open_hold(&self, hold_id: &TxnId) -> Result<&HoldRecord, Rejection> {
        let hold = self
            .holds
            .get(hold_id)
            .ok_or(Rejection::new(Outcome::HoldNotFound))?;
        if hold.state != HoldState::Open {
            return Err(Rejection::on(Outcome::HoldNotOpen, &hold.account_id));
        }
        Ok(hold)
    }

    /// The open hold a capture draws from and the index of its one debit leg, which must be on
    /// the hold's account and currency and at most the hold's amount.
    fn capturable_hold(
        &self,
        hold_id: &TxnId,
        legs: &[Leg],
    ) -> Result<(usize, &HoldRecord), Rejection> {
        let hold = self.open_hold(hold_id)?;
        let mut debits = legs.iter().enumerate().filter(|(_, leg)| leg.amount.0 < 0);
        let (Some((index, debit)), None) = (debits.next(), debits.next()) else {
            return Err(Rejection::on(Outcome::HoldMismatch, &hold.account_id));
        };
        if debit.account_id != hold.account_id || debit.currency != hold.currency {
            return Err(Rejection::on(Outcome::HoldMismatch, &debit.account_id));
        }
        if -debit.amount.0 > hold.amount.0 {
            return Err(Rejection::on(Outcome::HoldExceeded, &debit.account_id));
        }
        Ok((index, hold))
    }

    fn place_hold(
        &self,
        hold_id: &TxnId,
        account_id: &AccountId,
        amount: Amount,
        currency: &Currency,
        timestamp_ms: i64,
    ) -> Result<Effect, Rejection> {
        if self.holds.contains_key(hold_id) {
            return Err(Rejection::on(Outcome::HoldAlreadyExists, account_id));
        }
        if !amount.is_positive() || amount.0 > AMOUNT_ABS_MAX {
            return Err(Rejection::on(Outcome::InvalidAmount, account_id));
        }
        let leg = Leg {
            account_id: account_id.clone(),
            amount: Amount(-amount.0),
            currency: currency.clone(),
        };
        let mut account = self.movable_account(&leg)?.clone();
        account.hold(leg.amount)?;
        let hold = HoldRecord {
            account_id: account_id.clone(),
            currency: currency.clone(),
            amount,
            state: HoldState::Open,
            at_ms: timestamp_ms,
        };
        Ok(Effect {
            accounts: vec![account],
            holds: vec![(hold_id.clone(), hold)],
            ..Effect::default()
        })
    }

    /// Releases an open hold, also on a frozen account (a release only frees money).
    fn void_hold(&self, hold_id: &TxnId) -> Result<Effect, Rejection> {
        let hold = self.open_hold(hold_id)?;
        let mut account = self.accounts[&hold.account_id].clone();
        account.release(Amount(-hold.amount.0));
        let voided = HoldRecord {
            state: HoldState::Voided,
            ..hold.clone()
        };
        Ok(Effect {
            accounts: vec![account],
            holds: vec![(hold_id.clone(), voided)],
            ..Effect::default()
        })
    }

    fn reserve(
        &self,
        command: &Command,
        txn_id: &TxnId,
        owner: Owner,
        legs: &[Leg],
        hold_id: Option<&TxnId>,
        timestamp_ms: i64,
    ) -> Result<Effect, Rejection> {
        if let Some(record) = self.transactions.get(txn_id) {
            return Err(Rejection::new(match record.state {
                LegState::Tombstone => Outcome::TransactionTombstoned,
                _ if record.owner.coordinator_shard_id != owner.coordinator_shard_id => {
                    Outcome::TransactionOwnedByOther
                }
                _ => Outcome::TransactionAlreadyReserved,
            }));
        }
        check_legs(legs)?;
        let capture = hold_id
            .map(|hold_id| self.capturable_hold(hold_id, legs))
            .transpose()?;
        let mut accounts = self.movable_accounts(legs)?;
        for (index, (account, leg)) in accounts.iter_mut().zip(legs).enumerate() {
            if capture.is_some_and(|(debit, _)| debit == index) {
                // Already in pending_out through the hold.
                account.version += 1;
            } else {
                account.hold(leg.amount)?;
            }
        }
        let holds = match (hold_id, capture) {
            (Some(hold_id), Some((_, hold))) => vec![(
                hold_id.clone(),
                HoldRecord {
                    state: HoldState::Capturing(txn_id.clone()),
                    ..hold.clone()
                },
            )],
            _ => Vec::new(),
        };
        let record = TxnRecord {
            owner,
            state: LegState::Held,
            legs: legs.to_vec(),
            hold_id: hold_id.cloned(),
            at_ms: timestamp_ms,
            settled_seq: 0,
            reserved_by: Some(Reserved {
                request_id: command.request_id.clone(),
                fingerprint: fingerprint(&command.kind),
                seq: self.last_seq + 1,
            }),
        };
        Ok(Effect {
            accounts,
            transactions: vec![(txn_id.clone(), record)],
            holds,
            ..Effect::default()
        })
    }

    /// The hold a held transaction captures, with the index of the leg that draws from it.
    fn capturing_hold<'a>(
        &'a self,
        record: &'a TxnRecord,
    ) -> Option<(usize, &'a TxnId, &'a HoldRecord)> {
        let hold_id = record.hold_id.as_ref()?;
        let hold = &self.holds[hold_id];
        let index = record
            .legs
            .iter()
            .position(|leg| leg.amount.0 < 0 && leg.account_id == hold.account_id)
            .expect("a capturing reservation has its debit on the hold's account");
        Some((index, hold_id, hold))
    }

    /// Settles every held leg. Limits and account states are not checked again: the reserve
    /// checked them, and a post of a held leg must never fail.
    fn post(&self, txn_id: &TxnId, owner: Owner) -> Result<Effect, Rejection> {
        let record = self.held_transaction(txn_id, owner)?;
        let capture = self.capturing_hold(record);
        let mut accounts: Vec<Account> = Vec::with_capacity(record.legs.len() + 1);
        for (index, leg) in record.legs.iter().enumerate() {
            let mut account = self.accounts[&leg.account_id].clone();
            match capture {
                Some((debit, _, hold)) if debit == index => {
                    account.capture(hold.amount, Amount(-leg.amount.0))
                }
                _ => account.post(leg.amount),
            }
            accounts.push(account);
        }
        // The clearing account takes the opposite of what this shard's legs moved, so the shard
        // stays zero-sum while the other shards of the transaction post theirs.
        for (currency, sum) in sums_per_currency(&record.legs).expect("reserved legs sum in range")
        {
            let clearing_id = AccountId::clearing(&currency);
            let position = accounts
                .iter()
                .position(|account| account.id == clearing_id);
            let clearing = match position {
                Some(index) => &mut accounts[index],
                None => {
                    accounts.push(self.accounts[&clearing_id].clone());
                    accounts.last_mut().expect("just pushed")
                }
            };
            clearing.balance = clearing
                .balance
                .checked_sub(sum)
                .expect("clearing stays in range");
            clearing.version += 1;
        }
        let holds = capture
            .map(|(debit, hold_id, hold)| {
                let captured = HoldRecord {
                    state: HoldState::Captured {
                        txn_id: txn_id.clone(),
                        amount: Amount(-record.legs[debit].amount.0),
                    },
                    ..hold.clone()
                };
                vec![(hold_id.clone(), captured)]
            })
            .unwrap_or_default();
        let record = TxnRecord {
            state: LegState::Posted,
            settled_seq: self.last_seq + 1,
            ..record.clone()
        };
        Ok(Effect {
            accounts,
            transactions: vec![(txn_id.clone(), record)],
            holds,
            ..Effect::default()
        })
    }

    fn void(&self, txn_id: &TxnId, owner: Owner, timestamp_ms: i64) -> Result<Effect, Rejection> {
        let Some(record) = self.transactions.get(txn_id) else {
            let tombstone = TxnRecord {
                owner,
                state: LegState::Tombstone,
                legs: Vec::new(),
                hold_id: None,
                at_ms: timestamp_ms,
                settled_seq: self.last_seq + 1,
                reserved_by: None,
            };
            return Ok(Effect {
                transactions: vec![(txn_id.clone(), tombstone)],
                ..Effect::default()
            });
        };
        if record.owner.coordinator_shard_id != owner.coordinator_shard_id {
            return Err(Rejection::new(Outcome::TransactionOwnedByOther));
        }
        match record.state {
            // `Ledger::settle` answers a void of a voided transaction itself.
            LegState::Voided | LegState::Tombstone | LegState::Posted => {
                Err(Rejection::new(Outcome::LegNotHeld))
            }
            LegState::Held => {
                let capture = self.capturing_hold(record);
                let mut accounts = Vec::with_capacity(record.legs.len());
                for (index, leg) in record.legs.iter().enumerate() {
                    let mut account = self.accounts[&leg.account_id].clone();
                    match capture {
                        // The money stays held, by the hold again.
                        Some((debit, _, _)) if debit == index => account.version += 1,
                        _ => account.release(leg.amount),
                    }
                    accounts.push(account);
                }
                let holds = capture
                    .map(|(_, hold_id, hold)| {
                        let reopened = HoldRecord {
                            state: HoldState::Open,
                            ..hold.clone()
                        };
                        vec![(hold_id.clone(), reopened)]
                    })
                    .unwrap_or_default();
                let record = TxnRecord {
                    state: LegState::Voided,
                    settled_seq: self.last_seq + 1,
                    ..record.clone()
                };
                Ok(Effect {
                    accounts,
                    transactions: vec![(txn_id.clone(), record)],
                    holds,
                    ..Effect::default()
                })
            }
        }
    }

    fn check_fence(&self, owner: Owner) -> Result<(), Rejection> {
        match self.fences.get(&owner.coordinator_shard_id) {
            Some(below_epoch) if owner.epoch < *below_epoch => {
                Err(Rejection::new(Outcome::CoordinatorFenced))
            }
            _ => Ok(()),
        }
    }

    /// The fence of every coordinator shard ever fenced, by id.
    pub fn fences(&self) -> Vec<(u32, u64)> {
        self.fences
            .iter()
            .map(|(id, epoch)| (*id, *epoch))
            .collect()
    }

    /// How many transactions of a coordinator still hold legs here.
    pub fn holds_owned_by(&self, coordinator_shard_id: u32) -> usize {
        self.by_age
            .held
            .iter()
            .filter(|(_, txn_id)| {
                self.transactions[txn_id].owner.coordinator_shard_id == coordinator_shard_id
            })
            .count()
    }

    fn held_transaction(&self, txn_id: &TxnId, owner: Owner) -> Result<&TxnRecord, Rejection> {
        let record = self
            .transactions
            .get(txn_id)
            .ok_or(Rejection::new(Outcome::TransactionNotFound))?;
        if record.owner.coordinator_shard_id != owner.coordinator_shard_id {
            return Err(Rejection::new(Outcome::TransactionOwnedByOther));
        }
        if record.state != LegState::Held {
            return Err(Rejection::new(Outcome::LegNotHeld));
        }
        Ok(record)
    }

    /// An existing, not closed, client-addressable account.
    fn open_account(&self, id: &AccountId) -> Result<&Account, Rejection> {
        if id.is_clearing() {
            return Err(Rejection::on(Outcome::InvalidAccountId, id));
        }
        let account = self
            .accounts
            .get(id)
            .ok_or_else(|| Rejection::on(Outcome::AccountNotFound, id))?;
        if account.state == AccountState::Closed {
            return Err(Rejection::on(Outcome::AccountClosed, id));
        }
        Ok(account)
    }

    /// Copies of the legs' accounts, once every one is known to accept movement: an account's
    /// state is reported before any leg's funds or limits.
    fn movable_accounts(&self, legs: &[Leg]) -> Result<Vec<Account>, Rejection> {
        legs.iter()
            .map(|leg| self.movable_account(leg).cloned())
            .collect()
    }

    /// An active account in the leg's currency: one that money may move on.
    fn movable_account(&self, leg: &Leg) -> Result<&Account, Rejection> {
        let account = self.open_account(&leg.account_id)?;
        if account.state == AccountState::Frozen {
            return Err(Rejection::on(Outcome::AccountFrozen, &leg.account_id));
        }
        if account.currency != leg.currency {
            return Err(Rejection::on(Outcome::CurrencyMismatch, &leg.account_id));
        }
        Ok(account)
    }

    /// The canonical form of the whole state, sorted by key.
    pub fn export(&self) -> LedgerState {
        let mut accounts: Vec<Account> = self.accounts.values().cloned().collect();
        accounts.sort_by(|a, b| a.id.cmp(&b.id));
        let mut transactions: Vec<_> = self
            .transactions
            .iter()
            .map(|(id, record)| (id.clone(), record.clone()))
            .collect();
        transactions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut holds: Vec<_> = self
            .holds
            .iter()
            .map(|(id, record)| (id.clone(), record.clone()))
            .collect();
        holds.sort_by(|a, b| a.0.cmp(&b.0));
        let mut dedup: Vec<_> = self
            .dedup
            .iter()
            .map(|(id, record)| (id.clone(), record.clone()))
            .collect();
        dedup.sort_by(|a, b| a.0.cmp(&b.0));
        LedgerState {
            last_seq: self.last_seq,
            accounts,
            transactions,
            holds,
            dedup,
            fences: self.fences(),
        }
    }

    /// Rebuilds a ledger from its canonical form (a snapshot, or rows read back from disk).
    pub fn import(state: LedgerState) -> Ledger {
        let mut scales = BTreeMap::new();
        for account in &state.accounts {
            scales
                .entry(account.currency.clone())
                .or_insert(account.scale);
        }
        let mut by_age = ByAge::default();
        let mut dedup: Vec<(i64, RequestId)> = state
            .dedup
            .iter()
            .map(|(request_id, record)| (record.at_ms, request_id.clone()))
            .collect();
        dedup.sort();
        by_age.dedup = dedup.into();
        for (txn_id, record) in &state.transactions {
            by_age.record_transaction(txn_id, record);
        }
        let settled_holds = state
            .holds
            .iter()
            .filter(|(_, record)| !record.is_pending())
            .map(|(hold_id, _)| hold_id.clone())
            .collect();
        Ledger {
            accounts: state
                .accounts
                .into_iter()
                .map(|a| (a.id.clone(), a))
                .collect(),
            transactions: state.transactions.into_iter().collect(),
            holds: state.holds.into_iter().collect(),
            settled_holds,
            dedup: state.dedup.into_iter().collect(),
            scales,
            fences: state.fences.into_iter().collect(),
            last_seq: state.last_seq,
            by_age,
        }
    }

    /// SHA-256 over the canonical state. Replicas at the same applied seq have equal digests.
    pub fn digest(&self) -> [u8; 32] {
        fingerprint(&self.export())
    }

    /// Sum of all balances per currency (zero on every shard, at every seq).
    pub fn balance_sums(&self) -> BTreeMap<Currency, i128> {
        let mut sums = BTreeMap::new();
        for account in self.accounts.values() {
            *sums.entry(account.currency.clone()).or_insert(0) += account.balance.0;
        }
        sums
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.values()
    }
}

fn valid_limits(limits: &Limits) -> bool {
    let in_range = |limit: Option<Amount>| limit.is_none_or(|a| a.0.abs() <= AMOUNT_ABS_MAX);
    let ordered = match (limits.lower, limits.upper) {
        (Some(lower), Some(upper)) => lower <= upper,
        _ => true,
    };
    in_range(limits.lower) && in_range(limits.upper) && ordered
}

/// Checks the legs of a multi-account transaction before it is begun anywhere: the same rules
/// an atomic batch enforces (count, amounts, distinct accounts, zero-sum per currency).
pub fn check_transaction_legs(legs: &[Leg]) -> Result<(), Rejection> {
    check_legs(legs)?;
    check_zero_sum(legs)
}

/// Count, amounts and distinct accounts of a batch or reservation.
fn check_legs(legs: &[Leg]) -> Result<(), Rejection> {
    if legs.is_empty() {
        return Err(Rejection::new(Outcome::NotZeroSum));
    }
    if legs.len() > BATCH_LEGS_MAX {
        return Err(Rejection::new(Outcome::BatchTooLarge));
    }
    for leg in legs {
        if leg.amount == Amount::ZERO || leg.amount.0.abs() > AMOUNT_ABS_MAX {
            return Err(Rejection::on(Outcome::InvalidAmount, &leg.account_id));
        }
    }
    for (index, leg) in legs.iter().enumerate() {
        if legs[..index]
            .iter()
            .any(|earlier| earlier.account_id == leg.account_id)
        {
            return Err(Rejection::on(
                Outcome::DuplicateAccountInBatch,
                &leg.account_id,
            ));
        }
    }
    Ok(())
}

fn check_zero_sum(legs: &[Leg]) -> Result<(), Rejection> {
    let sums = sums_per_currency(legs).ok_or(Rejection::new(Outcome::AmountOverflow))?;
    if sums.values().all(|sum| *sum == Amount::ZERO) {
        Ok(())
    } else {
        Err(Rejection::new(Outcome::NotZeroSum))
    }
}

fn sums_per_currency(legs: &[Leg]) -> Option<BTreeMap<Currency, Amount>> {
    let mut sums: BTreeMap<Currency, Amount> = BTreeMap::new();
    for leg in legs {
        let sum = sums.entry(leg.currency.clone()).or_default();
        *sum = sum.checked_add(leg.amount)?;
    }
    Some(sums)
}
