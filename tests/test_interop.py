"""Interoperability with the reference releases (tenso 0.24.0 writes v4, 0.19.4 writes v3), each in its own
virtualenv under .refvenvs (scripts/refvenvs.sh). One subprocess per reference version runs every case; a case that
kills it by a signal is pinned as an expected failure on this machine and the rest run on in a fresh one (run_ref).

(a) our dumps -> 0.24.0 loads; (b) 0.24.0 dumps -> our loads; (c) the same with 0.19.4 and protocol=3;
(d) byte equality of uncompressed output (big-endian input excluded and pinned); FORMAT.md §16 defects pinned.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import tensohelp

pytestmark = pytest.mark.interop

REFS = {"0.24.0": 4, "0.19.4": 3}
DRIVER = tensohelp.TESTS / "interop_driver.py"


def ref_python(ver):
    py = tensohelp.REFVENVS / f"tenso-{ver}" / "bin" / "python"
    if not py.exists():
        pytest.skip(f"{py} missing: run scripts/refvenvs.sh")
    return py


# ---------------------------------------------------------------- the matrix -------------------------------------


def _dense(a):
    return ("dense", a)


def build_matrix():
    """[(id, spec, opts, flags)] ; flags: set of markers (compressed, bigendian, large_integrity, quant, ...)."""
    import tenso

    rng = np.random.default_rng(7)
    cases = []

    def add(cid, spec, flags=(), **opts):
        cases.append((cid, spec, opts, set(flags)))

    for dt in ["float32", "int32", "float64", "int64", "uint8", "uint16", "bool", "float16", "int8", "int16",
               "uint32", "uint64", "complex64", "complex128"]:
        a = (rng.standard_normal((3, 5)) * 50).astype(dt) if dt != "bool" else rng.random((3, 5)) > 0.5
        add(f"dtype_{dt}", _dense(a))
    add("dtype_bfloat16", _dense(rng.standard_normal(9).astype(np.float32).astype(tensohelp.bfloat16())))
    add("zero_d", _dense(np.array(2.5)))
    add("empty", _dense(np.zeros((0,), np.int16)))
    add("empty_2d", _dense(np.zeros((2, 0, 3), np.uint8)))
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    add("fortran", _dense(np.asfortranarray(base)))
    add("strided", _dense(np.arange(100, dtype=np.int32).reshape(10, 10)[::3, 1::4]))
    add("negative_stride", _dense(np.arange(10, dtype=np.float32)[::-1]))
    add("bigendian_i4", _dense(np.arange(6, dtype=">i4")), flags=["bigendian"])
    add("bigendian_f8", _dense(np.linspace(0, 1, 5).astype(">f8")), flags=["bigendian"])
    arr = rng.standard_normal((7, 9)).astype(np.float32)
    for align in (1, 16, 64, 128, 4096):
        for integ in (False, True):
            for comp in (False, True):
                add(f"opts_a{align}_i{int(integ)}_c{int(comp)}", _dense(arr), flags=["compressed"] if comp else [],
                    alignment=align, check_integrity=integ, compress=comp)
    zeros = np.zeros(5000, np.float64)
    add("compress_zeros", _dense(zeros), flags=["compressed"], compress=True)
    big = (np.arange(1_100_000) % 251).astype(np.uint8)
    add("large_integrity", _dense(big), flags=["large_integrity"], check_integrity=True)
    nested = ("bundle", [("w", _dense(arr)), ("meta", ("bundle", [("ids", _dense(np.arange(5))),
                                                                  ("deep", ("bundle", [("x", _dense(np.array(1.0)))])),
                                                                  ("empty", ("bundle", []))])),
                         ("ü日本", _dense(np.ones(3, np.bool_)))])
    add("bundle_nested", nested)
    add("bundle_nested_integrity", nested, check_integrity=True)
    add("bundle_nested_align128", nested, alignment=128)
    add("bundle_compressed", nested, flags=["compressed", "bundle_compressed"], compress=True)
    add("bundle_empty", ("bundle", []))
    m = (rng.random((6, 8)) < 0.3) * rng.standard_normal((6, 8))
    import scipy.sparse as sp

    for fmt in ("coo", "csr", "csc"):
        for dt in ("float32", "float64"):
            x = sp.csr_matrix(m.astype(dt)).asformat(fmt)
            names = ("data", "row", "col") if fmt == "coo" else ("data", "indices", "indptr")
            add(f"sparse_{fmt}_{dt}", ("sparse", fmt, x.shape, [np.array(getattr(x, n)) for n in names]))
    xs = sp.csr_matrix(m.astype(np.float32))
    add("sparse_csr_align128", ("sparse", "csr", xs.shape, [xs.data, xs.indices, xs.indptr]), alignment=128)
    add("bundle_with_sparse", ("bundle", [("adj", ("sparse", "csr", xs.shape, [xs.data, xs.indices, xs.indptr])),
                                          ("f", _dense(arr))]))
    xq = rng.uniform(-2, 3, size=(4, 6)).astype(np.float32)
    for qd in ("qint8", "quint8", "qint4", "quint4"):
        for scheme, kw in (("per_tensor", {}), ("per_channel", {"axis": 0}), ("per_group", {"group_size": 5})):
            q = tenso.QuantizedTensor.quantize(xq, qd, scheme=scheme, **kw)
            spec = ("quant", np.ascontiguousarray(np.asarray(q.data)), np.asarray(q.scales, np.float32),
                    np.asarray(q.zero_points, np.float32), tuple(q.shape), int(q.dtype_code), int(q.quant_scheme),
                    int(q.group_size), int(q.axis))
            add(f"quant_{qd}_{scheme}", spec, flags=["quant"])
            if qd == "qint8":
                add(f"quant_{qd}_{scheme}_integrity", spec, flags=["quant"], check_integrity=True)
    q1 = tenso.QuantizedTensor.quantize(xq, "qint8", scheme="per_channel", axis=1)
    add("quant_axis1", ("quant", np.asarray(q1.data), np.asarray(q1.scales), np.asarray(q1.zero_points),
                        tuple(q1.shape), 16, 1, 0, 1), flags=["quant", "v4only"])
    only = os.environ.get("TENSO_INTEROP_ONLY")  # a comma-separated subset, for test_suite_survives_crashing_reference
    if only:
        cases = [c for c in cases if c[0] in only.split(",")]
    return cases


def to_value(spec):
    import scipy.sparse as sp
    import tenso

    kind = spec[0]
    if kind == "dense":
        return spec[1]
    if kind == "bundle":
        return {k: to_value(v) for k, v in spec[1]}
    if kind == "sparse":
        fmt, shape, c = spec[1:]
        if fmt == "coo":
            return sp.coo_matrix((c[0], (c[1], c[2])), shape=shape)
        return (sp.csr_matrix if fmt == "csr" else sp.csc_matrix)((c[0], c[1], c[2]), shape=shape)
    data, scales, zps, shape, code, scheme, gs, axis = spec[1:]
    return tenso.QuantizedTensor(data, scales, zps, shape, code, scheme, gs, axis)


def norm(obj):
    """Our decoded object -> spec tree."""
    import tenso

    if isinstance(obj, np.ndarray):
        return ("dense", np.array(obj))
    if isinstance(obj, dict):
        return ("bundle", [(k, norm(v)) for k, v in obj.items()])
    if isinstance(obj, tenso.QuantizedTensor):
        return ("quant", np.array(obj.data), np.array(obj.scales), np.array(obj.zero_points), tuple(obj.shape),
                int(obj.dtype_code), int(obj.quant_scheme), int(obj.group_size), int(obj.axis))
    if getattr(obj, "format", None) in ("coo", "csr", "csc"):
        names = ("data", "row", "col") if obj.format == "coo" else ("data", "indices", "indptr")
        return ("sparse", obj.format, tuple(obj.shape), [np.array(getattr(obj, n)) for n in names])
    return ("other", repr(type(obj)))


def spec_equal(got, exp, where="", check_axis=True):
    """Raise AssertionError with a path when two spec trees differ (exact dtype + bytes for arrays)."""
    assert got[0] == exp[0], f"{where}: kind {got[0]} != {exp[0]}"
    if exp[0] == "dense":
        a, b = got[1], exp[1]
        assert a.dtype.name == b.dtype.name, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        if b.dtype.name == "bfloat16":
            assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), f"{where}: values"
        else:
            bb = b.astype(b.dtype.newbyteorder("=")) if b.dtype.byteorder == ">" else b
            aa = a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder == ">" else a
            assert np.ascontiguousarray(aa).tobytes() == np.ascontiguousarray(bb).tobytes(), f"{where}: values"
    elif exp[0] == "bundle":
        assert [k for k, _ in got[1]] == [k for k, _ in exp[1]], f"{where}: keys"
        for (k, g), (_, e) in zip(got[1], exp[1]):
            spec_equal(g, e, f"{where}/{k}", check_axis)
    elif exp[0] == "sparse":
        assert got[1] == exp[1] and tuple(got[2]) == tuple(exp[2]), f"{where}: sparse header"
        for g, e in zip(got[3], exp[3]):
            spec_equal(("dense", g), ("dense", e), f"{where}.comp", check_axis)
    elif exp[0] == "quant":
        assert np.asarray(got[1]).tobytes() == np.asarray(exp[1]).tobytes(), f"{where}: codes"
        for i, nm in ((2, "scales"), (3, "zero_points")):
            assert np.asarray(got[i], np.float32).tobytes() == np.asarray(exp[i], np.float32).tobytes(), nm
        assert tuple(got[4]) == tuple(exp[4]) and got[5:8] == exp[5:8], f"{where}: quant meta {got[4:]} {exp[4:]}"
        if check_axis:
            assert got[8] == exp[8], f"{where}: axis"
    else:
        raise AssertionError(f"{where}: {got}")


def portable(spec):
    """Spec tree safe to pickle across processes: big-endian arrays travel native + a marker."""
    if spec[0] == "dense" and spec[1].dtype.byteorder == ">":
        a = spec[1]
        return ("dense", a.astype(a.dtype.newbyteorder("=")), ">")
    if spec[0] == "bundle":
        return ("bundle", [(k, portable(v)) for k, v in spec[1]])
    return spec


def run_ref(ver, workdir, jobs, python=None, env=None):
    """Run `jobs` in the reference driver; {id: ("ok", spec) | ("err", msg) | ("crash", signal name, reason)}.

    A reference that dies by a signal on one case (0.19.4 raises SIGILL on CPUs without AVX-512 when it verifies an
    integrity footer) must not take the other cases with it. The driver logs each job's start before running it, so
    after a crash the parent knows which case was running, records it, and starts a fresh driver for the cases not yet
    run. A case that crashed after others ran in the same process is retried once at the head of the next batch, so a
    crash is pinned on a case only when that case kills a fresh process by itself.
    """
    py = python or ref_python(ver)
    results, pending = {}, list(jobs)
    while pending:
        (workdir / "jobs.pkl").write_bytes(pickle.dumps(pending))
        log = workdir / "results.pkl"
        log.unlink(missing_ok=True)
        proc = subprocess.run([str(py), str(DRIVER), str(workdir)], capture_output=True, text=True, timeout=600,
                              cwd=str(workdir), env=env)
        started = []
        for record in _read_records(log):
            if record[0] == "start":
                started.append(record[1])
            else:
                results[record[1]] = record[2]
        missing = [j["id"] for j in pending if j["id"] not in results]
        if not missing:
            break
        assert proc.returncode != 0, f"reference {ver} driver skipped {missing}"
        assert proc.returncode < 0 and started and started[-1] not in results, (
            f"reference {ver} driver failed outside any case (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        at = next(i for i, j in enumerate(pending) if j["id"] == started[-1])
        if at == 0:
            sig = signal.Signals(-proc.returncode).name
            results[started[-1]] = ("crash", sig, tensohelp.crash_reason(sig, f"tenso {ver}"))
            at = 1
        pending = pending[at:]
    return results


def _read_records(path):
    """The driver's event log: pickled records back to back (the last one may be cut by a crash)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except (EOFError, pickle.UnpicklingError):
                return


def ref_status(results, jid):
    """The status and payload of one job; a job that crashed the reference is an expected failure (a reference
    defect on this machine), reported with the signal and the CPU features the machine lacks."""
    res = results[jid]
    if res[0] == "crash":
        pytest.xfail(res[2])
    return res


# ---------------------------------------------------------------- session-scoped batches -------------------------


@pytest.fixture(scope="module")
def matrix():
    return build_matrix()


@pytest.fixture(scope="module", params=list(REFS), ids=lambda v: f"ref{v}")
def batch(request, matrix, tmp_path_factory):
    """For one reference version: our packets (protocol of that version) loaded by the reference, and the
    reference's packets for the same values. One subprocess."""
    import tenso

    ver = request.param
    proto = REFS[ver]
    ref_python(ver)
    work = tmp_path_factory.mktemp(f"interop-{ver}")
    jobs, ours, our_err = [], {}, {}
    for cid, spec, opts, flags in matrix:
        if proto == 3 and "v4only" in flags:
            continue
        try:
            pkt = bytes(tenso.dumps(to_value(spec), protocol=proto, **opts))
            ours[cid] = pkt
            (work / f"in_{cid}.tenso").write_bytes(pkt)
            jobs.append({"id": cid, "task": "load"})
        except Exception as e:  # noqa: BLE001 - reported per case
            our_err[cid] = f"{type(e).__name__}: {e}"
        jobs.append({"id": "dump_" + cid, "task": "dump", "spec": portable(spec), "opts": opts})
    results = run_ref(ver, work, jobs)
    refs = {}
    for cid, spec, opts, flags in matrix:
        p = work / f"out_dump_{cid}.tenso"
        if p.exists():
            refs[cid] = p.read_bytes()
    return {"ver": ver, "proto": proto, "ours": ours, "our_err": our_err, "results": results, "refs": refs}


def _ids(matrix_cases):
    return [c[0] for c in matrix_cases]


MATRIX_IDS = None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        try:
            cases = build_matrix()
        except Exception:  # tenso not importable: let the fixture fail loudly instead
            cases = []
        metafunc.parametrize("case", cases, ids=[c[0] for c in cases])


def _expected_loaded_by_ref(spec, flags):
    return spec


def test_ours_read_by_reference(batch, case):
    """(a)/(c): our dumps (protocol of the reference) -> reference loads equals the value."""
    cid, spec, opts, flags = case
    if batch["proto"] == 3 and "v4only" in flags:
        pytest.skip("per-channel axis != 0 cannot be expressed in v3")
    assert cid not in batch["our_err"], f"our dumps failed: {batch['our_err'].get(cid)}"
    status, got = ref_status(batch["results"], cid)
    ver = batch["ver"]
    if ver == "0.24.0" and "bundle_compressed" in flags:
        # FORMAT.md §16.3: 0.24.0 cannot read bundles with compressed leaves (its own either) - pin the defect.
        assert status == "err" and "dtype code: 0" in got, got
        return
    assert status == "ok", f"reference {ver} failed to read our packet: {got}"
    # 0.19.4 has no axis on the wire and QuantizedTensor without axis
    spec_equal(got, spec, cid, check_axis=(batch["proto"] == 4))


def test_reference_read_by_us(batch, case):
    """(b)/(c): reference dumps -> our loads equals the value (incl. 0.19.4's chunked >= 1 MiB footer)."""
    import tenso

    cid, spec, opts, flags = case
    if batch["proto"] == 3 and "v4only" in flags:
        pytest.skip("v3 writer does not store the axis")
    status, msg = ref_status(batch["results"], "dump_" + cid)
    assert status == "ok", f"reference {batch['ver']} could not dump: {msg}"
    ref = batch["refs"][cid]
    assert ref[4] == batch["proto"]
    got = norm(tenso.loads(ref))
    exp = spec
    if "bigendian" in flags:
        # FORMAT.md §16.5: the reference writes raw big-endian bytes under a little-endian dtype code, so the
        # values it meant are byte-swapped on the wire; we decode what is on the wire.
        a = spec[1]
        exp = ("dense", a.view(a.dtype.newbyteorder("<")))
    spec_equal(got, exp, cid, check_axis=(batch["proto"] == 4))


def test_byte_equality(batch, case):
    """(d): uncompressed output is byte-identical to the reference's (FORMAT.md §17)."""
    cid, spec, opts, flags = case
    if batch["proto"] == 3 and "v4only" in flags:
        pytest.skip("v4 only")
    ref_status(batch["results"], "dump_" + cid)  # the reference's packet exists unless it crashed writing it
    ours = batch["ours"].get(cid)
    ref = batch["refs"].get(cid)
    assert ours is not None and ref is not None
    if "compressed" in flags:
        # LZ4 encoders may differ (§6.3): the uncompressed prefix (header..padding) must still agree for dense.
        if spec[0] == "dense":
            hdr = 64 if opts.get("alignment", 64) == 64 else None
            if hdr:
                assert ours[:hdr] == ref[:hdr]
        return
    if "bigendian" in flags:
        a = spec[1]
        assert ours != ref
        assert ref.endswith(a.tobytes()), "reference writes the raw big-endian bytes (§16.5)"
        assert ours.endswith(a.astype(a.dtype.newbyteorder("<")).tobytes()), "we write little-endian"
        assert ours[: len(ours) - a.nbytes] == ref[: len(ref) - a.nbytes]
        return
    if "large_integrity" in flags and batch["proto"] == 3:
        # 0.19.4's dumps writes the chunked XXH3 variant for bodies >= 1 MiB (§5.3); we write plain XXH3-64.
        import xxhash

        assert ours[:-8] == ref[:-8]
        body = ours[64:-8]
        assert int.from_bytes(ours[-8:], "little") == xxhash.xxh3_64_intdigest(body)
        assert ours[-8:] != ref[-8:]
        return
    assert len(ours) == len(ref), f"{cid}: length {len(ours)} != reference {len(ref)}"
    if ours != ref:
        i = next(i for i, (x, y) in enumerate(zip(ours, ref)) if x != y)
        pytest.fail(f"{cid}: first difference at {i}: ours {ours[i:i + 12].hex()} ref {ref[i:i + 12].hex()}")


def test_pinned_reference_defects(tmp_path):
    """FORMAT.md §16: 0.24.0 cannot read v3 quantized packets or 0.19.4's chunked footer; we read both."""
    import tenso

    ref_python("0.24.0")
    golden_v3 = tensohelp.GOLDEN / "v3-0.19.4"
    names = ["quant_qint4_per_tensor", "quant_qint8_per_channel", "quant_quint8_per_group",
             "large_uint8_1100000_integrity", "bundle_compress"]
    jobs = []
    for n in names:
        (tmp_path / f"in_{n}.tenso").write_bytes((golden_v3 / f"{n}.tenso").read_bytes())
        jobs.append({"id": n, "task": "load"})
    # our own v3 quantized output too
    q = tenso.QuantizedTensor.quantize(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "qint8")
    (tmp_path / "in_ours_v3_quant.tenso").write_bytes(bytes(tenso.dumps(q, protocol=3)))
    jobs.append({"id": "ours_v3_quant", "task": "load"})
    res = run_ref("0.24.0", tmp_path, jobs)
    for n in names:
        case = tensohelp.Case("v3-0.19.4", n)
        tensohelp.assert_matches(tenso.loads(case.packet), case.expected, case.npz, n)  # we succeed
        status, got = res[n][:2]  # a crash ("crash", signal, reason) is a failure to read as well
        if n.startswith("quant"):
            # either an error, or a silently wrong decode (no scales / garbage group size, §9.3)
            if status == "ok":
                exp = case.expected
                wrong = (got[0] != "quant" or len(got[2]) != exp["num_scales"]
                         or got[7] != exp["group_size"])
                assert wrong, f"0.24.0 unexpectedly decoded v3 {n} correctly"
        else:
            assert status != "ok", f"0.24.0 unexpectedly read {n}"
    status, got = res["ours_v3_quant"][:2]
    if status == "ok":
        assert got[0] != "quant" or len(got[2]) != 1 or got[6] != 0
    assert np.array_equal(tenso.loads(bytes(tenso.dumps(q, protocol=3))).dequantize(), q.dequantize())


# ---------------------------------------------------------------- crash containment ------------------------------

CRASH_CASES = ["dtype_float32", "opts_a128_i1_c0", "large_integrity", "bundle_nested_integrity", "sparse_csr_float64",
               "quant_qint8_per_tensor_integrity"]


def test_crashing_reference_is_contained(matrix, tmp_path, monkeypatch):
    """A reference that dies by a signal on some cases loses only those cases: the driver (here run with our own
    package, so no reference virtualenv is needed) kills itself on chosen jobs, twice in a row and once with another
    signal, and every other job still runs and gives the right answer."""
    import tenso

    cases = {c[0]: c for c in matrix if c[0] in CRASH_CASES}
    assert sorted(cases) == sorted(CRASH_CASES)
    jobs = []
    for cid in CRASH_CASES:
        _, spec, opts, _ = cases[cid]
        (tmp_path / f"in_{cid}.tenso").write_bytes(bytes(tenso.dumps(to_value(spec), **opts)))
        jobs += [{"id": cid, "task": "load"}, {"id": "dump_" + cid, "task": "dump", "spec": portable(spec),
                                                 "opts": opts}]
    crash = {"opts_a128_i1_c0": "SIGILL", "large_integrity": "SIGILL", "dump_bundle_nested_integrity": "SIGSEGV"}
    env = dict(os.environ, TENSO_INTEROP_SIMULATE_CRASH=",".join(f"{j}={s}" for j, s in crash.items()))
    runs = []
    real_run = subprocess.run

    def counting_run(*args, **kwargs):
        runs.append(pickle.loads((tmp_path / "jobs.pkl").read_bytes())[0]["id"])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    results = run_ref("simulated", tmp_path, jobs, python=sys.executable, env=env)

    assert sorted(results) == sorted(j["id"] for j in jobs)
    for jid, sig in crash.items():
        status, name, reason = results[jid]
        assert (status, name) == ("crash", sig)
        assert reason.startswith(f"{sig} in tenso simulated")
    # Each crash after other jobs in the same process is retried once in a fresh one before it is pinned.
    assert runs == ["dtype_float32", "opts_a128_i1_c0", "dump_opts_a128_i1_c0", "large_integrity",
                    "dump_large_integrity", "dump_bundle_nested_integrity", "sparse_csr_float64"]
    for cid in CRASH_CASES:
        _, spec, opts, _ = cases[cid]
        if cid not in crash:
            status, got = results[cid]
            assert status == "ok", got
            spec_equal(got, spec, cid)
        if "dump_" + cid not in crash:
            assert results["dump_" + cid] == ("ok", None)
            spec_equal(norm(tenso.loads((tmp_path / f"out_dump_{cid}.tenso").read_bytes())), spec, cid)
    with pytest.raises(pytest.xfail.Exception, match=r"^SIGILL in tenso simulated"):
        ref_status(results, "large_integrity")


def test_crash_reason_names_the_missing_cpu_feature(monkeypatch):
    monkeypatch.setattr(tensohelp, "cpu_flags", lambda: {"sse4_2", "avx", "avx2", "bmi2", "fma"})
    assert tensohelp.crash_reason("SIGILL", "tenso 0.19.4") == (
        "SIGILL in tenso 0.19.4 (CPU lacks avx512f, avx512bw, avx512dq, avx512vl)")
    assert tensohelp.crash_reason("SIGSEGV", "tenso 0.19.4") == "SIGSEGV in tenso 0.19.4"
    monkeypatch.setattr(tensohelp, "cpu_flags", lambda: set(tensohelp.SIMD_FEATURES))
    assert tensohelp.crash_reason("SIGILL", "tenso 0.19.4") == "SIGILL in tenso 0.19.4"
    monkeypatch.setattr(tensohelp, "cpu_flags", set)  # no /proc/cpuinfo
    assert tensohelp.crash_reason("SIGILL", "tenso 0.19.4") == "SIGILL in tenso 0.19.4"


def test_suite_survives_crashing_reference():
    """End to end, as the gate runs it: with 0.19.4 made to die by SIGILL on three chosen cases, the interop tests of
    those cases are expected failures naming the signal, and the others still pass. The cases carry no integrity
    footer: the real 0.19.4 dies by SIGILL on integrity cases by itself on CPUs without AVX-512 (issue 9), and the
    count below must not depend on the CPU."""
    ref_python("0.19.4")
    crashing = ["opts_a128_i0_c0", "bundle_nested", "bundle_nested_align128"]
    selected = crashing + ["dtype_float32", "opts_a16_i0_c0"]
    env = dict(os.environ, TENSO_INTEROP_SIMULATE_CRASH=",".join(crashing), TENSO_INTEROP_ONLY=",".join(selected))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rx", "-p", "no:cacheprovider", "-c", str(tensohelp.ROOT / "pyproject.toml"),
         "--rootdir", str(tensohelp.ROOT), str(tensohelp.TESTS / "test_interop.py"), "-k", "ref0.19.4"],
        capture_output=True, text=True, timeout=600, cwd=str(tensohelp.TESTS), env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # 3 test functions x 5 cases; the reference's load of each crashing case is lost, nothing else.
    assert re.search(r"^12 passed, \d+ deselected, 3 xfailed in ", out, re.M), out[-3000:]
    for cid in crashing:
        assert f"test_ours_read_by_reference[{cid}-ref0.19.4] - SIGILL in tenso 0.19.4" in out, out[-3000:]
