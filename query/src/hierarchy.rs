//! Account hierarchies (gRPC `Hierarchy`): per tenant, a tree of named nodes whose leaves are
//! accounts. Edits of one tenant's tree are serialized (a transaction-scoped advisory lock), so
//! the cycle and emptiness checks hold against concurrent edits. A node's balance is the sum of
//! its subtree's accounts per currency, read in one snapshot together with the applied seqs it
//! is consistent with (the whole tree's balances too, in one query). Another tenant's nodes read
//! as not found.

use std::collections::BTreeMap;

use proto::common::v1::{Amount, ShardSeq};
use proto::query::v1 as pb;
use proto::query::v1::HierarchyOutcome as Outcome;
use proto::query::v1::hierarchy_server::Hierarchy;
use sqlx::{PgPool, Postgres, Row, Transaction};
use tonic::{Request, Response, Status};

use crate::store::tenant_of;

pub const NAME_LENGTH_MAX: usize = 100;

pub struct HierarchyService {
    pool: PgPool,
}

impl HierarchyService {
    pub fn new(pool: PgPool) -> HierarchyService {
        HierarchyService { pool }
    }

    /// A transaction holding the tenant's tree lock.
    async fn edit(&self, tenant_id: &str) -> Result<Transaction<'static, Postgres>, Status> {
        if tenant_id.is_empty() {
            return Err(Status::invalid_argument("tenant_id is required"));
        }
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('hierarchy:' || $1))")
            .bind(tenant_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        Ok(tx)
    }

    /// A read-only transaction that sees one snapshot.
    async fn snapshot(&self) -> Result<Transaction<'static, Postgres>, Status> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        Ok(tx)
    }
}

fn unavailable(error: sqlx::Error) -> Status {
    tracing::error!(%error, "hierarchy store");
    Status::unavailable("the projection store is unavailable")
}

fn valid_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= NAME_LENGTH_MAX
        && name.chars().all(|c| !c.is_control())
}

/// Node ids are `node_` and 32 hex digits; any other text names no node (and never reaches the
/// database).
fn valid_node_id(node_id: &str) -> bool {
    node_id
        .strip_prefix("node_")
        .is_some_and(|hex| hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// An account id the ledger could have (anything else is attached nowhere).
fn valid_account_id(account_id: &str) -> bool {
    auticuro::ledger::AccountId::parse(account_id).is_ok()
}

fn outcome(outcome: Outcome) -> Result<Response<pb::HierarchyResult>, Status> {
    Ok(Response::new(pb::HierarchyResult {
        outcome: outcome as i32,
        node: None,
    }))
}

/// The node with its children and accounts, when it exists in the tenant.
async fn load_node(
    tx: &mut Transaction<'static, Postgres>,
    tenant_id: &str,
    node_id: &str,
) -> Result<Option<pb::HierarchyNode>, Status> {
    if !valid_node_id(node_id) {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT name, coalesce(parent_id, ''),
                ARRAY(SELECT node_id FROM hierarchy_nodes c WHERE c.parent_id = n.node_id
                      ORDER BY node_id),
                ARRAY(SELECT account_id FROM hierarchy_accounts a WHERE a.node_id = n.node_id
                      ORDER BY account_id)
         FROM hierarchy_nodes n WHERE node_id = $1 AND tenant_id = $2",
    )
    .bind(node_id)
    .bind(tenant_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(unavailable)?;
    Ok(row.map(|row| pb::HierarchyNode {
        node_id: node_id.to_string(),
        tenant_id: tenant_id.to_string(),
        name: row.get(0),
        parent_id: row.get(1),
        child_node_ids: row.get(2),
        account_ids: row.get(3),
    }))
}

/// Commits and answers OK with the node as it is now.
async fn done(
    mut tx: Transaction<'static, Postgres>,
    tenant_id: &str,
    node_id: &str,
) -> Result<Response<pb::HierarchyResult>, Status> {
    let node = load_node(&mut tx, tenant_id, node_id).await?;
    tx.commit().await.map_err(unavailable)?;
    Ok(Response::new(pb::HierarchyResult {
        outcome: Outcome::Ok as i32,
        node,
    }))
}

/// Runs an edit of one node's row: NOT_FOUND when it changed nothing, else OK with the node.
async fn apply(
    mut tx: Transaction<'static, Postgres>,
    edit: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    tenant_id: &str,
    node_id: &str,
) -> Result<Response<pb::HierarchyResult>, Status> {
    if !valid_node_id(node_id) {
        return outcome(Outcome::NotFound);
    }
    let changed = edit.execute(&mut *tx).await.map_err(unavailable)?;
    if changed.rows_affected() == 0 {
        return outcome(Outcome::NotFound);
    }
    done(tx, tenant_id, node_id).await
}

#[tonic::async_trait]
impl Hierarchy for HierarchyService {
    async fn create_node(
        &self,
        request: Request<pb::CreateNodeRequest>,
    ) -> Result<Response<pb::HierarchyResult>, Status> {
        let request = request.into_inner();
        if !valid_name(&request.name) {
            return outcome(Outcome::InvalidName);
        }
        let mut tx = self.edit(&request.tenant_id).await?;
        if !request.parent_id.is_empty()
            && load_node(&mut tx, &request.tenant_id, &request.parent_id)
                .await?
                .is_none()
        {
            return outcome(Outcome::NotFound);
        }
        let node_id: String = sqlx::query_scalar(
            "INSERT INTO hierarchy_nodes (node_id, tenant_id, name, parent_id)
             VALUES ('node_' || replace(gen_random_uuid()::text, '-', ''), $1, $2, nullif($3, ''))
             RETURNING node_id",
        )
        .bind(&request.tenant_id)
        .bind(&request.name)
        .bind(&request.parent_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        done(tx, &request.tenant_id, &node_id).await
    }

    async fn rename_node(
        &self,
        request: Request<pb::RenameNodeRequest>,
    ) -> Result<Response<pb::HierarchyResult>, Status> {
        let request = request.into_inner();
        if !valid_name(&request.name) {
            return outcome(Outcome::InvalidName);
        }
        let tx = self.edit(&request.tenant_id).await?;
        let rename = sqlx::query(
            "UPDATE hierarchy_nodes SET name = $3 WHERE node_id = $1 AND tenant_id = $2",
        )
        .bind(&request.node_id)
        .bind(&request.tenant_id)
        .bind(&request.name);
        apply(tx, rename, &request.tenant_id, &request.node_id).await
    }

    async fn move_node(
        &self,
        request: Request<pb::MoveNodeRequest>,
    ) -> Result<Response<pb::HierarchyResult>, Status> {
        let request = request.into_inner();
        let mut tx = self.edit(&request.tenant_id).await?;
        let tenant = &request.tenant_id;
        if load_node(&mut tx, tenant, &request.node_id)
            .await?
            .is_none()
        {
            return outcome(Outcome::NotFound);
        }
        if !request.new_parent_id.is_empty() {
            if load_node(&mut tx, tenant, &request.new_parent_id)
                .await?
                .is_none()
            {
                return outcome(Outcome::NotFound);
            }
            // The new parent must not be the node itself or anywhere below it.
            let cycle: bool = sqlx::query_scalar(
                "WITH RECURSIVE below(node_id) AS (
                     SELECT $1::text
                     UNION SELECT n.node_id FROM hierarchy_nodes n JOIN below b ON n.parent_id = b.node_id
                 )
                 SELECT EXISTS (SELECT 1 FROM below WHERE node_id = $2)",
            )
            .bind(&request.node_id)
            .bind(&request.new_parent_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
            if cycle {
                return outcome(Outcome::Cycle);
            }
        }
        sqlx::query("UPDATE hierarchy_nodes SET parent_id = nullif($2, '') WHERE node_id = $1")
            .bind(&request.node_id)
            .bind(&request.new_parent_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        done(tx, tenant, &request.node_id).await
    }

    async fn delete_node(
        &self,
        request: Request<pb::DeleteNodeRequest>,
    ) -> Result<Response<pb::HierarchyResult>, Status> {
        let request = request.into_inner();
        let mut tx = self.edit(&request.tenant_id).await?;
        let Some(node) = load_node(&mut tx, &request.tenant_id, &request.node_id).await? else {
            return outcome(Outcome::NotFound);
        };
        if !node.child_node_ids.is_empty() || !node.account_ids.is_empty() {
            return outcome(Outcome::NotEmpty);
        }
        sqlx::query("DELETE FROM hierarchy_nodes WHERE node_id = $1")
            .bind(&request.node_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Response::new(pb::HierarchyResult {
            outcome: Outcome::Ok as i32,
            node: Some(node),
        }))
    }

    async fn attach_account(
        &self,
        request: Request<pb::AttachAccountRequest>,
    ) -> Result<Response<pb::HierarchyResult>, Status> {
        let request = request.into_inner();
        if !valid_account_id(&request.account_id) {
            return outcome(Outcome::AccountNotFound);
        }
        if tenant_of(&request.account_id) != request.tenant_id {
            return outcome(Outcome::CrossTenant);
        }
        let mut tx = self.edit(&request.tenant_id).await?;
        if load_node(&mut tx, &request.tenant_id, &request.node_id)
            .await?
            .is_none()
        {
            return outcome(Outcome::NotFound);
        }
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE account_id = $1)")
                .bind(&request.account_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
        if !exists {
            return outcome(Outcome::AccountNotFound);
        }
        let attached = sqlx::query(
            "INSERT INTO hierarchy_accounts (account_id, node_id, tenant_id) VALUES ($1, $2, $3)
             ON CONFLICT (account_id) DO NOTHING",
        )
        .bind(&request.account_id)
        .bind(&request.node_id)
        .bind(&request.tenant_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if attached.rows_affected() == 0 {
            return outcome(Outcome::AlreadyAttached);
        }
        done(tx, &request.tenant_id, &request.node_id).await
    }

    async fn detach_account(
        &self,
        request: Request<pb::DetachAccountRequest>,
    ) -> Result<Response<pb::HierarchyResult>, Status> {
        let request = request.into_inner();
        if !valid_account_id(&request.account_id) {
            return outcome(Outcome::AccountNotFound);
        }
        let tx = self.edit(&request.tenant_id).await?;
        let detach = sqlx::query(
            "DELETE FROM hierarchy_accounts WHERE account_id = $1 AND node_id = $2 AND tenant_id = $3",
        )
        .bind(&request.account_id)
        .bind(&request.node_id)
        .bind(&request.tenant_id);
        apply(tx, detach, &request.tenant_id, &request.node_id).await
    }

    async fn get_tree(
        &self,
        request: Request<pb::GetTreeRequest>,
    ) -> Result<Response<pb::GetTreeResponse>, Status> {
        let request = request.into_inner();
        let mut tx = self.snapshot().await?;
        let rows = sqlx::query(
            "SELECT node_id, name, coalesce(parent_id, ''),
                    ARRAY(SELECT node_id FROM hierarchy_nodes c WHERE c.parent_id = n.node_id
                          ORDER BY node_id),
                    ARRAY(SELECT account_id FROM hierarchy_accounts a WHERE a.node_id = n.node_id
                          ORDER BY account_id)
             FROM hierarchy_nodes n WHERE tenant_id = $1 ORDER BY node_id",
        )
        .bind(&request.tenant_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        let nodes = rows
            .iter()
            .map(|row| pb::HierarchyNode {
                node_id: row.get(0),
                tenant_id: request.tenant_id.clone(),
                name: row.get(1),
                parent_id: row.get(2),
                child_node_ids: row.get(3),
                account_ids: row.get(4),
            })
            .collect();
        let balances = subtree_sums(&mut tx, &request.tenant_id, None)
            .await?
            .into_iter()
            .map(|(node_id, balances)| pb::NodeBalances { node_id, balances })
            .collect();
        let as_of = applied_seqs(&mut tx).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Response::new(pb::GetTreeResponse {
            nodes,
            balances,
            as_of,
        }))
    }

    async fn get_node_balance(
        &self,
        request: Request<pb::GetNodeBalanceRequest>,
    ) -> Result<Response<pb::GetNodeBalanceResponse>, Status> {
        let request = request.into_inner();
        let mut tx = self.snapshot().await?;
        if load_node(&mut tx, &request.tenant_id, &request.node_id)
            .await?
            .is_none()
        {
            return Ok(Response::new(pb::GetNodeBalanceResponse {
                outcome: Outcome::NotFound as i32,
                ..Default::default()
            }));
        }
        let mut sums = subtree_sums(&mut tx, &request.tenant_id, Some(&request.node_id)).await?;
        let as_of = applied_seqs(&mut tx).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Response::new(pb::GetNodeBalanceResponse {
            outcome: Outcome::Ok as i32,
            balances: sums.remove(&request.node_id).unwrap_or_default(),
            as_of,
        }))
    }
}

/// Per node of the tenant (or only `node_id`), the balances of the accounts in its subtree,
/// summed per currency; nodes with no account below are left out.
async fn subtree_sums(
    tx: &mut Transaction<'static, Postgres>,
    tenant_id: &str,
    node_id: Option<&str>,
) -> Result<BTreeMap<String, Vec<pb::CurrencyBalance>>, Status> {
    // Each node paired with every node below it (the tree has no cycles: moves refuse them).
    let rows = sqlx::query(
        "WITH RECURSIVE below(top, node_id) AS (
             SELECT node_id, node_id FROM hierarchy_nodes
             WHERE tenant_id = $1 AND ($2::text IS NULL OR node_id = $2)
             UNION ALL
             SELECT b.top, n.node_id FROM hierarchy_nodes n JOIN below b ON n.parent_id = b.node_id
         )
         SELECT b.top, a.currency, sum(a.balance)::text, sum(a.available)::text
         FROM below b
         JOIN hierarchy_accounts h ON h.node_id = b.node_id
         JOIN accounts a ON a.account_id = h.account_id
         GROUP BY b.top, a.currency ORDER BY b.top, a.currency",
    )
    .bind(tenant_id)
    .bind(node_id)
    .fetch_all(&mut **tx)
    .await
    .map_err(unavailable)?;
    let amount = |text: String| Some(Amount { minor_units: text });
    let mut sums: BTreeMap<String, Vec<pb::CurrencyBalance>> = BTreeMap::new();
    for row in rows {
        sums.entry(row.get(0))
            .or_default()
            .push(pb::CurrencyBalance {
                currency: row.get(1),
                balance: amount(row.get(2)),
                available: amount(row.get(3)),
            });
    }
    Ok(sums)
}

/// The per-shard seqs the projection has applied, as seen by `tx`.
async fn applied_seqs(tx: &mut Transaction<'static, Postgres>) -> Result<Vec<ShardSeq>, Status> {
    let rows =
        sqlx::query("SELECT shard_id, applied_seq FROM projection_offsets ORDER BY shard_id")
            .fetch_all(&mut **tx)
            .await
            .map_err(unavailable)?;
    Ok(rows
        .iter()
        .map(|row| ShardSeq {
            shard_id: row.get::<i32, _>(0) as u32,
            seq: row.get::<i64, _>(1) as u64,
        })
        .collect())
}
