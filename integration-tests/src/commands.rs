//! Ledger commands as tests and benchmarks build them: USD accounts with scale 2.

use proto::auticuro::v1 as pb;
use proto::common::v1::Amount;

pub fn command(request_id: impl Into<String>, kind: pb::command::Kind) -> pb::Command {
    pb::Command {
        request_id: request_id.into(),
        kind: Some(kind),
    }
}

/// A USD account; `no_lower_limit` for system accounts that may go negative.
pub fn create(account_id: &str, no_lower_limit: bool) -> pb::command::Kind {
    pb::command::Kind::CreateAccount(pb::CreateAccount {
        account_id: account_id.into(),
        currency: "USD".into(),
        scale: 2,
        no_lower_limit,
        ..Default::default()
    })
}

pub fn transfer(from: &str, to: &str, amount: i128) -> pb::command::Kind {
    pb::command::Kind::Transfer(pb::Transfer {
        from_account_id: from.into(),
        to_account_id: to.into(),
        amount: Some(Amount {
            minor_units: amount.to_string(),
        }),
        currency: "USD".into(),
        metadata: Default::default(),
    })
}

/// The coordinator that two-phase commands sent straight to a shard name as their owner.
const OWNER: pb::Owner = pb::Owner {
    coordinator_shard_id: 1,
    epoch: 1,
};

/// Phase one of a transaction moving `amount` from `from` to `to` on one shard.
pub fn reserve(txn_id: &str, from: &str, to: &str, amount: i128) -> pb::command::Kind {
    let leg = |account: &str, amount: i128| pb::Leg {
        account_id: account.into(),
        amount: Some(Amount {
            minor_units: amount.to_string(),
        }),
        currency: "USD".into(),
    };
    pb::command::Kind::Reserve(pb::Reserve {
        txn_id: txn_id.into(),
        owner: Some(OWNER),
        legs: vec![leg(from, -amount), leg(to, amount)],
        ..Default::default()
    })
}

pub fn post(txn_id: &str) -> pb::command::Kind {
    pb::command::Kind::Post(pb::Post {
        txn_id: txn_id.into(),
        owner: Some(OWNER),
    })
}

pub fn ok(result: &pb::CommandResult) -> bool {
    result.outcome == pb::Outcome::Ok as i32
}
