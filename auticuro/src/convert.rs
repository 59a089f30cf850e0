//! The gRPC edge: protobuf messages into ledger commands (every field validated, a bad one
//! becomes a typed outcome) and ledger results back into protobuf.

use std::collections::BTreeMap;

use proto::auticuro::v1 as pb;
use proto::common::v1::Amount as PbAmount;

use crate::ledger::{
    Account, AccountId, AccountState, Amount, Command, CommandKind, Currency, HoldRecord,
    HoldState, Leg, Limits, Metadata, Outcome, Owner, RequestId, TxnId,
};
use crate::machine::CommandResult;

/// Why a protobuf command could not become a ledger command: the outcome to answer with.
pub type Invalid = Outcome;

fn account_id(text: &str) -> Result<AccountId, Invalid> {
    AccountId::parse(text).map_err(|_| Outcome::InvalidAccountId)
}

fn txn_id(text: &str) -> Result<TxnId, Invalid> {
    TxnId::parse(text).map_err(|_| Outcome::InvalidRequestId)
}

/// An optional id field: empty means absent.
pub fn optional_txn_id(text: &str) -> Result<Option<TxnId>, Invalid> {
    (!text.is_empty()).then(|| txn_id(text)).transpose()
}

pub fn pb_optional_id(id: &Option<TxnId>) -> String {
    id.as_ref().map(ToString::to_string).unwrap_or_default()
}

fn currency(text: &str) -> Result<Currency, Invalid> {
    Currency::parse(text).map_err(|_| Outcome::InvalidCurrency)
}

fn amount(value: Option<&PbAmount>) -> Result<Amount, Invalid> {
    let value = value.ok_or(Outcome::InvalidAmount)?;
    Amount::parse_minor_units(&value.minor_units).map_err(|_| Outcome::InvalidAmount)
}

fn optional_amount(value: Option<&PbAmount>) -> Result<Option<Amount>, Invalid> {
    value.map(|value| amount(Some(value))).transpose()
}

pub fn metadata(entries: &BTreeMap<String, String>) -> Result<Metadata, Invalid> {
    let sorted: BTreeMap<String, String> = entries
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Metadata::new(sorted).map_err(|_| Outcome::InvalidMetadata)
}

fn owner(value: Option<&pb::Owner>) -> Result<Owner, Invalid> {
    let value = value.ok_or(Outcome::InvalidRequestId)?;
    Ok(Owner {
        coordinator_shard_id: value.coordinator_shard_id,
        epoch: value.epoch,
    })
}

pub fn legs(values: &[pb::Leg]) -> Result<Vec<Leg>, Invalid> {
    values
        .iter()
        .map(|leg| {
            Ok(Leg {
                account_id: account_id(&leg.account_id)?,
                amount: amount(leg.amount.as_ref())?,
                currency: currency(&leg.currency)?,
            })
        })
        .collect()
}

/// Lower limit: absent means the safe default of no overdraft, unless `no_lower_limit` says the
/// account (a system funding account, say) may go negative without bound.
fn limits(
    lower: Option<&PbAmount>,
    no_lower_limit: bool,
    upper: Option<&PbAmount>,
) -> Result<Limits, Invalid> {
    let lower = if no_lower_limit {
        None
    } else {
        Some(optional_amount(lower)?.unwrap_or(Amount::ZERO))
    };
    Ok(Limits {
        lower,
        upper: optional_amount(upper)?,
    })
}

pub fn command(command: Option<&pb::Command>) -> Result<Command, Invalid> {
    use pb::command::Kind;
    let command = command.ok_or(Outcome::InvalidRequestId)?;
    let request_id =
        RequestId::parse(&command.request_id).map_err(|_| Outcome::InvalidRequestId)?;
    let kind = match command.kind.as_ref().ok_or(Outcome::InvalidRequestId)? {
        Kind::CreateAccount(create) => CommandKind::CreateAccount {
            account_id: account_id(&create.account_id)?,
            currency: currency(&create.currency)?,
            scale: u8::try_from(create.scale).map_err(|_| Outcome::InvalidCurrency)?,
            limits: limits(
                create.lower_limit.as_ref(),
                create.no_lower_limit,
                create.upper_limit.as_ref(),
            )?,
            metadata: metadata(&create.metadata)?,
        },
        Kind::UpdateLimits(update) => CommandKind::UpdateLimits {
            account_id: account_id(&update.account_id)?,
            limits: limits(
                update.lower_limit.as_ref(),
                update.no_lower_limit,
                update.upper_limit.as_ref(),
            )?,
        },
        Kind::Freeze(freeze) => CommandKind::Freeze {
            account_id: account_id(&freeze.account_id)?,
        },
        Kind::Unfreeze(unfreeze) => CommandKind::Unfreeze {
            account_id: account_id(&unfreeze.account_id)?,
        },
        Kind::Close(close) => CommandKind::Close {
            account_id: account_id(&close.account_id)?,
        },
        Kind::Transfer(transfer) => CommandKind::Transfer {
            from: account_id(&transfer.from_account_id)?,
            to: account_id(&transfer.to_account_id)?,
            amount: amount(transfer.amount.as_ref())?,
            currency: currency(&transfer.currency)?,
            metadata: metadata(&transfer.metadata)?,
        },
        Kind::Batch(batch) => CommandKind::Batch {
            legs: legs(&batch.legs)?,
            txn_id: optional_txn_id(&batch.txn_id)?,
            hold_id: optional_txn_id(&batch.hold_id)?,
            metadata: metadata(&batch.metadata)?,
        },
        Kind::Reserve(reserve) => CommandKind::Reserve {
            txn_id: txn_id(&reserve.txn_id)?,
            owner: owner(reserve.owner.as_ref())?,
            legs: legs(&reserve.legs)?,
            hold_id: optional_txn_id(&reserve.hold_id)?,
            metadata: metadata(&reserve.metadata)?,
        },
        Kind::PlaceHold(hold) => CommandKind::PlaceHold {
            hold_id: txn_id(&hold.hold_id)?,
            account_id: account_id(&hold.account_id)?,
            amount: amount(hold.amount.as_ref())?,
            currency: currency(&hold.currency)?,
            metadata: metadata(&hold.metadata)?,
        },
        Kind::VoidHold(void) => CommandKind::VoidHold {
            hold_id: txn_id(&void.hold_id)?,
        },
        Kind::Post(post) => CommandKind::Post {
            txn_id: txn_id(&post.txn_id)?,
            owner: owner(post.owner.as_ref())?,
        },
        Kind::Void(void) => CommandKind::Void {
            txn_id: txn_id(&void.txn_id)?,
            owner: owner(void.owner.as_ref())?,
        },
        Kind::PruneDedup(prune) => CommandKind::PruneDedup {
            older_than_ms: prune.older_than_ms,
        },
        Kind::FenceCoordinator(fence) => CommandKind::FenceCoordinator {
            coordinator_shard_id: fence.coordinator_shard_id,
            below_epoch: fence.below_epoch,
        },
    };
    Ok(Command { request_id, kind })
}

pub fn pb_amount(amount: Amount) -> PbAmount {
    PbAmount {
        minor_units: amount.0.to_string(),
    }
}

/// The name of an account state as the APIs and the read side's tables show it (`active`,
/// `frozen`, `closed`).
pub fn state_name(state: i32) -> &'static str {
    match pb::AccountState::try_from(state) {
        Ok(pb::AccountState::Active) => "active",
        Ok(pb::AccountState::Frozen) => "frozen",
        Ok(pb::AccountState::Closed) => "closed",
        _ => "unknown",
    }
}

pub fn outcome(outcome: Outcome) -> pb::Outcome {
    pb::Outcome::try_from(outcome as i32).expect("core outcomes are the protobuf values")
}

pub fn account(account: &Account) -> pb::Account {
    pb::Account {
        account_id: account.id.to_string(),
        currency: account.currency.to_string(),
        scale: u32::from(account.scale),
        state: match account.state {
            AccountState::Active => pb::AccountState::Active,
            AccountState::Frozen => pb::AccountState::Frozen,
            AccountState::Closed => pb::AccountState::Closed,
        } as i32,
        balance: Some(pb_amount(account.balance)),
        pending_out: Some(pb_amount(account.pending_out)),
        pending_in: Some(pb_amount(account.pending_in)),
        lower_limit: account.limits.lower.map(pb_amount),
        upper_limit: account.limits.upper.map(pb_amount),
        version: account.version,
        metadata: account
            .metadata
            .entries()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The inverse of [`account`]: an account as an event carries it, read back when a replica
/// loads (`events::stored_accounts`).
pub fn stored_account(value: &pb::Account) -> Result<Account, Invalid> {
    Ok(Account {
        id: account_id(&value.account_id)?,
        currency: currency(&value.currency)?,
        scale: u8::try_from(value.scale).map_err(|_| Outcome::InvalidCurrency)?,
        state: match pb::AccountState::try_from(value.state) {
            Ok(pb::AccountState::Active) => AccountState::Active,
            Ok(pb::AccountState::Frozen) => AccountState::Frozen,
            Ok(pb::AccountState::Closed) => AccountState::Closed,
            _ => return Err(Outcome::InvalidAccountId),
        },
        balance: amount(value.balance.as_ref())?,
        pending_out: amount(value.pending_out.as_ref())?,
        pending_in: amount(value.pending_in.as_ref())?,
        limits: Limits {
            lower: optional_amount(value.lower_limit.as_ref())?,
            upper: optional_amount(value.upper_limit.as_ref())?,
        },
        version: value.version,
        metadata: metadata(&value.metadata)?,
    })
}

pub fn rejection(invalid: Invalid) -> pb::CommandResult {
    pb::CommandResult {
        outcome: outcome(invalid) as i32,
        ..Default::default()
    }
}

pub fn command_result(result: &CommandResult) -> pb::CommandResult {
    pb::CommandResult {
        outcome: outcome(result.outcome) as i32,
        duplicate: result.duplicate,
        seq: result.seq,
        detail_account_id: result
            .detail_account_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        accounts: result.accounts.iter().map(account).collect(),
    }
}

pub fn pb_leg(leg: &Leg) -> pb::Leg {
    pb::Leg {
        account_id: leg.account_id.to_string(),
        amount: Some(pb_amount(leg.amount)),
        currency: leg.currency.to_string(),
    }
}

pub fn pb_owner(owner: &Owner) -> pb::Owner {
    pb::Owner {
        coordinator_shard_id: owner.coordinator_shard_id,
        epoch: owner.epoch,
    }
}

pub fn pb_metadata(metadata: &Metadata) -> BTreeMap<String, String> {
    metadata
        .entries()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn pb_limits(limits: &Limits) -> (Option<PbAmount>, bool, Option<PbAmount>) {
    (
        limits.lower.map(pb_amount),
        limits.lower.is_none(),
        limits.upper.map(pb_amount),
    )
}

/// The protobuf form of a ledger command (for events).
pub fn pb_command(command: &Command) -> pb::Command {
    use pb::command::Kind;
    let kind = match &command.kind {
        CommandKind::CreateAccount {
            account_id,
            currency,
            scale,
            limits,
            metadata,
        } => {
            let (lower_limit, no_lower_limit, upper_limit) = pb_limits(limits);
            Kind::CreateAccount(pb::CreateAccount {
                account_id: account_id.to_string(),
                currency: currency.to_string(),
                scale: u32::from(*scale),
                lower_limit,
                upper_limit,
                metadata: pb_metadata(metadata),
                no_lower_limit,
            })
        }
        CommandKind::UpdateLimits { account_id, limits } => {
            let (lower_limit, no_lower_limit, upper_limit) = pb_limits(limits);
            Kind::UpdateLimits(pb::UpdateLimits {
                account_id: account_id.to_string(),
                lower_limit,
                upper_limit,
                no_lower_limit,
            })
        }
        CommandKind::Freeze { account_id } => Kind::Freeze(pb::Freeze {
            account_id: account_id.to_string(),
        }),
        CommandKind::Unfreeze { account_id } => Kind::Unfreeze(pb::Unfreeze {
            account_id: account_id.to_string(),
        }),
        CommandKind::Close { account_id } => Kind::Close(pb::Close {
            account_id: account_id.to_string(),
        }),
        CommandKind::Transfer {
            from,
            to,
            amount,
            currency,
            metadata,
        } => Kind::Transfer(pb::Transfer {
            from_account_id: from.to_string(),
            to_account_id: to.to_string(),
            amount: Some(pb_amount(*amount)),
            currency: currency.to_string(),
            metadata: pb_metadata(metadata),
        }),
        CommandKind::Batch {
            legs,
            txn_id,
            hold_id,
            metadata,
        } => Kind::Batch(pb::Batch {
            legs: legs.iter().map(pb_leg).collect(),
            txn_id: pb_optional_id(txn_id),
            metadata: pb_metadata(metadata),
            hold_id: pb_optional_id(hold_id),
        }),
        CommandKind::Reserve {
            txn_id,
            owner,
            legs,
            hold_id,
            metadata,
        } => Kind::Reserve(pb::Reserve {
            txn_id: txn_id.to_string(),
            owner: Some(pb_owner(owner)),
            legs: legs.iter().map(pb_leg).collect(),
            metadata: pb_metadata(metadata),
            hold_id: pb_optional_id(hold_id),
        }),
        CommandKind::PlaceHold {
            hold_id,
            account_id,
            amount,
            currency,
            metadata,
        } => Kind::PlaceHold(pb::PlaceHold {
            hold_id: hold_id.to_string(),
            account_id: account_id.to_string(),
            amount: Some(pb_amount(*amount)),
            currency: currency.to_string(),
            metadata: pb_metadata(metadata),
        }),
        CommandKind::VoidHold { hold_id } => Kind::VoidHold(pb::VoidHold {
            hold_id: hold_id.to_string(),
        }),
        CommandKind::Post { txn_id, owner } => Kind::Post(pb::Post {
            txn_id: txn_id.to_string(),
            owner: Some(pb_owner(owner)),
        }),
        CommandKind::Void { txn_id, owner } => Kind::Void(pb::Void {
            txn_id: txn_id.to_string(),
            owner: Some(pb_owner(owner)),
        }),
        CommandKind::PruneDedup { older_than_ms } => Kind::PruneDedup(pb::PruneDedup {
            older_than_ms: *older_than_ms,
        }),
        CommandKind::FenceCoordinator {
            coordinator_shard_id,
            below_epoch,
        } => Kind::FenceCoordinator(pb::FenceCoordinator {
            coordinator_shard_id: *coordinator_shard_id,
            below_epoch: *below_epoch,
        }),
    };
    pb::Command {
        request_id: command.request_id.to_string(),
        kind: Some(kind),
    }
}

pub fn hold(hold_id: &TxnId, hold: &HoldRecord) -> pb::Hold {
    let (status, capture_txn_id, captured_amount) = match &hold.state {
        HoldState::Open => (pb::HoldStatus::Open, None, None),
        HoldState::Capturing(txn_id) => (pb::HoldStatus::Capturing, Some(txn_id), None),
        HoldState::Captured { txn_id, amount } => {
            (pb::HoldStatus::Captured, Some(txn_id), Some(*amount))
        }
        HoldState::Voided => (pb::HoldStatus::Voided, None, None),
    };
    pb::Hold {
        hold_id: hold_id.to_string(),
        account_id: hold.account_id.to_string(),
        amount: Some(pb_amount(hold.amount)),
        currency: hold.currency.to_string(),
        status: status as i32,
        capture_txn_id: capture_txn_id.map(ToString::to_string).unwrap_or_default(),
        captured_amount: captured_amount.map(pb_amount),
        placed_at_ms: hold.at_ms,
    }
}

/// An event as the protobuf message: the reference that the event log's own encoding
/// (`events::write_stored`) is checked against, field for field.
#[cfg(test)]
pub fn event(shard_id: u32, event: &crate::ledger::Event) -> pb::Event {
    pb::Event {
        shard_id,
        seq: event.seq,
        timestamp_ms: event.timestamp_ms,
        request_id: event.command.request_id.to_string(),
        txn_id: event
            .command
            .kind
            .txn_id()
            .map(ToString::to_string)
            .unwrap_or_default(),
        command: Some(pb_command(&event.command)),
        accounts: event.accounts.iter().map(account).collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A command of every kind.
    pub(crate) fn every_command_kind() -> Vec<CommandKind> {
        let owner = Owner {
            coordinator_shard_id: 3,
            epoch: 9,
        };
        let leg = Leg {
            account_id: AccountId::parse("a").unwrap(),
            amount: Amount(-5),
            currency: Currency::parse("USD").unwrap(),
        };
        let metadata = Metadata::new(BTreeMap::from([("k".to_owned(), "v".to_owned())])).unwrap();
        vec![
            CommandKind::CreateAccount {
                account_id: AccountId::parse("a").unwrap(),
                currency: Currency::parse("USD").unwrap(),
                scale: 2,
                limits: Limits::NO_OVERDRAFT,
                metadata: metadata.clone(),
            },
            CommandKind::UpdateLimits {
                account_id: AccountId::parse("a").unwrap(),
                limits: Limits::UNBOUNDED,
            },
            CommandKind::Batch {
                legs: vec![leg.clone()],
                txn_id: Some(TxnId::parse("t").unwrap()),
                hold_id: None,
                metadata: metadata.clone(),
            },
            CommandKind::Reserve {
                txn_id: TxnId::parse("t").unwrap(),
                owner,
                legs: vec![leg],
                hold_id: Some(TxnId::parse("h").unwrap()),
                metadata: metadata.clone(),
            },
            CommandKind::PlaceHold {
                hold_id: TxnId::parse("h").unwrap(),
                account_id: AccountId::parse("a").unwrap(),
                amount: Amount(7),
                currency: Currency::parse("USD").unwrap(),
                metadata,
            },
            CommandKind::VoidHold {
                hold_id: TxnId::parse("h").unwrap(),
            },
            CommandKind::Void {
                txn_id: TxnId::parse("t").unwrap(),
                owner,
            },
            CommandKind::PruneDedup { older_than_ms: 17 },
            CommandKind::Post {
                txn_id: TxnId::parse("t").unwrap(),
                owner,
            },
            CommandKind::Freeze {
                account_id: AccountId::parse("a").unwrap(),
            },
            CommandKind::Unfreeze {
                account_id: AccountId::parse("a").unwrap(),
            },
            CommandKind::Close {
                account_id: AccountId::parse("a").unwrap(),
            },
            CommandKind::Transfer {
                from: AccountId::parse("a").unwrap(),
                to: AccountId::parse("b").unwrap(),
                amount: Amount(i128::MAX),
                currency: Currency::parse("USD").unwrap(),
                metadata: Metadata::default(),
            },
            CommandKind::FenceCoordinator {
                coordinator_shard_id: 4,
                below_epoch: 2,
            },
        ]
    }

    #[test]
    fn every_command_survives_the_round_trip_through_protobuf() {
        for kind in every_command_kind() {
            let original = Command {
                request_id: RequestId::parse("r-1").unwrap(),
                kind,
            };
            assert_eq!(command(Some(&pb_command(&original))), Ok(original));
        }
    }

    #[test]
    fn malformed_fields_become_typed_outcomes() {
        let transfer = |from: &str, amount: &str, currency: &str| pb::Command {
            request_id: "r-1".into(),
            kind: Some(pb::command::Kind::Transfer(pb::Transfer {
                from_account_id: from.into(),
                to_account_id: "b".into(),
                amount: Some(PbAmount {
                    minor_units: amount.into(),
                }),
                currency: currency.into(),
                metadata: BTreeMap::new(),
            })),
        };
        assert_eq!(
            command(Some(&transfer("bad id", "5", "USD"))),
            Err(Outcome::InvalidAccountId)
        );
        assert_eq!(
            command(Some(&transfer("a", "5.00", "USD"))),
            Err(Outcome::InvalidAmount)
        );
        assert_eq!(
            command(Some(&transfer("a", &"9".repeat(40), "USD"))),
            Err(Outcome::InvalidAmount)
        );
        assert_eq!(
            command(Some(&transfer("a", "5", "usd"))),
            Err(Outcome::InvalidCurrency)
        );
        let mut no_request_id = transfer("a", "5", "USD");
        no_request_id.request_id.clear();
        assert_eq!(
            command(Some(&no_request_id)),
            Err(Outcome::InvalidRequestId)
        );
        assert_eq!(command(None), Err(Outcome::InvalidRequestId));
    }
}
