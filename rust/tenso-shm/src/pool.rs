//! The TensoCache pool: one shared segment holding a header, an entry index and a data region of tenso packets,
//! opened by any number of processes by name.
//!
//! ```text
//! offset                      size                       contents
//! 0                           4096                       Header (magic, layout, lock word, counters; one
//!                                                        cache line each for the lock, hits and misses)
//! 4096                        max_entries * 256          Entry[max_entries]  (seqlock, state, key, block, times)
//! ..                          max_entries * 8            lru[max_entries]: 0 = slot free, 1<<63 | pid = pending
//!                                                        (being written or leased by pid), else last access (ns)
//! ..                          nbuckets * 4               hash buckets: slot + 1 of the chain head, 0 = empty
//! ..                          max_entries * 4            free-slot stack
//! ..                          8 + (max_entries + 2) * 16 free table (see crate::alloc)
//! data_offset (4096-aligned)  data_size (multiple of 64) blocks of 64-byte-aligned packets, and free space
//! ```
//!
//! # Concurrency protocol
//! * Every change to the index, the free table or an entry happens under the lock word ([`crate::lock`]), which
//!   survives the death of its holder: the process that takes it over rebuilds the free table, the free-slot stack,
//!   the hash chains and the counters from the entries themselves ([`Locked::recover`]), so nothing a dead holder
//!   half-changed survives, and only entries it was changing are dropped. The pool is never cleared.
//! * A put reserves a block and an entry (state RESERVED, lru tag "pending by pid") under the lock, writes the
//!   packet **outside** the lock into space nobody else can see, then publishes it under the lock: the new entry
//!   becomes READY and enters its hash chain, and the key's previous entry is freed. A writer killed while writing
//!   leaves a pending entry owned by a dead pid, which the next eviction scan, `stats`, `clear` or recovery frees.
//! * When the new packet needs the same block size as the key's current one, the put overwrites it in place: the
//!   entry's sequence number stays odd while the bytes change, so checked readers wait and retry.
//! * Readers take no lock. They find the entry through the hash chains and validate it with the entry's seqlock and
//!   the index generation (a miss is only believed if no chain changed meanwhile). A copying read copies the packet
//!   and then re-checks the entry's sequence number, retrying on a change, so a copy is never torn.
//! * A zero-copy read hands out the live bytes of the block: they stay as they are until the entry is overwritten in
//!   place (a put of the same key with the same block size), deleted, evicted or expired and its block reused by a
//!   later put. Callers that need a stable value past that point must copy.
//! * A copying read may copy bytes that a writer is rewriting at that moment (an in-place put, or a block reused
//!   after eviction); the sequence check then discards the copy. Across processes that is what a seqlock does.
//!   Within one process, Rust's memory model counts the overlap as a data race (the encoder writes with plain
//!   stores), and Miri reports it: `scripts/miri.sh` runs every other test of this crate under Miri.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use crate::alloc::{Extent, FreeTable};
use crate::error::ShmError;
use crate::lock::{self, current_pid, process_alive};
use crate::segment::Segment;

/// First word of a pool segment.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TNSOPOOL");
/// Layout version of this module.
pub const VERSION: u64 = 1;
/// Size of the header.
pub const HEADER_SIZE: u64 = 4096;
/// Size of one index entry.
pub const ENTRY_SIZE: u64 = 256;
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

const FREE: u32 = 0;
const RESERVED: u32 = 1;
const READY: u32 = 2;
const LEASED: u32 = 3;

const PENDING: u64 = 1 << 63;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU64,
    pool_size: AtomicU64,
    max_entries: AtomicU64,
    nbuckets: AtomicU64,
    data_offset: AtomicU64,
    data_size: AtomicU64,
    _pad0: AtomicU64,
    // 64: the lock word, alone on its line.
    lock: AtomicU64,
    recoveries: AtomicU64,
    _pad1: [AtomicU64; 6],
    // 128: changed under the lock.
    index_gen: AtomicU64,
    stamp: AtomicU64,
    active: AtomicU64,
    used_bytes: AtomicU64,
    pending: AtomicU64,
    free_slots: AtomicU64,
    ttl_entries: AtomicU64,
    free_count: AtomicU64,
    // 192 and 256: counters bumped by every reader.
    hits: AtomicU64,
    _pad3: [AtomicU64; 7],
    misses: AtomicU64,
    _pad4: [AtomicU64; 7],
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_SIZE as usize);

#[repr(C)]
struct Entry {
    seq: AtomicU64,
    state: AtomicU32,
    key_len: AtomicU32,
    key_hash: AtomicU64,
    offset: AtomicU64,
    alloc_len: AtomicU64,
    packet_len: AtomicU64,
    created_ns: AtomicU64,
    ttl_ns: AtomicU64,
    stamp: AtomicU64,
    writer_pid: AtomicU32,
    next: AtomicU32,
    _pad: [AtomicU64; 6],
    key: [AtomicU64; 16],
}

const _: () = assert!(std::mem::size_of::<Entry>() == ENTRY_SIZE as usize);

/// Offsets of the areas of a pool of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    pool_size: u64,
    max_entries: u64,
    nbuckets: u64,
    lru: u64,
    buckets: u64,
    slots: u64,
    free_table: u64,
    data_offset: u64,
    data_size: u64,
}

impl Layout {
    fn new(pool_size: u64, max_entries: u64) -> Option<Layout> {
        let nbuckets = max_entries.next_power_of_two();
        let lru = HEADER_SIZE + max_entries * ENTRY_SIZE;
        let buckets = lru + max_entries * 8;
        let slots = buckets + nbuckets * 4;
        let free_table = (slots + max_entries * 4).next_multiple_of(16);
        let end = free_table + 8 + (max_entries + 2) * 16;
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
            data_offset,
            data_size,
        })
    }
}

/// A key prepared for lookups: its bytes as padded words, and its hash.
#[derive(Debug, Clone)]
struct Key {
    words: [u64; 16],
    len: u32,
    hash: u64,
}

impl Key {
    fn new(key: &[u8]) -> Result<Key, ShmError> {
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

    /// Whether `e` holds this key (relaxed loads: the caller validates with the entry's seqlock).
    fn matches(&self, e: &Entry) -> bool {
        e.key_hash.load(Ordering::Relaxed) == self.hash
            && e.key_len.load(Ordering::Relaxed) == self.len
            && self
                .words
                .iter()
                .zip(&e.key)
                .all(|(w, k)| k.load(Ordering::Relaxed) == *w)
    }
}

fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    // +1: a tick of 0 means "free slot" in the lru array.
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
        .wrapping_add(1)
        & !PENDING
}

fn expired(created_ns: u64, ttl_ns: u64, now: u64) -> bool {
    ttl_ns != 0 && now.saturating_sub(created_ns) >= ttl_ns
}

/// A validated read of an entry: where its packet is and the sequence number it was read at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Entry slot.
    pub slot: u32,
    /// The entry's sequence number when read (even); [`Pool::validate`] compares against it.
    pub seq: u64,
    /// Packet offset from the start of the data region (a multiple of 64).
    pub offset: u64,
    /// Packet length in bytes.
    pub len: u64,
    /// Monotonic time of the put, in nanoseconds.
    pub created_ns: u64,
    /// Time to live in nanoseconds, 0 for none.
    pub ttl_ns: u64,
}

impl Hit {
    /// Seconds since the put.
    pub fn age_secs(&self) -> f64 {
        now_ns().saturating_sub(self.created_ns) as f64 / 1e9
    }
}

/// Index capacity of a pool of `pool_size` bytes: `max_entries` if given (at least 1), else one per
/// [`BYTES_PER_ENTRY`], within [[`MIN_ENTRIES`], [`MAX_ENTRIES`]].
fn entries_for(pool_size: u64, max_entries: Option<u64>) -> u64 {
    match max_entries {
        Some(n) => n.clamp(1, MAX_ENTRIES),
        None => (pool_size / BYTES_PER_ENTRY).clamp(MIN_ENTRIES, MAX_ENTRIES),
    }
}

/// How a reservation makes room when the free space is short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// Evict least-recently-used entries: the cache's policy.
    EvictLru,
    /// Take only free space, and the space of dead writers' and expired entries: no live entry is evicted.
    FreeOnly,
}

/// Counters of a pool (consistent with each other: read under the lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Live entries (keys).
    pub entries: u64,
    /// Index capacity.
    pub max_entries: u64,
    /// Segment size.
    pub pool_size: u64,
    /// Bytes of the data region in blocks (live entries, writes in progress and leases).
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
}

/// A mapped pool. `Send + Sync`: every method may be called from any thread.
#[derive(Debug)]
pub struct Pool {
    seg: Segment,
    layout: Layout,
}

/// The answer of [`Pool::probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The live entry.
    Hit(Hit),
    /// No live entry (missing or expired).
    Miss,
    /// The entry or the index is being changed: call [`Pool::lookup`], which waits.
    Busy,
}

/// See [`Locked::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Settled,
    Busy,
    Reaped,
}

/// What a chain walk found.
enum Found {
    Hit(Hit),
    /// The key's entry is being changed (odd sequence number): wait and look again.
    Busy,
    Missing,
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
        let layout = Layout::new(pool_size, max_entries).ok_or_else(|| ShmError::TooSmall {
            size: pool_size,
            minimum: Layout::new(u64::MAX, max_entries).map_or(0, |l| l.data_offset + BLOCK_ALIGN),
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
        let h = unsafe { &*(seg.as_ptr() as *const Header) };
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
        let layout = Layout::new(pool_size, max_entries)
            .filter(|l| {
                (1..=MAX_ENTRIES).contains(&max_entries)
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

    /// First byte of the data region. Offsets in [`Hit`], [`Reservation`] and [`Lease`] are relative to it.
    pub fn data_ptr(&self) -> *mut u8 {
        // SAFETY: data_offset < pool_size = the mapping's length (checked by Layout::new at create/open).
        unsafe { self.seg.as_ptr().add(self.layout.data_offset as usize) }
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with HEADER_SIZE >= size_of::<Header>() bytes, page-aligned, and every field
        // of Header is an atomic, so shared references to it are sound however other processes access it.
        unsafe { &*(self.seg.as_ptr() as *const Header) }
    }

    fn entry(&self, slot: u32) -> &Entry {
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

    fn lru(&self, slot: u32) -> &AtomicU64 {
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

    fn bucket(&self, hash: u64) -> &AtomicU32 {
        let b = hash & (self.layout.nbuckets - 1);
        // SAFETY: b < nbuckets, inside the bucket area, which is 8-byte aligned (it follows the lru area).
        unsafe {
            &*(self
                .seg
                .as_ptr()
                .add((self.layout.buckets + b * 4) as usize) as *const AtomicU32)
        }
    }

    /// Takes the pool lock (see [`crate::lock`]), recovering the pool if its last holder died.
    pub fn lock(&self) -> Locked<'_> {
        let got = lock::acquire(&self.header().lock, current_pid());
        let mut l = Locked {
            pool: self,
            token: got.token,
        };
        if got.recovered {
            l.recover();
        }
        l
    }

    fn try_lock(&self) -> Option<Locked<'_>> {
        lock::try_acquire(&self.header().lock, current_pid()).map(|got| Locked {
            pool: self,
            token: got.token,
        })
    }

    /// Walks the key's hash chain without the lock. Entries reached through a chain that changed meanwhile may
    /// belong to other keys; the key comparison and the entry seqlock reject them.
    fn walk(&self, key: &Key) -> Found {
        let mut cur = self.bucket(key.hash).load(Ordering::Acquire);
        let mut steps = 0;
        while cur != 0 && steps <= self.layout.max_entries {
            steps += 1;
            let slot = cur - 1;
            if u64::from(slot) >= self.layout.max_entries {
                return Found::Missing;
            }
            let e = self.entry(slot);
            let s1 = e.seq.load(Ordering::Acquire);
            let next = e.next.load(Ordering::Relaxed);
            if key.matches(e) {
                let state = e.state.load(Ordering::Relaxed);
                let hit = Hit {
                    slot,
                    seq: s1,
                    offset: e.offset.load(Ordering::Relaxed),
                    len: e.packet_len.load(Ordering::Relaxed),
                    created_ns: e.created_ns.load(Ordering::Relaxed),
                    ttl_ns: e.ttl_ns.load(Ordering::Relaxed),
                };
                fence(Ordering::Acquire);
                let s2 = e.seq.load(Ordering::Relaxed);
                if s1 != s2 || s1 & 1 == 1 {
                    return Found::Busy;
                }
                if state == READY
                    && hit
                        .offset
                        .checked_add(hit.len)
                        .is_some_and(|end| end <= self.layout.data_size)
                {
                    return Found::Hit(hit);
                }
            }
            cur = next;
        }
        Found::Missing
    }

    /// Looks `key` up without the lock and without ever waiting: [`Probe::Busy`] when the entry (or the index) is
    /// being changed right now. Callers that must not block while holding something (the bindings hold the GIL)
    /// probe first and call [`Pool::lookup`], which waits, only after releasing it.
    pub fn probe(&self, key: &[u8]) -> Result<Probe, ShmError> {
        let key = Key::new(key)?;
        let h = self.header();
        for _ in 0..8 {
            let g1 = h.index_gen.load(Ordering::Acquire);
            if g1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            match self.walk(&key) {
                Found::Hit(hit) => {
                    return Ok(match self.unexpired(&key, hit) {
                        Some(hit) => Probe::Hit(hit),
                        None => Probe::Miss,
                    })
                }
                Found::Busy => return Ok(Probe::Busy),
                Found::Missing => {
                    fence(Ordering::Acquire);
                    if h.index_gen.load(Ordering::Relaxed) == g1 {
                        return Ok(Probe::Miss);
                    }
                }
            }
        }
        Ok(Probe::Busy)
    }

    /// Finds the live entry of `key`, without the lock. Returns `None` for a missing or expired key; an expired
    /// entry is removed if the lock is free.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Hit>, ShmError> {
        let key = Key::new(key)?;
        let h = self.header();
        let mut spins = 0u32;
        for _ in 0..1000 {
            let g1 = h.index_gen.load(Ordering::Acquire);
            if g1 & 1 == 1 {
                lock::backoff(&mut spins);
                continue;
            }
            match self.walk(&key) {
                Found::Hit(hit) => return Ok(self.unexpired(&key, hit)),
                Found::Busy => lock::backoff(&mut spins),
                Found::Missing => {
                    fence(Ordering::Acquire);
                    if h.index_gen.load(Ordering::Relaxed) == g1 {
                        return Ok(None);
                    }
                }
            }
        }
        // Still changing after many tries (a writer died mid-change, or heavy churn on this key): ask under the
        // lock, which also recovers from a dead writer.
        loop {
            let mut l = self.lock();
            match l.find(&key) {
                None => return Ok(None),
                Some(slot) => match l.settle(slot) {
                    Owner::Busy => {
                        drop(l);
                        lock::backoff(&mut spins);
                    }
                    // The key's writer died while rewriting it in place: that value is lost.
                    Owner::Reaped => return Ok(None),
                    Owner::Settled if self.entry(slot).seq.load(Ordering::Relaxed) & 1 == 1 => {
                        // Cannot happen (recovery evens every sequence number a dead lock holder left odd), but a
                        // torn entry must never be returned: drop it.
                        l.free_entry(slot);
                        return Ok(None);
                    }
                    Owner::Settled => {
                        let e = self.entry(slot);
                        let hit = Hit {
                            slot,
                            seq: e.seq.load(Ordering::Relaxed),
                            offset: e.offset.load(Ordering::Relaxed),
                            len: e.packet_len.load(Ordering::Relaxed),
                            created_ns: e.created_ns.load(Ordering::Relaxed),
                            ttl_ns: e.ttl_ns.load(Ordering::Relaxed),
                        };
                        drop(l);
                        return Ok(self.unexpired(&key, hit));
                    }
                },
            }
        }
    }

    fn unexpired(&self, key: &Key, hit: Hit) -> Option<Hit> {
        if !expired(hit.created_ns, hit.ttl_ns, now_ns()) {
            return Some(hit);
        }
        if let Some(mut l) = self.try_lock() {
            if let Some(slot) = l.find(key) {
                let e = self.entry(slot);
                if l.settle(slot) == Owner::Settled
                    && expired(
                        e.created_ns.load(Ordering::Relaxed),
                        e.ttl_ns.load(Ordering::Relaxed),
                        now_ns(),
                    )
                {
                    l.free_entry(slot);
                }
            }
        }
        None
    }

    /// Whether the entry read as `hit` is still unchanged: bytes read from its block since the lookup are whole.
    pub fn validate(&self, hit: &Hit) -> bool {
        fence(Ordering::Acquire);
        hit.seq & 1 == 0 && self.entry(hit.slot).seq.load(Ordering::Relaxed) == hit.seq
    }

    /// Counts a get and, for a hit, marks the entry as just used.
    pub fn record(&self, hit: Option<&Hit>) {
        let h = self.header();
        match hit {
            Some(hit) => {
                h.hits.fetch_add(1, Ordering::Relaxed);
                let lru = self.lru(hit.slot);
                let cur = lru.load(Ordering::Relaxed);
                // Only a plain tick is replaced: a free or pending slot keeps its tag.
                if cur != 0 && cur & PENDING == 0 {
                    let _ = lru.compare_exchange(
                        cur,
                        now_ns().max(cur),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
            None => {
                h.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Copies the packet of `key` into a buffer made by `alloc(len)`, retrying until the copy is whole.
    pub fn get_copy<B: AsMut<[u8]>>(
        &self,
        key: &[u8],
        mut alloc: impl FnMut(usize) -> B,
    ) -> Result<Option<(Hit, B)>, ShmError> {
        loop {
            let Some(hit) = self.lookup(key)? else {
                self.record(None);
                return Ok(None);
            };
            let mut buf = alloc(hit.len as usize);
            let dst = buf.as_mut();
            if dst.len() != hit.len as usize {
                continue;
            }
            // SAFETY: lookup checked offset + len <= data_size, so the source lies in the data region of our
            // mapping, and `dst` is a separate buffer of exactly len bytes. Another process may be writing the
            // source bytes concurrently (then the seqlock check below fails and we retry); the copy reads plain
            // bytes, for which any value is valid.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data_ptr().add(hit.offset as usize),
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            };
            if self.validate(&hit) {
                self.record(Some(&hit));
                return Ok(Some((hit, buf)));
            }
        }
    }

    /// Reserves space for a packet of `packet_len` bytes under `key` (see the module docs for the protocol), evicting
    /// least-recently-used entries if needed. Write the packet through [`Reservation::as_mut_ptr`], then
    /// [`Reservation::commit`]; dropping it uncommitted frees it.
    pub fn reserve(
        &self,
        key: &[u8],
        packet_len: u64,
        ttl_ns: u64,
    ) -> Result<Reservation<'_>, ShmError> {
        self.reserve_with(key, packet_len, ttl_ns, Room::EvictLru)
    }

    /// [`Pool::reserve`], choosing how room is made: with [`Room::FreeOnly`] no live entry is evicted, so zero-copy
    /// views of the pool's other entries stay valid; the reservation fails with [`ShmError::Full`] instead.
    pub fn reserve_with(
        &self,
        key: &[u8],
        packet_len: u64,
        ttl_ns: u64,
        room: Room,
    ) -> Result<Reservation<'_>, ShmError> {
        let key = Key::new(key)?;
        let alloc_len = packet_len.max(1).next_multiple_of(BLOCK_ALIGN);
        let pid = current_pid();
        let mut spins = 0u32;
        loop {
            let mut l = self.lock();
            let existing = match l.find(&key) {
                Some(slot) => match l.settle(slot) {
                    Owner::Busy => {
                        // Another put of this key is writing in place; let it finish.
                        drop(l);
                        lock::backoff(&mut spins);
                        continue;
                    }
                    Owner::Reaped => None,
                    Owner::Settled => Some(slot),
                },
                None => None,
            };
            if let Some(slot) = existing {
                let e = self.entry(slot);
                if e.alloc_len.load(Ordering::Relaxed) == alloc_len {
                    l.begin(e);
                    e.packet_len.store(packet_len, Ordering::Relaxed);
                    e.writer_pid.store(pid, Ordering::Relaxed);
                    // Seq stays odd until commit: checked readers wait, eviction skips the pending tag.
                    self.lru(slot)
                        .store(PENDING | u64::from(pid), Ordering::Relaxed);
                    self.header().pending.fetch_add(1, Ordering::Relaxed);
                    let offset = e.offset.load(Ordering::Relaxed);
                    return Ok(Reservation {
                        pool: self,
                        slot,
                        offset,
                        len: packet_len,
                        ttl_ns,
                        in_place: true,
                        done: false,
                    });
                }
            }
            let slot = l.new_entry(&key, packet_len, alloc_len, RESERVED, pid, room)?;
            let offset = self.entry(slot).offset.load(Ordering::Relaxed);
            return Ok(Reservation {
                pool: self,
                slot,
                offset,
                len: packet_len,
                ttl_ns,
                in_place: false,
                done: false,
            });
        }
    }

    /// Deletes `key`; true if it was there.
    pub fn delete(&self, key: &[u8]) -> Result<bool, ShmError> {
        let key = Key::new(key)?;
        let mut spins = 0u32;
        loop {
            let mut l = self.lock();
            let Some(slot) = l.find(&key) else {
                return Ok(false);
            };
            match l.settle(slot) {
                Owner::Busy => {
                    drop(l);
                    lock::backoff(&mut spins);
                    continue;
                }
                Owner::Reaped => return Ok(false),
                Owner::Settled => {}
            }
            let e = self.entry(slot);
            let was_live = !expired(
                e.created_ns.load(Ordering::Relaxed),
                e.ttl_ns.load(Ordering::Relaxed),
                now_ns(),
            );
            l.free_entry(slot);
            return Ok(was_live);
        }
    }

    /// The keys of live, unexpired entries (expired ones are removed on the way).
    pub fn keys(&self) -> Vec<Vec<u8>> {
        let mut l = self.lock();
        l.purge_expired();
        l.reap();
        let mut out = Vec::new();
        for slot in 0..self.layout.max_entries as u32 {
            let e = self.entry(slot);
            if e.state.load(Ordering::Relaxed) == READY {
                out.push(l.key_bytes(e));
            }
        }
        out
    }

    /// Removes every entry (writes in progress by live processes and leases stay).
    pub fn clear(&self) {
        let mut l = self.lock();
        l.reap();
        for slot in 0..self.layout.max_entries as u32 {
            if self.entry(slot).state.load(Ordering::Relaxed) == READY
                && l.settle(slot) == Owner::Settled
            {
                l.free_entry(slot);
            }
        }
    }

    /// Consistent counters. Removes expired entries and the leftovers of dead writers first, so that `entries`
    /// equals the number of `keys()`.
    pub fn stats(&self) -> PoolStats {
        let mut l = self.lock();
        l.purge_expired();
        l.reap();
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
        }
    }

    /// Checks every structural invariant under the lock (for tests and `debug` tooling): the free table, the byte
    /// and entry counters, the hash chains and the free-slot stack.
    pub fn check(&self) -> Result<(), String> {
        let mut l = self.lock();
        l.check()
    }

    /// Takes `len` bytes of the data region as a lease: recycled, pre-faulted shared memory for a same-host hand-off
    /// that is not a cache entry. The lease belongs to this process (it is freed if the process dies) until
    /// [`Pool::adopt`]ed by another one or released.
    pub fn lease(&self, len: u64) -> Result<Lease<'_>, ShmError> {
        let alloc_len = len.max(1).next_multiple_of(BLOCK_ALIGN);
        let mut l = self.lock();
        let slot = l.new_entry(
            &Key::new(b"")?,
            len,
            alloc_len,
            LEASED,
            current_pid(),
            Room::EvictLru,
        )?;
        let e = self.entry(slot);
        let handle = LeaseHandle {
            slot,
            stamp: e.stamp.load(Ordering::Relaxed),
            offset: e.offset.load(Ordering::Relaxed),
            len,
        };
        Ok(Lease {
            pool: self,
            handle,
            owned: true,
        })
    }

    /// Takes over a lease handed over by another process (it now dies with this one).
    pub fn adopt(&self, handle: LeaseHandle) -> Result<Lease<'_>, ShmError> {
        let l = self.lock();
        l.lease_slot(&handle)?;
        let pid = current_pid();
        self.entry(handle.slot)
            .writer_pid
            .store(pid, Ordering::Relaxed);
        self.lru(handle.slot)
            .store(PENDING | u64::from(pid), Ordering::Relaxed);
        Ok(Lease {
            pool: self,
            handle,
            owned: true,
        })
    }

    /// Frees a lease by handle (from any process).
    pub fn release(&self, handle: LeaseHandle) -> Result<(), ShmError> {
        let mut l = self.lock();
        l.lease_slot(&handle)?;
        l.free_entry(handle.slot);
        Ok(())
    }
}

/// Space reserved by [`Pool::reserve`] for one packet.
#[derive(Debug)]
pub struct Reservation<'p> {
    pool: &'p Pool,
    slot: u32,
    offset: u64,
    len: u64,
    ttl_ns: u64,
    in_place: bool,
    done: bool,
}

impl Reservation<'_> {
    /// Where to write the packet: `len()` bytes, 64-byte aligned, that no other writer touches and no checked
    /// reader trusts until commit. (Zero-copy readers of the key see an in-place write as it happens.)
    pub fn as_mut_ptr(&self) -> *mut u8 {
        // SAFETY: offset + alloc_len <= data_size was established by the allocator (or is the key's existing block).
        unsafe { self.pool.data_ptr().add(self.offset as usize) }
    }

    /// The packet length.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True for an empty packet (never: packets have a header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this put overwrites the key's current block.
    pub fn in_place(&self) -> bool {
        self.in_place
    }

    /// Publishes the packet under its key, replacing (and freeing) the key's previous entry.
    pub fn commit(mut self) -> Result<(), ShmError> {
        self.done = true;
        let pool = self.pool;
        let e = pool.entry(self.slot);
        let pid = current_pid();
        let mut spins = 0u32;
        loop {
            let mut l = pool.lock();
            // A recovery may have taken the entry away if we were presumed dead; then there is nothing to publish.
            if e.writer_pid.load(Ordering::Relaxed) != pid
                || pool.lru(self.slot).load(Ordering::Relaxed) != PENDING | u64::from(pid)
            {
                return Ok(());
            }
            let now = now_ns();
            if self.in_place {
                l.set_ttl(e, self.ttl_ns);
                e.created_ns.store(now, Ordering::Relaxed);
                e.stamp.store(l.next_stamp(), Ordering::Relaxed);
                l.end(e);
                pool.lru(self.slot).store(now, Ordering::Relaxed);
                pool.header().pending.fetch_sub(1, Ordering::Relaxed);
                return Ok(());
            }
            let key = Key {
                words: std::array::from_fn(|i| e.key[i].load(Ordering::Relaxed)),
                len: e.key_len.load(Ordering::Relaxed),
                hash: e.key_hash.load(Ordering::Relaxed),
            };
            if let Some(old) = l.find(&key) {
                match l.settle(old) {
                    Owner::Busy => {
                        drop(l);
                        lock::backoff(&mut spins);
                        continue;
                    }
                    Owner::Reaped => {}
                    Owner::Settled => l.free_entry(old),
                }
            }
            l.begin(e);
            e.state.store(READY, Ordering::Relaxed);
            e.created_ns.store(now, Ordering::Relaxed);
            l.set_ttl(e, self.ttl_ns);
            e.stamp.store(l.next_stamp(), Ordering::Relaxed);
            l.link(self.slot, key.hash);
            l.end(e);
            pool.lru(self.slot).store(now, Ordering::Relaxed);
            let h = pool.header();
            h.pending.fetch_sub(1, Ordering::Relaxed);
            h.active.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Abandoned (the encoder failed): an in-place write has already damaged the old value, so the key goes.
        let pid = current_pid();
        let mut l = self.pool.lock();
        if self.pool.lru(self.slot).load(Ordering::Relaxed) == PENDING | u64::from(pid) {
            l.free_entry(self.slot);
        }
    }
}

/// Identifies a lease across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseHandle {
    /// Entry slot.
    pub slot: u32,
    /// The entry's stamp at lease time (tells a reused slot apart).
    pub stamp: u64,
    /// Offset in the data region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A block of pool memory outside the cache's keys ([`Pool::lease`]). Released on drop unless handed off with
/// [`Lease::into_handle`].
#[derive(Debug)]
pub struct Lease<'p> {
    pool: &'p Pool,
    handle: LeaseHandle,
    owned: bool,
}

impl Lease<'_> {
    /// The block: `len` bytes, 64-byte aligned, writable by the lease holder only.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        // SAFETY: the allocator placed the block inside the data region.
        unsafe { self.pool.data_ptr().add(self.handle.offset as usize) }
    }

    /// The handle.
    pub fn handle(&self) -> LeaseHandle {
        self.handle
    }

    /// Gives up ownership without freeing: another process [`Pool::adopt`]s or [`Pool::release`]s the handle.
    pub fn into_handle(mut self) -> LeaseHandle {
        self.owned = false;
        self.handle
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.pool.release(self.handle);
        }
    }
}

/// The pool lock, held. Everything that changes shared structures is a method of this type.
#[derive(Debug)]
pub struct Locked<'p> {
    pool: &'p Pool,
    token: u64,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        lock::release(&self.pool.header().lock, self.token);
    }
}

impl<'p> Locked<'p> {
    fn h(&self) -> &'p Header {
        self.pool.header()
    }

    /// The free table. `&mut self` makes it exclusive within this process; the lock excludes other processes, and
    /// nothing reads the table without the lock.
    fn table(&mut self) -> FreeTable<'_> {
        let lay = &self.pool.layout;
        let base = self.pool.seg.as_ptr();
        // SAFETY: the free table area (8 + (max_entries + 2) * 16 bytes at a 16-aligned offset) lies inside the
        // mapping before data_offset; only lock holders access it, and we hold the lock with `&mut self`, so these
        // are the only references to it for the borrow's duration.
        unsafe {
            let count = &mut *(base.add(lay.free_table as usize) as *mut u64);
            let slots = std::slice::from_raw_parts_mut(
                base.add(lay.free_table as usize + 8) as *mut Extent,
                lay.max_entries as usize + 2,
            );
            FreeTable::new(slots, count, lay.data_size)
        }
    }

    /// The free-slot stack and its length counter.
    fn slot_stack(&mut self) -> &mut [u32] {
        let lay = &self.pool.layout;
        // SAFETY: max_entries u32s at `slots` (4-aligned) inside the mapping; lock holders only, as for `table`.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pool.seg.as_ptr().add(lay.slots as usize) as *mut u32,
                lay.max_entries as usize,
            )
        }
    }

    fn push_slot(&mut self, slot: u32) {
        let n = self.h().free_slots.load(Ordering::Relaxed) as usize;
        let stack = self.slot_stack();
        if n < stack.len() {
            stack[n] = slot;
            self.h().free_slots.store(n as u64 + 1, Ordering::Relaxed);
        }
    }

    fn pop_slot(&mut self) -> Option<u32> {
        let n = self.h().free_slots.load(Ordering::Relaxed) as usize;
        if n == 0 {
            return None;
        }
        let slot = self.slot_stack()[n - 1];
        self.h().free_slots.store(n as u64 - 1, Ordering::Relaxed);
        (u64::from(slot) < self.pool.layout.max_entries).then_some(slot)
    }

    fn next_stamp(&self) -> u64 {
        self.h().stamp.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn begin(&self, e: &Entry) {
        let s = e.seq.load(Ordering::Relaxed);
        e.seq.store(s | 1, Ordering::Relaxed);
        fence(Ordering::Release);
    }

    fn end(&self, e: &Entry) {
        let s = e.seq.load(Ordering::Relaxed);
        e.seq.store((s | 1) + 1, Ordering::Release);
    }

    fn set_ttl(&self, e: &Entry, ttl_ns: u64) {
        let was = e.ttl_ns.swap(ttl_ns, Ordering::Relaxed);
        match (was != 0, ttl_ns != 0) {
            (false, true) => {
                self.h().ttl_entries.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.h().ttl_entries.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn key_bytes(&self, e: &Entry) -> Vec<u8> {
        let len = (e.key_len.load(Ordering::Relaxed) as usize).min(MAX_KEY_LEN);
        let mut bytes = Vec::with_capacity(MAX_KEY_LEN);
        for w in &e.key {
            bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }

    /// The READY entry of `key`, under the lock.
    fn find(&self, key: &Key) -> Option<u32> {
        let mut cur = self.pool.bucket(key.hash).load(Ordering::Relaxed);
        let mut steps = 0;
        while cur != 0 && steps <= self.pool.layout.max_entries {
            steps += 1;
            let slot = cur - 1;
            let e = self.pool.entry(slot);
            if e.state.load(Ordering::Relaxed) == READY && key.matches(e) {
                return Some(slot);
            }
            cur = e.next.load(Ordering::Relaxed);
        }
        None
    }

    /// Whether an entry is settled (nobody is writing it), pending with a live owner (writing in place, reserving
    /// or leasing), or was pending with a dead owner, in which case its half-written value is freed here.
    fn settle(&mut self, slot: u32) -> Owner {
        let tag = self.pool.lru(slot).load(Ordering::Relaxed);
        if tag & PENDING == 0 {
            return Owner::Settled;
        }
        if process_alive(tag as u32) {
            Owner::Busy
        } else {
            self.free_entry(slot);
            Owner::Reaped
        }
    }

    fn link(&self, slot: u32, hash: u64) {
        let h = self.h();
        let g = h.index_gen.load(Ordering::Relaxed);
        h.index_gen.store(g | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let b = self.pool.bucket(hash);
        self.pool
            .entry(slot)
            .next
            .store(b.load(Ordering::Relaxed), Ordering::Relaxed);
        b.store(slot + 1, Ordering::Release);
        h.index_gen.store((g | 1) + 1, Ordering::Release);
    }

    fn unlink(&self, slot: u32) {
        let h = self.h();
        let e = self.pool.entry(slot);
        let b = self.pool.bucket(e.key_hash.load(Ordering::Relaxed));
        let g = h.index_gen.load(Ordering::Relaxed);
        h.index_gen.store(g | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let next = e.next.load(Ordering::Relaxed);
        let mut cur = b.load(Ordering::Relaxed);
        if cur == slot + 1 {
            b.store(next, Ordering::Release);
        } else {
            let mut steps = 0;
            while cur != 0 && steps <= self.pool.layout.max_entries {
                steps += 1;
                let p = self.pool.entry(cur - 1);
                let pn = p.next.load(Ordering::Relaxed);
                if pn == slot + 1 {
                    p.next.store(next, Ordering::Release);
                    break;
                }
                cur = pn;
            }
        }
        h.index_gen.store((g | 1) + 1, Ordering::Release);
    }

    /// Frees an entry of any state: out of its chain, block back to the free table, slot back to the stack.
    fn free_entry(&mut self, slot: u32) {
        let e = self.pool.entry(slot);
        let state = e.state.load(Ordering::Relaxed);
        if state == FREE {
            return;
        }
        let h = self.h();
        if state == READY {
            self.unlink(slot);
            h.active.fetch_sub(1, Ordering::Relaxed);
        }
        let tag = self.pool.lru(slot).load(Ordering::Relaxed);
        if tag & PENDING != 0 {
            h.pending.fetch_sub(1, Ordering::Relaxed);
        }
        self.begin(e);
        e.state.store(FREE, Ordering::Relaxed);
        self.set_ttl(e, 0);
        let (offset, len) = (
            e.offset.load(Ordering::Relaxed),
            e.alloc_len.load(Ordering::Relaxed),
        );
        self.end(e);
        self.pool.lru(slot).store(0, Ordering::Relaxed);
        if self.table().free(offset, len).is_ok() {
            h.used_bytes.fetch_sub(len, Ordering::Relaxed);
        }
        self.push_slot(slot);
    }

    /// Reserves a block and an entry slot, evicting least-recently-used entries as needed.
    fn new_entry(
        &mut self,
        key: &Key,
        packet_len: u64,
        alloc_len: u64,
        state: u32,
        pid: u32,
        room: Room,
    ) -> Result<u32, ShmError> {
        let data_size = self.pool.layout.data_size;
        let full = |free| ShmError::Full {
            needed: alloc_len,
            free,
            capacity: data_size,
        };
        if alloc_len > data_size {
            return Err(full(
                data_size - self.h().used_bytes.load(Ordering::Relaxed),
            ));
        }
        let mut victims: Option<Vec<(u64, u32)>> = None;
        let offset = loop {
            if let Some(off) = self.table().alloc(alloc_len) {
                break off;
            }
            if !self.evict_next(&mut victims, room) {
                return Err(full(self.table().free_bytes()));
            }
        };
        let slot = loop {
            if let Some(slot) = self.pop_slot() {
                break slot;
            }
            if !self.evict_next(&mut victims, room) {
                let _ = self.table().free(offset, alloc_len);
                return Err(full(self.table().free_bytes()));
            }
        };
        let e = self.pool.entry(slot);
        self.begin(e);
        for (w, k) in e.key.iter().zip(key.words) {
            w.store(k, Ordering::Relaxed);
        }
        e.key_len.store(key.len, Ordering::Relaxed);
        e.key_hash.store(key.hash, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        e.alloc_len.store(alloc_len, Ordering::Relaxed);
        e.packet_len.store(packet_len, Ordering::Relaxed);
        e.created_ns.store(now_ns(), Ordering::Relaxed);
        e.ttl_ns.store(0, Ordering::Relaxed);
        e.writer_pid.store(pid, Ordering::Relaxed);
        e.next.store(0, Ordering::Relaxed);
        e.stamp.store(self.next_stamp(), Ordering::Relaxed);
        e.state.store(state, Ordering::Relaxed);
        self.end(e);
        self.pool
            .lru(slot)
            .store(PENDING | u64::from(pid), Ordering::Relaxed);
        let h = self.h();
        h.pending.fetch_add(1, Ordering::Relaxed);
        h.used_bytes.fetch_add(alloc_len, Ordering::Relaxed);
        Ok(slot)
    }

    /// Evicts the next victim: the leftovers of dead writers first, then expired entries, then the least recently
    /// used. The candidate list is built once per allocation (one scan of the lru array, then sorted).
    fn evict_next(&mut self, victims: &mut Option<Vec<(u64, u32)>>, room: Room) -> bool {
        if victims.is_none() {
            self.reap();
            self.purge_expired();
            let mut list: Vec<(u64, u32)> = (0..self.pool.layout.max_entries as u32)
                .filter_map(|slot| {
                    let tag = self.pool.lru(slot).load(Ordering::Relaxed);
                    (tag != 0 && tag & PENDING == 0).then_some((tag, slot))
                })
                .collect();
            // Oldest last, so that pop() yields it.
            list.sort_unstable_by(|a, b| b.cmp(a));
            *victims = Some(list);
            // Reaping and purging may have made room already.
            return true;
        }
        if room == Room::FreeOnly {
            return false;
        }
        let list = victims.as_mut().expect("initialised above");
        while let Some((tag, slot)) = list.pop() {
            // Skip candidates that stopped being evictable since the scan (freed, or now written in place). A get
            // since the scan does not save an entry: the scan is this allocation's snapshot of the LRU order.
            let _ = tag;
            let cur = self.pool.lru(slot).load(Ordering::Relaxed);
            if cur != 0
                && cur & PENDING == 0
                && self.pool.entry(slot).state.load(Ordering::Relaxed) == READY
            {
                self.free_entry(slot);
                return true;
            }
        }
        false
    }

    /// Frees the pending entries of dead processes (writers killed mid-put, leases of dead holders).
    fn reap(&mut self) {
        if self.h().pending.load(Ordering::Relaxed) == 0 {
            return;
        }
        for slot in 0..self.pool.layout.max_entries as u32 {
            let tag = self.pool.lru(slot).load(Ordering::Relaxed);
            if tag & PENDING != 0 && !process_alive(tag as u32) {
                self.free_entry(slot);
            }
        }
    }

    /// Frees READY entries whose TTL has passed.
    fn purge_expired(&mut self) {
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
                self.free_entry(slot);
            }
        }
    }

    fn lease_slot(&self, handle: &LeaseHandle) -> Result<(), ShmError> {
        if u64::from(handle.slot) >= self.pool.layout.max_entries {
            return Err(ShmError::BadLease);
        }
        let e = self.pool.entry(handle.slot);
        if e.state.load(Ordering::Relaxed) != LEASED
            || e.stamp.load(Ordering::Relaxed) != handle.stamp
            || e.offset.load(Ordering::Relaxed) != handle.offset
        {
            return Err(ShmError::BadLease);
        }
        Ok(())
    }

    /// Initialises an empty pool.
    fn reset(&mut self) {
        self.table().reset();
        let n = self.pool.layout.max_entries as u32;
        let stack = self.slot_stack();
        for (i, s) in stack.iter_mut().enumerate() {
            // Slot 0 on top.
            *s = n - 1 - i as u32;
        }
        self.h().free_slots.store(u64::from(n), Ordering::Relaxed);
    }

    /// Rebuilds every derived structure from the entries after a holder died inside the lock. Entries the dead
    /// holder was changing (odd sequence number, not pending by a live process) are dropped, as are the pending
    /// entries of dead processes, entries whose block is out of bounds or overlaps an earlier one, and all but the
    /// newest READY entry of a key.
    fn recover(&mut self) {
        let pool = self.pool;
        let lay = pool.layout;
        let h = self.h();
        h.recoveries.fetch_add(1, Ordering::Relaxed);
        let g = h.index_gen.load(Ordering::Relaxed);
        h.index_gen.store(g | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let drop_entry = |e: &Entry, slot: u32| {
            let s = e.seq.load(Ordering::Relaxed);
            e.seq.store(s | 1, Ordering::Relaxed);
            e.state.store(FREE, Ordering::Relaxed);
            e.ttl_ns.store(0, Ordering::Relaxed);
            e.seq.store((s | 1) + 1, Ordering::Release);
            pool.lru(slot).store(0, Ordering::Relaxed);
        };
        let mut kept: Vec<(Extent, u32)> = Vec::new();
        let mut ready: std::collections::HashMap<Vec<u8>, u32> = std::collections::HashMap::new();
        for slot in 0..lay.max_entries as u32 {
            let e = pool.entry(slot);
            let state = e.state.load(Ordering::Relaxed);
            if state == FREE {
                pool.lru(slot).store(0, Ordering::Relaxed);
                continue;
            }
            let tag = pool.lru(slot).load(Ordering::Relaxed);
            let live_owner = tag & PENDING != 0 && process_alive(tag as u32);
            let odd = e.seq.load(Ordering::Relaxed) & 1 == 1;
            let (offset, alloc_len, packet_len) = (
                e.offset.load(Ordering::Relaxed),
                e.alloc_len.load(Ordering::Relaxed),
                e.packet_len.load(Ordering::Relaxed),
            );
            let sane = matches!(state, RESERVED | READY | LEASED)
                && offset % BLOCK_ALIGN == 0
                && alloc_len > 0
                && alloc_len % BLOCK_ALIGN == 0
                && offset
                    .checked_add(alloc_len)
                    .is_some_and(|end| end <= lay.data_size)
                && packet_len <= alloc_len
                && e.key_len.load(Ordering::Relaxed) as usize <= MAX_KEY_LEN;
            let keep = sane
                && match state {
                    // Odd and READY: an in-place write, fine while its writer lives.
                    READY => !odd || live_owner,
                    _ => !odd && live_owner,
                };
            if !keep {
                drop_entry(e, slot);
                continue;
            }
            if state == READY {
                if !live_owner && (tag == 0 || tag & PENDING != 0) {
                    pool.lru(slot).store(now_ns(), Ordering::Relaxed);
                }
                let key = self.key_bytes(e);
                if let Some(&other) = ready.get(&key) {
                    let o = pool.entry(other);
                    let (loser, winner) =
                        if o.stamp.load(Ordering::Relaxed) > e.stamp.load(Ordering::Relaxed) {
                            (slot, other)
                        } else {
                            (other, slot)
                        };
                    drop_entry(pool.entry(loser), loser);
                    kept.retain(|&(_, s)| s != loser);
                    ready.insert(key, winner);
                    if winner != slot {
                        continue;
                    }
                } else {
                    ready.insert(key, slot);
                }
            }
            kept.push((
                Extent {
                    offset,
                    len: alloc_len,
                },
                slot,
            ));
        }
        kept.sort_by_key(|(x, _)| x.offset);
        let mut disjoint: Vec<(Extent, u32)> = Vec::with_capacity(kept.len());
        for (x, slot) in kept {
            if disjoint.last().is_some_and(|(p, _)| p.end() > x.offset) {
                drop_entry(pool.entry(slot), slot);
            } else {
                disjoint.push((x, slot));
            }
        }
        // Derived structures.
        for b in 0..lay.nbuckets {
            pool.bucket(b).store(0, Ordering::Relaxed);
        }
        let (mut active, mut pending, mut used, mut ttl) = (0, 0, 0, 0);
        for &(x, slot) in &disjoint {
            let e = pool.entry(slot);
            used += x.len;
            if pool.lru(slot).load(Ordering::Relaxed) & PENDING != 0 {
                pending += 1;
            }
            if e.ttl_ns.load(Ordering::Relaxed) != 0 {
                ttl += 1;
            }
            if e.state.load(Ordering::Relaxed) == READY {
                active += 1;
                let b = pool.bucket(e.key_hash.load(Ordering::Relaxed));
                e.next.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
                b.store(slot + 1, Ordering::Relaxed);
            }
        }
        self.table().rebuild(disjoint.iter().map(|(x, _)| *x));
        let free: Vec<u32> = (0..lay.max_entries as u32)
            .rev()
            .filter(|&s| pool.entry(s).state.load(Ordering::Relaxed) == FREE)
            .collect();
        let stack = self.slot_stack();
        stack[..free.len()].copy_from_slice(&free);
        h.free_slots.store(free.len() as u64, Ordering::Relaxed);
        h.active.store(active, Ordering::Relaxed);
        h.pending.store(pending, Ordering::Relaxed);
        h.used_bytes.store(used, Ordering::Relaxed);
        h.ttl_entries.store(ttl, Ordering::Relaxed);
        h.index_gen.store((g | 1) + 1, Ordering::Release);
    }

    fn check(&mut self) -> Result<(), String> {
        let pool = self.pool;
        let lay = pool.layout;
        let h = self.h();
        let table = self.table();
        table.check().map_err(String::from)?;
        let free_bytes = table.free_bytes();
        let free_extents: Vec<Extent> = table.extents().to_vec();
        let used = h.used_bytes.load(Ordering::Relaxed);
        if free_bytes + used != lay.data_size {
            return Err(format!(
                "free {free_bytes} + used {used} != data region {}",
                lay.data_size
            ));
        }
        let (mut ready, mut nonfree, mut sum) = (0u64, 0u64, 0u64);
        let mut blocks = Vec::new();
        for slot in 0..lay.max_entries as u32 {
            let e = pool.entry(slot);
            let state = e.state.load(Ordering::Relaxed);
            if state == FREE {
                continue;
            }
            nonfree += 1;
            let x = Extent {
                offset: e.offset.load(Ordering::Relaxed),
                len: e.alloc_len.load(Ordering::Relaxed),
            };
            sum += x.len;
            blocks.push(x);
            if state == READY {
                ready += 1;
                let key = Key {
                    words: std::array::from_fn(|i| e.key[i].load(Ordering::Relaxed)),
                    len: e.key_len.load(Ordering::Relaxed),
                    hash: e.key_hash.load(Ordering::Relaxed),
                };
                if self.find(&key) != Some(slot) {
                    return Err(format!(
                        "READY entry {slot} is not reachable through its chain"
                    ));
                }
            }
        }
        if sum != used {
            return Err(format!("entries hold {sum} bytes, header says {used}"));
        }
        if ready != h.active.load(Ordering::Relaxed) {
            return Err(format!(
                "{ready} READY entries, header says {}",
                h.active.load(Ordering::Relaxed)
            ));
        }
        if nonfree + h.free_slots.load(Ordering::Relaxed) != lay.max_entries {
            return Err("free-slot stack out of step with the entries".into());
        }
        blocks.extend(free_extents);
        blocks.sort_by_key(|x| x.offset);
        for w in blocks.windows(2) {
            if w[0].end() > w[1].offset {
                return Err(format!("blocks overlap: {:?} and {:?}", w[0], w[1]));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(tag: &str) -> String {
        use std::sync::atomic::AtomicUsize;
        static N: AtomicUsize = AtomicUsize::new(0);
        format!(
            "tenso-pool-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A pool for one test: a named segment, or under Miri (which has no shared memory) an anonymous mapping.
    fn tmp_pool(tag: &str, size: u64) -> Tmp {
        if cfg!(miri) {
            let layout = Layout::new(size, entries_for(size, None)).unwrap();
            return Tmp(Pool::init(Segment::anonymous(size as usize), layout));
        }
        Tmp(Pool::create(&name(tag), size, None, 0o600).unwrap())
    }

    struct Tmp(Pool);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = self.0.segment().unlink();
        }
    }

    fn put(pool: &Pool, key: &str, bytes: &[u8]) {
        let r = pool.reserve(key.as_bytes(), bytes.len() as u64, 0).unwrap();
        // SAFETY: the reservation holds bytes.len() bytes that only we write.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.as_mut_ptr(), bytes.len()) };
        r.commit().unwrap();
    }

    fn get(pool: &Pool, key: &str) -> Option<Vec<u8>> {
        pool.get_copy(key.as_bytes(), |n| vec![0u8; n])
            .unwrap()
            .map(|(_, v)| v)
    }

    #[test]
    fn put_get_delete_replace() {
        let p = tmp_pool("basic", 1 << 20);
        put(&p.0, "a", b"hello");
        put(&p.0, "b", &[7u8; 1000]);
        assert_eq!(get(&p.0, "a").unwrap(), b"hello");
        assert_eq!(get(&p.0, "missing"), None);
        // Same block size: in place.
        let r = p.0.reserve(b"a", 6, 0).unwrap();
        assert!(r.in_place());
        drop(r); // abandoned in-place write: the key goes
        assert_eq!(get(&p.0, "a"), None);
        put(&p.0, "b", &[8u8; 5000]);
        assert_eq!(get(&p.0, "b").unwrap(), vec![8u8; 5000]);
        assert!(p.0.delete(b"b").unwrap());
        assert!(!p.0.delete(b"b").unwrap());
        p.0.check().unwrap();
        let s = p.0.stats();
        assert_eq!(s.entries, 0);
        assert_eq!(s.used_bytes, 0);
        assert_eq!((s.hits, s.misses), (2, 2));
        assert!(matches!(
            p.0.reserve(&[b'x'; 129], 1, 0),
            Err(ShmError::KeyTooLong { .. })
        ));
    }

    #[test]
    fn lru_eviction_and_full() {
        let p = tmp_pool("lru", 1 << 20);
        let pool = &p.0;
        let block = pool.data_size() / 4 / 64 * 64;
        let value = vec![1u8; block as usize];
        put(pool, "k0", &value);
        put(pool, "k1", &value);
        put(pool, "k2", &value);
        put(pool, "k3", &value);
        assert!(get(pool, "k0").is_some()); // k1 is now the least recently used
        put(pool, "k4", &value);
        assert_eq!(get(pool, "k1"), None);
        assert!(get(pool, "k0").is_some());
        assert!(matches!(
            pool.reserve(b"huge", pool.data_size() + 1, 0),
            Err(ShmError::Full { .. })
        ));
        pool.check().unwrap();
    }

    #[test]
    fn free_only_never_evicts() {
        let p = tmp_pool("freeonly", 1 << 20);
        let pool = &p.0;
        let block = pool.data_size() / 4 / 64 * 64;
        let value = vec![3u8; block as usize];
        for k in ["k0", "k1", "k2", "k3"] {
            put(pool, k, &value);
        }
        assert!(matches!(
            pool.reserve_with(b"k4", block, 0, Room::FreeOnly),
            Err(ShmError::Full { .. })
        ));
        for k in ["k0", "k1", "k2", "k3"] {
            assert_eq!(get(pool, k).unwrap(), value);
        }
        // Freed space is taken as usual.
        assert!(pool.delete(b"k1").unwrap());
        let r = pool.reserve_with(b"k4", block, 0, Room::FreeOnly).unwrap();
        r.commit().unwrap();
        assert_eq!(pool.stats().entries, 4);
        pool.check().unwrap();
    }

    #[test]
    fn ttl_expires() {
        let p = tmp_pool("ttl", 1 << 20);
        let r = p.0.reserve(b"t", 8, 20_000_000).unwrap();
        r.commit().unwrap();
        assert!(get(&p.0, "t").is_some());
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(get(&p.0, "t"), None);
        assert!(p.0.keys().is_empty());
        assert_eq!(p.0.stats().entries, 0);
        p.0.check().unwrap();
    }

    #[test]
    fn leases() {
        let p = tmp_pool("lease", 1 << 20);
        let lease = p.0.lease(1000).unwrap();
        assert_eq!(lease.as_mut_ptr() as usize % 64, 0);
        let handle = lease.into_handle();
        assert_eq!(p.0.stats().used_bytes, 1024);
        // Another handle on the same pool, as another process would open it (Miri cannot open by name).
        let other = (!cfg!(miri)).then(|| Pool::open(p.0.name()).unwrap());
        let adopted = other.as_ref().unwrap_or(&p.0).adopt(handle).unwrap();
        drop(adopted);
        assert_eq!(p.0.stats().used_bytes, 0);
        assert!(matches!(p.0.release(handle), Err(ShmError::BadLease)));
        p.0.check().unwrap();
    }

    #[test]
    #[cfg_attr(miri, ignore = "spawns a process")]
    fn recovery_after_dead_holder() {
        let p = tmp_pool("recover", 1 << 20);
        put(&p.0, "a", b"alpha");
        put(&p.0, "b", b"beta");
        // A dead process's reservation and a dead lock holder that left the free table and counters garbage.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        {
            let _ = p.0.reserve(b"c", 100, 0).map(|r| {
                let slot = r.slot;
                std::mem::forget(r);
                p.0.entry(slot).writer_pid.store(dead, Ordering::Relaxed);
                p.0.lru(slot)
                    .store(PENDING | u64::from(dead), Ordering::Relaxed);
            });
            let mut l = p.0.lock();
            l.table().reset();
            l.h().used_bytes.store(12345, Ordering::Relaxed);
            let token = l.token;
            std::mem::forget(l);
            // Hand the held lock to the dead pid.
            p.0.header().lock.store(
                (u64::from(dead) << 32) | (token & 0xffff_ffff),
                Ordering::Relaxed,
            );
        }
        assert_eq!(get(&p.0, "a").unwrap(), b"alpha"); // readers need no lock
        put(&p.0, "d", b"delta"); // takes the lock over and recovers
        p.0.check().unwrap();
        let s = p.0.stats();
        assert_eq!(s.recoveries, 1);
        assert_eq!(s.entries, 3);
        assert_eq!(s.pending, 0);
        assert_eq!(get(&p.0, "b").unwrap(), b"beta");
    }

    #[test]
    #[cfg_attr(miri, ignore = "spawns a process")]
    fn writer_dead_mid_in_place_write_loses_only_its_key() {
        let p = tmp_pool("inplace", 1 << 20);
        put(&p.0, "a", &[1u8; 1000]);
        put(&p.0, "b", &[2u8; 1000]);
        let r = p.0.reserve(b"a", 1000, 0).unwrap();
        assert!(r.in_place());
        let slot = r.slot;
        std::mem::forget(r);
        // SAFETY: the reservation's block is 1000 bytes inside the data region; the "writer" is half done.
        unsafe {
            std::ptr::write_bytes(
                p.0.data_ptr()
                    .add(p.0.entry(slot).offset.load(Ordering::Relaxed) as usize),
                9,
                500,
            )
        };
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        p.0.lru(slot)
            .store(PENDING | u64::from(dead), Ordering::Relaxed);
        p.0.entry(slot).writer_pid.store(dead, Ordering::Relaxed);
        assert_eq!(p.0.probe(b"a").unwrap(), Probe::Busy);
        assert_eq!(
            get(&p.0, "a"),
            None,
            "a half-rewritten value is never returned"
        );
        assert_eq!(get(&p.0, "b").unwrap(), vec![2u8; 1000]);
        let s = p.0.stats();
        assert_eq!((s.entries, s.pending), (1, 0));
        p.0.check().unwrap();
    }

    #[test]
    fn readers_see_published_entries_whole() {
        // Writers publish new keys while readers look them up: under Miri this checks that publication orders the
        // packet bytes before any reader's access to them (no data race), without in-place rewrites or eviction.
        let p = tmp_pool("publish", 4 << 20); // 256 entries: nothing is evicted
        let pool = &p.0;
        let per_writer: u32 = if cfg!(miri) { 6 } else { 100 };
        std::thread::scope(|s| {
            for t in 0..2u32 {
                s.spawn(move || {
                    for i in 0..per_writer {
                        put(pool, &format!("w{t}-{i}"), &[(t * 100 + i % 100) as u8; 96]);
                    }
                });
            }
            for _ in 0..2 {
                s.spawn(move || {
                    let mut seen = 0;
                    for round in 0..per_writer * 4 {
                        let (t, i) = (round % 2, round / 4);
                        if let Some(v) = get(pool, &format!("w{t}-{i}")) {
                            assert_eq!(v, vec![(t * 100 + i % 100) as u8; 96]);
                            seen += 1;
                        }
                    }
                    seen
                });
            }
        });
        assert_eq!(pool.stats().entries, 2 * u64::from(per_writer));
        pool.check().unwrap();
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "a copying reader races, by design, with an in-place rewrite of the block it copies: the seqlock \
                  discards such a copy, but within one process Rust's memory model calls the race undefined"
    )]
    fn threads_never_see_torn_values() {
        let p = tmp_pool("threads", 4 << 20);
        let pool = &p.0;
        // Miri runs the same interleavings, far fewer of them.
        let (writes, reads): (u32, u32) = if cfg!(miri) { (12, 60) } else { (300, 3000) };
        std::thread::scope(|s| {
            for t in 0..3u8 {
                s.spawn(move || {
                    for i in 0..writes {
                        let len = 64 + ((i as usize * 7919 + t as usize * 31) % 20000);
                        let fill = (i % 251) as u8;
                        let mut v = vec![fill; len];
                        v[0] = fill;
                        put(pool, &format!("k{}", i % 8), &v);
                    }
                });
            }
            for _ in 0..2 {
                s.spawn(move || {
                    for i in 0..reads {
                        if let Some(v) = get(pool, &format!("k{}", i % 8)) {
                            let f = v[0];
                            assert!(v.iter().all(|&b| b == f), "torn value");
                        }
                    }
                });
            }
        });
        pool.check().unwrap();
    }
}
