//! A deterministic simulation of the platform's money protocols: storage shards running the
//! real ledger core (`auticuro::ledger`), a coordinator running the real saga core and the real
//! per-transaction protocol (`marker::saga`, `marker::protocol`), the stale-hold resolution
//! between them, clients that retry with their idempotency keys (payments, some with fees, and
//! authorization holds captured in full, in part or beyond, then voided), and an operator who
//! force-aborts — all on a simulated network and clock driven by one seeded generator.
//!
//! Each Raft group is one durable, linearizable state machine here (replication is covered by
//! the real-process tests); what is simulated is everything between the groups. Per seed, the
//! fault phase crashes and restarts the coordinator (losing everything it had not written to its
//! log) and storage shards, partitions links, loses, duplicates, delays and reorders messages,
//! skews and jumps clocks, and force-aborts transactions. The protocol invariants are checked
//! after every event; then the faults stop and every transaction must reach its outcome
//! (liveness), with balances exactly as the decisions say. The same seed replays the same run.

mod rng;
mod world;

pub use rng::Rng;
pub use world::{Config, Failure, Report, run};
