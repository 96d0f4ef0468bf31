//! `tenso.gpu`'s native half: packets streamed between Python sources/destinations and CUDA memory through
//! `tenso-gpu`'s pinned staging, and the DLPack hand-off of the device memory (`dlpark` capsules).
//!
//! * `_gpu_read_to_device(source, device_id, alloc=None)`: `source` is a bytes-like object (read from memory, without
//!   the GIL) or a `fill(view) -> int` callable (`tenso.core._make_filler`: file, socket). With `alloc` (torch, CuPy:
//!   `tenso.frameworks._consumer_alloc`) each tensor goes into memory of the framework's own caching allocator
//!   ([`Consumed`]: no `cuMemFree` later, so no device-wide synchronisation per free); without it (JAX) each tensor
//!   gets its own device allocation, owned by a [`PyDeviceTensor`] that exports it through `__dlpack__` (versioned
//!   or legacy capsule, writable: the memory is fresh and nobody else holds it).
//! * `_gpu_write_from_device(tensors, write, check_integrity)`: imports each DLPack producer on the device
//!   (`stream=` handshake on our copy stream, so the producer's pending work is ordered first), and streams it
//!   device -> staging -> `write(memoryview)`.
//!
//! * `register_host` (used by `_Pool._pin_host`): `cuMemHostRegister` of a shared-memory mapping, held by the
//!   mapping object and undone before it unmaps.
//!
//! Every entry point checks [`tenso_gpu::available`] first (cudarc panics without libcuda).

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use dlpark::ffi::{DLDevice, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::metadata::Dynamic;
use dlpark::python::consumer::stream::{self as dlstream, DlpackStream, StreamArg};
use dlpark::python::{export_dlpack, DlpackExporter, ExportRequest, ImportRequest};
use dlpark::{DlpackFlags, Managed};
use pyo3::exceptions::{PyBufferError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
// Locks taken while attached release the GIL while they wait: a holder of a device may call back into Python (a
// source's fill, a destination's write), which needs the GIL.
use pyo3::sync::MutexExt;
use pyo3::types::{PyDict, PyTuple};
use tenso_format::{DType, DecodeOptions, EncodeOptions};
use tenso_gpu::copy::{DeviceBuf, DeviceMemory, ExternalMemory};
use tenso_gpu::dlpack::{dl_dtype, is_c_contiguous, wire_dtype};
use tenso_gpu::packet::{
    read_packet, write_packet, DeviceTensor, Outgoing, Received, SourceTensor,
};
use tenso_gpu::process::ProcessCache;
use tenso_gpu::register::HostRegistration;
use tenso_gpu::{CudaBuf, CudaRegistrar, Device, GpuError};

use crate::buffers::{wire_dtype as wire_dtype_of, Source};
use crate::errors::decode_error;
use numpy::{PyUntypedArray, PyUntypedArrayMethods};

/// Staging chunk: large enough that per-chunk driver overhead is noise at ~50 GB/s, small enough that the first
/// chunk's read and the last chunk's copy (which do not overlap) cost little.
const CHUNK: usize = 8 << 20;

type Shared = Arc<Mutex<Device>>;

/// One `Device` (primary context, streams, staging pool) per ordinal, for the life of the process that opened it; a
/// forked child gets `GpuError::Forked` (its copy of the parent's handles is not valid in it) instead.
fn device(ordinal: i32) -> Result<Shared, GpuError> {
    static DEVICES: OnceLock<Mutex<ProcessCache<i32, Shared>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    devices.get_or_make(ordinal, || {
        Ok(Arc::new(Mutex::new(Device::open(ordinal, CHUNK)?)))
    })
}

fn gpu_error(err: GpuError) -> PyErr {
    match err {
        GpuError::Format(e) => decode_error(e),
        GpuError::Unsupported { .. } | GpuError::BadTensor { .. } => {
            PyTypeError::new_err(err.to_string())
        }
        GpuError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<PyErrBox>()) => {
            let inner = e.into_inner().expect("checked above");
            inner
                .downcast::<PyErrBox>()
                .map_or_else(|e| PyRuntimeError::new_err(e.to_string()), |b| b.0)
        }
        GpuError::Io(e) => PyErr::from(e),
        other => PyRuntimeError::new_err(format!("tenso.gpu: {other}")),
    }
}

/// A Python exception raised by a source's `fill` or a destination's `write`, carried through `io::Error`.
#[derive(Debug)]
struct PyErrBox(PyErr);

impl std::fmt::Display for PyErrBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for PyErrBox {}

fn carry(err: PyErr) -> io::Error {
    io::Error::other(PyErrBox(err))
}

/// A memoryview over `buf` that is released when `f` returns, so Python can keep no reference to Rust memory.
fn with_view<'py, R>(
    py: Python<'py>,
    ptr: *mut u8,
    len: usize,
    writable: bool,
    f: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<R>,
) -> PyResult<R> {
    // CPython's PyBUF_WRITE / PyBUF_READ (memoryobject.h; stable values, not exported by pyo3 under abi3).
    let flags: std::os::raw::c_int = if writable { 0x200 } else { 0x100 };
    let len = isize::try_from(len).map_err(|_| PyValueError::new_err("buffer too large"))?;
    // SAFETY: ptr..ptr+len is a live buffer the caller holds exclusively (writable) or shared (read) for the whole
    // call; the view is released before returning, after which Python raises on any use of it.
    let view = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            pyo3::ffi::PyMemoryView_FromMemory(ptr.cast(), len, flags),
        )
    }?;
    let out = f(&view);
    let released = view.call_method0("release");
    let out = out?;
    released.map_err(|e| {
        PyBufferError::new_err(format!(
            "tenso.gpu: the source kept a view of the staging buffer ({e})"
        ))
    })?;
    Ok(out)
}

/// `io::Read` over a Python `fill(view) -> int` callable, run without the GIL: each read attaches for the call only,
/// so the copies and stream waits between reads let other Python threads run.
struct PyFill {
    fill: Py<PyAny>,
}

impl io::Read for PyFill {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        Python::attach(|py| {
            with_view(py, buf.as_mut_ptr(), buf.len(), true, |view| {
                let n = self.fill.bind(py).call1((view,))?;
                if n.is_none() {
                    return Err(pyo3::exceptions::PyBlockingIOError::new_err(
                        "source is non-blocking and has no data ready",
                    ));
                }
                n.extract::<usize>()
            })
        })
        .map_err(carry)
    }
}

/// Device memory that tenso allocated and filled, exported through DLPack (`tenso.DeviceTensor`).
#[pyclass(name = "DeviceTensor", module = "tenso", frozen)]
pub(crate) struct PyDeviceTensor {
    buf: Arc<CudaBuf>,
    dtype: DType,
    shape: Vec<i64>,
}

impl PyDeviceTensor {
    fn new(t: DeviceTensor<CudaBuf>) -> PyResult<Self> {
        let shape = t
            .shape
            .iter()
            .map(|&d| i64::try_from(d).map_err(|_| PyValueError::new_err("dimension too large")))
            .collect::<PyResult<_>>()?;
        Ok(Self {
            buf: Arc::new(t.buf),
            dtype: t.dtype,
            shape,
        })
    }

    fn managed<M: dlpark::ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let mut init = Dynamic::compact(self.shape.as_slice())
            .prepare_as::<M>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?
            .initialize(Arc::clone(&self.buf));
        init.set_data(self.buf.ptr() as *mut std::ffi::c_void)
            .set_device(self.device())
            .set_dtype(dl_dtype(self.dtype));
        // SAFETY: data points to the buffer's len = N * itemsize bytes of device memory, kept alive by the Arc
        // installed as the managed tensor's context (released by its deleter); shape and compact strides were copied
        // into the allocation; no flag is set (the memory is writable and shared with this DeviceTensor only).
        Ok(unsafe { init.finish() })
    }
}

impl DlpackExporter for PyDeviceTensor {
    fn device(&self) -> DLDevice {
        DLDevice::cuda(self.buf.ordinal())
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        // The copies that filled the buffer were synchronised before it was handed out: the data is ready for
        // every stream, so the consumer's stream needs no event.
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.managed()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.managed()
    }
}

#[pymethods]
impl PyDeviceTensor {
    /// DLPack export (array API signature); the capsule shares this tensor's device memory.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<&Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream, max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    fn __dlpack_device__(&self) -> (u32, i32) {
        (2, self.buf.ordinal())
    }

    /// The shape.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    /// The wire dtype's name (as in ``tenso.get_packet_info``).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    /// Bytes of device memory.
    #[getter]
    fn nbytes(&self) -> usize {
        self.buf.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "tenso.DeviceTensor(shape={:?}, dtype={}, device=cuda:{})",
            self.shape,
            self.dtype.name(),
            self.buf.ordinal()
        )
    }
}

fn ordinal(device_id: i64) -> PyResult<i32> {
    i32::try_from(device_id)
        .ok()
        .filter(|&d| d >= 0)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "device_id must be a CUDA device index (an int >= 0), got {device_id}"
            ))
        })
}

fn require_gpu() -> PyResult<()> {
    match tenso_gpu::available() {
        Ok(_) => Ok(()),
        Err(e) => Err(PyRuntimeError::new_err(format!(
            "tenso.gpu needs a CUDA GPU: {e}"
        ))),
    }
}

/// Device memory from the consumer's allocator (`alloc(nbytes) -> (address, owner, stream)`, tenso.gpu's torch and
/// CuPy allocators): `owner` (an empty uint8 tensor) owns it and gives it back to its allocator when it goes.
#[derive(Debug)]
struct Consumed {
    ptr: u64,
    len: usize,
    owner: Py<PyAny>,
}

impl DeviceBuf for Consumed {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// One tensor's memory from the consumer: its allocator is called (with the GIL), and our copy streams are made to
/// wait for the consumer's stream, on which the memory may still be in use by work queued before it was freed.
fn consume(dev: &Device, alloc: &Py<PyAny>, len: usize) -> Result<Consumed, GpuError> {
    let (ptr, owner, stream) = Python::attach(|py| {
        alloc
            .bind(py)
            .call1((len,))?
            .extract::<(u64, Py<PyAny>, usize)>()
    })
    .map_err(|e| GpuError::Io(carry(e)))?;
    if len > 0 {
        // SAFETY: the stream is the consumer's current stream on this device (tenso.gpu passes the handle its
        // framework reports for the device the memory was allocated on), alive while its framework runs.
        unsafe { dev.wait_for(stream) }?;
    }
    Ok(Consumed { ptr, len, owner })
}

/// `(owner, wire dtype name, shape)` of a tensor read into consumer memory.
fn consumed_tuple<'py>(py: Python<'py>, t: DeviceTensor<Consumed>) -> PyResult<Bound<'py, PyAny>> {
    (t.buf.owner.bind(py).clone(), t.dtype.name(), t.shape)
        .into_pyobject(py)
        .map(Bound::into_any)
}

fn received_to_py<'py, B>(
    py: Python<'py>,
    received: Option<Received<B>>,
    one: impl Fn(Python<'py>, DeviceTensor<B>) -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    Ok(match received {
        None => None,
        Some(Received::Dense(t)) => Some(one(py, t)?),
        Some(Received::Bundle(entries)) => {
            let dict = PyDict::new(py);
            for (key, t) in entries {
                dict.set_item(key, one(py, t)?)?;
            }
            Some(dict.into_any())
        }
    })
}

/// Reads one packet into device memory on `device_id`: None, a tensor, or a dict of them (bundle). Without `alloc`
/// each tensor is a DeviceTensor over memory tenso allocated; with `alloc` (see [`Consumed`]) each is
/// `(owner, dtype name, shape)` in memory of the consumer's allocator.
#[pyfunction]
#[pyo3(signature = (source, device_id, alloc=None))]
fn _gpu_read_to_device<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    device_id: i64,
    alloc: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    require_gpu()?;
    let shared = device(ordinal(device_id)?).map_err(gpu_error)?;
    let opts = DecodeOptions::default();
    let alloc = alloc.map(|a| a.clone().unbind());
    let mut fill;
    let bytes;
    let mut slice: &[u8];
    let reader: &mut (dyn io::Read + Send) = if source.is_callable() {
        fill = PyFill {
            fill: source.clone().unbind(),
        };
        &mut fill
    } else {
        bytes = Source::new(source)?;
        slice = bytes.bytes();
        &mut slice
    };
    match alloc {
        None => {
            let received = py
                .detach(|| {
                    let dev = shared.lock().unwrap_or_else(|p| p.into_inner());
                    read_packet(&*dev, reader, &opts)
                })
                .map_err(gpu_error)?;
            received_to_py(py, received, |py, t| {
                Ok(Bound::new(py, PyDeviceTensor::new(t)?)?.into_any())
            })
        }
        Some(alloc) => {
            let received = py
                .detach(|| {
                    let dev = shared.lock().unwrap_or_else(|p| p.into_inner());
                    let consumer = ExternalMemory::new(&*dev, |len| consume(&dev, &alloc, len));
                    read_packet(&consumer, reader, &opts)
                })
                .map_err(gpu_error)?;
            received_to_py(py, received, consumed_tuple)
        }
    }
}

/// Our copy stream, handed to producers in the `stream=` handshake.
struct CopyStream(usize);

// SAFETY: the stream is one of the Device's two streams, alive as long as the Device (for the life of the process),
// passed as CUDA's pointer-sized integer per the DLPack Python convention.
unsafe impl DlpackStream for CopyStream {
    fn as_python_arg(&self, _py: Python<'_>, _device: DLDevice) -> PyResult<StreamArg> {
        Ok(dlstream::cuda(self.0 as *mut std::ffi::c_void))
    }
}

/// One device tensor imported through DLPack, kept alive (its deleter) until written.
struct Imported {
    tensor: SourceTensor,
    _owner: dlpark::AllocationDeleter,
}

fn import(obj: &Bound<'_, PyAny>, shared: &mut Option<(i32, Shared)>) -> PyResult<Imported> {
    let request = ImportRequest::new(obj.as_borrowed())?;
    let dev = request.device()?;
    if dev.device_type != dlpark::ffi::DLDeviceType::CUDA {
        return Err(PyTypeError::new_err(format!(
            "write_from_device takes CUDA tensors; this {} is on DLPack device type {} (use tenso.write_stream for host arrays)",
            obj.get_type().name()?,
            dev.device_type.0
        )));
    }
    let d = match shared {
        Some((o, d)) if *o == dev.device_id => Arc::clone(d),
        Some((o, _)) => {
            return Err(PyValueError::new_err(format!(
                "write_from_device: tensors on cuda:{o} and cuda:{} in one packet",
                dev.device_id
            )))
        }
        None => {
            let d = device(dev.device_id).map_err(gpu_error)?;
            *shared = Some((dev.device_id, Arc::clone(&d)));
            d
        }
    };
    let stream = CopyStream(
        d.lock_py_attached(obj.py())
            .unwrap_or_else(|p| p.into_inner())
            .stream(0) as usize,
    );
    let imported = match request.import(Some(&stream), None) {
        Ok(imported) => imported,
        // A producer from before DLPack 1.0 (CuPy 13, torch < 2.4, older JAX) has no `max_version` keyword: ask
        // again as the array API standard says, with `stream` only, and take the legacy capsule it returns.
        Err(e) if e.is_instance_of::<PyTypeError>(obj.py()) => {
            let kwargs = PyDict::new(obj.py());
            kwargs.set_item("stream", stream.0)?;
            let capsule = obj.call_method("__dlpack__", (), Some(&kwargs))?;
            let imported = dlpark::python::from_dlpack(capsule.as_borrowed(), None, None)?;
            let got = imported
                .validate()
                .map_err(|e| PyBufferError::new_err(e.to_string()))?
                .device();
            if got != dev {
                return Err(PyValueError::new_err(format!(
                    "DLPack device changed during import: cuda:{} became type {} id {}",
                    dev.device_id, got.device_type.0, got.device_id
                )));
            }
            imported
        }
        Err(e) => return Err(e),
    };
    let tensor = {
        let t = imported
            .validate()
            .map_err(|e| PyBufferError::new_err(e.to_string()))?;
        let dtype = wire_dtype(t.dtype()).ok_or_else(|| {
            PyTypeError::new_err(format!(
                "tenso has no dtype for DLPack type {:?}",
                t.dtype()
            ))
        })?;
        if !is_c_contiguous(t.shape(), t.strides()) {
            return Err(PyBufferError::new_err(
                "write_from_device needs a C-contiguous tensor (call .contiguous() first)",
            ));
        }
        let shape = t
            .shape()
            .iter()
            .map(|&d| u64::try_from(d).map_err(|_| PyValueError::new_err("negative dimension")))
            .collect::<PyResult<Vec<u64>>>()?;
        let ptr = (t.data_ptr() as u64)
            .checked_add(t.byte_offset())
            .ok_or_else(|| PyValueError::new_err("data pointer overflows"))?;
        SourceTensor { dtype, shape, ptr }
    };
    Ok(Imported {
        tensor,
        _owner: imported.into_deleter(),
    })
}

/// Streams CUDA tensors (a DLPack producer or a dict of them) to `write(memoryview)` as one packet; returns bytes
/// written.
#[pyfunction]
#[pyo3(signature = (tensors, write, check_integrity=false))]
fn _gpu_write_from_device(
    tensors: &Bound<'_, PyAny>,
    write: &Bound<'_, PyAny>,
    check_integrity: bool,
) -> PyResult<usize> {
    require_gpu()?;
    let py = tensors.py();
    let mut shared = None;
    let mut owners = Vec::new();
    let out = if let Ok(dict) = tensors.cast::<PyDict>() {
        let mut entries = Vec::with_capacity(dict.len());
        for (k, v) in dict.iter() {
            let key: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("bundle keys must be str"))?;
            let imported = import(&v, &mut shared)?;
            entries.push((key, imported.tensor.clone()));
            owners.push(imported);
        }
        Outgoing::Bundle(entries)
    } else {
        let imported = import(tensors, &mut shared)?;
        let t = imported.tensor.clone();
        owners.push(imported);
        Outgoing::Dense(t)
    };
    let Some((_, shared)) = shared else {
        // An empty dict: a bundle of nothing, no device involved.
        let bytes = tenso_format::encode(
            &tenso_format::Item::Bundle(vec![]),
            &EncodeOptions::default(),
        )
        .map_err(crate::errors::encode_error)?;
        let mut bytes = bytes;
        with_view(py, bytes.as_mut_ptr(), bytes.len(), false, |v| {
            write.call1((v,)).map(drop)
        })?;
        return Ok(bytes.len());
    };
    let opts = EncodeOptions {
        integrity: check_integrity,
        ..EncodeOptions::default()
    };
    let write = write.clone().unbind();
    // Without the GIL for the whole copy (stream waits included): only each chunk's write(view) attaches.
    let n = py
        .detach(|| {
            let dev = shared.lock().unwrap_or_else(|p| p.into_inner());
            // The producers ordered their pending writes before stream 0 (the handshake); waiting for it here makes
            // the data ready for both copy streams.
            tenso_gpu::copy::CopyEngine::sync(&*dev, 0)?;
            // SAFETY: every SourceTensor points to the C-contiguous device memory (N * itemsize bytes from ptr:
            // dlpark's validation and is_c_contiguous in import) of a tensor whose DLPack export we hold (owners)
            // until this returns, and whose pending writes finished (the sync above).
            unsafe {
                write_packet(&*dev, &out, &opts, |chunk| {
                    Python::attach(|py| {
                        with_view(py, chunk.as_ptr().cast_mut(), chunk.len(), false, |v| {
                            write.bind(py).call1((v,)).map(drop)
                        })
                    })
                    .map_err(|e| GpuError::Io(carry(e)))
                })
            }
        })
        .map_err(gpu_error)?;
    drop(owners);
    Ok(n)
}

/// A C-contiguous, native-endian host array copied into device memory on `device_id` through the pinned staging (one
/// staging copy; the GIL is released for the copy): a DeviceTensor over memory tenso allocated, or with `alloc` (see
/// [`Consumed`]) the owner of memory from the consumer's allocator.
#[pyfunction]
#[pyo3(signature = (array, device_id, alloc=None))]
fn _gpu_from_host<'py>(
    array: &Bound<'py, PyUntypedArray>,
    device_id: i64,
    alloc: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    require_gpu()?;
    let py = array.py();
    let (dtype, swap) = wire_dtype_of(&array.dtype())?;
    if swap || !array.is_c_contiguous() {
        return Err(PyBufferError::new_err(
            "_gpu_from_host needs a C-contiguous native-endian array",
        ));
    }
    let shape: Vec<u64> = array.shape().iter().map(|&d| d as u64).collect();
    let shared = device(ordinal(device_id)?).map_err(gpu_error)?;
    let source = Source::new(array.as_any())?;
    let bytes = source.bytes();
    let alloc = alloc.map(|a| a.clone().unbind());
    let upload = |dev: &Device, dst: u64| -> Result<(), GpuError> {
        let mut at = 0;
        // SAFETY: dst holds bytes.len() bytes of device memory that is ours alone (just allocated); upload drains
        // before returning.
        unsafe {
            tenso_gpu::copy::upload(dev, dst, bytes.len(), |chunk| {
                chunk.copy_from_slice(&bytes[at..at + chunk.len()]);
                at += chunk.len();
                Ok(())
            })
        }
    };
    match alloc {
        None => {
            let buf = py
                .detach(|| {
                    let dev = shared.lock().unwrap_or_else(|p| p.into_inner());
                    let buf = dev.alloc(bytes.len())?;
                    upload(&dev, buf.ptr())?;
                    Ok(buf)
                })
                .map_err(gpu_error)?;
            Ok(
                Bound::new(py, PyDeviceTensor::new(DeviceTensor { dtype, shape, buf })?)?
                    .into_any(),
            )
        }
        Some(alloc) => {
            let buf = py
                .detach(|| {
                    let dev = shared.lock().unwrap_or_else(|p| p.into_inner());
                    let buf = consume(&dev, &alloc, bytes.len())?;
                    upload(&dev, buf.ptr())?;
                    Ok(buf)
                })
                .map_err(gpu_error)?;
            Ok(buf.owner.into_bound(py))
        }
    }
}

/// A CUDA DLPack producer copied to host memory through the pinned staging: (flat uint8 array of its C-order bytes,
/// wire dtype name, shape).
#[pyfunction]
fn _gpu_to_host<'py>(
    tensor: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyUntypedArray>, &'static str, Vec<u64>)> {
    require_gpu()?;
    let py = tensor.py();
    let mut shared = None;
    let imported = import(tensor, &mut shared)?;
    let Some((_, shared)) = shared else {
        unreachable!("import opened the tensor's device")
    };
    let t = &imported.tensor;
    let n = t
        .shape
        .iter()
        .try_fold(t.dtype.itemsize() as u64, |a, &d| a.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| PyValueError::new_err("tensor too large"))?;
    let out = crate::buffers::alloc_aligned(py, n)?;
    // SAFETY: `out` is a fresh, C-contiguous uint8 array of n bytes that nothing else references yet.
    let dst = unsafe { crate::buffers::bytes_mut(&out, n) };
    let ptr = t.ptr;
    py.detach(|| {
        let dev = shared.lock().unwrap_or_else(|p| p.into_inner());
        tenso_gpu::copy::CopyEngine::sync(&*dev, 0)?;
        let mut at = 0;
        // SAFETY: ptr points to n bytes of compact device memory of a tensor whose export we hold (imported), with
        // its producer's writes finished (the sync above).
        unsafe {
            tenso_gpu::copy::download(&*dev, ptr, n, |chunk| {
                dst[at..at + chunk.len()].copy_from_slice(chunk);
                at += chunk.len();
                Ok(())
            })
        }
    })
    .map_err(gpu_error)?;
    let (dtype, shape) = (imported.tensor.dtype.name(), imported.tensor.shape.clone());
    drop(imported);
    Ok((out, dtype, shape))
}

/// Page-locks `ptr .. ptr + len` (the DataLoader pool's mapping) in device `device_id`'s primary context; the
/// registration is undone when the returned value is dropped.
///
/// # Safety
/// As [`HostRegistration::new`]: the range stays mapped until the value is dropped and overlaps no live registration.
pub(crate) unsafe fn register_host(
    py: Python<'_>,
    device_id: i64,
    ptr: std::ptr::NonNull<u8>,
    len: usize,
) -> PyResult<HostRegistration<CudaRegistrar>> {
    require_gpu()?;
    let shared = device(ordinal(device_id)?).map_err(gpu_error)?;
    let registrar = shared
        .lock_py_attached(py)
        .unwrap_or_else(|p| p.into_inner())
        .host_registrar();
    // Locking a large range walks every page: without the GIL. The pointer travels as an address (NonNull is not
    // Send); it is only handed to the driver.
    let at = ptr.as_ptr() as usize;
    py.detach(move || {
        let ptr = std::ptr::NonNull::new(at as *mut u8).expect("non-null above");
        // SAFETY: forwarded from the caller.
        unsafe { HostRegistration::new(registrar, ptr, len) }
    })
    .map_err(gpu_error)
}

/// (pinned staging buffers ever allocated, idle now, chunk bytes) of device `device_id`'s pool.
#[pyfunction]
fn _gpu_staging_stats(py: Python<'_>, device_id: i64) -> PyResult<(u64, usize, usize)> {
    require_gpu()?;
    let shared = device(ordinal(device_id)?).map_err(gpu_error)?;
    let dev = shared
        .lock_py_attached(py)
        .unwrap_or_else(|p| p.into_inner());
    let pool = dev.pool();
    Ok((pool.allocations(), pool.idle(), pool.chunk()))
}

/// How many times this process asked the CUDA driver to initialise (`cuInit`, or the probe for it where no driver is
/// installed): tests prove with it that converting CPU tensors never reaches for CUDA.
#[pyfunction]
fn _gpu_init_calls() -> u64 {
    tenso_gpu::init_calls()
}

/// Whether the NVIDIA driver loads here and reports at least one CUDA device; never raises, never panics
/// (libcuda is dlopen'ed and checked before any driver call).
#[pyfunction]
fn _gpu_available(py: Python<'_>) -> bool {
    py.detach(|| matches!(tenso_gpu::available(), Ok(tenso_gpu::DeviceCount(n)) if n > 0))
}

/// Why CUDA cannot be used here (None when it can), from the same probe as `_gpu_available`.
#[pyfunction]
fn _gpu_problem(py: Python<'_>) -> Option<String> {
    py.detach(|| match tenso_gpu::available() {
        Ok(tenso_gpu::DeviceCount(0)) => {
            Some("the NVIDIA driver reports no CUDA device".to_string())
        }
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDeviceTensor>()?;
    m.add_function(wrap_pyfunction!(_gpu_available, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_init_calls, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_problem, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_read_to_device, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_write_from_device, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_from_host, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_to_host, m)?)?;
    m.add_function(wrap_pyfunction!(_gpu_staging_stats, m)?)
}
