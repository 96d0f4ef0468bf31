//! Pure compute kernels of tenso-ray, shared by the Python binding and the shared-memory pool: the strided
//! [`gather`] (any NumPy layout to C order), XXH3-64 with SIMD kernels chosen at run time ([`xxh3`]) and the
//! multi-threaded LZ4 frame compression of large bodies ([`lz4`]).
//!
//! Nothing here touches Python or the operating system beyond threads and CPU feature detection, so the kernels are
//! tested, benchmarked (`cargo bench -p tenso-kernels`) and run under Miri (`scripts/miri.sh`) on their own.
//!
//! # Portable paths
//!
//! Every kernel with a CPU- or layout-specific fast path also has a portable one that computes the same bytes:
//!
//! | kernel   | fast paths                                          | portable path                                  |
//! |----------|-----------------------------------------------------|------------------------------------------------|
//! | XXH3-64  | AVX-512F or AVX2 long-input loop (x86-64)           | `xxhash-rust` as compiled for the target        |
//! | gather   | row copies, cache tiles, fixed-size moves, threads  | one element at a time, in C order, one thread  |
//!
//! Setting the environment variable `TENSO_FORCE_PORTABLE=1` (read once, at the first kernel call) or calling
//! [`set_force_portable`] makes every call take the portable path, so that a machine with AVX-512 also tests what a
//! machine without it runs. [`Paths::active`] reports the paths in use. The LZ4 compression has no CPU-specific code,
//! so the switch does not change it.

#![deny(missing_docs)]

use std::sync::atomic::{AtomicU8, Ordering};

pub mod gather;
pub mod lz4;
pub mod xxh3;

/// The environment variable that forces the portable paths when set to `1`.
pub const FORCE_PORTABLE_ENV: &str = "TENSO_FORCE_PORTABLE";

/// The switch: [`UNSET`] until the environment is read or [`set_force_portable`] is called.
static FORCE_PORTABLE: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

/// Whether the portable paths are forced: [`set_force_portable`]'s last value, else whether
/// `TENSO_FORCE_PORTABLE` was `1` when this was first asked.
pub fn portable_forced() -> bool {
    match FORCE_PORTABLE.load(Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var_os(FORCE_PORTABLE_ENV).is_some_and(|v| v == "1");
            // Another thread may have called `set_force_portable` meanwhile: its value wins.
            let state = if on { ON } else { OFF };
            match FORCE_PORTABLE.compare_exchange(
                UNSET,
                state,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => on,
                Err(current) => current == ON,
            }
        }
        state => state == ON,
    }
}

/// Forces (`true`) or releases (`false`) the portable paths for the whole process, overriding
/// `TENSO_FORCE_PORTABLE`. Meant for tests and benchmarks; kernel calls already running finish on the path they took.
pub fn set_force_portable(on: bool) {
    FORCE_PORTABLE.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// The paths the kernels take now (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paths {
    /// XXH3-64 of long inputs.
    pub xxh3: xxh3::Path,
    /// Strided gathers.
    pub gather: gather::Path,
}

impl Paths {
    /// The paths this process takes now, given the CPU and the portable switch.
    pub fn active() -> Self {
        Paths {
            xxh3: xxh3::Path::active(),
            gather: gather::Path::active(),
        }
    }

    /// `(kernel, path)` name pairs, e.g. `("xxh3", "avx2")`, for reports.
    pub fn names(&self) -> [(&'static str, &'static str); 2] {
        [("xxh3", self.xxh3.name()), ("gather", self.gather.name())]
    }
}

/// Deterministic pseudo-random bytes (xorshift64*) for the tests.
#[cfg(test)]
pub(crate) fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_forces_every_portable_path() {
        // The only test that flips the process-wide switch; the others compare paths explicitly. It puts the switch
        // back as it found it (TENSO_FORCE_PORTABLE=1 runs the whole suite on the portable paths).
        let before = portable_forced();
        set_force_portable(true);
        assert!(portable_forced());
        assert_eq!(
            Paths::active(),
            Paths {
                xxh3: xxh3::Path::Portable,
                gather: gather::Path::Portable
            }
        );
        assert_eq!(
            Paths::active().names(),
            [("xxh3", "portable"), ("gather", "portable")]
        );
        set_force_portable(false);
        assert!(!portable_forced());
        assert_eq!(Paths::active().xxh3, xxh3::Path::detect());
        assert_eq!(Paths::active().gather, gather::Path::Specialized);
        set_force_portable(before);
    }
}
