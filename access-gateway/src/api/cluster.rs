//! The platform's status for operators (the console's cluster page): every Raft group with its
//! leader, members and applied seq, the coordinators' in-flight counts and the read side's
//! projection lag.

use std::sync::Arc;

use axum::extract::State;
use proto::query::v1 as pb;
use proto::query::v1::account_query_client::AccountQueryClient;

use crate::AppState;
use crate::auth::{Caller, Scope};
use crate::problem::{ApiError, Problem};

/// Every Raft group of the platform (`operator` scope: the platform's operators, not tenants).
#[utoipa::path(get, path = "/v1/admin/cluster", tag = "operations",
    responses((status = 200, description = "`groups`: kind (`topology`, `storage`, `coordinator`), group_id, leader_node_id, term, applied_seq, replicas (address, reachable, node_id, state, applied_seq), in_flight (coordinators), projection (storage: applied_seq, lag_events)", content_type = "application/json"),
        (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn status(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<axum::Json<marker::status::PlatformStatus>, ApiError> {
    caller.require(Scope::Operator)?;
    // The projection's progress is optional: without the query service the rest still shows.
    let projected = match super::query_channel(&state) {
        Ok(channel) => AccountQueryClient::new(channel)
            .get_projection(pb::GetProjectionRequest {})
            .await
            .ok()
            .map(|reply| {
                reply
                    .into_inner()
                    .applied
                    .into_iter()
                    .map(|shard| (shard.shard_id, shard.seq))
                    .collect()
            }),
        Err(_) => None,
    };
    let status = marker::status::status(state.cluster.topology_replicas(), projected.as_ref())
        .await
        .map_err(ApiError::Unavailable)?;
    Ok(axum::Json(status))
}
