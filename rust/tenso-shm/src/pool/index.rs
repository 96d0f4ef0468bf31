//! Changes to the index under the lock: the [`Locked`] guard, hash chains, the free-slot stack, blocks, and the
//! entry life cycle (new, settled, removed, retired, freed).

use std::sync::atomic::{fence, Ordering};

use super::evict::{Eviction, Room};
use super::layout::{now_ns, Entry, Header, Key, MAX_KEY_LEN, READY, RETIRED};
use super::Pool;
use crate::alloc::{Extent, FreeTable};
use crate::error::ShmError;
use crate::lock::{self, process_alive};

/// The pool lock, held. Everything that changes shared structures is a method of this type.
#[derive(Debug)]
pub struct Locked<'p> {
    pub(super) pool: &'p Pool,
    pub(super) token: u64,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        lock::release(&self.pool.header().lock, self.token);
    }
}

/// See [`Locked::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    Settled,
    Busy,
    Reaped,
}

impl<'p> Locked<'p> {
    pub(super) fn new(pool: &'p Pool, token: u64) -> Self {
        Locked { pool, token }
    }

    pub(super) fn h(&self) -> &'p Header {
        self.pool.header()
    }

    /// The free table. `&mut self` makes it exclusive within this process; the lock excludes other processes, and
    /// nothing reads the table without the lock.
    pub(super) fn table(&mut self) -> FreeTable<'_> {
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
    pub(super) fn slot_stack(&mut self) -> &mut [u32] {
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

    pub(super) fn next_stamp(&self) -> u64 {
        self.h().stamp.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Opens an entry's seqlock (odd): checked readers of it wait or retry until [`Locked::end`].
    pub(super) fn begin(&self, e: &Entry) {
        let s = e.seq.load(Ordering::Relaxed);
        e.seq.store(s | 1, Ordering::Relaxed);
        fence(Ordering::Release);
    }

    pub(super) fn end(&self, e: &Entry) {
        let s = e.seq.load(Ordering::Relaxed);
        e.seq.store((s | 1) + 1, Ordering::Release);
    }

    pub(super) fn set_ttl(&self, e: &Entry, ttl_ns: u64) {
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

    pub(super) fn key_bytes(&self, e: &Entry) -> Vec<u8> {
        let len = (e.key_len.load(Ordering::Relaxed) as usize).min(MAX_KEY_LEN);
        let mut bytes = Vec::with_capacity(MAX_KEY_LEN);
        for w in &e.key {
            bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }

    /// The READY entry of `key`, under the lock.
    pub(super) fn find(&self, key: &Key) -> Option<u32> {
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
    pub(super) fn settle(&mut self, slot: u32) -> Owner {
        let owner = self.pool.entry(slot).owner.load(Ordering::Relaxed);
        if owner == 0 {
            return Owner::Settled;
        }
        if process_alive(owner) {
            Owner::Busy
        } else {
            self.free_entry(slot);
            Owner::Reaped
        }
    }

    /// Marks a settled entry as being changed by `pid` (it must not be pending already).
    pub(super) fn take_ownership(&self, e: &Entry, pid: u32) {
        if e.owner.swap(pid, Ordering::Relaxed) == 0 {
            self.h().pending.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Settles an entry its owner has finished with.
    pub(super) fn drop_ownership(&self, e: &Entry) {
        if e.owner.swap(0, Ordering::Relaxed) != 0 {
            self.h().pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn link(&self, slot: u32, hash: u64) {
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

    /// Takes a settled READY entry out of the index (delete, replace, expiry, clear). Its block is freed at once,
    /// unless a live process pins it: then the entry is RETIRED and its block stays until the last pin goes.
    pub(super) fn remove_entry(&mut self, slot: u32) {
        let e = self.pool.entry(slot);
        if e.pins.load(Ordering::Relaxed) > 0 {
            self.clear_dead_pins();
        }
        if e.pins.load(Ordering::Relaxed) == 0 || e.state.load(Ordering::Relaxed) != READY {
            self.free_entry(slot);
            return;
        }
        self.unlink(slot);
        self.h().active.fetch_sub(1, Ordering::Relaxed);
        self.begin(e);
        e.state.store(RETIRED, Ordering::Relaxed);
        self.set_ttl(e, 0);
        self.end(e);
        self.pool.lru(slot).store(0, Ordering::Relaxed);
    }

    /// Frees an entry of any state: out of its chain, block back to the free table, slot back to the stack. Pins
    /// still naming it go stale (their stamp no longer matches) and are cleared by their holder or by the reaper.
    pub(super) fn free_entry(&mut self, slot: u32) {
        let e = self.pool.entry(slot);
        let state = e.state.load(Ordering::Relaxed);
        if state == super::layout::FREE {
            return;
        }
        let h = self.h();
        if state == READY {
            self.unlink(slot);
            h.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.drop_ownership(e);
        self.begin(e);
        e.state.store(super::layout::FREE, Ordering::Relaxed);
        e.pins.store(0, Ordering::Relaxed);
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

    /// Reserves a block and an entry slot owned by `pid` in `state`, making room as `room` allows.
    pub(super) fn new_entry(
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
        let mut eviction = Eviction::new(room);
        let offset = loop {
            if let Some(off) = self.table().alloc(alloc_len) {
                break off;
            }
            if !eviction.make_room(self) {
                return Err(full(self.table().free_bytes()));
            }
        };
        let slot = loop {
            if let Some(slot) = self.pop_slot() {
                break slot;
            }
            if !eviction.make_room(self) {
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
        e.pins.store(0, Ordering::Relaxed);
        e.next.store(0, Ordering::Relaxed);
        e.stamp.store(self.next_stamp(), Ordering::Relaxed);
        e.state.store(state, Ordering::Relaxed);
        self.take_ownership(e, pid);
        self.end(e);
        self.pool.lru(slot).store(0, Ordering::Relaxed);
        self.h().used_bytes.fetch_add(alloc_len, Ordering::Relaxed);
        Ok(slot)
    }
}
