//! The access gateway: the REST business API that mobile and web backends call, and the only
//! door from the outside. It turns business requests (wallets, deposits, withdrawals, payments)
//! into ledger commands and coordinator transactions, and carries authentication, tenant
//! isolation, idempotency keys, input validation and rate limits. It keeps no state of its own
//! beyond Postgres (API keys, idempotency records), so any number of replicas can run.
//!
//! Only this crate knows JSON and decimal amounts.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod console;
mod metrics;
pub mod money;
pub mod openapi;
pub mod problem;
pub mod store;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use crate::metrics::Metrics;

/// Limits and timeouts of one gateway.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a request may wait on the cluster before it answers "pending" or "unavailable".
    pub request_timeout: Duration,
    pub requests_per_second_max: NonZeroU32,
    pub body_bytes_max: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            request_timeout: Duration::from_secs(5),
            requests_per_second_max: NonZeroU32::new(1_000).expect("non-zero"),
            body_bytes_max: 16 * 1024,
        }
    }
}

pub struct AppState {
    pub pool: sqlx::PgPool,
    /// Idempotency records, written in batches.
    pub records: store::Records,
    pub cluster: Arc<cluster::Cluster>,
    pub authenticator: auth::Authenticator,
    pub options: Options,
    pub metrics: Metrics,
    /// The query service, when one is configured (activity feeds; without it they answer
    /// 503).
    pub query: Option<tonic::transport::Channel>,
    /// System accounts (funding, fees) this process has made sure exist.
    pub system_accounts: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl AppState {
    pub fn new(
        pool: sqlx::PgPool,
        cluster: Arc<cluster::Cluster>,
        options: Options,
        query: Option<tonic::transport::Channel>,
    ) -> AppState {
        AppState {
            query,
            records: store::Records::start(pool.clone()),
            pool,
            cluster,
            authenticator: auth::Authenticator::new(options.requests_per_second_max),
            metrics: Metrics::default(),
            options,
            system_accounts: Default::default(),
        }
    }
}

/// Every route of the gateway.
pub fn router(state: Arc<AppState>) -> Router {
    let body_bytes_max = state.options.body_bytes_max;
    let v1 = Router::new()
        .route(
            "/wallets",
            post(api::wallets::create).get(api::activities::by_owner),
        )
        .route("/wallets/{wallet_id}", get(api::wallets::get))
        .route("/wallets/{wallet_id}/balance", get(api::wallets::balance))
        .route("/wallets/{wallet_id}/freeze", post(api::wallets::freeze))
        .route(
            "/wallets/{wallet_id}/unfreeze",
            post(api::wallets::unfreeze),
        )
        .route("/wallets/{wallet_id}/close", post(api::wallets::close))
        .route(
            "/wallets/{wallet_id}/activities",
            get(api::activities::list),
        )
        .route(
            "/wallets/{wallet_id}/versions",
            get(api::activities::versions),
        )
        .route("/deposits", post(api::transfers::deposit))
        .route("/withdrawals", post(api::transfers::withdraw))
        .route("/payments", post(api::transfers::pay))
        .route("/holds", post(api::holds::place))
        .route("/holds/{hold_id}", get(api::holds::get))
        .route("/holds/{hold_id}/capture", post(api::holds::capture))
        .route("/holds/{hold_id}/void", post(api::holds::void))
        .route("/me", get(api::hierarchy::me))
        .route("/admin/in-flight", get(api::transactions::in_flight))
        .route("/admin/cluster", get(api::cluster::status))
        .route(
            "/admin/transactions/{transaction_id}/retry",
            post(api::transactions::retry),
        )
        .route(
            "/admin/transactions/{transaction_id}/abort",
            post(api::transactions::abort),
        )
        .route("/hierarchy", get(api::hierarchy::tree))
        .route("/hierarchy/nodes", post(api::hierarchy::create))
        .route(
            "/hierarchy/nodes/{node_id}/rename",
            post(api::hierarchy::rename),
        )
        .route(
            "/hierarchy/nodes/{node_id}/move",
            post(api::hierarchy::move_node),
        )
        .route(
            "/hierarchy/nodes/{node_id}/delete",
            post(api::hierarchy::delete),
        )
        .route(
            "/hierarchy/nodes/{node_id}/attach",
            post(api::hierarchy::attach),
        )
        .route(
            "/hierarchy/nodes/{node_id}/detach",
            post(api::hierarchy::detach),
        )
        .route(
            "/transactions/{transaction_id}",
            get(api::transactions::get),
        )
        .route(
            "/transactions/{transaction_id}/events",
            get(api::transactions::events),
        );
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(api::health::healthz))
        .route("/readyz", get(api::health::readyz))
        .route("/metrics", get(metrics::serve))
        .merge(openapi::routes())
        .merge(console::routes())
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            metrics::track,
        ))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                refuse_declared_oversize(request, next, body_bytes_max)
            },
        ))
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .with_state(state)
}

/// A body whose declared length is over the limit is refused before any of it is read (bodies
/// without a declared length are cut at the limit while read).
async fn refuse_declared_oversize(
    request: axum::extract::Request,
    next: axum::middleware::Next,
    body_bytes_max: usize,
) -> axum::response::Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) if length > body_bytes_max as u64 => {
            axum::response::IntoResponse::into_response(problem::ApiError::PayloadTooLarge)
        }
        _ => next.run(request).await,
    }
}
