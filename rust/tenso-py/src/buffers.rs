//! Borrowing Python memory and handing out NumPy arrays over memory we borrow or own.
//!
//! Everything that touches raw NumPy pointers is here, so the `unsafe` surface of the bindings is one short file.
//! Memory is only ever borrowed through objects we hold a strong reference to (`Source::owner`), and every array
//! we create over foreign memory gets that owner as its `base`, so NumPy keeps it alive as long as the view lives.

use std::os::raw::c_int;

use numpy::npyffi::{self, npy_intp, NPY_TYPES, PY_ARRAY_API};
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;
use tenso_format::DType;

/// A read-only byte range owned by a Python object.
pub(crate) struct Source<'py> {
    /// Keeps the memory alive; becomes the `base` of zero-copy views.
    pub owner: Bound<'py, PyAny>,
    ptr: *const u8,
    len: usize,
}

impl<'py> Source<'py> {
    /// Borrows the bytes of any object that exposes a contiguous buffer: `bytes`, `bytearray`, `memoryview`,
    /// `mmap.mmap`, NumPy arrays (their raw memory, whatever the dtype).
    pub fn new(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(bytes) = obj.cast::<PyBytes>() {
            let slice = bytes.as_bytes();
            return Ok(Source {
                owner: obj.clone(),
                ptr: slice.as_ptr(),
                len: slice.len(),
            });
        }
        let array = match obj.cast::<PyUntypedArray>() {
            Ok(array) => array.clone(),
            Err(_) => from_buffer(obj)?,
        };
        if !array.is_c_contiguous() {
            return Err(PyBufferError::new_err(
                "the packet buffer must be C-contiguous",
            ));
        }
        let len = nbytes(&array).ok_or_else(|| PyBufferError::new_err("buffer size overflows"))?;
        Ok(Source {
            ptr: data_ptr(&array),
            len,
            owner: array.into_any(),
        })
    }

    /// The borrowed bytes.
    ///
    /// The slice must not outlive `self.owner`, which the borrow checker enforces through `&self`.
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` and `len` describe the contiguous buffer of `owner` (a `bytes` object's storage, or the data
        // of a C-contiguous ndarray whose size we computed from its own shape), and `owner` is held by `self`, so
        // the memory stays allocated for the lifetime of the returned borrow.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Address of the first byte, to turn sub-slices back into offsets.
    pub fn base_addr(&self) -> usize {
        self.ptr as usize
    }
}

/// Total bytes of an array (product of the shape times the item size), or None on overflow.
fn nbytes(array: &Bound<'_, PyUntypedArray>) -> Option<usize> {
    array
        .shape()
        .iter()
        .try_fold(array.dtype().itemsize(), |acc, &d| acc.checked_mul(d))
}

/// `numpy.frombuffer(obj, dtype=uint8)` without the Python-level call.
fn from_buffer<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = obj.py();
    let descr = descr_for_npy(py, NPY_TYPES::NPY_UBYTE);
    // SAFETY: PyArray_FromBuffer steals the reference to `descr` (we pass an owned one via into_dtype_ptr) and
    // returns a new reference or NULL with a Python error set, which `from_owned_ptr_or_err` turns into PyErr.
    let raw =
        unsafe { PY_ARRAY_API.PyArray_FromBuffer(py, obj.as_ptr(), descr.into_dtype_ptr(), -1, 0) };
    // SAFETY: `raw` is a new reference (or NULL, handled), to an ndarray by PyArray_FromBuffer's contract.
    let any = unsafe { Bound::from_owned_ptr_or_err(py, raw)? };
    Ok(any.cast_into::<PyUntypedArray>()?)
}

/// Data pointer of an array.
pub(crate) fn data_ptr(array: &Bound<'_, PyUntypedArray>) -> *const u8 {
    // SAFETY: `as_array_ptr` points to a live PyArrayObject (we hold a reference through `array`); reading its
    // `data` field is how NumPy's own PyArray_DATA macro works.
    unsafe { (*array.as_array_ptr()).fields.data as *const u8 }
}

fn descr_for_npy(py: Python<'_>, ty: NPY_TYPES) -> Bound<'_, PyArrayDescr> {
    // SAFETY: PyArray_DescrFromType returns a new reference to a builtin descriptor for a valid type number.
    unsafe {
        let raw = PY_ARRAY_API.PyArray_DescrFromType(py, ty as c_int);
        Bound::from_owned_ptr(py, raw.cast()).cast_into_unchecked()
    }
}

/// The NumPy dtype of a wire dtype (little-endian, which is native on every platform we build for).
pub(crate) fn descr_for<'py>(py: Python<'py>, dtype: DType) -> PyResult<Bound<'py, PyArrayDescr>> {
    let ty = match dtype {
        DType::Float32 => NPY_TYPES::NPY_FLOAT,
        DType::Int32 => NPY_TYPES::NPY_INT,
        DType::Float64 => NPY_TYPES::NPY_DOUBLE,
        DType::Int64 => NPY_TYPES::NPY_LONGLONG,
        DType::UInt8 => NPY_TYPES::NPY_UBYTE,
        DType::UInt16 => NPY_TYPES::NPY_USHORT,
        DType::Bool => NPY_TYPES::NPY_BOOL,
        DType::Float16 => NPY_TYPES::NPY_HALF,
        DType::Int8 => NPY_TYPES::NPY_BYTE,
        DType::Int16 => NPY_TYPES::NPY_SHORT,
        DType::UInt32 => NPY_TYPES::NPY_UINT,
        DType::UInt64 => NPY_TYPES::NPY_ULONGLONG,
        DType::Complex64 => NPY_TYPES::NPY_CFLOAT,
        DType::Complex128 => NPY_TYPES::NPY_CDOUBLE,
        DType::BFloat16 => return bfloat16(py),
    };
    Ok(descr_for_npy(py, ty))
}

/// `numpy.dtype(ml_dtypes.bfloat16)`, imported on first use only (importing ml_dtypes costs tens of milliseconds).
fn bfloat16(py: Python<'_>) -> PyResult<Bound<'_, PyArrayDescr>> {
    static BF16: PyOnceLock<Py<PyArrayDescr>> = PyOnceLock::new();
    let descr = BF16.get_or_try_init(py, || -> PyResult<_> {
        let module = py.import("ml_dtypes").map_err(|e| {
            crate::errors::missing_extra(
                py,
                e,
                "bfloat16 arrays need the ml_dtypes package",
                "bfloat16",
            )
        })?;
        let numpy = py.import("numpy")?;
        let descr = numpy
            .getattr("dtype")?
            .call1((module.getattr("bfloat16")?,))?;
        Ok(descr.cast_into::<PyArrayDescr>()?.unbind())
    })?;
    Ok(descr.bind(py).clone())
}

/// The wire dtype of a NumPy dtype, and whether its bytes must be swapped to little-endian.
pub(crate) fn wire_dtype(descr: &Bound<'_, PyArrayDescr>) -> PyResult<(DType, bool)> {
    let kind = descr.kind();
    let size = descr.itemsize();
    let dtype = match (kind, size) {
        (b'b', 1) => DType::Bool,
        (b'i', 1) => DType::Int8,
        (b'i', 2) => DType::Int16,
        (b'i', 4) => DType::Int32,
        (b'i', 8) => DType::Int64,
        (b'u', 1) => DType::UInt8,
        (b'u', 2) => DType::UInt16,
        (b'u', 4) => DType::UInt32,
        (b'u', 8) => DType::UInt64,
        (b'f', 2) => DType::Float16,
        (b'f', 4) => DType::Float32,
        (b'f', 8) => DType::Float64,
        (b'c', 8) => DType::Complex64,
        (b'c', 16) => DType::Complex128,
        _ if size == 2 && descr.typeobj().name().is_ok_and(|n| n == "bfloat16") => DType::BFloat16,
        _ => {
            return Err(PyValueError::new_err(format!(
                "Unsupported dtype: {} (tenso carries bool, integers, float16/32/64, bfloat16 and complex64/128)",
                descr.str().map(|s| s.to_string()).unwrap_or_default()
            )))
        }
    };
    let swap = size > 1 && descr.byteorder() == b'>';
    Ok((dtype, swap))
}

/// Creates an ndarray of `descr` and `shape` over `ptr`, whose memory is kept alive by `base`.
///
/// # Safety
/// `ptr` must point to at least `product(shape) * descr.itemsize()` bytes that stay valid for as long as `base`
/// is alive. With `writeable`, the memory must be exclusively owned by `base` (or already writeable through it), so
/// that writes through the view cannot reach memory someone else treats as immutable.
pub(crate) unsafe fn view_over<'py>(
    base: &Bound<'py, PyAny>,
    descr: Bound<'py, PyArrayDescr>,
    shape: &[u64],
    ptr: *const u8,
    writeable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let py = base.py();
    let mut dims: Vec<npy_intp> = Vec::with_capacity(shape.len());
    for &d in shape {
        dims.push(npy_intp::try_from(d).map_err(|_| PyValueError::new_err("dimension too large"))?);
    }
    let flags = npyffi::NPY_ARRAY_C_CONTIGUOUS
        | if writeable {
            npyffi::NPY_ARRAY_WRITEABLE
        } else {
            0
        };
    let subtype = {
        // SAFETY: the API capsule is initialised by the first PY_ARRAY_API call; the returned type object is static.
        unsafe { npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type) }
    };
    // SAFETY: NewFromDescr steals `descr` (passed as an owned pointer), reads `dims` (len = nd), and with a non-null
    // `data` does not allocate; the caller guarantees the memory behind `ptr` is large enough and outlives `base`.
    let raw = unsafe {
        PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            subtype,
            descr.into_dtype_ptr(),
            dims.len() as c_int,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            ptr as *mut std::ffi::c_void,
            flags,
            std::ptr::null_mut(),
        )
    };
    // SAFETY: a new reference or NULL with an exception set.
    let array = unsafe { Bound::from_owned_ptr_or_err(py, raw)? };
    // SAFETY: SetBaseObject steals a reference to the base: we hand it a new one (into_ptr of a clone). On failure
    // it has already released that reference and set an exception.
    let rc = unsafe {
        PY_ARRAY_API.PyArray_SetBaseObject(py, array.as_ptr().cast(), base.clone().into_ptr())
    };
    if rc != 0 {
        return Err(PyErr::fetch(py));
    }
    Ok(array)
}

/// A fresh, writeable uint8 array of `n` bytes whose first byte is 64-byte aligned. Its contents are unspecified:
/// callers write every byte they expose.
///
/// From [`crate::bufcache::MIN_BLOCK`] bytes up the memory is a block of the buffer cache, whose owner (the view's
/// `base`) gives it back when NumPy frees the last view, so the next packet of that size reuses pages already
/// faulted in. Below that, or with the cache off, NumPy's allocator is used: it asks the kernel for transparent huge
/// pages on large blocks; we over-allocate by 63 bytes and slice to the alignment.
pub(crate) fn alloc_aligned(py: Python<'_>, n: usize) -> PyResult<Bound<'_, PyUntypedArray>> {
    if let Some(owner) = crate::bufcache::lease(py, n)? {
        let ptr = owner.get().ptr();
        // SAFETY: the block behind `ptr` is a page-aligned private mapping of at least `n` bytes (its size class) that
        // `owner` owns exclusively and keeps mapped until it is dropped; `owner` becomes the view's base, so the
        // memory outlives the view, and nothing else refers to it, so the view may be writeable.
        let view = unsafe {
            view_over(
                owner.as_any(),
                descr_for_npy(py, NPY_TYPES::NPY_UBYTE),
                &[n as u64],
                ptr,
                true,
            )?
        };
        return Ok(view.cast_into::<PyUntypedArray>()?);
    }
    let total = n
        .checked_add(63)
        .ok_or_else(|| PyValueError::new_err("allocation size overflows"))?;
    let mut dims =
        [npy_intp::try_from(total).map_err(|_| PyValueError::new_err("allocation too large"))?];
    let descr = descr_for_npy(py, NPY_TYPES::NPY_UBYTE);
    // SAFETY: the API capsule is initialised; the returned type object is static.
    let subtype = unsafe { npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type) };
    // SAFETY: with a NULL `data`, NewFromDescr allocates `dims[0]` bytes itself; it steals `descr`.
    let raw = unsafe {
        PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            subtype,
            descr.into_dtype_ptr(),
            1,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
    // SAFETY: new reference or NULL with an exception set.
    let whole = unsafe { Bound::from_owned_ptr_or_err(py, raw)? }.cast_into::<PyUntypedArray>()?;
    let start = data_ptr(&whole);
    let offset = start.align_offset(64);
    // SAFETY: `offset` < 64 and the block is n + 63 bytes long, so [start + offset, start + offset + n) is inside it;
    // `whole` owns the block exclusively and becomes the base, so the view may be writeable.
    let view = unsafe {
        view_over(
            whole.as_any(),
            descr_for_npy(py, NPY_TYPES::NPY_UBYTE),
            &[n as u64],
            start.add(offset),
            true,
        )?
    };
    Ok(view.cast_into::<PyUntypedArray>()?)
}

/// Mutable bytes of an array we created with [`alloc_aligned`] (or any writeable, C-contiguous uint8 array).
///
/// # Safety
/// No other Rust reference to the array's memory may exist while the returned slice is alive, and the array must be
/// C-contiguous with `len` bytes.
#[expect(
    clippy::mut_from_ref,
    reason = "the memory belongs to the NumPy array, not to the Rust reference; exclusivity is the caller's contract"
)]
pub(crate) unsafe fn bytes_mut<'a>(
    array: &'a Bound<'_, PyUntypedArray>,
    len: usize,
) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: forwarded to the caller's contract; the array is alive for 'a through the borrow.
    unsafe { std::slice::from_raw_parts_mut(data_ptr(array) as *mut u8, len) }
}
