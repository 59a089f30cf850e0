//! The per-group event log: one event per accepted command under consecutive seqs from 1, in
//! the `events` column family, and the live stream that serves `Subscribe` from any replica.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use crate::{AppStore, AppView, Error, Writes, decode};

/// The column family of the event log; applications list it in their `COLUMN_FAMILIES`.
pub const EVENTS: &str = "events";

/// Events sent per read to a subscriber.
const STREAM_CHUNK: usize = 512;

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The seq of the last event in the log (0 when empty): the log is the record of it, so no
/// separate counter is stored.
pub fn last_seq(store: &AppView<'_>) -> Result<u64, Error> {
    match store.last_key(EVENTS)? {
        Some(key) => Ok(u64::from_be_bytes(
            key.as_slice()
                .try_into()
                .map_err(|_| Error::Corrupt("event key".into()))?,
        )),
        None => Ok(0),
    }
}

/// Appends `event` in the groups' encoding ([`crate::encode`]).
pub fn append<E: Serialize>(writes: &mut Writes<'_>, seq: u64, event: &E) {
    writes.put_encoded(EVENTS, &key(seq), event);
}

/// Appends the bytes that `write` produces: for an application that keeps its events in an
/// encoding of its own (read back with [`read_stored`] and [`stream_stored`]).
pub fn append_written(writes: &mut Writes<'_>, seq: u64, write: impl FnOnce(&mut Vec<u8>)) {
    writes.put_written(EVENTS, &key(seq), write);
}

/// Events with seqs `from..=to`, at most `limit`, in order, as stored.
pub fn read_stored(
    store: &AppView<'_>,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    let mut events = Vec::new();
    for (stored_key, value) in store.scan_from(EVENTS, &key(from), limit)? {
        let seq = u64::from_be_bytes(
            stored_key
                .as_slice()
                .try_into()
                .map_err(|_| Error::Corrupt("event key".into()))?,
        );
        if seq > to {
            break;
        }
        events.push((seq, value));
    }
    Ok(events)
}

/// [`read_stored`] of events [`append`]ed in the groups' encoding, decoded.
pub fn read<E: DeserializeOwned>(
    store: &AppView<'_>,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<(u64, E)>, Error> {
    read_stored(store, from, to, limit)?
        .into_iter()
        .map(|(seq, value)| Ok((seq, decode("event", &value)?)))
        .collect()
}

/// [`stream_stored`] of events [`append`]ed in the groups' encoding, decoded.
pub fn stream<E, T>(
    store: AppStore,
    applied: watch::Receiver<u64>,
    from: u64,
    to_message: impl Fn(E) -> T + Send + 'static,
) -> mpsc::Receiver<Result<T, tonic::Status>>
where
    E: DeserializeOwned + Send + 'static,
    T: Send + 'static,
{
    stream_stored(store, applied, from, move |stored| {
        Ok(to_message(decode("event", &stored)?))
    })
}

/// A live stream of events from `from` on: waits for each to be applied (`applied` carries the
/// last applied seq), sends them in order with no gap (`to_message` gets each one's stored
/// bytes), and ends when the receiver goes away.
pub fn stream_stored<T>(
    store: AppStore,
    mut applied: watch::Receiver<u64>,
    from: u64,
    to_message: impl Fn(Vec<u8>) -> Result<T, Error> + Send + 'static,
) -> mpsc::Receiver<Result<T, tonic::Status>>
where
    T: Send + 'static,
{
    let (sender, receiver) = mpsc::channel(STREAM_CHUNK);
    tokio::spawn(async move {
        let mut next = from.max(1);
        loop {
            if applied.wait_for(|seq| *seq >= next).await.is_err() {
                return;
            }
            let events = read_stored(&store.view(), next, u64::MAX, STREAM_CHUNK);
            let events = match events {
                Ok(events) => events,
                Err(error) => {
                    let _ = sender.send(Err(error.into())).await;
                    return;
                }
            };
            for (seq, stored) in events {
                // The log is gap-free; a hole is a bug, never something to skip over.
                assert_eq!(seq, next, "the event log has a gap");
                next += 1;
                let message =
                    to_message(stored).map_err(|error| tonic::Status::internal(error.to_string()));
                let failed = message.is_err();
                if sender.send(message).await.is_err() || failed {
                    return;
                }
            }
        }
    });
    receiver
}
