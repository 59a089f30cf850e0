//! The user-facing feed: what a transaction's legs mean to each account, in business terms.
//!
//! The gateway says what a transaction is in reserved metadata keys (`wallet:kind`,
//! `wallet:from`, `wallet:to`, and for a payment with a fee `wallet:fee` and
//! `wallet:fee_account`). Each shard sees only its own legs of a cross-shard transaction, so the
//! meaning travels in the metadata rather than being inferred from the other legs. Legs of
//! transactions that say nothing read as plain payments.

use std::collections::BTreeMap;

/// Metadata keys that start with this belong to the gateway; callers cannot set them and never
/// see them.
pub const RESERVED_PREFIX: &str = "wallet:";
pub const KIND_KEY: &str = "wallet:kind";
pub const FROM_KEY: &str = "wallet:from";
pub const TO_KEY: &str = "wallet:to";
pub const FEE_KEY: &str = "wallet:fee";
pub const FEE_ACCOUNT_KEY: &str = "wallet:fee_account";
/// On a wallet: the caller's id of its owner.
pub const OWNER_KEY: &str = "wallet:owner_id";
/// On a capture: the hold it captures.
pub const HOLD_KEY: &str = "wallet:hold";

/// Metadata without the gateway's own keys, for showing to the caller.
pub fn visible<'a>(
    metadata: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> BTreeMap<String, String> {
    metadata
        .into_iter()
        .filter(|(key, _)| !key.starts_with(RESERVED_PREFIX))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivityKind {
    Deposit,
    Withdrawal,
    PaymentSent,
    PaymentReceived,
    Fee,
    /// Money authorized (taken from `available`, not yet from the balance).
    Hold,
    /// The payer's side of a captured hold.
    Capture,
    /// A hold released without capture.
    Void,
}

impl ActivityKind {
    pub fn name(self) -> &'static str {
        match self {
            ActivityKind::Deposit => "deposit",
            ActivityKind::Withdrawal => "withdrawal",
            ActivityKind::PaymentSent => "payment_sent",
            ActivityKind::PaymentReceived => "payment_received",
            ActivityKind::Fee => "fee",
            ActivityKind::Hold => "hold",
            ActivityKind::Capture => "capture",
            ActivityKind::Void => "void",
        }
    }

    pub fn parse(name: &str) -> Option<ActivityKind> {
        [
            ActivityKind::Deposit,
            ActivityKind::Withdrawal,
            ActivityKind::PaymentSent,
            ActivityKind::PaymentReceived,
            ActivityKind::Fee,
            ActivityKind::Hold,
            ActivityKind::Capture,
            ActivityKind::Void,
        ]
        .into_iter()
        .find(|kind| kind.name() == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activity {
    pub account_id: String,
    pub kind: ActivityKind,
    /// Signed minor units: negative when money left the account.
    pub amount: i128,
    pub counterparty: Option<String>,
}

/// The activities of posted legs (`(account, signed amount)`), in leg order.
pub fn activities(metadata: &BTreeMap<String, String>, legs: &[(String, i128)]) -> Vec<Activity> {
    let get = |key: &str| metadata.get(key).map(String::as_str);
    let (from, to) = (get(FROM_KEY), get(TO_KEY));
    let fee_account = get(FEE_ACCOUNT_KEY);
    let fee: i128 = get(FEE_KEY).and_then(|f| f.parse().ok()).unwrap_or(0);
    let other_of = |account: &str| -> Option<String> {
        match (from, to) {
            (Some(from), Some(to)) if account == from => Some(to.to_string()),
            (Some(from), Some(_)) => Some(from.to_string()),
            _ => None,
        }
    };
    let mut activities = Vec::new();
    for (account, amount) in legs {
        let account_id = account.clone();
        let mut push = |kind, amount, counterparty| {
            activities.push(Activity {
                account_id: account_id.clone(),
                kind,
                amount,
                counterparty,
            })
        };
        match get(KIND_KEY) {
            Some("deposit") => push(ActivityKind::Deposit, *amount, other_of(account)),
            Some("withdrawal") => push(ActivityKind::Withdrawal, *amount, other_of(account)),
            Some("payment") if Some(account.as_str()) == from => {
                push(ActivityKind::PaymentSent, amount + fee, other_of(account));
                if fee > 0 {
                    push(ActivityKind::Fee, -fee, fee_account.map(str::to_string));
                }
            }
            Some("capture") if Some(account.as_str()) == from => {
                push(ActivityKind::Capture, *amount, other_of(account))
            }
            Some("payment" | "capture") if Some(account.as_str()) == to => {
                push(ActivityKind::PaymentReceived, *amount, other_of(account))
            }
            Some("payment") if Some(account.as_str()) == fee_account => {
                push(ActivityKind::Fee, *amount, from.map(str::to_string))
            }
            _ => {
                let counterparty = match legs {
                    [(a, _), (b, _)] => Some(if a == account { b } else { a }.clone()),
                    _ => None,
                };
                let kind = if *amount < 0 {
                    ActivityKind::PaymentSent
                } else {
                    ActivityKind::PaymentReceived
                };
                push(kind, *amount, counterparty)
            }
        }
    }
    activities
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn legs(entries: &[(&str, i128)]) -> Vec<(String, i128)> {
        entries.iter().map(|(a, n)| (a.to_string(), *n)).collect()
    }

    fn summary(activities: &[Activity]) -> Vec<(String, &'static str, i128, Option<String>)> {
        activities
            .iter()
            .map(|a| {
                (
                    a.account_id.clone(),
                    a.kind.name(),
                    a.amount,
                    a.counterparty.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn a_capture_is_the_payers_capture_and_the_payees_payment() {
        let meta = metadata(&[
            (KIND_KEY, "capture"),
            (FROM_KEY, "t/alice"),
            (TO_KEY, "t/shop"),
            (HOLD_KEY, "h:1"),
        ]);
        let all = activities(&meta, &legs(&[("t/alice", -45), ("t/shop", 45)]));
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            summary(&all),
            vec![
                ("t/alice".into(), "capture", -45, some("t/shop")),
                ("t/shop".into(), "payment_received", 45, some("t/alice")),
            ]
        );
    }

    #[test]
    fn a_payment_with_a_fee_splits_the_payers_debit() {
        let meta = metadata(&[
            (KIND_KEY, "payment"),
            (FROM_KEY, "t/alice"),
            (TO_KEY, "t/bob"),
            (FEE_KEY, "30"),
            (FEE_ACCOUNT_KEY, "t/sys:fees:USD"),
        ]);
        let all = activities(
            &meta,
            &legs(&[("t/alice", -1030), ("t/bob", 1000), ("t/sys:fees:USD", 30)]),
        );
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            summary(&all),
            vec![
                ("t/alice".into(), "payment_sent", -1000, some("t/bob")),
                ("t/alice".into(), "fee", -30, some("t/sys:fees:USD")),
                ("t/bob".into(), "payment_received", 1000, some("t/alice")),
                ("t/sys:fees:USD".into(), "fee", 30, some("t/alice")),
            ]
        );
        // Each shard sees only its legs; the meaning is the same.
        let bobs_shard = activities(&meta, &legs(&[("t/bob", 1000)]));
        assert_eq!(summary(&bobs_shard), summary(&all[2..3]));
        let sum: i128 = all.iter().map(|a| a.amount).sum();
        assert_eq!(sum, 0, "activities of a whole transaction net to zero");
    }

    #[test]
    fn deposits_and_withdrawals_name_the_funding_account() {
        let meta = metadata(&[
            (KIND_KEY, "deposit"),
            (FROM_KEY, "t/sys:funding:USD"),
            (TO_KEY, "t/alice"),
        ]);
        let all = activities(
            &meta,
            &legs(&[("t/sys:funding:USD", -500), ("t/alice", 500)]),
        );
        assert_eq!(
            summary(&all),
            vec![
                (
                    "t/sys:funding:USD".into(),
                    "deposit",
                    -500,
                    Some("t/alice".into())
                ),
                (
                    "t/alice".into(),
                    "deposit",
                    500,
                    Some("t/sys:funding:USD".into())
                ),
            ]
        );
        let meta = metadata(&[
            (KIND_KEY, "withdrawal"),
            (FROM_KEY, "t/alice"),
            (TO_KEY, "t/sys:funding:USD"),
        ]);
        let all = activities(&meta, &legs(&[("t/alice", -200)]));
        assert_eq!(
            summary(&all),
            vec![(
                "t/alice".into(),
                "withdrawal",
                -200,
                Some("t/sys:funding:USD".into())
            )]
        );
    }

    #[test]
    fn transactions_without_meaning_read_as_payments() {
        let all = activities(&BTreeMap::new(), &legs(&[("a", -7), ("b", 7)]));
        assert_eq!(
            summary(&all),
            vec![
                ("a".into(), "payment_sent", -7, Some("b".into())),
                ("b".into(), "payment_received", 7, Some("a".into())),
            ]
        );
        let three = activities(&BTreeMap::new(), &legs(&[("a", -7), ("b", 5), ("c", 2)]));
        assert!(three.iter().all(|a| a.counterparty.is_none()));
        assert_eq!(ActivityKind::parse("fee"), Some(ActivityKind::Fee));
        assert_eq!(ActivityKind::parse("hold"), Some(ActivityKind::Hold));
        assert_eq!(ActivityKind::parse("refund"), None);
    }
}
