-- A small schema that proves migrations run against the private test server.
CREATE TABLE smoke_balances (
    account_id TEXT PRIMARY KEY,
    balance NUMERIC(39, 0) NOT NULL
);
