//! The read side of the wallet platform. Built so far: the connector that publishes every
//! storage shard's event log to Kafka exactly once, in order.

pub mod connector;
