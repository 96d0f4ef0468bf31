//! Test doubles: the heap standing in for pinned memory, and a "device" whose memory is a set of `Vec<u8>`s.
//!
//! The fake device is strict where a real one would silently corrupt data: copies run only at `sync` (so a staging
//! buffer reused before its stream was synchronised shows up as wrong bytes), copies outside an allocation are
//! errors, and `pending()` shows copies still in flight. Its driver rules: every call needs its context current on
//! the calling thread, every free counts as a device-wide synchronisation, and a context is usable only by the
//! process that created it (a `fork()`ed child gets the driver's `CUDA_ERROR_INITIALIZATION_ERROR`; tests play the
//! child on one thread with [`pretend_forked`]).

use std::alloc::Layout;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::copy::{CopyEngine, DevPtr, DeviceBuf, DeviceMemory, SLOTS};
use crate::pool::{HostAlloc, StagingPool};
use crate::GpuError;

/// The heap, with counters, standing in for cuMemHostAlloc.
#[derive(Debug, Default)]
pub(crate) struct Heap {
    pub live: std::sync::Arc<AtomicUsize>,
    pub fail: AtomicBool,
}

// SAFETY: alloc returns a fresh std::alloc allocation of len bytes, freed only by free with the same layout.
unsafe impl HostAlloc for Heap {
    fn alloc(&self, len: usize) -> Result<NonNull<u8>, GpuError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(GpuError::Driver {
                call: "cuMemHostAlloc",
                name: "CUDA_ERROR_OUT_OF_MEMORY".into(),
            });
        }
        let layout = Layout::from_size_align(len, 4096).expect("test sizes are small");
        // SAFETY: layout has a non-zero size (the pool refuses chunk 0).
        let ptr = NonNull::new(unsafe { std::alloc::alloc(layout) }).expect("test allocation");
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: NonNull<u8>, len: usize) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the caller passes back a pointer from alloc(len), made with this very layout.
        unsafe {
            std::alloc::dealloc(
                ptr.as_ptr(),
                Layout::from_size_align(len, 4096).expect("as in alloc"),
            )
        };
    }
}

enum Pending {
    H2d {
        dst: DevPtr,
        src: *const u8,
        len: usize,
    },
    D2h {
        dst: *mut u8,
        src: DevPtr,
        len: usize,
    },
}

#[derive(Default)]
struct Memory {
    /// (base address, bytes) of each live allocation.
    allocations: Vec<(DevPtr, Vec<u8>)>,
    next: DevPtr,
    queues: [Vec<Pending>; SLOTS],
    /// Copies that reached `sync` after their device memory was freed (a use after free on a real device).
    lost: usize,
    /// Device-wide synchronisations: every free counts as one (`cuMemFree` may wait for the whole device).
    device_syncs: usize,
}

impl Memory {
    fn find(&mut self, at: DevPtr, len: usize) -> Result<&mut [u8], GpuError> {
        for (base, bytes) in &mut self.allocations {
            let end = *base + bytes.len() as u64;
            if at >= *base && at <= end && at.checked_add(len as u64).is_some_and(|e| e <= end) {
                let from = (at - *base) as usize;
                return Ok(&mut bytes[from..from + len]);
            }
        }
        Err(GpuError::BadLength { len })
    }
}

/// A device whose memory is host `Vec<u8>`s at made-up addresses, with a context of its own: like `Device`, each
/// operation binds it for the call (restoring the thread's previous one) and every "driver call" inside checks it.
pub(crate) struct FakeDevice {
    pool: StagingPool<Heap>,
    mem: Rc<Mutex<Memory>>,
    ctx: u64,
}

impl FakeDevice {
    pub fn new(chunk: usize) -> Self {
        let mem = Memory {
            next: 0x1000,
            ..Memory::default()
        };
        Self {
            pool: StagingPool::new(Heap::default(), chunk).expect("chunk > 0"),
            mem: Rc::new(Mutex::new(mem)),
            ctx: FakeContexts.create(),
        }
    }

    /// This device's context.
    pub fn context(&self) -> u64 {
        self.ctx
    }

    /// Binds this device's context for one operation and checks it as the driver would.
    fn driver(
        &self,
        call: &'static str,
    ) -> Result<crate::context::Bound<'static, FakeContexts>, GpuError> {
        // SAFETY: fake contexts are plain numbers, valid forever.
        let bound = unsafe { crate::context::bind(&FakeContexts, self.ctx) }?;
        FakeContexts.driver_call(call, self.ctx)?;
        Ok(bound)
    }

    /// The bytes at `at .. at + len` (panics outside an allocation).
    pub fn read(&self, at: DevPtr, len: usize) -> Vec<u8> {
        self.mem.lock().unwrap().find(at, len).unwrap().to_vec()
    }

    /// Copies enqueued and not yet synchronised.
    pub fn pending(&self) -> usize {
        self.mem.lock().unwrap().queues.iter().map(Vec::len).sum()
    }

    /// Copies whose device memory was freed while they were still queued (must stay 0).
    pub fn lost(&self) -> usize {
        self.mem.lock().unwrap().lost
    }

    /// Device-wide synchronisations so far (each free of a fake allocation counts, as `cuMemFree` may wait for
    /// the whole device).
    pub fn device_syncs(&self) -> usize {
        self.mem.lock().unwrap().device_syncs
    }

    /// Live allocations.
    pub fn allocations(&self) -> usize {
        self.mem.lock().unwrap().allocations.len()
    }
}

// SAFETY: sync(slot) performs every copy queued on slot before returning; copies are range-checked against the
// allocations and refused outside them.
unsafe impl CopyEngine for FakeDevice {
    type Host = Heap;

    fn staging(&self) -> &StagingPool<Heap> {
        &self.pool
    }

    unsafe fn h2d(&self, slot: usize, dst: DevPtr, src: &[u8]) -> Result<(), GpuError> {
        let _current = self.driver("cuMemcpyHtoDAsync")?;
        let mut mem = self.mem.lock().unwrap();
        mem.find(dst, src.len())?;
        mem.queues[slot].push(Pending::H2d {
            dst,
            src: src.as_ptr(),
            len: src.len(),
        });
        Ok(())
    }

    unsafe fn d2h(&self, slot: usize, dst: &mut [u8], src: DevPtr) -> Result<(), GpuError> {
        let _current = self.driver("cuMemcpyDtoHAsync")?;
        let mut mem = self.mem.lock().unwrap();
        mem.find(src, dst.len())?;
        mem.queues[slot].push(Pending::D2h {
            dst: dst.as_mut_ptr(),
            src,
            len: dst.len(),
        });
        Ok(())
    }

    fn sync(&self, slot: usize) -> Result<(), GpuError> {
        let _current = self.driver("cuStreamSynchronize")?;
        let mut mem = self.mem.lock().unwrap();
        let queue = std::mem::take(&mut mem.queues[slot]);
        let mut result = Ok(());
        for copy in queue {
            // The ranges were checked when the copy was queued: one that is gone now was freed under the copy.
            let done = match copy {
                Pending::H2d { dst, src, len } => {
                    // SAFETY: h2d's contract keeps src valid and unmodified until this sync.
                    let host = unsafe { std::slice::from_raw_parts(src, len) };
                    mem.find(dst, len).map(|d| d.copy_from_slice(host))
                }
                Pending::D2h { dst, src, len } => {
                    // SAFETY: d2h's contract keeps dst valid and untouched by anyone else until this sync.
                    let host = unsafe { std::slice::from_raw_parts_mut(dst, len) };
                    mem.find(src, len).map(|d| host.copy_from_slice(d))
                }
            };
            if let Err(e) = done {
                mem.lost += 1;
                result = result.and(Err(e));
            }
        }
        result
    }
}

/// An allocation of the fake device.
#[derive(Debug)]
pub(crate) struct FakeBuf {
    ptr: DevPtr,
    len: usize,
    mem: Rc<Mutex<Memory>>,
    ctx: u64,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("allocations", &self.allocations.len())
            .finish()
    }
}

impl DeviceBuf for FakeBuf {
    fn ptr(&self) -> DevPtr {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for FakeBuf {
    fn drop(&mut self) {
        // As CudaBuf: a DLPack deleter may run on any thread, with any context current.
        // SAFETY: fake contexts are plain numbers, valid forever.
        let _current = unsafe { crate::context::bind(&FakeContexts, self.ctx) };
        FakeContexts
            .driver_call("cuMemFree", self.ctx)
            .expect("the free's context is bound");
        let mut mem = self.mem.lock().unwrap();
        mem.allocations.retain(|(base, _)| *base != self.ptr);
        mem.device_syncs += 1;
    }
}

impl DeviceMemory for FakeDevice {
    type Buf = FakeBuf;

    fn alloc(&self, len: usize) -> Result<FakeBuf, GpuError> {
        let _current = self.driver("cuMemAlloc")?;
        let mut mem = self.mem.lock().unwrap();
        let ptr = mem.next;
        // 256-byte aligned like cuMemAlloc, with a gap so that an overrun never lands in a neighbour.
        mem.next += (len as u64).div_ceil(256) * 256 + 256;
        mem.allocations.push((ptr, vec![0xEE; len]));
        Ok(FakeBuf {
            ptr,
            len,
            mem: Rc::clone(&self.mem),
            ctx: self.ctx,
        })
    }
}

/// What the fake registrar was asked to do, in order (addresses as integers for easy comparison).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Register(usize, usize),
    Unregister(usize),
}

#[derive(Debug, Default)]
struct Registrations {
    events: Vec<Event>,
    live: Vec<(usize, usize)>,
    fail_next: bool,
}

/// Stands in for cuMemHostRegister / cuMemHostUnregister: records calls, refuses overlapping ranges and
/// unregistering what is not registered, as the driver does.
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeRegistrar {
    state: std::sync::Arc<Mutex<Registrations>>,
}

impl FakeRegistrar {
    pub fn events(&self) -> Vec<Event> {
        self.state.lock().unwrap().events.clone()
    }

    /// Ranges registered now.
    pub fn live(&self) -> usize {
        self.state.lock().unwrap().live.len()
    }

    /// The next register call fails as the driver would without room to lock the pages.
    pub fn fail_next(&self) {
        self.state.lock().unwrap().fail_next = true;
    }
}

// SAFETY: the fake never touches the memory: register/unregister only record the range.
unsafe impl crate::register::HostRegistrar for FakeRegistrar {
    unsafe fn register(&self, ptr: NonNull<u8>, len: usize) -> Result<(), GpuError> {
        let mut s = self.state.lock().unwrap();
        let start = ptr.as_ptr() as usize;
        if std::mem::take(&mut s.fail_next) {
            return Err(GpuError::Driver {
                call: "cuMemHostRegister",
                name: "CUDA_ERROR_OUT_OF_MEMORY".into(),
            });
        }
        if s.live
            .iter()
            .any(|&(a, n)| start < a + n && a < start + len)
        {
            return Err(GpuError::Driver {
                call: "cuMemHostRegister",
                name: "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED".into(),
            });
        }
        s.live.push((start, len));
        s.events.push(Event::Register(start, len));
        Ok(())
    }

    unsafe fn unregister(&self, ptr: NonNull<u8>) -> Result<(), GpuError> {
        let mut s = self.state.lock().unwrap();
        let start = ptr.as_ptr() as usize;
        let Some(i) = s.live.iter().position(|&(a, _)| a == start) else {
            return Err(GpuError::Driver {
                call: "cuMemHostUnregister",
                name: "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED".into(),
            });
        };
        s.live.remove(i);
        s.events.push(Event::Unregister(start));
        Ok(())
    }
}

/// The driver's error name for a call made without a (or with the wrong) context current on the calling thread.
pub(crate) const INVALID_CONTEXT: &str = "CUDA_ERROR_INVALID_CONTEXT";

/// The driver's error name for a call in a `fork()`ed child on a context its parent created.
pub(crate) const FORKED_CHILD: &str = "CUDA_ERROR_INITIALIZATION_ERROR";

thread_local! {
    /// The fake's "context current on this thread" (0: none), per thread as the driver keeps it.
    static FAKE_CURRENT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The process id this thread acts as (None: the real one); set by [`pretend_forked`].
    static FAKE_PID: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// The process id the fake driver sees on this thread.
fn fake_pid() -> u32 {
    FAKE_PID
        .with(std::cell::Cell::get)
        .unwrap_or_else(std::process::id)
}

/// Which process created each fake context.
static CONTEXT_OWNERS: Mutex<Vec<(u64, u32)>> = Mutex::new(Vec::new());

/// Makes the calling thread act as a `fork()`ed child of this process (another pid, same memory) until the guard
/// is dropped: every fake driver call on a context created before then fails as in a real child.
pub(crate) fn pretend_forked() -> ForkedChild {
    FAKE_PID.with(|p| p.set(Some(std::process::id().wrapping_add(1))));
    ForkedChild
}

/// Guard of [`pretend_forked`].
pub(crate) struct ForkedChild;

impl Drop for ForkedChild {
    fn drop(&mut self) {
        FAKE_PID.with(|p| p.set(None));
    }
}

/// A strict fake of the driver's contexts: numbered contexts (unique in the process), one current per thread (none
/// on a new thread), and `driver_call`, which fails with `CUDA_ERROR_INVALID_CONTEXT` unless the given context is
/// current on the calling thread, as every driver call on a context's resources does.
#[derive(Debug, Default)]
pub(crate) struct FakeContexts;

static FAKE_CONTEXTS: AtomicUsize = AtomicUsize::new(0);

impl FakeContexts {
    /// A new context (not made current), owned by the process the calling thread acts as.
    pub fn create(&self) -> u64 {
        let ctx = FAKE_CONTEXTS.fetch_add(1, Ordering::Relaxed) as u64 + 1;
        CONTEXT_OWNERS.lock().unwrap().push((ctx, fake_pid()));
        ctx
    }

    /// A driver call on a resource of `ctx` (memory, stream, event).
    pub fn driver_call(&self, call: &'static str, ctx: u64) -> Result<(), GpuError> {
        let owner = CONTEXT_OWNERS
            .lock()
            .unwrap()
            .iter()
            .find(|(c, _)| *c == ctx)
            .map(|(_, pid)| *pid);
        if owner != Some(fake_pid()) {
            return Err(GpuError::Driver {
                call,
                name: FORKED_CHILD.into(),
            });
        }
        if FAKE_CURRENT.with(std::cell::Cell::get) == ctx {
            Ok(())
        } else {
            Err(GpuError::Driver {
                call,
                name: INVALID_CONTEXT.into(),
            })
        }
    }
}

// SAFETY: set makes exactly ctx current on the calling thread (the thread-local) and nothing else.
unsafe impl crate::context::Contexts for FakeContexts {
    type Ctx = u64;

    fn current(&self) -> Result<Option<u64>, GpuError> {
        Ok(Some(FAKE_CURRENT.with(std::cell::Cell::get)).filter(|&c| c != 0))
    }

    unsafe fn set(&self, ctx: Option<u64>) -> Result<(), GpuError> {
        FAKE_CURRENT.with(|c| c.set(ctx.unwrap_or(0)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver_error(r: Result<impl std::fmt::Debug, GpuError>) -> String {
        match r {
            Err(GpuError::Driver { name, .. }) => name,
            other => panic!("expected a driver error, got {other:?}"),
        }
    }

    #[test]
    fn a_forked_child_cannot_use_its_parents_device() {
        let dev = FakeDevice::new(16);
        let buf = dev.alloc(64).expect("the parent allocates");
        let host = [7u8; 16];
        {
            let _child = pretend_forked();
            assert_eq!(driver_error(dev.alloc(16)), FORKED_CHILD);
            // SAFETY: `host` outlives the (refused) copy; nothing is queued.
            let refused = unsafe { dev.h2d(0, buf.ptr(), &host) };
            assert_eq!(driver_error(refused), FORKED_CHILD);
            assert_eq!(driver_error(dev.sync(0)), FORKED_CHILD);
            // A device the child opens for itself works.
            let own = FakeDevice::new(16);
            assert!(own.alloc(16).is_ok());
        }
        // The parent is unaffected, and nothing the child tried reached the device.
        assert_eq!(dev.pending(), 0);
        // SAFETY: `host` outlives the copy, which `sync` completes below.
        unsafe { dev.h2d(0, buf.ptr(), &host) }.expect("the parent copies");
        dev.sync(0).expect("the parent syncs");
        assert_eq!(dev.read(buf.ptr(), 16), host);
        drop(buf);
        assert_eq!(
            dev.device_syncs(),
            1,
            "a free is a device-wide synchronisation"
        );
    }
}
