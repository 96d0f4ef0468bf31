"""Write v3 packets of per-channel quantized tensors along axes other than 0, with tenso 0.19.4 itself.

Protocol 3 has no axis byte (docs/FORMAT.md §9.3): 0.19.4 quantizes along any axis but records only the
scales, so a reader must infer the axis from ``num_scales``. These packets are what 0.19.4 really writes.

Run with the reference venv (``bash scripts/refvenvs.sh`` creates it), from the repository root:

    .refvenvs/tenso-0.19.4/bin/python tests/golden/make_v3_axis.py

Writes ``tests/golden/v3-axis-0.19.4/``: ``NAME.tenso`` (the packet), ``NAME.npz`` (the float input, the packed
and unpacked codes, scales and zero points) and ``manifest.json`` (which also lists the scales and zero points). The inputs are seeded, so re-running writes
the same packets.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import tenso
from tenso.quantize import QuantizedTensor, _unpack_int4

OUT = pathlib.Path(__file__).resolve().parent / "v3-axis-0.19.4"

# Distinct axis lengths, so the axis is recoverable; 105 elements, so 4-bit codes end in half a byte.
SHAPE = (5, 3, 7)
QDTYPES = ("qint8", "quint8", "qint4", "quint4")


def _case(name: str, values: np.ndarray, qdtype: str, axis: int, inferred: int, integrity: bool) -> dict:
    q = QuantizedTensor.quantize(values, qdtype, scheme="per_channel", axis=axis)
    packet = bytes(tenso.dumps(q, check_integrity=integrity))
    assert packet[4] == 3, "0.19.4 writes protocol 3"
    signed = qdtype in ("qint8", "qint4")
    n = int(np.prod(values.shape))
    if qdtype.endswith("4"):
        codes = _unpack_int4(np.asarray(q.data), n, signed)
    else:
        codes = np.asarray(q.data).view(np.int8 if signed else np.uint8)[:n]
    (OUT / f"{name}.tenso").write_bytes(packet)
    np.savez(
        OUT / f"{name}.npz",
        values=values.astype(np.float32),
        packed_codes=np.asarray(q.data, dtype=np.uint8),
        codes=codes.astype(np.int16).reshape(values.shape),
        scales=q.scales,
        zero_points=q.zero_points,
    )
    return {
        "name": name,
        "file": f"{name}.tenso",
        "npz": f"{name}.npz",
        "sha256": hashlib.sha256(packet).hexdigest(),
        "qdtype": qdtype,
        "shape": list(values.shape),
        "quantized_along": axis,
        "inferred_axis": inferred,
        "num_scales": int(q.scales.size),
        "scales": [float(v) for v in q.scales],
        "zero_points": [float(v) for v in q.zero_points],
        "check_integrity": integrity,
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng = np.random.default_rng(93)
    cases = []
    for qdtype in QDTYPES:
        for axis in (1, 2):
            values = rng.standard_normal(SHAPE).astype(np.float32) * np.arange(1, 8, dtype=np.float32)
            cases.append(_case(f"{qdtype}_axis{axis}", values, qdtype, axis, axis, False))
    values = rng.standard_normal(SHAPE).astype(np.float32)
    cases.append(_case("qint8_axis1_integrity", values, "qint8", 1, 1, True))
    # Two axes of length 4: the packet cannot say which one was used; readers take the first (axis 0),
    # which is what 0.19.4's own dequantize assumes.
    values = rng.standard_normal((4, 4)).astype(np.float32)
    cases.append(_case("qint8_ambiguous_axis1", values, "qint8", 1, 0, False))
    manifest = {
        "writer": {"tenso": tenso.__version__ if hasattr(tenso, "__version__") else "0.19.4", "api": "tenso.dumps"},
        "generator": "tests/golden/make_v3_axis.py",
        "cases": cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
