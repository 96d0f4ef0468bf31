#!/usr/bin/env bash
# Create the reference-implementation virtualenvs used by tests/test_interop.py:
#   .refvenvs/tenso-0.24.0  and  .refvenvs/tenso-0.19.4
# Each holds `tenso==X` + numpy + scipy + ml_dtypes (lz4/xxhash come as deps).
# Idempotent: a venv whose marker file matches the requested pins is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
mkdir -p .refvenvs

for ver in 0.24.0 0.19.4; do
    dir=".refvenvs/tenso-$ver"
    want="tenso==$ver numpy scipy ml_dtypes"
    marker="$dir/.tenso-ray-ok"
    if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]] \
        && "$dir/bin/python" -c "import tenso, numpy, scipy, ml_dtypes" >/dev/null 2>&1; then
        echo "refvenvs: $dir up to date"
        continue
    fi
    echo "refvenvs: creating $dir"
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    # shellcheck disable=SC2086
    "$dir/bin/python" -m pip install -q --disable-pip-version-check $want
    "$dir/bin/python" - "$ver" <<'PYEOF'
import sys, importlib.metadata as md
ver = sys.argv[1]
got = md.version("tenso")
assert got == ver, f"expected tenso {ver}, got {got}"
import tenso, numpy, scipy, ml_dtypes, lz4, xxhash  # noqa: F401
print(f"refvenvs: tenso {got} ok (numpy {numpy.__version__})")
PYEOF
    echo "$want" > "$marker"
done
