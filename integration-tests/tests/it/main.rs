//! The platform's integration tests: one binary, one module per area.

mod chaos;
mod connector;
mod console;
mod coordinator;
mod gateway;
mod harness_kafka;
mod harness_postgres;
mod harness_process;
mod manifests;
mod projection;
mod storage_cluster;
mod walletctl;
