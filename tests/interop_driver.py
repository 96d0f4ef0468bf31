"""Runs INSIDE a reference virtualenv (.refvenvs/tenso-X): no imports from the test suite.

usage: python interop_driver.py WORKDIR
Reads WORKDIR/jobs.pkl: list of dicts {id, task: "load"|"dump", spec?, opts?}.
  load: tenso.loads(WORKDIR/in_<id>.tenso) -> normalised spec tree
  dump: build the value from `spec`, tenso.dumps(value, **opts) -> WORKDIR/out_<id>.tenso
Writes WORKDIR/results.pkl: {id: ("ok", spec_or_None) | ("err", "Type: message")}.

Spec trees (plain tuples, numpy arrays, dicts only):
  ("dense", ndarray) | ("bundle", [(key, spec), ...]) | ("sparse", fmt, shape, [comp arrays])
  | ("quant", data, scales, zero_points, shape, dtype_code, scheme, group_size, axis)
"""

import pathlib
import pickle
import sys
import traceback

import numpy as np
import tenso


def build(spec):
    kind = spec[0]
    if kind == "dense":
        a = spec[1]
        if len(spec) > 2 and spec[2] == ">":  # pickle does not keep non-native byte order
            a = a.astype(a.dtype.newbyteorder(">"))
        return a
    if kind == "bundle":
        return {k: build(v) for k, v in spec[1]}
    if kind == "sparse":
        import scipy.sparse as sp

        fmt, shape, comps = spec[1], spec[2], spec[3]
        if fmt == "coo":
            return sp.coo_matrix((comps[0], (comps[1], comps[2])), shape=shape)
        ctor = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
        return ctor((comps[0], comps[1], comps[2]), shape=shape)
    if kind == "quant":
        data, scales, zps, shape, code, scheme, gs, axis = spec[1:]
        try:
            return tenso.QuantizedTensor(data, scales, zps, shape, code, scheme, gs, axis=axis)
        except TypeError:  # 0.19.4 has no axis parameter
            return tenso.QuantizedTensor(data, scales, zps, shape, code, scheme, gs)
    raise ValueError(kind)


def norm(obj):
    if isinstance(obj, np.ndarray):
        return ("dense", np.array(obj))
    if isinstance(obj, dict):
        return ("bundle", [(k, norm(v)) for k, v in obj.items()])
    if hasattr(obj, "format") and getattr(obj, "format", None) in ("coo", "csr", "csc"):
        names = ("data", "row", "col") if obj.format == "coo" else ("data", "indices", "indptr")
        return ("sparse", obj.format, tuple(obj.shape), [np.array(getattr(obj, n)) for n in names])
    if type(obj).__name__ == "QuantizedTensor":
        return ("quant", np.array(obj.data), np.array(obj.scales), np.array(obj.zero_points), tuple(obj.shape),
                int(obj.dtype_code), int(obj.quant_scheme), int(obj.group_size), int(getattr(obj, "axis", 0)))
    return ("other", repr(type(obj)))


def main():
    work = pathlib.Path(sys.argv[1])
    jobs = pickle.loads((work / "jobs.pkl").read_bytes())
    results = {}
    for job in jobs:
        jid = job["id"]
        try:
            if job["task"] == "load":
                data = (work / f"in_{jid}.tenso").read_bytes()
                results[jid] = ("ok", norm(tenso.loads(data)))
            else:
                out = tenso.dumps(build(job["spec"]), **job["opts"])
                (work / f"out_{jid}.tenso").write_bytes(bytes(out))
                results[jid] = ("ok", None)
        except Exception as e:  # noqa: BLE001 - we report every failure to the parent
            results[jid] = ("err", f"{type(e).__name__}: {e}")
        except BaseException as e:  # PanicException
            results[jid] = ("err", f"{type(e).__name__}: {e} {traceback.format_exc()[-300:]}")
    (work / "results.pkl").write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    main()
