//! Tests of the pure ledger core: every command and outcome, and property tests of the
//! invariants (zero sums per currency, limits, determinism, the two-phase leg table).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const T0: i64 = 1_700_000_000_000;
const COORDINATOR: Owner = Owner {
    coordinator_shard_id: 1,
    epoch: 1,
};
const OTHER_COORDINATOR: Owner = Owner {
    coordinator_shard_id: 2,
    epoch: 1,
};

fn id(text: &str) -> AccountId {
    AccountId::parse(text).unwrap()
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn txn(text: &str) -> TxnId {
    TxnId::parse(text).unwrap()
}

/// A ledger driver that numbers request ids, so each call is a new command.
struct Shard {
    ledger: Ledger,
    next_request: u64,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            ledger: Ledger::new(),
            next_request: 0,
        }
    }

    fn run(&mut self, kind: CommandKind) -> Applied {
        self.next_request += 1;
        let request_id = RequestId::parse(&format!("req-{}", self.next_request)).unwrap();
        self.ledger
            .apply(&Command { request_id, kind }, T0 + self.next_request as i64)
    }

    fn create(&mut self, account: &str, currency: Currency, limits: Limits) -> Applied {
        self.run(CommandKind::CreateAccount {
            account_id: id(account),
            currency,
            scale: 2,
            limits,
            metadata: Metadata::default(),
        })
    }

    fn transfer(&mut self, from: &str, to: &str, amount: i128) -> Applied {
        self.run(CommandKind::Transfer {
            from: id(from),
            to: id(to),
            amount: Amount(amount),
            currency: usd(),
            metadata: Metadata::default(),
        })
    }

    fn balance(&self, account: &str) -> i128 {
        self.ledger.account(&id(account)).unwrap().balance.0
    }

    /// `funding` (unbounded) and customers `alice` and `bob` (no overdraft) in USD; alice holds 100.
    fn with_customers() -> Shard {
        let mut shard = Shard::new();
        assert!(
            shard
                .create("sys:funding:USD", usd(), Limits::UNBOUNDED)
                .outcome
                .is_ok()
        );
        assert!(
            shard
                .create("alice", usd(), Limits::NO_OVERDRAFT)
                .outcome
                .is_ok()
        );
        assert!(
            shard
                .create("bob", usd(), Limits::NO_OVERDRAFT)
                .outcome
                .is_ok()
        );
        assert!(
            shard
                .transfer("sys:funding:USD", "alice", 100)
                .outcome
                .is_ok()
        );
        shard
    }

    fn reserve(&mut self, txn_id: &str, owner: Owner, legs: &[(&str, i128)]) -> Applied {
        let legs = legs
            .iter()
            .map(|(account, amount)| Leg {
                account_id: id(account),
                amount: Amount(*amount),
                currency: usd(),
            })
            .collect();
        self.run(CommandKind::Reserve {
            txn_id: txn(txn_id),
            owner,
            legs,
            hold_id: None,
            metadata: Metadata::default(),
        })
    }

    fn post(&mut self, txn_id: &str, owner: Owner) -> Applied {
        self.run(CommandKind::Post {
            txn_id: txn(txn_id),
            owner,
        })
    }

    fn void(&mut self, txn_id: &str, owner: Owner) -> Applied {
        self.run(CommandKind::Void {
            txn_id: txn(txn_id),
            owner,
        })
    }

    /// Asserts a rejection changed nothing and produced no event.
    fn assert_rejected(&mut self, kind: CommandKind, outcome: Outcome) {
        let before = self.ledger.export();
        let applied = self.run(kind);
        assert_eq!(applied.outcome, outcome);
        assert!(applied.event.is_none());
        assert_eq!(applied.seq, 0);
        let mut after = self.ledger.export();
        // The rejection itself is remembered for its request id, and nothing else changes.
        after
            .dedup
            .retain(|(request_id, _)| before.dedup.iter().any(|(known, _)| known == request_id));
        assert_eq!(before, after);
    }
}

fn leg(account: &str, amount: i128) -> Leg {
    Leg {
        account_id: id(account),
        amount: Amount(amount),
        currency: usd(),
    }
}

fn batch(legs: Vec<Leg>) -> CommandKind {
    CommandKind::Batch {
        legs,
        txn_id: None,
        hold_id: None,
        metadata: Metadata::default(),
    }
}

// ---- Accounts ----

#[test]
fn creating_an_account_starts_it_active_and_empty_at_version_one() {
    let mut shard = Shard::new();
    let applied = shard.create("alice", usd(), Limits::NO_OVERDRAFT);
    assert_eq!(applied.outcome, Outcome::Ok);
    assert_eq!(applied.seq, 1);
    let account = shard.ledger.account(&id("alice")).unwrap();
    assert_eq!(account.state, AccountState::Active);
    assert_eq!(
        (account.balance, account.pending_out, account.pending_in),
        (Amount::ZERO, Amount::ZERO, Amount::ZERO)
    );
    assert_eq!(account.version, 1);
}

#[test]
fn the_first_account_of_a_currency_brings_the_clearing_account() {
    let mut shard = Shard::new();
    let applied = shard.create("alice", usd(), Limits::NO_OVERDRAFT);
    let ids: Vec<_> = applied
        .event
        .unwrap()
        .accounts
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(ids, vec![id("alice"), id("sys:clearing:USD")]);
    let applied = shard.create("bob", usd(), Limits::NO_OVERDRAFT);
    assert_eq!(applied.event.unwrap().accounts.len(), 1);
}

#[test]
fn creating_an_existing_account_is_rejected() {
    let mut shard = Shard::with_customers();
    let kind = CommandKind::CreateAccount {
        account_id: id("alice"),
        currency: usd(),
        scale: 2,
        limits: Limits::NO_OVERDRAFT,
        metadata: Metadata::default(),
    };
    shard.assert_rejected(kind, Outcome::AccountAlreadyExists);
}

#[test]
fn clearing_accounts_cannot_be_created_or_moved_by_clients() {
    let mut shard = Shard::with_customers();
    let create = CommandKind::CreateAccount {
        account_id: id("sys:clearing:EUR"),
        currency: eur(),
        scale: 2,
        limits: Limits::UNBOUNDED,
        metadata: Metadata::default(),
    };
    shard.assert_rejected(create, Outcome::InvalidAccountId);
    shard.assert_rejected(
        batch(vec![leg("alice", -5), leg("sys:clearing:USD", 5)]),
        Outcome::InvalidAccountId,
    );
    shard.assert_rejected(
        CommandKind::Freeze {
            account_id: id("sys:clearing:USD"),
        },
        Outcome::InvalidAccountId,
    );
}

#[test]
fn a_currency_keeps_the_scale_of_its_first_account() {
    let mut shard = Shard::with_customers();
    let kind = CommandKind::CreateAccount {
        account_id: id("carol"),
        currency: usd(),
        scale: 3,
        limits: Limits::NO_OVERDRAFT,
        metadata: Metadata::default(),
    };
    shard.assert_rejected(kind, Outcome::InvalidCurrency);
    let too_fine = CommandKind::CreateAccount {
        account_id: id("dave"),
        currency: eur(),
        scale: 19,
        limits: Limits::NO_OVERDRAFT,
        metadata: Metadata::default(),
    };
    shard.assert_rejected(too_fine, Outcome::InvalidCurrency);
}

#[test]
fn an_account_cannot_be_created_outside_its_own_limits() {
    let mut shard = Shard::new();
    let positive_floor = Limits {
        lower: Some(Amount(1)),
        upper: None,
    };
    let kind = |limits| CommandKind::CreateAccount {
        account_id: id("alice"),
        currency: usd(),
        scale: 2,
        limits,
        metadata: Metadata::default(),
    };
    shard.assert_rejected(kind(positive_floor), Outcome::InvalidLimits);
    let crossed = Limits {
        lower: Some(Amount(-5)),
        upper: Some(Amount(-10)),
    };
    shard.assert_rejected(kind(crossed), Outcome::InvalidLimits);
}

#[test]
fn limits_can_be_updated_only_to_values_the_account_already_satisfies() {
    let mut shard = Shard::with_customers();
    let overdraft = Limits {
        lower: Some(Amount(-50)),
        upper: Some(Amount(1_000)),
    };
    let applied = shard.run(CommandKind::UpdateLimits {
        account_id: id("alice"),
        limits: overdraft,
    });
    assert_eq!(applied.outcome, Outcome::Ok);
    assert_eq!(
        shard.ledger.account(&id("alice")).unwrap().limits,
        overdraft
    );
    assert_eq!(shard.ledger.account(&id("alice")).unwrap().version, 3);
    let below_balance = Limits {
        lower: None,
        upper: Some(Amount(99)),
    };
    shard.assert_rejected(
        CommandKind::UpdateLimits {
            account_id: id("alice"),
            limits: below_balance,
        },
        Outcome::InvalidLimits,
    );
}

#[test]
fn frozen_accounts_neither_send_nor_receive_until_unfrozen() {
    let mut shard = Shard::with_customers();
    assert!(
        shard
            .run(CommandKind::Freeze {
                account_id: id("alice")
            })
            .outcome
            .is_ok()
    );
    assert_eq!(
        shard.ledger.account(&id("alice")).unwrap().state,
        AccountState::Frozen
    );
    shard.assert_rejected(
        CommandKind::Transfer {
            from: id("alice"),
            to: id("bob"),
            amount: Amount(1),
            currency: usd(),
            metadata: Metadata::default(),
        },
        Outcome::AccountFrozen,
    );
    shard.assert_rejected(
        CommandKind::Transfer {
            from: id("bob"),
            to: id("alice"),
            amount: Amount(1),
            currency: usd(),
            metadata: Metadata::default(),
        },
        Outcome::AccountFrozen,
    );
    assert!(
        shard
            .run(CommandKind::Unfreeze {
                account_id: id("alice")
            })
            .outcome
            .is_ok()
    );
    assert!(shard.transfer("alice", "bob", 1).outcome.is_ok());
}

#[test]
fn freezing_twice_changes_nothing_the_second_time() {
    let mut shard = Shard::with_customers();
    shard.run(CommandKind::Freeze {
        account_id: id("alice"),
    });
    let version = shard.ledger.account(&id("alice")).unwrap().version;
    let applied = shard.run(CommandKind::Freeze {
        account_id: id("alice"),
    });
    assert_eq!(applied.outcome, Outcome::Ok);
    assert_eq!(shard.ledger.account(&id("alice")).unwrap().version, version);
}

#[test]
fn an_account_closes_only_when_empty_and_stays_closed() {
    let mut shard = Shard::with_customers();
    shard.assert_rejected(
        CommandKind::Close {
            account_id: id("alice"),
        },
        Outcome::AccountNotEmpty,
    );
    assert!(
        shard
            .transfer("alice", "sys:funding:USD", 100)
            .outcome
            .is_ok()
    );
    assert!(
        shard
            .run(CommandKind::Close {
                account_id: id("alice")
            })
            .outcome
            .is_ok()
    );
    shard.assert_rejected(
        CommandKind::Unfreeze {
            account_id: id("alice"),
        },
        Outcome::AccountClosed,
    );
    shard.assert_rejected(
        CommandKind::Close {
            account_id: id("alice"),
        },
        Outcome::AccountClosed,
    );
    shard.assert_rejected(
        CommandKind::Transfer {
            from: id("bob"),
            to: id("alice"),
            amount: Amount(1),
            currency: usd(),
            metadata: Metadata::default(),
        },
        Outcome::AccountClosed,
    );
}

#[test]
fn an_account_with_a_hold_cannot_close() {
    let mut shard = Shard::with_customers();
    assert!(
        shard
            .reserve("t1", COORDINATOR, &[("bob", 5)])
            .outcome
            .is_ok()
    );
    shard.assert_rejected(
        CommandKind::Close {
            account_id: id("bob"),
        },
        Outcome::AccountNotEmpty,
    );
}

#[test]
fn accounts_are_never_created_implicitly() {
    let mut shard = Shard::with_customers();
    shard.assert_rejected(
        CommandKind::Transfer {
            from: id("alice"),
            to: id("nobody"),
            amount: Amount(1),
            currency: usd(),
            metadata: Metadata::default(),
        },
        Outcome::AccountNotFound,
    );
    assert!(shard.ledger.account(&id("nobody")).is_none());
    shard.assert_rejected(
        CommandKind::Freeze {
            account_id: id("nobody"),
        },
        Outcome::AccountNotFound,
    );
}

// ---- Transfers and batches ----

#[test]
fn a_transfer_moves_money_and_reports_both_accounts() {
    let mut shard = Shard::with_customers();
    let applied = shard.transfer("alice", "bob", 30);
    assert_eq!(applied.outcome, Outcome::Ok);
    let event = applied.event.unwrap();
    assert_eq!(event.seq, applied.seq);
    let balances: Vec<_> = event
        .accounts
        .iter()
        .map(|a| (a.id.to_string(), a.balance.0))
        .collect();
    assert_eq!(
        balances,
        vec![("alice".to_string(), 70), ("bob".to_string(), 30)]
    );
    assert_eq!((shard.balance("alice"), shard.balance("bob")), (70, 30));
}

#[test]
fn transfer_is_rejected_when_funds_are_insufficient() {
    let mut shard = Shard::with_customers();
    shard.assert_rejected(
        CommandKind::Transfer {
            from: id("alice"),
            to: id("bob"),
            amount: Amount(101),
            currency: usd(),
            metadata: Metadata::default(),
        },
        Outcome::InsufficientFunds,
    );
    let applied = shard.transfer("alice", "bob", 101);
    assert_eq!(applied.detail_account_id, Some(id("alice")));
}

#[test]
fn transfer_is_rejected_when_the_credit_passes_the_upper_limit() {
    let mut shard = Shard::with_customers();
    let capped = Limits {
        lower: Some(Amount::ZERO),
        upper: Some(Amount(50)),
    };
    shard.run(CommandKind::UpdateLimits {
        account_id: id("bob"),
        limits: capped,
    });
    assert!(shard.transfer("alice", "bob", 50).outcome.is_ok());
    shard.assert_rejected(
        CommandKind::Transfer {
            from: id("alice"),
            to: id("bob"),
            amount: Amount(1),
            currency: usd(),
            metadata: Metadata::default(),
        },
        Outcome::LimitExceeded,
    );
}

#[test]
fn bad_transfers_are_rejected_without_any_change() {
    let mut shard = Shard::with_customers();
    let transfer = |from: &str, to: &str, amount: i128, currency: Currency| CommandKind::Transfer {
        from: id(from),
        to: id(to),
        amount: Amount(amount),
        currency,
        metadata: Metadata::default(),
    };
    shard.assert_rejected(transfer("alice", "bob", 0, usd()), Outcome::InvalidAmount);
    shard.assert_rejected(transfer("alice", "bob", -5, usd()), Outcome::InvalidAmount);
    shard.assert_rejected(
        transfer("alice", "bob", state::AMOUNT_ABS_MAX + 1, usd()),
        Outcome::InvalidAmount,
    );
    shard.assert_rejected(transfer("alice", "alice", 5, usd()), Outcome::SelfTransfer);
    shard.assert_rejected(
        transfer("alice", "bob", 5, eur()),
        Outcome::CurrencyMismatch,
    );
}

#[test]
fn a_batch_applies_all_legs_or_none() {
    let mut shard = Shard::with_customers();
    shard.create("carol", usd(), Limits::NO_OVERDRAFT);
    let applied = shard.run(batch(vec![
        leg("alice", -60),
        leg("bob", 50),
        leg("carol", 10),
    ]));
    assert_eq!(applied.outcome, Outcome::Ok);
    assert_eq!(
        (
            shard.balance("alice"),
            shard.balance("bob"),
            shard.balance("carol")
        ),
        (40, 50, 10)
    );
    // The last leg fails its limit, so the first two must not apply either.
    shard.assert_rejected(
        batch(vec![
            leg("bob", 10),
            leg("carol", 10),
            leg("alice", -20),
            leg("sys:funding:USD", 0),
        ]),
        Outcome::InvalidAmount,
    );
    shard.assert_rejected(
        batch(vec![leg("bob", 41), leg("alice", -41)]),
        Outcome::InsufficientFunds,
    );
}

#[test]
fn bad_batches_are_rejected_without_any_change() {
    let mut shard = Shard::with_customers();
    shard.assert_rejected(batch(vec![]), Outcome::NotZeroSum);
    shard.assert_rejected(
        batch(vec![leg("alice", -5), leg("bob", 4)]),
        Outcome::NotZeroSum,
    );
    shard.assert_rejected(
        batch(vec![leg("alice", -5), leg("alice", 5)]),
        Outcome::DuplicateAccountInBatch,
    );
    shard.assert_rejected(
        batch(vec![leg("alice", -5), leg("ghost", 5)]),
        Outcome::AccountNotFound,
    );
    let many: Vec<Leg> = (0..=state::BATCH_LEGS_MAX)
        .map(|i| leg(&format!("a{i}"), 1))
        .collect();
    shard.assert_rejected(batch(many), Outcome::BatchTooLarge);
    let mixed = vec![
        leg("alice", -5),
        Leg {
            account_id: id("bob"),
            amount: Amount(5),
            currency: eur(),
        },
    ];
    shard.assert_rejected(batch(mixed), Outcome::NotZeroSum);
    let overflow = vec![
        leg("alice", -state::AMOUNT_ABS_MAX),
        leg("bob", state::AMOUNT_ABS_MAX),
        leg("sys:funding:USD", -state::AMOUNT_ABS_MAX),
    ];
    shard.assert_rejected(batch(overflow), Outcome::NotZeroSum);
}

#[test]
fn a_batch_may_move_several_currencies_each_zero_sum() {
    let mut shard = Shard::with_customers();
    shard.create("sys:funding:EUR", eur(), Limits::UNBOUNDED);
    shard.create("alice-eur", eur(), Limits::NO_OVERDRAFT);
    let legs = vec![
        leg("alice", -10),
        leg("bob", 10),
        Leg {
            account_id: id("sys:funding:EUR"),
            amount: Amount(-7),
            currency: eur(),
        },
        Leg {
            account_id: id("alice-eur"),
            amount: Amount(7),
            currency: eur(),
        },
    ];
    assert!(shard.run(batch(legs)).outcome.is_ok());
    assert!(shard.ledger.balance_sums().values().all(|sum| *sum == 0));
}

// ---- Idempotency ----

#[test]
fn a_retried_command_returns_the_stored_outcome_marked_duplicate() {
    let mut shard = Shard::with_customers();
    let command = Command {
        request_id: RequestId::parse("pay-1").unwrap(),
        kind: CommandKind::Transfer {
            from: id("alice"),
            to: id("bob"),
            amount: Amount(30),
            currency: usd(),
            metadata: Metadata::default(),
        },
    };
    let first = shard.ledger.apply(&command, T0);
    let retry = shard.ledger.apply(&command, T0 + 5);
    assert_eq!(retry.outcome, Outcome::Ok);
    assert!(retry.duplicate);
    assert_eq!(retry.seq, first.seq);
    assert!(retry.event.is_none());
    assert_eq!(shard.balance("alice"), 70);
}

#[test]
fn a_rejection_is_remembered_even_when_the_state_later_allows_the_command() {
    let mut shard = Shard::with_customers();
    let command = Command {
        request_id: RequestId::parse("pay-2").unwrap(),
        kind: CommandKind::Transfer {
            from: id("bob"),
            to: id("alice"),
            amount: Amount(10),
            currency: usd(),
            metadata: Metadata::default(),
        },
    };
    assert_eq!(
        shard.ledger.apply(&command, T0).outcome,
        Outcome::InsufficientFunds
    );
    shard.transfer("alice", "bob", 50);
    let retry = shard.ledger.apply(&command, T0 + 1);
    assert_eq!(
        (retry.outcome, retry.duplicate),
        (Outcome::InsufficientFunds, true)
    );
    assert_eq!(shard.balance("bob"), 50);
}

#[test]
fn the_same_request_id_with_another_payload_is_rejected() {
    let mut shard = Shard::with_customers();
    let request_id = RequestId::parse("pay-3").unwrap();
    let transfer = |amount| CommandKind::Transfer {
        from: id("alice"),
        to: id("bob"),
        amount: Amount(amount),
        currency: usd(),
        metadata: Metadata::default(),
    };
    shard.ledger.apply(
        &Command {
            request_id: request_id.clone(),
            kind: transfer(10),
        },
        T0,
    );
    let different = shard.ledger.apply(
        &Command {
            request_id: request_id.clone(),
            kind: transfer(11),
        },
        T0,
    );
    assert_eq!(different.outcome, Outcome::DuplicateWithDifferentPayload);
    assert!(!different.duplicate);
    assert!(different.event.is_none());
    // The stored outcome of the id never changes.
    let again = shard.ledger.apply(
        &Command {
            request_id,
            kind: transfer(10),
        },
        T0,
    );
    assert_eq!((again.outcome, again.duplicate), (Outcome::Ok, true));
    assert_eq!(shard.balance("bob"), 10);
}

#[test]
fn pruning_forgets_only_records_older_than_the_cutoff() {
    let mut shard = Shard::with_customers();
    let old = RequestId::parse("req-1").unwrap();
    let cutoff = shard
        .ledger
        .dedup_record(&RequestId::parse("req-3").unwrap())
        .unwrap()
        .at_ms;
    let applied = shard.run(CommandKind::PruneDedup {
        older_than_ms: cutoff,
    });
    assert_eq!(applied.outcome, Outcome::Ok);
    let removed: Vec<RequestId> = applied
        .changes
        .pruned
        .dedup
        .iter()
        .map(|(at_ms, request_id)| {
            assert!(*at_ms < cutoff);
            request_id.clone()
        })
        .collect();
    assert_eq!(
        removed,
        vec![
            RequestId::parse("req-1").unwrap(),
            RequestId::parse("req-2").unwrap()
        ]
    );
    assert!(shard.ledger.dedup_record(&old).is_none());
    assert!(
        shard
            .ledger
            .dedup_record(&RequestId::parse("req-3").unwrap())
            .is_some()
    );
}

#[test]
fn pruning_forgets_settled_legs_but_keeps_held_ones_and_holds() {
    let mut shard = Shard::with_customers();
    shard.reserve("posted", COORDINATOR, &[("alice", -10), ("bob", 10)]);
    shard.post("posted", COORDINATOR);
    shard.reserve("voided", COORDINATOR, &[("alice", -10)]);
    shard.void("voided", COORDINATOR);
    shard.void("tombstone", COORDINATOR);
    shard.reserve("held", COORDINATOR, &[("alice", -10)]);
    shard.run(place_hold("hold-voided", "alice", 5));
    shard.run(CommandKind::VoidHold {
        hold_id: txn("hold-voided"),
    });
    shard.run(place_hold("hold-open", "alice", 5));
    let cutoff = T0 + shard.next_request as i64 + 1;
    // Reserved at the cutoff and settled: kept.
    shard.reserve("recent", COORDINATOR, &[("bob", 10)]);
    shard.post("recent", COORDINATOR);
    assert_eq!(
        shard.ledger.transaction(&txn("recent")).unwrap().at_ms,
        cutoff
    );
    let before = shard.ledger.export();

    let applied = shard.run(CommandKind::PruneDedup {
        older_than_ms: cutoff,
    });
    assert_eq!(applied.outcome, Outcome::Ok);
    let pruned = &applied.changes.pruned;
    let mut pruned_ids: Vec<TxnId> = pruned
        .transactions
        .iter()
        .map(|(_, id)| id.clone())
        .collect();
    pruned_ids.sort();
    assert_eq!(
        pruned_ids,
        vec![txn("posted"), txn("tombstone"), txn("voided")]
    );
    let forgotten = |id: &str| shard.ledger.transaction(&txn(id)).is_none();
    assert!(forgotten("posted") && forgotten("voided") && forgotten("tombstone"));
    assert_eq!(
        shard.ledger.transaction(&txn("held")).unwrap().state,
        LegState::Held
    );
    // Money, pending amounts and authorization holds are untouched.
    let after = shard.ledger.export();
    assert_eq!(before.accounts, after.accounts);
    assert_eq!(before.holds, after.holds);

    // Once forgotten, a late message for a settled transaction finds nothing, and a transaction
    // still held settles as usual and is pruned by the next prune past its reserve time.
    assert_eq!(
        shard.post("posted", COORDINATOR).outcome,
        Outcome::TransactionNotFound
    );
    assert!(shard.post("held", COORDINATOR).outcome.is_ok());
    let next = shard.run(CommandKind::PruneDedup {
        older_than_ms: cutoff,
    });
    let held_at = before
        .transactions
        .iter()
        .find(|(id, _)| *id == txn("held"))
        .unwrap()
        .1
        .at_ms;
    assert_eq!(
        next.changes.pruned.transactions,
        vec![(held_at, txn("held"))]
    );
    assert!(shard.ledger.transaction(&txn("recent")).is_some());
}

// ---- Events ----

#[test]
fn every_accepted_command_gets_the_next_seq_and_rejections_get_none() {
    let mut shard = Shard::with_customers();
    let seq = shard.ledger.last_seq();
    assert_eq!(seq, 4);
    assert_eq!(
        shard.transfer("bob", "alice", 1).outcome,
        Outcome::InsufficientFunds
    );
    assert_eq!(shard.ledger.last_seq(), seq);
    let applied = shard.transfer("alice", "bob", 1);
    let event = applied.event.unwrap();
    assert_eq!(event.seq, seq + 1);
    assert_eq!(event.timestamp_ms, T0 + shard.next_request as i64);
    assert_eq!(
        event.command.request_id.as_str(),
        format!("req-{}", shard.next_request)
    );
    assert_eq!(event.accounts[0].version, 3);
}

// ---- Two-phase legs ----

#[test]
fn reserve_holds_and_post_settles_through_the_clearing_account() {
    let mut shard = Shard::with_customers();
    // This shard holds the debit of a cross-shard payment of 30.
    assert!(
        shard
            .reserve("t1", COORDINATOR, &[("alice", -30)])
            .outcome
            .is_ok()
    );
    let alice = shard.ledger.account(&id("alice")).unwrap();
    assert_eq!(
        (
            alice.balance.0,
            alice.pending_out.0,
            alice.available().unwrap().0
        ),
        (100, 30, 70)
    );
    // The held 30 cannot be spent twice.
    assert_eq!(
        shard.transfer("alice", "bob", 71).outcome,
        Outcome::InsufficientFunds
    );
    let posted = shard.post("t1", COORDINATOR);
    assert!(posted.outcome.is_ok());
    let ids: Vec<_> = posted
        .event
        .unwrap()
        .accounts
        .into_iter()
        .map(|a| (a.id.to_string(), a.balance.0))
        .collect();
    assert_eq!(
        ids,
        vec![("alice".into(), 70), ("sys:clearing:USD".into(), 30)]
    );
    assert_eq!(shard.ledger.account(&id("alice")).unwrap().pending_out.0, 0);
    assert_eq!(
        shard.ledger.transaction(&txn("t1")).unwrap().state,
        LegState::Posted
    );
    assert!(shard.ledger.balance_sums().values().all(|sum| *sum == 0));
}

#[test]
fn reserved_credits_are_not_spendable_and_count_against_the_upper_limit() {
    let mut shard = Shard::with_customers();
    let capped = Limits {
        lower: Some(Amount::ZERO),
        upper: Some(Amount(40)),
    };
    shard.run(CommandKind::UpdateLimits {
        account_id: id("bob"),
        limits: capped,
    });
    assert!(
        shard
            .reserve("t1", COORDINATOR, &[("bob", 30)])
            .outcome
            .is_ok()
    );
    assert_eq!(
        shard.transfer("bob", "alice", 1).outcome,
        Outcome::InsufficientFunds
    );
    assert_eq!(
        shard.transfer("alice", "bob", 11).outcome,
        Outcome::LimitExceeded
    );
    assert_eq!(
        shard.reserve("t2", COORDINATOR, &[("bob", 11)]).outcome,
        Outcome::LimitExceeded
    );
}

#[test]
fn void_releases_a_hold_and_is_idempotent() {
    let mut shard = Shard::with_customers();
    shard.reserve("t1", COORDINATOR, &[("alice", -30), ("bob", 30)]);
    let voided = shard.void("t1", COORDINATOR);
    assert!(voided.outcome.is_ok());
    let alice = shard.ledger.account(&id("alice")).unwrap();
    assert_eq!((alice.balance.0, alice.pending_out.0), (100, 0));
    assert_eq!(shard.ledger.account(&id("bob")).unwrap().pending_in.0, 0);
    assert_eq!(
        shard.ledger.transaction(&txn("t1")).unwrap().state,
        LegState::Voided
    );
    // Another void (a new request id) is answered by the record, as a resend of the first.
    let again = shard.void("t1", COORDINATOR);
    assert_eq!(
        (again.outcome, again.duplicate, again.seq),
        (Outcome::Ok, true, voided.seq)
    );
    assert!(again.event.is_none() && again.changes == Changes::default());
    assert_eq!(shard.post("t1", COORDINATOR).outcome, Outcome::LegNotHeld);
}

#[test]
fn a_post_or_void_resent_is_answered_by_the_two_phase_record_with_no_idempotency_record() {
    let mut shard = Shard::with_customers();
    shard.reserve("t1", COORDINATOR, &[("alice", -30), ("bob", 30)]);
    let post = Command::settle(&txn("t1"), COORDINATOR, 1, true);
    let posted = shard.ledger.apply(&post, T0);
    assert_eq!((posted.outcome, posted.duplicate), (Outcome::Ok, false));
    assert!(posted.changes.dedup_inserted.is_none());
    assert!(shard.ledger.dedup_record(&post.request_id).is_none());
    // The same request again, and a post of the same owner under another request id.
    for resend in [
        post.clone(),
        Command {
            request_id: RequestId::parse("other").unwrap(),
            ..post.clone()
        },
    ] {
        let again = shard.ledger.apply(&resend, T0 + 1);
        assert_eq!(
            (again.outcome, again.duplicate, again.seq, again.event),
            (Outcome::Ok, true, posted.seq, None)
        );
    }
    assert_eq!(shard.ledger.account(&id("alice")).unwrap().balance.0, 70);
    // Another coordinator's post, and a void of the posted transaction, are still refused.
    assert_eq!(
        shard.post("t1", OTHER_COORDINATOR).outcome,
        Outcome::TransactionOwnedByOther
    );
    assert_eq!(shard.void("t1", COORDINATOR).outcome, Outcome::LegNotHeld);
    // A void that comes first leaves a tombstone whose seq answers the void again.
    let tombstoned = shard
        .ledger
        .apply(&Command::settle(&txn("t2"), COORDINATOR, 1, false), T0);
    let again = shard.void("t2", COORDINATOR);
    assert_eq!(
        (again.outcome, again.duplicate, again.seq),
        (Outcome::Ok, true, tombstoned.seq)
    );
}

#[test]
fn an_accepted_reserve_keeps_its_idempotency_record_in_its_two_phase_record() {
    let mut shard = Shard::with_customers();
    let reserve = |amount: i128| Command {
        request_id: RequestId::for_step(&txn("t1"), "reserve", 1),
        kind: CommandKind::Reserve {
            txn_id: txn("t1"),
            owner: COORDINATOR,
            legs: vec![leg("alice", -amount), leg("bob", amount)],
            hold_id: None,
            metadata: Metadata::default(),
        },
    };
    let reserved = shard.ledger.apply(&reserve(30), T0);
    assert_eq!((reserved.outcome, reserved.duplicate), (Outcome::Ok, false));
    assert!(reserved.changes.dedup_inserted.is_none());
    assert!(shard.ledger.dedup_record(&reserve(30).request_id).is_none());
    // Resent while held and once posted: the first outcome, or the payload's mismatch.
    for post_first in [false, true] {
        if post_first {
            assert!(shard.post("t1", COORDINATOR).outcome.is_ok());
        }
        let again = shard.ledger.apply(&reserve(30), T0 + 1);
        assert_eq!(
            (again.outcome, again.duplicate, again.seq, again.event),
            (Outcome::Ok, true, reserved.seq, None)
        );
        let changed = shard.ledger.apply(&reserve(31), T0 + 1);
        assert_eq!(
            (changed.outcome, changed.duplicate, changed.seq),
            (Outcome::DuplicateWithDifferentPayload, false, 0)
        );
        assert!(changed.changes.dedup_inserted.is_none());
    }
    // The same reserve under another request id is another request, refused.
    assert_eq!(
        shard
            .reserve("t1", COORDINATOR, &[("alice", -30), ("bob", 30)])
            .outcome,
        Outcome::TransactionAlreadyReserved
    );
    assert_eq!((shard.balance("alice"), shard.balance("bob")), (70, 30));
}

#[test]
fn a_refused_reserve_keeps_its_own_idempotency_record() {
    let mut shard = Shard::with_customers();
    let reserve = Command {
        request_id: RequestId::for_step(&txn("t1"), "reserve", 1),
        kind: CommandKind::Reserve {
            txn_id: txn("t1"),
            owner: COORDINATOR,
            legs: vec![leg("alice", -150), leg("bob", 150)],
            hold_id: None,
            metadata: Metadata::default(),
        },
    };
    let refused = shard.ledger.apply(&reserve, T0);
    assert_eq!(refused.outcome, Outcome::InsufficientFunds);
    assert!(refused.changes.dedup_inserted.is_some());
    // Funds that arrive later do not change the answer to a resend.
    assert!(
        shard
            .transfer("sys:funding:USD", "alice", 100)
            .outcome
            .is_ok()
    );
    let again = shard.ledger.apply(&reserve, T0 + 1);
    assert_eq!(
        (again.outcome, again.duplicate, again.event),
        (Outcome::InsufficientFunds, true, None)
    );
    assert_eq!(shard.ledger.account(&id("alice")).unwrap().pending_out.0, 0);
    assert!(shard.ledger.transaction(&txn("t1")).is_none());
}

#[test]
fn void_of_an_unknown_transaction_writes_a_tombstone_that_rejects_a_late_reserve() {
    let mut shard = Shard::with_customers();
    assert!(shard.void("t9", COORDINATOR).outcome.is_ok());
    assert_eq!(
        shard.ledger.transaction(&txn("t9")).unwrap().state,
        LegState::Tombstone
    );
    let late = shard.reserve("t9", COORDINATOR, &[("alice", -10)]);
    assert_eq!(late.outcome, Outcome::TransactionTombstoned);
    assert_eq!(shard.ledger.account(&id("alice")).unwrap().pending_out.0, 0);
}

#[test]
fn post_is_legal_only_on_held_legs_of_the_owner() {
    let mut shard = Shard::with_customers();
    assert_eq!(
        shard.post("t1", COORDINATOR).outcome,
        Outcome::TransactionNotFound
    );
    shard.reserve("t1", COORDINATOR, &[("alice", -10)]);
    assert_eq!(
        shard.post("t1", OTHER_COORDINATOR).outcome,
        Outcome::TransactionOwnedByOther
    );
    assert_eq!(
        shard.void("t1", OTHER_COORDINATOR).outcome,
        Outcome::TransactionOwnedByOther
    );
    assert!(shard.post("t1", COORDINATOR).outcome.is_ok());
    // A post of a posted transaction is a resend (`a_post_or_void_resent_is_answered_…`).
    let again = shard.post("t1", COORDINATOR);
    assert_eq!((again.outcome, again.duplicate), (Outcome::Ok, true));
    assert_eq!(shard.void("t1", COORDINATOR).outcome, Outcome::LegNotHeld);
    assert_eq!(shard.balance("alice"), 90);
}

#[test]
fn a_transaction_is_reserved_once() {
    let mut shard = Shard::with_customers();
    shard.reserve("t1", COORDINATOR, &[("alice", -10)]);
    assert_eq!(
        shard.reserve("t1", COORDINATOR, &[("alice", -10)]).outcome,
        Outcome::TransactionAlreadyReserved
    );
    assert_eq!(
        shard
            .reserve("t1", OTHER_COORDINATOR, &[("alice", -10)])
            .outcome,
        Outcome::TransactionOwnedByOther
    );
    assert_eq!(
        shard.ledger.account(&id("alice")).unwrap().pending_out.0,
        10
    );
}

#[test]
fn a_post_succeeds_even_after_the_account_was_frozen() {
    let mut shard = Shard::with_customers();
    shard.reserve("t1", COORDINATOR, &[("alice", -10), ("bob", 10)]);
    shard.run(CommandKind::Freeze {
        account_id: id("bob"),
    });
    assert!(shard.post("t1", COORDINATOR).outcome.is_ok());
    assert_eq!((shard.balance("alice"), shard.balance("bob")), (90, 10));
}

#[test]
fn bad_reservations_are_rejected_without_any_change() {
    let mut shard = Shard::with_customers();
    let reserve = |legs: Vec<Leg>| CommandKind::Reserve {
        txn_id: txn("t1"),
        owner: COORDINATOR,
        legs,
        hold_id: None,
        metadata: Metadata::default(),
    };
    shard.assert_rejected(
        reserve(vec![leg("alice", -101)]),
        Outcome::InsufficientFunds,
    );
    shard.assert_rejected(reserve(vec![leg("alice", 0)]), Outcome::InvalidAmount);
    shard.assert_rejected(
        reserve(vec![leg("alice", -1), leg("alice", 1)]),
        Outcome::DuplicateAccountInBatch,
    );
    shard.assert_rejected(reserve(vec![leg("ghost", 1)]), Outcome::AccountNotFound);
    shard.assert_rejected(reserve(vec![]), Outcome::NotZeroSum);
    assert!(shard.ledger.transaction(&txn("t1")).is_none());
}

#[test]
fn a_fenced_coordinator_can_neither_reserve_nor_settle_and_fences_only_rise() {
    let mut shard = Shard::with_customers();
    shard.reserve("t1", COORDINATOR, &[("alice", -10)]);
    assert_eq!(
        shard
            .ledger
            .holds_owned_by(COORDINATOR.coordinator_shard_id),
        1
    );
    let fence = |below_epoch| CommandKind::FenceCoordinator {
        coordinator_shard_id: 1,
        below_epoch,
    };
    assert!(shard.run(fence(2)).outcome.is_ok());
    assert!(shard.run(fence(1)).outcome.is_ok());
    assert_eq!(shard.ledger.fences(), vec![(1, 2)]);
    for kind in [
        CommandKind::Post {
            txn_id: txn("t1"),
            owner: COORDINATOR,
        },
        CommandKind::Void {
            txn_id: txn("t1"),
            owner: COORDINATOR,
        },
        CommandKind::Reserve {
            txn_id: txn("t2"),
            owner: COORDINATOR,
            legs: vec![leg("alice", -1)],
            hold_id: None,
            metadata: Metadata::default(),
        },
    ] {
        shard.assert_rejected(kind, Outcome::CoordinatorFenced);
    }
    // The same coordinator shard at the new epoch is not fenced.
    let renewed = Owner {
        coordinator_shard_id: 1,
        epoch: 2,
    };
    assert!(shard.post("t1", renewed).outcome.is_ok());
    assert_eq!(shard.ledger.holds_owned_by(1), 0);
    assert_eq!(Ledger::import(shard.ledger.export()).fences(), vec![(1, 2)]);
}

#[test]
fn only_holds_older_than_the_cutoff_are_stale() {
    let mut shard = Shard::with_customers();
    shard.reserve("t1", COORDINATOR, &[("alice", -10)]);
    let cutoff = T0 + shard.next_request as i64 + 1;
    shard.reserve("t2", COORDINATOR, &[("alice", -10)]);
    shard.reserve("t3", COORDINATOR, &[("alice", -10)]);
    shard.post("t3", COORDINATOR);
    assert_eq!(
        shard.ledger.held_since(cutoff),
        vec![(txn("t1"), COORDINATOR)]
    );
}

// ---- Snapshots and digests ----

#[test]
fn export_and_import_round_trip_to_the_same_digest() {
    let mut shard = Shard::with_customers();
    shard.reserve("t1", COORDINATOR, &[("alice", -10)]);
    shard.void("t2", COORDINATOR);
    let restored = Ledger::import(shard.ledger.export());
    assert_eq!(restored.digest(), shard.ledger.digest());
    assert_eq!(restored.last_seq(), shard.ledger.last_seq());
}

// ---- Holds ----

fn place_hold(hold: &str, account: &str, amount: i128) -> CommandKind {
    CommandKind::PlaceHold {
        hold_id: txn(hold),
        account_id: id(account),
        amount: Amount(amount),
        currency: usd(),
        metadata: Metadata::default(),
    }
}

fn void_hold(hold: &str) -> CommandKind {
    CommandKind::VoidHold { hold_id: txn(hold) }
}

fn capture_batch(hold: &str, legs: Vec<Leg>) -> CommandKind {
    CommandKind::Batch {
        legs,
        txn_id: None,
        hold_id: Some(txn(hold)),
        metadata: Metadata::default(),
    }
}

fn capture_reserve(txn_id: &str, hold: &str, legs: Vec<Leg>) -> CommandKind {
    CommandKind::Reserve {
        txn_id: txn(txn_id),
        owner: COORDINATOR,
        legs,
        hold_id: Some(txn(hold)),
        metadata: Metadata::default(),
    }
}

impl Shard {
    /// (balance, pending_out, available) of an account.
    fn funds(&self, account: &str) -> (i128, i128, i128) {
        let account = self.ledger.account(&id(account)).unwrap();
        (
            account.balance.0,
            account.pending_out.0,
            account.available().unwrap().0,
        )
    }

    fn hold_state(&self, hold: &str) -> HoldState {
        self.ledger.hold(&txn(hold)).unwrap().state.clone()
    }
}

#[test]
fn a_hold_takes_from_available_and_a_void_gives_it_back() {
    let mut shard = Shard::with_customers();
    assert!(shard.run(place_hold("h1", "alice", 30)).outcome.is_ok());
    assert_eq!(shard.funds("alice"), (100, 30, 70));
    // The held money cannot be spent twice.
    shard.assert_rejected(place_hold("h2", "alice", 71), Outcome::InsufficientFunds);
    assert_eq!(
        shard.transfer("alice", "bob", 71).outcome,
        Outcome::InsufficientFunds
    );
    // Nor can the account be closed while it holds money.
    shard.assert_rejected(
        CommandKind::Close {
            account_id: id("alice"),
        },
        Outcome::AccountNotEmpty,
    );
    assert!(shard.run(void_hold("h1")).outcome.is_ok());
    assert_eq!(shard.funds("alice"), (100, 0, 100));
    assert_eq!(shard.hold_state("h1"), HoldState::Voided);
    shard.assert_rejected(void_hold("h1"), Outcome::HoldNotOpen);
    shard.assert_rejected(void_hold("nope"), Outcome::HoldNotFound);
}

#[test]
fn bad_holds_are_rejected_without_any_change() {
    let mut shard = Shard::with_customers();
    assert!(shard.run(place_hold("h1", "alice", 10)).outcome.is_ok());
    shard.assert_rejected(place_hold("h1", "bob", 10), Outcome::HoldAlreadyExists);
    shard.assert_rejected(place_hold("h2", "alice", 0), Outcome::InvalidAmount);
    shard.assert_rejected(place_hold("h2", "alice", -5), Outcome::InvalidAmount);
    shard.assert_rejected(place_hold("h2", "ghost", 5), Outcome::AccountNotFound);
    shard.assert_rejected(
        place_hold("h2", "sys:clearing:USD", 5),
        Outcome::InvalidAccountId,
    );
    shard.assert_rejected(
        CommandKind::PlaceHold {
            hold_id: txn("h2"),
            account_id: id("alice"),
            amount: Amount(5),
            currency: eur(),
            metadata: Metadata::default(),
        },
        Outcome::CurrencyMismatch,
    );
    assert!(
        shard
            .run(CommandKind::Freeze {
                account_id: id("alice")
            })
            .outcome
            .is_ok()
    );
    shard.assert_rejected(place_hold("h2", "alice", 5), Outcome::AccountFrozen);
    // A frozen account's open hold can still be released.
    assert!(shard.run(void_hold("h1")).outcome.is_ok());
    assert_eq!(shard.funds("alice"), (100, 0, 100));
}

#[test]
fn a_batch_captures_part_of_a_hold_and_releases_the_rest() {
    let mut shard = Shard::with_customers();
    assert!(shard.run(place_hold("h1", "alice", 60)).outcome.is_ok());
    shard.assert_rejected(
        capture_batch("h1", vec![leg("alice", -61), leg("bob", 61)]),
        Outcome::HoldExceeded,
    );
    shard.assert_rejected(
        capture_batch("h1", vec![leg("bob", -10), leg("alice", 10)]),
        Outcome::HoldMismatch,
    );
    shard.assert_rejected(
        capture_batch(
            "h1",
            vec![
                leg("alice", -10),
                leg("sys:funding:USD", -5),
                leg("bob", 15),
            ],
        ),
        Outcome::HoldMismatch,
    );
    shard.assert_rejected(
        capture_batch("nope", vec![leg("alice", -10), leg("bob", 10)]),
        Outcome::HoldNotFound,
    );
    let applied = shard.run(capture_batch("h1", vec![leg("alice", -45), leg("bob", 45)]));
    assert!(applied.outcome.is_ok());
    assert_eq!(shard.funds("alice"), (55, 0, 55));
    assert_eq!(shard.balance("bob"), 45);
    assert_eq!(
        shard.hold_state("h1"),
        HoldState::Captured {
            txn_id: txn("h1"),
            amount: Amount(45)
        }
    );
    shard.assert_rejected(
        capture_batch("h1", vec![leg("alice", -5), leg("bob", 5)]),
        Outcome::HoldNotOpen,
    );
    shard.assert_rejected(void_hold("h1"), Outcome::HoldNotOpen);
    assert!(shard.ledger.balance_sums().values().all(|sum| *sum == 0));
}

#[test]
fn a_reservation_draws_from_a_hold_its_post_captures_and_its_void_reopens() {
    let mut shard = Shard::with_customers();
    assert!(shard.run(place_hold("h1", "alice", 60)).outcome.is_ok());
    // The reservation does not take the money a second time.
    let reserve = capture_reserve("t1", "h1", vec![leg("alice", -50), leg("bob", 50)]);
    assert!(shard.run(reserve).outcome.is_ok());
    assert_eq!(shard.funds("alice"), (100, 60, 40));
    assert_eq!(shard.hold_state("h1"), HoldState::Capturing(txn("t1")));
    // While a transaction captures it, the hold can be neither voided nor captured again.
    shard.assert_rejected(void_hold("h1"), Outcome::HoldNotOpen);
    shard.assert_rejected(
        capture_reserve("t2", "h1", vec![leg("alice", -5), leg("bob", 5)]),
        Outcome::HoldNotOpen,
    );
    assert!(shard.void("t1", COORDINATOR).outcome.is_ok());
    assert_eq!(shard.funds("alice"), (100, 60, 40));
    assert_eq!(shard.hold_state("h1"), HoldState::Open);
    assert_eq!(shard.ledger.account(&id("bob")).unwrap().pending_in.0, 0);

    let reserve = capture_reserve("t3", "h1", vec![leg("alice", -50), leg("bob", 50)]);
    assert!(shard.run(reserve).outcome.is_ok());
    assert!(shard.post("t3", COORDINATOR).outcome.is_ok());
    assert_eq!(shard.funds("alice"), (50, 0, 50));
    assert_eq!(shard.balance("bob"), 50);
    assert_eq!(
        shard.hold_state("h1"),
        HoldState::Captured {
            txn_id: txn("t3"),
            amount: Amount(50)
        }
    );
    assert!(shard.ledger.balance_sums().values().all(|sum| *sum == 0));
}

#[test]
fn a_capture_across_shards_moves_exactly_the_captured_amount() {
    // The payer's shard holds and captures; the payee's shard only credits.
    let mut payer_shard = Shard::with_customers();
    let mut payee_shard = Shard::new();
    assert!(
        payee_shard
            .create("carol", usd(), Limits::NO_OVERDRAFT)
            .outcome
            .is_ok()
    );
    assert!(
        payer_shard
            .run(place_hold("h1", "alice", 80))
            .outcome
            .is_ok()
    );
    let debit = capture_reserve("t1", "h1", vec![leg("alice", -30)]);
    assert!(payer_shard.run(debit).outcome.is_ok());
    assert!(
        payee_shard
            .reserve("t1", COORDINATOR, &[("carol", 30)])
            .outcome
            .is_ok()
    );
    assert!(payer_shard.post("t1", COORDINATOR).outcome.is_ok());
    assert!(payee_shard.post("t1", COORDINATOR).outcome.is_ok());
    assert_eq!(payer_shard.funds("alice"), (70, 0, 70));
    assert_eq!(payee_shard.balance("carol"), 30);
    let clearing = |shard: &Shard| shard.balance("sys:clearing:USD");
    assert_eq!(clearing(&payer_shard) + clearing(&payee_shard), 0);
    assert_eq!(clearing(&payer_shard), 30);
}

// ---- Properties ----

#[derive(Clone, Debug)]
pub(crate) enum Op {
    Transfer {
        from: usize,
        to: usize,
        amount: i128,
    },
    Batch {
        legs: Vec<(usize, i128)>,
    },
    Reserve {
        txn: usize,
        legs: Vec<(usize, i128)>,
    },
    Post {
        txn: usize,
    },
    Void {
        txn: usize,
    },
    PlaceHold {
        hold: usize,
        account: usize,
        amount: i128,
    },
    VoidHold {
        hold: usize,
    },
    /// A transfer from the hold's account that captures it: a reservation of `txn`, or a
    /// fast-path batch without one.
    Capture {
        hold: usize,
        txn: Option<usize>,
        to: usize,
        amount: i128,
    },
    Freeze {
        account: usize,
    },
    Unfreeze {
        account: usize,
    },
    Retry {
        back: usize,
    },
    /// Forgets what is older than `back` commands ago.
    Prune {
        back: usize,
    },
}

const ACCOUNTS: [&str; 5] = ["sys:funding:USD", "alice", "bob", "carol", "dave"];

pub(crate) fn op() -> impl Strategy<Value = Op> {
    let account = 0..ACCOUNTS.len();
    let amount = -200i128..200;
    prop_oneof![
        4 => (account.clone(), account.clone(), 0i128..150).prop_map(|(from, to, amount)| Op::Transfer { from, to, amount }),
        2 => prop::collection::vec((account.clone(), amount.clone()), 0..5).prop_map(|legs| Op::Batch { legs }),
        3 => (0usize..6, prop::collection::vec((account.clone(), amount), 1..3)).prop_map(|(txn, legs)| Op::Reserve { txn, legs }),
        2 => (0usize..6).prop_map(|txn| Op::Post { txn }),
        2 => (0usize..6).prop_map(|txn| Op::Void { txn }),
        2 => (0usize..4, account.clone(), -10i128..120).prop_map(|(hold, account, amount)| Op::PlaceHold { hold, account, amount }),
        1 => (0usize..4).prop_map(|hold| Op::VoidHold { hold }),
        2 => (0usize..4, prop::option::of(0usize..6), account.clone(), 1i128..130).prop_map(|(hold, txn, to, amount)| Op::Capture { hold, txn, to, amount }),
        1 => account.clone().prop_map(|account| Op::Freeze { account }),
        1 => account.prop_map(|account| Op::Unfreeze { account }),
        1 => (0usize..20).prop_map(|back| Op::Retry { back }),
        1 => (0usize..30).prop_map(|back| Op::Prune { back }),
    ]
}

pub(crate) fn to_command(op: &Op, index: usize, history: &[Command]) -> Command {
    let legs = |legs: &[(usize, i128)]| {
        legs.iter()
            .map(|(a, amount)| leg(ACCOUNTS[*a], *amount))
            .collect::<Vec<_>>()
    };
    let txn_id = |t: usize| txn(&format!("txn-{t}"));
    let hold_id = |h: usize| txn(&format!("hold-{h}"));
    let kind = match op {
        Op::Transfer { from, to, amount } => CommandKind::Transfer {
            from: id(ACCOUNTS[*from]),
            to: id(ACCOUNTS[*to]),
            amount: Amount(*amount),
            currency: usd(),
            metadata: Metadata::default(),
        },
        // Batches are made zero-sum most of the time by a balancing leg on the funding account.
        Op::Batch { legs: raw } => {
            let mut legs = legs(raw);
            let sum: i128 = legs.iter().map(|l| l.amount.0).sum();
            if !index.is_multiple_of(3) && sum != 0 {
                legs.push(leg("sys:funding:USD", -sum));
            }
            CommandKind::Batch {
                legs,
                txn_id: None,
                hold_id: None,
                metadata: Metadata::default(),
            }
        }
        Op::Reserve { txn, legs: raw } => CommandKind::Reserve {
            txn_id: txn_id(*txn),
            owner: COORDINATOR,
            legs: legs(raw),
            hold_id: None,
            metadata: Metadata::default(),
        },
        Op::PlaceHold {
            hold,
            account,
            amount,
        } => CommandKind::PlaceHold {
            hold_id: hold_id(*hold),
            account_id: id(ACCOUNTS[*account]),
            amount: Amount(*amount),
            currency: usd(),
            metadata: Metadata::default(),
        },
        Op::VoidHold { hold } => CommandKind::VoidHold {
            hold_id: hold_id(*hold),
        },
        // Captures debit the account the hold was placed on (found in the history), so that
        // most of them are well formed; the amount may still exceed the hold.
        Op::Capture {
            hold,
            txn,
            to,
            amount,
        } => {
            let held_account = history
                .iter()
                .rev()
                .find_map(|command| match &command.kind {
                    CommandKind::PlaceHold {
                        hold_id: placed,
                        account_id,
                        ..
                    } if *placed == hold_id(*hold) => Some(account_id.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| id(ACCOUNTS[1]));
            let legs = vec![
                Leg {
                    account_id: held_account,
                    amount: Amount(-amount),
                    currency: usd(),
                },
                leg(ACCOUNTS[*to], *amount),
            ];
            match txn {
                Some(txn) => CommandKind::Reserve {
                    txn_id: txn_id(*txn),
                    owner: COORDINATOR,
                    legs,
                    hold_id: Some(hold_id(*hold)),
                    metadata: Metadata::default(),
                },
                None => CommandKind::Batch {
                    legs,
                    txn_id: None,
                    hold_id: Some(hold_id(*hold)),
                    metadata: Metadata::default(),
                },
            }
        }
        Op::Post { txn } => CommandKind::Post {
            txn_id: txn_id(*txn),
            owner: COORDINATOR,
        },
        Op::Void { txn } => CommandKind::Void {
            txn_id: txn_id(*txn),
            owner: COORDINATOR,
        },
        Op::Freeze { account } => CommandKind::Freeze {
            account_id: id(ACCOUNTS[*account]),
        },
        Op::Unfreeze { account } => CommandKind::Unfreeze {
            account_id: id(ACCOUNTS[*account]),
        },
        // Commands are applied at `T0 + their position` (`at`).
        Op::Prune { back } => CommandKind::PruneDedup {
            older_than_ms: at(history.len().saturating_sub(*back)),
        },
        Op::Retry { back } => {
            if let Some(earlier) = history
                .len()
                .checked_sub(back + 1)
                .and_then(|i| history.get(i))
            {
                return earlier.clone();
            }
            CommandKind::PruneDedup { older_than_ms: 0 }
        }
    };
    Command {
        request_id: RequestId::parse(&format!("op-{index}")).unwrap(),
        kind,
    }
}

pub(crate) fn setup_commands() -> Vec<Command> {
    let mut commands = Vec::new();
    for (i, name) in ACCOUNTS.iter().enumerate() {
        let limits = if i == 0 {
            Limits::UNBOUNDED
        } else {
            Limits {
                lower: Some(Amount(-(i as i128) * 10 + 10)),
                upper: Some(Amount(500)),
            }
        };
        commands.push(Command {
            request_id: RequestId::parse(&format!("setup-{i}")).unwrap(),
            kind: CommandKind::CreateAccount {
                account_id: id(name),
                currency: usd(),
                scale: 2,
                limits,
                metadata: Metadata::default(),
            },
        });
    }
    commands
}

/// The leader time the property tests apply the command at `position` at.
pub(crate) fn at(position: usize) -> i64 {
    T0 + position as i64
}

fn run_all(commands: &[Command]) -> Ledger {
    let mut ledger = Ledger::new();
    for (position, command) in commands.iter().enumerate() {
        ledger.apply(command, at(position));
    }
    ledger
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn invariants_hold_after_every_command(ops in prop::collection::vec(op(), 1..80)) {
        let mut commands = setup_commands();
        let mut ledger = run_all(&commands);
        let mut expected_seq = ledger.last_seq();
        let mut posted_or_voided: BTreeMap<TxnId, LegState> = BTreeMap::new();
        for (index, op) in ops.iter().enumerate() {
            let command = to_command(op, index, &commands);
            let before = ledger.export();
            let applied = ledger.apply(&command, at(commands.len()));
            commands.push(command);

            // Sums per currency stay zero, on this shard at every seq.
            prop_assert!(ledger.balance_sums().values().all(|sum| *sum == 0), "{:?}", ledger.balance_sums());
            // No account passes its limits.
            for account in ledger.accounts() {
                prop_assert!(account.within_limits(), "{account:?}");
                prop_assert!(account.pending_out.0 >= 0 && account.pending_in.0 >= 0);
            }
            // Seq is consecutive and only accepted new commands produce events.
            match &applied.event {
                Some(event) => { expected_seq += 1; prop_assert_eq!(event.seq, expected_seq); prop_assert!(applied.outcome.is_ok()); }
                None => {
                    prop_assert!(!applied.outcome.is_ok() || applied.duplicate);
                    let mut after = ledger.export();
                    after.dedup.retain(|(request_id, _)| before.dedup.iter().any(|(known, _)| known == request_id));
                    prop_assert_eq!(&before, &after, "a rejection changed the state");
                }
            }
            prop_assert_eq!(ledger.last_seq(), expected_seq);
            // A prune forgets exactly the idempotency records and the settled legs older than
            // its cutoff (a settled transaction may then start afresh), and no hold.
            if let (CommandKind::PruneDedup { older_than_ms }, false) = (&commands[commands.len() - 1].kind, applied.duplicate) {
                let after = ledger.export();
                let old = |at_ms: i64| at_ms < *older_than_ms;
                let expected_dedup: Vec<_> = before.dedup.iter().filter(|(_, r)| !old(r.at_ms)).map(|(id, _)| id.clone()).collect();
                let kept_dedup: Vec<_> = after.dedup.iter().filter(|(id, _)| *id != commands[commands.len() - 1].request_id).map(|(id, _)| id.clone()).collect();
                prop_assert_eq!(kept_dedup, expected_dedup);
                let expected_transactions: Vec<_> = before.transactions.iter().filter(|(_, r)| r.state == LegState::Held || !old(r.at_ms)).cloned().collect();
                prop_assert_eq!(&after.transactions, &expected_transactions);
                prop_assert_eq!(&after.holds, &before.holds);
                for (_, txn_id) in &applied.changes.pruned.transactions {
                    posted_or_voided.remove(txn_id);
                }
            }
            // The search for stale holds finds exactly the legs held since before its cutoff.
            let cutoff = at(commands.len() / 2);
            let held: Vec<_> = ledger.export().transactions.into_iter()
                .filter(|(_, record)| record.state == LegState::Held)
                .collect();
            let stale: Vec<_> = held.iter()
                .filter(|(_, record)| record.at_ms < cutoff)
                .map(|(txn_id, record)| (txn_id.clone(), record.owner))
                .collect();
            prop_assert_eq!(ledger.held_since(cutoff), stale);
            prop_assert_eq!(ledger.holds_owned_by(COORDINATOR.coordinator_shard_id), held.len());
            // A posted transaction is never voided, a voided one never posted: final states stick.
            for (txn_id, record) in ledger.export().transactions {
                if let Some(previous) = posted_or_voided.get(&txn_id) {
                    let stuck = *previous == record.state || (*previous == LegState::Tombstone && record.state == LegState::Tombstone);
                    prop_assert!(stuck, "{txn_id}: {previous:?} became {:?}", record.state);
                }
                if record.state != LegState::Held {
                    posted_or_voided.insert(txn_id, record.state);
                }
            }
            // A captured or voided hold stays so; a capturing one is captured only by its
            // transaction's post, for at most its amount.
            for (hold_id, hold) in ledger.export().holds {
                let before = before.holds.iter().find(|(id, _)| *id == hold_id).map(|(_, h)| h.state.clone());
                if let Some(previous @ (HoldState::Captured { .. } | HoldState::Voided)) = &before {
                    prop_assert_eq!(previous, &hold.state, "{} left a final state", hold_id);
                }
                if let HoldState::Captured { amount, .. } = &hold.state {
                    prop_assert!(amount.0 > 0 && amount.0 <= hold.amount.0);
                }
            }
        }
        // Pending amounts equal exactly what held transactions and pending holds hold (a
        // reservation's debit that draws from a hold is counted once, as the hold).
        let state = ledger.export();
        let mut held: BTreeMap<AccountId, (i128, i128)> = BTreeMap::new();
        for (_, record) in &state.transactions {
            if record.state == LegState::Held {
                for leg in &record.legs {
                    let entry = held.entry(leg.account_id.clone()).or_default();
                    match (leg.amount.0 < 0, record.hold_id.is_some()) {
                        (true, true) => {}
                        (true, false) => entry.0 -= leg.amount.0,
                        (false, _) => entry.1 += leg.amount.0,
                    }
                }
            }
        }
        for (_, hold) in &state.holds {
            if hold.is_pending() {
                held.entry(hold.account_id.clone()).or_default().0 += hold.amount.0;
            }
        }
        for account in ledger.accounts() {
            let (out, into) = held.get(&account.id).copied().unwrap_or_default();
            prop_assert_eq!((account.pending_out.0, account.pending_in.0), (out, into), "{}", account.id);
        }
    }

    #[test]
    fn replaying_the_same_commands_gives_the_same_digest(ops in prop::collection::vec(op(), 1..60)) {
        let mut commands = setup_commands();
        for (index, op) in ops.iter().enumerate() {
            let command = to_command(op, index, &commands);
            commands.push(command);
        }
        let first = run_all(&commands);
        let second = run_all(&commands);
        prop_assert_eq!(first.digest(), second.digest());
        prop_assert_eq!(Ledger::import(first.export()).digest(), first.digest());
    }

    #[test]
    fn a_ledger_rebuilt_from_its_state_goes_on_exactly_as_the_live_one(
        ops in prop::collection::vec(op(), 1..80),
        rebuild_at in 0usize..90,
    ) {
        let mut commands = setup_commands();
        for (index, op) in ops.iter().enumerate() {
            let command = to_command(op, index, &commands);
            commands.push(command);
        }
        let mut live = Ledger::new();
        let mut rebuilt = Ledger::new();
        for (position, command) in commands.iter().enumerate() {
            if position == rebuild_at {
                rebuilt = Ledger::import(rebuilt.export());
            }
            let expected = live.apply(command, at(position));
            prop_assert_eq!(rebuilt.apply(command, at(position)), expected, "{:?}", command);
        }
        prop_assert_eq!(rebuilt.digest(), live.digest());
        prop_assert_eq!(rebuilt.held_since(i64::MAX), live.held_since(i64::MAX));
    }

    #[test]
    fn duplicates_and_any_order_of_reserve_post_void_never_double_apply(
        steps in prop::collection::vec((0u8..3, any::<bool>()), 1..12)
    ) {
        // One transaction moving 40 from alice to bob on this shard, driven by an arbitrary
        // sequence of reserve, post and void messages, each possibly a resend of the same request.
        let mut shard = Shard::with_customers();
        let mut applied_requests: Vec<Command> = Vec::new();
        let mut posted = false;
        let mut voided_or_tombstoned = false;
        for (step, resend) in steps {
            let command = if resend && !applied_requests.is_empty() {
                applied_requests[applied_requests.len() - 1].clone()
            } else {
                let kind = match step {
                    0 => CommandKind::Reserve { txn_id: txn("t"), owner: COORDINATOR, legs: vec![leg("alice", -40), leg("bob", 40)], hold_id: None, metadata: Metadata::default() },
                    1 => CommandKind::Post { txn_id: txn("t"), owner: COORDINATOR },
                    _ => CommandKind::Void { txn_id: txn("t"), owner: COORDINATOR },
                };
                Command { request_id: RequestId::parse(&format!("m-{}", applied_requests.len())).unwrap(), kind }
            };
            let applied = shard.ledger.apply(&command, T0);
            applied_requests.push(command.clone());
            if applied.outcome.is_ok() && !applied.duplicate {
                match command.kind {
                    CommandKind::Post { .. } => { prop_assert!(!posted && !voided_or_tombstoned); posted = true; }
                    CommandKind::Void { .. } => { prop_assert!(!posted); voided_or_tombstoned = true; }
                    _ => prop_assert!(!posted && !voided_or_tombstoned),
                }
            }
        }
        let alice = shard.ledger.account(&id("alice")).unwrap().clone();
        let bob = shard.ledger.account(&id("bob")).unwrap().clone();
        let state = shard.ledger.transaction(&txn("t")).map(|r| r.state);
        let expected = match state {
            Some(LegState::Posted) => (60, 0, 40, 0),
            Some(LegState::Held) => (100, 40, 0, 40),
            _ => (100, 0, 0, 0),
        };
        prop_assert_eq!((alice.balance.0, alice.pending_out.0, bob.balance.0, bob.pending_in.0), expected);
        prop_assert!(shard.ledger.balance_sums().values().all(|sum| *sum == 0));
    }
}

/// Idempotency records keep fingerprints across restarts and upgrades: a fingerprint is the
/// SHA-256 of the payload's whole postcard encoding, however it is fed to the hash.
#[test]
fn fingerprints_hash_the_whole_encoding() {
    use sha2::{Digest, Sha256};
    for kind in crate::convert::tests::every_command_kind() {
        let encoded = postcard::to_stdvec(&kind).unwrap();
        let expected: [u8; 32] = Sha256::digest(&encoded).into();
        assert_eq!(state::fingerprint(&kind), expected, "{kind:?}");
    }
}
