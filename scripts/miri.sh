#!/usr/bin/env bash
# Runs the tenso-shm tests under Miri (needs a nightly toolchain with the miri component:
# `rustup component add miri rust-src --toolchain nightly`). Tests that spawn processes or open POSIX shared memory
# are ignored there (Miri supports neither); pools are backed by anonymous mappings instead (Segment::anonymous).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}" cargo +nightly miri test -p tenso-shm "$@"
