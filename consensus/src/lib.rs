//! Raft plumbing shared by storage shards (`auticuro`) and coordinator shards (`marker`):
//! openraft over RocksDB, the tonic transport, membership administration and group commit.
//!
//! An application plugs in through [`App`]: a deterministic state machine that applies requests
//! at the leader's timestamp and records what it changed into a RocksDB write batch. This crate
//! owns everything Raft: the log, votes, applied state, snapshots and replication.

mod admin;
mod app;
pub mod batch;
pub mod client;
pub mod event_log;
pub mod group;
pub mod metrics;
mod network;
mod proposer;
pub mod snapshot;
mod store;

pub use admin::{RaftAdminService, leader_redirect, redirect};
pub use app::{App, AppStore, AppView, Proposal, Writes};
pub use group::{Group, GroupOptions, Replica, init_logging, serve};
pub use metrics::RaftMetrics;
pub use network::{MESSAGE_SIZE_MAX, Network, RaftTransportService};
pub use proposer::{ProposeError, Proposer, ProposerLimits, now_ms};
pub use store::{LogStore, StateMachineStore, open_state_machine, open_storage};

use std::fmt;
use std::marker::PhantomData;

#[doc(hidden)]
pub use mimalloc;

/// Makes mimalloc the process's allocator; every service binary's `main.rs` invokes it once, and
/// so does every benchmark's load generator, which shares the cores with the services it
/// measures. They make many short-lived allocations per request (commands, messages, log
/// entries) on few cores, and mimalloc spends far less time in them than the system allocator.
/// It is not set by the libraries, so tests and tools keep the system allocator.
///
/// It is built without transparent huge pages (the `no_thp` feature): otherwise it asks the
/// kernel for them on its arenas, and every first touch of a page it has fetched or purged
/// zeroes 2 MiB. That zeroing took 41–57% of the query process's CPU in a rebuild, and the
/// Raft replicas' latency spikes with it (see docs/benchmarks.md, measurements of 2026-12-05).
#[macro_export]
macro_rules! service_allocator {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::mimalloc::MiMalloc = $crate::mimalloc::MiMalloc;
    };
}

/// The openraft type configuration of a group running application `A`.
pub struct TypeConfig<A>(PhantomData<fn() -> A>);

impl<A> Clone for TypeConfig<A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<A> Copy for TypeConfig<A> {}
impl<A> Default for TypeConfig<A> {
    fn default() -> Self {
        TypeConfig(PhantomData)
    }
}
impl<A> fmt::Debug for TypeConfig<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TypeConfig")
    }
}
impl<A> PartialEq for TypeConfig<A> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<A> Eq for TypeConfig<A> {}
impl<A> PartialOrd for TypeConfig<A> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<A> Ord for TypeConfig<A> {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl<A: App> openraft::RaftTypeConfig for TypeConfig<A> {
    type D = Proposal<A::Request>;
    type R = Vec<A::Response>;
    type NodeId = NodeId;
    type Node = openraft::BasicNode;
    type Entry = openraft::Entry<Self>;
    /// An unnamed temporary file ([`snapshot`]): snapshots are streamed, never held whole.
    type SnapshotData = tokio::fs::File;
    type AsyncRuntime = openraft::TokioRuntime;
    type Responder = openraft::impls::OneshotResponder<Self>;
}

pub type NodeId = u64;
pub type Raft<A> = openraft::Raft<TypeConfig<A>>;

/// Errors of this crate that are not Raft's own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Storage(#[from] rocksdb::Error),
    #[error("decoding {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("corrupt storage: {0}")]
    Corrupt(String),
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the data directory holds storage format {found}, this binary reads format {expected}: \
         start the replica on an empty data directory"
    )]
    StorageFormat { found: u32, expected: u32 },
}

/// A replica that cannot read or write its own storage answers `internal`.
impl From<Error> for tonic::Status {
    fn from(error: Error) -> tonic::Status {
        tonic::Status::internal(error.to_string())
    }
}

/// Raft timing for groups on one machine or one data-centre network.
pub fn raft_config(cluster_name: &str) -> openraft::Config {
    openraft::Config {
        cluster_name: cluster_name.to_owned(),
        // openraft waits one heartbeat interval for the answer to each AppendEntries, then drops
        // it and sends it again. At 50 ms, `bench-storage --batch 256 --clients 16` on the 2-core
        // machine timed out 58–96 AppendEntries per run and in three runs of four a follower
        // started an election; at 100 ms, 18–27 and none in two runs.
        heartbeat_interval: 100,
        // A follower that has heard from a leader waits `election_timeout_max` (openraft's
        // leader lease) plus a random election timeout before it stands: a dead leader is
        // replaced after 450–600 ms.
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Snapshots are sent whole in chunks; give each chunk room on a loaded machine.
        install_snapshot_timeout: 5_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20_000),
        max_in_snapshot_log_to_keep: 1_000,
        purge_batch_size: 1_000,
        // A follower that has fallen behind is sent this many entries at once (each up to
        // `ProposerLimits::entry_requests_max` requests): too many, and on a loaded machine
        // every attempt times out and is sent again whole, so it never catches up.
        max_payload_entries: 32,
        ..Default::default()
    }
}

/// The encoding of everything a group stores or sends: log entries, state rows, snapshots.
pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    encode_into(value, Vec::new())
}

/// [`encode`], appended to `buffer` (which keeps its allocation).
pub fn encode_into<T: serde::Serialize + ?Sized>(value: &T, buffer: Vec<u8>) -> Vec<u8> {
    postcard::to_extend(value, buffer).expect("in-memory encoding cannot fail")
}

pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, Error> {
    postcard::from_bytes(bytes).map_err(|source| Error::Decode { what, source })
}
