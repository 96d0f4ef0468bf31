//! A pool of equally sized host staging buffers, allocated once and reused.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::GpuError;

/// Allocates and frees the pool's host buffers (page-locked memory in production, the heap in tests).
///
/// # Safety
/// `alloc(len)` must return memory valid for reads and writes of `len` bytes until it is passed to `free` with the
/// same `len`, usable from any thread, and not aliased by anything else.
pub unsafe trait HostAlloc {
    /// A fresh buffer of `len` bytes.
    fn alloc(&self, len: usize) -> Result<NonNull<u8>, GpuError>;
    /// Returns a buffer obtained from `alloc(len)`.
    ///
    /// # Safety
    /// `ptr` came from `self.alloc(len)` and is not used afterwards.
    unsafe fn free(&self, ptr: NonNull<u8>, len: usize);
}

/// Host buffers of `chunk` bytes each; [`StagingPool::take`] reuses an idle one before allocating.
#[derive(Debug)]
pub struct StagingPool<A: HostAlloc> {
    alloc: A,
    chunk: usize,
    idle: Mutex<Vec<NonNull<u8>>>,
    allocations: AtomicU64,
}

// SAFETY: the idle pointers are owned exclusively by the pool (HostAlloc's contract: not aliased, usable from any
// thread) and only touched under the mutex; a StagingBuf hands its pointer to one borrower at a time.
unsafe impl<A: HostAlloc + Send> Send for StagingPool<A> {}
// SAFETY: as above; shared access goes through the mutex and the atomic counter.
unsafe impl<A: HostAlloc + Sync> Sync for StagingPool<A> {}

impl<A: HostAlloc> StagingPool<A> {
    /// An empty pool of `chunk`-byte buffers (nothing is allocated until the first `take`).
    pub fn new(alloc: A, chunk: usize) -> Result<Self, GpuError> {
        if chunk == 0 {
            return Err(GpuError::BadLength { len: 0 });
        }
        Ok(Self {
            alloc,
            chunk,
            idle: Mutex::new(Vec::new()),
            allocations: AtomicU64::new(0),
        })
    }

    /// The size of each buffer.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// How many buffers were ever allocated (0 more in steady state).
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// How many buffers sit idle in the pool.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A buffer for exclusive use, returned to the pool when dropped.
    pub fn take(&self) -> Result<StagingBuf<'_, A>, GpuError> {
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let ptr = match reused {
            Some(ptr) => ptr,
            None => {
                let ptr = self.alloc.alloc(self.chunk)?;
                self.allocations.fetch_add(1, Ordering::Relaxed);
                ptr
            }
        };
        Ok(StagingBuf { pool: self, ptr })
    }
}

impl<A: HostAlloc> Drop for StagingPool<A> {
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(|p| p.into_inner()));
        for ptr in idle {
            // SAFETY: every idle pointer came from self.alloc.alloc(self.chunk) and, being idle, has no borrower;
            // StagingBuf borrows the pool, so none can outlive this drop.
            unsafe { self.alloc.free(ptr, self.chunk) };
        }
    }
}

/// One buffer of a [`StagingPool`], `chunk` bytes, back in the pool when dropped.
#[derive(Debug)]
pub struct StagingBuf<'p, A: HostAlloc> {
    pool: &'p StagingPool<A>,
    ptr: NonNull<u8>,
}

impl<A: HostAlloc> StagingBuf<'_, A> {
    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for chunk bytes (HostAlloc contract) and exclusively ours while this StagingBuf lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.pool.chunk) }
    }

    /// The whole buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.pool.chunk) }
    }
}

impl<A: HostAlloc> Drop for StagingBuf<'_, A> {
    fn drop(&mut self) {
        self.pool
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.ptr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Heap;
    use std::sync::Arc;

    #[test]
    fn steady_state_allocates_nothing() {
        let pool = StagingPool::new(Heap::default(), 1 << 12).unwrap();
        for round in 0..100 {
            let mut a = pool.take().unwrap();
            let mut b = pool.take().unwrap();
            a.as_mut_slice().fill(round as u8);
            b.as_mut_slice()[0] = 7;
            assert_eq!(a.as_slice()[4095], round as u8);
            assert_ne!(a.as_slice().as_ptr(), b.as_slice().as_ptr());
        }
        assert_eq!(pool.allocations(), 2);
        assert_eq!(pool.idle(), 2);
        assert_eq!(pool.alloc.live.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn drop_frees_every_buffer() {
        let heap = Heap::default();
        let live = Arc::clone(&heap.live);
        let pool = StagingPool::new(heap, 64).unwrap();
        drop((
            pool.take().unwrap(),
            pool.take().unwrap(),
            pool.take().unwrap(),
        ));
        assert_eq!((live.load(Ordering::Relaxed), pool.idle()), (3, 3));
        drop(pool);
        assert_eq!(live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn allocation_failure_is_an_error() {
        let pool = StagingPool::new(Heap::default(), 64).unwrap();
        pool.alloc.fail.store(true, Ordering::Relaxed);
        assert!(matches!(
            pool.take(),
            Err(GpuError::Driver {
                call: "cuMemHostAlloc",
                ..
            })
        ));
        assert_eq!(pool.allocations(), 0);
        assert!(matches!(
            StagingPool::new(Heap::default(), 0),
            Err(GpuError::BadLength { len: 0 })
        ));
    }
}
