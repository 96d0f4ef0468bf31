//! The one place where Rust errors become Python exceptions.
//!
//! The classes live in `tenso/errors.py` so that they can be imported from their `__module__` and pickled (Ray sends
//! worker errors back to the driver by pickling them).
//!
//! Messages start with the reference implementation's words and keep our detail after them, so that code written
//! against upstream tenso (`pytest.raises(match=...)`, `"Packet too short" in str(e)`) keeps working:
//!
//! ```text
//! FormatError::Truncated        TensoFormatError     "Packet too short: needs at least 10 bytes, 3 available"
//! FormatError::BadMagic         TensoFormatError     "Invalid tenso packet: magic is ..."
//! FormatError::Integrity        TensoIntegrityError  "Integrity check failed: xxh3 mismatch (footer ..., computed ...)"
//! FormatError::TooManyDims      TensoFormatError     "Packet exceeds maximum dimensions: 33 dimensions, the maximum is 32"
//! FormatError::TooManyElements  TensoFormatError     "Packet exceeds maximum elements: ..."
//! FormatError::DimTooLarge      ValueError (encode)  "Dimension ... does not fit in a 32-bit shape field ..."
//! ShmError::Io                  OSError subclass by errno (FileNotFoundError, FileExistsError, PermissionError, ...)
//! ShmError::{Full, NoReferenceSlot} TensoCacheFullError  (a MemoryError)
//! ShmError::BadPool             TensoFormatError     "Invalid TensoCache magic: ..." / "Invalid TensoCache layout: ..."
//! ShmError::{BadName, TooSmall, KeyTooLong, BadLease} and others: ValueError (a bad argument, not bad bytes)
//! a missing optional module       ImportError naming the extra that installs it, the import error as __cause__
//! ```

use std::io;

use pyo3::exceptions::{PyImportError, PyValueError};
use pyo3::{import_exception, PyErr, Python};
use tenso_format::FormatError;
use tenso_shm::ShmError;

import_exception!(tenso.errors, TensoFormatError);
import_exception!(tenso.errors, TensoIntegrityError);
import_exception!(tenso.errors, TensoTruncatedError);
import_exception!(tenso.errors, TensoCacheFullError);

/// A Rust message (lowercase by Rust convention) as Python shows it: first letter capitalised, which makes the
/// format errors start with the reference's wording ("packet too short" becomes "Packet too short").
fn sentence(message: String) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) if first.is_ascii_lowercase() => {
            let mut out = String::with_capacity(message.len());
            out.push(first.to_ascii_uppercase());
            out.push_str(chars.as_str());
            out
        }
        _ => message,
    }
}

/// Maps an error met while reading untrusted bytes.
///
/// A packet that ends early inside a complete buffer is malformed (a `ValueError`); only stream readers turn "the
/// source ended" into `TensoTruncatedError`, and they do so in Python where the source is.
pub(crate) fn decode_error(err: FormatError) -> PyErr {
    let message = sentence(err.to_string());
    if err.is_integrity() {
        TensoIntegrityError::new_err(message)
    } else {
        TensoFormatError::new_err(message)
    }
}

/// Maps an error met while encoding a caller's object: these are bad arguments, not bad bytes.
pub(crate) fn encode_error(err: FormatError) -> PyErr {
    PyValueError::new_err(sentence(err.to_string()))
}

/// Maps a shared-memory error to the builtin (or tenso) class its situation promises: I/O errors keep their
/// errno-derived class (FileNotFoundError, FileExistsError, PermissionError, OSError for ENOSPC) and errno, and say
/// which call failed; a segment that is not a pool is a `TensoFormatError`; a full pool a `TensoCacheFullError`.
pub(crate) fn shm_error(err: ShmError) -> PyErr {
    match &err {
        ShmError::Io { source, .. } => {
            let msg = err.to_string();
            let code = source.raw_os_error();
            let template = PyErr::from(io::Error::from(source.kind()));
            Python::attach(|py| {
                let ty = template.get_type(py);
                match code {
                    Some(code) => PyErr::from_type(ty, (code, msg)),
                    None => PyErr::from_type(ty, msg),
                }
            })
        }
        ShmError::Full { .. } | ShmError::NoReferenceSlot => {
            TensoCacheFullError::new_err(err.to_string())
        }
        ShmError::BadPool { reason } => {
            // 0.19.4 and 0.24.0 check the magic first and say "Invalid TensoCache magic"; a segment too small to
            // hold a pool header has no magic either.
            let what = if reason.contains("magic") || reason.contains("smaller") {
                "Invalid TensoCache magic"
            } else {
                "Invalid TensoCache layout"
            };
            TensoFormatError::new_err(format!("{what}: {err}"))
        }
        _ => PyValueError::new_err(err.to_string()),
    }
}

/// An optional dependency failed to import: an `ImportError` that says what needs it and which extra installs it
/// (`pip install 'tenso-ray[extra]'`), with the original error as `__cause__`.
pub(crate) fn missing_extra(py: Python<'_>, cause: PyErr, what: &str, extra: &str) -> PyErr {
    let err = PyImportError::new_err(format!("{what}: pip install 'tenso-ray[{extra}]'"));
    err.set_cause(py, Some(cause));
    err
}

#[cfg(test)]
mod tests {
    use super::sentence;

    #[test]
    fn messages_start_with_the_reference_wording() {
        assert_eq!(
            sentence("packet too short: needs 8".into()),
            "Packet too short: needs 8"
        );
        assert_eq!(sentence("Key too long".into()), "Key too long");
        assert_eq!(sentence(String::new()), "");
    }
}
