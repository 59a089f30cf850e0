//! The ledger as a Raft application: applies commands through `ledger::Ledger`, persists what
//! each command changed in RocksDB, keeps the event log, and wakes event subscribers.

use consensus::{App, AppView, Error, Writes, decode, encode, event_log};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::ledger::{
    Account, AccountId, Command, CommandKind, DedupRecord, HoldRecord, Ledger, LedgerState,
    Outcome, RequestId, TxnId, TxnRecord,
};

const ACCOUNTS: &str = "accounts";
const TRANSACTIONS: &str = "transactions";
const HOLDS: &str = "holds";
const DEDUP: &str = "dedup";
/// The idempotency records' keys by stamp: [`age_key`] → nothing, for prunes.
const DEDUP_BY_AGE: &str = "dedup_by_age";
const LEDGER_META: &str = "ledger_meta";
const FENCES: &[u8] = b"fences";

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

/// Everything a snapshot carries: the ledger state and the whole event log (each event's seq and
/// stored bytes), so a replica that catches up through a snapshot can serve `Subscribe` and
/// `ReadEvents` from seq 1.
#[derive(Serialize, Deserialize)]
pub struct LedgerSnapshot {
    pub state: LedgerState,
    pub events: Vec<(u64, Vec<u8>)>,
}

impl LedgerSnapshot {
    /// Reads a snapshot sent by the leader (bytes from the network).
    pub fn decode(bytes: &[u8]) -> Result<LedgerSnapshot, Error> {
        decode("ledger snapshot", bytes)
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

/// The ledger holds idempotency records only until they are on disk ([`App::persisted`]): the
/// retention's records (a week of every command, by default) would not fit in memory. A command
/// whose request id the ledger does not hold looks for its record in the DEDUP family first (bloom
/// filters answer for the new ids), so every replica sees the same records whatever it has
/// evicted or loaded, and applies the same outcomes.
pub struct LedgerMachine {
    ledger: Ledger,
    applied_seq: watch::Sender<u64>,
    /// The cutoff of a prune applied since the last write reached the disk: the records it
    /// deletes are on disk until the write, and no longer count.
    pruning_below_ms: Option<i64>,
}

fn read_all<T: serde::de::DeserializeOwned>(
    store: &AppView<'_>,
    family: &str,
    what: &'static str,
) -> Result<Vec<T>, Error> {
    store
        .scan_from(family, &[], usize::MAX)?
        .iter()
        .map(|(_, value)| decode(what, value))
        .collect()
}

impl LedgerMachine {
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Hands the ledger the stored record of a request id it does not hold, unless a prune
    /// since the last write has deleted it.
    fn recall_dedup(&mut self, request_id: &RequestId, writes: &mut Writes<'_>) {
        if self.ledger.dedup_record(request_id).is_some() {
            return;
        }
        let stored: Option<DedupRecord> =
            writes.get_committed(DEDUP, request_id.as_str().as_bytes(), "dedup record");
        if let Some(record) = stored
            && self
                .pruning_below_ms
                .is_none_or(|cutoff| record.at_ms >= cutoff)
        {
            self.ledger.recall_dedup(request_id.clone(), record);
        }
    }

    /// Deletes the stored records older than a prune's cutoff (the ledger forgot those it held).
    /// Those below an earlier prune's cutoff since the last write are deleted already: one of
    /// their ids may have a new record since, which must stay.
    fn prune_stored_dedup(&mut self, older_than_ms: i64, writes: &mut Writes<'_>) {
        let start = self.pruning_below_ms.map_or([0; 8], age_prefix);
        let end = age_prefix(older_than_ms);
        if start >= end {
            return;
        }
        for (key, _) in writes.scan_committed(DEDUP_BY_AGE, &start, &end) {
            writes.delete(DEDUP, &key[8..]);
            writes.delete(DEDUP_BY_AGE, &key);
        }
        self.pruning_below_ms = Some(older_than_ms);
    }

    /// Watches the last applied (and persisted) event seq.
    pub fn subscribe_applied_seq(&self) -> watch::Receiver<u64> {
        self.applied_seq.subscribe()
    }

    fn write_state(state: &LedgerState, writes: &mut Writes<'_>) {
        for account in &state.accounts {
            writes.put_encoded(ACCOUNTS, account.id.as_str().as_bytes(), account);
        }
        for (txn_id, record) in &state.transactions {
            writes.put_encoded(TRANSACTIONS, txn_id.as_str().as_bytes(), record);
        }
        for (hold_id, record) in &state.holds {
            writes.put_encoded(HOLDS, hold_id.as_str().as_bytes(), record);
        }
        for (request_id, record) in &state.dedup {
            put_dedup(writes, request_id, record);
        }
        writes.put_encoded(LEDGER_META, FENCES, &state.fences);
    }
}

impl App for LedgerMachine {
    type Request = Command;
    type Response = CommandResult;

    const COLUMN_FAMILIES: &'static [&'static str] = &[
        ACCOUNTS,
        TRANSACTIONS,
        HOLDS,
        DEDUP,
        DEDUP_BY_AGE,
        event_log::EVENTS,
        LEDGER_META,
    ];

    const REWRITTEN_FAMILIES: &'static [&'static str] = &[ACCOUNTS];

    const READ_FAMILIES: &'static [&'static str] = &[DEDUP, DEDUP_BY_AGE];

    /// 2: events are stored as protobuf (`events::write_stored`), no longer postcard.
    /// 3: idempotency records are also filed by age (`DEDUP_BY_AGE`).
    const STORAGE_FORMAT: u32 = 3;

    fn load(store: &AppView<'_>) -> Result<Self, Error> {
        let state = read_state(store)?;
        let (applied_seq, _) = watch::channel(state.last_seq);
        Ok(LedgerMachine {
            ledger: Ledger::import(state),
            applied_seq,
            pruning_below_ms: None,
        })
    }

    fn apply(
        &mut self,
        command: &Command,
        timestamp_ms: i64,
        writes: &mut Writes<'_>,
    ) -> CommandResult {
        self.recall_dedup(&command.request_id, writes);
        let applied = self.ledger.apply(command, timestamp_ms);
        if let Some(event) = &applied.event {
            for account in &event.accounts {
                writes.put_encoded(ACCOUNTS, account.id.as_str().as_bytes(), account);
            }
            event_log::append_written(writes, event.seq, |buffer| {
                crate::events::write_stored(event, buffer)
            });
            if matches!(event.command.kind, CommandKind::FenceCoordinator { .. }) {
                writes.put_encoded(LEDGER_META, FENCES, &self.ledger.fences());
            }
        }
        for (txn_id, record) in &applied.changes.transactions {
            writes.put_encoded(TRANSACTIONS, txn_id.as_str().as_bytes(), record);
        }
        for (hold_id, record) in &applied.changes.holds {
            writes.put_encoded(HOLDS, hold_id.as_str().as_bytes(), record);
        }
        if let Some((request_id, record)) = &applied.changes.dedup_inserted {
            put_dedup(writes, request_id, record);
        }
        let pruned = &applied.changes.pruned;
        for (at_ms, request_id) in &pruned.dedup {
            writes.delete(DEDUP, request_id.as_str().as_bytes());
            writes.delete(DEDUP_BY_AGE, &age_key(*at_ms, request_id));
        }
        for txn_id in &pruned.transactions {
            writes.delete(TRANSACTIONS, txn_id.as_str().as_bytes());
        }
        if let (Some(_), CommandKind::PruneDedup { older_than_ms }) =
            (&applied.event, &command.kind)
        {
            self.prune_stored_dedup(*older_than_ms, writes);
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
        self.pruning_below_ms = None;
        self.applied_seq.send_replace(self.ledger.last_seq());
    }

    fn snapshot(view: &AppView<'_>) -> Result<Vec<u8>, Error> {
        let mut state = read_state(view)?;
        state.dedup = read_dedup(view)?;
        Ok(LedgerSnapshot {
            state,
            events: event_log::read_stored(view, 1, u64::MAX, usize::MAX)?,
        }
        .encode())
    }

    fn install(&mut self, snapshot: &[u8], writes: &mut Writes<'_>) -> Result<(), Error> {
        let mut snapshot = LedgerSnapshot::decode(snapshot)?;
        Self::write_state(&snapshot.state, writes);
        for (seq, stored) in &snapshot.events {
            event_log::append_written(writes, *seq, |buffer| buffer.extend_from_slice(stored));
        }
        snapshot.state.dedup.clear();
        self.ledger = Ledger::import(snapshot.state);
        Ok(())
    }

    /// The ledger's digest (which holds no idempotency records between apply calls) and every
    /// record on disk.
    fn digest(&self, view: &AppView<'_>) -> Result<[u8; 32], Error> {
        let mut hasher = Sha256::new();
        hasher.update(self.ledger.digest());
        view.hash_rows(DEDUP, |bytes| hasher.update(bytes))?;
        Ok(hasher.finalize().into())
    }

    fn applied_seq(&self) -> u64 {
        self.ledger.last_seq()
    }
}

/// The ledger state persisted in the column families, but for the idempotency records.
fn read_state(store: &AppView<'_>) -> Result<LedgerState, Error> {
    let last_seq = event_log::last_seq(store)?;
    let accounts: Vec<Account> = read_all(store, ACCOUNTS, "account")?;
    let transactions: Vec<(TxnId, TxnRecord)> = store
        .scan_from(TRANSACTIONS, &[], usize::MAX)?
        .iter()
        .map(|(key, value)| Ok((txn_key(key)?, decode("transaction", value)?)))
        .collect::<Result<_, Error>>()?;
    let holds: Vec<(TxnId, HoldRecord)> = store
        .scan_from(HOLDS, &[], usize::MAX)?
        .iter()
        .map(|(key, value)| Ok((txn_key(key)?, decode("hold", value)?)))
        .collect::<Result<_, Error>>()?;
    let fences = match store.get(LEDGER_META, FENCES)? {
        Some(bytes) => decode("fences", &bytes)?,
        None => Vec::new(),
    };
    Ok(LedgerState {
        last_seq,
        accounts,
        transactions,
        holds,
        dedup: Vec::new(),
        fences,
    })
}

/// Every stored idempotency record, by request id.
fn read_dedup(store: &AppView<'_>) -> Result<Vec<(RequestId, DedupRecord)>, Error> {
    store
        .scan_from(DEDUP, &[], usize::MAX)?
        .iter()
        .map(|(key, value)| Ok((request_key(key)?, decode("dedup record", value)?)))
        .collect()
}

fn put_dedup(writes: &mut Writes<'_>, request_id: &RequestId, record: &DedupRecord) {
    writes.put_encoded(DEDUP, request_id.as_str().as_bytes(), record);
    writes.put(DEDUP_BY_AGE, &age_key(record.at_ms, request_id), &[]);
}

/// A record's key in `DEDUP_BY_AGE`: its stamp, ordered as numbers are, then its request id.
fn age_key(at_ms: i64, request_id: &RequestId) -> Vec<u8> {
    let mut key = age_prefix(at_ms).to_vec();
    key.extend_from_slice(request_id.as_str().as_bytes());
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

fn request_key(key: &[u8]) -> Result<RequestId, Error> {
    RequestId::parse(key_text(key)?).map_err(|error| Error::Corrupt(error.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use consensus::{Proposal, RaftMetrics, StateMachineStore, TypeConfig, open_storage};
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use prometheus_client::registry::Registry;
    use proptest::prelude::*;

    use super::*;
    use crate::ledger::tests::{at, op, setup_commands, to_command};
    use crate::ledger::{Amount, Currency, Limits, Metadata};

    type Machine = StateMachineStore<LedgerMachine>;

    fn open(dir: &tempfile::TempDir) -> Machine {
        let metrics = RaftMetrics::register(&mut Registry::default());
        open_storage::<LedgerMachine>(dir.path(), 1, &metrics)
            .unwrap()
            .1
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
        let digest = machine.digest().unwrap();
        drop(machine);
        let mut machine = open(&dir);
        assert_eq!(machine.digest().unwrap(), digest);
        let snapshot = machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let current = machine.get_current_snapshot().await.unwrap().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let mut other = open(&other_dir);
        other
            .install_snapshot(&snapshot.meta, current.snapshot)
            .await
            .unwrap();
        assert_eq!(other.digest().unwrap(), digest);
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
        let (records, by_age) = stored(&machine);
        let ids = ["pay", "pay-twice", "prune", "prune-again"];
        let stamps: Vec<(&str, i64)> = records
            .iter()
            .map(|(id, record)| (id.as_str(), record.at_ms))
            .collect();
        assert_eq!(stamps, ids.map(|id| (id, 4_000)));
        let expected = ids.map(|id| age_key(4_000, &RequestId::parse(id).unwrap()));
        assert_eq!(by_age, expected);
    }

    /// The records on disk, and their keys by age.
    fn stored(machine: &Machine) -> (Vec<(RequestId, DedupRecord)>, Vec<Vec<u8>>) {
        let store = machine.store();
        let view = store.view();
        let records = read_dedup(&view).unwrap();
        let mut by_age = Vec::new();
        view.for_each_in(DEDUP_BY_AGE, &[], None, |key, _| by_age.push(key.to_vec()))
            .unwrap();
        (records, by_age)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the commands (retries and prunes among them) and however the log packs
        /// them, a replica answers as a ledger that holds every record, and stores what it
        /// holds.
        #[test]
        fn a_replica_applies_as_a_ledger_that_holds_every_record(
            ops in prop::collection::vec(op(), 1..80),
            sizes in prop::collection::vec(1usize..8, 80),
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
                for (command, result) in entry.iter().zip(results) {
                    let expected = holding.apply(command, timestamp_ms);
                    prop_assert_eq!(
                        (result.outcome, result.duplicate, result.seq, result.detail_account_id),
                        (expected.outcome, expected.duplicate, expected.seq, expected.detail_account_id),
                        "{:?}", command
                    );
                }
                let held = holding.export().dedup;
                let by_age: Vec<Vec<u8>> = {
                    let mut keys: Vec<_> = held.iter().map(|(id, record)| age_key(record.at_ms, id)).collect();
                    keys.sort();
                    keys
                };
                prop_assert_eq!(stored(&machine), (held, by_age));
            }
            // Loaded from disk, it holds no record and has the same digest.
            let digest = machine.digest().unwrap();
            drop(machine);
            let machine = open(&dir);
            prop_assert_eq!(machine.digest().unwrap(), digest);
            prop_assert!(machine.read(|app| app.ledger().export().dedup.is_empty()));
        }
    }
}
