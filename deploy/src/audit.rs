//! `walletctl audit`: checks a running platform against its invariants, from the outside.
//!
//! - Conservation: on every storage shard the balances of each currency sum to zero (clearing
//!   accounts included), at the shard's last event.
//! - Pending amounts versus what explains them: when no coordinator has a transaction in flight,
//!   no account has anything pending but its open authorization holds.
//! - Projections versus shards: every account of the read side's `accounts` table equals the
//!   shard's account as of the seq the projection says it applied, and no account is missing.
//! - Replicas: replicas of a shard at the same applied index have equal state digests.
//! - One outcome per transaction: no transaction is posted on one shard and voided on another.
//!
//! Shard state is rebuilt from each shard's event log (every event carries the accounts it
//! touched, after the command), so the audit needs no access to the shards' disks.

use std::collections::BTreeMap;

use auticuro::client::channel;
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
}

impl ShardState {
    /// Follows the holds through one event.
    fn track_holds(&mut self, event: &pb::Event) {
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
            }
            Kind::Reserve(reserve) if !reserve.hold_id.is_empty() => {
                self.capturing
                    .insert(reserve.txn_id.clone(), reserve.hold_id.clone());
            }
            Kind::Post(post) => {
                if let Some(hold_id) = self.capturing.remove(&post.txn_id) {
                    self.open_holds.remove(&hold_id);
                }
                self.settled.insert(post.txn_id.clone(), true);
            }
            Kind::Void(void) => {
                self.capturing.remove(&void.txn_id);
                self.settled.insert(void.txn_id.clone(), false);
            }
            _ => {}
        }
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
                    state.track_holds(event);
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
    let (offsets, projected) = projection(database_url).await?;
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
    for (shard_id, replicas) in &topology.storage_shards {
        checks.push(replica_digests(*shard_id, replicas).await);
        let projected_seq = offsets.get(shard_id).copied().unwrap_or(0);
        let state = shard_state(replicas, projected_seq).await?;
        for (txn_id, posted) in &state.settled {
            let (posts, voids) = outcomes.entry(txn_id.clone()).or_default();
            if *posted { posts } else { voids }.push(*shard_id);
        }

        let mut sums: BTreeMap<&str, i128> = BTreeMap::new();
        for account in state.last.values() {
            *sums.entry(account.currency.as_str()).or_default() += minor(&account.balance);
        }
        let unbalanced: Vec<String> = sums
            .iter()
            .filter(|(_, sum)| **sum != 0)
            .map(|(currency, sum)| format!("{currency} sums to {sum}"))
            .collect();
        checks.push(Check {
            name: format!("shard {shard_id}: conservation"),
            ok: unbalanced.is_empty(),
            detail: if unbalanced.is_empty() {
                format!(
                    "{} currencies sum to zero at seq {}",
                    sums.len(),
                    state.last_seq
                )
            } else {
                unbalanced.join("; ")
            },
        });

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
            let digest = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                RaftAdminClient::new(channel).digest(raft::DigestRequest {}),
            )
            .await;
            if let Ok(Ok(digest)) = digest {
                let digest = digest.into_inner();
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
            state.track_holds(&event(Kind::PlaceHold(pb::PlaceHold {
                hold_id: hold_id.into(),
                account_id: "t/a".into(),
                amount: amount("10"),
                ..Default::default()
            })));
        }
        state.track_holds(&event(Kind::VoidHold(pb::VoidHold {
            hold_id: "h1".into(),
        })));
        // h2: a reservation draws from it and is voided (it stays open); h3: one is posted.
        for (txn_id, hold_id) in [("t2", "h2"), ("t3", "h3")] {
            state.track_holds(&event(Kind::Reserve(pb::Reserve {
                txn_id: txn_id.into(),
                hold_id: hold_id.into(),
                ..Default::default()
            })));
        }
        state.track_holds(&event(Kind::Void(pb::Void {
            txn_id: "t2".into(),
            owner: None,
        })));
        state.track_holds(&event(Kind::Post(pb::Post {
            txn_id: "t3".into(),
            owner: None,
        })));
        assert_eq!(state.held(), BTreeMap::from([("t/a", 10)]));
        assert_eq!(
            state.settled,
            BTreeMap::from([("t2".to_string(), false), ("t3".to_string(), true)])
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
