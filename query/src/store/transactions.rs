//! The `transactions` and `transaction_legs` rows of a batch. Events read these rows back (a
//! post finds the legs its reserve held), so a batch loads the rows its events reach (one or
//! two queries), applies its events to them in memory, in order, and writes what changed with
//! one statement.
//!
//! A bulk load reads nothing back: it keeps every transaction in memory for as long as it holds
//! a leg ([`Transactions::kept`]), and after each batch writes the legs that became final and
//! the rows of the transactions it forgets ([`Transactions::drain`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proto::auticuro::v1 as pb;
use proto::auticuro::v1::command::Kind;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};

use super::{ActivityRows, Movement, StoreError, event_time, metadata_json, tenant_of, units};
use crate::activity::{self, ActivityKind, KIND_KEY};
use crate::copy::{CopyRows, Target};

/// A transaction's row as the batch's events leave it.
struct Txn {
    tenant: String,
    kind: String,
    status: String,
    metadata: BTreeMap<String, String>,
    created_ms: i64,
    updated_ms: i64,
    /// An event of the batch posted or voided it, so its status is the batch's. Otherwise a row
    /// stored meanwhile (by the writer of another shard) keeps its own status.
    finished: bool,
    changed: bool,
    /// Loaded, or created by an event here, so its tenant, kind, metadata and creation time are
    /// known. Otherwise (only in a bulk load) an event posted or voided a transaction whose row
    /// was written earlier, and only the status and update time are known.
    whole: bool,
}

/// A leg of a transaction on one of the batch's shards.
struct Leg {
    shard_id: u32,
    account_id: String,
    amount: i128,
    currency: String,
    /// held, posted or voided.
    state: String,
    /// Already a row, rather than added by the batch.
    stored: bool,
    changed: bool,
}

impl Leg {
    /// Adds the leg of `txn_id` as a row of [`LEG_COLUMNS`].
    fn copy(&self, rows: &mut CopyRows, txn_id: &str) {
        rows.text(txn_id)
            .int4(self.shard_id as i32)
            .text(&self.account_id)
            .numeric(self.amount)
            .text(&self.currency)
            .text(&self.state)
            .end_row();
    }
}

/// The transactions the events of a batch reach, by id (`None`: no row yet), and their legs on
/// the batch's shards. A shard's legs change only with that shard's events, which one writer
/// projects at a time; a transaction's row is shared by its shards' writers, so what the batch
/// changes in it is merged into the stored row when written ([`Transactions::write`]).
#[derive(Default)]
pub(super) struct Transactions {
    txns: BTreeMap<String, Option<Txn>>,
    legs: BTreeMap<String, Vec<Leg>>,
    /// Kept for a whole bulk load ([`Transactions::kept`]). (A transaction missing here may then
    /// have a row written earlier.)
    bulk: Option<Bulk>,
}

/// What a bulk load keeps besides the transactions in memory.
#[derive(Default)]
struct Bulk {
    /// The load began with no transaction rows, so the row of a transaction forgotten for the
    /// first time is written as it is ([`TXN_COLUMNS`]).
    direct: bool,
    /// Hashes of the ids of the transactions forgotten so far. An event that reaches one again
    /// starts it again, and its next row is written as a part, to be merged with the first
    /// ([`MERGE_PARTS`]); so is one whose hash collides.
    forgotten: HashSet<u64>,
    /// Parts written so far.
    parts: i64,
    /// The transactions events reached since the last [`Transactions::drain`].
    reached: BTreeSet<String>,
}

const LOAD: &str = "
    SELECT t.txn_id, t.tenant_id, t.kind, t.status, t.metadata::text,
           round(extract(epoch FROM t.created_at) * 1000)::int8,
           round(extract(epoch FROM t.updated_at) * 1000)::int8,
           l.shard_ids, l.accounts, l.amounts, l.currencies, l.states
    FROM transactions t
    LEFT JOIN LATERAL (
        SELECT array_agg(shard_id) AS shard_ids, array_agg(account_id) AS accounts,
               array_agg(amount::text) AS amounts, array_agg(currency) AS currencies,
               array_agg(state) AS states
        FROM transaction_legs
        WHERE txn_id = t.txn_id AND shard_id = ANY($2)) l ON true
    WHERE t.txn_id = ANY($1)";

/// The held legs a bulk load on top of a snapshot starts from, with their transactions' rows (in
/// the columns of [`LOAD`]). It writes them again: [`HeldLegs`].
const HELD: &str = "
    WITH legs AS (
        SELECT txn_id, array_agg(shard_id) AS shard_ids, array_agg(account_id) AS accounts,
               array_agg(amount::text) AS amounts, array_agg(currency) AS currencies,
               array_agg(state) AS states
        FROM transaction_legs
        WHERE state = 'held'
        GROUP BY txn_id)
    SELECT t.txn_id, t.tenant_id, t.kind, t.status, t.metadata::text,
           round(extract(epoch FROM t.created_at) * 1000)::int8,
           round(extract(epoch FROM t.updated_at) * 1000)::int8,
           l.shard_ids, l.accounts, l.amounts, l.currencies, l.states
    FROM legs l JOIN transactions t ON t.txn_id = l.txn_id";
const DELETE_HELD: &str = "DELETE FROM transaction_legs WHERE state = 'held' AND txn_id = ANY($1)";

/// The transactions whose held legs a bulk load keeps in memory ([`Transactions::kept`]) and
/// writes again: [`HeldLegs::take`] deletes the stored ones in the transaction of the legs'
/// `COPY`, so a load dropped before it finishes leaves them where they were.
pub(super) struct HeldLegs(Vec<String>);

impl HeldLegs {
    pub(super) async fn take(self, conn: &mut PgConnection) -> Result<(), StoreError> {
        if !self.0.is_empty() {
            sqlx::query(DELETE_HELD).bind(self.0).execute(conn).await?;
        }
        Ok(())
    }
}

pub(super) const TXN_COLUMNS: Target = Target {
    table: "transactions",
    columns: "(txn_id, tenant_id, kind, status, metadata, created_at, updated_at)",
};

/// The rows of transactions a bulk load wrote that may merge with a row written earlier (on top
/// of a snapshot, or started again after it forgot them: [`Transactions::drain`]), in a table of
/// their own until [`merge_parts`] merges them.
const DROP_PARTS: &str = "DROP TABLE IF EXISTS transaction_parts";
const CREATE_PARTS: &str = "
    CREATE UNLOGGED TABLE transaction_parts (
        txn_id text NOT NULL, tenant_id text NOT NULL, kind text NOT NULL,
        status text NOT NULL, metadata jsonb NOT NULL, created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL, part bigint NOT NULL, whole boolean NOT NULL,
        finished boolean NOT NULL)";
/// The columns of [`TXN_COLUMNS`], then the part's number and flags.
pub(super) const PART_COLUMNS: Target = Target {
    table: "transaction_parts",
    columns: "(txn_id, tenant_id, kind, status, metadata, created_at, updated_at, part, whole, \
              finished)",
};

/// Merges the parts of each transaction's row, and then the stored row, as [`WRITE`] merges a
/// batch's into a stored row, part after part: the least tenant and creation time and the
/// greatest update time; the status of the last part that posted or voided it, else of the
/// first; the kind and metadata of the first. Only finishes of a row no part or stored row
/// creates are dropped, as they are when projecting batch by batch.
const MERGE_PARTS: &str = r#"
    MERGE INTO transactions t
    USING (
        SELECT txn_id,
               min(tenant_id COLLATE "C") FILTER (WHERE whole) AS tenant_id,
               (array_agg(kind ORDER BY part) FILTER (WHERE whole))[1] AS kind,
               coalesce((array_agg(status ORDER BY part DESC) FILTER (WHERE finished))[1],
                        (array_agg(status ORDER BY part) FILTER (WHERE whole))[1]) AS status,
               bool_or(finished) AS finished,
               (array_agg(metadata ORDER BY part) FILTER (WHERE whole))[1] AS metadata,
               min(created_at) FILTER (WHERE whole) AS created_at,
               max(updated_at) AS updated_at
        FROM transaction_parts
        GROUP BY txn_id) p
    ON t.txn_id = p.txn_id
    WHEN MATCHED THEN UPDATE SET
        tenant_id = least(t.tenant_id COLLATE "C", p.tenant_id),
        status = CASE WHEN p.finished THEN p.status ELSE t.status END,
        created_at = least(t.created_at, p.created_at),
        updated_at = greatest(t.updated_at, p.updated_at)
    WHEN NOT MATCHED AND p.tenant_id IS NOT NULL THEN
        INSERT (txn_id, tenant_id, kind, status, metadata, created_at, updated_at)
        VALUES (p.txn_id, p.tenant_id, p.kind, p.status, p.metadata, p.created_at,
                p.updated_at)"#;

/// Stored legs that changed are written by their primary key (`ON CONFLICT`), so each is found
/// through the index however many legs there are. Transactions the batch did not post or void
/// keep a stored row's status; the others take the batch's. Both merge the rest: the least
/// tenant (in byte order, as [`Transactions::insert`] compares) and creation time, the greatest
/// update time.
pub(super) const LEG_COLUMNS: Target = Target {
    table: "transaction_legs",
    columns: "(txn_id, shard_id, account_id, amount, currency, state)",
};

const WRITE: &str = r#"
    WITH txns AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::int8[], $7::int8[], $8::bool[])
            AS t(txn_id, tenant_id, kind, status, metadata, created_ms, updated_ms, finished)),
    inserted AS (
        INSERT INTO transactions (txn_id, tenant_id, kind, status, metadata, created_at,
                                  updated_at)
        SELECT txn_id, tenant_id, kind, status, metadata::jsonb,
               timestamptz 'epoch' + created_ms * interval '1 millisecond',
               timestamptz 'epoch' + updated_ms * interval '1 millisecond'
        FROM txns WHERE NOT finished
        ON CONFLICT (txn_id) DO UPDATE SET
            tenant_id = least(transactions.tenant_id COLLATE "C", excluded.tenant_id),
            created_at = least(transactions.created_at, excluded.created_at),
            updated_at = greatest(transactions.updated_at, excluded.updated_at)),
    finished AS (
        INSERT INTO transactions (txn_id, tenant_id, kind, status, metadata, created_at,
                                  updated_at)
        SELECT txn_id, tenant_id, kind, status, metadata::jsonb,
               timestamptz 'epoch' + created_ms * interval '1 millisecond',
               timestamptz 'epoch' + updated_ms * interval '1 millisecond'
        FROM txns WHERE finished
        ON CONFLICT (txn_id) DO UPDATE SET
            tenant_id = least(transactions.tenant_id COLLATE "C", excluded.tenant_id),
            status = excluded.status,
            created_at = least(transactions.created_at, excluded.created_at),
            updated_at = greatest(transactions.updated_at, excluded.updated_at)),
    changed_legs AS (
        INSERT INTO transaction_legs (txn_id, shard_id, account_id, amount, currency, state)
        SELECT txn_id, shard_id, account_id, amount::numeric, currency, state
        FROM unnest($9::text[], $10::int4[], $11::text[], $12::text[], $13::text[], $14::text[])
            AS l(txn_id, shard_id, account_id, amount, currency, state)
        ON CONFLICT (txn_id, account_id) DO UPDATE SET state = excluded.state)
    SELECT 1"#;

impl Transactions {
    /// Loads the rows the batch's `events` need from Postgres: those of the transactions they
    /// post or void (captures included) on a shard where the batch did not create them. A
    /// transaction the batch creates is written by merging into a stored row, so it is not
    /// loaded; its metadata is then the batch's, which is the stored one too, as a coordinator
    /// gives every shard of a transaction the same metadata. A post's metadata may name a
    /// hold it captures: a second query loads the holds named only by loaded metadata.
    pub(super) async fn load(
        tx: &mut Transaction<'static, Postgres>,
        events: &[pb::Event],
        shard_ids: &[i32],
    ) -> Result<Transactions, StoreError> {
        let mut batch = Transactions::default();
        batch.fetch(tx, needed(events), shard_ids).await?;
        let holds = batch
            .txns
            .values()
            .flatten()
            .filter_map(|txn| txn.metadata.get(activity::HOLD_KEY))
            .filter(|id| !batch.txns.contains_key(*id))
            .cloned()
            .collect();
        batch.fetch(tx, holds, shard_ids).await?;
        Ok(batch)
    }

    async fn fetch(
        &mut self,
        tx: &mut Transaction<'static, Postgres>,
        ids: BTreeSet<String>,
        shard_ids: &[i32],
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = ids.into_iter().collect();
        // Not a prepared statement: planned for the ids each time. The tables grow from empty,
        // and a plan kept from when they were small (a sequential scan, matching each row
        // against every id) would get slower with every row.
        let rows = sqlx::query(LOAD)
            .persistent(false)
            .bind(&ids)
            .bind(shard_ids)
            .fetch_all(&mut **tx)
            .await?;
        self.txns.extend(ids.into_iter().map(|id| (id, None)));
        self.keep(rows, true);
        Ok(())
    }

    /// The transactions of a bulk load, kept from batch to batch (see [`Transactions::drain`]),
    /// starting with those that hold legs in the database (on top of a snapshot), whose held
    /// legs are to be taken out of it and written again; creates the table of parts afresh.
    pub(super) async fn kept(pool: &PgPool) -> Result<(Transactions, HeldLegs), StoreError> {
        sqlx::query(DROP_PARTS).execute(pool).await?;
        sqlx::query(CREATE_PARTS).execute(pool).await?;
        let direct: bool = sqlx::query_scalar("SELECT NOT EXISTS (SELECT FROM transactions)")
            .fetch_one(pool)
            .await?;
        let rows = sqlx::query(HELD).fetch_all(pool).await?;
        let held = HeldLegs(rows.iter().map(|row| row.get(0)).collect());
        let mut kept = Transactions {
            bulk: Some(Bulk {
                direct,
                ..Bulk::default()
            }),
            ..Transactions::default()
        };
        kept.keep(rows, false);
        Ok((kept, held))
    }

    /// Keeps the rows of [`LOAD`] (or [`HELD`]); their legs are `stored` or not.
    fn keep(&mut self, rows: Vec<PgRow>, stored: bool) {
        for row in rows {
            let txn_id: String = row.get(0);
            let txn = Txn {
                tenant: row.get(1),
                kind: row.get(2),
                status: row.get(3),
                metadata: serde_json::from_str(row.get(4)).unwrap_or_default(),
                created_ms: row.get(5),
                updated_ms: row.get(6),
                finished: false,
                changed: false,
                whole: true,
            };
            let shard_ids: Vec<i32> = row.get::<Option<_>, _>(7).unwrap_or_default();
            let accounts: Vec<String> = row.get::<Option<_>, _>(8).unwrap_or_default();
            let amounts: Vec<String> = row.get::<Option<_>, _>(9).unwrap_or_default();
            let currencies: Vec<String> = row.get::<Option<_>, _>(10).unwrap_or_default();
            let states: Vec<String> = row.get::<Option<_>, _>(11).unwrap_or_default();
            let legs = shard_ids
                .into_iter()
                .zip(accounts)
                .zip(amounts)
                .zip(currencies)
                .zip(states)
                .map(
                    |((((shard_id, account_id), amount), currency), state)| Leg {
                        shard_id: shard_id as u32,
                        account_id,
                        amount: amount.parse().unwrap_or(0),
                        currency,
                        state,
                        stored,
                        changed: false,
                    },
                )
                .collect();
            self.legs.insert(txn_id.clone(), legs);
            self.txns.insert(txn_id, Some(txn));
        }
    }

    /// Applies one event (of those [`Transactions::load`] was given) and gathers the activities
    /// that come from legs it finished: those of posts and of released holds. (No event has
    /// activities from both this and `event_rows`, so their positions within the event cannot
    /// collide.)
    pub(super) fn apply(
        &mut self,
        activities: &mut ActivityRows,
        event: &pb::Event,
    ) -> Result<(), StoreError> {
        let Some(kind) = event.command.as_ref().and_then(|c| c.kind.as_ref()) else {
            return Ok(());
        };
        match kind {
            Kind::Batch(batch) => {
                if !batch.txn_id.is_empty() {
                    let legs = (&batch.legs[..], "posted");
                    self.insert(event, &batch.txn_id, &batch.metadata, "committed", legs)?;
                }
                self.capture_hold(event, &batch.metadata);
            }
            Kind::Reserve(reserve) => {
                let legs = (&reserve.legs[..], "held");
                self.insert(event, &reserve.txn_id, &reserve.metadata, "pending", legs)?;
            }
            Kind::Post(post) => {
                let (metadata, legs) = self.finish(event, &post.txn_id, "posted", "committed");
                activities.add(event, event_time(event)?, &metadata, &legs);
                self.capture_hold(event, &metadata);
            }
            Kind::Void(void) => {
                self.finish(event, &void.txn_id, "voided", "aborted");
            }
            Kind::PlaceHold(hold) => {
                let leg = super::hold_leg(hold);
                let legs = (std::slice::from_ref(&leg), "held");
                self.insert(event, &hold.hold_id, &hold.metadata, "authorized", legs)?;
            }
            Kind::VoidHold(void) => {
                let (metadata, legs) = self.finish(event, &void.hold_id, "voided", "voided");
                let time = event_time(event)?;
                activities.add_hold(event, time, &metadata, &legs, ActivityKind::Void, 1);
            }
            _ => {}
        }
        Ok(())
    }

    /// The hold a capture (a posted transaction with the hold in its metadata) captured, when
    /// this event posted the capture on the hold's shard (the held wallet is the payer): the
    /// hold's leg becomes posted and the hold captured.
    fn capture_hold(&mut self, event: &pb::Event, metadata: &BTreeMap<String, String>) {
        let Some(hold_id) = metadata.get(activity::HOLD_KEY) else {
            return;
        };
        let payer = metadata.get(activity::FROM_KEY);
        if event.accounts.iter().any(|a| Some(&a.account_id) == payer) {
            self.finish(event, hold_id, "posted", "captured");
        }
    }

    /// Notes, in a bulk load, that an event reached the transaction ([`Transactions::drain`]).
    fn reach(&mut self, txn_id: &str) {
        if let Some(bulk) = &mut self.bulk {
            bulk.reached.insert(txn_id.to_string());
        }
    }

    /// Creates the transaction's row, or merges into it (the least tenant and creation time,
    /// the greatest update time; status and metadata stay), and adds its `legs` on the event's
    /// shard in the leg state given.
    fn insert(
        &mut self,
        event: &pb::Event,
        txn_id: &str,
        metadata: &BTreeMap<String, String>,
        status: &str,
        (legs, leg_state): (&[pb::Leg], &str),
    ) -> Result<(), StoreError> {
        self.reach(txn_id);
        let tenant = metadata
            .get(activity::FROM_KEY)
            .or_else(|| metadata.get(activity::TO_KEY))
            .map(|account| tenant_of(account))
            .or_else(|| event.accounts.first().map(|a| tenant_of(&a.account_id)))
            .unwrap_or_default();
        let mut added = Vec::with_capacity(legs.len());
        for leg in legs {
            added.push(Leg {
                shard_id: event.shard_id,
                account_id: leg.account_id.clone(),
                amount: units(event, &leg.amount)?,
                currency: leg.currency.clone(),
                state: leg_state.to_string(),
                stored: false,
                changed: true,
            });
        }
        self.legs
            .entry(txn_id.to_string())
            .or_default()
            .extend(added);
        let time = event.timestamp_ms;
        match self.txns.get_mut(txn_id) {
            Some(Some(txn)) if txn.whole => {
                if tenant < txn.tenant.as_str() {
                    txn.tenant = tenant.to_string();
                }
                txn.created_ms = txn.created_ms.min(time);
                txn.updated_ms = txn.updated_ms.max(time);
                txn.changed = true;
            }
            Some(Some(txn)) => {
                // Only a finish was known: the row is this event's, with the finish's status.
                txn.tenant = tenant.to_string();
                txn.kind = metadata.get(KIND_KEY).cloned().unwrap_or_default();
                txn.metadata = metadata.clone();
                txn.created_ms = time;
                txn.updated_ms = txn.updated_ms.max(time);
                txn.whole = true;
                txn.changed = true;
            }
            _ => {
                let txn = Txn {
                    tenant: tenant.to_string(),
                    kind: metadata.get(KIND_KEY).cloned().unwrap_or_default(),
                    status: status.to_string(),
                    metadata: metadata.clone(),
                    created_ms: time,
                    updated_ms: time,
                    finished: false,
                    changed: true,
                    whole: true,
                };
                self.txns.insert(txn_id.to_string(), Some(txn));
            }
        }
        Ok(())
    }

    /// Posts or voids the held legs of a transaction on the event's shard and sets its status;
    /// returns the transaction's metadata and those legs, debits first, then by account (a
    /// fixed order, so a rebuild numbers their activities the same way).
    fn finish(
        &mut self,
        event: &pb::Event,
        txn_id: &str,
        leg_state: &str,
        status: &str,
    ) -> (BTreeMap<String, String>, Vec<Movement>) {
        self.reach(txn_id);
        let mut finished: Vec<Movement> = Vec::new();
        for leg in self.legs.get_mut(txn_id).into_iter().flatten() {
            if leg.shard_id == event.shard_id && leg.state == "held" {
                leg.state = leg_state.to_string();
                leg.changed = true;
                finished.push((leg.account_id.clone(), leg.amount, leg.currency.clone()));
            }
        }
        finished.sort_by(|a, b| (a.1 >= 0, &a.0).cmp(&(b.1 >= 0, &b.0)));
        if self.bulk.is_some() && !self.txns.contains_key(txn_id) {
            // A bulk load forgot it, or never saw it: a row written earlier may take the finish.
            let txn = Txn {
                tenant: String::new(),
                kind: String::new(),
                status: String::new(),
                metadata: BTreeMap::new(),
                created_ms: event.timestamp_ms,
                updated_ms: event.timestamp_ms,
                finished: false,
                changed: false,
                whole: false,
            };
            self.txns.insert(txn_id.to_string(), Some(txn));
        }
        let Some(Some(txn)) = self.txns.get_mut(txn_id) else {
            return (BTreeMap::new(), finished);
        };
        txn.status = status.to_string();
        txn.updated_ms = txn.updated_ms.max(event.timestamp_ms);
        txn.finished = true;
        txn.changed = true;
        (txn.metadata.clone(), finished)
    }

    /// Writes what the batch changed: one statement for the transactions and the stored legs
    /// that changed, and a binary `COPY` of the new legs.
    pub(super) async fn write(
        self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), StoreError> {
        let mut txns = TxnColumns::default();
        for (txn_id, txn) in self.txns {
            let Some(txn) = txn.filter(|txn| txn.changed && txn.whole) else {
                continue;
            };
            txns.ids.push(txn_id);
            txns.tenants.push(txn.tenant);
            txns.kinds.push(txn.kind);
            txns.statuses.push(txn.status);
            txns.metadata.push(metadata_json(&txn.metadata));
            txns.created_ms.push(txn.created_ms);
            txns.updated_ms.push(txn.updated_ms);
            txns.finished.push(txn.finished);
        }
        let (mut added, mut changed) = (CopyRows::default(), LegColumns::default());
        for (txn_id, legs) in self.legs {
            for leg in legs.into_iter().filter(|leg| leg.changed) {
                if !leg.stored {
                    leg.copy(&mut added, &txn_id);
                    continue;
                }
                changed.txn_ids.push(txn_id.clone());
                changed.shard_ids.push(leg.shard_id as i32);
                changed.accounts.push(leg.account_id);
                changed.amounts.push(leg.amount.to_string());
                changed.currencies.push(leg.currency);
                changed.states.push(leg.state);
            }
        }
        if !txns.ids.is_empty() || !changed.txn_ids.is_empty() {
            sqlx::query(WRITE)
                .bind(txns.ids)
                .bind(txns.tenants)
                .bind(txns.kinds)
                .bind(txns.statuses)
                .bind(txns.metadata)
                .bind(txns.created_ms)
                .bind(txns.updated_ms)
                .bind(txns.finished)
                .bind(changed.txn_ids)
                .bind(changed.shard_ids)
                .bind(changed.accounts)
                .bind(changed.amounts)
                .bind(changed.currencies)
                .bind(changed.states)
                .execute(&mut **tx)
                .await?;
        }
        added.write(tx, &LEG_COLUMNS).await?;
        Ok(())
    }

    /// In a bulk load, after each batch: writes the legs of the transactions it reached that are
    /// final (posted or voided), and forgets those transactions that hold no leg any longer,
    /// writing the rows of those that changed. At the `end`, writes and forgets every one.
    pub(super) fn drain(&mut self, rows: &mut Drained, end: bool) {
        let bulk = self.bulk.as_mut().expect("only a bulk load drains");
        let reached = std::mem::take(&mut bulk.reached);
        let ids: BTreeSet<String> = match end {
            true => self.txns.keys().chain(self.legs.keys()).cloned().collect(),
            false => reached,
        };
        for txn_id in ids {
            self.drain_one(&txn_id, rows, end);
        }
    }

    fn drain_one(&mut self, txn_id: &str, rows: &mut Drained, end: bool) {
        if let Some(legs) = self.legs.get_mut(txn_id) {
            legs.retain(|leg| {
                if leg.state == "held" && !end {
                    return true;
                }
                leg.copy(&mut rows.legs, txn_id);
                false
            });
            if !legs.is_empty() {
                return;
            }
            self.legs.remove(txn_id);
        }
        let Some(Some(txn)) = self.txns.remove(txn_id) else {
            return;
        };
        if !txn.changed {
            return;
        }
        let bulk = self.bulk.as_mut().expect("only a bulk load drains");
        let first = bulk.forgotten.insert(hash(txn_id));
        let direct = bulk.direct && first && txn.whole;
        let row = if direct {
            &mut rows.txns
        } else {
            &mut rows.parts
        };
        row.text(txn_id)
            .text(&txn.tenant)
            .text(&txn.kind)
            .text(&txn.status)
            .jsonb(&metadata_json(&txn.metadata))
            .timestamp(txn.created_ms)
            .timestamp(txn.updated_ms);
        if !direct {
            bulk.parts += 1;
            row.int8(bulk.parts)
                .boolean(txn.whole)
                .boolean(txn.finished);
        }
        row.end_row();
    }
}

/// Merges the parts a bulk load wrote into `transactions` ([`MERGE_PARTS`]) and drops their
/// table.
pub(super) async fn merge_parts(tx: &mut Transaction<'static, Postgres>) -> Result<(), StoreError> {
    sqlx::query(MERGE_PARTS).execute(&mut **tx).await?;
    sqlx::query(DROP_PARTS).execute(&mut **tx).await?;
    Ok(())
}

/// What [`Transactions::drain`] writes: rows of `transaction_legs` ([`LEG_COLUMNS`]),
/// `transactions` ([`TXN_COLUMNS`]) and parts ([`PART_COLUMNS`]).
#[derive(Default)]
pub(super) struct Drained {
    pub(super) legs: CopyRows,
    pub(super) txns: CopyRows,
    pub(super) parts: CopyRows,
}

fn hash(txn_id: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(txn_id)
}

/// The transactions `events` post or void (captures included) on a shard where an earlier
/// event of theirs did not create them: those [`Transactions::load`] reads first.
fn needed(events: &[pb::Event]) -> BTreeSet<String> {
    let mut created: HashSet<(&str, u32)> = HashSet::new();
    let mut metadata_of: HashMap<&str, &BTreeMap<String, String>> = HashMap::new();
    let mut needed = BTreeSet::new();
    for event in events {
        let Some(kind) = event.command.as_ref().and_then(|c| c.kind.as_ref()) else {
            continue;
        };
        let (finished, hold) = match kind {
            Kind::Batch(b) => (None, b.metadata.get(activity::HOLD_KEY)),
            Kind::Post(p) => {
                let metadata = metadata_of.get(p.txn_id.as_str());
                (
                    Some(&p.txn_id),
                    metadata.and_then(|m| m.get(activity::HOLD_KEY)),
                )
            }
            Kind::Void(v) => (Some(&v.txn_id), None),
            Kind::VoidHold(v) => (Some(&v.hold_id), None),
            _ => (None, None),
        };
        for id in finished.into_iter().chain(hold) {
            if !created.contains(&(id.as_str(), event.shard_id)) {
                needed.insert(id.clone());
            }
        }
        let creates = match kind {
            Kind::Batch(b) if !b.txn_id.is_empty() => Some((&b.txn_id, &b.metadata)),
            Kind::Reserve(r) => Some((&r.txn_id, &r.metadata)),
            Kind::PlaceHold(h) => Some((&h.hold_id, &h.metadata)),
            _ => None,
        };
        if let Some((id, metadata)) = creates {
            created.insert((id, event.shard_id));
            metadata_of.entry(id).or_insert(metadata);
        }
    }
    needed
}

#[derive(Default)]
struct TxnColumns {
    ids: Vec<String>,
    tenants: Vec<String>,
    kinds: Vec<String>,
    statuses: Vec<String>,
    metadata: Vec<String>,
    created_ms: Vec<i64>,
    updated_ms: Vec<i64>,
    finished: Vec<bool>,
}

#[derive(Default)]
struct LegColumns {
    txn_ids: Vec<String>,
    shard_ids: Vec<i32>,
    accounts: Vec<String>,
    amounts: Vec<String>,
    currencies: Vec<String>,
    states: Vec<String>,
}

#[cfg(test)]
mod tests {
    use proto::common::v1::Amount;

    use super::*;

    fn event(shard_id: u32, seq: u64, kind: Kind) -> pb::Event {
        pb::Event {
            shard_id,
            seq,
            timestamp_ms: 1_000 + seq as i64,
            command: Some(pb::Command {
                request_id: format!("r{seq}"),
                kind: Some(kind),
            }),
            ..Default::default()
        }
    }

    fn leg(account_id: &str, amount: i128) -> pb::Leg {
        pb::Leg {
            account_id: account_id.into(),
            amount: Some(Amount {
                minor_units: amount.to_string(),
            }),
            currency: "USD".into(),
        }
    }

    fn metadata(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn reserve(txn_id: &str, legs: Vec<pb::Leg>, entries: &[(&str, &str)]) -> Kind {
        Kind::Reserve(pb::Reserve {
            txn_id: txn_id.into(),
            legs,
            metadata: metadata(entries),
            ..Default::default()
        })
    }

    fn post(txn_id: &str) -> Kind {
        Kind::Post(pb::Post {
            txn_id: txn_id.into(),
            owner: None,
        })
    }

    fn stored_leg(shard_id: u32, account_id: &str, amount: i128) -> Leg {
        Leg {
            shard_id,
            account_id: account_id.into(),
            amount,
            currency: "USD".into(),
            state: "held".into(),
            stored: true,
            changed: false,
        }
    }

    /// A batch that knows `t` as stored: reserved on shards 1 and 2 by tenant `m`.
    fn stored() -> Transactions {
        let mut batch = Transactions::default();
        let txn = Txn {
            tenant: "m".into(),
            kind: "payment".into(),
            status: "pending".into(),
            metadata: metadata(&[(KIND_KEY, "payment")]),
            created_ms: 500,
            updated_ms: 600,
            finished: false,
            changed: false,
            whole: true,
        };
        batch.txns.insert("t".into(), Some(txn));
        let legs = vec![
            stored_leg(1, "m/a", 5),
            stored_leg(1, "m/b", -5),
            stored_leg(2, "m/c", 7),
        ];
        batch.legs.insert("t".into(), legs);
        batch
    }

    fn txn<'a>(batch: &'a Transactions, txn_id: &str) -> &'a Txn {
        batch.txns[txn_id].as_ref().expect("the row exists")
    }

    fn leg_states<'a>(
        batch: &'a Transactions,
        txn_id: &str,
    ) -> Vec<(u32, &'a str, &'a str, bool, bool)> {
        batch.legs[txn_id]
            .iter()
            .map(|leg| {
                let (account, state) = (leg.account_id.as_str(), leg.state.as_str());
                (leg.shard_id, account, state, leg.stored, leg.changed)
            })
            .collect()
    }

    fn hold(hold_id: &str) -> [(&'static str, &str); 1] {
        [(activity::HOLD_KEY, hold_id)]
    }

    #[test]
    fn only_what_the_batch_did_not_create_on_the_same_shard_is_loaded() {
        let events = [
            event(1, 1, reserve("t1", vec![leg("m/a", -1)], &[])),
            event(1, 2, post("t1")),
            event(1, 3, post("t2")),
            event(1, 4, reserve("t3", vec![leg("m/a", -1)], &[])),
            event(
                2,
                1,
                Kind::Void(pb::Void {
                    txn_id: "t3".into(),
                    owner: None,
                }),
            ),
            event(
                1,
                5,
                Kind::VoidHold(pb::VoidHold {
                    hold_id: "h1".into(),
                }),
            ),
            event(
                1,
                6,
                Kind::PlaceHold(pb::PlaceHold {
                    hold_id: "h2".into(),
                    ..Default::default()
                }),
            ),
            event(
                1,
                7,
                Kind::Batch(pb::Batch {
                    txn_id: "c".into(),
                    metadata: metadata(&hold("h2")),
                    ..Default::default()
                }),
            ),
            event(
                1,
                8,
                Kind::Batch(pb::Batch {
                    metadata: metadata(&hold("h3")),
                    ..Default::default()
                }),
            ),
            event(1, 9, reserve("t4", vec![leg("m/a", -1)], &hold("h4"))),
            event(1, 10, post("t4")),
        ];
        let loaded: Vec<String> = needed(&events).into_iter().collect();
        assert_eq!(loaded, ["h1", "h3", "h4", "t2", "t3"]);
    }

    #[test]
    fn a_post_finishes_the_held_legs_of_its_shard_debits_first() {
        let mut batch = stored();
        let posted = event(1, 10, post("t"));
        let (metadata, legs) = batch.finish(&posted, "t", "posted", "committed");
        assert_eq!(metadata.get(KIND_KEY).map(String::as_str), Some("payment"));
        let usd = |account: &str, amount| (account.to_string(), amount, "USD".to_string());
        assert_eq!(legs, [usd("m/b", -5), usd("m/a", 5)]);
        assert_eq!(
            leg_states(&batch, "t"),
            [
                (1, "m/a", "posted", true, true),
                (1, "m/b", "posted", true, true),
                (2, "m/c", "held", true, false),
            ]
        );
        let row = txn(&batch, "t");
        assert_eq!((row.status.as_str(), row.finished), ("committed", true));
        assert_eq!((row.created_ms, row.updated_ms), (500, 1_010));
        // Finished legs are not finished again.
        let again = batch.finish(&posted, "t", "voided", "aborted").1;
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_reserve_merges_into_a_stored_row_and_keeps_its_status() {
        let mut batch = stored();
        let from = [(activity::FROM_KEY, "a/x"), (KIND_KEY, "other")];
        let reserved = event(3, 1, reserve("t", vec![leg("a/x", -7)], &from));
        let mut activities = ActivityRows::default();
        let mut early = reserved.clone();
        early.timestamp_ms = 400;
        batch.apply(&mut activities, &early).unwrap();
        let row = txn(&batch, "t");
        assert_eq!(row.tenant, "a");
        assert_eq!((row.created_ms, row.updated_ms), (400, 600));
        assert_eq!(
            (row.status.as_str(), row.kind.as_str()),
            ("pending", "payment")
        );
        assert!(row.changed && !row.finished);
        assert_eq!(leg_states(&batch, "t")[3], (3, "a/x", "held", false, true));
    }

    #[test]
    fn a_transaction_reserved_and_posted_in_one_batch_is_written_committed_and_posted() {
        let mut batch = Transactions::default();
        let mut activities = ActivityRows::default();
        let legs = vec![leg("m/a", -3), leg("m/b", 3)];
        for kind in [reserve("n", legs, &[(KIND_KEY, "payment")]), post("n")] {
            batch.apply(&mut activities, &event(1, 1, kind)).unwrap();
        }
        let row = txn(&batch, "n");
        assert_eq!(
            (row.status.as_str(), row.tenant.as_str()),
            ("committed", "")
        );
        assert!(row.finished && row.changed);
        assert_eq!(
            leg_states(&batch, "n"),
            [
                (1, "m/a", "posted", false, true),
                (1, "m/b", "posted", false, true),
            ]
        );
    }

    #[test]
    fn a_capture_by_the_held_wallet_posts_the_hold() {
        let mut batch = Transactions::default();
        let mut activities = ActivityRows::default();
        let placed = Kind::PlaceHold(pb::PlaceHold {
            hold_id: "h".into(),
            account_id: "m/alice".into(),
            amount: Some(Amount {
                minor_units: "9".into(),
            }),
            currency: "USD".into(),
            metadata: metadata(&[(KIND_KEY, "hold")]),
        });
        batch.apply(&mut activities, &event(1, 1, placed)).unwrap();
        let captures = metadata(&[(activity::HOLD_KEY, "h"), (activity::FROM_KEY, "m/alice")]);
        let capture = |payer: &str| {
            let mut captured = event(
                1,
                2,
                Kind::Batch(pb::Batch {
                    txn_id: "c".into(),
                    legs: vec![leg("m/alice", -9), leg("m/shop", 9)],
                    metadata: captures.clone(),
                    ..Default::default()
                }),
            );
            captured.accounts = vec![pb::Account {
                account_id: payer.into(),
                ..Default::default()
            }];
            captured
        };
        // On a shard the payer is not on, the hold stays open.
        batch.apply(&mut activities, &capture("m/shop")).unwrap();
        assert_eq!(txn(&batch, "h").status, "authorized");
        batch.apply(&mut activities, &capture("m/alice")).unwrap();
        assert_eq!(txn(&batch, "h").status, "captured");
        assert_eq!(
            leg_states(&batch, "h"),
            [(1, "m/alice", "posted", false, true)]
        );
        assert_eq!(batch.legs["h"][0].amount, -9);
    }

    #[test]
    fn a_bulk_load_forgets_what_holds_no_leg_and_merges_what_comes_back() {
        let mut kept = Transactions {
            bulk: Some(Bulk {
                direct: true,
                ..Bulk::default()
            }),
            ..Transactions::default()
        };
        let mut activities = ActivityRows::default();
        let ids = |kept: &Transactions| kept.txns.keys().cloned().collect::<Vec<_>>();
        let payment = [(KIND_KEY, "payment")];
        let reserved = reserve("t", vec![leg("m/a", -4), leg("m/b", 4)], &payment);
        let held = reserve("h", vec![leg("m/a", -1)], &[]);
        for (seq, kind) in [(1, reserved), (2, held)] {
            kept.apply(&mut activities, &event(1, seq, kind)).unwrap();
        }
        let mut rows = Drained::default();
        kept.drain(&mut rows, false);
        assert!(rows.legs.is_empty() && rows.txns.is_empty() && rows.parts.is_empty());
        assert_eq!(ids(&kept), ["h", "t"]);

        // Posted: its legs and its row are written, straight to the table, and it is forgotten.
        kept.apply(&mut activities, &event(1, 3, post("t")))
            .unwrap();
        let mut rows = Drained::default();
        kept.drain(&mut rows, false);
        assert!(!rows.legs.is_empty() && !rows.txns.is_empty() && rows.parts.is_empty());
        assert_eq!(ids(&kept), ["h"]);

        // Reached again (reserved on another shard): kept while it holds a leg, then written as
        // a part to merge with the first row, like a finish of a transaction it does not know.
        let again = reserve("t", vec![leg("m/c", 2)], &payment);
        kept.apply(&mut activities, &event(2, 1, again)).unwrap();
        let voided = Kind::Void(pb::Void {
            txn_id: "u".into(),
            owner: None,
        });
        kept.apply(&mut activities, &event(2, 2, voided)).unwrap();
        let mut rows = Drained::default();
        kept.drain(&mut rows, false);
        assert!(rows.legs.is_empty() && rows.txns.is_empty() && !rows.parts.is_empty());
        assert_eq!(ids(&kept), ["h", "t"]);

        // At the end everything is written, held legs as held, and nothing is kept.
        let mut rows = Drained::default();
        kept.drain(&mut rows, true);
        assert!(!rows.legs.is_empty() && !rows.txns.is_empty() && !rows.parts.is_empty());
        assert!(kept.txns.is_empty() && kept.legs.is_empty());
        assert_eq!(kept.bulk.as_ref().map(|bulk| bulk.parts), Some(2));
    }

    #[test]
    fn finishing_an_unknown_transaction_changes_nothing() {
        let mut batch = Transactions::default();
        let voided = event(
            1,
            1,
            Kind::Void(pb::Void {
                txn_id: "x".into(),
                owner: None,
            }),
        );
        let (metadata, legs) = batch.finish(&voided, "x", "voided", "aborted");
        assert!(metadata.is_empty() && legs.is_empty());
        assert!(batch.txns.is_empty() && batch.legs.is_empty());
    }
}
