//! The TensoCache pool: one shared segment holding a header, an entry index and a data region of tenso packets,
//! opened by any number of processes by name.
//!
//! ```text
//! offset                      size                       contents
//! 0                           4096                       Header (magic, layout, lock word, counters; one
//!                                                        cache line each for the lock, hits and misses)
//! 4096                        max_entries * 256          Entry[max_entries]  (seqlock, state, key, block, times,
//!                                                        pending owner pid, pin count)
//! ..                          max_entries * 8            lru[max_entries]: last access (monotonic ns), 0 = unused
//! ..                          nbuckets * 4               hash buckets: slot + 1 of the chain head, 0 = empty
//! ..                          max_entries * 4            free-slot stack
//! ..                          8 + (max_entries + 2) * 16 free table (see crate::alloc)
//! .. (64-aligned)             pin_slots * 32             pin table: PinSlot[pin_slots] (pid, entry, stamp, count)
//! data_offset (4096-aligned)  data_size (multiple of 64) blocks of 64-byte-aligned packets, and free space
//! ```
//!
//! The code is split by concern: `layout` (the bytes above), `read` (lock-free lookups and the checked read
//! API), `write` (reservations and the other key changes), `lease` (leases and their references), `index` (the locked structure changes: chains,
//! slots, blocks), `evict` (the eviction policy, reaping and expiry), `pin` (the pin table) and `recover` (rebuilding
//! after a dead lock holder, and the invariant check).
//!
//! # Concurrency protocol
//! * Every change to the index, the free table, the pin table or an entry happens under the lock word
//!   ([`crate::lock`]), which survives the death of its holder: the process that takes it over rebuilds the free
//!   table, the free-slot stack, the hash chains, the pin counts and the counters from the entries and pins
//!   themselves ([`Locked::recover`]), so nothing a dead holder half-changed survives, and only entries it was
//!   changing are dropped. The pool is never cleared.
//! * A put reserves a block and an entry (state RESERVED, `owner` = its pid) under the lock, writes the packet
//!   **outside** the lock into space nobody else can see, then publishes it under the lock: the new entry becomes
//!   READY (owner 0) and enters its hash chain, and the key's previous entry is removed. A writer killed while
//!   writing leaves an entry owned by a dead pid, which the next eviction scan, `stats`, `clear` or recovery frees.
//! * When the new packet needs the same block size as the key's current one and that entry is not pinned, the put
//!   overwrites it in place: the entry's sequence number stays odd while the bytes change, so checked readers wait
//!   and retry.
//! * Readers take no lock. They find the entry through the hash chains and validate it with the entry's seqlock and
//!   the index generation (a miss is only believed if no chain changed meanwhile). [`Pool::read`] hands the packet
//!   to a closure and re-checks the entry's sequence number afterwards, retrying on a change, so what the closure
//!   derived (a copy, views, a decode) is never from a torn value.
//! * A zero-copy read hands out the live bytes of the block: unless pinned, they stay as they are until the entry
//!   is overwritten in place, deleted, evicted or expired and its block reused by a later put.
//! * A **pin** ([`Pool::read_pinned`], [`Pool::unpin`]) is a (pid, entry, stamp, count) record in the pin table,
//!   taken under the lock after checking the entry's sequence number. A pinned entry is never evicted nor rewritten
//!   in place; deleting, replacing or expiring it takes it out of the index but keeps its block (state RETIRED) until
//!   its last pin goes. Pins of dead processes are cleared (same liveness check as the lock's) before eviction,
//!   by `stats` and by recovery.
//! * A copying read may copy bytes that a writer is rewriting at that moment (an in-place put, or a block reused
//!   after eviction); the sequence check then discards the copy. Across processes that is what a seqlock does.
//!   Within one process, Rust's memory model counts the overlap as a data race (the encoder writes with plain
//!   stores), and Miri reports it: `scripts/miri.sh` runs every other test of this crate under Miri.

use crate::error::ShmError;
use crate::lock::{self, current_pid};
use crate::segment::Segment;

mod evict;
mod index;
mod layout;
mod lease;
mod pin;
mod read;
mod recover;
#[cfg(test)]
mod tests;
mod write;

pub use evict::Room;
pub use index::Locked;
pub use layout::{
    BLOCK_ALIGN, BYTES_PER_ENTRY, ENTRY_SIZE, HEADER_SIZE, MAGIC, MAX_ENTRIES, MAX_KEY_LEN,
    MAX_PIN_SLOTS, MIN_ENTRIES, MIN_PIN_SLOTS, PIN_SLOT_SIZE, VERSION,
};
pub use lease::{Lease, LeaseHandle};
pub use pin::{Pin, Pinned};
pub use read::{Batched, Hit, Packet, Park, Probe, Spin};
pub use write::Reservation;

use layout::{entries_for, pin_slots_for, Layout};
use std::sync::atomic::Ordering;

/// Counters of a pool (consistent with each other: read under the lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Live entries (keys).
    pub entries: u64,
    /// Index capacity.
    pub max_entries: u64,
    /// Segment size.
    pub pool_size: u64,
    /// Bytes of the data region in blocks (live entries, writes in progress, leases and retired pinned entries).
    pub used_bytes: u64,
    /// `data_region_size - used_bytes`.
    pub free_bytes: u64,
    /// Size of the data region.
    pub data_region_size: u64,
    /// Successful gets.
    pub hits: u64,
    /// Gets that found nothing (or an expired entry).
    pub misses: u64,
    /// Entries being written or leased.
    pub pending: u64,
    /// Times a process took the lock over from a dead holder.
    pub recoveries: u64,
    /// Entries pinned by live processes (including retired ones, out of the index but still viewed).
    pub pinned: u64,
    /// Entries evicted to make room since the pool was created.
    pub evictions: u64,
    /// Capacity of the pin table.
    pub pin_slots: u64,
}

/// A mapped pool. `Send + Sync`: every method may be called from any thread.
#[derive(Debug)]
pub struct Pool {
    seg: Segment,
    layout: Layout,
}

impl Pool {
    /// Creates a pool of `pool_size` bytes named `name` (mode 0600 unless `mode` says otherwise), reserving and
    /// pre-faulting all of it. `max_entries` defaults to one entry per [`BYTES_PER_ENTRY`], within
    /// [[`MIN_ENTRIES`], [`MAX_ENTRIES`]].
    pub fn create(
        name: &str,
        pool_size: u64,
        max_entries: Option<u64>,
        mode: u32,
    ) -> Result<Pool, ShmError> {
        let max_entries = entries_for(pool_size, max_entries);
        let pin_slots = pin_slots_for(max_entries);
        let layout =
            Layout::new(pool_size, max_entries, pin_slots).ok_or_else(|| ShmError::TooSmall {
                size: pool_size,
                minimum: Layout::new(u64::MAX, max_entries, pin_slots)
                    .map_or(0, |l| l.data_offset + BLOCK_ALIGN),
            })?;
        let seg = Segment::create(name, pool_size, mode, true)?;
        Ok(Pool::init(seg, layout))
    }

    /// Writes a fresh pool of `layout` into the zeroed segment `seg`.
    fn init(seg: Segment, layout: Layout) -> Pool {
        let (pool_size, max_entries) = (seg.len() as u64, layout.max_entries);
        let pool = Pool { seg, layout };
        let h = pool.header();
        h.version.store(VERSION, Ordering::Relaxed);
        h.pool_size.store(pool_size, Ordering::Relaxed);
        h.max_entries.store(max_entries, Ordering::Relaxed);
        h.nbuckets.store(layout.nbuckets, Ordering::Relaxed);
        h.data_offset.store(layout.data_offset, Ordering::Relaxed);
        h.data_size.store(layout.data_size, Ordering::Relaxed);
        h.pin_slots.store(layout.pin_slots, Ordering::Relaxed);
        {
            // The segment is new and its name has not been handed out yet: nobody else can take the lock, but
            // going through it keeps the one code path that touches the lock-protected areas.
            let mut l = pool.lock();
            l.reset();
        }
        // Published last: `open` waits for it.
        h.magic.store(MAGIC, Ordering::Release);
        pool
    }

    /// Opens an existing pool.
    pub fn open(name: &str) -> Result<Pool, ShmError> {
        let seg = Segment::open(name, true)?;
        if (seg.len() as u64) < HEADER_SIZE {
            return Err(ShmError::BadPool {
                reason: "segment smaller than the pool header",
            });
        }
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page-aligned, and Header is all atomics.
        let h = unsafe { &*(seg.as_ptr() as *const layout::Header) };
        // A creator initialises the header before publishing the magic; give it a moment.
        let mut spins = 0;
        while h.magic.load(Ordering::Acquire) != MAGIC {
            if spins > 2000 {
                return Err(ShmError::BadPool {
                    reason: "bad magic",
                });
            }
            lock::backoff(&mut spins);
        }
        if h.version.load(Ordering::Relaxed) != VERSION {
            return Err(ShmError::BadPool {
                reason: "unsupported layout version",
            });
        }
        let pool_size = h.pool_size.load(Ordering::Relaxed);
        if pool_size != seg.len() as u64 {
            return Err(ShmError::BadPool {
                reason: "pool size differs from the segment size",
            });
        }
        let max_entries = h.max_entries.load(Ordering::Relaxed);
        let pin_slots = h.pin_slots.load(Ordering::Relaxed);
        let layout = Layout::new(pool_size, max_entries, pin_slots)
            .filter(|l| {
                (1..=MAX_ENTRIES).contains(&max_entries)
                    && (1..=MAX_PIN_SLOTS).contains(&pin_slots)
                    && l.data_offset == h.data_offset.load(Ordering::Relaxed)
                    && l.data_size == h.data_size.load(Ordering::Relaxed)
                    && l.nbuckets == h.nbuckets.load(Ordering::Relaxed)
            })
            .ok_or(ShmError::BadPool {
                reason: "inconsistent layout",
            })?;
        Ok(Pool { seg, layout })
    }

    /// The segment.
    pub fn segment(&self) -> &Segment {
        &self.seg
    }

    /// The segment name.
    pub fn name(&self) -> &str {
        self.seg.name()
    }

    /// Index capacity.
    pub fn max_entries(&self) -> u64 {
        self.layout.max_entries
    }

    /// Size of the data region.
    pub fn data_size(&self) -> u64 {
        self.layout.data_size
    }

    /// Capacity of the pin table.
    pub fn pin_slots(&self) -> u64 {
        self.layout.pin_slots
    }

    /// Takes the pool lock (see [`crate::lock`]), recovering the pool if its last holder died.
    pub fn lock(&self) -> Locked<'_> {
        self.lock_as(current_pid())
    }

    /// [`Pool::lock`] for callers that already know this process's id (getpid is a system call).
    fn lock_as(&self, pid: u32) -> Locked<'_> {
        let got = lock::acquire(&self.header().lock, pid);
        let mut l = Locked::new(self, got.token);
        if got.recovered {
            l.recover();
        }
        l
    }

    fn try_lock(&self) -> Option<Locked<'_>> {
        self.try_lock_as(current_pid())
    }

    fn try_lock_as(&self, pid: u32) -> Option<Locked<'_>> {
        lock::try_acquire(&self.header().lock, pid).map(|got| Locked::new(self, got.token))
    }

    /// Consistent counters. Removes expired entries, the leftovers of dead writers and the pins of dead processes
    /// first, so that `entries` equals the number of `keys()` and `pinned` counts live pins only.
    pub fn stats(&self) -> PoolStats {
        let mut l = self.lock();
        l.purge_expired();
        l.reap();
        let pinned = l.pinned_entries();
        let h = self.header();
        let used = h.used_bytes.load(Ordering::Relaxed);
        PoolStats {
            entries: h.active.load(Ordering::Relaxed),
            max_entries: self.layout.max_entries,
            pool_size: self.layout.pool_size,
            used_bytes: used,
            free_bytes: self.layout.data_size - used,
            data_region_size: self.layout.data_size,
            hits: h.hits.load(Ordering::Relaxed),
            misses: h.misses.load(Ordering::Relaxed),
            pending: h.pending.load(Ordering::Relaxed),
            recoveries: h.recoveries.load(Ordering::Relaxed),
            pinned,
            evictions: h.evictions.load(Ordering::Relaxed),
            pin_slots: self.layout.pin_slots,
        }
    }

    /// Checks every structural invariant under the lock (for tests and `debug` tooling): the free table, the byte
    /// and entry counters, the hash chains, the free-slot stack and the pin table.
    pub fn check(&self) -> Result<(), String> {
        let mut l = self.lock();
        l.check()
    }
}
