//! Writes: reservations and their commit (puts), deletes, `keys`/`clear`. Leases are in `lease`.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::evict::Room;
use super::index::Owner;
use super::layout::{expired, now_ns, Key, BLOCK_ALIGN, READY, RESERVED};
use super::Pool;
use crate::error::ShmError;
use crate::lock::{self, current_pid};

impl Pool {
    /// Reserves space for a packet of `packet_len` bytes under `key` (see the module docs for the protocol), evicting
    /// least-recently-used unpinned entries if needed. Write the packet into [`Reservation::range`] of the mapping
    /// (or with [`Reservation::copy_from_slice`]), then [`Reservation::commit`]; dropping it uncommitted frees it.
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
                // A pinned entry's bytes never change: the put takes a new block instead.
                if e.alloc_len.load(Ordering::Relaxed) == alloc_len
                    && e.pins.load(Ordering::Relaxed) == 0
                {
                    l.begin(e);
                    e.packet_len.store(packet_len, Ordering::Relaxed);
                    // Seq stays odd until commit: checked readers wait, eviction skips an owned entry.
                    l.take_ownership(e, pid);
                    let offset = e.offset.load(Ordering::Relaxed);
                    return Ok(Reservation {
                        pool: self,
                        slot,
                        stamp: e.stamp.load(Ordering::Relaxed),
                        pid,
                        offset,
                        len: packet_len,
                        ttl_ns,
                        in_place: true,
                        done: false,
                    });
                }
            }
            let slot = l.new_entry(&key, packet_len, alloc_len, RESERVED, pid, room)?;
            let e = self.entry(slot);
            return Ok(Reservation {
                pool: self,
                slot,
                stamp: e.stamp.load(Ordering::Relaxed),
                pid,
                offset: e.offset.load(Ordering::Relaxed),
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
            l.remove_entry(slot);
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

    /// Removes every entry (writes in progress by live processes and leases stay; pinned entries leave the index
    /// but keep their blocks until unpinned).
    pub fn clear(&self) {
        let mut l = self.lock();
        l.reap();
        for slot in 0..self.layout.max_entries as u32 {
            if self.entry(slot).state.load(Ordering::Relaxed) == READY
                && l.settle(slot) == Owner::Settled
            {
                l.remove_entry(slot);
            }
        }
    }
}

/// Space reserved by [`Pool::reserve`] for one packet.
#[derive(Debug)]
pub struct Reservation<'p> {
    pool: &'p Pool,
    pub(super) slot: u32,
    /// The entry's stamp at reservation: tells our entry apart from a later one in the same slot.
    stamp: u64,
    pid: u32,
    offset: u64,
    len: u64,
    ttl_ns: u64,
    in_place: bool,
    done: bool,
}

impl Reservation<'_> {
    /// Where to write the packet, as a range of the pool's mapping: `len()` bytes, 64-byte aligned, that no other
    /// writer touches and no checked reader trusts until commit. (Zero-copy readers of the key see an in-place
    /// write as it happens; pinned entries are never written in place.)
    pub fn range(&self) -> Range<usize> {
        self.pool.mapping_range(self.offset, self.len)
    }

    /// Copies `bytes` (at most `len()` of them) to the start of the reserved block.
    pub fn copy_from_slice(&self, bytes: &[u8]) {
        let n = bytes.len().min(self.len());
        // SAFETY: the block [offset, offset + alloc_len) lies in the data region (placed by the allocator, or the
        // key's existing block) and n <= len <= alloc_len; this reservation is its only writer until commit or drop.
        // `ptr::copy` (memmove) stays correct even if `bytes` is itself a slice of this mapping.
        unsafe {
            std::ptr::copy(
                bytes.as_ptr(),
                self.pool.data_ptr().add(self.offset as usize),
                n,
            )
        };
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

    /// Whether the entry is still ours: a recovery may have taken it away if we were presumed dead.
    fn still_ours(&self) -> bool {
        let e = self.pool.entry(self.slot);
        e.owner.load(Ordering::Relaxed) == self.pid && e.stamp.load(Ordering::Relaxed) == self.stamp
    }

    /// Publishes the packet under its key, replacing the key's previous entry.
    pub fn commit(mut self) -> Result<(), ShmError> {
        self.done = true;
        let pool = self.pool;
        let e = pool.entry(self.slot);
        let mut spins = 0u32;
        loop {
            let mut l = pool.lock();
            if !self.still_ours() {
                return Ok(());
            }
            let now = now_ns();
            if self.in_place {
                l.set_ttl(e, self.ttl_ns);
                e.created_ns.store(now, Ordering::Relaxed);
                e.stamp.store(l.next_stamp(), Ordering::Relaxed);
                l.drop_ownership(e);
                l.end(e);
                pool.lru(self.slot).store(now, Ordering::Relaxed);
                return Ok(());
            }
            let key = Key::of(e);
            if let Some(old) = l.find(&key) {
                match l.settle(old) {
                    Owner::Busy => {
                        drop(l);
                        lock::backoff(&mut spins);
                        continue;
                    }
                    Owner::Reaped => {}
                    Owner::Settled => l.remove_entry(old),
                }
            }
            l.begin(e);
            e.state.store(READY, Ordering::Relaxed);
            e.created_ns.store(now, Ordering::Relaxed);
            l.set_ttl(e, self.ttl_ns);
            e.stamp.store(l.next_stamp(), Ordering::Relaxed);
            l.link(self.slot, key.hash);
            l.drop_ownership(e);
            l.end(e);
            pool.lru(self.slot).store(now, Ordering::Relaxed);
            pool.header().active.fetch_add(1, Ordering::Relaxed);
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
        let mut l = self.pool.lock();
        if self.still_ours() {
            l.free_entry(self.slot);
        }
    }
}
