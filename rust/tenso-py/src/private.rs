//! `_private_view`: a writeable, private (copy-on-write) NumPy view of bytes this process maps shared from a file
//! (Ray's object store, a node-pool entry, a lease). The mapping and its routes live in `tenso_shm::private`; this
//! file only borrows the Python buffer, releases the GIL around the `mmap`, and makes the array whose base owns the
//! mapping and keeps the source alive.

use numpy::PyUntypedArray;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tenso_shm::private::{resolver, PrivateMap, Route};

use crate::buffers::{descr_for, view_over, Source};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPrivateMap>()?;
    m.add_function(wrap_pyfunction!(_private_view, m)?)?;
    m.add_function(wrap_pyfunction!(_private_view_stats, m)?)?;
    m.add_function(wrap_pyfunction!(_private_view_routes, m)?)?;
    Ok(())
}

/// The base of a private view: the `MAP_PRIVATE` mapping (unmapped when the last view of it dies) and the object
/// that keeps the source bytes alive and unchanged meanwhile (a Ray buffer, a pinned entry, a lease).
#[pyclass(name = "_PrivateMap", module = "tenso", frozen)]
pub(crate) struct PyPrivateMap {
    map: PrivateMap,
    keep: Py<PyAny>,
}

#[pymethods]
impl PyPrivateMap {
    fn __repr__(&self) -> String {
        format!("<tenso._PrivateMap of {} bytes>", self.map.len())
    }

    /// The object that keeps the source bytes alive while this mapping lives.
    #[getter]
    fn source(&self, py: Python<'_>) -> Py<PyAny> {
        self.keep.clone_ref(py)
    }
}

/// A writeable 1-D uint8 array over a private mapping of the file pages behind `buffer`, or None when there is no
/// route to the file (the caller copies instead; `_private_view_stats()["last_failure"]` says why).
///
/// `buffer` must lie in one shared file mapping of this process, and its bytes must not change while `keep`
/// (default: `buffer`) lives: the array's base holds `keep`. `hint_pids`: processes that may hold the file open
/// (Ray's raylet for the object store). `populate`: fill the page tables up front (read-only, no copy).
#[pyfunction]
#[pyo3(signature = (buffer, keep=None, hint_pids=None, populate=false))]
fn _private_view<'py>(
    py: Python<'py>,
    buffer: &Bound<'py, PyAny>,
    keep: Option<Bound<'py, PyAny>>,
    hint_pids: Option<Vec<u32>>,
    populate: bool,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let src = Source::new(buffer)?;
    let bytes = src.bytes();
    let hint_pids = hint_pids.unwrap_or_default();
    let Ok(mut map) = py.detach(|| resolver().private_view(bytes, &hint_pids, populate)) else {
        return Ok(None);
    };
    let (ptr, len) = (map.as_mut_ptr(), map.len());
    let keep = keep.unwrap_or_else(|| src.owner.clone()).unbind();
    let owner = Bound::new(py, PyPrivateMap { map, keep })?;
    // SAFETY: `ptr` is the first of `len` bytes of the private mapping that `owner` (the array's base) owns and
    // unmaps only when dropped; the mapping is this process's alone (MAP_PRIVATE), so writes through the view
    // reach no one else.
    let view = unsafe {
        view_over(
            owner.as_any(),
            descr_for(py, tenso_format::DType::UInt8)?,
            &[len as u64],
            ptr,
            true,
        )
    }?;
    Ok(Some(view.cast_into::<PyUntypedArray>()?.into_any()))
}

/// Counters of this process's private views: `views`, `fallbacks`, `resolved` (files reopened, by route),
/// `cached_files`, `last_failure` (why the last fallback happened, or None).
#[pyfunction]
fn _private_view_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let s = resolver().stats();
    let d = PyDict::new(py);
    d.set_item("views", s.views)?;
    d.set_item("fallbacks", s.fallbacks)?;
    let resolved = PyDict::new(py);
    for r in Route::ALL {
        resolved.set_item(r.name(), s.resolved[r as usize])?;
    }
    d.set_item("resolved", resolved)?;
    d.set_item("cached_files", s.cached_files)?;
    d.set_item("last_failure", s.last_failure)?;
    Ok(d)
}

/// Allows only the named routes (`"map_files"`, `"path"`, `"proc_fd"`) from now on; `[]` forces every private view
/// to fall back, None allows them all again. Forgets every file resolved so far.
#[pyfunction]
#[pyo3(signature = (routes))]
fn _private_view_routes(routes: Option<Vec<String>>) -> PyResult<()> {
    let parsed = routes
        .map(|names| {
            names
                .iter()
                .map(|n| {
                    Route::from_name(n).ok_or_else(|| {
                        PyValueError::new_err(format!(
                            "unknown route {n:?}: expected \"map_files\", \"path\" or \"proc_fd\""
                        ))
                    })
                })
                .collect::<PyResult<Vec<Route>>>()
        })
        .transpose()?;
    resolver().set_routes(parsed.as_deref());
    Ok(())
}
