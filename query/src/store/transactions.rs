//! The `transactions` and `transaction_legs` rows of a batch. Events read these rows back (a
//! post finds the legs its reserve held), so a batch loads the rows its events reach (one or
//! two queries), applies its events to them in memory, in order, and writes what changed with
//! one statement.

use std::collections::{BTreeMap, BTreeSet};

use proto::auticuro::v1 as pb;
use proto::auticuro::v1::command::Kind;
use sqlx::{Postgres, Row, Transaction};

use super::{event_time, metadata_json, tenant_of, units, ActivityRows, Movement, StoreError};
use crate::activity::{self, ActivityKind, KIND_KEY};

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

/// The transactions the events of a batch reach, by id (`None`: no row yet), and their legs on
/// the batch's shards. A shard's legs change only with that shard's events, which one writer
/// projects at a time; a transaction's row is shared by its shards' writers, so what the batch
/// changes in it is merged into the stored row when written ([`Transactions::write`]).
#[derive(Default)]
pub(super) struct Transactions {
    txns: BTreeMap<String, Option<Txn>>,
    legs: BTreeMap<String, Vec<Leg>>,
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

/// Stored legs that changed are written by their primary key (`ON CONFLICT`), so each is found
/// through the index however many legs there are. Transactions the batch did not post or void
/// keep a stored row's status; the others take the batch's. Both merge the rest: the least
/// tenant (in byte order, as [`Transactions::insert`] compares) and creation time, the greatest
/// update time.
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
    new_legs AS (
        INSERT INTO transaction_legs (txn_id, shard_id, account_id, amount, currency, state)
        SELECT txn_id, shard_id, account_id, amount::numeric, currency, state
        FROM unnest($9::text[], $10::int4[], $11::text[], $12::text[], $13::text[], $14::text[])
            AS l(txn_id, shard_id, account_id, amount, currency, state)),
    changed_legs AS (
        INSERT INTO transaction_legs (txn_id, shard_id, account_id, amount, currency, state)
        SELECT txn_id, shard_id, account_id, amount::numeric, currency, state
        FROM unnest($15::text[], $16::int4[], $17::text[], $18::text[], $19::text[], $20::text[])
            AS l(txn_id, shard_id, account_id, amount, currency, state)
        ON CONFLICT (txn_id, account_id) DO UPDATE SET state = excluded.state)
    SELECT 1"#;

impl Transactions {
    /// Loads the rows the batch's `events` reach: the transactions they name, and the holds
    /// that captures among them name in their metadata. A post's metadata is its reserve's,
    /// which is an event of the batch or a row the first query loads, so a second query (the
    /// holds only loaded metadata names) finds the rest.
    pub(super) async fn load(
        tx: &mut Transaction<'static, Postgres>,
        events: &[pb::Event],
        shard_ids: &[i32],
    ) -> Result<Transactions, StoreError> {
        let mut batch = Transactions::default();
        let mut ids = BTreeSet::new();
        for event in events {
            let Some(kind) = event.command.as_ref().and_then(|c| c.kind.as_ref()) else {
                continue;
            };
            let (id, metadata) = match kind {
                Kind::Batch(b) => (Some(&b.txn_id).filter(|id| !id.is_empty()), Some(&b.metadata)),
                Kind::Reserve(r) => (Some(&r.txn_id), Some(&r.metadata)),
                Kind::Post(p) => (Some(&p.txn_id), None),
                Kind::Void(v) => (Some(&v.txn_id), None),
                Kind::PlaceHold(h) => (Some(&h.hold_id), Some(&h.metadata)),
                Kind::VoidHold(v) => (Some(&v.hold_id), None),
                _ => (None, None),
            };
            ids.extend(id.cloned());
            ids.extend(metadata.and_then(|m| m.get(activity::HOLD_KEY)).cloned());
        }
        batch.fetch(tx, ids, shard_ids).await?;
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
        let rows = sqlx::query(LOAD)
            .bind(&ids)
            .bind(shard_ids)
            .fetch_all(&mut **tx)
            .await?;
        self.txns.extend(ids.into_iter().map(|id| (id, None)));
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
                .map(|((((shard_id, account_id), amount), currency), state)| Leg {
                    shard_id: shard_id as u32,
                    account_id,
                    amount: amount.parse().unwrap_or(0),
                    currency,
                    state,
                    stored: true,
                    changed: false,
                })
                .collect();
            self.legs.insert(txn_id.clone(), legs);
            self.txns.insert(txn_id, Some(txn));
        }
        Ok(())
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
        self.legs.entry(txn_id.to_string()).or_default().extend(added);
        let time = event.timestamp_ms;
        match self.txns.get_mut(txn_id) {
            Some(Some(txn)) => {
                if tenant < txn.tenant.as_str() {
                    txn.tenant = tenant.to_string();
                }
                txn.created_ms = txn.created_ms.min(time);
                txn.updated_ms = txn.updated_ms.max(time);
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
        let mut finished: Vec<Movement> = Vec::new();
        for leg in self.legs.get_mut(txn_id).into_iter().flatten() {
            if leg.shard_id == event.shard_id && leg.state == "held" {
                leg.state = leg_state.to_string();
                leg.changed = true;
                finished.push((leg.account_id.clone(), leg.amount, leg.currency.clone()));
            }
        }
        finished.sort_by(|a, b| (a.1 >= 0, &a.0).cmp(&(b.1 >= 0, &b.0)));
        let Some(Some(txn)) = self.txns.get_mut(txn_id) else {
            return (BTreeMap::new(), finished);
        };
        txn.status = status.to_string();
        txn.updated_ms = txn.updated_ms.max(event.timestamp_ms);
        txn.finished = true;
        txn.changed = true;
        (txn.metadata.clone(), finished)
    }

    /// Writes what the batch changed, in one statement (none when nothing changed).
    pub(super) async fn write(
        self,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), StoreError> {
        let mut txns = TxnColumns::default();
        for (txn_id, txn) in self.txns {
            let Some(txn) = txn.filter(|txn| txn.changed) else {
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
        let (mut added, mut changed) = (LegColumns::default(), LegColumns::default());
        for (txn_id, legs) in self.legs {
            for leg in legs.into_iter().filter(|leg| leg.changed) {
                let columns = if leg.stored { &mut changed } else { &mut added };
                columns.txn_ids.push(txn_id.clone());
                columns.shard_ids.push(leg.shard_id as i32);
                columns.accounts.push(leg.account_id);
                columns.amounts.push(leg.amount.to_string());
                columns.currencies.push(leg.currency);
                columns.states.push(leg.state);
            }
        }
        if txns.ids.is_empty() && added.txn_ids.is_empty() && changed.txn_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(WRITE)
            .bind(txns.ids)
            .bind(txns.tenants)
            .bind(txns.kinds)
            .bind(txns.statuses)
            .bind(txns.metadata)
            .bind(txns.created_ms)
            .bind(txns.updated_ms)
            .bind(txns.finished)
            .bind(added.txn_ids)
            .bind(added.shard_ids)
            .bind(added.accounts)
            .bind(added.amounts)
            .bind(added.currencies)
            .bind(added.states)
            .bind(changed.txn_ids)
            .bind(changed.shard_ids)
            .bind(changed.accounts)
            .bind(changed.amounts)
            .bind(changed.currencies)
            .bind(changed.states)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
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
