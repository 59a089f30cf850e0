//! The contract between the Raft plumbing and an application state machine.

use std::fmt::Debug;
use std::sync::Arc;

use rocksdb::{DB, DBPinnableSlice, ReadOptions, WriteBatch};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Error;

/// What one Raft log entry carries: the requests the leader packed together (group commit) and
/// the leader's clock when it packed them. Time is an input to the state machine, never read by it.
///
/// The requests are shared, so the log store's copy of a recent entry ([`crate::store`]) hands
/// it out without copying them; they encode as a sequence, like a `Vec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "R: Serialize + DeserializeOwned")]
pub struct Proposal<R> {
    pub timestamp_ms: i64,
    pub requests: Arc<[R]>,
}

/// Writes of one applied log entry, committed atomically with the applied log id; and reads of
/// what earlier apply calls committed.
pub struct Writes<'a> {
    db: &'a DB,
    batch: &'a mut WriteBatch,
    /// Where [`Writes::put_encoded`] encodes each value: the batch copies it, so one buffer
    /// serves every row instead of a new, growing one per row.
    scratch: Vec<u8>,
    /// The first read that failed: it fails the whole apply call, as a failed write does.
    failure: Option<Error>,
    /// The rows the entry's requests said they would read ([`App::reads`]).
    fetched: Fetched<'a>,
}

impl<'a> Writes<'a> {
    pub(crate) fn new(db: &'a DB, batch: &'a mut WriteBatch) -> Writes<'a> {
        Writes {
            db,
            batch,
            scratch: Vec::new(),
            failure: None,
            fetched: Fetched::default(),
        }
    }

    /// Reads at once, with one batched lookup per column family, the rows that `requests` will
    /// read ([`App::reads`]): a batched lookup probes each file's bloom filter for all its keys
    /// together, for less than a `get` per row (in `bench-storage --batch 64`, 2–9% more
    /// transfers per second).
    pub(crate) fn fetch<A: App>(&mut self, app: &A, requests: &'a [A::Request]) {
        let mut wanted: Vec<(&'static str, &'a [u8])> = Vec::new();
        for request in requests {
            app.reads(request, &mut |family, key| wanted.push((family, key)));
        }
        if wanted.is_empty() {
            return;
        }
        wanted.sort_unstable();
        wanted.dedup();
        let options = ReadOptions::default();
        for run in wanted.chunk_by(|a, b| a.0 == b.0) {
            let family = run[0].0;
            let keys: Vec<&[u8]> = run.iter().map(|(_, key)| *key).collect();
            let cf = self
                .db
                .cf_handle(family)
                .expect("application column families are opened");
            let values = self.db.batched_multi_get_cf_opt(cf, &keys, true, &options);
            let mut rows = Vec::with_capacity(keys.len());
            for (key, value) in keys.into_iter().zip(values) {
                match value {
                    Ok(value) => rows.push((key, value)),
                    Err(error) => {
                        self.failure.get_or_insert(error.into());
                    }
                }
            }
            self.fetched.families.push((family, rows));
        }
    }

    /// The failed read, if one failed: the apply call fails with it and none of its responses
    /// is sent, so the application may go on with what a failed read returned (nothing).
    pub(crate) fn finish(self) -> Result<(), Error> {
        self.failure.map_or(Ok(()), Err)
    }

    fn committed(&self) -> AppView<'a> {
        AppView::now(self.db)
    }

    fn fail<T>(&mut self, result: Result<T, Error>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.failure.get_or_insert(error);
                None
            }
        }
    }

    /// A row as earlier apply calls left it: this call's own writes are not in it yet. Only for
    /// `App::READ_FAMILIES`.
    pub fn get_committed<T: DeserializeOwned>(
        &mut self,
        column_family: &str,
        key: &[u8],
        what: &'static str,
    ) -> Option<T> {
        let value = match self.fetched.row(column_family, key) {
            Some(row) => row.map(|bytes| crate::decode(what, bytes)).transpose(),
            None => self
                .committed()
                .get(column_family, key)
                .and_then(|row| row.map(|bytes| crate::decode(what, &bytes)).transpose()),
        };
        self.fail(value).flatten()
    }

    /// The rows with keys from `start` to below `end`, in key order, as earlier apply calls
    /// left them. Only for `App::READ_FAMILIES`.
    pub fn scan_committed(&mut self, column_family: &str, start: &[u8], end: &[u8]) -> Vec<Row> {
        let mut rows = Vec::new();
        let scan = self
            .committed()
            .for_each_in(column_family, start, Some(end), |key, value| {
                rows.push((key.to_vec(), value.to_vec()));
            });
        self.fail(scan).map_or_else(Vec::new, |()| rows)
    }

    /// Puts `value` in the groups' encoding ([`crate::encode`]).
    pub fn put_encoded<T: Serialize + ?Sized>(
        &mut self,
        column_family: &str,
        key: &[u8],
        value: &T,
    ) {
        self.put_written(column_family, key, |buffer| {
            *buffer = crate::encode_into(value, std::mem::take(buffer));
        });
    }

    /// Puts the bytes that `write` appends to an empty buffer.
    pub fn put_written(
        &mut self,
        column_family: &str,
        key: &[u8],
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        write(&mut scratch);
        self.put(column_family, key, &scratch);
        self.scratch = scratch;
    }

    pub fn put(&mut self, column_family: &str, key: &[u8], value: &[u8]) {
        let cf = self
            .db
            .cf_handle(column_family)
            .expect("application column families are opened");
        self.batch.put_cf(&cf, key, value);
    }

    pub fn delete(&mut self, column_family: &str, key: &[u8]) {
        let cf = self
            .db
            .cf_handle(column_family)
            .expect("application column families are opened");
        self.batch.delete_cf(&cf, key);
    }
}

/// A row read ahead: its key and what it holds.
type FetchedRow<'a> = (&'a [u8], Option<DBPinnableSlice<'a>>);

/// Rows read ahead for one entry ([`Writes::fetch`]), by column family, in key order.
#[derive(Default)]
struct Fetched<'a> {
    families: Vec<(&'static str, Vec<FetchedRow<'a>>)>,
}

impl Fetched<'_> {
    /// `None` when the row was not read ahead; else what it holds.
    fn row(&self, column_family: &str, key: &[u8]) -> Option<Option<&[u8]>> {
        let (_, rows) = self
            .families
            .iter()
            .find(|(family, _)| *family == column_family)?;
        let found = rows
            .binary_search_by(|(row_key, _)| (*row_key).cmp(key))
            .ok()?;
        Some(rows[found].1.as_deref())
    }
}

/// One key/value pair of a column family.
pub type Row = (Vec<u8>, Vec<u8>);

/// The application's column families, for serving reads and streams.
#[derive(Clone)]
pub struct AppStore {
    pub(crate) db: std::sync::Arc<DB>,
}

impl AppStore {
    /// The column families as they are now.
    pub fn view(&self) -> AppView<'_> {
        AppView::now(&self.db)
    }
}

/// Read access to the application's column families: as they are now, or as they were at one
/// moment (a RocksDB snapshot), which is how snapshots are built while entries go on being
/// applied.
pub struct AppView<'a> {
    pub(crate) db: &'a DB,
    pub(crate) snapshot: Option<&'a rocksdb::Snapshot<'a>>,
}

impl<'a> AppView<'a> {
    /// The column families as they are now.
    pub(crate) fn now(db: &'a DB) -> AppView<'a> {
        AppView { db, snapshot: None }
    }

    fn options(&self) -> ReadOptions {
        let mut options = ReadOptions::default();
        if let Some(snapshot) = self.snapshot {
            options.set_snapshot(snapshot);
        }
        options
    }

    fn family(&self, column_family: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(column_family)
            .expect("application column families are opened")
    }

    pub fn get(&self, column_family: &str, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let cf = self.family(column_family);
        Ok(self.db.get_cf_opt(cf, key, &self.options())?)
    }

    /// A row, decoded (`what` names it in the error if it does not decode).
    pub fn get_decoded<T: DeserializeOwned>(
        &self,
        column_family: &str,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, Error> {
        self.get(column_family, key)?
            .map(|bytes| crate::decode(what, &bytes))
            .transpose()
    }

    /// The greatest key of a column family, if it has any.
    pub fn last_key(&self, column_family: &str) -> Result<Option<Vec<u8>>, Error> {
        let cf = self.family(column_family);
        let mut keys = self
            .db
            .iterator_cf_opt(cf, self.options(), rocksdb::IteratorMode::End);
        match keys.next() {
            Some(item) => Ok(Some(item?.0.to_vec())),
            None => Ok(None),
        }
    }

    /// Calls `visit` with every row whose key is from `start` on and below `end` (without an
    /// end, to the last), in key order, without holding them all at once.
    pub fn for_each_in(
        &self,
        column_family: &str,
        start: &[u8],
        end: Option<&[u8]>,
        mut visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), Error> {
        let cf = self.family(column_family);
        let mut options = self.options();
        if let Some(end) = end {
            options.set_iterate_upper_bound(end.to_vec());
        }
        let mode = rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf_opt(cf, options, mode) {
            let (key, value) = item?;
            visit(&key, &value);
        }
        Ok(())
    }

    /// Every row of a column family, its value decoded, in key order. The first row that does
    /// not decode fails the whole read.
    pub fn decoded_rows<T: DeserializeOwned>(
        &self,
        column_family: &str,
        what: &'static str,
    ) -> Result<Vec<(Vec<u8>, T)>, Error> {
        let mut rows = Vec::new();
        let mut failure = None;
        self.for_each_in(column_family, &[], None, |key, value| {
            if failure.is_none() {
                match crate::decode(what, value) {
                    Ok(row) => rows.push((key.to_vec(), row)),
                    Err(error) => failure = Some(error),
                }
            }
        })?;
        failure.map_or(Ok(rows), Err)
    }

    /// Feeds every row of a column family to `update`, in key order, each key and each value
    /// after its length (so that different rows never feed the same bytes): how a digest covers
    /// state kept on disk only.
    pub fn hash_rows(
        &self,
        column_family: &str,
        mut update: impl FnMut(&[u8]),
    ) -> Result<(), Error> {
        self.for_each_in(column_family, &[], None, |key, value| {
            for part in [key, value] {
                update(&(part.len() as u64).to_be_bytes());
                update(part);
            }
        })
    }

    /// Key/value pairs of a column family from `start` on, in key order, at most `limit`.
    pub fn scan_from(
        &self,
        column_family: &str,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Row>, Error> {
        let cf = self.family(column_family);
        let mode = rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward);
        let mut rows = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(cf, self.options(), mode)
            .take(limit)
        {
            let (key, value) = item?;
            rows.push((key.to_vec(), value.to_vec()));
        }
        Ok(rows)
    }
}

/// A deterministic application state machine replicated by Raft.
///
/// `apply` must be a pure function of the state, the request and the timestamp: the same log
/// gives every replica the same state, the same responses and the same digest.
pub trait App: Sized + Send + Sync + 'static {
    type Request: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static;
    type Response: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The column families the application keeps its state in. Apart from the event log's
    /// (`event_log::EVENTS`) and `READ_FAMILIES`, they are meant to be read only by `load` and
    /// snapshots: their memtables are vectors, cheap to insert into and slow to look up
    /// (`store`).
    const COLUMN_FAMILIES: &'static [&'static str];

    /// Those of `COLUMN_FAMILIES` that `apply` reads (`Writes::get_committed`,
    /// `Writes::scan_committed`): state too large to keep in memory. They get skiplist
    /// memtables and bloom filters (`store`).
    const READ_FAMILIES: &'static [&'static str] = &[];

    /// The version of what the application keeps on disk, raised whenever that changes in a way
    /// an older replica could not read (1: every format from before this number was kept). A
    /// replica refuses a data directory written in another one (`store::open_storage`).
    const STORAGE_FORMAT: u32 = 1;

    /// Loads the application state persisted in its column families (empty on a new replica).
    fn load(store: &AppView<'_>) -> Result<Self, Error>;

    /// Applies one request and records its persistent changes into `writes`.
    fn apply(
        &mut self,
        request: &Self::Request,
        timestamp_ms: i64,
        writes: &mut Writes<'_>,
    ) -> Self::Response;

    /// Names the rows of `READ_FAMILIES` that applying `request` will read with
    /// [`Writes::get_committed`], by calling `read(family, key)` for each. The rows of a whole
    /// entry are then read together, before its requests apply ([`Writes::fetch`]); a row not
    /// named is read when asked for, so naming is only an optimization.
    fn reads<'r>(
        &self,
        _request: &'r Self::Request,
        _read: &mut dyn FnMut(&'static str, &'r [u8]),
    ) {
    }

    /// Called once the writes of applied entries are durable in RocksDB: the place to wake
    /// readers and subscribers of the new state.
    fn persisted(&mut self) {}

    /// Called once a snapshot's rows have replaced every row of `COLUMN_FAMILIES` (a snapshot is
    /// those rows, [`crate::snapshot`]): take the in-memory state from them as a load does,
    /// keeping what readers and subscribers hold on to.
    fn installed(&mut self, view: &AppView<'_>) -> Result<(), Error>;

    /// A digest of the replicated state; `view` holds the state's column families at the same
    /// moment (digests are taken between apply calls).
    fn digest(&self, view: &AppView<'_>) -> Result<[u8; 32], Error>;

    /// The last event seq applied (for status and read-your-write waits).
    fn applied_seq(&self) -> u64;
}
