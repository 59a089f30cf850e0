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

pub fn ok(result: &pb::CommandResult) -> bool {
    result.outcome == pb::Outcome::Ok as i32
}
