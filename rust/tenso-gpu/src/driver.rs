//! The CUDA side: driver checks, the primary context, page-locked staging and chunked double-buffered copies.

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;

use cudarc::driver::{result, sys, DriverError};

use crate::pool::{HostAlloc, StagingPool};
use crate::{DeviceCount, GpuError};

fn driver(call: &'static str) -> impl FnOnce(DriverError) -> GpuError {
    move |e| GpuError::Driver {
        call,
        name: format!("{e:?}"),
    }
}

/// See [`crate::available`].
pub(crate) fn available() -> Result<DeviceCount, GpuError> {
    // SAFETY: is_culib_present only tries to dlopen the driver library by its usual names; loading libcuda runs no
    // initialiser that needs anything from us. Checked first because every other cudarc call panics without it.
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::NoDriver);
    }
    result::init().map_err(driver("cuInit"))?;
    let count = result::device::get_count().map_err(driver("cuDeviceGetCount"))?;
    Ok(DeviceCount(u32::try_from(count).unwrap_or(0)))
}

/// Page-locked host memory from `cuMemHostAlloc` with `CU_MEMHOSTALLOC_PORTABLE` (pinned for every context) and
/// *without* `WRITECOMBINED`: write-combined memory is fine for host-to-device but very slow for the CPU to read,
/// and device-to-host staging is read by the CPU. Needs a current context, which [`Device`] makes sure of.
#[derive(Debug)]
pub struct PinnedAlloc {
    _private: (),
}

// SAFETY: cuMemHostAlloc returns len bytes of fresh, page-locked, process-wide memory, valid until cuMemFreeHost and
// usable from any thread (PORTABLE), aliased by nothing.
unsafe impl HostAlloc for PinnedAlloc {
    fn alloc(&self, len: usize) -> Result<NonNull<u8>, GpuError> {
        // SAFETY: a plain allocation call; PinnedAlloc only exists inside a Device, which made its context current.
        let ptr = unsafe { result::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(driver("cuMemHostAlloc"))?;
        NonNull::new(ptr.cast::<u8>()).ok_or(GpuError::Driver {
            call: "cuMemHostAlloc",
            name: "null pointer".into(),
        })
    }

    unsafe fn free(&self, ptr: NonNull<u8>, _len: usize) {
        // SAFETY: the caller guarantees ptr came from alloc (cuMemHostAlloc) and is no longer used. A failure here
        // (context already torn down at process exit) leaves nothing to do.
        let _ = unsafe { result::free_host(ptr.as_ptr().cast::<c_void>()) };
    }
}

/// One CUDA device seen through its primary context (shared with torch and CuPy), with two streams and a pool of
/// pinned staging buffers for chunked copies.
#[derive(Debug)]
pub struct Device {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    streams: [sys::CUstream; 2],
    pool: Option<StagingPool<PinnedAlloc>>,
}

impl Device {
    /// Retains device `ordinal`'s primary context and prepares `chunk`-byte staging buffers (allocated on first use).
    pub fn open(ordinal: i32, chunk: usize) -> Result<Self, GpuError> {
        let DeviceCount(count) = available()?;
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        if !(0..count).contains(&ordinal) {
            return Err(GpuError::NoSuchDevice { ordinal, count });
        }
        let dev = result::device::get(ordinal).map_err(driver("cuDeviceGet"))?;
        // SAFETY: dev is a valid device handle from cuDeviceGet; the retain is balanced by the release in Drop.
        let ctx = unsafe { result::primary_ctx::retain(dev) }
            .map_err(driver("cuDevicePrimaryCtxRetain"))?;
        let mut device = Self {
            dev,
            ctx,
            streams: [std::ptr::null_mut(); 2],
            pool: None,
        };
        device.bind()?;
        for stream in &mut device.streams {
            *stream = result::stream::create(result::stream::StreamKind::NonBlocking)
                .map_err(driver("cuStreamCreate"))?;
        }
        device.pool = Some(StagingPool::new(PinnedAlloc { _private: () }, chunk)?);
        Ok(device)
    }

    /// Makes this device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: ctx is the primary context retained in open and not released before Drop.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(driver("cuCtxSetCurrent"))
    }

    /// The staging pool (its allocation count proves reuse).
    pub fn pool(&self) -> &StagingPool<PinnedAlloc> {
        self.pool
            .as_ref()
            .expect("the pool is set in open and taken only in drop")
    }

    /// Copies `len` bytes produced by `fill` into device memory at `dst`, one staging chunk at a time.
    ///
    /// `fill` must fill the whole slice it is given (it is called with consecutive pieces of the stream). Chunks
    /// alternate between two buffers and two streams: while the copy engine drains one, `fill` writes the other.
    ///
    /// # Safety
    /// `dst .. dst + len` must be device memory writable in this device's primary context, not used by anyone else
    /// until this returns.
    pub unsafe fn copy_to_device(
        &mut self,
        dst: sys::CUdeviceptr,
        len: usize,
        mut fill: impl FnMut(&mut [u8]) -> io::Result<()>,
    ) -> Result<(), GpuError> {
        self.bind()?;
        let streams = self.streams;
        let pool = self.pool();
        let mut bufs = [pool.take()?, pool.take()?];
        let chunk = pool.chunk();
        let mut pump = || -> Result<(), GpuError> {
            let mut offset = 0usize;
            let mut i = 0usize;
            while offset < len {
                let n = chunk.min(len - offset);
                let slot = i % 2;
                // SAFETY: the stream belongs to this device; waiting for it means the copy that last read this
                // buffer has finished, so the buffer may be overwritten.
                unsafe { result::stream::synchronize(streams[slot]) }
                    .map_err(driver("cuStreamSynchronize"))?;
                let host = &mut bufs[slot].as_mut_slice()[..n];
                fill(host)?;
                // SAFETY: dst + offset .. + n lies inside the caller's range (offset + n <= len); the pinned buffer
                // stays alive and unmodified until its stream is synchronised (next use of this slot, or below).
                unsafe { result::memcpy_htod_async(dst + offset as u64, &*host, streams[slot]) }
                    .map_err(driver("cuMemcpyHtoDAsync"))?;
                offset += n;
                i += 1;
            }
            Ok(())
        };
        let pumped = pump();
        pumped.and(drain(streams))
    }

    /// Copies `len` bytes of device memory at `src` to `sink`, one staging chunk at a time; the copy of chunk k+1
    /// runs while `sink` consumes chunk k.
    ///
    /// # Safety
    /// `src .. src + len` must be device memory readable in this device's primary context and not written until this
    /// returns.
    pub unsafe fn copy_from_device(
        &mut self,
        src: sys::CUdeviceptr,
        len: usize,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), GpuError> {
        self.bind()?;
        let streams = self.streams;
        let pool = self.pool();
        let mut bufs = [pool.take()?, pool.take()?];
        let chunk = pool.chunk();
        let chunks = len.div_ceil(chunk);
        let range = |k: usize| (k * chunk, chunk.min(len - k * chunk));
        let issue = |k: usize,
                     bufs: &mut [crate::pool::StagingBuf<'_, PinnedAlloc>; 2]|
         -> Result<(), GpuError> {
            let (offset, n) = range(k);
            let host = &mut bufs[k % 2].as_mut_slice()[..n];
            // SAFETY: src + offset .. + n lies in the caller's range; the buffer is not read by the CPU until its
            // stream is synchronised below.
            unsafe { result::memcpy_dtoh_async(host, src + offset as u64, streams[k % 2]) }
                .map_err(driver("cuMemcpyDtoHAsync"))
        };
        let mut pump = || -> Result<(), GpuError> {
            if chunks > 0 {
                issue(0, &mut bufs)?;
            }
            for k in 0..chunks {
                if k + 1 < chunks {
                    issue(k + 1, &mut bufs)?;
                }
                // SAFETY: the stream belongs to this device; once synchronised, chunk k is in its buffer.
                unsafe { result::stream::synchronize(streams[k % 2]) }
                    .map_err(driver("cuStreamSynchronize"))?;
                let (_, n) = range(k);
                sink(&bufs[k % 2].as_slice()[..n])?;
            }
            Ok(())
        };
        let pumped = pump();
        pumped.and(drain(streams))
    }
}

/// Waits for both streams, also after an error, so that no copy still reads or writes a staging buffer when it goes
/// back to the pool; the first failure is reported.
fn drain(streams: [sys::CUstream; 2]) -> Result<(), GpuError> {
    let mut drained = Ok(());
    for stream in streams {
        // SAFETY: the streams belong to the calling device; synchronising has no precondition beyond that.
        if let Err(e) = unsafe { result::stream::synchronize(stream) } {
            drained = drained.and(Err(driver("cuStreamSynchronize")(e)));
        }
    }
    drained
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.bind();
        for stream in self.streams {
            if !stream.is_null() {
                // SAFETY: the stream was created in open on this context; nothing is queued on it after the copies,
                // which synchronise before returning.
                let _ = unsafe { result::stream::destroy(stream) };
            }
        }
        // Frees the pinned buffers while the context is still retained.
        drop(self.pool.take());
        // SAFETY: balances the retain in open; torch/CuPy hold their own retains, so their context stays.
        let _ = unsafe { result::primary_ctx::release(self.dev) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_driver_open_is_an_error_not_a_panic() {
        // SAFETY: see available().
        if unsafe { sys::is_culib_present() } {
            return; // a machine with a driver: covered by the GPU tests (scripts/gpu-check.sh)
        }
        assert!(matches!(available(), Err(GpuError::NoDriver)));
        let err = Device::open(0, 1 << 20).unwrap_err();
        assert!(matches!(err, GpuError::NoDriver));
        assert!(err.to_string().contains("libcuda"));
    }

    /// Runs only where a CUDA device exists (scripts/gpu-check.sh runs `cargo test -p tenso-gpu` when cargo is there).
    #[test]
    fn round_trip_through_staging_reuses_buffers() {
        if !matches!(available(), Ok(DeviceCount(n)) if n > 0) {
            return;
        }
        let chunk = 1 << 20;
        let mut device = Device::open(0, chunk).unwrap();
        let len = 5 * chunk + 12_345; // several chunks and a ragged tail
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        // SAFETY: a plain device allocation in the current (primary) context, freed below.
        let dptr = unsafe { result::malloc_sync(len) }.unwrap();
        for _ in 0..3 {
            let mut fed = 0usize;
            // SAFETY: dptr holds len bytes and nothing else uses it.
            unsafe {
                device.copy_to_device(dptr, len, |buf| {
                    buf.copy_from_slice(&data[fed..fed + buf.len()]);
                    fed += buf.len();
                    Ok(())
                })
            }
            .unwrap();
            let mut back = Vec::with_capacity(len);
            // SAFETY: as above; the H2D copy finished before copy_to_device returned.
            unsafe {
                device.copy_from_device(dptr, len, |buf| {
                    back.extend_from_slice(buf);
                    Ok(())
                })
            }
            .unwrap();
            assert_eq!((fed, back.len()), (len, len));
            assert!(back == data);
        }
        assert_eq!(
            device.pool().allocations(),
            2,
            "steady state allocates no pinned memory"
        );
        // SAFETY: allocated above, no copy in flight.
        unsafe { result::free_sync(dptr) }.unwrap();
    }
}
