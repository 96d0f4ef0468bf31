//! Lock-free reads: lookups through the hash chains validated by the seqlocks, and the checked read API
//! ([`Pool::read`], [`Pool::read_pinned`]) that owns the retry loop, so that no caller handles raw addresses or
//! re-validates by hand.

use std::ops::Range;
use std::sync::atomic::{fence, Ordering};

use super::index::Owner;
use super::layout::{expired, now_ns, Key, READY};
use super::pin::{Pin, Pinning};
use super::Pool;
use crate::error::ShmError;
use crate::lock;

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

/// One key's answer of [`Pool::read_pinned_many`].
#[derive(Debug)]
pub enum Batched<'p> {
    /// The entry, pinned for this process: its bytes stay exactly as they are until the pin is given back.
    Pinned(Packet<'p>, Pin),
    /// No live entry (missing or expired).
    Missing,
    /// Not pinned (the entry changed since its lookup, or the pin table is full): read it with
    /// [`Pool::read_pinned`].
    Retry,
}

/// What a chain walk found.
enum Found {
    Hit(Hit),
    /// The key's entry is being changed (odd sequence number): wait and look again.
    Busy,
    Missing,
}

/// How a reader waits when it must (an entry being rewritten in place, a contended lock). The Python bindings
/// release the GIL around the wait, since the writer may be a thread of the same process that needs it.
pub trait Park {
    /// Runs `wait`, which may block.
    fn park<T: Send>(&self, wait: impl FnOnce() -> T + Send) -> T;
}

/// Waits in place (for callers that hold nothing another thread needs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Spin;

impl Park for Spin {
    fn park<T: Send>(&self, wait: impl FnOnce() -> T + Send) -> T {
        wait()
    }
}

/// One entry's packet, as handed to the closures of [`Pool::read`] and [`Pool::read_pinned`].
///
/// Unless pinned, the bytes may be rewritten by another process while the closure runs; the read then discards what
/// the closure returned and calls it again, so anything it derives is only used if the bytes were whole.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'p> {
    pool: &'p Pool,
    hit: Hit,
}

impl Packet<'_> {
    /// The lookup behind this packet (length, ttl, age).
    pub fn hit(&self) -> &Hit {
        &self.hit
    }

    /// Packet length in bytes.
    pub fn len(&self) -> usize {
        self.hit.len as usize
    }

    /// True for an empty packet (never: packets have a header).
    pub fn is_empty(&self) -> bool {
        self.hit.len == 0
    }

    /// Where the packet lies in the pool's mapping ([`crate::Segment::as_ptr`] + range): what a zero-copy view
    /// covers. Always inside the mapping's data region.
    pub fn range(&self) -> Range<usize> {
        self.pool.mapping_range(self.hit.offset, self.hit.len)
    }

    /// Copies the first `dst.len()` bytes of the packet (at most its length) into `dst`; returns how many.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len());
        // SAFETY: the lookup checked offset + len <= data_size, so the source lies in the data region of the
        // mapping, which `self.pool` keeps mapped; `dst` is a separate buffer of at least n bytes. Another process
        // may be writing the source bytes concurrently (then the read's sequence check fails and the result is
        // discarded); the copy reads plain bytes, for which any value is valid.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.pool.data_ptr().add(self.hit.offset as usize),
                dst.as_mut_ptr(),
                n,
            )
        };
        n
    }
}

impl Pool {
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
    /// being changed right now. Callers that must not block while holding something probe first and call
    /// [`Pool::lookup`], which waits, only after releasing it ([`Pool::read`] does this through its [`Park`]).
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
                    l.remove_entry(slot);
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
                // A tick on an entry freed meanwhile is harmless: only READY entries are eviction candidates, and
                // publication sets the tick afresh.
                self.lru(hit.slot).fetch_max(now_ns(), Ordering::Relaxed);
            }
            None => {
                h.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `lookup`, never blocking outside `park`.
    fn lookup_parked(&self, key: &[u8], park: &impl Park) -> Result<Option<Hit>, ShmError> {
        match self.probe(key)? {
            Probe::Hit(hit) => Ok(Some(hit)),
            Probe::Miss => Ok(None),
            Probe::Busy => park.park(|| self.lookup(key)),
        }
    }

    fn read_impl<R>(
        &self,
        key: &[u8],
        park: &impl Park,
        count: bool,
        mut f: impl FnMut(&Packet<'_>) -> R,
    ) -> Result<Option<R>, ShmError> {
        loop {
            let Some(hit) = self.lookup_parked(key, park)? else {
                if count {
                    self.record(None);
                }
                return Ok(None);
            };
            let out = f(&Packet { pool: self, hit });
            if self.validate(&hit) {
                if count {
                    self.record(Some(&hit));
                }
                return Ok(Some(out));
            }
        }
    }

    /// Reads the packet of `key`: calls `f` with it, then checks that the entry did not change meanwhile, calling
    /// `f` again on a fresh lookup until it did not. Returns `f`'s result for a whole value, `None` for a missing or
    /// expired key; counts the get as a hit or a miss. Waits (for an in-place rewrite) only inside `park`.
    ///
    /// What `f` returns must be derived from the packet only through [`Packet::copy_to`] or views over
    /// [`Packet::range`] that are themselves re-checked by this call; a zero-copy view stays as described in the
    /// module docs after the call returns (see [`Pool::read_pinned`] to keep it stable).
    pub fn read<R>(
        &self,
        key: &[u8],
        park: &impl Park,
        f: impl FnMut(&Packet<'_>) -> R,
    ) -> Result<Option<R>, ShmError> {
        self.read_impl(key, park, true, f)
    }

    /// [`Pool::read`] without counting a hit or a miss (metadata queries).
    pub fn peek<R>(
        &self,
        key: &[u8],
        park: &impl Park,
        f: impl FnMut(&Packet<'_>) -> R,
    ) -> Result<Option<R>, ShmError> {
        self.read_impl(key, park, false, f)
    }

    /// Reads the packet of `key` and pins it for this process: `f` gets the packet and the pin, and the entry's
    /// bytes stay exactly as they are (no eviction, no in-place rewrite, no reuse of its block) until the pin is
    /// given back with [`Pool::unpin`] or this process dies. If the pin table is full, `f` gets `None` and must
    /// copy (the copy is then re-checked and retried like [`Pool::read`]'s). Counts the get as a hit or a miss.
    pub fn read_pinned<R>(
        &self,
        key: &[u8],
        park: &impl Park,
        mut f: impl FnMut(&Packet<'_>, Option<Pin>) -> R,
    ) -> Result<Option<R>, ShmError> {
        loop {
            let Some(hit) = self.lookup_parked(key, park)? else {
                self.record(None);
                return Ok(None);
            };
            let packet = Packet { pool: self, hit };
            let pid = lock::current_pid();
            let pinning = match self.try_lock_as(pid) {
                Some(mut l) => l.pin_entry(&hit, pid, &mut 0),
                None => park.park(|| self.pin(&hit, pid)),
            };
            match pinning {
                Pinning::Changed => continue,
                Pinning::Pinned(pin) => {
                    // Pinned at the sequence number of the lookup: the bytes are whole and stay so.
                    let out = f(&packet, Some(pin));
                    self.record(Some(&hit));
                    return Ok(Some(out));
                }
                Pinning::Full => {
                    let out = f(&packet, None);
                    if self.validate(&hit) {
                        self.record(Some(&hit));
                        return Ok(Some(out));
                    }
                }
            }
        }
    }

    /// Looks `keys` up and pins every entry found for this process, all under **one** lock acquisition (one pass
    /// over the pin table): what a `get_many` of pinned views needs, at the cost of about one unpinned read per key.
    /// Answers one [`Batched`] per key, in order; [`Batched::Retry`] keys (the entry changed between the lookup and
    /// the pin, or the pin table is full) are for [`Pool::read_pinned`], which handles both. Counts a hit for each
    /// pinned key and a miss for each missing one (not for `Retry`: the retry counts). Give the pins back with
    /// [`Pool::unpin_many`] (or hold them in one [`super::Pinned`]).
    pub fn read_pinned_many<'p>(
        &'p self,
        keys: &[&[u8]],
        park: &impl Park,
    ) -> Result<Vec<Batched<'p>>, ShmError> {
        let mut hits = Vec::with_capacity(keys.len());
        for key in keys {
            hits.push(self.lookup_parked(key, park)?);
        }
        let mut out = Vec::with_capacity(keys.len());
        if hits.iter().any(Option::is_some) {
            let pid = lock::current_pid();
            let pin_all = |l: &mut super::Locked<'_>| {
                let mut free_from = 0;
                hits.iter()
                    .map(|hit| hit.map(|hit| (hit, l.pin_entry(&hit, pid, &mut free_from))))
                    .collect::<Vec<_>>()
            };
            let pinned = match self.try_lock_as(pid) {
                Some(mut l) => pin_all(&mut l),
                None => park.park(|| pin_all(&mut self.lock_as(pid))),
            };
            for got in pinned {
                out.push(match got {
                    None => Batched::Missing,
                    Some((hit, Pinning::Pinned(pin))) => {
                        Batched::Pinned(Packet { pool: self, hit }, pin)
                    }
                    Some((_, Pinning::Changed | Pinning::Full)) => Batched::Retry,
                });
            }
        } else {
            out.resize_with(keys.len(), || Batched::Missing);
        }
        for got in &out {
            match got {
                Batched::Pinned(packet, _) => self.record(Some(&packet.hit)),
                Batched::Missing => self.record(None),
                Batched::Retry => {}
            }
        }
        Ok(out)
    }

    /// Copies the packet of `key` into a buffer made by `alloc(len)`, retrying until the copy is whole.
    pub fn get_copy<B: AsMut<[u8]>>(
        &self,
        key: &[u8],
        mut alloc: impl FnMut(usize) -> B,
    ) -> Result<Option<(Hit, B)>, ShmError> {
        self.read(key, &Spin, |packet| {
            let mut buf = alloc(packet.len());
            let n = packet.copy_to(buf.as_mut());
            (*packet.hit(), buf, n)
        })
        .map(|got| got.and_then(|(hit, buf, n)| (n == hit.len as usize).then_some((hit, buf))))
    }
}
