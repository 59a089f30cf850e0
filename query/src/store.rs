//! The projections in Postgres: writing a batch of events in one SQL transaction together with
//! the per-shard applied seq, and the reads the query service answers from.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proto::auticuro::v1 as pb;
use proto::auticuro::v1::command::Kind;
use proto::common::v1::Amount;
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use auticuro::convert::state_name;

use crate::activity::{self, Activity, ActivityKind};
use crate::connector::Received;
use crate::copy::{self, CopyRows, Target};

mod transactions;

use transactions::{HeldLegs, Transactions};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("migrating: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Another writer moved the shard's projection since this one read it.
    #[error("shard {shard_id} is projected up to seq {applied}, the batch starts at {first}")]
    Moved {
        shard_id: u32,
        applied: u64,
        first: u64,
    },
    #[error("the target projection is not empty: a rebuild needs an empty database")]
    NotEmpty,
    #[error("a bulk load was dropped before it finished")]
    Unfinished,
    #[error("event {seq} of shard {shard_id} is malformed: {reason}")]
    Malformed {
        shard_id: u32,
        seq: u64,
        reason: &'static str,
    },
}

/// The Postgres schema of every projection table, so the read side can share a database with
/// the gateway's tables (and their migrations) without mixing with them.
pub const SCHEMA: &str = "query";

/// Connects (every connection with `search_path` = [`SCHEMA`]) and brings the tables up to date.
pub async fn connect(database_url: &str) -> Result<PgPool, StoreError> {
    let options: sqlx::postgres::PgConnectOptions = database_url.parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with(options.options([("search_path", SCHEMA)]))
        .await?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS query")
        .execute(&pool)
        .await?;
    MIGRATIONS.run(&pool).await?;
    Ok(pool)
}

/// The accounts of a tenant whose metadata has `key` = `value`, by id (at most `limit`).
pub async fn accounts_with(
    pool: &PgPool,
    tenant_id: &str,
    key: &str,
    value: &str,
    limit: i64,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT account_id FROM accounts WHERE tenant_id = $1 AND metadata ->> $2 = $3
         ORDER BY account_id LIMIT $4",
    )
    .bind(tenant_id)
    .bind(key)
    .bind(value)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A table's indexes (primary key and unique constraints included) while a load into the table
/// runs without them: building an index once from all its rows is several times cheaper than
/// updating it row by row. Dropped and built again in the load's own SQL transaction, so a
/// load that fails leaves the table as it was, indexes and all.
#[must_use = "the dropped indexes must be built again"]
pub struct Indexes {
    /// The statements that build them again, primary key and unique constraints first.
    statements: Vec<String>,
}

impl Indexes {
    /// Drops the indexes of `table` (in [`SCHEMA`]) in the transaction `conn` is in.
    ///
    /// Locks the table first, as the drops would: a load's transactions then wait for the ones
    /// of a load dropped just before (whose tasks may still be rolling back) instead of
    /// deadlocking with them over rows both touch before dropping indexes.
    pub async fn drop(conn: &mut PgConnection, table: &str) -> Result<Indexes, StoreError> {
        let lock = format!("LOCK TABLE {SCHEMA}.{table} IN ACCESS EXCLUSIVE MODE");
        sqlx::query(sqlx::AssertSqlSafe(lock))
            .execute(&mut *conn)
            .await?;
        let constraints: Vec<(String, String)> = sqlx::query_as(
            "SELECT format('ALTER TABLE %I.%I DROP CONSTRAINT %I', n.nspname, t.relname, c.conname),
                    format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', n.nspname, t.relname,
                           c.conname, pg_get_constraintdef(c.oid))
             FROM pg_constraint c
             JOIN pg_class t ON t.oid = c.conrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = $1 AND t.relname = $2 AND c.contype IN ('p', 'u')",
        )
        .bind(SCHEMA)
        .bind(table)
        .fetch_all(&mut *conn)
        .await?;
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT format('DROP INDEX %I.%I', i.schemaname, i.indexname), i.indexdef
             FROM pg_indexes i
             WHERE i.schemaname = $1 AND i.tablename = $2
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                               WHERE c.conindid = format('%I.%I', i.schemaname, i.indexname)::regclass)",
        )
        .bind(SCHEMA)
        .bind(table)
        .fetch_all(&mut *conn)
        .await?;
        for (drop, _) in indexes.iter().chain(&constraints) {
            sqlx::query(sqlx::AssertSqlSafe(drop.as_str()))
                .execute(&mut *conn)
                .await?;
        }
        let statements = constraints.into_iter().chain(indexes);
        Ok(Indexes {
            statements: statements.map(|(_, build)| build).collect(),
        })
    }

    /// Builds them again, without parallel workers: the tables of a bulk load build theirs one
    /// per core at a time, each on its own connection.
    pub async fn build(self, conn: &mut PgConnection) -> Result<(), StoreError> {
        if self.statements.is_empty() {
            return Ok(());
        }
        sqlx::raw_sql(
            "SET LOCAL maintenance_work_mem = '128MB';
             SET LOCAL max_parallel_maintenance_workers = 0",
        )
        .execute(&mut *conn)
        .await?;
        for statement in self.statements {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// Fails with [`StoreError::NotEmpty`] unless nothing has been projected here: no applied seq
/// and no event (a rebuild killed while its tables committed, one after another at the end,
/// leaves events without applied seqs).
pub async fn ensure_empty(conn: &mut PgConnection) -> Result<(), StoreError> {
    let empty: bool = sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT FROM projection_offsets)
            AND NOT EXISTS (SELECT FROM ledger_events)",
    )
    .fetch_one(conn)
    .await?;
    match empty {
        true => Ok(()),
        false => Err(StoreError::NotEmpty),
    }
}

/// The last applied seq of every shard projected so far.
pub async fn applied_seqs(pool: &PgPool) -> Result<BTreeMap<u32, u64>, StoreError> {
    let rows = sqlx::query("SELECT shard_id, applied_seq FROM projection_offsets")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<i32, _>(0) as u32, row.get::<i64, _>(1) as u64))
        .collect())
}

/// The tenant of an account id `<tenant>/<name>`; empty for ids without one.
pub fn tenant_of(account_id: &str) -> &str {
    account_id.split_once('/').map_or("", |(tenant, _)| tenant)
}

fn minor(amount: &Option<Amount>) -> &str {
    amount.as_ref().map_or("0", |a| a.minor_units.as_str())
}

fn state_value(name: &str) -> i32 {
    (match name {
        "active" => pb::AccountState::Active,
        "frozen" => pb::AccountState::Frozen,
        "closed" => pb::AccountState::Closed,
        _ => pb::AccountState::Unspecified,
    }) as i32
}

fn command_name(kind: &Option<Kind>) -> &'static str {
    match kind {
        Some(Kind::CreateAccount(_)) => "create_account",
        Some(Kind::UpdateLimits(_)) => "update_limits",
        Some(Kind::Freeze(_)) => "freeze",
        Some(Kind::Unfreeze(_)) => "unfreeze",
        Some(Kind::Close(_)) => "close",
        Some(Kind::Transfer(_)) => "transfer",
        Some(Kind::Batch(_)) => "batch",
        Some(Kind::Reserve(_)) => "reserve",
        Some(Kind::Post(_)) => "post",
        Some(Kind::Void(_)) => "void",
        Some(Kind::PruneDedup(_)) => "prune_dedup",
        Some(Kind::FenceCoordinator(_)) => "fence_coordinator",
        Some(Kind::PlaceHold(_)) => "place_hold",
        Some(Kind::VoidHold(_)) => "void_hold",
        None => "unknown",
    }
}

fn metadata_json(metadata: &BTreeMap<String, String>) -> String {
    serde_json::to_string(metadata).expect("string maps always serialize")
}

/// A deterministic activity id: shard, seq and position within the event (a rebuild gives the
/// same ids, and ids grow with seq within a shard).
fn activity_id(shard_id: u32, seq: u64, position: usize) -> i64 {
    ((u64::from(shard_id) << 53) | (seq << 10) | position as u64) as i64
}

/// A leg of money that moved: account, signed amount, currency.
type Movement = (String, i128, String);

/// Rows of one batch, gathered per table and written with one statement per table.
#[derive(Default)]
struct Rows {
    append: AppendRows,
    accounts: BatchAccounts,
}

/// Where the newest state of each account of a batch is, by shard and account id: an account
/// changes in many events of a batch, and only its last state is written.
#[derive(Default)]
struct BatchAccounts(BTreeMap<u32, HashMap<String, Newest>>);

/// The newest state of an account in a batch: the event's place in the batch and the account's
/// among the event's, and the time of the account's first event in the batch.
struct Newest {
    event: usize,
    account: usize,
    created_ms: i64,
}

/// A batch's rows of the tables the projector only appends to: no later batch depends on them,
/// so each is written with one `COPY` (a bulk load streams them: [`BulkLoad`]).
#[derive(Default)]
struct AppendRows {
    /// `ledger_events`, in the order of [`EVENT_COLUMNS`].
    events: CopyRows,
    /// `account_versions`, in the order of [`VERSION_COLUMNS`].
    versions: CopyRows,
    activities: ActivityRows,
}

/// The last state of each account in one or more batches, by (account id, shard id).
#[derive(Default)]
struct AccountStates(BTreeMap<(String, u32), AccountRow>);

const EVENT_COLUMNS: Target = Target {
    table: "ledger_events",
    columns: "(shard_id, seq, event_time, request_id, txn_id, kind, account_ids, payload)",
};
const VERSION_COLUMNS: Target = Target {
    table: "account_versions",
    columns: "(account_id, version, shard_id, seq, event_time, request_id, txn_id, state, \
              balance, pending_out, pending_in)",
};
const ACTIVITY_COLUMNS: Target = Target {
    table: "activities",
    columns: "(activity_id, account_id, tenant_id, kind, amount, currency, txn_id, \
              counterparty_account_id, occurred_at, metadata)",
};

struct AccountRow {
    shard_id: u32,
    seq: u64,
    time_ms: i64,
    created_ms: i64,
    txn_id: Option<String>,
    account: pb::Account,
}

#[derive(Default)]
struct ActivityRows {
    /// In the order of [`ACTIVITY_COLUMNS`].
    rows: CopyRows,
    /// The event of the last activity and its position in it.
    last: Option<(u32, u64, usize)>,
}

impl ActivityRows {
    /// The activities of money that moved in `event`, one currency at a time (a batch may
    /// move several), numbered in order within the event.
    fn add(
        &mut self,
        event: &pb::Event,
        time_ms: i64,
        metadata: &BTreeMap<String, String>,
        legs: &[Movement],
    ) {
        let mut currencies: Vec<&str> = Vec::new();
        for (_, _, currency) in legs {
            if !currencies.contains(&currency.as_str()) {
                currencies.push(currency);
            }
        }
        let found: Vec<(Activity, String)> = currencies
            .into_iter()
            .flat_map(|currency| {
                let legs: Vec<(String, i128)> = legs
                    .iter()
                    .filter(|(_, _, c)| c == currency)
                    .map(|(account, amount, _)| (account.clone(), *amount))
                    .collect();
                activity::activities(metadata, &legs)
                    .into_iter()
                    .map(move |found| (found, currency.to_string()))
            })
            .collect();
        self.push(event, time_ms, metadata, found);
    }

    /// Activities of a hold (placed or released): each leg of the hold as `kind`, its amount
    /// signed as `available` moved.
    fn add_hold(
        &mut self,
        event: &pb::Event,
        time_ms: i64,
        metadata: &BTreeMap<String, String>,
        legs: &[Movement],
        kind: ActivityKind,
        sign: i128,
    ) {
        let found = legs
            .iter()
            .map(|(account, amount, currency)| {
                let activity = Activity {
                    account_id: account.clone(),
                    kind,
                    amount: sign * amount.abs(),
                    counterparty: None,
                };
                (activity, currency.clone())
            })
            .collect();
        self.push(event, time_ms, metadata, found);
    }

    fn push(
        &mut self,
        event: &pb::Event,
        time_ms: i64,
        metadata: &BTreeMap<String, String>,
        found: Vec<(Activity, String)>,
    ) {
        let visible = activity::visible(metadata);
        for (found, currency) in found {
            let position = match &mut self.last {
                Some((shard_id, seq, position))
                    if (*shard_id, *seq) == (event.shard_id, event.seq) =>
                {
                    *position += 1;
                    *position
                }
                last => {
                    *last = Some((event.shard_id, event.seq, 0));
                    0
                }
            };
            self.rows
                .int8(activity_id(event.shard_id, event.seq, position))
                .text(&found.account_id)
                .text(tenant_of(&found.account_id))
                .text(found.kind.name())
                .numeric(found.amount)
                .text(&currency)
                .optional(Some(event.txn_id.as_str()).filter(|t| !t.is_empty()))
                .optional(found.counterparty.as_deref())
                .timestamp(time_ms)
                .jsonb(&metadata_json(&visible))
                .end_row();
        }
    }
}

/// A batch of events with every row that follows from the events alone, ready for [`write`].
/// Rows are built as events are pushed (CPU only), so the projector prepares the next batch
/// while the previous one is written.
#[derive(Default)]
pub struct Prepared {
    events: Vec<pb::Event>,
    rows: Rows,
}

impl Prepared {
    /// Takes in an event and the bytes it arrived in (`ledger_events.payload`).
    pub fn push(&mut self, event: Received<pb::Event>) -> Result<(), StoreError> {
        event_rows(
            &mut self.rows,
            self.events.len(),
            &event.message,
            &event.encoded,
        )?;
        self.events.push(event.message);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Writes a prepared batch (per shard contiguous, in seq order, each shard's first event right
/// after its applied seq) and the new applied seqs, all in one SQL transaction. A transaction's
/// row does not depend on the order in which its shards' events are projected, so a rebuild
/// gives the same row. Returns the batch's events.
pub async fn write(pool: &PgPool, prepared: Prepared) -> Result<Vec<pb::Event>, StoreError> {
    if prepared.is_empty() {
        return Ok(prepared.events);
    }
    let Prepared { events, mut rows } = prepared;
    let mut offsets = Offsets::default();
    offsets.add(&events);
    let mut tx = begin(pool).await?;
    let shard_ids = offsets.advance(&mut tx).await?;
    let mut transactions = Transactions::load(&mut tx, &events, &shard_ids).await?;
    for event in &events {
        transactions.apply(&mut rows.append.activities, event)?;
    }
    transactions.write(&mut tx).await?;
    rows.append.copy(&mut tx).await?;
    rows.accounts.states(&events).upsert(&mut tx).await?;
    tx.commit().await?;
    Ok(events)
}

/// A transaction for projection writes. The projection is derived data: a commit lost in a
/// Postgres crash takes its offsets with it (the transaction stays atomic), and the events are
/// projected again from there. So it does not wait for the flush to disk.
async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Per shard, the first and the last seq of a run of events, and the last one's time.
#[derive(Default)]
struct Offsets(BTreeMap<u32, (u64, u64, i64)>);

impl Offsets {
    /// Takes in the events that follow (each shard's in seq order).
    fn add(&mut self, events: &[pb::Event]) {
        for event in events {
            let entry =
                self.0
                    .entry(event.shard_id)
                    .or_insert((event.seq, event.seq, event.timestamp_ms));
            entry.1 = event.seq;
            entry.2 = event.timestamp_ms;
        }
    }

    /// Checks that every shard's run starts right after its applied seq and moves the applied
    /// seqs to the runs' last events; returns the shard ids.
    async fn advance(
        &self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<Vec<i32>, StoreError> {
        let shard_ids: Vec<i32> = self.0.keys().map(|id| *id as i32).collect();
        sqlx::query(
            "INSERT INTO projection_offsets (shard_id, applied_seq)
             SELECT unnest($1::int[]), 0 ON CONFLICT DO NOTHING",
        )
        .bind(&shard_ids)
        .execute(&mut **tx)
        .await?;
        let applied = sqlx::query(
            "SELECT shard_id, applied_seq FROM projection_offsets WHERE shard_id = ANY($1) FOR UPDATE",
        )
        .bind(&shard_ids)
        .fetch_all(&mut **tx)
        .await?;
        for row in applied {
            let shard_id = row.get::<i32, _>(0) as u32;
            let applied = row.get::<i64, _>(1) as u64;
            let first = self.0[&shard_id].0;
            if first != applied + 1 {
                return Err(StoreError::Moved {
                    shard_id,
                    applied,
                    first,
                });
            }
        }
        for (shard_id, (_, last, time_ms)) in &self.0 {
            sqlx::query(
                "UPDATE projection_offsets SET applied_seq = $2,
                     event_time = timestamptz 'epoch' + $3 * interval '1 millisecond',
                     applied_at = now()
                 WHERE shard_id = $1",
            )
            .bind(*shard_id as i32)
            .bind(*last as i64)
            .bind(*time_ms)
            .execute(&mut **tx)
            .await?;
        }
        Ok(shard_ids)
    }
}

fn malformed(event: &pb::Event, reason: &'static str) -> StoreError {
    StoreError::Malformed {
        shard_id: event.shard_id,
        seq: event.seq,
        reason,
    }
}

/// The event's leader time, in milliseconds after the Unix epoch.
fn event_time(event: &pb::Event) -> Result<i64, StoreError> {
    copy::timestamp_in_range(event.timestamp_ms)
        .then_some(event.timestamp_ms)
        .ok_or(malformed(event, "timestamp out of range"))
}

/// An amount of the event in minor units.
fn units(event: &pb::Event, amount: &Option<Amount>) -> Result<i128, StoreError> {
    minor(amount)
        .parse()
        .map_err(|_| malformed(event, "malformed amount"))
}

/// Gathers the rows that follow from one event alone.
/// (`index`: the event's place in the batch.)
fn event_rows(
    rows: &mut Rows,
    index: usize,
    event: &pb::Event,
    encoded: &[u8],
) -> Result<(), StoreError> {
    let command = event
        .command
        .as_ref()
        .ok_or(malformed(event, "no command"))?;
    let time = event_time(event)?;
    let txn_id = Some(event.txn_id.as_str()).filter(|t| !t.is_empty());
    rows.append
        .events
        .int4(event.shard_id as i32)
        .int8(event.seq as i64)
        .timestamp(time)
        .text(&event.request_id)
        .optional(txn_id)
        .text(command_name(&command.kind))
        .text_array(event.accounts.iter().map(|a| a.account_id.as_str()))
        .bytes(encoded)
        .end_row();

    let batch_accounts = rows.accounts.0.entry(event.shard_id).or_default();
    for (position, account) in event.accounts.iter().enumerate() {
        rows.append
            .versions
            .text(&account.account_id)
            .int8(account.version as i64)
            .int4(event.shard_id as i32)
            .int8(event.seq as i64)
            .timestamp(time)
            .text(&event.request_id)
            .optional(txn_id)
            .text(state_name(account.state))
            .numeric(units(event, &account.balance)?)
            .numeric(units(event, &account.pending_out)?)
            .numeric(units(event, &account.pending_in)?)
            .end_row();
        match batch_accounts.get_mut(&account.account_id) {
            Some(newest) => (newest.event, newest.account) = (index, position),
            None => {
                let newest = Newest {
                    event: index,
                    account: position,
                    created_ms: event.timestamp_ms,
                };
                batch_accounts.insert(account.account_id.clone(), newest);
            }
        }
    }

    match &command.kind {
        Some(Kind::Transfer(transfer)) => {
            let amount = units(event, &transfer.amount)?;
            let legs = [
                (
                    transfer.from_account_id.clone(),
                    -amount,
                    transfer.currency.clone(),
                ),
                (
                    transfer.to_account_id.clone(),
                    amount,
                    transfer.currency.clone(),
                ),
            ];
            rows.append
                .activities
                .add(event, time, &transfer.metadata, &legs);
        }
        Some(Kind::Batch(batch)) => {
            rows.append.activities.add(
                event,
                time,
                &batch.metadata,
                &leg_values(event, &batch.legs)?,
            );
        }
        Some(Kind::PlaceHold(hold)) => {
            let legs = leg_values(event, std::slice::from_ref(&hold_leg(hold)))?;
            rows.append.activities.add_hold(
                event,
                time,
                &hold.metadata,
                &legs,
                ActivityKind::Hold,
                -1,
            );
        }
        _ => {}
    }
    Ok(())
}

/// The hold's one leg: the authorized amount out of the wallet.
fn hold_leg(hold: &pb::PlaceHold) -> pb::Leg {
    pb::Leg {
        account_id: hold.account_id.clone(),
        amount: Some(Amount {
            minor_units: format!("-{}", minor(&hold.amount)),
        }),
        currency: hold.currency.clone(),
    }
}

fn leg_values(event: &pb::Event, legs: &[pb::Leg]) -> Result<Vec<Movement>, StoreError> {
    legs.iter()
        .map(|leg| {
            let amount = units(event, &leg.amount)?;
            Ok((leg.account_id.clone(), amount, leg.currency.clone()))
        })
        .collect()
}

impl AppendRows {
    async fn copy(self, tx: &mut Transaction<'static, Postgres>) -> Result<(), StoreError> {
        self.events.write(tx, &EVENT_COLUMNS).await?;
        self.versions.write(tx, &VERSION_COLUMNS).await?;
        self.activities.rows.write(tx, &ACTIVITY_COLUMNS).await?;
        Ok(())
    }
}

/// A bulk load into a fresh database (a rebuild): dropped before it finishes, it changes
/// nothing. The batches have no SQL transactions of their own ([`BulkLoad::write`]): their rows
/// go to one `COPY` per table, each on its own connection, in one transaction running for the
/// whole load that drops the table's indexes first and builds them again once its rows are in
/// ([`Indexes`]): the append-only tables, and the transactions and their legs once final.
/// Nothing is read back: the transactions that hold legs stay in memory from batch to batch
/// (`store::transactions`). The accounts' newest states and the applied seqs are written once,
/// at the end.
pub struct BulkLoad {
    offsets: Offsets,
    transactions: Transactions,
    accounts: AccountStates,
    events: CopyStream,
    versions: CopyStream,
    activities: CopyStream,
    legs: CopyStream,
    txns: CopyStream,
    parts: CopyStream,
}

/// Batches waiting for each table's `COPY`, at most.
const BATCHES_QUEUED: usize = 2;

/// One table's `COPY`, fed by a channel until it closes, with the table's indexes built at the end.
/// Its transaction builds the indexes and commits only when [`BulkLoad::finish`] sends it its
/// turn: a load dropped before it finishes (an error, a cancelled rebuild) rolls back and leaves
/// the table as it was.
struct CopyStream {
    batches: mpsc::Sender<CopyRows>,
    /// Its turn to build the indexes (one table per core at a time).
    commit: oneshot::Sender<OwnedSemaphorePermit>,
    copying: CopyTask,
}

type CopyTask = JoinHandle<Result<(), StoreError>>;

impl BulkLoad {
    pub async fn open(pool: &PgPool) -> Result<BulkLoad, StoreError> {
        let (transactions, held) = Transactions::kept(pool).await?;
        Ok(BulkLoad {
            offsets: Offsets::default(),
            transactions,
            accounts: AccountStates::default(),
            events: CopyStream::open(pool, &EVENT_COLUMNS, None),
            versions: CopyStream::open(pool, &VERSION_COLUMNS, None),
            activities: CopyStream::open(pool, &ACTIVITY_COLUMNS, None),
            legs: CopyStream::open(pool, &transactions::LEG_COLUMNS, Some(held)),
            txns: CopyStream::open(pool, &transactions::TXN_COLUMNS, None),
            parts: CopyStream::open(pool, &transactions::PART_COLUMNS, None),
        })
    }

    /// [`write`] for a bulk load: passes the rows on (waits while earlier batches are queued);
    /// the applied seqs move at the end ([`BulkLoad::finish`]). Returns the batch's events.
    pub async fn write(&mut self, prepared: Prepared) -> Result<Vec<pb::Event>, StoreError> {
        let Prepared { events, mut rows } = prepared;
        self.offsets.add(&events);
        for event in &events {
            self.transactions
                .apply(&mut rows.append.activities, event)?;
        }
        self.accounts.merge(rows.accounts.states(&events));
        self.send(rows.append, false).await?;
        Ok(events)
    }

    /// Writes what is left, ends the `COPY`s and commits them, then merges the parts of
    /// transaction rows and moves the applied seqs, and writes the accounts' states.
    pub async fn finish(mut self, pool: &PgPool) -> Result<(), StoreError> {
        self.send(AppendRows::default(), true).await?;
        // Every COPY ends at once. Then the tables build their indexes one per core at a time,
        // largest first. (All at once, the largest finished last, alone on one core.)
        let streams = [
            self.versions,
            self.activities,
            self.events,
            self.legs,
            self.txns,
            self.parts,
        ];
        let ending = streams.map(CopyStream::end);
        let builders = std::thread::available_parallelism().map_or(2, |cores| cores.get());
        let builders = Arc::new(Semaphore::new(builders));
        let mut copying = Vec::with_capacity(ending.len());
        for (commit, task) in ending {
            let turn = builders.clone().acquire_owned().await;
            // A task that ended already (an error) hands the turn back at once.
            let _ = commit.send(turn.expect("the semaphore is never closed"));
            copying.push(async { task.await.expect("a COPY task never panics") });
        }
        futures::future::try_join_all(copying).await?;
        let merging = async {
            let mut tx = begin(pool).await?;
            transactions::merge_parts(&mut tx).await?;
            self.offsets.advance(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        };
        tokio::try_join!(merging, self.accounts.write(pool))?;
        Ok(())
    }

    async fn send(&mut self, rows: AppendRows, end: bool) -> Result<(), StoreError> {
        let mut drained = transactions::Drained::default();
        self.transactions.drain(&mut drained, end);
        self.events.send(rows.events).await?;
        self.versions.send(rows.versions).await?;
        self.activities.send(rows.activities.rows).await?;
        self.legs.send(drained.legs).await?;
        self.txns.send(drained.txns).await?;
        self.parts.send(drained.parts).await
    }
}

impl CopyStream {
    /// Opens the `COPY` into `target`, the stored legs of `held` taken out first.
    fn open(pool: &PgPool, target: &'static Target, held: Option<HeldLegs>) -> CopyStream {
        let (batches, receiver) = mpsc::channel(BATCHES_QUEUED);
        let (commit, committing) = oneshot::channel();
        let pool = pool.clone();
        let copying = tokio::spawn(async move {
            let mut tx = begin(&pool).await?;
            // The table's lock first (see `Indexes::drop`), then its rows.
            let indexes = Indexes::drop(&mut tx, target.table).await?;
            if let Some(held) = held {
                held.take(&mut tx).await?;
            }
            copy::stream(&mut tx, target, receiver).await?;
            let turn = committing.await.map_err(|_| StoreError::Unfinished)?;
            indexes.build(&mut tx).await?;
            tx.commit().await?;
            drop(turn);
            Ok(())
        });
        CopyStream {
            batches,
            commit,
            copying,
        }
    }

    async fn send(&mut self, rows: CopyRows) -> Result<(), StoreError> {
        if self.batches.send(rows).await.is_ok() {
            return Ok(());
        }
        // The COPY ended early: its error says why.
        (&mut self.copying)
            .await
            .expect("a COPY task never panics")?;
        unreachable!("a COPY ends early only with an error")
    }

    /// Ends the `COPY`; the table builds its indexes and commits once it is sent its turn.
    fn end(self) -> (oneshot::Sender<OwnedSemaphorePermit>, CopyTask) {
        drop(self.batches);
        (self.commit, self.copying)
    }
}

/// Accounts per statement at most.
const ACCOUNTS_PER_STATEMENT: usize = 10_000;

impl BatchAccounts {
    /// The newest states, read from the batch's `events`.
    fn states(self, events: &[pb::Event]) -> AccountStates {
        let mut states = BTreeMap::new();
        for (shard_id, accounts) in self.0 {
            for (account_id, newest) in accounts {
                let event = &events[newest.event];
                let row = AccountRow {
                    shard_id,
                    seq: event.seq,
                    time_ms: event.timestamp_ms,
                    created_ms: newest.created_ms,
                    txn_id: Some(event.txn_id.clone()).filter(|t| !t.is_empty()),
                    account: event.accounts[newest.account].clone(),
                };
                states.insert((account_id, shard_id), row);
            }
        }
        AccountStates(states)
    }
}

impl AccountStates {
    /// Takes in the states of a later batch: the newest state of each account, created when it
    /// first appeared.
    fn merge(&mut self, later: AccountStates) {
        for (key, mut row) in later.0 {
            if let Some(earlier) = self.0.get(&key) {
                row.created_ms = earlier.created_ms;
            }
            self.0.insert(key, row);
        }
    }

    /// Writes the states in a transaction of their own.
    async fn write(self, pool: &PgPool) -> Result<(), StoreError> {
        let mut tx = begin(pool).await?;
        self.upsert(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn upsert(self, tx: &mut Transaction<'static, Postgres>) -> Result<(), StoreError> {
        let mut rows = self.0.into_iter().peekable();
        while rows.peek().is_some() {
            upsert_accounts(tx, rows.by_ref().take(ACCOUNTS_PER_STATEMENT)).await?;
        }
        Ok(())
    }
}

async fn upsert_accounts(
    tx: &mut Transaction<'static, Postgres>,
    rows: impl Iterator<Item = ((String, u32), AccountRow)>,
) -> Result<(), StoreError> {
    let mut columns: [Vec<String>; 9] = Default::default();
    let (mut shard_id, mut scale, mut version, mut seq, mut time_ms, mut created_ms) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut txn_id: Vec<Option<String>> = vec![];
    let (mut lower, mut upper): (Vec<Option<String>>, Vec<Option<String>>) = (vec![], vec![]);
    for ((account_id, _), row) in rows {
        let account = &row.account;
        // The amounts parse: the event's version rows checked them ([`event_rows`]).
        let parsed = |amount| minor(amount).parse::<i128>().unwrap_or_default();
        let available = parsed(&account.balance) - parsed(&account.pending_out);
        for (column, value) in columns.iter_mut().zip([
            tenant_of(&account_id).to_string(),
            account.currency.clone(),
            state_name(account.state).to_string(),
            minor(&account.balance).to_string(),
            minor(&account.pending_out).to_string(),
            minor(&account.pending_in).to_string(),
            available.to_string(),
            metadata_json(&account.metadata),
            account_id,
        ]) {
            column.push(value);
        }
        shard_id.push(row.shard_id as i32);
        scale.push(account.scale as i32);
        version.push(account.version as i64);
        seq.push(row.seq as i64);
        time_ms.push(row.time_ms);
        created_ms.push(row.created_ms);
        txn_id.push(row.txn_id);
        lower.push(account.lower_limit.as_ref().map(|a| a.minor_units.clone()));
        upper.push(account.upper_limit.as_ref().map(|a| a.minor_units.clone()));
    }
    let [
        tenant,
        currency,
        state,
        balance,
        pending_out,
        pending_in,
        available,
        metadata,
        ids,
    ] = columns;
    sqlx::query(
        "INSERT INTO accounts (account_id, tenant_id, shard_id, currency, scale, state, balance,
                               pending_out, pending_in, available, lower_limit, upper_limit,
                               version, metadata, seq, txn_id, created_at, updated_at)
         SELECT account_id, tenant_id, shard_id, currency, scale, state, balance::numeric,
                pending_out::numeric, pending_in::numeric, available::numeric,
                lower_limit::numeric, upper_limit::numeric, version, metadata::jsonb, seq, txn_id,
                timestamptz 'epoch' + created_ms * interval '1 millisecond',
                timestamptz 'epoch' + ms * interval '1 millisecond'
         FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::int[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                     $13::bigint[], $14::text[], $15::bigint[], $16::text[], $17::bigint[],
                     $18::bigint[])
              AS a(account_id, tenant_id, shard_id, currency, scale, state, balance, pending_out,
                   pending_in, available, lower_limit, upper_limit, version, metadata, seq,
                   txn_id, created_ms, ms)
         ON CONFLICT (account_id, shard_id) DO UPDATE SET
             state = excluded.state, balance = excluded.balance,
             pending_out = excluded.pending_out, pending_in = excluded.pending_in,
             available = excluded.available, lower_limit = excluded.lower_limit,
             upper_limit = excluded.upper_limit, version = excluded.version,
             metadata = excluded.metadata, seq = excluded.seq, txn_id = excluded.txn_id,
             updated_at = excluded.updated_at",
    )
    .bind(&ids)
    .bind(&tenant)
    .bind(&shard_id)
    .bind(&currency)
    .bind(&scale)
    .bind(&state)
    .bind(&balance)
    .bind(&pending_out)
    .bind(&pending_in)
    .bind(&available)
    .bind(&lower)
    .bind(&upper)
    .bind(&version)
    .bind(&metadata)
    .bind(&seq)
    .bind(&txn_id)
    .bind(&created_ms)
    .bind(&time_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ---- Reads ----

/// One version of an account as the projection holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountVersion {
    pub account: pb::Account,
    pub shard_id: u32,
    pub seq: u64,
    pub updated_at_ms: i64,
    pub txn_id: String,
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn amount(text: String) -> Option<Amount> {
    Some(Amount { minor_units: text })
}

/// The current state of an account.
pub async fn account(
    pool: &PgPool,
    account_id: &str,
) -> Result<Option<AccountVersion>, StoreError> {
    let row = sqlx::query(
        "SELECT account_id, currency, scale, state, balance::text, pending_out::text,
                pending_in::text, lower_limit::text, upper_limit::text, version, metadata::text,
                shard_id, seq, (extract(epoch FROM updated_at) * 1000)::bigint, coalesce(txn_id, '')
         FROM accounts WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| AccountVersion {
        account: pb::Account {
            account_id: row.get(0),
            currency: row.get(1),
            scale: row.get::<i32, _>(2) as u32,
            state: state_value(row.get(3)),
            balance: amount(row.get(4)),
            pending_out: amount(row.get(5)),
            pending_in: amount(row.get(6)),
            lower_limit: row.get::<Option<String>, _>(7).and_then(amount),
            upper_limit: row.get::<Option<String>, _>(8).and_then(amount),
            version: row.get::<i64, _>(9) as u64,
            metadata: serde_json::from_str(row.get(10)).unwrap_or_default(),
        },
        shard_id: row.get::<i32, _>(11) as u32,
        seq: row.get::<i64, _>(12) as u64,
        updated_at_ms: row.get(13),
        txn_id: row.get(14),
    }))
}

/// Where to look an account version up.
#[derive(Clone, Copy, Debug)]
pub enum VersionFilter {
    /// Newest first, versions strictly below this one (`u64::MAX` for all).
    Before(u64),
    /// The last version at or before this shard seq.
    AtSeq(u64),
    /// The last version at or before this leader time.
    AtTime(i64),
}

/// Versions of an account, newest first, with the fields that do not change per version
/// (currency, limits, metadata) from its current state.
pub async fn versions(
    pool: &PgPool,
    account_id: &str,
    filter: VersionFilter,
    limit: u32,
) -> Result<Vec<AccountVersion>, StoreError> {
    let Some(current) = account(pool, account_id).await? else {
        return Ok(Vec::new());
    };
    let (before, seq, time_ms) = match filter {
        VersionFilter::Before(version) => (clamp(version), i64::MAX, None),
        VersionFilter::AtSeq(seq) => (i64::MAX, clamp(seq), None),
        VersionFilter::AtTime(ms) => (i64::MAX, i64::MAX, Some(ms)),
    };
    let rows = sqlx::query(
        "SELECT version, state, balance::text, pending_out::text, pending_in::text, shard_id, seq,
                (extract(epoch FROM event_time) * 1000)::bigint, coalesce(txn_id, '')
         FROM account_versions
         WHERE account_id = $1 AND version < $2 AND seq <= $3
           AND ($4::bigint IS NULL
                OR event_time <= timestamptz 'epoch' + $4::bigint * interval '1 millisecond')
         ORDER BY version DESC, shard_id DESC LIMIT $5",
    )
    .bind(account_id)
    .bind(before)
    .bind(seq)
    .bind(time_ms)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| AccountVersion {
            account: pb::Account {
                version: row.get::<i64, _>(0) as u64,
                state: state_value(row.get(1)),
                balance: amount(row.get(2)),
                pending_out: amount(row.get(3)),
                pending_in: amount(row.get(4)),
                ..current.account.clone()
            },
            shard_id: row.get::<i32, _>(5) as u32,
            seq: row.get::<i64, _>(6) as u64,
            updated_at_ms: row.get(7),
            txn_id: row.get(8),
        })
        .collect())
}

#[derive(Clone, Debug, PartialEq)]
pub struct ActivityRow {
    pub activity_id: u64,
    pub account_id: String,
    pub kind: String,
    pub amount: String,
    pub currency: String,
    pub txn_id: String,
    pub counterparty: String,
    pub occurred_at_ms: i64,
    pub metadata: BTreeMap<String, String>,
}

/// An account's activities, newest first, strictly after the keyset `(occurred_at_ms,
/// activity_id)` of the previous page's last row.
pub async fn activities(
    pool: &PgPool,
    account_id: &str,
    after: Option<(i64, u64)>,
    limit: u32,
) -> Result<Vec<ActivityRow>, StoreError> {
    let (after_ms, after_id) = after.map_or((None, None), |(ms, id)| (Some(ms), Some(clamp(id))));
    let rows = sqlx::query(
        "SELECT activity_id, account_id, kind, amount::text, currency, coalesce(txn_id, ''),
                coalesce(counterparty_account_id, ''),
                (extract(epoch FROM occurred_at) * 1000)::bigint AS ms, metadata::text
         FROM activities
         WHERE account_id = $1
           AND ($2::bigint IS NULL
                OR (occurred_at, activity_id) <
                   (timestamptz 'epoch' + $2::bigint * interval '1 millisecond', $3::bigint))
         ORDER BY occurred_at DESC, activity_id DESC LIMIT $4",
    )
    .bind(account_id)
    .bind(after_ms)
    .bind(after_id)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| ActivityRow {
            activity_id: row.get::<i64, _>(0) as u64,
            account_id: row.get(1),
            kind: row.get(2),
            amount: row.get(3),
            currency: row.get(4),
            txn_id: row.get(5),
            counterparty: row.get(6),
            occurred_at_ms: row.get(7),
            metadata: serde_json::from_str(row.get(8)).unwrap_or_default(),
        })
        .collect())
}
