-- The read side's projections of the storage shards' event logs, in the schema `query`. Every
-- table here is derived from the events and can be rebuilt from them; docs/analyst-tables.md
-- describes each column.

-- Per shard, the last event seq applied to every table below (in the same SQL transaction).
CREATE TABLE projection_offsets (
    shard_id     integer PRIMARY KEY,
    applied_seq  bigint NOT NULL,
    -- Leader time of the last applied event.
    event_time   timestamptz,
    applied_at   timestamptz NOT NULL DEFAULT now()
);

-- Every event, raw (the protobuf wallet.auticuro.v1.Event) with its searchable fields.
CREATE TABLE ledger_events (
    shard_id     integer NOT NULL,
    seq          bigint NOT NULL,
    event_time   timestamptz NOT NULL,
    request_id   text NOT NULL,
    txn_id       text,
    kind         text NOT NULL,
    account_ids  text[] NOT NULL,
    payload      bytea NOT NULL,
    PRIMARY KEY (shard_id, seq)
);

-- The current state of every account. An account id names one account platform-wide, except
-- the clearing accounts (`sys:clearing:<currency>`), of which every shard has its own.
CREATE TABLE accounts (
    account_id   text NOT NULL,
    tenant_id    text NOT NULL,
    shard_id     integer NOT NULL,
    currency     text NOT NULL,
    scale        integer NOT NULL,
    state        text NOT NULL,
    balance      numeric NOT NULL,
    pending_out  numeric NOT NULL,
    pending_in   numeric NOT NULL,
    available    numeric NOT NULL,
    lower_limit  numeric,
    upper_limit  numeric,
    version      bigint NOT NULL,
    metadata     jsonb NOT NULL,
    seq          bigint NOT NULL,
    txn_id       text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (account_id, shard_id)
);
CREATE INDEX accounts_by_tenant ON accounts (tenant_id, currency);

-- Every version of every account: one row per event that changed it.
CREATE TABLE account_versions (
    account_id   text NOT NULL,
    version      bigint NOT NULL,
    shard_id     integer NOT NULL,
    seq          bigint NOT NULL,
    event_time   timestamptz NOT NULL,
    request_id   text NOT NULL,
    txn_id       text,
    state        text NOT NULL,
    balance      numeric NOT NULL,
    pending_out  numeric NOT NULL,
    pending_in   numeric NOT NULL,
    PRIMARY KEY (account_id, shard_id, version)
);
CREATE INDEX account_versions_by_seq ON account_versions (account_id, seq);
CREATE INDEX account_versions_by_time ON account_versions (account_id, event_time);

-- Transactions: coordinator transactions (reserve, then post or void on each shard) and the
-- single-shard atomic batches that carry a transaction id.
CREATE TABLE transactions (
    txn_id       text PRIMARY KEY,
    tenant_id    text NOT NULL,
    -- deposit, withdrawal, payment, or empty when the writer did not say.
    kind         text NOT NULL,
    -- pending (reserved somewhere), committed (posted somewhere) or aborted (voided somewhere).
    status       text NOT NULL,
    metadata     jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

-- The legs of each transaction, per shard, with their own state.
CREATE TABLE transaction_legs (
    txn_id       text NOT NULL,
    shard_id     integer NOT NULL,
    account_id   text NOT NULL,
    amount       numeric NOT NULL,
    currency     text NOT NULL,
    -- held, posted or voided.
    state        text NOT NULL,
    PRIMARY KEY (txn_id, account_id)
);
CREATE INDEX transaction_legs_by_account ON transaction_legs (account_id);

-- The user-facing feed: what happened to each account, in business terms.
CREATE TABLE activities (
    -- Deterministic: shard id, event seq and position, so a rebuild gives the same ids.
    activity_id              bigint PRIMARY KEY,
    account_id               text NOT NULL,
    tenant_id                text NOT NULL,
    -- deposit, withdrawal, payment_sent, payment_received, fee, hold, capture or void.
    kind                     text NOT NULL,
    -- Signed: negative when money left the account.
    amount                   numeric NOT NULL,
    currency                 text NOT NULL,
    txn_id                   text,
    counterparty_account_id  text,
    occurred_at              timestamptz NOT NULL,
    metadata                 jsonb NOT NULL
);
CREATE INDEX activities_by_account ON activities (account_id, occurred_at DESC, activity_id DESC);

-- Account hierarchies: a tree of nodes per tenant whose leaves are accounts.
CREATE TABLE hierarchy_nodes (
    node_id      text PRIMARY KEY,
    tenant_id    text NOT NULL,
    name         text NOT NULL,
    parent_id    text REFERENCES hierarchy_nodes (node_id),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hierarchy_nodes_by_parent ON hierarchy_nodes (tenant_id, parent_id);

CREATE TABLE hierarchy_accounts (
    account_id   text PRIMARY KEY,
    node_id      text NOT NULL REFERENCES hierarchy_nodes (node_id),
    tenant_id    text NOT NULL
);
CREATE INDEX hierarchy_accounts_by_node ON hierarchy_accounts (node_id);

-- Analytic views.
CREATE VIEW daily_volume AS
SELECT date_trunc('day', t.updated_at) AS day,
       l.currency,
       t.kind,
       count(DISTINCT t.txn_id) AS transactions,
       sum(l.amount) FILTER (WHERE l.amount > 0) AS volume
FROM transactions t
JOIN transaction_legs l ON l.txn_id = t.txn_id
WHERE t.status = 'committed' AND l.state = 'posted'
GROUP BY 1, 2, 3;

CREATE VIEW balances_per_currency AS
SELECT tenant_id,
       currency,
       count(*) AS accounts,
       sum(balance) AS balance,
       sum(pending_out) AS pending_out,
       sum(pending_in) AS pending_in
FROM accounts
GROUP BY tenant_id, currency;

-- A read-only role for analysts (roles are cluster-wide, so it may exist already).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'analyst') THEN
        CREATE ROLE analyst NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
GRANT USAGE ON SCHEMA query TO analyst;
GRANT SELECT ON ALL TABLES IN SCHEMA query TO analyst;
