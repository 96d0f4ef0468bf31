//! Body helpers for the Ray plug-in (`tenso.ray`).
//!
//! Ray hands a deserializer each out-of-band body as a read-only buffer over its shared object store. Handing that
//! memory out writeable would let one reader change the stored object for every other reader on the node, so the
//! plug-in's safe mode copies it once into memory the result owns; this is that copy, made as cheap as it can be:
//! fresh NumPy-allocated memory (transparent huge pages on large blocks) and several threads, without the GIL.

use numpy::PyUntypedArray;
use pyo3::prelude::*;

use crate::buffers::{alloc_aligned, bytes_mut, Source};
use crate::encode::DETACH_BYTES;

/// Bodies at least this large are copied by several threads: one core does not saturate memory bandwidth.
const PARALLEL_BYTES: usize = 8 << 20;
/// More threads than this gain nothing on a memory-bound copy and only cost start-up time.
const MAX_THREADS: usize = 4;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_owned_copy, m)?)?;
    Ok(())
}

/// A fresh, writeable, 64-byte-aligned uint8 array holding a copy of `data` (any C-contiguous buffer).
#[pyfunction]
fn _owned_copy<'py>(data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyUntypedArray>> {
    let py = data.py();
    let source = Source::new(data)?;
    let src = source.bytes();
    let out = alloc_aligned(py, src.len())?;
    // SAFETY: `out` was just allocated with exactly `src.len()` bytes, is C-contiguous, and nothing else holds a
    // reference to its memory yet, so this is the only live slice over it.
    let dst = unsafe { bytes_mut(&out, src.len()) };
    if src.len() < DETACH_BYTES {
        dst.copy_from_slice(src);
    } else {
        py.detach(|| parallel_copy(dst, src));
    }
    Ok(out)
}

/// `dst.copy_from_slice(src)`, split into page-aligned chunks copied by scoped threads for large inputs.
fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    let threads = if src.len() >= PARALLEL_BYTES {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS)
    } else {
        1
    };
    if threads <= 1 {
        dst.copy_from_slice(src);
        return;
    }
    let chunk = src.len().div_ceil(threads).next_multiple_of(4096);
    std::thread::scope(|scope| {
        for (d, s) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            scope.spawn(move || d.copy_from_slice(s));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::parallel_copy;

    #[test]
    fn parallel_copy_copies_every_byte() {
        for len in [0usize, 1, 4095, 4097, (8 << 20) + 13] {
            let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut dst = vec![0u8; len];
            parallel_copy(&mut dst, &src);
            assert_eq!(dst, src);
        }
    }
}
