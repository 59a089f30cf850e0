//! Marker: transaction coordinators that run multi-account transfers over the storage shards.
//!
//! `saga` is the pure core (the replicated transaction records); `machine` adapts it to Raft;
//! `protocol` is the pure sequence of steps that carries one transaction to its outcome on the
//! storage shards, and `driver` runs it there.

pub mod client;
pub mod crash;
pub mod driver;
pub mod machine;
pub mod metrics;
pub mod protocol;
pub mod saga;
pub mod server;
pub mod service;
pub mod status;
pub mod topology;
