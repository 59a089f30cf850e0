//! The ledger as a Raft application: applies commands through `ledger::Ledger`, persists what
//! each command changed in RocksDB, keeps the event log, and wakes event subscribers.

use consensus::{App, AppView, Error, Writes, decode, encode, event_log};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ledger::{
    Account, AccountId, Command, CommandKind, DedupRecord, HoldRecord, Ledger, LedgerState,
    Outcome, RequestId, TxnId, TxnRecord,
};

const ACCOUNTS: &str = "accounts";
const TRANSACTIONS: &str = "transactions";
const HOLDS: &str = "holds";
const DEDUP: &str = "dedup";
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

pub struct LedgerMachine {
    ledger: Ledger,
    applied_seq: watch::Sender<u64>,
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
            writes.put_encoded(DEDUP, request_id.as_str().as_bytes(), record);
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
        event_log::EVENTS,
        LEDGER_META,
    ];

    const REWRITTEN_FAMILIES: &'static [&'static str] = &[ACCOUNTS];

    /// 2: events are stored as protobuf (`events::write_stored`), no longer postcard.
    const STORAGE_FORMAT: u32 = 2;

    fn load(store: &AppView<'_>) -> Result<Self, Error> {
        let state = read_state(store)?;
        let (applied_seq, _) = watch::channel(state.last_seq);
        Ok(LedgerMachine {
            ledger: Ledger::import(state),
            applied_seq,
        })
    }

    fn apply(
        &mut self,
        command: &Command,
        timestamp_ms: i64,
        writes: &mut Writes<'_>,
    ) -> CommandResult {
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
            writes.put_encoded(DEDUP, request_id.as_str().as_bytes(), record);
        }
        let pruned = &applied.changes.pruned;
        for request_id in &pruned.dedup {
            writes.delete(DEDUP, request_id.as_str().as_bytes());
        }
        for txn_id in &pruned.transactions {
            writes.delete(TRANSACTIONS, txn_id.as_str().as_bytes());
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
        self.applied_seq.send_replace(self.ledger.last_seq());
    }

    fn snapshot(view: &AppView<'_>) -> Result<Vec<u8>, Error> {
        Ok(LedgerSnapshot {
            state: read_state(view)?,
            events: event_log::read_stored(view, 1, u64::MAX, usize::MAX)?,
        }
        .encode())
    }

    fn install(&mut self, snapshot: &[u8], writes: &mut Writes<'_>) -> Result<(), Error> {
        let snapshot = LedgerSnapshot::decode(snapshot)?;
        Self::write_state(&snapshot.state, writes);
        for (seq, stored) in &snapshot.events {
            event_log::append_written(writes, *seq, |buffer| buffer.extend_from_slice(stored));
        }
        self.ledger = Ledger::import(snapshot.state);
        Ok(())
    }

    fn digest(&self) -> [u8; 32] {
        self.ledger.digest()
    }

    fn applied_seq(&self) -> u64 {
        self.ledger.last_seq()
    }
}

/// The ledger state persisted in the column families.
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
    let dedup: Vec<(RequestId, DedupRecord)> = store
        .scan_from(DEDUP, &[], usize::MAX)?
        .iter()
        .map(|(key, value)| Ok((request_key(key)?, decode("dedup record", value)?)))
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
        dedup,
        fences,
    })
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
