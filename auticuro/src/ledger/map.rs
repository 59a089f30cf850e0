//! A hash map that grows one small partition at a time.
//!
//! The ledger's two-phase legs (and the coordinator's transactions) grow with every
//! transaction. A single `HashMap` doubles all at once: at a few hundred thousand entries
//! that one insert rehashes every entry and faults in tens of megabytes, stalling apply for
//! 100 ms and more — on every replica at the same moment, since they apply the same commands.
//!
//! Here the entries are split over [`PARTITIONS`] maps, and the split is deliberately uneven:
//! partition `i` takes a share proportional to `2^(i / PARTITIONS)`, so the shares span one
//! doubling. Equal shares would make every partition reach its growth point at nearly the same
//! total, one burst again; with these shares the growth points are spread evenly over each
//! doubling of the whole map, and each growth moves 1–2% of the entries.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::ops::Index;
use std::sync::LazyLock;

use foldhash::fast::FixedState;

const PARTITIONS: usize = 64;

/// The top [`ROUTE_BITS`] of a key's hash pick its partition through [`ROUTES`].
const ROUTE_BITS: u32 = 10;

/// For each value `u` of the top hash bits, the partition
/// `floor(PARTITIONS * log2(1 + u / 2^ROUTE_BITS))`: the inverse of the shares' distribution,
/// so partition `i` gets a share proportional to `2^(i / PARTITIONS)`.
static ROUTES: LazyLock<[u8; 1 << ROUTE_BITS]> = LazyLock::new(|| {
    let mut routes = [0u8; 1 << ROUTE_BITS];
    for (value, route) in routes.iter_mut().enumerate() {
        let fraction = value as f64 / f64::from(1u32 << ROUTE_BITS);
        *route = (PARTITIONS as f64 * (1.0 + fraction).log2()) as u8;
    }
    routes
});

pub struct PartitionedMap<K, V> {
    /// Chooses the partition: foldhash with a fixed seed, so the same key lands in the same
    /// partition in every process, at a fraction of the cost of the SipHash each partition
    /// hashes with again. Each partition is a `HashMap` with its own random keys, so keys
    /// chosen to collide in the router still cannot degrade lookups inside one; at worst they
    /// all share a partition, which is one ordinary `HashMap`.
    router: FixedState,
    partitions: Vec<HashMap<K, V>>,
}

impl<K: Hash + Eq, V> PartitionedMap<K, V> {
    pub fn new() -> PartitionedMap<K, V> {
        PartitionedMap {
            router: FixedState::with_seed(0),
            partitions: (0..PARTITIONS).map(|_| HashMap::new()).collect(),
        }
    }

    fn partition<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // foldhash's top bits follow runs of similar keys (consecutive numbers) closely;
        // murmur3's finalizer spreads every input bit over them.
        let mut hash = self.router.hash_one(key);
        hash = (hash ^ (hash >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash = (hash ^ (hash >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        let top = (hash ^ (hash >> 33)) >> (u64::BITS - ROUTE_BITS);
        usize::from(ROUTES[top as usize])
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.partitions[self.partition(key)].get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let index = self.partition(&key);
        self.partitions[index].insert(key, value)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let index = self.partition(key);
        self.partitions[index].remove(key)
    }

    /// Removes every entry, keeping each partition's capacity.
    pub fn clear(&mut self) {
        self.partitions.iter_mut().for_each(HashMap::clear);
    }

    pub fn len(&self) -> usize {
        self.partitions.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.partitions.iter().all(HashMap::is_empty)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.partitions.iter().flat_map(HashMap::iter)
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.partitions.iter().flat_map(HashMap::values)
    }
}

impl<K: Hash + Eq, V> Default for PartitionedMap<K, V> {
    fn default() -> PartitionedMap<K, V> {
        PartitionedMap::new()
    }
}

impl<K: Hash + Eq, V> FromIterator<(K, V)> for PartitionedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> PartitionedMap<K, V> {
        let mut map = PartitionedMap::new();
        for (key, value) in entries {
            map.insert(key, value);
        }
        map
    }
}

impl<K, Q, V> Index<&Q> for PartitionedMap<K, V>
where
    K: Hash + Eq + Borrow<Q>,
    Q: Hash + Eq + ?Sized,
{
    type Output = V;

    /// Panics when the key is absent, like `HashMap`'s index.
    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("the key is in the map")
    }
}

impl<K: Hash + Eq + fmt::Debug, V: fmt::Debug> fmt::Debug for PartitionedMap<K, V> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Operation {
        Insert(u16, u32),
        Remove(u16),
    }

    fn operation() -> impl Strategy<Value = Operation> {
        prop_oneof![
            (any::<u16>(), any::<u32>()).prop_map(|(key, value)| Operation::Insert(key, value)),
            any::<u16>().prop_map(Operation::Remove),
        ]
    }

    proptest! {
        /// Any sequence of inserts and removes leaves the same entries, answers and length as
        /// one `HashMap` given the same sequence.
        #[test]
        fn behaves_like_one_hash_map(operations in prop::collection::vec(operation(), 0..2_000)) {
            let mut map = PartitionedMap::new();
            let mut model = HashMap::new();
            for operation in operations {
                match operation {
                    Operation::Insert(key, value) => {
                        prop_assert_eq!(map.insert(key, value), model.insert(key, value));
                    }
                    Operation::Remove(key) => {
                        prop_assert_eq!(map.remove(&key), model.remove(&key));
                    }
                }
                prop_assert_eq!(map.len(), model.len());
            }
            let mut entries: Vec<(u16, u32)> = map.iter().map(|(k, v)| (*k, *v)).collect();
            entries.sort_unstable();
            let mut expected: Vec<(u16, u32)> = model.iter().map(|(k, v)| (*k, *v)).collect();
            expected.sort_unstable();
            prop_assert_eq!(entries, expected);
            for (key, value) in &model {
                prop_assert_eq!(map.get(key), Some(value));
                prop_assert!(map.contains_key(key));
                prop_assert_eq!(map[key], *value);
            }
        }
    }

    #[test]
    fn partition_shares_span_one_doubling() {
        let map: PartitionedMap<String, u32> =
            (0..100_000).map(|n| (format!("request-{n}"), n)).collect();
        assert_eq!(map.len(), 100_000);
        assert_eq!(map.values().count(), 100_000);
        for (index, partition) in map.partitions.iter().enumerate() {
            let share = 2f64.powf(index as f64 / PARTITIONS as f64) * (2f64.powf(1.0 / 64.0) - 1.0);
            let expected = share * 100_000.0;
            let found = partition.len() as f64;
            assert!(
                (found - expected).abs() < expected * 0.2,
                "partition {index}: {found} entries, expected about {expected:.0}"
            );
        }
        assert_eq!(map.get("request-99999"), Some(&99_999));
        assert_eq!(map.get("request-100000"), None);
    }

    /// The point of the uneven shares: while the map doubles, its partitions grow one after
    /// another, never many at once.
    #[test]
    fn partitions_grow_at_spread_out_points() {
        let mut map = PartitionedMap::new();
        let capacities = |map: &PartitionedMap<u64, ()>| -> Vec<usize> {
            map.partitions.iter().map(HashMap::capacity).collect()
        };
        let mut before = capacities(&map);
        let mut growth_points = Vec::new();
        for key in 0..400_000u64 {
            map.insert(key, ());
            let after = capacities(&map);
            let grown = before.iter().zip(&after).filter(|(b, a)| a > b).count();
            assert!(grown <= 1, "one insert grew {grown} partitions");
            if grown == 1 && key >= 200_000 {
                growth_points.push(key);
            }
            before = after;
        }
        // Over one doubling every partition grows about once; 64 equal shares would instead
        // grow within a narrow band of the doubling.
        assert!(growth_points.len() >= 48, "{growth_points:?}");
        let widest_gap = growth_points.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        let busiest = growth_points
            .iter()
            .map(|start| {
                growth_points
                    .iter()
                    .filter(|point| (*start..start + 5_000).contains(*point))
                    .count()
            })
            .max()
            .unwrap();
        assert!(
            busiest <= 6,
            "{busiest} partitions grew within 5,000 inserts: {growth_points:?}"
        );
        assert!(widest_gap < 40_000, "{growth_points:?}");
    }
}
