//! Wallets: an owner's account in one currency, held on the storage shard its id routes to.
//! Account management goes straight to that shard; the ledger account id is
//! `<tenant>/<wallet id>`, so a tenant can only ever name its own wallets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use auticuro::client::ShardClient;
use auticuro::ledger::AccountId;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use proto::auticuro::v1 as pb;
use proto::common::v1::{Amount, ConsistencyToken, ShardSeq};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::{Body, IdempotencyKey, Operation, Params, Reply, consistency_token, once};
use crate::AppState;
use crate::auth::{Caller, Scope};
use crate::cluster::ShardHandle;
use crate::money::{self, Currency};
use crate::problem::{ApiError, Problem};

const OWNER_ID_LENGTH_MAX: usize = 64;
use query::activity::OWNER_KEY as OWNER_METADATA_KEY;

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWallet {
    /// The caller's id for the wallet's owner (1 to 64 printable characters).
    pub owner_id: String,
    /// Currency code, e.g. `USD`.
    pub currency: String,
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Up to 10 entries of the caller's own.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Balance limits as decimal strings; a negative lower limit allows an overdraft.
#[derive(Clone, Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Available balance may not fall below this (default `0`).
    #[serde(default)]
    pub lower: Option<String>,
    /// Balance plus incoming reservations may not exceed this (default: none).
    #[serde(default)]
    pub upper: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Wallet {
    pub wallet_id: String,
    pub owner_id: String,
    pub currency: String,
    /// `active`, `frozen` or `closed`.
    pub state: String,
    pub balance: String,
    /// `balance - pending_out`: what can be spent.
    pub available: String,
    pub pending_out: String,
    pub pending_in: String,
    pub limits: Limits,
    pub metadata: BTreeMap<String, String>,
    /// Raised by every change of the wallet.
    pub version: u64,
    /// Pass to reads to see at least this state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency_token: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Balance {
    pub wallet_id: String,
    pub currency: String,
    pub available: String,
    pub balance: String,
    pub pending_out: String,
    pub pending_in: String,
    pub version: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// From a write's response: the read waits until that write is visible.
    pub consistency_token: Option<String>,
}

/// Owner ids are 1 to 64 printable ASCII characters.
pub fn check_owner_id(owner_id: &str) -> Result<(), ApiError> {
    let valid = (1..=OWNER_ID_LENGTH_MAX).contains(&owner_id.len())
        && owner_id.chars().all(|c| c.is_ascii_graphic());
    if valid {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(format!(
            "owner_id is 1 to {OWNER_ID_LENGTH_MAX} printable ASCII characters"
        )))
    }
}

/// Wallet ids are `wal_` and 24 lowercase hex digits, derived from the tenant and the
/// idempotency key of the request that created the wallet.
pub fn wallet_id_for(tenant_id: &str, key: &IdempotencyKey) -> String {
    let digest = Sha256::digest(format!("wallet\0{tenant_id}\0{}", key.0));
    format!("wal_{}", hex::encode(&digest[..12]))
}

fn valid_wallet_id(wallet_id: &str) -> bool {
    wallet_id.len() == 28
        && wallet_id.starts_with("wal_")
        && wallet_id[4..]
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// The ledger account of one of the caller's wallets. An id that is not a wallet id is simply
/// not found, like another tenant's wallet.
pub fn account_of(caller: &Caller, wallet_id: &str) -> Result<AccountId, ApiError> {
    if !valid_wallet_id(wallet_id) {
        return Err(ApiError::NotFound("wallet"));
    }
    AccountId::parse(&format!("{}/{wallet_id}", caller.tenant_id))
        .map_err(|_| ApiError::NotFound("wallet"))
}

pub fn minor(amount: Option<&Amount>) -> i128 {
    amount
        .and_then(|amount| amount.minor_units.parse().ok())
        .unwrap_or(0)
}

fn wallet_view(account: &pb::Account, token: Option<String>) -> Wallet {
    let scale = account.scale;
    let wallet_id = account
        .account_id
        .split_once('/')
        .map_or(account.account_id.as_str(), |(_, id)| id)
        .to_string();
    let balance = minor(account.balance.as_ref());
    let pending_out = minor(account.pending_out.as_ref());
    Wallet {
        wallet_id,
        owner_id: account
            .metadata
            .get(OWNER_METADATA_KEY)
            .cloned()
            .unwrap_or_default(),
        currency: account.currency.clone(),
        state: auticuro::convert::state_name(account.state).to_string(),
        balance: money::format(balance, scale),
        available: money::format(balance - pending_out, scale),
        pending_out: money::format(pending_out, scale),
        pending_in: money::format(minor(account.pending_in.as_ref()), scale),
        limits: Limits {
            lower: account
                .lower_limit
                .as_ref()
                .map(|limit| money::format(minor(Some(limit)), scale)),
            upper: account
                .upper_limit
                .as_ref()
                .map(|limit| money::format(minor(Some(limit)), scale)),
        },
        metadata: query::activity::visible(&account.metadata),
        version: account.version,
        consistency_token: token,
    }
}

pub(super) fn token_of(shard_id: u32, seq: u64) -> String {
    consistency_token::encode(&ConsistencyToken {
        shard_seqs: vec![ShardSeq { shard_id, seq }],
    })
}

fn parse_limit(text: &Option<String>, currency: Currency) -> Result<Option<Amount>, ApiError> {
    text.as_deref()
        .map(|text| {
            money::parse_signed(text, currency)
                .map(|minor| Amount {
                    minor_units: minor.to_string(),
                })
                .map_err(|error| ApiError::InvalidRequest(format!("limit: {error}")))
        })
        .transpose()
}

/// Executes a command on the shard of `account_id`; a rejection becomes its problem. Returns
/// the shard's id and client with the result.
pub(super) async fn execute_on(
    state: &AppState,
    account_id: &AccountId,
    command: pb::Command,
) -> Result<(u32, ShardHandle, pb::CommandResult), ApiError> {
    let (shard_id, shard) = state.cluster.shard_of(account_id)?;
    let deadline = Instant::now() + state.options.request_timeout;
    let result = shard
        .execute(command, deadline)
        .await
        .map_err(|unknown| ApiError::Unavailable(unknown.to_string()))?;
    let outcome = auticuro::ledger::Outcome::from_number(result.outcome)
        .ok_or_else(|| ApiError::Internal(format!("unknown outcome {}", result.outcome)))?;
    if !outcome.is_ok() {
        return Err(ApiError::Rejected {
            outcome,
            transaction_id: None,
        });
    }
    Ok((shard_id, shard, result))
}

/// Executes an account command on the wallet's shard; answers with the wallet after it.
async fn execute_on_wallet(
    state: &AppState,
    account_id: &AccountId,
    command: pb::Command,
    status: StatusCode,
) -> Result<Reply, ApiError> {
    let (shard_id, shard, result) = execute_on(state, account_id, command).await?;
    let deadline = Instant::now() + state.options.request_timeout;
    // A duplicate (a retry, or a concurrent request with the same key) carries no account
    // states: read the wallet as of the command's seq instead.
    let account = match result
        .accounts
        .iter()
        .find(|account| account.account_id == account_id.as_str())
    {
        Some(account) => account.clone(),
        None => read_account_on(&shard, account_id, Some(result.seq), deadline).await?,
    };
    Ok(Reply::new(
        status,
        &wallet_view(&account, Some(token_of(shard_id, result.seq))),
    ))
}

/// Create a wallet.
#[utoipa::path(post, path = "/v1/wallets", tag = "wallets",
    params(("Idempotency-Key" = String, Header, description = "Unique per request; retries reuse it")),
    request_body = CreateWallet,
    responses((status = 201, body = Wallet), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Body(request): Body<CreateWallet>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let currency = Currency::parse(&request.currency).ok_or_else(|| {
        ApiError::InvalidRequest(format!("unknown currency {:?}", request.currency))
    })?;
    check_owner_id(&request.owner_id)?;
    let mut metadata = super::caller_metadata(&request.metadata)?;
    metadata.insert(OWNER_METADATA_KEY.into(), request.owner_id.clone());
    let limits = request.limits.clone().unwrap_or_default();
    let wallet_id = wallet_id_for(&caller.tenant_id, &key);
    let account_id = account_of(&caller, &wallet_id)?;
    let command = pb::Command {
        request_id: super::request_id(&caller.tenant_id, &key),
        kind: Some(pb::command::Kind::CreateAccount(pb::CreateAccount {
            account_id: account_id.as_str().to_string(),
            currency: currency.code.into(),
            scale: currency.scale,
            lower_limit: parse_limit(&limits.lower, currency)?,
            upper_limit: parse_limit(&limits.upper, currency)?,
            metadata: metadata.into_iter().collect(),
            no_lower_limit: false,
        })),
    };
    let operation = Operation {
        name: "create-wallet",
        body: &request,
        txn_id: None,
        coordinator_shard_id: None,
    };
    Ok(once(&state, &caller, &key, operation, |_| {
        execute_on_wallet(&state, &account_id, command, StatusCode::CREATED)
    })
    .await)
}

async fn read_account(
    state: &AppState,
    account_id: &AccountId,
    token: &Option<String>,
) -> Result<pb::Account, ApiError> {
    let token = token
        .as_deref()
        .map(consistency_token::decode)
        .transpose()?;
    let (shard_id, shard) = state.cluster.shard_of(account_id)?;
    let min_seq = token.and_then(|token| consistency_token::seq_on(&token, shard_id));
    let deadline = Instant::now() + state.options.request_timeout;
    read_account_on(&shard, account_id, min_seq, deadline).await
}

async fn read_account_on(
    shard: &ShardClient,
    account_id: &AccountId,
    min_seq: Option<u64>,
    deadline: Instant,
) -> Result<pb::Account, ApiError> {
    let reply = shard
        .get_account(account_id.as_str(), min_seq, deadline)
        .await
        .map_err(|unknown| ApiError::Unavailable(unknown.to_string()))?;
    match reply {
        pb::get_account_response::Reply::Read(read) => {
            read.account.ok_or(ApiError::NotFound("wallet"))
        }
        pb::get_account_response::Reply::NotCaughtUp(_) => Err(ApiError::NotCaughtUp),
        pb::get_account_response::Reply::Redirect(_) => {
            Err(ApiError::Unavailable("redirected".into()))
        }
    }
}

/// Get a wallet.
#[utoipa::path(get, path = "/v1/wallets/{wallet_id}", tag = "wallets",
    params(("wallet_id" = String, Path), ReadParams),
    responses((status = 200, body = Wallet), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(wallet_id): Path<String>,
    Params(params): Params<ReadParams>,
) -> Result<axum::Json<Wallet>, ApiError> {
    caller.require(Scope::Read)?;
    let account_id = account_of(&caller, &wallet_id)?;
    let account = read_account(&state, &account_id, &params.consistency_token).await?;
    Ok(axum::Json(wallet_view(&account, None)))
}

/// Get a wallet's balance.
#[utoipa::path(get, path = "/v1/wallets/{wallet_id}/balance", tag = "wallets",
    params(("wallet_id" = String, Path), ReadParams),
    responses((status = 200, body = Balance), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn balance(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(wallet_id): Path<String>,
    Params(params): Params<ReadParams>,
) -> Result<axum::Json<Balance>, ApiError> {
    caller.require(Scope::Read)?;
    let account_id = account_of(&caller, &wallet_id)?;
    let account = read_account(&state, &account_id, &params.consistency_token).await?;
    let wallet = wallet_view(&account, None);
    Ok(axum::Json(Balance {
        wallet_id: wallet.wallet_id,
        currency: wallet.currency,
        available: wallet.available,
        balance: wallet.balance,
        pending_out: wallet.pending_out,
        pending_in: wallet.pending_in,
        version: wallet.version,
    }))
}

/// A state change of one wallet (freeze, unfreeze, close), once per idempotency key.
async fn change_state(
    state: Arc<AppState>,
    caller: Caller,
    key: IdempotencyKey,
    wallet_id: String,
    name: &'static str,
    kind: fn(String) -> pb::command::Kind,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let account_id = account_of(&caller, &wallet_id)?;
    let command = pb::Command {
        request_id: super::request_id(&caller.tenant_id, &key),
        kind: Some(kind(account_id.as_str().to_string())),
    };
    let operation = Operation {
        name,
        body: &wallet_id,
        txn_id: None,
        coordinator_shard_id: None,
    };
    Ok(once(&state, &caller, &key, operation, |_| {
        execute_on_wallet(&state, &account_id, command, StatusCode::OK)
    })
    .await)
}

/// Freeze a wallet: no money moves in or out until it is unfrozen.
#[utoipa::path(post, path = "/v1/wallets/{wallet_id}/freeze", tag = "wallets",
    params(("wallet_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, body = Wallet), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn freeze(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(wallet_id): Path<String>,
) -> Result<Response, ApiError> {
    change_state(state, caller, key, wallet_id, "freeze", |account_id| {
        pb::command::Kind::Freeze(pb::Freeze { account_id })
    })
    .await
}

/// Unfreeze a wallet.
#[utoipa::path(post, path = "/v1/wallets/{wallet_id}/unfreeze", tag = "wallets",
    params(("wallet_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, body = Wallet), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn unfreeze(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(wallet_id): Path<String>,
) -> Result<Response, ApiError> {
    change_state(state, caller, key, wallet_id, "unfreeze", |account_id| {
        pb::command::Kind::Unfreeze(pb::Unfreeze { account_id })
    })
    .await
}

/// Close a wallet; only an empty wallet with nothing held can be closed.
#[utoipa::path(post, path = "/v1/wallets/{wallet_id}/close", tag = "wallets",
    params(("wallet_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, body = Wallet), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn close(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(wallet_id): Path<String>,
) -> Result<Response, ApiError> {
    change_state(state, caller, key, wallet_id, "close", |account_id| {
        pb::command::Kind::Close(pb::Close { account_id })
    })
    .await
}

/// Makes sure a system account of the tenant exists (funding accounts may go negative: money
/// enters and leaves the platform through them).
pub async fn ensure_system_account(
    state: &AppState,
    account_id: &AccountId,
    currency: Currency,
) -> Result<(), ApiError> {
    if state
        .system_accounts
        .lock()
        .expect("no poisoned lock")
        .contains(account_id.as_str())
    {
        return Ok(());
    }
    let command = pb::Command {
        request_id: format!("g:create:{}", account_id.as_str()),
        kind: Some(pb::command::Kind::CreateAccount(pb::CreateAccount {
            account_id: account_id.as_str().to_string(),
            currency: currency.code.into(),
            scale: currency.scale,
            no_lower_limit: true,
            ..Default::default()
        })),
    };
    let (_, shard) = state.cluster.shard_of(account_id)?;
    let deadline = Instant::now() + state.options.request_timeout;
    let result = shard
        .execute(command, deadline)
        .await
        .map_err(|unknown| ApiError::Unavailable(unknown.to_string()))?;
    let outcome = auticuro::ledger::Outcome::from_number(result.outcome);
    if !matches!(
        outcome,
        Some(auticuro::ledger::Outcome::Ok | auticuro::ledger::Outcome::AccountAlreadyExists)
    ) {
        return Err(ApiError::Internal(format!(
            "creating system account {}: {outcome:?}",
            account_id.as_str()
        )));
    }
    state
        .system_accounts
        .lock()
        .expect("no poisoned lock")
        .insert(account_id.as_str().to_string());
    Ok(())
}
