//! Validated newtypes of the ledger. Parsing happens here and only here: a value of one of these
//! types is valid by construction.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The longest account id, transaction id or request id, in bytes.
pub const ID_LENGTH_MAX: usize = 64;
/// The longest request id (clients often use UUIDs with a prefix).
pub const REQUEST_ID_LENGTH_MAX: usize = 128;
pub const CURRENCY_LENGTH_MAX: usize = 16;
/// The largest currency scale (digits after the point) a currency may declare.
pub const SCALE_MAX: u8 = 18;
pub const METADATA_ENTRIES_MAX: usize = 16;
pub const METADATA_KEY_LENGTH_MAX: usize = 64;
pub const METADATA_VALUE_LENGTH_MAX: usize = 256;

/// Why a value from outside could not become a ledger type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid account id")]
    AccountId,
    #[error("invalid transaction id")]
    TxnId,
    #[error("invalid request id")]
    RequestId,
    #[error("invalid currency")]
    Currency,
    #[error("invalid amount")]
    Amount,
    #[error("invalid metadata")]
    Metadata,
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '/' | '-')
}

fn valid_id(text: &str, length_max: usize) -> bool {
    !text.is_empty() && text.len() <= length_max && text.chars().all(is_id_char)
}

/// Serializes a newtype exactly as its inner value, without the copy that `#[serde(into)]`
/// makes: ids and currencies are encoded in every stored row and Raft entry.
macro_rules! serialize_as_inner {
    ($name:ident) => {
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(serializer)
            }
        }
    };
}

/// A text type (an id, a currency): validated by `$valid`, shared rather than copied when cloned
/// (the ledger keeps each one in a map, its records, its indexes and its events), encoded as a
/// plain string.
macro_rules! shared_text {
    ($(#[$doc:meta])* $name:ident, $valid:expr, $error:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        serialize_as_inner!($name);

        impl<'de> Deserialize<'de> for $name {
            /// Validates the text as it is read, without an intermediate `String`.
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Text;
                impl serde::de::Visitor<'_> for Text {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(stringify!($name))
                    }
                    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<$name, E> {
                        $name::parse(text).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Text)
            }
        }

        impl $name {
            pub fn parse(text: &str) -> Result<Self, ParseError> {
                if $valid(text) { Ok(Self(text.into())) } else { Err($error) }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

shared_text!(
    /// An account id: 1 to 64 characters of `[A-Za-z0-9:._/-]`.
    AccountId, |text| valid_id(text, ID_LENGTH_MAX), ParseError::AccountId
);
shared_text!(
    /// A coordinator transaction id, with the same alphabet as account ids.
    TxnId, |text| valid_id(text, ID_LENGTH_MAX), ParseError::TxnId
);
shared_text!(
    /// A client-chosen idempotency id of one command.
    RequestId, |text| valid_id(text, REQUEST_ID_LENGTH_MAX), ParseError::RequestId
);

impl RequestId {
    /// The request id of one step (`reserve`, `post`, `void`) of a coordinator transaction on
    /// one shard. Whoever sends the step (the coordinator, a new coordinator leader, the shard's
    /// stale-hold resolver) uses this id, so the step applies at most once.
    pub fn for_step(txn_id: &TxnId, step: &str, shard_id: u32) -> RequestId {
        // A transaction id (at most 64 id characters), a step name and a number stay within
        // the request id alphabet and length.
        RequestId(format!("{txn_id}/{step}/{shard_id}").into())
    }

    /// The request id of a single-shard transaction's one batch: the transaction id itself.
    pub fn for_transaction(txn_id: &TxnId) -> RequestId {
        // Transaction ids use the request id alphabet and are shorter.
        RequestId(txn_id.0.clone())
    }
}

/// The prefix of the per-shard clearing accounts, where in-flight money of two-phase
/// transactions sits. Clients can neither create nor move money on these accounts.
pub const CLEARING_PREFIX: &str = "sys:clearing:";

impl AccountId {
    /// The clearing account of this shard for a currency.
    pub fn clearing(currency: &Currency) -> AccountId {
        AccountId(format!("{CLEARING_PREFIX}{}", currency.as_str()).into())
    }

    pub fn is_clearing(&self) -> bool {
        self.0.starts_with(CLEARING_PREFIX)
    }
}

shared_text!(
    /// A currency or asset code: 1 to 16 characters of `[A-Z0-9_]` (ISO codes like `USD`, or
    /// custom assets like `POINTS`).
    Currency, valid_currency, ParseError::Currency
);

fn valid_currency(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= CURRENCY_LENGTH_MAX
        && text
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// A signed amount in minor units of a currency. Money is never a float.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Amount(pub i128);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    /// Parses a decimal integer of minor units (`"-1234"`): optional sign, 1 to 39 digits,
    /// nothing else.
    pub fn parse_minor_units(text: &str) -> Result<Amount, ParseError> {
        let digits = text.strip_prefix('-').unwrap_or(text);
        if digits.is_empty() || digits.len() > 39 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::Amount);
        }
        text.parse::<i128>()
            .map(Amount)
            .map_err(|_| ParseError::Amount)
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Free-form key/value pairs attached to accounts and commands, bounded in count and size.
/// A `BTreeMap` so that encodings, fingerprints and digests never depend on hash order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "BTreeMap<String, String>")]
pub struct Metadata(BTreeMap<String, String>);

serialize_as_inner!(Metadata);

impl Metadata {
    pub fn new(entries: BTreeMap<String, String>) -> Result<Metadata, ParseError> {
        let valid = entries.len() <= METADATA_ENTRIES_MAX
            && entries.iter().all(|(key, value)| {
                !key.is_empty()
                    && key.len() <= METADATA_KEY_LENGTH_MAX
                    && value.len() <= METADATA_VALUE_LENGTH_MAX
            });
        if valid {
            Ok(Metadata(entries))
        } else {
            Err(ParseError::Metadata)
        }
    }

    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl TryFrom<BTreeMap<String, String>> for Metadata {
    type Error = ParseError;
    fn try_from(entries: BTreeMap<String, String>) -> Result<Metadata, ParseError> {
        Metadata::new(entries)
    }
}

impl From<Metadata> for BTreeMap<String, String> {
    fn from(metadata: Metadata) -> BTreeMap<String, String> {
        metadata.0
    }
}

/// The coordinator shard that owns a two-phase transaction, with its topology epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub coordinator_shard_id: u32,
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_accept_only_the_documented_alphabet_and_length() {
        assert!(AccountId::parse("user:42/usd.main_1-a").is_ok());
        assert_eq!(AccountId::parse(""), Err(ParseError::AccountId));
        assert_eq!(AccountId::parse("has space"), Err(ParseError::AccountId));
        assert_eq!(AccountId::parse("ünïcode"), Err(ParseError::AccountId));
        assert!(AccountId::parse(&"a".repeat(64)).is_ok());
        assert_eq!(
            AccountId::parse(&"a".repeat(65)),
            Err(ParseError::AccountId)
        );
    }

    #[test]
    fn amounts_parse_only_plain_integers_within_i128() {
        assert_eq!(Amount::parse_minor_units("1234"), Ok(Amount(1234)));
        assert_eq!(Amount::parse_minor_units("-5"), Ok(Amount(-5)));
        assert_eq!(
            Amount::parse_minor_units(&i128::MAX.to_string()),
            Ok(Amount(i128::MAX))
        );
        for bad in [
            "",
            "-",
            "+5",
            "1.5",
            "1e3",
            " 1",
            "12a",
            &"9".repeat(40),
            "170141183460469231731687303715884105728",
        ] {
            assert_eq!(
                Amount::parse_minor_units(bad),
                Err(ParseError::Amount),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn currencies_are_upper_case_codes() {
        assert!(Currency::parse("USD").is_ok());
        assert!(Currency::parse("LOYALTY_POINTS").is_ok());
        assert_eq!(Currency::parse("usd"), Err(ParseError::Currency));
        assert_eq!(Currency::parse(""), Err(ParseError::Currency));
        assert_eq!(Currency::parse(&"X".repeat(17)), Err(ParseError::Currency));
    }

    #[test]
    fn metadata_is_bounded() {
        let many: BTreeMap<_, _> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(Metadata::new(many), Err(ParseError::Metadata));
        let long_value = BTreeMap::from([("k".to_owned(), "v".repeat(257))]);
        assert_eq!(Metadata::new(long_value), Err(ParseError::Metadata));
        let empty_key = BTreeMap::from([(String::new(), "v".to_owned())]);
        assert_eq!(Metadata::new(empty_key), Err(ParseError::Metadata));
    }

    /// Stored rows and Raft entries written before these types serialized themselves still
    /// decode: each encodes exactly as its inner value did.
    #[test]
    fn newtypes_encode_as_their_inner_value() {
        fn same<T: Serialize, I: Serialize>(value: &T, inner: &I) {
            assert_eq!(
                postcard::to_stdvec(value).unwrap(),
                postcard::to_stdvec(inner).unwrap()
            );
        }
        let text = "acct:1/usd.main_1-a";
        same(&AccountId::parse(text).unwrap(), &text.to_owned());
        same(&TxnId::parse(text).unwrap(), &text.to_owned());
        same(&RequestId::parse(text).unwrap(), &text.to_owned());
        same(&Currency::parse("USD").unwrap(), &"USD".to_owned());
        let entries = BTreeMap::from([("k".to_owned(), "v".to_owned()), ("a".into(), "".into())]);
        same(&Metadata::new(entries.clone()).unwrap(), &entries);
        let id = AccountId::parse(text).unwrap();
        let decoded: AccountId = postcard::from_bytes(&postcard::to_stdvec(&id).unwrap()).unwrap();
        assert_eq!(decoded, id);
    }

    #[test]
    fn deserializing_revalidates() {
        let bad = postcard::to_stdvec(&"no spaces allowed".to_owned()).unwrap();
        assert!(postcard::from_bytes::<AccountId>(&bad).is_err());
    }
}
