//! Continuity of one shard's events: only the next seq is applied; older seqs are replays and
//! are dropped; newer ones wait (a gap) until the missing ones arrive.

use std::collections::BTreeMap;

/// Events held back by a gap, per shard, before the newest are dropped (they are read again
/// from where the projection's committed position says).
pub const HELD_MAX: usize = 100_000;

#[derive(Debug)]
pub struct Cursor<T> {
    applied: u64,
    held: BTreeMap<u64, T>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// At or below the applied seq: already projected.
    Replay,
    /// Above the next seq: held until the gap closes.
    Held,
    /// Dropped: the gap holds too many events already.
    Dropped,
    /// The next seq, followed by every held event it makes contiguous, in order.
    Ready(Vec<(u64, T)>),
}

impl<T> Cursor<T> {
    pub fn new(applied: u64) -> Cursor<T> {
        Cursor {
            applied,
            held: BTreeMap::new(),
        }
    }

    /// The last seq handed out as ready.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The missing seq and the first one held after it, while there is a gap.
    pub fn gap(&self) -> Option<(u64, u64)> {
        self.held
            .keys()
            .next()
            .map(|first| (self.applied + 1, *first))
    }

    pub fn offer(&mut self, seq: u64, item: T) -> Offer<T> {
        if seq <= self.applied {
            return Offer::Replay;
        }
        if seq > self.applied + 1 {
            if self.held.contains_key(&seq) {
                return Offer::Replay;
            }
            if self.held.len() >= HELD_MAX {
                return Offer::Dropped;
            }
            self.held.insert(seq, item);
            return Offer::Held;
        }
        let mut ready = vec![(seq, item)];
        self.applied = seq;
        while let Some(item) = self.held.remove(&(self.applied + 1)) {
            self.applied += 1;
            ready.push((self.applied, item));
        }
        Offer::Ready(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_gap_holds_later_events_until_it_closes() {
        let mut cursor = Cursor::new(2);
        assert_eq!(cursor.offer(2, 'b'), Offer::Replay);
        assert_eq!(cursor.offer(4, 'd'), Offer::Held);
        assert_eq!(cursor.offer(5, 'e'), Offer::Held);
        assert_eq!(cursor.offer(5, 'e'), Offer::Replay);
        assert_eq!(cursor.gap(), Some((3, 4)));
        assert_eq!(cursor.applied(), 2);
        assert_eq!(
            cursor.offer(3, 'c'),
            Offer::Ready(vec![(3, 'c'), (4, 'd'), (5, 'e')])
        );
        assert_eq!(cursor.gap(), None);
        assert_eq!(cursor.applied(), 5);
    }

    proptest! {
        /// Whatever the order and repetition of arrivals, every seq comes out exactly once, in
        /// order, and nothing comes out past a missing seq.
        #[test]
        fn ready_events_are_exactly_the_contiguous_prefix(
            arrivals in proptest::collection::vec(1u64..40, 0..200)
        ) {
            let mut cursor = Cursor::new(0);
            let mut out = Vec::new();
            for seq in &arrivals {
                if let Offer::Ready(ready) = cursor.offer(*seq, *seq) {
                    for (seq, item) in ready {
                        prop_assert_eq!(seq, item);
                        out.push(seq);
                    }
                }
            }
            let mut prefix = 0;
            while arrivals.contains(&(prefix + 1)) {
                prefix += 1;
            }
            prop_assert_eq!(out, (1..=prefix).collect::<Vec<u64>>());
            prop_assert_eq!(cursor.applied(), prefix);
        }
    }
}
