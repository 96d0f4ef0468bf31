//! Binding a CUDA context on the calling thread for the length of a call, and giving the thread back as it was.
//!
//! Every driver call needs a context current on the calling thread (else `CUDA_ERROR_INVALID_CONTEXT`), and the
//! thread may be torch's or CuPy's, whose current device *is* the current context: leaving ours bound would
//! silently move their current device. [`bind`] makes a context current and returns a [`Bound`] guard that makes
//! the previous one current again on drop; binding the context that is already current changes nothing.
//!
//! Written against [`Contexts`] (the driver's `cuCtxGetCurrent` / `cuCtxSetCurrent`) so that the same code runs on
//! the CUDA driver (`driver.rs`) and on the tests' strict fake, whose every "driver call" fails like the driver
//! when no context of its device is bound on the calling thread.

use crate::GpuError;

/// The driver's notion of "the context current on this thread".
///
/// # Safety
/// `set` must make exactly `ctx` current on the calling thread and nothing else (implementations are the driver's
/// `cuCtxSetCurrent` or a fake of it).
pub(crate) unsafe trait Contexts {
    /// A context handle.
    type Ctx: Copy + PartialEq + std::fmt::Debug;
    /// The context current on this thread (None: no context).
    fn current(&self) -> Result<Option<Self::Ctx>, GpuError>;
    /// Makes `ctx` current on this thread (None: no context).
    ///
    /// # Safety
    /// `ctx` is a live context of this process (or None).
    unsafe fn set(&self, ctx: Option<Self::Ctx>) -> Result<(), GpuError>;
}

/// The context that was current before [`bind`], made current again on drop (on the thread that bound: not `Send`).
#[must_use = "the context is bound only while the guard lives"]
#[derive(Debug)]
pub(crate) struct Bound<'a, C: Contexts> {
    api: &'a C,
    /// Some(previous) when bind changed the current context.
    restore: Option<Option<C::Ctx>>,
    _not_send: std::marker::PhantomData<*const ()>,
}

/// Makes `ctx` current on the calling thread until the returned guard drops.
///
/// # Safety
/// `ctx` is a live context of this process and stays alive while the guard lives.
pub(crate) unsafe fn bind<C: Contexts>(api: &C, ctx: C::Ctx) -> Result<Bound<'_, C>, GpuError> {
    let previous = api.current()?;
    let restore = if previous == Some(ctx) {
        None
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { api.set(Some(ctx)) }?;
        Some(previous)
    };
    Ok(Bound {
        api,
        restore,
        _not_send: std::marker::PhantomData,
    })
}

impl<C: Contexts> Drop for Bound<'_, C> {
    fn drop(&mut self) {
        if let Some(previous) = self.restore {
            // SAFETY: previous was current on this thread when bind ran (or none), so it is a context its owner keeps
            // alive while it is current somewhere; making it current again changes nothing else.
            let _ = unsafe { self.api.set(previous) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeContexts, INVALID_CONTEXT};

    #[test]
    fn bind_restores_whatever_was_current() {
        let api = FakeContexts;
        let (ours, torchs) = (api.create(), api.create());
        // SAFETY: fake contexts are plain numbers (the test thread starts with none current).
        unsafe { api.set(None) }.unwrap();
        {
            // SAFETY: fake contexts are plain numbers.
            let _g = unsafe { bind(&api, ours) }.unwrap();
            assert_eq!(api.current().unwrap(), Some(ours));
            api.driver_call("cuMemAlloc", ours).unwrap();
        }
        assert_eq!(api.current().unwrap(), None, "no context left bound");
        // A thread of torch's, with its own device's context current: it gets it back.
        // SAFETY: as above.
        unsafe { api.set(Some(torchs)) }.unwrap();
        {
            // SAFETY: as above.
            let _g = unsafe { bind(&api, ours) }.unwrap();
            {
                // SAFETY: as above. Binding what is already bound is a no-op whose guard restores nothing.
                let _again = unsafe { bind(&api, ours) }.unwrap();
            }
            assert_eq!(api.current().unwrap(), Some(ours));
        }
        assert_eq!(api.current().unwrap(), Some(torchs));
    }

    #[test]
    fn the_strict_fake_refuses_calls_without_the_context() {
        // Issue #19 defect 1: a driver call made after `Device::open` gave the thread back (no context) fails with
        // CUDA_ERROR_INVALID_CONTEXT on the driver; the fake fails the same way, and also on another device's
        // context, and on another thread, which has no context of its own.
        let api = FakeContexts;
        let ours = api.create();
        // SAFETY: as below.
        unsafe { api.set(None) }.unwrap();
        let err = api.driver_call("cuMemAlloc", ours).unwrap_err();
        assert!(err.to_string().contains(INVALID_CONTEXT), "{err}");
        let other = api.create();
        // SAFETY: fake contexts are plain numbers.
        let _g = unsafe { bind(&api, other) }.unwrap();
        assert!(api.driver_call("cuPointerGetAttribute", ours).is_err());
        // SAFETY: as above.
        let _h = unsafe { bind(&api, ours) }.unwrap();
        api.driver_call("cuPointerGetAttribute", ours).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| assert!(api.driver_call("cuMemFree", ours).is_err()));
        });
    }

    #[test]
    fn device_operations_leave_a_foreign_context_current() {
        use crate::copy::{download, upload, DeviceBuf, DeviceMemory};
        use crate::fake::FakeDevice;
        // A thread of torch's with its own context current (say, another device's): every operation of ours binds
        // our context for itself and gives the thread back as it found it, frees included.
        let api = FakeContexts;
        let torchs = api.create();
        // SAFETY: fake contexts are plain numbers.
        unsafe { api.set(Some(torchs)) }.unwrap();
        let dev = FakeDevice::new(16);
        let buf = dev.alloc(40).unwrap();
        assert_eq!(api.current().unwrap(), Some(torchs));
        // SAFETY: buf holds 40 bytes of fake device memory.
        unsafe {
            upload(&dev, buf.ptr(), 40, |b| {
                b.fill(3);
                Ok(())
            })
        }
        .unwrap();
        let mut back = Vec::new();
        // SAFETY: as above.
        unsafe {
            download(&dev, buf.ptr(), 40, |b| {
                back.extend_from_slice(b);
                Ok(())
            })
        }
        .unwrap();
        assert_eq!((back, api.current().unwrap()), (vec![3; 40], Some(torchs)));
        drop(buf);
        assert_eq!(api.current().unwrap(), Some(torchs));
        // A call on our resources without binding our context fails like the driver.
        assert!(api.driver_call("cuMemAlloc", dev.context()).is_err());
        // SAFETY: as above.
        unsafe { api.set(None) }.unwrap();
    }
}
