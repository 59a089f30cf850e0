//! `walletctl audit`: checks a running platform against its invariants, from the outside.
//!
//! - Conservation: on every storage shard and over all of them, the balances of each currency
//!   sum to zero (clearing accounts included), at the shards' last events.
//! - Deposits minus withdrawals: on every shard and over all of them, the customer and clearing
//!   balances (every account but the funding accounts) equal what the commands in the event
//!   log moved out of funding accounts minus what they moved into them. The balances come from
//!   the accounts each event carries, the flows from the commands: two records that must agree.
//! - Pending amounts versus what explains them: when no coordinator has a transaction in flight,
//!   no account has anything pending but its open authorization holds; and whenever, every
//!   reservation still held belongs to a transaction its owner coordinator has not finished.
//! - Projections versus shards: every account of the read side's `accounts` table equals the
//!   shard's account as of the seq the projection says it applied, and no account is missing.
//! - Replicas: replicas of a shard at the same applied index have equal state digests.
//! - Once: no request id appears twice in a shard's event log (nothing applied twice).
//! - One outcome per transaction: no transaction is posted on one shard and voided on another.
//!
//! Shard state is rebuilt from each shard's event log (every event carries the accounts it
//! touched, after the command), so the audit needs no access to the shards' disks.

use std::collections::BTreeMap;

use auticuro::client::channel;
use consensus::client::admin_call;
use proto::auticuro::v1 as pb;
use proto::auticuro::v1::ledger_client::LedgerClient;
use proto::raft::v1 as raft;
use proto::raft::v1::raft_admin_client::RaftAdminClient;
use sqlx::Row;

use crate::{Error, Result};

/// Events read per `ReadEvents` call.
const PAGE: u32 = 1_000;

/// One check's verdict.
#[derive(Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Every account of a shard as its events leave it: at `at` (the projection's seq) and at the
/// shard's last event.
#[derive(Default)]
struct ShardState {
    at: BTreeMap<String, pb::Account>,
    last: BTreeMap<String, pb::Account>,
    last_seq: u64,
    /// Authorization holds not captured or voided at the last event: hold id → (account, amount).
    open_holds: BTreeMap<String, (String, i128)>,
    /// Reservations that draw from a hold: transaction id → hold id.
    capturing: BTreeMap<String, String>,
    /// Transactions posted (`true`) or voided (`false`) here.
    settled: BTreeMap<String, bool>,
    /// Reservations held at the last event: transaction id → (owner coordinator shard, legs).
    reserved: BTreeMap<String, (u32, Vec<pb::Leg>)>,
    /// Per currency, what commands moved out of funding accounts minus what they moved in.
    funded: BTreeMap<String, i128>,
    request_ids: std::collections::BTreeSet<String>,
    /// Request ids of more than one event: commands applied twice.
    applied_twice: Vec<String>,
}

/// Funding accounts (`<tenant>/sys:funding:<currency>`, or a shard's own in tests) are where
/// deposits come from and withdrawals go: the platform's edge.
fn is_funding(account_id: &str) -> bool {
    account_id.contains("sys:funding:")
}

impl ShardState {
    /// Follows holds, reservations and money crossing the funding accounts through one event.
    fn track(&mut self, event: &pb::Event) {
        use pb::command::Kind;
        let Some(kind) = event.command.as_ref().and_then(|c| c.kind.as_ref()) else {
            return;
        };
        match kind {
            Kind::PlaceHold(hold) => {
                let amount = (hold.account_id.clone(), minor(&hold.amount));
                self.open_holds.insert(hold.hold_id.clone(), amount);
            }
            Kind::VoidHold(void) => {
                self.open_holds.remove(&void.hold_id);
            }
            Kind::Batch(batch) => {
                self.open_holds.remove(&batch.hold_id);
                self.fund(&batch.legs);
            }
            Kind::Transfer(transfer) => {
                let amount = minor(&transfer.amount);
                for (account_id, sign) in [
                    (&transfer.from_account_id, -1),
                    (&transfer.to_account_id, 1),
                ] {
                    if is_funding(account_id) {
                        *self.funded.entry(transfer.currency.clone()).or_default() -= sign * amount;
                    }
                }
            }
            Kind::Reserve(reserve) => {
                if !reserve.hold_id.is_empty() {
                    self.capturing
                        .insert(reserve.txn_id.clone(), reserve.hold_id.clone());
                }
                let owner = reserve.owner.as_ref().map_or(0, |o| o.coordinator_shard_id);
                self.reserved
                    .insert(reserve.txn_id.clone(), (owner, reserve.legs.clone()));
            }
            Kind::Post(post) => {
                if let Some(hold_id) = self.capturing.remove(&post.txn_id) {
                    self.open_holds.remove(&hold_id);
                }
                if let Some((_, legs)) = self.reserved.remove(&post.txn_id) {
                    self.fund(&legs);
                }
                self.settled.insert(post.txn_id.clone(), true);
            }
            Kind::Void(void) => {
                self.capturing.remove(&void.txn_id);
                self.reserved.remove(&void.txn_id);
                self.settled.insert(void.txn_id.clone(), false);
            }
            _ => {}
        }
    }

    /// Counts what applied legs moved out of (and into) funding accounts.
    fn fund(&mut self, legs: &[pb::Leg]) {
        for leg in legs.iter().filter(|leg| is_funding(&leg.account_id)) {
            *self.funded.entry(leg.currency.clone()).or_default() -= minor(&leg.amount);
        }
    }

    /// Per currency: the sum of every balance, and of every balance but the funding accounts'.
    fn sums(&self) -> BTreeMap<String, (i128, i128)> {
        let mut sums: BTreeMap<String, (i128, i128)> = BTreeMap::new();
        for account in self.last.values() {
            let (all, inside) = sums.entry(account.currency.clone()).or_default();
            *all += minor(&account.balance);
            if !is_funding(&account.account_id) {
                *inside += minor(&account.balance);
            }
        }
        sums
    }

    /// Per account, what its open holds keep in `pending_out`.
    fn held(&self) -> BTreeMap<&str, i128> {
        let mut held = BTreeMap::new();
        for (account_id, amount) in self.open_holds.values() {
            *held.entry(account_id.as_str()).or_default() += amount;
        }
        held
    }
}

fn minor(amount: &Option<proto::common::v1::Amount>) -> i128 {
    amount
        .as_ref()
        .and_then(|a| a.minor_units.parse().ok())
        .unwrap_or(0)
}

fn setup(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |error| Error::Setup(format!("{what}: {error}"))
}

/// Reads a shard's whole event log from its first replica that answers.
async fn shard_state(replicas: &[String], at: u64) -> Result<ShardState> {
    let mut last_error = String::from("no replica");
    for address in replicas {
        let Ok(channel) = channel(address) else {
            continue;
        };
        let mut client = LedgerClient::new(channel);
        let mut state = ShardState::default();
        let mut from = 1;
        let result: std::result::Result<(), tonic::Status> = async {
            loop {
                let page = client
                    .read_events(pb::ReadEventsRequest {
                        from_seq: from,
                        to_seq: 0,
                        limit: PAGE,
                    })
                    .await?
                    .into_inner();
                for event in &page.events {
                    for account in &event.accounts {
                        if event.seq <= at {
                            state.at.insert(account.account_id.clone(), account.clone());
                        }
                        state
                            .last
                            .insert(account.account_id.clone(), account.clone());
                    }
                    state.track(event);
                    if !state.request_ids.insert(event.request_id.clone()) {
                        state.applied_twice.push(event.request_id.clone());
                    }
                    state.last_seq = event.seq;
                }
                if page.events.is_empty() || state.last_seq >= page.applied_seq {
                    return Ok(());
                }
                from = state.last_seq + 1;
            }
        }
        .await;
        match result {
            Ok(()) => return Ok(state),
            Err(status) => last_error = format!("{address}: {status}"),
        }
    }
    Err(Error::Setup(format!("reading the event log: {last_error}")))
}

/// The read side's accounts of each shard and the seq each shard is projected to, read in one
/// snapshot.
async fn projection(
    database_url: &str,
) -> Result<(
    BTreeMap<u32, u64>,
    BTreeMap<u32, BTreeMap<String, Vec<String>>>,
)> {
    let pool = query::store::connect(database_url)
        .await
        .map_err(|error| Error::Setup(format!("the query database: {error}")))?;
    let sql = |error: sqlx::Error| Error::Setup(format!("the query database: {error}"));
    let mut tx = pool.begin().await.map_err(sql)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(sql)?;
    let offsets = sqlx::query("SELECT shard_id, applied_seq FROM projection_offsets")
        .fetch_all(&mut *tx)
        .await
        .map_err(sql)?
        .iter()
        .map(|row| (row.get::<i32, _>(0) as u32, row.get::<i64, _>(1) as u64))
        .collect();
    let mut accounts: BTreeMap<u32, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for row in sqlx::query(
        "SELECT shard_id, account_id, balance::text, pending_out::text, pending_in::text,
                version::text, state FROM accounts",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(sql)?
    {
        let fields = (2..7).map(|i| row.get::<String, _>(i)).collect();
        accounts
            .entry(row.get::<i32, _>(0) as u32)
            .or_default()
            .insert(row.get(1), fields);
    }
    tx.commit().await.map_err(sql)?;
    Ok((offsets, accounts))
}

fn fields(account: &pb::Account) -> Vec<String> {
    vec![
        minor(&account.balance).to_string(),
        minor(&account.pending_out).to_string(),
        minor(&account.pending_in).to_string(),
        account.version.to_string(),
        auticuro::convert::state_name(account.state).to_string(),
    ]
}

/// Runs every check against the platform behind `topology`, with the read side in
/// `database_url`.
pub async fn audit(topology: &[String], database_url: &str) -> Result<Vec<Check>> {
    let topology = ::marker::topology::TopologyClient::new(topology.to_vec())
        .get()
        .await
        .map_err(setup("reading the topology"))?;
    audit_groups(&topology, Some(database_url)).await
}

/// Runs every check against the storage and coordinator shards of `topology`, and, with a
/// database, the read side's projections.
pub async fn audit_groups(
    topology: &::marker::topology::Topology,
    database_url: Option<&str>,
) -> Result<Vec<Check>> {
    let (offsets, projected) = match database_url {
        Some(database_url) => projection(database_url).await?,
        None => Default::default(),
    };
    let mut checks = Vec::new();

    let mut coordinators_in_flight = 0;
    // A removed coordinator shard holds nothing (it removed itself only once drained).
    let serving = topology
        .coordinators
        .values()
        .filter(|entry| entry.state != ::marker::topology::CoordinatorState::Removed);
    for entry in serving {
        coordinators_in_flight += ::marker::status::in_flight(&entry.replicas)
            .await
            .ok_or_else(|| Error::Setup("no coordinator replica answered".into()))?;
    }

    // Per transaction, the shards that posted it and the shards that voided it.
    let mut outcomes: BTreeMap<String, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
    // Over all shards, per currency: (every balance, every balance but funding accounts').
    let mut overall: BTreeMap<String, (i128, i128)> = BTreeMap::new();
    let mut funded: BTreeMap<String, i128> = BTreeMap::new();
    // Reservations still held: (shard, transaction, owner coordinator shard).
    let mut reserved: Vec<(u32, String, u32)> = Vec::new();
    for (shard_id, replicas) in &topology.storage_shards {
        checks.push(replica_digests(*shard_id, replicas).await);
        let projected_seq = offsets.get(shard_id).copied().unwrap_or(0);
        let state = shard_state(replicas, projected_seq).await?;
        checks.push(Check {
            name: format!("shard {shard_id}: each request applied once"),
            ok: state.applied_twice.is_empty(),
            detail: if state.applied_twice.is_empty() {
                format!("{} events, no request id twice", state.last_seq)
            } else {
                format!("applied twice: {}", state.applied_twice.join(", "))
            },
        });
        for (txn_id, posted) in &state.settled {
            let (posts, voids) = outcomes.entry(txn_id.clone()).or_default();
            if *posted { posts } else { voids }.push(*shard_id);
        }

        let sums = state.sums();
        checks.push(conservation(
            format!("shard {shard_id}: conservation"),
            &sums,
            state.last_seq,
        ));
        checks.push(deposits_minus_withdrawals(
            format!("shard {shard_id}: deposits minus withdrawals"),
            &sums,
            &state.funded,
        ));
        for (currency, (all, inside)) in sums {
            let total = overall.entry(currency).or_default();
            total.0 += all;
            total.1 += inside;
        }
        for (currency, amount) in &state.funded {
            *funded.entry(currency.clone()).or_default() += amount;
        }
        for (txn_id, (owner, _)) in &state.reserved {
            reserved.push((*shard_id, txn_id.clone(), *owner));
        }

        let held = state.held();
        let pending: Vec<&str> = state
            .last
            .values()
            .filter(|a| {
                let on_hold = held.get(a.account_id.as_str()).copied().unwrap_or(0);
                minor(&a.pending_out) != on_hold || minor(&a.pending_in) != 0
            })
            .map(|a| a.account_id.as_str())
            .collect();
        let holds_ok = coordinators_in_flight > 0 || pending.is_empty();
        checks.push(Check {
            name: format!("shard {shard_id}: pending vs in-flight and holds"),
            ok: holds_ok,
            detail: match (coordinators_in_flight, pending.len()) {
                (0, 0) => format!(
                    "nothing in flight, nothing pending but {} open holds",
                    state.open_holds.len()
                ),
                (0, _) => format!(
                    "nothing in flight but pending beyond open holds on {}",
                    pending.join(", ")
                ),
                (n, held) => format!("{n} in flight, {held} accounts pending (not compared)"),
            },
        });

        if database_url.is_some() {
            let empty = BTreeMap::new();
            let rows = projected.get(shard_id).unwrap_or(&empty);
            let mut wrong: Vec<String> = Vec::new();
            for (account_id, account) in &state.at {
                match rows.get(account_id) {
                    Some(row) if *row == fields(account) => {}
                    Some(row) => wrong.push(format!(
                        "{account_id}: projected {row:?}, shard {:?}",
                        fields(account)
                    )),
                    None => wrong.push(format!("{account_id}: missing from the projection")),
                }
            }
            for account_id in rows.keys() {
                if !state.at.contains_key(account_id) {
                    wrong.push(format!("{account_id}: projected but not on the shard"));
                }
            }
            checks.push(Check {
                name: format!("shard {shard_id}: projection"),
                ok: wrong.is_empty(),
                detail: if wrong.is_empty() {
                    format!(
                        "{} accounts match at seq {projected_seq} (shard at {})",
                        state.at.len(),
                        state.last_seq
                    )
                } else {
                    wrong.join("; ")
                },
            });
        }
    }
    checks.push(conservation("all shards: conservation".into(), &overall, 0));
    checks.push(deposits_minus_withdrawals(
        "all shards: deposits minus withdrawals".into(),
        &overall,
        &funded,
    ));
    checks.push(live_reservations(topology, &reserved).await?);
    let split = split_outcomes(&outcomes);
    checks.push(Check {
        name: "transactions: one outcome on every shard".into(),
        ok: split.is_empty(),
        detail: if split.is_empty() {
            format!("{} transactions settled", outcomes.len())
        } else {
            split.join("; ")
        },
    });
    Ok(checks)
}

/// Every currency sums to zero (`seq` 0: over all shards).
fn conservation(name: String, sums: &BTreeMap<String, (i128, i128)>, seq: u64) -> Check {
    let unbalanced: Vec<String> = sums
        .iter()
        .filter(|(_, (all, _))| *all != 0)
        .map(|(currency, (all, _))| format!("{currency} sums to {all}"))
        .collect();
    let at = if seq > 0 {
        format!(" at seq {seq}")
    } else {
        String::new()
    };
    Check {
        name,
        ok: unbalanced.is_empty(),
        detail: if unbalanced.is_empty() {
            format!("{} currencies sum to zero{at}", sums.len())
        } else {
            unbalanced.join("; ")
        },
    }
}

/// The money inside (every balance but the funding accounts') equals what came in through
/// funding accounts minus what went out, per currency.
fn deposits_minus_withdrawals(
    name: String,
    sums: &BTreeMap<String, (i128, i128)>,
    funded: &BTreeMap<String, i128>,
) -> Check {
    let currencies: std::collections::BTreeSet<&String> =
        sums.keys().chain(funded.keys()).collect();
    let mut wrong = Vec::new();
    for currency in &currencies {
        let inside = sums.get(*currency).map_or(0, |(_, inside)| *inside);
        let net = funded.get(*currency).copied().unwrap_or(0);
        if inside != net {
            wrong.push(format!(
                "{currency}: customer and clearing balances {inside}, deposited minus withdrawn {net}"
            ));
        }
    }
    Check {
        name,
        ok: wrong.is_empty(),
        detail: if wrong.is_empty() {
            format!(
                "{} currencies: balances equal deposited minus withdrawn",
                currencies.len()
            )
        } else {
            wrong.join("; ")
        },
    }
}

/// Every reservation still held belongs to a transaction its owner coordinator has not finished.
/// One that looks orphaned is read again on its shard, since it may have settled meanwhile.
async fn live_reservations(
    topology: &::marker::topology::Topology,
    reserved: &[(u32, String, u32)],
) -> Result<Check> {
    let deadline = || std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut orphans = Vec::new();
    for (shard_id, txn_id, owner) in reserved {
        let live = match topology.coordinators.get(owner) {
            Some(entry) => ::marker::client::CoordinatorClient::new(*owner, entry.replicas.clone())
                .get(txn_id, deadline())
                .await
                .map_err(|unknown| Error::Setup(format!("asking coordinator {owner}: {unknown}")))?
                .is_some_and(|transaction| !transaction.done),
            None => false,
        };
        if live {
            continue;
        }
        let replicas = &topology.storage_shards[shard_id];
        let still_held = auticuro::client::ShardClient::new(*shard_id, replicas.clone())
            .transaction_legs(txn_id, deadline())
            .await
            .map_err(|unknown| Error::Setup(format!("reading shard {shard_id}: {unknown}")))?
            .state
            == pb::LegState::Held as i32;
        if still_held {
            orphans.push(format!(
                "{txn_id} held on shard {shard_id}, not in flight on coordinator {owner}"
            ));
        }
    }
    Ok(Check {
        name: "reservations: every one belongs to a live transaction".into(),
        ok: orphans.is_empty(),
        detail: if orphans.is_empty() {
            format!("{} held, each in flight on its coordinator", reserved.len())
        } else {
            orphans.join("; ")
        },
    })
}

/// Transactions posted on some shard and voided on another, described.
fn split_outcomes(outcomes: &BTreeMap<String, (Vec<u32>, Vec<u32>)>) -> Vec<String> {
    outcomes
        .iter()
        .filter(|(_, (posts, voids))| !posts.is_empty() && !voids.is_empty())
        .map(|(txn_id, (posts, voids))| {
            format!("{txn_id} posted on shards {posts:?}, voided on {voids:?}")
        })
        .collect()
}

/// Asks every replica of a shard for its state digest (a few times, while they catch up with
/// one another) and compares those at the same applied index.
async fn replica_digests(shard_id: u32, replicas: &[String]) -> Check {
    let name = format!("shard {shard_id}: replicas agree");
    for _ in 0..20 {
        let mut by_index: BTreeMap<u64, Vec<(String, Vec<u8>)>> = BTreeMap::new();
        for address in replicas {
            let Ok(channel) = channel(address) else {
                continue;
            };
            let mut admin = RaftAdminClient::new(channel);
            if let Ok(digest) = admin_call(admin.digest(raft::DigestRequest {})).await {
                by_index
                    .entry(digest.applied_index)
                    .or_default()
                    .push((address.clone(), digest.digest));
            }
        }
        let compared: Vec<&Vec<(String, Vec<u8>)>> =
            by_index.values().filter(|same| same.len() > 1).collect();
        if let Some(differ) = compared
            .iter()
            .find(|same| same.iter().any(|(_, digest)| *digest != same[0].1))
        {
            let addresses: Vec<&str> = differ.iter().map(|(a, _)| a.as_str()).collect();
            return Check {
                name,
                ok: false,
                detail: format!(
                    "different digests at one applied index: {}",
                    addresses.join(", ")
                ),
            };
        }
        let agreeing: usize = compared.iter().map(|same| same.len()).sum();
        if agreeing == replicas.len() {
            return Check {
                name,
                ok: true,
                detail: format!("{agreeing} replicas, equal digests"),
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Check {
        name,
        ok: false,
        detail: "the replicas never reached one applied index to compare".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::command::Kind;

    fn event(kind: Kind) -> pb::Event {
        pb::Event {
            command: Some(pb::Command {
                request_id: "r".into(),
                kind: Some(kind),
            }),
            ..Default::default()
        }
    }

    fn amount(minor_units: &str) -> Option<proto::common::v1::Amount> {
        Some(proto::common::v1::Amount {
            minor_units: minor_units.into(),
        })
    }

    #[test]
    fn holds_stay_open_until_voided_or_captured_by_a_posted_reservation() {
        let mut state = ShardState::default();
        for hold_id in ["h1", "h2", "h3"] {
            state.track(&event(Kind::PlaceHold(pb::PlaceHold {
                hold_id: hold_id.into(),
                account_id: "t/a".into(),
                amount: amount("10"),
                ..Default::default()
            })));
        }
        state.track(&event(Kind::VoidHold(pb::VoidHold {
            hold_id: "h1".into(),
        })));
        // h2: a reservation draws from it and is voided (it stays open); h3: one is posted.
        for (txn_id, hold_id) in [("t2", "h2"), ("t3", "h3")] {
            state.track(&event(Kind::Reserve(pb::Reserve {
                txn_id: txn_id.into(),
                hold_id: hold_id.into(),
                ..Default::default()
            })));
        }
        state.track(&event(Kind::Void(pb::Void {
            txn_id: "t2".into(),
            owner: None,
        })));
        state.track(&event(Kind::Post(pb::Post {
            txn_id: "t3".into(),
            owner: None,
        })));
        assert_eq!(state.held(), BTreeMap::from([("t/a", 10)]));
        assert_eq!(
            state.settled,
            BTreeMap::from([("t2".to_string(), false), ("t3".to_string(), true)])
        );
    }

    fn leg(account_id: &str, minor_units: &str) -> pb::Leg {
        pb::Leg {
            account_id: account_id.into(),
            amount: amount(minor_units),
            currency: "USD".into(),
        }
    }

    /// Deposits and withdrawals are counted when they move money: a batch or a transfer when
    /// applied, a reservation when posted (never when voided).
    #[test]
    fn money_crossing_the_funding_accounts_is_counted_when_it_moves() {
        let mut state = ShardState::default();
        state.track(&event(Kind::Batch(pb::Batch {
            legs: vec![leg("t/sys:funding:USD", "-100"), leg("t/w1", "100")],
            ..Default::default()
        })));
        for txn_id in ["posted", "voided"] {
            state.track(&event(Kind::Reserve(pb::Reserve {
                txn_id: txn_id.into(),
                owner: Some(pb::Owner {
                    coordinator_shard_id: 2,
                    epoch: 1,
                }),
                legs: vec![leg("t/sys:funding:USD", "-40")],
                ..Default::default()
            })));
        }
        assert_eq!(state.reserved.len(), 2);
        assert_eq!(state.reserved["posted"].0, 2);
        state.track(&event(Kind::Post(pb::Post {
            txn_id: "posted".into(),
            owner: None,
        })));
        state.track(&event(Kind::Void(pb::Void {
            txn_id: "voided".into(),
            owner: None,
        })));
        state.track(&event(Kind::Transfer(pb::Transfer {
            from_account_id: "t/w1".into(),
            to_account_id: "t/sys:funding:USD".into(),
            amount: amount("30"),
            currency: "USD".into(),
            ..Default::default()
        })));
        assert!(state.reserved.is_empty());
        assert_eq!(state.funded, BTreeMap::from([("USD".to_string(), 110)]));

        let sums = BTreeMap::from([("USD".to_string(), (0, 110))]);
        assert!(deposits_minus_withdrawals("d".into(), &sums, &state.funded).ok);
        let off_by_one = BTreeMap::from([("USD".to_string(), (0, 111))]);
        let check = deposits_minus_withdrawals("d".into(), &off_by_one, &state.funded);
        assert!(!check.ok);
        assert!(
            check
                .detail
                .contains("balances 111, deposited minus withdrawn 110")
        );
        assert!(
            !conservation(
                "c".into(),
                &BTreeMap::from([("USD".to_string(), (5, 0))]),
                3
            )
            .ok
        );
    }

    #[test]
    fn a_transaction_posted_on_one_shard_and_voided_on_another_is_reported() {
        let outcomes = BTreeMap::from([
            ("t:ok".to_string(), (vec![1, 2], vec![])),
            ("t:aborted".to_string(), (vec![], vec![1, 2])),
            ("t:split".to_string(), (vec![1], vec![2])),
        ]);
        assert_eq!(
            split_outcomes(&outcomes),
            ["t:split posted on shards [1], voided on [2]"]
        );
    }
}
