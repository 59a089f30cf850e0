//! The commands a storage shard applies, as core types. The gRPC edge converts the protobuf
//! contract into these; the Raft log carries them.

use serde::{Deserialize, Serialize};

use super::types::{AccountId, Amount, Currency, Metadata, Owner, RequestId, TxnId};

/// An account's limits. `lower` bounds `available = balance - pending_out` after debits;
/// `upper` bounds `balance + pending_in` after credits. `None` is unbounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limits {
    pub lower: Option<Amount>,
    pub upper: Option<Amount>,
}

impl Limits {
    /// Customer accounts by default: no overdraft, no ceiling.
    pub const NO_OVERDRAFT: Limits = Limits {
        lower: Some(Amount::ZERO),
        upper: None,
    };
    /// System accounts such as `sys:funding:USD` may go negative without bound.
    pub const UNBOUNDED: Limits = Limits {
        lower: None,
        upper: None,
    };
}

/// One signed movement: negative debits, positive credits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Leg {
    pub account_id: AccountId,
    pub amount: Amount,
    pub currency: Currency,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandKind {
    CreateAccount {
        account_id: AccountId,
        currency: Currency,
        scale: u8,
        limits: Limits,
        metadata: Metadata,
    },
    UpdateLimits {
        account_id: AccountId,
        limits: Limits,
    },
    Freeze {
        account_id: AccountId,
    },
    Unfreeze {
        account_id: AccountId,
    },
    Close {
        account_id: AccountId,
    },
    Transfer {
        from: AccountId,
        to: AccountId,
        amount: Amount,
        currency: Currency,
        metadata: Metadata,
    },
    /// With `hold_id`, the batch's one debit leg draws from that open hold: the hold is
    /// captured (its remainder released) in the same command.
    Batch {
        legs: Vec<Leg>,
        txn_id: Option<TxnId>,
        hold_id: Option<TxnId>,
        metadata: Metadata,
    },
    /// With `hold_id`, the reservation's one debit leg draws from that open hold instead of the
    /// available balance; the post captures the hold, a void reopens it.
    Reserve {
        txn_id: TxnId,
        owner: Owner,
        legs: Vec<Leg>,
        hold_id: Option<TxnId>,
        metadata: Metadata,
    },
    Post {
        txn_id: TxnId,
        owner: Owner,
    },
    Void {
        txn_id: TxnId,
        owner: Owner,
    },
    /// Authorizes `amount` on an account: it moves into `pending_out` (checked against the lower
    /// limit) until the hold is captured by a transaction or voided.
    PlaceHold {
        hold_id: TxnId,
        account_id: AccountId,
        amount: Amount,
        currency: Currency,
        metadata: Metadata,
    },
    /// Releases an open hold.
    VoidHold {
        hold_id: TxnId,
    },
    /// Forgets idempotency records stamped before `older_than_ms` (leader time), and the settled
    /// two-phase legs (posted, voided, tombstones) reserved before it. Held legs stay, however
    /// old, and so do authorization holds (clients read them).
    PruneDedup {
        older_than_ms: i64,
    },
    /// Refuses two-phase messages of a coordinator with an epoch below `below_epoch`.
    FenceCoordinator {
        coordinator_shard_id: u32,
        below_epoch: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Command {
    pub request_id: RequestId,
    pub kind: CommandKind,
}

impl Command {
    /// Posts (on a commit) or voids (on an abort) a coordinator transaction's legs on one shard,
    /// with the request id every sender of that step uses.
    pub fn settle(txn_id: &TxnId, owner: Owner, shard_id: u32, commit: bool) -> Command {
        let step = if commit { "post" } else { "void" };
        let request_id = RequestId::for_step(txn_id, step, shard_id);
        let txn_id = txn_id.clone();
        let kind = if commit {
            CommandKind::Post { txn_id, owner }
        } else {
            CommandKind::Void { txn_id, owner }
        };
        Command { request_id, kind }
    }
}

impl CommandKind {
    /// The coordinator transaction (or the hold) a command belongs to, when it belongs to one.
    pub fn txn_id(&self) -> Option<&TxnId> {
        match self {
            CommandKind::Batch { txn_id, .. } => txn_id.as_ref(),
            CommandKind::Reserve { txn_id, .. }
            | CommandKind::Post { txn_id, .. }
            | CommandKind::Void { txn_id, .. } => Some(txn_id),
            CommandKind::PlaceHold { hold_id, .. } | CommandKind::VoidHold { hold_id } => {
                Some(hold_id)
            }
            _ => None,
        }
    }

    /// The authorization hold whose record the command reads: the one it places or voids, or
    /// the one a batch or a reservation draws from.
    pub fn hold_id(&self) -> Option<&TxnId> {
        match self {
            CommandKind::PlaceHold { hold_id, .. } | CommandKind::VoidHold { hold_id } => {
                Some(hold_id)
            }
            CommandKind::Batch { hold_id, .. } | CommandKind::Reserve { hold_id, .. } => {
                hold_id.as_ref()
            }
            _ => None,
        }
    }

    /// A post or a void: idempotent by its transaction, it keeps no idempotency record
    /// (`Ledger::apply`).
    pub fn is_settle(&self) -> bool {
        matches!(self, CommandKind::Post { .. } | CommandKind::Void { .. })
    }

    /// The transaction whose two-phase record (`Reserve`, `Post`, `Void`) the command reads.
    pub fn two_phase_txn_id(&self) -> Option<&TxnId> {
        match self {
            CommandKind::Reserve { txn_id, .. }
            | CommandKind::Post { txn_id, .. }
            | CommandKind::Void { txn_id, .. } => Some(txn_id),
            _ => None,
        }
    }
}
