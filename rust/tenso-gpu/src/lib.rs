//! CUDA staging for tenso-ray: a pool of page-locked host buffers and chunked, double-buffered copies between a
//! byte stream and device memory.
//!
//! The CUDA driver is loaded with `dlopen` at run time (cudarc's `dynamic-loading`), so this crate builds and its
//! users load on machines without CUDA. cudarc panics on the first driver call when `libcuda` is absent, so every
//! entry point goes through [`available`], which checks for the library first and returns
//! [`GpuError::NoDriver`] instead.
//!
//! * [`pool::StagingPool`]: page-locked buffers allocated once and reused (it counts allocations, so a caller can
//!   prove there are none in steady state). Generic over [`pool::HostAlloc`] so its bookkeeping is tested without
//!   a GPU.
//! * [`copy`]: the [`copy::CopyEngine`] trait (enqueue a chunk on stream 0 or 1, wait for a stream) and the chunked,
//!   double-buffered upload/download written against it; [`packet`]: tenso packets streamed between a reader/writer
//!   and device memory on top of it. Both run unchanged on the CUDA engine and, in the tests, on a fake device whose
//!   memory is a `Vec<u8>` and whose copies happen only at `sync` (so a buffer reused too early shows).
//! * [`register`]: [`register::HostRegistration`], page-locking memory allocated elsewhere (the DataLoader pool's
//!   shared-memory mapping) once, undone once before it is unmapped; generic over [`register::HostRegistrar`].
//! * [`dlpack`]: the DLPack names of the wire dtypes (the binding builds the capsules with `dlpark`).
//! * `Device` (feature `cuda`): retains the device's *primary* context, the one torch and CuPy use, so device
//!   pointers from those frameworks are valid here; copies a reader into device memory and device memory into a
//!   writer in chunks, alternating two streams and two staging buffers so that filling one buffer overlaps the
//!   copy engine draining the other.
#![deny(missing_docs)]

#[cfg(any(feature = "cuda", test))]
mod context;
pub mod copy;
pub mod dlpack;
mod error;
#[cfg(test)]
mod fake;
pub mod packet;
pub mod pool;
pub mod process;
pub mod register;

#[cfg(feature = "cuda")]
mod driver;

#[cfg(feature = "cuda")]
pub use driver::{CudaBuf, CudaRegistrar, Current, Device, PinnedAlloc};
pub use error::GpuError;

/// The number of CUDA devices the driver reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCount(pub u32);

/// How many times this process asked the driver to initialise (each [`available`] call, which is `cuInit` where a
/// driver is present). Counted also where no driver is installed, so that a test on a machine without a GPU can
/// prove that a code path never reaches for CUDA (converting CPU tensors must not initialise it: start-up cost on
/// GPU nodes, and a process forked afterwards cannot use CUDA).
pub fn init_calls() -> u64 {
    INIT_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

static INIT_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether CUDA can be used here: the driver library loads, initialises, and reports how many devices it sees
/// (possibly 0). Never panics: a missing driver is [`GpuError::NoDriver`]. Counted by [`init_calls`].
pub fn available() -> Result<DeviceCount, GpuError> {
    INIT_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    #[cfg(feature = "cuda")]
    {
        driver::available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(GpuError::NotBuilt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_never_panics_and_is_consistent() {
        match available() {
            Ok(DeviceCount(_)) => {}
            Err(GpuError::NoDriver) | Err(GpuError::NotBuilt) => {}
            Err(e @ GpuError::Driver { .. }) => assert!(e.to_string().contains("cu"), "{e}"),
            Err(other) => panic!("unexpected error from available(): {other}"),
        }
    }

    #[test]
    fn every_probe_is_counted() {
        let before = init_calls();
        let _ = available();
        assert!(init_calls() > before);
    }
}
