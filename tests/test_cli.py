"""The `tenso` command, run through its real entry points: the console script the wheel installs next to the
interpreter (`.venv/bin/tenso`) and `python -m tenso`, as subprocesses, on every golden fixture and the hostile
corpus. Calls that do not depend on each other run a few at a time, so the many round trips stay quick."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tensohelp

tenso = pytest.importorskip("tenso")

SCRIPT = pathlib.Path(sys.executable).parent / "tenso"
ENTRY_POINTS = {"script": [str(SCRIPT)], "module": [sys.executable, "-m", "tenso"]}
GOLDEN = tensohelp.golden_cases()
HOSTILE = json.loads((tensohelp.HOSTILE / "manifest.json").read_text())
#: Dtypes the safetensors format has (tests/../tenso/cli.py maps them); complex128 is the one tenso dtype it lacks.
SAFETENSORS_DTYPES = {"bool", "uint8", "int8", "uint16", "int16", "float16", "bfloat16", "uint32", "int32", "float32",
                      "uint64", "int64", "float64", "complex64"}


def tenso_cmd(*args, entry="script", stdin=None, cwd=None):
    """Run the command; return the CompletedProcess (stdout as bytes when binary output is asked for)."""
    proc = subprocess.run(ENTRY_POINTS[entry] + [str(a) for a in args], input=stdin, capture_output=True,
                          timeout=300, cwd=cwd)
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    return proc


def text(proc):
    return proc.stdout.decode(), proc.stderr.decode()


def parallel(calls):
    with ThreadPoolExecutor(max_workers=max(2, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda c: c(), calls))


def golden_path(folder, name):
    return tensohelp.GOLDEN / folder / f"{name}.tenso"


def test_console_script_is_installed():
    assert SCRIPT.exists(), f"{SCRIPT} missing: the wheel must install the `tenso` console script"


# ---------------------------------------------------------------- usage -------------------------------------------


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_help(entry):
    out, _ = text(tenso_cmd("--help", entry=entry))
    assert out.startswith("usage: tenso ")
    for word in ("inspect", "verify", "convert", "Exit status"):
        assert word in out
    for sub in ("inspect", "verify", "convert"):
        proc = tenso_cmd(sub, "--help", entry=entry)
        assert proc.returncode == 0 and text(proc)[0].startswith(f"usage: tenso {sub}")
    proc = tenso_cmd("--version", entry=entry)
    assert proc.returncode == 0 and text(proc)[0].strip() == f"tenso {tenso.__version__}"


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["inspect"], ["verify"], ["convert", "x.tenso"], ["inspect", "--bogus", "x.tenso"],
    ["convert", "a.tenso", "b.tenso", "--protocol", "5"], ["convert", "a.tenso", "b.npy", "--protocol", "3"],
    ["convert", "a.tenso", "b.safetensors", "--check-integrity"], ["convert", "a.tenso", "b.npy", "--compress"],
], ids=lambda a: " ".join(a) or "none")
def test_usage_errors_exit_2(entry, args):
    proc = tenso_cmd(*args, entry=entry)
    out, err = text(proc)
    assert proc.returncode == 2, (out, err)
    assert "usage: tenso" in err and "error:" in err


# ---------------------------------------------------------------- verify / inspect on the golden corpus -----------


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_verify_every_golden_fixture(entry):
    files = [golden_path(f, n) for f, n in GOLDEN]
    proc = tenso_cmd("verify", *files, entry=entry)
    out, err = text(proc)
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    assert len(lines) == len(files)
    for (folder, name), path, line in zip(GOLDEN, files, lines):
        case = tensohelp.Case(folder, name)
        assert line.startswith(f"{path}: ok, "), line
        assert f" v{case.protocol} packet, {len(case.packet)} bytes" in line, line
        assert ("integrity footer" in line) == bool(case.options.get("check_integrity")), line


def check_node(got, exp, where):
    """An `inspect --json` node against the fixture's expected value tree."""
    t = exp["type"]
    if t == "ragged":
        return check_node(got, exp["bundle"], where)
    kind = {"dense": "dense", "bundle": "bundle", "sparse": "sparse", "quantized": "quantized", "string": "string"}[t]
    assert got["kind"] == kind, where
    if t == "dense":
        assert (got["dtype"], got["shape"]) == (exp["dtype"], exp["shape"]), where
        n = int(np.prod(exp["shape"], dtype=np.int64))
        assert got["elements"] == n and got["body_bytes"] == n * np.dtype(tensohelp.bfloat16() if exp["dtype"] ==
                                                                           "bfloat16" else exp["dtype"]).itemsize
    elif t == "bundle":
        assert [e["key"] for e in got["entries"]] == [k for k, _ in exp["entries"]], where
        assert got["entry_count"] == len(exp["entries"])
        for e, (k, sub) in zip(got["entries"], exp["entries"]):
            check_node(e, sub, f"{where}/{k}")
    elif t == "sparse":
        data = dict(exp["components"])["data"]
        assert (got["format"], got["shape"], got["dtype"]) == (exp["format"], exp["shape"], data["dtype"]), where
        assert got["nnz"] == data["shape"][0]
    elif t == "quantized":
        assert (got["dtype"], got["scheme"], got["group_size"], got["num_scales"], got["shape"]) == (
            exp["dtype_name"], exp["scheme"], exp["group_size"], exp["num_scales"], exp["shape"]), where
    else:
        assert got["count"] == len(exp["strings"])
        assert got["payload_bytes"] == sum(len(s.encode()) for s in exp["strings"])


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_inspect_json_every_golden_fixture(entry):
    files = [golden_path(f, n) for f, n in GOLDEN]
    proc = tenso_cmd("inspect", "--json", *files, entry=entry)
    out, err = text(proc)
    assert proc.returncode == 0, out + err
    reports = [json.loads(line) for line in out.splitlines()]
    assert len(reports) == len(files)
    for (folder, name), path, rep in zip(GOLDEN, files, reports):
        case = tensohelp.Case(folder, name)
        assert rep["file"] == str(path) and rep["valid"] is True and rep["error"] is None
        assert rep["size"] == len(case.packet)
        # A top-level compressed packet does not record its length (FORMAT.md 6.2), so trailing bytes are unknown.
        assert rep["trailing_bytes"] == (None if case.compressed and case.kind == "dense" else 0), name
        node = rep["packet"]
        assert node["version"] == case.protocol == case.meta["packet"]["version"]
        assert node["flags"] == case.meta["packet"]["flags"]
        assert node["dtype_code"] == case.meta["packet"]["dtype_code"]
        assert node["compressed"] == bool(case.compressed and case.kind == "dense")
        check_node(node, case.expected, f"{folder}/{name}")
        if case.kind == "dense" and case.options.get("alignment", 64) != 64:
            assert node["alignment"] == case.options["alignment"]
            assert "CUST_ALIGN" in node["flag_names"]


def test_inspect_text_every_golden_fixture():
    files = [golden_path(f, n) for f, n in GOLDEN]
    proc = tenso_cmd("inspect", *files)
    out, err = text(proc)
    assert proc.returncode == 0, out + err
    blocks = out.split("\n\n")
    assert len(blocks) == len(files)
    for path, block in zip(files, blocks):
        assert block.startswith(f"file: {path} (")
        assert "\npacket: " in block
    nested = blocks[files.index(golden_path("v4-0.24.0", "bundle_nested_mixed"))]
    assert "'layer1': bundle of 2 entries" in nested
    assert "      'z': dense complex64 (2,)" in nested  # two levels down, indented twice


def test_inspect_shows_entries_with_their_own_flags(tmp_path):
    value = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "q": {"i": np.arange(4, dtype=np.int16)}}
    (tmp_path / "b.tenso").write_bytes(bytes(tenso.dumps(value, check_integrity=True, alignment=128)))
    rep = json.loads(text(tenso_cmd("inspect", "--json", tmp_path / "b.tenso"))[0])
    w, q = rep["packet"]["entries"]
    assert (w["key"], w["shape"], w["dtype"], w["alignment"], w["integrity"]) == ("w", [2, 3], "float32", 128, True)
    assert w["flag_names"] == ["INTEGRITY", "CUST_ALIGN"]
    assert q["entries"][0]["key"] == "i" and q["entries"][0]["integrity"] is True
    out = text(tenso_cmd("verify", tmp_path / "b.tenso"))[0]
    assert "2 integrity footers verified" in out


# ---------------------------------------------------------------- canonical padding and trailing bytes ----------


def _all_nodes(node):
    yield node
    for entry in node.get("entries", []):
        yield from _all_nodes(entry)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_golden_fixture_is_canonical(entry):
    files = [golden_path(f, n) for f, n in GOLDEN]
    proc = tenso_cmd("verify", "--strict", *files, entry=entry)
    out, err = text(proc)
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    assert len(lines) == len(files) and all(line.startswith(f"{p}: ok, ") for p, line in zip(files, lines)), out
    reports = [json.loads(line) for line in text(tenso_cmd("inspect", "--json", *files, entry=entry))[0].splitlines()]
    for path, rep in zip(files, reports):
        assert rep["canonical"] is True and rep["nonzero_padding"] == [], path
        assert all(n["canonical_padding"] for n in _all_nodes(rep["packet"])), path


def _quant_pad(packet, start=0):
    """Where the padding of the v4 quantized packet at `start` begins: header 10, shape, scheme and axis bytes,
    group size and num_scales, scales and zero points (FORMAT.md 9.1); no exponent byte (alignment 64)."""
    ndim = packet[start + 8]
    ns_at = start + 10 + 4 * ndim + 2 + 4
    num_scales = int.from_bytes(packet[ns_at:ns_at + 4], "little")
    return ns_at + 4 + 8 * num_scales


def _crafted():
    """(name, canonical packet, offset of an ignored byte, JSON path of the packet holding it, kind, node path).
    Offsets come from FORMAT.md's layouts, worked out here independently of the engine's walk."""
    sp = pytest.importorskip("scipy.sparse")
    f32 = np.arange(3, dtype=np.float32)
    quant = golden_path("v4-0.24.0", "quant_qint8_per_channel").read_bytes()
    cases = [
        # v4 dense: header 10 + shape 4, padding 14..64
        ("dense_v4", bytes(tenso.dumps(f32)), 20, [], "body padding", []),
        # v3, alignment 16: header 8 + shape 4, exponent byte at 12, padding 13..16
        ("dense_v3_cust_align", bytes(tenso.dumps(f32, protocol=3, alignment=16)), 13, [], "body padding", []),
        ("quantized", quant, _quant_pad(quant), [], "body padding", []),
        # string tensor: header 10 + count 4, padding 14..64
        ("string", bytes(tenso.dumps(tenso.StringTensor(["a", "bé"]))), 40, [], "body padding", []),
        # bundle entry 'w' at 10: klen 4, key 1, vlen 4 -> leaf at 19, its padding 33..83
        ("bundle_entry", bytes(tenso.dumps({"w": f32})), 19 + 63, ["w"], "body padding", ["w"]),
        # sparse: header 10, rows and cols 8, length 4 -> component 0 at 22, its padding 36..86
        ("sparse_component", bytes(tenso.dumps(sp.coo_matrix(np.eye(3, dtype=np.float32)))), 22 + 14, [0],
         "body padding", []),
        ("reserved_byte", bytes(tenso.dumps(f32)), 9, [], "reserved header byte", []),
    ]
    return cases


def test_crafted_packets_start_canonical(tmp_path):
    # The packets below are only non-canonical by the one byte each test changes.
    files = []
    for name, packet, *_ in _crafted():
        files.append(tmp_path / f"{name}.tenso")
        files[-1].write_bytes(packet)
    proc = tenso_cmd("verify", "--strict", *files)
    assert proc.returncode == 0 and "warning" not in text(proc)[0], text(proc)


@pytest.mark.parametrize("case", ["dense_v4", "dense_v3_cust_align", "quantized", "string", "bundle_entry",
                                  "sparse_component", "reserved_byte"])
def test_nonzero_padding_is_reported(case, tmp_path):
    name, packet, offset, path, kind, node_path = next(c for c in _crafted() if c[0] == case)
    assert packet[offset] == 0
    bad = bytearray(packet)
    bad[offset] = 0x5A
    f = tmp_path / f"{name}.tenso"
    f.write_bytes(bytes(bad))
    # Readers ignore the byte: the packet still decodes.
    tenso.loads(bytes(bad))
    proc = tenso_cmd("verify", f)
    out, err = text(proc)
    lines = out.splitlines()
    assert proc.returncode == 0, out + err
    assert len(lines) == 2 and lines[0].startswith(f"{f}: ok, ") and lines[1].startswith(f"{f}: warning: "), out
    assert f"non-zero {kind} at offset {offset}" in lines[1], lines[1]
    proc = tenso_cmd("verify", "--strict", f)
    out, err = text(proc)
    assert proc.returncode == 1 and not err, out + err
    assert out.splitlines() == [f"{f}: not canonical: " + lines[1][len(f"{f}: warning: "):]], out
    rep = json.loads(text(tenso_cmd("inspect", "--json", f))[0])
    assert rep["valid"] is True and rep["canonical"] is False
    [region] = rep["nonzero_padding"]
    assert (region["path"], region["kind"], region["first_nonzero"], region["nonzero_bytes"]) == (path, kind, offset, 1)
    node = rep["packet"]
    for key in node_path:
        node = next(e for e in node["entries"] if e["key"] == key)
    assert node["canonical_padding"] is False
    assert sum(not n["canonical_padding"] for n in _all_nodes(rep["packet"])) == 1
    assert "padding: non-zero" in text(tenso_cmd("inspect", f))[0]


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00", b"junk"])
def test_trailing_bytes_are_reported(tail, tmp_path):
    good = golden_path("v4-0.24.0", "bundle_with_sparse")
    f = tmp_path / "trailing.tenso"
    size = len(good.read_bytes())
    f.write_bytes(good.read_bytes() + tail)
    proc = tenso_cmd("verify", f)
    out, _ = text(proc)
    lines = out.splitlines()
    n = len(tail)
    phrase = f"{n} trailing byte{'s' if n > 1 else ''} after the packet at offset {size}"
    assert proc.returncode == 0 and len(lines) == 2 and lines[1] == f"{f}: warning: {phrase}", out
    proc = tenso_cmd("verify", "--strict", f, good)
    out, _ = text(proc)
    assert proc.returncode == 1
    assert out.splitlines()[0] == f"{f}: not canonical: {phrase}" and out.splitlines()[1].startswith(f"{good}: ok")
    rep = json.loads(text(tenso_cmd("inspect", "--json", f))[0])
    assert (rep["trailing_bytes"], rep["canonical"], rep["nonzero_padding"]) == (n, False, [])


# ---------------------------------------------------------------- hostile input ----------------------------------


@pytest.mark.parametrize("strict", [[], ["--strict"]], ids=["default", "strict"])
def test_verify_hostile_corpus_names_each_class(strict):
    cases = HOSTILE["cases"]
    files = [tensohelp.HOSTILE / "corpus" / c["file"] for c in cases]
    proc = tenso_cmd("verify", *strict, *files)
    out, err = text(proc)
    assert proc.returncode == 1
    lines = out.splitlines()
    assert len(lines) == len(cases)
    for case, path, line in zip(cases, files, lines):
        prefix = f"{path}: {case['expected']}: "
        assert line.startswith(prefix), (case["description"], line)
        assert len(line) > len(prefix), line


def test_inspect_hostile_corpus_json():
    cases = HOSTILE["cases"]
    files = [tensohelp.HOSTILE / "corpus" / c["file"] for c in cases]
    proc = tenso_cmd("inspect", "--json", *files)
    out, _ = text(proc)
    assert proc.returncode == 1
    reports = [json.loads(line) for line in out.splitlines()]
    assert [r["error"]["class"] for r in reports] == [c["expected"] for c in cases]
    assert not any(r["valid"] for r in reports)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_verify_mixed_inputs(entry, tmp_path):
    good = golden_path("v4-0.24.0", "opt_integrity_float32")
    bad = tmp_path / "flipped.tenso"
    pkt = bytearray(good.read_bytes())
    pkt[70] ^= 0x10
    bad.write_bytes(bytes(pkt))
    proc = tenso_cmd("verify", good, bad, tmp_path / "missing.tenso", entry=entry)
    out, err = text(proc)
    assert proc.returncode == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"{good}: ok, dense v4 packet")
    assert lines[1].startswith(f"{bad}: TensoIntegrityError: Integrity check failed: xxh3 mismatch")
    assert lines[2].startswith(f"{tmp_path / 'missing.tenso'}: FileNotFoundError: ")
    assert len(lines) == 3 and not err


# ---------------------------------------------------------------- stdin / stdout ---------------------------------


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_stdin_and_stdout(entry):
    case = tensohelp.Case("v4-0.24.0", "bundle_with_sparse")
    proc = tenso_cmd("verify", "-", entry=entry, stdin=case.packet)
    assert proc.returncode == 0 and text(proc)[0].startswith("-: ok, bundle v4 packet")
    rep = json.loads(text(tenso_cmd("inspect", "--json", "-", entry=entry, stdin=case.packet))[0])
    assert rep["file"] == "-" and rep["valid"]
    check_node(rep["packet"], case.expected, "stdin")
    proc = tenso_cmd("convert", "-", "-", "--protocol", "3", entry=entry, stdin=case.packet)
    assert proc.returncode == 0
    assert proc.stdout[4] == 3
    tensohelp.assert_matches(tenso.loads(proc.stdout), case.expected, case.npz, "stdout")
    proc = tenso_cmd("verify", "-", entry=entry, stdin=case.packet[:-5])
    assert proc.returncode == 1 and text(proc)[0].startswith("-: TensoFormatError: ")


# ---------------------------------------------------------------- convert ----------------------------------------


def _fits(exp, target):
    """Whether the fixture's value can be written as `target` (.npy, .npz, .safetensors, or a protocol number)."""
    t = exp["type"]
    if t == "ragged":
        return _fits(exp["bundle"], target)
    if target == 3:
        return t != "string"
    if target == 4:
        return True
    if target == ".npy":
        return t == "dense" and exp["dtype"] != "bfloat16"
    if t != "bundle":
        return False
    for _, sub in exp["entries"]:
        if sub["type"] != "dense":
            return False
        if target == ".npz" and sub["dtype"] == "bfloat16":
            return False
        if target == ".safetensors" and sub["dtype"] not in SAFETENSORS_DTYPES:
            return False
    return True


def _reordered(exp, keys):
    """The expected node of a bundle with its entries in `keys` order (safetensors keeps no entry order)."""
    node = copy.deepcopy(exp["bundle"] if exp["type"] == "ragged" else exp)
    entries = dict(node["entries"])
    assert sorted(entries) == sorted(keys)
    node["entries"] = [[k, entries[k]] for k in keys]
    return node


def test_convert_round_trips_every_golden_fixture(tmp_path):
    """Every fixture converted to the other protocol (v3 -> 4, v4 -> 3), and to .npy / .npz / .safetensors and back
    where the value fits; the result decodes to the fixture's value. The array formats are tried once per value
    (the v4 fixture where both versions hold it: the decoders of both are covered by the protocol conversions)."""
    jobs, checks = [], []
    v4_names = {n for f, n in GOLDEN if f.startswith("v4")}
    for folder, name in GOLDEN:
        case = tensohelp.Case(folder, name)
        src = golden_path(folder, name)
        other = 3 if case.protocol == 4 else 4
        if _fits(case.expected, other):
            out = tmp_path / f"{folder}-{name}.p{other}.tenso"
            jobs.append([("convert", src, out, "--protocol", other)])
            checks.append((case, out, other))
        if case.protocol == 3 and name in v4_names:
            continue
        for ext in (".npy", ".npz", ".safetensors"):
            if _fits(case.expected, ext):
                mid = tmp_path / f"{folder}-{name}{ext}"
                back = tmp_path / f"{folder}-{name}{ext}.tenso"
                jobs.append([("convert", src, mid), ("convert", mid, back)])
                checks.append((case, (mid, back), ext))

    def run(steps):
        return [tenso_cmd(*step) for step in steps]

    results = parallel([lambda s=steps: run(s) for steps in jobs])
    assert len(checks) > 130
    assert {c[2] for c in checks} == {3, 4, ".npy", ".npz", ".safetensors"}
    for (case, out, target), procs in zip(checks, results):
        for proc in procs:
            assert proc.returncode == 0, (case, target, text(proc))
        where = f"{case} -> {target}"
        if isinstance(target, int):
            data = out.read_bytes()
            assert data[4] == target, where
            tensohelp.assert_matches(tenso.loads(data), case.expected, case.npz, where)
            continue
        mid, back = out
        got = tenso.loads(back.read_bytes())
        if target == ".npy":
            tensohelp.assert_dense_equal(np.load(mid, allow_pickle=False), got, where)
            tensohelp.assert_matches(got, case.expected, case.npz, where)
        elif target == ".npz":
            with np.load(mid, allow_pickle=False) as z:
                assert list(z.files) == list(got)
            tensohelp.assert_matches(got, case.expected, case.npz, where)
        else:
            tensohelp.assert_matches(got, _reordered(case.expected, list(got)), case.npz, where)


def test_npz_entry_names_are_kept(tmp_path):
    """Names np.savez would take as its own parameters, the empty name and a slash survive .npz both ways."""
    value = {"file": np.arange(3), "allow_pickle": np.ones(2), "": np.zeros(1), "a/b": np.array(2.0)}
    src = tmp_path / "in.tenso"
    src.write_bytes(bytes(tenso.dumps(value)))
    assert tenso_cmd("convert", src, tmp_path / "m.npz").returncode == 0
    assert tenso_cmd("convert", tmp_path / "m.npz", tmp_path / "back.tenso").returncode == 0
    got = tenso.loads((tmp_path / "back.tenso").read_bytes())
    assert list(got) == list(value)
    for k in value:
        tensohelp.assert_dense_equal(got[k], value[k], k)


def test_convert_options(tmp_path):
    src = golden_path("v3-0.19.4", "dtype_float32")
    case = tensohelp.Case("v3-0.19.4", "dtype_float32")
    out = tmp_path / "o.tenso"
    assert tenso_cmd("convert", src, out, "--check-integrity", "--compress").returncode == 0
    info = tenso.get_packet_info(out.read_bytes())
    assert (info["version"], info["integrity_protected"], info["compressed"]) == (4, True, True)
    tensohelp.assert_matches(tenso.loads(out.read_bytes()), case.expected, case.npz)
    bundle = golden_path("v4-0.24.0", "bundle_flat_mixed")
    z = tmp_path / "c.npz"
    assert tenso_cmd("convert", bundle, z, "--compress").returncode == 0
    with np.load(z) as loaded:
        assert loaded.zip.infolist()[0].compress_type != 0  # deflated
    # Default protocol is 4, whatever the input's.
    assert tenso_cmd("convert", src, out).returncode == 0 and out.read_bytes()[4] == 4


def _refusal(tmp_path, value_or_path, out_name, *extra):
    if isinstance(value_or_path, pathlib.Path):
        src = value_or_path
    else:
        src = tmp_path / "in.tenso"
        src.write_bytes(bytes(value_or_path))
    out = tmp_path / out_name
    proc = tenso_cmd("convert", src, out, *extra)
    _, err = text(proc)
    assert proc.returncode == 1, err
    assert err.startswith("tenso convert: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


def test_convert_refuses_what_does_not_fit(tmp_path):
    g = golden_path
    assert "sparse csr matrix, which .npy cannot hold" in _refusal(tmp_path, g("v4-0.24.0", "sparse_csr_float64"),
                                                                  "x.npy")
    assert "quantized tensor, which .npy cannot hold" in _refusal(tmp_path, g("v4-0.24.0", "quant_qint8_per_group"),
                                                                 "x.npy")
    assert "string tensor; .npz holds a bundle" in _refusal(tmp_path, g("v4-0.24.0", "string_mixed_utf8"), "x.npz")
    assert "entry 'layer1' is a bundle, which .npz cannot hold" in _refusal(
        tmp_path, g("v4-0.24.0", "bundle_nested_mixed"), "x.npz")
    assert "bfloat16, which .npy cannot record" in _refusal(tmp_path, g("v4-0.24.0", "dtype_bfloat16"), "x.npy")
    assert "(write one array to .npy)" in _refusal(tmp_path, g("v4-0.24.0", "shape_7_float32"), "x.safetensors")
    assert "entry 'c' is complex128, which .safetensors cannot record" in _refusal(
        tmp_path, tenso.dumps({"c": np.ones(2, np.complex128)}), "x.safetensors")
    assert "'__metadata__' is a name .safetensors reserves" in _refusal(
        tmp_path, tenso.dumps({"__metadata__": np.ones(2)}), "x.safetensors")
    assert "string tensors in protocol v3" in _refusal(tmp_path, g("v4-0.24.0", "string_mixed_utf8"), "x.tenso",
                                                       "--protocol", "3")


def test_convert_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "junk.tenso").write_bytes(b"not a packet at all")
    assert "TensoFormatError: " in _refusal(tmp_path, tmp_path / "junk.tenso", "x.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY junk")
    assert "ValueError" in _refusal(tmp_path, tmp_path / "junk.npy", "x.tenso")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "allow_pickle=False" in _refusal(tmp_path, tmp_path / "obj.npy", "x.tenso")  # never unpickles input
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    assert "ValueError: Unsupported dtype: <U1" in _refusal(tmp_path, tmp_path / "s.npy", "x.tenso")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    assert "not a valid .safetensors file" in _refusal(tmp_path, tmp_path / "junk.safetensors", "x.tenso")
    assert "FileNotFoundError" in _refusal(tmp_path, tmp_path / "missing.tenso", "x.npy")


def test_safetensors_bfloat16_round_trip(tmp_path):
    """bfloat16 travels through .safetensors both ways (safetensors.numpy itself cannot read it back)."""
    bf = tensohelp.bfloat16()
    value = {"w": np.arange(6, dtype=np.float32).astype(bf).reshape(2, 3), "b": np.array([True, False])}
    src = tmp_path / "in.tenso"
    src.write_bytes(bytes(tenso.dumps(value)))
    assert tenso_cmd("convert", src, tmp_path / "m.safetensors").returncode == 0
    assert tenso_cmd("convert", tmp_path / "m.safetensors", tmp_path / "back.tenso").returncode == 0
    got = tenso.loads((tmp_path / "back.tenso").read_bytes())
    assert sorted(got) == ["b", "w"]
    tensohelp.assert_dense_equal(got["w"], value["w"])
    tensohelp.assert_dense_equal(got["b"], value["b"])
    import torch  # an independent reader of the file: safetensors' torch loader knows bfloat16
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "m.safetensors"))
    assert t["w"].dtype == torch.bfloat16 and t["w"].float().tolist() == [[0, 1, 2], [3, 4, 5]]
