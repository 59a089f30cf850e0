//! Holds: authorize an amount on a wallet (it leaves `available` but not yet the balance), then
//! capture all or part of it to a payee, or void it. The hold lives on the wallet's storage
//! shard; a capture is a coordinator transaction whose debit draws from the hold, so it is
//! atomic across shards and the rest of the hold is released when it commits.
//!
//! Public hold ids are `hold_`, the wallet's 24 hex digits and 40 hex digits derived from the
//! tenant and the idempotency key; the ledger's hold id is `h:` and those 40 digits. A hold is
//! only ever shown to, captured or voided by the tenant whose wallet it is on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use auticuro::ledger::AccountId;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use proto::auticuro::v1 as pb;
use proto::common::v1::Amount;
use query::activity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::transactions::{Kind, NewTransaction, public_id, submit};
use super::transfers::{currency_of, positive};
use super::wallets::{account_of, execute_on, minor, token_of};
use super::{Body, IdempotencyKey, Operation, Reply, once};
use crate::AppState;
use crate::auth::{Caller, Scope};
use crate::money::{self, Currency};
use crate::problem::{ApiError, Problem};

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceHold {
    pub wallet_id: String,
    /// Decimal string in the currency's unit, e.g. `"12.34"`.
    pub amount: String,
    pub currency: String,
    /// Up to 10 entries of the caller's own.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capture {
    /// The wallet that receives the captured money.
    pub to_wallet_id: String,
    /// At most the held amount; default: all of it. The rest is released.
    #[serde(default)]
    pub amount: Option<String>,
    /// Up to 10 entries of the caller's own.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Hold {
    pub hold_id: String,
    pub wallet_id: String,
    /// The authorized amount.
    pub amount: String,
    pub currency: String,
    /// `authorized`, `capturing` (a capture is under way), `captured` or `voided`.
    pub status: String,
    /// How much was captured, once captured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captured_amount: Option<String>,
    /// The capture's transaction, while capturing and once captured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_transaction_id: Option<String>,
    pub created_at_ms: i64,
    /// From a write: pass to reads to see its effect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency_token: Option<String>,
}

/// A hold as the gateway names it: the wallet it is on and the ledger's hold id.
struct HoldRef {
    public_id: String,
    account_id: AccountId,
    ledger_id: String,
}

impl HoldRef {
    fn new(caller: &Caller, wallet_id: &str, key: &IdempotencyKey) -> Result<HoldRef, ApiError> {
        let digest = Sha256::digest(format!("hold\0{}\0{}", caller.tenant_id, key.0));
        let hex = hex::encode(&digest[..20]);
        let wallet_hex = wallet_id.strip_prefix("wal_").unwrap_or(wallet_id);
        HoldRef::parse(caller, &format!("hold_{wallet_hex}{hex}"))
    }

    /// The caller's hold of a public id; anything else is simply not found.
    fn parse(caller: &Caller, public_id: &str) -> Result<HoldRef, ApiError> {
        let hex = public_id
            .strip_prefix("hold_")
            .filter(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or(ApiError::NotFound("hold"))?;
        let account_id = account_of(caller, &format!("wal_{}", &hex[..24]))
            .map_err(|_| ApiError::NotFound("hold"))?;
        Ok(HoldRef {
            public_id: public_id.to_string(),
            account_id,
            ledger_id: format!("h:{}", &hex[24..]),
        })
    }

    /// The hold as its shard knows it now; not found unless it is on this wallet.
    async fn read(&self, state: &AppState) -> Result<pb::Hold, ApiError> {
        let (_, shard) = state.cluster.shard_of(&self.account_id)?;
        let deadline = Instant::now() + state.options.request_timeout;
        shard
            .get_hold(&self.ledger_id, deadline)
            .await
            .map_err(|unknown| ApiError::Unavailable(unknown.to_string()))?
            .filter(|hold| hold.account_id == self.account_id.as_str())
            .ok_or(ApiError::NotFound("hold"))
    }

    fn view(&self, hold: &pb::Hold, consistency_token: Option<String>) -> Hold {
        let scale = Currency::parse(&hold.currency).map_or(0, |currency| currency.scale);
        let status = pb::HoldStatus::try_from(hold.status).unwrap_or(pb::HoldStatus::Unspecified);
        Hold {
            hold_id: self.public_id.clone(),
            wallet_id: self
                .account_id
                .as_str()
                .split_once('/')
                .map_or("", |(_, wallet)| wallet)
                .to_string(),
            amount: money::format(minor(hold.amount.as_ref()), scale),
            currency: hold.currency.clone(),
            status: match status {
                pb::HoldStatus::Open => "authorized",
                pb::HoldStatus::Capturing => "capturing",
                pb::HoldStatus::Captured => "captured",
                pb::HoldStatus::Voided => "voided",
                pb::HoldStatus::Unspecified => "unknown",
            }
            .to_string(),
            captured_amount: hold
                .captured_amount
                .as_ref()
                .map(|amount| money::format(minor(Some(amount)), scale)),
            capture_transaction_id: Some(hold.capture_txn_id.as_str())
                .filter(|id| !id.is_empty())
                .map(public_id),
            created_at_ms: hold.placed_at_ms,
            consistency_token,
        }
    }

    /// Runs a hold command on the wallet's shard and answers with the hold after it.
    async fn execute(
        &self,
        state: &AppState,
        command: pb::Command,
        status: StatusCode,
    ) -> Result<Reply, ApiError> {
        let (shard_id, _, result) = execute_on(state, &self.account_id, command).await?;
        let hold = self.read(state).await?;
        Ok(Reply::new(
            status,
            &self.view(&hold, Some(token_of(shard_id, result.seq))),
        ))
    }
}

/// Authorize an amount on a wallet: it stops being available until captured or voided.
#[utoipa::path(post, path = "/v1/holds", tag = "holds",
    params(("Idempotency-Key" = String, Header)),
    request_body = PlaceHold,
    responses((status = 201, body = Hold),
        (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn place(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Body(request): Body<PlaceHold>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let currency = currency_of(&request.currency)?;
    let amount = positive(&request.amount, currency, "amount")?;
    account_of(&caller, &request.wallet_id)?;
    let hold = HoldRef::new(&caller, &request.wallet_id, &key)?;
    let mut metadata = super::caller_metadata(&request.metadata)?;
    metadata.insert(activity::KIND_KEY.into(), "hold".into());
    metadata.insert(activity::FROM_KEY.into(), hold.account_id.to_string());
    let command = pb::Command {
        request_id: super::request_id(&caller.tenant_id, &key),
        kind: Some(pb::command::Kind::PlaceHold(pb::PlaceHold {
            hold_id: hold.ledger_id.clone(),
            account_id: hold.account_id.to_string(),
            amount: Some(Amount {
                minor_units: amount.to_string(),
            }),
            currency: currency.code.into(),
            metadata,
        })),
    };
    let operation = Operation {
        name: "place-hold",
        body: &request,
        txn_id: None,
        coordinator_shard_id: None,
    };
    Ok(once(&state, &caller, &key, operation, |_| {
        hold.execute(&state, command, StatusCode::CREATED)
    })
    .await)
}

/// Get a hold.
#[utoipa::path(get, path = "/v1/holds/{hold_id}", tag = "holds",
    params(("hold_id" = String, Path)),
    responses((status = 200, body = Hold), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(hold_id): Path<String>,
) -> Result<axum::Json<Hold>, ApiError> {
    caller.require(Scope::Read)?;
    let hold = HoldRef::parse(&caller, &hold_id)?;
    let read = hold.read(&state).await?;
    Ok(axum::Json(hold.view(&read, None)))
}

/// Capture all or part of a hold to a payee, atomically (across shards if needed); the rest
/// of the hold is released. Answers like a payment.
#[utoipa::path(post, path = "/v1/holds/{hold_id}/capture", tag = "holds",
    params(("hold_id" = String, Path), ("Idempotency-Key" = String, Header)),
    request_body = Capture,
    responses((status = 201, body = super::transactions::Transaction),
        (status = 202, description = "Outcome not known yet: still pending", body = super::transactions::Pending),
        (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn capture(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(hold_id): Path<String>,
    Body(request): Body<Capture>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let hold = HoldRef::parse(&caller, &hold_id)?;
    let payee = account_of(&caller, &request.to_wallet_id)?;
    if payee == hold.account_id {
        return Err(ApiError::InvalidRequest(
            "to_wallet_id is the held wallet".into(),
        ));
    }
    let mut metadata = super::caller_metadata(&request.metadata)?;
    // Its currency and default amount: the hold's own (they never change).
    let read = hold.read(&state).await?;
    let currency = currency_of(&read.currency)?;
    let amount = match &request.amount {
        Some(amount) => positive(amount, currency, "amount")?,
        None => minor(read.amount.as_ref()),
    };
    metadata.insert(activity::FROM_KEY.into(), hold.account_id.to_string());
    metadata.insert(activity::TO_KEY.into(), payee.to_string());
    metadata.insert(activity::HOLD_KEY.into(), hold.ledger_id.clone());
    let transaction = NewTransaction {
        kind: Kind::Capture,
        legs: vec![(hold.account_id.clone(), -amount), (payee, amount)],
        currency,
        metadata,
        hold_id: Some(hold.ledger_id.clone()),
    };
    Ok(submit(&state, &caller, &key, &(&hold_id, &request), transaction).await)
}

/// Void a hold: all of it becomes available again.
#[utoipa::path(post, path = "/v1/holds/{hold_id}/void", tag = "holds",
    params(("hold_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, body = Hold), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn void(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(hold_id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let hold = HoldRef::parse(&caller, &hold_id)?;
    // Only a hold on the caller's wallet: another tenant's id is not found, never voided.
    hold.read(&state).await?;
    let command = pb::Command {
        request_id: super::request_id(&caller.tenant_id, &key),
        kind: Some(pb::command::Kind::VoidHold(pb::VoidHold {
            hold_id: hold.ledger_id.clone(),
        })),
    };
    let operation = Operation {
        name: "void-hold",
        body: &hold_id,
        txn_id: None,
        coordinator_shard_id: None,
    };
    Ok(once(&state, &caller, &key, operation, |_| {
        hold.execute(&state, command, StatusCode::OK)
    })
    .await)
}
