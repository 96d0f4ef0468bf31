//! `tenso.tenso_rs`: the native engine of the `tenso` Python package.
//!
//! This crate is the only place that touches Python. It extracts arguments, borrows buffers, releases the GIL around
//! O(n) work and converts results; the protocol itself lives in `tenso-format`, the compute kernels (strided gather,
//! SIMD XXH3, parallel LZ4) in `tenso-kernels`. See `docs/ARCHITECTURE.md` for the functions it exports.

mod bufcache;
mod buffers;
mod codec;
mod decode;
mod encode;
mod errors;
mod gpu;
mod parts;
mod private;
mod quant;
mod shm;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tenso_format::DecodeOptions;

/// Registers every function and constant of the module.
#[pymodule]
fn tenso_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    codec::register(m)?;
    bufcache::register(m)?;
    quant::register(m)?;
    parts::register(m)?;
    shm::register(m)?;
    private::register(m)?;
    gpu::register(m)?;
    constants(m)?;
    m.add_function(wrap_pyfunction!(_kernel_paths, m)?)?;
    Ok(())
}

/// The decoder options of every packet read from Python: the defaults, with `tenso-kernels`' XXH3 (AVX-512 / AVX2
/// where the CPU has them) verifying integrity footers. The writer's are `encode::encode_options`.
pub(crate) fn decode_options() -> DecodeOptions {
    DecodeOptions::default().with_xxh3(tenso_kernels::xxh3::XXH3_FN)
}

/// The paths the compute kernels take in this process, e.g. `{"xxh3": "avx2", "gather": "specialized"}`
/// (`"portable"` everywhere under `TENSO_FORCE_PORTABLE=1`).
#[pyfunction]
fn _kernel_paths(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let paths = PyDict::new(py);
    for (kernel, path) in tenso_kernels::Paths::active().names() {
        paths.set_item(kernel, path)?;
    }
    Ok(paths)
}

/// The protocol constants, defined once in `tenso-format` and re-exported by `tenso.config`.
fn constants(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use tenso_format as f;
    m.add("FLAG_ALIGNED", f::FLAG_ALIGNED)?;
    m.add("FLAG_INTEGRITY", f::FLAG_INTEGRITY)?;
    m.add("FLAG_COMPRESSION", f::FLAG_COMPRESSION)?;
    m.add("FLAG_SPARSE", f::FLAG_SPARSE)?;
    m.add("FLAG_BUNDLE", f::FLAG_BUNDLE)?;
    m.add("FLAG_SPARSE_CSR", f::FLAG_SPARSE_CSR)?;
    m.add("FLAG_SPARSE_CSC", f::FLAG_SPARSE_CSC)?;
    m.add("FLAG_CUST_ALIGN", f::FLAG_CUST_ALIGN)?;
    m.add("FLAG_STRING", f::FLAG_STRING)?;
    m.add("FLAG_RAGGED", f::FLAG_RAGGED)?;
    m.add("FLAG_GPU_IPC_REF", f::FLAG_GPU_IPC_REF)?;
    m.add("MAX_NDIM", f::MAX_NDIM)?;
    m.add("MAX_ELEMENTS", f::MAX_ELEMENTS)?;
    m.add("MAX_DEPTH", f::MAX_DEPTH)?;
    m.add("MAX_BUNDLE_ENTRIES", f::MAX_BUNDLE_ENTRIES)?;
    m.add("QDTYPE_QINT8", f::QDTYPE_QINT8)?;
    m.add("QDTYPE_QUINT8", f::QDTYPE_QUINT8)?;
    m.add("QDTYPE_QINT4", f::QDTYPE_QINT4)?;
    m.add("QDTYPE_QUINT4", f::QDTYPE_QUINT4)?;
    m.add("QUANT_PER_TENSOR", f::QUANT_PER_TENSOR)?;
    m.add("QUANT_PER_CHANNEL", f::QUANT_PER_CHANNEL)?;
    m.add("QUANT_PER_GROUP", f::QUANT_PER_GROUP)?;
    m.add("DEFAULT_ALIGNMENT", f::DEFAULT_ALIGNMENT)?;
    m.add("PROTOCOL_VERSION", f::Version::V4 as u8)?;
    m.add("HEADER_SIZE_V3", f::Version::V3.header_len())?;
    m.add("HEADER_SIZE_V4", f::Version::V4.header_len())?;
    m.add("MAGIC", PyBytes::new(m.py(), &f::MAGIC))?;
    Ok(())
}
