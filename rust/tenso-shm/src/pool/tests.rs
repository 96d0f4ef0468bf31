//! Tests of the pool: behaviour, crash recovery, threads, and pins.

use std::sync::atomic::Ordering;

use super::layout::{entries_for, pin_slots_for, Layout};
use super::*;
use crate::error::ShmError;
use crate::lock::current_pid;
use crate::segment::Segment;

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
        let entries = entries_for(size, None);
        let layout = Layout::new(size, entries, pin_slots_for(entries)).unwrap();
        return Tmp(Pool::init(Segment::anonymous(size as usize), layout));
    }
    Tmp(Pool::create(&name(tag), size, None, 0o600).unwrap())
}

/// A pool with a chosen pin-table capacity.
fn tmp_pool_with_pins(tag: &str, size: u64, pin_slots: u64) -> Tmp {
    let entries = entries_for(size, None);
    let layout = Layout::new(size, entries, pin_slots).unwrap();
    let seg = if cfg!(miri) {
        Segment::anonymous(size as usize)
    } else {
        Segment::create(&name(tag), size, 0o600, false).unwrap()
    };
    Tmp(Pool::init(seg, layout))
}

struct Tmp(Pool);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = self.0.segment().unlink();
    }
}

fn put(pool: &Pool, key: &str, bytes: &[u8]) {
    let r = pool.reserve(key.as_bytes(), bytes.len() as u64, 0).unwrap();
    r.copy_from_slice(bytes);
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
    // Miri runs on the real clock (isolation off) about a thousand times slower: give it a TTL it can beat.
    let ttl_ms = if cfg!(miri) { 3000 } else { 20 };
    let r = p.0.reserve(b"t", 8, ttl_ms * 1_000_000).unwrap();
    r.commit().unwrap();
    assert!(get(&p.0, "t").is_some());
    std::thread::sleep(std::time::Duration::from_millis(ttl_ms + 10));
    assert_eq!(get(&p.0, "t"), None);
    assert!(p.0.keys().is_empty());
    assert_eq!(p.0.stats().entries, 0);
    p.0.check().unwrap();
}

#[test]
fn leases() {
    let p = tmp_pool("lease", 1 << 20);
    let lease = p.0.lease(1000).unwrap();
    assert_eq!(lease.range().start % 64, 0);
    let handle = lease.into_handle();
    assert_eq!(p.0.stats().used_bytes, 1024);
    assert_eq!(p.0.references(&handle), 1);
    // Another handle on the same pool, as another process would open it (Miri cannot open by name).
    let other = (!cfg!(miri)).then(|| Pool::open(p.0.name()).unwrap());
    let adopted = other.as_ref().unwrap_or(&p.0).adopt(handle).unwrap();
    // Only the holder may free it: after an adoption by another process, the lender's release is refused.
    p.0.pin_slot(handle.reference)
        .pid
        .store(current_pid() + 1, Ordering::Relaxed);
    assert!(matches!(
        p.0.release(handle),
        Err(ShmError::LeaseHeldElsewhere)
    ));
    p.0.pin_slot(handle.reference)
        .pid
        .store(current_pid(), Ordering::Relaxed);
    drop(adopted);
    assert_eq!(p.0.stats().used_bytes, 0);
    assert!(matches!(p.0.release(handle), Err(ShmError::BadLease)));
    assert_eq!(p.0.references(&handle), 0);
    p.0.check().unwrap();
}

#[test]
fn a_shared_lease_lives_until_its_last_reference() {
    let p = tmp_pool("lease-share", 1 << 20);
    let first = p.0.lease(100).unwrap().into_handle();
    // Handed on twice by reference: three references to one block, one copy of the bytes.
    let second = p.0.share(first).unwrap();
    let third = p.0.share(second).unwrap();
    assert_eq!(p.0.references(&first), 3);
    assert_ne!(first.reference, second.reference);
    assert_ne!(second.tag, third.tag);
    assert_eq!(p.0.lease_range(&first), p.0.lease_range(&third));
    assert_eq!(p.0.stats().used_bytes, 128);
    assert_eq!(
        p.0.stats().pinned,
        0,
        "references to leases are not pinned entries"
    );
    p.0.check().unwrap();
    // The first holder lets go (or gives up on a hand-off): the block stays for the others.
    p.0.release(first).unwrap();
    assert!(matches!(p.0.release(first), Err(ShmError::BadLease)));
    assert!(matches!(p.0.share(first), Err(ShmError::BadLease)));
    assert_eq!(p.0.references(&second), 2);
    let adopted = p.0.adopt(third).unwrap();
    assert_eq!(p.0.stats().used_bytes, 128);
    drop(adopted);
    assert_eq!(p.0.stats().used_bytes, 128);
    p.0.check().unwrap();
    // The last reference frees it.
    p.0.release(second).unwrap();
    assert_eq!(p.0.stats().used_bytes, 0);
    assert_eq!(p.0.references(&second), 0);
    p.0.check().unwrap();
}

#[test]
fn a_reference_is_taken_over_once() {
    let p = tmp_pool("lease-once", 1 << 20);
    let held = p.0.lease(64).unwrap().into_handle();
    let sent = p.0.share(held).unwrap();
    // A reused pin slot with another tag is not the reference the handle named.
    let forged = LeaseHandle {
        tag: sent.tag + 1000,
        ..sent
    };
    assert!(matches!(p.0.adopt(forged), Err(ShmError::BadLease)));
    let other_block = LeaseHandle {
        stamp: sent.stamp + 1,
        ..sent
    };
    assert!(matches!(p.0.adopt(other_block), Err(ShmError::BadLease)));
    // Only a holder can share: a reference held by another process does not entitle this one.
    p.0.pin_slot(sent.reference)
        .pid
        .store(current_pid() + 1, Ordering::Relaxed);
    assert!(matches!(p.0.share(sent), Err(ShmError::LeaseHeldElsewhere)));
    let adopted = p.0.adopt(sent).unwrap().into_handle();
    p.0.release(adopted).unwrap();
    p.0.release(held).unwrap();
    assert_eq!(p.0.stats().used_bytes, 0);
    p.0.check().unwrap();
}

#[test]
fn a_full_reference_table_refuses_a_lease_cleanly() {
    let p = tmp_pool_with_pins("lease-full", 1 << 20, MIN_PIN_SLOTS);
    let first = p.0.lease(64).unwrap().into_handle();
    let mut refs = vec![first];
    while refs.len() < MIN_PIN_SLOTS as usize {
        refs.push(p.0.share(first).unwrap());
    }
    assert!(matches!(p.0.share(first), Err(ShmError::NoReferenceSlot)));
    assert!(matches!(p.0.lease(64), Err(ShmError::NoReferenceSlot)));
    assert_eq!(
        p.0.stats().used_bytes,
        64,
        "the refused lease's block went back"
    );
    for r in refs {
        p.0.release(r).unwrap();
    }
    assert_eq!(p.0.stats().used_bytes, 0);
    p.0.check().unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "spawns a process")]
fn dead_holders_references_are_swept() {
    let p = tmp_pool("lease-dead", 1 << 20);
    let dead = dead_pid();
    // Block A: held by a live holder and by a dead one. Block B: held by dead processes only.
    let a = p.0.lease(4096).unwrap().into_handle();
    let a_dead = p.0.share(a).unwrap();
    let b = p.0.lease(4096).unwrap().into_handle();
    let b_dead = p.0.share(b).unwrap();
    for h in [a_dead, b, b_dead] {
        p.0.pin_slot(h.reference).pid.store(dead, Ordering::Relaxed);
    }
    assert_eq!(p.0.references(&b), 2, "nothing swept yet");
    // Sweeps clear dead holders' references with dead pins: before an eviction, in recovery, and in `stats`.
    let _ = p.0.stats();
    assert_eq!(p.0.references(&b), 0, "only dead processes held B: freed");
    assert_eq!(p.0.references(&a), 1, "A keeps its live holder");
    assert_eq!(p.0.stats().used_bytes, 4096);
    p.0.check().unwrap();
    p.0.release(a).unwrap();
    assert_eq!(p.0.stats().used_bytes, 0);
    p.0.check().unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "spawns a process")]
fn recovery_keeps_leases_with_live_references_only() {
    let p = tmp_pool("lease-recover", 1 << 20);
    let dead = dead_pid();
    let live = p.0.lease(4096).unwrap().into_handle();
    let gone = p.0.lease(4096).unwrap().into_handle();
    p.0.pin_slot(gone.reference)
        .pid
        .store(dead, Ordering::Relaxed);
    {
        let mut l = p.0.lock();
        l.recover();
    }
    p.0.check().unwrap();
    assert_eq!(p.0.references(&live), 1);
    assert_eq!(p.0.references(&gone), 0);
    assert_eq!(p.0.stats().used_bytes, 4096);
    p.0.release(live).unwrap();
    assert_eq!(p.0.stats().used_bytes, 0);
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
            p.0.entry(slot).owner.store(dead, Ordering::Relaxed);
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
    p.0.entry(slot).owner.store(dead, Ordering::Relaxed);
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

/// A pid that exists no more.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// Pins `key`: its bytes (read under the pin, or copied if the table is full), its range in the mapping, the pin.
fn pin(pool: &Pool, key: &str) -> (Vec<u8>, std::ops::Range<usize>, Option<Pin>) {
    pool.read_pinned(key.as_bytes(), &Spin, |packet, pin| {
        let mut v = vec![0u8; packet.len()];
        packet.copy_to(&mut v);
        (v, packet.range(), pin)
    })
    .unwrap()
    .expect("the key is in the pool")
}

/// What a zero-copy view of `range` shows now.
fn live(pool: &Pool, range: std::ops::Range<usize>) -> Vec<u8> {
    assert!(range.end <= pool.segment().len());
    // SAFETY: the range lies inside the mapping (checked above), which `pool` keeps mapped; nobody writes it during
    // these single-threaded tests.
    unsafe {
        std::slice::from_raw_parts(pool.segment().as_ptr().add(range.start), range.len()).to_vec()
    }
}

/// Fills a pool of four blocks with k0..k3 (k{i} = [i; block]) and returns the block size.
fn four_blocks(pool: &Pool) -> usize {
    let block = (pool.data_size() / 4 / 64 * 64) as usize;
    for i in 0..4u8 {
        put(pool, &format!("k{i}"), &vec![i; block]);
    }
    block
}

#[test]
fn pinned_entry_is_never_evicted() {
    let p = tmp_pool("pin-evict", 1 << 20);
    let pool = &p.0;
    let block = four_blocks(pool);
    let (bytes, range, pin) = pin(pool, "k0");
    let pin = pin.expect("the pin table has room");
    assert_eq!(bytes, vec![0u8; block]);
    for i in 4..12u8 {
        put(pool, &format!("k{i}"), &vec![i; block]);
        assert_eq!(
            live(pool, range.clone()),
            vec![0u8; block],
            "a pinned view changed"
        );
    }
    let s = pool.stats();
    assert_eq!((s.pinned, s.evictions), (1, 8));
    assert_eq!(get(pool, "k0").unwrap(), vec![0u8; block]);
    pool.check().unwrap();
    pool.unpin(pin);
    assert_eq!(pool.stats().pinned, 0);
    for i in 12..16u8 {
        put(pool, &format!("k{i}"), &vec![i; block]);
    }
    assert_eq!(
        get(pool, "k0"),
        None,
        "unpinned, the entry is evictable again"
    );
    pool.check().unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "spawns a process")]
fn dead_pids_pin_is_cleared_and_its_entry_evicted() {
    let p = tmp_pool("pin-dead", 1 << 20);
    let pool = &p.0;
    let block = four_blocks(pool);
    let (_, _, pin) = pin(pool, "k0");
    let pin = pin.unwrap();
    // Hand the pin to a process that has died.
    let dead = dead_pid();
    for i in 0..pool.pin_slots() as u32 {
        let slot = pool.pin_slot(i);
        if slot.pid.load(Ordering::Relaxed) == crate::lock::current_pid() {
            slot.pid.store(dead, Ordering::Relaxed);
        }
    }
    for i in 4..8u8 {
        put(pool, &format!("k{i}"), &vec![i; block]);
    }
    assert_eq!(
        get(pool, "k0"),
        None,
        "a dead process's pin protects nothing"
    );
    let s = pool.stats();
    assert_eq!((s.pinned, s.evictions), (0, 4));
    pool.unpin(pin); // its slot was cleared: nothing happens
    pool.check().unwrap();
}

#[test]
fn unpin_on_drop() {
    let p = tmp_pool("pin-drop", 1 << 20);
    let pool = &p.0;
    put(pool, "a", b"alpha");
    let first = Pinned::new(pool, pin(pool, "a").2.unwrap());
    let second = Pinned::new(pool, pin(pool, "a").2.unwrap());
    // Two views of one entry share a pin slot.
    assert_eq!(pool.header().pins_used.load(Ordering::Relaxed), 1);
    assert_eq!(pool.stats().pinned, 1);
    drop(first);
    assert_eq!(pool.stats().pinned, 1);
    drop(second);
    assert_eq!(pool.stats().pinned, 0);
    assert_eq!(pool.header().pins_used.load(Ordering::Relaxed), 0);
    pool.check().unwrap();
}

#[test]
fn full_pin_table_falls_back_to_a_copy() {
    let p = tmp_pool_with_pins("pin-full", 1 << 20, 2);
    let pool = &p.0;
    for k in ["a", "b", "c"] {
        put(pool, k, k.repeat(100).as_bytes());
    }
    let a = pin(pool, "a").2.unwrap();
    let b = pin(pool, "b").2.unwrap();
    let (bytes, _, none) = pin(pool, "c");
    assert_eq!(none, None, "the table is full");
    assert_eq!(
        bytes,
        "c".repeat(100).as_bytes(),
        "the fallback copy is whole"
    );
    // Another view of a pinned entry still fits (it shares the slot).
    let a2 = pin(pool, "a").2.unwrap();
    assert_eq!(pool.stats().pinned, 2);
    pool.unpin(a);
    pool.unpin(a2);
    let c = pin(pool, "c").2.expect("a slot is free again");
    pool.unpin(b);
    pool.unpin(c);
    assert_eq!(pool.stats().pinned, 0);
    pool.check().unwrap();
}

#[test]
fn pinned_entry_outlives_replace_and_delete() {
    let p = tmp_pool("pin-retire", 1 << 20);
    let pool = &p.0;
    put(pool, "a", &[1u8; 1000]);
    let (_, range, pin) = pin(pool, "a");
    let pin = pin.unwrap();
    // Same block size, but pinned: not written in place.
    let r = pool.reserve(b"a", 1000, 0).unwrap();
    assert!(!r.in_place());
    r.copy_from_slice(&[2u8; 1000]);
    r.commit().unwrap();
    assert_eq!(get(pool, "a").unwrap(), vec![2u8; 1000]);
    assert_eq!(live(pool, range.clone()), vec![1u8; 1000]);
    assert!(pool.delete(b"a").unwrap());
    pool.clear();
    let s = pool.stats();
    assert_eq!(
        (s.entries, s.pinned, s.used_bytes),
        (0, 1, 1024),
        "the retired block stays"
    );
    assert!(pool.keys().is_empty());
    pool.check().unwrap();
    // Its block is not reused while pinned.
    put(pool, "b", &[3u8; 1000]);
    assert_eq!(live(pool, range), vec![1u8; 1000]);
    pool.unpin(pin);
    let s = pool.stats();
    assert_eq!((s.entries, s.pinned, s.used_bytes), (1, 0, 1024));
    pool.check().unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "spawns a process")]
fn recovery_keeps_live_pins_and_drops_dead_ones() {
    let p = tmp_pool("pin-recover", 1 << 20);
    let pool = &p.0;
    put(pool, "a", &[1u8; 1000]);
    put(pool, "b", &[2u8; 1000]);
    let (_, range, pin_a) = pin(pool, "a");
    let pin_a = pin_a.unwrap();
    let _ = pin(pool, "b").2.unwrap();
    // b's pin passes to a process that has died.
    let b_slot = pool.lookup(b"b").unwrap().unwrap().slot;
    let dead = dead_pid();
    for i in 0..pool.pin_slots() as u32 {
        let slot = pool.pin_slot(i);
        if slot.slot.load(Ordering::Relaxed) == b_slot {
            slot.pid.store(dead, Ordering::Relaxed);
        }
    }
    // A pinned entry deleted (retired), then a lock holder that dies and leaves the counters garbage.
    assert!(pool.delete(b"a").unwrap());
    {
        let mut l = pool.lock();
        l.table().reset();
        l.h().used_bytes.store(12345, Ordering::Relaxed);
        l.h().pins_used.store(77, Ordering::Relaxed);
        let token = l.token;
        std::mem::forget(l);
        pool.header().lock.store(
            (u64::from(dead) << 32) | (token & 0xffff_ffff),
            Ordering::Relaxed,
        );
    }
    put(pool, "c", &[3u8; 1000]); // takes the lock over and recovers
    pool.check().unwrap();
    let s = pool.stats();
    assert_eq!(s.recoveries, 1);
    assert_eq!(
        (s.entries, s.pinned),
        (2, 1),
        "b's dead pin is gone, a's live one kept"
    );
    assert_eq!(live(pool, range), vec![1u8; 1000]);
    pool.unpin(pin_a);
    let s = pool.stats();
    assert_eq!((s.entries, s.pinned, s.used_bytes), (2, 0, 2048));
    pool.check().unwrap();
}

#[test]
fn read_pinned_many_pins_a_batch_under_one_owner() {
    let p = tmp_pool("pin-many", 1 << 20);
    let pool = &p.0;
    put(pool, "a", b"alpha");
    put(pool, "b", b"bravo");
    let before = pool.stats();
    let keys: [&[u8]; 4] = [b"a", b"nope", b"b", b"a"];
    let batch = pool.read_pinned_many(&keys, &Spin).unwrap();
    let mut pins = Vec::new();
    let mut seen = Vec::new();
    for got in &batch {
        match got {
            Batched::Pinned(packet, pin) => {
                let mut v = vec![0u8; packet.len()];
                packet.copy_to(&mut v);
                seen.push(Some(v));
                pins.push(*pin);
            }
            Batched::Missing => seen.push(None),
            Batched::Retry => panic!("nothing changed and the table has room"),
        }
    }
    assert_eq!(
        seen,
        [
            Some(b"alpha".to_vec()),
            None,
            Some(b"bravo".to_vec()),
            Some(b"alpha".to_vec())
        ]
    );
    // The second pin of "a" shares the first one's slot.
    assert_eq!(pool.header().pins_used.load(Ordering::Relaxed), 2);
    let s = pool.stats();
    assert_eq!(s.pinned, 2);
    assert_eq!((s.hits - before.hits, s.misses - before.misses), (3, 1));
    pool.check().unwrap();
    let owner = Pinned::many(pool, pins);
    assert_eq!(owner.pins().len(), 3);
    // A pinned entry is not rewritten in place, and is kept (retired) when deleted.
    put(pool, "a", b"ALPHA");
    assert!(pool.delete(b"b").unwrap());
    assert_eq!(pool.stats().pinned, 2);
    drop(owner);
    assert_eq!(pool.stats().pinned, 0);
    assert_eq!(pool.header().pins_used.load(Ordering::Relaxed), 0);
    assert_eq!(get(pool, "a").unwrap(), b"ALPHA");
    pool.check().unwrap();
}

#[test]
fn read_pinned_many_leaves_what_it_cannot_pin_to_read_pinned() {
    let p = tmp_pool_with_pins("pin-many-full", 1 << 20, 2);
    let pool = &p.0;
    for k in ["a", "b", "c"] {
        put(pool, k, k.repeat(100).as_bytes());
    }
    let keys: [&[u8]; 3] = [b"a", b"b", b"c"];
    let batch = pool.read_pinned_many(&keys, &Spin).unwrap();
    assert!(matches!(batch[2], Batched::Retry), "the table is full");
    let pins: Vec<Pin> = batch
        .iter()
        .filter_map(|got| match got {
            Batched::Pinned(_, pin) => Some(*pin),
            _ => None,
        })
        .collect();
    assert_eq!(pins.len(), 2);
    let (bytes, _, none) = pin(pool, "c");
    assert_eq!((bytes, none), ("c".repeat(100).into_bytes(), None));
    pool.unpin_many(&pins);
    assert_eq!(pool.stats().pinned, 0);
    pool.check().unwrap();
}

#[test]
fn current_pid_is_cached_and_right() {
    let pid = crate::lock::current_pid();
    assert_eq!(pid, std::process::id());
    crate::lock::forget_pid();
    assert_eq!(crate::lock::current_pid(), std::process::id());
}
