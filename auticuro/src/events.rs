//! The event log's stored form and `Ledger.Subscribe` served from it. Each event is stored as
//! its protobuf `Event` without the shard id ([`write_stored`], storage format 2), so a replica
//! sends the shard id's field and then the stored bytes as they are: a subscriber (a
//! projection, a rebuild) costs the replica a read of the log and a copy, no decoding and no
//! encoding.
//!
//! The generated `LedgerServer` would decode each event and encode it again; [`LedgerRoutes`]
//! takes that one method's path and hands every other path to it.

use std::convert::Infallible;
use std::task::{Context, Poll};

use consensus::{Error, StateMachineStore, event_log};
use prost::Message as _;
use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint};
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_server::LedgerServer;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::NamedService;

use crate::ledger::{
    Account, AccountState, Amount, CommandKind, Event, Leg, Limits, Metadata, Owner, TxnId,
};
use crate::machine::LedgerMachine;
use crate::service::LedgerService;

/// The method's path, as the generated client spells it.
const SUBSCRIBE: &str = "/wallet.auticuro.v1.Ledger/Subscribe";

/// Appends the bytes the event log keeps for `event`: prost's encoding of
/// `convert::event(0, event)` (fields in field-number order, defaults left out, so the encoded
/// shard id followed by these bytes is the encoding of the event with it), written straight from
/// the ledger's types on the apply thread, without building the protobuf message.
pub fn write_stored(event: &Event, buffer: &mut Vec<u8>) {
    uint(buffer, 2, event.seq);
    uint(buffer, 3, event.timestamp_ms as u64);
    string(buffer, 4, event.command.request_id.as_str());
    string(
        buffer,
        5,
        event.command.kind.txn_id().map_or("", TxnId::as_str),
    );
    message(buffer, 6, |buffer| {
        string(buffer, 1, event.command.request_id.as_str());
        write_kind(buffer, &event.command.kind);
    });
    for account in &event.accounts {
        message(buffer, 7, |buffer| write_account(buffer, account));
    }
}

/// The accounts of an event that [`write_stored`] kept: their state after its command.
pub fn stored_accounts(stored: &[u8]) -> Result<Vec<Account>, Error> {
    let event = pb::Event::decode(stored)
        .map_err(|error| Error::Corrupt(format!("a stored event: {error}")))?;
    event
        .accounts
        .iter()
        .map(|account| {
            crate::convert::stored_account(account)
                .map_err(|outcome| Error::Corrupt(format!("a stored event's account: {outcome:?}")))
        })
        .collect()
}

fn write_kind(buffer: &mut Vec<u8>, kind: &CommandKind) {
    match kind {
        CommandKind::CreateAccount {
            account_id,
            currency,
            scale,
            limits,
            metadata,
        } => message(buffer, 10, |buffer| {
            string(buffer, 1, account_id.as_str());
            string(buffer, 2, currency.as_str());
            uint(buffer, 3, u64::from(*scale));
            optional_amount(buffer, 4, limits.lower);
            optional_amount(buffer, 5, limits.upper);
            map(buffer, 6, metadata);
            uint(buffer, 7, u64::from(limits.lower.is_none()));
        }),
        CommandKind::UpdateLimits { account_id, limits } => message(buffer, 11, |buffer| {
            string(buffer, 1, account_id.as_str());
            write_limits(buffer, limits);
        }),
        CommandKind::Freeze { account_id } => account_only(buffer, 12, account_id.as_str()),
        CommandKind::Unfreeze { account_id } => account_only(buffer, 13, account_id.as_str()),
        CommandKind::Close { account_id } => account_only(buffer, 14, account_id.as_str()),
        CommandKind::Transfer {
            from,
            to,
            amount,
            currency,
            metadata,
        } => message(buffer, 15, |buffer| {
            string(buffer, 1, from.as_str());
            string(buffer, 2, to.as_str());
            write_amount(buffer, 3, *amount);
            string(buffer, 4, currency.as_str());
            map(buffer, 5, metadata);
        }),
        CommandKind::Batch {
            legs,
            txn_id,
            hold_id,
            metadata,
        } => message(buffer, 16, |buffer| {
            write_legs(buffer, 1, legs);
            string(buffer, 2, txn_id.as_ref().map_or("", TxnId::as_str));
            map(buffer, 3, metadata);
            string(buffer, 4, hold_id.as_ref().map_or("", TxnId::as_str));
        }),
        CommandKind::Reserve {
            txn_id,
            owner,
            legs,
            hold_id,
            metadata,
        } => message(buffer, 17, |buffer| {
            string(buffer, 1, txn_id.as_str());
            write_owner(buffer, 2, owner);
            write_legs(buffer, 3, legs);
            map(buffer, 4, metadata);
            string(buffer, 5, hold_id.as_ref().map_or("", TxnId::as_str));
        }),
        CommandKind::Post { txn_id, owner } => message(buffer, 18, |buffer| {
            string(buffer, 1, txn_id.as_str());
            write_owner(buffer, 2, owner);
        }),
        CommandKind::Void { txn_id, owner } => message(buffer, 19, |buffer| {
            string(buffer, 1, txn_id.as_str());
            write_owner(buffer, 2, owner);
        }),
        CommandKind::PruneDedup { older_than_ms } => message(buffer, 20, |buffer| {
            uint(buffer, 1, *older_than_ms as u64);
        }),
        CommandKind::FenceCoordinator {
            coordinator_shard_id,
            below_epoch,
        } => message(buffer, 21, |buffer| {
            uint(buffer, 1, u64::from(*coordinator_shard_id));
            uint(buffer, 2, *below_epoch);
        }),
        CommandKind::PlaceHold {
            hold_id,
            account_id,
            amount,
            currency,
            metadata,
        } => message(buffer, 22, |buffer| {
            string(buffer, 1, hold_id.as_str());
            string(buffer, 2, account_id.as_str());
            write_amount(buffer, 3, *amount);
            string(buffer, 4, currency.as_str());
            map(buffer, 5, metadata);
        }),
        CommandKind::VoidHold { hold_id } => account_only(buffer, 23, hold_id.as_str()),
    }
}

fn write_account(buffer: &mut Vec<u8>, account: &Account) {
    string(buffer, 1, account.id.as_str());
    string(buffer, 2, account.currency.as_str());
    uint(buffer, 3, u64::from(account.scale));
    let state = match account.state {
        AccountState::Active => pb::AccountState::Active,
        AccountState::Frozen => pb::AccountState::Frozen,
        AccountState::Closed => pb::AccountState::Closed,
    };
    uint(buffer, 4, state as u64);
    write_amount(buffer, 5, account.balance);
    write_amount(buffer, 6, account.pending_out);
    write_amount(buffer, 7, account.pending_in);
    optional_amount(buffer, 8, account.limits.lower);
    optional_amount(buffer, 9, account.limits.upper);
    uint(buffer, 10, account.version);
    map(buffer, 11, &account.metadata);
}

/// `UpdateLimits` after its account id.
fn write_limits(buffer: &mut Vec<u8>, limits: &Limits) {
    optional_amount(buffer, 2, limits.lower);
    optional_amount(buffer, 3, limits.upper);
    uint(buffer, 4, u64::from(limits.lower.is_none()));
}

fn write_legs(buffer: &mut Vec<u8>, field: u32, legs: &[Leg]) {
    for leg in legs {
        message(buffer, field, |buffer| {
            string(buffer, 1, leg.account_id.as_str());
            write_amount(buffer, 2, leg.amount);
            string(buffer, 3, leg.currency.as_str());
        });
    }
}

fn write_owner(buffer: &mut Vec<u8>, field: u32, owner: &Owner) {
    message(buffer, field, |buffer| {
        uint(buffer, 1, u64::from(owner.coordinator_shard_id));
        uint(buffer, 2, owner.epoch);
    });
}

/// A message whose only field is one id (field 1).
fn account_only(buffer: &mut Vec<u8>, field: u32, id: &str) {
    message(buffer, field, |buffer| string(buffer, 1, id));
}

/// `wallet.common.v1.Amount`: the minor units in decimal (field 1).
fn write_amount(buffer: &mut Vec<u8>, field: u32, amount: Amount) {
    message(buffer, field, |buffer| {
        message(buffer, 1, |buffer| write_decimal(buffer, amount.0))
    });
}

/// `value` in decimal, as `to_string` writes it, without the formatting machinery (an event
/// carries several amounts, and formatting an `i128` was 4% of applying a transfer).
fn write_decimal(buffer: &mut Vec<u8>, value: i128) {
    if value < 0 {
        buffer.push(b'-');
    }
    let mut digits = [0u8; 39];
    let mut start = digits.len();
    let mut rest = value.unsigned_abs();
    // Nearly every amount fits 64 bits, where a division is cheap.
    while rest > u128::from(u64::MAX) {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    let mut rest = rest as u64;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    buffer.extend_from_slice(&digits[start..]);
}

fn optional_amount(buffer: &mut Vec<u8>, field: u32, amount: Option<Amount>) {
    if let Some(amount) = amount {
        write_amount(buffer, field, amount);
    }
}

/// A varint field (uint32, uint64, int64, bool, enum), left out when 0 as proto3 does.
fn uint(buffer: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        encode_key(field, WireType::Varint, buffer);
        encode_varint(value, buffer);
    }
}

fn string(buffer: &mut Vec<u8>, field: u32, value: &str) {
    if !value.is_empty() {
        encode_key(field, WireType::LengthDelimited, buffer);
        encode_varint(value.len() as u64, buffer);
        buffer.extend_from_slice(value.as_bytes());
    }
}

/// A `map<string, string>`: one entry message per pair (key 1, value 2; empty ones left out).
fn map(buffer: &mut Vec<u8>, field: u32, metadata: &Metadata) {
    for (key, value) in metadata.entries() {
        message(buffer, field, |buffer| {
            string(buffer, 1, key);
            string(buffer, 2, value);
        });
    }
}

/// A length-delimited field holding what `write` appends: one byte is kept for the length,
/// which is widened afterwards in the rare case the content is 128 bytes or more.
fn message(buffer: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    encode_key(field, WireType::LengthDelimited, buffer);
    let at = buffer.len();
    buffer.push(0);
    write(buffer);
    let length = buffer.len() - at - 1;
    if length < 0x80 {
        buffer[at] = length as u8;
    } else {
        let mut prefix = Vec::with_capacity(4);
        encode_varint(length as u64, &mut prefix);
        buffer.splice(at..=at, prefix);
    }
}

/// One event of the log as stored, and the shard it belongs to.
pub struct StoredEvent {
    pub shard_id: u32,
    pub stored: Vec<u8>,
}

impl StoredEvent {
    /// The event's protobuf encoding: `shard_id` (field 1, left out when 0 as prost does) and the
    /// stored fields after it.
    pub fn write(&self, buffer: &mut impl BufMut) {
        if self.shard_id != 0 {
            prost::encoding::uint32::encode(1, &self.shard_id, buffer);
        }
        buffer.put_slice(&self.stored);
    }

    pub fn decode(&self) -> Result<pb::Event, prost::DecodeError> {
        let mut event = pb::Event::decode(self.stored.as_slice())?;
        event.shard_id = self.shard_id;
        Ok(event)
    }
}

/// The live stream of shard `shard_id`'s events from `from` on, as stored.
pub fn stream(
    shard_id: u32,
    machine: &StateMachineStore<LedgerMachine>,
    from: u64,
) -> mpsc::Receiver<Result<StoredEvent, Status>> {
    let applied = machine.read(|machine| machine.subscribe_applied_seq());
    event_log::stream_stored(machine.store(), applied, from, move |stored| {
        Ok(StoredEvent { shard_id, stored })
    })
}

/// The `Ledger` service with `Subscribe` answered from the stored bytes.
#[derive(Clone)]
pub struct LedgerRoutes {
    ledger: LedgerServer<LedgerService>,
    subscribe: Subscribe,
}

impl LedgerRoutes {
    pub fn new(service: LedgerService) -> LedgerRoutes {
        let subscribe = Subscribe {
            shard_id: service.shard_id,
            machine: service.machine.clone(),
        };
        LedgerRoutes {
            ledger: LedgerServer::new(service),
            subscribe,
        }
    }
}

impl NamedService for LedgerRoutes {
    const NAME: &'static str = <LedgerServer<LedgerService> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for LedgerRoutes
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<B>>::poll_ready(&mut self.ledger, context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SUBSCRIBE {
            return self.ledger.call(request);
        }
        let subscribe = self.subscribe.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(StoredEventCodec);
            Ok(grpc.server_streaming(subscribe, request).await)
        })
    }
}

#[derive(Clone)]
struct Subscribe {
    shard_id: u32,
    machine: StateMachineStore<LedgerMachine>,
}

impl tonic::server::ServerStreamingService<pb::SubscribeRequest> for Subscribe {
    type Response = StoredEvent;
    type ResponseStream = tokio_stream::wrappers::ReceiverStream<Result<StoredEvent, Status>>;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<pb::SubscribeRequest>) -> Self::Future {
        let from = request.into_inner().from_seq;
        let events = stream(self.shard_id, &self.machine, from);
        std::future::ready(Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(events),
        )))
    }
}

/// Decodes the request with prost; writes each answer's stored bytes ([`StoredEvent::write`]).
struct StoredEventCodec;

impl Codec for StoredEventCodec {
    type Encode = StoredEvent;
    type Decode = pb::SubscribeRequest;
    type Encoder = StoredEventCodec;
    type Decoder = tonic_prost::ProstDecoder<pb::SubscribeRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        StoredEventCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

impl Encoder for StoredEventCodec {
    type Item = StoredEvent;
    type Error = Status;

    fn encode(&mut self, event: StoredEvent, buffer: &mut EncodeBuf<'_>) -> Result<(), Status> {
        event.write(buffer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::convert::tests::every_command_kind;
    use crate::ledger::{
        Account, AccountId, AccountState, Amount, Command, Currency, Event, Limits, Metadata,
        RequestId,
    };

    fn account(id: &str, metadata: &Metadata, limits: Limits) -> Account {
        Account {
            id: AccountId::parse(id).unwrap(),
            currency: Currency::parse("USD").unwrap(),
            scale: 2,
            state: AccountState::Frozen,
            balance: Amount(-12_345),
            pending_out: Amount(7),
            pending_in: Amount(0),
            limits: Limits {
                upper: Some(Amount(i64::MAX as i128 * 3)),
                ..limits
            },
            version: 300,
            metadata: metadata.clone(),
        }
    }

    #[test]
    fn amounts_are_written_in_decimal_as_to_string_writes_them() {
        let edges = [0, 1, -1, 9, 10, -10, 99, 100];
        let wide = [
            i64::MAX as i128,
            i64::MAX as i128 + 1,
            u64::MAX as i128,
            u64::MAX as i128 + 1,
        ];
        let values = edges
            .into_iter()
            .chain(wide.into_iter().flat_map(|value| [value, -value]))
            .chain([i128::MAX, i128::MIN, i128::MIN + 1]);
        for value in values {
            let mut written = Vec::new();
            write_decimal(&mut written, value);
            assert_eq!(String::from_utf8(written).unwrap(), value.to_string());
        }
    }

    #[test]
    fn a_stored_event_is_sent_in_the_bytes_prost_would_encode() {
        // Long enough for the account's message to take a two-byte length.
        let metadata = Metadata::new(BTreeMap::from([
            ("k".into(), "v".into()),
            ("note".into(), "x".repeat(200)),
        ]))
        .unwrap();
        for (seq, kind) in every_command_kind().into_iter().enumerate() {
            let event = Event {
                seq: seq as u64 + 1,
                timestamp_ms: 1_700_000_000_000 + seq as i64,
                command: Command {
                    request_id: RequestId::parse(&format!("r-{seq}")).unwrap(),
                    kind,
                },
                accounts: vec![
                    account("a", &metadata, Limits::UNBOUNDED),
                    account("b", &Metadata::default(), Limits::NO_OVERDRAFT),
                ],
            };
            let mut stored = Vec::new();
            write_stored(&event, &mut stored);
            for shard_id in [0, 1, 300, u32::MAX] {
                let stored = StoredEvent {
                    shard_id,
                    stored: stored.clone(),
                };
                let mut sent = Vec::new();
                stored.write(&mut sent);
                let expected = crate::convert::event(shard_id, &event);
                assert_eq!(sent, expected.encode_to_vec(), "{:?}", event.command.kind);
                assert_eq!(stored.decode().unwrap(), expected);
            }
            assert_eq!(stored_accounts(&stored).unwrap(), event.accounts);
        }
    }
}
