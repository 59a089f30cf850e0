-- API keys: only a hash of the secret is kept; each key belongs to one tenant.
CREATE TABLE api_keys (
    key_id      text PRIMARY KEY,
    tenant_id   text NOT NULL,
    secret_hash bytea NOT NULL,
    scopes      text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- One row per (tenant, Idempotency-Key): the request's fingerprint, where its transaction went,
-- and, once final, the response every retry replays.
CREATE TABLE idempotency_keys (
    tenant_id            text NOT NULL,
    idempotency_key      text NOT NULL,
    request_hash         bytea NOT NULL,
    txn_id               text,
    coordinator_shard_id integer,
    status_code          integer,
    response             jsonb,
    created_at           timestamptz NOT NULL DEFAULT now(),
    completed_at         timestamptz,
    PRIMARY KEY (tenant_id, idempotency_key)
);

CREATE INDEX idempotency_keys_by_transaction ON idempotency_keys (tenant_id, txn_id)
    WHERE txn_id IS NOT NULL;
