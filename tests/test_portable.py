"""The portable (non-SIMD) kernel paths compute the same bytes as the default ones.

``TENSO_FORCE_PORTABLE=1`` makes the engine skip its AVX-512 / AVX2 XXH3 and its layout-specialized gather loops
(rust/tenso-kernels), so that a machine with AVX-512 also runs what a machine without it runs. Each test here runs
one probe script in two fresh interpreters, with and without the variable, and compares what they computed; the gate
also runs the hash and codec suites under the variable (scripts/test.sh).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import tenso
from tenso import tenso_rs

#: Runs in a fresh interpreter: reports the kernel paths and everything the kernels computed, as JSON.
PROBE = r"""
import hashlib, json
import numpy as np
import tenso
from tenso import tenso_rs

rng = np.random.default_rng(7)
data = rng.integers(0, 256, size=(3 << 20) + 200, dtype=np.uint8).tobytes()
view = memoryview(data)

# XXH3 around each boundary of the algorithm (240 bytes, 64-byte stripes, 1024-byte blocks), at several offsets.
lengths = sorted({*range(0, 300, 7), 240, 241, 1023, 1024, 1025, 4096 + 63, 100_003, (1 << 20) + 1, 3 << 20})
xxh3 = [tenso_rs._xxh3_64(view[offset:offset + n]) for offset in (0, 1, 13) for n in lengths]
chunked = [tenso_rs._xxh3_64_chunked(view[:n]) for n in (1000, 1 << 20, (3 << 20) + 7)]

# Gathers: non-contiguous layouts of every element size, small and large (the large transpose is banded).
base = np.frombuffer(data, dtype=np.uint8)
arrays = {
    "transposed_f4": base[: 4 * 300 * 257].view(np.float32).reshape(300, 257).T,
    "transposed_big_f8": base[: 8 * 1024 * 384].view(np.float64).reshape(1024, 384).T,
    "every_other_i2": base[: 2 * 64 * 90].view(np.int16).reshape(64, 90)[:, ::2],
    "reversed_u1": base[: 77 * 51].reshape(77, 51)[::-1, ::-3],
    "batched_c16": base[: 16 * 4 * 33 * 35].view(np.complex128).reshape(4, 33, 35).transpose(0, 2, 1),
    "bigendian_i4": base[: 4 * 40 * 40].view(">i4").reshape(40, 40).T,
    "column_f2": base[: 2 * 500 * 7].view(np.float16).reshape(500, 7)[:, 3],
}


def same(back, a):
    # Bytes, not values: random floats hold NaNs. The wire (and so `back`) is little-endian C order.
    return back.shape == a.shape and back.tobytes() == a.astype(a.dtype.newbyteorder("<"), order="C").tobytes()


gathers = {}
for name, a in arrays.items():
    packet = tenso.dumps(a)
    assert same(tenso.loads(packet), a), name
    gathers[name] = hashlib.sha256(packet).hexdigest()

# Integrity round trips: footers written and verified, single pieces and bundles, v4 and v3, corruption caught.
integrity = {}
for protocol in (3, 4):
    for name in ("transposed_big_f8", "every_other_i2"):
        a = arrays[name]
        packet = bytearray(tenso.dumps(a, check_integrity=True, protocol=protocol))
        assert same(tenso.loads(bytes(packet)), a), name
        integrity[f"{name}/v{protocol}"] = packet[-8:].hex()
        packet[len(packet) // 2] ^= 0x40
        try:
            tenso.loads(bytes(packet))
        except tenso.TensoIntegrityError:
            pass
        else:
            raise AssertionError(f"corruption of {name} v{protocol} not detected")
bundle = tenso.dumps({k: arrays[k] for k in ("transposed_f4", "reversed_u1")}, check_integrity=True)
integrity["bundle"] = hashlib.sha256(bundle).hexdigest()
assert set(tenso.loads(bundle)) == {"transposed_f4", "reversed_u1"}

print(json.dumps({"paths": tenso_rs._kernel_paths(), "xxh3": xxh3, "chunked": chunked,
                  "gathers": gathers, "integrity": integrity}))
"""


def _probe(force_portable: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TENSO_FORCE_PORTABLE"}
    if force_portable:
        env["TENSO_FORCE_PORTABLE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=240, cwd="/", env=env
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture(scope="module")
def probes() -> tuple[dict[str, Any], dict[str, Any]]:
    return _probe(False), _probe(True)


def test_paths_reported(probes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    default, portable = probes
    assert portable["paths"] == {"xxh3": "portable", "gather": "portable"}
    assert default["paths"]["gather"] == "specialized"
    assert default["paths"]["xxh3"] in {"avx512", "avx2", "portable"}
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
        want = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "portable"
        assert default["paths"]["xxh3"] == want


def test_hashes_equal(probes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    default, portable = probes
    assert default["xxh3"] == portable["xxh3"]
    assert default["chunked"] == portable["chunked"]
    assert default["xxh3"][0] == 0x2D06800538D394C2  # XXH3-64 of b"" (FORMAT.md)


def test_gathers_equal(probes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    default, portable = probes
    assert default["gathers"] == portable["gathers"]


def test_integrity_round_trips_equal(probes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    default, portable = probes
    assert default["integrity"] == portable["integrity"]


def test_this_process_follows_the_environment() -> None:
    # The gate runs this file a second time with TENSO_FORCE_PORTABLE=1 set for the whole pytest process.
    paths = tenso_rs._kernel_paths()
    assert set(paths) == {"xxh3", "gather"}
    if os.environ.get("TENSO_FORCE_PORTABLE") == "1":
        assert paths == {"xxh3": "portable", "gather": "portable"}
    else:
        assert paths["gather"] == "specialized"
    a = np.arange(5000, dtype=np.float32).reshape(50, 100).T
    assert np.array_equal(tenso.loads(tenso.dumps(a, check_integrity=True)), a)
