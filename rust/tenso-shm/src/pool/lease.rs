//! Leases: blocks of the data region outside the cache's keys, for same-host hand-offs (Dask messages, DataLoader
//! batches).
//!
//! A lease lives as long as its *references*. Each reference is a slot of the pin table naming the LEASED entry at
//! its stamp, held by one process (`pid`) and told apart from every other reference by a `tag` drawn from the pool's
//! stamp counter; the entry's `pins` counts them. Everything below runs under the pool lock:
//! - [`Pool::lease`] makes a block with one reference, held by the caller, who writes the bytes; after that the block
//!   is published (its handle sent) and nobody writes it again.
//! - [`Pool::share`] adds a reference held by the caller, who must hold one already: a holder hands the block on to
//!   another process by reference, without copying it.
//! - [`Pool::adopt`] takes over the reference a handle names (the recipient of a hand-off becomes its holder).
//! - [`Pool::release`] drops the reference a handle names, if the caller holds it; the last reference frees the
//!   block.
//! - A dead process's references are cleared with dead pins (`Locked::clear_dead_pins`, run before every eviction,
//!   by `stats` and by recovery), which frees every block only dead processes referenced.
//!
//! A sender that gives up on a hand-off releases the reference it sent: that succeeds exactly when the recipient has
//! not adopted it (the lock orders the two), and the block survives for as long as anyone else references it.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::evict::Room;
use super::index::Locked;
use super::layout::{Key, BLOCK_ALIGN, LEASED};
use super::Pool;
use crate::error::ShmError;
use crate::lock::current_pid;

impl Pool {
    /// Takes `len` bytes of the data region as a lease: recycled, pre-faulted shared memory for a same-host hand-off
    /// that is not a cache entry. The block has one reference, held by this process (it is freed if the process
    /// dies), until that reference is [`Pool::adopt`]ed by another process or released.
    pub fn lease(&self, len: u64) -> Result<Lease<'_>, ShmError> {
        let alloc_len = len.max(1).next_multiple_of(BLOCK_ALIGN);
        let pid = current_pid();
        let mut l = self.lock();
        let slot = l.new_entry(&Key::new(b"")?, len, alloc_len, LEASED, pid, Room::EvictLru)?;
        let e = self.entry(slot);
        // The block's life is its references from here on, not a pending owner.
        l.drop_ownership(e);
        let stamp = e.stamp.load(Ordering::Relaxed);
        let Some((reference, tag)) = l.add_reference(slot, stamp, pid) else {
            l.free_entry(slot);
            return Err(ShmError::NoReferenceSlot);
        };
        let handle = LeaseHandle {
            slot,
            stamp,
            offset: e.offset.load(Ordering::Relaxed),
            len,
            reference,
            tag,
        };
        Ok(Lease {
            pool: self,
            handle,
            owned: true,
        })
    }

    /// A new reference to the block of `held`, a reference this process holds: the handle to send to the process
    /// the block is handed on to (it adopts the new reference), while this process keeps its own.
    pub fn share(&self, held: LeaseHandle) -> Result<LeaseHandle, ShmError> {
        let pid = current_pid();
        let mut l = self.lock();
        let index = l.reference(&held)?;
        if self.pin_slot(index).pid.load(Ordering::Relaxed) != pid {
            return Err(ShmError::LeaseHeldElsewhere);
        }
        let Some((reference, tag)) = l.add_reference(held.slot, held.stamp, pid) else {
            return Err(ShmError::NoReferenceSlot);
        };
        Ok(LeaseHandle {
            reference,
            tag,
            ..held
        })
    }

    /// Takes over the reference `handle` names (handed over by another process): it now dies with this one.
    pub fn adopt(&self, handle: LeaseHandle) -> Result<Lease<'_>, ShmError> {
        let l = self.lock();
        let index = l.reference(&handle)?;
        self.pin_slot(index)
            .pid
            .store(current_pid(), Ordering::Relaxed);
        drop(l);
        Ok(Lease {
            pool: self,
            handle,
            owned: true,
        })
    }

    /// Drops the reference `handle` names. Only the process that holds it may: the one that took it until another
    /// adopts it, the adopter afterwards ([`ShmError::LeaseHeldElsewhere`] otherwise). The block is freed with its
    /// last reference.
    pub fn release(&self, handle: LeaseHandle) -> Result<(), ShmError> {
        let mut l = self.lock();
        let index = l.reference(&handle)?;
        if self.pin_slot(index).pid.load(Ordering::Relaxed) != current_pid() {
            return Err(ShmError::LeaseHeldElsewhere);
        }
        l.release_pin_slot(index);
        Ok(())
    }

    /// How many references the block of `handle` has now (0 once it is freed).
    pub fn references(&self, handle: &LeaseHandle) -> u32 {
        let l = self.lock();
        if l.lease_entry(handle).is_err() {
            return 0;
        }
        self.entry(handle.slot).pins.load(Ordering::Relaxed)
    }

    /// The block of a lease as a range of the mapping (see [`Packet::range`](super::Packet::range)).
    pub fn lease_range(&self, handle: &LeaseHandle) -> Range<usize> {
        self.mapping_range(handle.offset, handle.len)
    }
}

impl Locked<'_> {
    /// Checks that `handle` names a live lease of this pool.
    fn lease_entry(&self, handle: &LeaseHandle) -> Result<(), ShmError> {
        if u64::from(handle.slot) >= self.pool.layout.max_entries {
            return Err(ShmError::BadLease);
        }
        let e = self.pool.entry(handle.slot);
        if e.state.load(Ordering::Relaxed) != LEASED
            || e.stamp.load(Ordering::Relaxed) != handle.stamp
            || e.offset.load(Ordering::Relaxed) != handle.offset
            || e.packet_len.load(Ordering::Relaxed) != handle.len
        {
            return Err(ShmError::BadLease);
        }
        Ok(())
    }

    /// The pin-table index of the live reference `handle` names.
    fn reference(&self, handle: &LeaseHandle) -> Result<u32, ShmError> {
        self.lease_entry(handle)?;
        let index = handle.reference;
        if u64::from(index) >= self.pool.layout.pin_slots {
            return Err(ShmError::BadLease);
        }
        let p = self.pool.pin_slot(index);
        if p.pid.load(Ordering::Relaxed) == 0
            || p.slot.load(Ordering::Relaxed) != handle.slot
            || p.stamp.load(Ordering::Relaxed) != handle.stamp
            || p.tag.load(Ordering::Relaxed) != handle.tag
        {
            return Err(ShmError::BadLease);
        }
        Ok(index)
    }

    /// Adds a reference held by `pid` to the LEASED entry `slot` (at `stamp`): its pin-table index and tag, or None
    /// if the table is full even after the references and pins of dead processes are cleared.
    fn add_reference(&mut self, slot: u32, stamp: u64, pid: u32) -> Option<(u32, u64)> {
        let n = self.pool.layout.pin_slots as u32;
        let free = |l: &Self| (0..n).find(|&i| l.pool.pin_slot(i).pid.load(Ordering::Relaxed) == 0);
        let index = match free(self) {
            Some(i) => i,
            None => {
                self.clear_dead_pins();
                free(self)?
            }
        };
        let e = self.pool.entry(slot);
        if e.state.load(Ordering::Relaxed) != LEASED || e.stamp.load(Ordering::Relaxed) != stamp {
            return None; // clearing dead references freed the block: a caller whose reference died cannot share
        }
        let tag = self.next_stamp();
        let p = self.pool.pin_slot(index);
        p.slot.store(slot, Ordering::Relaxed);
        p.stamp.store(stamp, Ordering::Relaxed);
        p.count.store(1, Ordering::Relaxed);
        p.tag.store(tag, Ordering::Relaxed);
        p.pid.store(pid, Ordering::Relaxed);
        e.pins.fetch_add(1, Ordering::Relaxed);
        self.h().pins_used.fetch_add(1, Ordering::Relaxed);
        Some((index, tag))
    }
}

/// Identifies one reference to a lease across processes.
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
    /// The reference: its index in the pin table.
    pub reference: u32,
    /// The reference's tag (tells a reused pin slot apart).
    pub tag: u64,
}

/// A reference to a block of pool memory outside the cache's keys ([`Pool::lease`], [`Pool::adopt`]). Released on
/// drop unless handed off with [`Lease::into_handle`].
#[derive(Debug)]
pub struct Lease<'p> {
    pool: &'p Pool,
    handle: LeaseHandle,
    owned: bool,
}

impl Lease<'_> {
    /// The block as a range of the pool's mapping: `len` bytes, 64-byte aligned. Only the process that made the
    /// lease writes it, before handing it off; afterwards every holder only reads it.
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
