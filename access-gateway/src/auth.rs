//! Who is calling: `Authorization: Bearer <api key>` resolved to a tenant and scopes, with a
//! short cache in front of Postgres and a per-key rate limit.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::problem::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    Write,
    /// Everything `read` and `write` allow, within the key's tenant.
    Admin,
    /// The platform's own status (`/v1/admin/cluster`), which is no tenant's data: for the
    /// platform's operators only, never implied by `admin`.
    Operator,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
            Scope::Operator => "operator",
        }
    }

    /// Scope names (`read`, `write`, `admin`, `operator`), each known.
    pub fn parse_all(names: &[String]) -> anyhow::Result<Vec<Scope>> {
        names
            .iter()
            .map(|name| Scope::parse(name).ok_or_else(|| anyhow::anyhow!("unknown scope {name:?}")))
            .collect()
    }

    pub fn parse(name: &str) -> Option<Scope> {
        match name {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            "operator" => Some(Scope::Operator),
            _ => None,
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant_id: String,
    pub key_id: String,
    pub scopes: Vec<Scope>,
}

impl Caller {
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        let implied = scope != Scope::Operator && self.scopes.contains(&Scope::Admin);
        if self.scopes.contains(&scope) || implied {
            Ok(())
        } else {
            Err(ApiError::Forbidden(scope.name()))
        }
    }
}

/// Tenant ids are part of ledger account ids, so they are short and plain.
pub fn valid_tenant_id(tenant_id: &str) -> bool {
    (1..=24).contains(&tenant_id.len())
        && tenant_id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// How long a key stays trusted without asking Postgres again: a revoked key stops working at
/// most this long after its revocation.
const KEY_CACHE_TTL: Duration = Duration::from_secs(5);
const KEY_CACHE_ENTRIES_MAX: usize = 10_000;

/// By the SHA-256 of the token, so the cache holds no secrets: the caller it names (`None`: it
/// names no live key) and when that was read.
type KeyCache = HashMap<[u8; 32], (Option<Caller>, Instant)>;

pub struct Authenticator {
    cache: Mutex<KeyCache>,
    limiter: DefaultKeyedRateLimiter<String>,
}

impl Authenticator {
    pub fn new(requests_per_second_max: NonZeroU32) -> Authenticator {
        Authenticator {
            cache: Mutex::default(),
            limiter: RateLimiter::keyed(Quota::per_second(requests_per_second_max)),
        }
    }

    async fn caller(&self, pool: &sqlx::PgPool, token: &str) -> Result<Caller, ApiError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self
            .cache
            .lock()
            .expect("no poisoned lock")
            .get(&digest)
            .filter(|(_, at)| at.elapsed() < KEY_CACHE_TTL)
            .map(|(caller, _)| caller.clone());
        let caller = match cached {
            Some(caller) => caller,
            None => {
                let caller = crate::store::authenticate(pool, token).await?;
                let mut cache = self.cache.lock().expect("no poisoned lock");
                if cache.len() >= KEY_CACHE_ENTRIES_MAX {
                    cache.clear();
                }
                cache.insert(digest, (caller.clone(), Instant::now()));
                caller
            }
        };
        let caller = caller.ok_or(ApiError::Unauthorized)?;
        self.limiter
            .check_key(&caller.key_id)
            .map_err(|_| ApiError::RateLimited)?;
        Ok(caller)
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Caller, ApiError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        state.authenticator.caller(&state.pool, token.trim()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(scopes: &[Scope]) -> Caller {
        Caller {
            tenant_id: "acme".into(),
            key_id: "k".into(),
            scopes: scopes.to_vec(),
        }
    }

    #[test]
    fn admin_implies_read_and_write_but_never_operator() {
        let admin = caller(&[Scope::Admin]);
        assert!(admin.require(Scope::Read).is_ok() && admin.require(Scope::Write).is_ok());
        assert!(admin.require(Scope::Operator).is_err());
        let operator = caller(&[Scope::Operator]);
        assert!(operator.require(Scope::Operator).is_ok());
        assert!(operator.require(Scope::Write).is_err());
        assert!(caller(&[Scope::Read]).require(Scope::Write).is_err());
        let names: Vec<String> = ["read", "write", "admin", "operator"]
            .map(String::from)
            .into();
        assert_eq!(
            Scope::parse_all(&names).unwrap(),
            [Scope::Read, Scope::Write, Scope::Admin, Scope::Operator]
        );
        assert!(Scope::parse_all(&["root".to_string()]).is_err());
    }
}
