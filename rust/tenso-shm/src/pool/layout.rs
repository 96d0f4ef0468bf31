//! The bytes of a pool: header, entry, pin-slot and area layouts, the key encoding, and the accessors that turn a
//! slot number into a reference into the mapping. Everything here is plain data; the protocols live in the sibling
//! modules.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::Pool;
use crate::error::ShmError;

/// First word of a pool segment.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TNSOPOOL");
/// Layout version of this module (2: pending owners in the entries, the pin table, the eviction counter; 3: a lease
/// lives as long as its references, which are slots of the pin table).
pub const VERSION: u64 = 3;
/// Size of the header.
pub const HEADER_SIZE: u64 = 4096;
/// Size of one index entry.
pub const ENTRY_SIZE: u64 = 256;
/// Size of one pin slot.
pub const PIN_SLOT_SIZE: u64 = 32;
/// Longest key, in UTF-8 bytes.
pub const MAX_KEY_LEN: usize = 128;
/// Alignment and granularity of data blocks.
pub const BLOCK_ALIGN: u64 = 64;
/// Most entries a pool has.
pub const MAX_ENTRIES: u64 = 65536;
/// Fewest entries a pool has.
pub const MIN_ENTRIES: u64 = 16;
/// Pool bytes per index entry when the caller does not choose `max_entries`.
pub const BYTES_PER_ENTRY: u64 = 16 * 1024;
/// Most pin slots a pool has (two per entry, within [[`MIN_PIN_SLOTS`], [`MAX_PIN_SLOTS`]]).
pub const MAX_PIN_SLOTS: u64 = 1024;
/// Fewest pin slots a pool has.
pub const MIN_PIN_SLOTS: u64 = 64;

/// Entry states.
pub(super) const FREE: u32 = 0;
pub(super) const RESERVED: u32 = 1;
pub(super) const READY: u32 = 2;
/// A lease: a block outside the keys, freed when its last reference (a pin slot naming it) goes.
pub(super) const LEASED: u32 = 3;
/// Removed from the index (deleted, replaced, expired) while pinned: the block stays until the last pin goes.
pub(super) const RETIRED: u32 = 4;

#[repr(C)]
pub(super) struct Header {
    pub(super) magic: AtomicU64,
    pub(super) version: AtomicU64,
    pub(super) pool_size: AtomicU64,
    pub(super) max_entries: AtomicU64,
    pub(super) nbuckets: AtomicU64,
    pub(super) data_offset: AtomicU64,
    pub(super) data_size: AtomicU64,
    pub(super) pin_slots: AtomicU64,
    // 64: the lock word, alone with the counters only its holder changes.
    pub(super) lock: AtomicU64,
    pub(super) recoveries: AtomicU64,
    pub(super) evictions: AtomicU64,
    pub(super) pins_used: AtomicU64,
    _pad1: [AtomicU64; 4],
    // 128: changed under the lock.
    pub(super) index_gen: AtomicU64,
    pub(super) stamp: AtomicU64,
    pub(super) active: AtomicU64,
    pub(super) used_bytes: AtomicU64,
    pub(super) pending: AtomicU64,
    pub(super) free_slots: AtomicU64,
    pub(super) ttl_entries: AtomicU64,
    pub(super) free_count: AtomicU64,
    // 192 and 256: counters bumped by every reader.
    pub(super) hits: AtomicU64,
    _pad3: [AtomicU64; 7],
    pub(super) misses: AtomicU64,
    _pad4: [AtomicU64; 7],
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_SIZE as usize);

#[repr(C)]
pub(super) struct Entry {
    pub(super) seq: AtomicU64,
    pub(super) state: AtomicU32,
    pub(super) key_len: AtomicU32,
    pub(super) key_hash: AtomicU64,
    pub(super) offset: AtomicU64,
    pub(super) alloc_len: AtomicU64,
    pub(super) packet_len: AtomicU64,
    pub(super) created_ns: AtomicU64,
    pub(super) ttl_ns: AtomicU64,
    pub(super) stamp: AtomicU64,
    /// The process writing (reserved, or rewritten in place) or leasing this entry; 0 once settled.
    pub(super) owner: AtomicU32,
    pub(super) next: AtomicU32,
    /// Pin slots naming this entry at its current stamp (live or not yet cleared), under the lock: the pins of a
    /// READY or RETIRED entry, the references of a LEASED one.
    pub(super) pins: AtomicU32,
    _pad32: AtomicU32,
    _pad: [AtomicU64; 5],
    pub(super) key: [AtomicU64; 16],
}

const _: () = assert!(std::mem::size_of::<Entry>() == ENTRY_SIZE as usize);

/// One pin: `count` views of entry `slot` at generation `stamp` held by process `pid` (0 = free slot). A reference
/// to a lease is a pin slot with `count` 1 and a `tag` of its own (unique in the pool's life), so that a handle names
/// one reference and a late adoption cannot take a newer reference that reuses the slot.
#[repr(C)]
pub(super) struct PinSlot {
    pub(super) pid: AtomicU32,
    pub(super) slot: AtomicU32,
    pub(super) stamp: AtomicU64,
    pub(super) count: AtomicU64,
    pub(super) tag: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<PinSlot>() == PIN_SLOT_SIZE as usize);

/// Offsets of the areas of a pool of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) pool_size: u64,
    pub(super) max_entries: u64,
    pub(super) nbuckets: u64,
    pub(super) lru: u64,
    pub(super) buckets: u64,
    pub(super) slots: u64,
    pub(super) free_table: u64,
    pub(super) pins: u64,
    pub(super) pin_slots: u64,
    pub(super) data_offset: u64,
    pub(super) data_size: u64,
}

impl Layout {
    pub(super) fn new(pool_size: u64, max_entries: u64, pin_slots: u64) -> Option<Layout> {
        let nbuckets = max_entries.next_power_of_two();
        let lru = HEADER_SIZE + max_entries * ENTRY_SIZE;
        let buckets = lru + max_entries * 8;
        let slots = buckets + nbuckets * 4;
        let free_table = (slots + max_entries * 4).next_multiple_of(16);
        let pins = (free_table + 8 + (max_entries + 2) * 16).next_multiple_of(64);
        let end = pins + pin_slots * PIN_SLOT_SIZE;
        let data_offset = end.next_multiple_of(4096);
        let data_size = pool_size.checked_sub(data_offset)? / BLOCK_ALIGN * BLOCK_ALIGN;
        (data_size >= BLOCK_ALIGN).then_some(Layout {
            pool_size,
            max_entries,
            nbuckets,
            lru,
            buckets,
            slots,
            free_table,
            pins,
            pin_slots,
            data_offset,
            data_size,
        })
    }
}

/// Index capacity of a pool of `pool_size` bytes: `max_entries` if given (at least 1), else one per
/// [`BYTES_PER_ENTRY`], within [[`MIN_ENTRIES`], [`MAX_ENTRIES`]].
pub(super) fn entries_for(pool_size: u64, max_entries: Option<u64>) -> u64 {
    match max_entries {
        Some(n) => n.clamp(1, MAX_ENTRIES),
        None => (pool_size / BYTES_PER_ENTRY).clamp(MIN_ENTRIES, MAX_ENTRIES),
    }
}

/// Pin-table capacity of a pool with `max_entries` entries.
pub(super) fn pin_slots_for(max_entries: u64) -> u64 {
    (2 * max_entries).clamp(MIN_PIN_SLOTS, MAX_PIN_SLOTS)
}

/// A key prepared for lookups: its bytes as padded words, and its hash.
#[derive(Debug, Clone)]
pub(super) struct Key {
    pub(super) words: [u64; 16],
    pub(super) len: u32,
    pub(super) hash: u64,
}

impl Key {
    pub(super) fn new(key: &[u8]) -> Result<Key, ShmError> {
        if key.len() > MAX_KEY_LEN {
            return Err(ShmError::KeyTooLong {
                len: key.len(),
                limit: MAX_KEY_LEN,
            });
        }
        let mut bytes = [0u8; MAX_KEY_LEN];
        bytes[..key.len()].copy_from_slice(key);
        let mut words = [0u64; 16];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(
                chunk
                    .try_into()
                    .expect("chunks_exact(8) yields 8-byte chunks"),
            );
        }
        Ok(Key {
            words,
            len: key.len() as u32,
            hash: xxhash_rust::xxh3::xxh3_64(key),
        })
    }

    /// The key stored in `e` (relaxed loads: under the lock, or validated by the caller).
    pub(super) fn of(e: &Entry) -> Key {
        Key {
            words: std::array::from_fn(|i| e.key[i].load(Ordering::Relaxed)),
            len: e.key_len.load(Ordering::Relaxed),
            hash: e.key_hash.load(Ordering::Relaxed),
        }
    }

    /// Whether `e` holds this key (relaxed loads: the caller validates with the entry's seqlock).
    pub(super) fn matches(&self, e: &Entry) -> bool {
        e.key_hash.load(Ordering::Relaxed) == self.hash
            && e.key_len.load(Ordering::Relaxed) == self.len
            && self
                .words
                .iter()
                .zip(&e.key)
                .all(|(w, k)| k.load(Ordering::Relaxed) == *w)
    }
}

/// Monotonic time in nanoseconds, never 0 (0 marks "never used" in the lru array).
pub(super) fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
        .max(1)
}

pub(super) fn expired(created_ns: u64, ttl_ns: u64, now: u64) -> bool {
    ttl_ns != 0 && now.saturating_sub(created_ns) >= ttl_ns
}

/// Where the parts of the pool are in the mapping. Each accessor checks its index, so a slot number read from shared
/// memory can never address outside its area.
impl Pool {
    pub(super) fn header(&self) -> &Header {
        // SAFETY: the mapping starts with HEADER_SIZE >= size_of::<Header>() bytes, page-aligned, and every field
        // of Header is an atomic, so shared references to it are sound however other processes access it.
        unsafe { &*(self.seg.as_ptr() as *const Header) }
    }

    pub(super) fn entry(&self, slot: u32) -> &Entry {
        assert!(
            u64::from(slot) < self.layout.max_entries,
            "entry slot {slot} out of range"
        );
        // SAFETY: slot < max_entries, so the 256-byte entry lies inside the index area of the mapping; the area is
        // 64-byte aligned (HEADER_SIZE + k * 256) and Entry is all atomics.
        unsafe {
            &*(self
                .seg
                .as_ptr()
                .add((HEADER_SIZE + u64::from(slot) * ENTRY_SIZE) as usize)
                as *const Entry)
        }
    }

    /// The last-access tick of an entry (monotonic ns; 0 = never used since it was freed).
    pub(super) fn lru(&self, slot: u32) -> &AtomicU64 {
        assert!(
            u64::from(slot) < self.layout.max_entries,
            "lru slot {slot} out of range"
        );
        // SAFETY: inside the lru area (max_entries u64s, 8-byte aligned: HEADER_SIZE + k * 256).
        unsafe {
            &*(self
                .seg
                .as_ptr()
                .add((self.layout.lru + u64::from(slot) * 8) as usize)
                as *const AtomicU64)
        }
    }

    pub(super) fn bucket(&self, hash: u64) -> &AtomicU32 {
        let b = hash & (self.layout.nbuckets - 1);
        // SAFETY: b < nbuckets, inside the bucket area, which is 8-byte aligned (it follows the lru area).
        unsafe {
            &*(self
                .seg
                .as_ptr()
                .add((self.layout.buckets + b * 4) as usize) as *const AtomicU32)
        }
    }

    pub(super) fn pin_slot(&self, index: u32) -> &PinSlot {
        assert!(
            u64::from(index) < self.layout.pin_slots,
            "pin slot {index} out of range"
        );
        // SAFETY: index < pin_slots, so the 32-byte slot lies inside the pin area (64-aligned, before data_offset);
        // PinSlot is all atomics.
        unsafe {
            &*(self
                .seg
                .as_ptr()
                .add((self.layout.pins + u64::from(index) * PIN_SLOT_SIZE) as usize)
                as *const PinSlot)
        }
    }

    /// First byte of the data region. Offsets in [`super::Hit`] and [`super::LeaseHandle`] are relative to it.
    pub(super) fn data_ptr(&self) -> *mut u8 {
        // SAFETY: data_offset < pool_size = the mapping's length (checked by Layout::new at create/open).
        unsafe { self.seg.as_ptr().add(self.layout.data_offset as usize) }
    }

    /// The bytes `[offset, offset + len)` of the data region as a range of the whole mapping (what the bindings
    /// turn into views over their mapping).
    pub(super) fn mapping_range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let start = (self.layout.data_offset + offset) as usize;
        start..start + len as usize
    }
}
