//! Region bookkeeping of a target: the dirty-region log, the per-region
//! locks that order rebuild copies against application writes, and the
//! write generations that say which regions may not be durable yet.
//!
//! A volume is divided into regions of [`REGION_BYTES`] (1 MiB; the last
//! region may be shorter). 1 MiB keeps the log small (128 KiB of bits per
//! TiB of volume), matches the rebuild's hashing granularity, and bounds
//! what a single 4 KiB write costs a delta rebuild to 1 MiB of copying.
//!
//! What it must never do: lose a mark. Every structure here errs on the
//! side of "dirty": a region is cleared only by the rebuild that copied it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// Size of one region in bytes (1 MiB): the unit of the dirty-region log,
/// of rebuild hashing and of the rebuild's copy locks.
pub const REGION_BYTES: u64 = 1 << 20;

/// Number of lock stripes; regions share stripes modulo this count.
const LOCK_STRIPES: usize = 256;

/// The regions overlapping `length` bytes at `offset`, as a range of
/// region indices (empty for a zero length).
pub fn regions_of(offset: u64, length: u64) -> std::ops::Range<u64> {
    if length == 0 {
        return 0..0;
    }
    let first = offset / REGION_BYTES;
    let last = (offset.saturating_add(length) - 1) / REGION_BYTES;
    first..last + 1
}

/// A bitmap with one bit per region: a dirty-region log, or the set of
/// regions a rebuild still has to copy. Marking and clearing are lock-free
/// and may race with each other; a bit set by `mark` is never lost except
/// through `clear` of that bit.
#[derive(Debug)]
pub struct RegionMap {
    words: Vec<AtomicU64>,
    regions: u64,
}

impl RegionMap {
    /// An empty map for a volume of `size_bytes`.
    pub fn new(size_bytes: u64) -> Self {
        let regions = size_bytes.div_ceil(REGION_BYTES);
        let words = (0..regions.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Self { words, regions }
    }

    /// Number of regions the map covers.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Marks every region overlapping `length` bytes at `offset`.
    pub fn mark(&self, offset: u64, length: u64) {
        for region in regions_of(offset, length) {
            self.mark_region(region);
        }
    }

    /// Marks one region; indices past the end are ignored.
    pub fn mark_region(&self, region: u64) {
        if region < self.regions {
            self.words[(region / 64) as usize].fetch_or(1 << (region % 64), Ordering::AcqRel);
        }
    }

    /// Clears one region.
    pub fn clear_region(&self, region: u64) {
        if region < self.regions {
            self.words[(region / 64) as usize].fetch_and(!(1 << (region % 64)), Ordering::AcqRel);
        }
    }

    /// True when the region is marked.
    pub fn is_marked(&self, region: u64) -> bool {
        region < self.regions
            && self.words[(region / 64) as usize].load(Ordering::Acquire) & (1 << (region % 64))
                != 0
    }

    /// Marks every region marked in `other` (same volume size).
    pub fn merge(&self, other: &RegionMap) {
        for (word, theirs) in self.words.iter().zip(&other.words) {
            let bits = theirs.load(Ordering::Acquire);
            if bits != 0 {
                word.fetch_or(bits, Ordering::AcqRel);
            }
        }
    }

    /// The marked regions, ascending (a snapshot).
    pub fn marked(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (index, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                out.push(index as u64 * 64 + bit);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Number of marked regions.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

/// Striped reader-writer locks over regions.
///
/// Application writes (WRITE, TRIM, WRITE_ZEROES) hold *shared* guards of
/// the regions they touch from before they choose their replicas until
/// every replica answered; a rebuild copy holds *exclusive* guards of the
/// regions it copies from before it reads the source until the target
/// replica has the bytes. So a copy never overwrites a newer write, and a
/// write never lands between a copy's read and its write (invariant 4).
///
/// Regions map to [`LOCK_STRIPES`] stripes modulo their count; guards are
/// always taken in ascending stripe order, so no two holders deadlock.
/// tokio's lock is fair: a waiting copy holds back later writes to its
/// stripes, and cannot starve.
#[derive(Debug)]
pub struct RegionLocks {
    stripes: Vec<Arc<RwLock<()>>>,
}

impl Default for RegionLocks {
    fn default() -> Self {
        Self {
            stripes: (0..LOCK_STRIPES)
                .map(|_| Arc::new(RwLock::new(())))
                .collect(),
        }
    }
}

/// Guards held by a writer or a copy; released on drop.
#[derive(Debug)]
pub enum RegionGuard {
    /// Shared guards of an application write.
    Shared(#[allow(dead_code)] Vec<OwnedRwLockReadGuard<()>>),
    /// Exclusive guards of a rebuild copy or a barrier.
    Exclusive(#[allow(dead_code)] Vec<OwnedRwLockWriteGuard<()>>),
}

impl RegionLocks {
    /// The sorted, distinct stripes of `regions`.
    fn stripes_of(&self, regions: std::ops::Range<u64>) -> Vec<usize> {
        let count = regions.end.saturating_sub(regions.start);
        if count >= LOCK_STRIPES as u64 {
            return (0..LOCK_STRIPES).collect();
        }
        let mut stripes: Vec<usize> = regions
            .map(|r| (r % LOCK_STRIPES as u64) as usize)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
    }

    /// Takes shared guards of the regions overlapping `length` bytes at
    /// `offset`.
    ///
    /// # Cancel safety
    /// Cancel safe: guards taken so far are released when the future is
    /// dropped.
    pub async fn shared(&self, offset: u64, length: u64) -> RegionGuard {
        let mut guards = Vec::new();
        for stripe in self.stripes_of(regions_of(offset, length)) {
            guards.push(Arc::clone(&self.stripes[stripe]).read_owned().await);
        }
        RegionGuard::Shared(guards)
    }

    /// Takes exclusive guards of `regions`.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`RegionLocks::shared`].
    pub async fn exclusive(&self, regions: std::ops::Range<u64>) -> RegionGuard {
        let mut guards = Vec::new();
        for stripe in self.stripes_of(regions) {
            guards.push(Arc::clone(&self.stripes[stripe]).write_owned().await);
        }
        RegionGuard::Exclusive(guards)
    }

    /// Waits until every write that holds guards now has released them
    /// (takes and drops every stripe exclusively): a barrier after which
    /// every write chose its replicas after the caller's last state change.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn barrier(&self) {
        drop(self.exclusive(0..LOCK_STRIPES as u64).await);
    }
}

/// Which regions were written since the last flush that succeeded on
/// every replica it was sent to.
///
/// A write records the current generation in its regions when it
/// completes; a flush takes the generation before it is sent and, when it
/// succeeds everywhere, declares every generation up to it durable. A
/// replica that leaves the in-sync set starts its dirty-region log with the
/// regions whose writes may not be durable on it yet: a replica whose node
/// crashed loses exactly those (8 bytes per region: 8 MiB per TiB).
#[derive(Debug)]
pub struct WriteGenerations {
    slots: Vec<AtomicU64>,
    current: AtomicU64,
    durable: AtomicU64,
}

impl WriteGenerations {
    /// No writes yet, for a volume of `size_bytes`.
    pub fn new(size_bytes: u64) -> Self {
        let regions = size_bytes.div_ceil(REGION_BYTES);
        Self {
            slots: (0..regions).map(|_| AtomicU64::new(0)).collect(),
            current: AtomicU64::new(1),
            durable: AtomicU64::new(0),
        }
    }

    /// Records a completed write of `length` bytes at `offset`.
    pub fn written(&self, offset: u64, length: u64) {
        let generation = self.current.load(Ordering::Acquire);
        for region in regions_of(offset, length) {
            if let Some(slot) = self.slots.get(region as usize) {
                slot.fetch_max(generation, Ordering::AcqRel);
            }
        }
    }

    /// Starts a flush: returns the generation it will make durable.
    pub fn flush_started(&self) -> u64 {
        self.current.fetch_add(1, Ordering::AcqRel)
    }

    /// Declares the writes recorded up to `generation` durable.
    pub fn flush_succeeded(&self, generation: u64) {
        self.durable.fetch_max(generation, Ordering::AcqRel);
    }

    /// Marks in `map` every region with a write that may not be durable.
    pub fn mark_unflushed(&self, map: &RegionMap) {
        let durable = self.durable.load(Ordering::Acquire);
        for (region, slot) in self.slots.iter().enumerate() {
            if slot.load(Ordering::Acquire) > durable {
                map.mark_region(region as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn regions_of_ranges() {
        assert_eq!(regions_of(0, 0), 0..0);
        assert_eq!(regions_of(0, 1), 0..1);
        assert_eq!(regions_of(REGION_BYTES - 1, 2), 0..2);
        assert_eq!(regions_of(REGION_BYTES, REGION_BYTES), 1..2);
        assert_eq!(regions_of(3 * REGION_BYTES + 5, 2 * REGION_BYTES), 3..6);
    }

    #[test]
    fn map_marks_clears_and_merges() {
        let map = RegionMap::new(130 * REGION_BYTES + 1);
        assert_eq!(map.regions(), 131);
        map.mark(REGION_BYTES - 1, 2);
        map.mark_region(130);
        map.mark_region(131); // past the end: ignored
        assert_eq!(map.marked(), vec![0, 1, 130]);
        map.clear_region(1);
        assert!(!map.is_marked(1) && map.is_marked(0));
        let other = RegionMap::new(130 * REGION_BYTES + 1);
        other.mark_region(64);
        map.merge(&other);
        assert_eq!(map.marked(), vec![0, 64, 130]);
        assert_eq!(map.count(), 3);
    }

    #[test]
    fn generations_track_unflushed_regions() {
        let generations = WriteGenerations::new(8 * REGION_BYTES);
        generations.written(0, 10);
        let flush = generations.flush_started();
        generations.written(3 * REGION_BYTES, 10); // after the flush started
        generations.flush_succeeded(flush);
        let map = RegionMap::new(8 * REGION_BYTES);
        generations.mark_unflushed(&map);
        assert_eq!(map.marked(), vec![3]);
        // A failed flush declares nothing durable.
        let _failed = generations.flush_started();
        generations.written(5 * REGION_BYTES, 1);
        let map = RegionMap::new(8 * REGION_BYTES);
        generations.mark_unflushed(&map);
        assert_eq!(map.marked(), vec![3, 5]);
    }

    #[tokio::test]
    async fn an_exclusive_guard_waits_for_shared_ones_and_holds_off_new_ones() {
        let locks = Arc::new(RegionLocks::default());
        let write = locks.shared(0, 4096).await;
        let copier = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.exclusive(0..1).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!copier.is_finished(), "the copy did not wait for the write");
        // Another region (another stripe) is not held back.
        let other = tokio::time::timeout(Duration::from_secs(5), locks.shared(REGION_BYTES, 4096))
            .await
            .expect("a write to another region was blocked");
        drop(other);
        drop(write);
        let copy = tokio::time::timeout(Duration::from_secs(5), copier)
            .await
            .expect("copy lock")
            .expect("copy task");
        let blocked = tokio::time::timeout(Duration::from_millis(50), locks.shared(100, 1)).await;
        assert!(blocked.is_err(), "a write got in during the copy");
        drop(copy);
        tokio::time::timeout(Duration::from_secs(5), locks.barrier())
            .await
            .expect("barrier");
    }
}
