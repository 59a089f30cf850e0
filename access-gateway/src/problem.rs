//! Errors of the gateway and their one mapping to HTTP: RFC 7807 problem documents with a stable
//! `type` per business outcome. Internal details are logged here, never sent to the caller.

use auticuro::ledger::Outcome;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An RFC 7807 problem document.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Problem {
    /// Stable identifier of the kind of problem, e.g. `/problems/insufficient-funds`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The transaction the problem concerns, when one was created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
}

/// Everything a request can end in other than success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("the API key lacks the {0} scope")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("the idempotency key was used with a different request")]
    IdempotencyMismatch,
    /// The request conflicts with the current state: a problem `type` and its title.
    #[error("{1}")]
    Conflict(&'static str, &'static str),
    #[error("too many requests")]
    RateLimited,
    #[error("the request body is too large")]
    PayloadTooLarge,
    #[error("the transaction was aborted")]
    Aborted { transaction_id: String },
    #[error("the ledger rejected the request: {outcome:?}")]
    Rejected {
        outcome: Outcome,
        transaction_id: Option<String>,
    },
    #[error("the ledger has not caught up with the consistency token yet")]
    NotCaughtUp,
    /// A dependency did not answer in time; the caller may retry (with the same key).
    #[error("temporarily unavailable")]
    Unavailable(String),
    /// A bug or an I/O failure of our own.
    #[error("internal error")]
    Internal(String),
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        ApiError::from(&error)
    }
}

/// A batch's failed statement, shared by every request of the batch.
impl From<crate::store::Failed> for ApiError {
    fn from(error: crate::store::Failed) -> ApiError {
        ApiError::from(&*error)
    }
}

impl From<&sqlx::Error> for ApiError {
    fn from(error: &sqlx::Error) -> ApiError {
        ApiError::Unavailable(format!("postgres: {error}"))
    }
}

impl ApiError {
    fn problem(&self) -> Problem {
        let (status, kind, title) = match self {
            ApiError::InvalidRequest(_) => (400, "invalid-request", "The request is invalid"),
            ApiError::Unauthorized => (401, "unauthorized", "Authentication required"),
            ApiError::Forbidden(_) => (403, "forbidden", "Not allowed"),
            ApiError::NotFound("wallet") => (404, "wallet-not-found", "No such wallet"),
            ApiError::NotFound("transaction") => {
                (404, "transaction-not-found", "No such transaction")
            }
            ApiError::NotFound("hold") => outcome_problem(Outcome::HoldNotFound),
            ApiError::NotFound("node") => (404, "node-not-found", "No such hierarchy node"),
            ApiError::Conflict(kind, title) => (409, *kind, *title),
            ApiError::NotFound(_) => (404, "not-found", "Not found"),
            ApiError::IdempotencyMismatch => (
                409,
                "idempotency-key-reused",
                "The idempotency key was used with a different request",
            ),
            ApiError::RateLimited => (429, "rate-limited", "Too many requests"),
            ApiError::PayloadTooLarge => {
                (413, "payload-too-large", "The request body is too large")
            }
            ApiError::Aborted { .. } => (
                422,
                "transaction-aborted",
                "The transaction was aborted; nothing moved",
            ),
            ApiError::Rejected { outcome, .. } => outcome_problem(*outcome),
            ApiError::NotCaughtUp => (
                503,
                "not-caught-up",
                "The data is not yet as recent as the consistency token",
            ),
            ApiError::Unavailable(_) => (
                503,
                "unavailable",
                "Temporarily unavailable; retry with the same idempotency key",
            ),
            ApiError::Internal(_) => (500, "internal", "Internal error"),
        };
        let detail = match self {
            ApiError::InvalidRequest(detail) => Some(detail.clone()),
            ApiError::Forbidden(scope) => Some(format!("the API key lacks the {scope} scope")),
            _ => None,
        };
        let transaction_id = match self {
            ApiError::Rejected { transaction_id, .. } => transaction_id.clone(),
            ApiError::Aborted { transaction_id } => Some(transaction_id.clone()),
            _ => None,
        };
        Problem {
            kind: format!("/problems/{kind}"),
            title: title.to_string(),
            status,
            detail,
            transaction_id,
        }
    }

    /// Whether the response is final for its idempotency key (a retry must replay it) rather than
    /// a transient failure that a retry should try again.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            ApiError::Unavailable(_) | ApiError::Internal(_) | ApiError::RateLimited
        )
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.problem().status).expect("problem statuses are valid")
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(self.problem()).expect("a problem always serializes")
    }
}

/// Status, `type` and title of each ledger outcome that can reach a caller.
fn outcome_problem(outcome: Outcome) -> (u16, &'static str, &'static str) {
    use Outcome::*;
    match outcome {
        InsufficientFunds => (422, "insufficient-funds", "Insufficient funds"),
        LimitExceeded => (
            422,
            "limit-exceeded",
            "The wallet's limit would be exceeded",
        ),
        AccountNotFound => (404, "wallet-not-found", "No such wallet"),
        AccountFrozen => (422, "wallet-frozen", "The wallet is frozen"),
        AccountClosed | AccountNotActive => (422, "wallet-closed", "The wallet is closed"),
        CurrencyMismatch => (
            422,
            "currency-mismatch",
            "The currency does not match the wallet",
        ),
        AccountNotEmpty => (
            422,
            "wallet-not-empty",
            "The wallet still holds money or holds",
        ),
        DuplicateWithDifferentPayload => (
            409,
            "idempotency-key-reused",
            "The idempotency key was used with a different request",
        ),
        InvalidAmount | AmountOverflow => (400, "invalid-amount", "The amount is invalid"),
        SelfTransfer | DuplicateAccountInBatch => {
            (400, "same-wallet", "A wallet appears twice in one request")
        }
        InvalidLimits => (400, "invalid-limits", "The limits are invalid"),
        InvalidMetadata => (400, "invalid-metadata", "The metadata is invalid"),
        InvalidCurrency => (400, "invalid-currency", "The currency is invalid"),
        HoldNotFound => (404, "hold-not-found", "No such hold"),
        HoldNotOpen => (
            409,
            "hold-not-open",
            "The hold is being captured, captured or voided",
        ),
        HoldAlreadyExists => (409, "hold-already-exists", "The hold exists already"),
        HoldExceeded => (
            422,
            "hold-exceeded",
            "The capture is more than the hold authorized",
        ),
        HoldMismatch => (
            422,
            "hold-mismatch",
            "The capture does not match the hold's wallet or currency",
        ),
        _ => (500, "internal", "Internal error"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
            ApiError::Unavailable(detail) => tracing::warn!(%detail, "dependency unavailable"),
            ApiError::Rejected { outcome, .. } if outcome_problem(*outcome).0 == 500 => {
                tracing::error!(?outcome, "unexpected ledger outcome")
            }
            _ => {}
        }
        problem_response(self.status(), &self.body())
    }
}

/// A problem document as a response, with its media type.
pub fn problem_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_a_caller_can_cause_has_its_own_problem_type() {
        let callers_outcomes = [
            Outcome::InsufficientFunds,
            Outcome::LimitExceeded,
            Outcome::AccountNotFound,
            Outcome::AccountFrozen,
            Outcome::AccountClosed,
            Outcome::CurrencyMismatch,
            Outcome::AccountNotEmpty,
            Outcome::HoldNotFound,
            Outcome::HoldNotOpen,
            Outcome::HoldExceeded,
            Outcome::HoldMismatch,
        ];
        let mut kinds = std::collections::BTreeSet::new();
        for outcome in callers_outcomes {
            let (status, kind, _) = outcome_problem(outcome);
            assert!((400..500).contains(&status), "{outcome:?}");
            assert!(kinds.insert(kind), "{kind} used twice");
        }
    }

    #[test]
    fn internal_details_are_not_sent() {
        let body = ApiError::Internal("secret connection string".into()).body();
        assert!(!body.to_string().contains("secret"), "{body}");
        let body = ApiError::Unavailable("postgres: password wrong".into()).body();
        assert!(!body.to_string().contains("password"), "{body}");
    }
}
