//! The Raft log and the state machine in one RocksDB instance, in separate column families.
//!
//! - `raft_log`: entries by big-endian index; appended with one synced write per append, so
//!   group commit turns many client commands into one fsync.
//! - `raft_meta`: vote, committed log id, last purged log id.
//! - `sm_meta`: applied log id, membership, last leader timestamp.
//! - the application's own column families, written in the same batch as the applied log id.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Seek};
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DB, DBCompactionStyle, DBCompressionType,
    MemtableFactory, Options, WriteBatch, WriteOptions,
};
use serde::Serialize;

use prometheus_client::metrics::histogram::Histogram;

use crate::RaftMetrics;
use crate::app::{App, AppStore, AppView, Writes};
use crate::event_log;
use crate::{Error, NodeId, TypeConfig, decode, encode};

const LOG: &str = "raft_log";
const RAFT_META: &str = "raft_meta";
const SM_META: &str = "sm_meta";

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
const LAST_TIMESTAMP: &[u8] = b"last_timestamp";
/// Present while a snapshot is being installed: its rows are written in many batches, so a
/// replica that stops before the last one has a state that is neither the old one nor the new.
const INSTALLING: &[u8] = b"installing";
const STORAGE_FORMAT: &[u8] = b"storage_format";

type C<A> = TypeConfig<A>;
type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn read_error(error: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&error).into()
}

fn write_error(error: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&error).into()
}

fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

/// Opens (or creates) the replica's RocksDB and returns its log store and state machine.
pub fn open_storage<A: App>(
    path: &Path,
    node_id: NodeId,
    metrics: &RaftMetrics,
) -> Result<(LogStore<A>, StateMachineStore<A>), Error> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Write back flushed and compacted data as it goes, so a memtable flush never leaves a large
    // dirty backlog in front of the log's fsync (which otherwise stalls commits for ~200 ms).
    options.set_bytes_per_sync(1 << 20);
    // Vector memtables (below) take no concurrent inserts.
    options.set_allow_concurrent_memtable_write(false);
    // A family written seldom (the fences, the holds) would otherwise keep every WAL file since
    // its first unflushed write, up to four times all the memtables (over 1 GiB): beyond this,
    // RocksDB flushes the families holding the oldest WAL file.
    options.set_max_total_wal_size(256 << 20);
    debug_assert!(
        A::READ_FAMILIES
            .iter()
            .all(|family| A::COLUMN_FAMILIES.contains(family)),
        "App::READ_FAMILIES names only families of App::COLUMN_FAMILIES"
    );
    let families = [LOG, RAFT_META, SM_META]
        .iter()
        .chain(A::COLUMN_FAMILIES)
        .map(|name| ColumnFamilyDescriptor::new(*name, family_options::<A>(name, node_id)));
    let db = Arc::new(DB::open_cf_descriptors(&options, path, families)?);
    check_storage_format::<A>(&db)?;
    if get::<Option<LogId<NodeId>>>(&db, SM_META, INSTALLING)?.is_some() {
        forget_all_but_the_vote::<A>(&db)?;
    }
    let log = LogStore {
        db: db.clone(),
        recent: Arc::default(),
    };
    let machine = StateMachineStore::load(db, metrics.apply_seconds.clone())?;
    Ok((log, machine))
}

/// Records `A::STORAGE_FORMAT` in a new data directory; refuses one written in another format
/// (one with data but no format recorded is from before formats were: format 1).
fn check_storage_format<A: App>(db: &DB) -> Result<(), Error> {
    let found = match get::<u32>(db, SM_META, STORAGE_FORMAT)? {
        Some(found) => found,
        None if get::<Vote<NodeId>>(db, RAFT_META, VOTE)?.is_none()
            && get::<Option<LogId<NodeId>>>(db, SM_META, APPLIED)?.is_none() =>
        {
            let cf = db.cf_handle(SM_META).expect("opened");
            db.put_cf_opt(&cf, STORAGE_FORMAT, encode(&A::STORAGE_FORMAT), &synced())?;
            A::STORAGE_FORMAT
        }
        None => 1,
    };
    if found != A::STORAGE_FORMAT {
        return Err(Error::StorageFormat {
            found,
            expected: A::STORAGE_FORMAT,
        });
    }
    Ok(())
}

/// The families read at run time (the log, the metadata, the event log, and the application's
/// `App::READ_FAMILIES`) keep skiplist memtables, small ones: a skiplist that stays in the CPU
/// caches costs less per insert than one grown to RocksDB's default 64 MiB (in bench-coordinator
/// the inserts fell from 14% to 8% of all CPU). A vector memtable would sort a copy of itself
/// for every read. The application's read families are looked up mostly for keys they do not
/// hold (a new request id), so they also get bloom filters, in the memtables and in the files.
///
/// The rest of the application's state is read only when the replica loads it or builds a
/// snapshot. Its memtables are vectors: an insert appends, and the memtable is sorted once, when
/// it is flushed or read, so they can be large, and a transaction's records mostly meet their
/// newer versions before a flush. The sort is a burst of CPU on the flush thread, and the three
/// replicas of a group apply the same writes: with memtables of one size they would all sort at
/// the same moment. (A family whose few rows every command rewrote would fill them with old
/// versions that a flush sorts only to drop: at 32 MiB, 600,000 versions of 1,000 balances took
/// each replica 250 ms of CPU to sort into a 20 KB file. The ledger writes its balances' rows
/// a share at a time instead.) A flush sorts hundreds of thousands of rows (230 ms of CPU for
/// the idempotency records in bench-query): each replica's memtables are sized by its node id
/// (24, 32 or 40 MiB), so the replicas of a group, filling them at the same rate, flush at
/// different moments (they meet only at common multiples: 96,
/// 120 MiB). The state's keys are random (request ids, transaction ids), so every flushed file
/// overlaps all the data below it; leveled compaction would rewrite that ever-growing level on
/// each flush (in bench-storage the idempotency records were written out again 3 to 11 times
/// over). Universal compaction merges files of similar size instead, so each row is rewritten a
/// few times in all.
///
/// The log, the metadata and the read families are stored uncompressed: the log is purged soon
/// after it is written, and the idempotency records (random ids, digests) shrank by a fifth with
/// LZ4, which took about 5% of all CPU in `bench-storage --batch 64`. The event log, kept for
/// good, shrinks to a third and stays compressed, like the rest of the state.
fn family_options<A: App>(family: &str, node_id: NodeId) -> Options {
    let mut options = default_options();
    if [LOG, RAFT_META, SM_META].contains(&family) || A::READ_FAMILIES.contains(&family) {
        options.set_compression_type(DBCompressionType::None);
    }
    if [LOG, RAFT_META, SM_META, event_log::EVENTS].contains(&family) {
        options.set_write_buffer_size(4 << 20);
    } else if A::READ_FAMILIES.contains(&family) {
        options.set_write_buffer_size(4 << 20);
        options.set_compaction_style(DBCompactionStyle::Universal);
        // Most reads look for a key that is nowhere (a new request id): bloom filters answer
        // that for the memtables and for each file without searching them.
        options.set_memtable_prefix_bloom_ratio(0.1);
        options.set_memtable_whole_key_filtering(true);
        // Merged once 8 files are waiting rather than RocksDB's 4: in `bench-storage --batch 64`
        // the idempotency records were read back 1.7 times over by compactions instead of 2.5,
        // for 0.7 µs of a replica's CPU per record instead of 1.0. The extra files cost the
        // lookups little, as an entry's are batched (`Writes::fetch`).
        options.set_level_zero_file_num_compaction_trigger(8);
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        options.set_block_based_table_factory(&table);
    } else {
        options.set_memtable_factory(MemtableFactory::Vector);
        options.set_write_buffer_size(state_memtable_mib(node_id) << 20);
        options.set_compaction_style(DBCompactionStyle::Universal);
    }
    options
}

/// RocksDB's defaults, but for universal compaction (where a family uses it) that moves files
/// whose key ranges do not overlap instead of rewriting them (`allow_trivial_move`, off by
/// default, and not among the `rocksdb` crate's setters). The families filed by time
/// (`dedup_by_age`: a stamp, then an id) flush one time range after another, so their files
/// never needed merging; in `bench-storage --batch 64` they were rewritten all the same (0.3 s
/// of each replica's CPU per run, a quarter to two fifths of the read families' compactions).
/// (Set first: `get_options_from_string` returns new options that would not keep what the
/// crate ties to the old ones, such as a block cache.)
fn default_options() -> Options {
    Options::default()
        .get_options_from_string("compaction_options_universal={allow_trivial_move=true}")
        .expect("a valid options string")
}

/// The memtable size of the application's state families on replica `node_id`, in MiB (see
/// [`family_options`]).
fn state_memtable_mib(node_id: NodeId) -> usize {
    24 + 8 * (node_id % 3) as usize
}

/// After a snapshot's install was cut short: empties the state and the log (keeping the vote),
/// so the replica starts as a new one and the leader sends it a snapshot again. What it had
/// acknowledged is covered by that snapshot: a leader sends one only to a replica behind the
/// log it keeps.
fn forget_all_but_the_vote<A: App>(db: &DB) -> Result<(), Error> {
    tracing::warn!("a snapshot's install was cut short: starting again from an empty replica");
    let mut batch = WriteBatch::default();
    for family in A::COLUMN_FAMILIES.iter().chain(&[LOG]) {
        delete_every_row(db, &mut batch, family)?;
    }
    let sm_meta = db.cf_handle(SM_META).expect("opened");
    for key in [APPLIED, MEMBERSHIP, LAST_TIMESTAMP, INSTALLING] {
        batch.delete_cf(&sm_meta, key);
    }
    let raft_meta = db.cf_handle(RAFT_META).expect("opened");
    for key in [COMMITTED, LAST_PURGED] {
        batch.delete_cf(&raft_meta, key);
    }
    db.write_opt(batch, &synced())?;
    Ok(())
}

/// Records in `batch` one range deletion that covers every row of `family` now.
fn delete_every_row(db: &DB, batch: &mut WriteBatch, family: &str) -> Result<(), Error> {
    let cf = db.cf_handle(family).expect("opened");
    if let Some(item) = db.iterator_cf(&cf, rocksdb::IteratorMode::End).next() {
        let mut past_last = item?.0.to_vec();
        past_last.push(0);
        batch.delete_range_cf(&cf, &[][..], &past_last[..]);
    }
    Ok(())
}

/// An unnamed file next to the replica's RocksDB, gone once closed: where snapshots are written
/// and received.
fn snapshot_file(db: &DB) -> std::io::Result<std::fs::File> {
    tempfile::tempfile_in(db.path())
}

fn get<T: serde::de::DeserializeOwned>(
    db: &DB,
    family: &str,
    key: &'static [u8],
) -> Result<Option<T>, Error> {
    let cf = db
        .cf_handle(family)
        .expect("raft column families are opened");
    match db.get_cf(&cf, key)? {
        Some(bytes) => Ok(Some(decode("raft metadata", &bytes)?)),
        None => Ok(None),
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

// ---- Log ----

pub struct LogStore<A: App> {
    db: Arc<DB>,
    /// Shared by the store and its readers (the leader's replication to each follower, and the
    /// Raft core reading committed entries to apply).
    recent: Arc<Mutex<Recent<A>>>,
}

impl<A: App> Clone for LogStore<A> {
    fn clone(&self) -> Self {
        LogStore {
            db: self.db.clone(),
            recent: self.recent.clone(),
        }
    }
}

/// The most encoded bytes of entries [`Recent`] keeps: at 50,000 commands a second more than a
/// second of the log, where replication and apply read entries within milliseconds of their
/// append; a follower further behind reads them from RocksDB.
const RECENT_BYTES_MAX: usize = 8 << 20;

/// The tail of the log as this process appended it: consecutive entries, oldest first, each
/// with its encoded size. The leader of three replicas reads every entry back three times
/// (once per follower to send it, once to apply it), a follower once; from here that is a copy
/// of the entry with its requests shared, not a RocksDB read and a decode. Appends, truncation
/// and purges change it as they change the log, so each entry here is the log's entry at its
/// index; a range is read from here only when every entry of it is here.
struct Recent<A: App> {
    entries: VecDeque<(Entry<C<A>>, usize)>,
    bytes: usize,
    /// [`RECENT_BYTES_MAX`] but in tests.
    bytes_max: usize,
}

impl<A: App> Default for Recent<A> {
    fn default() -> Self {
        Recent {
            entries: VecDeque::new(),
            bytes: 0,
            bytes_max: RECENT_BYTES_MAX,
        }
    }
}

impl<A: App> Recent<A> {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(entry, _)| entry.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(entry, _)| entry.log_id.index)
    }

    /// After `entry` was written to the log. Written again, an index replaces the entry here
    /// and the ones after it go (the log may still hold those: they are read from RocksDB);
    /// after a gap, the older entries go.
    fn push(&mut self, entry: Entry<C<A>>, size: usize) {
        let index = entry.log_id.index;
        match self.last_index() {
            Some(last) if index <= last => self.remove_from(index),
            Some(last) if index > last + 1 => self.clear(),
            _ => {}
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.bytes > self.bytes_max && self.entries.len() > 1 {
            self.pop_front();
        }
    }

    /// Truncation: the entries from `index` on.
    fn remove_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            let (_, size) = self.entries.pop_back().expect("not empty");
            self.bytes -= size;
        }
    }

    /// Purging: the entries up to `index`.
    fn remove_to(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        let (_, size) = self.entries.pop_front().expect("not empty");
        self.bytes -= size;
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries of `start..end` when all of them are here.
    fn range(&self, start: u64, end: u64) -> Option<Vec<Entry<C<A>>>> {
        let first = self.first_index()?;
        let last = self.last_index()?;
        if start < first || start > end || end > last + 1 {
            return None;
        }
        let (from, to) = ((start - first) as usize, (end - first) as usize);
        Some(
            self.entries
                .range(from..to)
                .map(|(entry, _)| entry.clone())
                .collect(),
        )
    }
}

impl<A: App> LogStore<A> {
    fn recent(&self) -> std::sync::MutexGuard<'_, Recent<A>> {
        self.recent.lock().expect("no poisoned lock")
    }

    /// Writes entries with one synced write for everything appended together (the fsync behind
    /// group commit), then keeps them in [`Recent`].
    fn write_entries(
        &self,
        entries: impl IntoIterator<Item = Entry<C<A>>>,
    ) -> Result<(), rocksdb::Error> {
        let cf = self.db.cf_handle(LOG).expect("opened");
        let mut batch = WriteBatch::default();
        let mut written = Vec::new();
        for entry in entries {
            let encoded = encode(&entry);
            batch.put_cf(&cf, index_key(entry.log_id.index), &encoded);
            written.push((entry, encoded.len()));
        }
        let result = self.db.write_opt(batch, &synced());
        let mut recent = self.recent();
        match result {
            Ok(()) => {
                for (entry, size) in written {
                    recent.push(entry, size);
                }
            }
            // What the log holds now is not known: it is read from RocksDB.
            Err(_) => recent.clear(),
        }
        result
    }

    fn put_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
        options: &WriteOptions,
    ) -> Result<(), rocksdb::Error> {
        let cf = self.db.cf_handle(RAFT_META).expect("opened");
        self.db.put_cf_opt(&cf, key, encode(value), options)
    }
}

impl<A: App> RaftLogReader<C<A>> for LogStore<A> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<C<A>>>> {
        let start = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => index + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(index) => index.checked_add(1),
            Bound::Excluded(index) => Some(*index),
            Bound::Unbounded => None,
        };
        if let Some(end) = end
            && let Some(entries) = self.recent().range(start, end)
        {
            return Ok(entries);
        }
        let cf = self.db.cf_handle(LOG).expect("opened");
        let mode = rocksdb::IteratorMode::From(&index_key(start), rocksdb::Direction::Forward);
        let mut entries = Vec::new();
        for item in self.db.iterator_cf(&cf, mode) {
            let (key, value) = item.map_err(read_error)?;
            let key: [u8; 8] = key
                .as_ref()
                .try_into()
                .map_err(|_| read_error(Error::Corrupt("a log key is not 8 bytes".into())))?;
            let index = u64::from_be_bytes(key);
            if !range.contains(&index) {
                break;
            }
            entries.push(decode("log entry", &value).map_err(read_error)?);
        }
        Ok(entries)
    }
}

impl<A: App> RaftLogStorage<C<A>> for LogStore<A> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<C<A>>> {
        let last_purged: Option<LogId<NodeId>> =
            get(&self.db, RAFT_META, LAST_PURGED).map_err(read_error)?;
        let cf = self.db.cf_handle(LOG).expect("opened");
        let last = match self.db.iterator_cf(&cf, rocksdb::IteratorMode::End).next() {
            Some(item) => {
                let (_, value) = item.map_err(read_error)?;
                let entry: Entry<C<A>> = decode("log entry", &value).map_err(read_error)?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta(VOTE, vote, &synced()).map_err(write_error)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        get(&self.db, RAFT_META, VOTE).map_err(read_error)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.put_meta(COMMITTED, &committed, &WriteOptions::default())
            .map_err(write_error)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(get::<Option<LogId<NodeId>>>(&self.db, RAFT_META, COMMITTED)
            .map_err(read_error)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C<A>>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<C<A>>> + OptionalSend,
    {
        let result = self.write_entries(entries);
        let flushed = result
            .as_ref()
            .map(|_| ())
            .map_err(|error| std::io::Error::other(error.to_string()));
        callback.log_io_completed(flushed);
        result.map_err(write_error)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.recent().remove_from(log_id.index);
        let cf = self.db.cf_handle(LOG).expect("opened");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(&cf, index_key(log_id.index), index_key(u64::MAX));
        batch.delete_cf(&cf, index_key(u64::MAX));
        self.db.write_opt(batch, &synced()).map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.recent().remove_to(log_id.index);
        self.put_meta(LAST_PURGED, &log_id, &synced())
            .map_err(write_error)?;
        let cf = self.db.cf_handle(LOG).expect("opened");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(&cf, index_key(0), index_key(log_id.index + 1));
        self.db.write(batch).map_err(write_error)
    }
}

// ---- State machine ----

/// The application and the Raft bookkeeping of what it has applied, behind one lock so that
/// readers and the snapshot builder always see the two agree.
pub struct Applied<A> {
    pub app: A,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, openraft::BasicNode>,
    last_timestamp_ms: i64,
}

pub struct StateMachineStore<A> {
    db: Arc<DB>,
    state: Arc<RwLock<Applied<A>>>,
    /// Whether this process has built or installed a snapshot (see `get_current_snapshot`).
    snapshot_taken: Arc<AtomicBool>,
    apply_seconds: Histogram,
}

impl<A> Clone for StateMachineStore<A> {
    fn clone(&self) -> Self {
        StateMachineStore {
            db: self.db.clone(),
            state: self.state.clone(),
            snapshot_taken: self.snapshot_taken.clone(),
            apply_seconds: self.apply_seconds.clone(),
        }
    }
}

impl<A: App> StateMachineStore<A> {
    fn load(db: Arc<DB>, apply_seconds: Histogram) -> Result<StateMachineStore<A>, Error> {
        let app = A::load(&AppView::now(&db))?;
        let state = Applied {
            app,
            last_applied: get(&db, SM_META, APPLIED)?.flatten(),
            membership: get(&db, SM_META, MEMBERSHIP)?.unwrap_or_default(),
            last_timestamp_ms: get(&db, SM_META, LAST_TIMESTAMP)?.unwrap_or(0),
        };
        Ok(StateMachineStore {
            db,
            state: Arc::new(RwLock::new(state)),
            snapshot_taken: Arc::default(),
            apply_seconds,
        })
    }

    /// Runs `read` against the applied state. Readers wait while an entry is being applied.
    pub fn read<T>(&self, read: impl FnOnce(&A) -> T) -> T {
        read(&self.state.read().expect("no poisoned lock").app)
    }

    /// Runs `read` against the applied state and its column families at one moment: what the
    /// application keeps on disk only is there, and no entry is half applied.
    pub fn read_stored<T>(&self, read: impl FnOnce(&A, &AppView<'_>) -> T) -> T {
        let state = self.state.read().expect("no poisoned lock");
        read(&state.app, &AppView::now(&self.db))
    }

    /// The last event seq applied and the digest of the state, taken at one moment.
    pub fn digest(&self) -> Result<(u64, [u8; 32]), Error> {
        self.read_stored(|app, view| Ok((app.applied_seq(), app.digest(view)?)))
    }

    /// Read access to the application's column families.
    pub fn store(&self) -> AppStore {
        AppStore {
            db: self.db.clone(),
        }
    }

    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.state.read().expect("no poisoned lock").last_applied
    }

    fn put_meta(&self, batch: &mut WriteBatch, state: &Applied<A>) {
        let cf = self.db.cf_handle(SM_META).expect("opened");
        batch.put_cf(&cf, APPLIED, encode(&state.last_applied));
        batch.put_cf(&cf, MEMBERSHIP, encode(&state.membership));
        batch.put_cf(&cf, LAST_TIMESTAMP, encode(&state.last_timestamp_ms));
    }

    /// Replaces every row of the application's families with a snapshot's, in batches of a few
    /// MiB, flagged [`INSTALLING`] until the last, which also records `meta` and the snapshot's
    /// last applied leader timestamp in `state` and on disk.
    fn write_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: std::fs::File,
        state: &mut Applied<A>,
    ) -> Result<(), Error> {
        const BATCH_BYTES: usize = 4 << 20;
        let sm_meta = self.db.cf_handle(SM_META).expect("opened");
        let mut batch = WriteBatch::default();
        batch.put_cf(&sm_meta, INSTALLING, encode(&meta.last_log_id));
        for family in A::COLUMN_FAMILIES {
            delete_every_row(&self.db, &mut batch, family)?;
        }
        self.db.write_opt(std::mem::take(&mut batch), &synced())?;
        let mut input = BufReader::new(snapshot);
        input.rewind()?;
        let last_timestamp_ms =
            crate::snapshot::read(&mut input, A::COLUMN_FAMILIES, |family, key, value| {
                batch.put_cf(&self.db.cf_handle(family).expect("opened"), key, value);
                if batch.size_in_bytes() >= BATCH_BYTES {
                    self.db.write(std::mem::take(&mut batch))?;
                }
                Ok(())
            })?;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.last_timestamp_ms = last_timestamp_ms;
        self.put_meta(&mut batch, state);
        batch.delete_cf(&sm_meta, INSTALLING);
        self.db.write_opt(batch, &synced())?;
        Ok(())
    }
}

impl<A: App> StateMachineStore<A> {
    /// The applied state as a snapshot, built now. Only the moment it stands for is taken under
    /// the lock; the state is read from a RocksDB snapshot of that moment, on a thread of its own
    /// at the lowest priority, while entries go on being applied: encoding a large state takes
    /// seconds of CPU, which the replicas' commit path needs more.
    async fn snapshot_now(&self) -> StorageResult<Snapshot<C<A>>> {
        let machine = self.clone();
        let (built, snapshot) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                lowest_priority();
                let _ = built.send(machine.encode_now());
            })
            .map_err(read_error)?;
        snapshot
            .await
            .map_err(|_| read_error(std::io::Error::other("the snapshot thread panicked")))?
            .map_err(read_error)
    }

    fn encode_now(&self) -> Result<Snapshot<C<A>>, Error> {
        let started = std::time::Instant::now();
        let (moment, meta, last_timestamp_ms) = {
            let state = self.state.read().expect("no poisoned lock");
            (
                self.db.snapshot(),
                snapshot_meta(&state),
                state.last_timestamp_ms,
            )
        };
        #[cfg(test)]
        tests::pause_if_asked(self.db.path());
        let view = AppView {
            db: &self.db,
            snapshot: Some(&moment),
        };
        let mut out = BufWriter::new(snapshot_file(&self.db)?);
        crate::snapshot::write(&view, A::COLUMN_FAMILIES, last_timestamp_ms, &mut out)?;
        let mut file = out.into_inner().map_err(|error| error.into_error())?;
        let bytes = file.stream_position()?;
        file.rewind()?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "built a snapshot to send"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

/// What a snapshot of the applied state stands for.
fn snapshot_meta<A: App>(state: &Applied<A>) -> SnapshotMeta<NodeId, openraft::BasicNode> {
    let index = state.last_applied.map(|id| id.index).unwrap_or(0);
    SnapshotMeta {
        last_log_id: state.last_applied,
        last_membership: state.membership.clone(),
        snapshot_id: format!("{index}-{}", state.app.applied_seq()),
    }
}

/// Gives the calling thread the lowest CPU priority (on Linux, where each thread has its own
/// nice value); where that is refused, the thread keeps its priority.
fn lowest_priority() {
    // SAFETY: setpriority only reads its arguments; `0` names the calling thread.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
}

/// Snapshots are lazy. The state machine is its own snapshot: every applied entry's writes are
/// in the column families, so "building" one only makes them durable (after which openraft may
/// purge the log behind it), and the bytes are encoded only when a replica needs them
/// (`get_current_snapshot`), from the state as it is then. Nothing proportional to the state is
/// done every few thousand entries.
impl<A: App> RaftSnapshotBuilder<C<A>> for StateMachineStore<A> {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<C<A>>> {
        let state = self.state.read().expect("no poisoned lock");
        // Applied state is written without fsync (the log replays it); once this snapshot lets
        // the log be purged, everything it covers must be durable. Under the read lock nothing
        // is being applied, so the sync covers exactly `last_applied`.
        self.db.flush_wal(true).map_err(write_error)?;
        self.snapshot_taken.store(true, Ordering::Release);
        let empty = snapshot_file(&self.db).map_err(write_error)?;
        Ok(Snapshot {
            meta: snapshot_meta(&state),
            snapshot: Box::new(tokio::fs::File::from_std(empty)),
        })
    }
}

impl<A: App> RaftStateMachine<C<A>> for StateMachineStore<A> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, openraft::BasicNode>,
    )> {
        let state = self.state.read().expect("no poisoned lock");
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Vec<A::Response>>>
    where
        I: IntoIterator<Item = Entry<C<A>>> + OptionalSend,
    {
        let started = std::time::Instant::now();
        let mut state = self.state.write().expect("no poisoned lock");
        let mut batch = WriteBatch::default();
        let mut responses = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Vec::new()),
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    responses.push(Vec::new());
                }
                EntryPayload::Normal(proposal) => {
                    // A new leader's clock may be behind the old one's: time never goes back.
                    let timestamp_ms = proposal.timestamp_ms.max(state.last_timestamp_ms);
                    state.last_timestamp_ms = timestamp_ms;
                    let mut writes = Writes::new(&self.db, &mut batch);
                    writes.fetch(&state.app, &proposal.requests);
                    let results = proposal
                        .requests
                        .iter()
                        .map(|request| state.app.apply(request, timestamp_ms, &mut writes))
                        .collect();
                    writes.finish().map_err(read_error)?;
                    responses.push(results);
                }
            }
        }
        self.put_meta(&mut batch, &state);
        // Not synced: the synced Raft log replays whatever a crash loses here.
        self.db.write(batch).map_err(write_error)?;
        state.app.persisted();
        self.apply_seconds.observe(started.elapsed().as_secs_f64());
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let file = snapshot_file(&self.db).map_err(write_error)?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        let snapshot = snapshot.into_std().await;
        let mut state = self.state.write().expect("no poisoned lock");
        self.write_snapshot(meta, snapshot, &mut state)
            .map_err(write_error)?;
        state
            .app
            .installed(&AppView::now(&self.db))
            .map_err(read_error)?;
        state.app.persisted();
        self.snapshot_taken.store(true, Ordering::Release);
        Ok(())
    }

    /// None until a snapshot has been built or installed in this process (openraft builds one at
    /// start when the log was purged); then the state as it is now.
    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<C<A>>>> {
        if !self.snapshot_taken.load(Ordering::Acquire) {
            return Ok(None);
        }
        self.snapshot_now().await.map(Some)
    }
}

/// For the applications' tests: the state machine of node 1 over the RocksDB in `path`, loaded
/// the way a start loads it.
pub fn open_state_machine<A: App>(path: &Path) -> Result<StateMachineStore<A>, Error> {
    let metrics = RaftMetrics::register(&mut prometheus_client::registry::Registry::default());
    Ok(open_storage::<A>(path, 1, &metrics)?.1)
}

impl<A: App> StateMachineStore<A> {
    /// For the applications' tests: this replica (node 1, its RocksDB in `path`) loaded again
    /// the way a restart loads it, and a copy of it in `copy_path` caught up through a snapshot
    /// the way a joining replica is. Panics unless both have the digest this one had.
    pub async fn reload_and_copy(
        self,
        path: &Path,
        copy_path: &Path,
    ) -> (StateMachineStore<A>, StateMachineStore<A>) {
        let digest = self.digest().expect("the digest");
        drop(self);
        let mut reloaded = open_state_machine::<A>(path).expect("the replica loads again");
        assert_eq!(
            reloaded.digest().expect("the digest"),
            digest,
            "loaded again"
        );
        let metrics = RaftMetrics::register(&mut prometheus_client::registry::Registry::default());
        let copy = reloaded
            .copy_through_snapshot(copy_path, 1, &metrics)
            .await
            .expect("a copy through a snapshot");
        assert_eq!(copy.digest().expect("the digest"), digest, "copied");
        (reloaded, copy)
    }

    /// A new replica's state machine in `path`, caught up the way one that joins or falls
    /// behind is: it installs a snapshot of this one's applied state (for tests and tools).
    pub async fn copy_through_snapshot(
        &mut self,
        path: &Path,
        node_id: NodeId,
        metrics: &RaftMetrics,
    ) -> StorageResult<StateMachineStore<A>> {
        let meta = self.build_snapshot().await?.meta;
        let current = self.snapshot_now().await?;
        let (_, mut copy) = open_storage::<A>(path, node_id, metrics).map_err(read_error)?;
        copy.install_snapshot(&meta, current.snapshot).await?;
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::time::Duration;

    use openraft::CommittedLeaderId;
    use prometheus_client::registry::Registry;
    use proptest::prelude::*;

    use super::*;
    use crate::Proposal;

    const SUM: &str = "sum";
    const WAIT: Duration = Duration::from_secs(5);

    /// When set, the next snapshot of the replica in that directory says it has begun reading
    /// and waits for a go.
    type Pause = (std::path::PathBuf, Sender<()>, Receiver<()>);
    static PAUSE_SNAPSHOT: Mutex<Option<Pause>> = Mutex::new(None);

    pub(super) fn pause_if_asked(replica: &Path) {
        let mut pause = PAUSE_SNAPSHOT.lock().unwrap();
        if pause.as_ref().is_some_and(|(path, _, _)| path == replica) {
            let (_, begun, go) = pause.take().unwrap();
            drop(pause);
            begun.send(()).unwrap();
            go.recv_timeout(WAIT * 2).unwrap();
        }
    }

    /// The sum of the numbers applied, kept in its column family.
    struct Sum(u64);

    fn read_sum(view: &AppView<'_>) -> Result<u64, Error> {
        Ok(view.get_decoded(SUM, SUM.as_bytes(), "sum")?.unwrap_or(0))
    }

    impl App for Sum {
        type Request = u64;
        type Response = u64;

        const COLUMN_FAMILIES: &'static [&'static str] = &[SUM];

        fn load(store: &AppView<'_>) -> Result<Self, Error> {
            Ok(Sum(read_sum(store)?))
        }

        fn apply(&mut self, request: &u64, _timestamp_ms: i64, writes: &mut Writes<'_>) -> u64 {
            self.0 += request;
            writes.put_encoded(SUM, SUM.as_bytes(), &self.0);
            self.0
        }

        fn installed(&mut self, view: &AppView<'_>) -> Result<(), Error> {
            self.0 = read_sum(view)?;
            Ok(())
        }

        fn digest(&self, _: &AppView<'_>) -> Result<[u8; 32], Error> {
            let mut digest = [0; 32];
            digest[..8].copy_from_slice(&self.0.to_be_bytes());
            Ok(digest)
        }

        fn applied_seq(&self) -> u64 {
            self.0
        }
    }

    fn entry<A: App<Request = u64>>(index: u64, number: u64) -> Entry<C<A>> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                timestamp_ms: 0,
                requests: Arc::new([number]),
            }),
        }
    }

    #[test]
    fn replicas_of_a_group_get_state_memtables_of_different_sizes() {
        let sizes: Vec<usize> = (1..=3).map(state_memtable_mib).collect();
        assert_eq!(sizes, [32, 40, 24]);
    }

    fn open(dir: &tempfile::TempDir) -> StateMachineStore<Sum> {
        open_as::<Sum>(dir).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_are_encoded_on_demand_while_entries_go_on_being_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
        machine.apply([entry(1, 5)]).await.unwrap();
        assert!(machine.get_current_snapshot().await.unwrap().is_none());

        // Building one only marks the moment (the state is already in the column families).
        let built = machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id, Some(entry::<Sum>(1, 0).log_id));
        assert_eq!(built.snapshot.metadata().await.unwrap().len(), 0);

        let (begun_sender, begun) = channel();
        let (go, go_receiver) = channel();
        *PAUSE_SNAPSHOT.lock().unwrap() = Some((dir.path().into(), begun_sender, go_receiver));
        let mut reader = machine.clone();
        let encoding = tokio::spawn(async move { reader.get_current_snapshot().await });
        tokio::task::spawn_blocking(move || begun.recv_timeout(WAIT))
            .await
            .unwrap()
            .expect("the snapshot began");

        // The snapshot is being read; an entry applied now must not wait for it (on its own
        // thread, so that a wait shows as a timeout rather than a hang).
        let (applied_sender, applied) = channel();
        let mut applier = machine.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let result = runtime.block_on(applier.apply([entry(2, 7)]));
            applied_sender.send(result.map(|_| ())).unwrap();
        });
        let applied = applied.recv_timeout(WAIT);
        go.send(()).unwrap();
        applied
            .expect("the entry was applied while the snapshot was being encoded")
            .unwrap();
        assert_eq!(machine.read(|sum| sum.0), 12);

        // It stands for the moment it began, not for what was applied while it was read.
        let mut snapshot = encoding.await.unwrap().unwrap().unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(entry::<Sum>(1, 0).log_id));
        assert_eq!(sum_in(&mut snapshot.snapshot).await, 5);

        // A replica that installs it has the state of that moment, and offers it on.
        let other_dir = tempfile::tempdir().unwrap();
        let mut other = open(&other_dir);
        other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(other.read(|sum| sum.0), 5);
        let mut current = other.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(entry::<Sum>(1, 0).log_id));
        assert_eq!(sum_in(&mut current.snapshot).await, 5);
    }

    /// The sum a snapshot carries (the file is read from its start and left there again).
    async fn sum_in(snapshot: &mut tokio::fs::File) -> u64 {
        use tokio::io::AsyncSeekExt;
        snapshot.rewind().await.unwrap();
        let mut file = snapshot.try_clone().await.unwrap().into_std().await;
        let mut sum = None;
        crate::snapshot::read(
            &mut BufReader::new(&mut file),
            &[SUM],
            |family, key, value| {
                assert_eq!((family, key), (SUM, SUM.as_bytes()));
                sum = Some(decode("sum", value)?);
                Ok(())
            },
        )
        .unwrap();
        snapshot.rewind().await.unwrap();
        sum.expect("the sum's row")
    }

    /// Entry `index` of term 1, adding `number`, proposed at `timestamp_ms`.
    fn entry_at(index: u64, number: u64, timestamp_ms: i64) -> Entry<C<Sum>> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                timestamp_ms,
                requests: Arc::new([number]),
            }),
        }
    }

    #[tokio::test]
    async fn a_replica_that_installs_a_snapshot_keeps_time_from_going_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
        // A later leader's clock is behind: the entry is applied at the time before it.
        let entries = [entry_at(1, 5, 1_000), entry_at(2, 1, 400)];
        machine.apply(entries).await.unwrap();
        let copy_dir = tempfile::tempdir().unwrap();
        let metrics = RaftMetrics::register(&mut Registry::default());
        let mut copy = machine
            .copy_through_snapshot(copy_dir.path(), 2, &metrics)
            .await
            .unwrap();
        for replica in [&mut machine, &mut copy] {
            replica.apply([entry_at(3, 1, 700)]).await.unwrap();
            let time = replica.state.read().unwrap().last_timestamp_ms;
            assert_eq!(time, 1_000);
        }
        drop(copy);
        let copy = open(&copy_dir);
        assert_eq!(copy.state.read().unwrap().last_timestamp_ms, 1_000);
        assert_eq!(copy.read(|sum| sum.0), 7);
    }

    #[tokio::test]
    async fn a_replica_whose_install_was_cut_short_starts_again_empty_with_its_vote() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open(&dir);
        machine.apply([entry(1, 5)]).await.unwrap();
        let meta = machine.build_snapshot().await.unwrap().meta;
        let snapshot = machine.snapshot_now().await.unwrap().snapshot;
        let mut whole = Vec::new();
        snapshot.into_std().await.read_to_end(&mut whole).unwrap();

        let other_dir = tempfile::tempdir().unwrap();
        let metrics = RaftMetrics::register(&mut Registry::default());
        let (mut log, mut other) = open_storage::<Sum>(other_dir.path(), 2, &metrics).unwrap();
        let vote = Vote::new(3, 1);
        log.save_vote(&vote).await.unwrap();
        log.write_entries([entry(1, 2), entry(2, 2)]).unwrap();
        other.apply([entry(1, 2), entry(2, 2)]).await.unwrap();
        // The snapshot ends before its last row.
        let mut cut = snapshot_file(&other.db).unwrap();
        cut.write_all(&whole[..whole.len() - 2]).unwrap();
        let installed = other
            .install_snapshot(&meta, Box::new(tokio::fs::File::from_std(cut)))
            .await;
        assert!(installed.is_err());
        drop((log, other));

        let (mut log, other) = open_storage::<Sum>(other_dir.path(), 2, &metrics).unwrap();
        assert_eq!(other.read(|sum| sum.0), 0);
        assert_eq!(other.last_applied(), None);
        let state = log.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None));
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    }

    /// `Sum` in a later storage format.
    struct LaterSum(Sum);

    impl App for LaterSum {
        type Request = u64;
        type Response = u64;

        const COLUMN_FAMILIES: &'static [&'static str] = &[SUM];
        const STORAGE_FORMAT: u32 = 2;

        fn load(store: &AppView<'_>) -> Result<Self, Error> {
            Ok(LaterSum(Sum::load(store)?))
        }

        fn apply(&mut self, request: &u64, timestamp_ms: i64, writes: &mut Writes<'_>) -> u64 {
            self.0.apply(request, timestamp_ms, writes)
        }

        fn installed(&mut self, view: &AppView<'_>) -> Result<(), Error> {
            self.0.installed(view)
        }

        fn digest(&self, view: &AppView<'_>) -> Result<[u8; 32], Error> {
            self.0.digest(view)
        }

        fn applied_seq(&self) -> u64 {
            self.0.applied_seq()
        }
    }

    const A_ROWS: &str = "a_rows";
    const B_ROWS: &str = "b_rows";

    /// Counts how often each name was applied, in a row per name (names that start with `a`
    /// in one family, the others in another). Each request answers the count that earlier
    /// apply calls left; it names that read ahead ([`App::reads`]) unless it ends with `!`
    /// (which is not part of the name).
    struct Counts;

    fn row_of(name: &str) -> (&'static str, &[u8]) {
        let family = if name.starts_with('a') {
            A_ROWS
        } else {
            B_ROWS
        };
        (family, name.trim_end_matches('!').as_bytes())
    }

    impl App for Counts {
        type Request = String;
        type Response = u64;

        const COLUMN_FAMILIES: &'static [&'static str] = &[A_ROWS, B_ROWS];
        const READ_FAMILIES: &'static [&'static str] = &[A_ROWS, B_ROWS];

        fn load(_: &AppView<'_>) -> Result<Self, Error> {
            Ok(Counts)
        }

        fn reads<'r>(&self, name: &'r String, read: &mut dyn FnMut(&'static str, &'r [u8])) {
            if !name.ends_with('!') {
                let (family, key) = row_of(name);
                read(family, key);
            }
        }

        fn apply(&mut self, name: &String, _: i64, writes: &mut Writes<'_>) -> u64 {
            let (family, key) = row_of(name);
            let count: u64 = writes.get_committed(family, key, "count").unwrap_or(0);
            writes.put_encoded(family, key, &(count + 1));
            count
        }

        fn installed(&mut self, _: &AppView<'_>) -> Result<(), Error> {
            Ok(())
        }

        fn digest(&self, _: &AppView<'_>) -> Result<[u8; 32], Error> {
            Ok([0; 32])
        }

        fn applied_seq(&self) -> u64 {
            0
        }
    }

    #[tokio::test]
    async fn rows_read_ahead_for_an_entry_are_those_earlier_apply_calls_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open_as::<Counts>(&dir).unwrap();
        let entry = |index: u64, names: &[&str]| Entry::<C<Counts>> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal {
                timestamp_ms: 0,
                requests: names.iter().map(|name| name.to_string()).collect(),
            }),
        };
        let first = machine
            .apply([entry(1, &["a1", "b1", "a2!", "b2"])])
            .await
            .unwrap();
        assert_eq!(first, [vec![0, 0, 0, 0]]);
        // Rows named or not, present or not, in both families, and one named twice; an
        // entry's own writes are not among what it reads.
        let second = machine
            .apply([entry(2, &["b2", "a1", "a1", "b1", "b3", "a2!", "a3", "a0"])])
            .await
            .unwrap();
        assert_eq!(second, [vec![1, 1, 1, 1, 0, 1, 0, 0]]);
        let third = machine
            .apply([entry(3, &["a1", "a3", "a2", "b3!"])])
            .await
            .unwrap();
        assert_eq!(third, [vec![2, 1, 2, 1]]);
    }

    /// The files of a family whose rows come in key order (as the families filed by time do)
    /// cover disjoint key ranges, so its compactions move them rather than rewrite them.
    #[tokio::test]
    async fn files_of_rows_written_in_key_order_are_compacted_without_rewriting_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = open_as::<Counts>(&dir).unwrap();
        let db = machine.db.clone();
        let family = db.cf_handle(A_ROWS).unwrap();
        let files = |db: &DB| -> Vec<(String, i32)> {
            db.live_files()
                .unwrap()
                .into_iter()
                .filter(|file| file.column_family_name == A_ROWS)
                .map(|file| (file.name, file.level))
                .collect()
        };
        // One more flush than the family waits for before it compacts; every file it ever had.
        let mut flushed = std::collections::BTreeSet::new();
        for flush in 0..9u64 {
            let names: Vec<String> = (0..100).map(|row| format!("a{flush:02}{row:03}")).collect();
            let entry = Entry::<C<Counts>> {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), flush + 1),
                payload: EntryPayload::Normal(Proposal {
                    timestamp_ms: 0,
                    requests: names.into(),
                }),
            };
            machine.apply([entry]).await.unwrap();
            db.flush_cf(&family).unwrap();
            flushed.extend(files(&db).into_iter().map(|(name, _)| name));
        }
        // None was rewritten while the flushes went on.
        assert_eq!(flushed.len(), 9);
        let compacted = || {
            db.property_int_value("rocksdb.compaction-pending").unwrap() == Some(0)
                && db
                    .property_int_value("rocksdb.num-running-compactions")
                    .unwrap()
                    == Some(0)
                && files(&db).iter().any(|(_, level)| *level > 0)
        };
        let deadline = std::time::Instant::now() + WAIT;
        while !compacted() {
            assert!(
                std::time::Instant::now() < deadline,
                "no compaction ran: {:?}",
                files(&db)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The same files, some of them on another level now.
        let left: std::collections::BTreeSet<String> =
            files(&db).into_iter().map(|(name, _)| name).collect();
        assert_eq!(left, flushed);
    }

    #[derive(Clone, Debug)]
    enum LogOperation {
        /// Entries `from..from + count` of a term, written as one append.
        Append {
            from: u64,
            count: u64,
            term: u64,
        },
        Truncate(u64),
        Purge(u64),
    }

    fn log_operation() -> impl Strategy<Value = LogOperation> {
        prop_oneof![
            6 => (1..40u64, 1..6u64, 1..4u64)
                .prop_map(|(from, count, term)| LogOperation::Append { from, count, term }),
            1 => (1..45u64).prop_map(LogOperation::Truncate),
            1 => (1..45u64).prop_map(LogOperation::Purge),
        ]
    }

    fn entry_of_term(term: u64, index: u64) -> Entry<C<Sum>> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Proposal {
                timestamp_ms: 0,
                requests: Arc::new([term * 1_000 + index]),
            }),
        }
    }

    async fn read(store: &mut LogStore<Sum>, start: u64, end: u64) -> Vec<Vec<u8>> {
        let entries = store.try_get_log_entries(start..end).await.unwrap();
        entries.iter().map(encode).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever appends (over earlier entries, after a gap), truncations and purges the log
        /// goes through, and however few entries the store keeps, every range reads the same
        /// through it as straight from RocksDB.
        #[test]
        fn recent_entries_read_as_the_log_holds_them(
            operations in prop::collection::vec(log_operation(), 1..40),
            bytes_max in 1..400usize,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let metrics = RaftMetrics::register(&mut Registry::default());
            let (mut store, _) = open_storage::<Sum>(dir.path(), 1, &metrics).unwrap();
            store.recent().bytes_max = bytes_max;
            let mut disk = LogStore::<Sum> { db: store.db.clone(), recent: Arc::default() };
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            for operation in operations {
                runtime.block_on(async {
                    match operation {
                        LogOperation::Append { from, count, term } => {
                            let entries = (from..from + count).map(|i| entry_of_term(term, i));
                            store.write_entries(entries).unwrap();
                            assert_eq!(store.recent().last_index(), Some(from + count - 1));
                        }
                        LogOperation::Truncate(index) => {
                            let log_id = LogId::new(CommittedLeaderId::new(1, 1), index);
                            store.truncate(log_id).await.unwrap();
                        }
                        LogOperation::Purge(index) => {
                            let log_id = LogId::new(CommittedLeaderId::new(1, 1), index);
                            store.purge(log_id).await.unwrap();
                        }
                    }
                    for start in 0..46 {
                        for end in (start..start + 8).chain([47]) {
                            assert_eq!(
                                read(&mut store, start, end).await,
                                read(&mut disk, start, end).await,
                                "{start}..{end}"
                            );
                        }
                    }
                });
            }
        }
    }

    fn open_as<A: App>(dir: &tempfile::TempDir) -> Result<StateMachineStore<A>, Error> {
        open_state_machine::<A>(dir.path())
    }

    fn refused<A: App>(opened: Result<StateMachineStore<A>, Error>, found: u32, expected: u32) {
        match opened {
            Err(Error::StorageFormat {
                found: was,
                expected: wanted,
            }) => assert_eq!((was, wanted), (found, expected)),
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("opened"),
        }
    }

    #[tokio::test]
    async fn a_replica_refuses_a_data_directory_of_another_storage_format() {
        // A new directory takes the format of the application that creates it.
        let later = tempfile::tempdir().unwrap();
        open_as::<LaterSum>(&later)
            .unwrap()
            .apply([entry(1, 5)])
            .await
            .unwrap();
        assert_eq!(open_as::<LaterSum>(&later).unwrap().read(|sum| sum.0.0), 5);
        refused(open_as::<Sum>(&later), 2, 1);

        // One with data from before formats were recorded is in format 1.
        let earlier = tempfile::tempdir().unwrap();
        open(&earlier).apply([entry(1, 7)]).await.unwrap();
        {
            let families = [LOG, RAFT_META, SM_META, SUM];
            let db = DB::open_cf(&Options::default(), earlier.path(), families).unwrap();
            db.delete_cf(db.cf_handle(SM_META).unwrap(), STORAGE_FORMAT)
                .unwrap();
            assert!(get::<u32>(&db, SM_META, STORAGE_FORMAT).unwrap().is_none());
        }
        refused(open_as::<LaterSum>(&earlier), 1, 2);
        assert_eq!(open(&earlier).read(|sum| sum.0), 7);
    }
}
