//! Projection snapshots: a consistent copy of every projected table, in the schema
//! `query_snapshot` of the same database, so a rebuild can start from it instead of from seq 1.
//! A snapshot is taken in one repeatable-read transaction (the projector keeps writing
//! meanwhile) and replaces the previous one atomically. The hierarchy tables are not projections
//! (the hierarchy service owns them) and are neither snapshotted nor rebuilt.

use std::collections::BTreeMap;

use futures::StreamExt;
use sqlx::{PgPool, Row};

use crate::store::{self, Indexes, StoreError};

/// Every projected table, with `projection_offsets` first.
pub const TABLES: [&str; 7] = [
    "projection_offsets",
    "ledger_events",
    "accounts",
    "account_versions",
    "transactions",
    "transaction_legs",
    "activities",
];

/// Empties every projected table (the hierarchy stays), so the projector replays from seq 1 once
/// it starts over.
pub async fn reset(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "TRUNCATE {}",
        TABLES.join(", ")
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// Replaces the snapshot with the tables as they are now; returns the applied seqs it holds.
pub async fn take(pool: &PgPool) -> Result<BTreeMap<u32, u64>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    // One snapshot at a time.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('query:snapshot'))")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DROP SCHEMA IF EXISTS query_snapshot_next CASCADE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE SCHEMA query_snapshot_next")
        .execute(&mut *tx)
        .await?;
    for table in TABLES {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE query_snapshot_next.{table} AS SELECT * FROM query.{table}"
        )))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DROP SCHEMA IF EXISTS query_snapshot CASCADE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("ALTER SCHEMA query_snapshot_next RENAME TO query_snapshot")
        .execute(&mut *tx)
        .await?;
    let offsets = offsets(&mut tx, "query_snapshot").await?;
    tx.commit().await?;
    Ok(offsets)
}

async fn offsets(
    connection: &mut sqlx::PgConnection,
    schema: &str,
) -> Result<BTreeMap<u32, u64>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT shard_id, applied_seq FROM {schema}.projection_offsets"
    )))
    .fetch_all(connection)
    .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<i32, _>(0) as u32, row.get::<i64, _>(1) as u64))
        .collect())
}

/// Copies the snapshot of `source` into the (empty) projection of `target`, in one transaction,
/// each table without its indexes, built again once its rows are in ([`Indexes`]); returns the
/// applied seqs the target starts from. `None` when `source` has no snapshot.
pub async fn restore(
    source: &PgPool,
    target: &PgPool,
) -> Result<Option<BTreeMap<u32, u64>>, StoreError> {
    let mut reader = source.acquire().await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'query_snapshot')",
    )
    .fetch_one(&mut *reader)
    .await?;
    if !exists {
        return Ok(None);
    }
    let mut tx = target.begin().await?;
    store::ensure_empty(&mut tx).await?;
    for table in TABLES {
        let indexes = Indexes::drop(&mut tx, table).await?;
        let mut chunks = reader
            .copy_out_raw(&format!(
                "COPY query_snapshot.{table} TO STDOUT (FORMAT binary)"
            ))
            .await?;
        let mut sink = tx
            .copy_in_raw(&format!("COPY query.{table} FROM STDIN (FORMAT binary)"))
            .await?;
        while let Some(chunk) = chunks.next().await {
            sink.send(chunk?).await?;
        }
        sink.finish().await?;
        indexes.build(&mut tx).await?;
    }
    let offsets = offsets(&mut tx, "query").await?;
    tx.commit().await?;
    Ok(Some(offsets))
}
