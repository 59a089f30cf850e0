//! Transactions: submitting one to a coordinator shard (once per idempotency key, routed by the
//! coordinator recorded with the key), reading it, and following its status changes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auticuro::ledger::{AccountId, Outcome};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use proto::auticuro::v1 as ledger;
use proto::common::v1::Amount;
use proto::marker::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{IdempotencyKey, Operation, Reply, consistency_token, once};
use crate::AppState;
use crate::auth::{Caller, Scope};
use crate::money::{self, Currency};
use crate::problem::{ApiError, Problem};

/// How long a write waits for its transaction to be done before answering (with "pending" when
/// not even decided by then).
const DECISION_WAIT_MS_MAX: u32 = 3_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Deposit,
    Withdrawal,
    Payment,
    Capture,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Deposit => "deposit",
            Kind::Withdrawal => "withdrawal",
            Kind::Payment => "payment",
            Kind::Capture => "capture",
        }
    }
}

pub struct NewTransaction {
    pub kind: Kind,
    /// Zero-sum, one currency.
    pub legs: Vec<(AccountId, i128)>,
    pub currency: Currency,
    pub metadata: BTreeMap<String, String>,
    /// The ledger hold the one debit leg captures.
    pub hold_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Leg {
    /// A wallet id, or one of the tenant's system accounts (`sys:funding:USD`, `sys:fees:USD`).
    pub account: String,
    /// Signed: negative debits, positive credits.
    pub amount: String,
    pub currency: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Transaction {
    pub transaction_id: String,
    /// `deposit`, `withdrawal`, `payment` or `capture`.
    pub kind: String,
    /// `pending`, `committed` or `aborted`.
    pub status: String,
    /// True once every shard has posted (or voided) its part.
    pub done: bool,
    pub legs: Vec<Leg>,
    pub metadata: BTreeMap<String, String>,
    /// Why it was aborted (a problem `type`), when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub created_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<i64>,
    /// Pass to reads to see this transaction's effects (once it is done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency_token: Option<String>,
}

/// The answer to a write whose outcome is not known yet: never a failure. Retry with the same
/// idempotency key, or follow the transaction, to learn the outcome.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Pending {
    pub transaction_id: String,
    /// `pending`.
    pub status: String,
}

/// Public transaction ids are `txn_` and 40 hex digits; the coordinator's are `t:` and the same.
pub fn public_id(txn_id: &str) -> String {
    format!("txn_{}", txn_id.strip_prefix("t:").unwrap_or(txn_id))
}

fn internal_id(transaction_id: &str) -> Result<String, ApiError> {
    let hex = transaction_id
        .strip_prefix("txn_")
        .filter(|hex| hex.len() == 40 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or(ApiError::NotFound("transaction"))?;
    Ok(format!("t:{hex}"))
}

fn status_name(status: i32) -> &'static str {
    match pb::TransactionStatus::try_from(status) {
        Ok(pb::TransactionStatus::Committed) => "committed",
        Ok(pb::TransactionStatus::Aborted) => "aborted",
        _ => "pending",
    }
}

fn failure_of(transaction: &pb::Transaction) -> Option<ApiError> {
    if transaction.status != pb::TransactionStatus::Aborted as i32 {
        return None;
    }
    let transaction_id = public_id(&transaction.txn_id);
    let outcome = Outcome::from_number(transaction.outcome).filter(|outcome| !outcome.is_ok());
    Some(
        match (pb::AbortReason::try_from(transaction.abort_reason), outcome) {
            (Ok(pb::AbortReason::Rejected), Some(outcome)) => ApiError::Rejected {
                outcome,
                transaction_id: Some(transaction_id),
            },
            _ => ApiError::Aborted { transaction_id },
        },
    )
}

fn view(tenant_id: &str, transaction: &pb::Transaction) -> Transaction {
    let prefix = format!("{tenant_id}/");
    let legs = transaction
        .legs
        .iter()
        .map(|leg| {
            let scale = Currency::parse(&leg.currency).map_or(0, |currency| currency.scale);
            Leg {
                account: leg
                    .account_id
                    .strip_prefix(&prefix)
                    .unwrap_or(&leg.account_id)
                    .to_string(),
                amount: money::format(super::wallets::minor(leg.amount.as_ref()), scale),
                currency: leg.currency.clone(),
            }
        })
        .collect();
    let mut metadata = query::activity::visible(&transaction.metadata);
    if let Some(reference) = transaction
        .metadata
        .get(super::transfers::REFERENCE_METADATA_KEY)
    {
        metadata.insert("reference".into(), reference.clone());
    }
    Transaction {
        transaction_id: public_id(&transaction.txn_id),
        kind: transaction
            .metadata
            .get(query::activity::KIND_KEY)
            .cloned()
            .unwrap_or_default(),
        status: status_name(transaction.status).to_string(),
        done: transaction.done,
        legs,
        metadata,
        failure: failure_of(transaction).map(|error| {
            error.body()["type"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }),
        created_at_ms: transaction.begun_at_ms,
        decided_at_ms: (transaction.decided_at_ms > 0).then_some(transaction.decided_at_ms),
        consistency_token: transaction
            .consistency_token
            .as_ref()
            .filter(|token| !token.shard_seqs.is_empty())
            .map(consistency_token::encode),
    }
}

/// Submits a transaction once per idempotency key: to the coordinator shard recorded with the
/// key (so a retry after a topology change finds its transaction), waiting for the decision.
pub async fn submit<B: Serialize>(
    state: &Arc<AppState>,
    caller: &Caller,
    key: &IdempotencyKey,
    body: &B,
    transaction: NewTransaction,
) -> Response {
    let txn_id = txn_id_of(caller, key);
    let coordinator_shard_id = match state.cluster.coordinator_for_new(&txn_id) {
        Ok(id) => id,
        Err(error) => return axum::response::IntoResponse::into_response(error),
    };
    let mut metadata = transaction.metadata;
    metadata.insert(
        query::activity::KIND_KEY.into(),
        transaction.kind.name().into(),
    );
    let request = pb::SubmitRequest {
        tenant_id: caller.tenant_id.clone(),
        idempotency_key: key.0.clone(),
        legs: transaction
            .legs
            .iter()
            .map(|(account_id, amount)| ledger::Leg {
                account_id: account_id.as_str().to_string(),
                amount: Some(Amount {
                    minor_units: amount.to_string(),
                }),
                currency: transaction.currency.code.to_string(),
            })
            .collect(),
        metadata: metadata.into_iter().collect(),
        wait: true,
        wait_ms_max: DECISION_WAIT_MS_MAX,
        wait_until_done: true,
        hold_id: transaction.hold_id.unwrap_or_default(),
    };
    let operation = Operation {
        name: transaction.kind.name(),
        body,
        txn_id: Some(&txn_id),
        coordinator_shard_id: Some(coordinator_shard_id),
    };
    once(state, caller, key, operation, |recorded| {
        run(
            state,
            caller,
            key,
            recorded.unwrap_or(coordinator_shard_id),
            request,
        )
    })
    .await
}

async fn run(
    state: &Arc<AppState>,
    caller: &Caller,
    key: &IdempotencyKey,
    coordinator_shard_id: u32,
    request: pb::SubmitRequest,
) -> Result<Reply, ApiError> {
    use pb::submit_response::Reply as Answer;
    let deadline = Instant::now() + state.options.request_timeout;
    let pending = || {
        Reply::new(
            StatusCode::ACCEPTED,
            &Pending {
                transaction_id: public_id(&txn_id_of(caller, key)),
                status: "pending".into(),
            },
        )
    };
    let mut coordinator_shard_id = coordinator_shard_id;
    // A draining shard that never saw the key sends it elsewhere: move the record, once.
    for _ in 0..2 {
        let client = state.cluster.coordinator(coordinator_shard_id)?;
        let answer = match client.submit(request.clone(), deadline).await {
            Ok(answer) => answer,
            // Sent but not answered: the transaction may exist. Never report it as failed.
            Err(_) => return Ok(pending()),
        };
        match answer {
            Answer::Transaction(transaction) => {
                if let Some(failure) = failure_of(&transaction) {
                    return Err(failure);
                }
                let status = if transaction.status == pb::TransactionStatus::Committed as i32 {
                    StatusCode::CREATED
                } else {
                    StatusCode::ACCEPTED
                };
                return Ok(Reply::new(status, &view(&caller.tenant_id, &transaction)));
            }
            Answer::IdempotencyMismatch(_) => return Err(ApiError::IdempotencyMismatch),
            Answer::Invalid(outcome) => {
                return Err(ApiError::Rejected {
                    outcome: Outcome::from_number(outcome).unwrap_or(Outcome::InvalidAmount),
                    transaction_id: None,
                });
            }
            Answer::NotAccepting(_) => {
                coordinator_shard_id =
                    state.cluster.coordinator_for_new(&txn_id_of(caller, key))?;
                crate::store::reroute(&state.pool, &caller.tenant_id, &key.0, coordinator_shard_id)
                    .await?;
            }
            Answer::Redirect(_) => return Ok(pending()),
        }
    }
    Err(ApiError::Unavailable(
        "no coordinator shard accepted the transaction".into(),
    ))
}

fn txn_id_of(caller: &Caller, key: &IdempotencyKey) -> String {
    marker::saga::txn_id_for(&caller.tenant_id, &key.0).to_string()
}

/// The caller's transaction as its coordinator knows it.
async fn fetch(
    state: &AppState,
    caller: &Caller,
    transaction_id: &str,
) -> Result<
    (
        String,
        Arc<marker::client::CoordinatorClient>,
        pb::Transaction,
    ),
    ApiError,
> {
    let txn_id = internal_id(transaction_id)?;
    let coordinator_shard_id =
        crate::store::transaction_route(&state.pool, &caller.tenant_id, &txn_id)
            .await?
            .ok_or(ApiError::NotFound("transaction"))?;
    let client = state.cluster.coordinator(coordinator_shard_id)?;
    let deadline = Instant::now() + state.options.request_timeout;
    let transaction = client
        .get(&txn_id, deadline)
        .await
        .map_err(|unknown| ApiError::Unavailable(unknown.to_string()))?
        .filter(|transaction| transaction.tenant_id == caller.tenant_id)
        .ok_or(ApiError::NotFound("transaction"))?;
    Ok((txn_id, client, transaction))
}

/// Get a transaction.
#[utoipa::path(get, path = "/v1/transactions/{transaction_id}", tag = "transactions",
    params(("transaction_id" = String, Path)),
    responses((status = 200, body = Transaction), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(transaction_id): Path<String>,
) -> Result<axum::Json<Transaction>, ApiError> {
    caller.require(Scope::Read)?;
    let (_, _, transaction) = fetch(&state, &caller, &transaction_id).await?;
    Ok(axum::Json(view(&caller.tenant_id, &transaction)))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusChange {
    pub transaction_id: String,
    pub status: String,
    pub done: bool,
    pub timestamp_ms: i64,
}

/// Follow a transaction's status changes (server-sent events, one `status` event per change,
/// ending once the transaction is done).
#[utoipa::path(get, path = "/v1/transactions/{transaction_id}/events", tag = "transactions",
    params(("transaction_id" = String, Path)),
    responses((status = 200, description = "text/event-stream of `status` events", body = StatusChange, content_type = "text/event-stream"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(transaction_id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Scope::Read)?;
    let (txn_id, client, _) = fetch(&state, &caller, &transaction_id).await?;
    let changes = client
        .watch(&txn_id)
        .await
        .map_err(|status| ApiError::Unavailable(status.to_string()))?;
    let events = changes
        .take_while(|change| std::future::ready(change.is_ok()))
        .filter_map(|change| async move {
            let change = change.ok()?;
            let view = StatusChange {
                transaction_id: public_id(&change.txn_id),
                status: status_name(change.status).to_string(),
                done: change.done,
                timestamp_ms: change.timestamp_ms,
            };
            Some(Ok(Event::default()
                .event("status")
                .json_data(view)
                .expect("a status change serializes")))
        });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InFlight {
    pub transaction: Transaction,
    /// Since it was begun.
    pub age_ms: i64,
    pub coordinator_shard_id: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InFlightList {
    /// Oldest first.
    pub transactions: Vec<InFlight>,
}

/// The caller's transactions not done yet, on every coordinator shard, oldest first.
#[utoipa::path(get, path = "/v1/admin/in-flight", tag = "transactions",
    responses((status = 200, body = InFlightList), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn in_flight(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<axum::Json<InFlightList>, ApiError> {
    caller.require(Scope::Read)?;
    let deadline = Instant::now() + state.options.request_timeout;
    let mut transactions = Vec::new();
    for (coordinator_shard_id, client) in state.cluster.serving_coordinators() {
        let listed = client
            .list_in_flight(0, deadline)
            .await
            .map_err(|unknown| ApiError::Unavailable(unknown.to_string()))?;
        transactions.extend(
            listed
                .into_iter()
                .filter_map(|entry| Some((entry.transaction?, entry.age_ms)))
                .filter(|(transaction, _)| transaction.tenant_id == caller.tenant_id)
                .map(|(transaction, age_ms)| InFlight {
                    transaction: view(&caller.tenant_id, &transaction),
                    age_ms,
                    coordinator_shard_id,
                }),
        );
    }
    transactions.sort_by_key(|entry| std::cmp::Reverse(entry.age_ms));
    Ok(axum::Json(InFlightList { transactions }))
}

/// Retry now (`force_abort: false`) or force an abort (before a decision only) of one of the
/// caller's transactions, once per idempotency key (admin).
async fn intervene(
    state: Arc<AppState>,
    caller: Caller,
    key: IdempotencyKey,
    transaction_id: String,
    force_abort: bool,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let (txn_id, client, _) = fetch(&state, &caller, &transaction_id).await?;
    let operation = Operation {
        name: if force_abort { "force-abort" } else { "retry" },
        body: &transaction_id,
        txn_id: None,
        coordinator_shard_id: None,
    };
    Ok(once(&state, &caller, &key, operation, |_| async {
        use pb::admin_response::Reply as Answer;
        let deadline = Instant::now() + state.options.request_timeout;
        let answer = client
            .intervene(&txn_id, force_abort, deadline)
            .await
            .map_err(|unknown| ApiError::Unavailable(unknown.to_string()))?;
        match answer {
            Answer::Transaction(transaction) => Ok(Reply::new(
                StatusCode::OK,
                &view(&caller.tenant_id, &transaction),
            )),
            Answer::AlreadyDecided(_) => Err(ApiError::Conflict(
                "already-decided",
                "The transaction is decided already; a decision never changes",
            )),
            Answer::SingleShard(_) => Err(ApiError::Conflict(
                "not-abortable",
                "A single-shard transaction is one atomic batch: it ends as soon as its storage shard answers",
            )),
            Answer::NotFound(_) => Err(ApiError::NotFound("transaction")),
            Answer::Redirect(_) => Err(ApiError::Unavailable("redirected".into())),
        }
    })
    .await)
}

/// Drive one of the caller's transactions again now (admin).
#[utoipa::path(post, path = "/v1/admin/transactions/{transaction_id}/retry", tag = "transactions",
    params(("transaction_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, body = Transaction), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn retry(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(transaction_id): Path<String>,
) -> Result<Response, ApiError> {
    intervene(state, caller, key, transaction_id, false).await
}

/// Abort one of the caller's transactions that is not decided yet (admin); a decided one is
/// refused with `already-decided`, a single-shard one (one atomic batch, nothing reserved) with
/// `not-abortable`.
#[utoipa::path(post, path = "/v1/admin/transactions/{transaction_id}/abort", tag = "transactions",
    params(("transaction_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, body = Transaction), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn abort(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(transaction_id): Path<String>,
) -> Result<Response, ApiError> {
    intervene(state, caller, key, transaction_id, true).await
}
