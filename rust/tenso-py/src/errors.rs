//! The one place where Rust errors become Python exceptions.
//!
//! The classes live in `tenso/errors.py` so that they can be imported from their `__module__` and pickled (Ray sends
//! worker errors back to the driver by pickling them).

use pyo3::exceptions::PyValueError;
use pyo3::{import_exception, PyErr};
use tenso_format::FormatError;

import_exception!(tenso.errors, TensoFormatError);
import_exception!(tenso.errors, TensoIntegrityError);
import_exception!(tenso.errors, TensoTruncatedError);
import_exception!(tenso.errors, TensoCacheFullError);

/// Maps an error met while reading untrusted bytes.
///
/// A packet that ends early inside a complete buffer is malformed (a `ValueError`); only stream readers turn "the
/// source ended" into `TensoTruncatedError`, and they do so in Python where the source is.
pub(crate) fn decode_error(err: FormatError) -> PyErr {
    if err.is_integrity() {
        TensoIntegrityError::new_err(err.to_string())
    } else {
        TensoFormatError::new_err(err.to_string())
    }
}

/// Maps an error met while encoding a caller's object: these are bad arguments, not bad bytes.
pub(crate) fn encode_error(err: FormatError) -> PyErr {
    PyValueError::new_err(err.to_string())
}
