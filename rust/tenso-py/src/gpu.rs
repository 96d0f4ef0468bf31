//! The CUDA probe of `tenso.gpu` (the staging itself lives in `tenso-gpu`).

use pyo3::prelude::*;

/// Whether the NVIDIA driver loads here and reports at least one CUDA device; never raises, never panics
/// (libcuda is dlopen'ed and checked before any driver call).
#[pyfunction]
fn _gpu_available(py: Python<'_>) -> bool {
    py.detach(|| matches!(tenso_gpu::available(), Ok(tenso_gpu::DeviceCount(n)) if n > 0))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_gpu_available, m)?)
}
