//! Packets to Python objects: zero-copy NumPy views over the caller's buffer wherever the bytes allow it.

use numpy::{PyArray1, PyArrayDescrMethods};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use tenso_format::{Body, Dense, Packet, SparseFormat};

use crate::buffers::{alloc_aligned, bytes_mut, data_ptr, descr_for, view_over, Source};
use crate::encode::{quantized_tensor_type, string_tensor_type, DETACH_BYTES};
use crate::errors::{decode_error, missing_extra};

/// The largest alignment a decoded copy honours (one page).
const MAX_COPY_ALIGN: usize = 4096;

/// How decoded arrays relate to the source buffer.
pub(crate) struct Decoder<'s, 'py> {
    pub source: &'s Source<'py>,
    /// Every array gets its own fresh, writeable, 64-byte-aligned memory.
    pub copy: bool,
    /// Zero-copy views may be writeable: the source is a private buffer of ours (stream readers).
    pub writeable: bool,
}

impl<'s, 'py> Decoder<'s, 'py> {
    /// Decodes the packet held by `source` into Python objects. Checksums and decompression are O(n), so large
    /// buffers are parsed with the GIL released.
    pub fn decode(
        source: &'s Source<'py>,
        copy: bool,
        writeable: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = source.owner.py();
        let bytes = source.bytes();
        let packet = if bytes.len() >= DETACH_BYTES {
            py.detach(|| tenso_format::decode_with(bytes, &crate::decode_options()))
        } else {
            tenso_format::decode_with(bytes, &crate::decode_options())
        }
        .map_err(decode_error)?;
        Decoder {
            source,
            copy,
            writeable,
        }
        .to_python(py, &packet)
    }

    pub fn to_python(&self, py: Python<'py>, packet: &Packet<'_>) -> PyResult<Bound<'py, PyAny>> {
        match packet {
            Packet::Dense(dense) => self.dense(py, dense, self.copy),
            Packet::Bundle(entries) => {
                let dict = PyDict::new(py);
                for (key, value) in entries {
                    // Duplicate keys: the later entry wins, as in both reference versions.
                    dict.set_item(*key, self.to_python(py, value)?)?;
                }
                Ok(dict.into_any())
            }
            Packet::Sparse(sparse) => {
                // SciPy may sort or deduplicate in place later, so sparse components always own their memory.
                let [a, b, c] = &sparse.components;
                let (a, b, c) = (
                    self.dense(py, a, true)?,
                    self.dense(py, b, true)?,
                    self.dense(py, c, true)?,
                );
                let shape = PyTuple::new(py, sparse.shape)?;
                let scipy = scipy_sparse(py)?;
                let kwargs = PyDict::new(py);
                kwargs.set_item("shape", shape)?;
                let (ctor, args) = match sparse.format {
                    SparseFormat::Coo => (
                        "coo_matrix",
                        (a, PyTuple::new(py, [b, c])?.into_any()).into_pyobject(py)?,
                    ),
                    SparseFormat::Csr => ("csr_matrix", (a, b, c).into_pyobject(py)?),
                    SparseFormat::Csc => ("csc_matrix", (a, b, c).into_pyobject(py)?),
                };
                scipy.getattr(ctor)?.call((args,), Some(&kwargs))
            }
            Packet::Quantized(q) => {
                let descr = descr_for(py, tenso_format::DType::UInt8)?;
                let shape = [q.codes.len() as u64];
                let data = if self.copy {
                    self.copied(py, q.codes, descr, &shape, true, 64)?
                } else {
                    self.view(q.codes, descr, &shape)?
                };
                let kwargs = PyDict::new(py);
                kwargs.set_item("quant_scheme", q.scheme.code())?;
                kwargs.set_item("group_size", q.group_size)?;
                kwargs.set_item("axis", q.axis)?;
                let args = (
                    data,
                    PyArray1::from_slice(py, &q.scales),
                    PyArray1::from_slice(py, &q.zero_points),
                    PyTuple::new(py, &q.shape)?,
                    q.qdtype.code(),
                );
                quantized_tensor_type(py)?.call(args, Some(&kwargs))
            }
            Packet::Strings(s) => {
                let offsets = PyArray1::from_slice(py, &s.offsets);
                let payload = PyBytes::new(py, s.payload);
                string_tensor_type(py)?.call_method1("__tenso_from_parts__", (offsets, payload))
            }
            #[allow(unreachable_patterns)]
            _ => Err(decode_error(tenso_format::FormatError::Unsupported {
                what: "this packet kind",
            })),
        }
    }

    fn dense(&self, py: Python<'py>, dense: &Dense<'_>, copy: bool) -> PyResult<Bound<'py, PyAny>> {
        let descr = descr_for(py, dense.dtype)?;
        let nbytes = dense.nbytes();
        // Bool elements must be 0 or 1 (FORMAT.md §2.3): other bytes would be values NumPy never produces.
        dense.check_bool().map_err(decode_error)?;
        match &dense.body {
            Body::Raw(bytes) => {
                // A misaligned element type (bundle leaves sit at arbitrary offsets) is copied: NumPy, torch and BLAS
                // all work on aligned data, and the copy of such small leaves costs less than the slow paths.
                // Such a private copy stays read-only unless a copy was asked for, so flags do not depend on offsets.
                let misaligned =
                    !(bytes.as_ptr() as usize).is_multiple_of(descr.alignment().max(1));
                if copy || misaligned {
                    return self.copied(
                        py,
                        bytes,
                        descr,
                        &dense.shape,
                        copy || self.writeable,
                        dense.alignment,
                    );
                }
                self.view(bytes, descr, &dense.shape)
            }
            body => {
                // Compressed (frame, or v3 raw block): decompressed straight into fresh aligned memory of the exact
                // size the shape proves, never a size the packet claims.
                let decoded_len = body.decoded_len();
                let out = self.fresh(py, decoded_len)?;
                // SAFETY: `out` is a fresh array of exactly `decoded_len` bytes that nothing else references yet.
                let dst = unsafe { bytes_mut(&out, decoded_len) };
                let mut run = || {
                    body.decode_into(dst)?;
                    check_decoded_bool(dense.dtype, dst)
                };
                if nbytes >= DETACH_BYTES {
                    py.detach(run)
                } else {
                    run()
                }
                .map_err(decode_error)?;
                self.over_fresh(out, descr, &dense.shape, copy || self.writeable)
            }
        }
    }

    fn fresh(&self, py: Python<'py>, len: usize) -> PyResult<Bound<'py, numpy::PyUntypedArray>> {
        alloc_aligned(py, len)
    }

    fn over_fresh(
        &self,
        out: Bound<'py, numpy::PyUntypedArray>,
        descr: Bound<'py, numpy::PyArrayDescr>,
        shape: &[u64],
        writeable: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ptr = data_ptr(&out);
        // SAFETY: `out` holds exactly product(shape) * itemsize bytes (the decoded length was checked against the
        // shape by tenso-format) and owns them exclusively; it becomes the base.
        unsafe { view_over(out.as_any(), descr, shape, ptr, writeable) }
    }

    /// A fresh copy of `bytes` as an array of `descr`/`shape`, aligned like the packet's body: to `align` bytes,
    /// at least 64 and at most [`MAX_COPY_ALIGN`] (a packet may claim alignments up to 2^63; past a page they buy
    /// nothing and would only cost slack memory).
    fn copied(
        &self,
        py: Python<'py>,
        bytes: &[u8],
        descr: Bound<'py, numpy::PyArrayDescr>,
        shape: &[u64],
        writeable: bool,
        align: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let align = align.clamp(64, MAX_COPY_ALIGN);
        // `fresh` memory is 64-byte aligned; a larger alignment (a power of two) is reached within `slack` bytes.
        let slack = align - 64;
        let out = self.fresh(py, bytes.len() + slack)?;
        let base = data_ptr(&out);
        let pad = base.align_offset(align);
        debug_assert!(pad <= slack);
        // SAFETY: a fresh exclusively-owned buffer of bytes.len() + slack bytes; pad <= slack because `base` is 64-byte
        // aligned and `align` is a power of two, so pad is a multiple of 64 below `align`.
        let dst = unsafe { &mut bytes_mut(&out, bytes.len() + slack)[pad..pad + bytes.len()] };
        if bytes.len() >= DETACH_BYTES {
            py.detach(|| dst.copy_from_slice(bytes));
        } else {
            dst.copy_from_slice(bytes);
        }
        // SAFETY: `out` holds product(shape) * itemsize bytes from `pad` on (bytes.len() was checked against the shape
        // by tenso-format), owns them exclusively and becomes the base.
        unsafe { view_over(out.as_any(), descr, shape, base.add(pad), writeable) }
    }

    /// A zero-copy array of `descr`/`shape` over `bytes`, a sub-slice of the source.
    fn view(
        &self,
        bytes: &[u8],
        descr: Bound<'py, numpy::PyArrayDescr>,
        shape: &[u64],
    ) -> PyResult<Bound<'py, PyAny>> {
        debug_assert!(bytes.as_ptr() as usize >= self.source.base_addr());
        // SAFETY: `bytes` is a sub-slice of the source buffer (tenso-format only returns sub-slices of its input),
        // of exactly product(shape) * itemsize bytes, kept alive by `source.owner`, which becomes the view's base.
        // The view is writeable only when the source is our own private stream buffer.
        unsafe {
            view_over(
                &self.source.owner,
                descr,
                shape,
                bytes.as_ptr(),
                self.writeable,
            )
        }
    }
}

fn check_decoded_bool(
    dtype: tenso_format::DType,
    body: &[u8],
) -> Result<(), tenso_format::FormatError> {
    if dtype == tenso_format::DType::Bool {
        tenso_format::check_bool_body(body)
    } else {
        Ok(())
    }
}

fn scipy_sparse(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    let module = MODULE.get_or_try_init(py, || -> PyResult<_> {
        py.import("scipy.sparse")
            .map(Bound::unbind)
            .map_err(|e| missing_extra(py, e, "decoding sparse matrices needs scipy", "sparse"))
    })?;
    Ok(module.bind(py).clone())
}
