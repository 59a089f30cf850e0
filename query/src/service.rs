//! The account query service (gRPC): balances with read-your-write, history by version,
//! balance as of a seq or a time, and the activity feed, all from the projections. Every read
//! is scoped to the caller's tenant: another tenant's account reads as not found.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proto::common::v1::{ConsistencyToken, ShardSeq};
use proto::query::v1 as pb;
use proto::query::v1::account_query_server::AccountQuery;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::store::{self, AccountVersion, StoreError, VersionFilter};

/// The longest a read waits for the projection to catch up with its consistency token.
pub const WAIT_MS_MAX: u32 = 5_000;
pub const PAGE_SIZE_DEFAULT: u32 = 50;
pub const PAGE_SIZE_MAX: u32 = 500;
const POLL_INTERVAL: Duration = Duration::from_millis(5);

pub struct AccountQueryService {
    pool: PgPool,
}

impl AccountQueryService {
    pub fn new(pool: PgPool) -> AccountQueryService {
        AccountQueryService { pool }
    }

    /// Waits (bounded) until every shard of the token is applied; the shortfall otherwise.
    async fn caught_up(
        &self,
        token: Option<&ConsistencyToken>,
        wait_ms_max: u32,
    ) -> Result<Option<pb::NotCaughtUp>, Status> {
        let wanted: BTreeMap<u32, u64> = token
            .map(|token| {
                token
                    .shard_seqs
                    .iter()
                    .map(|s| (s.shard_id, s.seq))
                    .collect()
            })
            .unwrap_or_default();
        if wanted.is_empty() {
            return Ok(None);
        }
        let deadline =
            Instant::now() + Duration::from_millis(u64::from(wait_ms_max.min(WAIT_MS_MAX)));
        loop {
            let applied = store::applied_seqs(&self.pool).await.map_err(internal)?;
            let behind = wanted
                .iter()
                .any(|(shard, seq)| applied.get(shard).copied().unwrap_or(0) < *seq);
            if !behind {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                let shard_seqs = |seqs: &BTreeMap<u32, u64>| -> Vec<ShardSeq> {
                    seqs.iter()
                        .map(|(shard_id, seq)| ShardSeq {
                            shard_id: *shard_id,
                            seq: *seq,
                        })
                        .collect()
                };
                let applied = wanted
                    .keys()
                    .map(|shard| (*shard, applied.get(shard).copied().unwrap_or(0)))
                    .collect();
                return Ok(Some(pb::NotCaughtUp {
                    applied: shard_seqs(&applied),
                    wanted: shard_seqs(&wanted),
                }));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

fn internal(error: StoreError) -> Status {
    tracing::error!(%error, "query store");
    Status::unavailable("the projection store is unavailable")
}

/// The account id, when it belongs to the tenant (`<tenant>/…`).
fn scoped<'a>(tenant_id: &str, account_id: &'a str) -> Option<&'a str> {
    (!tenant_id.is_empty() && store::tenant_of(account_id) == tenant_id).then_some(account_id)
}

fn view(version: AccountVersion) -> pb::AccountView {
    pb::AccountView {
        account: Some(version.account),
        shard_id: version.shard_id,
        seq: version.seq,
        updated_at_ms: version.updated_at_ms,
        last_txn_id: version.txn_id,
    }
}

fn page_size(requested: u32) -> u32 {
    match requested {
        0 => PAGE_SIZE_DEFAULT,
        n => n.min(PAGE_SIZE_MAX),
    }
}

fn activity_kind(name: &str) -> pb::ActivityKind {
    use crate::activity::ActivityKind as Kind;
    match crate::activity::ActivityKind::parse(name) {
        Some(Kind::Deposit) => pb::ActivityKind::Deposit,
        Some(Kind::Withdrawal) => pb::ActivityKind::Withdrawal,
        Some(Kind::PaymentSent) => pb::ActivityKind::PaymentSent,
        Some(Kind::PaymentReceived) => pb::ActivityKind::PaymentReceived,
        Some(Kind::Fee) => pb::ActivityKind::Fee,
        Some(Kind::Hold) => pb::ActivityKind::Hold,
        Some(Kind::Capture) => pb::ActivityKind::Capture,
        Some(Kind::Void) => pb::ActivityKind::Void,
        None => pb::ActivityKind::Unspecified,
    }
}

/// Page tokens are `<occurred_at_ms>.<activity_id>` of the previous page's last activity.
fn parse_page_token(token: &str) -> Result<Option<(i64, u64)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Status::invalid_argument("page_token is not one this service issued");
    let (ms, id) = token.split_once('.').ok_or_else(invalid)?;
    Ok(Some((
        ms.parse().map_err(|_| invalid())?,
        id.parse().map_err(|_| invalid())?,
    )))
}

#[tonic::async_trait]
impl AccountQuery for AccountQueryService {
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        use pb::get_balance_response::Reply;
        let request = request.into_inner();
        if let Some(behind) = self
            .caught_up(request.consistency_token.as_ref(), request.wait_ms_max)
            .await?
        {
            return Ok(Response::new(pb::GetBalanceResponse {
                reply: Some(Reply::NotCaughtUp(behind)),
            }));
        }
        let found = match scoped(&request.tenant_id, &request.account_id) {
            Some(account_id) => store::account(&self.pool, account_id)
                .await
                .map_err(internal)?,
            None => None,
        };
        let reply = match found {
            Some(version) => Reply::View(view(version)),
            None => Reply::NotFound(true),
        };
        Ok(Response::new(pb::GetBalanceResponse { reply: Some(reply) }))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let request = request.into_inner();
        let Some(account_id) = scoped(&request.tenant_id, &request.account_id) else {
            return Ok(Response::new(pb::GetHistoryResponse::default()));
        };
        let before = match request.before_version {
            0 => u64::MAX,
            version => version,
        };
        let size = page_size(request.page_size);
        let versions = store::versions(&self.pool, account_id, VersionFilter::Before(before), size)
            .await
            .map_err(internal)?;
        let next_before_version = match versions.last() {
            Some(last) if versions.len() == size as usize && last.account.version > 1 => {
                last.account.version
            }
            _ => 0,
        };
        Ok(Response::new(pb::GetHistoryResponse {
            versions: versions.into_iter().map(view).collect(),
            next_before_version,
        }))
    }

    async fn get_projection(
        &self,
        _: Request<pb::GetProjectionRequest>,
    ) -> Result<Response<pb::GetProjectionResponse>, Status> {
        let applied = store::applied_seqs(&self.pool).await.map_err(internal)?;
        Ok(Response::new(pb::GetProjectionResponse {
            applied: applied
                .into_iter()
                .map(|(shard_id, seq)| ShardSeq { shard_id, seq })
                .collect(),
        }))
    }

    async fn find_accounts(
        &self,
        request: Request<pb::FindAccountsRequest>,
    ) -> Result<Response<pb::FindAccountsResponse>, Status> {
        let request = request.into_inner();
        // Text Postgres can hold, and a bounded page.
        if [&request.tenant_id, &request.key, &request.value]
            .iter()
            .any(|text| text.contains('\0') || text.len() > 256)
        {
            return Err(Status::invalid_argument("invalid search"));
        }
        let limit = i64::from(page_size(request.limit));
        let account_ids = store::accounts_with(
            &self.pool,
            &request.tenant_id,
            &request.key,
            &request.value,
            limit,
        )
        .await
        .map_err(internal)?;
        Ok(Response::new(pb::FindAccountsResponse { account_ids }))
    }

    async fn get_balance_at(
        &self,
        request: Request<pb::GetBalanceAtRequest>,
    ) -> Result<Response<pb::GetBalanceAtResponse>, Status> {
        use pb::get_balance_at_request::At;
        use pb::get_balance_at_response::Reply;
        let request = request.into_inner();
        let filter = match request.at {
            Some(At::Seq(seq)) => VersionFilter::AtSeq(seq),
            Some(At::TimestampMs(ms)) => VersionFilter::AtTime(ms),
            None => return Err(Status::invalid_argument("give a seq or a timestamp_ms")),
        };
        let found = match scoped(&request.tenant_id, &request.account_id) {
            Some(account_id) => store::versions(&self.pool, account_id, filter, 1)
                .await
                .map_err(internal)?
                .pop(),
            None => None,
        };
        let reply = match found {
            Some(version) => Reply::View(view(version)),
            None => Reply::NotFound(true),
        };
        Ok(Response::new(pb::GetBalanceAtResponse {
            reply: Some(reply),
        }))
    }

    async fn list_activities(
        &self,
        request: Request<pb::ListActivitiesRequest>,
    ) -> Result<Response<pb::ListActivitiesResponse>, Status> {
        let request = request.into_inner();
        let after = parse_page_token(&request.page_token)?;
        if let Some(behind) = self
            .caught_up(request.consistency_token.as_ref(), request.wait_ms_max)
            .await?
        {
            return Ok(Response::new(pb::ListActivitiesResponse {
                not_caught_up: Some(behind),
                ..Default::default()
            }));
        }
        let Some(account_id) = scoped(&request.tenant_id, &request.account_id) else {
            return Ok(Response::new(pb::ListActivitiesResponse::default()));
        };
        let size = page_size(request.page_size);
        let rows = store::activities(&self.pool, account_id, after, size)
            .await
            .map_err(internal)?;
        let next_page_token = match rows.last() {
            Some(last) if rows.len() == size as usize => {
                format!("{}.{}", last.occurred_at_ms, last.activity_id)
            }
            _ => String::new(),
        };
        let activities = rows
            .into_iter()
            .map(|row| pb::Activity {
                activity_id: row.activity_id,
                account_id: row.account_id,
                kind: activity_kind(&row.kind) as i32,
                amount: Some(proto::common::v1::Amount {
                    minor_units: row.amount,
                }),
                currency: row.currency,
                txn_id: row.txn_id,
                counterparty_account_id: row.counterparty,
                timestamp_ms: row.occurred_at_ms,
                metadata: row.metadata,
            })
            .collect();
        Ok(Response::new(pb::ListActivitiesResponse {
            activities,
            next_page_token,
            not_caught_up: None,
        }))
    }
}
