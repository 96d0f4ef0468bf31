//! Initialisation, recovery after a lock holder died, and the structural invariant check.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};

use super::index::Locked;
use super::layout::{
    now_ns, Entry, Key, BLOCK_ALIGN, FREE, LEASED, MAX_KEY_LEN, READY, RESERVED, RETIRED,
};
use crate::alloc::Extent;
use crate::lock::process_alive;

impl Locked<'_> {
    /// Initialises an empty pool.
    pub(super) fn reset(&mut self) {
        self.table().reset();
        let n = self.pool.layout.max_entries as u32;
        let stack = self.slot_stack();
        for (i, s) in stack.iter_mut().enumerate() {
            // Slot 0 on top.
            *s = n - 1 - i as u32;
        }
        self.h().free_slots.store(u64::from(n), Ordering::Relaxed);
    }

    /// Rebuilds every derived structure from the entries and pins after a holder died inside the lock. Entries the
    /// dead holder was changing (odd sequence number, not owned by a live process) are dropped, as are the pending
    /// entries of dead processes, entries whose block is out of bounds or overlaps an earlier one, all but the
    /// newest READY entry of a key, retired entries nobody live pins, and pins of dead processes or gone entries.
    pub(super) fn recover(&mut self) {
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
            e.owner.store(0, Ordering::Relaxed);
            e.pins.store(0, Ordering::Relaxed);
            e.seq.store((s | 1) + 1, Ordering::Release);
            pool.lru(slot).store(0, Ordering::Relaxed);
        };
        // Live pins per entry (at the entry's current stamp); pins of dead processes and torn pin slots go.
        let mut alive: HashMap<u32, bool> = HashMap::new();
        let mut pins = vec![0u32; lay.max_entries as usize];
        for i in 0..lay.pin_slots as u32 {
            let p = pool.pin_slot(i);
            let pid = p.pid.load(Ordering::Relaxed);
            if pid == 0 {
                continue;
            }
            let slot = p.slot.load(Ordering::Relaxed);
            let live = *alive.entry(pid).or_insert_with(|| process_alive(pid));
            let names = u64::from(slot) < lay.max_entries && {
                let e = pool.entry(slot);
                matches!(e.state.load(Ordering::Relaxed), READY | RETIRED | LEASED)
                    && e.stamp.load(Ordering::Relaxed) == p.stamp.load(Ordering::Relaxed)
            };
            if live && names && p.count.load(Ordering::Relaxed) > 0 {
                pins[slot as usize] += 1;
            } else {
                p.pid.store(0, Ordering::Relaxed);
                p.count.store(0, Ordering::Relaxed);
            }
        }
        let mut kept: Vec<(Extent, u32)> = Vec::new();
        let mut ready: HashMap<Vec<u8>, u32> = HashMap::new();
        for slot in 0..lay.max_entries as u32 {
            let e = pool.entry(slot);
            let state = e.state.load(Ordering::Relaxed);
            if state == FREE {
                drop_entry(e, slot);
                continue;
            }
            let owner = e.owner.load(Ordering::Relaxed);
            let live_owner = owner != 0 && process_alive(owner);
            let odd = e.seq.load(Ordering::Relaxed) & 1 == 1;
            let (offset, alloc_len, packet_len) = (
                e.offset.load(Ordering::Relaxed),
                e.alloc_len.load(Ordering::Relaxed),
                e.packet_len.load(Ordering::Relaxed),
            );
            let sane = matches!(state, RESERVED | READY | LEASED | RETIRED)
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
                    RETIRED => !odd && pins[slot as usize] > 0,
                    // A lease lives as long as a live process references it.
                    LEASED => !odd && pins[slot as usize] > 0,
                    _ => !odd && live_owner,
                };
            if !keep {
                drop_entry(e, slot);
                continue;
            }
            if !live_owner {
                e.owner.store(0, Ordering::Relaxed);
            }
            if state == READY {
                if !live_owner && pool.lru(slot).load(Ordering::Relaxed) == 0 {
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
                    ready.insert(key, winner);
                    if pins[loser as usize] > 0 {
                        // Viewed by a live process: out of the index, block kept.
                        pool.entry(loser).state.store(RETIRED, Ordering::Relaxed);
                    } else {
                        drop_entry(pool.entry(loser), loser);
                        kept.retain(|&(_, s)| s != loser);
                    }
                    if winner != slot && pins[slot as usize] == 0 {
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
            if e.owner.load(Ordering::Relaxed) != 0 {
                pending += 1;
            }
            let state = e.state.load(Ordering::Relaxed);
            if state == RETIRED {
                e.ttl_ns.store(0, Ordering::Relaxed);
            }
            if e.ttl_ns.load(Ordering::Relaxed) != 0 {
                ttl += 1;
            }
            e.pins.store(
                if matches!(state, READY | RETIRED | LEASED) {
                    pins[slot as usize]
                } else {
                    0
                },
                Ordering::Relaxed,
            );
            if state == READY {
                active += 1;
                let b = pool.bucket(e.key_hash.load(Ordering::Relaxed));
                e.next.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
                b.store(slot + 1, Ordering::Relaxed);
            }
        }
        // Pins of entries dropped above.
        let mut pins_used = 0;
        for i in 0..lay.pin_slots as u32 {
            let p = pool.pin_slot(i);
            if p.pid.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let e = pool.entry(p.slot.load(Ordering::Relaxed));
            if matches!(e.state.load(Ordering::Relaxed), READY | RETIRED | LEASED)
                && e.stamp.load(Ordering::Relaxed) == p.stamp.load(Ordering::Relaxed)
            {
                pins_used += 1;
            } else {
                p.pid.store(0, Ordering::Relaxed);
                p.count.store(0, Ordering::Relaxed);
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
        h.pins_used.store(pins_used, Ordering::Relaxed);
        h.index_gen.store((g | 1) + 1, Ordering::Release);
    }

    pub(super) fn check(&mut self) -> Result<(), String> {
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
        let (mut ready, mut nonfree, mut sum, mut owned) = (0u64, 0u64, 0u64, 0u64);
        let mut blocks = Vec::new();
        for slot in 0..lay.max_entries as u32 {
            let e = pool.entry(slot);
            let state = e.state.load(Ordering::Relaxed);
            if state == FREE {
                continue;
            }
            nonfree += 1;
            if e.owner.load(Ordering::Relaxed) != 0 {
                owned += 1;
            }
            let x = Extent {
                offset: e.offset.load(Ordering::Relaxed),
                len: e.alloc_len.load(Ordering::Relaxed),
            };
            sum += x.len;
            blocks.push(x);
            if state == READY {
                ready += 1;
                if self.find(&Key::of(e)) != Some(slot) {
                    return Err(format!(
                        "READY entry {slot} is not reachable through its chain"
                    ));
                }
            }
            if state == RETIRED && e.pins.load(Ordering::Relaxed) == 0 {
                return Err(format!("RETIRED entry {slot} has no pins"));
            }
            if state == LEASED
                && e.pins.load(Ordering::Relaxed) == 0
                && e.owner.load(Ordering::Relaxed) == 0
            {
                return Err(format!("LEASED entry {slot} has no references"));
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
        if owned != h.pending.load(Ordering::Relaxed) {
            return Err(format!(
                "{owned} owned entries, header says {} pending",
                h.pending.load(Ordering::Relaxed)
            ));
        }
        if nonfree + h.free_slots.load(Ordering::Relaxed) != lay.max_entries {
            return Err("free-slot stack out of step with the entries".into());
        }
        // Pins: the per-entry counts match the table.
        let mut counts = vec![0u32; lay.max_entries as usize];
        let mut used_pins = 0u64;
        for i in 0..lay.pin_slots as u32 {
            let p = pool.pin_slot(i);
            if p.pid.load(Ordering::Relaxed) == 0 {
                continue;
            }
            used_pins += 1;
            if p.count.load(Ordering::Relaxed) == 0 {
                return Err(format!("pin slot {i} is held with a zero count"));
            }
            let slot = p.slot.load(Ordering::Relaxed);
            if u64::from(slot) >= lay.max_entries {
                return Err(format!("pin slot {i} names entry {slot}, out of range"));
            }
            let e = pool.entry(slot);
            if matches!(e.state.load(Ordering::Relaxed), READY | RETIRED | LEASED)
                && e.stamp.load(Ordering::Relaxed) == p.stamp.load(Ordering::Relaxed)
            {
                counts[slot as usize] += 1;
            }
        }
        if used_pins != h.pins_used.load(Ordering::Relaxed) {
            return Err(format!(
                "{used_pins} pin slots held, header says {}",
                h.pins_used.load(Ordering::Relaxed)
            ));
        }
        for slot in 0..lay.max_entries as u32 {
            let have = pool.entry(slot).pins.load(Ordering::Relaxed);
            if have != counts[slot as usize] {
                return Err(format!(
                    "entry {slot} counts {have} pins, the pin table {}",
                    counts[slot as usize]
                ));
            }
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
