//! The in-memory index of the cache: which chunks are on disk, how big they are,
//! their LRU order, and who is reading them. Pure bookkeeping, no I/O: the
//! [`ChunkCache`](crate::ChunkCache) holds it under a mutex and does the file
//! operations outside that mutex.

use std::collections::{BTreeMap, HashMap, HashSet};

use stoker_format::Digest;

/// One chunk known to the index.
#[derive(Debug)]
struct Entry {
    len: u64,
    /// Position in the LRU order (`Index::lru` key); larger is more recent.
    tick: u64,
    /// Number of live [`CachedChunk`](crate::CachedChunk) guards. Pinned entries are never evicted.
    pins: u32,
    /// Distinguishes this entry from an earlier or later one for the same digest,
    /// so a guard that outlives a removal cannot unpin a newer entry.
    generation: u64,
    /// `false` while the file is being renamed into place: not readable, not evictable.
    ready: bool,
    /// The file has been hashed and found correct since this process started, or
    /// this process wrote it from verified bytes.
    verified: bool,
}

/// What [`Index::reserve`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reservation {
    /// The caller owns the new entry and must call [`Index::finish_install`].
    Reserved { generation: u64 },
    /// The chunk is already present (or being installed by someone else).
    AlreadyPresent,
    /// An older file for this digest is being deleted; wait and try again.
    DeletionPending,
}

/// A successful pin: what the reader needs to open and check the file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pinned {
    pub generation: u64,
    pub len: u64,
    pub verified: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    entries: HashMap<Digest, Entry>,
    /// LRU order: oldest first.
    lru: BTreeMap<u64, Digest>,
    /// Digests whose file is being unlinked right now (outside the lock).
    deleting: HashSet<Digest>,
    next_tick: u64,
    next_generation: u64,
    bytes: u64,
}

impl Index {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn chunks(&self) -> u64 {
        self.entries.len() as u64
    }

    /// True if the chunk is present and readable.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.entries.get(digest).is_some_and(|e| e.ready)
    }

    /// Adds a ready entry found on disk at startup, as the most recent one.
    /// Callers add entries oldest first. A duplicate is ignored.
    pub fn add_existing(&mut self, digest: Digest, len: u64) {
        if self.entries.contains_key(&digest) {
            return;
        }
        let generation = self.new_generation();
        let tick = self.new_tick();
        self.lru.insert(tick, digest);
        self.bytes += len;
        self.entries.insert(
            digest,
            Entry {
                len,
                tick,
                pins: 0,
                generation,
                ready: true,
                verified: false,
            },
        );
    }

    /// Starts installing a chunk: reserves its space and makes it the most recent entry.
    pub fn reserve(&mut self, digest: Digest, len: u64) -> Reservation {
        if self.deleting.contains(&digest) {
            return Reservation::DeletionPending;
        }
        if self.entries.contains_key(&digest) {
            return Reservation::AlreadyPresent;
        }
        let generation = self.new_generation();
        let tick = self.new_tick();
        self.lru.insert(tick, digest);
        self.bytes += len;
        self.entries.insert(
            digest,
            Entry {
                len,
                tick,
                pins: 0,
                generation,
                ready: false,
                verified: false,
            },
        );
        Reservation::Reserved { generation }
    }

    /// Ends an installation: the file is in place (`ok`) or the rename failed.
    /// A file installed by this process holds the verified bytes it was written
    /// from, so it counts as checked.
    pub fn finish_install(&mut self, digest: &Digest, generation: u64, ok: bool) {
        let Some(entry) = self.entry_mut(digest, generation) else {
            return;
        };
        if ok {
            entry.ready = true;
            entry.verified = true;
        } else {
            self.forget(digest);
        }
    }

    /// Pins a ready entry for reading and marks it most recently used.
    pub fn pin(&mut self, digest: &Digest) -> Option<Pinned> {
        let tick = self.new_tick();
        let entry = self.entries.get_mut(digest).filter(|e| e.ready)?;
        self.lru.remove(&entry.tick);
        entry.tick = tick;
        self.lru.insert(tick, *digest);
        entry.pins += 1;
        Some(Pinned {
            generation: entry.generation,
            len: entry.len,
            verified: entry.verified,
        })
    }

    pub fn unpin(&mut self, digest: &Digest, generation: u64) {
        if let Some(entry) = self.entry_mut(digest, generation) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }

    pub fn mark_verified(&mut self, digest: &Digest, generation: u64) {
        if let Some(entry) = self.entry_mut(digest, generation) {
            entry.verified = true;
        }
    }

    /// Takes a ready entry out of the index (pinned or not) and marks its file as
    /// being deleted. Returns false if there was no such entry; the caller
    /// must unlink the file and then call [`Index::finish_delete`].
    /// With `generation`, only that exact entry is removed.
    pub fn start_delete(&mut self, digest: &Digest, generation: Option<u64>) -> bool {
        let matches = self
            .entries
            .get(digest)
            .is_some_and(|e| e.ready && generation.is_none_or(|g| g == e.generation));
        if matches {
            self.forget(digest);
            self.deleting.insert(*digest);
        }
        matches
    }

    /// Drops an entry whose file vanished on its own: nothing to unlink.
    pub fn forget_vanished(&mut self, digest: &Digest, generation: u64) {
        if self
            .entries
            .get(digest)
            .is_some_and(|e| e.generation == generation)
        {
            self.forget(digest);
        }
    }

    pub fn finish_delete(&mut self, digest: &Digest) {
        self.deleting.remove(digest);
    }

    /// Picks least-recently-used, unpinned, ready entries until usage fits in
    /// `capacity`, takes them out of the index and marks them as being deleted.
    /// `protect` (the chunk just inserted) is never chosen. If pinned entries
    /// make it impossible to fit, usage stays above `capacity` until they are unpinned.
    pub fn evict_to(&mut self, capacity: u64, protect: Option<&Digest>) -> Vec<Digest> {
        if self.bytes <= capacity {
            return Vec::new();
        }
        let mut excess = self.bytes - capacity;
        let mut victims = Vec::new();
        for digest in self.lru.values() {
            if excess == 0 {
                break;
            }
            if Some(digest) == protect {
                continue;
            }
            let Some(entry) = self.entries.get(digest) else {
                continue;
            };
            if entry.pins > 0 || !entry.ready {
                continue;
            }
            excess = excess.saturating_sub(entry.len);
            victims.push(*digest);
        }
        for digest in &victims {
            self.forget(digest);
            self.deleting.insert(*digest);
        }
        victims
    }

    fn entry_mut(&mut self, digest: &Digest, generation: u64) -> Option<&mut Entry> {
        self.entries
            .get_mut(digest)
            .filter(|e| e.generation == generation)
    }

    fn forget(&mut self, digest: &Digest) {
        if let Some(entry) = self.entries.remove(digest) {
            self.lru.remove(&entry.tick);
            self.bytes -= entry.len;
        }
    }

    fn new_tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn new_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    fn install(index: &mut Index, digest: Digest, len: u64) -> u64 {
        let Reservation::Reserved { generation } = index.reserve(digest, len) else {
            panic!("expected a reservation");
        };
        index.finish_install(&digest, generation, true);
        generation
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut index = Index::default();
        for n in 1..=3 {
            install(&mut index, d(n), 10);
        }
        let p = index.pin(&d(1)).expect("pins");
        index.unpin(&d(1), p.generation);
        // Order now (oldest first): 2, 3, 1.
        assert_eq!(index.evict_to(20, None), vec![d(2)]);
        assert_eq!(index.evict_to(10, None), vec![d(3)]);
        assert!(index.contains(&d(1)));
        assert_eq!(index.bytes(), 10);
    }

    #[test]
    fn never_evicts_pinned_installing_or_protected_entries() {
        let mut index = Index::default();
        install(&mut index, d(1), 10);
        let pinned = index.pin(&d(1)).expect("ready entry pins");
        let Reservation::Reserved { generation } = index.reserve(d(2), 10) else {
            panic!("expected a reservation");
        };
        install(&mut index, d(3), 10);
        assert!(index.evict_to(0, Some(&d(3))).is_empty());
        assert_eq!(index.bytes(), 30);
        index.finish_install(&d(2), generation, true);
        index.unpin(&d(1), pinned.generation);
        assert_eq!(index.evict_to(0, Some(&d(3))), vec![d(1), d(2)]);
        assert_eq!(index.bytes(), 10);
    }

    #[test]
    fn stale_guard_does_not_unpin_a_newer_entry() {
        let mut index = Index::default();
        install(&mut index, d(1), 10);
        let old = index.pin(&d(1)).expect("pins");
        assert!(index.start_delete(&d(1), None));
        assert_eq!(index.reserve(d(1), 10), Reservation::DeletionPending);
        index.finish_delete(&d(1));
        install(&mut index, d(1), 10);
        let _new = index.pin(&d(1)).expect("pins");
        index.unpin(&d(1), old.generation);
        assert!(
            index.evict_to(0, None).is_empty(),
            "new entry is still pinned"
        );
    }

    #[test]
    fn failed_install_releases_the_reservation() {
        let mut index = Index::default();
        let Reservation::Reserved { generation } = index.reserve(d(1), 10) else {
            panic!("expected a reservation");
        };
        assert!(!index.contains(&d(1)));
        assert!(index.pin(&d(1)).is_none());
        index.finish_install(&d(1), generation, false);
        assert_eq!(index.bytes(), 0);
        assert_eq!(index.chunks(), 0);
    }
}
