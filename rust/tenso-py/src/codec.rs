//! The codec functions of `tenso.tenso_rs`.

use std::io::Write;

use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyBufferError, PyUserWarning, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyMemoryView, PyTuple};
use tenso_format::Frame;

use crate::buffers::{alloc_aligned, bytes_mut, data_ptr, descr_for, view_over, Source};
use crate::decode::Decoder;
use crate::encode::{encode_options, fill_slots, Collected, WalkOptions, DETACH_BYTES};
use crate::errors::{decode_error, encode_error};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dumps_rs, m)?)?;
    m.add_function(wrap_pyfunction!(loads_rs, m)?)?;
    m.add_function(wrap_pyfunction!(dump_to_buffer_rs, m)?)?;
    m.add_function(wrap_pyfunction!(dump_to_fd_rs, m)?)?;
    m.add_function(wrap_pyfunction!(get_packet_info_rs, m)?)?;
    m.add_function(wrap_pyfunction!(_dumps, m)?)?;
    m.add_function(wrap_pyfunction!(_loads, m)?)?;
    m.add_function(wrap_pyfunction!(_dump_parts, m)?)?;
    m.add_function(wrap_pyfunction!(_frame, m)?)?;
    m.add_function(wrap_pyfunction!(_padding_report, m)?)?;
    m.add_function(wrap_pyfunction!(_alloc, m)?)?;
    m.add_function(wrap_pyfunction!(_xxh3_64, m)?)?;
    m.add_function(wrap_pyfunction!(_xxh3_64_chunked, m)?)?;
    m.add_function(wrap_pyfunction!(_lz4_compress, m)?)?;
    m.add_function(wrap_pyfunction!(_lz4_decompress, m)?)?;
    Ok(())
}

/// Warns once per encode call (a `UserWarning`, shown once per call site by Python's default filter) when a v3 packet
/// could not record the axis of per-channel quantized tensors along an axis other than 0: protocol 3 has no axis byte,
/// the packet is what tenso 0.19.4 writes, and readers take the first axis whose length equals the number of scales
/// (FORMAT.md §9.3).
pub(crate) fn warn_dropped_axes(py: Python<'_>, plan: &tenso_format::Plan) -> PyResult<()> {
    if plan.dropped_axes == 0 {
        return Ok(());
    }
    let category = py.get_type::<PyUserWarning>();
    PyErr::warn(
        py,
        category.as_any(),
        c"protocol 3 has no axis byte: a per-channel QuantizedTensor along an axis other than 0 is written as tenso \
0.19.4 writes it, and readers infer the first axis whose length equals the number of scales (docs/FORMAT.md 9.3)",
        2,
    )
}

/// Encodes `obj` into a fresh 64-byte-aligned NumPy buffer and returns the buffer as a uint8 array.
fn encode_to_array<'py>(
    obj: &Bound<'py, PyAny>,
    strict: bool,
    check_integrity: bool,
    compress: bool,
    alignment: i128,
    protocol: u8,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = obj.py();
    let opts = encode_options(check_integrity, alignment, protocol)?;
    let collected = Collected::walk(
        obj,
        WalkOptions {
            strict,
            compress,
            defer_all: false,
        },
    )?;
    let item = collected.item();
    let plan = tenso_format::plan(&item, &opts).map_err(encode_error)?;
    warn_dropped_axes(py, &plan)?;
    let out = alloc_aligned(py, plan.len)?;
    // SAFETY: `out` is fresh, plan.len bytes long, and no other reference to its memory exists in this function.
    let buf = unsafe { bytes_mut(&out, plan.len) };
    let big = plan.len >= DETACH_BYTES;
    let mut run = || tenso_format::encode_into(&item, &opts, buf);
    let plan = if big { py.detach(run) } else { run() }.map_err(encode_error)?;
    if !plan.slots.is_empty() {
        fill_slots(&out, &plan.slots, &collected)?;
        // SAFETY: as above; the views `fill_slots` created over `out` are gone (they were temporaries).
        let buf = unsafe { bytes_mut(&out, plan.len) };
        if big {
            py.detach(|| tenso_format::seal_with(buf, &plan.slots, &opts));
        } else {
            tenso_format::seal_with(buf, &plan.slots, &opts);
        }
    }
    Ok(out)
}

/// Serialize an object (array, dict, sparse matrix, QuantizedTensor, StringTensor) to a packet.
#[pyfunction]
#[pyo3(signature = (obj, strict=false, check_integrity=false, compress=false, alignment=64, protocol=4))]
fn _dumps<'py>(
    obj: &Bound<'py, PyAny>,
    strict: bool,
    check_integrity: bool,
    compress: bool,
    alignment: i128,
    protocol: u8,
) -> PyResult<Bound<'py, PyMemoryView>> {
    let out = encode_to_array(obj, strict, check_integrity, compress, alignment, protocol)?;
    PyMemoryView::from(out.as_any())
}

/// Serialize an array to a packet (the seed's native entry point; same engine as `tenso.dumps`).
#[pyfunction]
#[pyo3(signature = (array, check_integrity=false, compress=false, alignment=64))]
fn dumps_rs<'py>(
    array: &Bound<'py, PyAny>,
    check_integrity: bool,
    compress: bool,
    alignment: i128,
) -> PyResult<Bound<'py, PyMemoryView>> {
    _dumps(array, false, check_integrity, compress, alignment, 4)
}

/// Decode a packet held by any contiguous buffer.
#[pyfunction]
#[pyo3(signature = (data, copy=false, writeable=false))]
fn _loads<'py>(
    data: &Bound<'py, PyAny>,
    copy: bool,
    writeable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let source = Source::new(data)?;
    // Writeable zero-copy views are only handed out over a private, writeable ndarray (our stream buffers).
    let writeable = writeable
        && source.owner.cast::<PyUntypedArray>().is_ok_and(|a| {
            a.getattr("flags")
                .and_then(|f| f.getattr("writeable"))
                .and_then(|w| w.extract::<bool>())
                .unwrap_or(false)
        });
    Decoder::decode(&source, copy, writeable)
}

/// Decode a packet (the seed's native entry point: read-only zero-copy views).
#[pyfunction]
fn loads_rs<'py>(data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    _loads(data, false, false)
}

/// The packet as chunks: framing as `bytes`, bodies as zero-copy memoryviews of the input arrays.
#[pyfunction]
#[pyo3(signature = (obj, strict=false, check_integrity=false, protocol=4))]
fn _dump_parts<'py>(
    obj: &Bound<'py, PyAny>,
    strict: bool,
    check_integrity: bool,
    protocol: u8,
) -> PyResult<Bound<'py, PyList>> {
    let py = obj.py();
    let opts = encode_options(check_integrity, 64, protocol)?;
    let collected = Collected::walk(
        obj,
        WalkOptions {
            strict,
            compress: false,
            defer_all: true,
        },
    )?;
    let item = collected.item();
    // Framing only: the body ranges of a zeroed allocation are never touched, so the kernel never backs them.
    let mut frame = vec![0u8; tenso_format::plan(&item, &opts).map_err(encode_error)?.len];
    let plan = tenso_format::encode_into(&item, &opts, &mut frame).map_err(encode_error)?;
    warn_dropped_axes(py, &plan)?;
    let parts = PyList::empty(py);
    let mut pos = 0;
    for (slot, (array, dtype)) in plan.slots.iter().zip(&collected.gather) {
        let body = body_bytes(array, *dtype, slot.body.len())?;
        if let Some(footer) = slot.footer {
            let bytes = Source::new(body.as_any())?;
            let slice = bytes.bytes();
            let digest = if slice.len() >= DETACH_BYTES {
                py.detach(|| tenso_kernels::xxh3::xxh3_64(slice))
            } else {
                tenso_kernels::xxh3::xxh3_64(slice)
            };
            frame[footer..footer + 8].copy_from_slice(&digest.to_le_bytes());
        }
        parts.append(PyBytes::new(py, &frame[pos..slot.body.start]))?;
        parts.append(PyMemoryView::from(body.as_any())?)?;
        pos = slot.body.end;
    }
    parts.append(PyBytes::new(py, &frame[pos..]))?;
    Ok(parts)
}

/// The C-order little-endian bytes of `array` as a flat uint8 array: a view when the array already is so, else one
/// gathering copy into fresh aligned memory.
fn body_bytes<'py>(
    array: &Bound<'py, PyUntypedArray>,
    dtype: tenso_format::DType,
    len: usize,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = array.py();
    let (_, swap) = crate::buffers::wire_dtype(&array.dtype())?;
    let u8_descr = descr_for(py, tenso_format::DType::UInt8)?;
    if array.is_c_contiguous() && !swap {
        // SAFETY: a C-contiguous array's data is `len` bytes (its C-order body size) kept alive by `array`, the base.
        // Read-only: the caller's array may be read-only.
        let view = unsafe {
            view_over(
                array.as_any(),
                u8_descr,
                &[len as u64],
                data_ptr(array),
                false,
            )?
        };
        return Ok(view.cast_into::<PyUntypedArray>()?);
    }
    let out = alloc_aligned(py, len)?;
    crate::encode::gather_array(array, dtype, &out, 0..len)?;
    Ok(out)
}

/// Serialize into a caller-provided writeable buffer (shared memory, a bytearray); returns the bytes written.
#[pyfunction]
#[pyo3(signature = (array, buffer, check_integrity=false, compress=false, alignment=64, protocol=4))]
fn dump_to_buffer_rs(
    array: &Bound<'_, PyAny>,
    buffer: &Bound<'_, PyAny>,
    check_integrity: bool,
    compress: bool,
    alignment: i128,
    protocol: u8,
) -> PyResult<usize> {
    let py = array.py();
    let opts = encode_options(check_integrity, alignment, protocol)?;
    let collected = Collected::walk(
        array,
        WalkOptions {
            strict: false,
            compress,
            defer_all: false,
        },
    )?;
    let item = collected.item();
    let plan = tenso_format::plan(&item, &opts).map_err(encode_error)?;
    warn_dropped_axes(py, &plan)?;
    let target = py
        .import("numpy")?
        .getattr("frombuffer")?
        .call1((buffer, "uint8"))?;
    let target = target.cast_into::<PyUntypedArray>()?;
    let writeable: bool = target.getattr("flags")?.getattr("writeable")?.extract()?;
    if !writeable {
        return Err(PyBufferError::new_err(
            "the destination buffer is read-only",
        ));
    }
    if target.len() < plan.len {
        return Err(PyValueError::new_err(format!(
            "the destination buffer holds {} bytes, the packet needs {}",
            target.len(),
            plan.len
        )));
    }
    let plan = {
        // SAFETY: `target` is a writeable uint8 view of the caller's buffer, at least plan.len bytes; we hold the only
        // Rust reference to it for the duration of this block.
        let buf = unsafe { bytes_mut(&target, plan.len) };
        tenso_format::encode_into(&item, &opts, buf).map_err(encode_error)?
    };
    if !plan.slots.is_empty() {
        fill_slots(&target, &plan.slots, &collected)?;
        // SAFETY: as above; the temporary views made by `fill_slots` are gone.
        tenso_format::seal_with(unsafe { bytes_mut(&target, plan.len) }, &plan.slots, &opts);
    }
    Ok(plan.len)
}

/// Serialize straight to a file descriptor (framing and bodies written in turn, no body copy); returns bytes written.
#[pyfunction]
#[pyo3(signature = (array, fd, check_integrity=false, compress=false, alignment=64, protocol=4))]
fn dump_to_fd_rs(
    array: &Bound<'_, PyAny>,
    fd: i32,
    check_integrity: bool,
    compress: bool,
    alignment: i128,
    protocol: u8,
) -> PyResult<usize> {
    use std::os::fd::FromRawFd;
    let py = array.py();
    let chunks: Vec<Bound<'_, PyAny>> = if compress || alignment != 64 {
        vec![_dumps(array, false, check_integrity, compress, alignment, protocol)?.into_any()]
    } else {
        _dump_parts(array, false, check_integrity, protocol)?
            .iter()
            .collect()
    };
    // SAFETY: the caller passes an open descriptor it keeps owning: ManuallyDrop makes sure we never close it.
    let mut file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let mut total = 0;
    for chunk in chunks {
        let source = Source::new(&chunk)?;
        let bytes = source.bytes();
        py.detach(|| file.write_all(bytes))?;
        total += bytes.len();
    }
    Ok(total)
}

/// Header facts without decoding the body (O(1)).
#[pyfunction]
fn get_packet_info_rs<'py>(data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let py = data.py();
    let source = Source::new(data)?;
    let info = tenso_format::packet_info(source.bytes()).map_err(decode_error)?;
    let dict = PyDict::new(py);
    dict.set_item(intern!(py, "version"), info.version as u8)?;
    dict.set_item(intern!(py, "flags"), info.flags)?;
    dict.set_item(intern!(py, "dtype_code"), info.dtype_code)?;
    dict.set_item(intern!(py, "ndim"), info.ndim)?;
    dict.set_item(intern!(py, "shape"), PyTuple::new(py, &info.shape)?)?;
    dict.set_item(intern!(py, "total_elements"), info.total_elements)?;
    dict.set_item(intern!(py, "aligned"), info.aligned)?;
    dict.set_item(intern!(py, "integrity_protected"), info.integrity_protected)?;
    dict.set_item(
        "compressed",
        info.flags & tenso_format::FLAG_COMPRESSION != 0,
    )?;
    dict.set_item(intern!(py, "data_size_bytes"), info.data_size_bytes)?;
    let kind = info.kind.name();
    dict.set_item(intern!(py, "kind"), kind)?;
    if let Some(count) = info.entry_count {
        dict.set_item(intern!(py, "entry_count"), count)?;
    }
    match (info.dtype, info.quantized) {
        (Some(dtype), _) => match descr_for(py, dtype) {
            Ok(descr) => dict.set_item(intern!(py, "dtype"), descr)?,
            // bfloat16 without ml_dtypes: the name still says what the packet holds.
            Err(_) => dict.set_item(intern!(py, "dtype"), dtype.name())?,
        },
        (None, Some(q)) => {
            dict.set_item(intern!(py, "dtype"), q.name())?;
            dict.set_item(intern!(py, "quantized"), true)?;
        }
        (None, None) => dict.set_item(intern!(py, "dtype"), py.None())?,
    }
    Ok(dict)
}

/// Stream framing: the number of bytes the packet needs so far, given the first `have` bytes of `buf`.
#[pyfunction]
fn _frame(buf: &Bound<'_, PyAny>, have: usize) -> PyResult<usize> {
    let source = Source::new(buf)?;
    let bytes = source.bytes();
    let prefix = bytes
        .get(..have)
        .ok_or_else(|| PyValueError::new_err("`have` exceeds the buffer"))?;
    match tenso_format::frame(prefix, &tenso_format::DecodeOptions::default())
        .map_err(decode_error)?
    {
        Frame::Need(n) => Ok(n),
        Frame::Complete(n) => Ok(n),
    }
}

/// Validates the packet at the start of `buf` and reports what a canonical writer would have written differently
/// in bytes readers ignore (`tenso verify --strict`): `{"end": int | None, "nonzero": [{"path": [str | int, ...],
/// "kind": str, "offset": int, "length": int, "first_nonzero": int, "nonzero_bytes": int}, ...]}`. `end` is where
/// the packet ends (None for a top-level compressed packet); `path` holds bundle keys and sparse component indices.
#[pyfunction]
fn _padding_report<'py>(py: Python<'py>, buf: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let source = Source::new(buf)?;
    let report =
        tenso_format::check_padding(source.bytes(), &tenso_format::DecodeOptions::default())
            .map_err(decode_error)?;
    let regions = PyList::empty(py);
    for r in &report.nonzero {
        let path = PyList::empty(py);
        for step in &r.path {
            match step {
                tenso_format::PathStep::Entry(key) => path.append(key)?,
                tenso_format::PathStep::Component(i) => path.append(i)?,
            }
        }
        let d = PyDict::new(py);
        d.set_item("path", path)?;
        d.set_item("kind", r.kind.name())?;
        d.set_item("offset", r.offset)?;
        d.set_item("length", r.len)?;
        d.set_item("first_nonzero", r.first_nonzero)?;
        d.set_item("nonzero_bytes", r.nonzero)?;
        regions.append(d)?;
    }
    let out = PyDict::new(py);
    out.set_item("end", report.end)?;
    out.set_item("nonzero", regions)?;
    Ok(out)
}

/// A fresh writeable uint8 array of `n` bytes, 64-byte aligned.
#[pyfunction]
fn _alloc(py: Python<'_>, n: usize) -> PyResult<Bound<'_, PyUntypedArray>> {
    alloc_aligned(py, n)
}

/// XXH3-64 of a buffer (the integrity footer's hash).
#[pyfunction]
fn _xxh3_64(data: &Bound<'_, PyAny>) -> PyResult<u64> {
    let source = Source::new(data)?;
    let bytes = source.bytes();
    Ok(data.py().detach(|| tenso_kernels::xxh3::xxh3_64(bytes)))
}

/// The chunked XXH3 variant written by tenso 0.19.4 for bodies of 1 MiB or more.
#[pyfunction]
fn _xxh3_64_chunked(data: &Bound<'_, PyAny>) -> PyResult<u64> {
    let source = Source::new(data)?;
    let bytes = source.bytes();
    Ok(data
        .py()
        .detach(|| tenso_format::hash::xxh3_64_chunked_with(tenso_kernels::xxh3::XXH3_FN, bytes)))
}

/// An LZ4 frame of a buffer, as the writer compresses bodies.
#[pyfunction]
fn _lz4_compress<'py>(data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let source = Source::new(data)?;
    let bytes = source.bytes();
    let frame = crate::encode::compress_body(data.py(), bytes);
    Ok(PyBytes::new(data.py(), &frame))
}

/// Decompress an LZ4 frame whose content is exactly `size` bytes.
#[pyfunction]
fn _lz4_decompress<'py>(data: &Bound<'py, PyAny>, size: usize) -> PyResult<Bound<'py, PyAny>> {
    let py = data.py();
    let source = Source::new(data)?;
    let bytes = source.bytes();
    let out = alloc_aligned(py, size)?;
    // SAFETY: a fresh array of `size` bytes, exclusively ours.
    let dst = unsafe { bytes_mut(&out, size) };
    py.detach(|| tenso_format::lz4::decompress_frame_into(bytes, dst))
        .map_err(decode_error)?;
    Ok(out.into_any())
}
