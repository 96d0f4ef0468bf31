#!/usr/bin/env bash
# The one command that proves tenso's GPU path on a machine with an NVIDIA GPU (issue #19):
#   1. `cargo test -p tenso-gpu` WITH its hardware tests (TENSO_GPU_REQUIRE_DEVICE=1: a test that finds no device
#      fails instead of skipping), built here with cargo when cargo and the crates are available offline, else the
#      test binary prepared beforehand (`--prepare`, below);
#   2. tests/test_gpu.py (every `gpu`-marked test must run: a skip of one is reported in the table), and the host-side
#      DLPack tests with JAX on its CPU backend;
#   3. benchmarks/bench_gpu.py (rows in $OUT/bench_gpu.jsonl as they are measured, $OUT/bench_gpu.json at the end);
# then one summary table: each step (PASS/FAIL, seconds), then GB/s rows with their ratios against pinned cudaMemcpy
# and torch's pageable `.to("cuda")`.
#
#   bash scripts/gpu-check.sh --prepare   # on any machine with the repo built (no GPU needed): puts the abi3 wheel
#                                         # and the tenso-gpu test binary into dist/ (carry ["dist"] to the GPU)
#   bash scripts/gpu-check.sh             # on the GPU machine, from the repository root
#
# Exit status: 0 every step passed; 1 a step failed (the table says which); 2 the check cannot start (no Python
# with torch, tenso neither importable nor in dist/, no way to build or run the tenso-gpu tests); 77 no NVIDIA GPU
# here (nothing was checked; 77 is the "skipped" status of automake-style test drivers).
# Needs no pytest-timeout and no network; each step has its own wall-clock limit (`timeout`), together under 10
# minutes (build 200 s, crate tests 40, test_gpu 120, test_dlpack 40, benchmark 170; a typical run takes a few
# minutes). TENSO_GPU_BENCH_SIZES picks the benchmark's packet sizes (default 64M,1G).
# Python: TENSO_GPU_PYTHON, else the first of python3 and .venv/bin/python that imports torch.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TEST_BIN="$ROOT/dist/gpu-check/tenso-gpu-tests"

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    mkdir -p dist/gpu-check
    rm -f dist/tenso_ray-*.whl
    PATH="$ROOT/.venv/bin:$PATH" maturin build --release -q -o dist -m rust/tenso-py/Cargo.toml
    bin="$(cargo test -p tenso-gpu --release --no-run --message-format=json 2>/dev/null |
        "$ROOT/.venv/bin/python" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "tenso_gpu" and m["profile"]["test"] and m.get("executable"):
        print(m["executable"])')"
    [[ -n "$bin" ]] || { echo "gpu-check --prepare: no tenso-gpu test binary was built" >&2; exit 2; }
    cp "$bin" "$TEST_BIN"
    echo "gpu-check --prepare: $(ls dist/tenso_ray-*.whl) and $TEST_BIN ready; carry [\"dist\"]"
    exit 0
fi

OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
STEPS="$(mktemp /tmp/gpu-check-steps.XXXXXX)"
step() { printf '\n==> %s\n' "$*"; }
# run NAME LIMIT_S CMD...: runs CMD with a wall-clock limit and records NAME, PASS/FAIL (exit status) and seconds.
status=0
run() {
    local name=$1 limit=$2
    shift 2
    step "$name"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    local verdict=PASS
    if ((rc != 0)); then
        verdict="FAIL(rc=$rc$( ((rc == 124)) && echo ", over ${limit}s"))"
        status=1
    fi
    printf '%s\t%s\t%s\n' "$name" "$verdict" "$((SECONDS - t0))" >>"$STEPS"
}

step "NVIDIA driver"
if ! python3 -c 'import ctypes, sys; lib = ctypes.CDLL("libcuda.so.1"); n = ctypes.c_int(0); sys.exit(lib.cuInit(0) or lib.cuDeviceGetCount(ctypes.byref(n)) or (n.value == 0))' 2>/dev/null; then
    echo "gpu-check: NO NVIDIA GPU HERE (libcuda.so.1 missing, cuInit failed or no device): nothing was checked; exit 77"
    exit 77
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv

pick_python() {
    if [[ -n "${TENSO_GPU_PYTHON:-}" ]]; then echo "$TENSO_GPU_PYTHON"; return; fi
    for py in python3 "$ROOT/.venv/bin/python"; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import torch' >/dev/null 2>&1; then echo "$py"; return; fi
    done
}
PY="$(pick_python)"
[[ -n "$PY" ]] || { echo "gpu-check: no Python with torch (set TENSO_GPU_PYTHON)"; exit 2; }

step "python: $PY"
# The wheel of this tree (dist/, from --prepare) wins over a tenso the Python may already have installed.
wheel="$(ls "$ROOT"/dist/tenso_ray-*.whl 2>/dev/null | head -1)"
if [[ -z "$wheel" ]] && ! "$PY" -c 'import tenso' >/dev/null 2>&1; then
    echo "gpu-check: tenso is not importable and no wheel is in dist/ (run --prepare, carry dist/)"
    exit 2
fi
if [[ -n "$wheel" ]]; then
    echo "installing $wheel into a temporary site directory (no network)"
    site="$(mktemp -d /tmp/tenso-site.XXXXXX)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF' || exit 2
import numpy, torch, tenso, tenso.gpu
print("tenso", tenso.__file__, "| numpy", numpy.__version__, "| torch", torch.__version__, "cuda", torch.version.cuda)
print("tenso.gpu.available():", tenso.gpu.available(), "| torch.cuda:", torch.cuda.is_available())
PYEOF

# 1. The crate's tests, hardware ones included (they fail rather than skip when TENSO_GPU_REQUIRE_DEVICE is set).
export TENSO_GPU_REQUIRE_DEVICE=1
step "building the tenso-gpu tests (cargo, offline)"
if command -v cargo >/dev/null 2>&1 && timeout 200 cargo test --offline --release -p tenso-gpu --no-run; then
    run "cargo test -p tenso-gpu (hardware tests on)" 40 cargo test --offline --release -p tenso-gpu
elif [[ -x "$TEST_BIN" ]]; then
    echo "(cargo cannot build here offline: running the test binary that --prepare built from this tree)"
    run "tenso-gpu tests, prebuilt (hardware tests on)" 40 "$TEST_BIN" --test-threads=1
else
    echo "gpu-check: cannot run the tenso-gpu tests: no cargo with its crates offline, and no $TEST_BIN (--prepare)"
    exit 2
fi

# 2. pytest, with an ini of its own: no pytest-timeout needed (the step's limit bounds it), warnings are errors.
ini="$(mktemp /tmp/gpu-pytest.XXXXXX.ini)"
cat >"$ini" <<'INI'
[pytest]
addopts = -ra --strict-markers -p no:cacheprovider -p no:asyncio
markers =
    gpu: needs an NVIDIA GPU with CUDA
    slow: takes more than a few seconds
filterwarnings =
    error
    ignore:os.fork\(\) was called:RuntimeWarning
INI
junit="$OUT_DIR/gpu-check-pytest.xml"
run "pytest tests/test_gpu.py" 120 bash -c "cd tests && '$PY' -m pytest -q -c '$ini' --rootdir .. --junitxml '$junit' ../tests/test_gpu.py"
run "pytest tests/test_dlpack.py (JAX on CPU)" 40 bash -c "cd tests && JAX_PLATFORMS=cpu '$PY' -m pytest -q -c '$ini' --rootdir .. ../tests/test_dlpack.py"
rm -f "$ini"

# 3. The benchmark (its rows land in bench_gpu.jsonl as they are measured, so a late failure keeps them).
run "benchmarks/bench_gpu.py" 170 env OUT="$OUT_DIR" "$PY" benchmarks/bench_gpu.py --require-gpu --sizes "${TENSO_GPU_BENCH_SIZES:-64M,1G}"

step "summary"
"$PY" - "$STEPS" "$junit" "$OUT_DIR/bench_gpu.jsonl" <<'PYEOF' || status=1
import json, os, sys
import xml.etree.ElementTree as ET

steps, junit, rows = sys.argv[1:4]
print(f"{'step':52s} {'result':24s} {'s':>5s}")
for line in open(steps):
    name, verdict, secs = line.rstrip("\n").split("\t")
    print(f"{name:52s} {verdict:24s} {secs:>5s}")
if os.path.exists(junit):
    skipped = [c.get("name") for c in ET.parse(junit).iter("testcase") if c.find("skipped") is not None]
    ran = sum(1 for _ in ET.parse(junit).iter("testcase"))
    named = ", ".join(skipped[:12]) + (f", ... ({len(skipped) - 12} more)" if len(skipped) > 12 else "")
    print(f"test_gpu.py: {ran} tests, {len(skipped)} skipped{': ' + named if skipped else ''}")
if not os.path.exists(rows):
    print("no benchmark rows")
    sys.exit(0)
results = [json.loads(line) for line in open(rows) if line.strip()]
bench = [r for r in results if "GBps" in r]
ref = {(r["op"], r["bytes"], r["impl"]): r["GBps"] for r in bench if r["source"] == "reference"}
print(f"\n{'op':5s} {'source':10s} {'impl':9s} {'MiB':>6s} {'GB/s':>7s} {'x pinned':>9s} {'x pageable':>10s}  bound")
for r in bench:
    pinned = ref.get((r["op"], r["bytes"], "pinned"))
    pageable = ref.get((r["op"], r["bytes"], "pageable"))
    x_pin = f"{r['GBps'] / pinned:9.2f}" if pinned else f"{'':9s}"
    x_page = f"{r['GBps'] / pageable:10.2f}" if pageable else f"{'':10s}"
    print(f"{r['op']:5s} {r['source']:10s} {r['impl']:9s} {r['bytes'] >> 20:6d} {r['GBps']:7.2f} {x_pin} {x_page}  {r.get('bound', '')}")
for t in (r for r in results if "what" in r):
    print(f"target {t['what']}: {t['ratio']:.2f} (want {t['target']}){'' if t.get('met', True) else '  NOT MET'}")
PYEOF
rm -f "$STEPS"
echo
echo "gpu-check: $([[ $status == 0 ]] && echo "ALL PASSED" || echo "FAILED (see the table)"); log in $LOG"
exit "$status"
