//! Chunked, double-buffered copies between a host byte stream and device memory, written against a small
//! [`CopyEngine`] trait so that everything but the driver calls runs (and is tested) without a GPU.
//!
//! ```text
//! upload (H2D), chunk k uses slot k % 2:        download (D2H):
//!   sync(slot)      the copy that last read       issue D2H of chunk 0
//!                   this staging buffer is done   for k: issue D2H of chunk k+1 (other slot)
//!   fill(staging)   reader -> pinned buffer              sync(slot k), sink(chunk k)
//!   h2d(slot, ..)   enqueued; runs while the      while the sink writes chunk k, the copy
//!                   next fill() reads             engine fetches chunk k+1
//! ```

use std::io;

use crate::pool::{HostAlloc, StagingBuf, StagingPool};
use crate::GpuError;

/// A device address (`CUdeviceptr` on CUDA).
pub type DevPtr = u64;

/// The two streams (slots) of double buffering.
pub const SLOTS: usize = 2;

/// The copy engine of one device: two streams (`slot` 0 and 1) and a pool of staging buffers.
///
/// # Safety
/// `sync(slot)` must return only once every copy enqueued on `slot` has finished reading and writing its host and
/// device memory; copies must touch only the ranges they are given.
pub unsafe trait CopyEngine {
    /// The staging buffers' allocator.
    type Host: HostAlloc;

    /// The staging pool; its chunk size is the unit of every copy.
    fn staging(&self) -> &StagingPool<Self::Host>;

    /// Enqueues a copy of `src` to device memory at `dst` on stream `slot`.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` is device memory writable by this engine; `src` stays valid and unmodified until
    /// `sync(slot)` returns.
    unsafe fn h2d(&self, slot: usize, dst: DevPtr, src: &[u8]) -> Result<(), GpuError>;

    /// Enqueues a copy of device memory at `src` into `dst` on stream `slot`.
    ///
    /// # Safety
    /// `src .. src + dst.len()` is device memory readable by this engine; `dst` stays valid and is neither read nor
    /// written until `sync(slot)` returns.
    unsafe fn d2h(&self, slot: usize, dst: &mut [u8], src: DevPtr) -> Result<(), GpuError>;

    /// Waits until every copy enqueued on `slot` has finished.
    fn sync(&self, slot: usize) -> Result<(), GpuError>;
}

/// Device memory that a [`DeviceMemory`] engine allocated; freed when dropped.
pub trait DeviceBuf {
    /// The device address of the first byte.
    fn ptr(&self) -> DevPtr;
    /// The length in bytes.
    fn len(&self) -> usize;
    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A copy engine that can also allocate device memory (where [`crate::packet::read_packet`] puts tensors).
pub trait DeviceMemory: CopyEngine {
    /// Its allocations.
    type Buf: DeviceBuf;
    /// `len` bytes of fresh device memory, owned by the returned buffer.
    fn alloc(&self, len: usize) -> Result<Self::Buf, GpuError>;
}

/// A copy engine whose device memory comes from the consumer's own allocator (torch's or CuPy's caching allocator):
/// `alloc(len)` hands back a buffer the consumer owns, so that freeing it later is the consumer's stream-ordered
/// bookkeeping, with no `cuMemFree` (which may synchronise the whole device) and memory the consumer counts and
/// reuses. The copies run on `engine`'s streams; `alloc` orders them after the consumer's pending work on that
/// memory (e.g. by making the copy streams wait for an event on the consumer's stream).
#[derive(Debug)]
pub struct ExternalMemory<'e, E: ?Sized, F> {
    engine: &'e E,
    alloc: F,
}

impl<'e, E: CopyEngine + ?Sized, F> ExternalMemory<'e, E, F> {
    /// Copies with `engine`, allocates with `alloc`.
    pub fn new(engine: &'e E, alloc: F) -> Self {
        Self { engine, alloc }
    }
}

// SAFETY: every copy and wait is the wrapped engine's, which upholds the trait's contract.
unsafe impl<E: CopyEngine + ?Sized, F> CopyEngine for ExternalMemory<'_, E, F> {
    type Host = E::Host;

    fn staging(&self) -> &StagingPool<E::Host> {
        self.engine.staging()
    }

    unsafe fn h2d(&self, slot: usize, dst: DevPtr, src: &[u8]) -> Result<(), GpuError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.engine.h2d(slot, dst, src) }
    }

    unsafe fn d2h(&self, slot: usize, dst: &mut [u8], src: DevPtr) -> Result<(), GpuError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.engine.d2h(slot, dst, src) }
    }

    fn sync(&self, slot: usize) -> Result<(), GpuError> {
        self.engine.sync(slot)
    }
}

impl<E, B, F> DeviceMemory for ExternalMemory<'_, E, F>
where
    E: CopyEngine + ?Sized,
    B: DeviceBuf,
    F: Fn(usize) -> Result<B, GpuError>,
{
    type Buf = B;

    fn alloc(&self, len: usize) -> Result<B, GpuError> {
        let buf = (self.alloc)(len)?;
        if buf.len() < len {
            return Err(GpuError::BadLength { len });
        }
        Ok(buf)
    }
}

/// Waits for both streams, also after an error, so that no copy still reads or writes a staging buffer when it goes
/// back to the pool; the first failure is reported.
pub(crate) fn drain<E: CopyEngine + ?Sized>(engine: &E) -> Result<(), GpuError> {
    let mut drained = Ok(());
    for slot in 0..SLOTS {
        if let Err(e) = engine.sync(slot) {
            drained = drained.and(Err(e));
        }
    }
    drained
}

/// A running upload: keeps two staging buffers and alternates streams across calls, so that one packet's many
/// pieces (bodies of a bundle, bodies split around padding) share the double buffering.
#[derive(Debug)]
pub struct Uploader<'e, E: CopyEngine + ?Sized> {
    engine: &'e E,
    bufs: [StagingBuf<'e, E::Host>; SLOTS],
    next: usize,
}

impl<'e, E: CopyEngine + ?Sized> Uploader<'e, E> {
    /// Takes two staging buffers from the engine's pool.
    pub fn new(engine: &'e E) -> Result<Self, GpuError> {
        let pool = engine.staging();
        Ok(Self {
            engine,
            bufs: [pool.take()?, pool.take()?],
            next: 0,
        })
    }

    /// Copies `len` bytes produced by `fill` to device memory at `dst`, one staging chunk at a time. `fill` is
    /// called with consecutive pieces and must fill each whole; `check` sees each filled piece before it is
    /// enqueued (the stream's validation, e.g. a digest or the bool check).
    ///
    /// # Safety
    /// `dst .. dst + len` is device memory writable by the engine and not used by anyone else until [`Self::finish`]
    /// returns.
    pub unsafe fn copy(
        &mut self,
        dst: DevPtr,
        len: usize,
        mut fill: impl FnMut(&mut [u8]) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let chunk = self.engine.staging().chunk();
        let mut offset = 0usize;
        while offset < len {
            let n = chunk.min(len - offset);
            let slot = self.next;
            // Waiting for the slot means the copy that last read this buffer has finished: it may be overwritten.
            self.engine.sync(slot)?;
            let host = &mut self.bufs[slot].as_mut_slice()[..n];
            fill(host)?;
            let at = dst
                .checked_add(offset as u64)
                .ok_or(GpuError::BadLength { len })?;
            // SAFETY: at .. at + n lies inside the caller's range (offset + n <= len); the buffer is exclusively ours
            // and is not touched again before sync(slot) (next use of this slot, or drain in finish/drop).
            unsafe { self.engine.h2d(slot, at, host) }?;
            offset += n;
            self.next = (slot + 1) % SLOTS;
        }
        Ok(())
    }

    /// Waits for every enqueued copy; afterwards the device memory holds the data.
    pub fn finish(self) -> Result<(), GpuError> {
        drain(self.engine)
        // Drop drains again (a no-op on idle streams) and returns the buffers.
    }
}

impl<E: CopyEngine + ?Sized> Drop for Uploader<'_, E> {
    fn drop(&mut self) {
        // After an error, copies may still read the staging buffers: wait before they go back to the pool.
        let _ = drain(self.engine);
    }
}

/// Copies `len` bytes produced by `fill` into device memory at `dst` (see [`Uploader::copy`]).
///
/// # Safety
/// As [`Uploader::copy`].
pub unsafe fn upload<E: CopyEngine + ?Sized>(
    engine: &E,
    dst: DevPtr,
    len: usize,
    mut fill: impl FnMut(&mut [u8]) -> io::Result<()>,
) -> Result<(), GpuError> {
    let mut up = Uploader::new(engine)?;
    // SAFETY: forwarded from the caller.
    unsafe { up.copy(dst, len, |b| fill(b).map_err(GpuError::from)) }?;
    up.finish()
}

/// Copies `len` bytes of device memory at `src` to `sink`, one staging chunk at a time; the copy of chunk k+1 runs
/// while `sink` consumes chunk k.
///
/// # Safety
/// `src .. src + len` is device memory readable by the engine and not written until this returns.
pub unsafe fn download<E: CopyEngine + ?Sized>(
    engine: &E,
    src: DevPtr,
    len: usize,
    mut sink: impl FnMut(&[u8]) -> Result<(), GpuError>,
) -> Result<(), GpuError> {
    let pool = engine.staging();
    let mut bufs = [pool.take()?, pool.take()?];
    let chunk = pool.chunk();
    let chunks = len.div_ceil(chunk);
    let range = |k: usize| (k * chunk, chunk.min(len - k * chunk));
    let issue = |k: usize, bufs: &mut [StagingBuf<'_, E::Host>; SLOTS]| -> Result<(), GpuError> {
        let (offset, n) = range(k);
        let host = &mut bufs[k % SLOTS].as_mut_slice()[..n];
        // SAFETY: src + offset .. + n lies in the caller's range; the buffer is not read by the CPU until its slot is
        // synchronised below (or drained before it returns to the pool).
        unsafe { engine.d2h(k % SLOTS, host, src + offset as u64) }
    };
    let mut pump = || -> Result<(), GpuError> {
        if chunks > 0 {
            issue(0, &mut bufs)?;
        }
        for k in 0..chunks {
            if k + 1 < chunks {
                issue(k + 1, &mut bufs)?;
            }
            engine.sync(k % SLOTS)?;
            let (_, n) = range(k);
            sink(&bufs[k % SLOTS].as_slice()[..n])?;
        }
        Ok(())
    };
    let pumped = pump();
    pumped.and(drain(engine))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeDevice;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trip_at_every_boundary() {
        let chunk = 64;
        let dev = FakeDevice::new(chunk);
        for len in [
            0,
            1,
            chunk - 1,
            chunk,
            chunk + 1,
            2 * chunk,
            2 * chunk + 1,
            7 * chunk + 13,
        ] {
            let data = pattern(len);
            let buf = dev.alloc(len).unwrap();
            let mut fed = 0;
            // SAFETY: buf holds len bytes of fake device memory, used by nobody else.
            unsafe {
                upload(&dev, buf.ptr(), len, |b| {
                    b.copy_from_slice(&data[fed..fed + b.len()]);
                    fed += b.len();
                    Ok(())
                })
            }
            .unwrap();
            assert_eq!(dev.read(buf.ptr(), len), data, "len {len}");
            let mut back = Vec::new();
            // SAFETY: as above.
            unsafe {
                download(&dev, buf.ptr(), len, |b| {
                    back.extend_from_slice(b);
                    Ok(())
                })
            }
            .unwrap();
            assert_eq!(back, data, "len {len}");
        }
        assert_eq!(
            dev.staging().allocations(),
            2,
            "steady state allocates no staging"
        );
        assert_eq!(dev.pending(), 0);
    }

    #[test]
    fn errors_drain_before_buffers_return() {
        let dev = FakeDevice::new(16);
        let buf = dev.alloc(100).unwrap();
        let mut calls = 0;
        // SAFETY: buf holds 100 bytes.
        let err = unsafe {
            upload(&dev, buf.ptr(), 100, |b| {
                calls += 1;
                if calls == 3 {
                    return Err(io::Error::other("reader failed"));
                }
                b.fill(1);
                Ok(())
            })
        }
        .unwrap_err();
        assert!(matches!(err, GpuError::Io(_)));
        assert_eq!(dev.pending(), 0, "no copy left in flight");
        assert_eq!(dev.read(buf.ptr(), 32), vec![1; 32]);
        let mut seen = 0;
        // SAFETY: as above.
        let err = unsafe {
            download(&dev, buf.ptr(), 100, |_| {
                seen += 1;
                Err(GpuError::Io(io::Error::other("writer failed")))
            })
        }
        .unwrap_err();
        assert!(matches!(err, GpuError::Io(_)));
        assert_eq!((seen, dev.pending()), (1, 0));
        assert_eq!(dev.staging().idle(), 2);
    }

    #[test]
    fn copies_outside_an_allocation_are_caught_by_the_fake() {
        let dev = FakeDevice::new(16);
        let buf = dev.alloc(10).unwrap();
        // SAFETY: deliberately out of range: the fake reports it instead of writing.
        let err = unsafe {
            upload(&dev, buf.ptr() + 4, 10, |b| {
                b.fill(0);
                Ok(())
            })
        }
        .unwrap_err();
        assert!(matches!(err, GpuError::BadLength { .. }));
    }
}
