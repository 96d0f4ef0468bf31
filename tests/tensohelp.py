"""Shared helpers for the pytest suite: golden-case loading, expected-value
construction and deep comparison of decoded tenso objects.

Kept free of `import tenso` at module level so that the hostile-corpus generator
and the subprocess drivers can reuse pieces without the product installed.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
GOLDEN = TESTS / "golden"
HOSTILE = TESTS / "hostile"
REFVENVS = ROOT / ".refvenvs"
GOLDEN_DIRS = {"v3-0.19.4": 3, "v4-0.24.0": 4}

SCHEME_NAMES = {0: "per_tensor", 1: "per_channel", 2: "per_group"}
QDTYPE_CODES = {"qint8": 16, "quint8": 17, "qint4": 18, "quint4": 19}


def golden_cases() -> list[tuple[str, str]]:
    """(folder, case name) for every case of both golden manifests."""
    out = []
    for folder in GOLDEN_DIRS:
        manifest = json.loads((GOLDEN / folder / "manifest.json").read_text())
        for case in manifest["cases"]:
            out.append((folder, case["name"]))
    return out


class Case:
    def __init__(self, folder: str, name: str):
        self.folder = folder
        self.name = name
        self.protocol = GOLDEN_DIRS[folder]
        base = GOLDEN / folder
        self.meta = json.loads((base / f"{name}.json").read_text())
        self.packet = (base / f"{name}.tenso").read_bytes()
        with np.load(base / f"{name}.npz", allow_pickle=False) as z:
            self.npz = {k: z[k] for k in z.files}
        self.kind = self.meta["kind"]
        self.options = dict(self.meta["options"])
        self.expected = self.meta["expected"]
        self.input_layout = self.meta.get("input_layout", "C")

    @property
    def compressed(self) -> bool:
        return bool(self.options.get("compress"))

    def __repr__(self) -> str:
        return f"Case({self.folder}/{self.name})"


def bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _dense_expected(node: dict, npz: dict) -> np.ndarray:
    arr = npz[node["array"]]
    if node.get("npz_encoding") == "uint16-bits":
        arr = arr.view(bfloat16())
    assert arr.dtype.name == node["dtype"], (arr.dtype, node)
    assert list(arr.shape) == list(node["shape"])
    return arr


def apply_layout(arr: np.ndarray, layout: str) -> np.ndarray:
    """Return an array equal to `arr` whose memory layout is `layout` (C, F or strided)."""
    if layout == "C":
        return np.ascontiguousarray(arr) if arr.ndim else arr
    if layout == "F":
        out = np.asfortranarray(arr)
        assert out.ndim < 2 or not out.flags.c_contiguous or out.size <= 1
        return out
    if layout == "strided":
        big = np.zeros(tuple(2 * s + 1 for s in arr.shape), dtype=arr.dtype)
        view = big[tuple(slice(1, None, 2) for _ in arr.shape)]
        view[...] = arr
        assert arr.size <= 1 or not view.flags.c_contiguous
        return view
    raise AssertionError(f"unknown input layout {layout!r}")


def unpack_nibbles(packed: np.ndarray, n: int, signed: bool) -> np.ndarray:
    p = np.asarray(packed, dtype=np.uint8).ravel()
    out = np.empty(2 * p.size, dtype=np.int16)
    out[0::2] = p & 0x0F
    out[1::2] = p >> 4
    out = out[:n]
    if signed:
        out = np.where(out >= 8, out - 16, out)
    return out.astype(np.int8 if signed else np.uint8)


def build_value(node: dict, npz: dict, layout: str = "C") -> Any:
    """Build the Python object that the writer was given for an `expected` node."""
    import tenso

    t = node["type"]
    if t == "dense":
        return apply_layout(_dense_expected(node, npz), layout)
    if t == "bundle":
        return {k: build_value(v, npz, layout) for k, v in node["entries"]}
    if t == "sparse":
        import scipy.sparse as sp

        comps = {k: _dense_expected(v, npz) for k, v in node["components"]}
        shape = tuple(node["shape"])
        if node["format"] == "coo":
            return sp.coo_matrix((comps["data"], (comps["row"], comps["col"])), shape=shape)
        ctor = sp.csr_matrix if node["format"] == "csr" else sp.csc_matrix
        return ctor((comps["data"], comps["indices"], comps["indptr"]), shape=shape)
    if t == "quantized":
        return tenso.QuantizedTensor(
            npz[node["packed_codes"]].copy(),
            npz[node["scales"]].copy(),
            npz[node["zero_points"]].copy(),
            tuple(node["shape"]),
            node["dtype_code"],
            node["scheme_code"],
            node["group_size"],
            node["axis"],
        )
    if t == "string":
        return tenso.StringTensor(list(node["strings"]))
    if t == "ragged":
        return tenso.RaggedArray([_dense_expected(r, npz) for r in node["rows"]])
    raise AssertionError(f"unknown expected type {t!r}")


def assert_dense_equal(got: Any, exp: np.ndarray, where: str = "") -> None:
    assert isinstance(got, np.ndarray), f"{where}: expected ndarray, got {type(got)!r}"
    assert got.dtype.name == exp.dtype.name, f"{where}: dtype {got.dtype} != {exp.dtype}"
    assert got.dtype.byteorder in ("=", "<", "|"), f"{where}: non-native byte order {got.dtype}"
    assert got.shape == exp.shape, f"{where}: shape {got.shape} != {exp.shape}"
    if exp.dtype.name == "bfloat16":
        assert np.array_equal(got.view(np.uint16), exp.view(np.uint16)), f"{where}: bfloat16 bits differ"
    else:
        # Exact, NaN-safe, bit-level comparison.
        assert got.tobytes() == exp.tobytes(), f"{where}: values differ:\n{got!r}\n{exp!r}"


def assert_matches(got: Any, node: dict, npz: dict, where: str = "") -> None:
    """Compare a decoded object with an `expected` node of a golden case."""
    import tenso

    t = node["type"]
    if t == "dense":
        assert_dense_equal(got, _dense_expected(node, npz), where)
    elif t == "bundle":
        assert isinstance(got, dict), f"{where}: expected dict, got {type(got)!r}"
        assert list(got.keys()) == [k for k, _ in node["entries"]], f"{where}: keys/order differ"
        for k, v in node["entries"]:
            assert_matches(got[k], v, npz, f"{where}/{k}")
    elif t == "sparse":
        import scipy.sparse as sp

        assert sp.issparse(got), f"{where}: expected scipy sparse, got {type(got)!r}"
        assert got.format == node["format"], f"{where}: format {got.format}"
        assert tuple(got.shape) == tuple(node["shape"])
        for name, comp in node["components"]:
            assert_dense_equal(np.asarray(getattr(got, name)), _dense_expected(comp, npz), f"{where}.{name}")
    elif t == "quantized":
        assert isinstance(got, tenso.QuantizedTensor), f"{where}: got {type(got)!r}"
        assert got.dtype_name == node["dtype_name"]
        assert int(got.dtype_code) == node["dtype_code"]
        assert int(got.quant_scheme) == node["scheme_code"]
        assert int(got.group_size) == node["group_size"]
        assert int(got.axis) == (node["axis"] if node.get("axis_on_wire", True) else 0)
        assert tuple(got.shape) == tuple(node["shape"])
        assert np.asarray(got.scales, dtype=np.float32).tobytes() == npz[node["scales"]].astype(np.float32).tobytes()
        assert (
            np.asarray(got.zero_points, dtype=np.float32).tobytes()
            == npz[node["zero_points"]].astype(np.float32).tobytes()
        )
        packed = np.frombuffer(bytes(memoryview(np.ascontiguousarray(got.data)).cast("B")), dtype=np.uint8)
        assert packed.tobytes() == npz[node["packed_codes"]].tobytes(), f"{where}: packed codes differ"
        codes = npz[node["codes"]]
        n = int(np.prod(node["shape"], dtype=np.int64))
        if node["dtype_name"].endswith("4"):
            unpacked = unpack_nibbles(packed, n, node["dtype_name"] == "qint4")
        else:
            unpacked = packed.view(np.int8 if node["dtype_name"] == "qint8" else np.uint8)[:n]
        assert np.array_equal(unpacked, codes.ravel()), f"{where}: codes differ"
    elif t == "string":
        assert isinstance(got, tenso.StringTensor), f"{where}: got {type(got)!r}"
        assert got.to_list() == node["strings"]
        assert len(got) == len(node["strings"])
    elif t == "ragged":
        # tenso.loads gives the plain bundle dict
        assert_matches(got, node["bundle"], npz, where)
    else:
        raise AssertionError(t)


def to_transport(kind: str, data: bytes, tmp_path: pathlib.Path) -> Any:
    """Wrap packet bytes in the requested buffer type."""
    if kind == "bytes":
        return bytes(data)
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytes(data))
    if kind == "ndarray":
        return np.frombuffer(bytearray(data), dtype=np.uint8)
    if kind == "mmap":
        path = tmp_path / f"packet-{os.getpid()}-{id(data)}.tenso"
        path.write_bytes(data)
        with open(path, "rb") as f:
            if len(data) == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    raise AssertionError(kind)


TRANSPORTS = ["bytes", "bytearray", "memoryview", "ndarray", "mmap"]


# ---------------------------------------------------------------- processes that die by a signal -----------------

#: x86-64 features a prebuilt wheel may assume; a SIGILL on a machine that lacks one of them is most likely why.
SIMD_FEATURES = ("sse4_2", "avx", "avx2", "bmi2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl")


def cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def crash_reason(signal_name: str, who: str) -> str:
    """One line for a process that died by a signal, e.g. "SIGILL in tenso 0.19.4 (CPU lacks avx512f, avx512bw)".

    For SIGILL the known SIMD features that this CPU lacks are named, since an illegal instruction in a prebuilt
    wheel almost always means it was compiled for a newer CPU than this one (none are named if it has them all).
    """
    reason = f"{signal_name} in {who}"
    if signal_name == "SIGILL":
        flags = cpu_flags()
        missing = [f for f in SIMD_FEATURES if flags and f not in flags]
        if missing:
            reason += f" (CPU lacks {', '.join(missing)})"
    return reason


def is_private_view(a: Any) -> bool:
    """Whether ``a`` is a view of a private copy-on-write mapping (``tenso.cow``: its base chain reaches a
    ``tenso._PrivateMap``), not a copy nor the shared memory (object store, pool) itself."""
    while a is not None:
        if type(a).__name__ == "_PrivateMap":
            return True
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return False
