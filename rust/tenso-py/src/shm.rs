//! Shared memory for Python: `tenso.TensoShm` (one packet in a segment) and `tenso.TensoCache` (the pool) are thin
//! Python classes over `_Shm` and `_Pool` here; the protocols live in `tenso-shm`.
//!
//! Every zero-copy array handed out has a `_Mapping` as its (indirect) `base`: the mapping stays mapped for as long
//! as any view of it lives, whatever `close()` was called on (for `_Pool.get(..., pin=True)` the base is a
//! `_PinnedEntry`, which holds the mapping and the entry's pin). Packets are encoded straight into the segment with
//! the codec's encode-into path and decoded as views over it. `tenso-shm` hands out ranges of the mapping and owns
//! the seqlock retry (`Pool::read`); only `PyMapping` turns ranges into addresses.

use std::mem::ManuallyDrop;
use std::ops::{Deref, Range};
use std::sync::Mutex;

use numpy::PyUntypedArray;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::{PyDict, PyList, PyMemoryView, PyTuple};
use pyo3::Py;
use tenso_format::EncodeOptions;
use tenso_gpu::register::HostRegistration;
use tenso_gpu::CudaRegistrar;
use tenso_shm::pool::{Batched, LeaseHandle, Packet, Park, Pinned, Room};
use tenso_shm::{Pool, Segment, ShmError};

use crate::buffers::{alloc_aligned, bytes_mut, descr_for, view_over, Source};
use crate::decode::Decoder;
use crate::encode::{encode_options, fill_slots, Collected, WalkOptions, DETACH_BYTES};
use crate::errors::{decode_error, encode_error, shm_error};

/// Whether process `pid` exists on this host and is not a zombie: `tenso_shm::lock::process_alive`, the check the
/// pool uses for its lock, pending entries, leases and pins, so that Python code judges liveness the same way.
#[pyfunction]
fn _process_alive(pid: u32) -> bool {
    tenso_shm::lock::process_alive(pid)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_process_alive, m)?)?;
    m.add_class::<PyMapping>()?;
    m.add_class::<PyShm>()?;
    m.add_class::<PyPool>()?;
    Ok(())
}

/// What a `_Mapping` maps.
enum Mapped {
    Segment(Segment),
    Pool(Pool),
}

/// A live mapping of a shared-memory segment: the owner (`base`) of every zero-copy view into it.
///
/// This is the one place where the binding turns positions into addresses. `tenso-shm` hands out *ranges* of the
/// mapping (`Packet::range`, `Reservation::range`, `Lease::range`), never pointers; the methods below check each
/// range against the mapping's length, add the mapping's base address, and make the NumPy view with an owner that
/// keeps the mapping mapped (this object, or a [`PyPinnedEntry`] holding it). The mapping is shared with other
/// processes: what a view shows can change unless the pool's protocol says otherwise (a pinned entry, a lease held
/// by this process, a segment whose single writer is this process).
#[pyclass(name = "_Mapping", module = "tenso", frozen, weakref)]
pub(crate) struct PyMapping {
    /// Unmapped in `Drop`, after `host` is undone (or left mapped in a forked child: see there).
    mapped: ManuallyDrop<Mapped>,
    /// The mapping page-locked for CUDA in this process (`_Pool._pin_host`), at most once; undone in `Drop` before
    /// `mapped` unmaps.
    host: Mutex<Option<HostRegistration<CudaRegistrar>>>,
}

impl Drop for PyMapping {
    fn drop(&mut self) {
        let host = self
            .host
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if host.as_ref().is_some_and(|h| !h.made_in_this_process()) {
            // A fork()ed child dropping the parent's pinned mapping. A driver may keep page-locked ranges out of
            // children (MADV_DONTFORK), in which case a mapping the child made since may sit at this very address:
            // leave the range alone (the child's pages of a shared segment cost nothing; they go when it exits).
            std::mem::forget(host);
            return;
        }
        // Unregister first, then unmap: the pages are never unmapped while the driver holds them locked. Nothing can
        // still read the memory: this object is the base of every view of it, and it is going away.
        drop(host);
        // SAFETY: `mapped` is dropped exactly once, here, and `self` is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.mapped) };
    }
}

impl PyMapping {
    /// The address of `range`, after checking that it lies inside the mapping.
    fn address(&self, range: &Range<usize>) -> PyResult<*mut u8> {
        if range.start > range.end || range.end > self.len() {
            return Err(PyRuntimeError::new_err(format!(
                "range {range:?} outside the shared memory mapping of {} bytes",
                self.len()
            )));
        }
        let base = match &*self.mapped {
            Mapped::Segment(s) => s.as_ptr(),
            Mapped::Pool(p) => p.segment().as_ptr(),
        };
        // SAFETY: range.start <= len, so the result stays inside (or one past the end of) the mapping.
        Ok(unsafe { base.add(range.start) })
    }

    /// A read-only uint8 array over `range` of `slf`'s mapping, with `slf` as its base.
    fn view<'py>(slf: &Bound<'py, PyMapping>, range: Range<usize>) -> PyResult<Bound<'py, PyAny>> {
        let ptr = slf.get().address(&range)?;
        // SAFETY: `range` lies in the mapping (checked by `address`), which the base `slf` keeps mapped.
        unsafe { bytes_view(slf.as_any(), ptr, range.len(), false) }
    }

    /// A writeable uint8 array over `range` of `slf`'s mapping, with `slf` as its base.
    ///
    /// # Safety
    /// This process must be allowed to write `range` for as long as the array lives: a lease it holds, a
    /// reservation it is writing, or a segment whose writes the application coordinates (`TensoShm.buffer`).
    unsafe fn view_mut<'py>(
        slf: &Bound<'py, PyMapping>,
        range: Range<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ptr = slf.get().address(&range)?;
        // SAFETY: `range` lies in the mapping (checked by `address`), which the base `slf` keeps mapped; the caller
        // may write it.
        unsafe { bytes_view(slf.as_any(), ptr, range.len(), true) }
    }

    /// A read-only uint8 array over `range` of the mapping held by `owner`, with `owner` as its base: the pin stays
    /// held for as long as any view of the array lives.
    fn pinned_view<'py>(
        owner: &Bound<'py, PyPinnedEntry>,
        range: Range<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mapping = &owner.get().pinned.owner().0;
        let ptr = mapping.get().address(&range)?;
        // SAFETY: `range` lies in the mapping (checked), which `owner` keeps mapped through its `Py<PyMapping>`.
        unsafe { bytes_view(owner.as_any(), ptr, range.len(), false) }
    }

    /// `range` of the mapping as a mutable slice.
    ///
    /// # Safety
    /// The caller must be the only writer of `range` while the slice lives (a pool reservation or lease, or the
    /// single writer of a segment) and must not let the slice outlive its borrow of `self`.
    #[expect(
        clippy::mut_from_ref,
        reason = "the memory is the shared mapping's, not this object's; exclusivity is the caller's contract"
    )]
    unsafe fn bytes_mut(&self, range: Range<usize>) -> PyResult<&mut [u8]> {
        let ptr = self.address(&range)?;
        // SAFETY: inside the mapping (checked), which `self` keeps mapped for the borrow; exclusive by contract.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, range.len()) })
    }

    fn len(&self) -> usize {
        match &*self.mapped {
            Mapped::Segment(s) => s.len(),
            Mapped::Pool(p) => p.segment().len(),
        }
    }

    fn pool(&self) -> &Pool {
        match &*self.mapped {
            Mapped::Pool(p) => p,
            Mapped::Segment(_) => unreachable!("a _Pool always maps a pool"),
        }
    }
}

#[pymethods]
impl PyMapping {
    fn __repr__(&self) -> String {
        let name = match &*self.mapped {
            Mapped::Segment(s) => s.name(),
            Mapped::Pool(p) => p.name(),
        };
        format!(
            "<tenso shared memory mapping {name:?}, {} bytes>",
            self.len()
        )
    }
}

/// A handle that can be closed: holds the mapping until `close()`.
struct Handle {
    mapping: Mutex<Option<Py<PyMapping>>>,
    what: &'static str,
}

impl Handle {
    fn new(py: Python<'_>, mapped: Mapped, what: &'static str) -> PyResult<Self> {
        Ok(Handle {
            mapping: Mutex::new(Some(Py::new(
                py,
                PyMapping {
                    mapped: ManuallyDrop::new(mapped),
                    host: Mutex::new(None),
                },
            )?)),
            what,
        })
    }

    fn get<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMapping>> {
        let guard = self.mapping.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(m) => Ok(m.bind(py).clone()),
            None => Err(PyRuntimeError::new_err(format!("{} is closed", self.what))),
        }
    }

    fn close(&self) {
        let taken = self
            .mapping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(taken);
    }
}

/// An object walked and laid out, ready to be written into `len` bytes.
struct Prepared<'py> {
    collected: Collected<'py>,
    opts: EncodeOptions,
    len: usize,
}

fn prepare<'py>(
    obj: &Bound<'py, PyAny>,
    check_integrity: bool,
    compress: bool,
    alignment: i128,
) -> PyResult<Prepared<'py>> {
    let opts = encode_options(check_integrity, alignment, 4)?;
    let collected = Collected::walk(
        obj,
        WalkOptions {
            strict: false,
            compress,
            defer_all: false,
        },
    )?;
    let len = tenso_format::plan(&collected.item(), &opts)
        .map_err(encode_error)?
        .len;
    Ok(Prepared {
        collected,
        opts,
        len,
    })
}

/// Writes a prepared packet at the start of `range` of `owner`'s mapping.
///
/// # Safety
/// `range` must hold at least `prepared.len` bytes that nobody else writes until this returns.
unsafe fn write_packet(
    py: Python<'_>,
    owner: &Bound<'_, PyMapping>,
    prepared: &Prepared<'_>,
    range: Range<usize>,
) -> PyResult<()> {
    let len = prepared.len;
    let range = range.start..range.start + len;
    let item = prepared.collected.item();
    let plan = {
        // SAFETY: the caller guarantees that only we write these bytes for the duration of this call.
        let buf = unsafe { owner.get().bytes_mut(range.clone())? };
        let opts = &prepared.opts;
        let mut run = || tenso_format::encode_into(&item, opts, buf);
        if len >= DETACH_BYTES {
            py.detach(run)
        } else {
            run()
        }
        .map_err(encode_error)?
    };
    if !plan.slots.is_empty() {
        // Gathered bodies (non-contiguous, byte-swapped) are copied by NumPy into their slots of a uint8 view.
        // SAFETY: we are these bytes' only writer until this returns (the caller's guarantee); the view does not
        // outlive this function.
        let out = unsafe { PyMapping::view_mut(owner, range)? };
        let out = out.cast_into::<PyUntypedArray>()?;
        fill_slots(&out, &plan.slots, &prepared.collected)?;
        // SAFETY: the temporary views made by fill_slots are gone; `out` covers exactly our `len` bytes.
        let buf = unsafe { bytes_mut(&out, len) };
        let opts = &prepared.opts;
        if len >= DETACH_BYTES {
            py.detach(|| tenso_format::seal_with(buf, &plan.slots, opts));
        } else {
            tenso_format::seal_with(buf, &plan.slots, opts);
        }
    }
    Ok(())
}

/// A uint8 array over `len` bytes at `ptr`, with `owner` as its base (used by [`PyMapping`] only).
///
/// # Safety
/// `ptr..ptr + len` must lie inside a mapping that `owner` keeps mapped; with `writeable`, this process must be
/// allowed to write those bytes.
unsafe fn bytes_view<'py>(
    owner: &Bound<'py, PyAny>,
    ptr: *const u8,
    len: usize,
    writeable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let py = owner.py();
    // SAFETY: forwarded: the range lies in the mapping, which `owner` (the base) keeps mapped.
    unsafe {
        view_over(
            owner,
            descr_for(py, tenso_format::DType::UInt8)?,
            &[len as u64],
            ptr,
            writeable,
        )
    }
}

/// Decodes the packet in `bytes` (a uint8 array) as zero-copy views over it.
fn decode_from<'py>(bytes: &Bound<'py, PyAny>, writeable: bool) -> PyResult<Bound<'py, PyAny>> {
    Decoder::decode(&Source::new(bytes)?, false, writeable)
}

// ---------------------------------------------------------------------------------------------------------------
// _Shm
// ---------------------------------------------------------------------------------------------------------------

/// One packet in a named POSIX shared-memory segment (the engine of `tenso.TensoShm`).
///
/// The segment holds the packet at offset 0, exactly as tenso 0.24.0 lays it out. One process writes it (`put`);
/// readers' views show whatever is there, so a `put` while readers hold views changes what they see.
#[pyclass(name = "_Shm", module = "tenso", frozen)]
pub(crate) struct PyShm {
    handle: Handle,
    name: String,
    size: usize,
}

impl PyShm {
    fn from_segment(py: Python<'_>, seg: Segment) -> PyResult<Self> {
        let (name, size) = (seg.name().to_owned(), seg.len());
        Ok(PyShm {
            handle: Handle::new(py, Mapped::Segment(seg), "TensoShm")?,
            name,
            size,
        })
    }
}

#[pymethods]
impl PyShm {
    /// Creates a new segment of `size` bytes (reserved now: a full /dev/shm fails here, not later with SIGBUS).
    #[staticmethod]
    #[pyo3(signature = (name, size, mode=0o600))]
    fn create(py: Python<'_>, name: &str, size: u64, mode: u32) -> PyResult<Self> {
        let seg = py
            .detach(|| Segment::create(name, size, mode, false))
            .map_err(shm_error)?;
        Self::from_segment(py, seg)
    }

    /// Opens an existing segment.
    #[staticmethod]
    fn open(py: Python<'_>, name: &str) -> PyResult<Self> {
        let seg = Segment::open(name, false).map_err(shm_error)?;
        Self::from_segment(py, seg)
    }

    /// Creates a segment sized to the packet of `obj` and writes the packet into it (one encode, no copy).
    #[staticmethod]
    #[pyo3(signature = (name, obj, check_integrity=false, compress=false, alignment=64, mode=0o600))]
    fn create_from(
        py: Python<'_>,
        name: &str,
        obj: &Bound<'_, PyAny>,
        check_integrity: bool,
        compress: bool,
        alignment: i128,
        mode: u32,
    ) -> PyResult<Self> {
        let prepared = prepare(obj, check_integrity, compress, alignment)?;
        let seg = py
            .detach(|| Segment::create(name, prepared.len.max(1) as u64, mode, true))
            .map_err(shm_error)?;
        let shm = Self::from_segment(py, seg)?;
        let mapping = shm.handle.get(py)?;
        // SAFETY: the segment is new and `prepared.len` bytes long; its name is not known to anyone else yet.
        let written = unsafe { write_packet(py, &mapping, &prepared, 0..prepared.len) };
        if let Err(e) = written {
            let _ = tenso_shm::unlink(name);
            return Err(e);
        }
        Ok(shm)
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    /// The whole segment as a writeable memoryview (its owner keeps the mapping alive).
    #[getter]
    fn buffer<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMemoryView>> {
        let mapping = self.handle.get(py)?;
        let len = mapping.get().len();
        // SAFETY: the segment's raw buffer, whose writes are coordinated by the application (see the type docs).
        let array = unsafe { PyMapping::view_mut(&mapping, 0..len)? };
        PyMemoryView::from(&array)
    }

    /// Encodes `obj` at offset 0; returns the packet length.
    #[pyo3(signature = (obj, check_integrity=false, compress=false, alignment=64))]
    fn put(
        &self,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        check_integrity: bool,
        compress: bool,
        alignment: i128,
    ) -> PyResult<usize> {
        let mapping = self.handle.get(py)?;
        let prepared = prepare(obj, check_integrity, compress, alignment)?;
        if prepared.len > self.size {
            return Err(PyValueError::new_err(format!(
                "the packet needs {} bytes, the shared memory segment holds {}",
                prepared.len, self.size
            )));
        }
        // SAFETY: prepared.len <= the mapping's size; this process is the segment's writer (type docs).
        unsafe { write_packet(py, &mapping, &prepared, 0..prepared.len)? };
        Ok(prepared.len)
    }

    /// Decodes the packet at offset 0 as read-only zero-copy views whose base keeps the mapping alive.
    fn get<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mapping = self.handle.get(py)?;
        let len = mapping.get().len();
        let bytes = PyMapping::view(&mapping, 0..len)?;
        decode_from(&bytes, false)
    }

    /// Drops this handle's mapping; views already handed out keep theirs.
    fn close(&self) {
        self.handle.close();
    }

    /// Removes the segment's name (mappings stay valid).
    fn unlink(&self) -> PyResult<()> {
        tenso_shm::unlink(&self.name).map_err(shm_error)
    }
}

/// Waits (for an entry being rewritten in place, or for the pool lock) only with the GIL released: the writer may be
/// a thread of this process that needs the GIL to finish (NumPy's gathering copy releases and retakes it).
struct Detach<'py>(Python<'py>);

impl Park for Detach<'_> {
    fn park<T: Send>(&self, wait: impl FnOnce() -> T + Send) -> T {
        self.0.detach(wait)
    }
}

/// A handle on a pool's mapping that derefs to the pool: what a [`Pinned`] owner holds, so that it is `'static`.
struct MappingRef(Py<PyMapping>);

impl Deref for MappingRef {
    type Target = Pool;

    fn deref(&self) -> &Pool {
        self.0.get().pool()
    }
}

/// The base of the views of a `get(..., pin=True)`: holds the entry's pin (and the mapping) for as long as any of
/// those views lives, and gives the pin back when the last one goes. The views of a `get_many(..., pin=True)` share
/// one, which holds the pins of all their entries.
#[pyclass(name = "_PinnedEntry", module = "tenso", frozen)]
pub(crate) struct PyPinnedEntry {
    pinned: Pinned<MappingRef>,
}

/// A private, aligned copy of the packet (the large copies run with the GIL released).
fn copy_packet<'py>(py: Python<'py>, packet: &Packet<'_>) -> PyResult<Bound<'py, PyUntypedArray>> {
    let len = packet.len();
    let out = alloc_aligned(py, len)?;
    // SAFETY: `out` is fresh and exclusively ours, `len` bytes.
    let dst = unsafe { bytes_mut(&out, len) };
    if len >= DETACH_BYTES {
        py.detach(|| packet.copy_to(dst));
    } else {
        packet.copy_to(dst);
    }
    Ok(out)
}

/// What a pinned read produced.
enum Got<'py> {
    /// Decoded views whose base holds the pin.
    Views(Bound<'py, PyAny>),
    /// The pin table was full: a private copy, decoded once it is known to be whole.
    Copy(Bound<'py, PyUntypedArray>),
}

/// One `get` of `key` (see `_Pool.get`).
fn get_value<'py>(
    py: Python<'py>,
    mapping: &Bound<'py, PyMapping>,
    key: &str,
    copy: bool,
    pin: bool,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let pool = mapping.get().pool();
    let park = Detach(py);
    let key = key.as_bytes();
    if copy {
        let got = pool
            .read(key, &park, |packet| copy_packet(py, packet))
            .map_err(shm_error)?;
        return got.map(|out| decode_from(out?.as_any(), true)).transpose();
    }
    if pin {
        let got = pool
            .read_pinned(key, &park, |packet, pin| match pin {
                Some(pin) => {
                    let owner = Bound::new(
                        py,
                        PyPinnedEntry {
                            pinned: Pinned::new(MappingRef(mapping.clone().unbind()), pin),
                        },
                    )?;
                    let bytes = PyMapping::pinned_view(&owner, packet.range())?;
                    decode_from(&bytes, false).map(Got::Views)
                }
                None => copy_packet(py, packet).map(Got::Copy),
            })
            .map_err(shm_error)?;
        return match got.transpose()? {
            None => Ok(None),
            Some(Got::Views(value)) => Ok(Some(value)),
            Some(Got::Copy(out)) => decode_from(out.as_any(), false).map(Some),
        };
    }
    pool.read(key, &park, |packet| {
        let bytes = PyMapping::view(mapping, packet.range())?;
        decode_from(&bytes, false)
    })
    .map_err(shm_error)?
    .transpose()
}

/// `get_many(keys, pin=True)`: every entry found is pinned under one lock acquisition and one `_PinnedEntry` holds
/// all the pins (the base of every view); keys the batch could not pin go through [`get_value`] one by one.
fn get_many_pinned<'py>(
    py: Python<'py>,
    mapping: &Bound<'py, PyMapping>,
    keys: &[String],
) -> PyResult<Vec<Option<Bound<'py, PyAny>>>> {
    let pool = mapping.get().pool();
    let raw: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let batch = pool
        .read_pinned_many(&raw, &Detach(py))
        .map_err(shm_error)?;
    let pins: Vec<_> = batch
        .iter()
        .filter_map(|got| match got {
            Batched::Pinned(_, pin) => Some(*pin),
            _ => None,
        })
        .collect();
    // Owns the pins from here on: an error below drops it, which gives them all back.
    let owner = if pins.is_empty() {
        None
    } else {
        Some(Bound::new(
            py,
            PyPinnedEntry {
                pinned: Pinned::many(MappingRef(mapping.clone().unbind()), pins),
            },
        )?)
    };
    batch
        .iter()
        .zip(keys)
        .map(|(got, key)| match (got, &owner) {
            (Batched::Pinned(packet, _), Some(owner)) => {
                let bytes = PyMapping::pinned_view(owner, packet.range())?;
                decode_from(&bytes, false).map(Some)
            }
            (Batched::Missing, _) => Ok(None),
            _ => get_value(py, mapping, key, false, true),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// _Pool
// ---------------------------------------------------------------------------------------------------------------

/// The TensoCache pool of `tenso-shm` (the engine of `tenso.TensoCache`).
#[pyclass(name = "_Pool", module = "tenso", frozen)]
pub(crate) struct PyPool {
    handle: Handle,
    name: String,
}

fn ttl_ns(ttl: Option<f64>) -> PyResult<u64> {
    match ttl {
        None => Ok(0),
        Some(t) if t.is_nan() || t < 0.0 => Err(PyValueError::new_err(
            "ttl must be a non-negative number of seconds",
        )),
        // 0 means no expiry, as in tenso 0.24.0.
        Some(t) => Ok((t * 1e9).min(u64::MAX as f64 / 2.0) as u64),
    }
}

/// A lease handle as Python sees it: `(slot, stamp, offset, len, reference, tag)`.
type LeaseTuple = (u32, u64, u64, u64, u32, u64);

fn lease_tuple<'py>(py: Python<'py>, h: &LeaseHandle) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        [
            u64::from(h.slot),
            h.stamp,
            h.offset,
            h.len,
            u64::from(h.reference),
            h.tag,
        ],
    )
}

fn lease_handle(t: LeaseTuple) -> LeaseHandle {
    LeaseHandle {
        slot: t.0,
        stamp: t.1,
        offset: t.2,
        len: t.3,
        reference: t.4,
        tag: t.5,
    }
}

#[pymethods]
impl PyPool {
    /// Creates a pool of `size` bytes (reserved and pre-faulted now).
    #[staticmethod]
    #[pyo3(signature = (name, size, max_entries=None, mode=0o600))]
    fn create(
        py: Python<'_>,
        name: &str,
        size: u64,
        max_entries: Option<u64>,
        mode: u32,
    ) -> PyResult<Self> {
        let pool = py
            .detach(|| Pool::create(name, size, max_entries, mode))
            .map_err(shm_error)?;
        let name = pool.name().to_owned();
        Ok(PyPool {
            handle: Handle::new(py, Mapped::Pool(pool), "TensoCache")?,
            name,
        })
    }

    /// Opens an existing pool by name.
    #[staticmethod]
    fn open(py: Python<'_>, name: &str) -> PyResult<Self> {
        let pool = py.detach(|| Pool::open(name)).map_err(shm_error)?;
        let name = pool.name().to_owned();
        Ok(PyPool {
            handle: Handle::new(py, Mapped::Pool(pool), "TensoCache")?,
            name,
        })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Encodes `obj` straight into pool memory under `key`; returns the packet length. With `evict=False` no live
    /// entry is evicted to make room (the put raises `TensoCacheFullError` instead).
    #[pyo3(signature = (key, obj, ttl=None, evict=true))]
    fn put(
        &self,
        py: Python<'_>,
        key: &str,
        obj: &Bound<'_, PyAny>,
        ttl: Option<f64>,
        evict: bool,
    ) -> PyResult<usize> {
        let mapping = self.handle.get(py)?;
        let pool = mapping.get().pool();
        if key.len() > tenso_shm::pool::MAX_KEY_LEN {
            return Err(shm_error(ShmError::KeyTooLong {
                len: key.len(),
                limit: tenso_shm::pool::MAX_KEY_LEN,
            }));
        }
        let ttl = ttl_ns(ttl)?;
        let prepared = prepare(obj, false, false, 64)?;
        // Reserve and commit may wait for another put of the same key that is writing in place, possibly a thread
        // of this process that needs the GIL to finish: wait with the GIL released.
        let len = prepared.len as u64;
        let reservation = py
            .detach(|| {
                let room = if evict {
                    Room::EvictLru
                } else {
                    Room::FreeOnly
                };
                pool.reserve_with(key.as_bytes(), len, ttl, room)
            })
            .map_err(shm_error)?;
        // SAFETY: the reservation is prepared.len bytes of the pool's data region that no other writer touches until
        // commit; on error it is dropped, which frees it.
        unsafe { write_packet(py, &mapping, &prepared, reservation.range())? };
        py.detach(move || reservation.commit()).map_err(shm_error)?;
        Ok(prepared.len)
    }

    /// The value of `key`: zero-copy read-only views over pool memory, or (`copy=True`) a whole, writeable copy.
    /// With `pin=True` the views pin their entry (it is neither evicted nor changed) until the last of them is
    /// garbage-collected; if the pool's pin table is full, a private read-only copy is returned instead.
    #[pyo3(signature = (key, copy=false, pin=false))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        copy: bool,
        pin: bool,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let mapping = self.handle.get(py)?;
        get_value(py, &mapping, key, copy, pin)
    }

    /// The values of `keys` in one call (None for each missing one): what `get` gives for each. With `pin=True`
    /// the entries are pinned together (one lock acquisition) and the views of all of them share one base, which
    /// holds every pin until the last of those views is garbage-collected.
    #[pyo3(signature = (keys, copy=false, pin=false))]
    fn get_many<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
        copy: bool,
        pin: bool,
    ) -> PyResult<Vec<Option<Bound<'py, PyAny>>>> {
        let mapping = self.handle.get(py)?;
        if pin && !copy {
            return get_many_pinned(py, &mapping, &keys);
        }
        keys.iter()
            .map(|key| get_value(py, &mapping, key, copy, pin))
            .collect()
    }

    /// Removes `key`; true if it was there (and not expired).
    fn delete(&self, py: Python<'_>, key: &str) -> PyResult<bool> {
        let mapping = self.handle.get(py)?;
        let pool = mapping.get().pool();
        // May wait for an in-place write (see `put`).
        py.detach(|| pool.delete(key.as_bytes())).map_err(shm_error)
    }

    /// Live, unexpired keys.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mapping = self.handle.get(py)?;
        let keys = mapping.get().pool().keys();
        PyList::new(
            py,
            keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()),
        )
    }

    /// Header facts of `key`'s packet without decoding it, plus size, ttl and age.
    fn info<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        let mapping = self.handle.get(py)?;
        let pool = mapping.get().pool();
        // Metadata only: not counted as a get.
        let Some((hit, prefix)) = pool
            .peek(key.as_bytes(), &Detach(py), |packet| {
                let mut prefix = vec![0u8; packet.len().min(64 * 1024)];
                packet.copy_to(&mut prefix);
                (*packet.hit(), prefix)
            })
            .map_err(shm_error)?
        else {
            return Ok(None);
        };
        let info = tenso_format::packet_info(&prefix).map_err(decode_error)?;
        let dict = PyDict::new(py);
        dict.set_item("shape", PyTuple::new(py, &info.shape)?)?;
        match (info.dtype, info.quantized) {
            (Some(dtype), _) => match descr_for(py, dtype) {
                Ok(descr) => dict.set_item("dtype", descr)?,
                Err(_) => dict.set_item("dtype", dtype.name())?,
            },
            (None, Some(q)) => dict.set_item("dtype", q.name())?,
            (None, None) => dict.set_item("dtype", py.None())?,
        }
        dict.set_item("ndim", info.ndim)?;
        dict.set_item("size_bytes", hit.len)?;
        dict.set_item(
            "ttl",
            if hit.ttl_ns == 0 {
                None
            } else {
                Some(hit.ttl_ns as f64 / 1e9)
            },
        )?;
        dict.set_item("age", hit.age_secs())?;
        Ok(Some(dict))
    }

    /// Pool counters (consistent with each other).
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mapping = self.handle.get(py)?;
        let s = mapping.get().pool().stats();
        let dict = PyDict::new(py);
        dict.set_item("entries", s.entries)?;
        dict.set_item("max_entries", s.max_entries)?;
        dict.set_item("pool_size", s.pool_size)?;
        dict.set_item("used_bytes", s.used_bytes)?;
        dict.set_item("free_bytes", s.free_bytes)?;
        dict.set_item("data_region_size", s.data_region_size)?;
        dict.set_item("hits", s.hits)?;
        dict.set_item("misses", s.misses)?;
        let gets = s.hits + s.misses;
        dict.set_item(
            "hit_rate",
            if gets == 0 {
                0.0
            } else {
                s.hits as f64 / gets as f64
            },
        )?;
        dict.set_item("pending", s.pending)?;
        dict.set_item("recoveries", s.recoveries)?;
        dict.set_item("pinned", s.pinned)?;
        dict.set_item("evictions", s.evictions)?;
        Ok(dict)
    }

    /// Removes every entry.
    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        let mapping = self.handle.get(py)?;
        mapping.get().pool().clear();
        Ok(())
    }

    /// Checks the pool's structural invariants; raises RuntimeError naming the first one broken.
    fn _check(&self, py: Python<'_>) -> PyResult<()> {
        let mapping = self.handle.get(py)?;
        mapping
            .get()
            .pool()
            .check()
            .map_err(PyRuntimeError::new_err)
    }

    /// Leases `n` bytes of recycled, pre-faulted pool memory: returns `(handle, memoryview)`, the view writeable
    /// for this process to fill the block before it hands the handle on. The block has one reference, this
    /// process's, until `_adopt(handle)` by another or `_release(handle)`; it is freed with its last reference (and
    /// a dead process's references are cleared).
    fn _lease<'py>(
        &self,
        py: Python<'py>,
        n: u64,
    ) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyMemoryView>)> {
        let mapping = self.handle.get(py)?;
        let pool = mapping.get().pool();
        let lease = pool.lease(n).map_err(shm_error)?;
        let range = lease.range();
        let handle = lease.into_handle();
        // SAFETY: the block was just made with a single reference, this process's, and its handle is not out yet:
        // this process is its only writer until it hands the handle on (and, by contract, stops writing then).
        let view = unsafe { PyMapping::view_mut(&mapping, range)? };
        Ok((lease_tuple(py, &handle)?, PyMemoryView::from(&view)?))
    }

    /// A new reference to the block of `handle` (a reference this process holds), held by this process until
    /// another adopts it: how a holder hands the block on without copying it.
    fn _share<'py>(&self, py: Python<'py>, handle: LeaseTuple) -> PyResult<Bound<'py, PyTuple>> {
        let mapping = self.handle.get(py)?;
        let shared = mapping
            .get()
            .pool()
            .share(lease_handle(handle))
            .map_err(shm_error)?;
        lease_tuple(py, &shared)
    }

    /// Takes over the reference `handle` names (made by another process); returns the block's memory: writeable
    /// when `writeable` and this is the block's only reference (a batch handed over once), read-only otherwise
    /// (published bytes that other holders may be reading are never written).
    #[pyo3(signature = (handle, writeable=true))]
    fn _adopt<'py>(
        &self,
        py: Python<'py>,
        handle: LeaseTuple,
        writeable: bool,
    ) -> PyResult<Bound<'py, PyMemoryView>> {
        let mapping = self.handle.get(py)?;
        let pool = mapping.get().pool();
        let lease = pool.adopt(lease_handle(handle)).map_err(shm_error)?;
        let range = lease.range();
        let handle = lease.into_handle();
        let view = if writeable && pool.references(&handle) == 1 {
            // SAFETY: this process holds the block's only reference, and nobody else can make one (sharing needs a
            // reference): it is the block's only reader and writer.
            unsafe { PyMapping::view_mut(&mapping, range)? }
        } else {
            PyMapping::view(&mapping, range)?
        };
        PyMemoryView::from(&view)
    }

    /// Drops the reference `handle` names (this process must hold it); the last reference frees the block.
    fn _release(&self, py: Python<'_>, handle: LeaseTuple) -> PyResult<()> {
        let mapping = self.handle.get(py)?;
        mapping
            .get()
            .pool()
            .release(lease_handle(handle))
            .map_err(shm_error)
    }

    /// How many references the block of `handle` has (0 once it is freed).
    fn _references(&self, py: Python<'_>, handle: LeaseTuple) -> PyResult<u32> {
        let mapping = self.handle.get(py)?;
        Ok(mapping.get().pool().references(&lease_handle(handle)))
    }

    /// Page-locks the whole mapping for CUDA (in device `device_id`'s primary context, portable to every context),
    /// once per mapping and process: views of it are then pinned memory for torch (`is_pinned()`) and the copy
    /// engine. Returns False if it already was. Undone when the mapping goes away (the last view and this handle
    /// gone, or at exit), never before. Raises RuntimeError without a CUDA driver or device.
    fn _pin_host(&self, py: Python<'_>, device_id: i64) -> PyResult<bool> {
        let mapping = self.handle.get(py)?;
        let m = mapping.get();
        let mut host = m
            .host
            .lock_py_attached(py)
            .unwrap_or_else(|p| p.into_inner());
        if host.is_some() {
            return Ok(false);
        }
        let ptr = m.address(&(0..0))?;
        let ptr =
            std::ptr::NonNull::new(ptr).ok_or_else(|| PyRuntimeError::new_err("null mapping"))?;
        // SAFETY: the range is this whole mapping, which stays mapped until `m` drops; the registration is stored in
        // `m` and undone in its Drop before the mapping is unmapped. A mapping is registered at most once (checked
        // under the lock above), and two mappings of this process never overlap.
        *host = Some(unsafe { crate::gpu::register_host(py, device_id, ptr, m.len()) }?);
        Ok(true)
    }

    /// Whether this handle's mapping is page-locked in this process (`_pin_host`).
    fn _host_pinned(&self, py: Python<'_>) -> PyResult<bool> {
        let mapping = self.handle.get(py)?;
        let pinned = mapping
            .get()
            .host
            .lock_py_attached(py)
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        Ok(pinned)
    }

    /// Drops this handle's mapping; views already handed out keep theirs.
    fn close(&self) {
        self.handle.close();
    }

    /// Removes the pool's name (mappings stay valid).
    fn unlink(&self) -> PyResult<()> {
        tenso_shm::unlink(&self.name).map_err(shm_error)
    }
}
