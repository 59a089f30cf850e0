//! Auticuro: the storage shard of the wallet platform.
//!
//! `ledger` is the pure, deterministic core. `machine` adapts it to Raft and RocksDB, `convert`,
//! `service` and `events` (the event stream from the stored bytes) to gRPC, and `server` starts a
//! replica.

pub mod client;
pub mod convert;
pub mod events;
pub mod fencer;
pub mod ledger;
pub mod machine;
pub mod resolver;
pub mod routing;
pub mod server;
pub mod service;
