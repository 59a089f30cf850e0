//! The ledger as a Raft application: applies commands through `ledger::Ledger`, persists what
//! each command changed in RocksDB (the accounts through its event, their rows a share at a
//! time: `StaleAccounts`), keeps the event log, and wakes event subscribers.

use std::collections::{HashMap, HashSet};

use consensus::{App, AppView, Error, Writes, event_log};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::ledger::{
    Account, AccountId, Command, CommandKind, DedupRecord, HoldRecord, Ledger, LedgerState,
    LegState, Outcome, RequestId, TxnId, TxnRecord,
};

/// The accounts, current but for those changed after the event `ACCOUNTS_SEQ` names: a load
/// replays the accounts of the events after it (which carry every changed account's state), so
/// a command writes no account rows of its own ([`StaleAccounts`]).
const ACCOUNTS: &str = "accounts";
/// The events of one generation of [`StaleAccounts`].
const GENERATION_EVENTS: u64 = if cfg!(test) { 16 } else { 65_536 };
/// The settled two-phase records (posted, voided, tombstones), each written once, when it
/// settles.
const TRANSACTIONS: &str = "transactions";
/// The two-phase records' keys by reserve time: [`age_key`] → nothing, for prunes.
const TRANSACTIONS_BY_AGE: &str = "transactions_by_age";
/// The held two-phase records: what a replica loads, however many settled records
/// `TRANSACTIONS` keeps. Its memtables are vectors, so a reserve costs an append where the
/// skiplist of `TRANSACTIONS` (a read family) would take a random insert.
const TRANSACTIONS_HELD: &str = "transactions_held";
/// The settled (captured, voided) holds, each written once, when it settles.
const HOLDS: &str = "holds";
/// The pending (open or capturing) holds, rewritten as they change: what a replica loads,
/// however many settled holds `HOLDS` keeps.
const HOLDS_PENDING: &str = "holds_pending";
const DEDUP: &str = "dedup";
/// The idempotency records' keys by stamp: [`age_key`] → nothing, for prunes.
const DEDUP_BY_AGE: &str = "dedup_by_age";
const LEDGER_META: &str = "ledger_meta";
const FENCES: &[u8] = b"fences";
const ACCOUNTS_SEQ: &[u8] = b"accounts_seq";

/// What a command returns to its caller once applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub outcome: Outcome,
    pub duplicate: bool,
    pub seq: u64,
    pub detail_account_id: Option<AccountId>,
    /// Accounts touched by an accepted command, after it.
    pub accounts: Vec<Account>,
}

/// The ledger holds idempotency records, settled two-phase records and settled holds only until
/// they are on disk ([`App::persisted`]): the retention's records (a week of every command and of
/// every cross-shard transaction, by default) and every hold ever placed would not fit in
/// memory. A command whose request id (two-phase transaction, hold) the ledger does not hold
/// looks for its record in the DEDUP (TRANSACTIONS, HOLDS) family first (bloom filters answer for
/// the new ids), so every replica sees the same records whatever it has evicted or loaded, and
/// applies the same outcomes.
pub struct LedgerMachine {
    ledger: Ledger,
    applied_seq: watch::Sender<u64>,
    /// The cutoff of a prune applied since the last write reached the disk: the records it
    /// deletes are on disk until the write, and no longer count.
    pruning_below_ms: Option<i64>,
    stale_accounts: StaleAccounts,
}

/// The accounts whose rows in `ACCOUNTS` are older than their state, in two generations of
/// [`GENERATION_EVENTS`] events: `older` were changed in the last generation that ended, `newer`
/// since. Each event writes a share of `older`, so that they are all written when the current
/// generation ends; then `ACCOUNTS_SEQ` moves to the end of the older one, whose changes are all
/// written, and `newer` becomes `older`. The writes are spread over the events (no burst of every
/// changed account at once on all replicas together), and a load replays at most two
/// generations.
struct StaleAccounts {
    /// Written from the end, in id order, the same on every replica.
    older: Vec<AccountId>,
    /// How many of `older` each event writes.
    per_event: usize,
    newer: HashSet<AccountId>,
}

impl StaleAccounts {
    /// The accounts that the events after `ACCOUNTS_SEQ` up to `last_seq` changed (`changed`,
    /// each with its event's seq), as stale as they may be.
    fn loaded(last_seq: u64, changed: impl IntoIterator<Item = (u64, AccountId)>) -> StaleAccounts {
        let generation_end = last_seq - last_seq % GENERATION_EVENTS;
        let mut older = HashSet::new();
        let mut newer = HashSet::new();
        for (seq, id) in changed {
            if seq <= generation_end {
                older.insert(id);
            } else {
                newer.insert(id);
            }
        }
        let mut older: Vec<AccountId> = older.into_iter().collect();
        older.sort();
        let events_left = (generation_end + GENERATION_EVENTS - last_seq) as usize;
        StaleAccounts {
            per_event: older.len().div_ceil(events_left),
            older,
            newer,
        }
    }

    /// After event `seq`, which changed `changed`: writes this event's share of the older
    /// generation's accounts (the last of them if `seq` ends the current one, then moves on).
    fn write(
        &mut self,
        ledger: &Ledger,
        seq: u64,
        changed: impl Iterator<Item = AccountId>,
        writes: &mut Writes<'_>,
    ) {
        self.newer.extend(changed);
        let count = self.per_event.min(self.older.len());
        for id in self.older.split_off(self.older.len() - count) {
            let account = ledger.account(&id).expect("accounts are never removed");
            writes.put_encoded(ACCOUNTS, id.as_str().as_bytes(), account);
        }
        if seq.is_multiple_of(GENERATION_EVENTS) {
            debug_assert!(self.older.is_empty(), "each event writes its share");
            writes.put_encoded(LEDGER_META, ACCOUNTS_SEQ, &(seq - GENERATION_EVENTS));
            self.older = self.newer.drain().collect();
            self.older.sort();
            self.per_event = self.older.len().div_ceil(GENERATION_EVENTS as usize);
        }
    }
}

impl LedgerMachine {
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Hands the ledger the stored record of a request id it does not hold, unless a prune
    /// since the last write has deleted it.
    fn recall_dedup(&mut self, request_id: &RequestId, writes: &mut Writes<'_>) {
        if self.ledger.dedup_record(request_id).is_none()
            && let Some(record) = self.stored_unpruned(
                writes,
                DEDUP,
                "dedup record",
                request_id.as_str(),
                |r: &DedupRecord| r.at_ms,
            )
        {
            self.ledger.recall_dedup(request_id.clone(), record);
        }
    }

    /// A record that earlier apply calls stored under `key`, unless a prune since the last
    /// write has deleted it (its row is there until the write).
    fn stored_unpruned<T: serde::de::DeserializeOwned>(
        &self,
        writes: &mut Writes<'_>,
        family: &str,
        what: &'static str,
        key: &str,
        at_ms: impl Fn(&T) -> i64,
    ) -> Option<T> {
        let record: T = writes.get_committed(family, key.as_bytes(), what)?;
        self.pruning_below_ms
            .is_none_or(|cutoff| at_ms(&record) >= cutoff)
            .then_some(record)
    }

    /// A transaction's two-phase record: held while its legs are held (and until a settled one
    /// is written), read from disk after (`view`: the column families at the same moment,
    /// `StateMachineStore::read_stored`).
    pub fn transaction(
        &self,
        view: &AppView<'_>,
        txn_id: &TxnId,
    ) -> Result<Option<TxnRecord>, Error> {
        match self.ledger.transaction(txn_id) {
            Some(held) => Ok(Some(held.clone())),
            None => view.get_decoded(TRANSACTIONS, txn_id.as_str().as_bytes(), "transaction"),
        }
    }

    /// Hands the ledger the stored two-phase record of a transaction it does not hold, unless a
    /// prune since the last write has deleted it.
    fn recall_transaction(&mut self, txn_id: &TxnId, writes: &mut Writes<'_>) {
        if self.ledger.transaction(txn_id).is_none()
            && let Some(record) = self.stored_unpruned(
                writes,
                TRANSACTIONS,
                "transaction",
                txn_id.as_str(),
                |r: &TxnRecord| r.at_ms,
            )
        {
            self.ledger.recall_transaction(txn_id.clone(), record);
        }
    }

    /// A hold's record: held while the hold is pending (and until a settled one is written),
    /// read from disk after (`view` as for [`LedgerMachine::transaction`]).
    pub fn hold(&self, view: &AppView<'_>, hold_id: &TxnId) -> Result<Option<HoldRecord>, Error> {
        match self.ledger.hold(hold_id) {
            Some(pending) => Ok(Some(pending.clone())),
            None => view.get_decoded(HOLDS, hold_id.as_str().as_bytes(), "hold"),
        }
    }

    /// Hands the ledger the stored record of a hold it does not hold (holds are never pruned).
    fn recall_hold(&mut self, hold_id: &TxnId, writes: &mut Writes<'_>) {
        if self.ledger.hold(hold_id).is_none()
            && let Some(record) = writes.get_committed(HOLDS, hold_id.as_str().as_bytes(), "hold")
        {
            self.ledger.recall_hold(hold_id.clone(), record);
        }
    }

    /// Deletes the stored idempotency records and settled two-phase records older than a
    /// prune's cutoff (the ledger forgot those it held; held legs stay, however old). Those
    /// below an earlier prune's cutoff since the last write are deleted already: one of their
    /// ids may have a new record since, which must stay.
    fn prune_stored(&mut self, older_than_ms: i64, writes: &mut Writes<'_>) {
        let start = self.pruning_below_ms.map_or([0; 8], age_prefix);
        let end = age_prefix(older_than_ms);
        if start >= end {
            return;
        }
        for (key, _) in writes.scan_committed(DEDUP_BY_AGE, &start, &end) {
            writes.delete(DEDUP, &key[8..]);
            writes.delete(DEDUP_BY_AGE, &key);
        }
        for (key, _) in writes.scan_committed(TRANSACTIONS_BY_AGE, &start, &end) {
            let held = txn_key(&key[8..]).is_ok_and(|txn_id| {
                self.ledger
                    .transaction(&txn_id)
                    .is_some_and(|record| record.state == LegState::Held)
            });
            if !held {
                writes.delete(TRANSACTIONS, &key[8..]);
                writes.delete(TRANSACTIONS_BY_AGE, &key);
            }
        }
        self.pruning_below_ms = Some(older_than_ms);
    }

    /// Watches the last applied (and persisted) event seq.
    pub fn subscribe_applied_seq(&self) -> watch::Receiver<u64> {
        self.applied_seq.subscribe()
    }
}

impl App for LedgerMachine {
    type Request = Command;
    type Response = CommandResult;

    const COLUMN_FAMILIES: &'static [&'static str] = &[
        ACCOUNTS,
        TRANSACTIONS,
        TRANSACTIONS_BY_AGE,
        TRANSACTIONS_HELD,
        HOLDS,
        HOLDS_PENDING,
        DEDUP,
        DEDUP_BY_AGE,
        event_log::EVENTS,
        LEDGER_META,
    ];

    const READ_FAMILIES: &'static [&'static str] = &[
        DEDUP,
        DEDUP_BY_AGE,
        TRANSACTIONS,
        TRANSACTIONS_BY_AGE,
        HOLDS,
    ];

    /// 2: events are stored as protobuf (`events::write_stored`), no longer postcard.
    /// 3: idempotency records are also filed by age (`DEDUP_BY_AGE`).
    /// 4: two-phase records are also filed by age (`TRANSACTIONS_BY_AGE`).
    /// 5: held two-phase records are filed in `TRANSACTIONS_HELD`.
    /// 6: pending holds are filed in `HOLDS_PENDING`.
    /// 7: `ACCOUNTS` is current but for the accounts changed after `ACCOUNTS_SEQ`.
    /// 8: held two-phase records and pending holds live in `TRANSACTIONS_HELD` and
    /// `HOLDS_PENDING`; `TRANSACTIONS` and `HOLDS` keep the settled ones only.
    /// 9: two-phase records keep the seq that settled them; posts and voids keep no idempotency
    /// record.
    /// 10: two-phase records keep the idempotency record of the reserve that held them; accepted
    /// reserves keep no other.
    const STORAGE_FORMAT: u32 = 10;

    /// Reads the held two-phase records and the pending holds only.
    fn load(store: &AppView<'_>) -> Result<Self, Error> {
        let held = store.decoded_rows(TRANSACTIONS_HELD, "transaction")?;
        let pending = store.decoded_rows(HOLDS_PENDING, "hold")?;
        let (state, stale_accounts) =
            read_state(store, by_id(held, txn_key)?, by_id(pending, txn_key)?)?;
        let (applied_seq, _) = watch::channel(state.last_seq);
        Ok(LedgerMachine {
            ledger: Ledger::import(state),
            applied_seq,
            pruning_below_ms: None,
            stale_accounts,
        })
    }

    /// The stored records `apply` recalls: the request's idempotency record (none for a post or
    /// a void), the transaction's two-phase record and the hold's record, when the ledger does
    /// not hold them.
    fn reads<'r>(&self, command: &'r Command, read: &mut dyn FnMut(&'static str, &'r [u8])) {
        if !command.kind.is_settle() && self.ledger.dedup_record(&command.request_id).is_none() {
            read(DEDUP, command.request_id.as_str().as_bytes());
        }
        if let Some(txn_id) = command.kind.two_phase_txn_id()
            && self.ledger.transaction(txn_id).is_none()
        {
            read(TRANSACTIONS, txn_id.as_str().as_bytes());
        }
        if let Some(hold_id) = command.kind.hold_id()
            && self.ledger.hold(hold_id).is_none()
        {
            read(HOLDS, hold_id.as_str().as_bytes());
        }
    }

    fn apply(
        &mut self,
        command: &Command,
        timestamp_ms: i64,
        writes: &mut Writes<'_>,
    ) -> CommandResult {
        if !command.kind.is_settle() {
            self.recall_dedup(&command.request_id, writes);
        }
        if let Some(txn_id) = command.kind.two_phase_txn_id() {
            self.recall_transaction(txn_id, writes);
        }
        if let Some(hold_id) = command.kind.hold_id() {
            self.recall_hold(hold_id, writes);
        }
        let applied = self.ledger.apply(command, timestamp_ms);
        if let Some(event) = &applied.event {
            event_log::append_written(writes, event.seq, |buffer| {
                crate::events::write_stored(event, buffer)
            });
            if matches!(event.command.kind, CommandKind::FenceCoordinator { .. }) {
                writes.put_encoded(LEDGER_META, FENCES, &self.ledger.fences());
            }
            let changed = event.accounts.iter().map(|account| account.id.clone());
            self.stale_accounts
                .write(&self.ledger, event.seq, changed, writes);
        }
        for (txn_id, record) in &applied.changes.transactions {
            put_transaction(writes, txn_id, record);
        }
        for (hold_id, record) in &applied.changes.holds {
            put_hold(writes, hold_id, record);
        }
        if let Some((request_id, record)) = &applied.changes.dedup_inserted {
            put_dedup(writes, request_id, record);
        }
        let pruned = &applied.changes.pruned;
        for (at_ms, request_id) in &pruned.dedup {
            writes.delete(DEDUP, request_id.as_str().as_bytes());
            writes.delete(DEDUP_BY_AGE, &age_key(*at_ms, request_id.as_str()));
        }
        for (at_ms, txn_id) in &pruned.transactions {
            writes.delete(TRANSACTIONS, txn_id.as_str().as_bytes());
            writes.delete(TRANSACTIONS_BY_AGE, &age_key(*at_ms, txn_id.as_str()));
        }
        if let (Some(_), CommandKind::PruneDedup { older_than_ms }) =
            (&applied.event, &command.kind)
        {
            self.prune_stored(*older_than_ms, writes);
        }
        CommandResult {
            outcome: applied.outcome,
            duplicate: applied.duplicate,
            seq: applied.seq,
            detail_account_id: applied.detail_account_id,
            accounts: applied
                .event
                .map(|event| event.accounts)
                .unwrap_or_default(),
        }
    }

    fn persisted(&mut self) {
        self.ledger.forget_dedup();
        self.ledger.forget_settled();
        self.pruning_below_ms = None;
        self.applied_seq.send_replace(self.ledger.last_seq());
    }

    /// Loads the ledger from the installed rows; event subscribers keep their watch.
    fn installed(&mut self, view: &AppView<'_>) -> Result<(), Error> {
        let loaded = Self::load(view)?;
        self.ledger = loaded.ledger;
        self.stale_accounts = loaded.stale_accounts;
        self.pruning_below_ms = None;
        Ok(())
    }

    /// The ledger's digest (which holds no idempotency records, no settled two-phase records and
    /// no settled holds between apply calls) and every record on disk.
    fn digest(&self, view: &AppView<'_>) -> Result<[u8; 32], Error> {
        let mut hasher = Sha256::new();
        hasher.update(self.ledger.digest());
        view.hash_rows(DEDUP, |bytes| hasher.update(bytes))?;
        view.hash_rows(TRANSACTIONS, |bytes| hasher.update(bytes))?;
        view.hash_rows(TRANSACTIONS_HELD, |bytes| hasher.update(bytes))?;
        view.hash_rows(HOLDS, |bytes| hasher.update(bytes))?;
        view.hash_rows(HOLDS_PENDING, |bytes| hasher.update(bytes))?;
        Ok(hasher.finalize().into())
    }

    fn applied_seq(&self) -> u64 {
        self.ledger.last_seq()
    }
}

/// The ledger state persisted in the column families, with the two-phase records and holds
/// given and no idempotency records; and the accounts whose rows are stale.
fn read_state(
    store: &AppView<'_>,
    transactions: Vec<(TxnId, TxnRecord)>,
    holds: Vec<(TxnId, HoldRecord)>,
) -> Result<(LedgerState, StaleAccounts), Error> {
    let last_seq = event_log::last_seq(store)?;
    let (accounts, changed) = read_accounts(store, last_seq)?;
    let fences = store
        .get_decoded(LEDGER_META, FENCES, "fences")?
        .unwrap_or_default();
    let state = LedgerState {
        last_seq,
        accounts,
        transactions,
        holds,
        dedup: Vec::new(),
        fences,
    };
    Ok((state, StaleAccounts::loaded(last_seq, changed)))
}

/// Accounts changed by events, each with its event's seq.
type ChangedAccounts = Vec<(u64, AccountId)>;

/// The accounts as of event `last_seq`: their rows, then the accounts of each event after
/// `ACCOUNTS_SEQ`; and those, each with its event's seq.
fn read_accounts(
    store: &AppView<'_>,
    last_seq: u64,
) -> Result<(Vec<Account>, ChangedAccounts), Error> {
    let rows: Vec<(_, Account)> = store.decoded_rows(ACCOUNTS, "account")?;
    let mut accounts: HashMap<AccountId, Account> = rows
        .into_iter()
        .map(|(_, account)| (account.id.clone(), account))
        .collect();
    let mut changed = Vec::new();
    let mut next = store
        .get_decoded::<u64>(LEDGER_META, ACCOUNTS_SEQ, "accounts seq")?
        .unwrap_or(0)
        + 1;
    while next <= last_seq {
        let events = event_log::read_stored(store, next, last_seq, 4096)?;
        if events.is_empty() {
            return Err(Error::Corrupt(format!("the event log lacks event {next}")));
        }
        for (seq, stored) in events {
            if seq != next {
                return Err(Error::Corrupt(format!("the event log lacks event {next}")));
            }
            for account in crate::events::stored_accounts(&stored)? {
                changed.push((seq, account.id.clone()));
                accounts.insert(account.id.clone(), account);
            }
            next += 1;
        }
    }
    Ok((accounts.into_values().collect(), changed))
}

/// Stored rows with their keys read by `id`.
fn by_id<K, T>(
    rows: Vec<(Vec<u8>, T)>,
    id: impl Fn(&[u8]) -> Result<K, Error>,
) -> Result<Vec<(K, T)>, Error> {
    rows.into_iter()
        .map(|(key, row)| Ok((id(&key)?, row)))
        .collect()
}

fn put_dedup(writes: &mut Writes<'_>, request_id: &RequestId, record: &DedupRecord) {
    writes.put_encoded(DEDUP, request_id.as_str().as_bytes(), record);
    writes.put(
        DEDUP_BY_AGE,
        &age_key(record.at_ms, request_id.as_str()),
        &[],
    );
}

/// Writes a two-phase record: held, or settled (moved out of the held ones). Files it by age
/// when it is new: held by a reserve, or a tombstone left by a void that came first (a record
/// keeps its reserve time as it settles, so it is filed once).
fn put_transaction(writes: &mut Writes<'_>, txn_id: &TxnId, record: &TxnRecord) {
    let key = txn_id.as_str().as_bytes();
    if matches!(record.state, LegState::Held | LegState::Tombstone) {
        writes.put(
            TRANSACTIONS_BY_AGE,
            &age_key(record.at_ms, txn_id.as_str()),
            &[],
        );
    }
    match record.state {
        LegState::Held => writes.put_encoded(TRANSACTIONS_HELD, key, record),
        LegState::Posted | LegState::Voided => {
            writes.delete(TRANSACTIONS_HELD, key);
            writes.put_encoded(TRANSACTIONS, key, record);
        }
        LegState::Tombstone => writes.put_encoded(TRANSACTIONS, key, record),
    }
}

/// Writes a hold: pending, or settled (moved out of the pending ones).
fn put_hold(writes: &mut Writes<'_>, hold_id: &TxnId, record: &HoldRecord) {
    let key = hold_id.as_str().as_bytes();
    if record.is_pending() {
        writes.put_encoded(HOLDS_PENDING, key, record);
    } else {
        writes.delete(HOLDS_PENDING, key);
        writes.put_encoded(HOLDS, key, record);
    }
}

/// A record's key in a by-age family: its stamp, ordered as numbers are, then its id.
fn age_key(at_ms: i64, id: &str) -> Vec<u8> {
    let mut key = age_prefix(at_ms).to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn age_prefix(at_ms: i64) -> [u8; 8] {
    (at_ms as u64 ^ 1 << 63).to_be_bytes()
}

fn key_text(key: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(key).map_err(|_| Error::Corrupt("a stored key is not UTF-8".into()))
}

fn txn_key(key: &[u8]) -> Result<TxnId, Error> {
    TxnId::parse(key_text(key)?).map_err(|error| Error::Corrupt(error.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use consensus::{Proposal, StateMachineStore, TypeConfig, open_state_machine};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use proptest::prelude::*;

    use super::*;
    use crate::ledger::tests::{at, op, setup_commands, to_command};
    use crate::ledger::{Amount, Currency, HoldState, Leg, Limits, Metadata, Owner};

    type Machine = StateMachineStore<LedgerMachine>;

    /// Every record of a family, by its key (read by `key`).
    fn read_keyed<K, T: serde::de::DeserializeOwned>(
        store: &AppView<'_>,
        family: &str,
        what: &'static str,
        key: impl Fn(&[u8]) -> Result<K, Error>,
    ) -> Result<Vec<(K, T)>, Error> {
        by_id(store.decoded_rows(family, what)?, key)
    }

    /// Every stored idempotency record, by request id.
    fn read_dedup(store: &AppView<'_>) -> Result<Vec<(RequestId, DedupRecord)>, Error> {
        read_keyed(store, DEDUP, "dedup record", request_key)
    }

    fn request_key(key: &[u8]) -> Result<RequestId, Error> {
        RequestId::parse(key_text(key)?).map_err(|error| Error::Corrupt(error.to_string()))
    }

    fn open(dir: &tempfile::TempDir) -> Machine {
        open_state_machine(dir.path()).unwrap()
    }

    fn command(request_id: &str, kind: CommandKind) -> Command {
        Command {
            request_id: RequestId::parse(request_id).unwrap(),
            kind,
        }
    }

    fn create(account: &str) -> CommandKind {
        CommandKind::CreateAccount {
            account_id: AccountId::parse(account).unwrap(),
            currency: Currency::parse("USD").unwrap(),
            scale: 2,
            limits: Limits::UNBOUNDED,
            metadata: Metadata::default(),
        }
    }

    fn pay(amount: i128) -> CommandKind {
        CommandKind::Transfer {
            from: AccountId::parse("alice").unwrap(),
            to: AccountId::parse("bob").unwrap(),
            amount: Amount(amount),
            currency: Currency::parse("USD").unwrap(),
            metadata: Metadata::default(),
        }
    }

    /// Applies one log entry at `timestamp_ms`; the results of its commands.
    async fn apply(
        machine: &mut Machine,
        index: u64,
        timestamp_ms: i64,
        commands: Vec<Command>,
    ) -> Vec<CommandResult> {
        let entry: Entry<TypeConfig<LedgerMachine>> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                timestamp_ms,
                requests: Arc::from(commands),
            }),
        };
        machine.apply([entry]).await.unwrap().remove(0)
    }

    /// The accounts changed in one generation are written over the next, even when the replica
    /// restarts in between, before `ACCOUNTS_SEQ` passes their changes.
    #[tokio::test]
    async fn stale_account_rows_are_written_over_the_next_generation_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
        // Events 1–16, the first generation: 16 accounts.
        let mut creates = vec![
            command("c-alice", create("alice")),
            command("c-bob", create("bob")),
        ];
        creates.extend((0..14).map(|i| command(&format!("c-{i}"), create(&format!("a{i}")))));
        apply(&mut machine, 1, 1_000, creates).await;
        assert!(stored_keys(&machine, ACCOUNTS).is_empty());
        // Each event of the second writes its share of them (with USD's clearing account, 17
        // in 16 events: two each). The replica restarts after event 17 (two written; it writes
        // all 17 again in the 15 events left) and after event 28 (all 17 again in 4 events).
        let accounts = machine.read(|app| app.ledger().accounts().count());
        assert_eq!(accounts, 17);
        for seq in 17..=32 {
            if seq == 18 || seq == 29 {
                drop(machine);
                machine = open(&dir);
            }
            let paid = apply(
                &mut machine,
                seq,
                1_000,
                vec![command(&format!("p-{seq}"), pay(1))],
            );
            assert_eq!(paid.await[0].seq, seq);
            if seq == 17 {
                assert_eq!(stored_keys(&machine, ACCOUNTS).len(), 2);
            }
        }
        // Event 32 ends the second generation: every account of the first has its row.
        assert_eq!(stored_keys(&machine, ACCOUNTS).len(), accounts);
        let accounts_seq =
            machine
                .store()
                .view()
                .get_decoded::<u64>(LEDGER_META, ACCOUNTS_SEQ, "seq");
        assert_eq!(accounts_seq.unwrap(), Some(16));
        let digest = machine.digest().unwrap();
        drop(machine);
        assert_eq!(open(&dir).digest().unwrap(), digest);
    }

    fn held(machine: &Machine, request_id: &str) -> bool {
        let request_id = RequestId::parse(request_id).unwrap();
        machine.read(|app| app.ledger().dedup_record(&request_id).is_some())
    }

    #[tokio::test]
    async fn idempotency_records_live_on_disk_and_count_as_if_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
        let opened = vec![
            command("open-alice", create("alice")),
            command("open-bob", create("bob")),
        ];
        apply(&mut machine, 1, 1_000, opened).await;
        let first = apply(&mut machine, 2, 2_000, vec![command("pay", pay(5))]).await;
        assert_eq!((first[0].outcome, first[0].duplicate), (Outcome::Ok, false));
        // Once on disk, the records leave memory.
        assert!(!held(&machine, "pay") && !held(&machine, "open-alice"));

        // A retry finds the record on disk: the stored outcome, or a mismatch. In one entry, the
        // second use of a new id finds the first, which is not on disk yet.
        let retries = vec![
            command("pay", pay(5)),
            command("pay", pay(6)),
            command("pay-twice", pay(1)),
            command("pay-twice", pay(1)),
        ];
        let retried = apply(&mut machine, 3, 3_000, retries).await;
        assert_eq!(
            (retried[0].outcome, retried[0].duplicate, retried[0].seq),
            (Outcome::Ok, true, first[0].seq)
        );
        assert_eq!(retried[1].outcome, Outcome::DuplicateWithDifferentPayload);
        assert!(!retried[2].duplicate && retried[3].duplicate);
        assert_eq!(retried[3].seq, retried[2].seq);

        // A replica that loads from disk, or installs a snapshot, has the same records.
        let other_dir = tempfile::tempdir().unwrap();
        let (mut machine, mut other) = machine.reload_and_copy(dir.path(), other_dir.path()).await;
        assert!(!held(&other, "pay"));
        let again = apply(&mut other, 4, 4_000, vec![command("pay", pay(5))]).await;
        assert!(again[0].duplicate);

        // A prune deletes the stored records older than its cutoff; a command after it in the
        // same entry, with a pruned id, is new even though the record is on disk until the
        // entry's write. A second prune in the entry deletes only what the first left, so the
        // new "pay" stays.
        let prune = |older_than_ms| CommandKind::PruneDedup { older_than_ms };
        let pruned = vec![
            command("prune", prune(2_500)),
            command("pay", pay(5)),
            command("pay-twice", pay(1)),
            command("prune-again", prune(3_500)),
            command("pay-twice", pay(1)),
        ];
        let after = apply(&mut machine, 4, 4_000, pruned).await;
        assert_eq!(
            (after[0].outcome, after[3].outcome),
            (Outcome::Ok, Outcome::Ok)
        );
        assert!(!after[1].duplicate && after[1].seq > first[0].seq);
        assert!(after[2].duplicate && !after[4].duplicate);
        let (records, by_age) = (
            read_dedup(&machine.store().view()).unwrap(),
            stored_keys(&machine, DEDUP_BY_AGE),
        );
        let ids = ["pay", "pay-twice", "prune", "prune-again"];
        let stamps: Vec<(&str, i64)> = records
            .iter()
            .map(|(id, record)| (id.as_str(), record.at_ms))
            .collect();
        assert_eq!(stamps, ids.map(|id| (id, 4_000)));
        let expected = ids.map(|id| age_key(4_000, id));
        assert_eq!(by_age, expected);

        // A prune in one entry and a pruned id in the next, applied together (the pruned rows
        // are there until the write).
        let entry = |index, commands: Vec<Command>| Entry::<TypeConfig<LedgerMachine>> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                timestamp_ms: 5_000,
                requests: Arc::from(commands),
            }),
        };
        let together = [
            entry(5, vec![command("prune-later", prune(4_500))]),
            entry(6, vec![command("pay", pay(5))]),
        ];
        let results = machine.apply(together).await.unwrap();
        let paid = &results[1][0];
        assert_eq!((paid.outcome, paid.duplicate), (Outcome::Ok, false));
    }

    #[tokio::test]
    async fn settled_legs_live_on_disk_and_count_as_if_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
        let owner = Owner {
            coordinator_shard_id: 1,
            epoch: 1,
        };
        let txn_id = |id: &str| TxnId::parse(id).unwrap();
        let reserve = |id: &str| CommandKind::Reserve {
            txn_id: txn_id(id),
            owner,
            legs: vec![Leg {
                account_id: AccountId::parse("alice").unwrap(),
                amount: Amount(-5),
                currency: Currency::parse("USD").unwrap(),
            }],
            hold_id: None,
            metadata: Metadata::default(),
        };
        let post = |id: &str| CommandKind::Post {
            txn_id: txn_id(id),
            owner,
        };
        let void = |id: &str| CommandKind::Void {
            txn_id: txn_id(id),
            owner,
        };
        let legs = |machine: &Machine, id: &str| {
            let id = txn_id(id);
            let held = machine.read(|app| app.ledger().transaction(&id).map(|r| r.state));
            let read = machine.read_stored(|app, view| app.transaction(view, &id));
            (held, read.unwrap().map(|record| record.state))
        };
        apply(
            &mut machine,
            1,
            1_000,
            vec![command("open", create("alice"))],
        )
        .await;
        let first = vec![
            command("r-old", reserve("old")),
            command("r-kept", reserve("kept")),
            command("p-old", post("old")),
        ];
        let first = apply(&mut machine, 2, 2_000, first).await;
        // Once written, a settled leg leaves memory; a held one stays. Readers find both.
        assert_eq!(legs(&machine, "old"), (None, Some(LegState::Posted)));
        let held = Some(LegState::Held);
        assert_eq!(legs(&machine, "kept"), (held, held));
        // Accepted reserves and posts keep no idempotency record: their leg's record answers a
        // resend.
        assert_eq!(stored_keys(&machine, DEDUP), vec![b"open".to_vec()]);

        // Commands naming a settled leg find it on disk: it is not reserved again (another
        // request id), nor voided; the reserve again is its duplicate, and so is a post again
        // (any request id).
        let late = vec![
            command("r-old-2", reserve("old")),
            command("v-old", void("old")),
            command("r-old", reserve("old")),
            command("p-old", post("old")),
            command("p-old-2", post("old")),
        ];
        let late = apply(&mut machine, 3, 3_000, late).await;
        assert_eq!(
            (late[0].outcome, late[1].outcome),
            (Outcome::TransactionAlreadyReserved, Outcome::LegNotHeld)
        );
        let answer = (late[2].outcome, late[2].duplicate, late[2].seq);
        assert_eq!(answer, (Outcome::Ok, true, first[0].seq));
        for resent in &late[3..] {
            let answer = (resent.outcome, resent.duplicate, resent.seq);
            assert_eq!(answer, (Outcome::Ok, true, first[2].seq));
        }

        // A prune deletes the settled legs reserved before its cutoff, never a held one; a void
        // after it in the same entry leaves a new tombstone (the old record on disk no longer
        // counts), which a second prune in the entry leaves alone.
        let prune = |older_than_ms| CommandKind::PruneDedup { older_than_ms };
        let pruned = vec![
            command("prune", prune(2_500)),
            command("v-old-2", void("old")),
            command("prune-again", prune(3_500)),
            command("r-recent", reserve("recent")),
            command("p-recent", post("recent")),
        ];
        let pruned = apply(&mut machine, 4, 4_000, pruned).await;
        assert!(pruned.iter().all(|result| result.outcome == Outcome::Ok));
        assert_eq!(legs(&machine, "old"), (None, Some(LegState::Tombstone)));
        assert_eq!(legs(&machine, "kept"), (held, held));
        let filed = age_keys([("kept", 2_000), ("old", 4_000), ("recent", 4_000)]);
        assert_eq!(stored_keys(&machine, TRANSACTIONS_BY_AGE), filed);
        let filed_held = vec![b"kept".to_vec()];
        assert_eq!(stored_keys(&machine, TRANSACTIONS_HELD), filed_held);
        let settled = vec![b"old".to_vec(), b"recent".to_vec()];
        assert_eq!(stored_keys(&machine, TRANSACTIONS), settled);

        // A replica that loads from disk, or installs a snapshot, has the same legs.
        let other_dir = tempfile::tempdir().unwrap();
        let (machine, other) = machine.reload_and_copy(dir.path(), other_dir.path()).await;
        assert_eq!(legs(&machine, "old"), (None, Some(LegState::Tombstone)));
        assert_eq!(legs(&other, "old"), (None, Some(LegState::Tombstone)));
        assert_eq!(legs(&other, "kept"), (held, held));
        assert_eq!(legs(&other, "recent"), (None, Some(LegState::Posted)));
        assert_eq!(stored_keys(&other, TRANSACTIONS_BY_AGE), filed);
        assert_eq!(stored_keys(&other, TRANSACTIONS_HELD), filed_held);
        assert_eq!(stored_keys(&other, TRANSACTIONS), settled);
    }

    #[tokio::test]
    async fn settled_holds_live_on_disk_and_count_as_if_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
        let hold_id = |id: &str| TxnId::parse(id).unwrap();
        let usd = Currency::parse("USD").unwrap();
        let alice = AccountId::parse("alice").unwrap();
        let place = |id: &str| CommandKind::PlaceHold {
            hold_id: hold_id(id),
            account_id: alice.clone(),
            amount: Amount(5),
            currency: usd.clone(),
            metadata: Metadata::default(),
        };
        let void = |id: &str| CommandKind::VoidHold {
            hold_id: hold_id(id),
        };
        let capture = |id: &str| CommandKind::Batch {
            legs: [(&alice, -3), (&AccountId::parse("bob").unwrap(), 3)]
                .map(|(account_id, amount)| Leg {
                    account_id: account_id.clone(),
                    amount: Amount(amount),
                    currency: usd.clone(),
                })
                .to_vec(),
            txn_id: None,
            hold_id: Some(hold_id(id)),
            metadata: Metadata::default(),
        };
        let hold = |machine: &Machine, id: &str| {
            let id = hold_id(id);
            let held = machine.read(|app| app.ledger().hold(&id).map(|r| r.state.clone()));
            let read = machine.read_stored(|app, view| app.hold(view, &id));
            (held, read.unwrap().map(|record| record.state))
        };
        let opened = vec![
            command("open-alice", create("alice")),
            command("open-bob", create("bob")),
        ];
        apply(&mut machine, 1, 1_000, opened).await;
        let placed = vec![
            command("place-a", place("a")),
            command("place-b", place("b")),
            command("place-c", place("c")),
        ];
        apply(&mut machine, 2, 2_000, placed).await;
        let settled = vec![
            command("capture-a", capture("a")),
            command("void-b", void("b")),
        ];
        let settled = apply(&mut machine, 3, 3_000, settled).await;
        assert!(settled.iter().all(|result| result.outcome == Outcome::Ok));
        // Once written, a settled hold leaves memory; an open one stays. Readers find both.
        let captured = HoldState::Captured {
            txn_id: hold_id("a"),
            amount: Amount(3),
        };
        assert_eq!(hold(&machine, "a"), (None, Some(captured.clone())));
        assert_eq!(hold(&machine, "b"), (None, Some(HoldState::Voided)));
        let open = Some(HoldState::Open);
        assert_eq!(hold(&machine, "c"), (open.clone(), open.clone()));
        assert_eq!(stored_keys(&machine, HOLDS_PENDING), vec![b"c".to_vec()]);
        let settled = vec![b"a".to_vec(), b"b".to_vec()];
        assert_eq!(stored_keys(&machine, HOLDS), settled);

        // Commands naming a settled hold find it on disk: it is not placed, voided nor captured
        // again.
        let late = vec![
            command("place-a-2", place("a")),
            command("void-a", void("a")),
            command("capture-b", capture("b")),
        ];
        let late = apply(&mut machine, 4, 4_000, late).await;
        let outcomes: Vec<Outcome> = late.iter().map(|result| result.outcome).collect();
        let not_open = Outcome::HoldNotOpen;
        assert_eq!(outcomes, [Outcome::HoldAlreadyExists, not_open, not_open]);

        // A replica that loads from disk, or installs a snapshot, has the same holds.
        let other_dir = tempfile::tempdir().unwrap();
        let (machine, other) = machine.reload_and_copy(dir.path(), other_dir.path()).await;
        for replica in [&machine, &other] {
            assert_eq!(hold(replica, "a"), (None, Some(captured.clone())));
            assert_eq!(hold(replica, "b"), (None, Some(HoldState::Voided)));
            assert_eq!(hold(replica, "c"), (open.clone(), open.clone()));
            assert_eq!(stored_keys(replica, HOLDS_PENDING), vec![b"c".to_vec()]);
            assert_eq!(stored_keys(replica, HOLDS), settled);
        }
    }

    /// Every key of a family on disk.
    fn stored_keys(machine: &Machine, family: &str) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        machine
            .store()
            .view()
            .for_each_in(family, &[], None, |key, _| keys.push(key.to_vec()))
            .unwrap();
        keys
    }

    /// The keys by age of records, in key order.
    fn age_keys<'a>(records: impl IntoIterator<Item = (&'a str, i64)>) -> Vec<Vec<u8>> {
        let mut keys: Vec<_> = records
            .into_iter()
            .map(|(id, at_ms)| age_key(at_ms, id))
            .collect();
        keys.sort();
        keys
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the commands (retries and prunes among them), however the log packs them
        /// and wherever the replica restarts, it answers as a ledger that holds every record,
        /// and stores what it holds.
        #[test]
        fn a_replica_applies_as_a_ledger_that_holds_every_record(
            ops in prop::collection::vec(op(), 1..80),
            sizes in prop::collection::vec(1usize..8, 80),
            restart_after in 1usize..30,
        ) {
            let mut commands = setup_commands();
            for (index, op) in ops.iter().enumerate() {
                let command = to_command(op, index, &commands);
                commands.push(command);
            }
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut machine = open(&dir);
            let mut holding = Ledger::new();
            let (mut next, mut index) = (0, 0);
            while next < commands.len() {
                let entry = &commands[next..(next + sizes[index % sizes.len()]).min(commands.len())];
                let timestamp_ms = at(next);
                index += 1;
                next += entry.len();
                let results = runtime.block_on(apply(&mut machine, index as u64, timestamp_ms, entry.to_vec()));
                if index == restart_after {
                    // Loaded from the accounts' checkpoint and the events after it, then on.
                    let digest = machine.digest().unwrap();
                    drop(machine);
                    machine = open(&dir);
                    prop_assert_eq!(machine.digest().unwrap(), digest);
                }
                for (command, result) in entry.iter().zip(results) {
                    let expected = holding.apply(command, timestamp_ms);
                    prop_assert_eq!(
                        (result.outcome, result.duplicate, result.seq, result.detail_account_id),
                        (expected.outcome, expected.duplicate, expected.seq, expected.detail_account_id),
                        "{:?}", command
                    );
                }
                // On disk: every record that ledger holds, each filed by age.
                let all = holding.export();
                let store = machine.store();
                let view = store.view();
                prop_assert_eq!(read_dedup(&view).unwrap(), all.dedup.clone());
                let dedup_ages = all.dedup.iter().map(|(id, record)| (id.as_str(), record.at_ms));
                prop_assert_eq!(stored_keys(&machine, DEDUP_BY_AGE), age_keys(dedup_ages));
                let leg_ages = all.transactions.iter().map(|(id, record)| (id.as_str(), record.at_ms));
                prop_assert_eq!(stored_keys(&machine, TRANSACTIONS_BY_AGE), age_keys(leg_ages));
                // Each leg with those of its kind, held or settled; in memory: the held only.
                let (held, settled): (Vec<_>, Vec<_>) = all.transactions.iter().cloned().partition(|(_, record)| record.state == LegState::Held);
                let stored: Vec<(TxnId, TxnRecord)> = read_keyed(&view, TRANSACTIONS, "transaction", txn_key).unwrap();
                prop_assert_eq!(stored, settled);
                let stored: Vec<(TxnId, TxnRecord)> = read_keyed(&view, TRANSACTIONS_HELD, "transaction", txn_key).unwrap();
                prop_assert_eq!(&stored, &held);
                prop_assert_eq!(machine.read(|app| app.ledger().export().transactions), held);
                for (txn_id, record) in &all.transactions {
                    let read = machine.read_stored(|app, view| app.transaction(view, txn_id)).unwrap();
                    prop_assert_eq!(read.as_ref(), Some(record));
                }
                // Each hold with those of its kind, pending or settled; in memory: the pending only.
                let (pending, settled): (Vec<_>, Vec<_>) = all.holds.iter().cloned().partition(|(_, record)| record.is_pending());
                let stored: Vec<(TxnId, HoldRecord)> = read_keyed(&view, HOLDS, "hold", txn_key).unwrap();
                prop_assert_eq!(stored, settled);
                let stored: Vec<(TxnId, HoldRecord)> = read_keyed(&view, HOLDS_PENDING, "hold", txn_key).unwrap();
                prop_assert_eq!(&stored, &pending);
                prop_assert_eq!(machine.read(|app| app.ledger().export().holds), pending);
                for (hold_id, record) in &all.holds {
                    let read = machine.read_stored(|app, view| app.hold(view, hold_id)).unwrap();
                    prop_assert_eq!(read.as_ref(), Some(record));
                }
            }
            // Loaded from disk, it holds no idempotency record, no settled leg and no settled
            // hold, and has the same digest.
            let digest = machine.digest().unwrap();
            drop(machine);
            let machine = open(&dir);
            prop_assert_eq!(machine.digest().unwrap(), digest);
            let loaded = machine.read(|app| app.ledger().export());
            prop_assert!(loaded.dedup.is_empty());
            prop_assert!(loaded.transactions.iter().all(|(_, record)| record.state == LegState::Held));
            prop_assert!(loaded.holds.iter().all(|(_, record)| record.is_pending()));
        }
    }
}
