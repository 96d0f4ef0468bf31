//! Python objects to packets: walks the object once, borrows every array body it can, and lets `tenso-format` lay
//! the packet out straight into a NumPy-owned, 64-byte-aligned buffer.

use numpy::npyffi::PY_ARRAY_API;
use numpy::{PyArrayDescrMethods, PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyType};
use tenso_format::{
    BodySrc, DType, EncodeOptions, Item, QDType, QuantScheme, SparseFormat, Version, MAX_DEPTH,
};

use tenso_kernels::gather::Strided;

use crate::buffers::{bytes_mut, data_ptr, descr_for, view_over, wire_dtype, Source};
use crate::errors::encode_error;

/// Bodies at least this large are copied, hashed or compressed with the GIL released.
pub(crate) const DETACH_BYTES: usize = 256 * 1024;

/// A borrowed byte range of an object held in [`Collected::keep`].
#[derive(Clone, Copy)]
struct Span {
    ptr: *const u8,
    len: usize,
}

enum Body {
    /// Contiguous little-endian bytes of a kept array.
    Borrowed(Span),
    /// A non-contiguous or big-endian array, gathered into its slot after layout (the next entry of `Collected::gather`).
    Gather,
    /// An LZ4 frame we compressed.
    Compressed(Vec<u8>),
}

enum Node {
    Dense {
        dtype: DType,
        shape: Vec<u64>,
        body: Body,
    },
    Bundle(Vec<(String, Node)>),
    Sparse {
        format: SparseFormat,
        shape: [u64; 2],
        components: Box<[Node; 3]>,
    },
    Quantized {
        qdtype: QDType,
        scheme: QuantScheme,
        axis: u8,
        group_size: u32,
        shape: Vec<u64>,
        scales: Vec<f32>,
        zero_points: Vec<f32>,
        codes: Span,
    },
    Strings {
        offsets: Vec<u64>,
        payload: Span,
    },
}

/// What a walk over a Python object produced, and the objects whose memory it borrows.
pub(crate) struct Collected<'py> {
    root: Node,
    keep: Vec<Bound<'py, PyAny>>,
    /// Arrays whose bodies are copied into their slots after layout, with the wire dtype they are written as.
    pub gather: Vec<(Bound<'py, PyUntypedArray>, DType)>,
}

/// How the walk treats array bodies.
#[derive(Clone, Copy)]
pub(crate) struct WalkOptions {
    pub strict: bool,
    pub compress: bool,
    /// Every dense body becomes a gather slot (used by `_dump_parts`, which hands bodies out as views).
    pub defer_all: bool,
}

impl<'py> Collected<'py> {
    /// Walks `obj`: ndarray (or NumPy scalar), dict, SciPy sparse matrix, QuantizedTensor, StringTensor.
    pub fn walk(obj: &Bound<'py, PyAny>, opts: WalkOptions) -> PyResult<Self> {
        let mut keep = Vec::new();
        let mut gather = Vec::new();
        let root = walk(obj, opts, 0, &mut keep, &mut gather)?;
        Ok(Collected { root, keep, gather })
    }

    /// The tree as `tenso-format` items, borrowing from the kept objects.
    pub fn item(&self) -> Item<'_> {
        let _ = &self.keep;
        item(&self.root)
    }
}

/// The bytes of `span`, borrowed for as long as `_tie` (the node or array that keeps the owner alive).
fn span_slice<T: ?Sized>(span: Span, _tie: &T) -> &[u8] {
    if span.len == 0 {
        return &[];
    }
    // SAFETY: every Span is created from the data of an object that is kept alive at least as long as `_tie`: either
    // an array pushed into `Collected::keep` (and `_tie` is a node of that same `Collected`), or the local array
    // passed as `_tie` itself. The returned borrow cannot outlive `_tie`.
    unsafe { std::slice::from_raw_parts(span.ptr, span.len) }
}

fn item(node: &Node) -> Item<'_> {
    match node {
        Node::Dense { dtype, shape, body } => Item::Dense {
            dtype: *dtype,
            shape: shape.clone(),
            body: match body {
                Body::Borrowed(span) => BodySrc::Bytes(span_slice(*span, node)),
                Body::Gather => BodySrc::Deferred,
                Body::Compressed(frame) => BodySrc::Lz4Frame(frame),
            },
        },
        Node::Bundle(entries) => {
            Item::Bundle(entries.iter().map(|(k, v)| (k.as_str(), item(v))).collect())
        }
        Node::Sparse {
            format,
            shape,
            components,
        } => Item::Sparse {
            format: *format,
            shape: *shape,
            components: Box::new([
                item(&components[0]),
                item(&components[1]),
                item(&components[2]),
            ]),
        },
        Node::Quantized {
            qdtype,
            scheme,
            axis,
            group_size,
            shape,
            scales,
            zero_points,
            codes,
        } => Item::Quantized {
            qdtype: *qdtype,
            scheme: *scheme,
            axis: *axis,
            group_size: *group_size,
            shape: shape.clone(),
            scales,
            zero_points,
            codes: span_slice(*codes, node),
        },
        Node::Strings { offsets, payload } => Item::Strings {
            offsets,
            payload: span_slice(*payload, node),
        },
    }
}

fn tenso_class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    module: &str,
    name: &str,
) -> PyResult<Bound<'py, PyType>> {
    cell.import(py, module, name).cloned()
}

pub(crate) fn quantized_tensor_type(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    tenso_class(py, &CELL, "tenso.quantize", "QuantizedTensor")
}

pub(crate) fn string_tensor_type(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    tenso_class(py, &CELL, "tenso.ragged", "StringTensor")
}

pub(crate) fn ragged_array_type(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    tenso_class(py, &CELL, "tenso.ragged", "RaggedArray")
}

fn numpy_attr<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("numpy")?.getattr(name)
}

fn walk<'py>(
    obj: &Bound<'py, PyAny>,
    opts: WalkOptions,
    depth: usize,
    keep: &mut Vec<Bound<'py, PyAny>>,
    gather: &mut Vec<(Bound<'py, PyUntypedArray>, DType)>,
) -> PyResult<Node> {
    let py = obj.py();
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "nesting deeper than {MAX_DEPTH} containers (is a dict inside itself?)"
        )));
    }
    if let Ok(array) = obj.cast::<PyUntypedArray>() {
        return walk_array(array, opts, keep, gather);
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        let mut entries = Vec::with_capacity(dict.len());
        for (key, value) in dict.iter() {
            let key = key.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "bundle keys must be str, got {}",
                    key.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
            })?;
            let node = walk(&value, opts, depth + 1, keep, gather)?;
            entries.push((key.to_str()?.to_owned(), node));
        }
        return Ok(Node::Bundle(entries));
    }
    // SAFETY: the API capsule is initialised (the cast above went through it); the type object is static.
    let generic = unsafe {
        numpy::npyffi::get_type_object(py, numpy::npyffi::NpyTypes::PyGenericArrType_Type)
    };
    // SAFETY: both pointers are valid type/object pointers while the GIL is held.
    if unsafe { pyo3::ffi::PyObject_TypeCheck(obj.as_ptr(), generic) } != 0 {
        let array = numpy_attr(py, "asarray")?.call1((obj,))?;
        return walk(&array, opts, depth, keep, gather);
    }
    if obj.is_instance(quantized_tensor_type(py)?.as_any())? {
        return walk_quantized(obj, keep);
    }
    if obj.is_instance(ragged_array_type(py)?.as_any())? {
        // A ragged array travels as its three-entry bundle (FORMAT.md §11).
        return walk(
            &obj.call_method0("__tenso_parts__")?,
            opts,
            depth,
            keep,
            gather,
        );
    }
    if obj.is_instance(string_tensor_type(py)?.as_any())? {
        // The documented accessor (tenso/ragged.py), never the private attributes.
        let (offsets, payload): (Bound<'_, PyAny>, Bound<'_, PyAny>) =
            obj.call_method0("__tenso_parts__")?.extract()?;
        let offsets = contiguous(offsets, "uint64")?;
        let offsets: PyReadonlyArray1<u64> = offsets.extract()?;
        let offsets = offsets.as_slice()?.to_vec();
        let payload = Source::new(&payload)?;
        let span = Span {
            ptr: payload.bytes().as_ptr(),
            len: payload.bytes().len(),
        };
        keep.push(payload.owner);
        return Ok(Node::Strings {
            offsets,
            payload: span,
        });
    }
    if let Ok(format) = obj.getattr("format") {
        if let Ok(format) = format.extract::<String>() {
            return walk_sparse(obj, &format, opts, keep, gather);
        }
    }
    Err(PyTypeError::new_err(format!(
        "cannot encode an object of type {}: expected a numpy array, a dict of them, a scipy.sparse COO/CSR/CSC \
         matrix, a QuantizedTensor, a StringTensor or a RaggedArray",
        obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
    )))
}

/// `numpy.ascontiguousarray(obj, dtype=dtype).reshape(-1)`.
fn contiguous<'py>(obj: Bound<'py, PyAny>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let array = numpy_attr(py, "ascontiguousarray")?.call1((obj, dtype))?;
    array.call_method1("reshape", (-1,))
}

fn walk_array<'py>(
    array: &Bound<'py, PyUntypedArray>,
    opts: WalkOptions,
    keep: &mut Vec<Bound<'py, PyAny>>,
    gather: &mut Vec<(Bound<'py, PyUntypedArray>, DType)>,
) -> PyResult<Node> {
    let (dtype, swap) = wire_dtype(&array.dtype())?;
    let shape: Vec<u64> = array.shape().iter().map(|&d| d as u64).collect();
    let contiguous = array.is_c_contiguous();
    if !contiguous && opts.strict {
        return Err(PyValueError::new_err("Tensor is not C-Contiguous"));
    }
    let len = shape
        .iter()
        .try_fold(dtype.itemsize(), |acc, &d| acc.checked_mul(d as usize));
    let len = len.ok_or_else(|| PyValueError::new_err("array size overflows"))?;
    let direct = contiguous && !swap;
    if opts.compress {
        // LZ4 needs the little-endian C-order bytes in one piece; gather them first when the array is not already so.
        let source = if direct {
            array.clone()
        } else {
            let le = descr_for(array.py(), dtype)?;
            numpy_attr(array.py(), "ascontiguousarray")?
                .call1((array, le))?
                .cast_into::<PyUntypedArray>()?
        };
        let span = Span {
            ptr: data_ptr(&source),
            len,
        };
        let frame = compress_body(array.py(), span_slice(span, &source));
        return Ok(Node::Dense {
            dtype,
            shape,
            body: Body::Compressed(frame),
        });
    }
    if direct && !opts.defer_all {
        keep.push(array.clone().into_any());
        return Ok(Node::Dense {
            dtype,
            shape,
            body: Body::Borrowed(Span {
                ptr: data_ptr(array),
                len,
            }),
        });
    }
    gather.push((array.clone(), dtype));
    Ok(Node::Dense {
        dtype,
        shape,
        body: Body::Gather,
    })
}

fn walk_sparse<'py>(
    obj: &Bound<'py, PyAny>,
    format: &str,
    opts: WalkOptions,
    keep: &mut Vec<Bound<'py, PyAny>>,
    gather: &mut Vec<(Bound<'py, PyUntypedArray>, DType)>,
) -> PyResult<Node> {
    let (format, names) = match format {
        "coo" => (SparseFormat::Coo, ["data", "row", "col"]),
        "csr" => (SparseFormat::Csr, ["data", "indices", "indptr"]),
        "csc" => (SparseFormat::Csc, ["data", "indices", "indptr"]),
        other => {
            return Err(PyValueError::new_err(format!(
                "unsupported sparse format {other:?}: convert to coo, csr or csc first"
            )))
        }
    };
    let shape: (u64, u64) = obj.getattr("shape")?.extract()?;
    // Components are never compressed (FORMAT.md §8.1).
    let opts = WalkOptions {
        compress: false,
        ..opts
    };
    let mut components = Vec::with_capacity(3);
    for name in names {
        let component = obj.getattr(name)?;
        let array = component.cast::<PyUntypedArray>().map_err(|_| {
            PyTypeError::new_err(format!("sparse component {name} is not a numpy array"))
        })?;
        components.push(walk_array(array, opts, keep, gather)?);
    }
    let components: [Node; 3] = components
        .try_into()
        .map_err(|_| PyValueError::new_err("three components"))?;
    Ok(Node::Sparse {
        format,
        shape: [shape.0, shape.1],
        components: Box::new(components),
    })
}

fn walk_quantized<'py>(
    obj: &Bound<'py, PyAny>,
    keep: &mut Vec<Bound<'py, PyAny>>,
) -> PyResult<Node> {
    let code: u8 = obj.getattr("dtype_code")?.extract()?;
    let qdtype = QDType::from_code(code).map_err(encode_error)?;
    let scheme_code: u8 = obj.getattr("quant_scheme")?.extract()?;
    let scheme = QuantScheme::from_code(scheme_code).map_err(encode_error)?;
    let shape: Vec<u64> = obj.getattr("shape")?.extract()?;
    let group_size: u32 = obj.getattr("group_size")?.extract()?;
    let mut axis: i64 = match obj.getattr("axis") {
        Ok(axis) => axis.extract()?,
        Err(_) => 0,
    };
    if scheme == QuantScheme::PerChannel && axis < 0 {
        axis += shape.len() as i64;
    }
    if scheme != QuantScheme::PerChannel {
        axis = 0;
    }
    let axis = u8::try_from(axis)
        .map_err(|_| PyValueError::new_err(format!("quantization axis {axis} out of range")))?;
    let floats = |name: &str| -> PyResult<Vec<f32>> {
        let array = contiguous(obj.getattr(name)?, "float32")?;
        let array: PyReadonlyArray1<f32> = array.extract()?;
        Ok(array.as_slice()?.to_vec())
    };
    let scales = floats("scales")?;
    let zero_points = floats("zero_points")?;
    let data = obj.getattr("data")?;
    let data = data
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err("QuantizedTensor.data must be a numpy array"))?;
    if data.dtype().itemsize() != 1 {
        return Err(PyValueError::new_err(
            "QuantizedTensor.data must hold packed uint8 codes",
        ));
    }
    let data = if data.is_c_contiguous() {
        data.clone()
    } else {
        numpy_attr(obj.py(), "ascontiguousarray")?
            .call1((data,))?
            .cast_into::<PyUntypedArray>()?
    };
    let codes = Span {
        ptr: data_ptr(&data),
        len: data.len(),
    };
    keep.push(data.into_any());
    Ok(Node::Quantized {
        qdtype,
        scheme,
        axis,
        group_size,
        shape,
        scales,
        zero_points,
        codes,
    })
}

/// An LZ4 frame of `body` (`tenso_kernels::lz4`: bodies of several 4 MiB blocks are compressed on all cores); small
/// ones with the GIL held.
pub(crate) fn compress_body(py: Python<'_>, body: &[u8]) -> Vec<u8> {
    if body.len() < DETACH_BYTES {
        return tenso_kernels::lz4::compress_frame(body);
    }
    py.detach(|| tenso_kernels::lz4::compress_frame(body))
}

/// Builds the writer options from the Python keywords.
pub(crate) fn encode_options(
    check_integrity: bool,
    alignment: i128,
    protocol: u8,
) -> PyResult<EncodeOptions> {
    let version = match protocol {
        3 => Version::V3,
        4 => Version::V4,
        other => {
            return Err(PyValueError::new_err(format!(
                "protocol must be 3 or 4, got {other}"
            )))
        }
    };
    // Any Python int is accepted here so that a negative or huge value is a ValueError like any other bad alignment.
    let alignment = u64::try_from(alignment)
        .ok()
        .filter(|a| a.is_power_of_two() && *a <= 1 << 63)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "Alignment must be a power of two (1 to 2**63), got {alignment}"
            ))
        })?;
    Ok(EncodeOptions {
        version,
        alignment: alignment as usize,
        integrity: check_integrity,
        compress: false,
        ..EncodeOptions::default()
    }
    .with_xxh3(tenso_kernels::xxh3::XXH3_FN))
}

/// Copies each gathered array into its slot of `out` (a uint8 array), converting layout and byte order on the way.
///
/// `slots` and `collected.gather` are in the same depth-first order (the order `tenso_format::plan` reports them).
pub(crate) fn fill_slots<'py>(
    out: &Bound<'py, PyUntypedArray>,
    slots: &[tenso_format::Slot],
    collected: &Collected<'py>,
) -> PyResult<()> {
    if slots.len() != collected.gather.len() {
        return Err(PyValueError::new_err(
            "internal error: slot count differs from gathered arrays",
        ));
    }
    for (slot, (array, dtype)) in slots.iter().zip(&collected.gather) {
        gather_array(array, *dtype, out, slot.body.clone())?;
    }
    Ok(())
}

/// Writes the C-order little-endian body of `array` into `range` of `out`, a uint8 array we allocated and own.
pub(crate) fn gather_array<'py>(
    array: &Bound<'py, PyUntypedArray>,
    dtype: DType,
    out: &Bound<'py, PyUntypedArray>,
    range: std::ops::Range<usize>,
) -> PyResult<()> {
    let py = out.py();
    let (_, swap) = wire_dtype(&array.dtype())?;
    let itemsize = dtype.itemsize();
    let span = Strided::span(array.shape(), array.strides(), itemsize);
    let Some((low, span_len)) = span.filter(|_| !swap) else {
        // Byte-swapped (or empty) input: NumPy's casting copy converts the order while it gathers.
        let shape: Vec<u64> = array.shape().iter().map(|&d| d as u64).collect();
        // SAFETY: `range` lies inside `out` (allocated by us, owned exclusively by `out`) and is the C-order body
        // size of `array`; `out` becomes the base of the temporary view.
        let target = unsafe {
            view_over(
                out.as_any(),
                descr_for(py, dtype)?,
                &shape,
                data_ptr(out).add(range.start),
                true,
            )?
        };
        // SAFETY: both arguments are live ndarrays; CopyInto handles strides, overlap and byte order, and returns -1
        // with an exception set on failure.
        let rc = unsafe {
            PY_ARRAY_API.PyArray_CopyInto(py, target.as_ptr().cast(), array.as_array_ptr())
        };
        return if rc == 0 {
            Ok(())
        } else {
            Err(PyErr::fetch(py))
        };
    };
    // SAFETY: NumPy guarantees every element of `array` lies inside its allocation, so the span from the lowest to
    // the highest element byte (computed from its own shape and strides) is readable memory kept alive by `array`.
    let src = unsafe { std::slice::from_raw_parts(data_ptr(array).offset(low), span_len) };
    // SAFETY: `out` is our exclusively-owned buffer and `range` is inside it; no other Rust reference to it exists.
    let dst = unsafe { &mut bytes_mut(out, range.end)[range.start..] };
    let strided = Strided::try_new(
        src,
        (-low) as usize,
        array.shape(),
        array.strides(),
        itemsize,
    )
    .ok_or_else(|| PyValueError::new_err("internal error: array elements outside their span"))?;
    if strided.len() != dst.len() {
        return Err(PyValueError::new_err(
            "internal error: gather slot size differs from the array's",
        ));
    }
    if dst.len() >= DETACH_BYTES {
        py.detach(|| strided.gather_into(dst));
    } else {
        strided.gather_into(dst);
    }
    Ok(())
}
