"""Per-channel quantized tensors along an axis other than 0 in protocol v3 (docs/FORMAT.md §9.3).

v3 has no axis byte. The packets in ``golden/v3-axis-0.19.4`` were written by tenso 0.19.4 itself
(``golden/make_v3_axis.py``): we read them (the axis is the first one whose length equals the number of
scales), dequantize along that axis, and ``protocol=3`` writes the same bytes back, with a UserWarning
that the axis is not recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import tensohelp

DIR = tensohelp.GOLDEN / "v3-axis-0.19.4"
CASES = json.loads((DIR / "manifest.json").read_text())["cases"]
IDS = [c["name"] for c in CASES]
AXIS_WARNING = "protocol 3 has no axis byte"


def _expected(case: dict, npz) -> np.ndarray:
    """(code - zero_point) * scale along the inferred axis, in float32, from the reference's codes."""
    axis = case["inferred_axis"]
    shape = tuple(case["shape"])
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    codes = npz["codes"].astype(np.float32)
    zp = npz["zero_points"].reshape(bshape)
    sc = npz["scales"].reshape(bshape)
    return (codes - zp) * sc


def test_cases_cover_both_axes_all_dtypes():
    seen = {(c["qdtype"], c["quantized_along"]) for c in CASES}
    assert {(q, a) for q in tensohelp.QDTYPE_CODES for a in (1, 2)} <= seen


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_packet_reads_along_its_axis(case):
    import tenso

    packet = (DIR / case["file"]).read_bytes()
    npz = np.load(DIR / case["npz"])
    q = tenso.loads(packet)
    assert isinstance(q, tenso.QuantizedTensor)
    assert q.shape == tuple(case["shape"])
    assert q.dtype_name == case["qdtype"]
    assert q.axis == case["inferred_axis"]
    assert np.array_equal(q.data, npz["packed_codes"])
    assert np.array_equal(q.scales, npz["scales"])
    assert np.array_equal(q.zero_points, npz["zero_points"])
    got = q.dequantize()
    assert got.shape == q.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, _expected(case, npz))
    if case["inferred_axis"] == case["quantized_along"]:
        # Along the right axis, every value is within its channel's quantization step of the input
        # (0.19.4 clamps the zero point, so clipped codes can be further off: compare unclipped ones).
        step = npz["scales"].max()
        codes = npz["codes"]
        lo, hi = {"qint8": (-128, 127), "quint8": (0, 255), "qint4": (-8, 7), "quint4": (0, 15)}[case["qdtype"]]
        inside = (codes > lo) & (codes < hi)
        assert np.all(np.abs(got - npz["values"])[inside] <= step)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_protocol_3_writes_the_reference_bytes(case):
    import tenso

    packet = (DIR / case["file"]).read_bytes()
    q = tenso.loads(packet, copy=True)
    kw = dict(protocol=3, check_integrity=case["check_integrity"])
    if q.axis != 0:
        with pytest.warns(UserWarning, match=AXIS_WARNING):
            out = bytes(tenso.dumps(q, **kw))
    else:
        out = bytes(tenso.dumps(q, **kw))
    assert out == packet
    # In a bundle the tensor is written the same way (one warning for the whole call).
    if q.axis != 0:
        with pytest.warns(UserWarning, match=AXIS_WARNING) as record:
            bundle = bytes(tenso.dumps({"a": q, "b": q}, protocol=3))
        assert len([w for w in record if AXIS_WARNING in str(w.message)]) == 1
        back = tenso.loads(bundle)
        assert back["a"] == back["b"] == tenso.loads(packet)


def test_protocol_4_keeps_the_axis_without_warning():
    import tenso

    values = np.arange(105, dtype=np.float32).reshape(5, 3, 7)
    q = tenso.QuantizedTensor.quantize(values, "qint8", scheme="per_channel", axis=2)
    back = tenso.loads(tenso.dumps(q))  # filterwarnings=error: a warning would fail here
    assert back.axis == 2 and back == q
    with pytest.warns(UserWarning, match=AXIS_WARNING):
        v3 = tenso.loads(tenso.dumps(q, protocol=3))
    assert v3.axis == 2 and v3 == q


def test_ambiguous_axis_takes_the_first_match():
    import tenso

    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    q = tenso.QuantizedTensor.quantize(values, "quint8", scheme="per_channel", axis=1)
    with pytest.warns(UserWarning, match=AXIS_WARNING):
        packet = tenso.dumps(q, protocol=3)
    back = tenso.loads(packet)
    assert back.axis == 0  # as 0.19.4's dequantize assumes
    assert np.array_equal(back.data, q.data) and np.array_equal(back.scales, q.scales)


def test_v3_scale_count_matching_no_axis_is_refused():
    import tenso

    packet = bytearray((DIR / CASES[0]["file"]).read_bytes())
    ndim = packet[7]
    at = 8 + 4 * ndim + 1 + 4  # header, shape, scheme, group_size -> num_scales
    packet[at] = 11  # no axis has length 11
    with pytest.raises(tenso.TensoFormatError, match="num_scales"):
        tenso.loads(bytes(packet))


@pytest.mark.interop
def test_reference_0_19_4_reads_our_v3_axis_packets():
    import tenso

    python = tensohelp.REFVENVS / "tenso-0.19.4" / "bin" / "python"
    if not python.exists():
        pytest.skip("reference venv .refvenvs/tenso-0.19.4 missing (bash scripts/refvenvs.sh)")
    case = next(c for c in CASES if c["quantized_along"] == 2 and not c["check_integrity"])
    q = tenso.loads((DIR / case["file"]).read_bytes())
    with pytest.warns(UserWarning, match=AXIS_WARNING):
        ours = bytes(tenso.dumps(q, protocol=3))
    code = (
        "import sys, numpy as np, tenso\n"
        "q = tenso.loads(sys.stdin.buffer.read())\n"
        "sys.stdout.write(f'{q.shape} {len(q.scales)} {bytes(np.asarray(q.data)).hex()}')\n"
    )
    out = subprocess.run([str(python), "-c", code], input=ours, capture_output=True, check=True, timeout=120)
    shape, ns, data = out.stdout.decode().rsplit(" ", 2)
    assert shape == str(tuple(case["shape"]))
    assert int(ns) == case["num_scales"]
    assert data == bytes(q.data).hex()
