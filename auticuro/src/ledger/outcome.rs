//! Business outcomes: a closed set of values, replicated and stored with each request id.
//! `Err` is never used for these; it is reserved for I/O failures and bugs.

use serde::{Deserialize, Serialize};

/// The result of applying one command. Every value but `Ok` leaves the state untouched.
/// The numbers are the protobuf `Outcome` values and never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Outcome {
    Ok = 1,
    InsufficientFunds = 2,
    LimitExceeded = 3,
    AccountNotFound = 4,
    AccountFrozen = 5,
    AccountClosed = 6,
    CurrencyMismatch = 7,
    DuplicateWithDifferentPayload = 8,
    AccountAlreadyExists = 9,
    InvalidAmount = 10,
    SelfTransfer = 11,
    DuplicateAccountInBatch = 12,
    NotZeroSum = 13,
    BatchTooLarge = 14,
    InvalidAccountId = 15,
    InvalidCurrency = 16,
    InvalidLimits = 17,
    AccountNotEmpty = 18,
    TransactionTombstoned = 19,
    LegNotHeld = 20,
    TransactionOwnedByOther = 21,
    TransactionAlreadyReserved = 22,
    TransactionNotFound = 23,
    InvalidRequestId = 24,
    InvalidMetadata = 25,
    AccountNotActive = 26,
    AmountOverflow = 27,
    CoordinatorFenced = 28,
    HoldNotFound = 29,
    /// The hold is being captured, captured or voided.
    HoldNotOpen = 30,
    HoldAlreadyExists = 31,
    /// A capture of more than the hold authorized.
    HoldExceeded = 32,
    /// A capture whose debit is not one leg on the hold's account and currency.
    HoldMismatch = 33,
}

impl Outcome {
    pub const ALL: [Outcome; 33] = [
        Outcome::Ok,
        Outcome::InsufficientFunds,
        Outcome::LimitExceeded,
        Outcome::AccountNotFound,
        Outcome::AccountFrozen,
        Outcome::AccountClosed,
        Outcome::CurrencyMismatch,
        Outcome::DuplicateWithDifferentPayload,
        Outcome::AccountAlreadyExists,
        Outcome::InvalidAmount,
        Outcome::SelfTransfer,
        Outcome::DuplicateAccountInBatch,
        Outcome::NotZeroSum,
        Outcome::BatchTooLarge,
        Outcome::InvalidAccountId,
        Outcome::InvalidCurrency,
        Outcome::InvalidLimits,
        Outcome::AccountNotEmpty,
        Outcome::TransactionTombstoned,
        Outcome::LegNotHeld,
        Outcome::TransactionOwnedByOther,
        Outcome::TransactionAlreadyReserved,
        Outcome::TransactionNotFound,
        Outcome::InvalidRequestId,
        Outcome::InvalidMetadata,
        Outcome::AccountNotActive,
        Outcome::AmountOverflow,
        Outcome::CoordinatorFenced,
        Outcome::HoldNotFound,
        Outcome::HoldNotOpen,
        Outcome::HoldAlreadyExists,
        Outcome::HoldExceeded,
        Outcome::HoldMismatch,
    ];

    pub fn is_ok(self) -> bool {
        self == Outcome::Ok
    }

    /// The outcome with this protobuf number.
    pub fn from_number(number: i32) -> Option<Outcome> {
        Outcome::ALL
            .into_iter()
            .find(|outcome| *outcome as i32 == number)
    }
}

/// A business rejection: the outcome and, when one account caused it, that account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub outcome: Outcome,
    pub account_id: Option<super::types::AccountId>,
}

impl Rejection {
    pub fn new(outcome: Outcome) -> Rejection {
        Rejection {
            outcome,
            account_id: None,
        }
    }

    pub fn on(outcome: Outcome, account_id: &super::types::AccountId) -> Rejection {
        Rejection {
            outcome,
            account_id: Some(account_id.clone()),
        }
    }
}
