"""Runs INSIDE a reference virtualenv (.refvenvs/tenso-X): no imports from the test suite.

usage: python interop_driver.py WORKDIR
Reads WORKDIR/jobs.pkl: list of dicts {id, task: "load"|"dump", spec?, opts?}.
  load: tenso.loads(WORKDIR/in_<id>.tenso) -> normalised spec tree
  dump: build the value from `spec`, tenso.dumps(value, **opts) -> WORKDIR/out_<id>.tenso
Appends to WORKDIR/results.pkl, unbuffered, one pickled record per event, so that the parent still knows what
happened when a case kills the process (a reference wheel that dies by SIGILL or SIGSEGV):
  ("start", id)           written before the job runs
  ("done", id, result)    result = ("ok", spec_or_None) | ("err", "Type: message")
A "start" without its "done" names the case that crashed the process (tests/test_interop.py: run_ref).

TENSO_INTEROP_SIMULATE_CRASH="ID[=SIGNAL],..." makes the driver kill itself with SIGNAL (default SIGILL) when it
reaches job ID, as a reference that dies on that case would (tests/test_interop.py proves the containment with it).

Spec trees (plain tuples, numpy arrays, dicts only):
  ("dense", ndarray) | ("bundle", [(key, spec), ...]) | ("sparse", fmt, shape, [comp arrays])
  | ("quant", data, scales, zero_points, shape, dtype_code, scheme, group_size, axis)
"""

import os
import pathlib
import pickle
import resource
import signal
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


def simulated_crashes():
    """{job id: signal number} from TENSO_INTEROP_SIMULATE_CRASH."""
    out = {}
    for item in filter(None, os.environ.get("TENSO_INTEROP_SIMULATE_CRASH", "").split(",")):
        jid, _, sig = item.strip().partition("=")
        out[jid] = int(getattr(signal, sig or "SIGILL"))
    return out


def run_job(work, job):
    if job["task"] == "load":
        data = (work / f"in_{job['id']}.tenso").read_bytes()
        return ("ok", norm(tenso.loads(data)))
    out = tenso.dumps(build(job["spec"]), **job["opts"])
    (work / f"out_{job['id']}.tenso").write_bytes(bytes(out))
    return ("ok", None)


def main():
    # A crashing reference must not leave core files behind in the work directory.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    work = pathlib.Path(sys.argv[1])
    jobs = pickle.loads((work / "jobs.pkl").read_bytes())
    crashes = simulated_crashes()
    with open(work / "results.pkl", "ab", buffering=0) as log:
        for job in jobs:
            jid = job["id"]
            log.write(pickle.dumps(("start", jid)))
            if jid in crashes:
                os.kill(os.getpid(), crashes[jid])
            try:
                result = run_job(work, job)
            except Exception as e:  # noqa: BLE001 - we report every failure to the parent
                result = ("err", f"{type(e).__name__}: {e}")
            except BaseException as e:  # PanicException
                result = ("err", f"{type(e).__name__}: {e} {traceback.format_exc()[-300:]}")
            log.write(pickle.dumps(("done", jid, result)))


if __name__ == "__main__":
    main()
