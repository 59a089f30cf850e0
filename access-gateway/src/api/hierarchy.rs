//! Account hierarchies (for the operator console and for callers): a tree of nodes per tenant
//! whose leaves are wallets; a node's balance is the sum of its subtree per currency. The
//! hierarchy service of the query side owns the tree; reading needs the read scope, editing the
//! admin scope.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use proto::query::v1 as pb;
use proto::query::v1::hierarchy_client::HierarchyClient;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Body, IdempotencyKey, Operation, Reply, consistency_token, once};
use crate::AppState;
use crate::auth::{Caller, Scope};
use crate::money::{self, Currency};
use crate::problem::{ApiError, Problem};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeBalance {
    pub currency: String,
    pub balance: String,
    pub available: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub node_id: String,
    pub name: String,
    /// Absent for a root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    pub child_node_ids: Vec<String>,
    /// Wallets (and the tenant's system accounts) attached to this node.
    pub wallet_ids: Vec<String>,
    /// Sums over the subtree, per currency (in the tree listing; empty in answers to edits).
    pub balances: Vec<NodeBalance>,
    /// The shard seqs the sums are consistent with (in the tree listing only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistent_with: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNode {
    /// 1 to 64 characters.
    pub name: String,
    /// Absent: a new root.
    #[serde(default)]
    pub parent_id: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    pub name: String,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Move {
    /// Absent or null: the node becomes a root.
    #[serde(default)]
    pub parent_id: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    pub wallet_id: String,
}

fn client(state: &AppState) -> Result<HierarchyClient<tonic::transport::Channel>, ApiError> {
    Ok(HierarchyClient::new(super::query_channel(state)?))
}

fn unavailable(status: tonic::Status) -> ApiError {
    ApiError::Unavailable(format!("hierarchy service: {status}"))
}

fn node_view(tenant_id: &str, node: pb::HierarchyNode) -> Node {
    let prefix = format!("{tenant_id}/");
    Node {
        node_id: node.node_id,
        name: node.name,
        parent_id: Some(node.parent_id).filter(|id| !id.is_empty()),
        child_node_ids: node.child_node_ids,
        wallet_ids: node
            .account_ids
            .iter()
            .map(|id| id.strip_prefix(&prefix).unwrap_or(id).to_string())
            .collect(),
        balances: Vec::new(),
        consistent_with: None,
    }
}

/// The node an edit answered with, or the problem its outcome is.
fn edited(caller: &Caller, result: pb::HierarchyResult) -> Result<Reply, ApiError> {
    use pb::HierarchyOutcome as O;
    match O::try_from(result.outcome).unwrap_or(O::Unspecified) {
        O::Ok => {
            let node = result.node.unwrap_or_default();
            Ok(Reply::new(
                StatusCode::OK,
                &node_view(&caller.tenant_id, node),
            ))
        }
        O::NotFound | O::CrossTenant => Err(ApiError::NotFound("node")),
        O::AccountNotFound => Err(ApiError::NotFound("wallet")),
        O::Cycle => Err(ApiError::Conflict(
            "hierarchy-cycle",
            "A node cannot move under itself or its own subtree",
        )),
        O::NotEmpty => Err(ApiError::Conflict(
            "node-not-empty",
            "Only a node without children or wallets can be deleted",
        )),
        O::AlreadyAttached => Err(ApiError::Conflict(
            "wallet-already-attached",
            "The wallet is attached to a node already",
        )),
        O::InvalidName => Err(ApiError::InvalidRequest(
            "a node name is 1 to 64 characters".into(),
        )),
        O::Unspecified => Err(ApiError::Internal("hierarchy outcome unspecified".into())),
    }
}

/// Runs one edit once per idempotency key.
async fn edit<B, F, Fut>(
    state: Arc<AppState>,
    caller: Caller,
    key: IdempotencyKey,
    name: &'static str,
    body: &B,
    call: F,
) -> Result<Response, ApiError>
where
    B: Serialize,
    F: FnOnce(HierarchyClient<tonic::transport::Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<pb::HierarchyResult>, tonic::Status>>,
{
    caller.require(Scope::Admin)?;
    let hierarchy = client(&state)?;
    let operation = Operation {
        name,
        body,
        txn_id: None,
        coordinator_shard_id: None,
    };
    Ok(once(&state, &caller, &key, operation, |_| async {
        let result = call(hierarchy).await.map_err(unavailable)?.into_inner();
        edited(&caller, result)
    })
    .await)
}

/// The tenant's hierarchy: every node with its subtree's balance per currency.
#[utoipa::path(get, path = "/v1/hierarchy", tag = "hierarchy",
    responses((status = 200, body = Tree), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn tree(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<axum::Json<Tree>, ApiError> {
    caller.require(Scope::Read)?;
    let tenant_id = caller.tenant_id.clone();
    let tree = client(&state)?
        .get_tree(pb::GetTreeRequest {
            tenant_id: tenant_id.clone(),
        })
        .await
        .map_err(unavailable)?
        .into_inner();
    let consistent_with = consistency_token::encode(&proto::common::v1::ConsistencyToken {
        shard_seqs: tree.as_of,
    });
    let mut balances: BTreeMap<String, Vec<pb::CurrencyBalance>> = tree
        .balances
        .into_iter()
        .map(|node| (node.node_id, node.balances))
        .collect();
    let mut views = Vec::with_capacity(tree.nodes.len());
    for node in tree.nodes {
        let lines = balances.remove(&node.node_id).unwrap_or_default();
        let mut view = node_view(&tenant_id, node);
        view.balances = lines
            .into_iter()
            .map(|line| {
                let scale = Currency::parse(&line.currency).map_or(0, |c| c.scale);
                let amount = |a: Option<proto::common::v1::Amount>| {
                    money::format(super::wallets::minor(a.as_ref()), scale)
                };
                NodeBalance {
                    balance: amount(line.balance),
                    available: amount(line.available),
                    currency: line.currency,
                }
            })
            .collect();
        view.consistent_with = Some(consistent_with.clone());
        views.push(view);
    }
    Ok(axum::Json(Tree { nodes: views }))
}

/// Create a node (a root, or a child of `parent_id`).
#[utoipa::path(post, path = "/v1/hierarchy/nodes", tag = "hierarchy",
    params(("Idempotency-Key" = String, Header)),
    request_body = NewNode,
    responses((status = 200, body = Node), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Body(request): Body<NewNode>,
) -> Result<Response, ApiError> {
    let call = pb::CreateNodeRequest {
        tenant_id: caller.tenant_id.clone(),
        name: request.name.clone(),
        parent_id: request.parent_id.clone().unwrap_or_default(),
    };
    edit(
        state,
        caller,
        key,
        "create-node",
        &request,
        |mut c| async move { c.create_node(call).await },
    )
    .await
}

/// Rename a node.
#[utoipa::path(post, path = "/v1/hierarchy/nodes/{node_id}/rename", tag = "hierarchy",
    params(("node_id" = String, Path), ("Idempotency-Key" = String, Header)),
    request_body = Rename,
    responses((status = 200, body = Node), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn rename(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(node_id): Path<String>,
    Body(request): Body<Rename>,
) -> Result<Response, ApiError> {
    let call = pb::RenameNodeRequest {
        tenant_id: caller.tenant_id.clone(),
        node_id: node_id.clone(),
        name: request.name.clone(),
    };
    let body = (&node_id, &request);
    edit(
        state,
        caller,
        key,
        "rename-node",
        &body,
        |mut c| async move { c.rename_node(call).await },
    )
    .await
}

/// Move a node under another parent (or make it a root); a move into its own subtree is refused.
#[utoipa::path(post, path = "/v1/hierarchy/nodes/{node_id}/move", tag = "hierarchy",
    params(("node_id" = String, Path), ("Idempotency-Key" = String, Header)),
    request_body = Move,
    responses((status = 200, body = Node), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn move_node(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(node_id): Path<String>,
    Body(request): Body<Move>,
) -> Result<Response, ApiError> {
    let call = pb::MoveNodeRequest {
        tenant_id: caller.tenant_id.clone(),
        node_id: node_id.clone(),
        new_parent_id: request.parent_id.clone().unwrap_or_default(),
    };
    let body = (&node_id, &request);
    edit(state, caller, key, "move-node", &body, |mut c| async move {
        c.move_node(call).await
    })
    .await
}

/// Delete a node without children or wallets.
#[utoipa::path(post, path = "/v1/hierarchy/nodes/{node_id}/delete", tag = "hierarchy",
    params(("node_id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, body = Node), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(node_id): Path<String>,
) -> Result<Response, ApiError> {
    let call = pb::DeleteNodeRequest {
        tenant_id: caller.tenant_id.clone(),
        node_id: node_id.clone(),
    };
    edit(
        state,
        caller,
        key,
        "delete-node",
        &node_id,
        |mut c| async move { c.delete_node(call).await },
    )
    .await
}

/// Attach a wallet to a node (a wallet hangs under at most one node).
#[utoipa::path(post, path = "/v1/hierarchy/nodes/{node_id}/attach", tag = "hierarchy",
    params(("node_id" = String, Path), ("Idempotency-Key" = String, Header)),
    request_body = Attach,
    responses((status = 200, body = Node), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn attach(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(node_id): Path<String>,
    Body(request): Body<Attach>,
) -> Result<Response, ApiError> {
    membership(state, caller, key, node_id, request, true).await
}

/// Detach a wallet from a node.
#[utoipa::path(post, path = "/v1/hierarchy/nodes/{node_id}/detach", tag = "hierarchy",
    params(("node_id" = String, Path), ("Idempotency-Key" = String, Header)),
    request_body = Attach,
    responses((status = 200, body = Node), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn detach(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    key: IdempotencyKey,
    Path(node_id): Path<String>,
    Body(request): Body<Attach>,
) -> Result<Response, ApiError> {
    membership(state, caller, key, node_id, request, false).await
}

/// Attaches a wallet to a node, or detaches it.
async fn membership(
    state: Arc<AppState>,
    caller: Caller,
    key: IdempotencyKey,
    node_id: String,
    request: Attach,
    attach: bool,
) -> Result<Response, ApiError> {
    let account_id = super::wallets::account_of(&caller, &request.wallet_id)?.to_string();
    let tenant_id = caller.tenant_id.clone();
    let body = (&node_id, &request);
    let name = if attach {
        "attach-wallet"
    } else {
        "detach-wallet"
    };
    let target = node_id.clone();
    edit(state, caller, key, name, &body, |mut c| async move {
        if attach {
            let request = pb::AttachAccountRequest {
                tenant_id,
                node_id: target,
                account_id,
            };
            c.attach_account(request).await
        } else {
            let request = pb::DetachAccountRequest {
                tenant_id,
                node_id: target,
                account_id,
            };
            c.detach_account(request).await
        }
    })
    .await
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Me {
    pub tenant_id: String,
    /// `read`, `write`, `admin`.
    pub scopes: Vec<String>,
}

/// The calling key's tenant and scopes (what the console may show).
#[utoipa::path(get, path = "/v1/me", tag = "hierarchy",
    responses((status = 200, body = Me), (status = "4XX", body = Problem, content_type = "application/problem+json"), (status = "5XX", body = Problem, content_type = "application/problem+json")),
    security(("api_key" = [])))]
pub async fn me(caller: Caller) -> axum::Json<Me> {
    axum::Json(Me {
        tenant_id: caller.tenant_id,
        scopes: caller
            .scopes
            .iter()
            .map(|scope| scope.name().to_string())
            .collect(),
    })
}
