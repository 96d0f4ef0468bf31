#!/usr/bin/env bash
# The prepared device check of issue #13: on a machine with an NVIDIA GPU, run the GPU tests (pytest marker `gpu`)
# and benchmarks/bench_gpu.py, in one call, in well under 5 minutes, installing nothing from the network.
# The DataLoader pool pinned in the main process (tenso.torch.Collate(pin_memory=...)) is covered by test_gpu.py and by
# the h2d/pool rows of the benchmark (a pool batch copied to the device before and after the pool is page-locked).
#
# What it needs on the device machine (carry it with the device tool's `carry`; the 6 GB .venv is too big to travel):
#   * a Python with torch (CUDA build), numpy, ml_dtypes, pytest, pytest-timeout: the H200 image's python3 has them
#     all (and JAX, CuPy); override with TENSO_GPU_PYTHON=/path/to/python.
#   * tenso itself: either already importable by that Python, or a wheel in dist/ (build it here with
#     `maturin build --release -o dist`; it is abi3, a few MB) -> carry ["dist"]; it is installed with
#     `pip install --no-index --no-deps --target` into a temporary directory (no network).
#   * cargo, optionally: with TENSO_GPU_CARGO=1 and cargo present, `cargo test -p tenso-gpu` runs too (the driver
#     round trip of src/driver.rs; it needs the crate registry cached offline and a build, so it is off by default to
#     keep the whole check under 5 minutes: the packet/copy logic it drives is covered on the CPU by the fake device).
# Time budget (worst case, every step hitting its timeout): 90 + 60 + 140 s = under 5 minutes.
# Results: $OUT/bench_gpu.json (or benchmarks/results/bench_gpu.json: GB/s per op/source/impl, the issue's targets as
# ratios, the staging pool's allocation count before/after) and $OUT/gpu-check.log when OUT is set.
# Without a GPU it says so and exits 0.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG="${OUT:-/tmp}/gpu-check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
step() { printf '\n==> %s\n' "$*"; }

step "NVIDIA driver"
if ! python3 -c 'import ctypes, sys; lib = ctypes.CDLL("libcuda.so.1"); n = ctypes.c_int(0); sys.exit(lib.cuInit(0) or lib.cuDeviceGetCount(ctypes.byref(n)) or (n.value == 0))' 2>/dev/null; then
    echo "gpu-check: no NVIDIA GPU here (libcuda.so.1 missing, cuInit failed or no device): nothing to check"
    exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
pick_python() {
    if [[ -n "${TENSO_GPU_PYTHON:-}" ]]; then echo "$TENSO_GPU_PYTHON"; return; fi
    for py in python3 "$ROOT/.venv/bin/python"; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import torch' >/dev/null 2>&1; then echo "$py"; return; fi
    done
    echo python3
}
PY="$(pick_python)"


step "python: $PY"
if ! "$PY" -c 'import tenso' >/dev/null 2>&1; then
    wheel="$(ls "$ROOT"/dist/tenso_ray-*.whl 2>/dev/null | head -1)"
    if [[ -z "$wheel" ]]; then
        echo "gpu-check: tenso is not importable and no wheel is in dist/ (build one and carry dist/)"
        exit 2
    fi
    site="$(mktemp -d /tmp/tenso-site.XXXXXX)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF' || exit 2
import numpy, torch, tenso, tenso.gpu
from tenso import tenso_rs
print("tenso", tenso.__file__, "| numpy", numpy.__version__, "| torch", torch.__version__, "cuda", torch.version.cuda)
print("tenso.gpu.available():", tenso.gpu.available(), "| native probe:", tenso_rs._gpu_available(),
      "| torch.cuda:", torch.cuda.is_available())
PYEOF

status=0
step "pytest -m gpu (tests/test_gpu.py, tests/test_dlpack.py)"
ini="$(mktemp /tmp/gpu-pytest.XXXXXX.ini)"
cat > "$ini" <<'INI'
[pytest]
addopts = -ra --strict-markers -p no:cacheprovider
markers =
    gpu: needs an NVIDIA GPU with CUDA
filterwarnings =
    error
    ignore:os.fork\(\) was called:RuntimeWarning
timeout = 120
INI
(cd tests && timeout 90 "$PY" -m pytest -q -c "$ini" --rootdir .. ../tests/test_gpu.py) || status=1
# The DLPack tests are host-side by design: keep JAX on its CPU backend for them.
(cd tests && JAX_PLATFORMS=cpu timeout 60 "$PY" -m pytest -q -c "$ini" --rootdir .. ../tests/test_dlpack.py) || status=1
rm -f "$ini"

if [[ "${TENSO_GPU_CARGO:-0}" == 1 ]] && command -v cargo >/dev/null 2>&1; then
    step "cargo test -p tenso-gpu (offline)"
    timeout 90 cargo test --offline -p tenso-gpu 2>&1 | tail -15 || echo "(cargo test skipped or failed: registry not cached offline?)"
fi

step "benchmarks/bench_gpu.py"
timeout 140 "$PY" benchmarks/bench_gpu.py || status=1

step "gpu-check: done (status $status)"
exit "$status"
