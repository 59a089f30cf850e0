//! Every decoder of bytes the platform did not make, with what must hold after it. None of these
//! may panic, whatever the bytes. The cargo-fuzz targets in `fuzz/` call them under libFuzzer;
//! the tests below call them over random bytes and corrupted valid encodings on every run.

use auticuro::events::StoredEvent;
use auticuro::ledger::{Account, DedupRecord, HoldRecord, TxnRecord};
use auticuro::ledger::{
    AccountId, Amount, Command, CommandKind, Currency, Ledger, Limits, Metadata, RequestId,
};
use auticuro::machine::LedgerMachine;
use consensus::{App, TypeConfig};
use marker::machine::CoordinatorMachine;
use marker::saga::Transaction;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use prost::Message;
use proto::auticuro::v1 as pb;

/// A ledger with two funded accounts and a funding account, for commands to act on.
pub fn sample_ledger() -> Ledger {
    let mut ledger = Ledger::new();
    let usd = Currency::parse("USD").expect("a currency");
    let id = |text: &str| AccountId::parse(text).expect("an account id");
    let mut run = |request_id: &str, kind: CommandKind| {
        let command = Command {
            request_id: RequestId::parse(request_id).expect("a request id"),
            kind,
        };
        assert!(ledger.apply(&command, 1).outcome.is_ok());
    };
    for (account, limits) in [
        ("funding", Limits::UNBOUNDED),
        ("a", Limits::NO_OVERDRAFT),
        ("b", Limits::NO_OVERDRAFT),
    ] {
        run(
            &format!("create-{account}"),
            CommandKind::CreateAccount {
                account_id: id(account),
                currency: usd.clone(),
                scale: 2,
                limits,
                metadata: Metadata::default(),
            },
        );
    }
    run(
        "fund",
        CommandKind::Transfer {
            from: id("funding"),
            to: id("a"),
            amount: Amount(1_000),
            currency: usd,
            metadata: Metadata::default(),
        },
    );
    ledger
}

/// A client's gRPC `Command` into a core command, applied: a rejection leaves every account
/// as it was and emits no event; an accepted command keeps every currency summing to zero.
pub fn command(bytes: &[u8]) {
    let Ok(message) = pb::Command::decode(bytes) else {
        return;
    };
    let Ok(command) = auticuro::convert::command(Some(&message)) else {
        return;
    };
    let mut ledger = sample_ledger();
    let before: Vec<_> = ledger.accounts().cloned().collect();
    let applied = ledger.apply(&command, 2);
    if applied.outcome.is_ok() {
        assert!(applied.event.is_some() || applied.duplicate);
        assert!(ledger.balance_sums().values().all(|sum| *sum == 0));
    } else {
        assert!(applied.event.is_none());
        assert_eq!(ledger.accounts().cloned().collect::<Vec<_>>(), before);
    }
}

/// A snapshot sent by a leader, as a storage or a coordinator replica reads it: its rows, and
/// each row's value decoded as every record a load decodes. A snapshot that reads has only
/// rows of the replica's families.
pub fn snapshot(bytes: &[u8]) {
    for families in [
        LedgerMachine::COLUMN_FAMILIES,
        CoordinatorMachine::COLUMN_FAMILIES,
    ] {
        let _ = consensus::snapshot::read(&mut &bytes[..], families, |family, _, value| {
            assert!(families.contains(&family));
            let what = "a snapshot's row";
            let _ = consensus::decode::<Account>(what, value);
            let _ = consensus::decode::<TxnRecord>(what, value);
            let _ = consensus::decode::<HoldRecord>(what, value);
            let _ = consensus::decode::<DedupRecord>(what, value);
            let _ = consensus::decode::<Transaction>(what, value);
            Ok(())
        });
    }
}

/// Events: a stored event (from a snapshot or the event log) as `Subscribe` serves it (the shard
/// id's field, then the stored bytes), and a protobuf event as the read side takes it from Kafka;
/// what the shard serves decodes back to the stored event.
pub fn event(bytes: &[u8]) {
    let stored = StoredEvent {
        shard_id: 1,
        stored: bytes.to_vec(),
    };
    if let Ok(event) = stored.decode() {
        let mut served = Vec::new();
        stored.write(&mut served);
        let mut decoded = pb::Event::decode(served.as_slice()).expect("a served event decodes");
        // Stored bytes never carry a shard id; corrupted ones may, and theirs comes last.
        decoded.shard_id = 1;
        assert_eq!(decoded, event);
    }
    if let Ok(event) = pb::Event::decode(bytes) {
        assert_eq!(
            pb::Event::decode(event.encode_to_vec().as_slice()),
            Ok(event)
        );
    }
}

/// A Raft peer's requests to a storage replica: append entries (log entries of ledger
/// commands), votes and snapshot chunks.
pub fn raft_message(bytes: &[u8]) {
    type Ledgers = TypeConfig<LedgerMachine>;
    let _ = consensus::decode::<AppendEntriesRequest<Ledgers>>("raft request", bytes);
    let _ = consensus::decode::<VoteRequest<u64>>("raft request", bytes);
    let _ = consensus::decode::<InstallSnapshotRequest<Ledgers>>("raft request", bytes);
}

#[cfg(test)]
mod tests {
    use auticuro::events::write_stored;
    use proptest::prelude::*;

    use super::*;

    /// Valid encodings of each input, for the corruptions to start from.
    fn valid_command() -> Vec<u8> {
        pb::Command {
            request_id: "pay-1".into(),
            kind: Some(pb::command::Kind::Batch(pb::Batch {
                legs: vec![
                    auticuro::convert::pb_leg(&leg("a", -10)),
                    auticuro::convert::pb_leg(&leg("b", 10)),
                ],
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    fn leg(account: &str, amount: i128) -> auticuro::ledger::Leg {
        auticuro::ledger::Leg {
            account_id: AccountId::parse(account).unwrap(),
            amount: Amount(amount),
            currency: Currency::parse("USD").unwrap(),
        }
    }

    /// A snapshot of the sample ledger's accounts (the first of a storage replica's families).
    fn valid_snapshot() -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut writer = consensus::snapshot::Writer::new(&mut bytes, 7).unwrap();
        for account in sample_ledger().accounts() {
            let value = consensus::encode(account);
            writer
                .row(0, account.id.as_str().as_bytes(), &value)
                .unwrap();
        }
        writer.finish().unwrap();
        bytes
    }

    fn valid_event() -> Vec<u8> {
        let mut ledger = sample_ledger();
        let command = Command {
            request_id: RequestId::parse("pay").unwrap(),
            kind: CommandKind::Batch {
                legs: vec![leg("a", -5), leg("b", 5)],
                txn_id: None,
                hold_id: None,
                metadata: Metadata::default(),
            },
        };
        let mut stored = Vec::new();
        write_stored(&ledger.apply(&command, 3).event.unwrap(), &mut stored);
        stored
    }

    /// Flips, drops or inserts bytes of a valid encoding.
    fn corrupt(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
        for (position, value, how) in edits {
            if bytes.is_empty() {
                break;
            }
            let position = position % bytes.len();
            match how % 3 {
                0 => bytes[position] ^= value | 1,
                1 => {
                    bytes.remove(position);
                }
                _ => bytes.insert(position, *value),
            }
        }
        bytes
    }

    #[test]
    fn the_valid_inputs_get_past_the_decoders() {
        // Otherwise the corruptions below would test nothing but the first decoding step.
        let message = pb::Command::decode(valid_command().as_slice()).unwrap();
        assert!(auticuro::convert::command(Some(&message)).is_ok());
        let mut accounts = 0;
        let read = consensus::snapshot::read(
            &mut valid_snapshot().as_slice(),
            LedgerMachine::COLUMN_FAMILIES,
            |_, _, value| {
                consensus::decode::<Account>("account", value)?;
                accounts += 1;
                Ok(())
            },
        );
        let expected = sample_ledger().accounts().count();
        assert_eq!((read.unwrap(), accounts), (7, expected));
        assert!(pb::Event::decode(valid_event().as_slice()).is_ok());
        command(&valid_command());
        snapshot(&valid_snapshot());
        event(&valid_event());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            command(&bytes);
            snapshot(&bytes);
            event(&bytes);
            raft_message(&bytes);
        }

        #[test]
        fn corrupted_valid_encodings_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6)
        ) {
            command(&corrupt(valid_command(), &edits));
            snapshot(&corrupt(valid_snapshot(), &edits));
            event(&corrupt(valid_event(), &edits));
        }
    }
}
