//! The gateway's own Postgres tables: API keys (hashed) and idempotency records. Gateways share
//! them, so any replica replays any other's responses, and they survive restarts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use consensus::batch::{BatchLimits, Batcher};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::Row;

use crate::auth::{Caller, Scope};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects and brings the schema up to date.
///
/// Every connection plans each statement for its arguments (`plan_cache_mode`). The batched
/// statements join arrays of any length against tables that grow from empty, and a plan kept
/// from when they were small (a sequential scan) gets slower with every row.
pub async fn connect(database_url: &str) -> anyhow::Result<PgPool> {
    let options: sqlx::postgres::PgConnectOptions = database_url.parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with(options.options([("plan_cache_mode", "force_custom_plan")]))
        .await?;
    MIGRATIONS.run(&pool).await?;
    Ok(pool)
}

/// A freshly issued key. The whole `token` is shown once and never stored.
pub struct IssuedKey {
    pub key_id: String,
    pub token: String,
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("the operating system provides randomness");
    hex::encode(buffer)
}

fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Issues a key for `tenant_id` with `scopes`; the token is `wk_<key id>_<secret>`.
pub async fn create_key(
    pool: &PgPool,
    tenant_id: &str,
    scopes: &[Scope],
) -> anyhow::Result<IssuedKey> {
    anyhow::ensure!(
        crate::auth::valid_tenant_id(tenant_id),
        "a tenant id is 1 to 24 characters of a-z, 0-9 and '-'"
    );
    anyhow::ensure!(!scopes.is_empty(), "a key needs at least one scope");
    let key_id = random_hex(8);
    let secret = random_hex(32);
    let scopes: Vec<String> = scopes
        .iter()
        .map(|scope| scope.name().to_string())
        .collect();
    sqlx::query(
        "INSERT INTO api_keys (key_id, tenant_id, secret_hash, scopes) VALUES ($1, $2, $3, $4)",
    )
    .bind(&key_id)
    .bind(tenant_id)
    .bind(secret_hash(&secret))
    .bind(&scopes)
    .execute(pool)
    .await?;
    Ok(IssuedKey {
        token: format!("wk_{key_id}_{secret}"),
        key_id,
    })
}

/// Revokes a key; returns false when there is no such (unrevoked) key.
pub async fn revoke_key(pool: &PgPool, key_id: &str) -> anyhow::Result<bool> {
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The caller a token belongs to, when the token is a live key.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<Caller>, sqlx::Error> {
    let Some((key_id, secret)) = token
        .strip_prefix("wk_")
        .and_then(|rest| rest.split_once('_'))
    else {
        return Ok(None);
    };
    let row = sqlx::query(
        "SELECT tenant_id, secret_hash, scopes FROM api_keys \
         WHERE key_id = $1 AND revoked_at IS NULL",
    )
    .bind(key_id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: Vec<u8> = row.get("secret_hash");
    if !constant_time_equal(&stored, &secret_hash(secret)) {
        return Ok(None);
    }
    let scopes: Vec<String> = row.get("scopes");
    Ok(Some(Caller {
        tenant_id: row.get("tenant_id"),
        key_id: key_id.to_string(),
        scopes: scopes
            .iter()
            .filter_map(|name| Scope::parse(name))
            .collect(),
    }))
}

fn constant_time_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where a request with an idempotency key stands.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// First time, or a retry of one that never got a final answer: go ahead (again), routing to
    /// the coordinator shard recorded here (if any).
    Proceed { coordinator_shard_id: Option<u32> },
    /// Answered before: replay this.
    Replay { status_code: u16, response: Value },
    /// The key was used for a different request.
    Mismatch,
}

pub struct NewClaim {
    pub tenant_id: String,
    pub idempotency_key: String,
    pub request_hash: [u8; 32],
    pub txn_id: Option<String>,
    pub coordinator_shard_id: Option<u32>,
}

/// The final response of a claimed key.
pub struct Completion {
    pub tenant_id: String,
    pub idempotency_key: String,
    pub status_code: u16,
    pub response: Value,
}

/// A failed statement: the same for every request of its batch.
pub type Failed = Arc<sqlx::Error>;

/// Idempotency records, claimed and completed in batches ([`consensus::batch`]): each batch is one
/// statement and one commit.
pub struct Records {
    claims: Batcher<NewClaim, Result<Claim, Failed>>,
    completions: Batcher<Completion, Result<(), Failed>>,
}

/// Statements of each kind in flight at once: one, so that the next batch gathers while it runs
/// (`bench-gateway`, one run each: 1,560 payments/s with one, 1,354/s with four).
const BATCHES_IN_FLIGHT_MAX: usize = 1;
const BATCH_ROWS_MAX: usize = 256;

impl Records {
    /// Must be called in a Tokio runtime.
    pub fn start(pool: PgPool) -> Records {
        let claims_pool = pool.clone();
        let limits = BatchLimits::unwindowed(BATCHES_IN_FLIGHT_MAX, BATCH_ROWS_MAX);
        let claims = Batcher::start(limits, move |claims| {
            let pool = claims_pool.clone();
            async move {
                let count = claims.len();
                match claim_all(&pool, &claims).await {
                    Ok(answers) => answers.into_iter().map(Ok).collect(),
                    Err(error) => {
                        let failed = Arc::new(error);
                        (0..count).map(|_| Err(Arc::clone(&failed))).collect()
                    }
                }
            }
        });
        let completions = Batcher::start(limits, move |done| {
            let pool = pool.clone();
            async move {
                let answer = complete_all(&pool, &done).await.map_err(Arc::new);
                vec![answer; done.len()]
            }
        });
        Records {
            claims,
            completions,
        }
    }

    /// Records the key (first caller wins) and says how to go on.
    pub async fn claim(&self, claim: NewClaim) -> Result<Claim, Failed> {
        self.claims.submit(claim).await.unwrap_or_else(stopped)
    }

    /// Stores the final response of a claimed key (the first final answer wins).
    pub async fn complete(&self, completion: Completion) -> Result<(), Failed> {
        self.completions
            .submit(completion)
            .await
            .unwrap_or_else(stopped)
    }
}

/// The batch task is gone (it ends only when its queue does).
fn stopped<T>() -> Result<T, Failed> {
    Err(Arc::new(sqlx::Error::WorkerCrashed))
}

/// Claims keys with one statement: the first claim of each key inserts it, and every claim
/// whose key was there already (before the batch, or earlier in it) is answered from its row,
/// read by a second statement.
async fn claim_all(pool: &PgPool, claims: &[NewClaim]) -> Result<Vec<Claim>, sqlx::Error> {
    // The first claim of each key in the batch is the one that may insert it.
    let mut seen = HashSet::new();
    let first: Vec<bool> = claims
        .iter()
        .map(|claim| seen.insert((&claim.tenant_id, &claim.idempotency_key)))
        .collect();
    let new: Vec<&NewClaim> = claims
        .iter()
        .zip(&first)
        .filter_map(|(claim, first)| first.then_some(claim))
        .collect();
    let inserted: HashSet<(String, String)> = sqlx::query_as(
        "INSERT INTO idempotency_keys \
         (tenant_id, idempotency_key, request_hash, txn_id, coordinator_shard_id) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::integer[]) \
         ON CONFLICT DO NOTHING RETURNING tenant_id, idempotency_key",
    )
    .bind(
        new.iter()
            .map(|claim| claim.tenant_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        new.iter()
            .map(|claim| claim.idempotency_key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        new.iter()
            .map(|claim| &claim.request_hash[..])
            .collect::<Vec<_>>(),
    )
    .bind(
        new.iter()
            .map(|claim| claim.txn_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        new.iter()
            .map(|claim| claim.coordinator_shard_id.map(|id| id as i32))
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    // Each key inserted now proceeds with its first claim; every other claim reads the row.
    let fresh: Vec<bool> = claims
        .iter()
        .zip(first)
        .map(|(claim, first)| {
            first && inserted.contains(&(claim.tenant_id.clone(), claim.idempotency_key.clone()))
        })
        .collect();
    let known = claims.iter().zip(&fresh).filter(|(_, fresh)| !**fresh);
    let rows = if fresh.iter().all(|fresh| *fresh) {
        HashMap::new()
    } else {
        recorded(pool, known.map(|(claim, _)| claim)).await?
    };
    claims
        .iter()
        .zip(fresh)
        .map(|(claim, fresh)| {
            if fresh {
                return Ok(Claim::Proceed {
                    coordinator_shard_id: claim.coordinator_shard_id,
                });
            }
            let key = (claim.tenant_id.clone(), claim.idempotency_key.clone());
            let row = rows.get(&key).ok_or(sqlx::Error::RowNotFound)?;
            Ok(row.answer(&claim.request_hash))
        })
        .collect()
}

/// A key's row as a later claim finds it.
struct Recorded {
    request_hash: Vec<u8>,
    coordinator_shard_id: Option<i32>,
    status_code: Option<i32>,
    response: Option<Value>,
}

impl Recorded {
    fn answer(&self, request_hash: &[u8; 32]) -> Claim {
        if self.request_hash != request_hash[..] {
            return Claim::Mismatch;
        }
        match (self.status_code, &self.response) {
            (Some(status_code), Some(response)) => Claim::Replay {
                status_code: u16::try_from(status_code).unwrap_or(500),
                response: response.clone(),
            },
            _ => Claim::Proceed {
                coordinator_shard_id: self.coordinator_shard_id.map(|id| id as u32),
            },
        }
    }
}

/// The rows of the claims' keys, by (tenant, key).
async fn recorded(
    pool: &PgPool,
    claims: impl Iterator<Item = &NewClaim> + Clone,
) -> Result<HashMap<(String, String), Recorded>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT tenant_id, idempotency_key, request_hash, coordinator_shard_id, status_code, \
         response FROM idempotency_keys \
         WHERE (tenant_id, idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(
        claims
            .clone()
            .map(|claim| claim.tenant_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        claims
            .map(|claim| claim.idempotency_key.as_str())
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let key = (row.get("tenant_id"), row.get("idempotency_key"));
            let recorded = Recorded {
                request_hash: row.get("request_hash"),
                coordinator_shard_id: row.get("coordinator_shard_id"),
                status_code: row.get("status_code"),
                response: row.get("response"),
            };
            (key, recorded)
        })
        .collect())
}

/// Stores final responses with one statement; a key already answered keeps its answer.
async fn complete_all(pool: &PgPool, completions: &[Completion]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys AS k \
         SET status_code = done.status_code, response = done.response, completed_at = now() \
         FROM unnest($1::text[], $2::text[], $3::integer[], $4::jsonb[]) \
         AS done (tenant_id, idempotency_key, status_code, response) \
         WHERE k.tenant_id = done.tenant_id AND k.idempotency_key = done.idempotency_key \
         AND k.status_code IS NULL",
    )
    .bind(
        completions
            .iter()
            .map(|done| done.tenant_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        completions
            .iter()
            .map(|done| done.idempotency_key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        completions
            .iter()
            .map(|done| i32::from(done.status_code))
            .collect::<Vec<_>>(),
    )
    .bind(
        completions
            .iter()
            .map(|done| &done.response)
            .collect::<Vec<_>>(),
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The coordinator shard of one of the tenant's transactions; `None` when the tenant has no
/// such transaction (or it belongs to another tenant).
pub async fn transaction_route(
    pool: &PgPool,
    tenant_id: &str,
    txn_id: &str,
) -> Result<Option<u32>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT coordinator_shard_id FROM idempotency_keys \
         WHERE tenant_id = $1 AND txn_id = $2 AND coordinator_shard_id IS NOT NULL LIMIT 1",
    )
    .bind(tenant_id)
    .bind(txn_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| row.get::<i32, _>("coordinator_shard_id") as u32))
}

/// Moves a key's unanswered transaction to another coordinator shard (its first one was
/// draining and had never begun it).
pub async fn reroute(
    pool: &PgPool,
    tenant_id: &str,
    idempotency_key: &str,
    coordinator_shard_id: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys SET coordinator_shard_id = $3 \
         WHERE tenant_id = $1 AND idempotency_key = $2 AND status_code IS NULL",
    )
    .bind(tenant_id)
    .bind(idempotency_key)
    .bind(coordinator_shard_id as i32)
    .execute(pool)
    .await?;
    Ok(())
}
