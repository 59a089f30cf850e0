//! The pure ledger core of a storage shard: accounts, money, commands, outcomes and events.
//!
//! Nothing here performs I/O, reads a clock or draws a random number. The Raft state machine
//! feeds it commands with the leader's timestamp and persists what `Ledger::apply` returns.

pub mod account;
pub mod command;
pub mod map;
pub mod outcome;
pub mod state;
pub mod types;

pub use account::{Account, AccountState};
pub use command::{Command, CommandKind, Leg, Limits};
pub use outcome::{Outcome, Rejection};
pub use state::{
    Applied, Changes, DedupRecord, Event, HoldRecord, HoldState, Ledger, LedgerState, LegState,
    TxnRecord,
};
pub use types::{AccountId, Amount, Currency, Metadata, Owner, ParseError, RequestId, TxnId};

#[cfg(test)]
pub(crate) mod tests;
