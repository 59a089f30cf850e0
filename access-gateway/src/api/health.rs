//! Liveness and readiness.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use crate::AppState;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200)))]
pub async fn healthz() -> StatusCode {
    StatusCode::OK
}

/// The gateway can serve: Postgres answers and the topology names storage shards and an active
/// coordinator shard.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200), (status = 503)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> StatusCode {
    let postgres = sqlx::query("SELECT 1").execute(&state.pool).await.is_ok();
    if postgres && state.cluster.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
