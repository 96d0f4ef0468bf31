//! Writes: reservations and their commit (puts), deletes, `keys`/`clear`, and leases (blocks outside the keys).

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::evict::Room;
use super::index::{Locked, Owner};
use super::layout::{expired, now_ns, Key, BLOCK_ALIGN, LEASED, READY, RESERVED};
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
        let e = self.entry(handle.slot);
        l.drop_ownership(e);
        l.take_ownership(e, current_pid());
        Ok(Lease {
            pool: self,
            handle,
            owned: true,
        })
    }

    /// Frees a lease by handle. Only the process that holds it may: the one that took it until another adopts
    /// it, the adopter afterwards ([`ShmError::LeaseHeldElsewhere`] otherwise). A lease whose holder died is freed
    /// by the pool itself. So a sender that gives up on a hand-off can release its lease exactly when the recipient
    /// has not adopted it: the pool lock orders the two, and neither side writes into the block to find out.
    pub fn release(&self, handle: LeaseHandle) -> Result<(), ShmError> {
        let mut l = self.lock();
        l.lease_slot(&handle)?;
        if self.entry(handle.slot).owner.load(Ordering::Relaxed) != current_pid() {
            return Err(ShmError::LeaseHeldElsewhere);
        }
        l.free_entry(handle.slot);
        Ok(())
    }

    /// The block of a lease as a range of the mapping (see [`Packet::range`](super::Packet::range)).
    pub fn lease_range(&self, handle: &LeaseHandle) -> Range<usize> {
        self.mapping_range(handle.offset, handle.len)
    }
}

impl Locked<'_> {
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
    /// The block as a range of the pool's mapping: `len` bytes, 64-byte aligned, writable by the lease holder only.
    pub fn range(&self) -> Range<usize> {
        self.pool.lease_range(&self.handle)
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
