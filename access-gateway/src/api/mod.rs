//! The HTTP handlers and what they share: the JSON body extractor that turns every rejection
//! into a problem, `Idempotency-Key` handling, public ids and consistency tokens.

pub mod activities;
pub mod cluster;
pub mod health;
pub mod hierarchy;
pub mod holds;
pub mod transactions;
pub mod transfers;
pub mod wallets;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::auth::Caller;
use crate::problem::{ApiError, problem_response};
use crate::store::{Claim, Completion, NewClaim};

/// A JSON body; malformed JSON, unknown fields, a wrong media type or an oversized body become
/// problem documents.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Body<T>, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Body(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge)
            }
            Err(rejection) => Err(ApiError::InvalidRequest(rejection.body_text())),
        }
    }
}

/// Query parameters, with rejections as problem documents.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Params<T>, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Params(value))
            .map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))
    }
}

pub const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 128;

/// The `Idempotency-Key` header every POST must carry.
pub struct IdempotencyKey(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<IdempotencyKey, ApiError> {
        let key = parts
            .headers
            .get("idempotency-key")
            .ok_or_else(|| {
                ApiError::InvalidRequest("the Idempotency-Key header is required".into())
            })?
            .to_str()
            .map_err(|_| {
                ApiError::InvalidRequest("the Idempotency-Key header is not text".into())
            })?;
        let valid = (1..=IDEMPOTENCY_KEY_LENGTH_MAX).contains(&key.len())
            && key.chars().all(|c| c.is_ascii_graphic());
        if !valid {
            return Err(ApiError::InvalidRequest(format!(
                "the Idempotency-Key header is 1 to {IDEMPOTENCY_KEY_LENGTH_MAX} printable ASCII characters"
            )));
        }
        Ok(IdempotencyKey(key.to_string()))
    }
}

/// The query service's channel (activity feeds, hierarchies).
pub fn query_channel(state: &AppState) -> Result<tonic::transport::Channel, ApiError> {
    state
        .query
        .clone()
        .ok_or_else(|| ApiError::Unavailable("no query service configured".into()))
}

/// 404 for every path that is not an endpoint.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("resource")
}

/// A handler's successful answer: a status and a JSON body.
pub struct Reply {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl Reply {
    pub fn new(status: StatusCode, body: &impl Serialize) -> Reply {
        Reply {
            status,
            body: serde_json::to_value(body).expect("views always serialize"),
        }
    }

    /// Whether a retry with the same key must replay this answer (202 means "still pending":
    /// a retry asks again).
    fn is_final(&self) -> bool {
        self.status != StatusCode::ACCEPTED
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// What a POST is, for its idempotency record: the operation, the caller's body and, for
/// transactions, where the transaction goes.
pub struct Operation<'a, B: Serialize> {
    pub name: &'static str,
    pub body: &'a B,
    pub txn_id: Option<&'a str>,
    pub coordinator_shard_id: Option<u32>,
}

/// Runs `work` for the first request with this key, and for retries of one that never got a
/// final answer; replays the stored answer to every later retry; refuses the key for a
/// different request. `work` receives the coordinator shard recorded for the key.
pub async fn once<B, F, Fut>(
    state: &Arc<AppState>,
    caller: &Caller,
    key: &IdempotencyKey,
    operation: Operation<'_, B>,
    work: F,
) -> Response
where
    B: Serialize,
    F: FnOnce(Option<u32>) -> Fut,
    Fut: Future<Output = Result<Reply, ApiError>>,
{
    let mut hasher = Sha256::new();
    hasher.update(operation.name.as_bytes());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(operation.body).expect("request bodies serialize"));
    let request_hash: [u8; 32] = hasher.finalize().into();
    let claim = state
        .records
        .claim(NewClaim {
            tenant_id: caller.tenant_id.clone(),
            idempotency_key: key.0.clone(),
            request_hash,
            txn_id: operation.txn_id.map(str::to_string),
            coordinator_shard_id: operation.coordinator_shard_id,
        })
        .await;
    let coordinator_shard_id = match claim {
        Err(error) => return ApiError::from(error).into_response(),
        Ok(Claim::Mismatch) => return ApiError::IdempotencyMismatch.into_response(),
        Ok(Claim::Replay {
            status_code,
            response,
        }) => return replay(status_code, response),
        Ok(Claim::Proceed {
            coordinator_shard_id,
        }) => coordinator_shard_id,
    };
    let (status, body, is_final) = match work(coordinator_shard_id).await {
        Ok(reply) => {
            let is_final = reply.is_final();
            (reply.status, reply.body, is_final)
        }
        Err(error) => {
            if !error.is_final() {
                return error.into_response();
            }
            (error.status(), error.body(), true)
        }
    };
    if is_final
        && let Err(error) = state
            .records
            .complete(Completion {
                tenant_id: caller.tenant_id.clone(),
                idempotency_key: key.0.clone(),
                status_code: status.as_u16(),
                response: body.clone(),
            })
            .await
    {
        // The work is done (and idempotent), only its record is missing: a retry redoes it.
        tracing::warn!(%error, "could not store an idempotent response");
    }
    respond(status, body)
}

fn respond(status: StatusCode, body: serde_json::Value) -> Response {
    if status.is_client_error() || status.is_server_error() {
        problem_response(status, &body)
    } else {
        (status, axum::Json(body)).into_response()
    }
}

fn replay(status_code: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status_code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = respond(status, body);
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// A request id for a ledger command the gateway sends straight to a storage shard, derived from
/// the tenant and the idempotency key so that every retry sends the same one.
pub fn request_id(tenant_id: &str, key: &IdempotencyKey) -> String {
    let digest = Sha256::digest(format!("{tenant_id}\0{}", key.0));
    format!("g:{}", hex::encode(&digest[..20]))
}

use query::activity::RESERVED_PREFIX as RESERVED_METADATA_PREFIX;

/// Metadata entries a caller may give; the ledger keeps 16 per command and the gateway adds up
/// to 6 of its own (kind, parties, fee, reference).
pub const CALLER_METADATA_ENTRIES_MAX: usize = 10;

/// The caller's metadata, refused when it uses a reserved key or has too many entries.
pub fn caller_metadata(
    metadata: &Option<BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let metadata = metadata.clone().unwrap_or_default();
    if metadata.len() > CALLER_METADATA_ENTRIES_MAX {
        return Err(ApiError::InvalidRequest(format!(
            "metadata has at most {CALLER_METADATA_ENTRIES_MAX} entries"
        )));
    }
    if metadata
        .keys()
        .any(|key| key.starts_with(RESERVED_METADATA_PREFIX))
    {
        return Err(ApiError::InvalidRequest(format!(
            "metadata keys starting with {RESERVED_METADATA_PREFIX:?} are reserved"
        )));
    }
    Ok(metadata)
}

/// Read-your-write: the highest seq a write produced on each shard it touched, as
/// `SHARD-SEQ.SHARD-SEQ` (URL-safe, opaque to callers).
pub mod consistency_token {
    use crate::problem::ApiError;
    use proto::common::v1::{ConsistencyToken, ShardSeq};

    pub fn encode(token: &ConsistencyToken) -> String {
        token
            .shard_seqs
            .iter()
            .map(|shard_seq| format!("{}-{}", shard_seq.shard_id, shard_seq.seq))
            .collect::<Vec<_>>()
            .join(".")
    }

    pub fn decode(text: &str) -> Result<ConsistencyToken, ApiError> {
        let invalid = || ApiError::InvalidRequest("invalid consistency_token".into());
        let shard_seqs = text
            .split('.')
            .map(|part| {
                let (shard_id, seq) = part.split_once('-').ok_or_else(invalid)?;
                Ok(ShardSeq {
                    shard_id: shard_id.parse().map_err(|_| invalid())?,
                    seq: seq.parse().map_err(|_| invalid())?,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        if shard_seqs.len() > 64 {
            return Err(invalid());
        }
        Ok(ConsistencyToken { shard_seqs })
    }

    /// The seq a read on `shard_id` must wait for.
    pub fn seq_on(token: &ConsistencyToken, shard_id: u32) -> Option<u64> {
        token
            .shard_seqs
            .iter()
            .filter(|shard_seq| shard_seq.shard_id == shard_id)
            .map(|shard_seq| shard_seq.seq)
            .max()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tokens_round_trip_and_garbage_is_refused() {
            let token = decode("1-42.2-17").unwrap();
            assert_eq!(encode(&token), "1-42.2-17");
            assert_eq!(seq_on(&token, 2), Some(17));
            assert_eq!(seq_on(&token, 3), None);
            for garbage in ["", "1", "1-", "-1", "a-1", "1-b", "1-2.", "1-2-3"] {
                assert!(decode(garbage).is_err(), "{garbage:?}");
            }
        }
    }
}
