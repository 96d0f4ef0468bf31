#!/usr/bin/env bash
# THE test command (used by .ci/run): Rust lint + tests, wheel build + install,
# reference venvs, then pytest against the INSTALLED wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

if command -v rustup >/dev/null 2>&1; then
    for comp in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^$comp"; then
            step "rustup component add $comp"
            rustup component add "$comp"
        fi
    done
fi

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace

step "cargo test -p tenso-format --no-default-features"
cargo test -p tenso-format --no-default-features

step "scripts/setup.sh (wheel build + install)"
bash scripts/setup.sh

step "scripts/refvenvs.sh (reference tenso 0.24.0 / 0.19.4)"
bash scripts/refvenvs.sh

step "pytest (installed wheel)"
# Run from tests/ so that nothing in the source tree can shadow the installed `tenso`;
# TENSO_RAY_REQUIRE_INSTALLED makes conftest assert `import tenso` resolves to site-packages.
cd "$ROOT/tests"
TENSO_RAY_REQUIRE_INSTALLED=1 "$ROOT/.venv/bin/python" -m pytest -q \
    -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -p no:cacheprovider "$ROOT/tests" "$@"

step "portable kernels (TENSO_FORCE_PORTABLE=1): cargo test -p tenso-kernels, hash and codec pytest subsets"
# The engine's SIMD XXH3 and specialized gathers are skipped: what a CPU without AVX2/AVX-512 runs, tested here.
cd "$ROOT"
TENSO_FORCE_PORTABLE=1 cargo test -q -p tenso-kernels
cd "$ROOT/tests"
TENSO_FORCE_PORTABLE=1 TENSO_RAY_REQUIRE_INSTALLED=1 "$ROOT/.venv/bin/python" -m pytest -q \
    -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -p no:cacheprovider \
    "$ROOT/tests/test_api.py" "$ROOT/tests/test_golden.py" "$ROOT/tests/test_portable.py"

step "scripts/upstream-tests.sh (upstream tenso 0.24.0 / 0.19.4 test suites against the installed wheel)"
bash "$ROOT/scripts/upstream-tests.sh"
