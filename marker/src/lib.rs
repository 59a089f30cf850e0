//! Marker: transaction coordinators that run multi-account transfers over the storage shards.
//!
//! `saga` is the pure core (the replicated transaction records); `machine` adapts it to Raft;
//! `driver` carries in-flight transactions to their outcome on the storage shards.

pub mod client;
pub mod crash;
pub mod driver;
pub mod machine;
pub mod metrics;
pub mod saga;
pub mod server;
pub mod service;
pub mod status;
pub mod topology;
