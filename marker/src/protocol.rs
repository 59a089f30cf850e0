//! The coordinator's protocol for one transaction, as a pure state machine: from the replicated
//! record (`saga::Transaction`) and the storage shards' answers received so far, the next step.
//! No I/O, no clock, no randomness. `driver::Driver` runs it against real storage shards and
//! the Raft log; the `simulation` crate runs the same code on a simulated network.
//!
//! Single shard: one atomic batch whose request id is the transaction id; its answer decides
//! and settles the shard, so the decision and `Done` are proposed together.
//! Several shards: reserve on every shard in plan order (debit shards first) until all are held,
//! one is refused, or the deadline passes; write the decision; then post everywhere (commit) or
//! void everywhere (abort, even on shards never reached, which leaves tombstones there); then
//! write `Done`. Each step's request id is fixed by the transaction, so resends are safe.

use std::collections::BTreeMap;

use auticuro::ledger::{AccountId, Command, CommandKind, Outcome, Owner, RequestId, TxnId};

use crate::saga::{AbortReason, CoordinatorCommand, Decision, ShardLegs, Transaction};

/// A storage shard's definite answer to a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub outcome: Outcome,
    /// The event seq the shard gave the command (0 when it was refused).
    pub seq: u64,
    pub detail_account_id: Option<AccountId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send `command` to one shard and resend it (same request id) until the shard answers
    /// definitely (`Drive::answered`); with a deadline (leader time, ms), stop resending once
    /// it has passed (`Drive::expired`).
    Execute {
        shard_id: u32,
        command: Command,
        deadline_ms: Option<i64>,
    },
    /// Send every command to its shard at once and resend each until its shard answers
    /// (`Drive::settled`). Posting or voiding one's own reservation cannot be refused.
    Settle(Vec<(u32, Command)>),
    /// Write these into the coordinator's log, in this order (one proposal each, sent
    /// together): more than one when the answers so far warrant both a decision and `Done`.
    Propose(Vec<CoordinatorCommand>),
    /// The transaction is done.
    Finished,
}

/// What driving one transaction has learned since it (re)started. Lost with the leader; a new
/// leader starts from `Drive::default()` and the replicated record, and resends the same steps.
#[derive(Clone, Debug, Default)]
pub struct Drive {
    /// Reservations held, in plan order.
    reserved: usize,
    /// The decision the answers so far call for, before it is written.
    warranted: Option<Decision>,
    /// The shards whose final command answered, with the seq each gave it.
    settled: BTreeMap<u32, u64>,
}

impl Drive {
    pub fn next(&self, transaction: &Transaction, owner: Owner) -> Step {
        if transaction.done {
            return Step::Finished;
        }
        let txn_id = transaction.txn_id.clone();
        let Some(decision) = &transaction.decision else {
            let decision = match (&self.warranted, transaction.plan.get(self.reserved)) {
                (Some(decision), _) => decision.clone(),
                (None, Some(group)) if transaction.is_single_shard() => {
                    return Step::Execute {
                        shard_id: group.shard_id,
                        command: batch_command(transaction),
                        deadline_ms: None,
                    };
                }
                (None, Some(group)) => {
                    return Step::Execute {
                        shard_id: group.shard_id,
                        command: reserve_command(transaction, group, owner),
                        deadline_ms: Some(transaction.decide_by_ms),
                    };
                }
                (None, None) => Decision::Commit,
            };
            let decide = CoordinatorCommand::Decide {
                txn_id: txn_id.clone(),
                decision,
            };
            // A single-shard transaction's batch answer settled its shard too: `Done` need not
            // wait for the decision's round.
            if transaction.is_single_shard() && !self.settled.is_empty() {
                return Step::Propose(vec![decide, self.done(txn_id)]);
            }
            return Step::Propose(vec![decide]);
        };
        let unsettled: Vec<(u32, Command)> = transaction
            .plan
            .iter()
            .filter(|group| !self.settled.contains_key(&group.shard_id))
            .map(|group| {
                let command = if transaction.is_single_shard() {
                    // No reservation: the batch again, which returns its stored outcome.
                    batch_command(transaction)
                } else {
                    let commit = *decision == Decision::Commit;
                    Command::settle(&txn_id, owner, group.shard_id, commit)
                };
                (group.shard_id, command)
            })
            .collect();
        if unsettled.is_empty() {
            Step::Propose(vec![self.done(txn_id)])
        } else {
            Step::Settle(unsettled)
        }
    }

    /// `Done`, with the seq each settled shard gave its final command.
    fn done(&self, txn_id: TxnId) -> CoordinatorCommand {
        let shard_seqs = self
            .settled
            .iter()
            .filter(|(_, seq)| **seq > 0)
            .map(|(shard_id, seq)| (*shard_id, *seq))
            .collect();
        CoordinatorCommand::Done { txn_id, shard_seqs }
    }

    /// The definite answer to an `Execute` step.
    pub fn answered(&mut self, transaction: &Transaction, shard_id: u32, answer: &Answer) {
        if transaction.is_single_shard() {
            // The batch is the whole transaction: its answer decides it and settles the shard.
            self.warranted = Some(if answer.outcome.is_ok() {
                Decision::Commit
            } else {
                rejected(answer)
            });
            self.settled.insert(shard_id, answer.seq);
        } else if answer.outcome.is_ok() {
            self.reserved += 1;
        } else {
            self.warranted = Some(rejected(answer));
        }
    }

    /// No definite answer to a reservation before the deadline: it may or may not hold, and the
    /// void that follows the abort releases it either way (or tombstones a late one).
    pub fn expired(&mut self) {
        self.warranted = Some(Decision::Abort {
            reason: AbortReason::Deadline,
            outcome: Outcome::Ok,
            detail_account_id: None,
        });
    }

    /// The answer to one command of a `Settle` step.
    pub fn settled(&mut self, shard_id: u32, answer: &Answer) {
        self.settled.insert(shard_id, answer.seq);
    }

    /// How many reservations are held.
    pub fn reserved(&self) -> usize {
        self.reserved
    }
}

fn rejected(answer: &Answer) -> Decision {
    Decision::Abort {
        reason: AbortReason::Rejected,
        outcome: answer.outcome,
        detail_account_id: answer.detail_account_id.clone(),
    }
}

/// The single-shard fast path's one atomic batch; its request id is the transaction id, so a
/// resend returns the stored outcome and seq of the first.
fn batch_command(transaction: &Transaction) -> Command {
    Command {
        request_id: RequestId::for_transaction(&transaction.txn_id),
        kind: CommandKind::Batch {
            legs: transaction.plan[0].legs.clone(),
            txn_id: Some(transaction.txn_id.clone()),
            hold_id: transaction.hold_id.clone(),
            metadata: transaction.metadata.clone(),
        },
    }
}

fn reserve_command(transaction: &Transaction, group: &ShardLegs, owner: Owner) -> Command {
    // A captured hold is drawn from by the debit, on the debit's shard.
    let hold_id = transaction
        .hold_id
        .clone()
        .filter(|_| group.legs.iter().any(|leg| leg.amount.0 < 0));
    Command {
        request_id: RequestId::for_step(&transaction.txn_id, "reserve", group.shard_id),
        kind: CommandKind::Reserve {
            txn_id: transaction.txn_id.clone(),
            owner,
            legs: group.legs.clone(),
            hold_id,
            // What the transaction means travels with each shard's part of it (the read side
            // builds activity feeds from it).
            metadata: transaction.metadata.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use auticuro::ledger::{Amount, Currency, Metadata, TxnId};

    use super::*;
    use crate::saga::{Coordinator, CoordinatorResponse, NewTransaction, plan, txn_id_for};

    const OWNER: Owner = Owner {
        coordinator_shard_id: 4,
        epoch: 2,
    };

    fn leg(account: &str, amount: i128) -> auticuro::ledger::Leg {
        auticuro::ledger::Leg {
            account_id: AccountId::parse(account).unwrap(),
            amount: Amount(amount),
            currency: Currency::parse("USD").unwrap(),
        }
    }

    /// Accounts starting with `a` live on shard 1, the others on shard 2.
    fn begun(
        legs: Vec<auticuro::ledger::Leg>,
        hold_id: Option<&str>,
    ) -> (Coordinator, Transaction) {
        let mut coordinator = Coordinator::default();
        let plan = plan(&legs, |account| {
            if account.as_str().starts_with('a') {
                1
            } else {
                2
            }
        });
        let new = NewTransaction {
            txn_id: txn_id_for("tenant", "key"),
            tenant_id: "tenant".into(),
            idempotency_key: "key".into(),
            legs,
            metadata: Metadata::default(),
            hold_id: hold_id.map(|id| TxnId::parse(id).unwrap()),
            plan,
            reserve_timeout_ms: 1_000,
        };
        let (CoordinatorResponse::Transaction(transaction), _) =
            coordinator.apply(&CoordinatorCommand::Begin(Box::new(new)), 100)
        else {
            panic!("begun")
        };
        (coordinator, Transaction::clone(&transaction))
    }

    /// Writes one command and returns the record after it.
    fn apply(coordinator: &mut Coordinator, command: &CoordinatorCommand) -> Transaction {
        let (CoordinatorResponse::Transaction(transaction), _) = coordinator.apply(command, 200)
        else {
            panic!("applied")
        };
        Transaction::clone(&transaction)
    }

    /// Writes a proposal of one command and returns the record after it.
    fn write(coordinator: &mut Coordinator, step: Step) -> Transaction {
        let Step::Propose(commands) = step else {
            panic!("expected a proposal, got {step:?}")
        };
        let [command] = &commands[..] else {
            panic!("expected one command, got {commands:?}")
        };
        apply(coordinator, command)
    }

    fn ok(seq: u64) -> Answer {
        Answer {
            outcome: Outcome::Ok,
            seq,
            detail_account_id: None,
        }
    }

    fn executed(step: &Step) -> (u32, &Command, Option<i64>) {
        match step {
            Step::Execute {
                shard_id,
                command,
                deadline_ms,
            } => (*shard_id, command, *deadline_ms),
            other => panic!("expected an execute step, got {other:?}"),
        }
    }

    #[test]
    fn a_cross_shard_commit_reserves_debit_first_then_decides_then_posts_everywhere_then_is_done() {
        let (mut coordinator, mut transaction) = begun(vec![leg("bob", 5), leg("alice", -5)], None);
        let mut drive = Drive::default();
        for expected_shard in [1, 2] {
            let step = drive.next(&transaction, OWNER);
            let (shard_id, command, deadline_ms) = executed(&step);
            assert_eq!(shard_id, expected_shard);
            assert_eq!(deadline_ms, Some(transaction.decide_by_ms));
            assert_eq!(
                command.request_id.as_str(),
                format!("{}/reserve/{expected_shard}", transaction.txn_id)
            );
            assert!(matches!(&command.kind, CommandKind::Reserve { owner, .. } if *owner == OWNER));
            drive.answered(&transaction, shard_id, &ok(7));
        }
        transaction = write(&mut coordinator, drive.next(&transaction, OWNER));
        assert_eq!(transaction.decision, Some(Decision::Commit));
        let Step::Settle(posts) = drive.next(&transaction, OWNER) else {
            panic!("settle")
        };
        assert_eq!(posts.len(), 2);
        for (shard_id, command) in &posts {
            assert_eq!(
                *command,
                Command::settle(&transaction.txn_id, OWNER, *shard_id, true)
            );
        }
        drive.settled(2, &ok(11));
        // Only the shard that has not answered is asked again.
        let Step::Settle(left) = drive.next(&transaction, OWNER) else {
            panic!("settle")
        };
        assert_eq!(
            left.iter().map(|(shard, _)| *shard).collect::<Vec<_>>(),
            vec![1]
        );
        drive.settled(1, &ok(12));
        transaction = write(&mut coordinator, drive.next(&transaction, OWNER));
        assert!(transaction.done);
        assert_eq!(transaction.shard_seqs, BTreeMap::from([(1, 12), (2, 11)]));
        assert_eq!(drive.next(&transaction, OWNER), Step::Finished);
    }

    #[test]
    fn a_refused_or_expired_reservation_aborts_and_voids_every_shard_even_those_never_reached() {
        for expire in [false, true] {
            let (mut coordinator, transaction) = begun(vec![leg("alice", -5), leg("bob", 5)], None);
            let mut drive = Drive::default();
            let step = drive.next(&transaction, OWNER);
            if expire {
                drive.expired();
            } else {
                let refused = Answer {
                    outcome: Outcome::InsufficientFunds,
                    seq: 0,
                    detail_account_id: AccountId::parse("alice").ok(),
                };
                drive.answered(&transaction, executed(&step).0, &refused);
            }
            let transaction = write(&mut coordinator, drive.next(&transaction, OWNER));
            let Some(Decision::Abort {
                reason, outcome, ..
            }) = &transaction.decision
            else {
                panic!("aborted")
            };
            if expire {
                assert_eq!(*reason, AbortReason::Deadline);
            } else {
                assert_eq!(
                    (*reason, *outcome),
                    (AbortReason::Rejected, Outcome::InsufficientFunds)
                );
            }
            let Step::Settle(voids) = drive.next(&transaction, OWNER) else {
                panic!("settle")
            };
            assert_eq!(
                voids,
                vec![
                    (1, Command::settle(&transaction.txn_id, OWNER, 1, false)),
                    (2, Command::settle(&transaction.txn_id, OWNER, 2, false)),
                ]
            );
        }
    }

    /// A new leader starts from nothing but the record: a decision written by anyone (an
    /// operator's abort, a stale-hold question) is what it carries out.
    #[test]
    fn a_decision_in_the_record_is_carried_out_whatever_the_answers_so_far_said() {
        let (mut coordinator, transaction) = begun(vec![leg("alice", -5), leg("bob", 5)], None);
        let mut drive = Drive::default();
        drive.answered(&transaction, 1, &ok(3));
        let forced = CoordinatorCommand::Decide {
            txn_id: transaction.txn_id.clone(),
            decision: Decision::Abort {
                reason: AbortReason::Forced,
                outcome: Outcome::Ok,
                detail_account_id: None,
            },
        };
        let transaction = apply(&mut coordinator, &forced);
        for drive in [drive, Drive::default()] {
            let Step::Settle(voids) = drive.next(&transaction, OWNER) else {
                panic!("settle")
            };
            assert!(
                voids
                    .iter()
                    .all(|(_, command)| matches!(command.kind, CommandKind::Void { .. }))
            );
            assert_eq!(voids.len(), 2);
        }
    }

    #[test]
    fn a_single_shard_transaction_is_one_batch_that_decides_it_and_is_resent_after_a_restart() {
        let (mut coordinator, transaction) =
            begun(vec![leg("alice", -5), leg("anna", 5)], Some("h:hold"));
        let mut drive = Drive::default();
        let step = drive.next(&transaction, OWNER);
        let (shard_id, batch, deadline_ms) = executed(&step);
        assert_eq!((shard_id, deadline_ms), (1, None));
        assert_eq!(batch.request_id.as_str(), transaction.txn_id.as_str());
        assert!(
            matches!(&batch.kind, CommandKind::Batch { hold_id: Some(hold), .. } if hold.as_str() == "h:hold")
        );
        let batch = batch.clone();
        drive.answered(&transaction, 1, &ok(9));
        // The answer decides the transaction and settles the shard: the decision and `Done`,
        // with the shard's seq, are proposed together.
        let Step::Propose(commands) = drive.next(&transaction, OWNER) else {
            panic!("propose")
        };
        let [decide, done] = &commands[..] else {
            panic!("decide and done, got {commands:?}")
        };
        let done_first = apply(&mut coordinator, done);
        assert!(!done_first.done, "done before the decision changes nothing");
        let decided = apply(&mut coordinator, decide);
        assert_eq!(decided.decision, Some(Decision::Commit));
        assert!(!decided.done);
        // Written out of order (or the leader lost after the decision), `Done` is proposed again;
        // a new leader sends the same batch again to learn its seq.
        assert_eq!(
            drive.next(&decided, OWNER),
            Step::Propose(vec![done.clone()])
        );
        assert_eq!(
            Drive::default().next(&decided, OWNER),
            Step::Settle(vec![(1, batch)])
        );
        let finished = apply(&mut coordinator, done);
        assert!(finished.done);
        assert_eq!(finished.shard_seqs, BTreeMap::from([(1, 9)]));
        assert_eq!(drive.next(&finished, OWNER), Step::Finished);
    }

    #[test]
    fn a_captured_hold_travels_only_with_the_debit_shards_reservation() {
        let (_, transaction) = begun(vec![leg("alice", -5), leg("bob", 5)], Some("h:hold"));
        let mut drive = Drive::default();
        let holds: Vec<Option<TxnId>> = (0..2)
            .map(|_| {
                let step = drive.next(&transaction, OWNER);
                let (shard_id, command, _) = executed(&step);
                let CommandKind::Reserve { hold_id, .. } = &command.kind else {
                    panic!("reserve")
                };
                let hold_id = hold_id.clone();
                drive.answered(&transaction, shard_id, &ok(1));
                hold_id
            })
            .collect();
        assert_eq!(holds, vec![TxnId::parse("h:hold").ok(), None]);
        assert_eq!(drive.reserved(), 2);
    }
}
