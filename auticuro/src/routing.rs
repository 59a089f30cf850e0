//! Which storage shard holds an account: account id → slot (a stable hash) → shard (the slot
//! table of the topology). Every service routes with this one function.

use crate::ledger::AccountId;

/// Slots in the slot table. Fixed for the life of a deployment: a slot moves between shards as a
/// unit, so it is the granularity of rebalancing.
pub const SLOT_COUNT: usize = 1024;

/// FNV-1a, 64 bits: stable across processes, versions and platforms (unlike `std`'s hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

pub fn slot_of(account_id: &AccountId) -> usize {
    (fnv1a(account_id.as_str().as_bytes()) % SLOT_COUNT as u64) as usize
}

/// The owner shard of every slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotTable {
    owners: Vec<u32>,
}

impl SlotTable {
    /// Slots dealt round-robin over `shards`.
    pub fn uniform(shards: &[u32]) -> SlotTable {
        assert!(!shards.is_empty(), "at least one storage shard");
        SlotTable {
            owners: (0..SLOT_COUNT)
                .map(|slot| shards[slot % shards.len()])
                .collect(),
        }
    }

    pub fn owners(&self) -> &[u32] {
        &self.owners
    }

    pub fn shard_of(&self, account_id: &AccountId) -> u32 {
        self.owners[slot_of(account_id)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_and_spread() {
        let id = AccountId::parse("user:42").unwrap();
        assert_eq!(slot_of(&id), slot_of(&AccountId::parse("user:42").unwrap()));
        // FNV-1a is fixed: this value must never change, or accounts would move shards.
        assert_eq!(fnv1a(b"user:42"), 0x6c15_1ea4_dcd2_21c2);
        let table = SlotTable::uniform(&[1, 2]);
        let on_first = (0..1000)
            .filter(|i| table.shard_of(&AccountId::parse(&format!("user:{i}")).unwrap()) == 1)
            .count();
        assert!(
            (400..600).contains(&on_first),
            "{on_first} of 1000 on shard 1"
        );
    }
}
