//! A wallet's activity feed (deposits, withdrawals, payments sent and received, fees, holds),
//! newest first, and every version of it, from the query service's projections. A write's
//! consistency token makes the feed include that write.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use proto::query::v1 as pb;
use proto::query::v1::account_query_client::AccountQueryClient;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Params, consistency_token};
use crate::AppState;
use crate::auth::{Caller, Scope};
use crate::money::{self, Currency};
use crate::problem::{ApiError, Problem};

const PAGE_SIZE_MAX: u32 = 200;
/// How long a read with a consistency token waits for the projection.
const WAIT_MS_MAX: u32 = 3_000;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Activity {
    pub activity_id: String,
    /// `deposit`, `withdrawal`, `payment_sent`, `payment_received` or `fee`.
    pub kind: String,
    /// Signed: negative when money left the wallet.
    pub amount: String,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    /// The other side: a wallet id, or a system account (`sys:funding:USD`, `sys:fees:USD`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counterparty: Option<String>,
    /// Ledger time, milliseconds since the Unix epoch.
    pub occurred_at_ms: i64,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ActivityPage {
    pub activities: Vec<Activity>,
    /// Pass as `page_token` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ActivityParams {
    /// From the previous page.
    pub page_token: Option<String>,
    /// 1 to 200 (default 50).
    pub page_size: Option<u32>,
    /// From a write's response: the feed includes that write.
    pub consistency_token: Option<String>,
}

fn page_size(requested: Option<u32>) -> Result<u32, ApiError> {
    match requested {
        None => Ok(50),
        Some(size @ 1..=PAGE_SIZE_MAX) => Ok(size),
        Some(_) => Err(ApiError::InvalidRequest(format!(
            "page_size is 1 to {PAGE_SIZE_MAX}"
        ))),
    }
}

fn kind_name(kind: i32) -> &'static str {
    match pb::ActivityKind::try_from(kind) {
        Ok(pb::ActivityKind::Deposit) => "deposit",
        Ok(pb::ActivityKind::Withdrawal) => "withdrawal",
        Ok(pb::ActivityKind::PaymentSent) => "payment_sent",
        Ok(pb::ActivityKind::PaymentReceived) => "payment_received",
        Ok(pb::ActivityKind::Fee) => "fee",
        Ok(pb::ActivityKind::Hold) => "hold",
        Ok(pb::ActivityKind::Capture) => "capture",
        Ok(pb::ActivityKind::Void) => "void",
        _ => "other",
    }
}

/// List a wallet's activities, newest first.
#[utoipa::path(get, path = "/v1/wallets/{wallet_id}/activities", tag = "wallets",
    params(("wallet_id" = String, Path), ActivityParams),
    responses((status = 200, body = ActivityPage), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(wallet_id): Path<String>,
    Params(params): Params<ActivityParams>,
) -> Result<axum::Json<ActivityPage>, ApiError> {
    caller.require(Scope::Read)?;
    let account_id = super::wallets::account_of(&caller, &wallet_id)?;
    let page_size = page_size(params.page_size)?;
    let token = params
        .consistency_token
        .as_deref()
        .map(consistency_token::decode)
        .transpose()?;
    let mut client = AccountQueryClient::new(super::query_channel(&state)?);
    let unavailable = |status: tonic::Status| match status.code() {
        tonic::Code::InvalidArgument => ApiError::InvalidRequest("invalid page_token".into()),
        _ => ApiError::Unavailable(format!("query service: {status}")),
    };
    // The wallet must exist (as of the token) for its feed to be shown.
    let balance = client
        .get_balance(pb::GetBalanceRequest {
            tenant_id: caller.tenant_id.clone(),
            account_id: account_id.as_str().to_string(),
            consistency_token: token.clone(),
            wait_ms_max: WAIT_MS_MAX,
        })
        .await
        .map_err(unavailable)?
        .into_inner();
    let currency = match balance.reply {
        Some(pb::get_balance_response::Reply::View(view)) => {
            let code = view
                .account
                .map(|account| account.currency)
                .unwrap_or_default();
            Currency::parse(&code)
                .ok_or_else(|| ApiError::Internal(format!("unknown currency {code}")))?
        }
        Some(pb::get_balance_response::Reply::NotCaughtUp(_)) => return Err(ApiError::NotCaughtUp),
        _ => return Err(ApiError::NotFound("wallet")),
    };
    let page = client
        .list_activities(pb::ListActivitiesRequest {
            tenant_id: caller.tenant_id.clone(),
            account_id: account_id.as_str().to_string(),
            page_token: params.page_token.unwrap_or_default(),
            page_size,
            consistency_token: None,
            wait_ms_max: 0,
        })
        .await
        .map_err(unavailable)?
        .into_inner();
    let tenant_prefix = format!("{}/", caller.tenant_id);
    let activities = page
        .activities
        .into_iter()
        .map(|activity| Activity {
            activity_id: format!("act_{:016x}", activity.activity_id),
            kind: kind_name(activity.kind).to_string(),
            amount: money::format(
                super::wallets::minor(activity.amount.as_ref()),
                currency.scale,
            ),
            currency: activity.currency,
            transaction_id: Some(activity.txn_id)
                .filter(|id| !id.is_empty())
                .map(|id| super::transactions::public_id(&id)),
            counterparty: Some(activity.counterparty_account_id)
                .filter(|id| !id.is_empty())
                .map(|id| id.strip_prefix(&tenant_prefix).unwrap_or(&id).to_string()),
            occurred_at_ms: activity.timestamp_ms,
            metadata: activity.metadata,
        })
        .collect();
    Ok(axum::Json(ActivityPage {
        activities,
        next_page_token: Some(page.next_page_token).filter(|token| !token.is_empty()),
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Version {
    pub version: u64,
    /// `active`, `frozen` or `closed`.
    pub state: String,
    pub balance: String,
    pub available: String,
    pub pending_out: String,
    pub pending_in: String,
    /// The ledger event that made this version: its shard seq and time.
    pub seq: u64,
    pub at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionPage {
    /// Newest first.
    pub versions: Vec<Version>,
    /// Pass as `before_version` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before_version: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct VersionParams {
    /// Versions strictly older than this one.
    pub before_version: Option<u64>,
    /// 1 to 200 (default 50).
    pub page_size: Option<u32>,
}

/// List every version of a wallet (each change of its balance, pending amounts or state),
/// newest first, from the read side.
#[utoipa::path(get, path = "/v1/wallets/{wallet_id}/versions", tag = "wallets",
    params(("wallet_id" = String, Path), VersionParams),
    responses((status = 200, body = VersionPage), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn versions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(wallet_id): Path<String>,
    Params(params): Params<VersionParams>,
) -> Result<axum::Json<VersionPage>, ApiError> {
    caller.require(Scope::Read)?;
    let account_id = super::wallets::account_of(&caller, &wallet_id)?;
    let page_size = page_size(params.page_size)?;
    let mut client = AccountQueryClient::new(super::query_channel(&state)?);
    let history = client
        .get_history(pb::GetHistoryRequest {
            tenant_id: caller.tenant_id.clone(),
            account_id: account_id.as_str().to_string(),
            before_version: params.before_version.unwrap_or(0),
            page_size,
        })
        .await
        .map_err(|status| ApiError::Unavailable(format!("query service: {status}")))?
        .into_inner();
    if history.versions.is_empty() && params.before_version.is_none() {
        return Err(ApiError::NotFound("wallet"));
    }
    let versions = history
        .versions
        .into_iter()
        .filter_map(|view| {
            let account = view.account?;
            let scale = account.scale;
            let amount = |a: Option<&proto::common::v1::Amount>| {
                money::format(super::wallets::minor(a), scale)
            };
            let balance = super::wallets::minor(account.balance.as_ref());
            let pending_out = super::wallets::minor(account.pending_out.as_ref());
            Some(Version {
                version: account.version,
                state: auticuro::convert::state_name(account.state).to_string(),
                balance: amount(account.balance.as_ref()),
                available: money::format(balance - pending_out, scale),
                pending_out: amount(account.pending_out.as_ref()),
                pending_in: amount(account.pending_in.as_ref()),
                seq: view.seq,
                at_ms: view.updated_at_ms,
                transaction_id: Some(view.last_txn_id)
                    .filter(|id| id.starts_with("t:"))
                    .map(|id| super::transactions::public_id(&id)),
            })
        })
        .collect();
    Ok(axum::Json(VersionPage {
        versions,
        next_before_version: Some(history.next_before_version).filter(|v| *v > 0),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct OwnerParams {
    /// The owner id given when the wallets were created.
    pub owner_id: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WalletList {
    pub wallet_ids: Vec<String>,
}

/// The wallets of one owner (as the read side has them, up to 200).
#[utoipa::path(get, path = "/v1/wallets", tag = "wallets",
    params(OwnerParams),
    responses((status = 200, body = WalletList), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn by_owner(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Params(params): Params<OwnerParams>,
) -> Result<axum::Json<WalletList>, ApiError> {
    caller.require(Scope::Read)?;
    super::wallets::check_owner_id(&params.owner_id)?;
    let mut client = AccountQueryClient::new(super::query_channel(&state)?);
    let found = client
        .find_accounts(pb::FindAccountsRequest {
            tenant_id: caller.tenant_id.clone(),
            key: query::activity::OWNER_KEY.into(),
            value: params.owner_id,
            limit: PAGE_SIZE_MAX,
        })
        .await
        .map_err(|status| ApiError::Unavailable(format!("query service: {status}")))?
        .into_inner();
    let prefix = format!("{}/", caller.tenant_id);
    Ok(axum::Json(WalletList {
        wallet_ids: found
            .account_ids
            .iter()
            .filter_map(|id| id.strip_prefix(&prefix))
            .map(str::to_string)
            .collect(),
    }))
}
