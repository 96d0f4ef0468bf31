//! Shared memory for Python: `tenso.TensoShm` (one packet in a segment) and `tenso.TensoCache` (the pool) are thin
//! Python classes over `_Shm` and `_Pool` here; the protocols live in `tenso-shm`.
//!
//! Every zero-copy array handed out has a `_Mapping` as its (indirect) `base`: the mapping stays mapped for as long
//! as any view of it lives, whatever `close()` was called on. Packets are encoded straight into the segment with the
//! codec's encode-into path and decoded as views over it.

use std::sync::Mutex;

use numpy::PyUntypedArray;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyMemoryView, PyTuple};
use pyo3::Py;
use tenso_format::EncodeOptions;
use tenso_shm::pool::{Hit, LeaseHandle, Probe, Room};
use tenso_shm::{Pool, Segment, ShmError};

use crate::buffers::{alloc_aligned, bytes_mut, descr_for, view_over, Source};
use crate::decode::Decoder;
use crate::encode::{encode_options, fill_slots, Collected, WalkOptions, DETACH_BYTES};
use crate::errors::{decode_error, encode_error, shm_error};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
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
#[pyclass(name = "_Mapping", module = "tenso", frozen, weakref)]
pub(crate) struct PyMapping {
    mapped: Mapped,
}

impl PyMapping {
    fn base(&self) -> *mut u8 {
        match &self.mapped {
            Mapped::Segment(s) => s.as_ptr(),
            Mapped::Pool(p) => p.segment().as_ptr(),
        }
    }

    fn len(&self) -> usize {
        match &self.mapped {
            Mapped::Segment(s) => s.len(),
            Mapped::Pool(p) => p.segment().len(),
        }
    }

    fn pool(&self) -> &Pool {
        match &self.mapped {
            Mapped::Pool(p) => p,
            Mapped::Segment(_) => unreachable!("a _Pool always maps a pool"),
        }
    }
}

#[pymethods]
impl PyMapping {
    fn __repr__(&self) -> String {
        let name = match &self.mapped {
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
            mapping: Mutex::new(Some(Py::new(py, PyMapping { mapped })?)),
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

/// Writes a prepared packet at `ptr`.
///
/// # Safety
/// `ptr` must point into the mapping owned by `owner`, with `prepared.len` bytes that nobody else writes until this
/// returns.
unsafe fn write_packet(
    py: Python<'_>,
    owner: &Bound<'_, PyMapping>,
    prepared: &Prepared<'_>,
    ptr: *mut u8,
) -> PyResult<()> {
    let len = prepared.len;
    let item = prepared.collected.item();
    let plan = {
        // SAFETY: the caller guarantees `len` bytes at `ptr` that only we write for the duration of this call.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
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
        // SAFETY: as above; the view's base is the mapping, which outlives it.
        let out = unsafe {
            view_over(
                owner.as_any(),
                descr_for(py, tenso_format::DType::UInt8)?,
                &[len as u64],
                ptr,
                true,
            )?
        };
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

/// A read-only uint8 array over `len` bytes of `owner` at `ptr`.
///
/// # Safety
/// `ptr..ptr + len` must lie inside the mapping of `owner`.
unsafe fn bytes_view<'py>(
    owner: &Bound<'py, PyMapping>,
    ptr: *const u8,
    len: usize,
    writeable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let py = owner.py();
    // SAFETY: forwarded: the range lies in the mapping, which `owner` (the base) keeps mapped.
    unsafe {
        view_over(
            owner.as_any(),
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
        let written = unsafe { write_packet(py, &mapping, &prepared, mapping.get().base()) };
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
        let m = mapping.get();
        // SAFETY: the whole mapping, kept by `mapping` as base. Writeable: this is the segment's raw buffer, whose
        // writes are coordinated by the application (see the type docs).
        let array = unsafe { bytes_view(&mapping, m.base(), m.len(), true)? };
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
        unsafe { write_packet(py, &mapping, &prepared, mapping.get().base())? };
        Ok(prepared.len)
    }

    /// Decodes the packet at offset 0 as read-only zero-copy views whose base keeps the mapping alive.
    fn get<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mapping = self.handle.get(py)?;
        let m = mapping.get();
        // SAFETY: the whole mapping.
        let bytes = unsafe { bytes_view(&mapping, m.base(), m.len(), false)? };
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

/// Looks a key up, waiting (for an entry being rewritten in place) only with the GIL released: the writer may be a
/// thread of this process that needs the GIL to finish (NumPy's gathering copy releases and retakes it).
fn lookup(py: Python<'_>, pool: &Pool, key: &str) -> PyResult<Option<Hit>> {
    match pool.probe(key.as_bytes()).map_err(shm_error)? {
        Probe::Hit(hit) => Ok(Some(hit)),
        Probe::Miss => Ok(None),
        Probe::Busy => py.detach(|| pool.lookup(key.as_bytes())).map_err(shm_error),
    }
}

/// One `get` of `key` (see `_Pool.get`).
fn get_value<'py>(
    py: Python<'py>,
    mapping: &Bound<'py, PyMapping>,
    key: &str,
    copy: bool,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let pool = mapping.get().pool();
    loop {
        let Some(hit) = lookup(py, pool, key)? else {
            pool.record(None);
            return Ok(None);
        };
        let src = pool.data_ptr().wrapping_add(hit.offset as usize);
        let len = hit.len as usize;
        let result = if copy {
            let out = alloc_aligned(py, len)?;
            // SAFETY: `out` is fresh and exclusively ours, `len` bytes.
            let dst = unsafe { bytes_mut(&out, len) };
            // SAFETY: lookup checked that [offset, offset + len) lies in the data region of the mapping, which
            // `mapping` keeps mapped. A concurrent writer may change these bytes while we copy: then the
            // validation below fails and we retry (any byte values are valid u8s, and nothing else is derived
            // from them before validation).
            let src = unsafe { std::slice::from_raw_parts(src, len) };
            let mut copy_bytes = || dst.copy_from_slice(src);
            if len >= DETACH_BYTES {
                py.detach(copy_bytes)
            } else {
                copy_bytes()
            }
            if !pool.validate(&hit) {
                continue;
            }
            decode_from(out.as_any(), true)
        } else {
            // SAFETY: inside the data region of the mapping (checked by lookup).
            let bytes = unsafe { bytes_view(mapping, src, len, false)? };
            decode_from(&bytes, false)
        };
        if !pool.validate(&hit) {
            continue;
        }
        pool.record(Some(&hit));
        return result.map(Some);
    }
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

fn lease_tuple<'py>(py: Python<'py>, h: &LeaseHandle) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(py, [u64::from(h.slot), h.stamp, h.offset, h.len])
}

fn lease_handle(t: (u32, u64, u64, u64)) -> LeaseHandle {
    LeaseHandle {
        slot: t.0,
        stamp: t.1,
        offset: t.2,
        len: t.3,
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
        unsafe { write_packet(py, &mapping, &prepared, reservation.as_mut_ptr())? };
        py.detach(move || reservation.commit()).map_err(shm_error)?;
        Ok(prepared.len)
    }

    /// The value of `key`: zero-copy read-only views over pool memory, or (`copy=True`) a whole, writeable copy.
    #[pyo3(signature = (key, copy=false))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        copy: bool,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let mapping = self.handle.get(py)?;
        get_value(py, &mapping, key, copy)
    }

    /// The values of `keys` in one call (None for each missing one): what `get` gives for each.
    #[pyo3(signature = (keys, copy=false))]
    fn get_many<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
        copy: bool,
    ) -> PyResult<Vec<Option<Bound<'py, PyAny>>>> {
        let mapping = self.handle.get(py)?;
        keys.iter()
            .map(|key| get_value(py, &mapping, key, copy))
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
        let (hit, prefix): (Hit, Vec<u8>) = loop {
            let Some(hit) = lookup(py, pool, key)? else {
                return Ok(None);
            };
            let n = (hit.len as usize).min(64 * 1024);
            let mut prefix = vec![0u8; n];
            // SAFETY: inside the data region (checked by lookup); validated below.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    pool.data_ptr().add(hit.offset as usize),
                    prefix.as_mut_ptr(),
                    n,
                )
            };
            if pool.validate(&hit) {
                break (hit, prefix);
            }
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

    /// Leases `n` bytes of recycled, pre-faulted pool memory: returns `(handle, memoryview)`. The lease is this
    /// process's until `_release(handle)` (from any process) or `_adopt(handle)` by another; it is freed if the
    /// owning process dies.
    fn _lease<'py>(
        &self,
        py: Python<'py>,
        n: u64,
    ) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyMemoryView>)> {
        let mapping = self.handle.get(py)?;
        let pool = mapping.get().pool();
        let lease = pool.lease(n).map_err(shm_error)?;
        let ptr = lease.as_mut_ptr();
        let handle = lease.into_handle();
        // SAFETY: the lease's block lies in the data region; the lease holder is its only writer.
        let view = unsafe { bytes_view(&mapping, ptr, n as usize, true)? };
        Ok((lease_tuple(py, &handle)?, PyMemoryView::from(&view)?))
    }

    /// Takes over a lease made by another process; returns its memory.
    fn _adopt<'py>(
        &self,
        py: Python<'py>,
        handle: (u32, u64, u64, u64),
    ) -> PyResult<Bound<'py, PyMemoryView>> {
        let mapping = self.handle.get(py)?;
        let pool = mapping.get().pool();
        let lease = pool.adopt(lease_handle(handle)).map_err(shm_error)?;
        let ptr = lease.as_mut_ptr();
        let h = lease.into_handle();
        // SAFETY: as in `_lease`.
        let view = unsafe { bytes_view(&mapping, ptr, h.len as usize, true)? };
        PyMemoryView::from(&view)
    }

    /// Frees a lease.
    fn _release(&self, py: Python<'_>, handle: (u32, u64, u64, u64)) -> PyResult<()> {
        let mapping = self.handle.get(py)?;
        mapping
            .get()
            .pool()
            .release(lease_handle(handle))
            .map_err(shm_error)
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
