//! Deposits, withdrawals and payments: each one coordinator transaction whose legs are
//! zero-sum, across shards when the wallets live on different ones. Money enters and leaves the
//! platform only through the tenant's funding account of the currency.

use std::collections::BTreeMap;
use std::sync::Arc;

use auticuro::ledger::AccountId;
use axum::extract::State;
use axum::response::Response;
use query::activity;

/// Where a deposit's or withdrawal's `reference` travels in the transaction's metadata.
pub const REFERENCE_METADATA_KEY: &str = "wallet:reference";
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::transactions::{Kind, NewTransaction, submit};
use super::wallets::{account_of, ensure_system_account};
use super::{Body, IdempotencyKey};
use crate::AppState;
use crate::auth::{Caller, Scope};
use crate::money::{self, Currency};
use crate::problem::{ApiError, Problem};

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deposit {
    pub wallet_id: String,
    /// Decimal string in the currency's unit, e.g. `"12.34"`.
    pub amount: String,
    pub currency: String,
    /// The caller's reference (a bank transfer id, …).
    #[serde(default)]
    pub reference: Option<String>,
    /// Up to 10 entries of the caller's own.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fee {
    pub amount: String,
    /// The wallet that collects the fee; default: the tenant's fee account of the currency.
    #[serde(default)]
    pub account: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    pub from_wallet_id: String,
    pub to_wallet_id: String,
    pub amount: String,
    pub currency: String,
    /// Charged to the payer on top of `amount`.
    #[serde(default)]
    pub fee: Option<Fee>,
    /// Up to 10 entries of the caller's own.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

pub(super) fn currency_of(code: &str) -> Result<Currency, ApiError> {
    Currency::parse(code)
        .ok_or_else(|| ApiError::InvalidRequest(format!("unknown currency {code:?}")))
}

pub(super) fn positive(text: &str, currency: Currency, field: &str) -> Result<i128, ApiError> {
    money::parse_positive(text, currency)
        .map_err(|error| ApiError::InvalidRequest(format!("{field}: {error}")))
}

/// A system account of the caller's tenant, e.g. `acme/sys:funding:USD`.
async fn system_account(
    state: &AppState,
    caller: &Caller,
    purpose: &str,
    currency: Currency,
) -> Result<AccountId, ApiError> {
    let account_id = AccountId::parse(&format!(
        "{}/sys:{purpose}:{}",
        caller.tenant_id, currency.code
    ))
    .map_err(|_| ApiError::Internal("system account id".into()))?;
    ensure_system_account(state, &account_id, currency).await?;
    Ok(account_id)
}

fn with_reference(
    metadata: &Option<BTreeMap<String, String>>,
    reference: &Option<String>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut metadata = super::caller_metadata(metadata)?;
    if let Some(reference) = reference {
        metadata.insert(REFERENCE_METADATA_KEY.into(), reference.clone());
    }
    Ok(metadata)
}

/// Deposit money into a wallet (from the tenant's funding account).
#[utoipa::path(post, path = "/v1/deposits", tag = "money movements",
    params(("Idempotency-Key" = String, Header)),
    request_body = Deposit,
    responses((status = 201, body = super::transactions::Transaction),
        (status = 202, description = "Outcome not known yet: still pending", body = super::transactions::Pending),
        (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn deposit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Body(request): Body<Deposit>,
) -> Result<Response, ApiError> {
    move_through_funding(state, caller, key, request, Kind::Deposit).await
}

/// Withdraw money from a wallet (to the tenant's funding account).
#[utoipa::path(post, path = "/v1/withdrawals", tag = "money movements",
    params(("Idempotency-Key" = String, Header)),
    request_body = Deposit,
    responses((status = 201, body = super::transactions::Transaction),
        (status = 202, description = "Outcome not known yet: still pending", body = super::transactions::Pending),
        (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn withdraw(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Body(request): Body<Deposit>,
) -> Result<Response, ApiError> {
    move_through_funding(state, caller, key, request, Kind::Withdrawal).await
}

/// A deposit (funding account → wallet) or a withdrawal (wallet → funding account).
async fn move_through_funding(
    state: Arc<AppState>,
    caller: Caller,
    key: IdempotencyKey,
    request: Deposit,
    kind: Kind,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let currency = currency_of(&request.currency)?;
    let amount = positive(&request.amount, currency, "amount")?;
    let wallet = account_of(&caller, &request.wallet_id)?;
    let metadata = with_reference(&request.metadata, &request.reference)?;
    let funding = system_account(&state, &caller, "funding", currency).await?;
    let (from, to) = match kind {
        Kind::Withdrawal => (wallet, funding),
        _ => (funding, wallet),
    };
    let mut metadata = metadata;
    metadata.insert(activity::FROM_KEY.into(), from.as_str().into());
    metadata.insert(activity::TO_KEY.into(), to.as_str().into());
    let legs = vec![(from, -amount), (to, amount)];
    let transaction = NewTransaction {
        kind,
        legs,
        currency,
        metadata,
        hold_id: None,
    };
    Ok(submit(&state, &caller, &key, &request, transaction).await)
}

/// Pay from one wallet to another, with an optional fee, atomically.
#[utoipa::path(post, path = "/v1/payments", tag = "money movements",
    params(("Idempotency-Key" = String, Header)),
    request_body = Payment,
    responses((status = 201, body = super::transactions::Transaction),
        (status = 202, description = "Outcome not known yet: still pending", body = super::transactions::Pending),
        (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn pay(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Body(request): Body<Payment>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let currency = currency_of(&request.currency)?;
    let amount = positive(&request.amount, currency, "amount")?;
    let payer = account_of(&caller, &request.from_wallet_id)?;
    let payee = account_of(&caller, &request.to_wallet_id)?;
    if payer == payee {
        return Err(ApiError::InvalidRequest(
            "from_wallet_id and to_wallet_id are the same wallet".into(),
        ));
    }
    let mut metadata = super::caller_metadata(&request.metadata)?;
    metadata.insert(activity::FROM_KEY.into(), payer.as_str().into());
    metadata.insert(activity::TO_KEY.into(), payee.as_str().into());
    let mut legs = vec![(payee, amount)];
    let mut debit = amount;
    if let Some(fee) = &request.fee {
        let fee_amount = positive(&fee.amount, currency, "fee.amount")?;
        let collector = match &fee.account {
            Some(wallet_id) => account_of(&caller, wallet_id)?,
            None => system_account(&state, &caller, "fees", currency).await?,
        };
        if collector == payer || collector == legs[0].0 {
            return Err(ApiError::InvalidRequest(
                "the fee account must differ from both wallets".into(),
            ));
        }
        metadata.insert(activity::FEE_KEY.into(), fee_amount.to_string());
        metadata.insert(activity::FEE_ACCOUNT_KEY.into(), collector.as_str().into());
        legs.push((collector, fee_amount));
        debit += fee_amount;
    }
    legs.insert(0, (payer, -debit));
    let transaction = NewTransaction {
        kind: Kind::Payment,
        legs,
        currency,
        metadata,
        hold_id: None,
    };
    Ok(submit(&state, &caller, &key, &request, transaction).await)
}
