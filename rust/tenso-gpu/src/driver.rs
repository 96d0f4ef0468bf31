//! The CUDA side: driver checks, the primary context, page-locked staging and chunked double-buffered copies.

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::{result, sys, DriverError};

use crate::context::{self, Contexts};
use crate::copy::{CopyEngine, DevPtr, DeviceBuf, DeviceMemory};
use crate::pool::{HostAlloc, StagingPool};
use crate::register::HostRegistrar;
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
/// and device-to-host staging is read by the CPU. `cuMemHostAlloc` and `cuMemFreeHost` need a current context:
/// each call binds the device's primary context on the calling thread (the pool may first fill, or be dropped, on
/// any thread) and restores the thread's previous one.
#[derive(Debug)]
pub struct PinnedAlloc {
    primary: Arc<Primary>,
}

// SAFETY: cuMemHostAlloc returns len bytes of fresh, page-locked host memory of this process, valid until
// cuMemFreeHost, aliased by nothing; host memory is usable from any thread (PORTABLE makes it count as pinned for the
// copies of every context, not only the one it was allocated in).
unsafe impl HostAlloc for PinnedAlloc {
    fn alloc(&self, len: usize) -> Result<NonNull<u8>, GpuError> {
        let _current = self.primary.bind()?;
        // SAFETY: a plain allocation call, with the primary context current on this thread (bound above).
        let ptr = unsafe { result::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(driver("cuMemHostAlloc"))?;
        NonNull::new(ptr.cast::<u8>()).ok_or(GpuError::Driver {
            call: "cuMemHostAlloc",
            name: "null pointer".into(),
        })
    }

    unsafe fn free(&self, ptr: NonNull<u8>, _len: usize) {
        let _current = self.primary.bind();
        // SAFETY: the caller guarantees ptr came from alloc (cuMemHostAlloc) and is no longer used. A failure here
        // (context already torn down at process exit) leaves nothing to do.
        let _ = unsafe { result::free_host(ptr.as_ptr().cast::<c_void>()) };
    }
}

/// A retained primary context; released when the last [`Device`] or [`CudaBuf`] holding it goes.
#[derive(Debug)]
struct Primary {
    dev: sys::CUdevice,
    /// The ordinal `dev` was looked up by (a `CUdevice` is an opaque handle, not promised to equal it).
    ordinal: i32,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext handle may be made current on any thread (cuCtxSetCurrent); Primary only binds it and
// releases the retain once, in Drop.
unsafe impl Send for Primary {}
// SAFETY: as above; no method mutates the handles.
unsafe impl Sync for Primary {}

impl Primary {
    /// Makes the primary context current on the calling thread until the returned guard drops, which makes the
    /// thread's previous context current again. The thread may be torch's or CuPy's, whose current device *is* the
    /// current context (the runtime API reads it from the driver): leaving ours bound would silently move their
    /// current device on a machine with several GPUs (see [`crate::context`], tested there on a strict fake).
    fn bind(&self) -> Result<Current, GpuError> {
        // SAFETY: ctx is the primary context retained in Device::open and released only when the last holder of this
        // Primary goes; the guard is dropped within a call of such a holder.
        let bound = unsafe { context::bind(&DRIVER, self.ctx) }?;
        Ok(Current { _bound: bound })
    }
}

/// The driver's contexts (`cuCtxGetCurrent` / `cuCtxSetCurrent`), for [`context::bind`].
#[derive(Debug)]
struct DriverContexts;

static DRIVER: DriverContexts = DriverContexts;

// SAFETY: set is cuCtxSetCurrent, which makes exactly the given context (or none) current on the calling thread.
unsafe impl Contexts for DriverContexts {
    type Ctx = sys::CUcontext;

    fn current(&self) -> Result<Option<sys::CUcontext>, GpuError> {
        result::ctx::get_current().map_err(driver("cuCtxGetCurrent"))
    }

    unsafe fn set(&self, ctx: Option<sys::CUcontext>) -> Result<(), GpuError> {
        // SAFETY: the caller guarantees ctx is a live context of this process (or none: null).
        unsafe { result::ctx::set_current(ctx.unwrap_or(std::ptr::null_mut())) }
            .map_err(driver("cuCtxSetCurrent"))
    }
}

/// The context current on this thread before [`Primary::bind`], made current again on drop (not `Send`: it must be
/// restored on the thread that bound).
#[must_use = "the context is bound only while the guard lives"]
#[derive(Debug)]
pub struct Current {
    _bound: context::Bound<'static, DriverContexts>,
}

impl Drop for Primary {
    fn drop(&mut self) {
        // SAFETY: balances the retain in Device::open; torch/CuPy hold their own retains, so their context stays.
        let _ = unsafe { result::primary_ctx::release(self.dev) };
    }
}

/// `cuMemHostRegister` / `cuMemHostUnregister` in a device's primary context (see [`crate::register`]), made by
/// [`Device::host_registrar`]. Registers with `CU_MEMHOSTREGISTER_PORTABLE`, so the range counts as pinned in every
/// context (torch's, CuPy's, ours), and holds a retain of the primary context so that the unregistration finds the
/// context the registration was made in.
///
/// The pages are locked by the NVIDIA kernel driver, not by `mlock(2)`: `RLIMIT_MEMLOCK` (`ulimit -l`) does not
/// bound them; what bounds them is physical memory (and, for very large ranges, the driver's per-call limit).
#[derive(Debug, Clone)]
pub struct CudaRegistrar {
    primary: Arc<Primary>,
}

// SAFETY: a successful cuMemHostRegister page-locks exactly the range given; unregister passes back the base address
// that register was given, in the same context.
unsafe impl HostRegistrar for CudaRegistrar {
    unsafe fn register(&self, ptr: NonNull<u8>, len: usize) -> Result<(), GpuError> {
        let _current = self.primary.bind()?;
        // SAFETY: the caller guarantees ptr .. ptr + len is mapped host memory kept mapped until unregister; the
        // driver only pins its pages (it neither reads nor writes them here).
        unsafe {
            sys::cuMemHostRegister_v2(
                ptr.as_ptr().cast::<c_void>(),
                len,
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        }
        .result()
        .map_err(driver("cuMemHostRegister"))
    }

    unsafe fn unregister(&self, ptr: NonNull<u8>) -> Result<(), GpuError> {
        let _current = self.primary.bind()?;
        // SAFETY: the caller guarantees ptr is the base of a live registration made by register() in this process.
        unsafe { sys::cuMemHostUnregister(ptr.as_ptr().cast::<c_void>()) }
            .result()
            .map_err(driver("cuMemHostUnregister"))
    }
}

/// Device memory from `cuMemAlloc` in the primary context, freed (`cuMemFree`) when dropped. Zero-length buffers
/// hold no allocation (address 0), as DLPack allows for empty tensors.
#[derive(Debug)]
pub struct CudaBuf {
    ptr: sys::CUdeviceptr,
    len: usize,
    primary: Arc<Primary>,
}

impl CudaBuf {
    /// The device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.primary.ordinal
    }
}

impl DeviceBuf for CudaBuf {
    fn ptr(&self) -> DevPtr {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let _current = self.primary.bind();
        // SAFETY: ptr came from cuMemAlloc in this primary context and is freed once; the copies that wrote it were
        // synchronised before the buffer was handed out, and its DLPack consumers have released it (the deleter
        // drops the buffer). cuMemFree waits for the device to stop using it.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// One CUDA device seen through its primary context (shared with torch and CuPy), with two streams and a pool of
/// pinned staging buffers for chunked copies; the [`CopyEngine`] of [`crate::packet`].
///
/// Copies from two threads on one `Device` would interleave on its two streams: callers serialise them (the Python
/// binding keeps one `Device` per ordinal behind a mutex).
#[derive(Debug)]
pub struct Device {
    streams: [sys::CUstream; 2],
    pool: Option<StagingPool<PinnedAlloc>>,
    primary: Arc<Primary>,
}

// SAFETY: the stream and context handles may be used from any thread once the context is bound, which every
// method does first; the pool is Send (PinnedAlloc memory is PORTABLE).
unsafe impl Send for Device {}

impl Device {
    /// Retains device `ordinal`'s primary context and prepares `chunk`-byte staging buffers (allocated on first use).
    pub fn open(ordinal: i32, chunk: usize) -> Result<Self, GpuError> {
        let DeviceCount(count) = available()?;
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        if !(0..count).contains(&ordinal) {
            return Err(GpuError::NoSuchDevice { ordinal, count });
        }
        let dev = result::device::get(ordinal).map_err(driver("cuDeviceGet"))?;
        // SAFETY: dev is a valid device handle from cuDeviceGet; the retain is balanced by Primary's Drop.
        let ctx = unsafe { result::primary_ctx::retain(dev) }
            .map_err(driver("cuDevicePrimaryCtxRetain"))?;
        let primary = Arc::new(Primary { dev, ordinal, ctx });
        let mut device = Self {
            streams: [std::ptr::null_mut(); 2],
            pool: None,
            primary: Arc::clone(&primary),
        };
        {
            let _current = primary.bind()?;
            for stream in &mut device.streams {
                *stream = result::stream::create(result::stream::StreamKind::NonBlocking)
                    .map_err(driver("cuStreamCreate"))?;
            }
        }
        device.pool = Some(StagingPool::new(PinnedAlloc { primary }, chunk)?);
        Ok(device)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.primary.ordinal
    }

    /// Makes this device's primary context current on the calling thread until the returned guard drops (which
    /// restores the thread's previous context).
    pub fn bind(&self) -> Result<Current, GpuError> {
        self.primary.bind()
    }

    /// A registrar for page-locking host memory in this device's primary context (see [`crate::register`]).
    pub fn host_registrar(&self) -> CudaRegistrar {
        CudaRegistrar {
            primary: Arc::clone(&self.primary),
        }
    }

    /// The staging pool (its allocation count proves reuse).
    pub fn pool(&self) -> &StagingPool<PinnedAlloc> {
        self.pool
            .as_ref()
            .expect("the pool is set in open and taken only in drop")
    }

    /// The stream of copy slot `slot` (0 or 1), for a DLPack producer to order its work before our copies.
    pub fn stream(&self, slot: usize) -> sys::CUstream {
        self.streams[slot % 2]
    }

    /// Makes both copy streams wait, on the device and without blocking the host, for the work queued so far on
    /// `stream`: memory that a consumer's stream-ordered allocator (torch's, CuPy's) just handed out on `stream`
    /// may still be in use by that work, and our copies into it must come after.
    ///
    /// # Safety
    /// `stream` (a `CUstream` handle as the integer Python frameworks report, e.g. torch's `cuda_stream`) is a live
    /// stream of this device's primary context (0: the legacy default stream).
    pub unsafe fn wait_for(&self, stream: usize) -> Result<(), GpuError> {
        let stream = stream as sys::CUstream;
        let _current = self.bind()?;
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(driver("cuEventCreate"))?;
        let waited = (|| {
            // SAFETY: event was just created in the bound context; the caller guarantees the stream.
            unsafe { result::event::record(event, stream) }.map_err(driver("cuEventRecord"))?;
            for ours in self.streams {
                // SAFETY: our stream and the event live in the bound context; the wait is queued on the device.
                unsafe {
                    result::stream::wait_event(
                        ours,
                        event,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                }
                .map_err(driver("cuStreamWaitEvent"))?;
            }
            Ok(())
        })();
        // SAFETY: created above and used by nothing else; the driver defers the destruction of a recorded event
        // until the waits queued on it are done.
        let _ = unsafe { result::event::destroy(event) };
        waited
    }

    /// Copies `len` bytes produced by `fill` into device memory at `dst` (see [`crate::copy::upload`]).
    ///
    /// # Safety
    /// `dst .. dst + len` must be device memory writable in this device's primary context, not used by anyone else
    /// until this returns.
    pub unsafe fn copy_to_device(
        &self,
        dst: sys::CUdeviceptr,
        len: usize,
        fill: impl FnMut(&mut [u8]) -> io::Result<()>,
    ) -> Result<(), GpuError> {
        // SAFETY: forwarded from the caller.
        unsafe { crate::copy::upload(self, dst, len, fill) }
    }

    /// Copies `len` bytes of device memory at `src` to `sink` (see [`crate::copy::download`]).
    ///
    /// # Safety
    /// `src .. src + len` must be device memory readable in this device's primary context and not written until this
    /// returns.
    pub unsafe fn copy_from_device(
        &self,
        src: sys::CUdeviceptr,
        len: usize,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), GpuError> {
        // SAFETY: forwarded from the caller.
        unsafe { crate::copy::download(self, src, len, |b| sink(b).map_err(GpuError::from)) }
    }
}

// SAFETY: sync(slot) is cuStreamSynchronize on that slot's stream, which returns once every copy queued on it has
// finished; h2d/d2h copy exactly the ranges they are given.
unsafe impl CopyEngine for Device {
    type Host = PinnedAlloc;

    fn staging(&self) -> &StagingPool<PinnedAlloc> {
        self.pool()
    }

    unsafe fn h2d(&self, slot: usize, dst: DevPtr, src: &[u8]) -> Result<(), GpuError> {
        let _current = self.bind()?;
        // SAFETY: the caller guarantees the device range and that src (pinned staging) stays valid and unmodified
        // until this slot is synchronised.
        unsafe { result::memcpy_htod_async(dst, src, self.streams[slot]) }
            .map_err(driver("cuMemcpyHtoDAsync"))
    }

    unsafe fn d2h(&self, slot: usize, dst: &mut [u8], src: DevPtr) -> Result<(), GpuError> {
        let _current = self.bind()?;
        // SAFETY: the caller guarantees the device range and that dst stays valid and untouched until this slot is
        // synchronised.
        unsafe { result::memcpy_dtoh_async(dst, src, self.streams[slot]) }
            .map_err(driver("cuMemcpyDtoHAsync"))
    }

    fn sync(&self, slot: usize) -> Result<(), GpuError> {
        let _current = self.bind()?;
        // SAFETY: the stream belongs to this device and lives as long as it; synchronising has no other precondition.
        unsafe { result::stream::synchronize(self.streams[slot]) }
            .map_err(driver("cuStreamSynchronize"))
    }
}

impl DeviceMemory for Device {
    type Buf = CudaBuf;

    fn alloc(&self, len: usize) -> Result<CudaBuf, GpuError> {
        let primary = Arc::clone(&self.primary);
        if len == 0 {
            return Ok(CudaBuf {
                ptr: 0,
                len,
                primary,
            });
        }
        let _current = self.bind()?;
        // SAFETY: a plain allocation in the bound primary context; freed by CudaBuf's Drop.
        let ptr = unsafe { result::malloc_sync(len) }.map_err(driver("cuMemAlloc"))?;
        Ok(CudaBuf { ptr, len, primary })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let current = self.bind();
        for stream in self.streams {
            if !stream.is_null() {
                // SAFETY: the stream was created in open on this context; the copies synchronise before returning,
                // so nothing is queued on it.
                let _ = unsafe { result::stream::destroy(stream) };
            }
        }
        drop(current);
        // Frees the pinned buffers while the context is still retained (PinnedAlloc holds it, and binds it).
        drop(self.pool.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the hardware tests below run: a CUDA device is there. With `TENSO_GPU_REQUIRE_DEVICE` set (as
    /// scripts/gpu-check.sh sets it) a missing device fails the test instead of skipping it, so that a GPU check
    /// cannot pass without having run them.
    fn hardware() -> bool {
        let found = available();
        let present = matches!(found, Ok(DeviceCount(n)) if n > 0);
        assert!(
            present || std::env::var_os("TENSO_GPU_REQUIRE_DEVICE").is_none(),
            "TENSO_GPU_REQUIRE_DEVICE is set, but no CUDA device can be used: {found:?}"
        );
        present
    }

    #[test]
    fn without_driver_open_is_an_error_not_a_panic() {
        // SAFETY: see available().
        if unsafe { sys::is_culib_present() } {
            return; // a machine with a driver: covered by the hardware tests below (scripts/gpu-check.sh runs them)
        }
        assert!(matches!(available(), Err(GpuError::NoDriver)));
        let err = Device::open(0, 1 << 20).unwrap_err();
        assert!(matches!(err, GpuError::NoDriver));
        assert!(err.to_string().contains("libcuda"));
    }

    /// Runs only where a CUDA device exists: page-locks a private anonymous mapping, sees the driver call it host
    /// memory, and unlocks it before unmapping.
    #[test]
    fn registration_pins_and_unpins_a_mapping() {
        if !hardware() {
            return;
        }
        let device = Device::open(0, 1 << 20).unwrap();
        let mut memory = vec![7u8; 3 << 20];
        let ptr = NonNull::new(memory.as_mut_ptr()).unwrap();
        let is_host = |p: NonNull<u8>| {
            // Device::open restored the thread's previous context (none): every driver call needs ours bound.
            let _current = device.bind().expect("bind the primary context");
            let mut kind: u32 = 0;
            // SAFETY: queries an attribute of an address; kind is a c_uint as the attribute requires.
            let r = unsafe {
                sys::cuPointerGetAttribute(
                    (&mut kind as *mut u32).cast::<c_void>(),
                    sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                    p.as_ptr() as sys::CUdeviceptr,
                )
            };
            r == sys::CUresult::CUDA_SUCCESS && kind == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32
        };
        assert!(!is_host(ptr));
        {
            // SAFETY: `memory` outlives the registration (this block).
            let reg = unsafe {
                crate::register::HostRegistration::new(device.host_registrar(), ptr, memory.len())
            }
            .unwrap();
            assert!(is_host(reg.ptr()));
        }
        assert!(!is_host(ptr));
        drop(memory);
    }

    /// Runs only where a CUDA device exists (scripts/gpu-check.sh runs `cargo test -p tenso-gpu` and fails on it).
    #[test]
    fn round_trip_through_staging_reuses_buffers() {
        if !hardware() {
            return;
        }
        let chunk = 1 << 20;
        let device = Device::open(0, chunk).unwrap();
        let len = 5 * chunk + 12_345; // several chunks and a ragged tail
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        // Through DeviceMemory::alloc, which binds the primary context (Device::open left none bound on this thread);
        // freed by the buffer's Drop, which binds it again.
        let buf = device.alloc(len).unwrap();
        let dptr = buf.ptr();
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
        drop(buf);
        // The driver reports its errors where they happen, not at the next call: nothing was left pending.
        device.sync(0).unwrap();
    }

    /// Runs only where a CUDA device exists: after open and after each bind, the thread's context is what it was
    /// before (none on a fresh thread), so our calls must bind for themselves, as alloc does here.
    #[test]
    fn open_leaves_the_thread_as_it_found_it() {
        if !hardware() {
            return;
        }
        let before = result::ctx::get_current().unwrap();
        let device = Device::open(0, 1 << 20).unwrap();
        assert_eq!(result::ctx::get_current().unwrap(), before);
        {
            let _current = device.bind().unwrap();
            assert_eq!(
                result::ctx::get_current().unwrap(),
                Some(device.primary.ctx)
            );
        }
        assert_eq!(result::ctx::get_current().unwrap(), before);
        let buf = device.alloc(4096).unwrap();
        assert_eq!(buf.len(), 4096);
    }
}
