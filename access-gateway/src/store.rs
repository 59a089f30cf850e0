//! The gateway's own Postgres tables: API keys (hashed) and idempotency records. Gateways share
//! them, so any replica replays any other's responses, and they survive restarts.

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::Row;

use crate::auth::{Caller, Scope};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects and brings the schema up to date.
pub async fn connect(database_url: &str) -> anyhow::Result<PgPool> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(database_url)
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
pub enum Claim {
    /// First time, or a retry of one that never got a final answer: go ahead (again), routing to
    /// the coordinator shard recorded here (if any).
    Proceed { coordinator_shard_id: Option<u32> },
    /// Answered before: replay this.
    Replay { status_code: u16, response: Value },
    /// The key was used for a different request.
    Mismatch,
}

pub struct NewClaim<'a> {
    pub tenant_id: &'a str,
    pub idempotency_key: &'a str,
    pub request_hash: &'a [u8; 32],
    pub txn_id: Option<&'a str>,
    pub coordinator_shard_id: Option<u32>,
}

/// Records the key (first caller wins) and says how to go on.
pub async fn claim(pool: &PgPool, new: &NewClaim<'_>) -> Result<Claim, sqlx::Error> {
    let coordinator = new.coordinator_shard_id.map(|id| id as i32);
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys \
         (tenant_id, idempotency_key, request_hash, txn_id, coordinator_shard_id) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(new.tenant_id)
    .bind(new.idempotency_key)
    .bind(&new.request_hash[..])
    .bind(new.txn_id)
    .bind(coordinator)
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Claim::Proceed {
            coordinator_shard_id: new.coordinator_shard_id,
        });
    }
    let row = sqlx::query(
        "SELECT request_hash, coordinator_shard_id, status_code, response \
         FROM idempotency_keys WHERE tenant_id = $1 AND idempotency_key = $2",
    )
    .bind(new.tenant_id)
    .bind(new.idempotency_key)
    .fetch_one(pool)
    .await?;
    let stored_hash: Vec<u8> = row.get("request_hash");
    if stored_hash != new.request_hash[..] {
        return Ok(Claim::Mismatch);
    }
    let status_code: Option<i32> = row.get("status_code");
    let response: Option<Value> = row.get("response");
    Ok(match (status_code, response) {
        (Some(status_code), Some(response)) => Claim::Replay {
            status_code: u16::try_from(status_code).unwrap_or(500),
            response,
        },
        _ => Claim::Proceed {
            coordinator_shard_id: row
                .get::<Option<i32>, _>("coordinator_shard_id")
                .map(|id| id as u32),
        },
    })
}

/// Stores the final response of a claimed key (the first final answer wins).
pub async fn complete(
    pool: &PgPool,
    tenant_id: &str,
    idempotency_key: &str,
    status_code: u16,
    response: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys SET status_code = $3, response = $4, completed_at = now() \
         WHERE tenant_id = $1 AND idempotency_key = $2 AND status_code IS NULL",
    )
    .bind(tenant_id)
    .bind(idempotency_key)
    .bind(i32::from(status_code))
    .bind(response)
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
