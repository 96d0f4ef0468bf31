//! Making room: the eviction policy (least recently used among the entries nobody writes or pins), and the
//! clean-ups that run before it (leftovers of dead writers, expired entries, pins of dead processes).

use std::sync::atomic::Ordering;

use super::index::{Locked, Owner};
use super::layout::{expired, now_ns, READY};
use crate::lock::process_alive;

/// How a reservation makes room when the free space is short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// Evict least-recently-used entries that no live process pins: the cache's policy.
    EvictLru,
    /// Take only free space, and the space of dead writers' and expired entries: no live entry is evicted.
    FreeOnly,
}

/// One allocation's eviction state. The first call to [`Eviction::make_room`] cleans up (dead writers, dead pins,
/// expired entries) and takes a snapshot of the LRU order; each later call evicts the next victim of that snapshot.
#[derive(Debug)]
pub(super) struct Eviction {
    room: Room,
    /// (last access, slot), oldest last; `None` until the first call.
    victims: Option<Vec<(u64, u32)>>,
}

impl Eviction {
    pub(super) fn new(room: Room) -> Self {
        Eviction {
            room,
            victims: None,
        }
    }

    /// Whether an entry may be evicted now: published, not being written, and not pinned.
    fn evictable(l: &Locked<'_>, slot: u32) -> bool {
        let e = l.pool.entry(slot);
        e.state.load(Ordering::Relaxed) == READY
            && e.owner.load(Ordering::Relaxed) == 0
            && e.pins.load(Ordering::Relaxed) == 0
    }

    /// Frees some space; false when nothing more can be freed under this policy.
    pub(super) fn make_room(&mut self, l: &mut Locked<'_>) -> bool {
        let Some(list) = self.victims.as_mut() else {
            l.reap();
            l.purge_expired();
            let mut list: Vec<(u64, u32)> = (0..l.pool.layout.max_entries as u32)
                .filter(|&slot| Self::evictable(l, slot))
                .map(|slot| (l.pool.lru(slot).load(Ordering::Relaxed), slot))
                .collect();
            // Oldest last, so that pop() yields it.
            list.sort_unstable_by(|a, b| b.cmp(a));
            self.victims = Some(list);
            // Cleaning up may have made room already.
            return true;
        };
        if self.room == Room::FreeOnly {
            return false;
        }
        while let Some((_, slot)) = list.pop() {
            // Skip candidates that stopped being evictable since the scan (freed, written in place, pinned). A get
            // since the scan does not save an entry: the scan is this allocation's snapshot of the LRU order.
            if Self::evictable(l, slot) {
                l.free_entry(slot);
                l.h().evictions.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }
}

impl Locked<'_> {
    /// Frees the pending entries of dead processes (writers killed mid-put, leases of dead holders), and clears the
    /// pins of dead processes (freeing the retired entries only they held).
    pub(super) fn reap(&mut self) {
        self.clear_dead_pins();
        if self.h().pending.load(Ordering::Relaxed) == 0 {
            return;
        }
        for slot in 0..self.pool.layout.max_entries as u32 {
            let owner = self.pool.entry(slot).owner.load(Ordering::Relaxed);
            if owner != 0 && !process_alive(owner) {
                self.free_entry(slot);
            }
        }
    }

    /// Removes READY entries whose TTL has passed.
    pub(super) fn purge_expired(&mut self) {
        if self.h().ttl_entries.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = now_ns();
        for slot in 0..self.pool.layout.max_entries as u32 {
            let e = self.pool.entry(slot);
            if e.state.load(Ordering::Relaxed) == READY
                && expired(
                    e.created_ns.load(Ordering::Relaxed),
                    e.ttl_ns.load(Ordering::Relaxed),
                    now,
                )
                && self.settle(slot) == Owner::Settled
            {
                self.remove_entry(slot);
            }
        }
    }
}
