#!/usr/bin/env bash
# Runs the tenso-shm and tenso-kernels tests under Miri (needs a nightly toolchain with the miri component:
# `rustup component add miri rust-src --toolchain nightly`). Tests that spawn processes or open POSIX shared memory
# are ignored there (Miri supports neither); pools are backed by anonymous mappings instead (Segment::anonymous).
# tenso-kernels runs its portable paths there (the SIMD kernels are compiled out under cfg(miri)) on smaller inputs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}" cargo +nightly miri test -p tenso-shm -p tenso-kernels "$@"
