//! The pin table: which processes hold zero-copy views of which entries (and which hold references to which leases:
//! see `lease`).
//!
//! A pin slot records `count` views of entry `slot` at generation `stamp` held by process `pid`. Slots are only
//! read and written under the lock. Each entry counts the slots that name it at its current stamp (`Entry::pins`),
//! so eviction and removal test "pinned?" in O(1); pins of dead processes still count until
//! [`Locked::clear_dead_pins`] runs, which eviction, `stats` and removal of a pinned entry do first.

use std::ops::Deref;
use std::sync::atomic::Ordering;

use super::layout::{LEASED, READY, RETIRED};
use super::read::Hit;
use super::{Locked, Pool};
use crate::lock::{current_pid, process_alive};

/// A pin held by this process on one entry (see [`Pool::read_pinned`]). Give it back with [`Pool::unpin`]; a pin
/// that is never given back is cleared once its process has died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a pin keeps its entry in the pool until Pool::unpin"]
pub struct Pin {
    index: u32,
    slot: u32,
    stamp: u64,
    pid: u32,
}

/// The owner of one or more pins: gives them back when dropped. `P` is whatever keeps the pool mapped (`&Pool` in
/// Rust; the bindings use a handle on their Python mapping object, so the views' owner is `'static`).
#[derive(Debug)]
pub struct Pinned<P: Deref<Target = Pool>> {
    pool: P,
    pins: Vec<Pin>,
}

impl<P: Deref<Target = Pool>> Pinned<P> {
    /// Takes ownership of `pin`, a pin on an entry of `pool`.
    pub fn new(pool: P, pin: Pin) -> Self {
        Pinned {
            pool,
            pins: vec![pin],
        }
    }

    /// Takes ownership of `pins`, pins on entries of `pool` (as [`Pool::read_pinned_many`] gives them): all are
    /// given back together, under one lock acquisition.
    pub fn many(pool: P, pins: Vec<Pin>) -> Self {
        Pinned { pool, pins }
    }

    /// What keeps the pool mapped.
    pub fn owner(&self) -> &P {
        &self.pool
    }

    /// The pins held.
    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }
}

impl<P: Deref<Target = Pool>> Drop for Pinned<P> {
    fn drop(&mut self) {
        self.pool.unpin_many(&self.pins);
    }
}

/// The answer of [`Locked::pin_entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pinning {
    Pinned(Pin),
    /// The entry changed since the lookup: look again.
    Changed,
    /// No pin slot is free.
    Full,
}

impl Pool {
    /// Pins the entry read as `hit` if it is still exactly that entry (same sequence number).
    pub(super) fn pin(&self, hit: &Hit, pid: u32) -> Pinning {
        self.lock_as(pid).pin_entry(hit, pid, &mut 0)
    }

    /// Gives a pin back. Pins taken by another process (a pin copied across `fork`) are left alone.
    pub fn unpin(&self, pin: Pin) {
        self.unpin_many(std::slice::from_ref(&pin));
    }

    /// Gives pins back, under one lock acquisition. Pins taken by another process (copied across `fork`) are left
    /// alone.
    pub fn unpin_many(&self, pins: &[Pin]) {
        let pid = current_pid();
        if !pins.iter().any(|p| p.pid == pid) {
            return;
        }
        let mut l = self.lock_as(pid);
        for pin in pins.iter().filter(|p| p.pid == pid) {
            l.unpin(pin);
        }
    }
}

impl Locked<'_> {
    /// Gives back one pin of this process.
    fn unpin(&mut self, pin: &Pin) {
        let pool = self.pool;
        let n = pool.layout.pin_slots as u32;
        let same = |i: u32| {
            let p = pool.pin_slot(i);
            p.pid.load(Ordering::Relaxed) == pin.pid
                && p.slot.load(Ordering::Relaxed) == pin.slot
                && p.stamp.load(Ordering::Relaxed) == pin.stamp
        };
        // The slot it was taken in, unless recovery moved things about.
        let Some(index) = (pin.index < n && same(pin.index))
            .then_some(pin.index)
            .or_else(|| (0..n).find(|&i| same(i)))
        else {
            return;
        };
        let p = pool.pin_slot(index);
        let count = p.count.load(Ordering::Relaxed);
        if count > 1 {
            p.count.store(count - 1, Ordering::Relaxed);
        } else {
            self.release_pin_slot(index);
        }
    }

    /// Takes a pin for process `pid` (this one) on the entry read as `hit`.
    ///
    /// `free_from`: no pin slot below it is free (0 if unknown). Pinning several entries under one lock
    /// acquisition passes the same cursor to each call, so that the whole batch walks the table once.
    pub(super) fn pin_entry(&mut self, hit: &Hit, pid: u32, free_from: &mut u32) -> Pinning {
        let e = self.pool.entry(hit.slot);
        if e.state.load(Ordering::Relaxed) != READY || e.seq.load(Ordering::Relaxed) != hit.seq {
            return Pinning::Changed;
        }
        let stamp = e.stamp.load(Ordering::Relaxed);
        let n = self.pool.layout.pin_slots as u32;
        for attempt in 0..2 {
            // `Entry::pins` counts every slot naming this entry at its stamp: with none, there is no pin of this
            // process to add to, and only a free slot is needed.
            if e.pins.load(Ordering::Relaxed) > 0 {
                for i in 0..n {
                    let p = self.pool.pin_slot(i);
                    if p.pid.load(Ordering::Relaxed) == pid
                        && p.slot.load(Ordering::Relaxed) == hit.slot
                        && p.stamp.load(Ordering::Relaxed) == stamp
                    {
                        p.count.fetch_add(1, Ordering::Relaxed);
                        return Pinning::Pinned(Pin {
                            index: i,
                            slot: hit.slot,
                            stamp,
                            pid,
                        });
                    }
                }
            }
            let free =
                (*free_from..n).find(|&i| self.pool.pin_slot(i).pid.load(Ordering::Relaxed) == 0);
            *free_from = free.unwrap_or(n);
            if let Some(i) = free {
                let p = self.pool.pin_slot(i);
                p.slot.store(hit.slot, Ordering::Relaxed);
                p.stamp.store(stamp, Ordering::Relaxed);
                p.count.store(1, Ordering::Relaxed);
                p.pid.store(pid, Ordering::Relaxed);
                e.pins.fetch_add(1, Ordering::Relaxed);
                self.h().pins_used.fetch_add(1, Ordering::Relaxed);
                return Pinning::Pinned(Pin {
                    index: i,
                    slot: hit.slot,
                    stamp,
                    pid,
                });
            }
            if attempt == 0 {
                // Full: make room by dropping dead processes' pins, once.
                self.clear_dead_pins();
                *free_from = 0;
            }
        }
        Pinning::Full
    }

    /// Empties a pin slot; frees its entry if that was a retired entry's last pin or a lease's last reference.
    pub(super) fn release_pin_slot(&mut self, index: u32) {
        let p = self.pool.pin_slot(index);
        let (slot, stamp) = (
            p.slot.load(Ordering::Relaxed),
            p.stamp.load(Ordering::Relaxed),
        );
        p.pid.store(0, Ordering::Relaxed);
        p.count.store(0, Ordering::Relaxed);
        p.slot.store(0, Ordering::Relaxed);
        p.stamp.store(0, Ordering::Relaxed);
        p.tag.store(0, Ordering::Relaxed);
        let h = self.h();
        h.pins_used.store(
            h.pins_used.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
        if u64::from(slot) >= self.pool.layout.max_entries {
            return;
        }
        let e = self.pool.entry(slot);
        let state = e.state.load(Ordering::Relaxed);
        if !matches!(state, READY | RETIRED | LEASED) || e.stamp.load(Ordering::Relaxed) != stamp {
            return; // a stale pin: the entry it named is gone
        }
        let pins = e.pins.load(Ordering::Relaxed).saturating_sub(1);
        e.pins.store(pins, Ordering::Relaxed);
        // A retired entry's last pin, or a lease's last reference: nobody can read the block any more.
        if pins == 0 && matches!(state, RETIRED | LEASED) {
            self.free_entry(slot);
        }
    }

    /// Clears the pins of processes that no longer exist (the same liveness check as the lock's).
    pub(super) fn clear_dead_pins(&mut self) {
        if self.h().pins_used.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut alive: Vec<(u32, bool)> = Vec::new();
        for i in 0..self.pool.layout.pin_slots as u32 {
            let pid = self.pool.pin_slot(i).pid.load(Ordering::Relaxed);
            if pid == 0 {
                continue;
            }
            let live = match alive.iter().find(|(p, _)| *p == pid) {
                Some(&(_, live)) => live,
                None => {
                    let live = process_alive(pid);
                    alive.push((pid, live));
                    live
                }
            };
            if !live {
                self.release_pin_slot(i);
            }
        }
    }

    /// Entries pinned by live processes (clears dead pins first); leases, whose references are pin slots too, are
    /// not counted.
    pub(super) fn pinned_entries(&mut self) -> u64 {
        self.clear_dead_pins();
        if self.h().pins_used.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        (0..self.pool.layout.max_entries as u32)
            .filter(|&s| {
                let e = self.pool.entry(s);
                e.pins.load(Ordering::Relaxed) > 0 && e.state.load(Ordering::Relaxed) != LEASED
            })
            .count() as u64
    }
}
