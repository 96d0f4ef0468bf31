//! A bounded cache of recently freed large buffers, so that a packet-sized allocation reuses pages that are already
//! faulted in instead of paying a page fault per 4 KiB (glibc maps every block over 32 MiB fresh and unmaps it at
//! free: 16,384 faults for each 64 MiB packet).
//!
//! Every fresh buffer the codec hands out comes from [`crate::buffers::alloc_aligned`]; from [`MIN_BLOCK`] bytes up,
//! that asks [`lease`] for a block of the request's size class. The block lives in a [`CachedBuffer`], which becomes
//! the `base` of the NumPy views over it; when NumPy frees the last view, the owner's `Drop` gives the block back.
//!
//! ```text
//! size class   the request rounded up to a multiple of a quarter of its power of two (at most 25% over, never
//!              touched past the request, so the slack is address space, not memory)
//! cap          at most `max_bytes` retained (TENSO_BUFFER_CACHE_BYTES, default 512 MiB; 0 turns the cache off);
//!              giving a block back past the cap unmaps the oldest retained blocks first
//! idle trim    when no block was leased or given back for `idle` (TENSO_BUFFER_CACHE_IDLE_S, default 2 s), every
//!              retained block is unmapped; a thread that sleeps on a condition variable does it (it wakes once
//!              per idle period while blocks are retained, and waits without a timeout while none are)
//! ```
//!
//! Fork: a child of `fork(2)` has only the forking thread, so a lock that another thread (the trimmer, or a thread
//! leasing or giving back a block) held at that instant would stay locked in the child forever, and its first large
//! allocation would hang. The cache therefore registers `fork` handlers (through `tenso_shm::lock::register_at_fork`,
//! the mechanism that also resets the shm crate's pid cache): the forking thread takes the cache lock just before
//! the fork (no holder waits on anything while holding it, so this only waits out a short critical section) and
//! releases it just after, in the parent and in the child; the child also forgets the parent's trimmer thread, so
//! its first give-back starts its own. The child keeps the retained blocks (its copies of the parent's pages).
//!
//! Blocks are anonymous private mappings (page-aligned, so 64-byte alignment holds), advised for transparent huge pages
//! from 4 MiB as NumPy's allocator does. `tenso.config.set_buffer_cache` and `buffer_cache_stats` reach the settings
//! and counters through `_buffer_cache_configure` / `_buffer_cache_stats` / `_buffer_cache_clear`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use rustix::mm::{self, Advice, MapFlags, ProtFlags};

/// Smallest request served by the cache: below it, the allocator's own free lists already reuse memory.
pub(crate) const MIN_BLOCK: usize = 256 << 10;
/// Default cap on retained bytes.
const DEFAULT_MAX_BYTES: usize = 512 << 20;
/// Default idle period before retained blocks are released.
const DEFAULT_IDLE: Duration = Duration::from_secs(2);
/// Blocks from this size up are advised for transparent huge pages.
const HUGEPAGE_FROM: usize = 4 << 20;
const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;

/// The size class of a request of `n` >= [`MIN_BLOCK`] bytes: `n` rounded up to a multiple of a quarter of its
/// largest power of two (and of the page size). None when that overflows.
fn size_class(n: usize) -> Option<usize> {
    let shift = usize::BITS - 1 - n.leading_zeros();
    let step = (1usize << shift.saturating_sub(2)).max(PAGE);
    n.checked_next_multiple_of(step)
}

/// One anonymous mapping of `len` bytes; unmapped on drop.
#[derive(Debug)]
struct Block {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Block is the only handle to its private mapping; moving it to another thread moves that ownership.
unsafe impl Send for Block {}
// SAFETY: a shared &Block only exposes the address and length, never the bytes.
unsafe impl Sync for Block {}

impl Block {
    /// Maps `len` bytes for a first request of `used` bytes. Huge pages are advised over whole 2 MiB units of `used`
    /// only: a huge page under the request's last bytes would fault in up to 2 MiB that nothing uses.
    fn map(len: usize, used: usize) -> Option<Block> {
        // SAFETY: a fresh anonymous private mapping at an address the kernel chooses; nothing else refers to it.
        let raw = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .ok()?;
        let huge = used.min(len) / HUGE_PAGE * HUGE_PAGE;
        if huge >= HUGEPAGE_FROM {
            // SAFETY: advice over the start of the mapping we just created; it changes no contents. A kernel without
            // THP refuses it, which changes nothing either.
            let _ = unsafe { mm::madvise(raw, huge, Advice::LinuxHugepage) };
        }
        NonNull::new(raw.cast::<u8>()).map(|ptr| Block { ptr, len })
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `Block::map`, which only this Block owns; no view
        // over it is alive (views keep their CachedBuffer, and so this Block, alive).
        let _ = unsafe { mm::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) };
    }
}

#[derive(Debug)]
struct State {
    /// Retained blocks, oldest first.
    free: VecDeque<Block>,
    retained: usize,
    max_bytes: usize,
    idle: Duration,
    last_use: Instant,
    hits: u64,
    misses: u64,
    idle_trims: u64,
    /// The process whose trimmer thread runs (0: none yet). A child forked from it has no such thread: the first
    /// give-back in the child starts its own.
    trimmer_pid: u32,
    /// The trimmer waits without a timeout (nothing was retained): a give-back must wake it. Otherwise it is
    /// already waiting for an idle deadline, and waking it on every give-back would cost a context switch per packet.
    trimmer_parked: bool,
}

#[derive(Debug)]
struct Cache {
    state: Mutex<State>,
    wake: Condvar,
}

fn env_setting<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.trim().parse().ok()
}

static CACHE: OnceLock<Cache> = OnceLock::new();

fn cache() -> &'static Cache {
    CACHE.get_or_init(|| {
        // Once per process (a child inherits the registration); the handlers only act once the cache exists.
        let registered = tenso_shm::lock::register_at_fork(
            Some(before_fork),
            Some(after_fork_in_parent),
            Some(after_fork_in_child),
        );
        debug_assert!(registered, "pthread_atfork failed");
        let max_bytes =
            env_setting::<usize>("TENSO_BUFFER_CACHE_BYTES").unwrap_or(DEFAULT_MAX_BYTES);
        let idle = env_setting::<f64>("TENSO_BUFFER_CACHE_IDLE_S")
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(DEFAULT_IDLE, Duration::from_secs_f64);
        Cache {
            state: Mutex::new(State {
                free: VecDeque::new(),
                retained: 0,
                max_bytes,
                idle,
                last_use: Instant::now(),
                hits: 0,
                misses: 0,
                idle_trims: 0,
                trimmer_pid: 0,
                trimmer_parked: false,
            }),
            wake: Condvar::new(),
        }
    })
}

impl State {
    /// Moves the oldest retained blocks into `evicted` (to be unmapped outside the lock) until at most `limit`
    /// bytes stay retained.
    fn evict_down_to(&mut self, limit: usize, evicted: &mut Vec<Block>) {
        while self.retained > limit {
            let old = self
                .free
                .pop_front()
                .expect("retained > 0 means a block is retained");
            self.retained -= old.len;
            evicted.push(old);
        }
    }
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves consistent state (every update is a single push/pop + counter).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block of `class` bytes for a request of `n`: a retained one if there is one, else a fresh mapping.
    fn take(&self, class: usize, n: usize) -> Option<Block> {
        {
            let mut st = self.lock();
            st.last_use = Instant::now();
            if let Some(i) = st.free.iter().rposition(|b| b.len == class) {
                let block = st.free.remove(i).expect("index from rposition");
                st.retained -= block.len;
                st.hits += 1;
                return Some(block);
            }
            st.misses += 1;
        }
        Block::map(class, n)
    }

    /// Keeps `block` for a later [`Cache::take`], unmapping the oldest blocks (outside the lock) past the cap.
    fn give(&'static self, block: Block) {
        let mut evicted = Vec::new();
        {
            let mut st = self.lock();
            st.last_use = Instant::now();
            if block.len > st.max_bytes {
                evicted.push(block);
            } else {
                let room = st.max_bytes - block.len;
                st.evict_down_to(room, &mut evicted);
                st.retained += block.len;
                st.free.push_back(block);
                let pid = std::process::id();
                if st.trimmer_pid != pid {
                    if spawn_trimmer(self) {
                        st.trimmer_pid = pid;
                    }
                } else if st.trimmer_parked {
                    st.trimmer_parked = false;
                    self.wake.notify_one();
                }
            }
        }
        drop(evicted);
    }

    /// Unmaps every retained block; returns the bytes released.
    fn clear(&self) -> usize {
        let blocks: Vec<Block> = {
            let mut st = self.lock();
            st.retained = 0;
            st.free.drain(..).collect()
        };
        blocks.iter().map(|b| b.len).sum()
    }

    /// The trimmer's loop: sleep while nothing is retained; otherwise release everything once the cache has seen no
    /// lease or give-back for the idle period.
    fn trim_forever(&self) {
        let mut st = self.lock();
        loop {
            if st.free.is_empty() {
                st.trimmer_parked = true;
                st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                st.trimmer_parked = false;
                continue;
            }
            let deadline = st.last_use + st.idle;
            let now = Instant::now();
            if now >= deadline {
                st.retained = 0;
                st.idle_trims += 1;
                let blocks: Vec<Block> = st.free.drain(..).collect();
                drop(st);
                drop(blocks);
                st = self.lock();
                continue;
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

thread_local! {
    /// The cache lock, held by the forking thread from [`before_fork`] to the matching `after_fork_*` handler.
    static HELD_OVER_FORK: RefCell<Option<MutexGuard<'static, State>>> = const { RefCell::new(None) };
}

/// `fork` prepare handler: takes the cache lock, so that no other thread holds it at the instant of the fork.
extern "C" fn before_fork() {
    if let Some(cache) = CACHE.get() {
        let guard = cache.lock();
        HELD_OVER_FORK.with(|held| *held.borrow_mut() = Some(guard));
    }
}

/// `fork` parent handler: releases the lock [`before_fork`] took.
extern "C" fn after_fork_in_parent() {
    drop(HELD_OVER_FORK.with(|held| held.borrow_mut().take()));
}

/// `fork` child handler: the child's only thread is the forking one, which holds the lock: forget the parent's
/// trimmer (it does not exist here), then release the lock. Only stores and an unlock (an atomic swap, and a futex
/// wake nobody waits for): safe in a child of a multi-threaded process.
extern "C" fn after_fork_in_child() {
    if let Some(mut guard) = HELD_OVER_FORK.with(|held| held.borrow_mut().take()) {
        guard.trimmer_pid = 0;
        guard.trimmer_parked = false;
    }
}

/// Starts the idle trimmer; false if the thread could not be started (then blocks are only released by the cap or
/// by `_buffer_cache_clear`, and the next give-back tries again).
fn spawn_trimmer(cache: &'static Cache) -> bool {
    std::thread::Builder::new()
        .name("tenso-bufcache-trim".into())
        .spawn(move || cache.trim_forever())
        .is_ok()
}

/// The owner of a cached block: the `base` of the NumPy views over it. Dropping it (when NumPy frees the last view)
/// gives the block back to the cache.
#[pyclass(frozen, module = "tenso.tenso_rs", name = "_CachedBuffer")]
#[derive(Debug)]
pub(crate) struct CachedBuffer {
    /// Always Some until `drop` hands it back.
    block: Option<Block>,
}

#[pymethods]
impl CachedBuffer {
    /// Bytes of the block (the request rounded up to its size class).
    #[getter]
    fn nbytes(&self) -> usize {
        self.block.as_ref().map_or(0, |b| b.len)
    }
}

impl CachedBuffer {
    /// Address of the block's first byte (page-aligned).
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.block
            .as_ref()
            .map_or(std::ptr::null_mut(), |b| b.ptr.as_ptr())
    }
}

impl Drop for CachedBuffer {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            cache().give(block);
        }
    }
}

/// An owner of at least `n` bytes from the cache, or None when the request is below [`MIN_BLOCK`], the cache is off
/// (`max_bytes` 0) or no memory could be mapped (the caller then allocates as usual).
pub(crate) fn lease(py: Python<'_>, n: usize) -> PyResult<Option<Bound<'_, CachedBuffer>>> {
    if n < MIN_BLOCK {
        return Ok(None);
    }
    let cache = cache();
    if cache.lock().max_bytes == 0 {
        return Ok(None);
    }
    let Some(class) = size_class(n) else {
        return Ok(None);
    };
    let Some(block) = cache.take(class, n) else {
        return Ok(None);
    };
    let owner = CachedBuffer { block: Some(block) };
    Ok(Some(Bound::new(py, owner)?))
}

/// Changes the cap on retained bytes and/or the idle period (seconds); a lower cap releases the excess at once.
#[pyfunction]
#[pyo3(signature = (max_bytes=None, idle_seconds=None))]
fn _buffer_cache_configure(max_bytes: Option<usize>, idle_seconds: Option<f64>) -> PyResult<()> {
    if let Some(s) = idle_seconds {
        if !(s.is_finite() && s >= 0.0) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "idle_seconds must be a finite number >= 0, got {s}"
            )));
        }
    }
    let cache = cache();
    let mut evicted = Vec::new();
    {
        let mut st = cache.lock();
        if let Some(m) = max_bytes {
            st.max_bytes = m;
            st.evict_down_to(m, &mut evicted);
        }
        if let Some(s) = idle_seconds {
            st.idle = Duration::from_secs_f64(s);
        }
        st.last_use = Instant::now();
    }
    cache.wake.notify_one();
    drop(evicted);
    Ok(())
}

/// Settings and counters: max_bytes, idle_seconds, min_block, retained_bytes, retained_blocks, hits, misses,
/// idle_trims.
#[pyfunction]
fn _buffer_cache_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    // Read under the lock, published after it: the lock is never held across a call into Python.
    let (max_bytes, idle, retained, blocks, hits, misses, idle_trims) = {
        let st = cache().lock();
        (
            st.max_bytes,
            st.idle,
            st.retained,
            st.free.len(),
            st.hits,
            st.misses,
            st.idle_trims,
        )
    };
    let d = PyDict::new(py);
    d.set_item("max_bytes", max_bytes)?;
    d.set_item("idle_seconds", idle.as_secs_f64())?;
    d.set_item("min_block", MIN_BLOCK)?;
    d.set_item("retained_bytes", retained)?;
    d.set_item("retained_blocks", blocks)?;
    d.set_item("hits", hits)?;
    d.set_item("misses", misses)?;
    d.set_item("idle_trims", idle_trims)?;
    Ok(d)
}

/// Releases every retained block now; returns the bytes released.
#[pyfunction]
fn _buffer_cache_clear() -> usize {
    cache().clear()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CachedBuffer>()?;
    m.add_function(wrap_pyfunction!(_buffer_cache_configure, m)?)?;
    m.add_function(wrap_pyfunction!(_buffer_cache_stats, m)?)?;
    m.add_function(wrap_pyfunction!(_buffer_cache_clear, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_by_at_most_a_quarter() {
        assert_eq!(size_class(MIN_BLOCK), Some(MIN_BLOCK));
        assert_eq!(size_class(64 << 20), Some(64 << 20));
        assert_eq!(size_class((64 << 20) + 64), Some(80 << 20));
        assert_eq!(size_class((1 << 20) + 1), Some((1 << 20) + (256 << 10)));
        for n in [
            MIN_BLOCK,
            300_000,
            1 << 20,
            3 << 20,
            (64 << 20) + 129,
            1 << 30,
        ] {
            let c = size_class(n).unwrap();
            assert!(c >= n && c - n <= n / 4 + PAGE, "{n} -> {c}");
            assert_eq!(c % PAGE, 0);
        }
        assert_eq!(size_class(usize::MAX - 10), None);
    }

    #[test]
    fn blocks_map_and_unmap() {
        let b = Block::map(MIN_BLOCK, MIN_BLOCK).unwrap();
        assert_eq!(b.ptr.as_ptr() as usize % PAGE, 0);
        // SAFETY: the block is a fresh, writable private mapping of MIN_BLOCK bytes owned by `b`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(b.ptr.as_ptr(), b.len) };
        bytes[0] = 1;
        bytes[MIN_BLOCK - 1] = 2;
        assert_eq!(bytes[0] + bytes[MIN_BLOCK - 1], 3);
    }
}
