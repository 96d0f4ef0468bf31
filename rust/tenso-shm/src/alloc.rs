//! The free-space table of a pool's data region: an address-sorted array of free extents.
//!
//! The table is an array, not a list threaded through the free blocks, so it cannot form a cycle, and every
//! operation checks offsets against the region before it changes anything: a bogus `free` (out of bounds, or
//! overlapping free space) is refused instead of corrupting the table. The table is derived data: after a crash
//! inside the lock the pool rebuilds it from the entry index ([`FreeTable::rebuild`]).
//!
//! ```text
//! free table area:  count: u64 | Extent[0] | Extent[1] | ...      (Extent = offset: u64, len: u64; 16 bytes)
//! invariants:       extents sorted by offset, len > 0, offset + len <= region,
//!                   no two overlap or touch (touching extents are merged)
//! ```

/// A run of bytes of the data region: `[offset, offset + len)`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extent {
    /// Start, relative to the data region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Why a [`FreeTable::free`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeError {
    /// The extent is empty or runs past the region.
    OutOfBounds,
    /// Part of the extent is already free.
    Overlap,
    /// The table has no room for another extent (cannot happen with a capacity of entries + 1).
    TableFull,
}

/// The free table over borrowed storage (a slice of the shared segment, held under the pool lock, or a `Vec` in
/// tests).
#[derive(Debug)]
pub struct FreeTable<'a> {
    slots: &'a mut [Extent],
    count: &'a mut u64,
    region: u64,
}

impl<'a> FreeTable<'a> {
    /// Wraps storage whose first `count` slots hold a table for a region of `region` bytes. A count larger than
    /// the storage is clamped (the table is then checked by [`Self::check`] before it is trusted).
    pub fn new(slots: &'a mut [Extent], count: &'a mut u64, region: u64) -> Self {
        if *count > slots.len() as u64 {
            *count = slots.len() as u64;
        }
        FreeTable {
            slots,
            count,
            region,
        }
    }

    /// Resets to one extent covering the whole region.
    pub fn reset(&mut self) {
        self.rebuild(std::iter::empty());
    }

    /// The live extents.
    pub fn extents(&self) -> &[Extent] {
        &self.slots[..*self.count as usize]
    }

    /// Number of free extents.
    pub fn len(&self) -> usize {
        *self.count as usize
    }

    /// True when no byte is free.
    pub fn is_empty(&self) -> bool {
        *self.count == 0
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.extents().iter().map(|e| e.len).sum()
    }

    /// The largest free extent's length.
    pub fn largest(&self) -> u64 {
        self.extents().iter().map(|e| e.len).max().unwrap_or(0)
    }

    /// Takes `len` bytes (first fit, lowest address) and returns their offset.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let n = self.len();
        let i = self.slots[..n].iter().position(|e| e.len >= len)?;
        let offset = self.slots[i].offset;
        if self.slots[i].len == len {
            self.slots.copy_within(i + 1..n, i);
            *self.count -= 1;
        } else {
            self.slots[i].offset += len;
            self.slots[i].len -= len;
        }
        Some(offset)
    }

    /// Returns `[offset, offset + len)` to the table, merging it with its neighbours.
    pub fn free(&mut self, offset: u64, len: u64) -> Result<(), FreeError> {
        let end = offset.checked_add(len).ok_or(FreeError::OutOfBounds)?;
        if len == 0 || end > self.region {
            return Err(FreeError::OutOfBounds);
        }
        let n = self.len();
        // First extent that starts after `offset`.
        let p = self.slots[..n].partition_point(|e| e.offset <= offset);
        let merge_prev = p > 0 && {
            let prev = self.slots[p - 1];
            if prev.end() > offset {
                return Err(FreeError::Overlap);
            }
            prev.end() == offset
        };
        let merge_next = p < n && {
            let next = self.slots[p];
            if end > next.offset {
                return Err(FreeError::Overlap);
            }
            end == next.offset
        };
        match (merge_prev, merge_next) {
            (true, true) => {
                self.slots[p - 1].len += len + self.slots[p].len;
                self.slots.copy_within(p + 1..n, p);
                *self.count -= 1;
            }
            (true, false) => self.slots[p - 1].len += len,
            (false, true) => {
                self.slots[p].offset = offset;
                self.slots[p].len += len;
            }
            (false, false) => {
                if n == self.slots.len() {
                    return Err(FreeError::TableFull);
                }
                self.slots.copy_within(p..n, p + 1);
                self.slots[p] = Extent { offset, len };
                *self.count += 1;
            }
        }
        Ok(())
    }

    /// Rebuilds the table as the gaps between `used` extents, which must be sorted by offset, in bounds and
    /// disjoint (the pool filters them so before calling).
    pub fn rebuild(&mut self, used: impl IntoIterator<Item = Extent>) {
        let mut n = 0usize;
        let mut pos = 0u64;
        let mut push = |slots: &mut [Extent], from: u64, to: u64| {
            if to > from && n < slots.len() {
                slots[n] = Extent {
                    offset: from,
                    len: to - from,
                };
                n += 1;
            }
        };
        for e in used {
            push(self.slots, pos, e.offset);
            pos = pos.max(e.end());
        }
        push(self.slots, pos, self.region);
        *self.count = n as u64;
    }

    /// Checks every invariant of the module docs.
    pub fn check(&self) -> Result<(), &'static str> {
        let mut prev_end: Option<u64> = None;
        for e in self.extents() {
            if e.len == 0 {
                return Err("empty extent");
            }
            let end = e.offset.checked_add(e.len).ok_or("extent overflows")?;
            if end > self.region {
                return Err("extent past the region");
            }
            if let Some(p) = prev_end {
                if e.offset < p {
                    return Err("extents unsorted or overlapping");
                }
                if e.offset == p {
                    return Err("touching extents not merged");
                }
            }
            prev_end = Some(end);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(cap: usize, region: u64) -> (Vec<Extent>, u64, u64) {
        (vec![Extent::default(); cap], 0, region)
    }

    #[test]
    fn alloc_free_merge() {
        let (mut s, mut c, r) = table(8, 1024);
        let mut t = FreeTable::new(&mut s, &mut c, r);
        t.reset();
        let a = t.alloc(64).unwrap();
        let b = t.alloc(128).unwrap();
        let d = t.alloc(64).unwrap();
        assert_eq!((a, b, d), (0, 64, 192));
        t.free(b, 128).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.free(b, 64), Err(FreeError::Overlap));
        assert_eq!(t.free(1000, 64), Err(FreeError::OutOfBounds));
        t.free(a, 64).unwrap();
        t.free(d, 64).unwrap();
        assert_eq!(
            t.extents(),
            &[Extent {
                offset: 0,
                len: 1024
            }]
        );
        t.check().unwrap();
        assert_eq!(t.alloc(2048), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u64),
        Delete(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // 1 KiB .. 4 MiB, as the stress test uses, in 64-byte units.
            (16u64..=65536).prop_map(|units| Op::Put(units * 64)),
            any::<usize>().prop_map(Op::Delete),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 3 } else { 256 }))]
        /// Random put/delete keeps the table sorted, merged, within bounds, disjoint from live blocks, and
        /// free + used equal to the region.
        #[test]
        fn random_put_delete(ops in proptest::collection::vec(op(), 1..400), region_mib in 4u64..64) {
            let region = region_mib << 20;
            let max_entries = 64usize;
            let (mut s, mut c, _) = table(max_entries + 1, region);
            let mut t = FreeTable::new(&mut s, &mut c, region);
            t.reset();
            let mut live: Vec<Extent> = Vec::new();
            for op in ops {
                match op {
                    Op::Put(len) => {
                        if live.len() == max_entries {
                            continue;
                        }
                        if let Some(off) = t.alloc(len) {
                            let e = Extent { offset: off, len };
                            prop_assert!(e.end() <= region);
                            prop_assert!(live.iter().all(|l| l.end() <= e.offset || e.end() <= l.offset));
                            live.push(e);
                        } else {
                            prop_assert!(t.largest() < len);
                        }
                    }
                    Op::Delete(i) => {
                        if live.is_empty() {
                            continue;
                        }
                        let e = live.swap_remove(i % live.len());
                        prop_assert_eq!(t.free(e.offset, e.len), Ok(()));
                        prop_assert_eq!(t.free(e.offset, e.len), Err(FreeError::Overlap));
                    }
                }
                prop_assert_eq!(t.check(), Ok(()));
                prop_assert!(t.len() <= live.len() + 1);
                let used: u64 = live.iter().map(|e| e.len).sum();
                prop_assert_eq!(t.free_bytes() + used, region);
                for f in t.extents() {
                    prop_assert!(live.iter().all(|l| l.end() <= f.offset || f.end() <= l.offset));
                }
            }
            // Rebuilding from the live set gives the same table.
            let before: Vec<Extent> = t.extents().to_vec();
            live.sort_by_key(|e| e.offset);
            t.rebuild(live.iter().copied());
            prop_assert_eq!(t.extents(), &before[..]);
        }
    }
}
