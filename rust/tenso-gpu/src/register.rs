//! Page-locking memory that someone else allocated (`cuMemHostRegister`), undone exactly once, in the process that
//! did it, before the memory goes away.
//!
//! The DataLoader pool (`tenso.torch.Collate(pin_memory=...)`) registers its whole shared-memory mapping once in the
//! process that consumes batches, so every batch tensor in it is already pinned: torch's pin-memory thread has
//! nothing to copy and `.to("cuda", non_blocking=True)` is a DMA straight out of the pool.
//!
//! [`HostRegistration`] is generic over a [`HostRegistrar`] (the driver in production, a fake in the tests), so its
//! bookkeeping is tested without a GPU:
//!
//! * registered once on construction, unregistered once on drop (never twice, never when registering failed);
//! * not unregistered in a `fork()`ed child that inherited the value: page-locking is driver state of the process
//!   that made it, and a child must not call into a CUDA driver initialised by its parent;
//! * the memory must stay mapped until the registration is dropped (the constructor's safety contract): the binding
//!   keeps it inside the object that owns the mapping and drops it before unmapping.

use std::ptr::NonNull;

use crate::GpuError;

/// Page-locks and unlocks host memory ranges.
///
/// # Safety
/// `register(ptr, len)` returning `Ok` must leave `ptr .. ptr + len` page-locked (or otherwise leave the memory
/// untouched), and `unregister(ptr)` must only undo a registration made by `register` with the same base address.
pub unsafe trait HostRegistrar {
    /// Page-locks `ptr .. ptr + len`.
    ///
    /// # Safety
    /// The range must be mapped host memory that stays mapped until [`HostRegistrar::unregister`] is called for it.
    unsafe fn register(&self, ptr: NonNull<u8>, len: usize) -> Result<(), GpuError>;

    /// Undoes `register(ptr, ..)`.
    ///
    /// # Safety
    /// `ptr` was registered by this registrar in this process and is still mapped; no copy reading it is in flight.
    unsafe fn unregister(&self, ptr: NonNull<u8>) -> Result<(), GpuError>;
}

/// A page-locked range of host memory: registered by [`HostRegistration::new`], unregistered when dropped.
#[derive(Debug)]
pub struct HostRegistration<R: HostRegistrar> {
    registrar: R,
    ptr: NonNull<u8>,
    len: usize,
    /// The process that registered; a forked child that inherits this value leaves the driver alone.
    pid: u32,
}

// SAFETY: the pointer is only an address handed back to the registrar (never dereferenced here); moving the value to
// another thread moves that duty, which the registrar allows when it is Send.
unsafe impl<R: HostRegistrar + Send> Send for HostRegistration<R> {}
// SAFETY: shared access reads the address and length only.
unsafe impl<R: HostRegistrar + Sync> Sync for HostRegistration<R> {}

impl<R: HostRegistrar> HostRegistration<R> {
    /// Page-locks `ptr .. ptr + len` through `registrar`.
    ///
    /// # Safety
    /// The range must be mapped host memory that stays mapped (no `munmap`, no `mremap`, no new mapping over it)
    /// until the returned value is dropped, and must not overlap another live registration.
    pub unsafe fn new(registrar: R, ptr: NonNull<u8>, len: usize) -> Result<Self, GpuError> {
        if len == 0 {
            // cuMemHostRegister refuses empty ranges; say so before the driver does.
            return Err(GpuError::BadLength { len });
        }
        // SAFETY: forwarded from the caller: mapped, and kept mapped until this value's drop unregisters it.
        unsafe { registrar.register(ptr, len) }?;
        Ok(Self {
            registrar,
            ptr,
            len,
            pid: std::process::id(),
        })
    }

    /// The first byte of the range.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Bytes page-locked.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty ranges are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// False in a `fork()`ed child that inherited this value: the registration is the parent's (dropping it there
    /// leaves the driver alone).
    pub fn made_in_this_process(&self) -> bool {
        std::process::id() == self.pid
    }

    /// The registrar.
    pub fn registrar(&self) -> &R {
        &self.registrar
    }
}

impl<R: HostRegistrar> Drop for HostRegistration<R> {
    fn drop(&mut self) {
        if !self.made_in_this_process() {
            // A fork()ed child: the registration belongs to the parent's driver state, which the child has no
            // business calling into; the child's copy of the mapping was never page-locked for it.
            return;
        }
        // SAFETY: registered in new() by this registrar, in this process (checked above); the constructor's contract
        // keeps the range mapped until now. A failure (driver torn down at process exit) leaves nothing to undo.
        let _ = unsafe { self.registrar.unregister(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Event, FakeRegistrar};

    fn range(bytes: &mut [u8]) -> (NonNull<u8>, usize) {
        (NonNull::from(&mut bytes[0]), bytes.len())
    }

    #[test]
    fn registers_once_and_unregisters_once_on_drop() {
        let fake = FakeRegistrar::default();
        let mut memory = vec![0u8; 4096];
        let (ptr, len) = range(&mut memory);
        // SAFETY: `memory` outlives the registration (dropped below, before it).
        let reg = unsafe { HostRegistration::new(fake.clone(), ptr, len) }.unwrap();
        assert_eq!((reg.ptr(), reg.len(), reg.is_empty()), (ptr, len, false));
        assert_eq!(
            fake.events(),
            vec![Event::Register(ptr.as_ptr() as usize, len)]
        );
        assert_eq!(fake.live(), 1);
        drop(reg);
        assert_eq!(
            fake.events(),
            vec![
                Event::Register(ptr.as_ptr() as usize, len),
                Event::Unregister(ptr.as_ptr() as usize)
            ]
        );
        assert_eq!(fake.live(), 0);
        drop(memory);
    }

    #[test]
    fn failed_registration_is_an_error_and_never_unregistered() {
        let fake = FakeRegistrar::default();
        fake.fail_next();
        let mut memory = vec![0u8; 64];
        let (ptr, len) = range(&mut memory);
        // SAFETY: as above.
        let err = unsafe { HostRegistration::new(fake.clone(), ptr, len) }.unwrap_err();
        assert!(
            matches!(
                err,
                GpuError::Driver {
                    call: "cuMemHostRegister",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(fake.events(), vec![]);
        assert_eq!(fake.live(), 0);
    }

    #[test]
    fn empty_ranges_are_refused_before_the_driver() {
        let fake = FakeRegistrar::default();
        let mut memory = [0u8; 1];
        // SAFETY: nothing is registered (len 0 is refused first).
        let err = unsafe { HostRegistration::new(fake.clone(), NonNull::from(&mut memory[0]), 0) }
            .unwrap_err();
        assert!(matches!(err, GpuError::BadLength { len: 0 }));
        assert_eq!(fake.events(), vec![]);
    }

    #[test]
    fn overlapping_registration_is_refused_and_the_first_survives() {
        // The driver refuses a range that overlaps a registered one (CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
        // the fake does too, and the refused attempt must not unregister the live one when it is dropped.
        let fake = FakeRegistrar::default();
        let mut memory = vec![0u8; 4096];
        let (ptr, len) = range(&mut memory);
        // SAFETY: as above.
        let first = unsafe { HostRegistration::new(fake.clone(), ptr, len) }.unwrap();
        // SAFETY: as above.
        let second = unsafe { HostRegistration::new(fake.clone(), ptr, len) };
        assert!(second.is_err());
        drop(second);
        assert_eq!(fake.live(), 1);
        drop(first);
        assert_eq!(fake.live(), 0);
    }

    #[test]
    fn a_forked_child_leaves_the_registration_alone() {
        let fake = FakeRegistrar::default();
        let mut memory = vec![0u8; 128];
        let (ptr, len) = range(&mut memory);
        // SAFETY: as above.
        let mut reg = unsafe { HostRegistration::new(fake.clone(), ptr, len) }.unwrap();
        // What a fork()ed child sees: the value made by another pid.
        reg.pid = reg.pid.wrapping_add(1);
        assert!(!reg.made_in_this_process());
        drop(reg);
        assert_eq!(
            fake.events(),
            vec![Event::Register(ptr.as_ptr() as usize, len)]
        );
        assert_eq!(
            fake.live(),
            1,
            "the parent's registration is not the child's to undo"
        );
    }
}
