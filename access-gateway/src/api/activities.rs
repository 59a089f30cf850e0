//! A wallet's activity feed (deposits, withdrawals, payments sent and received, fees), newest
//! first, from the query service's projections. A write's consistency token makes the feed
//! include that write.

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
    let page_size = match params.page_size {
        None => 50,
        Some(size @ 1..=PAGE_SIZE_MAX) => size,
        Some(_) => {
            return Err(ApiError::InvalidRequest(format!(
                "page_size is 1 to {PAGE_SIZE_MAX}"
            )));
        }
    };
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
