//! The read side of the wallet platform: the connector that publishes every storage shard's
//! event log to Kafka exactly once and in order; the projector that turns the events into
//! Postgres tables (from Kafka, or straight from the shards); the account query service that
//! reads them with read-your-write; and the account hierarchy service.

pub mod activity;
pub mod connector;
pub mod copy;
pub mod cursor;
pub mod hierarchy;
pub mod metrics;
pub mod progress;
pub mod projector;
pub mod service;
pub mod snapshot;
pub mod store;

/// The topic every storage shard's events go to (key = shard id).
pub const LEDGER_TOPIC: &str = "wallet.ledger.events";
/// The topic every coordinator shard's transaction events go to (key = coordinator shard id).
pub const MARKER_TOPIC: &str = "wallet.marker.transactions";
