"""Property tests: round trips over dtypes, shapes, layouts, byte order and options; random-bytes fuzz."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensohelp

tenso = pytest.importorskip("tenso")
from tenso import errors  # noqa: E402

BASE_DTYPES = ["float32", "int32", "float64", "int64", "uint8", "uint16", "bool", "float16", "int8", "int16",
               "uint32", "uint64", "complex64", "complex128"]


@st.composite
def arrays(draw):
    name = draw(st.sampled_from(BASE_DTYPES + ["bfloat16"]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    if name == "bfloat16":
        f = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1e6, 1e6, width=32)))
        arr = f.astype(tensohelp.bfloat16())
    else:
        dt = np.dtype(name)
        if draw(st.booleans()) and dt.itemsize > 1:
            dt = dt.newbyteorder(">")
        arr = draw(hnp.arrays(dt, shape))
    layout = draw(st.sampled_from(["C", "F", "strided", "reversed"]))
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim:
        arr = tensohelp.apply_layout(arr, "strided")
    elif layout == "reversed" and arr.ndim:
        arr = arr[::-1]
    return arr


def _expected(arr):
    a = np.ascontiguousarray(arr) if arr.ndim else arr
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


OPTS = st.fixed_dictionaries({
    "alignment": st.sampled_from([1, 2, 8, 16, 64, 128, 4096]),
    "check_integrity": st.booleans(),
    "compress": st.booleans(),
    "protocol": st.sampled_from([3, 4]),
})


@given(arrays(), OPTS)
def test_roundtrip_dense(arr, opts):
    pkt = tenso.dumps(arr, **opts)
    got = tenso.loads(pkt)
    tensohelp.assert_dense_equal(got, _expected(arr))
    assert bytes(pkt)[4] == opts["protocol"]
    got_c = tenso.loads(bytes(pkt), copy=True)
    assert got_c.flags.writeable
    tensohelp.assert_dense_equal(got_c, _expected(arr))
    if not opts["compress"]:
        body_start = len(pkt) - _expected(arr).nbytes - (8 if opts["check_integrity"] else 0)
        assert body_start % opts["alignment"] == 0
        tensohelp.assert_dense_equal(tenso.read_stream(io.BytesIO(bytes(pkt))), _expected(arr))


@given(st.dictionaries(st.text(max_size=8), arrays(), max_size=5), OPTS)
def test_roundtrip_bundle(d, opts):
    got = tenso.loads(tenso.dumps(d, **opts))
    assert list(got) == list(d)
    for k in d:
        tensohelp.assert_dense_equal(got[k], _expected(d[k]))
    got2 = tenso.read_stream(io.BytesIO(bytes(tenso.dumps(d, **opts))))
    assert list(got2) == list(d)


@settings(max_examples=30)
@given(st.sampled_from(["qint8", "quint8", "qint4", "quint4"]), st.sampled_from(["per_tensor", "per_channel",
                                                                                  "per_group"]),
       hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7),
                  elements=st.floats(-100, 100, width=32)),
       st.integers(1, 9), st.sampled_from([3, 4]), st.booleans())
def test_roundtrip_quantized(qd, scheme, x, gs, protocol, integ):
    kw = {"group_size": gs} if scheme == "per_group" else {}
    q = tenso.QuantizedTensor.quantize(x, qd, scheme=scheme, **kw)
    got = tenso.loads(tenso.dumps(q, protocol=protocol, check_integrity=integ))
    assert np.array_equal(got.dequantize(), q.dequantize())
    # Error bound only where the quantization range is non-degenerate: a constant slice gets scale 1 and zero
    # point 0 by definition (FORMAT.md §9.4), which saturates outside [qmin, qmax]. test_api covers the others.
    if scheme == "per_tensor" and float(x.min()) != float(x.max()):
        assert np.max(np.abs(q.dequantize() - x)) <= float(np.max(q.scales)) * 0.5 + 1e-3


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    try:
        tenso.loads(data)
    except (errors.TensoFormatError, errors.TensoTruncatedError) as e:
        assert isinstance(e, (ValueError, EOFError))
    try:
        tenso.read_stream(io.BytesIO(data))
    except (errors.TensoFormatError, errors.TensoTruncatedError):
        pass


@functools.lru_cache(maxsize=None)
def valid_packets():
    return [bytes(tenso.dumps(x)) for x in (
    np.arange(6, dtype=np.int16).reshape(2, 3),
    {"a": np.zeros(3), "b": {"c": np.ones(1, np.uint8)}},
    tenso.QuantizedTensor.quantize(np.linspace(0, 1, 9, dtype=np.float32), "qint4"),
    tenso.StringTensor(["x", "yz"]),
)] + [bytes(tenso.dumps(np.arange(5.0), check_integrity=True, protocol=3))]


@settings(max_examples=300)
@given(st.integers(0, 4), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                    min_size=1, max_size=4), st.integers(0, 400))
def test_fuzz_mutated_valid_packets(which, edits, cut):
    data = bytearray(valid_packets()[which])
    for pos, val in edits:
        data[pos % len(data)] = val
    data = bytes(data[: max(cut, 1) if cut < len(data) else len(data)])
    try:
        tenso.loads(data)
    except (errors.TensoFormatError, errors.TensoTruncatedError):
        pass
    try:
        tenso.get_packet_info(data)
    except (errors.TensoFormatError, errors.TensoTruncatedError):
        pass
